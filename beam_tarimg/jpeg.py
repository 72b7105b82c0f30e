"""Reading a JPEG's structure from its bytes, without decoding it: sizes, sanity, plausibility.

One walk over the marker segments (``parse_jpeg``) serves every question asked before a decode:

- ``jpeg_dimensions`` / ``image_dimensions``: the size the frame header claims (the decompression-bomb guard);
- ``has_complete_header``: a frame header and a whole scan header, followed by scan data;
- ``dali_rejects``: a reason to keep the bytes away from DALI, whose decoder can crash the process (not raise)
  on JPEGs whose structure is wrong (FIELD-NOTES: a changed SOF component count, flipped SOF/SOS bytes,
  inserted, deleted or repeated markers, corrupt tables). Such files go to the Pillow fallback instead, which
  reports or decodes them; so the check errs on the strict side: an odd but valid file costs only speed;
- ``implausible``: a reason for a ``limit`` failure before any decode: a frame header claiming more pixels
  than the file's bytes can encode, or more progressive scans than a limit.

The walk reads the marker segments and skips the entropy-coded data with ``bytes.find`` (in entropy data a
0xFF byte is always followed by 0x00, a restart marker or a fill byte): its time grows with the number of
segments and of 0xFF bytes, not with the image's size, and it stops after ``max_scans + 1`` scans. Measured:
about 13 us of CPU for a ~30 KB ImageNet-sized baseline JPEG, 40 us for a progressive one (10 scans), against
~400 and ~900 us for Pillow to decode them. Pure Python, no dependencies.
"""

from __future__ import annotations

import io
import re
from typing import Dict, List, Optional, Tuple

# Pillow's decompression-bomb threshold (PIL.Image.MAX_IMAGE_PIXELS): 1024 * 1024 * 1024 // 4 // 3.
DEFAULT_MAX_PIXELS = 89_478_485

# The most scans a JPEG may have before it is a ``limit`` failure. Encoders write 6-10 (libjpeg's default
# progression), a few dozen at most (mozjpeg's scan optimisation); DALI refuses more than 256 (it raises, and
# Pillow then decodes them). Each scan is a pass over the whole image: a file of 8000x8000 with 20,000 scans
# took 167 s in Pillow (~8 ms per scan), so 256 scans of an image at max_pixels cost about 3 s.
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

