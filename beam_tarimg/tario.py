"""Streaming webdataset-style tar shards into batches of encoded JPEGs.

Beam-free: ``read_tar`` takes any readable file object. Tars are read front to back in tarfile's stream
mode (``r|``), after our own decompression of gzip, bzip2, xz and zstd tars (``open_decompressed``: every
member of a multi-member file, within a limit on the decompressed bytes); members are read as bytes, never
extracted; only JPEG members (and, when asked, their sidecars) are read into memory at all, and at most one
batch of them at a time.

Hostile headers cost only their tar. Left alone, tarfile's stream mode loops for ever skipping the data of a
member whose size runs past the end of the data, reads a PAX or GNU long-name header of any claimed size into
memory, parses PAX records in quadratic time, recurses once per chained extension header and keeps every
member's header for the life of the tar; here each of those ends the tar with one ``read`` failure instead, or
does not happen (see ``read_tar``).

Member names are handed on in a lossless text escape (``escape_member_name``): tar names are bytes, not
always UTF-8, and the sinks write text.
"""

from __future__ import annotations

import bz2
import json
import lzma
import posixpath
import re
import struct
import tarfile
import zlib
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

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

# Compressed tars. A decompression bomb ends its tar with one read failure: past EXPANSION_ALLOWANCE decompressed
# bytes, a tar may decompress to at most max_expansion times the compressed bytes read so far (tars of JPEGs
# compress ~1:1; gzip itself cannot exceed ~1032:1, bzip2, xz and zstd reach millions), and, when given, to at
# most max_decompressed_bytes in all.
DEFAULT_MAX_EXPANSION = 100
EXPANSION_ALLOWANCE = 64 << 20
# After the end-of-archive blocks only this much is looked at (tar's record padding: 10 KiB by default, 64 KiB
# covers blocking factors up to 128); what lies further is never read, let alone decompressed.
TRAILING_CHECK_BYTES = 64 << 10
_RAW_READ = 64 << 10  # compressed bytes read at a time
_MAX_READ = 1 << 20  # decompressed bytes handed out per read at most
_OUT_PIECE = 256 << 10  # decompressed bytes made at a time

CountFn = Callable[[str, int], None]

# What reading a damaged tar can raise: tarfile's own errors, and those of the decompressors (ours, or one a
# caller put in front of the tar, such as Beam's FileSystems with CompressionTypes.AUTO).
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


class _OverExpansion(tarfile.ReadError):
    """A compressed tar decompresses to more than its limit (``max_expansion``, ``max_decompressed_bytes``)."""


_OWN_ERRORS = (_BadHeader, _DataEnded, _OverExpansion)  # their messages say it all


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


# A ustar/GNU header block: name, mode, uid, gid, size, mtime, chksum, type, linkname, (magic, version: unread,
# as in tarfile), uname, gname, devmajor, devminor, prefix.
_HEADER_FIELDS = struct.Struct("100s8s8s8s12s12s8sc100s8x32s32s8s8s155s12x")


