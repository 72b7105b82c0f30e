"""Reading a JPEG's structure from its bytes, without decoding it: sizes, sanity, plausibility.

One walk over the marker segments (``parse_jpeg``) serves every question asked before a decode:

- ``jpeg_dimensions`` / ``image_dimensions``: the size the frame header claims (the decompression-bomb guard);
- ``has_complete_header``: a frame header and a whole scan header, followed by scan data;
- ``dali_rejects``: a reason to keep the bytes away from DALI, whose decoder can crash the process (not raise)
  on JPEGs whose structure is wrong (FIELD-NOTES: a changed SOF component count, flipped SOF/SOS bytes,
  inserted, deleted or repeated markers, corrupt tables). Such files go to the Pillow fallback instead, which
  reports or decodes them; so the check errs on the strict side: an odd but valid file costs only speed;
- ``implausible``: a reason for a ``limit`` failure before any decode: a frame header claiming more pixels
  than the file's bytes can encode, more scans than a limit, pixels x scans over the decode cost bound, more
  markers than any real JPEG has;
- ``JpegHeader.orientation``: the EXIF orientation Pillow's ``ImageOps.exif_transpose`` applies
  (``pillow_orientation``), which the decoder applies to DALI's pixels.

The walk (``_Walk``, one method per kind of segment) reads the marker segments and skips each scan's
entropy-coded data with one regular-expression search (in entropy data a 0xFF byte is always followed by 0x00,
a restart marker or a fill byte): C speed, 119-240 MB/s on data made only of 0xFF pairs, GB/s on real data.
Its Python-level work is bounded: ``max_scans + 1`` scans, ``MAX_MARKERS`` markers, 64 restart markers per
scan checked one by one (the rest by their counts). Measured: about 23 us of CPU for a ~37 KB 500x375 baseline
JPEG, 56 us for a progressive one (10 scans), ~18 us more with an EXIF block (Pillow's EXIF reader), against
~1,000 and ~2,000 us for a decode. Pure Python; Pillow only for EXIF blocks.
"""

from __future__ import annotations

import io
import re
from typing import Dict, List, Optional, Tuple

# Pillow's decompression-bomb threshold (PIL.Image.MAX_IMAGE_PIXELS): 1024 * 1024 * 1024 // 4 // 3.
DEFAULT_MAX_PIXELS = 89_478_485

# The decode cost bound (``decode_cost``): an image over it is a ``limit`` failure, never decoded. Each scan of
# a progressive JPEG is a pass over the image (~1.2 ns per pixel-scan on one core here, DALI and Pillow alike),
# and each byte of entropy-coded data costs 8-24 ns more (refinement scans of noise the most): 2e9 keeps the
# worst image to ~3 s of CPU (README "Bounded resources" has the measurements). Real photographs stay far
# below it: a 24 MP baseline JPEG of 15 MB costs 0.3e9, an 89 MP progressive one (10 scans) of 40 MB 1.7e9.
MAX_DECODE_COST = 2_000_000_000
BYTE_COST = 20  # pixel-scans per byte of the file


def decode_cost(width: int, height: int, scans: int, size: int) -> int:
    """The decode cost bound's measure of a JPEG: width x height x scans + ``BYTE_COST`` x its bytes."""
    return width * height * max(scans, 1) + BYTE_COST * size
# The most scans a JPEG may have before it is a ``limit`` failure. Encoders write 6-10 (libjpeg's default
# progression), a few dozen at most (mozjpeg's scan optimisation); DALI refuses more than 256 (it raises, and
# Pillow then decodes them). Each scan is a pass over the whole image: 256 scans of 9400x9400 took 8.5-19 s in
# DALI, hence MAX_DECODE_COST as well.
DEFAULT_MAX_SCANS = 256
NOT_A_JPEG = "not a JPEG (no start-of-image marker)"  # dali_rejects of bytes with no JPEG header at all
_DALI_MAX_SCANS = 256

# Start-of-frame markers carry the frame size. 0xC4 (DHT), 0xC8 (JPG) and 0xCC (DAC) share the range.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# The frame types DALI's decoders handle: baseline, extended and progressive DCT, Huffman- or arithmetic-coded
# (DALI's CPU decoder gave Pillow's pixels exactly on jpegtran's SOF9 and SOF10 files). Lossless (SOF3, SOF11)
# and hierarchical (SOF5-7, SOF13-15) frames go to Pillow.
_DALI_FRAMES = frozenset((0xC0, 0xC1, 0xC2, 0xC9, 0xCA))
_PROGRESSIVE = frozenset((0xC2, 0xC6, 0xCA, 0xCE))
_ARITHMETIC = frozenset((0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))
_SOF_NAMES = {m: f"SOF{m - 0xC0}" for m in _SOF_MARKERS}
# Markers that stand alone, with no length field.
_STANDALONE = frozenset(range(0xD0, 0xD8)) | {0x01, 0xD8}
# The component sampling factors given to DALI: gray, and the chroma subsamplings nvJPEG names (4:4:4, 4:2:2,
# 4:4:0, 4:2:0, 4:1:1, 4:1:0), luma and K (for CMYK/YCCK) alike. libjpeg decodes more, but rare layouts go to Pillow.
_LUMA = ((1, 1), (2, 1), (1, 2), (2, 2), (4, 1), (4, 2))
_SAMPLINGS = frozenset(
    [((1, 1),)]
    + [(y, (1, 1), (1, 1)) for y in _LUMA]
    + [(y, (1, 1), (1, 1), k) for y in _LUMA for k in (y, (1, 1))]
)
# Segments allowed anywhere before the first scan, besides the frame header and the tables: APPn and COM.
_OPAQUE = frozenset(range(0xE0, 0xF0)) | {0xFE}

