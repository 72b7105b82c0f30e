"""DALI in this process: one pipeline that decodes batches of JPEG bytes, one bad image at a time.

Beam-free on purpose (numpy, DALI and, for the fallback, Pillow). ``DaliDecoder`` is what the decoder process
(``beam_tarimg.decoder_process``) runs, and what ``decode.ImageDecoder`` runs itself with ``isolation="none"``.
DALI fails a whole batch on one undecodable image and leaves the pipeline unusable, so ``DaliDecoder`` rebuilds
the pipeline and splits the batch until the bad images are isolated; each is then offered to Pillow, and only an
image that Pillow cannot decode either is reported as failed. Bytes whose JPEG structure DALI is known to
mishandle never reach DALI (``Plan.reject``): they go to Pillow directly.

With a ``resize.Resize``, both paths give the transformed image: DALI resizes, crops or pads, normalizes and
lays out on its decode device, on the stored frame with a geometry mapped from the oriented image, and the
small output is oriented in numpy; the Pillow fallback decodes, applies ``exif_transpose`` and then
``Resize.apply_pillow`` (see ``beam_tarimg.resize``).

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
from beam_tarimg.resize import Resize

_LOG = logging.getLogger(__name__)


class DecodeOutcome(NamedTuple):
    """The result for one input: ``pixels`` (H, W, 3 uint8 RGB; with a ``Resize``, its output: HxWx3 or
    3xHxW, uint8 or float32) and the ``decoder`` that made them (``"gpu"``, ``"cpu"`` or ``"pillow"``), or
    ``pixels=None`` and the ``error``."""

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
    """``pixels`` (H, W, C, any dtype) as Pillow's ``ImageOps.exif_transpose`` moves them for EXIF
    ``orientation``: the same array for 1, else a new C-contiguous one (each pixel moved as one item of its C
    values: ~2x faster than moving single bytes)."""
    move = _MOVES.get(orientation)
    if move is None:
        return pixels
    c = pixels.shape[2]
    items = np.ascontiguousarray(pixels).view(np.dtype((np.void, c * pixels.dtype.itemsize)))[..., 0]
    moved = np.ascontiguousarray(move(items))
    return moved.view(pixels.dtype).reshape(moved.shape + (c,))


def orient_output(pixels: np.ndarray, orientation: int, layout: str) -> np.ndarray:
    """An output made on the stored frame (HWC or CHW, any dtype), moved as Pillow's ``exif_transpose`` moves
    the image for EXIF ``orientation``: the same array for 1, else a new C-contiguous one."""
    move = _MOVES.get(orientation)
    if move is None or layout != "CHW":
        return orient(pixels, orientation)
    return np.ascontiguousarray(np.stack([move(plane) for plane in pixels]))


class DaliDecoder:
    """One DALI pipeline in this process, built once and rebuilt after a batch that DALI rejects; the Pillow
    fallback for what DALI rejects. What ``ImageDecoder`` runs, in its decoder process or in-process.

    The arguments are ``ImageDecoder``'s; ``device`` must be resolved (``"cpu"`` or ``"gpu"``).
    ``pack_outputs``: with a ``resize``, copy each call's outputs one after the other into one buffer (unless
    DALI's lie so already), so that a batch of them is one array without a copy (``ImageBatch.pixels``); the
    decoder process packs them into its shared memory instead.
    ``builds`` counts how many DALI pipelines this instance has built (one, plus one per bad batch).
    """

    @staticmethod
    def check_args(max_batch_size, num_threads, resize=None, **_) -> None:
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an int >= 1, got {max_batch_size!r}")
        if not isinstance(num_threads, int) or num_threads < 1:
            raise ValueError(f"num_threads must be an int >= 1, got {num_threads!r}")
        if resize is not None and not isinstance(resize, Resize):
            raise ValueError(f"resize must be a beam_tarimg.Resize or None, got {resize!r}")

    def __init__(
        self,
        max_batch_size: int,
        num_threads: int = 2,
        device: str = "cpu",
        device_id: int = 0,
        fallback: bool = True,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        hw_decoder_load: float = 0.9,
        resize: Optional[Resize] = None,
        pack_outputs: bool = False,
    ):
        self.check_args(max_batch_size, num_threads, resize=resize)
        if device not in ("cpu", "gpu"):
            raise ValueError(f"device must be resolved to 'cpu' or 'gpu', got {device!r}")
        self.max_batch_size = int(max_batch_size)
        self.num_threads = int(num_threads)
        self.device = device
        self.device_id = int(device_id)
        self.fallback = fallback
        self.max_pixels = max_pixels
        self.hw_decoder_load = hw_decoder_load
        self.resize = resize
        self.pack_outputs = bool(pack_outputs)
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
            if self.resize is None:
                pipe.set_outputs(images)
            else:
                pipe.set_outputs(_resize_ops(images, self.resize), images.shape())
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
        unchecked and unoriented (tests of the crash containment); with a ``resize``, DALI's output of such an
        image (or of one whose plan has no frame size) is then given to Pillow, as DALI's geometry was planned
        from a frame size.

        Each image DALI decodes must have the frame size its plan says (DALI decodes the stored frame, its own
        orientation handling off; with a ``resize``, the frame DALI decoded before resizing); one that has not
        is given to Pillow like one DALI rejects, never cropped or padded. Then ``orient`` (``orient_output``)
        applies the plan's orientation."""
        outcomes: List[Optional[DecodeOutcome]] = [None] * len(encoded)
        if plans is None:
            plans = [plan_of(parse_jpeg(blob)) for blob in encoded]
        for_dali = []
        for i, plan in enumerate(plans):
            if plan is None or plan[0] is None:
                for_dali.append(i)
            else:  # never fed to DALI, which can crash on such bytes (see jpeg.dali_rejects): Pillow's
                outcomes[i] = DecodeOutcome(None, None, f"not for DALI: {plan[0]}")
        frames = {}  # with a resize: the shape of the frame DALI decoded, per input
        geometry = None if self.resize is None else {i: self._stored_geometry(plans[i]) for i in for_dali}
        with self._lock:
            arrays = {i: np.frombuffer(encoded[i], dtype=np.uint8) for i in for_dali}
            for start in range(0, len(for_dali), self.max_batch_size):
                chunk = for_dali[start : start + self.max_batch_size]
                self._decode_isolating(arrays, chunk, outcomes, geometry, frames)
        for i in for_dali:
            if outcomes[i].pixels is None:
                continue
            if self.resize is not None:
                outcomes[i] = _resized_as_planned(outcomes[i], plans[i], frames[i], self.resize)
            elif plans[i] is not None:
                outcomes[i] = _as_planned(outcomes[i], *plans[i][1:])
        if self.fallback:
            for i, outcome in enumerate(outcomes):
                if outcome.pixels is None and len(encoded[i]):
                    outcomes[i] = _pillow_decode(encoded[i], self.max_pixels, dali_error=outcome.error,
                                                 resize=self.resize)
        if self.resize is not None and self.pack_outputs:
            outcomes = pack_outcomes(outcomes)
        return outcomes  # type: ignore[return-value]

    def _stored_geometry(self, plan: Optional[Plan]):
        """DALI's resize target and window for an image, on its stored frame; a 1x1 placeholder (its output then
        discarded: see ``decode``) when the plan gives no frame size."""
        if plan is None or plan[1] is None:
            return (1, 1), (0, 0), (1, 1)
        return self.resize.stored_geometry(plan[1], plan[2], plan[3])

    def _decode_isolating(self, arrays, indices: List[int], outcomes, geometry=None, frames=None) -> None:
        """Decodes ``indices`` in one run; on failure rebuilds and splits in halves until the bad ones stand alone.
        ``geometry``: with a resize, each input's ``_stored_geometry``; the decoded frames' shapes go to
        ``frames``."""
        if not indices:
            return
        try:
            pixels, shapes = self._run([arrays[i] for i in indices], None if geometry is None else
                                       [geometry[i] for i in indices])
        except RuntimeError as e:
            error = _short_dali_error(e)
        else:
            for k, (i, p) in enumerate(zip(indices, pixels)):
                outcomes[i] = DecodeOutcome(p, self.device, None)
                if shapes is not None:
                    frames[i] = shapes[k]
            return
        # Rebuild outside the except block: its traceback would keep the broken pipeline (threads, buffers,
        # GPU memory) alive through every level of the halving below.
        self._rebuild()
        if len(indices) == 1:
            outcomes[indices[0]] = DecodeOutcome(None, None, error)
            return
        half = len(indices) // 2
        self._decode_isolating(arrays, indices[:half], outcomes, geometry, frames)
        self._decode_isolating(arrays, indices[half:], outcomes, geometry, frames)

    def _run(self, batch: List[np.ndarray], geometry=None):
        """The outputs of one DALI run, and (with a resize) the decoded frames' shapes, else None."""
        self._pipe.feed_input("encoded", batch)
        shapes = None
        if geometry is None:
            (out,) = self._pipe.run()
        else:
            self._pipe.feed_input("resize_size", [np.array(g[0], np.float32) for g in geometry])
            if _has_window(self.resize):
                self._pipe.feed_input("window_anchor", [np.array(g[1], np.float32) for g in geometry])
                self._pipe.feed_input("window_shape", [np.array(g[2], np.float32) for g in geometry])
            out, frame = self._pipe.run()
            if hasattr(frame, "as_cpu"):  # a GPU TensorList
                frame = frame.as_cpu()
            shapes = [tuple(int(d) for d in np.asarray(frame[k])) for k in range(len(frame))]
        if self.device == "gpu":
            out = out.as_cpu()
        if getattr(self._pipe, "exec_dynamic", False):
            # DALI's dynamic executor (the default with exec_async and exec_pipelined) gives every run fresh
            # output buffers that live as long as something references them: hand out views, not copies
            # (BENCHMARKS.md: the copies cost ~0.13 ms of CPU per ImageNet-sized image). The test
            # test_decoder__outputs_of_earlier_runs_survive_later_runs guards this.
            return [np.asarray(out[i]) for i in range(len(out))], shapes
        return [out.at(i) for i in range(len(out))], shapes  # other executors reuse their buffers on the next run


