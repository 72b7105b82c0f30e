"""Picklable pieces of the Beam cases (a module of their own: ``bench.worker`` runs as ``__main__``)."""

from __future__ import annotations

import apache_beam as beam
from apache_beam.metrics import Metrics

NAMESPACE = "bench"


def batch_totals(batch):
    """(images, pixels) of one ImageBatch."""
    return len(batch), sum(int(im.image_data.shape[0]) * int(im.image_data.shape[1]) for im in batch)


def sum_totals(pairs):
    images = pixels = 0
    for n, px in pairs:
        images += n
        pixels += px
    return images, pixels


def report_totals(totals):
    Metrics.counter(NAMESPACE, "images").inc(totals[0])
    Metrics.counter(NAMESPACE, "pixels").inc(totals[1])
    return totals


class CountImages(beam.PTransform):
    """ImageBatches -> their image and pixel totals as the counters ``bench:images`` and ``bench:pixels``
    (a Map and a CombineGlobally: no sink)."""

    def expand(self, batches):
        return (
            batches
            | "Totals" >> beam.Map(batch_totals)
            | "Sum" >> beam.CombineGlobally(sum_totals)
            | "Report" >> beam.Map(report_totals)
        )


def read_counters(result) -> dict:
    from apache_beam.metrics.metric import MetricsFilter

    out = {}
    for key in ("images", "pixels"):
        found = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE).with_name(key))["counters"]
        out[key] = sum(c.committed if c.committed is not None else c.attempted for c in found)
    return out
