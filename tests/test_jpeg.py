"""The JPEG structure checks that run before any decode: ``dali_rejects``, ``implausible`` and the header walk.

Every JPEG here is made by Pillow (directly or through ``beam_tarimg.sample``) and then edited byte by byte.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from beam_tarimg.jpeg import (
    DEFAULT_MAX_SCANS,
    dali_rejects,
    has_complete_header,
    image_dimensions,
    implausible,
    jpeg_dimensions,
    parse_jpeg,
)
from beam_tarimg.sample import imagenet_like_jpeg, photo_like_image
from conftest import make_jpeg


def _pillow_jpeg(image: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", **kwargs)
    return buf.getvalue()


def _photo(seed: int, width: int = 64, height: int = 48) -> Image.Image:
    return Image.fromarray(photo_like_image(np.random.default_rng(seed), width, height))


def _segment(jpeg: bytes, marker: int, nth: int = 0) -> tuple:
    """``(start, end)`` of the ``nth`` segment with this marker (start at its 0xFF), walking the segments from SOI."""
    i, seen = 2, 0
    while True:
        m = jpeg[i + 1]
        end = i + 2 + int.from_bytes(jpeg[i + 2 : i + 4], "big")
        if m == marker:
            if seen == nth:
                return i, end
            seen += 1
        if m == 0xDA:
            raise AssertionError(f"no segment 0x{marker:02X} before the first scan")
        i = end


def _set(jpeg: bytes, offset: int, *values: int) -> bytes:
    return jpeg[:offset] + bytes(values) + jpeg[offset + len(values) :]


def _scans(jpeg: bytes) -> list:
    """``(start, end)`` of each whole scan (header and entropy-coded data) of a Pillow JPEG."""
    starts = [i for i in range(len(jpeg) - 1) if jpeg[i] == 0xFF and jpeg[i + 1] == 0xDA]
    out = []
    for s in starts:
        e = s + 2 + int.from_bytes(jpeg[s + 2 : s + 4], "big")
        while not (jpeg[e] == 0xFF and jpeg[e + 1] not in (0x00, *range(0xD0, 0xD8))):
            e += 1
        out.append((s, e))
    return out


BASE = make_jpeg(1, 64, 48)  # baseline 4:2:0, 3 components
SOF = _segment(BASE, 0xC0)[0]
SOS = _segment(BASE, 0xDA)[0]
PROGRESSIVE = make_jpeg(2, 64, 48, progressive=True)
GRAY = make_jpeg(6, grayscale=True)


ORDINARY = {
    "baseline 4:2:0": lambda: make_jpeg(3),
    "baseline 4:4:4": lambda: make_jpeg(4, subsampling="4:4:4"),
    "baseline 4:2:2": lambda: make_jpeg(5, subsampling="4:2:2"),
    "grayscale": lambda: make_jpeg(6, grayscale=True),
    "progressive": lambda: make_jpeg(7, 200, 150, progressive=True),
    "progressive grayscale": lambda: make_jpeg(8, progressive=True, grayscale=True),
    "progressive 4:4:4": lambda: make_jpeg(9, subsampling="4:4:4", progressive=True),
    "1x1": lambda: make_jpeg(10, 1, 1),
    "1x1 progressive": lambda: make_jpeg(11, 1, 1, progressive=True),
    "8x8 grayscale": lambda: make_jpeg(12, 8, 8, grayscale=True),
    "odd size 33x17": lambda: make_jpeg(13, 33, 17),
    "EXIF-rotated": lambda: make_jpeg(14, exif_orientation=6),
    "restart interval": lambda: _pillow_jpeg(_photo(15), restart_marker_blocks=2),
    "restart interval, progressive": lambda: _pillow_jpeg(_photo(16), restart_marker_blocks=3, progressive=True),
    "optimized Huffman tables": lambda: _pillow_jpeg(_photo(17), optimize=True),
    "quality 100": lambda: _pillow_jpeg(_photo(18), quality=100),
    "quality 5": lambda: _pillow_jpeg(_photo(19), quality=5),
    "flat colour": lambda: _pillow_jpeg(Image.new("RGB", (300, 200), (120, 30, 200))),
    "flat colour, progressive": lambda: _pillow_jpeg(Image.new("L", (300, 200), 77), progressive=True),
    "CMYK (Adobe segment)": lambda: _pillow_jpeg(_photo(20).convert("CMYK")),
    "ICC profile and comment": lambda: _pillow_jpeg(_photo(21), icc_profile=b"\0" * 3000, comment=b"hello"),
}


@pytest.mark.parametrize("kind", list(ORDINARY))
def test_ordinary_jpegs__pass_both_checks(kind):
    jpeg = ORDINARY[kind]()
    assert dali_rejects(jpeg) is None
    assert implausible(jpeg, DEFAULT_MAX_SCANS) is None
    assert has_complete_header(jpeg)
    assert jpeg_dimensions(jpeg) == Image.open(io.BytesIO(jpeg)).size


@pytest.mark.parametrize("luma", [0x11, 0x21, 0x12, 0x22, 0x41, 0x42], ids=["444", "422", "440", "420", "411", "410"])
def test_dali_rejects__accepts_the_usual_chroma_subsamplings(luma):
    # Only the frame header is changed: the scan data no longer fits it, but the structure is what is checked.
    assert dali_rejects(_set(BASE, SOF + 11, luma)) is None


def test_ordinary_jpegs__the_imagenet_like_mix_passes_both_checks():
    rng = np.random.default_rng(3)
    for i in range(40):  # baseline 4:2:0 and 4:4:4, progressive, grayscale
        jpeg = imagenet_like_jpeg(rng, i)
        header = parse_jpeg(jpeg)
        assert header.dali_rejects() is None and header.implausible() is None, (i, header)
        assert (header.width, header.height) == Image.open(io.BytesIO(jpeg)).size


def test_parse_jpeg__one_walk_answers_every_question():
    header = parse_jpeg(PROGRESSIVE)
    assert (header.width, header.height, header.precision) == (64, 48, 8)
    assert header.frame == 0xC2 and header.complete and header.problem is None
    assert [c[0] for c in header.components] == [1, 2, 3]
    assert header.scans == len(_scans(PROGRESSIVE)) == 10  # libjpeg's default progression for YCbCr
    # The first scan is the interleaved DC scan: 4 + 1 + 1 blocks per 16x16 MCU, 4x3 MCUs.
    assert header.first_scan_units == 12 * 6
    assert parse_jpeg(b"GIF89a....") is None


def _sof_components(jpeg: bytes, count: int) -> bytes:
    return _set(jpeg, SOF + 9, count)


def _sampling(component: int, value: int):
    return lambda: _set(BASE, SOF + 11 + 3 * component, value)


def _insert_before_scan(blob: bytes):
    return lambda: BASE[:SOS] + blob + BASE[SOS:]


def _in_entropy_data(jpeg: bytes, blob: bytes) -> bytes:
    """``blob`` inserted 10 bytes into the first scan's data, away from any 0xFF."""
    s, e = _scans(jpeg)[0]
    head = s + 2 + int.from_bytes(jpeg[s + 2 : s + 4], "big")
    i = next(i for i in range(head + 10, e) if jpeg[i - 1] != 0xFF and jpeg[i] != 0xFF)
    return jpeg[:i] + blob + jpeg[i:]


