"""The plugin on Beam's local runners, composed with ordinary transforms, and pickled as runners pickle it.

- DirectRunner in multi_processing mode (two SDK worker processes) and multi_threading mode (several DoFn
  instances in one process) decode every image exactly once, with Pillow's pixels, and build one DALI
  pipeline per process, not one per DoFn instance (the ``decoders_built`` counter).
- ReadImagesFromTars feeds an ordinary ``beam.Map`` and a ``CoGroupByKey`` like any other source.
- The transforms and DoFns survive Beam's pickler (and stdlib pickle, and dill when installed), before and
  after ``setup()``, without carrying a DALI pipeline, a lock or an open file.

The portable path (job service + worker pool) is in test_portable.py.
"""

from __future__ import annotations

import base64
import bz2
import io
import os
import pickle
import tarfile
import threading
import zlib

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from _portable import (
    beam_counters,
    build_probe,
    expected_rows,
    mean_rgb,
    pillow_reference,
    probe_rows_by_id,
    read_probe_output,
    service_env,
)
from beam_tarimg import EncodedBatch, EncodedImage, ImageBatch, ReadAllImagesFromTars, ReadImagesFromTars
from beam_tarimg import transforms as T
from beam_tarimg.sample import make_sample_dataset

BATCH = 4


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """4 tars x 6 ImageNet-like JPEGs (baseline, 4:4:4, progressive and grayscale among them) with sidecars,
    and what a correct reader yields for each image (decoded here with Pillow)."""
    folder = tmp_path_factory.mktemp("tars")
    paths = make_sample_dataset(str(folder), num_tars=4, images_per_tar=6, seed=5)
    return str(folder), paths, pillow_reference(paths)


@pytest.fixture
def worker_env(monkeypatch):
    """SDK worker subprocesses import beam_tarimg and this test's helpers (pickled by reference)."""
    monkeypatch.setenv("PYTHONPATH", service_env()["PYTHONPATH"])


def _run_probe(folder, out_prefix, flags):
    p = beam.Pipeline(options=PipelineOptions(flags))
    build_probe(p, folder, out_prefix, batch_size=BATCH, include_metadata=True)
    result = p.run()
    result.wait_until_finish()
    return read_probe_output(out_prefix), beam_counters(result)


# ---------------------------------------------------------------------------------------------------------------
# DirectRunner modes


@pytest.mark.slow
def test_direct_runner_multi_processing__two_worker_processes_decode_every_image_once(dataset, tmp_path, worker_env):
    folder, _, reference = dataset
    rows, counters = _run_probe(
        folder, str(tmp_path / "out"),
        ["--runner=DirectRunner", "--direct_running_mode=multi_processing", "--direct_num_workers=2"],
    )

    assert probe_rows_by_id(rows) == expected_rows(reference)
    pids = {row["pid"] for row in rows}
    assert len(pids) == 2 and os.getpid() not in pids, f"decoded in {pids}, test process {os.getpid()}"
    # Metrics do come back from the worker processes in this mode: one decoder per process.
    assert counters["decoders_built"] == 2, counters
    assert counters["images_decoded_cpu"] == len(reference), counters
    assert counters.get("dali_rebuilds", 0) == 0, counters


@pytest.mark.slow
def test_direct_runner_multi_threading__dofn_instances_of_a_process_share_one_decoder(dataset, tmp_path, monkeypatch):
    folder, _, reference = dataset
    instances, lock = set(), threading.Lock()
    original_setup = T._DecodeBatchesFn.setup

    def recording_setup(self):
        with lock:
            instances.add(id(self))
        original_setup(self)

    monkeypatch.setattr(T._DecodeBatchesFn, "setup", recording_setup)  # the fused read+decode DoFn inherits it
    rows, counters = _run_probe(
        folder, str(tmp_path / "out"),
        ["--runner=DirectRunner", "--direct_running_mode=multi_threading", "--direct_num_workers=3"],
    )

    assert probe_rows_by_id(rows) == expected_rows(reference)
    assert {row["pid"] for row in rows} == {os.getpid()}
    assert len(instances) >= 2, f"expected several DoFn instances in one process, saw {len(instances)}"
    assert counters["decoders_built"] == 1, counters
    assert counters["images_decoded_cpu"] == len(reference), counters