def _plain_header(cls, buf, encoding: str, errors: str):
    """What ``tarfile.TarInfo.frombuf`` makes of ``buf`` when it is the usual header: a regular file (type ``0``
    or NUL, not a V7 directory), numbers in octal digits, the unsigned checksum right. None for anything else
    (base-256 numbers, other types, a signed or bad checksum, the end-of-archive block), which tarfile parses
    itself. A test compares the two on real and mutated headers."""
    if len(buf) != tarfile.BLOCKSIZE or buf[156] not in (0x30, 0):
        return None
    (name, mode, uid, gid, size, mtime, chksum, kind, linkname, uname, gname, devmajor, devminor,
     prefix) = _HEADER_FIELDS.unpack(buf)
    try:
        # tarfile's nti() for octal fields: up to the first NUL, stripped, base 8. int() of the bytes accepts a
        # subset of what nti() accepts of the same text (it strips fewer kinds of whitespace; non-ASCII bytes,
        # base-256 numbers and junk raise): anything else goes to tarfile.
        numbers = [int(field.split(b"\0", 1)[0].strip() or b"0", 8)
                   for field in (mode, uid, gid, size, mtime, chksum, devmajor, devminor)]
    except ValueError:
        return None
    if numbers[5] != 256 + sum(buf) - sum(buf[148:156]):
        return None
    name = tarfile.nts(name, encoding, errors)
    if kind == tarfile.AREGTYPE and name.endswith("/"):
        return None  # a V7 directory
    info = cls()
    info.mode, info.uid, info.gid, info.size, info.mtime, info.chksum, info.devmajor, info.devminor = numbers
    info.type = kind
    info.linkname = tarfile.nts(linkname, encoding, errors)
    info.uname = tarfile.nts(uname, encoding, errors)
    info.gname = tarfile.nts(gname, encoding, errors)
    prefix = tarfile.nts(prefix, encoding, errors)
    info.name = prefix + "/" + name if prefix else name
    return info


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
    def frombuf(cls, buf, encoding, errors):  # type: ignore[override]
        """tarfile's ``frombuf``: ``_plain_header`` for the usual header (~3x faster), tarfile's own for the rest."""
        info = _plain_header(cls, buf, encoding, errors)
        return info if info is not None else super().frombuf(buf, encoding, errors)

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

    def __init__(self, raw, guard: bool = True):
        self._raw = raw
        self.bytes_read = 0
        self.reads_past_end = 0
        self.guard = guard

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        if data:
            self.bytes_read += len(data)
        elif size:
            self.reads_past_end += 1
            if self.guard and self.reads_past_end > _READS_PAST_END:
                raise _DataEnded(f"the data ended after {self.bytes_read} bytes, and tarfile still reads on")
        return data


