"""Beam transforms: tar shards in, batches of decoded images (and failure records) out."""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import posixpath
import re
import stat
import threading
from typing import Iterator, List, Optional, Sequence, Union

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes, FileMetadata
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.pvalue import TaggedOutput
from apache_beam.utils import shared
from apache_beam.utils.windowed_value import WindowedValue

from beam_tarimg import coders as _coders  # noqa: F401  (registers the ImageBatch/EncodedBatch coders)
from beam_tarimg.decode import DEFAULT_MAX_RUN_BYTES, DEFAULT_RUN_TIMEOUT_S, DEVICES, ISOLATION, ImageDecoder
from beam_tarimg.jpeg import DEFAULT_MAX_PIXELS, DEFAULT_MAX_SCANS
from beam_tarimg.resize import Resize
from beam_tarimg.schema import check_int
from beam_tarimg.tario import (
    DEFAULT_EXTENSIONS,
    DEFAULT_MAX_EXPANSION,
    DEFAULT_MAX_MEMBER_BYTES,
    escape_member_name,
    normalize_extensions,
    read_tar,
    tar_display_name,
)
from beam_tarimg.types import EncodedBatch, FailureStage, ImageBatch, ImageFailure, ImageObject

_LOG = logging.getLogger(__name__)

NAMESPACE = "beam_tarimg"
FAILURES = "failures"
REDISTRIBUTE = ("auto", "encoded", "decoded", "none")

# Runners that keep a shuffle's whole input in memory: "auto" shuffles nothing that grows with the data there.
_LOCAL_RUNNERS = frozenset(
    name.lower()
    for name in ("DirectRunner", "SwitchingDirectRunner", "BundleBasedDirectRunner", "FnApiRunner", "PrismRunner",
                 "TestDirectRunner", "InteractiveRunner")
)


@dataclasses.dataclass(frozen=True)
class _ReadConfig:
    batch_size: int
    extensions: tuple
    include_metadata: bool
    max_pixels: int
    max_member_bytes: int
    max_scans: int
    max_expansion: int = DEFAULT_MAX_EXPANSION
    max_decompressed_bytes: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class _DecodeConfig:
    batch_size: int
    num_threads: Optional[int]
    device: str
    device_id: int
    fallback: bool
    max_pixels: int
    hw_decoder_load: float
    max_run_bytes: int
    isolation: str
    run_timeout_s: float
    max_scans: int
    resize: Optional[Resize] = None

    def make_decoder(self) -> ImageDecoder:
        threads = self.num_threads or _usable_cores()
        return ImageDecoder(
            max_batch_size=self.batch_size,
            num_threads=threads,
            device=self.device,
            device_id=self.device_id,
            fallback=self.fallback,
            max_pixels=self.max_pixels,
            hw_decoder_load=self.hw_decoder_load,
            max_run_bytes=self.max_run_bytes,
            isolation=self.isolation,
            run_timeout_s=self.run_timeout_s,
            max_scans=self.max_scans,
            resize=self.resize,
        )


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class _Counters:
    """Beam counters of one namespace, created on first use."""

    def __init__(self):
        self._counters = {}

    def count(self, name: str, n: int = 1) -> None:
        if n:
            counter = self._counters.get(name)
            if counter is None:
                counter = self._counters[name] = Metrics.counter(NAMESPACE, name)
            counter.inc(n)


class _SharedDecoder:
    """The per-process decoder, plus whether its construction has been counted yet (weak-referenceable)."""

    def __init__(self, config: _DecodeConfig):
        self.decoder = config.make_decoder()
        self.build_reported = 0
        self.crashes_reported = 0
        self.lock = threading.Lock()


class NotARegularFile(OSError):
    """A matched entry that is no file to read (a directory, FIFO, socket, device, dangling link)."""


