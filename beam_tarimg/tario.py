"""Streaming webdataset-style tar shards into batches of encoded JPEGs.

Beam-free: ``read_tar`` takes any readable file object. Tars are read front to back in tarfile's stream
mode (``r|*``); members are read as bytes, never extracted; only JPEG members (and, when asked, their
sidecars) are read into memory at all, and at most one batch of them at a time.

Hostile headers cost only their tar. Left alone, tarfile's stream mode loops for ever skipping the data of a
member whose size runs past the end of the data, reads a PAX or GNU long-name header of any claimed size into
memory, parses PAX records in quadratic time, recurses once per chained extension header and keeps every
member's header for the life of the tar; here each of those ends the tar with one ``read`` failure instead, or
does not happen (see ``read_tar``).

Member names are handed on in a lossless text escape (``escape_member_name``): tar names are bytes, not
always UTF-8, and the sinks write text.
"""

from __future__ import annotations

import json
import lzma
import posixpath
import re
import tarfile
import zlib
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from beam_tarimg.jpeg import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_SCANS,
    OverLimitError,
    image_dimensions,
    over_limits,
    parse_jpeg,
)
from beam_tarimg.types import EncodedBatch, EncodedImage, FailureStage, ImageFailure

DEFAULT_EXTENSIONS = ("jpg", "jpeg")
DEFAULT_MAX_MEMBER_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_BATCH_BYTES = 64 * 1024 * 1024  # encoded bytes in one EncodedBatch (ImageNet-sized: ~2,000 images)

# Header limits; real tars stay far below them. A PAX extended header holds a few names and attributes (GNU
# tar and Python write a few hundred bytes), a GNU long name one path, a PAX global header a comment or two
# (``git archive``: 52 bytes). tarfile copies the global headers into every later member, hence their own cap.
MAX_HEADER_BYTES = 1 << 20  # one PAX extended header, or one GNU long name / long link
MAX_GLOBAL_HEADER_BYTES = 64 << 10  # all PAX global headers of one tar together
MAX_CHAINED_HEADERS = 8  # PAX / GNU long-name headers in a row before one member (tarfile recurses per header)
# Reads tarfile may make after the data has ended before the tar is cut short: a proper or cut end of a plain,
# gz, bz2, xz or zstd tar takes at most 2 (the trailing-data check, which stops by itself, runs unguarded).
_READS_PAST_END = 8

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


_ESCAPE_SEQUENCE = re.compile(r"\\(?:\\|x([0-9a-f]{2}))?")


def escape_member_name(name: str) -> str:
    """A tar member name as tarfile gives it (UTF-8, undecodable bytes as surrogate escapes) as plain text.

    The rule: the name's raw bytes, decoded as UTF-8; each byte that is not part of valid UTF-8 becomes
    ``\\xNN`` (two lower-case hex digits, as Python's ``backslashreplace`` writes it), and each literal
    backslash becomes ``\\\\``. A name that is valid UTF-8 and has no backslash comes out unchanged; every
    other character (control characters, ``..``, a leading ``/``) passes through as is: names are never
    resolved as paths. ``member_name_bytes`` is the inverse: ``member_name_bytes(escape_member_name(n))`` is
    ``n``'s raw bytes for every name ``n``.

    Examples: the latin-1 name ``b"caf\\xe9.jpg"`` (tarfile: ``"caf\\udce9.jpg"``) -> ``caf\\xe9.jpg``;
    ``a\\b.jpg`` -> ``a\\\\b.jpg``; ``café.jpg`` -> ``café.jpg``.
    Raises UnicodeEncodeError for a lone surrogate that surrogate escaping cannot have made (outside
    U+DC80-U+DCFF).
    """
    raw = name.encode("utf-8", "surrogateescape")
    if b"\\" in raw:
        raw = raw.replace(b"\\", b"\\\\")
    return raw.decode("utf-8", "backslashreplace")


