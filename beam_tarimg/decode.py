"""The decode core: DALI decodes batches of JPEG bytes, one bad image at a time, in a process it cannot kill.

Beam-free on purpose (numpy, DALI and, for the fallback, Pillow): it runs on a machine that has only those.

Two layers:

* ``DaliDecoder`` is one DALI pipeline, built once, in the calling process. DALI fails a whole batch on one
  undecodable image and leaves the pipeline unusable, so it rebuilds the pipeline and splits the batch until
  the bad images are isolated; each is then offered to Pillow, and only an image that Pillow cannot decode
  either is reported as failed. Bytes whose JPEG structure DALI is known to mishandle never reach DALI: they
  go to Pillow directly.
* ``ImageDecoder``, what the Beam transforms use, cuts each call into DALI runs bounded in images and in
  decoded bytes (from the sizes the headers claim) and, by default (``isolation="process"``), runs the
  ``DaliDecoder`` in a supervised child process (``beam_tarimg.decoder_process``). DALI can crash (segfault,
  abort) on some damaged JPEGs rather than raise; the child's death then costs only the run in flight, which
  is decoded again in a new child, split in halves until the culprit stands alone and becomes a failure
  (``"decoder process crashed (SIGSEGV)"``). Pixels come back through shared memory, copied once.
"""

from __future__ import annotations

import atexit
import ctypes
import io
import logging
import threading
import weakref
from typing import Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from beam_tarimg.jpeg import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_SCANS,
    NOT_A_JPEG,
    JpegHeader,
    image_dimensions,
    over_limits,
    parse_jpeg,
)

_LOG = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "gpu")
ISOLATION = ("process", "none")

# The most decoded bytes one DALI run may hold, from the sizes the headers claim: 512 MiB fits a worker of a few
# GB (ImageNet-sized images are ~0.5 MB each, so batches of 100 stay far below it; 24 MP photos are 72 MB each,
# so about 7 go in one run). A single image over it is decoded alone.
DEFAULT_MAX_RUN_BYTES = 512 * 1024 * 1024
# How long one run in the decoder process may take before the process is killed and the run split.
DEFAULT_RUN_TIMEOUT_S = 120.0
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


def _claimed_dimensions(data: bytes, header: Optional[JpegHeader]) -> Optional[Tuple[int, int]]:
    try:
        return image_dimensions(data, header)
    except ValueError:  # over Pillow's own bomb limit: the decoders refuse it without decoding
        return None


def claimed_bytes(data: bytes, header: Optional[JpegHeader] = None) -> int:
    """The bytes of RGB pixels the image's header claims (0 when no header says): what a decode will hold.
    ``header``: ``parse_jpeg(data)``, when the caller has it."""
    dims = _claimed_dimensions(data, header)
    return 0 if dims is None else dims[0] * dims[1] * 3


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


def plan_runs(sizes: Sequence[int], max_images: int, max_bytes: int) -> List[List[int]]:
    """Cuts ``range(len(sizes))`` into runs, in order, of at most ``max_images`` items and ``max_bytes`` bytes
    (``sizes`` are the items' decoded bytes); an item over ``max_bytes`` forms a run of its own."""
    runs: List[List[int]] = []
    run: List[int] = []
    held = 0
    for i, size in enumerate(sizes):
        if run and (len(run) >= max_images or held + size > max_bytes):
            runs.append(run)
            run, held = [], 0
        run.append(i)
        held += size
    if run:
        runs.append(run)
    return runs


