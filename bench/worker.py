"""One measurement of one case, in a fresh process: ``python -m bench.worker CASE --input DIR --n N``.

Prints one line ``BENCH_RESULT {json}`` with: ``images``, ``pixels``, ``t_work`` (seconds of the timed
region, which includes every constant start-up cost the case has, so that the parent can difference a run of
N against a run of N/4), ``cpu_work`` (CPU seconds of the whole process tree in that region), start-up parts
where they can be seen (``import_s``, ``build_s``, ``first_batch_s``) and ``vmhwm_kb`` (this process's peak
RSS).

Timed regions: for the in-memory cases (limit, dali_external, core) the JPEG bytes are read from the tars
into memory first, outside the region; for the tar cases (dali_webdataset, tario) the region starts before
the pipeline/reader is built; for the Beam cases it starts at the top of this module, before Beam is
imported, and ends when the pipeline has finished and its SDK worker processes have exited.
"""

from __future__ import annotations

import time

T0 = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

from bench import cases as _cases  # noqa: E402
from bench.corpus import load_jpegs, tar_paths  # noqa: E402
from bench.measure import RESULT_PREFIX, cores, vm_hwm_kb  # noqa: E402


def _cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _cpu_tree() -> float:
    """This process plus every child it has waited for (the SDK workers of a multi_processing run)."""
    s = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def _threads(case, default: int) -> int:
    t = case.params.get("num_threads") or case.params.get("threads")
    return int(t) if t else default


# --- 1. the limit -------------------------------------------------------------------------------------------

def _limit_child(k, procs, data, n, barrier, queue):
    import simplejpeg

    decode = simplejpeg.decode_jpeg
    size = len(data)
    barrier.wait()
    start = time.perf_counter()
    cpu0 = _cpu_self()
    images = pixels = 0
    for i in range(k, n, procs):
        a = decode(data[i % size], colorspace="RGB")
        images += 1
        pixels += a.shape[0] * a.shape[1]
    end = time.perf_counter()
    queue.put({"start": start, "end": end, "cpu": _cpu_self() - cpu0, "images": images, "pixels": pixels,
               "vmhwm_kb": vm_hwm_kb()})


def run_limit(case, args) -> dict:
    import multiprocessing

    import simplejpeg  # noqa: F401  (imported before the fork)

    data = load_jpegs(args.input)
    procs = cores() if case.params.get("procs") == "cores" else int(case.params["procs"])
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(procs)
    queue = ctx.Queue()
    children = [ctx.Process(target=_limit_child, args=(k, procs, data, args.n, barrier, queue)) for k in range(procs)]
    for c in children:
        c.start()
    reports = [queue.get() for _ in children]
    for c in children:
        c.join()
    return {
        "t_work": max(r["end"] for r in reports) - min(r["start"] for r in reports),
        "cpu_work": sum(r["cpu"] for r in reports),
        "images": sum(r["images"] for r in reports),
        "pixels": sum(r["pixels"] for r in reports),
        "procs": procs,
        "children_vmhwm_kb": [r["vmhwm_kb"] for r in reports],
        "decoder": f"simplejpeg {simplejpeg.__version__}",
    }


# --- 2. DALI alone ------------------------------------------------------------------------------------------

def run_dali_external(case, args) -> dict:
    import numpy as np

    t = time.perf_counter()
    from nvidia.dali import fn, types
    from nvidia.dali.pipeline import Pipeline
    import_s = time.perf_counter() - t

    arrays = [np.frombuffer(b, dtype=np.uint8) for b in load_jpegs(args.input)]
    bs, n, size = case.params["batch"], args.n, len(arrays)
    threads = _threads(case, cores())

    def source():
        for i in range(0, n, bs):
            yield [arrays[j % size] for j in range(i, min(i + bs, n))]

    start, cpu0 = time.perf_counter(), _cpu_self()
    pipe = Pipeline(batch_size=bs, num_threads=threads, device_id=None, prefetch_queue_depth=2,
                    exec_async=True, exec_pipelined=True)
    with pipe:
        enc = fn.external_source(source=source, batch=True, dtype=types.UINT8, ndim=1)
        pipe.set_outputs(fn.decoders.image(enc, device="cpu", output_type=types.RGB))
    pipe.build()
    build_s = time.perf_counter() - start
    images = pixels = 0
    first = None
    while True:
        try:
            (out,) = pipe.run()
        except StopIteration:
            break
        if first is None:
            first = time.perf_counter() - start - build_s
        images += len(out)
        pixels += sum(s[0] * s[1] for s in out.shape())
    return {"t_work": time.perf_counter() - start, "cpu_work": _cpu_self() - cpu0, "images": images,
            "pixels": pixels, "import_s": import_s, "build_s": build_s, "first_batch_s": first,
            "threads": threads, "batch": bs}