def member_name_bytes(escaped: str) -> bytes:
    """The raw bytes of a member name escaped by ``escape_member_name`` (as in ``image_path``, ``image_id``
    and a failure record's ``member``): ``caf\\xe9.jpg`` -> ``b"caf\\xe9.jpg"``, ``a\\\\b`` -> ``b"a\\\\b"``.

    Raises ValueError for text that no name escapes to: a backslash not followed by ``\\`` or ``xNN``.
    """
    out = bytearray()
    pos = 0
    for match in _ESCAPE_SEQUENCE.finditer(escaped):
        out += escaped[pos : match.start()].encode("utf-8")
        if match.group(1) is not None:
            out.append(int(match.group(1), 16))
        elif match.group(0) == "\\\\":
            out += b"\\"
        else:
            raise ValueError(
                "not an escaped member name: a backslash must be followed by a backslash or by x and two "
                f"lower-case hex digits, at position {match.start()} of {escaped!r}"
            )
        pos = match.end()
    out += escaped[pos:].encode("utf-8")
    return bytes(out)


def split_member_name(name: str) -> Tuple[str, str]:
    """``"a/b/000031.JPG"`` -> ``("a/b/000031", "jpg")``: the key (the path without its last extension)
    and the lower-cased extension. A name whose file part has no dot has extension ``""``."""
    base = posixpath.basename(name)
    dot = base.rfind(".")
    if dot <= 0:
        return name, ""
    return name[: len(name) - len(base) + dot], base[dot + 1 :].lower()


class _BadHeader(tarfile.ReadError):
    """A header that tarfile would mishandle (loop, over-allocate, misparse): ends the tar, never skipped."""


class _DataEnded(tarfile.ReadError):
    """tarfile asked for more data many times after the data had ended."""


# One PAX record: "<length> <keyword>=<value>\n", the length counting the whole record. Parsed here rather than
# by tarfile, whose regular expression takes quadratic time on crafted records (CVE-2024-6232, fixed only in
# later patch releases) and which ignores framing errors.
_PAX_LENGTH = re.compile(rb"([0-9]{1,20}) ")
_DECIMAL = re.compile(r"[0-9]{1,20}")
_PLAIN_FILE_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)


def _pax_records(buf: bytes, what: str) -> List[Tuple[bytes, bytes]]:
    """``[(keyword, value), ...]`` of a PAX header's data, in linear time; raises _BadHeader when malformed."""
    records = []
    pos = 0
    while pos < len(buf) and buf[pos] != 0:  # NUL padding ends the records, as in tarfile
        match = _PAX_LENGTH.match(buf, pos)
        if match is None:
            raise _BadHeader(f"malformed {what}: no record length at byte {pos}")
        length = int(match.group(1))
        end = pos + length
        if length < 5 or end > len(buf) or buf[end - 1] != 0x0A:
            raise _BadHeader(f"malformed {what}: the record at byte {pos} claims {length} bytes")
        keyword, equals, value = buf[match.end() : end - 1].partition(b"=")
        if not keyword or not equals:
            raise _BadHeader(f"malformed {what}: the record at byte {pos} has no keyword=value")
        records.append((keyword, value))
        pos = end
    return records


def _decode_field(value: bytes, encoding: str, fallback: str, errors: str) -> str:
    try:
        return value.decode(encoding, "strict")
    except UnicodeDecodeError:
        return value.decode(fallback, errors)


