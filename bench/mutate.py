"""Seeded, structure-aware mutators for the fuzz harness (``bench.fuzz``): JPEGs and tar shards.

Every mutator is a plain function taking a ``random.Random`` and the bytes to mutate. JPEG mutators return
``(kind, bytes)``; tar mutators return a ``TarMutant`` (``kind``, ``data``, and what the harness must expect of
each JPEG member, see ``ExpectedMember``). Everything is deterministic for a given ``Random`` state.

The JPEG mutators work on the file split into its parts (``split_jpeg``): each marker segment, each run of
entropy-coded data, the SOI and EOI markers; so that a change lands on one field of one segment (a SOF
component count, a scan's Ah/Al) and everything around it stays valid. The tar mutators start from tarfile's
own output and change bytes of one member's header (fixing the checksum, so the change reaches the parser),
insert extension headers (PAX, GNU long name), cut the file, or append to it.
"""

from __future__ import annotations

import io
import random
import tarfile
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from beam_tarimg.sample import encode_jpeg, photo_like_image
from bench import fuzz_pixels as _fuzz_pixels

# ----------------------------------------------------------------------------------------------- JPEG parts

SOI, EOI, SOS, DHT, DQT, DRI, COM = 0xD8, 0xD9, 0xDA, 0xC4, 0xDB, 0xDD, 0xFE
SOF_MARKERS = tuple(m for m in range(0xC0, 0xD0) if m not in (0xC4, 0xC8, 0xCC))
APP_MARKERS = tuple(range(0xE0, 0xF0))
RST_MARKERS = tuple(range(0xD0, 0xD8))

Part = Tuple[Optional[int], bytes]  # (marker, bytes incl. FF xx and length) or (None, entropy-coded data)


class NotApplicable(Exception):
    """The mutator needs a part this JPEG does not have (e.g. an APPn segment); pick another base."""


