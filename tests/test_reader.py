"""ReadImagesFromTars end to end on the FnApiRunner, with real DALI on the CPU and tars built here.

One "mixed folder" (good, corrupt, non-JPEG, truncated, empty and non-tar content) is read once per module;
each test below checks one behaviour of that run. Scenarios that need their own input run their own pipeline.
"""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from beam_tarimg import FailureStage
from conftest import dir_member, link_member, make_jpeg, pillow_rgb, write_tar

BATCH = 4


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), seed, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _with_junk_before_marker(jpeg: bytes) -> bytes:
    """Junk bytes before the DQT marker: DALI rejects it ("Invalid marker"); libjpeg (Pillow) skips them."""
    i = jpeg.index(b"\xff\xdb")
    return jpeg[:i] + b"\x00\x17\x42" + jpeg[i:]


def _cut_in_scan_data(jpeg: bytes) -> bytes:
    """Cut halfway: the header is whole, so DALI gets it (and rejects it)."""
    return jpeg[: len(jpeg) // 2]


CRASH_MARKER = b"beam-tarimg-test-crash"


def _crashing(jpeg: bytes) -> bytes:
    """A good JPEG carrying, in a comment segment, the bytes on which the decoder process is asked to crash
    itself with SIGSEGV (``decoder_process.CRASH_TEST_ENV``): a real native crash, where and when we choose."""
    comment = b"\xff\xfe" + (len(CRASH_MARKER) + 2).to_bytes(2, "big") + CRASH_MARKER
    return jpeg[:2] + comment + jpeg[2:]


def _claiming_size(jpeg: bytes, width: int, height: int) -> bytes:
    """The same JPEG with its frame header claiming another size (a decompression bomb's header)."""
    i = jpeg.index(b"\xff\xc0")
    return jpeg[: i + 5] + height.to_bytes(2, "big") + width.to_bytes(2, "big") + jpeg[i + 9 :]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Builds the mixed folder and returns (folder, expected good members by tar, result of one run)."""
    root = tmp_path_factory.mktemp("mixed")
    good = {}  # "<tar>/<member>" -> encoded bytes of every JPEG that must come out

    main = [
        ("000000000.jpg", make_jpeg(0)),
        ("000000001.jpg", make_jpeg(1, 64, 48, exif_orientation=6)),
        ("000000002.jpg", make_jpeg(2, 50, 30, exif_orientation=3)),
        ("000000003.jpg", make_jpeg(3, grayscale=True)),
        ("000000004.jpg", make_jpeg(4, progressive=True)),
        ("000000005.jpg", make_jpeg(5, subsampling="4:4:4")),
        ("000000006.JPG", make_jpeg(6)),
        ("000000007.jpeg", make_jpeg(7)),
        ("a/b/000000008.jpg", make_jpeg(8)),
        ("fallback.jpg", _with_junk_before_marker(make_jpeg(9))),
        ("000000010.jpg", make_jpeg(10, 33, 17)),
        # DALI rejects it, so Pillow decodes it: EXIF orientation must be applied there too.
        ("rotated_fallback.jpg", _with_junk_before_marker(make_jpeg(13, 40, 24, exif_orientation=6))),
    ]
    bad = [
        ("bad_garbage.jpg", os.urandom(3000)),
        ("bad_truncated.jpg", _cut_in_scan_data(make_jpeg(11, 200, 160))),
        ("bad_empty.jpg", b""),
        ("bomb.jpg", _claiming_size(make_jpeg(12), 30000, 30000)),
        ("crasher.jpg", _crashing(make_jpeg(14))),
    ]
    others = [
        ("000000000.json", b'{"a": 1}'),
        ("000000000.txt", b"a caption"),
        ("000000000.cls", b"3"),
        ("picture.png", _png(1)),
        dir_member("a"),
        dir_member("a/b"),
        link_member("link.jpg", "000000000.jpg"),
        link_member("hard.jpg", "000000000.jpg", symbolic=False),
    ]
    members = main[:3] + bad[:2] + others + main[3:9] + bad[2:] + main[9:]
    write_tar(root / "00000.tar", members)
    good.update({f"00000.tar/{n}": d for n, d in main})

    cut_mid = [(f"1{i:08d}.jpg", make_jpeg(100 + i)) for i in range(7)]
    path = write_tar(root / "00001.tar", cut_mid)
    raw = open(path, "rb").read()
    last_data = raw.index(cut_mid[-1][1])
    with open(path, "wb") as f:
        f.write(raw[: last_data + len(cut_mid[-1][1]) // 2])  # cut inside the last member's data
    good.update({f"00001.tar/{n}": d for n, d in cut_mid[:-1]})

    cut_between = [(f"2{i:08d}.jpg", make_jpeg(200 + i)) for i in range(5)]
    write_tar(root / "00002.tar", cut_between, end_blocks=False)
    good.update({f"00002.tar/{n}": d for n, d in cut_between})

    write_tar(root / "00003.tar", [])  # empty
    write_tar(root / "00004.tar", [("x.json", b"{}"), ("x.txt", b"no image here")])  # no JPEG
    (root / "00005.tar").write_bytes(b"this is not a tar file at all" * 40)

    # A wide open window for runner-level regressions: one extra tar the others must not disturb.
    many = [(f"3{i:08d}.jpg", make_jpeg(300 + i, 24, 20)) for i in range(9)]
    write_tar(root / "00006.tar", many)
    good.update({f"00006.tar/{n}": d for n, d in many})
    return root, good


@pytest.fixture(scope="module", params=["none", "encoded", "decoded"])
def mixed_run(mixed, tmp_path_factory, request):
    """The mixed folder read in each ``redistribute`` mode: every test below holds in all three."""
    from conftest import run_pipeline
    from beam_tarimg import ReadImagesFromTars
    from beam_tarimg.decoder_process import CRASH_TEST_ENV

    root, _ = mixed
    out = tmp_path_factory.mktemp("mixed-out")
    os.environ[CRASH_TEST_ENV] = "SIGSEGV:" + CRASH_MARKER.hex()  # read by decoder processes as they start
    try:
        return run_pipeline(
            lambda p: p | ReadImagesFromTars(str(root), batch_size=BATCH, redistribute=request.param).with_failures(),
            out,
        )
    finally:
        del os.environ[CRASH_TEST_ENV]


# Every JPEG member of the mixed folder, and what it must become: an image, a failure naming it, or (cut off
# with its tar) covered by that tar's one read failure.
_JPEG_MEMBERS_NOT_IMAGES = {
    "00000.tar/bad_garbage.jpg": "failure",
    "00000.tar/bad_truncated.jpg": "failure",
    "00000.tar/bad_empty.jpg": "failure",
    "00000.tar/bomb.jpg": "failure",
    "00000.tar/crasher.jpg": "failure",
    "00000.tar/link.jpg": "failure",
    "00000.tar/hard.jpg": "failure",
    "00001.tar/100000006.jpg": "cut",
}


def test_reader__every_jpeg_member_is_exactly_one_image_or_failure(mixed, mixed_run):
    _, good = mixed
    seen = [image.image_path for image in mixed_run.images]
    seen += [f"{os.path.basename(f.tar_path)}/{f.member}" for f in mixed_run.failures if f.member is not None]
    assert len(seen) == len(set(seen)), "a member came out twice"
    expected = set(good) | {m for m, what in _JPEG_MEMBERS_NOT_IMAGES.items() if what == "failure"}
    assert sorted(seen) == sorted(expected)
    for member, what in _JPEG_MEMBERS_NOT_IMAGES.items():
        if what == "cut":
            tar, name = member.split("/", 1)
            (cut,) = [f for f in mixed_run.failures if os.path.basename(f.tar_path) == tar and f.member is None]
            assert name in cut.error


def test_reader__outputs_every_decodable_jpeg_exactly_once(mixed, mixed_run):
    _, good = mixed
    paths = [image.image_path for image in mixed_run.images]
    assert len(paths) == len(set(paths)), "an image came out twice"
    assert sorted(paths) == sorted(good)


def test_reader__pixels_equal_pillow_with_exif_orientation_applied(mixed, mixed_run):
    _, good = mixed
    for image in mixed_run.images:
        expected = pillow_rgb(good[image.image_path])
        assert image.image_data.dtype == np.uint8
        assert image.image_data.shape == expected.shape, image.image_path
        assert image.image_data.ndim == 3 and image.image_data.shape[2] == 3
        # DALI's CPU decoder and Pillow (libjpeg-turbo) agree exactly on ordinary JPEGs.
        assert np.array_equal(image.image_data, expected), image.image_path


def test_reader__exif_rotation_swaps_height_and_width(mixed_run):
    by_member = mixed_run.by_member()
    assert by_member["000000001.jpg"].image_data.shape == (64, 48, 3)  # encoded 64 wide x 48 high, rotated 90
    assert by_member["000000002.jpg"].image_data.shape == (30, 50, 3)  # rotated 180: same shape


def test_reader__image_path_is_tar_name_slash_member_and_id_is_the_key(mixed_run):
    by_member = mixed_run.by_member()
    nested = by_member["a/b/000000008.jpg"]
    assert nested.image_path == "00000.tar/a/b/000000008.jpg"
    assert nested.image_id == "a/b/000000008"
    assert by_member["000000007.jpeg"].image_id == "000000007"
    assert by_member["000000006.JPG"].image_id == "000000006"
    assert all(image.metadata == {} for image in mixed_run.images), "metadata must be empty unless asked for"


def test_reader__batches_are_full_except_the_last_of_each_tar(mixed_run):
    sizes = {}
    for batch in mixed_run.batches:
        assert len(batch) <= BATCH
        sizes.setdefault(os.path.basename(batch.tar_path), []).append(len(batch))
    # 00006.tar: 9 good images -> 4, 4, 1; 00002.tar (cut between members): 5 -> 4, 1.
    assert sorted(sizes["00006.tar"]) == [1, 4, 4]
    assert sorted(sizes["00002.tar"]) == [1, 4]
    for batch in mixed_run.batches:
        assert all(image.image_path.startswith(os.path.basename(batch.tar_path) + "/") for image in batch)


def test_reader__batch_keeps_tar_order(mixed_run):
    for batch in mixed_run.batches:
        if os.path.basename(batch.tar_path) == "00006.tar":
            ids = [image.image_id for image in batch]
            assert ids == sorted(ids)


def test_reader__undecodable_jpegs_are_failures_naming_tar_and_member(mixed_run):
    decode = {(os.path.basename(f.tar_path), f.member): f for f in mixed_run.failures if f.stage == "decode"}
    assert set(decode) == {("00000.tar", "bad_garbage.jpg"), ("00000.tar", "bad_truncated.jpg"),
                           ("00000.tar", "bad_empty.jpg"), ("00000.tar", "crasher.jpg")}
    assert "0 bytes" in decode[("00000.tar", "bad_empty.jpg")].error
    # Random bytes never reach DALI; a JPEG cut in its scan data does, and DALI's and Pillow's errors are kept.
    assert decode[("00000.tar", "bad_garbage.jpg")].error.startswith("not for DALI: ")
    assert decode[("00000.tar", "crasher.jpg")].error == "decoder process crashed (SIGSEGV)"
    assert "Pillow" in decode[("00000.tar", "bad_garbage.jpg")].error
    assert decode[("00000.tar", "bad_truncated.jpg")].error.startswith("DALI")
    assert "Pillow" in decode[("00000.tar", "bad_truncated.jpg")].error


def test_reader__bad_images_cost_only_themselves_in_their_batch(mixed_run):
    # bad_truncated.jpg sat in a DALI batch with 000000001/000000002 (the first four JPEGs of 00000.tar).
    by_member = mixed_run.by_member()
    for member in ("000000000.jpg", "000000001.jpg", "000000002.jpg"):
        assert member in by_member


def test_reader__pillow_decodes_what_dali_rejects_and_counts_it(mixed, mixed_run):
    _, good = mixed
    for member in ("fallback.jpg", "rotated_fallback.jpg"):
        image = mixed_run.by_member()[member]
        assert np.array_equal(image.image_data, pillow_rgb(good[f"00000.tar/{member}"]))
    assert mixed_run.by_member()["rotated_fallback.jpg"].image_data.shape == (40, 24, 3)  # orientation 6 applied
    assert mixed_run.counters["images_decoded_fallback"] == 2


def test_reader__a_decoder_crash_costs_only_the_image_that_caused_it(mixed, mixed_run):
    # crasher.jpg crashed the decoder process in its run; the run was decoded
    # again in new processes, split until the crasher stood alone; everything else came out.
    _, good = mixed
    assert mixed_run.counters["decoder_crashes"] >= 2  # the run with it, then each smaller run with it alone
    assert set(mixed_run.by_member()) >= {path.split("/", 1)[1] for path in good if path.startswith("00000.tar/")}


def test_reader__oversized_header_is_a_limit_failure_not_decoded(mixed_run):
    limit = [f for f in mixed_run.failures if f.stage == FailureStage.LIMIT]
    assert [(os.path.basename(f.tar_path), f.member) for f in limit] == [("00000.tar", "bomb.jpg")]
    assert "30000x30000" in limit[0].error and "max_pixels" in limit[0].error
    assert mixed_run.counters["images_over_limit"] == 1


def test_reader__tar_cut_mid_member_yields_members_before_the_cut_and_one_failure(mixed_run):
    read = [f for f in mixed_run.failures if os.path.basename(f.tar_path) == "00001.tar"]
    assert len(read) == 1
    assert read[0].stage == FailureStage.READ
    assert "100000006.jpg" in read[0].error  # the member being read when the data ran out
    got = sorted(i.image_id for i in mixed_run.images if i.image_path.startswith("00001.tar/"))
    assert got == [f"1{i:08d}" for i in range(6)]


def test_reader__tar_without_end_of_archive_blocks_counts_as_cut(mixed_run):
    read = [f for f in mixed_run.failures if os.path.basename(f.tar_path) == "00002.tar"]
    assert len(read) == 1 and read[0].stage == FailureStage.READ
    assert "end-of-archive" in read[0].error and "200000004.jpg" in read[0].error


def test_reader__non_tar_file_is_one_read_failure(mixed_run):
    read = [f for f in mixed_run.failures if os.path.basename(f.tar_path) == "00005.tar"]
    assert len(read) == 1 and read[0].stage == FailureStage.READ and read[0].member is None


def test_reader__empty_tar_and_tar_without_jpegs_yield_nothing_and_are_counted(mixed_run):
    names = {os.path.basename(b.tar_path) for b in mixed_run.batches}
    assert "00003.tar" not in names and "00004.tar" not in names
    assert not [f for f in mixed_run.failures if os.path.basename(f.tar_path) in ("00003.tar", "00004.tar")]
    assert mixed_run.counters["tars_without_images"] == 2  # 00005.tar, not a tar, is a failure instead


def test_reader__counts_what_it_skips_reads_and_decodes(mixed, mixed_run):
    c = mixed_run.counters
    _, good = mixed
    assert c["tars_read"] == 7
    assert c["tars_corrupt"] == 3  # cut mid-member, cut between members, not a tar
    # 00000.tar: json, txt, cls, png, 2 dirs; 00004.tar: json, txt. The symlink and hardlink named .jpg are failures.
    assert c["members_skipped"] == 8
    assert c["members_not_files"] == 2
    assert c["images_decoded_cpu"] == len(good) - 2  # all but the two Pillow fallbacks
    assert c["images_failed"] == 7  # 3 undecodable + 1 crasher + 1 over the pixel limit + 2 links
    assert c["bytes_read"] >= sum(len(d) for d in good.values())
    assert c["decoders_built"] >= 1
    assert mixed_run.distributions["batch_decode_ms"].count == len(mixed_run.batches)


def test_reader__every_failure_record_says_tar_stage_and_error(mixed_run):
    assert len(mixed_run.failures) == 4 + 1 + 3 + 2  # decode, limit, read (tars), read (links)
    for f in mixed_run.failures:
        assert f.tar_path.endswith(".tar") and f.stage in FailureStage.ALL and f.error
        assert set(f.to_dict()) == {"tar", "member", "stage", "error"}


def test_reader__missing_and_unreadable_tars_are_open_failures_and_others_go_on(tmp_path, read_tars):
    good = write_tar(tmp_path / "good.tar", [("000000001.jpg", make_jpeg(1))])
    missing = str(tmp_path / "missing.tar")
    directory = tmp_path / "directory.tar"
    directory.mkdir()
    result = read_tars([missing, str(directory), good], batch_size=8)
    assert [i.image_path for i in result.images] == ["good.tar/000000001.jpg"]
    failures = {f.tar_path: f for f in result.failures}
    assert set(failures) == {missing, str(directory)}
    assert all(f.stage == FailureStage.OPEN and f.member is None for f in failures.values())
    assert result.counters["tars_failed"] == 2


def test_reader__include_metadata_attaches_json_and_caption(tmp_path, read_tars):
    members = [
        ("000000001.jpg", make_jpeg(1)),
        ("000000001.json", json.dumps({"url": "http://x/1.jpg", "score": 0.5}).encode()),
        ("000000001.txt", b"a red bicycle\n"),
        ("000000002.json", b'["not", "a", "dict"]'),  # sidecar before its image
        ("000000002.jpg", make_jpeg(2)),
        ("000000003.jpg", make_jpeg(3)),  # no sidecar
        ("000000004.jpg", make_jpeg(4)),
        ("000000004.json", b"{broken json"),
        ("000000005.txt", b"a caption of no image"),
        ("000000005.json", b"{}"),
    ]
    write_tar(tmp_path / "meta.tar", members)
    result = read_tars(str(tmp_path / "meta.tar"), batch_size=3, include_metadata=True)
    meta = {i.image_id: i.metadata for i in result.images}
    assert meta["000000001"] == {"url": "http://x/1.jpg", "score": 0.5, "caption": "a red bicycle"}
    assert meta["000000002"] == {"json": ["not", "a", "dict"]}
    assert meta["000000003"] == {}
    assert meta["000000004"] == {}
    assert [(f.member, f.stage) for f in result.failures] == [("000000004.json", FailureStage.METADATA)]
    assert result.counters["members_skipped"] == 2  # the sidecars of no image


def test_reader__sidecars_are_skipped_without_include_metadata(tmp_path, read_tars):
    write_tar(tmp_path / "m.tar", [("1.jpg", make_jpeg(1)), ("1.json", b"{broken"), ("1.txt", b"c")])
    result = read_tars(str(tmp_path / "m.tar"))
    assert [i.metadata for i in result.images] == [{}]
    assert result.failures == []
    assert result.counters["members_skipped"] == 2


def test_reader__extensions_are_configurable_and_case_insensitive(tmp_path, read_tars):
    write_tar(tmp_path / "e.tar", [("1.jpg", make_jpeg(1)), ("2.JFIF", make_jpeg(2)), ("3.jpeg", make_jpeg(3))])
    result = read_tars(str(tmp_path / "e.tar"), extensions=".jfif")
    assert [i.image_path for i in result.images] == ["e.tar/2.JFIF"]
    assert result.counters["members_skipped"] == 2


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT], ids=["pax", "gnu"])
def test_reader__long_member_names_work(tmp_path, read_tars, fmt):
    long_dir = "/".join(["deep-directory-name-%02d" % i for i in range(8)])
    name = f"{long_dir}/{'k' * 120}.jpg"
    write_tar(tmp_path / "long.tar", [(name, make_jpeg(1))], format=fmt)
    result = read_tars(str(tmp_path / "long.tar"))
    assert [i.image_path for i in result.images] == [f"long.tar/{name}"]
    assert result.images[0].image_id == name[: -len(".jpg")]


def test_reader__absolute_and_dotdot_names_are_only_names(tmp_path, read_tars):
    inside = tmp_path / "in"
    inside.mkdir()
    write_tar(inside / "evil.tar", [("../escaped.jpg", make_jpeg(1)), ("/abs/x.jpg", make_jpeg(2))])
    before = sorted(os.listdir(tmp_path))
    result = read_tars(str(inside / "evil.tar"))
    assert sorted(i.image_path for i in result.images) == sorted(["evil.tar//abs/x.jpg", "evil.tar/../escaped.jpg"])
    assert sorted(p for p in os.listdir(tmp_path) if not p.startswith("out-")) == sorted(
        p for p in before if not p.startswith("out-")
    )
    assert not os.path.exists("/abs/x.jpg")


@pytest.mark.parametrize("mode", ["none", "encoded", "decoded"])
def test_reader__every_redistribute_mode_gives_the_same_images(tmp_path, read_tars, mode):
    from beam_tarimg.sample import make_sample_dataset

    make_sample_dataset(str(tmp_path / "ds"), num_tars=2, images_per_tar=7, seed=3, sidecars=False, size=(40, 30))
    result = read_tars(str(tmp_path / "ds"), batch_size=3, redistribute=mode)
    assert sorted(i.image_id for i in result.images) == [f"{i:09d}" for i in range(14)]
    assert sorted(len(b) for b in result.batches) == [1, 1, 3, 3, 3, 3]
    assert result.failures == []


def test_reader__auto_redistribute_shuffles_nothing_that_grows_on_local_runners():
    import apache_beam as beam

    from beam_tarimg import ReadAllImagesFromTars

    t = ReadAllImagesFromTars()
    assert t.redistribute_mode(beam.Pipeline(runner="FnApiRunner")) == "none"
    assert t.redistribute_mode(beam.Pipeline(runner="DirectRunner")) == "none"
    assert t.redistribute_mode(beam.Pipeline(runner="PortableRunner")) == "encoded"
    assert ReadAllImagesFromTars(redistribute="decoded").redistribute_mode(beam.Pipeline(runner="FnApiRunner")) == "decoded"


def test_reader__encoded_batches_cross_the_shuffle_with_their_own_coder(tmp_path):
    import apache_beam as beam

    from beam_tarimg import ReadImagesFromTars
    from beam_tarimg.coders import EncodedBatchCoder, ImageBatchCoder

    write_tar(tmp_path / "t.tar", [("1.jpg", make_jpeg(1))])
    p = beam.Pipeline(runner="PortableRunner")
    batches = p | ReadImagesFromTars(str(tmp_path), redistribute="encoded")
    outputs = {t.full_label: t.outputs for t in _walk(p.transforms_stack[0])}
    shuffled = outputs["ReadImagesFromTars/ReadAll/SpreadEncodedBatches"][None]
    assert isinstance(beam.coders.registry.get_coder(shuffled.element_type), EncodedBatchCoder)
    assert isinstance(beam.coders.registry.get_coder(batches.element_type), ImageBatchCoder)


def _walk(node):
    yield node
    for part in node.parts:
        yield from _walk(part)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": "10"}, "batch_size"),
        ({"device": "tpu"}, "'tpu'"),
        ({"redistribute": "sometimes"}, "'sometimes'"),
        ({"num_threads": 0}, "num_threads"),
        ({"extensions": []}, "extensions"),
        ({"max_pixels": -1}, "max_pixels"),
        ({"hw_decoder_load": 2}, "hw_decoder_load"),
    ],
)
def test_reader__bad_arguments_fail_at_construction_naming_the_value(tmp_path, kwargs, needle):
    from beam_tarimg import ReadImagesFromTars

    write_tar(tmp_path / "t.tar", [("1.jpg", make_jpeg(1))])
    with pytest.raises(ValueError, match=needle):
        ReadImagesFromTars(str(tmp_path), **kwargs)


def test_reader__pattern_that_matches_nothing_fails_at_construction(tmp_path):
    from beam_tarimg import ReadImagesFromTars

    pattern = str(tmp_path / "nothing-*.tar")
    with pytest.raises(ValueError, match="no files match") as e:
        ReadImagesFromTars(pattern)
    assert pattern in str(e.value)


def test_reader__unvalidated_pattern_that_matches_nothing_fails_at_the_start_of_the_run(tmp_path, read_tars):
    pattern = str(tmp_path / "nothing-*.tar")
    with pytest.raises(Exception, match="nothing-"):
        read_tars(pattern, validate=False)


def test_reader__corrupt_compressed_tar_is_a_read_failure_and_others_go_on(tmp_path, read_tars):
    import gzip

    good = write_tar(tmp_path / "good.tar", [("1.jpg", make_jpeg(1))])
    plain = write_tar(tmp_path / "inner.tar", [(f"{i}.jpg", make_jpeg(i, 64, 64)) for i in range(6)])
    packed = bytearray(gzip.compress(open(plain, "rb").read()))
    packed[len(packed) // 2 : len(packed) // 2 + 64] = b"\x55" * 64  # damage the deflate stream
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(bytes(packed))
    os.remove(plain)
    result = read_tars([good, str(bad)])
    assert [i.image_path for i in result.images if i.image_path.startswith("good.tar")] == ["good.tar/1.jpg"]
    # The tar is decompressed as it is read: members before the damage come out (as rows, or as failures when
    # the damage reached their bytes), then the tar's one read failure.
    failures = [f for f in result.failures if f.tar_path == str(bad) and f.member is None]
    assert len(failures) == 1 and failures[0].stage == FailureStage.READ


def _tiny_bomb(seed: int) -> bytes:
    """A ~0.6 KB grayscale JPEG whose frame header claims 9400x9400 (under max_pixels): 265 MB if decoded."""
    return _claiming_size(make_jpeg(seed, 16, 16, grayscale=True, quality=75), 9400, 9400)


def test_reader__tiny_files_claiming_huge_frames_are_limit_failures_never_decoded(tmp_path, read_tars):
    bombs = [(f"{i:04d}.jpg", _tiny_bomb(i)) for i in range(100)]
    assert all(len(data) < 1000 for _, data in bombs)
    write_tar(tmp_path / "bombs.tar", bombs + [("good.jpg", make_jpeg(7))])
    result = read_tars(str(tmp_path), batch_size=16)
    assert [i.image_path for i in result.images] == ["bombs.tar/good.jpg"]
    assert sorted(f.member for f in result.failures) == [name for name, _ in bombs]
    assert all(f.stage == FailureStage.LIMIT and "claims 9400x9400" in f.error for f in result.failures)
    assert result.counters["images_over_limit"] == 100


def test_reader__progressive_jpeg_with_more_scans_than_max_scans_is_a_limit_failure(tmp_path, read_tars):
    jpeg = make_jpeg(3, 64, 48, progressive=True)
    start = jpeg.index(b"\xff\xda")
    end = jpeg.index(b"\xff\xda", start + 2)  # the first scan, header and data
    many = jpeg[:end] + jpeg[start:end] * 40 + jpeg[end:]
    write_tar(tmp_path / "scans.tar", [("many.jpg", many), ("fine.jpg", jpeg)])
    result = read_tars(str(tmp_path), batch_size=4, max_scans=20)
    assert [i.image_path for i in result.images] == ["scans.tar/fine.jpg"]
    (failure,) = result.failures
    assert failure.member == "many.jpg" and failure.stage == FailureStage.LIMIT and "max_scans=20" in failure.error
