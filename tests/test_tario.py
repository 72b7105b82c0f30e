"""read_tar, the Beam-free tar streaming stage: laziness, end-of-archive detection, limits, hostile headers,
links and other members that are not files, names that are not UTF-8."""

from __future__ import annotations

import io
import tarfile
import threading
import time

import pytest

from beam_tarimg.tario import (
    escape_member_name,
    member_name_bytes,
    normalize_extensions,
    read_tar,
    split_member_name,
    tar_display_name,
)
from beam_tarimg.types import EncodedBatch, FailureStage, ImageFailure
from conftest import RecordingFile, make_jpeg, write_tar


def _counts():
    seen = {}
    return seen, lambda name, n: seen.__setitem__(name, seen.get(name, 0) + n)


def test_read_tar__streams_the_first_batch_before_reading_the_rest_of_the_tar(tmp_path):
    jpeg = make_jpeg(1, 32, 32)
    path = write_tar(tmp_path / "big.tar", [(f"{i:09d}.jpg", jpeg) for i in range(2000)])
    raw = open(path, "rb").read()
    f = RecordingFile(raw)
    events = read_tar(f, path, batch_size=10)
    first = next(events)
    assert isinstance(first, EncodedBatch) and len(first) == 10
    assert f.high_water < len(raw) / 20, "the whole tar was read before the first batch came out"
    rest = list(events)
    assert sum(len(b) for b in rest) == 1990


def test_read_tar__proper_end_of_archive_is_not_a_failure(tmp_path):
    path = write_tar(tmp_path / "ok.tar", [("1.jpg", make_jpeg(1)), ("2.jpg", make_jpeg(2))])
    seen, count = _counts()
    events = list(read_tar(open(path, "rb"), path, batch_size=5, count=count))
    assert [type(e) for e in events] == [EncodedBatch]
    assert "tars_corrupt" not in seen


def test_read_tar__corrupt_header_after_members_is_one_read_failure(tmp_path):
    path = write_tar(tmp_path / "h.tar", [("1.jpg", make_jpeg(1)), ("2.jpg", make_jpeg(2))])
    raw = bytearray(open(path, "rb").read())
    second_header = raw.index(b"2.jpg")
    raw[second_header + 148 : second_header + 156] = b"garbage!"  # the header checksum field
    seen, count = _counts()
    events = list(read_tar(io.BytesIO(bytes(raw)), path, batch_size=5, count=count))
    assert [e.images[0].member for e in events if isinstance(e, EncodedBatch)] == ["1.jpg"]
    failures = [e for e in events if isinstance(e, ImageFailure)]
    assert len(failures) == 1 and failures[0].stage == FailureStage.READ and "1.jpg" in failures[0].error
    assert seen["tars_corrupt"] == 1


def test_read_tar__zero_byte_file_is_not_a_tar(tmp_path):
    events = list(read_tar(io.BytesIO(b""), "empty.tar", batch_size=5))
    assert len(events) == 1 and events[0].stage == FailureStage.READ and events[0].member is None


def test_read_tar__gzipped_tar_is_read(tmp_path):
    import tarfile

    path = tmp_path / "t.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        data = make_jpeg(1)
        info = tarfile.TarInfo("1.jpg")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    events = list(read_tar(open(path, "rb"), str(path), batch_size=5))
    assert [e.images[0].data for e in events] == [data]


def test_read_tar__member_over_max_member_bytes_is_never_read(tmp_path):
    big = make_jpeg(1, 300, 300)
    path = write_tar(tmp_path / "m.tar", [("big.jpg", big), ("small.jpg", make_jpeg(2, 8, 8))])
    events = list(read_tar(open(path, "rb"), path, batch_size=5, max_member_bytes=len(big) - 1))
    failures = [e for e in events if isinstance(e, ImageFailure)]
    assert [(f.member, f.stage) for f in failures] == [("big.jpg", FailureStage.LIMIT)]
    assert [i.member for e in events if isinstance(e, EncodedBatch) for i in e.images] == ["small.jpg"]


def test_read_tar__max_pixels_checks_the_header_of_each_jpeg(tmp_path):
    path = write_tar(tmp_path / "p.tar", [("a.jpg", make_jpeg(1, 40, 30)), ("b.jpg", make_jpeg(2, 10, 10))])
    events = list(read_tar(open(path, "rb"), path, batch_size=5, max_pixels=1000))
    failures = [e for e in events if isinstance(e, ImageFailure)]
    assert [(f.member, f.stage) for f in failures] == [("a.jpg", FailureStage.LIMIT)]
    assert "40x30" in failures[0].error


@pytest.mark.parametrize(
    "name, expected",
    [
        ("000000031.jpg", ("000000031", "jpg")),
        ("a/b/000031.JPEG", ("a/b/000031", "jpeg")),
        ("dir.with.dots/x.jpg", ("dir.with.dots/x", "jpg")),
        ("img.0001.jpg", ("img.0001", "jpg")),
        ("noext", ("noext", "")),
        (".hidden", (".hidden", "")),
    ],
)
def test_split_member_name__key_is_the_path_without_its_last_extension(name, expected):
    assert split_member_name(name) == expected


