"""GPU tests of the decode core (``beam_tarimg.decode.ImageDecoder`` on the ``"mixed"`` DALI decoder).

The tests marked ``gpu`` skip themselves where the CUDA driver reports no device
(``beam_tarimg.decode.cuda_device_count() == 0``: CI and the project's machines) and run for real where one
is. They are Beam-free on purpose: they run on a lent GPU machine that has only DALI, numpy, Pillow and
pytest (bench/gpu/README.md says how to get DALI there and run them). They print what they measure; run them
with ``-s`` to see it.

One test, ``test_device_selection_follows_the_visible_cuda_devices``, runs everywhere.
"""

from __future__ import annotations

import gc
import os
import shutil
import subprocess
import threading
import time
from typing import Callable, List, Optional, Tuple

import numpy as np
import pytest

from beam_tarimg import decode as decode_module
from beam_tarimg.decode import ImageDecoder, cuda_device_count, resolve_device
from beam_tarimg.sample import encode_jpeg, make_sample_dataset, photo_like_image
from beam_tarimg.tario import read_tar
from beam_tarimg.types import EncodedBatch

CUDA_DEVICES = cuda_device_count()

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(
    CUDA_DEVICES == 0,
    reason="no CUDA device visible to DALI here (beam_tarimg.decode.cuda_device_count() == 0); "
    "the GPU decode tests run on a machine with one (see bench/gpu/README.md)",
)

MAX_MEAN_ABS_DIFF = 1.0  # per image, GPU against CPU, in 8-bit levels

# Bytes that no decoder can turn into an image: not an image format; an SOI marker and then junk; a JPEG
# cut off inside its header segments. (A JPEG cut inside its entropy-coded data is not here: decoders may
# return garbage pixels for it rather than fail.)
_JUNK = np.random.default_rng(12345).bytes(200)


def _corrupt_inputs(a_jpeg: bytes) -> List[bytes]:
    return [b"this is not an image at all" * 4, b"\xff\xd8\xff\xe0" + _JUNK, a_jpeg[:60]]


def _mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def _max_abs_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


# ---------------------------------------------------------------------------------------------------------
# Runs everywhere.


def test_device_selection_follows_the_visible_cuda_devices(monkeypatch):
    # The logic of resolve_device, against a driver that reports none and one that reports one device.
    monkeypatch.setattr(decode_module, "cuda_device_count", lambda: 0)
    assert resolve_device("auto") == "cpu"
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(RuntimeError, match=r"device='gpu'.*no CUDA device is visible"):
        resolve_device("gpu")
    monkeypatch.setattr(decode_module, "cuda_device_count", lambda: 1)
    assert resolve_device("auto") == "gpu"
    assert resolve_device("gpu") == "gpu"
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="device must be one of"):
        resolve_device("cuda")
    monkeypatch.undo()

    # And on this machine, for real: the driver query does not raise, and a decoder built with "auto" uses
    # what it found, end to end.
    assert isinstance(cuda_device_count(), int) and CUDA_DEVICES >= 0
    expected = "gpu" if CUDA_DEVICES else "cpu"
    assert resolve_device("auto") == expected
    if not CUDA_DEVICES:
        with pytest.raises(RuntimeError, match="no CUDA device is visible"):
            ImageDecoder(max_batch_size=2, device="gpu")
    image = photo_like_image(np.random.default_rng(0), 40, 30)
    decoder = ImageDecoder(max_batch_size=2, device="auto")
    assert decoder.device == expected
    (outcome,) = decoder.decode([encode_jpeg(image, quality=95)])
    assert outcome.error is None and outcome.decoder == expected
    assert outcome.pixels.shape == (30, 40, 3) and outcome.pixels.dtype == np.uint8
    assert _mean_abs_diff(outcome.pixels, image) < 4.0  # the image it was encoded from, at quality 95


# ---------------------------------------------------------------------------------------------------------
# Need a CUDA device.


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> List[Tuple[str, bytes]]:
    """80 ImageNet-like JPEGs (every 20 hold 14 baseline 4:2:0, 3 4:4:4, 2 progressive, 1 grayscale), read
    back through read_tar as the transforms read them: ``(member, bytes)`` in tar order."""
    out = tmp_path_factory.mktemp("gpu-corpus")
    items = []
    for path in make_sample_dataset(str(out), num_tars=2, images_per_tar=40, seed=0, sidecars=False):
        with open(path, "rb") as f:
            for record in read_tar(f, path, batch_size=64):
                assert isinstance(record, EncodedBatch), record
                items.extend((image.member, image.data) for image in record.images)
    assert len(items) == 80
    return items


