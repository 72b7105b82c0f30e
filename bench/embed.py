"""The embed job's speed and where its time goes: ``python -m bench.embed [--images 400] [--rounds 3]``.

Builds (under ``bench/results/embed/``) a set of 224x224 photo-like JPEGs in tars of 100 and the small ONNX model
of the tests (``tests/test_inference.build_embedding_model``: conv 3x3 to 8 channels, ReLU, global average pool,
a linear layer to 16; ~11 M multiply-adds per 224x224 image), then:

* end to end: the embed job (CLIP's mean/std, CHW; ``pipelines.embed.run``) and the summarize job (decode only)
  on the same tars, each in a fresh process on the FnApiRunner, at N and 4N images (4N: the tars named 4 times
  through symbolic links): N / T(N), T being the summary's pipeline time (Beam's start and the model load
  included, the imports not), and the marginal rate 3N / (T(4N) - T(N)) (start-up cancels out); medians over
  the rounds;
* where the time goes: the same job run in this process (``pipelines.embed.run``, FnApiRunner: every step in
  one process) at 4N images with wall-clock timers around its stages: the tar reading (``read_tar``), the
  decode (the reader's ``batch_decode_ms``: waiting for the decoder process), ``Normalize`` (numpy: uint8 HWC to
  float32 CHW, mean/std), the ONNX Runtime session (``batch_inference_fn``), the rows (``_to_table``: the
  embeddings as an Arrow table), the Parquet writes (``ParquetWriter.write_table``) and the model load; the
  rest is Beam's own work and start-up.

``--resize``: ImageNet-like JPEGs (``beam_tarimg.sample``), and the embed job with ``--resize 256 --crop 224``
(``beam_tarimg.Resize``: the decode resizes, crops and normalises; no ``Normalize``); ``summarize`` still
decodes at full size.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import json
import os
import re
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(REPO, "bench", "results", "embed")
CLIP = ["--mean", "122.770938,116.7460125,104.09373615", "--std", "68.5005327,66.6321579,70.32316305"]


def build(images: int, imagenet: bool = False) -> tuple:
    """(folder of the N-image set, folder naming it 4 times, model path), built once per N: 224x224 photo-like
    JPEGs, or with ``imagenet`` ImageNet-like ones (300-560 x 250-480, ``beam_tarimg.sample``)."""
    sys.path.insert(0, os.path.join(REPO, "tests"))
    import numpy as np

    from beam_tarimg.sample import encode_jpeg, imagenet_like_jpeg, photo_like_image, write_tar
    from test_inference import build_embedding_model

    base = os.path.join(OUT, f"set-{'imagenet-' if imagenet else ''}{images}")
    four = base + "-x4"
    if not os.path.isdir(four):
        os.makedirs(base, exist_ok=True)
        os.makedirs(four, exist_ok=True)
        rng = np.random.default_rng(0)
        for t in range((images + 99) // 100):
            n = min(100, images - 100 * t)
            write_tar(os.path.join(base, f"{t:05d}.tar"), (
                (f"{100 * t + i:06d}.jpg", imagenet_like_jpeg(rng, 100 * t + i) if imagenet else
                 encode_jpeg(photo_like_image(rng, 224, 224))) for i in range(n)))
            for k in range(4):
                os.symlink(os.path.join(base, f"{t:05d}.tar"), os.path.join(four, f"{k}-{t:05d}.tar"))
    model = os.path.join(OUT, "tiny-embedder.onnx")
    if not os.path.exists(model):
        build_embedding_model(model)
    return base, four, model


def _cli(job: str, data: str, model: str, extra=()) -> float:
    """Seconds of pipeline time (the summary's, unrounded) of the job run in a fresh process."""
    out = os.path.join(OUT, "out")
    args = ["--input", data, "--quiet", "--runner", "FnApiRunner"]
    if job == "embed":
        args += ["--output", os.path.join(out, "embeddings"), "--model", model, "--overwrite", "--preview_rows", "0",
                 *CLIP, *extra]
    code = (f"import json, sys\nfrom pipelines import {job}\ns = {job}.run(sys.argv[1:])\n"
            "print('SECONDS', s['seconds'])")
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": REPO})
    if proc.returncode != 0:
        raise SystemExit(f"{job} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return float(re.search(r"^SECONDS ([\d.]+)$", proc.stdout, re.M).group(1))


class _Timer:
    def __init__(self):
        self.seconds = collections.Counter()
        self.calls = collections.Counter()

    def wrap(self, name, fn, generator=False):
        if generator:
            @functools.wraps(fn)
            def gen(*a, **k):
                it = fn(*a, **k)
                while True:
                    start = time.perf_counter()
                    try:
                        item = next(it)
                    except StopIteration:
                        self.seconds[name] += time.perf_counter() - start
                        return
                    self.seconds[name] += time.perf_counter() - start
                    yield item  # the consumer's time (the rest of the pipeline) is not counted here
            return gen

        @functools.wraps(fn)
        def call(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.seconds[name] += time.perf_counter() - start
                self.calls[name] += 1
        return call


def profile(data: str, model: str, extra=()) -> dict:
    """Runs the embed job in this process with its stages timed; returns seconds per stage and the total."""
    import pyarrow.parquet as pq

    import beam_tarimg.inference as inference
    import beam_tarimg.transforms as transforms
    import pipelines.steps as steps
    from pipelines import embed

    timer = _Timer()
    transforms.read_tar = timer.wrap("read tars", transforms.read_tar, generator=True)
    inference.Normalize.__call__ = timer.wrap("normalize (numpy)", inference.Normalize.__call__)
    inference.batch_inference_fn = timer.wrap("model (onnxruntime)", inference.batch_inference_fn)
    steps.PredictionsToRowGroupsFn._to_table = timer.wrap("rows (arrow)", steps.PredictionsToRowGroupsFn._to_table)
    pq.ParquetWriter.write_table = timer.wrap("parquet write", pq.ParquetWriter.write_table)
    inference.ImageBatchModelHandler.load_model = timer.wrap("model load", inference.ImageBatchModelHandler.load_model)
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # the job's summary: stdout is for the JSON
        summary = embed.run(["--input", data, "--output", os.path.join(OUT, "out-profile", "embeddings"), "--model",
                             model, "--overwrite", "--quiet", "--preview_rows", "0", "--runner", "FnApiRunner",
                             *CLIP, *extra])
    total = time.perf_counter() - start
    seconds = dict(timer.seconds)
    seconds["decode (decoder process)"] = _DECODE_MS[-1] / 1000.0 if _DECODE_MS else float("nan")
    return {"images": summary["images_written"], "total": total, "pipeline": summary["seconds"],
            "stages": seconds, "model_calls": timer.calls["model (onnxruntime)"]}


_DECODE_MS: list = []  # the sum of batch_decode_ms of each pipeline result the driver queried


def _capture_decode_ms():
    """Records the sum of batch_decode_ms of every pipeline result the driver queries in this process."""
    import pipelines

    original = pipelines._query

    def query(result):
        from apache_beam.metrics.metric import MetricsFilter

        from beam_tarimg.transforms import NAMESPACE

        for d in result.metrics().query(MetricsFilter().with_namespace(NAMESPACE)).get("distributions", []):
            if d.key.metric.name == "batch_decode_ms":
                value = d.committed or d.attempted
                _DECODE_MS.append(value.sum)
        return original(result)

    pipelines._query = query


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.embed", description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400, help="N: images in the set (default 400)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the end-to-end runs (default 3)")
    parser.add_argument("--resize", action="store_true",
                        help="ImageNet-like JPEGs, and the embed job with --resize 256 --crop 224 (beam_tarimg.Resize)")
    args = parser.parse_args(argv)
    base, four, model = build(args.images, imagenet=args.resize)
    extra = ["--resize", "256", "--crop", "224"] if args.resize else []
    load = os.getloadavg()
    rows = collections.defaultdict(list)
    for _ in range(args.rounds):
        for job in ("summarize", "embed"):
            t1, t4 = _cli(job, base, model, extra), _cli(job, four, model, extra)
            rows[job].append((args.images / t1, 3 * args.images / (t4 - t1)))
    result = {"images": args.images, "resize": args.resize, "load_before": load, "load_after": os.getloadavg(), "end_to_end": {
        job: {"images_per_s_at_N": statistics.median(r[0] for r in runs),
              "marginal_images_per_s": statistics.median(r[1] for r in runs), "rounds": runs}
        for job, runs in rows.items()}}
    _capture_decode_ms()
    result["profile"] = profile(four, model, extra)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
