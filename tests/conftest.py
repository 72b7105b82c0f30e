"""Shared test helpers: tar and JPEG builders, and a runner that collects a pipeline's outputs from files.

Test data is built here, in temporary folders; nothing binary is committed.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import uuid
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import pytest

from beam_tarimg.sample import encode_jpeg, photo_like_image

Member = Union[Tuple[str, bytes], tarfile.TarInfo]


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