@pytest.fixture(scope="module")
def cpu_reference(corpus) -> List[np.ndarray]:
    outcomes = ImageDecoder(max_batch_size=32, device="cpu").decode([data for _, data in corpus])
    assert all(o.decoder == "cpu" for o in outcomes), [o.error for o in outcomes if o.decoder != "cpu"]
    return [o.pixels for o in outcomes]


def _variant(member: str) -> str:
    slot = int(member.split(".")[0]) % 20  # beam_tarimg.sample's encoding mix, by index
    return {1: "4:4:4", 5: "4:4:4", 11: "4:4:4", 3: "progressive", 13: "progressive", 7: "grayscale"}.get(
        slot, "baseline 4:2:0"
    )


@gpu
@needs_cuda
def test_auto_picks_the_gpu_and_returns_host_numpy_from_the_mixed_decoder(corpus):
    decoder = ImageDecoder(max_batch_size=16, device="auto")
    assert decoder.device == "gpu"
    assert decoder.builds == 1

    # The pipeline really decodes on the GPU: its raw output lives in device memory.
    from nvidia.dali.backend import TensorListGPU

    decoder._pipe.feed_input("encoded", [np.frombuffer(data, dtype=np.uint8) for _, data in corpus[:4]])
    (raw,) = decoder._pipe.run()
    assert isinstance(raw, TensorListGPU), type(raw)

    outcomes = decoder.decode([data for _, data in corpus[:20]])
    for (member, _), outcome in zip(corpus, outcomes):
        assert outcome.error is None, (member, outcome.error)
        assert outcome.decoder == "gpu", member
        pixels = outcome.pixels
        assert type(pixels) is np.ndarray and pixels.dtype == np.uint8, (member, type(pixels), pixels.dtype)
        assert pixels.ndim == 3 and pixels.shape[2] == 3 and pixels.shape[0] > 0 and pixels.shape[1] > 0
        assert pixels.flags.c_contiguous
    assert decoder.builds == 1


@gpu
@needs_cuda
def test_gpu_pixels_agree_with_the_cpu_path_on_an_imagenet_like_corpus(corpus, cpu_reference):
    outcomes = ImageDecoder(max_batch_size=32, device="gpu").decode([data for _, data in corpus])
    worst = {}
    means, maxima = [], []
    for (member, _), outcome, ref in zip(corpus, outcomes, cpu_reference):
        assert outcome.decoder == "gpu", (member, outcome.error)
        assert outcome.pixels.shape == ref.shape, (member, outcome.pixels.shape, ref.shape)
        mean, top = _mean_abs_diff(outcome.pixels, ref), _max_abs_diff(outcome.pixels, ref)
        means.append(mean)
        maxima.append(top)
        variant = _variant(member)
        worst[variant] = max(worst.get(variant, (0.0, 0)), (mean, top))
    print(
        f"\nGPU vs CPU over {len(corpus)} images: max per-image mean |diff| {max(means):.3f}, "
        f"mean {np.mean(means):.3f}; max single-pixel |diff| {max(maxima)}; identical images "
        f"{sum(1 for m in maxima if m == 0)}/{len(maxima)}"
    )
    for variant, (mean, top) in sorted(worst.items()):
        print(f"  {variant:15s} worst mean |diff| {mean:.3f}, max |diff| {top}")
    assert max(means) <= MAX_MEAN_ABS_DIFF, worst


# EXIF orientation k (1..8) -> what the decoded image must be, from the upright pixels (PIL's exif_transpose).
_ORIENT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}


