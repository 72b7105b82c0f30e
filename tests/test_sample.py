"""Tests for beam_tarimg.sample (synthetic JPEGs and tar shards)."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from beam_tarimg.sample import (
    encode_jpeg,
    imagenet_like_jpeg,
    make_sample_dataset,
    main,
    photo_like_image,
    write_tar,
)


def _members(path):
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def test_dataset_is_byte_identical_for_same_seed_and_differs_for_other_seed(tmp_path):
    a = make_sample_dataset(str(tmp_path / "a"), num_tars=2, images_per_tar=5, seed=3)
    b = make_sample_dataset(str(tmp_path / "b"), num_tars=2, images_per_tar=5, seed=3)
    c = make_sample_dataset(str(tmp_path / "c"), num_tars=2, images_per_tar=5, seed=4)
    for pa, pb, pc in zip(a, b, c):
        with open(pa, "rb") as fa, open(pb, "rb") as fb, open(pc, "rb") as fc:
            data_a = fa.read()
            assert data_a == fb.read()
            assert data_a != fc.read()


def test_dataset_paths_sorted_keys_unique_and_members_adjacent_in_jpg_json_txt_order(tmp_path):
    paths = make_sample_dataset(str(tmp_path), num_tars=3, images_per_tar=4, seed=0)
    assert paths == sorted(paths)
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["00000.tar", "00001.tar", "00002.tar"]

    keys = []
    for path in paths:
        names = [name for name, _ in _members(path)]
        assert len(names) == 4 * 3
        for i in range(0, len(names), 3):
            key = names[i].split(".")[0]
            assert len(key) == 9 and key.isdigit()
            assert names[i : i + 3] == [f"{key}.jpg", f"{key}.json", f"{key}.txt"]
            keys.append(key)
    assert len(keys) == len(set(keys)) == 12


def test_dataset_jpegs_decode_to_sizes_stated_in_json_sidecars(tmp_path):
    (path,) = make_sample_dataset(str(tmp_path), num_tars=1, images_per_tar=6, seed=1)
    members = dict(_members(path))
    for name, data in members.items():
        if not name.endswith(".jpg"):
            continue
        key = name[: -len(".jpg")]
        meta = json.loads(members[f"{key}.json"])
        assert meta["key"] == key and meta["source"] == "sample"
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            assert img.format == "JPEG"
            assert img.size == (meta["width"], meta["height"])
        assert members[f"{key}.txt"].decode("utf-8").strip()


def test_dataset_with_fixed_size_and_no_sidecars_has_only_jpgs_of_that_size(tmp_path):
    (path,) = make_sample_dataset(
        str(tmp_path), num_tars=1, images_per_tar=2, sidecars=False, size=(320, 180)
    )
    members = _members(path)
    assert [name for name, _ in members] == ["000000000.jpg", "000000001.jpg"]
    for _, data in members:
        with Image.open(io.BytesIO(data)) as img:
            assert img.size == (320, 180)
            assert img.mode == "RGB"


def test_write_tar_is_deterministic_with_fixed_mtime_and_mode(tmp_path):
    members = [("a.bin", b"hello"), ("b.bin", b""), ("c.bin", bytes(range(256)) * 9)]
    write_tar(str(tmp_path / "x.tar"), iter(members))
    write_tar(str(tmp_path / "y.tar"), iter(members))
    assert (tmp_path / "x.tar").read_bytes() == (tmp_path / "y.tar").read_bytes()
    with tarfile.open(tmp_path / "x.tar") as tar:
        infos = tar.getmembers()
        assert [(i.name, i.mtime, i.mode) for i in infos] == [
            (name, 0, 0o644) for name, _ in members
        ]
        assert [tar.extractfile(i).read() for i in infos] == [data for _, data in members]


def test_imagenet_like_jpegs_have_photo_like_size_and_are_not_noise():
    sizes, pixels = [], []
    for i in range(50):
        data = imagenet_like_jpeg(np.random.default_rng([7, i]), i)
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            assert 300 <= w <= 560 and 250 <= h <= 480
            arr = np.asarray(img.convert("L"), dtype=np.int16)
        sizes.append(len(data))
        pixels.append(w * h)
        # Neighbouring pixels are close on average (white noise would give ~85).
        assert np.abs(np.diff(arr, axis=1)).mean() < 12
        assert np.abs(np.diff(arr, axis=0)).mean() < 12
    bytes_per_pixel = sum(sizes) / sum(pixels)
    assert 0.08 <= bytes_per_pixel <= 0.4, bytes_per_pixel
    assert 15_000 <= np.mean(sizes) <= 60_000


def test_imagenet_like_mix_includes_444_progressive_and_grayscale():
    modes, progressive, subsampling = [], [], []
    for i in range(20):
        data = imagenet_like_jpeg(np.random.default_rng([0, i]), i)
        with Image.open(io.BytesIO(data)) as img:
            modes.append(img.mode)
            progressive.append(bool(img.info.get("progressive")))
            layers = getattr(img, "layer", None)
            if img.mode == "RGB":
                subsampling.append(tuple(layers[0][1:3]))
    assert modes.count("L") == 1
    assert sum(progressive) == 2
    assert subsampling.count((1, 1)) == 3  # 4:4:4: luma not subsampled relative to chroma
    assert subsampling.count((2, 2)) == 16  # 4:2:0


def test_photo_like_image_shape_dtype_and_determinism():
    a = photo_like_image(np.random.default_rng(5), 123, 77)
    b = photo_like_image(np.random.default_rng(5), 123, 77)
    c = photo_like_image(np.random.default_rng(6), 123, 77)
    assert a.shape == (77, 123, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.std() > 10  # not a flat image
    assert photo_like_image(np.random.default_rng(0), 1, 1).shape == (1, 1, 3)


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_exif_orientation_round_trips_through_pillow(orientation):
    pixels = photo_like_image(np.random.default_rng(0), 64, 48)
    data = encode_jpeg(pixels, exif_orientation=orientation)
    with Image.open(io.BytesIO(data)) as img:
        assert img.getexif().get(0x0112) == orientation
        assert img.size == (64, 48)  # tag only; pixels are not rotated


def test_no_exif_orientation_writes_no_tag():
    data = encode_jpeg(photo_like_image(np.random.default_rng(0), 32, 32))
    with Image.open(io.BytesIO(data)) as img:
        assert 0x0112 not in img.getexif()


def test_grayscale_option_gives_single_channel_jpeg():
    pixels = photo_like_image(np.random.default_rng(0), 40, 30)
    with Image.open(io.BytesIO(encode_jpeg(pixels, grayscale=True))) as img:
        assert img.mode == "L"
        assert img.size == (40, 30)
    with Image.open(io.BytesIO(encode_jpeg(pixels))) as img:
        assert img.mode == "RGB"


@pytest.mark.parametrize(
    "subsampling, expected", [("4:4:4", (1, 1)), ("4:2:2", (2, 1)), ("4:2:0", (2, 2))]
)
def test_subsampling_option_sets_luma_sampling_factors(subsampling, expected):
    pixels = photo_like_image(np.random.default_rng(0), 64, 64)
    with Image.open(io.BytesIO(encode_jpeg(pixels, subsampling=subsampling))) as img:
        assert tuple(img.layer[0][1:3]) == expected


def test_progressive_option_writes_progressive_jpeg():
    pixels = photo_like_image(np.random.default_rng(0), 64, 64)
    with Image.open(io.BytesIO(encode_jpeg(pixels, progressive=True))) as img:
        assert img.info.get("progressive")
    with Image.open(io.BytesIO(encode_jpeg(pixels))) as img:
        assert not img.info.get("progressive")


@pytest.mark.parametrize(
    "kwargs",
    [{"subsampling": "4:1:1"}, {"exif_orientation": 0}, {"exif_orientation": 9}],
)
def test_encode_jpeg_rejects_bad_options(kwargs):
    with pytest.raises(ValueError):
        encode_jpeg(np.zeros((8, 8, 3), np.uint8), **kwargs)


def test_cli_writes_dataset_and_prints_summary(tmp_path, capsys):
    out = tmp_path / "ds"
    assert main(["--out", str(out), "--tars", "2", "--images_per_tar", "3", "--size", "64x48"]) == 0
    line = capsys.readouterr().out.strip()
    assert "2 tars" in line and "6 images" in line and "MB" in line
    assert sorted(p.name for p in out.iterdir()) == ["00000.tar", "00001.tar"]
    assert len(_members(out / "00001.tar")) == 9


def test_cli_flags_use_the_jobs_underscore_style_and_keep_the_old_hyphens_as_aliases(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    usage = capsys.readouterr().out.split("\n\n")[0]
    assert "--images_per_tar" in usage and "--no_sidecars" in usage and "-per-" not in usage
    assert main(["--out", str(tmp_path), "--tars", "1", "--images-per-tar", "2", "--no-sidecars",
                 "--size", "16x16"]) == 0
    assert "2 images" in capsys.readouterr().out
    assert all(name.endswith(".jpg") for name, _ in _members(tmp_path / "00000.tar"))