class _GuardedTarInfo(tarfile.TarInfo):
    """tarfile's header parsing, bounded; also remembers why tarfile stopped iterating.

    tarfile's stream mode ends iteration silently both at the end-of-archive blocks and when the data just
    stops between two members; only the header error it swallows (kept in ``tf._tarimg_end``) tells them apart.

    ``_proc_member`` (tarfile's hook for subclasses) replaces what tarfile does with a hostile header:
    PAX headers and GNU long names over ``MAX_HEADER_BYTES`` (tarfile reads any claimed size into memory),
    PAX global headers over ``MAX_GLOBAL_HEADER_BYTES`` in all or setting ``size`` or sparse fields for every
    member (of their other keys only tarfile's own fields are kept: tarfile copies them into every member),
    more than ``MAX_CHAINED_HEADERS`` extension headers in a row (tarfile recurses once per header),
    malformed PAX records or a non-decimal PAX ``size`` (tarfile takes it as 0 and reads the member's data as
    the next header), negative sizes: each raises ``_BadHeader``. Sparse members (old GNU, and GNU 0.0, 0.1,
    1.0 in PAX) are marked ``_tarimg_sparse`` and their data skipped; their maps are never parsed.
    """

    @classmethod
    def fromtarfile(cls, tf):  # type: ignore[override]
        depth = getattr(tf, "_tarimg_depth", 0)
        if depth > MAX_CHAINED_HEADERS:
            raise _BadHeader(f"more than {MAX_CHAINED_HEADERS} PAX or GNU long-name headers in a row")
        tf._tarimg_depth = depth + 1
        try:
            return super().fromtarfile(tf)
        except tarfile.HeaderError as e:
            tf._tarimg_end = e
            raise
        finally:
            tf._tarimg_depth = depth

    def _proc_member(self, tf):
        if self.type in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK):
            what = "name" if self.type == tarfile.GNUTYPE_LONGNAME else "link target"
            if not 0 <= self.size <= MAX_HEADER_BYTES:
                raise _BadHeader(f"a GNU long {what} header claims {self.size} bytes, over the "
                                 f"{MAX_HEADER_BYTES}-byte limit for one header")
            member = self._proc_gnulong(tf)
        elif self.type == tarfile.GNUTYPE_SPARSE:
            member = self._proc_old_gnu_sparse(tf)
        elif self.type in (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE):
            member = self._proc_pax_bounded(tf)
        else:
            member = self._proc_builtin(tf)
        if member.size < 0:
            raise _BadHeader(f"member {escape_member_name(member.name)!r} has a negative size ({member.size})")
        return member

    def _proc_old_gnu_sparse(self, tf):
        # Skips the extension blocks of the sparse map (each one real block of data, so this loop ends with the
        # data) and the stored data; the map is never used.
        _, isextended, _ = getattr(self, "_sparse_structs", (None, False, None))
        self.__dict__.pop("_sparse_structs", None)
        while isextended:
            buf = tf.fileobj.read(tarfile.BLOCKSIZE)
            if len(buf) < tarfile.BLOCKSIZE:
                raise tarfile.ReadError("the data ends inside a GNU sparse header")
            isextended = bool(buf[504])
        self.offset_data = tf.fileobj.tell()
        tf.offset = self.offset_data + self._block(self.size)
        self._tarimg_sparse = "old GNU format"
        return self

    def _proc_pax_bounded(self, tf):
        is_global = self.type == tarfile.XGLTYPE
        what = "PAX global header" if is_global else "PAX extended header"
        if not 0 <= self.size <= MAX_HEADER_BYTES:
            raise _BadHeader(f"a {what} claims {self.size} bytes, over the {MAX_HEADER_BYTES}-byte limit "
                             "for one header")
        if is_global:
            tf._tarimg_global_bytes = getattr(tf, "_tarimg_global_bytes", 0) + self.size
            if tf._tarimg_global_bytes > MAX_GLOBAL_HEADER_BYTES:
                raise _BadHeader(f"PAX global headers of {tf._tarimg_global_bytes} bytes in all, over the "
                                 f"{MAX_GLOBAL_HEADER_BYTES}-byte limit")
        buf = tf.fileobj.read(self._block(self.size))
        if len(buf) < self.size:
            raise tarfile.ReadError(f"the data ends inside a {what}")
        records = _pax_records(buf[: self.size], what)
        binary = any(k == b"hdrcharset" and v == b"BINARY" for k, v in records)
        name_encoding = tf.encoding if binary else "utf-8"
        pax_headers = tf.pax_headers if is_global else tf.pax_headers.copy()
        for keyword, value in records:
            key = _decode_field(keyword, "utf-8", "utf-8", tf.errors)
            if is_global and key not in tarfile.PAX_FIELDS and not key.startswith("GNU.sparse."):
                continue  # tarfile copies global keys into every member: only the fields it applies are kept
            if key in tarfile.PAX_NAME_FIELDS:
                pax_headers[key] = _decode_field(value, name_encoding, tf.encoding, tf.errors)
            else:
                pax_headers[key] = _decode_field(value, "utf-8", "utf-8", tf.errors)
        if is_global:
            for key in pax_headers:
                if key == "size" or key.startswith("GNU.sparse."):
                    raise _BadHeader(f"a PAX global header sets {key!r} for every later member")
        elif "size" in pax_headers and not _DECIMAL.fullmatch(pax_headers["size"]):
            raise _BadHeader(f"a PAX extended header gives the size {pax_headers['size'][:40]!r}, "
                             "not a decimal number")
        try:
            member = self.fromtarfile(tf)
        except tarfile.HeaderError as e:
            raise tarfile.SubsequentHeaderError(str(e)) from None
        if is_global:
            return member  # tarfile applies the global headers to each member it builds
        try:
            member._apply_pax_info(pax_headers, tf.encoding, tf.errors)
        except ValueError as e:  # GNU.sparse.size / realsize are converted without a check
            raise _BadHeader(f"malformed {what}: {e}") from None
        member.offset = self.offset
        if "size" in pax_headers:  # the next header follows the data of the size given here
            offset = member.offset_data
            if member.isreg() or member.type not in tarfile.SUPPORTED_TYPES:
                offset += member._block(member.size)
            tf.offset = offset
        if any(key.startswith("GNU.sparse.") for key in pax_headers):
            member._tarimg_sparse = "GNU format in PAX headers"
        return member