@gpu
@needs_cuda
def test_gpu_applies_exif_orientation_like_the_cpu_path():
    base = photo_like_image(np.random.default_rng(7), 96, 64)  # not square, a multiple of the MCU size
    encoded = [encode_jpeg(base, quality=95, exif_orientation=k) for k in range(1, 9)]
    gpu_out = ImageDecoder(max_batch_size=8, device="gpu").decode(encoded)
    cpu_out = ImageDecoder(max_batch_size=8, device="cpu").decode(encoded)
    upright_gpu = gpu_out[0].pixels
    for k, g, c in zip(range(1, 9), gpu_out, cpu_out):
        assert g.decoder == "gpu" and c.decoder == "cpu", (k, g.error, c.error)
        expected_shape = (64, 96, 3) if k <= 4 else (96, 64, 3)
        assert g.pixels.shape == c.pixels.shape == expected_shape, (k, g.pixels.shape, c.pixels.shape)
        mean = _mean_abs_diff(g.pixels, c.pixels)
        # The GPU rotates what it decoded: orientation k is exactly orientation 1's pixels, moved.
        moved = _mean_abs_diff(g.pixels, _ORIENT[k](upright_gpu))
        print(f"orientation {k}: GPU vs CPU mean |diff| {mean:.3f}; GPU vs its own upright, moved: {moved:.3f}")
        assert mean <= MAX_MEAN_ABS_DIFF, (k, mean)
        assert moved <= MAX_MEAN_ABS_DIFF, (k, moved)


@gpu
@needs_cuda
def test_a_corrupt_image_in_a_gpu_batch_costs_that_image_only(corpus, cpu_reference):
    good = list(range(13))
    corrupt = _corrupt_inputs(corpus[0][1])
    inputs, expect = [], []  # expect: corpus index or None (corrupt)
    for i in good:
        if len(inputs) in (0, 7):
            inputs.append(corrupt[len([e for e in expect if e is None])])
            expect.append(None)
        inputs.append(corpus[i][1])
        expect.append(i)
    inputs.append(corrupt[2])
    expect.append(None)
    assert len(inputs) == 16 and expect.count(None) == 3

    decoder = ImageDecoder(max_batch_size=16, device="gpu")
    outcomes = decoder.decode(inputs)
    for position, (e, outcome) in enumerate(zip(expect, outcomes)):
        if e is None:
            assert outcome.pixels is None and outcome.decoder is None, position
            assert outcome.error and outcome.error.startswith("DALI") and "Pillow" in outcome.error, outcome.error
        else:
            assert outcome.decoder == "gpu", (position, outcome.error)
            assert outcome.pixels.shape == cpu_reference[e].shape
            assert _mean_abs_diff(outcome.pixels, cpu_reference[e]) <= MAX_MEAN_ABS_DIFF
    rebuilds = decoder.builds - 1
    print(f"\n3 corrupt images in a GPU batch of 16: {rebuilds} rebuilds; errors: "
          f"{sorted(set(o.error for o in outcomes if o.error))}")
    assert rebuilds >= 3

    # The rebuilt pipeline decodes a clean batch on the GPU with no further rebuild.
    builds = decoder.builds
    again = decoder.decode([data for _, data in corpus[20:36]])
    assert [o.decoder for o in again] == ["gpu"] * 16
    assert decoder.builds == builds


# -- GPU memory ---------------------------------------------------------------------------------------------