def _not_regular(mode: int) -> Optional[str]:
    for test, what in ((stat.S_ISDIR, "a directory"),
                       (stat.S_ISFIFO, "a FIFO (named pipe); never opened: reading one blocks until a writer comes"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return what
    return None if stat.S_ISREG(mode) else f"an entry of unknown type (mode {mode:o})"


def open_tar(path: str):
    """Opens the exact entry ``path`` names (a matched name is never matched again) for reading its bytes as
    stored; ``read_tar`` tells and undoes the compression.

    A local entry is checked with ``stat`` before it is opened: a directory, FIFO, socket or device (a symbolic
    link is followed: one to /dev/zero is a character device) or a dangling symbolic link raises
    ``NotARegularFile``, and nothing is opened, so a FIFO never blocks the job. The file is then opened with
    ``O_NONBLOCK`` and checked again (``fstat``), so an entry swapped for a FIFO in between cannot block either.
    On object stores every matched name is an object; a name ending in ``/`` (a folder marker) raises
    ``NotARegularFile``.
    """
    if FileSystems.get_scheme(path) is not None:  # an object store (or any other non-local filesystem)
        if path.endswith("/"):
            raise NotARegularFile("an object whose name ends in '/' (a folder marker), not a file")
        return FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)
    try:
        what = _not_regular(os.stat(path).st_mode)
    except FileNotFoundError:
        if not os.path.islink(path):
            raise
        raise NotARegularFile(f"a dangling symbolic link (to {escape_member_name(os.readlink(path))!r})") from None
    if what is not None:
        raise NotARegularFile(what + (" (through a symbolic link)" if os.path.islink(path) else ""))
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        what = _not_regular(os.fstat(fd).st_mode)
        if what is not None:
            raise NotARegularFile(f"{what} (the entry changed after it was checked)")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _open_and_read(element, config: _ReadConfig, counters: _Counters):
    """Yields EncodedBatch and TaggedOutput(FAILURES, ImageFailure) for one tar (a path or FileMetadata)."""
    path = element if isinstance(element, str) else element.path
    try:
        f = open_tar(path)
    except Exception as e:  # any filesystem: missing, permission, not a file, a network error
        counters.count("tars_failed")
        error = f"not a regular file: {e}" if isinstance(e, NotARegularFile) else f"{type(e).__name__}: {e}"
        yield TaggedOutput(FAILURES, ImageFailure(escape_member_name(path), None, FailureStage.OPEN, error))
        return
    with f:
        for event in read_tar(
            f,
            path,
            batch_size=config.batch_size,
            extensions=config.extensions,
            include_metadata=config.include_metadata,
            max_pixels=config.max_pixels,
            max_member_bytes=config.max_member_bytes,
            max_scans=config.max_scans,
            max_expansion=config.max_expansion,
            max_decompressed_bytes=config.max_decompressed_bytes,
            count=counters.count,
        ):
            if isinstance(event, ImageFailure):
                if event.member is not None and event.stage != FailureStage.METADATA:
                    counters.count("images_failed")  # limit, decode, and JPEG-named members that are not files
                yield TaggedOutput(FAILURES, event)
            else:
                yield event
    counters.count("tars_read")


class _SetupStateFn(beam.DoFn):
    """A DoFn whose attributes made in setup() stay out of its pickled state (live decoders, locks)."""

    _SETUP_STATE = ("_counters", "_decode_ms", "_shared")

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in self._SETUP_STATE}


class _ReadTarsFn(_SetupStateFn):
    """Reads tars into EncodedBatches (no decode). Counters: tars_read, tars_failed, tars_corrupt,
    tars_without_images, members_skipped, members_not_files, images_over_limit, images_failed, bytes_read."""

    def __init__(self, config: _ReadConfig):
        self._config = config

    def setup(self):
        self._counters = _Counters()

    def process(self, element) -> Iterator:
        yield from _open_and_read(element, self._config, self._counters)


