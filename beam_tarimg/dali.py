"""DALI in this process: one pipeline that decodes batches of JPEG bytes, one bad image at a time.

Beam-free on purpose (numpy, DALI and, for the fallback, Pillow). ``DaliDecoder`` is what the decoder process
(``beam_tarimg.decoder_process``) runs, and what ``decode.ImageDecoder`` runs itself with ``isolation="none"``.
DALI fails a whole batch on one undecodable image and leaves the pipeline unusable, so ``DaliDecoder`` rebuilds
the pipeline and splits the batch until the bad images are isolated; each is then offered to Pillow, and only an
image that Pillow cannot decode either is reported as failed. Bytes whose JPEG structure DALI is known to
mishandle never reach DALI (``Plan.reject``): they go to Pillow directly.

The modules import one way: ``decode`` (the public decoder: runs, budgets, containment) -> ``decoder_process``
(the supervised child) -> ``dali`` (this one) -> ``jpeg``.
"""

from __future__ import annotations

import atexit
import io
import logging
import threading
import weakref
from typing import List, NamedTuple, Optional, Sequence

import numpy as np

from beam_tarimg.jpeg import DEFAULT_MAX_PIXELS, NOT_A_JPEG, JpegHeader, parse_jpeg

_LOG = logging.getLogger(__name__)


class DecodeOutcome(NamedTuple):
    """The result for one input: ``pixels`` (H, W, 3 uint8 RGB) and the ``decoder`` that made them
    (``"gpu"``, ``"cpu"`` or ``"pillow"``), or ``pixels=None`` and the ``error``."""

    pixels: Optional[np.ndarray]
    decoder: Optional[str]
    error: Optional[str]


def dali_rejects(header: Optional[JpegHeader]) -> Optional[str]:
    """``jpeg.dali_rejects`` from a parsed header (None: the bytes are no JPEG)."""
    return NOT_A_JPEG if header is None else header.dali_rejects()


class Plan(NamedTuple):
    """What the header walk says of one image, for ``DaliDecoder.decode``: ``reject``, a reason to keep it from
    DALI (``jpeg.dali_rejects``; it goes to Pillow), or None; the frame's ``height`` and ``width`` (None:
    unknown, unchecked), which DALI's output must have; the ``orientation`` to apply to it (``jpeg.
    pillow_orientation``: what Pillow's ``ImageOps.exif_transpose`` applies). DALI's own orientation
    handling is off: it follows the last of several EXIF segments where Pillow follows the first, ignores
    XMP, and crashed on two EXIF segments with different orientations."""

    reject: Optional[str]
    height: Optional[int]
    width: Optional[int]
    orientation: int


def plan_of(header: Optional[JpegHeader], checked: bool = True) -> Plan:
    """The ``Plan`` for an image whose ``jpeg.parse_jpeg`` is ``header``. ``checked=False`` gives every image
    to DALI (see ``ImageDecoder._check_before_dali``)."""
    reason = dali_rejects(header) if checked else None
    if reason is not None:
        return Plan(reason, None, None, 1)
    if header is None:
        return Plan(None, None, None, 1)
    return Plan(None, header.height, header.width, header.orientation or 1)


# Orientation (EXIF 2..8) -> the move that Pillow's transposition makes, on an (H, W) array.
_MOVES = {
    2: lambda a: a[:, ::-1],  # FLIP_LEFT_RIGHT
    3: lambda a: a[::-1, ::-1],  # ROTATE_180
    4: lambda a: a[::-1],  # FLIP_TOP_BOTTOM
    5: lambda a: a.T,  # TRANSPOSE
    6: lambda a: a.T[:, ::-1],  # ROTATE_270 (90 degrees clockwise)
    7: lambda a: a.T[::-1, ::-1],  # TRANSVERSE
    8: lambda a: a.T[::-1],  # ROTATE_90 (counter-clockwise)
}


