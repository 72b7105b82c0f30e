"""The pipelined decode (issue 17): runs in flight in the decoder process while the caller reads the next.

Every containment guarantee of the synchronous decode holds with a run queued behind the one that crashes or
hangs: the culprit is isolated by halving, the queued run is decoded again untouched (it never started), every
input gets exactly one outcome, and the pixels are exact. Real DALI in a real decoder process; the crashes are
real signals raised on request (``decoder_process.CRASH_TEST_ENV``), as in tests/test_containment.py.
"""

from __future__ import annotations

import threading

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms import window

from beam_tarimg import ReadAllImagesFromTars
from beam_tarimg.decode import PIPELINE_DEPTH, ImageDecoder
from beam_tarimg.decoder_process import CRASH_TEST_ENV
from conftest import make_jpeg, pillow_rgb, write_tar
from test_containment import MARKER, _marked


def _stream_batches(n_batches: int, per_batch: int, marked=()):
    """Batches (key, blobs, None) of distinct JPEGs; ``marked``: (batch, index) pairs carrying the crash marker."""
    batches = []
    for b in range(n_batches):
        blobs = [make_jpeg(100 * b + i, 24 + i % 5, 20 + b % 3) for i in range(per_batch)]
        for mb, mi in marked:
            if mb == b:
                blobs[mi] = _marked(blobs[mi])
        batches.append((b, blobs, None))
    return batches


def _collect(decoder, batches):
    """{(batch, index): outcome}, pixels copied; asserts each input comes back exactly once, runs in order."""
    got = {}
    order = []
    for key, run, outcomes in decoder.decode_stream(iter(batches)):
        order.append(key)
        for i, o in zip(run, outcomes):
            assert (key, i) not in got, ("twice", key, i)
            got[(key, i)] = (o.decoder, None if o.pixels is None else o.pixels.copy(), o.error)
    assert order == sorted(order)  # runs come back in the order their batches went in
    assert set(got) == {(b, i) for b, blobs, _ in batches for i in range(len(blobs))}
    return got


def test_stream__keeps_runs_in_flight_and_gives_exact_pixels_in_order():
    decoder = ImageDecoder(max_batch_size=4, num_threads=1, device="cpu")
    batches = _stream_batches(6, 10)  # 3 runs a batch
    seen_in_flight = []
    process = decoder._process
    original = process.result

    def result(ticket):
        seen_in_flight.append(len(process._pending))
        return original(ticket)

    process.result = result
    got = _collect(decoder, batches)
    for (b, i), (name, pixels, error) in got.items():
        assert (name, error) == ("cpu", None)
        assert np.array_equal(pixels, pillow_rgb(batches[b][1][i]))
    # While the caller waits for a run, the next one is already in the decoder process's queue.
    assert max(seen_in_flight) == PIPELINE_DEPTH and seen_in_flight.count(PIPELINE_DEPTH) >= len(seen_in_flight) - 2
    assert decoder.crashes == 0
    decoder.close()


@pytest.mark.parametrize("culprit_batch", [0, 2, 5])
def test_stream__a_crash_costs_only_its_image_and_the_queued_run_is_decoded_again(monkeypatch, culprit_batch):
    monkeypatch.setenv(CRASH_TEST_ENV, f"SIGSEGV:{MARKER.hex()}")
    decoder = ImageDecoder(max_batch_size=8, num_threads=1, device="cpu")
    batches = _stream_batches(6, 8, marked=[(culprit_batch, 3)])
    got = _collect(decoder, batches)
    failed = {k for k, (_, pixels, _) in got.items() if pixels is None}
    assert failed == {(culprit_batch, 3)}
    assert got[(culprit_batch, 3)][2] == "decoder process crashed (SIGSEGV)"
    for (b, i), (name, pixels, error) in got.items():
        if (b, i) != (culprit_batch, 3):
            assert name == "cpu" and np.array_equal(pixels, pillow_rgb(batches[b][1][i])), (b, i)
    # 8 -> 4 -> 2 -> 1: the run holding the culprit, then each half holding it; the queued run behind the
    # first crash is no suspect and costs no crash.
    assert decoder.crashes == 4
    decoder.close()


@pytest.mark.timeout(90)
def test_stream__a_hang_with_a_run_queued_behind_it_times_out_and_costs_only_its_image(monkeypatch):
    monkeypatch.setenv(CRASH_TEST_ENV, f"SIGSTOP:{MARKER.hex()}")
    decoder = ImageDecoder(max_batch_size=2, num_threads=1, device="cpu", run_timeout_s=2)
    batches = _stream_batches(3, 2, marked=[(1, 0)])
    got = _collect(decoder, batches)
    assert {k for k, (_, p, _) in got.items() if p is None} == {(1, 0)}
    assert got[(1, 0)][2] == "decoder process timed out after 2 s (killed)"
    assert decoder.crashes == 2  # 2 -> 1
    decoder.close()