class _DecodeBatchesFn(_SetupStateFn):
    """Decodes EncodedBatches into ImageBatches with one DALI pipeline per process (shared between the
    DoFn instances of that process; by default in a supervised decoder process). Counters: images_decoded_cpu,
    images_decoded_gpu, images_decoded_fallback, images_failed, decoders_built, dali_rebuilds, decoder_crashes;
    distribution batch_decode_ms (the decode time of each DALI run).

    Pipelined across elements (``ImageDecoder.stream()``): an element's runs are handed to the decoder process
    as it comes, and its images are emitted once the next run is in the decoder's hands (from a later
    ``process()`` or from ``finish_bundle()``), each in the window and with the timestamp of its own element."""

    _SETUP_STATE = _SetupStateFn._SETUP_STATE + ("_stream",)

    def __init__(self, config: _DecodeConfig):
        self._decode_config = config
        self._shared_handle = shared.Shared()

    def setup(self):
        self._counters = _Counters()
        self._decode_ms = Metrics.distribution(NAMESPACE, "batch_decode_ms")
        self._shared = self._shared_handle.acquire(
            lambda: _SharedDecoder(self._decode_config), tag=self._decode_config
        )
        self._stream = None

    def start_bundle(self):
        if self._stream is not None:  # a bundle that failed midway: let its runs in flight finish
            self._stream.close()
        self._stream = self._shared.decoder.stream()

    def process(self, batch: EncodedBatch, window=beam.DoFn.WindowParam,
                timestamp=beam.DoFn.TimestampParam) -> Iterator:
        yield from self._add(batch, window, timestamp)

    def finish_bundle(self) -> Iterator:
        yield from self._ready(finish=True)
        self._stream = None

    def teardown(self):
        if getattr(self, "_stream", None) is not None:
            self._stream.close()
            self._stream = None

    def _add(self, batch: EncodedBatch, window, timestamp) -> Iterator:
        # In the fused read-and-decode step the read stage's marker walks come along (batch.headers); after a
        # shuffle they are None and the decoder walks the markers itself.
        if batch.images:
            self._stream.add((batch, window, timestamp), [image.data for image in batch.images], batch.headers)
        yield from self._ready(finish=False)

    def _ready(self, finish: bool) -> Iterator:
        """The runs the stream can hand back now, one ImageBatch each (a batch cut short by max_run_bytes is
        emitted as it is, so that no more than a few runs' pixels are held here at a time)."""
        for (batch, window, timestamp), run, outcomes in self._stream.ready(finish):
            if self._stream.last_decode_s is not None:
                self._decode_ms.update(int(self._stream.last_decode_s * 1000))
            self._report_builds()
            out = None
            for out in self._emit(batch, run, outcomes):
                if isinstance(out, TaggedOutput):
                    yield TaggedOutput(out.tag, WindowedValue(out.value, timestamp, (window,)))
                else:
                    yield WindowedValue(out, timestamp, (window,))
            del out, outcomes  # before the next run is handed over: its shared memory may take this run's place

    def _report_builds(self) -> None:
        s = self._shared
        with s.lock:
            new = s.decoder.builds - s.build_reported
            first = s.build_reported == 0
            s.build_reported = s.decoder.builds
            crashes = s.decoder.crashes - s.crashes_reported
            s.crashes_reported = s.decoder.crashes
        if new:
            self._counters.count("decoders_built", 1 if first else 0)
            self._counters.count("dali_rebuilds", new - 1 if first else new)
        self._counters.count("decoder_crashes", crashes)

    def _emit(self, batch: EncodedBatch, run, outcomes) -> Iterator:
        prefix = tar_display_name(batch.tar_path) + "/"
        images = []
        for i, outcome in zip(run, outcomes):
            encoded = batch.images[i]
            if outcome.pixels is None:
                self._counters.count("images_failed")
                yield TaggedOutput(
                    FAILURES, ImageFailure(batch.tar_path, encoded.member, FailureStage.DECODE, outcome.error)
                )
                continue
            self._counters.count("images_decoded_fallback" if outcome.decoder == "pillow" else
                                 f"images_decoded_{outcome.decoder}")
            images.append(
                ImageObject(prefix + encoded.member, encoded.image_id, outcome.pixels, encoded.metadata,
                            encoded=encoded.data)
            )
        if images:
            yield ImageBatch(batch.tar_path, images)


class _ReadAndDecodeTarsFn(_DecodeBatchesFn):
    """Reads and decodes each tar in one step, pipelined: the next batch is read while one decodes, within a
    tar and across the tars of a bundle (the counters of both DoFns above)."""

    def __init__(self, read_config: _ReadConfig, decode_config: _DecodeConfig):
        super().__init__(decode_config)
        self._config = read_config

    def process(self, element, window=beam.DoFn.WindowParam, timestamp=beam.DoFn.TimestampParam) -> Iterator:
        for event in _open_and_read(element, self._config, self._counters):
            if isinstance(event, EncodedBatch):
                yield from self._add(event, window, timestamp)
            else:
                yield event


def is_local_runner(runner_name: str) -> bool:
    """Whether a runner (by class name or fully qualified name, any case) runs in this process tree and keeps
    shuffles in memory."""
    return runner_name.rsplit(".", 1)[-1].lower() in _LOCAL_RUNNERS