def _repeated_progressive_scan(index: int, times: int) -> bytes:
    s, e = _scans(PROGRESSIVE)[index]
    return PROGRESSIVE[:e] + PROGRESSIVE[s:e] * times + PROGRESSIVE[e:]


def _ac_scan_before_dc_scan() -> bytes:
    (s0, e0), (s1, e1) = _scans(PROGRESSIVE)[:2]  # the DC scan, then an AC scan of component 1
    return PROGRESSIVE[:s0] + PROGRESSIVE[e0:e1] + PROGRESSIVE[s0:]  # that AC scan (and its DHT) first


def _restart_out_of_order() -> bytes:
    jpeg = _pillow_jpeg(_photo(30), restart_marker_blocks=1)
    i = jpeg.index(b"\xff\xd1")
    return _set(jpeg, i + 1, 0xD3)


def _scan_field(offset_from_end: int, value: int):
    def make():
        end = SOS + 2 + int.from_bytes(BASE[SOS + 2 : SOS + 4], "big")
        return _set(BASE, end - offset_from_end, value)

    return make


def _bad_huffman_counts() -> bytes:
    s, _ = _segment(BASE, 0xC4)
    return _set(BASE, s + 5, 3)  # three codes of length 1: more than one bit can tell apart


DEFECTS = {
    # The crasher: a 64x48 JPEG whose SOF component count says 2 where 3 follow.
    "SOF component count 3 -> 2": (lambda: _sof_components(BASE, 2), "does not match its component count"),
    "SOF component count 3 -> 4": (lambda: _sof_components(BASE, 4), "does not match its component count"),
    "12-bit precision": (lambda: _set(BASE, SOF + 4, 12), "12-bit"),
    "zero height (DNL)": (lambda: _set(BASE, SOF + 5, 0, 0), "frame size 64x0"),
    "zero width": (lambda: _set(BASE, SOF + 7, 0, 0), "frame size 0x48"),
    "duplicate component ids": (lambda: _set(BASE, SOF + 13, 1), "not unique"),
    "sampling factor 0": (_sampling(0, 0x20), "sampling factors 2x0"),
    "sampling factor 5": (_sampling(1, 0x51), "sampling factors 5x1"),
    "luma sampling 3x2": (_sampling(0, 0x32), "sampling factors 3x2, 1x1, 1x1 are not a usual subsampling"),
    "chroma 2x2 against luma 1x1": (lambda: _set(_sampling(0, 0x11)(), SOF + 14, 0x22), "1x1, 2x2, 1x1 are not"),
    "grayscale with sampling 2x2": (
        lambda: _set(GRAY, _segment(GRAY, 0xC0)[0] + 11, 0x22),
        "sampling factors 2x2 are not",
    ),
    "undefined quantization table id": (lambda: _set(BASE, SOF + 12, 2), "quantization table 2, never defined"),
    "lossless SOF3": (lambda: _set(BASE, SOF + 1, 0xC3), "SOF3 (lossless frame) is not for DALI"),
    "hierarchical SOF5": (lambda: _set(BASE, SOF + 1, 0xC5), "SOF5 (hierarchical frame)"),
    "a second SOF": (lambda: _insert_before_scan(BASE[SOF : _segment(BASE, 0xC0)[1]])(), "a second frame header"),
    "scan component not in frame": (lambda: _set(BASE, SOS + 5, 9), "scan component 9 is not in the frame"),
    "scan components out of order": (lambda: _set(_set(BASE, SOS + 5, 2), SOS + 7, 1), "out of frame order"),
    "scan header length mismatch": (lambda: _set(BASE, SOS + 4, 2), "scan header of 12 bytes with 2 components"),
    "sequential scan with Ss=1": (_scan_field(3, 1), "sequential scan with Ss=1"),
    "undefined DC Huffman table": (lambda: _set(BASE, SOS + 6, 0x20), "DC Huffman table 2, never defined"),
    "no Huffman tables": (lambda: _without_all(BASE, 0xC4), "DC Huffman table 0, never defined"),
    "no quantization tables": (lambda: _without_all(BASE, 0xDB), "quantization table 0, never defined"),
    "bogus Huffman code lengths": (_bad_huffman_counts, "more codes than their lengths allow"),
    "quantization segment length off": (lambda: _dqt_length_off(), "does not match its tables"),
    "unknown marker before the scan": (_insert_before_scan(b"\xff\x02\x00\x04ab"), "unexpected marker 0x02"),
    "JPG extension marker": (_insert_before_scan(b"\xff\xf3\x00\x02"), "unexpected marker 0xF3"),
    "stray restart marker in the header": (_insert_before_scan(b"\xff\xd3"), "stray marker 0xD3"),
    "a second SOI": (_insert_before_scan(b"\xff\xd8"), "stray marker 0xD8"),
    "fill bytes before a marker": (_insert_before_scan(b"\xff\xff"), "fill bytes"),
    "DNL marker": (_insert_before_scan(b"\xff\xdc\x00\x04\x00\x30"), "DNL"),
    "restart interval segment too long": (_insert_before_scan(b"\xff\xdd\x00\x05\x00\x01\x00"), "restart interval"),
    "arithmetic conditioning in a Huffman frame": (_insert_before_scan(b"\xff\xcc\x00\x04\x00\x11"), "DAC"),
    "4 components without an Adobe segment": (
        lambda: _without_all(_pillow_jpeg(_photo(31).convert("CMYK")), 0xEE),
        "4 components without an Adobe segment",
    ),
    "junk before a marker": (_insert_before_scan(b"\x00\x17\x42"), "where a marker should be"),
    "a repeated scan header (baseline)": (
        lambda: BASE[: _scans(BASE)[0][0]] + BASE[SOS : SOS + 14] + BASE[SOS:],
        "scanned twice in a sequential frame",
    ),
    "an inserted SOF in the scan data": (
        lambda: _in_entropy_data(BASE, BASE[SOF : _segment(BASE, 0xC0)[1]]),
        "a second frame header",
    ),
    "a restart marker without a restart interval": (
        lambda: _in_entropy_data(BASE, b"\xff\xd0"),
        "without a restart interval",
    ),
    "restart markers out of order": (_restart_out_of_order, "where RST1 was due"),
    "a deleted scan (4:2:0 in three scans)": (lambda: _missing_sequential_scan(), "never scanned"),
    "a repeated progressive scan": (lambda: _repeated_progressive_scan(3, 1), "progression"),
    "an AC scan before the DC scan": (_ac_scan_before_dc_scan, "AC scan of component 1 before its DC scan"),
    "progressive DC scan with AC": (lambda: _progressive_first_scan_field(-2, 5), "DC and AC together"),
    "progressive successive approximation Al=14": (lambda: _progressive_first_scan_field(-1, 14), "Al=14"),
    "cut inside the frame header": (lambda: BASE[: SOF + 5], "runs past the end of the data"),
    "cut between segments": (lambda: BASE[:SOS], "cut inside the header"),
    "no scan": (lambda: BASE[:SOS] + b"\xff\xd9", "end of image before any scan"),
}


