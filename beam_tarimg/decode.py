"""The public decoder: DALI decodes lists of JPEG bytes in runs, in a process it cannot kill.

Beam-free on purpose (numpy, DALI and, for the fallback, Pillow): it runs on a machine that has only those.

``ImageDecoder``, what the Beam transforms use, cuts each call into DALI runs bounded in images and in decoded
bytes (from the sizes the headers claim) and, by default (``isolation="process"``), runs a ``dali.DaliDecoder``
(one DALI pipeline, its Pillow fallback) in a supervised child process (``beam_tarimg.decoder_process``). DALI
can crash (segfault, abort) on some damaged JPEGs rather than raise; the child's death then costs only the runs
in flight, which are decoded again in a new child, split in halves until the culprit stands alone and becomes a
failure (``"decoder process crashed (SIGSEGV)"``). Pixels come back through shared memory, copied once.

The modules import one way: ``decode`` (this one) -> ``decoder_process`` -> ``dali`` -> ``jpeg``.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import threading
import time
from typing import Any, Iterable, Iterator, List, Optional, Sequence, Tuple

from beam_tarimg.dali import DaliDecoder, DecodeOutcome, Plan, dali_rejects, orient, plan_of  # noqa: F401 (public)
from beam_tarimg.decoder_process import DecoderCrashed, DecoderProcess
from beam_tarimg.jpeg import DEFAULT_MAX_PIXELS, DEFAULT_MAX_SCANS, JpegHeader, image_dimensions, over_limits, parse_jpeg

_LOG = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "gpu")
ISOLATION = ("process", "none")

# The most decoded bytes one DALI run may hold, from the sizes the headers claim: 512 MiB fits a worker of a few
# GB (ImageNet-sized images are ~0.5 MB each, so batches of 100 stay far below it; 24 MP photos are 72 MB each,
# so about 7 go in one run). A single image over it is decoded alone.
DEFAULT_MAX_RUN_BYTES = 512 * 1024 * 1024
# How long one run in the decoder process may take before the process is killed and the run split.
DEFAULT_RUN_TIMEOUT_S = 120.0
# Runs in flight in the decoder process: one it decodes, one queued for it while the caller reads the next.
PIPELINE_DEPTH = 2


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
        claim: DALI holds about twice a run's pixels at its peak and the decoder process's shared-memory copy
        one more; with runs pipelined, the run decoded just before it may still wait to be taken, and the one
        before that be held downstream, one more each; runs are planned at a seventh of it, the rest being
        DALI's working memory beyond that (measured: at a fifth the 1080p reader's processes peaked 17% above
        the unpipelined decode's, at a seventh 4% below), and at a half with ``isolation="none"`` (DALI's
        twice, one run at a time). A run stops short of ``max_batch_size`` images to stay under that, and a
        single larger image runs alone.
      isolation: ``"process"`` (default) runs DALI and the Pillow fallback in a child process that the
        calling process supervises and restarts: a native crash costs only the image that caused it.
        ``"none"`` runs them in the calling process (a crash there kills it). See the module docstring.
      run_timeout_s: with ``isolation="process"``, a run that takes longer kills the child and is treated
        as a crash (split, the culprit a failure ``"decoder process timed out ..."``).
      max_scans: an image with more scans, or whose header claims more pixels than ``max_pixels`` or than
        its bytes can code (``jpeg.implausible``), is refused (an error outcome) without being decoded.
      resize: a ``beam_tarimg.Resize`` applied to every image on the decode device (DALI, or the same transform
        in the Pillow fallback: see ``beam_tarimg.resize``); None (default) gives the decoded images unchanged.
        Runs are then planned by each image's decoded frame (still decoded at full size) plus its resized
        intermediate and the copies of its output, against the same budget.

    ``decode()``, ``decode_runs()``, ``decode_stream()`` and ``stream()`` are thread-safe, so one instance can
    serve every DoFn of a process: with ``isolation="process"`` the runs of several threads are in flight at
    once and each thread gets its own back; with ``"none"`` one run decodes at a time.
    ``builds`` counts the DALI pipelines built (one per decoder process started, plus one per bad batch);
    ``crashes`` counts the decoder processes that died (or were killed for a timeout) during a run.

    With ``isolation="process"`` the returned pixels are views of a shared-memory buffer that holds the
    whole run; with ``"none"``, views of DALI's output buffer of the run (an image turned for its EXIF
    orientation: an array of its own; with a ``resize``, the run's outputs copied one after the other into
    one buffer). Either way an image kept after its batch is gone keeps that buffer alive: ``.copy()`` the
    images you keep. Consecutive images of one buffer make ``ImageBatch.pixels`` a view, not a copy.
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
        resize=None,
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
            resize=resize,
        )
        DaliDecoder.check_args(**config)
        self.resize = resize
        self.max_batch_size = int(max_batch_size)
        self.max_run_bytes = int(max_run_bytes)
        self.max_pixels = max_pixels
        self.max_scans = int(max_scans)
        # DALI's CPU decoder holds about twice a run's pixels at its peak (measured: 2.4x for runs of 45 MB of
        # 3 MP images), and in the decoder process the shared-memory copy adds one more, and the two runs before
        # it (one waiting to be taken, one held downstream) one each: runs are planned at a half (in-process) or
        # a seventh (decoder process: five, and the slack measured at 1080p) of the budget.
        self._plan_bytes = self.max_run_bytes // (7 if isolation == "process" else 2)
        self.device = config["device"]
        self.isolation = isolation
        self.crashes = 0
        self._lock = threading.Lock()
        if isolation == "process":
            # Free shared-memory slots are kept for reuse up to a run's planned bytes, not beyond.
            self._process = DecoderProcess(config, run_timeout_s=run_timeout_s, max_free_bytes=self._plan_bytes)
            self._local = None
        else:
            self._process = None
            self._local = DaliDecoder(**config, pack_outputs=True)  # a batch's images in one buffer

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
        can hand each run's images on while the next run decodes (what bounds memory: see
        ``max_run_bytes``). ``headers``: ``jpeg.parse_jpeg(blob, max_scans)`` of each input, when the caller
        has them already (the transforms' read stage does)."""
        for _, run, outcomes in self.decode_stream([(None, encoded, headers)]):
            yield run, outcomes
            del outcomes  # before the next run is handed over: its shared memory may take this run's place

    def decode_stream(
        self, batches: Iterable[Tuple[Any, Sequence[bytes], Optional[Sequence[Optional[JpegHeader]]]]]
    ) -> Iterator[Tuple[Any, List[int], List[DecodeOutcome]]]:
        """``decode_runs`` over a stream of ``(key, encoded, headers)`` batches, pipelined: yields ``(key,
        indices, outcomes)`` for each run in order, while the decoder process already decodes the next run
        (``PIPELINE_DEPTH`` runs in flight). The next batch is taken from ``batches`` (read, for a lazy
        iterable) while the decoder process decodes, and each run is yielded while the next one decodes. With
        ``isolation="none"`` runs are decoded one at a time, in the calling thread. ``stream()`` is the same,
        for batches that are pushed rather than pulled."""
        stream = self.stream()
        try:
            for key, encoded, headers in batches:
                stream.add(key, encoded, headers)
                yield from stream.ready()
            yield from stream.ready(finish=True)
        finally:
            stream.close()

    def stream(self) -> "DecodeStream":
        """A ``DecodeStream`` on this decoder: ``add()`` batches as they come, take ``ready()`` runs."""
        return DecodeStream(self, PIPELINE_DEPTH if self._process is not None else 1)

    def _submit_ahead(self, queue, depth: int) -> None:
        """Hands the first ``depth`` runs of ``queue`` that are to be decoded to the decoder process."""
        if self._process is None:
            return
        ahead = 0
        for r in queue:
            if r.positions is None:
                continue
            if r.ticket is None:
                r.ticket = self._process.submit(r.encoded, r.plans, r.out_bytes)
            ahead += 1
            if ahead >= depth:
                return

    def _outcomes(self, r: "_Run") -> List[DecodeOutcome]:
        if r.positions is None:
            return r.outcomes
        if self._process is None:
            with self._lock:
                started = time.perf_counter()
                outcomes = self._local.decode(r.encoded, r.plans)
                r.decode_s = time.perf_counter() - started
                return outcomes
        outcomes = self._result(r)
        r.decode_s = r.ticket.decode_s
        return outcomes

    def _plan(self, key, encoded: Sequence[bytes], headers) -> List["_Run"]:
        """The runs of one batch: first its refused inputs (decided, no decode), then its DALI runs."""
        # One walk over each image's markers gives its size (for the plan), what DALI must not see, and what
        # is refused without decoding (the read stage of the transforms has refused those already).
        if headers is None:
            headers = [parse_jpeg(blob, self.max_scans) for blob in encoded]
        dims = [_claimed_dimensions(blob, header) for blob, header in zip(encoded, headers)]
        sizes = [self._planned_bytes(d) for d in dims]
        plans = [plan_of(header, self._check_before_dali) for header in headers]
        refused = {}
        for i, (header, d) in enumerate(zip(headers, dims)):
            reason = self._over_limits(header, d)  # the read stage's limits (jpeg.over_limits), and the resize's
            if reason is not None:
                refused[i] = DecodeOutcome(None, None, f"not decoded: {reason}")
        runs: List[_Run] = []
        if refused:
            runs.append(_Run(key, list(refused), outcomes=list(refused.values())))
            keep = [i for i in range(len(encoded)) if i not in refused]
            sizes = [sizes[i] for i in keep]
        else:
            keep = None
        for run in plan_runs(sizes, self.max_batch_size, self._plan_bytes):
            if keep is not None:
                run = [keep[p] for p in run]
            out_bytes = sum(self._output_bytes(dims[i]) for i in run)
            runs.append(_Run(key, run, [encoded[i] for i in run], [plans[i] for i in run], out_bytes))
        return runs

    def _over_limits(self, header: Optional[JpegHeader], dims: Optional[Tuple[int, int]]) -> Optional[str]:
        """``jpeg.over_limits``; with a resize, also an output over ``max_pixels`` (a 10000x1 image resized to a
        shorter side of 256 would be 256x2560000)."""
        reason = over_limits(header, dims, self.max_pixels)
        if reason is None and dims is not None and self.resize is not None:
            shape = self.resize.output_shape(dims[1], dims[0])
            if shape[0] * shape[1] * shape[2] // 3 > self.max_pixels:
                reason = f"{self.resize} would make it {shape}, over max_pixels={self.max_pixels}"
        return reason

    def _planned_bytes(self, dims: Optional[Tuple[int, int]]) -> int:
        """What decoding one image of ``dims`` (width, height) holds, in the budget's planned bytes (each standing for
        the 7 real bytes, 2 in-process, that ``max_run_bytes`` describes): its RGB frame; with a resize, plus its
        resized intermediate and its output's real copies (DALI's, the shared-memory copy, the run waiting to
        be taken and the run held downstream; in-process DALI's and the one buffer) scaled to planned bytes."""
        if dims is None:
            return 0
        frame = dims[0] * dims[1] * 3
        if self.resize is None:
            return frame
        (rh, rw), _ = self.resize.geometry(dims[1], dims[0])
        copies = 4 if self.isolation == "process" else 2
        held = rh * rw * 3 + copies * self.resize.output_nbytes(dims[1], dims[0])
        return frame + -(-held * self._plan_bytes // self.max_run_bytes)

    def _output_bytes(self, dims: Optional[Tuple[int, int]]) -> int:
        """The pixel bytes decoding one image of ``dims`` (width, height) hands out (its output slot's share)."""
        if dims is None:
            return 0
        return dims[0] * dims[1] * 3 if self.resize is None else self.resize.output_nbytes(dims[1], dims[0])


    def _result(self, r: "_Run") -> List[DecodeOutcome]:
        """The outcomes of a run handed to the decoder process; a crash costs only its culprit."""
        while True:
            try:
                return self._process.result(r.ticket)
            except DecoderCrashed as crash:
                if crash.lost:  # queued behind the run that crashed: never started, no suspect
                    r.ticket = self._process.submit(r.encoded, r.plans, r.out_bytes)
                    continue
                self._count_crash(crash, len(r.run))
                outcomes: List[Optional[DecodeOutcome]] = [None] * len(r.run)
                half = len(r.run) // 2
                if len(r.run) == 1:
                    return [DecodeOutcome(None, None, str(crash))]
                positions = list(range(len(r.run)))
                self._decode_contained(r, positions[:half], outcomes)
                self._decode_contained(r, positions[half:], outcomes)
                return outcomes  # type: ignore[return-value]

    def _decode_contained(self, r: "_Run", positions: List[int], outcomes) -> None:
        """Decodes ``r``'s inputs at ``positions`` in the decoder process, into ``outcomes[p]``; when the
        process dies, decodes the halves again (each in a new process) until the culprit stands alone."""
        while True:
            try:
                results = self._process.decode([r.encoded[p] for p in positions], [r.plans[p] for p in positions])
                break
            except DecoderCrashed as crash:
                if crash.lost:
                    continue
                self._count_crash(crash, len(positions))
                if len(positions) == 1:
                    outcomes[positions[0]] = DecodeOutcome(None, None, str(crash))
                    return
                half = len(positions) // 2
                self._decode_contained(r, positions[:half], outcomes)
                self._decode_contained(r, positions[half:], outcomes)
                return
        for p, outcome in zip(positions, results):
            outcomes[p] = outcome

    def _count_crash(self, crash: DecoderCrashed, n: int) -> None:
        with self._lock:
            self.crashes += 1
        _LOG.warning("beam_tarimg: %s during a run of %d images; decoding them again in a new process", crash, n)

    def close(self) -> None:
        """Stops the decoder process (if any) and frees the pipeline. The decoder cannot be used after it."""
        with self._lock:
            if self._process is not None:
                self._process.close()
            self._local = None


class _Run:
    """One run of ``ImageDecoder.decode_stream``: ``run`` (indices into its batch ``key``) and either its
    ``outcomes`` (inputs refused without decoding) or what to decode (``positions`` is then not None)."""

    __slots__ = ("key", "run", "outcomes", "encoded", "plans", "out_bytes", "positions", "ticket", "decode_s")

    def __init__(self, key, run, encoded=None, plans=None, out_bytes=0, outcomes=None):
        self.key = key
        self.run = run
        self.outcomes = outcomes
        self.encoded = encoded
        self.plans = plans
        self.out_bytes = out_bytes
        self.positions = None if outcomes is not None else run
        self.ticket = None
        self.decode_s: Optional[float] = None  # the decode's own time (None: not decoded)


class DecodeStream:
    """Batches pushed in, runs taken out in order, ``depth`` runs in flight in the decoder process: what a
    DoFn uses across its elements (``ImageDecoder.stream()``).

    ``add(key, encoded, headers)`` plans a batch into runs and hands runs over up to ``depth``; ``ready()``
    yields ``(key, indices, outcomes)`` for the runs that can be taken while ``depth - 1`` stay in flight (so
    that the decoder process always has the next run), ``ready(finish=True)`` for all of them. ``close()``
    waits for what is still in flight (a consumer that stopped early), so its shared memory frees up.
    ``last_decode_s``: the decode time of the run ``ready()`` yielded last (the decoder process's own time for
    it; None for inputs refused without decoding)."""

    def __init__(self, decoder: ImageDecoder, depth: int):
        self._decoder = decoder
        self._depth = depth
        self._queue: "collections.deque[_Run]" = collections.deque()
        self.last_decode_s: Optional[float] = None

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, key, encoded: Sequence[bytes], headers=None) -> None:
        self._queue.extend(self._decoder._plan(key, encoded, headers))
        self._decoder._submit_ahead(self._queue, self._depth)  # decoding starts while the next batch is read

    def ready(self, finish: bool = False) -> Iterator[Tuple[Any, List[int], List[DecodeOutcome]]]:
        queue = self._queue
        keep = 0 if finish else self._depth - 1
        while queue and (queue[0].positions is None or sum(1 for r in queue if r.positions is not None) > keep):
            self._decoder._submit_ahead(queue, self._depth)
            r = queue.popleft()
            outcomes = self._decoder._outcomes(r)
            self.last_decode_s = r.decode_s
            self._decoder._submit_ahead(queue, self._depth)
            yield r.key, r.run, outcomes
            del outcomes

    def close(self) -> None:
        process = self._decoder._process
        while self._queue:
            r = self._queue.popleft()
            if r.ticket is not None:
                try:
                    process.result(r.ticket)
                except DecoderCrashed:
                    pass