def _is_local_runner(pipeline: beam.Pipeline) -> bool:
    runner = getattr(pipeline, "runner", None)
    return runner is None or is_local_runner(type(runner).__name__)


class ReadAllImagesFromTars(beam.PTransform):
    """Decodes the JPEGs of each tar in a ``PCollection`` of tar paths (``str`` or ``FileMetadata``).

    Outputs a ``PCollection[ImageBatch]``; ``.with_failures()`` makes it output ``(batches, failures)``, the
    second a ``PCollection[ImageFailure]``. See ``ReadImagesFromTars`` for the parameters.
    """

    def __init__(
        self,
        batch_size: int = 100,
        num_threads: Optional[int] = None,
        device: str = "auto",
        device_id: int = 0,
        extensions: Union[str, Sequence[str]] = DEFAULT_EXTENSIONS,
        include_metadata: bool = False,
        redistribute: str = "auto",
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
        fallback: bool = True,
        hw_decoder_load: float = 0.9,
        accelerator: Optional[str] = None,
        max_run_bytes: int = DEFAULT_MAX_RUN_BYTES,
        max_scans: int = DEFAULT_MAX_SCANS,
        isolation: str = "process",
        run_timeout_s: float = DEFAULT_RUN_TIMEOUT_S,
        max_expansion: int = DEFAULT_MAX_EXPANSION,
        max_decompressed_bytes: Optional[int] = None,
        resize: Optional[Resize] = None,
    ):
        super().__init__()
        check_int("batch_size", batch_size, 1)
        if resize is not None and not isinstance(resize, Resize):
            raise ValueError(f"resize must be a beam_tarimg.Resize or None, got {resize!r}")
        if num_threads is not None:
            check_int("num_threads", num_threads, 1)
        if device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
        check_int("device_id", device_id, 0)
        if redistribute not in REDISTRIBUTE:
            raise ValueError(f"redistribute must be one of {REDISTRIBUTE}, got {redistribute!r}")
        check_int("max_pixels", max_pixels, 1)
        check_int("max_member_bytes", max_member_bytes, 1)
        if not isinstance(hw_decoder_load, (int, float)) or not 0.0 <= hw_decoder_load <= 1.0:
            raise ValueError(f"hw_decoder_load must be a number in [0, 1], got {hw_decoder_load!r}")
        check_int("max_run_bytes", max_run_bytes, 1)
        check_int("max_scans", max_scans, 1)
        if isolation not in ISOLATION:
            raise ValueError(f"isolation must be one of {ISOLATION}, got {isolation!r}")
        if isinstance(run_timeout_s, bool) or not isinstance(run_timeout_s, (int, float)) or not run_timeout_s > 0:
            raise ValueError(f"run_timeout_s must be a number > 0, got {run_timeout_s!r}")
        check_int("max_expansion", max_expansion, 1)
        if max_decompressed_bytes is not None:
            check_int("max_decompressed_bytes", max_decompressed_bytes, 1)
        self._read_config = _ReadConfig(
            batch_size=batch_size,
            extensions=normalize_extensions(extensions),
            include_metadata=bool(include_metadata),
            max_pixels=max_pixels,
            max_member_bytes=max_member_bytes,
            max_scans=max_scans,
            max_expansion=max_expansion,
            max_decompressed_bytes=max_decompressed_bytes,
        )
        self._decode_config = _DecodeConfig(
            batch_size=batch_size,
            num_threads=num_threads,
            device=device,
            device_id=device_id,
            fallback=bool(fallback),
            max_pixels=max_pixels,
            hw_decoder_load=float(hw_decoder_load),
            max_run_bytes=max_run_bytes,
            isolation=isolation,
            run_timeout_s=float(run_timeout_s),
            max_scans=max_scans,
            resize=resize,
        )
        self._redistribute = redistribute
        self._accelerator = accelerator
        self._with_failures = False

    def with_failures(self) -> "ReadAllImagesFromTars":
        """The same transform, giving ``(batches, failures)`` when applied."""
        result = copy.copy(self)
        result._with_failures = True
        return result

    def redistribute_mode(self, pipeline: beam.Pipeline) -> str:
        """What ``redistribute="auto"`` means on this pipeline's runner: nothing that grows with the data is
        shuffled on local runners; encoded batches are spread before the decode elsewhere."""
        if self._redistribute != "auto":
            return self._redistribute
        return "none" if _is_local_runner(pipeline) else "encoded"

    def _decode_hints(self, pipeline: beam.Pipeline) -> dict:
        # A resource hint gives the decode step an environment of its own, so runners stop fusing it with
        # the steps around it and decoded pixels cross processes (on the FnApiRunner: are held in memory).
        # So hints are set only where a user asked for a GPU on that step, and never on local runners, which
        # ignore them; num_threads then travels as the step's cpu_count.
        if _is_local_runner(pipeline) or not self._accelerator:
            return {}
        hints = {"accelerator": self._accelerator}
        if self._decode_config.num_threads:
            hints["cpu_count"] = str(self._decode_config.num_threads)  # Beam 2.77's CpuCountHint parses str only
        return hints

    def expand(self, tars):
        mode = self.redistribute_mode(tars.pipeline)
        hints = self._decode_hints(tars.pipeline)
        if mode == "encoded":
            read = tars | "ReadTars" >> beam.ParDo(_ReadTarsFn(self._read_config)).with_output_types(
                EncodedBatch
            ).with_outputs(FAILURES, main="batches")
            spread = read.batches | "SpreadEncodedBatches" >> beam.Reshuffle()
            decode = beam.ParDo(_DecodeBatchesFn(self._decode_config)).with_output_types(ImageBatch)
            if hints:
                decode = decode.with_resource_hints(**hints)
            decoded = spread | "DecodeBatches" >> decode.with_outputs(FAILURES, main="batches")
            batches = decoded.batches
            failures = (read[FAILURES], decoded[FAILURES]) | "MergeFailures" >> beam.Flatten()
        else:
            fused = beam.ParDo(_ReadAndDecodeTarsFn(self._read_config, self._decode_config)).with_output_types(
                ImageBatch
            )
            if hints:
                fused = fused.with_resource_hints(**hints)
            decoded = tars | "ReadAndDecodeTars" >> fused.with_outputs(FAILURES, main="batches")
            batches = decoded.batches
            if mode == "decoded":
                batches = batches | "SpreadDecodedBatches" >> beam.Reshuffle()
            failures = decoded[FAILURES]
        return (batches, failures) if self._with_failures else batches


