"""Shared test helpers: tar and JPEG builders, and a runner that collects a pipeline's outputs from files.

Test data is built here, in temporary folders; nothing binary is committed.

Time limits (pytest-timeout, set in pyproject.toml): a test past its limit fails with its name (SIGALRM raises
in the test), and the processes it started that are still alive are killed. Should the test not end even
then (the exception swallowed, a thread stuck in C), a backstop a minute later dumps every thread's stack and
ends the run. A run in which a test timed out ends at once after its summary (no wait for stuck threads).
"""

from __future__ import annotations

import io
import os
import pickle
import signal
import sys
import tarfile
import threading
import uuid
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import pytest

from beam_tarimg.sample import encode_jpeg, photo_like_image

Member = Union[Tuple[str, bytes], tarfile.TarInfo]

# -- time limits -------------------------------------------------------------------------------------------------

# The default limit (pyproject.toml) is 120 s: ~5x the slowest unmarked test measured on a 2-core machine shared
# with four other test runs. Tests marked slow (multi-process runners, object-store emulators: up to ~60 s
# there) and gpu get longer unless they set their own.
LONGER_LIMITS_S = {"slow": 420, "gpu": 600}
BACKSTOP_GRACE_S = 60.0  # after a test's limit, how long its SIGALRM failure may take to end it
_timed_out: list = []  # node ids of the tests that ran past their limit


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("timeout") is None:
            limits = [s for name, s in LONGER_LIMITS_S.items() if item.get_closest_marker(name) is not None]
            if limits:
                item.add_marker(pytest.mark.timeout(max(limits)))


