"""The jobs' own Beam steps around ``ReadAllImagesFromTars`` and the sinks: failures as JSON lines (counted
by stage, with a bounded sample of reasons), the written files, the progress reports, and ``pipelines.embed``'s
sink (the model, then its embeddings to Parquet).

Counters (namespace ``beam_tarimg``): ``failure_records``, ``failures_<stage>`` (for the read's stages and any
other, e.g. ``inference``); string sets
``files_written``, ``failure_examples``.
"""

from __future__ import annotations

import json
import threading
import uuid
from typing import Dict, Iterator

import apache_beam as beam
from apache_beam.metrics import Metrics

from beam_tarimg.transforms import NAMESPACE
from beam_tarimg.types import FailureStage, ImageFailure
from pipelines import progress

EXAMPLES_PER_STAGE = 3


class FailureToJsonFn(beam.DoFn):
    """An ImageFailure as one JSON line (tar, member, stage, error). Counters: failure_records, and
    failures_<stage> for each stage; string set failure_examples: the first few failures of each stage seen by
    each worker process (JSON, errors cut at 300 characters), so that a job can say why it lost inputs
    without holding its failures."""

    _examples_lock = threading.Lock()
    _examples_given: Dict[tuple, int] = {}  # per process and job: how many examples of each stage were recorded

    def __init__(self):
        self._job = uuid.uuid4().hex  # several jobs may run in one process (run(argv) from Python, tests)

    def setup(self):
        self._failures = Metrics.counter(NAMESPACE, "failure_records")
        self._by_stage = {stage: Metrics.counter(NAMESPACE, f"failures_{stage}") for stage in FailureStage.ALL}
        self._examples = Metrics.string_set(NAMESPACE, "failure_examples")

    def process(self, failure: ImageFailure):
        self._failures.inc()
        counter = self._by_stage.get(failure.stage)
        if counter is None:  # a stage of a step after the read (pipelines.embed: "inference")
            counter = self._by_stage[failure.stage] = Metrics.counter(NAMESPACE, f"failures_{failure.stage}")
        counter.inc()
        progress.report(progress.FAILURES)
        record = failure.to_dict()
        with self._examples_lock:
            key = (self._job, failure.stage)
            given = self._examples_given.get(key, 0)
            if given < EXAMPLES_PER_STAGE:
                self._examples_given[key] = given + 1
                example = dict(record, error=str(record.get("error") or "")[:300])
                self._examples.add(json.dumps(example, ensure_ascii=False, sort_keys=True))
        yield json.dumps(record, ensure_ascii=False)


class RecordOutputFileFn(beam.DoFn):
    """Records each written file name in the string-set metric files_written."""

    def setup(self):
        self._files = Metrics.string_set(NAMESPACE, "files_written")

    def process(self, file_name):
        self._files.add(str(file_name))


class TarDoneFn(beam.DoFn):
    """Passes each tar on, then reports it done: the steps fused after this one have finished with an element
    when its ``yield`` returns (the SDK harness runs fused steps depth-first, one element at a time)."""

    def process(self, tar):
        yield tar
        progress.report(progress.TARS)


class CountImagesFn(beam.DoFn):
    """Passes each ImageBatch on and reports its images."""

    def process(self, batch):
        progress.report(progress.IMAGES, len(batch))
        yield batch


# pipelines.embed: the columns of its Parquet files.
IMAGE_ID, IMAGE_PATH, EMBEDDING = "image_id", "image_path", "embedding"


def embedding_schema():
    """``image_id`` string, ``image_path`` string, ``embedding`` list<float32> (non-null values)."""
    import pyarrow as pa

    return pa.schema([
        pa.field(IMAGE_ID, pa.string(), nullable=False),
        pa.field(IMAGE_PATH, pa.string(), nullable=False),
        pa.field(EMBEDDING, pa.list_(pa.field("element", pa.float32(), nullable=False)), nullable=False),
    ])


class PredictionsToRowGroupsFn(beam.DoFn):
    """ImagePredictions as ``pyarrow.Table``s (``embedding_schema``) of about ``row_group_bytes`` of embeddings
    each (one per window; the rest at the end of the bundle). Counters: images_written, row_groups_written."""

    def __init__(self, row_group_bytes: int):
        self._row_group_bytes = row_group_bytes

    def setup(self):
        self._schema = embedding_schema()
        self._images_written = Metrics.counter(NAMESPACE, "images_written")
        self._row_groups_written = Metrics.counter(NAMESPACE, "row_groups_written")

    def start_bundle(self):
        self._pending: Dict[object, list] = {}  # window -> [rows, bytes]

    def process(self, prediction, window=beam.DoFn.WindowParam) -> Iterator:
        from beam_tarimg.inference import embedding

        pending = self._pending.setdefault(window, [[], 0])
        vector = embedding(prediction)
        pending[0].append((prediction.image_id, prediction.image_path, vector))
        pending[1] += vector.nbytes + len(prediction.image_path) + len(prediction.image_id)
        if pending[1] >= self._row_group_bytes:
            yield self._to_table(self._pending.pop(window)[0])

    def finish_bundle(self):
        from apache_beam.utils.windowed_value import WindowedValue

        pending, self._pending = self._pending, {}
        for window, (rows, _) in pending.items():
            yield WindowedValue(self._to_table(rows), window.max_timestamp(), [window])

    def _to_table(self, rows: list):
        import numpy as np
        import pyarrow as pa

        vectors = [r[2] for r in rows]
        offsets = np.zeros(len(rows) + 1, dtype=np.int32)
        offsets[1:] = np.cumsum([v.size for v in vectors])
        embeddings = pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.concatenate(vectors), pa.float32()),
                                              type=self._schema.field(EMBEDDING).type)
        table = pa.Table.from_arrays([pa.array([r[0] for r in rows], pa.string()),
                                      pa.array([r[1] for r in rows], pa.string()), embeddings], schema=self._schema)
        self._images_written.inc(table.num_rows)
        self._row_groups_written.inc()
        return table


class EmbedAndWrite(beam.PTransform):
    """``pipelines.embed``'s sink: ``PCollection[ImageBatch]`` in, the model run on each batch
    (``RunInferenceOnImages`` with ``handler``), one Parquet row per image out. Outputs (the written file names,
    the images the model refused as ImageFailures of stage ``inference``)."""

    def __init__(self, handler, file_path_prefix: str, *, num_shards: int, row_group_bytes: int, codec: str):
        super().__init__()
        self._handler, self._prefix = handler, file_path_prefix
        self._num_shards, self._row_group_bytes, self._codec = num_shards, row_group_bytes, codec

    def expand(self, batches):
        from beam_tarimg.inference import RunInferenceOnImages
        from beam_tarimg.parquetio import _RowGroup, _WriteRowGroups

        predictions, failures = batches | "Embed" >> RunInferenceOnImages(self._handler).with_failures()
        tables = predictions | "ToRowGroups" >> beam.ParDo(
            PredictionsToRowGroupsFn(self._row_group_bytes)).with_output_types(_RowGroup)
        files = tables | "WriteToParquet" >> _WriteRowGroups(
            self._prefix, schema=embedding_schema(), codec=self._codec, file_name_suffix=".parquet",
            num_shards=self._num_shards)
        return files, failures