def _without_all(jpeg: bytes, marker: int) -> bytes:
    while True:
        try:
            s, e = _segment(jpeg, marker)
        except AssertionError:
            return jpeg
        jpeg = jpeg[:s] + jpeg[e:]


def _dqt_length_off() -> bytes:
    s, _ = _segment(BASE, 0xDB)
    length = int.from_bytes(BASE[s + 2 : s + 4], "big")
    longer = (length + 1).to_bytes(2, "big")
    return BASE[: s + 2] + longer + BASE[s + 4 : s + 2 + length] + b"\0" + BASE[s + 2 + length :]


def _missing_sequential_scan() -> bytes:
    # The interleaved scan's header rewritten to name component 1 alone: components 2 and 3 are never scanned,
    # as in a file of one scan per component whose last two scans were deleted.
    scans = _scans(BASE)
    s, e = scans[0]
    head = BASE[s : s + 2 + int.from_bytes(BASE[s + 2 : s + 4], "big")]
    assert head[4] == 3
    one = b"\xff\xda\x00\x08\x01" + head[5:7] + b"\x00\x3f\x00"
    # The data is not that of a Y-only scan; only the structure is under test.
    return BASE[:s] + one + BASE[s + len(head) : e] + BASE[e:]


def _progressive_first_scan_field(offset_from_end: int, value: int) -> bytes:
    s, _ = _scans(PROGRESSIVE)[0]
    end = s + 2 + int.from_bytes(PROGRESSIVE[s + 2 : s + 4], "big")
    return _set(PROGRESSIVE, end + offset_from_end, value)