def _nvidia_smi_process_mib() -> Optional[int]:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        text = subprocess.run(
            [smi, "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0] == str(os.getpid()) and parts[1].isdigit():
            return int(parts[1])
    return None


def _nvidia_smi_device_mib() -> Optional[int]:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        text = subprocess.run(
            [smi, "--query-gpu=memory.used", "--format=csv,noheader,nounits", "--id=0"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout.strip()
        return int(text.splitlines()[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def gpu_memory_probe() -> Tuple[Optional[str], Optional[Callable[[], int]]]:
    """``(how, read)`` where ``read()`` returns GPU memory in use in bytes, or ``(why_not, None)``.

    Call it after this process has a CUDA context (a GPU decoder built). Tried in turn: NVML through pynvml,
    this process; ``nvidia-smi --query-compute-apps``, this process; then, on a GPU that nothing else uses
    (a lent machine), the whole device's use through NVML or nvidia-smi. DALI 2.4's Python API has no device
    memory statistics (only ``ReleaseUnusedMemory``/``Preallocate*``), so it is no source here.
    """
    pid = os.getpid()
    handle = None
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)

        def by_pid() -> Optional[int]:
            for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                used = getattr(p, "usedGpuMemory", None)
                if p.pid == pid and isinstance(used, int) and used > 0:
                    return used
            return None

        if by_pid() is not None:
            return "NVML (pynvml), this process", lambda: by_pid() or 0
    except Exception:  # no pynvml, no NVML, or it does not see processes (a container's pid namespace)
        handle = None
    if _nvidia_smi_process_mib() is not None:
        return "nvidia-smi --query-compute-apps, this process", lambda: (_nvidia_smi_process_mib() or 0) << 20
    others = "; the whole device's use, valid only where nothing else uses this GPU"
    if handle is not None:
        import pynvml

        return "NVML (pynvml)" + others, lambda: int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
    if _nvidia_smi_device_mib() is not None:
        return "nvidia-smi --query-gpu=memory.used" + others, lambda: (_nvidia_smi_device_mib() or 0) << 20
    return "no way to read GPU memory here: no pynvml/NVML, no nvidia-smi", None


@gpu
@needs_cuda
def test_gpu_memory_does_not_grow_over_100_batches_each_with_a_corrupt_image(corpus):
    decoder = ImageDecoder(max_batch_size=8, device="gpu")
    how, read = gpu_memory_probe()
    if read is None:
        pytest.skip(how)
    corrupt = _corrupt_inputs(corpus[0][1])
    rng = np.random.default_rng(3)

    def one_batch(b: int) -> None:
        start = (7 * b) % (len(corpus) - 7)
        batch = [data for _, data in corpus[start : start + 7]]
        where = int(rng.integers(0, 8))
        batch.insert(where, corrupt[b % len(corrupt)])
        outcomes = decoder.decode(batch)
        assert [o.decoder for i, o in enumerate(outcomes) if i != where] == ["gpu"] * 7, b
        assert outcomes[where].pixels is None and outcomes[where].error, b

    for b in range(5):  # warm-up: pools and allocator reach their working size
        one_batch(b)
    gc.collect()
    readings = [read()]
    start, builds = time.perf_counter(), decoder.builds
    for b in range(100):
        one_batch(b)
        if b in (49, 99):
            gc.collect()
            readings.append(read())
    seconds = time.perf_counter() - start
    mib = [r / 2**20 for r in readings]
    print(
        f"\nGPU memory ({how}): after warm-up {mib[0]:.0f} MiB, after 50 bad batches {mib[1]:.0f} MiB, "
        f"after 100 {mib[2]:.0f} MiB; {decoder.builds - builds} pipeline rebuilds in {seconds:.1f} s "
        f"({seconds / 100 * 1e3:.0f} ms per batch of 8 with one corrupt image)"
    )
    assert mib[2] - mib[0] <= 128, mib  # a leak of even 0.2 MiB per rebuild (>=300 rebuilds) fails this
    assert mib[2] - mib[1] <= 32, mib  # and no steady growth in the second half


@gpu
@needs_cuda
def test_threads_sharing_one_gpu_decoder_get_correct_results(corpus, cpu_reference):
    decoder = ImageDecoder(max_batch_size=8, device="gpu")  # one per process, as the DoFns share it
    n_threads = 6
    corrupt = _corrupt_inputs(corpus[0][1])[1]
    barrier = threading.Barrier(n_threads)
    results: List[list] = [[] for _ in range(n_threads)]
    errors: List[BaseException] = []

    def work(t: int) -> None:
        try:
            mine = list(range(t, len(corpus), n_threads))
            barrier.wait()
            for rep in range(3):
                size = 5 + (t + rep) % 7  # calls of 5..11 images: some fit one DALI run, some take two
                for s in range(0, len(mine), size):
                    chunk = mine[s : s + size]
                    inputs = [corpus[i][1] for i in chunk]
                    if t == 0 and rep == 1 and s == 0:
                        inputs.insert(2, corrupt)
                        chunk = chunk[:2] + [None] + chunk[2:]
                    results[t].extend(zip(chunk, decoder.decode(inputs)))
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=600)
    assert not errors, errors
    checked = 0
    worst = 0.0
    for t in range(n_threads):
        for i, outcome in results[t]:
            if i is None:
                assert outcome.pixels is None and outcome.error
                continue
            assert outcome.decoder == "gpu", (t, i, outcome.error)
            assert outcome.pixels.shape == cpu_reference[i].shape, (t, i)
            mean = _mean_abs_diff(outcome.pixels, cpu_reference[i])
            worst = max(worst, mean)
            assert mean <= MAX_MEAN_ABS_DIFF, (t, i, mean)
            checked += 1
    assert checked == 3 * len(corpus)
    print(f"\n{n_threads} threads, one GPU decoder: {checked} images right (worst mean |diff| vs CPU "
          f"{worst:.3f}), {decoder.builds} pipeline builds")