# ---------------------------------------------------------------------------------------------------------------
# Composability


def _images(batch: ImageBatch):
    yield from batch


def _id_and_mean(image):
    return image.image_id, mean_rgb(image.image_data)


def _joined(element):
    image_id, grouped = element
    means, labels = list(grouped["mean"]), sorted(grouped["label"])
    return image_id, (means[0] if means else None), labels


def test_read_then_map_and_cogroupbykey__joins_mean_colours_by_image_id(dataset):
    folder, _, reference = dataset
    ids = sorted(reference)
    labelled = ids[::2]  # half the images have a label; one label has no image
    labels = [(image_id, f"label-{image_id}") for image_id in labelled] + [("no-such-image", "orphan")]
    expected = [(i, reference[i]["mean_rgb"], [f"label-{i}"] if i in labelled else []) for i in ids]
    expected.append(("no-such-image", None, ["orphan"]))

    with BeamTestPipeline(runner="FnApiRunner") as p:
        means = (
            p
            | "Read" >> ReadImagesFromTars(folder, batch_size=BATCH)
            | "Images" >> beam.FlatMap(_images)
            | "MeanColour" >> beam.Map(_id_and_mean)
        )
        label_pc = p | "Labels" >> beam.Create(labels)
        joined = {"mean": means, "label": label_pc} | "Join" >> beam.CoGroupByKey() | "Format" >> beam.Map(_joined)
        assert_that(joined, equal_to(expected), label="JoinedAsExpected")


# ---------------------------------------------------------------------------------------------------------------
# Pickling, as a runner does it


def _beam_pickler(library):
    from apache_beam.internal import pickler

    def roundtrip(obj):
        previous = "dill" if pickler.is_currently_dill() else "cloudpickle"
        pickler.set_library(library)
        try:
            encoded = pickler.dumps(obj)
            return _raw_pickle(encoded), pickler.loads(encoded)
        finally:
            pickler.set_library(previous)  # also undoes the pickler hooks that switching to dill installs

    return roundtrip


def _raw_pickle(encoded: bytes) -> bytes:
    """Beam's pickler output is base64 of a bz2- (or zlib-) compressed pickle: the pickle itself."""
    data = base64.b64decode(encoded)
    for decompress in (bz2.decompress, zlib.decompress):
        try:
            return decompress(data)
        except (OSError, ValueError, zlib.error):
            continue
    return data


def _stdlib_roundtrip(obj):
    raw = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return raw, pickle.loads(raw)


def _dill_roundtrip(obj):
    dill = pytest.importorskip("dill", reason="dill is not installed (Beam 2.77 no longer depends on it)")
    raw = dill.dumps(obj)
    return raw, dill.loads(raw)


PICKLERS = {
    "beam-cloudpickle": lambda: _beam_pickler("cloudpickle"),
    "beam-dill": lambda: (pytest.importorskip("dill", reason="dill is not installed (Beam 2.77 no longer depends "
                                                              "on it)"), _beam_pickler("dill"))[1],
    "stdlib": lambda: _stdlib_roundtrip,
    "dill": lambda: _dill_roundtrip,
}

# Modules whose objects must never be in a pickled transform or DoFn: DALI, locks and threads, open files.
FORBIDDEN_MODULES = ("nvidia", "_thread", "threading", "_io", "io", "socket", "multiprocessing")


def _globals_in(raw: bytes) -> set:
    """Every (module, name) the pickle would import on load."""
    found = set()

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            found.add((module, name))
            return super().find_class(module, name)

    Recorder(io.BytesIO(raw)).load()
    return found


def _assert_clean(raw: bytes, what: str) -> None:
    bad = sorted(
        (m, n) for m, n in _globals_in(raw) if any(m == f or m.startswith(f + ".") for f in FORBIDDEN_MODULES)
    )
    assert not bad, f"pickled {what} holds objects of {bad}"


