"""Streaming webdataset-style tar shards into batches of encoded JPEGs.

Beam-free: ``read_tar`` takes any readable file object. Tars are read front to back in tarfile's stream
mode (``r|*``); members are read as bytes, never extracted; only JPEG members (and, when asked, their
sidecars) are read into memory at all, and at most one batch of them at a time.
"""

from __future__ import annotations

import json
import lzma
import posixpath
import tarfile
import zlib
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from beam_tarimg.jpeg import DEFAULT_MAX_PIXELS, OverLimitError, image_dimensions
from beam_tarimg.types import EncodedBatch, EncodedImage, FailureStage, ImageFailure

DEFAULT_EXTENSIONS = ("jpg", "jpeg")
DEFAULT_MAX_MEMBER_BYTES = 256 * 1024 * 1024

CountFn = Callable[[str, int], None]

# What reading a damaged tar can raise: tarfile's own errors, and those of the decompressors that Beam's
# FileSystems (CompressionTypes.AUTO) or tarfile put in front of a .gz/.bz2/.xz/.zst tar.
_READ_ERRORS: Tuple[type, ...] = (tarfile.TarError, EOFError, OSError, ValueError, zlib.error, lzma.LZMAError)
try:
    import zstandard

    _READ_ERRORS += (zstandard.ZstdError,)
except ImportError:  # zstd tars need it anyway
    pass


def _no_count(name: str, n: int) -> None:
    pass


def normalize_extensions(extensions: Union[str, Sequence[str]]) -> Tuple[str, ...]:
    """``"jpg,JPEG"`` or ``[".jpg", "jpeg"]`` -> ``("jpg", "jpeg")``. Raises ValueError on an empty list."""
    if isinstance(extensions, str):
        extensions = extensions.split(",")
    result = tuple(dict.fromkeys(e.strip().lstrip(".").lower() for e in extensions if e.strip().lstrip(".")))
    if not result:
        raise ValueError(f"extensions must name at least one file extension, got {extensions!r}")
    for ext in result:
        if "/" in ext:
            raise ValueError(f"an extension cannot contain '/': {ext!r}")
    return result


def split_member_name(name: str) -> Tuple[str, str]:
    """``"a/b/000031.JPG"`` -> ``("a/b/000031", "jpg")``: the key (the path without its last extension)
    and the lower-cased extension. A name whose file part has no dot has extension ``""``."""
    base = posixpath.basename(name)
    dot = base.rfind(".")
    if dot <= 0:
        return name, ""
    return name[: len(name) - len(base) + dot], base[dot + 1 :].lower()


class _EndRecordingTarInfo(tarfile.TarInfo):
    """Remembers why tarfile stopped iterating: a zero block (a proper end) or no data (a cut tar).

    tarfile's stream mode ends iteration silently both at the end-of-archive blocks and when the data just
    stops between two members; only the header error it swallows tells them apart.
    """

    @classmethod
    def fromtarfile(cls, tf):  # type: ignore[override]
        try:
            return super().fromtarfile(tf)
        except tarfile.HeaderError as e:
            tf._tarimg_end = e
            raise


class _CountingReader:
    """Wraps a binary file object; counts the bytes read through it."""

    def __init__(self, raw):
        self._raw = raw
        self.bytes_read = 0

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self.bytes_read += len(data)
        return data


class _Sample:
    """The adjacent members sharing one key: its JPEGs and, when asked, its sidecars."""

    __slots__ = ("key", "images", "metadata", "failures", "sidecars")

    def __init__(self, key: str):
        self.key = key
        self.images: List[Tuple[str, bytes]] = []
        self.metadata: Dict[str, Any] = {}
        self.failures: List[Tuple[str, str]] = []
        self.sidecars = 0


def tar_display_name(tar_path: str) -> str:
    """The tar's file name, the first part of every ``image_path``."""
    return posixpath.basename(tar_path.rstrip("/")) or tar_path