def split_jpeg(data: bytes) -> List[Part]:
    """A well-formed JPEG as its parts, in order; ``b"".join`` of the parts' bytes gives ``data`` back."""
    if data[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG")
    parts: List[Part] = [(SOI, data[:2])]
    i, n = 2, len(data)
    while i < n:
        if data[i] != 0xFF:
            raise ValueError(f"expected a marker at {i}")
        marker = data[i + 1]
        if marker == EOI:
            parts.append((EOI, data[i : i + 2]))
            if i + 2 < n:
                parts.append((None, data[i + 2 :]))  # trailing bytes after EOI
            return parts
        length = (data[i + 2] << 8) | data[i + 3]
        parts.append((marker, data[i : i + 2 + length]))
        i += 2 + length
        if marker == SOS:  # entropy-coded data up to the next marker that is not a stuffed zero or an RSTn
            j = i
            while j + 1 < n and not (data[j] == 0xFF and data[j + 1] not in (0x00, *RST_MARKERS, 0xFF)):
                j += 1
            if j + 1 >= n:
                j = n
            parts.append((None, data[i:j]))
            i = j
    return parts


def join(parts: Sequence[Part]) -> bytes:
    return b"".join(p[1] for p in parts)


def segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload


def _indices(parts: Sequence[Part], markers: Sequence[int]) -> List[int]:
    return [i for i, (m, _) in enumerate(parts) if m in markers]


def _pick(rng: random.Random, parts: Sequence[Part], markers: Sequence[int]) -> int:
    found = _indices(parts, markers)
    if not found:
        raise NotApplicable(f"no segment {[hex(m) for m in markers]}")
    return rng.choice(found)


def _set_byte(seg: bytes, offset: int, value: int) -> bytes:
    if offset >= len(seg):
        raise NotApplicable("segment too short")
    return seg[:offset] + bytes([value & 0xFF]) + seg[offset + 1 :]


def _with_length(seg: bytes, length: int) -> bytes:
    return seg[:2] + (length & 0xFFFF).to_bytes(2, "big") + seg[4:]


def _flip(rng: random.Random, blob: bytes, start: int, count: int) -> bytes:
    if len(blob) <= start:
        raise NotApplicable("nothing to flip")
    b = bytearray(blob)
    for _ in range(count):
        k = rng.randrange(start, len(b))
        b[k] ^= 1 << rng.randrange(8) if rng.random() < 0.7 else rng.randrange(1, 256)
    return bytes(b)


def _replace(parts: List[Part], i: int, seg: bytes) -> bytes:
    out = list(parts)
    out[i] = (out[i][0], seg)
    return join(out)


def _bad_length(rng: random.Random, seg: bytes) -> int:
    real = len(seg) - 2
    return rng.choice([0, 1, 2, 3, real - 1, real + 1, real - rng.randint(2, 8), real + rng.randint(2, 300), 0xFFFF])


def _bad_length_at(rng: random.Random, parts, i: int) -> bytes:
    """The JPEG with segment ``i`` given a wrong length field (the *_length mutators)."""
    return _replace(parts, i, _with_length(parts[i][1], _bad_length(rng, parts[i][1])))


def _sof(parts: Sequence[Part]) -> int:
    found = _indices(parts, SOF_MARKERS)
    if not found:
        raise NotApplicable("no SOF")
    return found[0]


def _first_sos(parts: Sequence[Part]) -> int:
    found = _indices(parts, [SOS])
    if not found:
        raise NotApplicable("no SOS")
    return found[0]


def _scans(parts: Sequence[Part]) -> List[int]:
    """Indices of the SOS segments, each followed by its entropy-coded data part."""
    return [i for i in _indices(parts, [SOS]) if i + 1 < len(parts) and parts[i + 1][0] is None]


# ------------------------------------------------------------------------------------------ JPEG mutators
# Header segments


def app_length(rng, data):
    parts = split_jpeg(data)
    i = _pick(rng, parts, APP_MARKERS + (COM,))
    return "app_length", _bad_length_at(rng, parts, i)


def app_contents(rng, data):
    parts = split_jpeg(data)
    if rng.random() < 0.5 and _indices(parts, APP_MARKERS):
        i = _pick(rng, parts, APP_MARKERS)
        return "app_contents", _replace(parts, i, _flip(rng, parts[i][1], 4, rng.randint(1, 16)))
    # A new APPn: a broken EXIF block (bad TIFF offsets), an Adobe APP14 with odd transform, or junk.
    payload = rng.choice([
        b"Exif\0\0MM\0*" + rng.randbytes(rng.randint(0, 64)),
        b"Exif\0\0II*\0" + (0xFFFFFFF0).to_bytes(4, "little") + rng.randbytes(8),
        b"Adobe\0\x64\0\0\0\0" + bytes([rng.randrange(256)]),
        rng.randbytes(rng.randint(0, 200)),
    ])
    marker = rng.choice(APP_MARKERS)
    out = list(parts)
    out.insert(1 + rng.randrange(max(1, _sof(parts))), (marker, segment(marker, payload)))
    return "app_contents", join(out)


def dqt_length(rng, data):
    parts = split_jpeg(data)
    i = _pick(rng, parts, [DQT])
    return "dqt_length", _bad_length_at(rng, parts, i)


def dqt_contents(rng, data):
    parts = split_jpeg(data)
    i = _pick(rng, parts, [DQT])
    seg = parts[i][1]
    choice = rng.random()
    if choice < 0.35:  # Pq/Tq: 16-bit precision, table ids over 3
        seg = _set_byte(seg, 4, rng.choice([0x10, 0x04, 0x07, 0x1F, 0xF0, rng.randrange(256)]))
    elif choice < 0.5:  # a zero quantiser
        seg = _set_byte(seg, rng.randrange(5, len(seg)), 0)
    else:
        seg = _flip(rng, seg, 4, rng.randint(1, 8))
    return "dqt_contents", _replace(parts, i, seg)


def dht_length(rng, data):
    parts = split_jpeg(data)
    i = _pick(rng, parts, [DHT])
    return "dht_length", _bad_length_at(rng, parts, i)


def dht_contents(rng, data):
    parts = split_jpeg(data)
    i = _pick(rng, parts, [DHT])
    seg = parts[i][1]
    choice = rng.random()
    if choice < 0.3:  # Tc/Th: class over 1, table id over 3
        seg = _set_byte(seg, 4, rng.choice([0x02, 0x04, 0x13, 0xFF, rng.randrange(256)]))
    elif choice < 0.6:  # code counts: more codes than values, or than a code length allows
        seg = _set_byte(seg, rng.randrange(5, min(21, len(seg))), rng.choice([0xFF, 0x80, 0x20, rng.randrange(256)]))
    else:
        seg = _flip(rng, seg, 4, rng.randint(1, 8))
    return "dht_contents", _replace(parts, i, seg)


def dri(rng, data):
    """A DRI segment (restart interval) before the first scan, with no RST markers in the data (or a bad one)."""
    parts = split_jpeg(data)
    interval = rng.choice([0, 1, 2, 3, rng.randint(1, 64), 0xFFFF])
    seg = segment(DRI, interval.to_bytes(2, "big"))
    if rng.random() < 0.25:
        seg = _with_length(seg, rng.choice([2, 3, 5, 0]))
    out = list(parts)
    out.insert(_first_sos(parts), (DRI, seg))
    return "dri", join(out)


def restart_markers(rng, data):
    """RSTn markers inserted into the entropy-coded data, with or without a DRI segment."""
    parts = split_jpeg(data)
    scans = _scans(parts)
    if not scans:
        raise NotApplicable("no scan data")
    s = rng.choice(scans)
    ecs = bytearray(parts[s + 1][1])
    if not ecs:
        raise NotApplicable("empty scan")
    for _ in range(rng.randint(1, 6)):
        at = rng.randrange(len(ecs) + 1)
        ecs[at:at] = bytes([0xFF, rng.choice(RST_MARKERS)])
    out = list(parts)
    out[s + 1] = (None, bytes(ecs))
    if rng.random() < 0.5:
        out.insert(_first_sos(parts), (DRI, segment(DRI, rng.randint(1, 16).to_bytes(2, "big"))))
    return "restart_markers", join(out)


# SOF fields: FF Cn | Lf(2) | P | Y(2) | X(2) | Nf | Nf x (C, H<<4|V, Tq)


def sof_precision(rng, data):
    parts = split_jpeg(data)
    i = _sof(parts)
    seg = parts[i][1]
    return "sof_precision", _replace(parts, i, _set_byte(seg, 4, rng.choice([0, 1, 2, 7, 9, 12, 16, 255])))


def sof_components(rng, data):
    """The component count changed, the rest of the SOF as is (the issue's crasher: 3 -> 2)."""
    parts = split_jpeg(data)
    i = _sof(parts)
    seg = parts[i][1]
    values = [v for v in (0, 1, 2, 3, 4, 5, 255) if v != seg[9]]
    return "sof_components", _replace(parts, i, _set_byte(seg, 9, rng.choice(values)))


def sof_component_count(data: bytes, count: int) -> bytes:
    """Deterministic: the SOF component count set to ``count``, nothing else changed (the issue's crasher)."""
    parts = split_jpeg(data)
    i = _sof(parts)
    return _replace(parts, i, _set_byte(parts[i][1], 9, count))


def sof_component_ids(rng, data):
    parts = split_jpeg(data)
    i = _sof(parts)
    seg = parts[i][1]
    n = seg[9]
    if n < 1:
        raise NotApplicable("no components")
    k = rng.randrange(n)
    value = seg[10] if (n > 1 and rng.random() < 0.5) else rng.randrange(256)  # duplicate id, or any id
    return "sof_component_ids", _replace(parts, i, _set_byte(seg, 10 + 3 * k, value))


def sof_sampling(rng, data):
    parts = split_jpeg(data)
    i = _sof(parts)
    seg = parts[i][1]
    for _ in range(rng.randint(1, 2)):
        k = rng.randrange(max(1, seg[9]))
        h = rng.choice([0, 1, 2, 3, 4, 5, 15])
        v = rng.choice([0, 1, 2, 3, 4, 5, 15])
        seg = _set_byte(seg, 11 + 3 * k, (h << 4) | v)
    return "sof_sampling", _replace(parts, i, seg)


def sof_quant_selector(rng, data):
    parts = split_jpeg(data)
    i = _sof(parts)
    seg = parts[i][1]
    k = rng.randrange(max(1, seg[9]))
    return "sof_quant_selector", _replace(parts, i, _set_byte(seg, 12 + 3 * k, rng.choice([1, 2, 3, 4, 15, 255])))


def sof_dimensions(rng, data):
    """Width and height changed to small, zero, odd or over-limit values (at most 2048 each unless 0/65535)."""
    parts = split_jpeg(data)
    i = _sof(parts)
    seg = bytearray(parts[i][1])
    for offset in rng.sample([5, 7], rng.randint(1, 2)):
        old = (seg[offset] << 8) | seg[offset + 1]
        value = rng.choice([0, 1, 7, 8, 9, 17, old + 1, max(0, old - 1), old * 2, rng.randint(1, 2048), 65535])
        seg[offset : offset + 2] = min(value, 65535).to_bytes(2, "big")
    return "sof_dimensions", _replace(parts, i, bytes(seg))


HUGE_CLAIMS = ((9400, 9400), (9000, 9000), (8192, 8192), (16000, 5500))  # all under the default max_pixels


def sof_huge_claim(rng, data):
    """A tiny file whose SOF claims a huge frame, still under max_pixels (9400x9400: 265 MB decoded)."""
    parts = split_jpeg(data)
    i = _sof(parts)
    w, h = rng.choice(HUGE_CLAIMS)
    seg = bytearray(parts[i][1])
    seg[5:7] = h.to_bytes(2, "big")
    seg[7:9] = w.to_bytes(2, "big")
    return "sof_huge_claim", _replace(parts, i, bytes(seg))


def sof_length(rng, data):
    parts = split_jpeg(data)
    i = _sof(parts)
    return "sof_length", _bad_length_at(rng, parts, i)


def sof_type(rng, data):
    """The SOF marker swapped for another frame type (extended, lossless, hierarchical, arithmetic)."""
    parts = split_jpeg(data)
    i = _sof(parts)
    marker = rng.choice([m for m in SOF_MARKERS if m != parts[i][0]])
    return "sof_type", _replace(parts, i, _set_byte(parts[i][1], 1, marker))


# SOS fields: FF DA | Ls(2) | Ns | Ns x (Cs, Td<<4|Ta) | Ss | Se | Ah<<4|Al


def _sos_pick(rng, parts) -> int:
    scans = _indices(parts, [SOS])
    if not scans:
        raise NotApplicable("no SOS")
    return rng.choice(scans)


def sos_components(rng, data):
    parts = split_jpeg(data)
    i = _sos_pick(rng, parts)
    seg = parts[i][1]
    values = [v for v in (0, 1, 2, 3, 4, 5, 255) if v != seg[4]]
    return "sos_components", _replace(parts, i, _set_byte(seg, 4, rng.choice(values)))


def sos_component_ids(rng, data):
    parts = split_jpeg(data)
    i = _sos_pick(rng, parts)
    seg = parts[i][1]
    k = rng.randrange(max(1, seg[4]))
    value = rng.choice([0, 4, 5, 9, 255, rng.randrange(256)])
    return "sos_component_ids", _replace(parts, i, _set_byte(seg, 5 + 2 * k, value))


def sos_tables(rng, data):
    parts = split_jpeg(data)
    i = _sos_pick(rng, parts)
    seg = parts[i][1]
    k = rng.randrange(max(1, seg[4]))
    value = (rng.choice([0, 1, 2, 3, 4, 15]) << 4) | rng.choice([0, 1, 2, 3, 4, 15])
    return "sos_tables", _replace(parts, i, _set_byte(seg, 6 + 2 * k, value))


def sos_spectral(rng, data):
    """Ss, Se, Ah/Al of a scan: out of range, reversed, or a successive-approximation step out of order."""
    parts = split_jpeg(data)
    i = _sos_pick(rng, parts)
    seg = bytearray(parts[i][1])
    base = 5 + 2 * seg[4]
    if base + 2 >= len(seg):
        raise NotApplicable("short SOS")
    field = rng.randrange(3)
    value = [rng.choice([0, 1, 5, 63, 64, 200, 255]), rng.choice([0, 1, 5, 62, 63, 64, 255]),
             (rng.randrange(16) << 4) | rng.randrange(16)][field]
    seg[base + field] = value
    return "sos_spectral", _replace(parts, i, bytes(seg))


def sos_length(rng, data):
    parts = split_jpeg(data)
    i = _sos_pick(rng, parts)
    return "sos_length", _bad_length_at(rng, parts, i)


# Markers


def marker_insert(rng, data):
    """A marker inserted between two parts or inside the scan data: standalone, with a random segment, a
    second SOI, an early EOI, or a frame/scan/table marker with a random payload."""
    parts = split_jpeg(data)
    marker = rng.choice([SOI, EOI, SOS, DHT, DQT, DRI, COM, 0x01, 0xC0, 0xC2, 0xC8, 0xCC, 0xDC, 0xDE, 0xDF,
                         0xF0, 0xFD, 0xE1, 0xD0, 0xFF, rng.randrange(0xC0, 0x100)])
    if marker in (SOI, EOI, 0x01, 0xFF) or marker in RST_MARKERS:
        blob = bytes([0xFF, marker])
    else:
        blob = segment(marker, rng.randbytes(rng.choice([0, 1, 2, 4, 9, rng.randint(0, 80)])))
    out = list(parts)
    scans = _scans(parts)
    if scans and rng.random() < 0.3:  # inside the entropy-coded data
        s = rng.choice(scans) + 1
        ecs = out[s][1]
        at = rng.randrange(len(ecs) + 1)
        out[s] = (None, ecs[:at] + blob + ecs[at:])
    else:
        out.insert(rng.randrange(1, len(out)), (marker, blob))
    return "marker_insert", join(out)


def marker_delete(rng, data):
    """A header segment (or a scan with its data, or EOI) removed."""
    parts = split_jpeg(data)
    candidates = [i for i, (m, _) in enumerate(parts) if m is not None and m != SOI]
    i = rng.choice(candidates)
    out = list(parts)
    with_data = parts[i][0] == SOS and i + 1 < len(parts) and parts[i + 1][0] is None and rng.random() < 0.5
    end = i + 2 if with_data else i + 1
    del out[i:end]
    return "marker_delete", join(out)


def marker_duplicate(rng, data):
    """A segment repeated: a second SOF (same or changed), a scan repeated, DHT/DQT/APPn repeated."""
    parts = split_jpeg(data)
    out = list(parts)
    what = rng.random()
    if what < 0.35:
        i = _sof(parts)
        seg = parts[i][1]
        if rng.random() < 0.5:  # a second frame header that disagrees with the first
            seg = _set_byte(seg, rng.choice([4, 6, 8, 9]), rng.choice([1, 2, 3, 12, 255]))
        for _ in range(rng.choice([1, 1, 2, 5])):
            out.insert(i + 1, (parts[i][0], seg))
    elif what < 0.7:
        scans = _scans(parts)
        if not scans:
            raise NotApplicable("no scan")
        s = rng.choice(scans)
        for _ in range(rng.choice([1, 2, 3, 10])):
            out[s + 2 : s + 2] = [parts[s], parts[s + 1]]
        if rng.random() < 0.3:  # a header segment between the two scans
            out.insert(s + 2, parts[_pick(rng, parts, [DHT, DQT])])
    else:
        i = _pick(rng, parts, [DHT, DQT] + list(APP_MARKERS))
        out.insert(i + rng.choice([0, 1]), parts[i])
    return "marker_duplicate", join(out)


def header_flip(rng, data):
    """Random bits or bytes flipped inside one header segment (SOF, SOS, DHT, DQT, any)."""
    parts = split_jpeg(data)
    i = _pick(rng, parts, [m for m, _ in parts if m is not None and m not in (SOI, EOI)])
    return "header_flip", _replace(parts, i, _flip(rng, parts[i][1], 2, rng.randint(1, 6)))


def header_truncate(rng, data):
    """Cut inside the header: no whole frame and scan header (goes to Pillow, never to DALI)."""
    parts = split_jpeg(data)
    end = len(join(parts[: _first_sos(parts) + 1]))
    return "header_truncate", data[: rng.randrange(2, end)]


def junk_around(rng, data):
    """Junk bytes before a marker, between segments, or after EOI."""
    parts = split_jpeg(data)
    junk = rng.randbytes(rng.randint(1, 40))
    out = list(parts)
    where = rng.random()
    if where < 0.4:
        out.insert(rng.randrange(1, _first_sos(parts) + 1), (COM, junk))
    elif where < 0.7:
        out.append((None, junk))
    else:
        out.append((None, b"\xff\xd8" + rng.randbytes(rng.randint(0, 200))))
    return "junk_around", join(out)


# Entropy-coded data


def entropy_flip(rng, data):
    parts = split_jpeg(data)
    scans = _scans(parts)
    if not scans:
        raise NotApplicable("no scan data")
    s = rng.choice(scans) + 1
    return "entropy_flip", _replace(parts, s, _flip(rng, parts[s][1], 0, rng.randint(1, 32)))


def entropy_truncate(rng, data):
    """The file cut inside (or right at the start of) a scan's data; sometimes an EOI after the cut."""
    parts = split_jpeg(data)
    scans = _scans(parts)
    if not scans:
        raise NotApplicable("no scan data")
    s = rng.choice(scans) + 1
    head = join(parts[:s])
    ecs = parts[s][1]
    cut = head + ecs[: rng.randrange(len(ecs) + 1)]
    return "entropy_truncate", cut + (b"\xff\xd9" if rng.random() < 0.4 else b"")


def entropy_garbage(rng, data):
    """A run of the scan data replaced with random bytes, zeros or 0xFF."""
    parts = split_jpeg(data)
    scans = _scans(parts)
    if not scans:
        raise NotApplicable("no scan data")
    s = rng.choice(scans) + 1
    ecs = bytearray(parts[s][1])
    if not ecs:
        raise NotApplicable("empty scan")
    a = rng.randrange(len(ecs))
    b = min(len(ecs), a + rng.randint(1, 256))
    fill = rng.choice([b"\0", b"\xff", None])
    ecs[a:b] = rng.randbytes(b - a) if fill is None else fill * (b - a)
    return "entropy_garbage", _replace(parts, s, bytes(ecs))


# Progressive files (bases made with Pillow progressive=True)


def _progressive_scans(data: bytes) -> Tuple[List[Part], List[int]]:
    parts = split_jpeg(data)
    scans = _scans(parts)
    if len(scans) < 2:
        raise NotApplicable("not a progressive JPEG")
    return parts, scans


REPEATS = (300, 1000, 2500, 5000)


def progressive_repeat_scan(rng, data):
    """One scan (SOS and its data) repeated hundreds to thousands of times: a CPU bomb when the frame is large.
    The bases are small, so today's decoders spend little on them."""
    parts, scans = _progressive_scans(data)
    s = rng.choice(scans)
    scan = parts[s][1] + parts[s + 1][1]
    out = join(parts[: s + 2]) + scan * rng.choice(REPEATS) + join(parts[s + 2 :])
    return "progressive_repeat_scan", out


def progressive_scan_fields(rng, data):
    """Ss/Se/Ah/Al or the component list of one later scan changed."""
    parts, scans = _progressive_scans(data)
    s = rng.choice(scans[1:])
    seg = bytearray(parts[s][1])
    base = 5 + 2 * seg[4]
    if rng.random() < 0.7 and base + 2 < len(seg):
        field = rng.randrange(3)
        seg[base + field] = [rng.choice([0, 1, 6, 63, 64]), rng.choice([0, 5, 63, 64, 255]),
                             (rng.randrange(14) << 4) | rng.randrange(14)][field]
    else:
        seg[5] = rng.choice([1, 2, 3, 4, 7])
    return "progressive_scan_fields", _replace(parts, s, bytes(seg))


def progressive_drop_scan(rng, data):
    parts, scans = _progressive_scans(data)
    s = rng.choice(scans)
    out = list(parts)
    del out[s : s + 2]
    return "progressive_drop_scan", join(out)


def progressive_reorder_scans(rng, data):
    parts, scans = _progressive_scans(data)
    a, b = sorted(rng.sample(scans, 2))
    out = list(parts)
    out[a : a + 2], out[b : b + 2] = parts[b : b + 2], parts[a : a + 2]
    return "progressive_reorder_scans", join(out)


# Stacked


STACKABLE: Tuple[Callable, ...] = ()  # filled below


def stacked(rng, data):
    """Two to four mutations applied one after the other (each on the previous one's output, when it still
    splits into parts; else on the original)."""
    kinds = []
    out = data
    for _ in range(rng.randint(2, 4)):
        for _attempt in range(8):
            fn = rng.choice(STACKABLE)
            try:
                kind, mutated = fn(rng, out)
            except (NotApplicable, ValueError, IndexError):
                continue
            kinds.append(kind)
            out = mutated
            break
    if len(kinds) < 2:
        raise NotApplicable("could not stack")
    return "stacked", out


# (mutator, weight). Weights: the header and marker mutations that crashed DALI get the most; the slow or
# memory-heavy ones (huge claims, thousands of scans) few, so that a run stays minutes on today's code.
JPEG_MUTATORS: Tuple[Tuple[Callable, float], ...] = (
    (app_length, 3), (app_contents, 3),
    (dqt_length, 2), (dqt_contents, 4),
    (dht_length, 2), (dht_contents, 5),
    (dri, 3), (restart_markers, 4),
    (sof_precision, 4), (sof_components, 6), (sof_component_ids, 4), (sof_sampling, 6),
    (sof_quant_selector, 3), (sof_dimensions, 4), (sof_huge_claim, 0.3), (sof_length, 3), (sof_type, 4),
    (sos_components, 4), (sos_component_ids, 4), (sos_tables, 4), (sos_spectral, 4), (sos_length, 3),
    (marker_insert, 8), (marker_delete, 6), (marker_duplicate, 6), (header_flip, 8),
    (header_truncate, 2), (junk_around, 2),
    (entropy_flip, 4), (entropy_truncate, 4), (entropy_garbage, 3),
    (progressive_repeat_scan, 1.5), (progressive_scan_fields, 4), (progressive_drop_scan, 2),
    (progressive_reorder_scans, 2),
    (stacked, 8),
) + _fuzz_pixels.GENERATORS  # issue 16: EXIF/XMP orientation, decode cost claims, restart and marker floods
STACKABLE = tuple(
    fn for fn, _ in JPEG_MUTATORS
    if fn not in (stacked, sof_huge_claim, progressive_repeat_scan, header_truncate, _fuzz_pixels.cost_claim,
                  _fuzz_pixels.restart_flood, _fuzz_pixels.marker_flood)
)
JPEG_KINDS = tuple(fn.__name__ for fn, _ in JPEG_MUTATORS)


def mutate_jpeg(rng: random.Random, bases: Sequence[bytes]) -> Tuple[str, bytes]:
    """One mutant: a weighted-random mutator on a random base (another base when it does not apply)."""
    fns = [fn for fn, _ in JPEG_MUTATORS]
    weights = [w for _, w in JPEG_MUTATORS]
    while True:
        fn = rng.choices(fns, weights)[0]
        for _ in range(16):  # the same mutator on other bases first, so that the weights hold
            base = rng.choice(bases)
            try:
                kind, out = fn(rng, base)
            except NotApplicable:
                continue
            if out != base:  # a field set to the value it had is no mutant
                return kind, out


# ------------------------------------------------------------------------------------------- base images


class Base(NamedTuple):
    label: str
    data: bytes


def base_jpegs(seed: int, count: int = 24) -> List[Base]:
    """Small valid JPEGs (32-160 px), deterministic per seed: 4:2:0, 4:2:2, 4:4:4, grayscale, progressive
    (plain and 4:4:4), EXIF-oriented, various qualities. Progressive bases stay <= 64 px, so that thousands of
    repeated scans cost today's decoders little."""
    rng = np.random.default_rng(seed)
    variants = [
        dict(), dict(subsampling="4:4:4"), dict(subsampling="4:2:2"), dict(grayscale=True),
        dict(progressive=True), dict(progressive=True, subsampling="4:4:4"), dict(progressive=True, grayscale=True),
        dict(exif_orientation=6), dict(exif_orientation=3), dict(exif_orientation=8, subsampling="4:4:4"),
        dict(quality=50), dict(quality=100),
    ]
    out = []
    for k in range(count):
        kw = dict(variants[k % len(variants)])
        small = kw.get("progressive", False)
        w = int(rng.integers(32, 65 if small else 161))
        h = int(rng.integers(32, 65 if small else 161))
        kw.setdefault("quality", int(rng.integers(70, 96)))
        label = ",".join(f"{key}={value}" for key, value in sorted(kw.items())) + f",{w}x{h}"
        out.append(Base(label, encode_jpeg(photo_like_image(rng, w, h), **kw)))
    return out


# ------------------------------------------------------------------------------------------------ tars


class ExpectedMember(NamedTuple):
    """What the harness expects of one JPEG-named member it put in a tar.

    ``names``: the spellings under which it may come out (the first is the one written); ``fuzzy``: its name
    cannot be predicted exactly (non-UTF-8 bytes, a header whose name field was mutated), so an otherwise
    unexplained output of the same tar may stand for it; ``offset``: where its first header block (extension
    headers included) starts in the tar; ``required``: it must come out once (as a row or a failure) unless a
    tar-level failure covers it; ``good``: the JPEG bytes when they reach the reader intact and must decode
    pixel-exact, else None.
    """

    names: Tuple[str, ...]
    offset: int
    required: bool
    fuzzy: bool
    good: Optional[bytes]


class TarMutant(NamedTuple):
    """``kind``, the tar's bytes, the JPEG members expected, and ``damage``: the offset from which a tar-level
    ``read`` failure may stand for the members (None: the tar is well-formed, nothing may be covered)."""

    kind: str
    data: bytes
    members: Tuple[ExpectedMember, ...]
    damage: Optional[int]


class _Laid(NamedTuple):
    name: str
    offset: int  # first header block, extension headers included
    header: int  # the member's own (ustar) header block
    data_offset: int
    size: int
    jpeg: Optional[bytes]


TAR_FORMATS = (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT)


def build_tar(members: Sequence[Tuple[object, bytes]], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    """``(name or TarInfo, data)`` pairs as a deterministic tar (mtime 0, mode 0644, uid/gid 0)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for name, data in members:
            if isinstance(name, tarfile.TarInfo):
                info = name
            else:
                info = tarfile.TarInfo(name)
                info.size = len(data)
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            if info.isreg():
                info.mode = 0o644
            tf.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def lay_out(data: bytes, jpegs: Dict[str, bytes]) -> List[_Laid]:
    """Where each member of a well-formed tar sits (read back with tarfile)."""
    out = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        for info in tf:
            out.append(_Laid(info.name, info.offset, info.offset_data - 512, info.offset_data, info.size,
                             jpegs.get(info.name)))
    return out


def _checksum(block: bytearray) -> None:
    block[148:156] = b" " * 8
    chk = sum(block)
    block[148:156] = b"%06o\0 " % chk


def _edit_header(data: bytes, header: int, offset: int, value: bytes, fix_checksum: bool = True) -> bytes:
    block = bytearray(data[header : header + 512])
    block[offset : offset + len(value)] = value
    if fix_checksum:
        _checksum(block)
    return data[:header] + bytes(block) + data[header + 512 :]


def _base256(value: int, width: int = 12) -> bytes:
    if value < 0:
        return bytes([0xFF]) + (value % (1 << (8 * (width - 1)))).to_bytes(width - 1, "big")
    return bytes([0x80]) + value.to_bytes(width - 1, "big")


def _ext_header(name: str, typeflag: bytes, payload: bytes, size: Optional[int] = None) -> bytes:
    """An extension header block (PAX 'x', GNU 'L'/'K') carrying ``payload``, with the size field ``size``."""
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.type = typeflag
    block = bytearray(info.tobuf(tarfile.USTAR_FORMAT))
    if size is not None:
        block[124:136] = _base256(size) if size >= 8**11 else b"%011o\0" % size
        _checksum(block)
    pad = (-len(payload)) % 512
    return bytes(block) + payload + b"\0" * pad


def pax_record(key: bytes, value: bytes) -> bytes:
    body = b" " + key + b"=" + value + b"\n"
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n = len(str(n)) + len(body)
    return str(n).encode() + body


def _base_tar(rng: random.Random, good: Sequence[bytes], prefix: str
              ) -> Tuple[List[Tuple[str, bytes]], Dict[str, bytes]]:
    """Members of a small webdataset-style tar: 4-8 JPEGs, some with a .json or .cls sidecar."""
    members, jpegs = [], {}
    for k in range(rng.randint(4, 8)):
        key = f"{prefix}{k:03d}"
        blob = rng.choice(good)
        members.append((f"{key}.jpg", blob))
        jpegs[f"{key}.jpg"] = blob
        if rng.random() < 0.3:
            members.append((f"{key}.json", b'{"k": %d}' % k))
        if rng.random() < 0.15:
            members.append((f"{key}.cls", b"%d" % k))
    return members, jpegs


def _expect(laid: Sequence[_Laid], *, hit: Optional[int] = None, required_hit: bool = True,
            fuzzy_from: Optional[int] = None, names_hit: Optional[Tuple[str, ...]] = None,
            damaged_from: Optional[int] = None) -> Tuple[ExpectedMember, ...]:
    """The JPEG members of ``laid`` as ExpectedMembers. ``hit``: index of the mutated member (its name
    spellings ``names_hit``, required or not); members from ``fuzzy_from`` on may come out under other names;
    members whose bytes sit at or after ``damaged_from`` are not checked for pixels."""
    out = []
    for k, m in enumerate(laid):
        if m.jpeg is None and k != hit:
            continue
        names = (m.name,)
        required = True
        if k == hit:
            names = names_hit or names
            required = required_hit
        if not any(n.lower().endswith((".jpg", ".jpeg")) for n in names) and k != hit:
            continue
        intact = m.jpeg is not None and k != hit and (damaged_from is None or m.offset < damaged_from)
        fuzzy = fuzzy_from is not None and k >= fuzzy_from
        out.append(ExpectedMember(names, m.offset, required, fuzzy, m.jpeg if intact else None))
    return tuple(out)


def _jpeg_index(rng: random.Random, laid: Sequence[_Laid]) -> int:
    return rng.choice([k for k, m in enumerate(laid) if m.jpeg is not None])


def _fresh(rng, good, fmt=None):
    members, jpegs = _base_tar(rng, good, prefix=f"s{rng.randrange(10**6):06d}_")
    fmt = rng.choice(TAR_FORMATS) if fmt is None else fmt
    data = build_tar(members, fmt)
    return data, lay_out(data, jpegs), members, jpegs, fmt


# Each tar mutator: (rng, good JPEGs) -> TarMutant. One mutation per tar: a damaged header ends its tar.


def tar_size_field(rng, good):
    """The size field of one member: huge octal, base-256 2**62, negative base-256, garbage, past the end,
    a little off."""
    data, laid, *_ = _fresh(rng, good)
    k = _jpeg_index(rng, laid)
    m = laid[k]
    which = rng.choice(["huge_octal", "base256_2p62", "base256_negative", "garbage", "past_end", "off_by"])
    value = {
        "huge_octal": b"77777777777\0",
        "base256_2p62": _base256(2**62),
        "base256_negative": _base256(-rng.randint(1, 2**40)),
        "garbage": bytes(rng.choice(b"89xyz \xff\0") for _ in range(12)),
        "past_end": b"%011o\0" % (len(data) + rng.randint(1, 10**6)),
        "off_by": b"%011o\0" % max(0, m.size + rng.choice([-513, -512, -100, -1, 1, 100, 512, 513])),
    }[which]
    mutated = _edit_header(data, m.header, 124, value)
    return TarMutant(f"size_{which}", mutated, _expect(laid, hit=k, damaged_from=m.offset), m.offset)


def tar_checksum(rng, good):
    data, laid, *_ = _fresh(rng, good)
    k = _jpeg_index(rng, laid)
    m = laid[k]
    value = rng.choice([b"000000\0 ", b"%06o\0 " % rng.randrange(8**6), bytes(rng.randbytes(8)), b"        "])
    mutated = _edit_header(data, m.header, 148, value, fix_checksum=False)
    return TarMutant("checksum", mutated, _expect(laid, hit=k, damaged_from=m.offset), m.offset)


# typeflag in place, data kept: the bytes after the header are misread when the new type carries no data.
_NO_DATA_TYPES = {b"3", b"4", b"5", b"6"}  # char/block device, directory, FIFO: not a file, not required
_EXT_TYPES = {b"K", b"L", b"x", b"g"}  # extension headers: the member vanishes into the next one


def tar_typeflag(rng, good):
    """The typeflag of one JPEG member changed in place: links, device, dir, FIFO, contiguous, GNU sparse
    'S' (with a garbage sparse map), extension types, unknown types."""
    data, laid, _, _, fmt = _fresh(rng, good)
    k = _jpeg_index(rng, laid)
    m = laid[k]
    flag = rng.choice([b"1", b"2", b"3", b"4", b"5", b"6", b"7", b"S", b"K", b"L", b"x", b"g", b"X", b"V", b"M",
                       b"Z", b"\xff", b"\0"])
    mutated = _edit_header(data, m.header, 156, flag)
    if flag in (b"1", b"2"):
        mutated = _edit_header(mutated, m.header, 157, (laid[0].name if rng.random() < 0.5 else "../../x.jpg").encode())
    if flag == b"S":  # GNU sparse map (offset 386: 4 x (offset, numbytes), isextended, realsize)
        sparse = b"".join(b"%011o\0" % rng.choice([0, 1, 512, 8**11 - 1]) for _ in range(8))
        tail = bytes([rng.choice([0, 1])]) + rng.choice([b"%011o\0" % m.size, _base256(2**62), b"77777777777\0"])
        mutated = _edit_header(mutated, m.header, 386, sparse + tail)
    name = "typeflag_" + {b"\0": "nul", b"\xff": "ff"}.get(flag, flag.decode("latin-1"))
    required = flag not in _NO_DATA_TYPES and flag not in _EXT_TYPES
    members = _expect(laid, hit=k, required_hit=required, damaged_from=m.offset)
    if flag in (b"L", b"x", b"g") and k + 1 < len(laid):
        # The member's JPEG bytes become the next member's name (L) or its PAX records (x, g): the next
        # member's name is unpredictable, and need not end in .jpg any more.
        nxt = laid[k + 1].offset
        members = tuple(x._replace(required=False, fuzzy=True) if x.offset == nxt else x for x in members)
    return TarMutant(name, mutated, members, m.offset)


def tar_link_member(rng, good):
    """A well-formed link or special member named .jpg (symlink, hardlink to a member or to nothing, directory,
    FIFO), written by tarfile among good members. Links are required to come out (item 5 of issue 9)."""
    members, jpegs = _base_tar(rng, good, prefix=f"l{rng.randrange(10**6):06d}_")
    which = rng.choice(["symlink", "symlink_outside", "hardlink", "hardlink_missing", "dir", "fifo"])
    info = tarfile.TarInfo(f"link{rng.randrange(1000):03d}.jpg")
    info.type = {"symlink": tarfile.SYMTYPE, "symlink_outside": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE,
                 "hardlink_missing": tarfile.LNKTYPE, "dir": tarfile.DIRTYPE, "fifo": tarfile.FIFOTYPE}[which]
    info.linkname = {"symlink": members[0][0], "symlink_outside": "/etc/passwd", "hardlink": members[0][0],
                     "hardlink_missing": "no/such/member.jpg"}.get(which, "")
    at = rng.randrange(len(members) + 1)
    members.insert(at, (info, b""))
    data = build_tar(members, rng.choice(TAR_FORMATS))
    laid = lay_out(data, jpegs)
    k = next(i for i, m in enumerate(laid) if m.name == info.name)
    required = which not in ("dir", "fifo")
    return TarMutant(f"link_{which}", data, _expect(laid, hit=k, required_hit=required), None)


def _spellings(raw: bytes) -> Tuple[str, ...]:
    """How a non-UTF-8 name may come out: backslash escapes of the bad bytes (``caf\\xe9.jpg``, backslashes
    doubled), tarfile's surrogate escapes, latin-1. Another spelling still matches by elimination (fuzzy)."""
    return (raw.replace(b"\\", b"\\\\").decode("utf-8", "backslashreplace"), raw.decode("utf-8", "surrogateescape"),
            raw.decode("latin-1"))


def _latin1_name(rng) -> bytes:
    stem = rng.choice([b"caf\xe9", b"\xff\xfe", b"na\xefve_", b"\xc3\x28", b"\xe9t\xe9_%d" % rng.randrange(99)])
    return stem + b".jpg"


def tar_name(rng, good):
    """Names: non-UTF-8 bytes in the header, very long (GNU long name or PAX path), '..' and absolute paths,
    an empty name, PAX hdrcharset=BINARY with non-UTF-8 bytes."""
    which = rng.choice(["latin1", "latin1", "long_gnu", "long_pax", "dotdot", "absolute", "empty", "pax_binary"])
    if which in ("long_gnu", "long_pax", "dotdot", "absolute"):
        members, jpegs = _base_tar(rng, good, prefix=f"n{rng.randrange(10**6):06d}_")
        k = rng.choice([i for i, (n, _) in enumerate(members) if n in jpegs])
        old, blob = members[k]
        new = {"long_gnu": "d/" * 300 + "long.jpg", "long_pax": "p" * 700 + ".jpg",
               "dotdot": "../../escape.jpg", "absolute": "/abs/olute.jpg"}[which]
        members[k] = (new, blob)
        jpegs[new] = jpegs.pop(old)
        fmt = tarfile.GNU_FORMAT if which == "long_gnu" else tarfile.PAX_FORMAT
        data = build_tar(members, fmt)
        return TarMutant(f"name_{which}", data, _expect(lay_out(data, jpegs)), None)
    data, laid, _, _, fmt = _fresh(rng, good, fmt=tarfile.USTAR_FORMAT)
    k = _jpeg_index(rng, laid)
    m = laid[k]
    if which == "latin1":
        raw = _latin1_name(rng)
        mutated = _edit_header(data, m.header, 0, raw.ljust(100, b"\0"))
        names = _spellings(raw)
        return TarMutant("name_latin1", mutated, _fuzzy_at(_expect(laid, hit=k, names_hit=names), m.offset), None)
    if which == "empty":
        mutated = _edit_header(data, m.header, 0, b"\0" * 100)
        return TarMutant("name_empty", mutated, _expect(laid, hit=k, required_hit=False, names_hit=("",)), None)
    # PAX hdrcharset=BINARY with a non-UTF-8 path, inserted before the member's header.
    raw = _latin1_name(rng)
    records = pax_record(b"hdrcharset", b"BINARY") + pax_record(b"path", raw)
    pax = _ext_header("././@PaxHeader", tarfile.XHDTYPE, records)
    mutated = data[: m.offset] + pax + data[m.offset :]
    laid = [x if x.offset < m.offset else x._replace(offset=x.offset + (len(pax) if x.offset > m.offset else 0))
            for x in laid]
    names = _spellings(raw)
    return TarMutant("name_pax_binary", mutated, _fuzzy_at(_expect(laid, hit=k, names_hit=names), m.offset), None)


def _fuzzy_at(members: Tuple[ExpectedMember, ...], offset: int) -> Tuple[ExpectedMember, ...]:
    return tuple(x._replace(fuzzy=True) if x.offset == offset else x for x in members)


def tar_extension_header(rng, good):
    """Hostile extension headers before one member: a GNU long name with a huge or garbage length or no NUL,
    PAX records with bad lengths, a PAX size of 2**62, an empty PAX path."""
    data, laid, *_ = _fresh(rng, good, fmt=tarfile.USTAR_FORMAT)
    k = _jpeg_index(rng, laid)
    m = laid[k]
    which = rng.choice(["gnu_longname_huge", "gnu_longname_garbage", "pax_bad_length", "pax_size_huge",
                        "pax_path_empty", "pax_garbage"])
    if which == "gnu_longname_huge":
        ext = _ext_header("././@LongLink", tarfile.GNUTYPE_LONGNAME, b"huge.jpg\0",
                          size=rng.choice([2**40, 2**62, 8**11 - 1, len(data) * 4]))
    elif which == "gnu_longname_garbage":
        ext = _ext_header("././@LongLink", tarfile.GNUTYPE_LONGNAME, rng.randbytes(rng.randint(1, 700)))
    elif which == "pax_bad_length":
        record = rng.choice([b"99 path=x.jpg\n", b"0 path=x.jpg\n", b"abc path=x.jpg\n", b"5 path=x.jpg\n",
                             b"9999999999999 path=x.jpg\n", b"12 path\n", b"13 =x.jpg\n"])
        ext = _ext_header("././@PaxHeader", tarfile.XHDTYPE, record)
    elif which == "pax_size_huge":
        ext = _ext_header("././@PaxHeader", tarfile.XHDTYPE,
                          pax_record(b"size", str(rng.choice([2**62, 2**40, 10**30])).encode()))
    elif which == "pax_path_empty":
        ext = _ext_header("././@PaxHeader", tarfile.XHDTYPE, pax_record(b"path", b""))
    else:
        ext = _ext_header("././@PaxHeader", tarfile.XHDTYPE, rng.randbytes(rng.randint(1, 600)))
    mutated = data[: m.offset] + ext + data[m.offset :]
    laid = [x if x.offset <= m.offset else x._replace(offset=x.offset + len(ext)) for x in laid]
    # A garbage long name or an empty PAX path renames the member to something that need not end in .jpg.
    renamed = which in ("gnu_longname_garbage", "pax_path_empty")
    members = _expect(laid, hit=k, required_hit=not renamed, damaged_from=m.offset)
    return TarMutant(which, mutated, _fuzzy_at(members, m.offset), m.offset)


def tar_numeric_field(rng, good):
    """Garbage in mode, uid, gid or mtime, or in the magic/version (the header still checksums)."""
    data, laid, *_ = _fresh(rng, good)
    k = _jpeg_index(rng, laid)
    m = laid[k]
    which, offset, width = rng.choice([("mode", 100, 8), ("uid", 108, 8), ("gid", 116, 8), ("mtime", 136, 12),
                                       ("magic", 257, 8)])
    value = bytes(rng.choice(b"89xZ \xff\0-") for _ in range(width))
    mutated = _edit_header(data, m.header, offset, value)
    return TarMutant(f"field_{which}", mutated, _expect(laid, hit=k, damaged_from=m.offset), m.offset)


def tar_header_flip(rng, good):
    """Random bytes of one member's header changed, checksum fixed or not; the name may change."""
    data, laid, *_ = _fresh(rng, good)
    k = _jpeg_index(rng, laid)
    m = laid[k]
    block = bytearray(data[m.header : m.header + 512])
    for _ in range(rng.randint(1, 8)):
        block[rng.randrange(512)] = rng.randrange(256)
    fix = rng.random() < 0.7
    mutated = _edit_header(data, m.header, 0, bytes(block), fix_checksum=fix)
    members = _expect(laid, hit=k, required_hit=False, damaged_from=m.offset, fuzzy_from=k)
    return TarMutant("header_flip", mutated, members, m.offset)


def tar_cut(rng, good):
    """The tar cut at a header boundary, mid-header, mid-data, or inside the end-of-archive blocks."""
    data, laid, *_ = _fresh(rng, good)
    k = rng.randrange(len(laid))
    m = laid[k]
    end = laid[-1].data_offset + ((laid[-1].size + 511) // 512) * 512
    which = rng.choice(["at_header", "mid_header", "mid_data", "end_blocks"])
    if which == "at_header":
        cut, damage = m.offset, m.offset
    elif which == "mid_header":
        cut, damage = m.header + rng.randrange(1, 512), m.offset
    elif which == "mid_data":
        if m.size == 0:
            cut = m.data_offset
        else:
            cut = m.data_offset + rng.randrange(0, m.size)
        damage = m.offset
    else:
        cut, damage = end + rng.randrange(0, 1024), end
    return TarMutant(f"cut_{which}", data[:cut], _expect(laid, damaged_from=damage), damage)


def tar_append(rng, good):
    """Garbage or a second tar after the end-of-archive blocks (nothing past them is read), or two zero
    blocks inserted before a member (an early end: the rest is data after the end)."""
    data, laid, *_ = _fresh(rng, good)
    which = rng.choice(["garbage", "second_tar", "early_end"])
    end = laid[-1].data_offset + ((laid[-1].size + 511) // 512) * 512
    if which == "garbage":
        return TarMutant("append_garbage", data + rng.randbytes(rng.randint(1, 4000)) + b"\0" * rng.choice([0, 1024]),
                         _expect(laid), end)
    if which == "second_tar":
        more, more_laid, *_ = _fresh(rng, good)
        second = [x._replace(offset=x.offset + len(data)) for x in more_laid]
        return TarMutant("append_second_tar", data + more, _expect(list(laid) + second), len(data))
    k = rng.randrange(1, len(laid))
    m = laid[k]
    mutated = data[: m.offset] + b"\0" * 1024 + data[m.offset :]
    shifted = [x if x.offset < m.offset else x._replace(offset=x.offset + 1024) for x in laid]
    return TarMutant("early_end", mutated, _expect(shifted), m.offset)


def tar_duplicate_member(rng, good):
    """One JPEG member written twice, same name and bytes: a well-formed tar; both must come out."""
    members, jpegs = _base_tar(rng, good, prefix=f"d{rng.randrange(10**6):06d}_")
    k = rng.choice([i for i, (n, _) in enumerate(members) if n.endswith(".jpg")])
    members.insert(rng.randrange(k + 1, len(members) + 1), members[k])
    data = build_tar(members, rng.choice(TAR_FORMATS))
    return TarMutant("duplicate_member", data, _expect(lay_out(data, jpegs)), None)


TAR_MUTATORS: Tuple[Tuple[Callable, float], ...] = (
    (tar_size_field, 6), (tar_checksum, 2), (tar_typeflag, 6), (tar_link_member, 3), (tar_name, 4),
    (tar_extension_header, 5), (tar_numeric_field, 2), (tar_header_flip, 3), (tar_cut, 4), (tar_append, 3),
    (tar_duplicate_member, 1),
)


def mutate_tar(rng: random.Random, good: Sequence[bytes]) -> TarMutant:
    fns = [fn for fn, _ in TAR_MUTATORS]
    return rng.choices(fns, [w for _, w in TAR_MUTATORS])[0](rng, good)