@pytest.mark.parametrize("kind", list(DEFECTS))
def test_dali_rejects__names_each_structural_defect(kind):
    make, reason = DEFECTS[kind]
    jpeg = make()
    assert jpeg != BASE and jpeg != PROGRESSIVE
    got = dali_rejects(jpeg)
    assert got is not None and reason in got, got


def test_dali_rejects__the_sof_component_count_mutant_passes_the_old_complete_header_check():
    # The crasher reached DALI because its header is complete; the stricter check keeps it away.
    jpeg = _sof_components(BASE, 2)
    assert has_complete_header(jpeg)
    assert dali_rejects(jpeg) == "frame header of 17 bytes does not match its component count"


def test_dali_rejects__not_a_jpeg():
    assert dali_rejects(b"") == "not a JPEG (no start-of-image marker)"
    assert dali_rejects(b"\x89PNG\r\n\x1a\n....") == "not a JPEG (no start-of-image marker)"
    assert "not a complete JPEG" in dali_rejects(BASE[: SOS + 14])  # a whole scan header, no data after it


def test_dali_rejects__corrupt_entropy_data_is_left_to_the_decoder():
    # Flipped bits inside the scan data (no 0xFF made or lost) change pixels, not structure: DALI copes with them.
    s, e = _scans(BASE)[0]
    data = bytearray(BASE)
    for i in range(s + 20, e - 1, 37):
        if data[i] not in (0xFF, 0xFE, 0x00) and data[i - 1] != 0xFF:
            data[i] ^= 0x01
    assert bytes(data) != BASE
    assert dali_rejects(bytes(data)) is None