def run_dali_webdataset(case, args) -> dict:
    t = time.perf_counter()
    from nvidia.dali import fn, types
    from nvidia.dali.pipeline import Pipeline
    import_s = time.perf_counter() - t

    bs = case.params["batch"]
    threads = _threads(case, cores())
    paths = tar_paths(args.input)
    start, cpu0 = time.perf_counter(), _cpu_self()
    pipe = Pipeline(batch_size=bs, num_threads=threads, device_id=None, prefetch_queue_depth=2,
                    exec_async=True, exec_pipelined=True)
    with pipe:
        jpg = fn.readers.webdataset(paths=paths, ext=["jpg"], name="Reader", missing_component_behavior="skip")
        pipe.set_outputs(fn.decoders.image(jpg, device="cpu", output_type=types.RGB))
    pipe.build()
    total = pipe.reader_meta("Reader")["epoch_size"]
    build_s = time.perf_counter() - start
    images = pixels = 0
    first = None
    while images < total:
        (out,) = pipe.run()
        if first is None:
            first = time.perf_counter() - start - build_s
        take = min(len(out), total - images)
        shapes = out.shape()
        images += take
        pixels += sum(s[0] * s[1] for s in shapes[:take])
    return {"t_work": time.perf_counter() - start, "cpu_work": _cpu_self() - cpu0, "images": images,
            "pixels": pixels, "import_s": import_s, "build_s": build_s, "first_batch_s": first,
            "threads": threads, "batch": bs}


# --- breakdown: the reader's parts alone ---------------------------------------------------------------------

def run_core(case, args) -> dict:
    t = time.perf_counter()
    from beam_tarimg.decode import ImageDecoder
    import nvidia.dali.pipeline  # noqa: F401  (DALI import time belongs to import_s)
    import_s = time.perf_counter() - t

    data = load_jpegs(args.input)
    bs, n, size = case.params["batch"], args.n, len(data)
    threads = _threads(case, cores())
    isolation = case.params.get("isolation", "process")
    resize = None
    if case.params.get("resize"):
        from beam_tarimg.resize import Resize

        side, crop = case.params["resize"]
        resize = Resize(side, crop=crop)
    start, cpu0 = time.perf_counter(), _cpu_tree()
    decoder = ImageDecoder(max_batch_size=bs, num_threads=threads, device="cpu", isolation=isolation, resize=resize)
    build_s = time.perf_counter() - start
    images = pixels = 0
    first = None
    for i in range(0, n, bs):
        outcomes = decoder.decode([data[j % size] for j in range(i, min(i + bs, n))])
        if first is None:
            first = time.perf_counter() - start - build_s
        for o in outcomes:
            images += 1
            pixels += o.pixels.shape[0] * o.pixels.shape[1]
        del outcomes
    t_work = time.perf_counter() - start
    builds = decoder.builds
    decoder.close()  # waits for the decoder process, so that its CPU time counts in RUSAGE_CHILDREN
    return {"t_work": t_work, "cpu_work": _cpu_tree() - cpu0, "images": images,
            "pixels": pixels, "import_s": import_s, "build_s": build_s, "first_batch_s": first,
            "threads": threads, "batch": bs, "dali_builds": builds, "isolation": isolation,
            "resize": None if resize is None else repr(resize)}


def run_tario(case, args) -> dict:
    from beam_tarimg.tario import read_tar
    from beam_tarimg.types import EncodedBatch

    start, cpu0 = time.perf_counter(), _cpu_self()
    images = 0
    for path in tar_paths(args.input):
        with open(path, "rb") as f:
            for event in read_tar(f, path, batch_size=case.params["batch"]):
                if isinstance(event, EncodedBatch):
                    images += len(event)
    return {"t_work": time.perf_counter() - start, "cpu_work": _cpu_self() - cpu0, "images": images,
            "pixels": None}


