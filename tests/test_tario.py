"""read_tar, the Beam-free tar streaming stage: laziness, end-of-archive detection, limits."""

from __future__ import annotations

import io
import tarfile

import pytest

from beam_tarimg.tario import normalize_extensions, read_tar, split_member_name
from beam_tarimg.types import EncodedBatch, FailureStage, ImageFailure
from conftest import make_jpeg, write_tar


class _Recording(io.BytesIO):
    """A file object that remembers how far it has been read."""

    def __init__(self, data: bytes):
        super().__init__(data)
        self.high_water = 0

    def read(self, size=-1):
        out = super().read(size)
        self.high_water = max(self.high_water, self.tell())
        return out


def _counts():
    seen = {}
    return seen, lambda name, n: seen.__setitem__(name, seen.get(name, 0) + n)


def test_read_tar__streams_the_first_batch_before_reading_the_rest_of_the_tar(tmp_path):
    jpeg = make_jpeg(1, 32, 32)
    path = write_tar(tmp_path / "big.tar", [(f"{i:09d}.jpg", jpeg) for i in range(2000)])
    raw = open(path, "rb").read()
    f = _Recording(raw)
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