def _transforms(folder):
    return {
        "ReadImagesFromTars": ReadImagesFromTars(folder, batch_size=BATCH, num_threads=1).with_failures(),
        "ReadAllImagesFromTars": ReadAllImagesFromTars(batch_size=BATCH, include_metadata=True).with_failures(),
    }


def _dofns():
    read_all = ReadAllImagesFromTars(batch_size=BATCH, num_threads=1, include_metadata=True)
    rc, dc = read_all._read_config, read_all._decode_config
    return {
        "_ReadTarsFn": T._ReadTarsFn(rc),
        "_DecodeBatchesFn": T._DecodeBatchesFn(dc),
        "_ReadAndDecodeTarsFn": T._ReadAndDecodeTarsFn(rc, dc),
    }


def _encoded_batch(tar_path) -> EncodedBatch:
    with tarfile.open(tar_path) as tar:
        images = [
            EncodedImage(m.name, m.name.rsplit(".", 1)[0], tar.extractfile(m).read(), {})
            for m in tar.getmembers() if m.name.endswith(".jpg")
        ]
    return EncodedBatch(tar_path, images[:BATCH])


def _main_outputs(fn, element) -> list:
    """What ``fn`` gives on its main output for one element in one bundle, as a runner calls it (start_bundle,
    process in the global window, finish_bundle; failures are tagged and left out; windowed values unwrapped)."""
    import inspect

    from apache_beam.transforms.window import GlobalWindow
    from apache_beam.utils.timestamp import MIN_TIMESTAMP
    from apache_beam.utils.windowed_value import WindowedValue

    fn.start_bundle()
    takes_window = "window" in inspect.signature(fn.process).parameters
    out = list(fn.process(element, window=GlobalWindow(), timestamp=MIN_TIMESTAMP) if takes_window
               else fn.process(element))
    out += list(fn.finish_bundle() or [])
    out = [e.value if isinstance(e, WindowedValue) else e for e in out]
    return [e for e in out if isinstance(e, (EncodedBatch, ImageBatch))]


@pytest.mark.parametrize("pickler_name", sorted(PICKLERS))
def test_transforms__pickle_without_dali_locks_or_files_and_keep_their_settings(dataset, pickler_name):
    roundtrip = PICKLERS[pickler_name]()
    folder = dataset[0]
    for name, transform in _transforms(folder).items():
        raw, copy = roundtrip(transform)
        _assert_clean(raw, name)
        assert type(copy) is type(transform)
        if name == "ReadImagesFromTars":
            read_all, original = copy._read_all, transform._read_all
        else:
            read_all, original = copy, transform
        assert read_all._read_config == original._read_config
        assert read_all._decode_config == original._decode_config
        assert read_all._with_failures is True
        assert len(raw) < 20_000, f"pickled {name} is {len(raw)} bytes"


@pytest.mark.parametrize("pickler_name", sorted(PICKLERS))
def test_dofns__pickle_before_and_after_setup_without_their_live_decoder(dataset, pickler_name):
    """A set-up DoFn holds a live DALI pipeline and a lock (through Shared); neither may be in its pickled
    state, and the copy must set itself up and decode again. Needs ``__getstate__`` in transforms.py."""
    roundtrip = PICKLERS[pickler_name]()
    tar = dataset[1][0]
    inputs = {"_ReadTarsFn": tar, "_DecodeBatchesFn": _encoded_batch(tar), "_ReadAndDecodeTarsFn": tar}
    for name, fn in _dofns().items():
        raw, copy = roundtrip(fn)
        _assert_clean(raw, f"{name} before setup")

        fn.setup()
        first = _main_outputs(fn, inputs[name])  # a decoding DoFn now holds its live decoder
        assert first, f"{name} gave nothing"
        raw, copy = roundtrip(fn)
        _assert_clean(raw, f"{name} after setup")
        assert not hasattr(copy, "_shared"), f"{name}: the copy carries the live decoder"
        copy.setup()
        assert _main_outputs(copy, inputs[name]) == first
        assert _main_outputs(fn, inputs[name]) == first  # the original still works too
        fn.teardown()
        copy.teardown()