class _CountingReader:
    """Wraps a binary file object; counts the bytes read through it, and stops tarfile reading on past its end.

    tarfile's stream mode skips the data of a member it does not read in 10 KiB reads (``_Stream.seek``),
    never checking that data still comes: a header claiming 2**62 bytes makes it read b"" about 4.5e14 times.
    Reads that return b"" (the end of the data) are counted; past ``_READS_PAST_END`` of them the next raises
    ``_DataEnded``. ``guard = False`` turns that off.
    """

    def __init__(self, raw):
        self._raw = raw
        self.bytes_read = 0
        self.reads_past_end = 0
        self.guard = True

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        if data:
            self.bytes_read += len(data)
        elif size:
            self.reads_past_end += 1
            if self.guard and self.reads_past_end > _READS_PAST_END:
                raise _DataEnded(f"the data ended after {self.bytes_read} bytes, and tarfile still reads on")
        return data


class _Sample:
    """The adjacent members sharing one key: its JPEGs and, when asked, its sidecars."""

    __slots__ = ("key", "images", "nbytes", "metadata", "failures", "sidecars")

    def __init__(self, key: str):
        self.key = key
        self.images: List[Tuple[str, bytes]] = []
        self.nbytes = 0  # of the images
        self.metadata: Dict[str, Any] = {}
        self.failures: List[Tuple[str, str]] = []
        self.sidecars = 0


def tar_display_name(tar_path: str) -> str:
    """The tar's file name, the first part of every ``image_path``, from a record's ``tar_path`` (which
    ``read_tar`` has already escaped: escaping commutes with taking the base name)."""
    return posixpath.basename(tar_path.rstrip("/")) or tar_path


