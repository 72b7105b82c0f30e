#!/usr/bin/env python3
"""GPU decode benchmark for beam_tarimg, Beam-free: runs on the lent GPU machine with DALI, numpy and Pillow.

Builds two corpora with ``beam_tarimg.sample`` (ImageNet-like: 8 tars x 500; 1920x1080: 4 tars x 100), reads
their JPEGs back with ``beam_tarimg.tario.read_tar``, and, per corpus:

1. profiles it: the share of baseline JPEGs (SOF0, the only kind the GPU's hardware JPEG decoder takes),
   progressive ones, and the chroma subsampling;
2. checks agreement (``agreement``): every image decoded by ``ImageDecoder(device="gpu")`` against
   ``ImageDecoder(device="cpu")``: same shapes, mean absolute difference per image <= 1.0 (the largest
   reported, and the largest single-pixel difference), and, once, EXIF orientations 1-8 applied alike;
3. measures images/s of, over the same bytes in memory:

  dali_mixed        a bare DALI pipeline: external_source (a batch callback) -> decoders.image(device="mixed"),
                    DALI's default asynchronous, prefetching executor; outputs stay on the GPU (the ceiling)
  decoder_gpu       beam_tarimg.decode.ImageDecoder(device="gpu"): what the Beam DoFns run, host numpy out
  decoder_gpu_resize  the same with resize=Resize(256, crop=224) (resized on the GPU before the copy to host;
                    one hw_decoder_load, the middle of --hw-loads), and its outputs of the first batch against
                    ImageDecoder(device="cpu", resize=...)'s (mean/max |diff| per image)
  cpu_threads       ImageDecoder(device="cpu") in one process with every core as a DALI thread
  dali_mixed_fancy  the bare pipeline with jpeg_fancy_upsampling=True (the CPU decoder's chroma upsampling)
                                                                                            [not by default]
  dali_mixed_host   the bare pipeline, each output batch copied to host numpy arrays        [not by default]
  cpu_procs         one process per core, each an ImageDecoder(device="cpu", num_threads=1) [not by default]
  dali_cpu          the bare pipeline with decoders.image(device="cpu"), every core a thread  [smoke]

for each batch size (default 128, 512) and, on the GPU, each hw_decoder_load (default 0, 0.75, 1.0), in
the order agreement, cpu_threads, dali_mixed, decoder_gpu: ImageNet-like first, then 1080p (so a budget cut
falls on 1080p's last decoder_gpu configurations first). Each configuration: a warm-up of a few batches,
then ``--runs`` timed passes over the corpus (repeated so one pass holds at least ``--min-batches``
batches); reported are the medians of the passes' rates (images / pass time) and marginal rates (the images
after a pass's first quarter of batches / the time they took, leaving out the ramp-up at a pass's start).
Pipeline build time is reported apart and never counted (a GPU worker's first build also creates its CUDA
context). Only ``ImageDecoder``'s public API is used, so it measures whatever the decoder does (in the
calling process, or in a decode process it supervises).

GPU memory (``gpu_mib``) is read after the timed passes for the worker process and every process below it
(NVML or nvidia-smi by pid), else as the device's use minus what it was when the worker started. DALI keeps
its memory pools between configurations, so each worker calls ``nvidia.dali.backend.ReleaseUnusedMemory()``
after each. Each case runs in its own worker process (one CUDA context each), one after another.

Writes ``gpu_bench.json`` and ``gpu_bench.md`` to ``--out`` (default ``$OUT``, else bench/results/gpu),
rewritten after every result, so a run stopped at its time limit still leaves what it measured.
``--budget-s`` stops starting new configurations after that many seconds, and a worker still running
``--grace-s`` after it is killed (its finished results kept).

The CPU cases depend on glibc's allocator settings (see shared/FIELD-NOTES.md): the results record
``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` as they were set.

  python3 bench/gpu/gpu_bench.py --out "$OUT" --budget-s 240  # the device run (bench/gpu/device_run.sh)
  python3 bench/gpu/gpu_bench.py --smoke --out /tmp/smoke      # tiny corpus, CPU cases only (any machine)
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gc
import importlib
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from bench.measure import descendants  # noqa: E402

RESULT = "GPU_BENCH_RESULT "
CORPORA = {
    "imagenet": {"tars": 8, "per_tar": 500, "size": None, "seed": 0},
    "1080p": {"tars": 4, "per_tar": 100, "size": (1920, 1080), "seed": 0},
}
SMOKE_CORPORA = {
    "imagenet": {"tars": 2, "per_tar": 24, "size": None, "seed": 0},
    "1080p": {"tars": 1, "per_tar": 4, "size": (1920, 1080), "seed": 0},
}
GPU_CASES = ("dali_mixed", "dali_mixed_fancy", "dali_mixed_host", "decoder_gpu", "decoder_gpu_resize")
CHECK_CASES = ("agreement",)
HW_LOADS = [0.0, 0.75, 1.0]
CPU_CASES = ("cpu_threads", "cpu_procs", "dali_cpu")
DEFAULT_CASES = "agreement,cpu_threads,dali_mixed,decoder_gpu,decoder_gpu_resize"
SMOKE_CASES = "agreement,cpu_threads,dali_mixed,decoder_gpu,decoder_gpu_resize,dali_cpu"


# -- corpus -------------------------------------------------------------------------------------------------


def _members_chunk(first: int, count: int, seed: int, size) -> List[Tuple[str, bytes]]:
    from beam_tarimg.sample import _sample_members

    return list(_sample_members(first, count, seed, False, tuple(size) if size else None))


def build_corpus(work: str, name: str, spec: Dict, log: Callable[[str], None]) -> str:
    """Writes ``work/<name>-<params>/NNNNN.tar`` once (image i depends only on (seed, i), as in
    make_sample_dataset); the images are made in parallel, one chunk per process."""
    from beam_tarimg.sample import write_tar

    size = spec["size"]
    key = f"{name}-{spec['tars']}x{spec['per_tar']}-{'var' if size is None else '%dx%d' % tuple(size)}-s{spec['seed']}"
    folder = os.path.join(work, key)
    if os.path.exists(os.path.join(folder, ".done")):
        return folder
    start = time.perf_counter()
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    total = spec["tars"] * spec["per_tar"]
    chunk = max(1, min(spec["per_tar"], math.ceil(total / (2 * (os.cpu_count() or 1)))))
    while spec["per_tar"] % chunk:
        chunk -= 1
    with concurrent.futures.ProcessPoolExecutor(os.cpu_count() or 1) as pool:
        futures = [pool.submit(_members_chunk, first, chunk, spec["seed"], size) for first in range(0, total, chunk)]
        per_tar = spec["per_tar"] // chunk
        for t in range(spec["tars"]):
            members = (m for f in futures[t * per_tar : (t + 1) * per_tar] for m in f.result())
            write_tar(os.path.join(tmp, f"{t:05d}.tar"), members)
    open(os.path.join(tmp, ".done"), "w").close()
    shutil.rmtree(folder, ignore_errors=True)
    os.rename(tmp, folder)
    log(f"built corpus {key}: {total} images in {time.perf_counter() - start:.0f} s")
    return folder


def load_corpus(folder: str) -> List[bytes]:
    """Every JPEG of the folder's tars, in order, read through beam_tarimg.tario.read_tar."""
    from beam_tarimg.tario import read_tar
    from beam_tarimg.types import EncodedBatch

    out: List[bytes] = []
    for tar in sorted(t for t in os.listdir(folder) if t.endswith(".tar")):
        path = os.path.join(folder, tar)
        with open(path, "rb") as f:
            for record in read_tar(f, path, batch_size=1024):
                if not isinstance(record, EncodedBatch):
                    raise RuntimeError(f"corpus tar {path}: {record}")
                out.extend(image.data for image in record.images)
    return out


