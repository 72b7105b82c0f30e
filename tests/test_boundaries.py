"""Every size limit pinned on both sides of its boundary, at the real boundary, through the public API.

A limit that moves by one (``>`` becoming ``>=``) changes what these give: a member of exactly
``max_member_bytes``, an image of exactly ``max_pixels`` (in the read stage, the decoder's own check and the
Pillow fallback), a read batch that reaches exactly ``max_batch_bytes``, and a decode run that reaches exactly
its planned bytes.
"""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from beam_tarimg.decode import ImageDecoder, claimed_bytes
from beam_tarimg.tario import read_tar
from beam_tarimg.types import EncodedBatch, FailureStage, ImageFailure
from conftest import RecordingFile, make_jpeg, pillow_rgb, write_tar


def _events(path, **kwargs):
    with open(path, "rb") as f:
        return list(read_tar(f, str(path), **kwargs))


def _batch_sizes(events):
    return [len(e) for e in events if isinstance(e, EncodedBatch)]


# -- max_member_bytes (tario.read_tar: a member over it is never read) ---------------------------------------------


def test_max_member_bytes__a_member_of_exactly_the_limit_is_read_one_byte_more_is_a_limit_failure(tmp_path):
    jpeg = make_jpeg(1)
    path = write_tar(tmp_path / "a.tar", [("a.jpg", jpeg)])

    (batch,) = _events(path, batch_size=4, max_member_bytes=len(jpeg))
    assert isinstance(batch, EncodedBatch) and batch.images[0].data == jpeg

    (failure,) = _events(path, batch_size=4, max_member_bytes=len(jpeg) - 1)
    assert failure == ImageFailure(
        str(path), "a.jpg", FailureStage.LIMIT,
        f"member is {len(jpeg)} bytes, over max_member_bytes={len(jpeg) - 1}",
    )


# -- max_pixels (jpeg.over_limits, in the read stage and in the decoder; the Pillow fallback's own check) ----------


def test_max_pixels__read_stage_keeps_an_image_of_exactly_the_limit_and_refuses_one_pixel_more(tmp_path):
    jpeg = make_jpeg(2, 48, 40)  # 1,920 pixels
    path = write_tar(tmp_path / "a.tar", [("a.jpg", jpeg)])

    (batch,) = _events(path, batch_size=4, max_pixels=48 * 40)
    assert isinstance(batch, EncodedBatch) and len(batch) == 1

    (failure,) = _events(path, batch_size=4, max_pixels=48 * 40 - 1)
    assert isinstance(failure, ImageFailure) and failure.stage == FailureStage.LIMIT
    assert failure.error == "header claims 48x40 = 1920 pixels, over max_pixels=1919"


def test_max_pixels__decoder_decodes_an_image_of_exactly_the_limit_and_refuses_one_pixel_more():
    jpeg = make_jpeg(3, 48, 40)
    exact = ImageDecoder(max_batch_size=2, num_threads=1, device="cpu", max_pixels=48 * 40, isolation="none")
    (out,) = exact.decode([jpeg])
    assert out.decoder == "cpu" and np.array_equal(out.pixels, pillow_rgb(jpeg))

    under = ImageDecoder(max_batch_size=2, num_threads=1, device="cpu", max_pixels=48 * 40 - 1, isolation="none")
    (out,) = under.decode([jpeg])
    assert out.pixels is None
    assert out.error == "not decoded: header claims 48x40 = 1920 pixels, over max_pixels=1919"


def test_max_pixels__pillow_fallback_decodes_an_image_of_exactly_the_limit():
    # A PNG named .jpg never goes to DALI; Pillow decodes it, under its own max_pixels check.
    pixels = np.random.default_rng(4).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    png = buf.getvalue()
    decoder = ImageDecoder(max_batch_size=2, num_threads=1, device="cpu", max_pixels=48 * 40, isolation="none")
    (out,) = decoder.decode([png])
    assert out.decoder == "pillow" and np.array_equal(out.pixels, pixels)

    under = ImageDecoder(max_batch_size=2, num_threads=1, device="cpu", max_pixels=48 * 40 - 1, isolation="none")
    (out,) = under.decode([png])
    assert out.pixels is None and "over max_pixels=1919" in out.error


# -- max_batch_bytes (tario.read_tar: a batch ends once it holds that many encoded bytes) --------------------------


def test_max_batch_bytes__ten_equal_jpegs_with_the_cap_at_three_of_them_give_3_3_3_1(tmp_path):
    jpeg = make_jpeg(5)
    n = len(jpeg)
    path = write_tar(tmp_path / "a.tar", [(f"{i:02d}.jpg", jpeg) for i in range(10)])

    events = _events(path, batch_size=100, max_batch_bytes=3 * n)  # reached exactly by the third
    assert _batch_sizes(events) == [3, 3, 3, 1]
    assert [image.member for e in events for image in e.images] == [f"{i:02d}.jpg" for i in range(10)]
    assert _batch_sizes(_events(path, batch_size=100, max_batch_bytes=3 * n + 1)) == [4, 4, 2]
    assert _batch_sizes(_events(path, batch_size=100, max_batch_bytes=3 * n - 1)) == [3, 3, 3, 1]


