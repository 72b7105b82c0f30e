"""The decode core: a DALI pipeline, built once, that decodes batches of JPEG bytes, one bad image at a time.

Beam-free on purpose (numpy, DALI and, for the fallback, Pillow): it runs on a machine that has only those.
DALI fails a whole batch on one undecodable image and leaves the pipeline unusable, so ``ImageDecoder``
rebuilds it and splits the batch until the bad images are isolated; each is then offered to Pillow, and only
an image that Pillow cannot decode either is reported as failed.
"""

from __future__ import annotations

import atexit
import ctypes
import io
import logging
import threading
import weakref
from typing import List, NamedTuple, Optional, Sequence

import numpy as np

from beam_tarimg.jpeg import DEFAULT_MAX_PIXELS, has_complete_header

_LOG = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "gpu")


def cuda_device_count() -> int:
    """How many CUDA devices the driver sees (0 without a driver). Touches neither DALI nor a GPU context."""
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            cuda = ctypes.CDLL(name)
            break
        except OSError:
            continue
    else:
        return 0
    try:
        if cuda.cuInit(0) != 0:
            return 0
        n = ctypes.c_int(0)
        if cuda.cuDeviceGetCount(ctypes.byref(n)) != 0:
            return 0
        return n.value
    except (AttributeError, OSError):
        return 0


