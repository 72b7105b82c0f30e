"""GPU tests of the decode core (``beam_tarimg.decode.ImageDecoder`` on the ``"mixed"`` DALI decoder).

The tests marked ``gpu`` skip themselves where the CUDA driver reports no device
(``beam_tarimg.decode.cuda_device_count() == 0``: CI and the project's machines) and run for real where one
is. They are Beam-free on purpose: they run on a lent GPU machine that has only DALI, numpy, Pillow and
pytest (bench/gpu/README.md says how to get DALI there and run them). They print what they measure; run them
with ``-s`` to see it.

They use the decoder's public API only (``ImageDecoder(...)``, ``.device``, ``.decode()`` and its outcomes;
``builds`` and ``crashes`` are printed where the decoder has them), so they hold whether DALI runs in the
test's process or in a decode process that the decoder supervises. GPU memory is read for this process and
every process below it (NVML or nvidia-smi by pid), else for the whole device. The crash tests: a batch with
a known crasher (every good image comes out, the crasher is exactly one outcome), and a SIGSEGV sent to the
decoder's decode process mid-batch (skipped where DALI runs in the test's own process).

Two tests run everywhere: ``test_device_selection_follows_the_visible_cuda_devices``, and
``test_resize_ops_take_the_mixed_decoders_gpu_output_and_stay_on_the_gpu`` (defines, without building, the
GPU pipeline of a resize on decode).
"""

from __future__ import annotations

import gc
import os
import signal
import threading
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
import pytest

from beam_tarimg import decode as decode_module
from beam_tarimg.decode import ImageDecoder, cuda_device_count, resolve_device
from beam_tarimg.sample import encode_jpeg, make_sample_dataset, photo_like_image
from beam_tarimg.tario import read_tar
from beam_tarimg.types import EncodedBatch
from bench.gpu.gpu_bench import nvidia_smi
from bench.measure import descendants

CUDA_DEVICES = cuda_device_count()
# A dry run of these tests' own code where there is no GPU (bench/gpu/smoke.sh sets it): the decoders are
# built with device="cpu" and the tests expect "cpu" where they otherwise expect "gpu". Proves the tests, not
# the GPU path.
ON_CPU = os.environ.get("TARIMG_GPU_TESTS_ON_CPU") == "1" and CUDA_DEVICES == 0
DEVICE = "cpu" if ON_CPU else "gpu"

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(
    CUDA_DEVICES == 0 and not ON_CPU,
    reason="no CUDA device visible to DALI here (beam_tarimg.decode.cuda_device_count() == 0); "
    "the GPU decode tests run on a machine with one (see bench/gpu/README.md)",
)

MAX_MEAN_ABS_DIFF = 1.0  # per image, GPU against CPU, in 8-bit levels

# Bytes that no decoder can turn into an image and that a header check keeps away from DALI: not an image
# format; an SOI marker and then junk; a JPEG cut off inside its header segments.
_JUNK = np.random.default_rng(12345).bytes(200)


def _corrupt_inputs(a_jpeg: bytes) -> List[bytes]:
    return [b"this is not an image at all" * 4, b"\xff\xd8\xff\xe0" + _JUNK, a_jpeg[:60]]


def _dali_rejects(a_jpeg: bytes) -> bytes:
    """The JPEG with two junk bytes before its quantisation table segment: its header is whole, so it goes to
    DALI, whose JPEG parser (nvImageCodec's, which the CPU and GPU decoders share) rejects it ("Invalid
    marker"), failing the DALI run; Pillow decodes it to the same pixels as the original."""
    dqt = a_jpeg.index(b"\xff\xdb")
    return a_jpeg[:dqt] + b"\x00\x01" + a_jpeg[dqt:]