class ReadImagesFromTars(beam.PTransform):
    """Matches webdataset-style ``.tar`` shards and decodes their JPEGs with NVIDIA DALI.

    Applied to a pipeline it gives a ``PCollection[ImageBatch]``; ``.with_failures()`` gives
    ``(batches, failures)``, the second a ``PCollection[ImageFailure]``.

    Args:
      file_pattern: a glob (``"gs://bucket/data/*.tar"``) or a directory (all ``*.tar`` in it), on any
        filesystem Beam knows; matched by ``match_tars`` (``*`` and ``?`` match any character but ``/``).
      batch_size: images per ``ImageBatch`` (and per DALI run); the last batch of a tar may be smaller, and
        so is a batch that lost images to failures or was cut short by ``max_run_bytes``.
      num_threads: DALI CPU threads per worker process; default: the cores the worker may use.
      device: ``"auto"`` (GPU when DALI's worker sees a CUDA device, else CPU), ``"gpu"`` or ``"cpu"``.
      device_id: the CUDA device for GPU decoding.
      extensions: which members are JPEGs, case-insensitively (default ``("jpg", "jpeg")``).
      include_metadata: attach each sample's ``.json`` sidecar (parsed) and ``.txt`` sidecar (as
        ``metadata["caption"]``) when they sit next to the image in the tar with the same key.
      redistribute: ``"auto"`` (``"none"`` on local runners, ``"encoded"`` elsewhere), ``"encoded"``
        (Reshuffle the encoded batches, then decode), ``"decoded"`` (read and decode each tar in one step,
        then Reshuffle the decoded batches) or ``"none"``.
      max_pixels: images whose header claims more pixels are failures, never decoded (Pillow's
        decompression-bomb threshold by default).
      max_member_bytes: members larger than this are failures, never read.
      max_scans: a JPEG with more scans than this (a progressive JPEG's decode time grows with them) is a
        ``limit`` failure, never decoded; so is one whose header claims more pixels than its bytes can code.
      fallback: decode images that DALI rejects with Pillow instead of failing them.
      hw_decoder_load: share of GPU decoding given to the hardware JPEG decoder.
      max_run_bytes: the most decoded bytes one decode run may hold, from the sizes the JPEG headers claim
        (default 512 MiB); a run stops short of ``batch_size`` to stay under it and its images are emitted as
        a smaller ``ImageBatch``; a single larger image is decoded alone.
      isolation: ``"process"`` (default) decodes in a supervised decoder process per worker process, so that
        a native crash of DALI costs only the image that caused it (a ``decode`` failure naming the signal,
        counted in ``decoder_crashes``); ``"none"`` decodes in the worker process itself.
      run_timeout_s: a decode run taking longer kills the decoder process; handled like a crash.
      max_expansion: a compressed tar may decompress to 64 MiB plus at most this many times the compressed bytes
        read so far; past that it ends with one ``read`` failure (a decompression bomb).
      max_decompressed_bytes: if given, the most bytes any one compressed tar may decompress to.
      resize: a ``beam_tarimg.Resize`` (resize, crop or letterbox, normalize, layout) applied to every image on
        the decode device, DALI's or the Pillow fallback's (``beam_tarimg.resize``); ``image_data`` is then the
        transformed image, and a batch of fixed-shape outputs is one array without a copy
        (``ImageBatch.pixels``). None (default): the decoded images, unchanged.
      accelerator: a Beam ``accelerator`` resource hint for the decode step (e.g.
        ``"type:nvidia-l4;count:1;install-nvidia-driver"``), with ``num_threads`` as its ``cpu_count`` hint;
        applied on non-local runners only. The hinted step runs in its own environment, unfused.
      validate: check at construction that ``file_pattern`` matches at least one file.
    """

    def __init__(self, file_pattern: str, *, validate: bool = True, **kwargs):
        super().__init__()
        if not isinstance(file_pattern, str) or not file_pattern:
            raise ValueError(f"file_pattern must be a non-empty string, got {file_pattern!r}")
        self._pattern = tar_pattern(file_pattern)
        self._read_all = ReadAllImagesFromTars(**kwargs)
        if validate:
            match_tars(self._pattern)

    @property
    def file_pattern(self) -> str:
        return self._pattern

    def with_failures(self) -> "ReadImagesFromTars":
        """The same transform, giving ``(batches, failures)`` when applied."""
        result = copy.copy(self)
        result._read_all = self._read_all.with_failures()
        return result

    def expand(self, pbegin):
        tars = pbegin | "MatchTars" >> MatchTars(self._pattern) | "SpreadTars" >> beam.Reshuffle()
        return tars | "ReadAll" >> self._read_all