# --- 3-5. Beam ----------------------------------------------------------------------------------------------

def _beam_flags(case) -> list:
    return [f.format(cores=cores()) for f in case.params["runner"]]


def run_reader(case, args) -> dict:
    cpu0 = _cpu_tree()
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from beam_tarimg import ReadImagesFromTars
    from bench.beamjobs import CountImages, read_counters

    import_s = time.perf_counter() - T0
    kwargs = {"batch_size": case.params.get("batch", 100)}
    if case.params.get("num_threads"):
        kwargs["num_threads"] = case.params["num_threads"]
    if case.params.get("isolation"):
        kwargs["isolation"] = case.params["isolation"]
    b = time.perf_counter()
    p = beam.Pipeline(options=PipelineOptions(_beam_flags(case)))
    _ = p | "Read" >> ReadImagesFromTars(args.input, **kwargs) | "Count" >> CountImages()
    build_s = time.perf_counter() - b
    result = p.run()
    result.wait_until_finish()
    counts = read_counters(result)
    return {"t_work": time.perf_counter() - T0, "cpu_work": _cpu_tree() - cpu0, "images": counts["images"],
            "pixels": counts["pixels"], "import_s": import_s, "build_s": build_s,
            "threads": kwargs.get("num_threads", "default"), "beam_flags": _beam_flags(case)}


def run_pipeline(case, args) -> dict:
    import importlib

    cpu0 = _cpu_tree()
    module = importlib.import_module(case.params["module"])
    import_s = time.perf_counter() - T0
    out_dir = tempfile.mkdtemp(prefix="bench-out-", dir=args.scratch)
    try:
        argv = ["--input", args.input, "--output", os.path.join(out_dir, "out"), *case.params.get("flags", ()),
                *_beam_flags(case)]
        summary = module.run(argv)
        t_work = time.perf_counter() - T0
        cpu = _cpu_tree() - cpu0
        out_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out_dir) for f in fs)
        in_bytes = sum(os.path.getsize(os.path.join(args.input, f)) for f in os.listdir(args.input)
                       if f.endswith(".tar"))  # a view's symlinks count as often as they name a tar
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    summary = summary if isinstance(summary, dict) else {"summary": repr(summary)}
    images = _images_from_summary(summary)
    return {"t_work": t_work, "cpu_work": cpu, "images": images, "pixels": None, "import_s": import_s,
            "output_bytes": out_bytes, "input_bytes": in_bytes, "summary": _jsonable(summary), "beam_flags": _beam_flags(case)}


def _images_from_summary(summary: dict):
    for key in ("images", "images_written", "rows", "records", "images_decoded", "num_images"):
        if isinstance(summary.get(key), int):
            return summary[key]
    for key, value in summary.items():
        if "image" in key and isinstance(value, int) and "fail" not in key:
            return value
    return None


def _jsonable(value):
    try:
        json.dumps(value)
        return value
    except TypeError:
        return json.loads(json.dumps(value, default=repr))


KINDS = {
    "limit": run_limit,
    "dali_external": run_dali_external,
    "dali_webdataset": run_dali_webdataset,
    "core": run_core,
    "tario": run_tario,
    "reader": run_reader,
    "pipeline": run_pipeline,
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.worker", description=__doc__.splitlines()[0])
    ap.add_argument("case")
    ap.add_argument("--input", required=True, help="a corpus folder (in-memory cases) or a view of N images")
    ap.add_argument("--n", type=int, required=True, help="images to decode")
    ap.add_argument("--scratch", default=None, help="where pipeline cases write their output (deleted after)")
    args = ap.parse_args(argv)
    case = _cases.get(args.case)
    result = KINDS[case.kind](case, args)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    result.update({
        "case": case.name,
        "n": args.n,
        "allocator": {k: os.environ.get(k) for k in _cases.TUNED_ENV},
        "vmhwm_kb": vm_hwm_kb(),
        "children_maxrss_kb": children.ru_maxrss,
        "process_s": time.perf_counter() - T0,
    })
    sys.stdout.write(RESULT_PREFIX + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