def _descendants(root: int) -> List[int]:
    """The pids of the live processes below ``root`` (each parent before its children), from /proc."""
    children: Dict[int, List[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                state, ppid = f.read().rsplit(") ", 1)[1].split()[:2]
        except (OSError, IndexError, ValueError):
            continue
        if state == "Z":  # a zombie: ended already
            continue
        ppid = int(ppid)
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _kill(pids: Iterable[int], why: str) -> None:
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:160]
            os.kill(pid, signal.SIGKILL)
        except (OSError, ProcessLookupError):
            continue
        sys.stderr.write(f"\n{why}: killed process {pid} ({cmd})\n")


def _timeout_settings(item):
    if not item.config.pluginmanager.hasplugin("timeout"):  # not installed, or -p no:timeout: no limits
        return None
    import pytest_timeout

    settings = pytest_timeout._get_item_settings(item)
    return settings if settings.timeout else None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    settings = _timeout_settings(item)
    before = set(_descendants(os.getpid()))
    backstop = None
    if settings is not None:
        import pytest_timeout

        def last_resort():
            why = f"{item.nodeid} still running {BACKSTOP_GRACE_S:g} s past its {settings.timeout:g} s limit"
            sys.stderr.write(f"\n{why}: ending the run\n")
            _kill(_descendants(os.getpid()), why)
            pytest_timeout.timeout_timer(item, settings)  # dumps every thread's stack, then os._exit(1)

        backstop = threading.Timer(settings.timeout + BACKSTOP_GRACE_S, last_resort)
        backstop.daemon = True
        backstop.start()
    try:
        yield
    finally:
        if backstop is not None:
            backstop.cancel()
    if item.nodeid in _timed_out:
        _kill([p for p in _descendants(os.getpid()) if p not in before], f"{item.nodeid} timed out")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    if call.excinfo is not None and "from pytest-timeout" in str(call.excinfo.value):
        _timed_out.append(item.nodeid)


def pytest_sessionfinish(session, exitstatus):
    session.config._tarimg_exitstatus = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    # A test that timed out may have left threads that never end (a non-daemon thread keeps the interpreter
    # from exiting) or processes that hold the output open: end the run now that its report is out.
    if _timed_out:
        _kill(_descendants(os.getpid()), "the run had a timeout")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(getattr(config, "_tarimg_exitstatus", 1) or 1)


def _register_fn_api_runner_short_name() -> None:
    """The tests name the FnApiRunner by its short name, which Beam knows only from 2.6x on; on an older Beam
    (the engines' 2.62.0, `make engines`) register it, as the jobs do with the full name (pipelines.options)."""
    from apache_beam.runners import runner

    runner._RUNNER_MAP.setdefault("fnapirunner", "apache_beam.runners.portability.fn_api_runner.FnApiRunner")


_register_fn_api_runner_short_name()


def make_jpeg(seed: int, width: int = 48, height: int = 40, **kwargs) -> bytes:
    """A small photo-like JPEG, deterministic per seed."""
    return encode_jpeg(photo_like_image(np.random.default_rng(seed), width, height), **kwargs)


def pillow_rgb(data: bytes) -> np.ndarray:
    """The reference decode: Pillow, EXIF orientation applied, RGB."""
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


def write_tar(path, members: Iterable[Member], format=tarfile.PAX_FORMAT, end_blocks: bool = True) -> str:
    """Writes ``(name, data)`` pairs (regular files) or ready TarInfo objects (dirs, links).

    ``end_blocks=False`` drops the end-of-archive blocks, as a tar cut exactly between members.
    """
    path = str(path)
    with tarfile.open(path, "w", format=format) as tf:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tf.addfile(member)
            else:
                name, data = member
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    if not end_blocks:
        with open(path, "rb") as f:
            raw = f.read()
        # Strip the zero blocks (end-of-archive marker and record padding) after the last member's data.
        end = len(raw)
        while end >= 512 and raw[end - 512 : end] == b"\0" * 512:
            end -= 512
        with open(path, "wb") as f:
            f.write(raw[:end])
    return path


class RecordingFile(io.BytesIO):
    """A file object that remembers how far it has been read (``high_water``)."""

    def __init__(self, data: bytes):
        super().__init__(data)
        self.high_water = 0

    def read(self, size=-1):
        out = super().read(size)
        self.high_water = max(self.high_water, self.tell())
        return out


def digest(value):
    """A row value with its bytes (pixels, encoded images, also inside structs) replaced by their sha256."""
    import hashlib

    if isinstance(value, (bytes, bytearray)):
        return hashlib.sha256(value).hexdigest()
    if isinstance(value, dict):
        return {k: digest(v) for k, v in value.items()}
    if isinstance(value, list):
        return [digest(v) for v in value]
    return value


def link_member(name: str, target: str, symbolic: bool = True) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE if symbolic else tarfile.LNKTYPE
    info.linkname = target
    return info


def dir_member(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


class _PickleTo:
    """A picklable function for beam.Map that writes each element to its own file in ``folder``."""

    def __init__(self, folder: str):
        self.folder = folder

    def __call__(self, element):
        with open(os.path.join(self.folder, uuid.uuid4().hex + ".pkl"), "wb") as f:
            pickle.dump(element, f)


def _load_all(folder: str) -> list:
    out = []
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            out.append(pickle.load(f))
    return out


@dataclass
class RunResult:
    batches: list
    failures: list
    counters: Dict[str, int] = field(default_factory=dict)
    distributions: Dict[str, object] = field(default_factory=dict)

    @property
    def images(self) -> list:
        return [image for batch in self.batches for image in batch]

    def by_member(self) -> Dict[str, object]:
        return {image.image_path.split("/", 1)[1]: image for image in self.images}


def run_pipeline(build, tmp_path, runner: str = "FnApiRunner", options: Optional[Sequence[str]] = None) -> RunResult:
    """Runs ``build(pipeline) -> (batches, failures)`` on the named runner; collects both outputs and metrics."""
    import apache_beam as beam
    from apache_beam.metrics import MetricsFilter
    from apache_beam.options.pipeline_options import PipelineOptions

    from beam_tarimg.transforms import NAMESPACE

    out_b = tmp_path / f"out-batches-{uuid.uuid4().hex[:8]}"
    out_f = tmp_path / f"out-failures-{uuid.uuid4().hex[:8]}"
    out_b.mkdir()
    out_f.mkdir()
    opts = PipelineOptions(["--runner", runner, *(options or [])])
    p = beam.Pipeline(options=opts)
    batches, failures = build(p)
    batches | "CollectBatches" >> beam.Map(_PickleTo(str(out_b)))
    failures | "CollectFailures" >> beam.Map(_PickleTo(str(out_f)))
    result = p.run()
    result.wait_until_finish()
    metrics = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))
    counters = {}
    for c in metrics["counters"]:
        counters[c.key.metric.name] = counters.get(c.key.metric.name, 0) + (c.committed or 0)
    dists = {d.key.metric.name: d.committed for d in metrics["distributions"]}
    return RunResult(_load_all(str(out_b)), _load_all(str(out_f)), counters, dists)


@pytest.fixture
def read_tars(tmp_path):
    """``read_tars(pattern_or_paths, **kwargs)``: runs the reader with failures on the FnApiRunner."""

    def _run(source, runner="FnApiRunner", options=None, **kwargs) -> RunResult:
        import apache_beam as beam

        from beam_tarimg import ReadAllImagesFromTars, ReadImagesFromTars

        def build(p):
            if isinstance(source, (list, tuple)):
                return p | "Paths" >> beam.Create(list(source)) | ReadAllImagesFromTars(**kwargs).with_failures()
            return p | ReadImagesFromTars(str(source), **kwargs).with_failures()

        return run_pipeline(build, tmp_path, runner=runner, options=options)

    return _run


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two good tars of 6 small images with sidecars, and a third with one good and one corrupt JPEG (the jobs'
    tests: 13 images written, 1 failure)."""
    from beam_tarimg.sample import encode_jpeg, make_sample_dataset, photo_like_image

    root = tmp_path_factory.mktemp("shards")
    make_sample_dataset(str(root), num_tars=2, images_per_tar=6, seed=1, size=(48, 32))
    corrupt = b"\xff\xd8\xff\xe0" + b"this is not the rest of a JPEG" * 4
    write_tar(str(root / "00002.tar"), [
        ("good.jpg", encode_jpeg(photo_like_image(np.random.default_rng(3), 40, 30))),
        ("broken.jpg", corrupt),
    ])
    return root