def tar_pattern(path: str) -> str:
    """A directory (local, or any path ending in '/') becomes ``<dir>/*.tar``, its name escaped (``escape_glob``)
    so that it is never read as a glob; a glob is kept."""
    if path.endswith("/"):
        return escape_glob(path) + "*.tar"
    if "://" not in path and os.path.isdir(path):
        return os.path.join(escape_glob(path), "*.tar")
    return path


def escape_glob(path: str) -> str:
    """``path`` as a pattern that matches only itself: ``[``, ``*``, ``?`` become ``[[]``, ``[*]``, ``[?]``."""
    return re.sub(r"([\[*?])", r"[\1]", path)


_GLOB_CHAR = re.compile(r"[\[*?]")


def glob_regex(pattern: str) -> str:
    """Beam's glob syntax (``FileSystem.translate_pattern``) as a regular expression over whole paths, except
    that ``*``, ``?`` and ``[...]`` match any character but ``/`` (Beam's ``*`` also skips ``\\``, so that
    ``*.tar`` never matched ``back\\slash.tar``); ``**`` matches anything, ``/`` included."""
    out, i, n = [], 0, len(pattern)
    while i < n:
        c = pattern[i]
        i += 1
        if c == "*":
            if pattern[i : i + 1] == "*":
                out.append(".*")
                i += 1
            else:
                out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            j = i + (pattern[i : i + 1] == "!")
            j += pattern[j : j + 1] == "]"
            j = pattern.find("]", j)
            if j < 0:
                out.append(re.escape(c))
                continue
            body = pattern[i:j].replace("\\", "\\\\").replace("[", "\\[")
            i = j + 1
            if body.startswith("!"):
                body = "^" + body[1:]
            elif body.startswith("^"):
                body = "\\" + body
            out.append(f"(?!/)[{body}]")
        else:
            out.append(re.escape(c))
    return "(?s)" + "".join(out) + r"\Z"