def _bomb(jpeg: bytes, width: int, height: int) -> bytes:
    s = jpeg.index(b"\xff\xc0") if b"\xff\xc0" in jpeg else jpeg.index(b"\xff\xc2")
    return jpeg[: s + 5] + height.to_bytes(2, "big") + width.to_bytes(2, "big") + jpeg[s + 9 :]


TINY_GRAY = make_jpeg(40, 16, 16, grayscale=True, quality=75)


def test_implausible__a_tiny_file_claiming_9400x9400_is_refused():
    bomb = _bomb(TINY_GRAY, 9400, 9400)
    assert len(bomb) < 1000 and 9400 * 9400 < 89_478_485  # under max_pixels: only this check stops it
    assert dali_rejects(bomb) is None  # its structure is fine
    reason = implausible(bomb, DEFAULT_MAX_SCANS)
    assert reason is not None and "claims 9400x9400" in reason and "1380625 8x8 blocks" in reason
    assert implausible(TINY_GRAY, DEFAULT_MAX_SCANS) is None


@pytest.mark.parametrize(
    "jpeg",
    [make_jpeg(41, 200, 150), make_jpeg(42, 200, 150, progressive=True), make_jpeg(43, 200, 150, subsampling="4:4:4")],
    ids=["baseline", "progressive", "4:4:4"],
)
def test_implausible__colour_and_progressive_bombs_are_refused(jpeg):
    assert implausible(jpeg) is None
    assert "cannot code" in implausible(_bomb(jpeg, 8000, 8000))


def test_implausible__the_bound_is_about_bits_so_a_plausible_claim_passes():
    # The same bytes claiming a size they can hold (under 8 bits per 8x8 block) are not a limit failure.
    s, e = _scans(TINY_GRAY)[0]
    budget_blocks = (e - s - 10) * 8
    side = int((budget_blocks**0.5)) * 8 - 8
    assert implausible(_bomb(TINY_GRAY, side, side)) is None


def test_implausible__a_flat_progressive_image_sits_exactly_on_the_bound_and_passes():
    # Every DC difference is 0 and its Huffman code 1 bit long: the tightest real case, 1 bit per block.
    jpeg = _pillow_jpeg(Image.new("L", (1000, 1000), 200), progressive=True)
    header = parse_jpeg(jpeg)
    assert header.first_scan_units == 125 * 125
    # The scan's data (125 * 125 bits) and the next scan's Huffman table segment, counted with it.
    assert header.first_scan_units // 8 < header.first_scan_bytes < header.first_scan_units // 8 + 100
    assert implausible(jpeg) is None
    assert implausible(_bomb(jpeg, 1000, 1100)) is not None  # 10% more blocks than the bytes can code


def test_implausible__a_marker_like_corrupt_byte_early_in_the_scan_data_does_not_shrink_the_count():
    corrupt = _in_entropy_data(BASE, b"\xff\x02")  # 10 bytes into the data of a 64x48 image (24 blocks)
    assert "0x02" in dali_rejects(corrupt)  # Pillow's to decode, not DALI's
    assert implausible(corrupt) is None  # but not a limit failure


def test_implausible__arithmetic_coded_frames_are_held_to_one_bit_per_block_of_the_whole_file():
    bomb = _bomb(TINY_GRAY, 9400, 9400)
    arithmetic = _set(bomb, bomb.index(b"\xff\xc0") + 1, 0xC9)  # SOF9: no 1-bit floor per DC, but per file
    assert "less than 1 bit per 8x8 block" in implausible(arithmetic)
    assert "cannot code" in implausible(_set(bomb, bomb.index(b"\xff\xc0") + 1, 0xC1))  # extended Huffman
    fits = _bomb(TINY_GRAY, 128, 128)  # 256 blocks: 32 bytes hold them
    assert implausible(_set(fits, fits.index(b"\xff\xc0") + 1, 0xC9)) is None