def read_tar(
    fileobj,
    tar_path: str,
    *,
    batch_size: int,
    extensions: Sequence[str] = DEFAULT_EXTENSIONS,
    include_metadata: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
    count: CountFn = _no_count,
) -> Iterator[Union[EncodedBatch, ImageFailure]]:
    """Yields ``EncodedBatch``es of up to ``batch_size`` JPEGs, in tar order, and ``ImageFailure``s inline.

    Counts (through ``count(name, n)``): ``members_skipped`` (not a JPEG, not a file, or a sidecar not
    asked for), ``images_over_limit``, ``bytes_read``, ``tars_without_images`` (read to the end, no JPEG
    member) and ``tars_corrupt`` (not a tar, cut off, corrupt part-way, or followed by data after its
    end-of-archive blocks: each also yields one failure).
    A tar cut off or corrupt part-way yields all whole members before that point, then one failure.
    """
    extensions = frozenset(extensions)
    reader = _CountingReader(fileobj)
    batch: List[EncodedImage] = []
    images_seen = 0
    pending: Optional[_Sample] = None
    last_member: Optional[str] = None

    def flush_sample(sample: _Sample) -> Iterator[Union[EncodedBatch, ImageFailure]]:
        nonlocal batch, images_seen
        if not sample.images:
            count("members_skipped", sample.sidecars)  # sidecars of no image: read, then dropped
        for member, error in sample.failures:
            yield ImageFailure(tar_path, member, FailureStage.METADATA, error)
        for member, data in sample.images:
            images_seen += 1
            failure = _check_limits(tar_path, member, data, max_pixels, max_member_bytes)
            if failure is not None:
                if failure.stage == FailureStage.LIMIT:
                    count("images_over_limit", 1)
                yield failure
                continue
            batch.append(EncodedImage(member, sample.key, data, dict(sample.metadata)))
            if len(batch) >= batch_size:
                yield EncodedBatch(tar_path, batch)
                batch = []

    cut = False

    def cut_failure(error: str) -> ImageFailure:
        nonlocal cut
        cut = True
        count("tars_corrupt", 1)
        where = f"after member {last_member!r}" if last_member else "before its first member"
        return ImageFailure(tar_path, None, FailureStage.READ, f"tar is cut off or corrupt {where}: {error}")

    try:
        tf = tarfile.open(fileobj=reader, mode="r|*", tarinfo=_EndRecordingTarInfo)
    except _READ_ERRORS as e:
        count("bytes_read", reader.bytes_read)
        count("tars_corrupt", 1)
        yield ImageFailure(tar_path, None, FailureStage.READ, f"not a readable tar: {type(e).__name__}: {e}")
        return

    try:
        members = iter(tf)
        clean_end = False
        while True:
            try:
                info = next(members)
            except StopIteration:
                clean_end = True
                break
            except _READ_ERRORS as e:
                if pending is not None:
                    yield from flush_sample(pending)
                    pending = None
                yield cut_failure(f"{type(e).__name__}: {e}")
                break
            name = info.name
            key, ext = split_member_name(name)
            is_image = ext in extensions
            is_sidecar = include_metadata and ext in ("json", "txt")
            if not info.isfile() or not (is_image or is_sidecar):
                count("members_skipped", 1)
                continue
            if include_metadata and (pending is None or pending.key != key):
                if pending is not None:
                    yield from flush_sample(pending)
                pending = _Sample(key)
            if info.size > max_member_bytes:
                # Never read into memory; for a sidecar, the image keeps its other metadata.
                if is_image:
                    count("images_over_limit", 1)
                    images_seen += 1
                    yield ImageFailure(
                        tar_path, name, FailureStage.LIMIT,
                        f"member is {info.size} bytes, over max_member_bytes={max_member_bytes}",
                    )
                else:
                    count("members_skipped", 1)
                continue
            try:
                data = tf.extractfile(info).read()
            except _READ_ERRORS as e:
                if pending is not None:
                    yield from flush_sample(pending)
                    pending = None
                yield cut_failure(f"reading member {name!r}: {type(e).__name__}: {e}")
                break
            last_member = name
            if is_image:
                if include_metadata:
                    pending.images.append((name, data))
                else:
                    sample = _Sample(key)
                    sample.images.append((name, data))
                    yield from flush_sample(sample)
            else:
                pending.sidecars += 1
                _parse_sidecar(pending, name, ext, data)
        if pending is not None:
            yield from flush_sample(pending)
            pending = None
        end = getattr(tf, "_tarimg_end", None)
        if clean_end and end is not None and not isinstance(end, tarfile.EOFHeaderError):
            yield cut_failure(f"no end-of-archive blocks ({type(end).__name__}: {end})")
        elif clean_end:
            trailing = _trailing_data(tf.fileobj)
            if trailing:
                yield cut_failure(trailing)
    finally:
        count("bytes_read", reader.bytes_read)
    if batch:
        yield EncodedBatch(tar_path, batch)
    if images_seen == 0 and not cut:
        count("tars_without_images", 1)


def _trailing_data(stream) -> Optional[str]:
    """After the end-of-archive block: None when only zero padding follows, else what is wrong.

    tarfile stops at the first zero block, so the members of a second tar appended to the first (``cat a.tar
    b.tar``) would otherwise vanish without a trace.
    """
    extra = 0
    try:
        while True:
            chunk = stream.read(1 << 20)
            if not chunk:
                return None
            zeros = len(chunk) - len(chunk.lstrip(b"\0"))
            if zeros != len(chunk):
                return (f"data after the end-of-archive blocks, {extra + zeros} bytes after them (a second tar "
                        f"appended?); nothing past them was read")
            extra += len(chunk)
    except _READ_ERRORS as e:
        return f"after the end-of-archive blocks: {type(e).__name__}: {e}"


def _check_limits(tar_path, member, data, max_pixels, max_member_bytes) -> Optional[ImageFailure]:
    if not data:
        return ImageFailure(tar_path, member, FailureStage.DECODE, "empty member (0 bytes)")
    try:
        dims = image_dimensions(data)
    except OverLimitError as e:
        return ImageFailure(tar_path, member, FailureStage.LIMIT, str(e))
    if dims is not None and dims[0] * dims[1] > max_pixels:
        return ImageFailure(
            tar_path, member, FailureStage.LIMIT,
            f"header claims {dims[0]}x{dims[1]} = {dims[0] * dims[1]} pixels, over max_pixels={max_pixels}",
        )
    return None


def _parse_sidecar(sample: _Sample, name: str, ext: str, data: bytes) -> None:
    if ext == "txt":
        sample.metadata["caption"] = data.decode("utf-8", errors="replace").strip()
        return
    try:
        value = json.loads(data)
    except ValueError as e:
        sample.failures.append((name, f"sidecar is not valid JSON: {e}"))
        return
    if isinstance(value, dict):
        caption = sample.metadata.get("caption")
        sample.metadata.update(value)
        if caption is not None:
            sample.metadata["caption"] = caption
    else:
        sample.metadata["json"] = value