def _has_window(resize: Resize) -> bool:
    """Whether the resize takes a window (a crop, or the letterbox padding) after ``fn.resize``."""
    return resize.mode == "letterbox" or resize.crop is not None


def _resize_ops(images, resize: Resize):
    """The DALI ops of ``resize`` after the decoder, on its device: ``fn.resize`` to a per-sample size, ``fn.slice``
    for the window (padding outside the image), then ``fn.crop_mirror_normalize`` (float32) or ``fn.transpose``
    (uint8 CHW). Per-sample sizes and windows come from external sources (``DaliDecoder._run``)."""
    from nvidia.dali import fn, types

    size = fn.external_source(name="resize_size", dtype=types.FLOAT, ndim=1, no_copy=False)
    images = fn.resize(
        images,
        size=size,
        interp_type=types.INTERP_LINEAR if resize.interpolation == "linear" else types.INTERP_CUBIC,
        antialias=resize.antialias,
    )
    if _has_window(resize):
        anchor = fn.external_source(name="window_anchor", dtype=types.FLOAT, ndim=1, no_copy=False)
        shape = fn.external_source(name="window_shape", dtype=types.FLOAT, ndim=1, no_copy=False)
        images = fn.slice(
            images, anchor, shape, axes=[0, 1], normalized_anchor=False, normalized_shape=False,
            out_of_bounds_policy="pad", fill_values=resize.pad_value,
        )
    if resize.dtype == "float32":
        images = fn.crop_mirror_normalize(
            images,
            dtype=types.FLOAT,
            output_layout=resize.layout,
            mean=list(resize.mean or (0.0, 0.0, 0.0)),
            std=list(resize.std or (1.0, 1.0, 1.0)),
        )
    elif resize.layout == "CHW":
        images = fn.transpose(images, perm=[2, 0, 1])
    return images