def test_implausible__a_progressive_file_with_no_dc_scan_is_held_to_one_bit_per_block():
    # The case: only AC scans (no DC scan first), claiming 9400x9400 in a few hundred bytes.
    ac_only = _synthetic_progressive([((1,), 1, 63, 0, 0), ((2,), 1, 63, 0, 0), ((3,), 1, 63, 0, 0)])
    header = parse_jpeg(_bomb(ac_only, 9400, 9400))
    assert header.first_scan_units == 0 and "AC scan" in header.dali_rejects()  # Pillow's, not DALI's...
    assert "less than 1 bit per 8x8 block" in header.implausible()  # ...but never decoded at all


def test_implausible__pixels_times_scans_over_the_cost_bound_is_refused():
    from beam_tarimg.jpeg import MAX_DECODE_COST

    script = [((1, 2, 3), 0, 0, 0, 0)] + [((c,), k, k, 0, 0) for c in (1, 2, 3) for k in range(1, 64)][:99]
    side = int((MAX_DECODE_COST / 100) ** 0.5)
    jpeg = _synthetic_progressive(script, first_data=side * side // 64)  # 100 scans, a plausible first scan
    assert "decode cost bound" in parse_jpeg(_bomb(jpeg, side + 8, side + 8)).implausible()
    header = parse_jpeg(_bomb(jpeg, side - 64, side - 64))
    assert header.scans == 100 and "decode cost" not in (header.implausible() or "")


def test_implausible__more_scans_than_max_scans():
    many = _repeated_progressive_scan(len(_scans(PROGRESSIVE)) - 1, 400)  # the last AC refinement scan, 400 times
    assert parse_jpeg(many, 1000).scans == 410
    assert parse_jpeg(many, 300).scans == 301  # the walk stops there: its time is bounded
    assert implausible(many, DEFAULT_MAX_SCANS) == f"more than max_scans={DEFAULT_MAX_SCANS} scans"
    assert implausible(many, 410) is None
    assert implausible(PROGRESSIVE, 10) is None and implausible(PROGRESSIVE, 9) == "more than max_scans=9 scans"
    assert dali_rejects(many) is not None  # repeated refinement scans break the progression too


def _synthetic_progressive(script, first_data: int = 16) -> bytes:
    """PROGRESSIVE's frame and tables (all its Huffman tables moved before the first scan), then one scan per
    ``(component ids, Ss, Se, Ah, Al)`` of ``script``, each with 16 bytes of (meaningless) data (the first
    with ``first_data``)."""
    first = _scans(PROGRESSIVE)[0][0]
    tables = b""
    i = PROGRESSIVE.find(b"\xff\xc4", first)
    while i >= 0:
        tables += PROGRESSIVE[i : i + 2 + int.from_bytes(PROGRESSIVE[i + 2 : i + 4], "big")]
        i = PROGRESSIVE.find(b"\xff\xc4", i + 2)
    out = PROGRESSIVE[:first] + tables
    for ids, ss, se, ah, al in script:
        tables = b"".join(bytes([c, 0x00 if c == 1 else 0x11]) for c in ids)
        body = bytes([len(ids)]) + tables + bytes([ss, se, ah << 4 | al])
        out += b"\xff\xda" + (len(body) + 2).to_bytes(2, "big") + body + b"\x2a" * (16 if out.count(b"\xff\xda") else first_data)
    return out + b"\xff\xd9"


def test_dali_rejects__more_scans_than_dali_decodes_even_under_a_higher_max_scans():
    # A valid progression of 1 + 3 * 63 * 2 = 379 scans: every AC coefficient alone, in two bit steps.
    script = [((1, 2, 3), 0, 0, 0, 0)]
    script += [((c,), k, k, 0, 1) for c in (1, 2, 3) for k in range(1, 64)]
    script += [((c,), k, k, 1, 0) for c in (1, 2, 3) for k in range(1, 64)]
    jpeg = _synthetic_progressive(script)
    assert dali_rejects(_synthetic_progressive(script[:256])) is None
    header = parse_jpeg(jpeg, max_scans=1000)
    assert header.scans == 379 and header.implausible() is None
    assert header.dali_rejects() == "more than 256 scans (DALI refuses them)"  # DALI raises on these: Pillow's


def test_jpeg_dimensions__report_the_claim_even_of_a_broken_file():
    assert jpeg_dimensions(_bomb(TINY_GRAY, 9400, 9400)) == (9400, 9400)
    assert jpeg_dimensions(_sof_components(BASE, 2)) == (64, 48)
    assert jpeg_dimensions(BASE[: SOF + 9]) == (64, 48)  # cut right after the size
    assert jpeg_dimensions(BASE[: SOF + 7]) is None
    assert image_dimensions(BASE) == (64, 48)
    assert image_dimensions(BASE, parse_jpeg(BASE)) == (64, 48)  # the caller's walk, reused


# -- orientation as Pillow reads it, the walk's bounds (issue 16) ---------------------------------------------


def test_parse_jpeg__orientation_is_what_pillows_exif_transpose_reads_for_random_exif_and_xmp_segments():
    import random
    import warnings

    from bench import fuzz_pixels as FP
    from bench.mutate import base_jpegs

    rng = random.Random(3)
    bases = [b.data for b in base_jpegs(3, count=12)]
    checked = 0
    for _ in range(300):
        _, blob = FP.orientation_segments(rng, rng.choice(bases))
        header = parse_jpeg(blob)
        if header.orientation is None:  # Pillow's EXIF reader raised on it: only a Pillow decode can tell
            assert "EXIF" in header.dali_rejects()
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(blob)) as im:
                pillows = im.getexif().get(0x0112, 1)
        expected = pillows if pillows in range(2, 9) else 1
        assert header.orientation == expected, blob[:200]
        checked += 1
    assert checked > 250