def test_normalize_extensions__accepts_commas_dots_and_case():
    assert normalize_extensions("jpg, .JPEG,jpg") == ("jpg", "jpeg")
    assert normalize_extensions([".JFIF"]) == ("jfif",)
    with pytest.raises(ValueError, match="extensions"):
        normalize_extensions(" , ")


def test_read_tar__tar_cut_right_after_a_long_name_header_is_one_failure(tmp_path):
    long_name = "d" * 150 + "/000000001.jpg"
    path = write_tar(tmp_path / "l.tar", [("000000000.jpg", make_jpeg(0)), (long_name, make_jpeg(1))],
                     format=tarfile.GNU_FORMAT)
    raw = open(path, "rb").read()
    second = raw.index(b"././@LongLink")  # the GNU long-name header before the second member
    seen, count = _counts()
    events = list(read_tar(io.BytesIO(raw[: second + 1024]), path, batch_size=5, count=count))
    failures = [e for e in events if isinstance(e, ImageFailure)]
    assert len(failures) == 1 and failures[0].stage == FailureStage.READ
    assert [i.member for e in events if isinstance(e, EncodedBatch) for i in e.images] == ["000000000.jpg"]
    assert seen["tars_corrupt"] == 1


def test_read_tar__a_second_tar_appended_after_the_end_blocks_is_reported(tmp_path):
    first = write_tar(tmp_path / "a.tar", [("1.jpg", make_jpeg(1))])
    second = write_tar(tmp_path / "b.tar", [("2.jpg", make_jpeg(2))])
    raw = open(first, "rb").read() + open(second, "rb").read()
    events = list(read_tar(io.BytesIO(raw), "ab.tar", batch_size=5))
    assert [i.member for e in events if isinstance(e, EncodedBatch) for i in e.images] == ["1.jpg"]
    failures = [e for e in events if isinstance(e, ImageFailure)]
    assert len(failures) == 1 and "data after the end-of-archive blocks" in failures[0].error


def test_read_tar__png_over_pillows_own_bomb_limit_is_a_limit_failure(tmp_path):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (20000, 20000)).save(buf, "PNG")  # 4e8 pixels: over 2 x Pillow's MAX_IMAGE_PIXELS
    path = write_tar(tmp_path / "bomb.tar", [("bomb.jpg", buf.getvalue())])
    events = list(read_tar(open(path, "rb"), path, batch_size=5, max_pixels=10**12))
    assert [(e.member, e.stage) for e in events] == [("bomb.jpg", FailureStage.LIMIT)]


# --- Hostile tars: every case ends in bounded time, with whole members first and one read failure ---------

HARD_LIMIT_S = 60  # not a speed check: a regression that hangs fails here instead of hanging the suite


