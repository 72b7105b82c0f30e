"""JPEG generators for the pixel and bound holes of issue 16, used by ``bench.mutate`` (``make fuzz``) and the tests.

Each generator takes ``(rng, base JPEG bytes)`` and returns ``(kind, bytes)`` like the mutators of
``bench.mutate``:

- ``orientation_segments``: one to three APP1 segments put after the SOI marker: EXIF blocks with an
  Orientation tag (0..9, either byte order, SHORT/LONG/BYTE, sometimes repeated in the IFD, sometimes none),
  broken EXIF blocks, XMP packets with ``tiff:Orientation`` in the attribute or the element form. The decoded
  pixels must equal Pillow's + ``ImageOps.exif_transpose`` (``PIXEL_KINDS``), whatever DALI thinks of them.
- ``cost_claim``: the frame claims 9400x9400 in a few KB, made arithmetic-coded (SOF9/SOF10) or given AC
  scans only; or a progressive file with 150-256 scans claiming a size whose pixels x scans is over the cost
  bound. Each must be a ``limit`` failure, never decoded (``LIMIT_KINDS``).
- ``restart_flood``: 1-4 MiB of restart markers before the EOI marker: the header walk must stay linear.
- ``marker_flood``: more than ``jpeg.MAX_MARKERS`` tiny COM segments before the frame: a ``limit`` failure.
"""

from __future__ import annotations

import random
import struct
from typing import List, Optional, Tuple

XMP_NAMESPACE = b"http://ns.adobe.com/xap/1.0/\x00"


def app1(payload: bytes) -> bytes:
    return b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload


def exif_segment(orientation: Optional[int], big_endian: bool = False, typ: int = 3, repeat: int = 1,
                 extra: int = 0) -> bytes:
    """An APP1 EXIF segment whose IFD0 holds ``repeat`` Orientation entries (type ``typ``: 1 BYTE, 3 SHORT,
    4 LONG) of ``orientation`` (none if None), after ``extra`` other (Software-like) entries."""
    e = ">" if big_endian else "<"
    entries: List[bytes] = []
    for k in range(extra):
        entries.append(struct.pack(e + "HHL", 0x0131 + k, 2, 4) + b"abc\0")  # an inline ASCII value
    if orientation is not None:
        size = {1: "B", 3: "H", 4: "L"}[typ]
        value = struct.pack(e + size, orientation).ljust(4, b"\0")
        entries += [struct.pack(e + "HHL", 0x0112, typ, 1) + value] * repeat
    ifd = struct.pack(e + "H", len(entries)) + b"".join(entries) + struct.pack(e + "L", 0)
    head = (b"MM\0*" if big_endian else b"II*\0") + struct.pack(e + "L", 8)
    return app1(b"Exif\0\0" + head + ifd)