def make_batches(data: List[bytes], batch_size: int, min_batches: int) -> List[List[bytes]]:
    """The corpus, repeated whole until one pass holds at least ``min_batches`` batches, in batches."""
    reps = max(1, math.ceil(min_batches * batch_size / len(data)))
    flat = data * reps
    return [flat[i : i + batch_size] for i in range(0, len(flat), batch_size)]


# -- timing -------------------------------------------------------------------------------------------------


def timed_passes(step: Callable[[int], int], n_batches: int, runs: int, warmup: int,
                 finish: Optional[Callable[[], None]] = None) -> Dict:
    """``step(i)`` decodes batch i and returns how many images it gave. A warm-up of ``warmup`` batches,
    then ``runs`` passes of ``n_batches``; ``finish()`` (if any) waits for outstanding work before a pass's
    clock stops."""
    for i in range(warmup):
        step(i % n_batches)
    if finish:
        finish()
    rates, marginals, counts = [], [], []
    for _ in range(runs):
        stamps, sizes = [time.perf_counter()], []
        for i in range(n_batches):
            sizes.append(step(i))
            stamps.append(time.perf_counter())
        if finish:
            finish()
            stamps[-1] = time.perf_counter()
        rates.append(sum(sizes) / (stamps[-1] - stamps[0]))
        q = max(1, n_batches // 4) if n_batches > 1 else 0
        marginals.append(sum(sizes[q:]) / (stamps[-1] - stamps[q]))
        counts.append(sum(sizes))
    return {
        "images_per_pass": counts[0],
        "batches_per_pass": n_batches,
        "rates": [round(r, 1) for r in rates],
        "marginals": [round(m, 1) for m in marginals],
        "rate": round(statistics.median(rates), 1),
        "marginal": round(statistics.median(marginals), 1),
    }


# -- GPU memory ---------------------------------------------------------------------------------------------


def nvidia_smi(args: Sequence[str]) -> Optional[str]:
    """nvidia-smi's output for ``args``, or None where it is missing or fails."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        return subprocess.run([smi, *args], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None


class GpuMemory:
    """The GPU memory in MiB of this process and every process below it: NVML or nvidia-smi by pid, else the
    device's use minus a baseline read when this object was made (before this process touched CUDA)."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.nvml = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = (pynvml, pynvml.nvmlDeviceGetHandleByIndex(0))
        except Exception:
            self.nvml = None
        self.baseline = self._device_mib()

    def _device_mib(self) -> Optional[float]:
        if self.nvml:
            pynvml, handle = self.nvml
            return pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20
        text = nvidia_smi(["--query-gpu=memory.used", "--format=csv,noheader,nounits", "--id=0"])
        try:
            return float(text.split()[0]) if text else None
        except (ValueError, IndexError):
            return None

    def _by_pid(self) -> Dict[int, float]:
        if self.nvml:
            pynvml, handle = self.nvml
            try:
                return {p.pid: (p.usedGpuMemory or 0) / 2**20 for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)}
            except Exception:
                pass
        out = {}
        for line in (nvidia_smi(["--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]) or "").splitlines():
            parts = [p.strip() for p in line.split(",")]
            if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
                out[int(parts[0])] = float(parts[1])
        return out

    def read(self) -> Tuple[Optional[float], str]:
        procs = self._by_pid()
        if procs:
            mine = set(descendants(self.pid))  # this process and every one below it
            return sum(v for p, v in procs.items() if p in mine), "by-pid-tree"
        now = self._device_mib()
        if now is not None and self.baseline is not None:
            return now - self.baseline, "device-minus-baseline"
        return None, "unavailable"


def _release_gpu_pools() -> None:
    gc.collect()
    try:
        from nvidia.dali.backend import ReleaseUnusedMemory

        ReleaseUnusedMemory()
    except Exception:
        pass


def _host_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- what the corpus holds, and GPU-vs-CPU agreement ---------------------------------------------------------


def jpeg_kind(data: bytes) -> Tuple[str, str]:
    """``(kind, subsampling)`` from the first frame header: kind ``baseline`` (SOF0: what the GPU's hardware
    JPEG decoder takes), ``extended`` (SOF1), ``progressive`` (SOF2) or ``other``; subsampling as
    ``4:2:0``/``4:2:2``/``4:4:4``/``gray``/the sampling factors."""
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return "other", "?"
        marker = data[i + 1]
        if marker == 0xFF:
            i += 1
            continue
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if marker in (0xC0, 0xC1, 0xC2):
            seg = data[i + 4 : i + 2 + length]
            n = seg[5] if len(seg) > 5 else 0
            factors = [(seg[7 + 3 * c] >> 4, seg[7 + 3 * c] & 15) for c in range(n) if 8 + 3 * c < len(seg)]
            kind = {0xC0: "baseline", 0xC1: "extended", 0xC2: "progressive"}[marker]
            if n == 1:
                return kind, "gray"
            if n == 3 and factors[1] == factors[2] == (1, 1):
                sub = {(2, 2): "4:2:0", (2, 1): "4:2:2", (1, 1): "4:4:4"}.get(factors[0])
                if sub:
                    return kind, sub
            return kind, "x".join(f"{h}{v}" for h, v in factors)
        if marker in (0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xDA):
            return "other", "?"
        i += 2 + length
    return "other", "?"


def corpus_profile(data: List[bytes]) -> Dict:
    counts: Dict[str, int] = {}
    for blob in data:
        kind, sub = jpeg_kind(blob)
        counts[f"{kind} {sub}"] = counts.get(f"{kind} {sub}", 0) + 1
    baseline = sum(v for k, v in counts.items() if k.startswith("baseline "))
    return {"kinds": dict(sorted(counts.items(), key=lambda kv: -kv[1])),
            "baseline_share": round(baseline / max(1, len(data)), 4)}


def agreement(data: List[bytes], args, with_exif: bool) -> Dict:
    """Every image of the corpus through ImageDecoder on the GPU ("cpu" where there is none: the smoke run)
    and on the CPU, compared chunk by chunk (nothing kept)."""
    import numpy as np

    from beam_tarimg.decode import ImageDecoder, cuda_device_count

    side = "gpu" if cuda_device_count() else "cpu"
    t0 = time.perf_counter()
    gpu = ImageDecoder(max_batch_size=64, num_threads=args.gpu_threads, device=side)
    cpu = ImageDecoder(max_batch_size=64, num_threads=os.cpu_count() or 1, device="cpu")
    means, maxima, not_side, shape_diff = [], [], [], 0
    for start in range(0, len(data), 64):
        chunk = data[start : start + 64]
        for k, (g, c) in enumerate(zip(gpu.decode(chunk), cpu.decode(chunk))):
            if g.decoder != side or c.decoder != "cpu":
                not_side.append((start + k, g.decoder, g.error, c.decoder, c.error))
                continue
            if g.pixels.shape != c.pixels.shape:
                shape_diff += 1
                continue
            d = np.abs(g.pixels.astype(np.int16) - c.pixels.astype(np.int16))
            means.append(float(d.mean()))
            maxima.append(int(d.max()))
    out = {
        "side": side, "images": len(data), "compared": len(means), "shape_mismatches": shape_diff,
        "not_decoded_by_both": len(not_side), "not_decoded_examples": [str(x)[:200] for x in not_side[:3]],
        "max_mean_abs_diff": round(max(means), 4) if means else None,
        "mean_mean_abs_diff": round(float(np.mean(means)), 4) if means else None,
        "max_abs_diff": max(maxima) if maxima else None,
        "identical": sum(1 for m in maxima if m == 0),
        "over_1": sum(1 for m in means if m > 1.0),
    }
    if with_exif:
        from beam_tarimg.sample import encode_jpeg, photo_like_image

        base = photo_like_image(np.random.default_rng(7), 96, 64)
        encoded = [encode_jpeg(base, quality=95, exif_orientation=k) for k in range(1, 9)]
        exif = []
        for k, g, c in zip(range(1, 9), gpu.decode(encoded), cpu.decode(encoded)):
            same = g.pixels is not None and c.pixels is not None and g.pixels.shape == c.pixels.shape
            exif.append({"orientation": k, "shape": None if g.pixels is None else list(g.pixels.shape),
                         "same_shape": same, "mean_abs_diff": round(float(np.abs(
                             g.pixels.astype(np.int16) - c.pixels.astype(np.int16)).mean()), 4) if same else None})
        out["exif"] = exif
        out["exif_ok"] = all(e["same_shape"] and e["mean_abs_diff"] <= 1.0 for e in exif)
    out["ok"] = bool(means) and not shape_diff and not not_side and out["max_mean_abs_diff"] <= 1.0 and out.get("exif_ok", True)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    for d in (gpu, cpu):
        if hasattr(d, "close"):
            d.close()
    return out


# -- the cases (in a worker process) ------------------------------------------------------------------------


def bare_pipeline(batches: List[List[bytes]], batch_size: int, threads: int, decoder_device: str,
                  hw_decoder_load: Optional[float], fancy: bool):
    import numpy as np
    from nvidia.dali import fn, types
    from nvidia.dali.pipeline import Pipeline

    arrays = [[np.frombuffer(b, dtype=np.uint8) for b in batch] for batch in batches]

    def source(info):
        return arrays[info.iteration % len(arrays)]

    gpu = decoder_device == "mixed"
    pipe = Pipeline(batch_size=batch_size, num_threads=threads, device_id=0 if gpu else None, prefetch_queue_depth=2)
    with pipe:
        encoded = fn.external_source(source=source, batch=True, batch_info=True, dtype=types.UINT8, ndim=1)
        kwargs = {"device": decoder_device, "output_type": types.RGB}
        if gpu:
            kwargs["hw_decoder_load"] = hw_decoder_load
            if fancy:
                kwargs["jpeg_fancy_upsampling"] = True
        pipe.set_outputs(fn.decoders.image(encoded, **kwargs))
    pipe.build()
    return pipe


def run_case(case: str, data: List[bytes], args, emit: Callable[[Dict], None], deadline: float) -> None:
    cpus = os.cpu_count() or 1
    if case == "agreement":
        record = {"case": case}
        try:
            record.update(agreement(data, args, with_exif=args.corpus == "imagenet"))
        except Exception as e:
            record["error"] = f"{type(e).__name__}: {str(e)[:500]}"
        emit(record)
        return
    mem = GpuMemory() if case in GPU_CASES else None
    loads = args.hw_loads if case in GPU_CASES else [None]
    if case == "dali_mixed_fancy":
        loads = args.fancy_loads
    if case == "decoder_gpu_resize":
        loads = [args.hw_loads[len(args.hw_loads) // 2]]
    for batch_size in args.batch_sizes:
        batches = make_batches(data, batch_size, args.min_batches)
        warmup = min(len(batches), args.warmup_batches)
        for load in loads:
            if time.time() > deadline:
                emit({"case": case, "batch_size": batch_size, "hw_decoder_load": load, "skipped": "budget"})
                continue
            record = {"case": case, "batch_size": batch_size, "hw_decoder_load": load}
            try:
                record.update(_one_config(case, batches, batch_size, load, warmup, args, cpus, mem))
            except Exception as e:  # an OOM at a large batch, say: record it and go on
                record["error"] = f"{type(e).__name__}: {str(e)[:500]}"
            if mem is not None:
                _release_gpu_pools()
            emit(record)


def _one_config(case, batches, batch_size, load, warmup, args, cpus, mem) -> Dict:
    from beam_tarimg.decode import ImageDecoder

    out: Dict = {}
    t0 = time.perf_counter()
    if case in ("dali_mixed", "dali_mixed_fancy", "dali_mixed_host", "dali_cpu"):
        gpu = case != "dali_cpu" and not args.gpu_as_cpu
        threads = args.gpu_threads if case != "dali_cpu" else cpus
        pipe = bare_pipeline(batches, batch_size, threads, "mixed" if gpu else "cpu", load, case == "dali_mixed_fancy")
        out.update(build_s=round(time.perf_counter() - t0, 3), threads=threads)
        last = {}

        def step(i: int) -> int:
            (images,) = pipe.run()
            if case == "dali_mixed_host":
                host = images.as_cpu()
                n = len([host.at(j) for j in range(len(host))])
            else:
                n = len(images)
            last["out"] = images
            return n

        def finish() -> None:  # wait for the GPU: copy one image of the last batch to the host
            images = last.get("out")
            if images is not None and gpu and case != "dali_mixed_host":
                images[len(images) - 1].as_cpu()

        out.update(timed_passes(step, len(batches), args.runs, warmup, finish))
        if mem:
            out["gpu_mib"], out["gpu_mib_how"] = _round(mem.read())
        del pipe, last
    elif case in ("decoder_gpu", "decoder_gpu_resize", "cpu_threads"):
        gpu = case != "cpu_threads"
        kwargs = {"hw_decoder_load": load} if gpu else {}
        if case == "decoder_gpu_resize":
            from beam_tarimg.resize import Resize

            kwargs["resize"] = Resize(256, crop=224)
        threads = args.gpu_threads if gpu else cpus
        gpu = gpu and not args.gpu_as_cpu
        decoder = ImageDecoder(max_batch_size=batch_size, num_threads=threads, device="gpu" if gpu else "cpu", **kwargs)
        out.update(build_s=round(time.perf_counter() - t0, 3), threads=threads)
        expected = "gpu" if gpu else "cpu"

        def step(i: int) -> int:
            outcomes = decoder.decode(batches[i])
            bad = [o.error for o in outcomes if o.decoder != expected]
            if bad:
                raise RuntimeError(f"{len(bad)} images not decoded by {expected}: {bad[:2]}")
            return len(outcomes)

        out.update(timed_passes(step, len(batches), args.runs, warmup))
        if mem:
            out["gpu_mib"], out["gpu_mib_how"] = _round(mem.read())
        if case == "decoder_gpu_resize":
            out.update(_resize_agreement(decoder, batches[0], kwargs["resize"]))
        out["builds"] = decoder.builds
        if hasattr(decoder, "close"):  # stops its decode process (and that process's CUDA context), if any
            decoder.close()
        del decoder
    elif case == "cpu_procs":
        out.update(_cpu_procs(batches, batch_size, args, cpus, warmup))
    else:
        raise ValueError(f"unknown case {case!r}")
    out["host_rss_peak_mib"] = round(_host_rss_mib(), 1)
    return out


def _resize_agreement(decoder, batch: List[bytes], resize) -> Dict:
    """The decoder's resized outputs of ``batch`` against ImageDecoder(device="cpu", resize=resize)'s."""
    import numpy as np

    from beam_tarimg.decode import ImageDecoder

    cpu = ImageDecoder(max_batch_size=len(batch), device="cpu", resize=resize)
    try:
        pairs = [(a.pixels, b.pixels) for a, b in zip(decoder.decode(batch), cpu.decode(batch))
                 if a.pixels is not None and b.pixels is not None]
    finally:
        cpu.close()
    diffs = [np.abs(a.astype(np.int16) - b.astype(np.int16)) for a, b in pairs if a.shape == b.shape]
    return {"resize_compared": len(diffs), "resize_shape_mismatches": len(pairs) - len(diffs),
            "resize_max_mean_abs_diff": round(max((float(d.mean()) for d in diffs), default=0.0), 4),
            "resize_max_abs_diff": max((int(d.max()) for d in diffs), default=0)}


def _round(reading):
    value, how = reading
    return (None if value is None else round(value, 1)), how


def _proc_main(rank: int, nprocs: int, corpus_dir: str, batch_size: int, min_batches: int, runs: int,
               warmup: int, barrier, queue) -> None:
    try:
        from beam_tarimg.decode import ImageDecoder

        batches = make_batches(load_corpus(corpus_dir), batch_size, min_batches)
        mine = batches[rank::nprocs]
        decoder = ImageDecoder(max_batch_size=batch_size, num_threads=1, device="cpu")
        for i in range(min(warmup, len(mine))):
            decoder.decode(mine[i])
        for _ in range(runs):
            barrier.wait()
            stamps, sizes = [time.perf_counter()], []
            for batch in mine:
                sizes.append(len(decoder.decode(batch)))
                stamps.append(time.perf_counter())
            queue.put((rank, stamps, sizes, _host_rss_mib()))
    except BaseException as e:  # keep the others from waiting forever
        barrier.abort()
        queue.put((rank, None, repr(e), 0.0))


def _cpu_procs(batches, batch_size, args, cpus, warmup) -> Dict:
    import multiprocessing as mp

    nprocs = min(args.procs or cpus, len(batches))
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(nprocs), ctx.Queue()
    procs = [
        ctx.Process(target=_proc_main, args=(r, nprocs, args.corpus_dir, batch_size, args.min_batches, args.runs,
                                             warmup, barrier, queue))
        for r in range(nprocs)
    ]
    for p in procs:
        p.start()
    rates, marginals, rss = [], [], 0.0
    try:
        for _ in range(args.runs):
            got = [queue.get(timeout=900) for _ in range(nprocs)]
            for rank, stamps, sizes, peak in got:
                if stamps is None:
                    raise RuntimeError(f"process {rank}: {sizes}")
                rss = max(rss, peak)
            start = min(g[1][0] for g in got)
            end = max(g[1][-1] for g in got)
            rates.append(sum(sum(g[2]) for g in got) / (end - start))
            quarter = [max(1, len(g[2]) // 4) if len(g[2]) > 1 else 0 for g in got]
            n_after = sum(sum(g[2][q:]) for g, q in zip(got, quarter))
            t_after = end - max(g[1][q] for g, q in zip(got, quarter))
            marginals.append(n_after / t_after)
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    return {
        "processes": nprocs, "threads": 1,
        "images_per_pass": sum(len(b) for b in batches), "batches_per_pass": len(batches),
        "rates": [round(r, 1) for r in rates], "marginals": [round(m, 1) for m in marginals],
        "rate": round(statistics.median(rates), 1), "marginal": round(statistics.median(marginals), 1),
        "proc_rss_peak_mib": round(rss, 1),
    }


def worker_main(args) -> int:
    data = load_corpus(args.corpus_dir)
    for module in ("nvidia.dali.fn", "nvidia.dali.pipeline"):  # so that no build_s holds DALI's import
        importlib.import_module(module)

    def emit(record: Dict) -> None:
        record["corpus"] = args.corpus
        print(RESULT + json.dumps(record), flush=True)

    run_case(args.worker, data, args, emit, args.deadline)
    return 0


# -- the driver ---------------------------------------------------------------------------------------------


def environment() -> Dict:
    env = {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
        "MALLOC_TRIM_THRESHOLD_": os.environ.get("MALLOC_TRIM_THRESHOLD_"),
    }
    for mod in ("numpy", "PIL", "nvidia.dali"):
        try:
            env[mod] = __import__(mod, fromlist=["__version__"]).__version__
        except Exception as e:
            env[mod] = f"unavailable ({type(e).__name__})"
    from beam_tarimg.decode import cuda_device_count

    env["cuda_devices"] = cuda_device_count()
    smi = nvidia_smi(["--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
    env["gpu"] = smi.strip() if smi else None
    return env


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"
    return str(v)


def _best(rows: List[Dict], case: str) -> Optional[Dict]:
    mine = [r for r in rows if r["case"] == case]
    return max(mine, key=lambda r: r["marginal"]) if mine else None


def summary(report: Dict, corpus: str, rows: List[Dict]) -> List[str]:
    """The lines that answer the questions: what the corpus holds, whether GPU and CPU agree, and how the
    decode core compares with the bare pipeline and with the CPU."""
    spec = report["corpora"].get(corpus, {})
    prof = spec.get("profile") or {}
    lines = []
    if prof:
        kinds = ", ".join(f"{k} {v}" for k, v in prof["kinds"].items())
        lines.append(f"- Baseline share (what the hardware JPEG decoder takes): {prof['baseline_share']:.1%} ({kinds}).")
    agree = [r for r in report["results"] if r.get("corpus") == corpus and r.get("case") == "agreement"]
    for a in agree:
        if "error" in a:
            lines.append(f"- Agreement: error {a['error']}")
            continue
        exif = ""
        if "exif" in a:
            exif = (f"; EXIF orientations 1-8 {'applied alike' if a['exif_ok'] else 'DIFFER'} (mean |diff| <= "
                    f"{max((e['mean_abs_diff'] or 0) for e in a['exif']):.3f})")
        lines.append(
            f"- Agreement, ImageDecoder {a['side']} vs cpu over {a['images']} images: "
            f"{'OK' if a['ok'] else 'FAILED'}: {a['compared']} compared, {a['shape_mismatches']} shape mismatches, "
            f"{a['not_decoded_by_both']} not decoded by both; max per-image mean |diff| {a['max_mean_abs_diff']}, "
            f"max pixel |diff| {a['max_abs_diff']}, identical {a['identical']}{exif}.")
    if report["args"].get("gpu_as_cpu"):
        lines.append("- DRY RUN: no GPU here; the GPU cases below ran their code on the CPU. Not a measurement.")
    core, bare, cpu = _best(rows, "decoder_gpu"), _best(rows, "dali_mixed"), _best(rows, "cpu_threads")
    if core and bare:
        same = [r for r in rows if r["case"] == "dali_mixed" and r["batch_size"] == core["batch_size"]
                and r["hw_decoder_load"] == core["hw_decoder_load"]]
        ratio = f"{core['marginal'] / same[0]['marginal']:.2f} x the bare pipeline at that setting, " if same else ""
        lines.append(f"- Decode core on the GPU, best: {core['marginal']:,.0f} img/s (batch {core['batch_size']}, "
                     f"hw_decoder_load {core['hw_decoder_load']:g}): {ratio}{core['marginal'] / bare['marginal']:.2f} x "
                     f"the bare pipeline's best ({bare['marginal']:,.0f} img/s, batch {bare['batch_size']}, load "
                     f"{bare['hw_decoder_load']:g}).")
    resized = _best(rows, "decoder_gpu_resize")
    if resized:
        vs = f": {resized['marginal'] / core['marginal']:.2f} x the decode core without it" if core else ""
        lines.append(f"- Decode core on the GPU with Resize(256, crop=224), best: {resized['marginal']:,.0f} img/s "
                     f"(batch {resized['batch_size']}){vs}; its outputs against the CPU path's: max per-image mean "
                     f"|diff| {resized.get('resize_max_mean_abs_diff')}, max pixel |diff| "
                     f"{resized.get('resize_max_abs_diff')}, {resized.get('resize_shape_mismatches')} shape "
                     f"mismatches over {resized.get('resize_compared')} images.")
    if cpu:
        vs = f"; GPU decode core / CPU: {core['marginal'] / cpu['marginal']:.2f} x" if core else ""
        lines.append(f"- CPU path, {cpu.get('threads')} threads, best: {cpu['marginal']:,.0f} img/s (batch "
                     f"{cpu['batch_size']}){vs}.")
    return lines + ([""] if lines else [])


def markdown(report: Dict) -> str:
    env = report["environment"]
    lines = [
        "# beam_tarimg GPU decode benchmark",
        "",
        f"GPU: {env.get('gpu')}; CPUs: {env.get('cpus')}; Python {env.get('python')}; DALI {env.get('nvidia.dali')}; "
        f"numpy {env.get('numpy')}; Pillow {env.get('PIL')}.",
        f"MALLOC_MMAP_THRESHOLD_={env.get('MALLOC_MMAP_THRESHOLD_')}, MALLOC_TRIM_THRESHOLD_={env.get('MALLOC_TRIM_THRESHOLD_')}. "
        f"Median of {report['args']['runs']} passes after a warm-up; rate = images/pass time, marginal = after each "
        "pass's first quarter of batches. GPU MiB: the worker and its child processes after the passes (how: see JSON).",
        "",
    ]
    records = [r for r in report["results"] if "rate" in r]
    for corpus in report["args"]["corpora"]:
        spec = report["corpora"].get(corpus, {})
        rows = [r for r in records if r["corpus"] == corpus]
        lines += [f"## {corpus} ({spec.get('images')} images, {spec.get('mb', 0):.0f} MB of JPEG)", ""]
        lines += summary(report, corpus, rows)
        gpu_rows = [r for r in rows if r["case"] in GPU_CASES]
        loads = sorted({r["hw_decoder_load"] for r in gpu_rows})
        if gpu_rows:
            lines += ["Marginal images/s by hw_decoder_load:", "",
                      "| case | batch | " + " | ".join(f"load {l:g}" for l in loads) + " |",
                      "| --- | --- |" + " --- |" * len(loads)]
            for case in GPU_CASES:
                for bs in report["args"]["batch_sizes"]:
                    cells = {r["hw_decoder_load"]: r for r in gpu_rows if r["case"] == case and r["batch_size"] == bs}
                    if cells:
                        lines.append(f"| {case} | {bs} | " + " | ".join(
                            _fmt(cells[l]["marginal"]) if l in cells else "" for l in loads) + " |")
            lines.append("")
        lines += ["| case | batch | hw load | threads x procs | img/s | marginal img/s | build s | GPU MiB | host RSS MiB |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in rows:
            lines.append(
                f"| {r['case']} | {r['batch_size']} | {_fmt(r.get('hw_decoder_load'))} | "
                f"{r.get('threads', '-')} x {r.get('processes', 1)} | {_fmt(r['rate'])} | {_fmt(r['marginal'])} | "
                f"{_fmt(r.get('build_s'))} | {_fmt(r.get('gpu_mib'))} | "
                f"{_fmt(r.get('proc_rss_peak_mib') or r.get('host_rss_peak_mib'))} |"
            )
        lines.append("")
    problems = [r for r in report["results"] if "error" in r or "skipped" in r]
    if problems:
        lines += ["## Errors and skips", ""]
        lines += [f"- {r['corpus']} {r['case']} batch {r.get('batch_size')} load {r.get('hw_decoder_load')}: "
                  f"{r.get('error') or 'skipped (' + r['skipped'] + ')'}" for r in problems]
    return "\n".join(lines) + "\n"


def _csv(kind):
    return lambda text: [kind(v) for v in text.split(",") if v.strip()]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(REPO, "bench", "results", "gpu"))
    ap.add_argument("--work", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "beam-tarimg-gpu-bench"),
                    help="where the corpora are built (kept between runs)")
    ap.add_argument("--smoke", action="store_true", help="tiny corpora, CPU cases only, small batches")
    ap.add_argument("--cases", type=_csv(str), default=None, help=f"default {DEFAULT_CASES}")
    ap.add_argument("--corpora", type=_csv(str), default=["imagenet", "1080p"])
    ap.add_argument("--batch-sizes", type=_csv(int), default=None, help="default 128,512")
    ap.add_argument("--hw-loads", type=_csv(float), default=HW_LOADS, help="default 0,0.75,1 (--smoke: 0,1)")
    ap.add_argument("--fancy-loads", type=_csv(float), default=[0.9], help="loads for dali_mixed_fancy")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup-batches", type=int, default=3)
    ap.add_argument("--min-batches", type=int, default=6, help="repeat the corpus until a pass has this many batches")
    ap.add_argument("--gpu-threads", type=int, default=0,
                    help="DALI num_threads for the GPU cases (default: one per core, as ReadImagesFromTars does)")
    ap.add_argument("--procs", type=int, default=0, help="processes for cpu_procs (default: one per core)")
    ap.add_argument("--budget-s", type=float, default=240, help="start no configuration after this many seconds")
    ap.add_argument("--grace-s", type=float, default=45,
                    help="kill a worker still running this long after --budget-s (its finished results are kept)")
    # worker-only
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--corpus", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--corpus-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=float("inf"), help=argparse.SUPPRESS)
    ap.add_argument("--gpu-as-cpu", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.cases is None:
        args.cases = _csv(str)(SMOKE_CASES if args.smoke else DEFAULT_CASES)
    if args.batch_sizes is None:
        args.batch_sizes = [8, 16] if args.smoke else [128, 512]
    args.gpu_threads = args.gpu_threads or os.cpu_count() or 1
    if args.smoke:
        args.procs = args.procs or min(2, os.cpu_count() or 1)
        if args.hw_loads == HW_LOADS:
            args.hw_loads = [0.0, 1.0]
        args.min_batches = min(args.min_batches, 4)
    unknown = set(args.cases) - set(GPU_CASES) - set(CPU_CASES) - set(CHECK_CASES)
    if unknown:
        ap.error(f"unknown cases {sorted(unknown)}; known: {CHECK_CASES + GPU_CASES + CPU_CASES}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args)

    started = time.time()
    deadline = started + args.budget_s
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.work, exist_ok=True)

    def log(msg: str) -> None:
        print(f"[{time.time() - started:6.1f}s] {msg}", flush=True)

    from beam_tarimg.decode import cuda_device_count

    if cuda_device_count() == 0 and any(c in GPU_CASES for c in args.cases):
        if args.smoke:
            args.gpu_as_cpu = True
            log("no CUDA device visible: the GPU cases run their code on the CPU (a dry run, not a measurement)")
        else:
            log("no CUDA device visible: GPU cases dropped")
            args.cases = [c for c in args.cases if c not in GPU_CASES]

    report = {"environment": environment(), "args": vars(args).copy(), "corpora": {}, "results": []}
    report["args"].pop("deadline", None)
    specs = SMOKE_CORPORA if args.smoke else CORPORA
    folders = {}
    for name in args.corpora:
        folders[name] = build_corpus(args.work, name, specs[name], log)
        tars = [os.path.join(folders[name], t) for t in os.listdir(folders[name]) if t.endswith(".tar")]
        report["corpora"][name] = {"folder": folders[name], "images": specs[name]["tars"] * specs[name]["per_tar"],
                                   "mb": sum(os.path.getsize(t) for t in tars) / 1e6,
                                   "profile": corpus_profile(load_corpus(folders[name]))}
        log(f"{name}: baseline share {report['corpora'][name]['profile']['baseline_share']:.1%} "
            f"{report['corpora'][name]['profile']['kinds']}")

    def save() -> None:
        with open(os.path.join(args.out, "gpu_bench.json"), "w") as f:
            json.dump(report, f, indent=1)
        with open(os.path.join(args.out, "gpu_bench.md"), "w") as f:
            f.write(markdown(report))

    save()
    for name in args.corpora:
        for case in args.cases:
            if time.time() > deadline:
                report["results"].append({"corpus": name, "case": case, "skipped": "budget"})
                continue
            log(f"{name}: {case}")
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", case, "--corpus", name,
                   "--corpus-dir", folders[name], "--deadline", str(deadline),
                   "--batch-sizes", ",".join(map(str, args.batch_sizes)),
                   "--hw-loads", ",".join(map(str, args.hw_loads)), "--fancy-loads", ",".join(map(str, args.fancy_loads)),
                   "--runs", str(args.runs), "--warmup-batches", str(args.warmup_batches),
                   "--min-batches", str(args.min_batches), "--gpu-threads", str(args.gpu_threads),
                   "--procs", str(args.procs)] + (["--gpu-as-cpu"] if args.gpu_as_cpu else [])
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO)
            # A configuration started just before the deadline may run on; past the grace it is cut off.
            killer = threading.Timer(max(1.0, deadline + args.grace_s - time.time()), proc.kill)
            killer.daemon = True
            killer.start()
            got = 0
            for line in proc.stdout:
                if not line.startswith(RESULT):
                    sys.stdout.write(line)
                    continue
                record = json.loads(line[len(RESULT):])
                report["results"].append(record)
                got += 1
                if record.get("case") == "agreement":
                    log(f"  agreement: {json.dumps({k: v for k, v in record.items() if k not in ('exif', 'corpus')})}")
                elif "rate" in record:
                    log(f"  {case} batch {record['batch_size']} load {record.get('hw_decoder_load')}: "
                        f"{record['rate']:,.0f} img/s, marginal {record['marginal']:,.0f}, GPU {record.get('gpu_mib')} MiB")
                else:
                    log(f"  {json.dumps(record)}")
                save()
            rc = proc.wait()
            killer.cancel()
            if rc != 0:
                report["results"].append({"corpus": name, "case": case, "error": f"worker exited with {rc} after {got} results"})
                log(f"  worker exited with {rc}")
                save()
    report["elapsed_s"] = round(time.time() - started, 1)
    save()
    log(f"done in {report['elapsed_s']:.0f} s: {args.out}/gpu_bench.md and gpu_bench.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