def _local_entries(root: str, max_depth: Optional[int]) -> Iterator[tuple]:
    """(path, DirEntry) of every entry under ``root`` ("" for the working directory), whatever its type, down to
    ``max_depth`` folders deep (None: all); symbolic links to folders are not followed."""
    stack = [(root, 0)]
    while stack:
        folder, depth = stack.pop()
        try:
            entries = list(os.scandir(folder or "."))
        except (FileNotFoundError, NotADirectoryError):
            continue  # nothing there: no entries, as with Beam's listing
        except OSError:
            if folder == root:
                raise  # the folder the pattern names cannot be listed (permissions): say so
            continue  # a subfolder that cannot be listed: Beam's own listing skips it too
        for entry in entries:
            path = os.path.join(folder, entry.name) if folder else entry.name
            yield path, entry
            if (max_depth is None or depth < max_depth) and entry.is_dir(follow_symlinks=False):
                stack.append((path, depth + 1))


def _metadata(path: str, entry=None) -> FileMetadata:
    try:
        st = entry.stat() if entry is not None else os.stat(path)  # never blocks, not even on a FIFO
    except OSError:  # a dangling link
        st = entry.stat(follow_symlinks=False) if entry is not None else os.lstat(path)
    return FileMetadata(path, st.st_size if stat.S_ISREG(st.st_mode) else 0, st.st_mtime)


def list_tars(pattern: str) -> List[FileMetadata]:
    """Every entry ``pattern`` names (``glob_regex``), sorted by path; possibly none.

    Local: the folder before the first glob character is listed (as deep as the pattern needs) and every entry
    whose path matches is returned whatever its type (folders, FIFOs, sockets, devices and dangling links too:
    ``open_tar`` makes each an ``open`` failure naming it, rather than the job skipping it without a word); a
    pattern with no glob character, or one that matches nothing but names an existing entry, is that entry.
    Object stores: the keys under the prefix before the first glob character (Beam's listing), filtered the same
    way; folders there are only prefixes, never entries.
    """
    prefix = _GLOB_CHAR.split(pattern, 1)[0]
    regex = re.compile(glob_regex(pattern))
    if FileSystems.get_scheme(pattern) is not None:
        listed = FileSystems.match([prefix + "**"])[0].metadata_list
        return sorted((m for m in listed if regex.match(m.path)), key=lambda m: m.path)
    if prefix != pattern:
        root = posixpath.dirname(prefix)
        rest = pattern[len(root):].lstrip("/")
        depth = None if "**" in rest else rest.count("/")
        found = [_metadata(path, entry) for path, entry in _local_entries(root, depth) if regex.match(path)]
        if found:
            return sorted(found, key=lambda m: m.path)
    return [_metadata(pattern)] if os.path.lexists(pattern) else []


def match_tars(pattern: str) -> List[FileMetadata]:
    """``list_tars``; raises ValueError naming the pattern when it names nothing or cannot be listed."""
    try:
        matched = list_tars(pattern)
    except Exception as e:
        raise ValueError(f"cannot match tar files for {pattern!r}: {e}") from e
    if not matched:
        raise ValueError(f"no files match {pattern!r}")
    return matched


class MatchTars(beam.PTransform):
    """``pattern`` -> a ``PCollection[FileMetadata]`` of every entry it names, listed when the pipeline runs
    (``match_tars``: fails there when nothing matches). Unlike ``fileio.MatchFiles`` it keeps names with a
    backslash, and folders, FIFOs and dangling links, which ``ReadAllImagesFromTars`` turns into ``open``
    failures naming them."""

    def __init__(self, pattern: str):
        super().__init__()
        self._pattern = pattern

    def expand(self, pbegin):
        return pbegin | "Pattern" >> beam.Create([self._pattern]) | "List" >> beam.FlatMap(match_tars)


def match_files(pattern: str, what: str = "files") -> list:
    """The files matching ``pattern``; raises ValueError naming the pattern when there are none."""
    try:
        matched = FileSystems.match([pattern])[0].metadata_list
    except Exception as e:
        raise ValueError(f"cannot match {what} for {pattern!r}: {e}") from e
    if not matched:
        raise ValueError(f"no files match {pattern!r}")
    return matched