def _not_a_file(info: tarfile.TarInfo, jpegs_read: set) -> Optional[str]:
    """Why a member's bytes are not an image to read (a link, a directory, ...), or None for a plain file."""
    sparse = getattr(info, "_tarimg_sparse", None)
    if sparse:
        return f"member is a sparse file ({sparse}); sparse members are never expanded"
    if info.type in _PLAIN_FILE_TYPES:
        return None
    target = escape_member_name(info.linkname)
    if info.issym():
        return f"member is a symbolic link to {target!r}; links are not followed"
    if info.islnk():
        if posixpath.normpath(target) in jpegs_read:
            return (f"member is a hard link to {target!r}, which was read earlier in this tar under its own name; "
                    "a streamed tar cannot go back to read it again")
        return f"member is a hard link to {target!r}, which is not an earlier JPEG member of this tar"
    for test, what in ((info.isdir, "a directory"), (info.ischr, "a character device"),
                       (info.isblk, "a block device"), (info.isfifo, "a FIFO")):
        if test():
            return f"member is {what}, not a file"
    return f"member has type {info.type!r}, not a regular file"


def read_tar(
    fileobj,
    tar_path: str,
    *,
    batch_size: int,
    extensions: Sequence[str] = DEFAULT_EXTENSIONS,
    include_metadata: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
    max_scans: int = DEFAULT_MAX_SCANS,
    max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
    count: CountFn = _no_count,
) -> Iterator[Union[EncodedBatch, ImageFailure]]:
    """Yields ``EncodedBatch``es of up to ``batch_size`` JPEGs, in tar order, and ``ImageFailure``s inline.

    A batch ends early once it holds ``max_batch_bytes`` of encoded bytes (big photos: 100 JPEGs of 24 MP
    are ~440 MB before decoding), so that what a batch holds stays bounded whatever the images' size.

    Counts (through ``count(name, n)``): ``members_skipped`` (not a JPEG, or a sidecar not asked for or not a
    file), ``members_not_files`` (JPEG-named members that are not regular files: each also yields a failure),
    ``images_over_limit``, ``bytes_read``, ``tars_without_images`` (read to the end, no JPEG member) and
    ``tars_corrupt`` (not a tar, cut off, corrupt or hostile part-way, or followed by data after its
    end-of-archive blocks: each also yields one failure).

    Every JPEG member (its extension in ``extensions``, case-insensitively) ends up as an image or as a
    failure. A JPEG-named member that is not a regular file is a ``read`` failure naming it, and the tar goes
    on: a symbolic link (never followed), a hard link (its target's bytes went by earlier in the stream and
    are not kept, so the link is not decoded again under its own name: the failure says whether the target
    was read as an image of this tar; only the names of this tar's JPEG members are kept for that), a
    directory, device, FIFO or unknown type, or a sparse file (never expanded).

    A tar cut off, corrupt or hostile part-way yields all whole members before that point, then one ``read``
    failure, at once: a member or header whose size runs past the end of the data (tarfile alone would skip
    forward for ever), a header over its limit (``MAX_HEADER_BYTES``, ``MAX_GLOBAL_HEADER_BYTES``,
    ``MAX_CHAINED_HEADERS``), a malformed PAX record, a negative or non-numeric size, a bad checksum. Time per
    member is linear in the bytes the stream gives for its headers and data, plus at most 8 reads past the
    end of the data (so a whole tar is linear in its bytes; for compressed tars, in its decompressed bytes,
    which a gzip bomb can make ~1000x the file). Memory: one member read (up to ``max_member_bytes``, JPEGs
    and sidecars only), at most ``MAX_CHAINED_HEADERS`` headers of at most 1 MiB each, 64 KiB of global
    headers, and the names of the tar's JPEG members.

    Member names are escaped with ``escape_member_name`` wherever they come out: ``EncodedImage.member`` and
    ``image_id``, failure records' ``member``, error messages; so is ``tar_path`` in every record (a local
    file name that is not UTF-8 comes from the filesystem with surrogate escapes too).
    """
    tar_path = escape_member_name(tar_path)
    extensions = frozenset(extensions)
    reader = _CountingReader(fileobj)
    batch: List[EncodedImage] = []
    batch_bytes = 0
    headers: list = []  # parse_jpeg of each image of the batch, handed on with it
    images_seen = 0
    pending: Optional[_Sample] = None
    last_seen: Optional[tarfile.TarInfo] = None  # the last member tarfile gave, read or not
    jpegs_read: set = set()  # normalised names of this tar's JPEG members, for hard links to them
    # The failure of a JPEG member that is not read (over max_member_bytes, not a file) waits until tarfile
    # has skipped its data: if that runs past the end, the tar's one read failure (naming it) stands for it.
    unread: Optional[Tuple[ImageFailure, str]] = None  # the failure, its counter

    def flush_sample(sample: _Sample) -> Iterator[Union[EncodedBatch, ImageFailure]]:
        nonlocal batch, batch_bytes, headers, images_seen
        if not sample.images:
            count("members_skipped", sample.sidecars)  # sidecars of no image: read, then dropped
        for member, error in sample.failures:
            yield ImageFailure(tar_path, member, FailureStage.METADATA, error)
        for member, data in sample.images:
            images_seen += 1
            failure, header = _check_limits(tar_path, member, data, max_pixels, max_scans)
            if failure is not None:
                if failure.stage == FailureStage.LIMIT:
                    count("images_over_limit", 1)
                yield failure
                continue
            batch.append(EncodedImage(member, sample.key, data, dict(sample.metadata)))
            headers.append(header)
            batch_bytes += len(data)
            if len(batch) >= batch_size or batch_bytes >= max_batch_bytes:
                yield EncodedBatch(tar_path, batch, headers)
                batch, batch_bytes, headers = [], 0, []

    cut = False

    def cut_failure(error: str) -> ImageFailure:
        nonlocal cut
        cut = True
        count("tars_corrupt", 1)
        if last_seen is None:
            where = "before its first member"
        else:
            where = f"after member {escape_member_name(last_seen.name)!r}"
        return ImageFailure(tar_path, None, FailureStage.READ, f"tar is cut off or corrupt {where}: {error}")

    def describe(e: BaseException, tf) -> str:
        if _data_ran_out(e, last_seen, tf):
            end = tf.fileobj.tell()
            return (f"member {escape_member_name(last_seen.name)!r} claims {last_seen.size} bytes from byte "
                    f"{last_seen.offset_data}, past the end of the data at byte {end}")
        if isinstance(e, (_BadHeader, _DataEnded)):
            return str(e)
        return f"{type(e).__name__}: {e}"

    try:
        tf = tarfile.open(fileobj=reader, mode="r|*", tarinfo=_GuardedTarInfo, encoding="utf-8",
                          errors="surrogateescape")
    except _READ_ERRORS as e:
        count("bytes_read", reader.bytes_read)
        count("tars_corrupt", 1)
        error = str(e) if isinstance(e, (_BadHeader, _DataEnded)) else f"{type(e).__name__}: {e}"
        yield ImageFailure(tar_path, None, FailureStage.READ, f"not a readable tar: {error}")
        return

    try:
        members = iter(tf)
        clean_end = False
        while True:
            try:
                info = next(members, None)
            except _READ_ERRORS as e:
                if pending is not None:
                    yield from flush_sample(pending)
                    pending = None
                # The member not read (a link, over max_member_bytes) keeps its own failure unless its own
                # data is what ran past the end (then the tar's one read failure names it instead).
                if unread is not None and not _data_ran_out(e, last_seen, tf):
                    count(unread[1], 1)
                    images_seen += 1
                    yield unread[0]
                unread = None
                yield cut_failure(describe(e, tf))
                break
            if unread is not None:
                count(unread[1], 1)
                images_seen += 1
                yield unread[0]
                unread = None
            if info is None:
                clean_end = True
                break
            del tf.members[:]  # tarfile keeps every header it read (its iterator copes); nothing looks back
            last_seen = info
            name = escape_member_name(info.name)
            key, ext = split_member_name(name)
            is_image = ext in extensions
            is_sidecar = include_metadata and ext in ("json", "txt")
            if not (is_image or is_sidecar):
                count("members_skipped", 1)
                continue
            reason = _not_a_file(info, jpegs_read)
            if reason is not None:
                if is_image:
                    unread = ImageFailure(tar_path, name, FailureStage.READ, reason), "members_not_files"
                else:
                    count("members_skipped", 1)
                continue
            if include_metadata and (pending is None or pending.key != key or len(pending.images) >= batch_size
                                     or pending.nbytes >= max_batch_bytes):
                # A new key; or many JPEGs under one key (a hostile tar), handed on in batches so that memory
                # stays bounded, each keeping the sidecars met so far.
                carried = pending.metadata if pending is not None and pending.key == key else {}
                if pending is not None:
                    yield from flush_sample(pending)
                pending = _Sample(key)
                pending.metadata = dict(carried)
            if is_image:
                jpegs_read.add(posixpath.normpath(name))
            if info.size > max_member_bytes:
                # Never read into memory; for a sidecar, the image keeps its other metadata.
                if is_image:
                    unread = ImageFailure(
                        tar_path, name, FailureStage.LIMIT,
                        f"member is {info.size} bytes, over max_member_bytes={max_member_bytes}",
                    ), "images_over_limit"
                else:
                    count("members_skipped", 1)
                continue
            try:
                data = tf.extractfile(info).read()
            except _READ_ERRORS as e:
                if pending is not None:
                    yield from flush_sample(pending)
                    pending = None
                yield cut_failure(f"reading member {name!r}: {describe(e, tf)}")
                break
            if is_image:
                if include_metadata:
                    pending.images.append((name, data))
                    pending.nbytes += len(data)
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
        if clean_end and isinstance(end, tarfile.InvalidHeaderError):
            yield cut_failure(f"a damaged member header ({end})")
        elif clean_end and end is not None and not isinstance(end, tarfile.EOFHeaderError):
            yield cut_failure(f"no end-of-archive blocks ({type(end).__name__}: {end})")
        elif clean_end:
            reader.guard = False  # _trailing_data stops at the first empty read itself
            trailing = _trailing_data(tf.fileobj)
            if trailing:
                yield cut_failure(trailing)
    finally:
        count("bytes_read", reader.bytes_read)
    if batch:
        yield EncodedBatch(tar_path, batch, headers)
    if images_seen == 0 and not cut:
        count("tars_without_images", 1)


def _data_ran_out(e: BaseException, member: Optional[tarfile.TarInfo], tf) -> bool:
    """Whether reading stopped because ``member``'s own data runs past the end of the stream."""
    return (isinstance(e, _DataEnded) and member is not None
            and member.offset_data + member.size > tf.fileobj.tell())


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


def _check_limits(tar_path, member, data, max_pixels, max_scans) -> Tuple[Optional[ImageFailure], Any]:
    """The limits checked before decoding, from one walk over the JPEG's markers: pixels claimed, more than
    ``max_scans`` scans, more pixels claimed than the bytes can code (``jpeg.implausible``). Returns the
    failure (or None) and that walk's ``JpegHeader`` (None for bytes that are no JPEG)."""
    if not data:
        return ImageFailure(tar_path, member, FailureStage.DECODE, "empty member (0 bytes)"), None
    header = parse_jpeg(data, max_scans)
    try:
        dims = image_dimensions(data, header)
    except OverLimitError as e:
        return ImageFailure(tar_path, member, FailureStage.LIMIT, str(e)), header
    reason = over_limits(header, dims, max_pixels)
    if reason is not None:
        return ImageFailure(tar_path, member, FailureStage.LIMIT, reason), header
    return None, header


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