def test_batch_size__ten_jpegs_in_batches_of_three_give_3_3_3_1(tmp_path):
    path = write_tar(tmp_path / "a.tar", [(f"{i:02d}.jpg", make_jpeg(i)) for i in range(10)])
    assert _batch_sizes(_events(path, batch_size=3)) == [3, 3, 3, 1]
    assert _batch_sizes(_events(path, batch_size=10)) == [10]
    assert _batch_sizes(_events(path, batch_size=3, include_metadata=True)) == [3, 3, 3, 1]


def test_max_batch_bytes__many_jpegs_under_one_key_are_handed_on_at_the_cap(tmp_path):
    # With sidecars asked for, JPEGs are gathered per key: a hostile tar with many JPEGs under one key (the same
    # name again and again) is handed on once the gathered bytes reach the cap, exactly.
    jpeg = make_jpeg(6)
    n = len(jpeg)
    path = write_tar(tmp_path / "a.tar", [("k.json", b'{"a": 1}')] + [("k.jpg", jpeg)] * 10)
    events = _events(path, batch_size=100, include_metadata=True, max_batch_bytes=3 * n)
    assert _batch_sizes(events) == [3, 3, 3, 1]
    assert all(image.metadata == {"a": 1} for e in events for image in e.images)
    assert _batch_sizes(_events(path, batch_size=100, include_metadata=True, max_batch_bytes=3 * n + 1)) == [4, 4, 2]


def test_max_batch_bytes__under_one_key_the_jpeg_after_the_cap_is_not_read_before_the_batch_is_handed_on(tmp_path):
    # What the cap on gathered bytes bounds is memory: the batch goes out before the next JPEG's bytes come in.
    jpeg = make_jpeg(7, 480, 360)
    n = len(jpeg)
    assert n > 2 * 10240  # well over tarfile's read-ahead (one 10 KiB record)
    path = write_tar(tmp_path / "a.tar", [("k.json", b"{}")] + [("k.jpg", jpeg)] * 10)
    with tarfile.open(path) as tf:
        fourth = [m for m in tf.getmembers() if m.name == "k.jpg"][3].offset_data
    with open(path, "rb") as f:
        stream = RecordingFile(f.read())
    events = read_tar(stream, str(path), batch_size=100, include_metadata=True, max_batch_bytes=3 * n)
    first = next(events)
    assert isinstance(first, EncodedBatch) and len(first) == 3
    assert stream.high_water < fourth + n // 2, "the fourth JPEG was read before the first three were handed on"


# -- max_run_bytes (decode.plan_runs: a run stops before the image that would take it over its planned bytes) -----


@pytest.mark.parametrize("isolation, share", [("process", 7), ("none", 2)])
def test_max_run_bytes__a_run_holds_exactly_its_planned_bytes_and_not_one_more(isolation, share):
    blobs = [make_jpeg(10 + i, 200, 100) for i in range(5)]
    size = claimed_bytes(blobs[0])
    assert size == 60_000

    def runs(max_run_bytes):
        decoder = ImageDecoder(max_batch_size=10, num_threads=1, device="cpu", max_run_bytes=max_run_bytes,
                               isolation=isolation)
        out = []
        for run, outcomes in decoder.decode_runs(blobs):
            out.append(run)
            for i, o in zip(run, outcomes):
                assert np.array_equal(o.pixels, pillow_rgb(blobs[i]))
        decoder.close()
        return out

    # Planned at 1/share of the budget: two images fill a run exactly.
    assert runs(share * 2 * size) == [[0, 1], [2, 3], [4]]
    assert runs(share * 2 * size - share) == [[0], [1], [2], [3], [4]]


# -- the transforms' arguments (transforms.ReadAllImagesFromTars: schema.check_int and its own checks) -------------


@pytest.mark.parametrize("name, lowest", [
    ("batch_size", 1), ("num_threads", 1), ("device_id", 0), ("max_pixels", 1), ("max_member_bytes", 1),
    ("max_run_bytes", 1), ("max_scans", 1),
])
def test_transform_arguments__the_lowest_value_is_taken_and_one_less_is_refused_by_name(name, lowest):
    from beam_tarimg import ReadAllImagesFromTars

    ReadAllImagesFromTars(**{name: lowest})
    with pytest.raises(ValueError, match=f"{name} must be an integer >= {lowest}, got {lowest - 1}"):
        ReadAllImagesFromTars(**{name: lowest - 1})


def test_transform_arguments__hw_decoder_load_takes_0_and_1_and_run_timeout_s_any_positive_time():
    from beam_tarimg import ReadAllImagesFromTars

    for load in (0.0, 1.0):
        ReadAllImagesFromTars(hw_decoder_load=load)
    for load in (-1e-9, 1.0 + 1e-9):
        with pytest.raises(ValueError, match="hw_decoder_load"):
            ReadAllImagesFromTars(hw_decoder_load=load)
    ReadAllImagesFromTars(run_timeout_s=1e-3)
    with pytest.raises(ValueError, match="run_timeout_s"):
        ReadAllImagesFromTars(run_timeout_s=0)