# Table segments: DHT, DQT, DRI, DAC.
_TABLES = frozenset((0xC4, 0xDB, 0xDD, 0xCC))
# The most markers (segments, stray markers, fill bytes) one walk reads: real JPEGs have a few dozen, a
# progressive one a few per scan, a large ICC profile one per 64 KB. A file with more is a ``limit`` failure: a
# walk (ours, Pillow's) over millions of tiny segments would cost seconds of Python per image.
MAX_MARKERS = 10_000
_XMP = b"http://ns.adobe.com/xap/1.0/\x00"  # an APP1 segment holding XMP (Pillow's test)
_XMP_ORIENTATION = re.compile(rb'tiff:Orientation(="|>)([0-9])')  # what Pillow's Image.getexif looks for
# EXIF orientation -> the transposition ImageOps.exif_transpose applies (2..8), by Pillow's dict lookup.
_TRANSPOSED = {k: k for k in range(2, 9)}

# Huffman table segments are mostly the same few byte strings (the standard tables, an encoder's own):
# their checked result is kept, keyed by the segment's bytes.
_DHT_CACHE: Dict[bytes, Tuple[Optional[str], int]] = {}
_DHT_CACHE_SIZE = 256


class JpegHeader:
    """What one walk over a JPEG's markers found. See ``parse_jpeg``.

    Attributes:
      width, height: the frame header's claim (None without a frame header).
      frame: the frame's marker byte (0xC0 for SOF0, ...), or None.
      precision: bits per sample.
      components: ``(id, h, v, tq)`` per frame component.
      scans: how many scan headers (SOS) the walk met; it stops after ``scan_limit + 1``.
      scan_limit: the ``max_scans`` the walk was given.
      complete: a frame header and a whole scan header, followed by scan data (``has_complete_header``).
      problem: the first thing found that DALI should not be given (``dali_rejects``), or None.
      first_scan_units: 8x8 data units the first scan codes, where each costs at least one bit (a Huffman-coded
        DCT frame whose first scan codes DC coefficients); 0 where no such bound holds.
      first_scan_bytes: bytes from the first scan's data to the next scan header or the end of the image (a
        corrupt byte that looks like a marker inside the scan data does not shorten it).
      size: the bytes walked (up to the end-of-image marker).
      too_many_markers: the walk stopped after ``MAX_MARKERS`` markers.
      orientation: the EXIF orientation Pillow's ``ImageOps.exif_transpose`` applies (1..8, 1 for none; see
        ``pillow_orientation``), None where Pillow's EXIF reader fails (``problem`` says so).
    """

    __slots__ = (
        "width", "height", "frame", "precision", "components", "scans", "scan_limit", "complete", "problem",
        "first_scan_units", "first_scan_bytes", "size", "too_many_markers", "orientation",
    )

    def __init__(self):
        self.width: Optional[int] = None
        self.height: Optional[int] = None
        self.frame: Optional[int] = None
        self.precision = 0
        self.components: Tuple[Tuple[int, int, int, int], ...] = ()
        self.scans = 0
        self.scan_limit = DEFAULT_MAX_SCANS
        self.complete = False
        self.problem: Optional[str] = None
        self.first_scan_units = 0
        self.first_scan_bytes = 0
        self.size = 0
        self.too_many_markers = False
        self.orientation: Optional[int] = 1

    def dali_rejects(self) -> Optional[str]:
        """See the module function ``dali_rejects``."""
        if not self.complete:
            return self.problem or "not a complete JPEG (no whole frame and scan header followed by data)"
        return self.problem

    def implausible(self) -> Optional[str]:
        """See the module function ``implausible``; ``max_scans`` is the one given to ``parse_jpeg``."""
        if self.too_many_markers:
            return f"more than {MAX_MARKERS} markers"
        if self.scans > self.scan_limit:
            return f"more than max_scans={self.scan_limit} scans"
        if not self.width or not self.height:
            return None
        if self.first_scan_units:
            if self.first_scan_bytes * 8 < self.first_scan_units:
                return (
                    f"header claims {self.width}x{self.height}, but the first scan's {self.first_scan_bytes} "
                    f"bytes cannot code its {self.first_scan_units} 8x8 blocks (at least 1 bit each)"
                )
        else:  # arithmetic-coded, or no DC scan first: held to 1 bit per 8x8 block of the whole image
            blocks = ((self.width + 7) // 8) * ((self.height + 7) // 8)
            if self.size * 8 < blocks:
                return (
                    f"header claims {self.width}x{self.height}, but its {self.size} bytes are less than 1 bit per "
                    f"8x8 block ({blocks} blocks; arithmetic-coded or no DC scan first)"
                )
        cost = decode_cost(self.width, self.height, self.scans, self.size)
        if cost > MAX_DECODE_COST:
            return (
                f"{self.width}x{self.height} pixels x {self.scans} scans + {BYTE_COST} x {self.size} bytes = "
                f"{cost} is over the decode cost bound of {MAX_DECODE_COST}"
            )
        return None

    def __repr__(self) -> str:
        return (
            f"JpegHeader({_SOF_NAMES.get(self.frame, self.frame)}, {self.width}x{self.height}, "
            f"components={self.components}, scans={self.scans}, complete={self.complete}, problem={self.problem!r})"
        )


def parse_jpeg(data: bytes, max_scans: int = DEFAULT_MAX_SCANS) -> Optional[JpegHeader]:
    """Walks the marker segments of ``data``, through all its scans; None unless it starts with a JPEG SOI marker.

    Reads the segments before the first scan, then finds the markers between scans by skipping entropy-coded
    data with one regular-expression search per scan (C speed: ~200 MB/s on data that is all 0xFF pairs, GB/s
    on real data); never decodes anything. Stops after ``max_scans + 1`` scans or ``MAX_MARKERS`` markers, so
    its Python-level work is bounded whatever the bytes, and its C-level work is linear in their length.
    """
    if len(data) < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    walk = _Walk(data, max_scans)
    i = 2
    while i >= 0:
        i = walk.marker(i)
    return walk.finish()


class _Walk:
    """The state of one ``parse_jpeg`` walk: the tables, frame and scans met so far. ``marker(i)`` reads the
    marker at ``i`` (its segment, and for a scan the entropy-coded data after it) and returns where the next
    marker is, or -1 to stop; ``finish()`` gives the ``JpegHeader``."""

    __slots__ = (
        "data", "n", "h", "problem", "frame", "comps", "index_of", "hmax", "vmax", "quant", "huff", "restart",
        "adobe", "scanned", "coef", "scans", "first_data", "markers", "exif", "xmp",
    )

    def __init__(self, data: bytes, max_scans: int):
        self.data, self.n = data, len(data)
        self.h = JpegHeader()
        self.h.scan_limit = max_scans
        self.problem: Optional[str] = None
        self.frame: Optional[int] = None
        self.comps: List[Tuple[int, int, int, int]] = []
        self.index_of: Dict[int, int] = {}  # component id -> index in comps
        self.hmax = self.vmax = 1
        self.quant = 0  # bit t: quantization table t defined
        self.huff = 0  # bit t: DC table t defined; bit 4 + t: AC table t defined
        self.restart = 0
        self.adobe = False
        self.scanned: List[int] = []  # per component: scans so far (sequential frames)
        self.coef: List[List[int]] = []  # per component: each coefficient's successive-approximation bit
        self.scans = 0
        self.first_data = 0  # where the first scan's entropy-coded data starts
        self.markers = 0
        self.exif: List[bytes] = []  # the APP1 "Exif" segments before the first scan (Pillow joins them)
        self.xmp: Optional[bytes] = None  # the last APP1 XMP packet before the first scan (Pillow's choice)

    def note(self, problem: str) -> None:
        if self.problem is None:
            self.problem = problem

    def marker(self, i: int) -> int:
        """Reads the marker at ``i``; where the next one is, or -1 to stop."""
        data, n = self.data, self.n
        self.markers += 1
        if self.markers > MAX_MARKERS:
            self.h.too_many_markers = True
            return -1
        if i + 2 > n:  # the data ends (before a scan: cut inside the header)
            if not self.scans:
                self.note("cut inside the header")
            return -1
        if data[i] != 0xFF:
            self.note(f"byte 0x{data[i]:02X} at offset {i} where a marker should be")
            # After a stray byte between scans: back to skipping entropy-coded data.
            return -1 if not self.scans else _next_marker(data, i, n)
        m = data[i + 1]
        if m == 0xFF:
            self.note(f"fill bytes before a marker at offset {i}")
            return i + 1
        if m in _STANDALONE:
            self.note(f"stray marker 0x{m:02X} at offset {i}")
            return i + 2
        if m == 0xD9:  # end of image
            if not self.scans:
                self.note("end of image before any scan")
            self.n = i  # for the first scan's size
            return -1
        length = (data[i + 2] << 8) | data[i + 3] if i + 4 <= n else 0
        end = i + 2 + length
        if i + 4 > n or length < 2 or end > n:
            return self._cut_segment(i, m, length)
        if m == 0xDA:
            return self._scan(i, length, end)
        if m in _SOF_MARKERS:
            self._frame_header(i, m, length)
        elif m in _TABLES:
            self._tables(i, m, length, end)
        elif m in _OPAQUE:
            self._opaque(i, m, length, end)
        elif m == 0xDC:
            self.note("a DNL marker (the image height comes after the scan)")
        else:
            self.note(f"unexpected marker 0x{m:02X} at offset {i}")
        # Between scans, anything that is not a marker segment is taken for entropy-coded data.
        return end if not self.scans else _next_marker(data, end, n)

    def _cut_segment(self, i: int, m: int, length: int) -> int:
        """A segment whose length field is cut off, too small, or runs past the end of the data."""
        data, n = self.data, self.n
        if i + 4 > n:
            if not self.scans:
                self.note("cut inside the header")
            return -1
        self.note(f"segment 0x{m:02X} at offset {i} runs past the end of the data ({length} bytes)")
        if self.scans:
            return _next_marker(data, i + 2, n)
        if m in _SOF_MARKERS and self.frame is None and i + 9 <= n:  # the size, for the limits
            h = self.h
            h.frame, h.precision = m, data[i + 4]
            h.height, h.width = (data[i + 5] << 8) | data[i + 6], (data[i + 7] << 8) | data[i + 8]
        return -1

    def _frame_header(self, i: int, m: int, length: int) -> None:
        data, h = self.data, self.h
        if self.frame is not None:
            self.note(f"a second frame header ({_SOF_NAMES[m]}) at offset {i}")
            return
        self.frame = m
        h.frame, h.precision = m, data[i + 4] if length > 2 else 0
        if length >= 7:
            h.height, h.width = (data[i + 5] << 8) | data[i + 6], (data[i + 7] << 8) | data[i + 8]
        nf = data[i + 9] if length >= 8 else 0
        comps = self.comps
        if length == 8 + 3 * nf:
            for k in range(i + 10, i + 10 + 3 * nf, 3):
                comps.append((data[k], data[k + 1] >> 4, data[k + 1] & 15, data[k + 2]))
            h.components = tuple(comps)
            self.index_of = {c[0]: k for k, c in enumerate(comps)}
            if nf:
                self.hmax = max(c[1] for c in comps)
                self.vmax = max(c[2] for c in comps)
            self.scanned = [0] * nf
            if m in _PROGRESSIVE:
                self.coef = [[-1] * 64 for _ in range(nf)]
        if self.problem is None:
            self.problem = _check_frame(m, length, h, comps, self.index_of, self.hmax, self.vmax, self.adobe)

    def _tables(self, i: int, m: int, length: int, end: int) -> None:
        """DHT, DQT, DRI and DAC segments."""
        data = self.data
        if m == 0xC4:
            seg = data[i + 4 : end]
            result = _DHT_CACHE.get(seg)
            if result is None:
                result = _check_dht(data, i + 4, end)
                if len(_DHT_CACHE) >= _DHT_CACHE_SIZE:
                    _DHT_CACHE.clear()
                _DHT_CACHE[seg] = result
            if result[0] is not None:
                self.note(result[0])
            self.huff |= result[1]
        elif m == 0xDB:
            k = i + 4
            while k < end:
                pq, tq = data[k] >> 4, data[k] & 15
                if pq > 1 or tq > 3:
                    self.note(f"quantization table with precision {pq} and id {tq}")
                    return
                self.quant |= 1 << tq
                k += 65 + 64 * pq
            if k != end:
                self.note(f"quantization table segment of {length} bytes does not match its tables")
        elif m == 0xDD:
            if length != 4:
                self.note(f"restart interval segment of {length} bytes (4 expected)")
            else:
                self.restart = (data[i + 4] << 8) | data[i + 5]
        elif length % 2 or self.frame is not None and self.frame not in _ARITHMETIC:  # DAC
            self.note(f"arithmetic conditioning segment (DAC) of {length} bytes in a Huffman-coded frame")

    def _opaque(self, i: int, m: int, length: int, end: int) -> None:
        """APPn and COM: only the Adobe segment (CMYK/YCCK) and, before the first scan, EXIF and XMP matter."""
        data = self.data
        if m == 0xEE and length >= 14 and data[i + 4 : i + 9] == b"Adobe":
            self.adobe = True
        elif m == 0xE1 and not self.scans:  # Pillow reads the segments up to the first scan only
            if data.startswith(b"Exif\0\0", i + 4):
                self.exif.append(data[i + 4 if not self.exif else i + 10 : end])
            elif data.startswith(_XMP, i + 4):
                self.xmp = data[i + 4 + len(_XMP) : end]

    def _scan(self, i: int, length: int, end: int) -> int:
        """A scan header and its entropy-coded data; the offset of the marker after the data, or -1."""
        data, h = self.data, self.h
        frame = self.frame
        if frame is None:
            self.note("a scan before any frame header")
            return -1
        self.scans += 1
        scans = self.scans
        if scans == 1:
            h.complete = end < self.n
            self.first_data = end
        elif scans == 2:
            h.first_scan_bytes = i - self.first_data
        if scans > _DALI_MAX_SCANS:
            self.note(f"more than {_DALI_MAX_SCANS} scans (DALI refuses them)")
        if scans > h.scan_limit:
            return -1
        ns = data[i + 4] if length >= 3 else 0
        if self.problem is None:
            self.problem = _check_scan(data, i, length, ns, frame, self.comps, self.index_of, self.quant, self.huff,
                                       self.restart, self.scanned, self.coef)
        whole = length == 6 + 2 * ns and ns > 0
        if scans == 1 and whole and frame in (0xC0, 0xC1, 0xC2) and data[i + 5 + 2 * ns] == 0:
            h.first_scan_units = _data_units(data, i, ns, self.comps, self.index_of, h.width or 0, h.height or 0,
                                             self.hmax, self.vmax)
        if self.problem is not None:  # only the next marker matters
            j = _next_marker(data, end, self.n)
        else:
            mcus = _scan_mcus(data, i, ns, self.comps, self.index_of, h.width or 0, h.height or 0,
                              self.hmax, self.vmax) if whole and self.restart else 0
            j, self.problem = _skip_entropy_data(data, end, self.n, self.restart, mcus, scans)
        if j < 0:
            j = self.n
        return j if j < self.n else -1

    def finish(self) -> JpegHeader:
        h = self.h
        h.scans = self.scans
        if self.scans == 1:
            h.first_scan_bytes = self.n - self.first_data
        if self.frame is None:
            h.complete = False
        elif self.scans and self.frame not in _PROGRESSIVE and 0 in self.scanned:
            self.note(f"component {self.comps[self.scanned.index(0)][0]} is never scanned")
        h.size = self.n
        h.orientation = pillow_orientation(b"".join(self.exif) if self.exif else None, self.xmp)
        if h.orientation is None:
            self.note("EXIF that Pillow's reader fails on (only Pillow can say what it makes of it)")
        h.problem = self.problem
        return h


# A marker that is not stuffing (0xFF 0x00), a restart marker or a fill byte: what ends entropy-coded data.
_NEXT_MARKER = re.compile(rb"\xff[\x01-\xcf\xd8-\xfe]")
_MARKER_OR_RESTART = re.compile(rb"\xff[^\x00\xff]")  # the same, or a restart marker
# Restart markers checked one by one in a scan; beyond these, their counts per kind (C speed).
_RESTARTS_IN_ORDER = 64


def _next_marker(data: bytes, pos: int, n: int) -> int:
    """The offset of the next marker at or after ``pos`` (before ``n``) that is not stuffing, a restart or a
    fill byte; -1 if none."""
    found = _NEXT_MARKER.search(data, pos, n)
    return found.start() if found else -1


def _skip_entropy_data(data: bytes, start: int, n: int, interval: int, mcus: int, scan: int):
    """``(end, problem)``: where the entropy-coded data from ``start`` ends (the next marker, -1 if none) and
    what is wrong with its restart markers: any without a restart ``interval``, more than the scan's ``mcus``
    allow (0: unknown), or out of order (RST0, RST1, ..., RST7, RST0, ...). The first
    ``_RESTARTS_IN_ORDER`` are checked one by one in the same C-level search that finds the end; the rest
    by their counts per kind, so that the Python-level work per scan is bounded."""
    allowed = -(-mcus // interval) - 1 if mcus and interval else -1
    seen = 0
    problem = None
    for found in _MARKER_OR_RESTART.finditer(data, start, n):
        c = data[found.start() + 1] - 0xD0
        if not 0 <= c <= 7:
            return found.start(), problem
        if not interval:
            problem = f"restart marker RST{c} in scan {scan}, without a restart interval"
        elif seen == allowed:
            problem = f"more restart markers in scan {scan} than its {mcus} MCUs have intervals of {interval}"
        elif c != seen & 7:
            problem = f"restart marker RST{c} in scan {scan} where RST{seen & 7} was due"
        seen += 1
        if problem is not None or seen == _RESTARTS_IN_ORDER:
            break
    else:
        return -1, problem
    rest = found.end()
    end = _next_marker(data, rest, n)
    if problem is not None:
        return end, problem
    counts = [data.count(bytes((0xFF, 0xD0 + k)), rest, n if end < 0 else end) for k in range(8)]
    total = seen + sum(counts)
    if allowed >= 0 and total > allowed:
        return end, f"more restart markers in scan {scan} than its {mcus} MCUs have intervals of {interval}"
    # In order, the markers after the first 64 (a multiple of 8) are RST0..RST7 repeated: RSTk (total - 64) // 8
    # times, one more for k below the remainder.
    left = total - seen
    if counts != [left // 8 + (k < left % 8) for k in range(8)]:
        return end, f"restart markers in scan {scan} out of order (after the first {seen})"
    return end, None


def _check_frame(m, length, h, comps, index_of, hmax, vmax, adobe) -> Optional[str]:
    if m not in _DALI_FRAMES:
        kind = "lossless" if m in (0xC3, 0xC7, 0xCB, 0xCF) else "hierarchical" if m in (0xC5, 0xC6, 0xCD, 0xCE) else ""
        return f"{_SOF_NAMES[m]} ({kind + ' ' if kind else ''}frame) is not for DALI"
    if length < 8 or length != 8 + 3 * len(comps):
        return f"frame header of {length} bytes does not match its component count"
    if h.precision != 8:
        return f"{h.precision}-bit samples (only 8-bit JPEGs go to DALI)"
    if not h.width or not h.height:
        return f"frame size {h.width}x{h.height} (a zero height needs a DNL marker)"
    nf = len(comps)
    if nf == 4:
        if not adobe:
            return "4 components without an Adobe segment saying CMYK or YCCK"
    elif nf not in (1, 3):
        return f"{nf} components in the frame (1, 3 or 4 expected)"
    if len(index_of) != nf:
        return "component ids are not unique in the frame header"
    for cid, hs, vs, tq in comps:
        if not (1 <= hs <= 4 and 1 <= vs <= 4):
            return f"component {cid} has sampling factors {hs}x{vs}"
        if tq > 3:
            return f"component {cid} uses quantization table {tq}"
    sampling = tuple((c[1], c[2]) for c in comps)
    if sampling not in _SAMPLINGS:
        return "sampling factors " + ", ".join(f"{hs}x{vs}" for hs, vs in sampling) + " are not a usual subsampling"
    return None


def _check_dht(data: bytes, k: int, end: int) -> Tuple[Optional[str], int]:
    """``(problem, defined)``: what is wrong with a DHT segment's tables, and a bit mask of the tables it defines."""
    defined = 0
    while k < end:
        if k + 17 > end:
            return "Huffman table segment cut inside a table", defined
        tc, th = data[k] >> 4, data[k] & 15
        if tc > 1 or th > 3:
            return f"Huffman table of class {tc} and id {th}", defined
        counts = data[k + 1 : k + 17]
        total = sum(counts)
        if total == 0 or total > 256:
            return f"Huffman table with {total} codes", defined
        code = 0
        for bits, count in enumerate(counts, 1):
            code += count
            if code >= 1 << bits:  # more codes than the length allows (libjpeg: "Bogus Huffman table")
                return "Huffman table with more codes than their lengths allow", defined
            code <<= 1
        if k + 17 + total > end:
            return "Huffman table segment cut inside a table", defined
        if tc == 0 and max(data[k + 17 : k + 17 + total]) > 15:
            return "DC Huffman table with a symbol over 15", defined
        defined |= 1 << (th + 4 * tc)
        k += 17 + total
    return None, defined


def _check_scan(data, i, length, ns, frame, comps, index_of, quant, huff, restart, scanned, coef) -> Optional[str]:
    """What is wrong with the scan header at ``i``, given the frame and the tables defined so far."""
    if not 1 <= ns <= 4 or length != 6 + 2 * ns:
        return f"scan header of {length} bytes with {ns} components"
    k = i + 5 + 2 * ns
    ss, se, ah, al = data[k], data[k + 1], data[k + 2] >> 4, data[k + 2] & 15
    progressive = frame in _PROGRESSIVE
    huffman = frame not in _ARITHMETIC
    if progressive:
        if ss == 0:
            if se != 0:
                return f"progressive scan of DC and AC together (Ss=0, Se={se})"
        elif se < ss or se > 63 or ns != 1:
            return f"progressive AC scan with Ss={ss}, Se={se} over {ns} components"
        if al > 13 or (ah and al != ah - 1):
            return f"progressive scan with successive approximation Ah={ah}, Al={al}"
    elif (ss, se, ah, al) != (0, 63, 0, 0):
        return f"sequential scan with Ss={ss}, Se={se}, Ah={ah}, Al={al}"
    last = -1
    blocks = 0
    for k in range(i + 5, i + 5 + 2 * ns, 2):
        cid = data[k]
        ci = index_of.get(cid)
        if ci is None:
            return f"scan component {cid} is not in the frame"
        if ci <= last:
            return f"scan components out of frame order or repeated (component {cid})"
        last = ci
        _, hs, vs, tq = comps[ci]
        blocks += hs * vs
        if not quant >> tq & 1:
            return f"component {cid} uses quantization table {tq}, never defined"
        td, ta = data[k + 1] >> 4, data[k + 1] & 15
        if td > 3 or ta > 3:
            return f"scan component {cid} names entropy tables {td} and {ta}"
        if huffman:
            if ss == 0 and ah == 0 and not huff >> td & 1:
                return f"component {cid} uses DC Huffman table {td}, never defined"
            if se and not huff >> (4 + ta) & 1:
                return f"component {cid} uses AC Huffman table {ta}, never defined"
        if progressive:
            bits = coef[ci]
            if ss and bits[0] < 0:
                return f"AC scan of component {cid} before its DC scan"
            band = bits[ss : se + 1]
            if band.count(ah if ah else -1) != len(band):
                return f"scan {ss}..{se} (Ah={ah}) of component {cid} does not follow the coefficients' progression"
            bits[ss : se + 1] = [al] * len(band)
        else:
            scanned[ci] += 1
            if scanned[ci] > 1:
                return f"component {cid} is scanned twice in a sequential frame"
    if ns > 1 and blocks > 10:
        return f"more than 10 blocks in an MCU ({blocks})"
    return None


def _scan_mcus(data, i, ns, comps, index_of, width, height, hmax, vmax) -> int:
    """The MCUs of the scan at ``i`` (a single-component scan's MCU is one block); 0 if unknown."""
    if ns == 1:
        return _data_units(data, i, ns, comps, index_of, width, height, hmax, vmax)
    if not hmax or not vmax:
        return 0
    return ((width + 8 * hmax - 1) // (8 * hmax)) * ((height + 8 * vmax - 1) // (8 * vmax))


def pillow_orientation(exif: Optional[bytes], xmp: Optional[bytes]) -> Optional[int]:
    """The EXIF orientation that Pillow's ``ImageOps.exif_transpose`` applies to a JPEG (2..8; 1: none), or None
    where Pillow's EXIF reader raises (then only a Pillow decode can say what Pillow makes of the image).

    ``exif``: the APP1 "Exif" segments before the first scan, joined as Pillow 12's JPEG reader does (the first
    whole, each later one without its ``Exif\\0\\0``), so that the tag is read from the first segment's TIFF
    header, by Pillow's own ``Image.Exif``; ``xmp``: the last APP1 XMP packet before the first scan, searched
    (only when the EXIF has no Orientation tag) for ``tiff:Orientation="N"`` or ``<tiff:Orientation>N``, as
    ``Image.getexif`` does. Values Pillow maps to no transposition (0, 1, 9, a string...) give 1.
    """
    value = None
    if exif is not None:
        from PIL import Image

        try:
            tags = Image.Exif()
            tags.load(exif)
            if 0x0112 in tags:
                value = tags[0x0112]
        except Exception:  # Pillow's TIFF reader raises many types on broken EXIF
            return None
    if value is None and xmp:
        found = _XMP_ORIENTATION.search(xmp)
        if found:
            value = int(found[2])
    try:
        return _TRANSPOSED.get(value, 1)
    except TypeError:  # unhashable: Pillow's exif_transpose raises on it
        return None


def _data_units(data, i, ns, comps, index_of, width, height, hmax, vmax) -> int:
    """8x8 blocks coded by the scan at ``i`` (ITU T.81 A.2: interleaved scans code whole MCUs); 0 if unknown."""
    if not hmax or not vmax:
        return 0
    if ns == 1:
        ci = index_of.get(data[i + 5])
        if ci is None:
            return 0
        _, hs, vs, _ = comps[ci]
        # The component's own size, ceil(X * H / Hmax) by ceil(Y * V / Vmax) samples, in whole blocks.
        return ((-(-width * hs // hmax) + 7) // 8) * ((-(-height * vs // vmax) + 7) // 8)
    blocks = 0
    for k in range(i + 5, i + 5 + 2 * ns, 2):
        ci = index_of.get(data[k])
        if ci is None:
            return 0
        blocks += comps[ci][1] * comps[ci][2]
    return ((width + 8 * hmax - 1) // (8 * hmax)) * ((height + 8 * vmax - 1) // (8 * vmax)) * blocks


def dali_rejects(data: bytes) -> Optional[str]:
    """None when the JPEG's structure is sane enough to give it to DALI; otherwise a short reason why not.

    Stricter than ``has_complete_header`` (which it includes): only 8-bit baseline, extended or progressive
    DCT frames (Huffman or arithmetic), 1 or 3 components (4 with an Adobe segment), unique component ids, a
    usual subsampling (gray, 4:4:4, 4:2:2, 4:4:0, 4:2:0, 4:1:1, 4:1:0), whole segments whose lengths match
    their contents, one frame header, no unknown or stray markers and no fill bytes, valid Huffman tables,
    scans whose components are in the frame (in frame order), whose quantization and Huffman tables were
    defined before them, whose spectral selection and successive approximation fit the frame type and, for
    progressive frames, the progression so far; restart markers in order and only with a restart interval;
    every component of a sequential frame scanned once; at most 256 scans.

    DALI 2.4's CPU decoder segfaulted on batches holding JPEGs with a frame header whose length disagrees
    with its component count, a precision other than 8, a second frame header, or a stray standalone marker
    before the scan (measured with structure-aware mutants, batches of 64 in fresh processes); no batch of
    mutants that pass this check crashed. Anything refused here goes to Pillow, so strictness costs only speed.
    """
    header = parse_jpeg(data)
    return NOT_A_JPEG if header is None else header.dali_rejects()


def implausible(data: bytes, max_scans: int = DEFAULT_MAX_SCANS) -> Optional[str]:
    """A reason to fail the image as over a limit before decoding it, or None.

    - more than ``MAX_MARKERS`` markers (the walk stops there);
    - more than ``max_scans`` scans (a progressive JPEG's decode time grows with its scan count);
    - a frame header claiming more pixels than the bytes can code: in a Huffman-coded DCT frame every 8x8 block
      of a DC scan costs at least one bit, so the first scan's entropy-coded bytes must number at least its
      blocks / 8. (Decoders fill missing data with gray: a 632-byte file claiming 9400x9400 decodes to 265 MB.)
      Arithmetic-coded frames, and a first scan of AC coefficients (end-of-band runs), have no such floor:
      they are held to 1 bit per 8x8 block (of the frame's size) over the whole file;
    - ``decode_cost`` (pixels x scans, plus the bytes) over ``MAX_DECODE_COST``, the decode cost bound.

    None for bytes that are not a JPEG with a frame header (the decoder reports those).
    """
    header = parse_jpeg(data, max_scans)
    return None if header is None else header.implausible()


def jpeg_dimensions(data: bytes) -> Optional[Tuple[int, int]]:
    """Returns ``(width, height)`` from the first start-of-frame segment, or None if none is found."""
    header = parse_jpeg(data)
    if header is None or header.width is None:
        return None
    return header.width, header.height


def frame_size(data) -> Optional[Tuple[int, int]]:
    """``(width, height)`` of the first start-of-frame segment, found by skipping the segments before it (a few
    microseconds: no checks, no scan data walked); None when the bytes do not lead to one plainly (then ask
    ``image_dimensions``)."""
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    i = 2
    for _ in range(256):  # segments before the frame: APPn, COM, DQT, DHT, DRI; a few in practice
        while i < n and data[i] == 0xFF and i + 1 < n and data[i + 1] == 0xFF:
            i += 1  # fill bytes
        if i + 4 > n or data[i] != 0xFF:
            return None
        m = data[i + 1]
        if 0xC0 <= m <= 0xCF and m not in (0xC4, 0xC8, 0xCC):
            if i + 9 > n:
                return None
            height = (data[i + 5] << 8) | data[i + 6]
            width = (data[i + 7] << 8) | data[i + 8]
            return (width, height) if width and height else None
        if m in (0xD9, 0xDA) or 0xD0 <= m <= 0xD7 or m == 0x01:
            return None
        i += 2 + ((data[i + 2] << 8) | data[i + 3])
    return None


def has_complete_header(data: bytes) -> bool:
    """True when the bytes hold a JPEG whose marker segments, a frame header and a whole scan header included,
    are complete and followed by scan data. ``dali_rejects`` checks this and more.
    """
    header = parse_jpeg(data)
    return header is not None and header.complete


def over_limits(header: Optional[JpegHeader], dims: Optional[Tuple[int, int]], max_pixels: int) -> Optional[str]:
    """Why an image must not be decoded at all, or None: a frame of ``dims`` (width, height) over
    ``max_pixels``, or ``header.implausible()`` (too many scans, more pixels than its bytes can code)."""
    if dims is not None and dims[0] * dims[1] > max_pixels:
        return f"header claims {dims[0]}x{dims[1]} = {dims[0] * dims[1]} pixels, over max_pixels={max_pixels}"
    return header.implausible() if header is not None else None


class OverLimitError(ValueError):
    """Pillow refused to even open an image this large (its own decompression-bomb check)."""


def image_dimensions(data: bytes, header: Optional[JpegHeader] = None) -> Optional[Tuple[int, int]]:
    """JPEG header first; for anything else (a PNG named .jpg, junk before a marker) Pillow's lazy open.

    ``header``: ``parse_jpeg(data)`` when the caller has it already (one walk for the size and ``implausible``).
    Raises OverLimitError where Pillow refuses to open the image for its size.
    """
    if header is None:
        header = parse_jpeg(data)
    if header is not None and header.width is not None:
        return header.width, header.height
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except Image.DecompressionBombError as e:
        raise OverLimitError(f"Pillow: {e}") from e
    except Exception:  # not an image Pillow knows either: the decoder will report it
        return None