def orient(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """``pixels`` (H, W, C) as Pillow's ``ImageOps.exif_transpose`` moves them for EXIF ``orientation``: the
    same array for 1, else a new C-contiguous one (each pixel moved as one C-byte item: ~2x faster than
    moving single bytes)."""
    move = _MOVES.get(orientation)
    if move is None:
        return pixels
    c = pixels.shape[2]
    items = np.ascontiguousarray(pixels).view(np.dtype((np.void, c)))[..., 0]
    moved = np.ascontiguousarray(move(items))
    return moved.view(np.uint8).reshape(moved.shape + (c,))


class DaliDecoder:
    """One DALI pipeline in this process, built once and rebuilt after a batch that DALI rejects; the Pillow
    fallback for what DALI rejects. What ``ImageDecoder`` runs, in its decoder process or in-process.

    The arguments are ``ImageDecoder``'s; ``device`` must be resolved (``"cpu"`` or ``"gpu"``).
    ``builds`` counts how many DALI pipelines this instance has built (one, plus one per bad batch).
    """

    @staticmethod
    def check_args(max_batch_size, num_threads, **_) -> None:
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an int >= 1, got {max_batch_size!r}")
        if not isinstance(num_threads, int) or num_threads < 1:
            raise ValueError(f"num_threads must be an int >= 1, got {num_threads!r}")

    def __init__(
        self,
        max_batch_size: int,
        num_threads: int = 2,
        device: str = "cpu",
        device_id: int = 0,
        fallback: bool = True,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        hw_decoder_load: float = 0.9,
    ):
        self.check_args(max_batch_size, num_threads)
        if device not in ("cpu", "gpu"):
            raise ValueError(f"device must be resolved to 'cpu' or 'gpu', got {device!r}")
        self.max_batch_size = int(max_batch_size)
        self.num_threads = int(num_threads)
        self.device = device
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
                    adjust_orientation=False,  # the stored frame: orient() applies Pillow's orientation
                )
            else:
                images = fn.decoders.image(encoded, device="cpu", output_type=types.RGB, adjust_orientation=False)
            pipe.set_outputs(images)
        pipe.build()
        self.builds += 1
        return pipe

    def _rebuild(self) -> None:
        self._pipe = None  # let DALI free what the broken pipeline held before building the next
        self._pipe = self._build()

    def decode(self, encoded: Sequence[bytes], plans: Optional[Sequence[Optional[Plan]]] = None) -> List[DecodeOutcome]:
        """One outcome per input, in input order. Never raises for bad image bytes.

        ``plans``: the ``Plan`` of each input, when the caller has them (``ImageDecoder`` makes them once, with
        the sizes it plans runs by); None to walk the headers here. A plan of None gives the image to DALI
        unchecked and unoriented (tests of the crash containment).

        Each image DALI decodes must have the frame size its plan says (DALI decodes the stored frame, its own
        orientation handling off); one that has not is given to Pillow like one DALI rejects, never cropped or
        padded. Then ``orient`` applies the plan's orientation."""
        outcomes: List[Optional[DecodeOutcome]] = [None] * len(encoded)
        if plans is None:
            plans = [plan_of(parse_jpeg(blob)) for blob in encoded]
        for_dali = []
        for i, plan in enumerate(plans):
            if plan is None or plan[0] is None:
                for_dali.append(i)
            else:  # never fed to DALI, which can crash on such bytes (see jpeg.dali_rejects): Pillow's
                outcomes[i] = DecodeOutcome(None, None, f"not for DALI: {plan[0]}")
        with self._lock:
            arrays = {i: np.frombuffer(encoded[i], dtype=np.uint8) for i in for_dali}
            for start in range(0, len(for_dali), self.max_batch_size):
                self._decode_isolating(arrays, for_dali[start : start + self.max_batch_size], outcomes)
        for i in for_dali:
            if outcomes[i].pixels is not None and plans[i] is not None:
                outcomes[i] = _as_planned(outcomes[i], *plans[i][1:])
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


def _as_planned(outcome: DecodeOutcome, height: Optional[int], width: Optional[int], orientation: int) -> DecodeOutcome:
    """DALI's ``outcome`` checked against the frame size the header gave (an error outcome, for Pillow, when it
    differs) and oriented as Pillow's ``exif_transpose`` would."""
    pixels = outcome.pixels
    if height is not None and pixels.shape[:2] != (height, width):
        return DecodeOutcome(
            None, None,
            f"DALI returned {pixels.shape[0]}x{pixels.shape[1]} (HxW) pixels where the header says {height}x{width}",
        )
    return outcome if orientation == 1 else DecodeOutcome(orient(pixels, orientation), outcome.decoder, None)


def _release_pipeline(ref: "weakref.ref[DaliDecoder]") -> None:
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