class ImageDecoder:
    """Decodes lists of encoded images: DALI, built once and reused, in a supervised process by default.

    Args:
      max_batch_size: the most images in one DALI run; longer lists are decoded in several runs.
      num_threads: DALI's CPU worker threads.
      device: ``"auto"``, ``"cpu"`` or ``"gpu"`` (see ``resolve_device``).
      device_id: the CUDA device for ``"gpu"``.
      fallback: offer images that DALI rejects to Pillow.
      max_pixels: the Pillow fallback refuses images over this many pixels.
      hw_decoder_load: the share of each batch's images given to the GPU's hardware JPEG decoder (A100,
        H100/H200; baseline JPEGs only); the rest take nvJPEG's CUDA path, whose Huffman decoding runs on
        the ``num_threads`` CPU threads (GPU only).
      max_run_bytes: a budget for the memory that decoding one run takes, from the pixel sizes the headers
        claim: DALI holds about twice a run's pixels at its peak, and the decoder process's shared-memory copy
        one more, so runs are planned at a quarter of it (a half with ``isolation="none"``); a run stops short
        of ``max_batch_size`` images to stay under that, and a single larger image runs alone.
      isolation: ``"process"`` (default) runs DALI and the Pillow fallback in a child process that the
        calling process supervises and restarts: a native crash costs only the image that caused it.
        ``"none"`` runs them in the calling process (a crash there kills it). See the module docstring.
      run_timeout_s: with ``isolation="process"``, a run that takes longer kills the child and is treated
        as a crash (split, the culprit a failure ``"decoder process timed out ..."``).
      max_scans: an image with more scans, or whose header claims more pixels than ``max_pixels`` or than
        its bytes can code (``jpeg.implausible``), is refused (an error outcome) without being decoded.

    ``decode()`` is thread-safe (one call at a time), so one instance can serve every DoFn of a process.
    ``builds`` counts the DALI pipelines built (one per decoder process started, plus one per bad batch);
    ``crashes`` counts the decoder processes that died (or were killed for a timeout) during a run.

    With ``isolation="process"`` the returned pixels are views of a shared-memory buffer that holds the
    whole run; with ``"none"``, views of DALI's output buffer of the run (an image turned for its EXIF
    orientation: an array of its own). Either way an image kept after its
    batch is gone keeps that buffer alive: ``.copy()`` the images you keep.
    """

    # False only to measure the crash containment on what the structure check would keep from DALI (the fuzz
    # harness does): every input then goes to DALI first.
    _check_before_dali = True

    def __init__(
        self,
        max_batch_size: int,
        num_threads: int = 2,
        device: str = "auto",
        device_id: int = 0,
        fallback: bool = True,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        hw_decoder_load: float = 0.9,
        max_run_bytes: int = DEFAULT_MAX_RUN_BYTES,
        isolation: str = "process",
        run_timeout_s: float = DEFAULT_RUN_TIMEOUT_S,
        max_scans: int = DEFAULT_MAX_SCANS,
    ):
        if max_run_bytes < 1:
            raise ValueError(f"max_run_bytes must be >= 1, got {max_run_bytes!r}")
        if isolation not in ISOLATION:
            raise ValueError(f"isolation must be one of {ISOLATION}, got {isolation!r}")
        if not run_timeout_s > 0:
            raise ValueError(f"run_timeout_s must be > 0, got {run_timeout_s!r}")
        config = dict(
            max_batch_size=max_batch_size,
            num_threads=num_threads,
            device=resolve_device(device),
            device_id=device_id,
            fallback=fallback,
            max_pixels=max_pixels,
            hw_decoder_load=hw_decoder_load,
        )
        DaliDecoder.check_args(**config)
        self.max_batch_size = int(max_batch_size)
        self.max_run_bytes = int(max_run_bytes)
        self.max_pixels = max_pixels
        self.max_scans = int(max_scans)
        # DALI's CPU decoder holds about twice a run's pixels at its peak (measured: 2.4x for runs of 45 MB of
        # 3 MP images), and in the decoder process the shared-memory copy adds one more: runs are planned at a
        # half (in-process) or a quarter (decoder process) of the budget.
        self._plan_bytes = self.max_run_bytes // (4 if isolation == "process" else 2)
        self.device = config["device"]
        self.isolation = isolation
        self.crashes = 0
        self._lock = threading.Lock()
        if isolation == "process":
            from beam_tarimg.decoder_process import DecoderProcess

            # Free shared-memory slots are kept for reuse up to a run's planned bytes, not beyond.
            self._process = DecoderProcess(config, run_timeout_s=run_timeout_s, max_free_bytes=self._plan_bytes)
            self._local = None
        else:
            self._process = None
            self._local = DaliDecoder(**config)

    @property
    def builds(self) -> int:
        return self._process.builds if self._process is not None else self._local.builds

    def decode(self, encoded: Sequence[bytes]) -> List[DecodeOutcome]:
        """One outcome per input, in input order. Never raises for bad image bytes; raises RuntimeError if,
        after a crash, no new decoder process can be started (twice in a row): an infrastructure failure."""
        outcomes: List[Optional[DecodeOutcome]] = [None] * len(encoded)
        for run, run_outcomes in self.decode_runs(encoded):
            for i, outcome in zip(run, run_outcomes):
                outcomes[i] = outcome
        return outcomes  # type: ignore[return-value]

    def decode_runs(
        self, encoded: Sequence[bytes], headers: Optional[Sequence[Optional[JpegHeader]]] = None
    ) -> Iterator[Tuple[List[int], List[DecodeOutcome]]]:
        """Decodes run by run, yielding ``(indices, outcomes)`` for each run as it is done, so that a caller
        can hand each run's images on before the next run is decoded (what bounds memory: see
        ``max_run_bytes``). ``headers``: ``jpeg.parse_jpeg(blob, max_scans)`` of each input, when the caller
        has them already (the transforms' read stage does)."""
        # One walk over each image's markers gives its size (for the plan), what DALI must not see, and what
        # is refused without decoding (the read stage of the transforms has refused those already).
        if headers is None:
            headers = [parse_jpeg(blob, self.max_scans) for blob in encoded]
        dims = [_claimed_dimensions(blob, header) for blob, header in zip(encoded, headers)]
        sizes = [0 if d is None else d[0] * d[1] * 3 for d in dims]
        plans = [plan_of(header, self._check_before_dali) for header in headers]
        refused = {}
        for i, (header, d) in enumerate(zip(headers, dims)):
            reason = over_limits(header, d, self.max_pixels)  # the read stage's limits (jpeg.over_limits)
            if reason is not None:
                refused[i] = DecodeOutcome(None, None, f"not decoded: {reason}")
        del headers
        if refused:
            yield list(refused), list(refused.values())
            keep = [i for i in range(len(encoded)) if i not in refused]
            sizes = [sizes[i] for i in keep]
        else:
            keep = None
        for run in plan_runs(sizes, self.max_batch_size, self._plan_bytes):
            if keep is not None:
                run = [keep[p] for p in run]
            with self._lock:
                if self._process is None:
                    run_outcomes = self._local.decode([encoded[i] for i in run], [plans[i] for i in run])
                else:
                    run_outcomes = [None] * len(run)
                    self._decode_contained(encoded, plans, run, list(range(len(run))), run_outcomes)
            yield run, run_outcomes

    def _decode_contained(self, encoded, plans, run: List[int], positions: List[int], outcomes) -> None:
        """Decodes ``run[p] for p in positions`` in the decoder process, into ``outcomes[p]``; when the process
        dies, decodes the halves again (each in a new process) until the culprit stands alone."""
        from beam_tarimg.decoder_process import DecoderCrashed

        try:
            results = self._process.decode([encoded[run[p]] for p in positions], [plans[run[p]] for p in positions])
        except DecoderCrashed as crash:
            self.crashes += 1
            _LOG.warning("beam_tarimg: %s during a run of %d images; decoding them again in a new process",
                         crash, len(positions))
            if len(positions) == 1:
                outcomes[positions[0]] = DecodeOutcome(None, None, str(crash))
                return
            half = len(positions) // 2
            self._decode_contained(encoded, plans, run, positions[:half], outcomes)
            self._decode_contained(encoded, plans, run, positions[half:], outcomes)
            return
        for p, outcome in zip(positions, results):
            outcomes[p] = outcome

    def close(self) -> None:
        """Stops the decoder process (if any) and frees the pipeline. The decoder cannot be used after it."""
        with self._lock:
            if self._process is not None:
                self._process.close()
            self._local = None


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