def resolve_device(device: str) -> str:
    """``"auto"`` -> ``"gpu"`` when a CUDA device is visible, else ``"cpu"``. ``"gpu"`` without one raises."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "cpu":
        return "cpu"
    visible = cuda_device_count() > 0
    if device == "gpu" and not visible:
        raise RuntimeError("device='gpu' was asked for, but no CUDA device is visible on this worker")
    return "gpu" if visible else "cpu"


class DecodeOutcome(NamedTuple):
    """The result for one input: ``pixels`` (H, W, 3 uint8 RGB) and the ``decoder`` that made them
    (``"gpu"``, ``"cpu"`` or ``"pillow"``), or ``pixels=None`` and the ``error``."""

    pixels: Optional[np.ndarray]
    decoder: Optional[str]
    error: Optional[str]


class ImageDecoder:
    """Decodes lists of encoded images with one DALI pipeline built once and reused.

    Args:
      max_batch_size: the most images one ``decode()`` call decodes in one DALI run; longer lists are
        decoded in chunks.
      num_threads: DALI's CPU worker threads.
      device: ``"auto"``, ``"cpu"`` or ``"gpu"`` (see ``resolve_device``).
      device_id: the CUDA device for ``"gpu"``.
      fallback: offer images that DALI rejects to Pillow.
      max_pixels: the Pillow fallback refuses images over this many pixels.
      hw_decoder_load: the share of each batch's images given to the GPU's hardware JPEG decoder (A100,
        H100/H200; baseline JPEGs only); the rest take nvJPEG's CUDA path, whose Huffman decoding runs on
        the ``num_threads`` CPU threads (GPU only).

    ``decode()`` is thread-safe (one call at a time), so one instance can serve every DoFn of a process.
    ``builds`` counts how many DALI pipelines this instance has built (one, plus one per bad batch).
    """

    def __init__(
        self,
        max_batch_size: int,
        num_threads: int = 2,
        device: str = "auto",
        device_id: int = 0,
        fallback: bool = True,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        hw_decoder_load: float = 0.9,
    ):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size!r}")
        if num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads!r}")
        self.max_batch_size = int(max_batch_size)
        self.num_threads = int(num_threads)
        self.device = resolve_device(device)
        self.device_id = int(device_id)
        self.fallback = fallback
        self.max_pixels = max_pixels
        self.hw_decoder_load = hw_decoder_load
        self.builds = 0
        self._lock = threading.Lock()
        self._pipe = None
        self._pipe = self._build()
        # Free the pipeline while the interpreter is whole: DALI's own __del__ fails at interpreter shutdown.
        atexit.register(_release_pipeline, weakref.ref(self))
        _LOG.info(
            "beam_tarimg: DALI %s decoder ready (device_id=%s, num_threads=%d, max_batch_size=%d)",
            "GPU (mixed)" if self.device == "gpu" else "CPU",
            self.device_id if self.device == "gpu" else None,
            self.num_threads,
            self.max_batch_size,
        )

    def _build(self):
        from nvidia.dali import fn, types
        from nvidia.dali.pipeline import Pipeline

        gpu = self.device == "gpu"
        pipe = Pipeline(
            batch_size=self.max_batch_size,
            num_threads=self.num_threads,
            device_id=self.device_id if gpu else None,
            # One batch is fed before each run(), so the queue depth must be 1 (deeper queues expect more
            # fed batches and fail every second run). Pipelined execution still pays on the CPU: it measured
            # faster than the synchronous executor here (BENCHMARKS.md).
            prefetch_queue_depth=1,
            exec_async=True,
            exec_pipelined=True,
        )
        with pipe:
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1, no_copy=False)
            if gpu:
                images = fn.decoders.image(
                    encoded,
                    device="mixed",
                    output_type=types.RGB,
                    hw_decoder_load=self.hw_decoder_load,
                    # nvJPEG upsamples 4:2:0/4:2:2 chroma by repeating samples unless told otherwise;
                    # libjpeg-turbo (DALI's CPU decoder, Pillow) interpolates: make both paths do the latter.
                    jpeg_fancy_upsampling=True,
                )
            else:
                images = fn.decoders.image(encoded, device="cpu", output_type=types.RGB)
            pipe.set_outputs(images)
        pipe.build()
        self.builds += 1
        return pipe

    def _rebuild(self) -> None:
        self._pipe = None  # let DALI free what the broken pipeline held before building the next
        self._pipe = self._build()

    def decode(self, encoded: Sequence[bytes]) -> List[DecodeOutcome]:
        """One outcome per input, in input order. Never raises for bad image bytes."""
        outcomes: List[Optional[DecodeOutcome]] = [None] * len(encoded)
        for_dali = []
        for i, blob in enumerate(encoded):
            if has_complete_header(blob):
                for_dali.append(i)
            else:  # never fed to DALI, which can crash on such bytes (see jpeg.has_complete_header)
                outcomes[i] = DecodeOutcome(None, None, "not a complete JPEG (no whole frame and scan header)")
        with self._lock:
            arrays = {i: np.frombuffer(encoded[i], dtype=np.uint8) for i in for_dali}
            for start in range(0, len(for_dali), self.max_batch_size):
                self._decode_isolating(arrays, for_dali[start : start + self.max_batch_size], outcomes)
        if self.fallback:
            for i, outcome in enumerate(outcomes):
                if outcome.pixels is None and len(encoded[i]):
                    outcomes[i] = _pillow_decode(encoded[i], self.max_pixels, dali_error=outcome.error)
        return outcomes  # type: ignore[return-value]

    def _decode_isolating(self, arrays, indices: List[int], outcomes) -> None:
        """Decodes ``indices`` in one run; on failure rebuilds and splits in halves until the bad ones stand alone."""
        if not indices:
            return
        try:
            pixels = self._run([arrays[i] for i in indices])
        except RuntimeError as e:
            error = _short_dali_error(e)
        else:
            for i, p in zip(indices, pixels):
                outcomes[i] = DecodeOutcome(p, self.device, None)
            return
        # Rebuild outside the except block: its traceback would keep the broken pipeline (threads, buffers,
        # GPU memory) alive through every level of the halving below.
        self._rebuild()
        if len(indices) == 1:
            outcomes[indices[0]] = DecodeOutcome(None, None, error)
            return
        half = len(indices) // 2
        self._decode_isolating(arrays, indices[:half], outcomes)
        self._decode_isolating(arrays, indices[half:], outcomes)

    def _run(self, batch: List[np.ndarray]) -> List[np.ndarray]:
        self._pipe.feed_input("encoded", batch)
        (out,) = self._pipe.run()
        if self.device == "gpu":
            out = out.as_cpu()
        if getattr(self._pipe, "exec_dynamic", False):
            # DALI's dynamic executor (the default with exec_async and exec_pipelined) gives every run fresh
            # output buffers that live as long as something references them: hand out views, not copies
            # (BENCHMARKS.md: the copies cost ~0.13 ms of CPU per ImageNet-sized image). The test
            # test_decoder__outputs_of_earlier_runs_survive_later_runs guards this.
            return [np.asarray(out[i]) for i in range(len(out))]
        return [out.at(i) for i in range(len(out))]  # other executors reuse their buffers on the next run


def _release_pipeline(ref: "weakref.ref[ImageDecoder]") -> None:
    decoder = ref()
    if decoder is not None:
        with decoder._lock:
            decoder._pipe = None


def _short_dali_error(e: BaseException) -> str:
    """DALI's message minus the pipeline-definition traceback it quotes."""
    text = str(e)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    keep = [ln for ln in lines if not ln.startswith(("File ", "which was used", "Error in", "img =", "images ="))]
    keep = [
        ln for ln in keep
        if ln not in ("encountered:", "Critical error in pipeline:", "Current pipeline object is no longer valid.")
    ]
    return "DALI: " + (" ".join(keep) if keep else text.strip())


def _pillow_decode(data: bytes, max_pixels: int, dali_error: Optional[str]) -> DecodeOutcome:
    try:
        from PIL import Image, ImageOps
    except ImportError:  # pragma: no cover - Pillow is a dependency
        return DecodeOutcome(None, None, f"{dali_error}; Pillow fallback unavailable (pip install Pillow)")
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > max_pixels:
                return DecodeOutcome(None, None, f"{dali_error}; Pillow: {w}x{h} is over max_pixels={max_pixels}")
            rgb = ImageOps.exif_transpose(im).convert("RGB")
            pixels = np.asarray(rgb)
    except Image.UnidentifiedImageError:
        return DecodeOutcome(None, None, f"{dali_error}; Pillow: not an image format it knows")
    except Exception as e:  # Pillow raises many types for bad data
        return DecodeOutcome(None, None, f"{dali_error}; Pillow: {type(e).__name__}: {e}")
    return DecodeOutcome(pixels, "pillow", None)