def xmp_segment(orientation: int, form: str = "attribute") -> bytes:
    """An APP1 XMP packet with ``tiff:Orientation`` as an attribute or an element (the two forms Pillow reads)."""
    if form == "attribute":
        body = b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="%d"/>' % orientation
    else:
        body = b"<rdf:Description><tiff:Orientation>%d</tiff:Orientation></rdf:Description>" % orientation
    return app1(XMP_NAMESPACE + b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF>' + body + b"</rdf:RDF></x:xmpmeta>")


def with_segments(jpeg: bytes, *segments: bytes) -> bytes:
    """``jpeg`` with ``segments`` right after its SOI marker."""
    return jpeg[:2] + b"".join(segments) + jpeg[2:]


def _random_orientation_segment(rng: random.Random) -> bytes:
    roll = rng.random()
    if roll < 0.55:
        return exif_segment(
            rng.choice([None] + list(range(10))) if rng.random() < 0.15 else rng.randint(1, 8),
            big_endian=rng.random() < 0.5,
            typ=rng.choice((3, 3, 3, 4, 1)),
            repeat=rng.choice((1, 1, 1, 2)),
            extra=rng.choice((0, 0, 1, 3)),
        )
    if roll < 0.9:
        return xmp_segment(rng.randint(0, 9), rng.choice(("attribute", "element")))
    broken = [
        b"Exif\0\0",  # no TIFF data at all
        b"Exif\0\0XX*\0\x08\0\0\0",  # a byte order Pillow does not know (its reader raises)
        b"Exif\0\0II*\0\x08\0\0\0\x05\0\x12\x01\x03\0\x01\0\0\0\x06\0",  # IFD0 cut after its first entry
        b"Exif\0\0II*\0\xf0\xff\0\0",  # IFD0 past the end
    ]
    return app1(rng.choice(broken))


def orientation_segments(rng: random.Random, data: bytes) -> Tuple[str, bytes]:
    segments = [_random_orientation_segment(rng) for _ in range(rng.randint(1, 3))]
    return "orientation_segments", with_segments(data, *segments)


def _sof_at(data: bytes) -> int:
    for marker in (b"\xff\xc0", b"\xff\xc1", b"\xff\xc2"):
        i = data.find(marker)
        if i >= 0:
            return i
    raise ValueError("no SOF0/1/2 frame header")


def claim(data: bytes, width: int, height: int, frame: Optional[int] = None) -> bytes:
    """``data`` whose frame header claims ``width`` x ``height`` (and is of type ``frame``, when given)."""
    i = _sof_at(data)
    out = bytearray(data)
    out[i + 5 : i + 9] = struct.pack(">HH", height, width)
    if frame is not None:
        out[i + 1] = frame
    return bytes(out)


def _scans(data: bytes) -> List[Tuple[int, int]]:
    """(start, end) of each scan: its SOS segment and entropy-coded data, up to the next non-RST marker."""
    from beam_tarimg.jpeg import _next_marker

    out = []
    i = data.find(b"\xff\xda")
    while i >= 0:
        end = _next_marker(data, i + 2 + struct.unpack(">H", data[i + 2 : i + 4])[0], len(data))
        end = len(data) - 2 if end < 0 else end
        out.append((i, end))
        i = data.find(b"\xff\xda", end)
    return out


def ac_only(data: bytes) -> bytes:
    """A progressive ``data`` without its DC scans (those whose Ss is 0)."""
    scans = _scans(data)
    keep = bytearray(data[: scans[0][0]])
    for start, end in scans:
        ns = data[start + 4]
        if data[start + 5 + 2 * ns] != 0:  # Ss
            keep += data[start:end]
    return bytes(keep) + data[scans[-1][1] :]


def many_scans(data: bytes, total: int) -> bytes:
    """A progressive ``data`` whose last scan is repeated until it has ``total`` scans."""
    scans = _scans(data)
    start, end = scans[-1]
    return data[:end] + data[start:end] * (total - len(scans)) + data[end:]


def cost_claim(rng: random.Random, data: bytes) -> Tuple[str, bytes]:
    from bench.mutate import NotApplicable
    from beam_tarimg.jpeg import MAX_DECODE_COST

    try:
        sof = data[_sof_at(data) + 1]
    except ValueError:
        raise NotApplicable("no SOF0/1/2") from None
    way = rng.randrange(3)
    if way == 0:
        return "cost_claim", claim(data, 9400, 9400, 0xCA if sof == 0xC2 else 0xC9)  # arithmetic-coded
    if sof != 0xC2:
        raise NotApplicable("not progressive")
    if way == 1:
        return "cost_claim", claim(ac_only(data), 9400, 9400)
    scans = rng.randint(150, 256)
    side = int((MAX_DECODE_COST / scans) ** 0.5) + 64
    # Enough first-scan data for the claim (1 bit per block), so that only the cost bound refuses it.
    padded = data
    first = _scans(data)[0]
    need = side * side // 64 // 8 * 3
    padded = data[: first[1]] + b"\x2a" * need + data[first[1] :]
    return "cost_claim", claim(many_scans(padded, scans), side, side)


def restart_flood(rng: random.Random, data: bytes) -> Tuple[str, bytes]:
    cycle = bytes(b for k in range(8) for b in (0xFF, 0xD0 + k))
    size = rng.choice((1, 2, 4)) << 20
    return "restart_flood", data[:-2] + cycle * (size // 16) + data[-2:]


def marker_flood(rng: random.Random, data: bytes) -> Tuple[str, bytes]:
    from beam_tarimg.jpeg import MAX_MARKERS

    comment = b"\xff\xfe\x00\x03x"
    return "marker_flood", data[:2] + comment * (MAX_MARKERS + rng.randint(1, 500)) + data[2:]


# Kinds whose decoded pixels must equal Pillow's + exif_transpose (when Pillow decodes them too), and kinds that
# must be refused as over a limit without a decode.
PIXEL_KINDS = frozenset({"orientation_segments", "restart_flood"})
LIMIT_KINDS = frozenset({"cost_claim", "marker_flood"})
# (generator, weight) for bench.mutate.JPEG_MUTATORS; the floods are MBs each: few of them.
GENERATORS = ((orientation_segments, 6), (cost_claim, 1.5), (restart_flood, 0.3), (marker_flood, 0.5))


def check(kind: str, data: bytes, outcome, reference, tolerance: int = 0) -> List[str]:
    """What is wrong with the decode core's ``outcome`` for a mutant of ``kind`` (``reference``: the Pillow
    + exif_transpose decode, which may raise): pixels that differ from the reference, or a decode where a
    limit failure was due. ``tolerance``: the largest difference allowed where DALI decoded (a resize: DALI's
    filter and Pillow's round differently); the Pillow fallback must give the reference exactly."""
    pixels, who, error = outcome
    if kind in LIMIT_KINDS and not (error or "").startswith("not decoded"):
        return [f"{kind}: not refused before decoding ({who or error})"]
    if kind in PIXEL_KINDS and pixels is not None:
        try:
            expected = reference(data)
        except Exception:  # Pillow + exif_transpose fails on it: nothing to compare with
            return []
        if not matches(pixels, expected, 0 if who == "pillow" else tolerance):
            return [f"{kind}: decoded by {who} as {pixels.shape}, Pillow + exif_transpose gives {expected.shape}"
                    + (f" (more than {tolerance} apart)" if expected.shape == pixels.shape else "")]
    return []


def matches(pixels, expected, tolerance: int = 0) -> bool:
    """Same shape and dtype, and no value more than ``tolerance`` apart."""
    import numpy as np

    if expected.shape != pixels.shape or expected.dtype != pixels.dtype:
        return False
    if tolerance == 0:
        return bool((expected == pixels).all())
    return int(np.abs(pixels.astype(np.int16) - expected.astype(np.int16)).max()) <= tolerance


# ``bench.fuzz --resize``: the decode resizes every image as ``pipelines`` jobs do with ``--resize 64 --crop 48``
# (small: the bases are 32-160 px, so it both shrinks and enlarges). DALI's linear filter and Pillow's BILINEAR
# differ by at most 1 level on these inputs (measured: 13,000 mutants and good images, seeds 1-4), 2 allowed.
RESIZE_FLAGS = ("--resize", "64", "--crop", "48")
RESIZE_TOLERANCE = 2


def fuzz_resize():
    from beam_tarimg import Resize

    return Resize(64, crop=48)


def resized_reference(data: bytes):
    """Pillow's decode + exif_transpose + ``fuzz_resize()``'s Pillow path (what the fallback runs)."""
    import io

    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as im:
        return fuzz_resize().apply_pillow(ImageOps.exif_transpose(im).convert("RGB"))