def test_stream__two_threads_streaming_through_one_decoder_with_a_crash(monkeypatch):
    # Each thread's runs are answered to it, in its order, whichever thread reads the answer; a crash in one
    # thread's run settles the other's queued run as lost (decoded again), never as failed.
    monkeypatch.setenv(CRASH_TEST_ENV, f"SIGSEGV:{MARKER.hex()}")
    decoder = ImageDecoder(max_batch_size=3, num_threads=1, device="cpu", run_timeout_s=30)
    per_thread = [_stream_batches(5, 6), _stream_batches(5, 6, marked=[(3, 1)])]
    results = [None, None]
    errors = []

    def work(t):
        try:
            results[t] = _collect(decoder, per_thread[t])
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,), daemon=True) for t in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=90)
    assert not any(th.is_alive() for th in threads) and not errors, errors
    for t in range(2):
        for (b, i), (name, pixels, error) in results[t].items():
            if (t, b, i) == (1, 3, 1):
                assert pixels is None and "SIGSEGV" in error
            else:
                assert name == "cpu" and np.array_equal(pixels, pillow_rgb(per_thread[t][b][1][i])), (t, b, i)
    decoder.close()


def test_stream__a_consumer_that_stops_early_leaves_nothing_in_flight():
    decoder = ImageDecoder(max_batch_size=4, num_threads=1, device="cpu")
    stream = decoder.decode_stream(iter(_stream_batches(4, 8)))
    key, run, outcomes = next(stream)
    assert decoder._process._pending  # the next runs are in flight
    stream.close()  # what garbage collection of an abandoned generator does
    assert not decoder._process._pending
    (again,) = decoder.decode([make_jpeg(7)])
    assert np.array_equal(again.pixels, pillow_rgb(make_jpeg(7)))
    decoder.close()


@pytest.mark.parametrize("redistribute", ["none", "encoded"])  # the fused step; the decode step after a shuffle
def test_reader__pipelined_across_elements_keeps_each_images_window(tmp_path, redistribute):
    # Tars in two fixed windows: each ImageBatch comes out in its own tar's window, though its run was handed
    # over in the process() call of an element before it and emitted in a later call or in finish_bundle.
    paths = []
    for t in range(4):
        path = str(tmp_path / f"{t:02d}.tar")
        write_tar(path, [(f"{t}-{i}.jpg", make_jpeg(10 * t + i, 20, 16)) for i in range(5)])
        paths.append(path)
    options = PipelineOptions(["--runner=FnApiRunner"])
    with beam.Pipeline(options=options) as p:
        counts = (
            p
            | beam.Create([(path, t * 100) for t, path in enumerate(paths)])
            | beam.Map(lambda kv: window.TimestampedValue(kv[0], kv[1]))
            | beam.WindowInto(window.FixedWindows(200))
            | ReadAllImagesFromTars(batch_size=2, redistribute=redistribute)
            | beam.FlatMap(lambda batch: [(img.image_path.split("/", 1)[0], 1) for img in batch])
            | beam.CombinePerKey(sum)
            | beam.ParDo(_WithWindow())
        )
        assert_that(
            counts,
            equal_to([("00.tar", 5, 0), ("01.tar", 5, 0), ("02.tar", 5, 200), ("03.tar", 5, 200)]),
        )


class _WithWindow(beam.DoFn):
    def process(self, kv, w=beam.DoFn.WindowParam):
        yield kv[0], kv[1], int(w.start)


def test_decoder_process__pixels_beyond_the_planned_slot_come_back_in_a_buffer_of_the_childs():
    # The output slot is sized from the headers' claims; pixels that do not fit (no claim at all here) come back
    # in a memfd the decoder process makes, which joins the pool. Exact pixels, no crash.
    from beam_tarimg.dali import plan_of
    from beam_tarimg.jpeg import parse_jpeg

    decoder = ImageDecoder(max_batch_size=4, num_threads=1, device="cpu")
    process = decoder._process
    blobs = [make_jpeg(40 + i, 40, 30) for i in range(3)]
    plans = [plan_of(parse_jpeg(b)) for b in blobs]
    before = set(process._slots)
    outcomes = process.decode(blobs, plans, out_bytes=0)
    assert [o.decoder for o in outcomes] == ["cpu"] * 3
    for blob, o in zip(blobs, outcomes):
        assert np.array_equal(o.pixels, pillow_rgb(blob))
    (adopted,) = set(process._slots) - before
    assert process._slots[adopted].size == 3 * 40 * 30 * 3
    del outcomes, o
    again = decoder.decode(blobs)  # and the usual path goes on
    assert all(np.array_equal(o.pixels, pillow_rgb(b)) for o, b in zip(again, blobs)) and decoder.crashes == 0
    decoder.close()