# How a compressed tar starts (what tarfile's "r|*" recognised, and zstd); anything else is read as a plain tar.
_MAGIC = ((b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"))
# The decompressors' own memory: gzip 32 KiB of window, bzip2 under 4 MB; xz and zstd as much as the file's
# header asks (xz's dictionary up to 1.5 GiB), so both are capped (xz -9 needs 65 MiB, zstd -19 8 MiB).
MAX_DECOMPRESSOR_BYTES = 128 << 20
_DECOMPRESSORS = {
    "gzip": lambda: zlib.decompressobj(16 + zlib.MAX_WBITS),
    "bzip2": bz2.BZ2Decompressor,
    "xz": lambda: lzma.LZMADecompressor(lzma.FORMAT_XZ, memlimit=MAX_DECOMPRESSOR_BYTES),
}


def _read_exactly(raw, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = raw.read(n - len(out))
        if not chunk:
            break
        out += chunk
    return out


def open_decompressed(raw, max_expansion: int = DEFAULT_MAX_EXPANSION,
                      max_decompressed_bytes: Optional[int] = None):
    """A file object giving a tar's bytes: ``raw`` itself for a plain tar, else its decompressed content.

    The compression is told by the first bytes (gzip, bzip2, xz, zstd), never by the file name. Every member
    of a multi-member file is read, one after another (``cat a.gz b.gz``, pigz, pbzip2, several xz streams or
    zstd frames), as gzip, bzip2, xz and zstd tools do; zero bytes between members are skipped. Data is
    decompressed 256 KiB at a time from at most 64 KiB of compressed data at a time, so memory stays bounded
    whatever the ratio (an xz or zstd file whose header asks for more than ``MAX_DECOMPRESSOR_BYTES`` of
    decompressor memory fails); past the limits (see ``_Decompressing``) a read raises ``_OverExpansion``.
    """
    head = _read_exactly(raw, 6)
    fmt = next((name for magic, name in _MAGIC if head.startswith(magic)), None)
    if fmt is None:
        return _Prefixed(head, raw)
    return _Decompressing(_Prefixed(head, raw), fmt, max_expansion, max_decompressed_bytes)


class _Prefixed:
    """``head``, then the rest of ``raw``: the bytes read to tell the compression, handed out again."""

    def __init__(self, head: bytes, raw):
        self._head = head
        self._raw = raw

    def read(self, size: int = -1) -> bytes:
        if not self._head:
            return self._raw.read(size)
        if size is None or size < 0:
            out, self._head = self._head + self._raw.read(), b""
            return out
        out, self._head = self._head[:size], self._head[size:]
        return out


class _Decompressing:
    """The decompressed bytes of a gzip, bzip2, xz or zstd file, all its members in turn, within limits.

    Raises ``_OverExpansion`` once more than ``EXPANSION_ALLOWANCE`` bytes have come out and they are more
    than ``max_expansion`` times the compressed bytes read so far, or more than ``max_decompressed_bytes``
    in all; ``EOFError`` when the compressed data ends inside a member; ``tarfile.ReadError`` for data after a
    member that starts no new one.
    """

    def __init__(self, raw, fmt: str, max_expansion: int, max_decompressed_bytes: Optional[int]):
        self._raw = raw
        self.fmt = fmt
        self._max_expansion = max_expansion
        self._max_bytes = max_decompressed_bytes
        self.bytes_in = 0
        self.bytes_out = 0
        self._input = b""  # compressed bytes read but not yet given to the decompressor
        self._out = b""  # decompressed bytes not yet handed out: self._out[self._pos:]
        self._pos = 0
        self._d = None  # the decompressor of the current member; None between members
        self._zstd = None
        if fmt == "zstd":
            try:
                import zstandard
            except ImportError:
                raise tarfile.ReadError("a zstd-compressed tar needs the zstandard package") from None
            dctx = zstandard.ZstdDecompressor(max_window_size=MAX_DECOMPRESSOR_BYTES)
            self._zstd = dctx.stream_reader(_Counted(raw, self), read_size=_RAW_READ, read_across_frames=True)

    def _raw_read(self) -> bytes:
        data = self._raw.read(_RAW_READ)
        self.bytes_in += len(data)
        return data

    def read(self, size: int = -1) -> bytes:
        size = _MAX_READ if size is None or size < 0 else min(size, _MAX_READ)
        if size == 0:
            return b""
        if self._pos == len(self._out):  # decompressed in pieces of _OUT_PIECE: tarfile reads 10 KiB at a time
            piece = self._zstd.read(_OUT_PIECE) if self._zstd is not None else self._next_bytes(_OUT_PIECE)
            self.bytes_out += len(piece)
            self._check_limits()  # raises before any byte past the limit is handed out
            self._out, self._pos = piece, 0
        out = self._out[self._pos : self._pos + size]
        self._pos += len(out)
        return out

    def _next_bytes(self, size: int) -> bytes:
        while True:
            if self._d is None and not self._start_member():
                return b""
            out = self._step(size)
            if self._d.eof:
                self._input = self._d.unused_data + self._input
                self._d = None
            if out:
                return out

    def _step(self, size: int) -> bytes:
        """Up to ``size`` bytes from the current member (maybe none: a header consumed, input needed)."""
        d = self._d
        if self.fmt == "gzip":  # zlib keeps unconsumed input in unconsumed_tail
            if not self._input:
                out = d.decompress(b"", size)  # output zlib may still hold for input it took
                if out:
                    return out
                self._input = self._need_input()
            out = d.decompress(self._input, size)
            self._input = b"" if d.eof else d.unconsumed_tail
            return out
        feed = b""
        if d.needs_input:  # bz2 and lzma take all input given and buffer it
            feed, self._input = self._input or self._need_input(), b""
        return d.decompress(feed, size)

    def _need_input(self) -> bytes:
        data = self._raw_read()
        if not data:
            raise EOFError(f"the {self.fmt} data ends inside a member (cut off), after {self.bytes_out} "
                           "decompressed bytes")
        return data

    def _start_member(self) -> bool:
        """Skips zero padding (at most TRAILING_CHECK_BYTES); starts the next member. False at the end."""
        skipped = 0
        while True:
            if not self._input:
                self._input = self._raw_read()
                if not self._input:
                    return False
            rest = self._input.lstrip(b"\0")
            skipped += len(self._input) - len(rest)
            self._input = rest
            if rest or skipped > TRAILING_CHECK_BYTES:
                break
        if not self._input:
            return False  # more zeros than any padding: nothing further is read
        if len(self._input) < 6:
            more = _read_exactly(self._raw, 6)
            self.bytes_in += len(more)
            self._input += more
        if not any(self._input.startswith(m) for m, name in _MAGIC if name == self.fmt):
            raise tarfile.ReadError(f"data after the end of a {self.fmt} member that starts no new member "
                                    f"(after {self.bytes_out} decompressed bytes)")
        self._d = _DECOMPRESSORS[self.fmt]()
        return True

    def _check_limits(self) -> None:
        if self.bytes_out > EXPANSION_ALLOWANCE + self._max_expansion * self.bytes_in:
            raise _OverExpansion(
                f"the {self.fmt} data decompresses to over {self.bytes_out} bytes from the first {self.bytes_in} "
                f"compressed bytes, over max_expansion={self._max_expansion} (64 MiB, then "
                f"{self._max_expansion}x the compressed bytes); nothing further was decompressed")
        if self._max_bytes is not None and self.bytes_out > self._max_bytes:
            raise _OverExpansion(
                f"the {self.fmt} data decompresses to over max_decompressed_bytes={self._max_bytes}; nothing "
                "further was decompressed")


class _Counted:
    """``raw`` for zstandard's reader, counting the compressed bytes into ``owner.bytes_in``."""

    def __init__(self, raw, owner: _Decompressing):
        self._raw = raw
        self._owner = owner

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self._owner.bytes_in += len(data)
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
    max_expansion: int = DEFAULT_MAX_EXPANSION,
    max_decompressed_bytes: Optional[int] = None,
    count: CountFn = _no_count,
) -> Iterator[Union[EncodedBatch, ImageFailure]]:
    """Yields ``EncodedBatch``es of up to ``batch_size`` JPEGs, in tar order, and ``ImageFailure``s inline.

    ``fileobj`` gives the file's bytes as stored: a plain tar, or a gzip, bzip2, xz or zstd one, told by its
    first bytes (``open_decompressed``: every member of a multi-member file is read). A batch ends early once
    it holds ``max_batch_bytes`` of encoded bytes (big photos: 100 JPEGs of 24 MP are ~440 MB before
    decoding), so that what a batch holds stays bounded whatever the images' size.

    Counts (through ``count(name, n)``): ``members_skipped`` (not a JPEG, or a sidecar not asked for or not a
    file), ``members_not_files`` (JPEG-named members that are not regular files: each also yields a failure),
    ``images_over_limit``, ``bytes_read`` (as stored: compressed bytes for a compressed tar),
    ``tars_without_images`` (read to the end, no JPEG member) and ``tars_corrupt`` (not a tar, cut off,
    corrupt or hostile part-way, over its decompression limit, or followed by data after its end-of-archive
    blocks: each also yields one failure).

    Every JPEG member (its extension in ``extensions``, case-insensitively) ends up as an image or as a
    failure. A JPEG-named member that is not a regular file is a ``read`` failure naming it, and the tar goes
    on: a symbolic link (never followed), a hard link (its target's bytes went by earlier in the stream and
    are not kept, so the link is not decoded again under its own name: the failure says whether the target
    was read as an image of this tar; only the names of this tar's JPEG members are kept for that), a
    directory, device, FIFO or unknown type, or a sparse file (never expanded).

    A tar cut off, corrupt or hostile part-way yields all whole members before that point, then one ``read``
    failure, at once: a member or header whose size runs past the end of the data (tarfile alone would skip
    forward for ever), a header over its limit (``MAX_HEADER_BYTES``, ``MAX_GLOBAL_HEADER_BYTES``,
    ``MAX_CHAINED_HEADERS``), a malformed PAX record, a negative or non-numeric size, a bad checksum, a
    compressed tar decompressing past ``EXPANSION_ALLOWANCE`` + ``max_expansion`` times its compressed bytes
    read so far, or past ``max_decompressed_bytes``. After the end-of-archive blocks at most
    ``TRAILING_CHECK_BYTES`` are read: anything but zeros there is a ``read`` failure (a second tar appended).
    Time per member is linear in the bytes the stream gives for its headers and data, plus at most 8 reads
    past the end of the data; so a whole tar is linear in its decompressed bytes, which the limits above keep
    within 64 MiB + ``max_expansion`` times its compressed size. Memory: one member read (up to
    ``max_member_bytes``, JPEGs and sidecars only), 256 KiB of decompressed and 64 KiB of compressed data
    (plus the decompressor's state, at most ``MAX_DECOMPRESSOR_BYTES``), at most ``MAX_CHAINED_HEADERS``
    headers of at most 1 MiB each, 64 KiB of global headers, and the names of the tar's JPEG members.

    Member names are escaped with ``escape_member_name`` wherever they come out: ``EncodedImage.member`` and
    ``image_id``, failure records' ``member``, error messages; so is ``tar_path`` in every record (a local
    file name that is not UTF-8 comes from the filesystem with surrogate escapes too).
    """
    limits = _Limits(batch_size, frozenset(extensions), include_metadata, max_pixels, max_member_bytes, max_scans,
                     max_batch_bytes, max_expansion, max_decompressed_bytes)
    yield from _TarReader(escape_member_name(tar_path), limits, count).events(fileobj)


class _Limits(NamedTuple):
    batch_size: int
    extensions: frozenset
    include_metadata: bool
    max_pixels: int
    max_member_bytes: int
    max_scans: int
    max_batch_bytes: int
    max_expansion: int
    max_decompressed_bytes: Optional[int]


class _TarReader:
    """One ``read_tar`` call: its state, and its stages as methods (open, members, one member, samples into
    batches, the end of the tar)."""

    def __init__(self, tar_path: str, limits: _Limits, count: CountFn):
        self.tar_path = tar_path
        self.limits = limits
        self.count = count
        self.batch: List[EncodedImage] = []
        self.batch_bytes = 0
        self.headers: list = []  # parse_jpeg of each image of the batch, handed on with it
        self.images_seen = 0
        self.pending: Optional[_Sample] = None
        self.last_seen: Optional[tarfile.TarInfo] = None  # the last member tarfile gave, read or not
        self.jpegs_read: set = set()  # normalised names of this tar's JPEG members, for hard links to them
        # The failure of a JPEG member that is not read (over max_member_bytes, not a file) waits until tarfile
        # has skipped its data: if that runs past the end, the tar's one read failure (naming it) stands for it.
        self.unread: Optional[Tuple[ImageFailure, str]] = None  # the failure, its counter
        self.cut = False
        self.tf = None
        self.reader: Optional[_CountingReader] = None

    def events(self, fileobj) -> Iterator[Union[EncodedBatch, ImageFailure]]:
        raw = _CountingReader(fileobj, guard=False)  # the bytes as stored, for bytes_read
        try:
            opened = yield from self._open(raw)
            if opened:
                clean_end = yield from self._members()
                if self.pending is not None:
                    yield from self._flush_sample(self.pending)
                    self.pending = None
                if clean_end:
                    yield from self._end()
        finally:
            self.count("bytes_read", raw.bytes_read)
        if self.batch:
            yield EncodedBatch(self.tar_path, self.batch, self.headers)
        if self.images_seen == 0 and not self.cut:
            self.count("tars_without_images", 1)

    def _open(self, raw) -> Iterator[ImageFailure]:
        """Opens the tar (decompressing, tarfile); returns False after yielding its one failure."""
        try:
            self.reader = _CountingReader(open_decompressed(raw, self.limits.max_expansion,
                                                            self.limits.max_decompressed_bytes))
            self.tf = tarfile.open(fileobj=self.reader, mode="r|", tarinfo=_GuardedTarInfo, encoding="utf-8",
                                   errors="surrogateescape")
        except _READ_ERRORS as e:
            self.cut = True
            self.count("tars_corrupt", 1)
            error = str(e) if isinstance(e, _OWN_ERRORS) else f"{type(e).__name__}: {e}"
            yield ImageFailure(self.tar_path, None, FailureStage.READ, f"not a readable tar: {error}")
            return False
        return True

    def _members(self) -> Iterator[Union[EncodedBatch, ImageFailure]]:
        """Every member in turn; returns True when tarfile ended without an error (the end stage decides)."""
        members = iter(self.tf)
        while True:
            try:
                info = next(members, None)
            except _READ_ERRORS as e:
                if self.pending is not None:
                    yield from self._flush_sample(self.pending)
                    self.pending = None
                # The member not read (a link, over max_member_bytes) keeps its own failure unless its own
                # data is what ran past the end (then the tar's one read failure names it instead).
                if self.unread is not None and not _data_ran_out(e, self.last_seen, self.tf):
                    yield from self._settle_unread()
                self.unread = None
                yield self._cut_failure(self._describe(e), e)
                return False
            yield from self._settle_unread()
            if info is None:
                return True
            del self.tf.members[:]  # tarfile keeps every header it read (its iterator copes); nothing looks back
            self.last_seen = info
            if not (yield from self._member(info)):
                return False

    def _settle_unread(self) -> Iterator[ImageFailure]:
        if self.unread is not None:
            failure, counter = self.unread
            self.unread = None
            self.count(counter, 1)
            self.images_seen += 1
            yield failure

    def _member(self, info: tarfile.TarInfo) -> Iterator[Union[EncodedBatch, ImageFailure]]:
        """One member: skipped, set aside as a failure, or read; returns False when reading it ended the tar."""
        lim = self.limits
        name = escape_member_name(info.name)
        key, ext = split_member_name(name)
        is_image = ext in lim.extensions
        if not (is_image or (lim.include_metadata and ext in ("json", "txt"))):
            self.count("members_skipped", 1)
            return True
        reason = _not_a_file(info, self.jpegs_read)
        if reason is not None:
            if is_image:
                self.unread = ImageFailure(self.tar_path, name, FailureStage.READ, reason), "members_not_files"
            else:
                self.count("members_skipped", 1)
            return True
        if lim.include_metadata:
            yield from self._group(key)
        if is_image:
            self.jpegs_read.add(posixpath.normpath(name))
        if info.size > lim.max_member_bytes:
            # Never read into memory; for a sidecar, the image keeps its other metadata.
            if is_image:
                self.unread = ImageFailure(
                    self.tar_path, name, FailureStage.LIMIT,
                    f"member is {info.size} bytes, over max_member_bytes={lim.max_member_bytes}",
                ), "images_over_limit"
            else:
                self.count("members_skipped", 1)
            return True
        return (yield from self._read_member(info, name, key, ext, is_image))

    def _group(self, key: str) -> Iterator[Union[EncodedBatch, ImageFailure]]:
        """With metadata: a member of a new key (or the next of many JPEGs under one key) starts a new sample."""
        pending, lim = self.pending, self.limits
        if (pending is None or pending.key != key or len(pending.images) >= lim.batch_size
                or pending.nbytes >= lim.max_batch_bytes):
            # Many JPEGs under one key (a hostile tar) are handed on in batches so that memory stays bounded,
            # each keeping the sidecars met so far.
            carried = pending.metadata if pending is not None and pending.key == key else {}
            if pending is not None:
                yield from self._flush_sample(pending)
            self.pending = _Sample(key)
            self.pending.metadata = dict(carried)

    def _read_member(self, info, name: str, key: str, ext: str, is_image: bool):
        """Reads a JPEG or sidecar member into its sample; returns False when reading ended the tar."""
        try:
            data = self.tf.extractfile(info).read()
        except _READ_ERRORS as e:
            if self.pending is not None:
                yield from self._flush_sample(self.pending)
                self.pending = None
            yield self._cut_failure(f"reading member {name!r}: {self._describe(e)}", e)
            return False
        if not is_image:
            self.pending.sidecars += 1
            _parse_sidecar(self.pending, name, ext, data)
        elif self.limits.include_metadata:
            self.pending.images.append((name, data))
            self.pending.nbytes += len(data)
        else:
            sample = _Sample(key)
            sample.images.append((name, data))
            yield from self._flush_sample(sample)
        return True

    def _flush_sample(self, sample: _Sample) -> Iterator[Union[EncodedBatch, ImageFailure]]:
        """A sample's images into the batch (or failures, checked against the limits); full batches out."""
        lim = self.limits
        if not sample.images:
            self.count("members_skipped", sample.sidecars)  # sidecars of no image: read, then dropped
        for member, error in sample.failures:
            yield ImageFailure(self.tar_path, member, FailureStage.METADATA, error)
        for member, data in sample.images:
            self.images_seen += 1
            failure, header = _check_limits(self.tar_path, member, data, lim.max_pixels, lim.max_scans)
            if failure is not None:
                if failure.stage == FailureStage.LIMIT:
                    self.count("images_over_limit", 1)
                yield failure
                continue
            self.batch.append(EncodedImage(member, sample.key, data, dict(sample.metadata)))
            self.headers.append(header)
            self.batch_bytes += len(data)
            if len(self.batch) >= lim.batch_size or self.batch_bytes >= lim.max_batch_bytes:
                yield EncodedBatch(self.tar_path, self.batch, self.headers)
                self.batch, self.batch_bytes, self.headers = [], 0, []

    def _end(self) -> Iterator[ImageFailure]:
        """After the last member: why tarfile stopped (end-of-archive blocks or not), and what follows them."""
        end = getattr(self.tf, "_tarimg_end", None)
        if isinstance(end, tarfile.InvalidHeaderError):
            yield self._cut_failure(f"a damaged member header ({end})")
        elif end is not None and not isinstance(end, tarfile.EOFHeaderError):
            yield self._cut_failure(f"no end-of-archive blocks ({type(end).__name__}: {end})")
        else:
            self.reader.guard = False  # _trailing_data stops at the first empty read itself
            trailing = _trailing_data(self.tf.fileobj)
            if trailing:
                yield self._cut_failure(trailing)

    def _cut_failure(self, error: str, cause: Optional[BaseException] = None) -> ImageFailure:
        self.cut = True
        self.count("tars_corrupt", 1)
        if self.last_seen is None:
            where = "before its first member"
        else:
            where = f"after member {escape_member_name(self.last_seen.name)!r}"
        what = "is over its decompression limit" if isinstance(cause, _OverExpansion) else "is cut off or corrupt"
        return ImageFailure(self.tar_path, None, FailureStage.READ, f"tar {what} {where}: {error}")

    def _describe(self, e: BaseException) -> str:
        last = self.last_seen
        if _data_ran_out(e, last, self.tf):
            return (f"member {escape_member_name(last.name)!r} claims {last.size} bytes from byte "
                    f"{last.offset_data}, past the end of the data at byte {self.tf.fileobj.tell()}")
        if isinstance(e, _OWN_ERRORS):
            return str(e)
        return f"{type(e).__name__}: {e}"


def _data_ran_out(e: BaseException, member: Optional[tarfile.TarInfo], tf) -> bool:
    """Whether reading stopped because ``member``'s own data runs past the end of the stream."""
    return (isinstance(e, _DataEnded) and member is not None
            and member.offset_data + member.size > tf.fileobj.tell())


def _trailing_data(stream) -> Optional[str]:
    """After the end-of-archive block: None when only zeros follow within ``TRAILING_CHECK_BYTES`` (tar's
    record padding), else what is wrong. What lies further is never read (nor decompressed: a small bzip2 tar
    can be followed by GiBs of compressed zeros).

    tarfile stops at the first zero block, so the members of a second tar appended to the first (``cat a.tar
    b.tar``) would otherwise vanish without a trace.
    """
    extra = 0
    try:
        while extra < TRAILING_CHECK_BYTES:
            chunk = stream.read(min(tarfile.RECORDSIZE, TRAILING_CHECK_BYTES - extra))
            if not chunk:
                return None
            zeros = len(chunk) - len(chunk.lstrip(b"\0"))
            if zeros != len(chunk):
                return (f"data after the end-of-archive blocks, {extra + zeros} bytes after them (a second tar "
                        f"appended?); nothing past them was read")
            extra += len(chunk)
        return None
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