def _with_restarts(width: int, height: int) -> bytes:
    return _pillow_jpeg(_photo(4, width, height), quality=90, restart_marker_blocks=1)


def test_parse_jpeg__restart_markers_are_checked_in_order_beyond_the_first_64_by_their_counts():
    jpeg = _with_restarts(256, 256)  # 4:2:0: 256 MCUs, one restart interval each: 255 markers
    header = parse_jpeg(jpeg)
    assert header.problem is None
    last = jpeg.rindex(b"\xff\xd7")  # swap two markers far beyond the first 64: RST7 <-> RST0
    first = jpeg.index(b"\xff\xd0", last - 200)
    swapped = bytearray(jpeg)
    swapped[last + 1], swapped[first + 1] = 0xD0, 0xD7
    assert dali_rejects(bytes(swapped)) is None  # a swap keeps the counts: only the first 64 are in order
    dropped = jpeg[:last] + jpeg[last + 2 :]  # one marker gone: the counts tell
    assert "out of order" in dali_rejects(dropped)


def test_parse_jpeg__a_flood_of_restart_markers_is_walked_at_c_speed_and_refused_for_dali():
    import time

    jpeg = _with_restarts(64, 64)
    cycle = bytes(b for k in range(8) for b in (0xFF, 0xD0 + k))
    flood = jpeg[:-2] + cycle * (4 << 16) + jpeg[-2:]  # 4 MiB
    start = time.process_time()
    header = parse_jpeg(flood)
    assert time.process_time() - start < 0.5  # ~0.02 s at ~200 MB/s; the per-marker walk took ~1 s
    assert "more restart markers in scan 1 than its 16 MCUs" in header.problem
    assert header.implausible() is None  # Pillow decodes it (the markers after the image are ignored)


def test_implausible__more_markers_than_the_walk_reads_is_a_limit():
    from beam_tarimg.jpeg import MAX_MARKERS

    flood = BASE[:2] + b"\xff\xfe\x00\x03x" * MAX_MARKERS + BASE[2:]
    assert implausible(flood) == f"more than {MAX_MARKERS} markers"
    assert implausible(BASE[:2] + b"\xff\xfe\x00\x03x" * 100 + BASE[2:]) is None


def test_frame_size__agrees_with_the_full_walk_and_gives_up_plainly():
    from beam_tarimg.jpeg import frame_size

    for seed, (w, h) in enumerate([(48, 40), (17, 301), (640, 1)]):
        for kwargs in ({}, {"progressive": True}, {"exif_orientation": 6}):
            blob = make_jpeg(seed, w, h, **kwargs)
            header = parse_jpeg(blob)
            assert frame_size(blob) == (header.width, header.height) == (w, h)
    blob = make_jpeg(3, 30, 20)
    assert frame_size(blob[:2] + b"\xff\xff\xff" + blob[2:]) == (30, 20)  # fill bytes before a marker
    for bad in (b"", b"\xff\xd8", b"\x89PNG\r\n\x1a\n" + blob, blob[:20], b"\xff\xd8\xff\xda\x00\x02"):
        assert frame_size(bad) is None