# In entropy-coded data: a marker or a restart marker (not a stuffed 0x00, not a fill byte).
_MARKER_OR_RESTART = re.compile(rb"\xff[^\x00\xff]")

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
    """

    __slots__ = (
        "width", "height", "frame", "precision", "components", "scans", "scan_limit", "complete", "problem",
        "first_scan_units", "first_scan_bytes",
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

    def dali_rejects(self) -> Optional[str]:
        """See the module function ``dali_rejects``."""
        if not self.complete:
            return self.problem or "not a complete JPEG (no whole frame and scan header followed by data)"
        return self.problem

    def implausible(self) -> Optional[str]:
        """See the module function ``implausible``; ``max_scans`` is the one given to ``parse_jpeg``."""
        if self.scans > self.scan_limit:
            return f"more than max_scans={self.scan_limit} scans"
        if self.first_scan_units and self.first_scan_bytes * 8 < self.first_scan_units:
            return (
                f"header claims {self.width}x{self.height}, but the first scan's {self.first_scan_bytes} bytes "
                f"cannot code its {self.first_scan_units} 8x8 blocks (at least 1 bit each)"
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
    data with ``bytes.find``; never decodes anything. Stops after ``max_scans + 1`` scans, so its time is
    bounded by that and by the number of 0xFF bytes in the data.
    """
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    h = JpegHeader()
    h.scan_limit = max_scans
    problem: Optional[str] = None
    find = data.find

    frame = None  # the frame marker
    comps: List[Tuple[int, int, int, int]] = []
    index_of: Dict[int, int] = {}  # component id -> index in comps
    hmax = vmax = 1
    quant = 0  # bit t: quantization table t defined
    huff = 0  # bit t: DC table t defined; bit 4 + t: AC table t defined
    restart = 0
    adobe = False
    scanned: List[int] = []  # per component: scans so far (sequential frames)
    coef: List[List[int]] = []  # per component: the successive-approximation bit of each coefficient (progressive)
    scans = 0
    first_data = 0  # where the first scan's entropy-coded data starts
    i = 2
    while True:
        if i + 2 > n:  # the data ends (before a scan: cut inside the header)
            if scans == 0 and problem is None:
                problem = "cut inside the header"
            break
        if data[i] != 0xFF:
            if problem is None:
                problem = f"byte 0x{data[i]:02X} at offset {i} where a marker should be"
            if scans == 0:
                break
            i = _next_marker(data, i, n)  # after a stray marker between scans: back to skipping entropy data
            if i < 0:
                break
            continue
        m = data[i + 1]
        if m == 0xFF:  # a fill byte
            if problem is None:
                problem = f"fill bytes before a marker at offset {i}"
            i += 1
            continue
        if m in _STANDALONE:
            if problem is None:
                problem = f"stray marker 0x{m:02X} at offset {i}"
            i += 2
            continue
        if m == 0xD9:  # end of image
            if scans == 0 and problem is None:
                problem = "end of image before any scan"
            n = i  # for the first scan's size below
            break
        if i + 4 > n:
            if scans == 0 and problem is None:
                problem = "cut inside the header"
            break
        length = (data[i + 2] << 8) | data[i + 3]
        end = i + 2 + length
        if length < 2 or end > n:
            if problem is None:
                problem = f"segment 0x{m:02X} at offset {i} runs past the end of the data ({length} bytes)"
            if scans == 0:
                if m == 0xDA and frame is not None and length >= 2:
                    pass  # a scan header cut short: not complete
                elif m in _SOF_MARKERS and frame is None and i + 9 <= n:
                    h.frame, h.precision = m, data[i + 4]
                    h.height, h.width = (data[i + 5] << 8) | data[i + 6], (data[i + 7] << 8) | data[i + 8]
                break
            i = _next_marker(data, i + 2, n)
            if i < 0:
                break
            continue

        if m == 0xDA:  # start of scan
            if frame is None:
                if problem is None:
                    problem = "a scan before any frame header"
                break
            scans += 1
            if scans == 1:
                h.complete = end < n
                first_data = end
            elif scans == 2:
                h.first_scan_bytes = i - first_data
            if scans > _DALI_MAX_SCANS and problem is None:
                problem = f"more than {_DALI_MAX_SCANS} scans (DALI refuses them)"
            if scans > max_scans:
                break
            ns = data[i + 4] if length >= 3 else 0
            if problem is None:
                problem = _check_scan(data, i, length, ns, frame, comps, index_of, quant, huff, restart, scanned, coef)
            if scans == 1:
                units = 0
                if frame in (0xC0, 0xC1, 0xC2) and length == 6 + 2 * ns and ns and data[i + 5 + 2 * ns] == 0:
                    units = _data_units(data, i, ns, comps, index_of, h.width or 0, h.height or 0, hmax, vmax)
                h.first_scan_units = units
            # Skip the entropy-coded data: a 0xFF there is followed by 0x00 (stuffing), a restart marker or a fill.
            pos = end
            rst = 0
            steps = 0
            try:
                while True:
                    if steps < 32:  # bytes.find (memchr) is fastest while 0xFF bytes are few
                        j = find(b"\xff", pos)
                        steps += 1
                    else:  # then one C-level pass that skips stuffed bytes too
                        found = _MARKER_OR_RESTART.search(data, pos)
                        j = found.start() if found else -1
                    if j < 0:
                        j = n
                        break
                    c = data[j + 1]
                    if not c:
                        pos = j + 2
                        continue
                    if 0xD0 <= c <= 0xD7:
                        if problem is None:
                            if not restart:
                                problem = f"restart marker RST{c - 0xD0} in scan {scans}, without a restart interval"
                            elif c != 0xD0 + rst:
                                problem = f"restart marker RST{c - 0xD0} in scan {scans} where RST{rst} was due"
                        rst = (rst + 1) & 7
                        pos = j + 2
                    elif c == 0xFF:
                        pos = j + 1
                    else:
                        break
            except IndexError:  # 0xFF as the last byte
                j = n
            i = j
            continue

        if m in _SOF_MARKERS:
            if frame is not None:
                if problem is None:
                    problem = f"a second frame header ({_SOF_NAMES[m]}) at offset {i}"
            else:
                frame = m
                h.frame, h.precision = m, data[i + 4] if length > 2 else 0
                if length >= 7:
                    h.height, h.width = (data[i + 5] << 8) | data[i + 6], (data[i + 7] << 8) | data[i + 8]
                nf = data[i + 9] if length >= 8 else 0
                if length == 8 + 3 * nf:
                    for k in range(i + 10, i + 10 + 3 * nf, 3):
                        comps.append((data[k], data[k + 1] >> 4, data[k + 1] & 15, data[k + 2]))
                    h.components = tuple(comps)
                    index_of = {c[0]: k for k, c in enumerate(comps)}
                    if nf:
                        hmax = max(c[1] for c in comps)
                        vmax = max(c[2] for c in comps)
                    scanned = [0] * nf
                    if m in _PROGRESSIVE:
                        coef = [[-1] * 64 for _ in range(nf)]
                if problem is None:
                    problem = _check_frame(m, length, h, comps, index_of, hmax, vmax, adobe)
        elif m == 0xC4:
            result = _DHT_CACHE.get(data[i + 4 : end])
            if result is None:
                result = _check_dht(data, i + 4, end)
                if len(_DHT_CACHE) >= _DHT_CACHE_SIZE:
                    _DHT_CACHE.clear()
                _DHT_CACHE[data[i + 4 : end]] = result
            if problem is None and result[0] is not None:
                problem = result[0]
            huff |= result[1]
        elif m == 0xDB:
            k = i + 4
            while k < end:
                pq, tq = data[k] >> 4, data[k] & 15
                if pq > 1 or tq > 3:
                    if problem is None:
                        problem = f"quantization table with precision {pq} and id {tq}"
                    break
                quant |= 1 << tq
                k += 65 + 64 * pq
            if k != end and problem is None:
                problem = f"quantization table segment of {length} bytes does not match its tables"
        elif m == 0xDD:
            if length != 4:
                if problem is None:
                    problem = f"restart interval segment of {length} bytes (4 expected)"
            else:
                restart = (data[i + 4] << 8) | data[i + 5]
        elif m in _OPAQUE:
            if m == 0xEE and length >= 14 and data[i + 4 : i + 9] == b"Adobe":
                adobe = True
        elif m == 0xCC:  # arithmetic conditioning tables
            if problem is None and (length % 2 or frame is not None and frame not in _ARITHMETIC):
                problem = f"arithmetic conditioning segment (DAC) of {length} bytes in a Huffman-coded frame"
        elif problem is None:
            if m == 0xDC:
                problem = "a DNL marker (the image height comes after the scan)"
            else:
                problem = f"unexpected marker 0x{m:02X} at offset {i}"
        if scans == 0:
            i = end
        else:  # between scans; anything that is not a marker segment is treated as entropy-coded data
            i = _next_marker(data, end, n)
            if i < 0:
                break

    h.scans = scans
    if scans == 1:
        h.first_scan_bytes = n - first_data
    if frame is None:
        h.complete = False
    elif problem is None and scans and frame not in _PROGRESSIVE and 0 in scanned:
        problem = f"component {comps[scanned.index(0)][0]} is never scanned"
    h.problem = problem
    return h


def _next_marker(data: bytes, pos: int, n: int) -> int:
    """The offset of the next marker at or after ``pos`` that is not stuffing, a restart or a fill; -1 if none."""
    find = data.find
    try:
        while True:
            j = find(b"\xff", pos)
            if j < 0:
                return -1
            c = data[j + 1]
            if not c or 0xD0 <= c <= 0xD7:
                pos = j + 2
            elif c == 0xFF:
                pos = j + 1
            else:
                return j
    except IndexError:  # 0xFF as the last byte
        return -1


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

    - more than ``max_scans`` scans (a progressive JPEG's decode time grows with its scan count);
    - a frame header claiming more pixels than the bytes can code: in a Huffman-coded DCT frame every 8x8 block
      of a DC scan costs at least one bit, so the first scan's entropy-coded bytes must number at least its
      blocks / 8. (Decoders fill missing data with gray: a 632-byte file claiming 9400x9400 decodes to 265 MB.)
      Arithmetic-coded frames, and a first scan of AC coefficients (end-of-band runs), have no such bound.

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