def _read_bounded(data: bytes, limit_s: float = HARD_LIMIT_S, **kwargs):
    """``(events, counts)`` of read_tar over ``data``, run in a daemon thread: a hang fails the test."""
    seen, count = _counts()
    out = {}

    def run():
        try:
            out["events"] = list(read_tar(io.BytesIO(data), "t.tar", batch_size=100, count=count, **kwargs))
        except BaseException as e:  # handed to the test below
            out["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    started = time.monotonic()
    thread.start()
    thread.join(limit_s)
    assert not thread.is_alive(), f"read_tar still running after {time.monotonic() - started:.0f} s"
    if "error" in out:
        raise out["error"]
    return out["events"], seen


def _images(events):
    return [image.member for e in events if isinstance(e, EncodedBatch) for image in e.images]


def _failures(events):
    return [e for e in events if isinstance(e, ImageFailure)]


def _tar_bytes(members, format=tarfile.GNU_FORMAT) -> bytes:
    """A tar in memory: ``(name, data)`` pairs (names may hold surrogate escapes: written as raw bytes),
    ``(TarInfo, data)`` pairs (``info.pax_headers`` is written too) or ready TarInfo objects (links, dirs)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=format, encoding="utf-8", errors="surrogateescape") as tf:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tf.addfile(member)
            elif isinstance(member[0], tarfile.TarInfo):
                tf.addfile(member[0], io.BytesIO(member[1]))
            else:
                name, data = member
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _header_at(raw: bytes, name: bytes) -> int:
    at = raw.index(name)
    assert at % 512 == 0, "the name must start a header block"
    return at


def _patch_header(raw: bytearray, at: int, field_offset: int, value: bytes) -> None:
    """Writes ``value`` into the header block at ``at`` and recomputes its checksum, so tarfile accepts it."""
    raw[at + field_offset : at + field_offset + len(value)] = value
    raw[at + 148 : at + 156] = b" " * 8
    raw[at + 148 : at + 156] = b"%06o\0 " % sum(raw[at : at + 512])


def _end_of_members(raw: bytes) -> int:
    """Where a tar's end-of-archive blocks (and record padding) begin: hostile parts are appended there."""
    end = len(raw)
    while end >= 512 and raw[end - 512 : end] == bytes(512):
        end -= 512
    return end


def _base256(n: int, width: int = 12) -> bytes:
    return bytes([0x80]) + n.to_bytes(width - 1, "big")


def _pax_header_block(records: bytes, type_: bytes = tarfile.XHDTYPE, claimed_size=None) -> bytes:
    """A PAX header (header block + data) with ``records`` as its data, written by hand."""
    info = tarfile.TarInfo("././@PaxHeader")
    info.type = type_
    info.size = len(records) if claimed_size is None else 0
    block = bytearray(info.tobuf(tarfile.USTAR_FORMAT))
    if claimed_size is not None:
        _patch_header(block, 0, 124, _base256(claimed_size) if claimed_size >= 8**11 else b"%011o\0" % claimed_size)
    return bytes(block) + records + b"\0" * (-len(records) % 512)


def _pax_record(keyword: bytes, value: bytes) -> bytes:
    body = b" " + keyword + b"=" + value + b"\n"
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n += 1
    return str(n).encode() + body


JPEG_A, JPEG_B, JPEG_C = make_jpeg(1), make_jpeg(2), make_jpeg(3)


@pytest.mark.parametrize("size", [2**62, 2**80, 10**9])
def test_read_tar__member_size_past_the_end_of_the_data_ends_the_tar_at_once(size):
    raw = bytearray(_tar_bytes([("a.jpg", JPEG_A), ("b.bin", b"x" * 1000), ("c.jpg", JPEG_C)]))
    _patch_header(raw, _header_at(raw, b"b.bin"), 124, _base256(size))
    events, seen = _read_bounded(bytes(raw))
    assert _images(events) == ["a.jpg"]
    [failure] = _failures(events)
    assert failure.stage == FailureStage.READ and failure.member is None
    assert f"member 'b.bin' claims {size} bytes" in failure.error and "past the end of the data" in failure.error
    assert seen["tars_corrupt"] == 1


def test_read_tar__jpeg_over_max_member_bytes_running_past_the_end_is_only_the_tars_read_failure():
    raw = bytearray(_tar_bytes([("a.jpg", JPEG_A), ("big.jpg", JPEG_B), ("c.jpg", JPEG_C)]))
    _patch_header(raw, _header_at(raw, b"big.jpg"), 124, _base256(2**62))
    events, seen = _read_bounded(bytes(raw))
    assert _images(events) == ["a.jpg"]
    [failure] = _failures(events)
    assert failure.stage == FailureStage.READ and "'big.jpg' claims" in failure.error
    assert "images_over_limit" not in seen


def test_read_tar__jpeg_over_max_member_bytes_whose_data_is_whole_is_a_limit_failure_and_the_tar_goes_on():
    raw = _tar_bytes([("a.jpg", JPEG_A), ("big.jpg", b"\xff" * 5000), ("c.jpg", JPEG_C)])
    events, seen = _read_bounded(raw, max_member_bytes=4000)
    assert _images(events) == ["a.jpg", "c.jpg"]
    assert [(f.member, f.stage) for f in _failures(events)] == [("big.jpg", FailureStage.LIMIT)]
    assert seen["images_over_limit"] == 1 and "tars_corrupt" not in seen


def test_read_tar__absurd_size_in_a_gzipped_tar_ends_it_at_once():
    import gzip

    raw = bytearray(_tar_bytes([("a.jpg", JPEG_A), ("b.bin", b"x" * 1000)]))
    _patch_header(raw, _header_at(raw, b"b.bin"), 124, _base256(2**62))
    compressed = gzip.compress(bytes(raw))
    events, _ = _read_bounded(compressed)  # tarfile decompresses
    assert _images(events) == ["a.jpg"] and len(_failures(events)) == 1
    seen, count = _counts()
    events = list(read_tar(gzip.GzipFile(fileobj=io.BytesIO(compressed)), "t.tar", batch_size=5, count=count))
    assert _images(events) == ["a.jpg"] and len(_failures(events)) == 1  # decompressed before tarfile, as Beam does


@pytest.mark.parametrize(
    "field_offset, value, error",
    [
        (148, b"0000000\0", "bad checksum"),  # a wrong header checksum
        (124, b"12x4567890ab", "invalid header"),  # a size field that is not octal
        (124, b"\xff" + b"\xff" * 11, "negative size"),  # base-256 -1
    ],
)
def test_read_tar__damaged_header_in_the_middle_is_one_read_failure_after_the_whole_members(field_offset, value, error):
    raw = bytearray(_tar_bytes([("a.jpg", JPEG_A), ("b.jpg", JPEG_B), ("c.jpg", JPEG_C)]))
    at = _header_at(raw, b"b.jpg")
    if field_offset == 148:
        raw[at + 148 : at + 156] = value
    else:
        _patch_header(raw, at, field_offset, value)
    events, seen = _read_bounded(bytes(raw))
    assert _images(events) == ["a.jpg"]
    [failure] = _failures(events)
    assert failure.stage == FailureStage.READ and error in failure.error
    assert seen["tars_corrupt"] == 1


@pytest.mark.parametrize("value", [b"-5", b"abc", b"1e3", b"99999999999999999999999999"])
def test_read_tar__pax_size_that_is_not_a_decimal_number_is_one_read_failure(value):
    raw = _tar_bytes([("a.jpg", JPEG_A)], format=tarfile.PAX_FORMAT)
    end = _end_of_members(raw)
    member = bytearray(tarfile.TarInfo("b.jpg").tobuf(tarfile.USTAR_FORMAT))
    _patch_header(member, 0, 124, b"%011o\0" % len(JPEG_B))
    body = JPEG_B + b"\0" * (-len(JPEG_B) % 512)
    hostile = _pax_header_block(_pax_record(b"size", value)) + bytes(member) + body
    events, seen = _read_bounded(raw[:end] + hostile + b"\0" * 1024)
    assert _images(events) == ["a.jpg"]
    [failure] = _failures(events)
    assert failure.stage == FailureStage.READ and "size" in failure.error
    assert seen["tars_corrupt"] == 1


def test_read_tar__tar_of_only_zero_blocks_is_an_empty_tar():
    events, seen = _read_bounded(b"\0" * 10240)
    assert events == [] and seen["tars_without_images"] == 1 and "tars_corrupt" not in seen


@pytest.mark.parametrize("type_", [tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK])
@pytest.mark.parametrize("claimed", [2 * 1024 * 1024, 2**62])
def test_read_tar__gnu_long_name_claiming_a_huge_length_is_refused_before_reading_it(type_, claimed):
    raw = _tar_bytes([("a.jpg", JPEG_A), ("d" * 150 + ".jpg", JPEG_B)])
    at = _header_at(raw, b"././@LongLink")
    hostile = bytearray(raw[:at] + raw[at:] + b"\0" * 100_000)
    hostile[at + 156 : at + 157] = type_
    _patch_header(hostile, at, 124, _base256(claimed))
    events, seen = _read_bounded(bytes(hostile))
    assert _images(events) == ["a.jpg"]
    [failure] = _failures(events)
    assert failure.stage == FailureStage.READ and f"claims {claimed} bytes" in failure.error
    assert seen["bytes_read"] < 40_000, "the claimed header was read into memory"


@pytest.mark.parametrize("claimed", [2 * 1024 * 1024, 10**9, 2**62])
def test_read_tar__pax_header_claiming_a_huge_length_is_refused_before_reading_it(claimed):
    raw = _tar_bytes([("a.jpg", JPEG_A)], format=tarfile.PAX_FORMAT)
    end = _end_of_members(raw)
    hostile = raw[:end] + _pax_header_block(b"", claimed_size=claimed) + b"\1" * 3_000_000
    events, seen = _read_bounded(hostile)
    assert _images(events) == ["a.jpg"]
    [failure] = _failures(events)
    assert failure.stage == FailureStage.READ and "PAX extended header claims" in failure.error
    assert seen["bytes_read"] < 100_000, "the claimed header was read into memory"


def test_read_tar__pax_records_crafted_for_tarfiles_quadratic_parser_are_refused_in_linear_time():
    payload = b"3 x" * 300_000 + b"="  # ~0.9 MB: minutes in tarfile's own parser (CVE-2024-6232)
    raw = _tar_bytes([("a.jpg", JPEG_A)], format=tarfile.PAX_FORMAT)
    end = _end_of_members(raw)
    events, _ = _read_bounded(raw[:end] + _pax_header_block(payload) + bytes(512) + b"\0" * 1024)
    assert _images(events) == ["a.jpg"]
    [failure] = _failures(events)
    assert failure.stage == FailureStage.READ and "malformed PAX extended header" in failure.error


def test_read_tar__many_extension_headers_in_a_row_are_one_read_failure_not_a_recursion_error():
    chain = b"".join(_pax_header_block(_pax_record(b"comment", b"x")) for _ in range(5000))
    raw = _tar_bytes([("a.jpg", JPEG_A)], format=tarfile.PAX_FORMAT)
    end = _end_of_members(raw)
    tail = _tar_bytes([("b.jpg", JPEG_B)], format=tarfile.USTAR_FORMAT)
    events, _ = _read_bounded(raw[:end] + chain + tail)
    assert _images(events) == ["a.jpg"]
    [failure] = _failures(events)
    assert failure.stage == FailureStage.READ and "headers in a row" in failure.error


@pytest.mark.parametrize(
    "records, error",
    [
        (_pax_record(b"comment", b"x" * 70_000), "global headers"),
        (_pax_record(b"size", b"10"), "sets 'size' for every later member"),
    ],
)
def test_read_tar__pax_global_header_over_its_limit_or_setting_sizes_is_one_read_failure(records, error):
    raw = _tar_bytes([("a.jpg", JPEG_A)], format=tarfile.PAX_FORMAT)
    end = _end_of_members(raw)
    tail = _tar_bytes([("b.jpg", JPEG_B)], format=tarfile.USTAR_FORMAT)
    events, _ = _read_bounded(raw[:end] + _pax_header_block(records, type_=tarfile.XGLTYPE) + tail)
    assert _images(events) == ["a.jpg"]
    [failure] = _failures(events)
    assert failure.stage == FailureStage.READ and error in failure.error


def test_read_tar__small_pax_global_header_applies_and_the_tar_goes_on():
    raw = _tar_bytes([("a.jpg", JPEG_A)], format=tarfile.PAX_FORMAT)
    end = _end_of_members(raw)
    tail = _tar_bytes([("b.jpg", JPEG_B)], format=tarfile.USTAR_FORMAT)
    records = _pax_record(b"comment", b"git archive commit id")
    events, _ = _read_bounded(raw[:end] + _pax_header_block(records, type_=tarfile.XGLTYPE) + tail)
    assert _images(events) == ["a.jpg", "b.jpg"] and not _failures(events)


def test_read_tar__keeps_no_header_of_members_already_read():
    import tracemalloc

    raw = _tar_bytes([(f"{i:06d}.cls", b"") for i in range(20_000)] + [("a.jpg", JPEG_A)],
                     format=tarfile.PAX_FORMAT)
    tracemalloc.start()
    try:
        events = list(read_tar(io.BytesIO(raw), "t.tar", batch_size=5))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert _images(events) == ["a.jpg"]
    assert peak < 2_000_000, f"peak {peak} bytes: headers of earlier members kept"


# --- Sparse members: a failure each, never expanded; the tar goes on ------------------------------------------


def _old_gnu_sparse_tar(extended_blocks: int, realsize: int, cut: bool = False) -> bytes:
    """a.jpg, then an old-GNU sparse member ``s.jpg`` with ``extended_blocks`` map extension blocks, then c.jpg."""
    raw = bytearray(_tar_bytes([("a.jpg", JPEG_A), ("s.jpg", b"s" * 600), ("c.jpg", JPEG_C)]))
    at = _header_at(raw, b"s.jpg")
    raw[at + 156 : at + 157] = tarfile.GNUTYPE_SPARSE
    raw[at + 386 : at + 410] = b"%011o\0" % 0 + b"%011o\0" % 600  # one data region at offset 0
    raw[at + 482] = 1 if extended_blocks else 0
    raw[at + 483 : at + 495] = _base256(realsize)
    _patch_header(raw, at, 0, b"s.jpg")
    ext = bytearray()
    for i in range(extended_blocks):
        block = bytearray(512)
        block[504] = 1 if i + 1 < extended_blocks else 0
        ext += block
    head, tail = bytes(raw[: at + 512]), bytes(raw[at + 512 :])
    return head + bytes(ext[: len(ext) // 2]) if cut else head + bytes(ext) + tail


@pytest.mark.parametrize("extended_blocks, realsize", [(0, 600), (3, 2**62)])
def test_read_tar__old_gnu_sparse_jpeg_is_a_read_failure_and_the_tar_goes_on(extended_blocks, realsize):
    events, seen = _read_bounded(_old_gnu_sparse_tar(extended_blocks, realsize))
    assert _images(events) == ["a.jpg", "c.jpg"]
    [failure] = _failures(events)
    assert (failure.member, failure.stage) == ("s.jpg", FailureStage.READ) and "sparse" in failure.error
    assert seen["members_not_files"] == 1 and "tars_corrupt" not in seen


def test_read_tar__old_gnu_sparse_map_cut_by_the_end_of_the_data_is_one_read_failure():
    events, _ = _read_bounded(_old_gnu_sparse_tar(40, 2**62, cut=True))
    assert _images(events) == ["a.jpg"]
    [failure] = _failures(events)
    assert failure.stage == FailureStage.READ and failure.member is None
    assert "the data ends inside a GNU sparse header" in failure.error


def test_read_tar__sparse_jpeg_whose_data_runs_past_the_end_is_only_the_tars_read_failure():
    raw = bytearray(_old_gnu_sparse_tar(0, 600))
    _patch_header(raw, _header_at(raw, b"s.jpg"), 124, _base256(2**62))
    events, seen = _read_bounded(bytes(raw))
    assert _images(events) == ["a.jpg"]
    [failure] = _failures(events)
    assert failure.member is None and "'s.jpg' claims" in failure.error
    assert "members_not_files" not in seen


@pytest.mark.parametrize(
    "pax",
    [
        {"GNU.sparse.size": "5000", "GNU.sparse.numblocks": "1", "GNU.sparse.offset": "0",
         "GNU.sparse.numbytes": "600"},  # 0.0
        {"GNU.sparse.size": "5000", "GNU.sparse.map": "0,600", "GNU.sparse.name": "s.jpg"},  # 0.1
        {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "s.jpg",
         "GNU.sparse.realsize": "99999999999999"},  # 1.0 (the map would lead the data)
        {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "s.jpg",
         "GNU.sparse.realsize": "not a number"},
    ],
)
def test_read_tar__pax_gnu_sparse_jpeg_is_a_read_failure_never_expanded(pax):
    sparse = tarfile.TarInfo("GNUSparseFile.0/s.jpg" if "GNU.sparse.name" in pax else "s.jpg")
    data = b"9999999999\n" * 60  # a map claiming 10^10 entries, if anything parsed it
    sparse.size = len(data)
    sparse.pax_headers = pax
    raw = _tar_bytes([("a.jpg", JPEG_A), (sparse, data), ("c.jpg", JPEG_C)], format=tarfile.PAX_FORMAT)
    events, seen = _read_bounded(raw)
    failures = _failures(events)
    if pax.get("GNU.sparse.realsize") == "not a number":
        assert _images(events) == ["a.jpg"] and len(failures) == 1 and failures[0].member is None
        return
    assert _images(events) == ["a.jpg", "c.jpg"]
    assert [(f.member, f.stage) for f in failures] == [("s.jpg", FailureStage.READ)]
    assert "sparse" in failures[0].error and seen["members_not_files"] == 1


# --- Links and other members that are not files ------------------------------------------------------------


def _special(name, type_, linkname=""):
    info = tarfile.TarInfo(name)
    info.type = type_
    info.linkname = linkname
    return info


@pytest.mark.parametrize(
    "member, error",
    [
        (_special("l.JPG", tarfile.SYMTYPE, "a.jpg"), "symbolic link to 'a.jpg'"),
        (_special("l.jpg", tarfile.LNKTYPE, "./a.jpg"), "hard link to './a.jpg', which was read earlier"),
        (_special("l.jpeg", tarfile.LNKTYPE, "later.jpg"), "hard link to 'later.jpg', which is not an earlier"),
        (_special("l.jpg", tarfile.DIRTYPE), "a directory"),
        (_special("l.jpg", tarfile.FIFOTYPE), "a FIFO"),
        (_special("l.jpg", tarfile.CHRTYPE), "a character device"),
        (_special("l.jpg", tarfile.BLKTYPE), "a block device"),
    ],
)
def test_read_tar__jpeg_named_member_that_is_not_a_file_is_a_read_failure_naming_it(member, error):
    raw = _tar_bytes([("a.jpg", JPEG_A), member, ("c.jpg", JPEG_C)])
    events, seen = _read_bounded(raw)
    assert _images(events) == ["a.jpg", "c.jpg"]
    [failure] = _failures(events)
    assert failure.member == member.name and failure.stage == FailureStage.READ
    assert error in failure.error
    assert seen["members_not_files"] == 1 and "tars_corrupt" not in seen


def test_read_tar__jpeg_named_member_of_unknown_type_is_a_read_failure_and_its_data_is_skipped():
    raw = bytearray(_tar_bytes([("a.jpg", JPEG_A), ("u.jpg", JPEG_B), ("c.jpg", JPEG_C)]))
    _patch_header(raw, _header_at(raw, b"u.jpg"), 156, b"Z")
    events, _ = _read_bounded(bytes(raw))
    assert _images(events) == ["a.jpg", "c.jpg"]
    assert [(f.member, f.stage) for f in _failures(events)] == [("u.jpg", FailureStage.READ)]


def test_read_tar__links_and_directories_not_named_as_jpegs_are_skipped_silently():
    raw = _tar_bytes([("a.jpg", JPEG_A), _special("l.txt", tarfile.SYMTYPE, "x"), _special("d", tarfile.DIRTYPE),
                      _special("h.cls", tarfile.LNKTYPE, "a.jpg")])
    events, seen = _read_bounded(raw)
    assert _images(events) == ["a.jpg"] and not _failures(events)
    assert seen["members_skipped"] == 3 and "members_not_files" not in seen


def test_read_tar__symlinked_sidecar_is_skipped_and_the_image_keeps_its_other_metadata():
    raw = _tar_bytes([("k.jpg", JPEG_A), ("k.txt", b"caption"), _special("k.json", tarfile.SYMTYPE, "x.json")])
    events, _ = _read_bounded(raw, include_metadata=True)
    [batch] = events
    assert batch.images[0].metadata == {"caption": "caption"}


# --- Names that are not UTF-8, hostile names ----------------------------------------------------------------

HOSTILE_NAMES = [
    b"caf\xe9.jpg",  # latin-1
    b"back\\slash.jpg",
    b"\\xe9.jpg",  # looks like an escape already
    b"\\\\x\\.jpg",
    b"\xff\xfe\xfd.jpg",
    b"\xc3.jpg",  # a cut UTF-8 sequence
    b"\xed\xa0\x80.jpg",  # a UTF-8-encoded surrogate: not valid UTF-8
    "caf\u00e9 \u2615.jpg".encode(),
    b"ctrl\x01\x1b[31m\x7f.jpg",
    b"../../etc/passwd.jpg",
    b"/abs/olute.jpg",
    b"a/" + b"\xe9" * 250 + b".jpg",
]


@pytest.mark.parametrize("raw", HOSTILE_NAMES)
def test_member_name_bytes__inverts_escape_member_name(raw):
    escaped = escape_member_name(raw.decode("utf-8", "surrogateescape"))
    escaped.encode("utf-8")  # plain text: no surrogates
    assert member_name_bytes(escaped) == raw


def test_escape_member_name__leaves_valid_utf8_without_backslashes_unchanged():
    for name in ["000000031.jpg", "caf\u00e9/\u2615.jpg", "../x.jpg", "/a.jpg", "a\nb.jpg"]:
        assert escape_member_name(name) == name
    assert escape_member_name("caf\udce9.jpg") == "caf\\xe9.jpg"
    assert escape_member_name("a\\b.jpg") == "a\\\\b.jpg"


@pytest.mark.parametrize("text", ["a\\b", "a\\", "\\xE9", "\\x1"])
def test_member_name_bytes__rejects_text_no_name_escapes_to(text):
    with pytest.raises(ValueError, match="backslash"):
        member_name_bytes(text)


@pytest.mark.parametrize("format", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_read_tar__non_utf8_and_backslash_names_come_out_escaped(format):
    names = [b"caf\xe9.jpg", b"back\\slash.jpg", b"d/\xff\xfe.jpg"]
    if format != tarfile.USTAR_FORMAT:
        names.append(b"long/" + b"\xe9" * 200 + b".jpg")  # GNU long name / PAX path
    members = [(raw.decode("utf-8", "surrogateescape"), make_jpeg(i)) for i, raw in enumerate(names)]
    raw_tar = _tar_bytes(members, format=format)
    if format == tarfile.PAX_FORMAT:
        assert b"hdrcharset=BINARY" in raw_tar  # how tarfile writes names that are not UTF-8
    events, _ = _read_bounded(raw_tar)
    images = [image for e in events if isinstance(e, EncodedBatch) for image in e.images]
    assert [member_name_bytes(image.member) for image in images] == names
    assert images[0].member == "caf\\xe9.jpg" and images[0].image_id == "caf\\xe9"
    assert images[1].member == "back\\\\slash.jpg" and images[1].image_id == "back\\\\slash"
    for image in images:
        image.member.encode("utf-8")
        image.image_id.encode("utf-8")
    assert [image.data for image in images] == [data for _, data in members]


def test_read_tar__raw_bytes_in_a_pax_path_without_hdrcharset_come_out_escaped():
    # GNU tar <= 1.23 wrote names it could not convert as raw bytes, without hdrcharset=BINARY.
    member = bytearray(tarfile.TarInfo("placeholder.jpg").tobuf(tarfile.USTAR_FORMAT))
    _patch_header(member, 0, 124, b"%011o\0" % len(JPEG_A))
    hostile = (_pax_header_block(_pax_record(b"path", b"dir/caf\xe9\\.jpg")) + bytes(member)
               + JPEG_A + b"\0" * (-len(JPEG_A) % 512) + b"\0" * 1024)
    events, _ = _read_bounded(hostile)
    [image] = [image for e in events if isinstance(e, EncodedBatch) for image in e.images]
    assert image.member == "dir/caf\\xe9\\\\.jpg" and image.image_id == "dir/caf\\xe9\\\\"
    assert member_name_bytes(image.member) == b"dir/caf\xe9\\.jpg"


def test_read_tar__failure_records_and_sidecars_carry_escaped_names():
    members = [
        ("k\xe9.jpg".encode("latin-1").decode("utf-8", "surrogateescape"), b"not a jpeg"),
        ("k\xe9.json".encode("latin-1").decode("utf-8", "surrogateescape"), b"{broken"),
        _special("l\udce9.jpg", tarfile.SYMTYPE, "t\udcff.jpg"),
    ]
    events, _ = _read_bounded(_tar_bytes(members), include_metadata=True)
    failures = {(f.member, f.stage): f.error for f in _failures(events)}
    assert ("k\\xe9.json", FailureStage.METADATA) in failures
    assert ("l\\xe9.jpg", FailureStage.READ) in failures
    assert "'t\\\\xff.jpg'" in failures[("l\\xe9.jpg", FailureStage.READ)]  # the repr of t\xff.jpg
    for f in _failures(events):
        f.member.encode("utf-8")
        f.error.encode("utf-8")


def test_read_tar__records_carry_a_tar_path_that_is_not_utf8_escaped():
    good = _tar_bytes([("a.jpg", JPEG_A), _special("l.jpg", tarfile.SYMTYPE, "a.jpg")])
    events = list(read_tar(io.BytesIO(good), "/data/caf\udce9\\x.tar", batch_size=5))
    assert {e.tar_path for e in events} == {"/data/caf\\xe9\\\\x.tar"}  # a batch and a failure
    assert tar_display_name(events[0].tar_path) == "caf\\xe9\\\\x.tar"
    [failure] = read_tar(io.BytesIO(b"not a tar" * 100), "caf\udce9.tar", batch_size=5)
    assert failure.tar_path == "caf\\xe9.tar"


def test_read_tar__a_batch_ends_early_at_max_batch_bytes_of_encoded_bytes(tmp_path):
    jpegs = [(f"{i:03d}.jpg", make_jpeg(i, 64, 48)) for i in range(10)]
    path = write_tar(tmp_path / "t.tar", jpegs)
    size = len(jpegs[0][1])
    with open(path, "rb") as f:
        batches = [e for e in read_tar(f, path, batch_size=100, max_batch_bytes=3 * size) if isinstance(e, EncodedBatch)]
    assert [m.member for b in batches for m in b.images] == [name for name, _ in jpegs]
    assert all(b.nbytes <= 3 * size + max(len(d) for _, d in jpegs) for b in batches)
    assert len(batches) >= 3


def test_read_tar__a_link_keeps_its_failure_when_the_next_header_ends_the_tar(tmp_path):
    from conftest import link_member

    path = write_tar(tmp_path / "t.tar", [("a.jpg", make_jpeg(1)), link_member("b.jpg", "a.jpg"),
                                          link_member("c.jpg", "a.jpg", symbolic=False)])
    raw = open(path, "rb").read().rstrip(b"\0")
    raw += b"\0" * (-len(raw) % 512)
    # Then a PAX header claiming 2 MiB, over MAX_HEADER_BYTES: the tar ends there with one read failure.
    pax = tarfile.TarInfo("././@PaxHeader")
    pax.type, pax.size = tarfile.XHDTYPE, 2 << 20
    raw += pax.tobuf(tarfile.USTAR_FORMAT) + b"\0" * 1024
    events = list(read_tar(io.BytesIO(raw), path, batch_size=4))
    failures = [e for e in events if isinstance(e, ImageFailure)]
    assert sorted((f.member, f.stage) for f in failures if f.member) == [("b.jpg", "read"), ("c.jpg", "read")]
    assert len([f for f in failures if f.member is None]) == 1
    assert [m.member for e in events if isinstance(e, EncodedBatch) for m in e.images] == ["a.jpg"]


def test_read_tar__many_jpegs_under_one_key_are_handed_on_in_batches_with_metadata(tmp_path):
    # A hostile tar repeating one key must not be held whole before anything comes out.
    members = [("x.json", b'{"k": 1}')] + [("x.jpg", make_jpeg(i, 16, 16)) for i in range(60)]
    raw = open(write_tar(tmp_path / "t.tar", members), "rb").read()
    stream = io.BytesIO(raw)
    batches, read_at_first = [], None
    for event in read_tar(stream, "t.tar", batch_size=10, include_metadata=True):
        if isinstance(event, EncodedBatch):
            batches.append(event)
            read_at_first = stream.tell() if read_at_first is None else read_at_first
    assert [len(b) for b in batches] == [10] * 6
    assert read_at_first < len(raw) // 2
    assert all(img.metadata == {"k": 1} for b in batches for img in b.images)


def _header_outcome(parse, buf):
    try:
        info = parse(buf, "utf-8", "surrogateescape")
    except Exception as e:  # tarfile's HeaderError kinds
        return type(e).__name__
    return (info.name, info.mode, info.uid, info.gid, info.size, info.mtime, info.chksum, info.type,
            info.linkname, info.uname, info.gname, info.devmajor, info.devminor, getattr(info, "_sparse_structs", None))


def test_plain_header__parses_as_tarfile_does_on_real_and_mutated_headers():
    # The fast path for the usual header must agree with tarfile.TarInfo.frombuf on every block: the headers
    # tarfile writes in its three formats (long names, ustar prefixes, large and base-256 numbers, odd types),
    # and those blocks with bytes flipped or set in their numeric fields, names and type (checksum fixed or not).
    import random

    from beam_tarimg.tario import _GuardedTarInfo

    blocks = []
    names = ["a.jpg", "dir/b.jpeg", "d" * 99, "p/" * 60 + "deep.jpg", "caf\xe9.jpg", "dir/", "x" * 120]
    for fmt in (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        for i, name in enumerate(names):
            for kind in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE):
                info = tarfile.TarInfo(name)
                info.type = kind
                info.size = (0, 5, 8 ** 11 - 1, 8 ** 11)[i % 4] if kind in (tarfile.REGTYPE, tarfile.AREGTYPE) else 0
                info.mtime, info.uid, info.gid, info.mode = 1_700_000_000 + i, 1000 * i, 7, 0o644
                info.uname, info.gname = "user", "group"
                info.linkname = "target" if kind == tarfile.SYMTYPE else ""
                try:
                    data = info.tobuf(fmt, "utf-8", "surrogateescape")
                except ValueError:  # a name or number the format cannot hold
                    continue
                blocks += [data[k : k + 512] for k in range(0, len(data), 512)]
    rng = random.Random(0)
    mutated = []
    for block in blocks:
        for _ in range(30):
            b = bytearray(block)
            for _ in range(rng.randint(1, 3)):
                pos = rng.choice([rng.randrange(512), rng.randrange(100, 157), rng.randrange(329, 345), 156])
                b[pos] = rng.choice([0, 0x20, 0x30, 0x37, 0x38, 0x2B, 0x5F, 0x80, 0xFF, rng.randrange(256)])
            if rng.random() < 0.7:  # most with a right checksum, so the fields themselves are what is tested
                b[148:156] = ("%06o" % (sum(b[:148]) + 8 * 32 + sum(b[156:]))).encode() + b"\0 "
            mutated.append(bytes(b))
    all_blocks = blocks + mutated + [bytes(512), b"\0" * 511 + b"\x01"]
    from beam_tarimg.tario import _plain_header

    fast = 0
    for buf in all_blocks:
        got = _header_outcome(_GuardedTarInfo.frombuf, buf)
        assert got == _header_outcome(tarfile.TarInfo.frombuf, buf), (buf, got)
        fast += _plain_header(_GuardedTarInfo, buf, "utf-8", "surrogateescape") is not None
    assert len(all_blocks) > 3000 and fast > 250, (len(all_blocks), fast)  # the fast path took a fair share