def _cut_in_scan(a_jpeg: bytes) -> bytes:
    """The JPEG cut in the middle of its entropy-coded data: it goes to DALI, which may fail on it or decode
    it to partly grey pixels (decoders differ)."""
    return a_jpeg[: (a_jpeg.index(b"\xff\xda") + len(a_jpeg)) // 2]


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


@pytest.mark.parametrize("resize_kwargs", [
    dict(size=256, crop=224),
    dict(size=(224, 288), mode="letterbox", dtype="float32", layout="CHW", mean=(1, 2, 3), std=(4, 5, 6)),
    dict(size=200, layout="CHW"),
])
def test_resize_ops_take_the_mixed_decoders_gpu_output_and_stay_on_the_gpu(resize_kwargs):
    # Without a GPU the pipeline cannot be built, but its graph can be defined: DALI places each op there and
    # refuses a CPU op fed a GPU output. The resize must run on the GPU, before the copy to host; the decoded
    # frame's shape (the check against the header) is a CPU output.
    from nvidia.dali import fn, types
    from nvidia.dali.pipeline import Pipeline

    from beam_tarimg.dali import _resize_ops
    from beam_tarimg.resize import Resize

    pipe = Pipeline(batch_size=4, num_threads=2, device_id=0, prefetch_queue_depth=1)
    with pipe:
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        images = fn.decoders.image(encoded, device="mixed", output_type=types.RGB, adjust_orientation=False)
        resized, frame = _resize_ops(images, Resize(**resize_kwargs)), images.shape()
        pipe.set_outputs(resized, frame)
    assert (resized.device, frame.device) == ("gpu", "cpu")


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


# -- GPU memory of this process and the decode process it supervises ----------------------------------------


def _descendants(pid: int) -> List[int]:
    """The pids of every live process below ``pid`` (children, their children...)."""
    return [p for p in descendants(pid) if p != pid]


def _maps_dali(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/maps", "rb") as f:
            return b"libdali.so" in f.read()
    except OSError:
        return False


def _dali_processes() -> List[int]:
    """Processes below this one that have DALI loaded: the decoder's decode process(es), if it has any."""
    return [p for p in _descendants(os.getpid()) if _maps_dali(p)]


def _tree_rss() -> int:
    """Resident host memory of this process and every process below it, in bytes."""
    total = 0
    for pid in [os.getpid(), *_descendants(os.getpid())]:
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            continue
    return total


class GpuMemory:
    """GPU memory in bytes, read two ways (either may be None where it cannot be read):

    ``tree``: what this process and the processes it started (a decode process) hold, summed over the pids
    that NVML (pynvml) or ``nvidia-smi --query-compute-apps`` list; None where neither lists any process
    (some containers hide them). ``device``: the whole device's use (NVML or nvidia-smi), meaningful on a
    lent GPU that nothing else uses. DALI 2.4's Python API has no device memory statistics.
    """

    def __init__(self) -> None:
        self.handle = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:  # no pynvml or no NVML: nvidia-smi below
            self.handle = None

    def _processes(self) -> Dict[int, int]:
        if self.handle is not None:
            import pynvml

            try:
                procs = pynvml.nvmlDeviceGetComputeRunningProcesses(self.handle)
                return {p.pid: int(p.usedGpuMemory or 0) for p in procs}
            except Exception:
                pass
        out: Dict[int, int] = {}
        for line in (nvidia_smi(["--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]) or "").splitlines():
            parts = [p.strip() for p in line.split(",")]
            if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
                out[int(parts[0])] = int(parts[1]) << 20
        return out

    def _device(self) -> Optional[int]:
        if self.handle is not None:
            import pynvml

            try:
                return int(pynvml.nvmlDeviceGetMemoryInfo(self.handle).used)
            except Exception:
                pass
        text = nvidia_smi(["--query-gpu=memory.used", "--format=csv,noheader,nounits", "--id=0"])
        try:
            return int(text.split()[0]) << 20 if text else None
        except (ValueError, IndexError):
            return None

    def read(self) -> Tuple[Optional[int], Optional[int]]:
        procs = self._processes()
        tree = None
        if procs:
            mine = {os.getpid(), *_descendants(os.getpid())}
            tree = sum(used for pid, used in procs.items() if pid in mine)
        return tree, self._device()


@gpu
@needs_cuda
def test_auto_picks_the_gpu_and_returns_host_numpy_from_the_mixed_decoder(corpus):
    memory = GpuMemory()
    _, device_before = memory.read()
    decoder = ImageDecoder(max_batch_size=16, device="auto")
    assert decoder.device == DEVICE

    outcomes = decoder.decode([data for _, data in corpus[:20]])
    for (member, _), outcome in zip(corpus, outcomes):
        assert outcome.error is None, (member, outcome.error)
        assert outcome.decoder == DEVICE, member
        pixels = outcome.pixels
        assert type(pixels) is np.ndarray and pixels.dtype == np.uint8, (member, type(pixels), pixels.dtype)
        assert pixels.ndim == 3 and pixels.shape[2] == 3 and pixels.shape[0] > 0 and pixels.shape[1] > 0
        assert pixels.flags.c_contiguous

    # The decoding really ran on the GPU: this process, or the decode process it supervises, now holds GPU
    # memory (a CUDA context and DALI's pools; hundreds of MiB on an H200).
    tree, device_after = memory.read()
    print(f"\nGPU memory: this process tree {None if tree is None else tree >> 20} MiB; the device "
          f"{None if device_before is None else device_before >> 20} -> "
          f"{None if device_after is None else device_after >> 20} MiB; DALI processes below this one: "
          f"{_dali_processes()}")
    if tree is not None:
        assert tree >= 64 << 20, tree
    elif device_before is not None and device_after is not None:
        assert device_after - device_before >= 64 << 20, (device_before, device_after)
    else:
        pytest.skip("decoded on 'gpu', but GPU memory cannot be read here (no NVML, no nvidia-smi)")


@gpu
@needs_cuda
def test_gpu_pixels_agree_with_the_cpu_path_on_an_imagenet_like_corpus(corpus, cpu_reference):
    outcomes = ImageDecoder(max_batch_size=32, device=DEVICE).decode([data for _, data in corpus])
    worst = {}
    means, maxima = [], []
    for (member, _), outcome, ref in zip(corpus, outcomes, cpu_reference):
        assert outcome.decoder == DEVICE, (member, outcome.error)
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


@gpu
@needs_cuda
def test_gpu_resize_agrees_with_the_cpu_resize_and_gives_one_array_per_batch(corpus):
    # Resize on decode runs on the GPU (fn.resize/fn.slice/fn.crop_mirror_normalize on the "mixed" decoder's
    # output) before the copy to host; the geometry is planned on the oriented image, so the 8 orientations too.
    from beam_tarimg.resize import Resize
    from beam_tarimg.types import stack_images

    base = photo_like_image(np.random.default_rng(7), 301, 203)  # odd sizes: odd crop margins
    data = [d for _, d in corpus[:40]] + [encode_jpeg(base, quality=95, exif_orientation=k) for k in range(1, 9)]
    imagenet = dict(mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375))
    for r in (Resize(256, crop=224), Resize((224, 288), mode="letterbox", dtype="float32", layout="CHW", **imagenet)):
        gpu_out = ImageDecoder(max_batch_size=32, device=DEVICE, resize=r).decode(data)
        cpu_out = ImageDecoder(max_batch_size=32, device="cpu", resize=r).decode(data)
        means = []
        for k, (g, c) in enumerate(zip(gpu_out, cpu_out)):
            assert g.decoder == DEVICE and c.decoder == "cpu", (k, g.error, c.error)
            assert g.pixels.shape == c.pixels.shape and g.pixels.dtype == c.pixels.dtype == np.dtype(r.dtype)
            scale = np.asarray(r.std or (1.0,) * 3).reshape((3, 1, 1) if r.layout == "CHW" else (1, 1, 3))
            means.append(float(np.abs(g.pixels.astype(np.float64) - c.pixels).mean() * scale.mean()))
        print(f"\nresize {r.mode} {r.dtype} {r.layout}: GPU vs CPU max per-image mean |diff| {max(means):.3f} "
              f"(uint8 units) over {len(means)} images")
        assert max(means) <= MAX_MEAN_ABS_DIFF
        arrays = [g.pixels for g in gpu_out[:32]]  # one decode run
        stacked = stack_images(arrays)
        assert stacked is not None and all(np.shares_memory(stacked, a) for a in arrays)


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
    gpu_out = ImageDecoder(max_batch_size=8, device=DEVICE).decode(encoded)
    cpu_out = ImageDecoder(max_batch_size=8, device="cpu").decode(encoded)
    upright_gpu = gpu_out[0].pixels
    for k, g, c in zip(range(1, 9), gpu_out, cpu_out):
        assert g.decoder == DEVICE and c.decoder == "cpu", (k, g.error, c.error)
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
    corrupt = _corrupt_inputs(corpus[0][1])
    # (position, what): "error" never reaches DALI and fails; ("pillow", i) fails the GPU run and is rescued
    # by Pillow with corpus image i's pixels; "one" is exactly one outcome, image or failure.
    bad = {0: "error", 3: ("pillow", 40), 7: "error", 9: "one", 12: ("pillow", 41), 15: "error"}
    inputs, expect, good = [], [], iter(range(16))
    for position in range(16):
        what = bad.get(position)
        if what == "error":
            inputs.append(corrupt[len([e for e in expect if e == "error"])])
        elif what == "one":
            inputs.append(_cut_in_scan(corpus[42][1]))
        elif what:
            inputs.append(_dali_rejects(corpus[what[1]][1]))
        else:
            what = next(good)
            inputs.append(corpus[what][1])
        expect.append(what)

    decoder = ImageDecoder(max_batch_size=16, device=DEVICE)
    outcomes = decoder.decode(inputs)
    assert len(outcomes) == len(inputs)
    for position, (e, outcome) in enumerate(zip(expect, outcomes)):
        if e == "error":
            assert outcome.pixels is None and outcome.decoder is None and outcome.error, (position, outcome)
        elif e == "one":
            assert (outcome.pixels is None) != (outcome.error is None), (position, outcome)
        else:
            source = e[1] if isinstance(e, tuple) else e
            assert outcome.decoder == (e[0] if isinstance(e, tuple) else DEVICE), (position, outcome.error)
            assert outcome.pixels.shape == cpu_reference[source].shape, position
            assert _mean_abs_diff(outcome.pixels, cpu_reference[source]) <= MAX_MEAN_ABS_DIFF, position
    cut = outcomes[9]
    print(f"\n6 bad images in a GPU batch of 16: errors {sorted(set(o.error for o in outcomes if o.error))}; "
          f"the JPEG cut in its scan: {cut.error or 'an image from ' + cut.decoder}; "
          f"builds {getattr(decoder, 'builds', '?')}, crashes {getattr(decoder, 'crashes', '?')}")

    # The decoder goes on decoding clean batches on the GPU.
    again = decoder.decode([data for _, data in corpus[20:36]])
    assert [o.decoder for o in again] == [DEVICE] * 16, [o.error for o in again]


@gpu
@needs_cuda
def test_gpu_memory_does_not_grow_over_40_batches_each_with_an_image_dali_rejects(corpus):
    # Each batch holds one image that fails the DALI run on the GPU (the pipeline is rebuilt, the batch split).
    # Which damaged JPEGs do that depends on the decoder and on the checks before it: the kinds that make a
    # run fail here are picked first, by the pipeline builds they cost.
    decoder = ImageDecoder(max_batch_size=8, device=DEVICE)
    memory = GpuMemory()
    kinds = {"junk before DQT": _dali_rejects, "cut in its scan": _cut_in_scan}
    failing = []
    for name, damage in kinds.items():
        before = decoder.builds
        decoder.decode([corpus[50][1], damage(corpus[51][1]), corpus[52][1]])
        if decoder.builds > before:
            failing.append(name)
    if not failing:
        pytest.skip(f"none of {sorted(kinds)} makes a DALI run fail on {DEVICE!r} here: nothing to rebuild")
    bad = [kinds[failing[i % len(failing)]](data) for i, (_, data) in enumerate(corpus[:10])]
    rng = np.random.default_rng(3)

    def one_batch(b: int) -> None:
        start = (7 * b) % (len(corpus) - 7)
        batch = [data for _, data in corpus[start : start + 7]]
        where = int(rng.integers(0, 8))
        batch.insert(where, bad[b % len(bad)])
        outcomes = decoder.decode(batch)
        assert [o.decoder for i, o in enumerate(outcomes) if i != where] == [DEVICE] * 7, b
        assert (outcomes[where].pixels is None) != (outcomes[where].error is None), b

    for b in range(5):  # warm-up: pools and allocator reach their working size
        one_batch(b)
    gc.collect()
    tree, device = memory.read()
    if tree:
        how, read = "this process tree, by pid", lambda: memory.read()[0]
    elif device is not None:
        how, read = "the whole device (nothing else uses a lent GPU)", lambda: memory.read()[1]
    elif ON_CPU:  # the dry run: the same loop, over host memory
        how, read = "dry run on the CPU: host RSS of this process tree", _tree_rss
    else:
        pytest.skip("GPU memory cannot be read here (no NVML, no nvidia-smi)")
    readings = [read()]
    start, builds = time.perf_counter(), decoder.builds
    for b in range(40):
        one_batch(b)
        if b in (19, 39):
            gc.collect()
            readings.append(read())
    seconds = time.perf_counter() - start
    mib = [r / 2**20 for r in readings]
    print(
        f"\nGPU memory ({how}): after warm-up {mib[0]:.0f} MiB, after 20 bad batches {mib[1]:.0f} MiB, "
        f"after 40 {mib[2]:.0f} MiB; {seconds:.1f} s ({seconds / 40 * 1e3:.0f} ms per batch of 8 with one "
        f"image DALI rejects: {failing}); builds {builds} -> {decoder.builds}, crashes "
        f"{getattr(decoder, 'crashes', '?')}"
    )
    assert decoder.builds - builds >= 40, (builds, decoder.builds)  # each bad image failed a DALI run
    assert mib[2] - mib[0] <= 64, mib  # a leak of 2 MiB per bad batch (each costs >= 3 rebuilds) fails this
    assert mib[2] - mib[1] <= 32, mib  # and no steady growth in the second half


@gpu
@needs_cuda
def test_threads_sharing_one_gpu_decoder_get_correct_results(corpus, cpu_reference):
    decoder = ImageDecoder(max_batch_size=8, device=DEVICE)  # one per process, as the DoFns share it
    n_threads = 6
    corrupt = _corrupt_inputs(corpus[0][1])[1]
    barrier = threading.Barrier(n_threads)
    results: List[list] = [[] for _ in range(n_threads)]
    errors: List[BaseException] = []

    def work(t: int) -> None:
        try:
            mine = list(range(t, len(corpus), n_threads))
            barrier.wait()
            for rep in range(2):
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
            assert outcome.decoder == DEVICE, (t, i, outcome.error)
            assert outcome.pixels.shape == cpu_reference[i].shape, (t, i)
            mean = _mean_abs_diff(outcome.pixels, cpu_reference[i])
            worst = max(worst, mean)
            assert mean <= MAX_MEAN_ABS_DIFF, (t, i, mean)
            checked += 1
    assert checked == 2 * len(corpus)
    print(f"\n{n_threads} threads, one GPU decoder: {checked} images right (worst mean |diff| vs CPU "
          f"{worst:.3f}), builds {getattr(decoder, 'builds', '?')}")


# -- A crash of the decoder on the GPU -------------------------------------------------------------------------


def _sof_component_count_mutant(image: np.ndarray) -> bytes:
    """A baseline JPEG whose only change is the frame header's component count, 3 -> 2: it passes a
    complete-header check, and DALI 2.4's CPU decoder segfaults on it among 63 good images in 3 of 4 runs
    (shared/FIELD-NOTES.md)."""
    data = bytearray(encode_jpeg(image, quality=90))
    sof = data.index(b"\xff\xc0")  # FF C0, length (2), precision, height (2), width (2), component count
    assert data[sof + 9] == 3
    data[sof + 9] = 2
    return bytes(data)


@gpu
@needs_cuda
def test_a_known_crasher_in_a_gpu_batch_costs_only_itself(corpus, cpu_reference):
    # The batch in which DALI's CPU decoder crashes: the mutant among 63 good images, decoded several times.
    # Whether or not the GPU decoder crashes on it (or a check keeps it away from DALI), every good image
    # comes out decoded on the GPU and the mutant is exactly one outcome: an image or a failure.
    mutant = _sof_component_count_mutant(photo_like_image(np.random.default_rng(11), 64, 48))
    decoder = ImageDecoder(max_batch_size=64, device=DEVICE)
    warm = decoder.decode([data for _, data in corpus[:8]])
    assert [o.decoder for o in warm] == [DEVICE] * 8
    if not _dali_processes():
        pytest.skip("this ImageDecoder decodes in the test's own process (no DALI process below it): a crash "
                    "there would end the test run")
    seen = []
    for run in range(3):
        where = 17 + 13 * run
        inputs = [data for _, data in corpus[:63]]
        inputs.insert(where, mutant)
        outcomes = decoder.decode(inputs)
        assert len(outcomes) == 64, run
        for position, outcome in enumerate(outcomes):
            if position == where:
                assert (outcome.pixels is None) != (outcome.error is None), outcome
                seen.append(outcome.error or f"an image from {outcome.decoder}")
                continue
            i = position if position < where else position - 1
            assert outcome.decoder == DEVICE, (run, position, outcome.error)
            assert outcome.pixels.shape == cpu_reference[i].shape, (run, position)
            assert _mean_abs_diff(outcome.pixels, cpu_reference[i]) <= MAX_MEAN_ABS_DIFF, (run, position)
    print(f"\nthe SOF component-count mutant among 63 good images, 3 runs on the GPU: {seen}; "
          f"crashes {getattr(decoder, 'crashes', '?')}")
    again = decoder.decode([data for _, data in corpus[63:79]])
    assert [o.decoder for o in again] == [DEVICE] * 16, [o.error for o in again]


@gpu
@needs_cuda
def test_a_gpu_decode_process_killed_mid_batch_is_restarted_and_the_batch_completes(corpus, cpu_reference):
    # A native crash of the decode process, forced: SIGSEGV to it while it decodes. Needs a decoder that
    # decodes in a process of its own (the containment of crashes); an in-process decoder cannot survive it.
    decoder = ImageDecoder(max_batch_size=64, device=DEVICE)
    warm = decoder.decode([data for _, data in corpus[:8]])
    assert [o.decoder for o in warm] == [DEVICE] * 8
    victims = _dali_processes()
    if not victims:
        pytest.skip("this ImageDecoder decodes in the test's own process (no DALI process below it): "
                    "a crash cannot be contained there")
    crashes_before = getattr(decoder, "crashes", None)
    work = list(range(len(corpus))) * 8  # 640 images, 10 DALI runs of 64: long enough to be hit mid-batch
    result: Dict[str, object] = {}

    def run() -> None:
        try:
            result["outcomes"] = decoder.decode([corpus[i][1] for i in work])
            # Looked at from this thread: a decode process started from a thread may not outlive it.
            result["after"] = _dali_processes()
        except BaseException as e:  # surfaced below
            result["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(0.3)
    for pid in victims:
        os.kill(pid, signal.SIGSEGV)
    thread.join(timeout=600)
    assert not thread.is_alive(), "decode() did not return after its decode process was killed"
    assert "error" not in result, result.get("error")
    outcomes = result["outcomes"]
    assert len(outcomes) == len(work)
    for position, (i, outcome) in enumerate(zip(work, outcomes)):
        # Nothing here is a crasher: every image comes out, from the GPU.
        assert outcome.decoder == DEVICE, (position, outcome.error)
        assert outcome.pixels.shape == cpu_reference[i].shape, position
        assert _mean_abs_diff(outcome.pixels, cpu_reference[i]) <= MAX_MEAN_ABS_DIFF, position
    after = result["after"]
    crashes = getattr(decoder, "crashes", None)
    print(f"\nSIGSEGV to the GPU decode process {victims} during a decode of {len(work)} images: all came out; "
          f"crashes {crashes_before} -> {crashes}; decode process now {after}")
    assert after and not set(after) & set(victims), (victims, after)
    if crashes is not None:
        assert crashes >= (crashes_before or 0) + 1, (crashes_before, crashes)
    again = decoder.decode([data for _, data in corpus[:16]])
    assert [o.decoder for o in again] == [DEVICE] * 16, [o.error for o in again]