def _resized_as_planned(outcome: DecodeOutcome, plan: Optional[Plan], frame, resize: Resize) -> DecodeOutcome:
    """DALI's resized ``outcome`` checked by the ``frame`` it decoded against the plan's frame size (an error
    outcome, for Pillow, when it differs or the plan has none) and oriented as ``exif_transpose`` would."""
    if plan is None or plan[1] is None:
        return DecodeOutcome(None, None, "DALI's resize was planned without a frame size (no header): not used")
    if tuple(frame[:2]) != (plan[1], plan[2]):
        return DecodeOutcome(
            None, None,
            f"DALI decoded {frame[0]}x{frame[1]} (HxW) pixels where the header says {plan[1]}x{plan[2]}",
        )
    if plan[3] == 1:
        return outcome
    return DecodeOutcome(orient_output(outcome.pixels, plan[3], resize.layout), outcome.decoder, None)


def pack_outcomes(outcomes: List[DecodeOutcome]) -> List[DecodeOutcome]:
    """``outcomes`` with their pixels one after the other in one buffer (a copy), unless they lie so already."""
    arrays = [o.pixels for o in outcomes if o.pixels is not None]
    if not arrays or _consecutive(arrays):
        return outcomes
    buffer = np.empty(sum(a.nbytes for a in arrays), np.uint8)
    packed, offset = [], 0
    for o in outcomes:
        if o.pixels is None:
            packed.append(o)
            continue
        n = o.pixels.nbytes
        view = buffer[offset : offset + n].view(o.pixels.dtype).reshape(o.pixels.shape)
        np.copyto(view, o.pixels)
        packed.append(DecodeOutcome(view, o.decoder, o.error))
        offset += n
    return packed


def _consecutive(arrays: List[np.ndarray]) -> bool:
    """Whether ``arrays`` are consecutive pieces of one numpy buffer (what ``types.stack_images`` views)."""
    base = arrays[0].base
    address = arrays[0].__array_interface__["data"][0]
    for a in arrays:
        if a.base is not base or not isinstance(base, np.ndarray) or not a.flags.c_contiguous:
            return False
        if a.__array_interface__["data"][0] != address:
            return False
        address += a.nbytes
    return True


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


def _pillow_decode(data: bytes, max_pixels: int, dali_error: Optional[str],
                   resize: Optional[Resize] = None) -> DecodeOutcome:
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
            pixels = np.asarray(rgb) if resize is None else resize.apply_pillow(rgb)
    except Image.UnidentifiedImageError:
        return DecodeOutcome(None, None, f"{dali_error}; Pillow: not an image format it knows")
    except Exception as e:  # Pillow raises many types for bad data
        return DecodeOutcome(None, None, f"{dali_error}; Pillow: {type(e).__name__}: {e}")
    return DecodeOutcome(pixels, "pillow", None)
