"""Inputs that are not what they seem: names with glob characters, folder entries that are no tar (FIFO, folder,
socket, dangling link, link to /dev/zero), multi-member and bomb-compressed tars (``bench.fuzz_inputs`` makes
them), through ``match_tars``/``open_tar``/``read_tar`` and through a real Beam job."""

from __future__ import annotations

import bz2
import gzip
import io
import os
import threading
import time

import pytest

from bench import fuzz, fuzz_inputs as F
from bench import mutate as M
from beam_tarimg.tario import EXPANSION_ALLOWANCE, TRAILING_CHECK_BYTES, read_tar
from beam_tarimg.transforms import NotARegularFile, escape_glob, match_tars, open_tar, tar_pattern
from beam_tarimg.types import EncodedBatch, FailureStage, ImageFailure


def _read(payload: bytes, **kwargs):
    seen = {}
    count = lambda name, n: seen.__setitem__(name, seen.get(name, 0) + n)  # noqa: E731
    start = time.perf_counter()
    events = list(read_tar(io.BytesIO(payload), "t.tar", batch_size=64, count=count, **kwargs))
    images = [i.member for e in events if isinstance(e, EncodedBatch) for i in e.images]
    return images, [e for e in events if isinstance(e, ImageFailure)], seen, time.perf_counter() - start


MEMBERS = F._members("m", 6, 0)
TAR = M.build_tar(MEMBERS)
NAMES = [n for n, _ in MEMBERS]


# ------------------------------------------------------------------------------------------------ matching


def test_match_tars__names_with_glob_characters_are_all_listed_and_each_opens_as_itself(tmp_path):
    names = list(F.GLOB_NAMES) + ["plain.tar", "br.tar", "a1.tar"]
    for name in names:
        (tmp_path / name).write_bytes(TAR)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "deeper.tar").write_bytes(TAR)  # *.tar never reaches into folders
    matched = [m.path for m in match_tars(tar_pattern(str(tmp_path)))]
    assert matched == sorted(str(tmp_path / n) for n in names)
    for path in matched:
        with open_tar(path) as f:
            assert f.read() == TAR


def test_tar_pattern__a_folder_whose_own_name_holds_glob_characters_is_never_read_as_a_glob(tmp_path):
    for folder in ("set[1]", "set1", "all*", "allx"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / f"{folder}.tar").write_bytes(TAR)
    for folder in ("set[1]", "all*"):
        pattern = tar_pattern(str(tmp_path / folder))
        assert pattern == os.path.join(escape_glob(str(tmp_path / folder)), "*.tar")
        assert [m.path for m in match_tars(pattern)] == [str(tmp_path / folder / f"{folder}.tar")]


def test_match_tars__globs_keep_beams_syntax_and_a_literal_name_that_matches_nothing_is_itself(tmp_path):
    for name in ("a.tar", "b.tar", "x[1].tar"):
        (tmp_path / name).write_bytes(TAR)
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "c.tar").write_bytes(TAR)
    base = str(tmp_path)
    assert [m.path for m in match_tars(base + "/[ab].tar")] == [base + "/a.tar", base + "/b.tar"]
    assert [m.path for m in match_tars(base + "/?.tar")] == [base + "/a.tar", base + "/b.tar"]
    assert base + "/s/c.tar" in [m.path for m in match_tars(base + "/**.tar")]
    assert [m.path for m in match_tars(base + "/x[1].tar")] == [base + "/x[1].tar"]  # no x1.tar: the name itself
    with pytest.raises(ValueError, match="no files match"):
        match_tars(base + "/nothing-*.tar")


# ------------------------------------------------------------------------------------------------- opening


def test_open_tar__entries_that_are_no_file_are_refused_by_name_without_blocking(tmp_path):
    plans, entries = F.write_not_regular(str(tmp_path), 0, str(tmp_path.parent / "outside"))
    assert {e.file_name for e in entries} >= {"dir.tar", "fifo.tar", "gone.tar", "zero.tar"}
    matched = {os.path.basename(m.path) for m in match_tars(tar_pattern(str(tmp_path)))}
    assert matched == {e.file_name for e in entries} | {"link.tar"}  # none skipped without a word
    want = {"dir.tar": "a directory", "fifo.tar": "a FIFO", "sock.tar": "a socket",
            "gone.tar": "a dangling symbolic link", "zero.tar": "a character device (through a symbolic link)"}
    errors = {}

    def open_all():
        for e in entries:
            try:
                open_tar(str(tmp_path / e.file_name))
            except NotARegularFile as err:
                errors[e.file_name] = str(err)

    opener = threading.Thread(target=open_all, daemon=True)  # a FIFO opened for reading would block for ever
    opener.start()
    opener.join(10)
    assert not opener.is_alive(), "open_tar blocked"
    assert set(errors) == {e.file_name for e in entries}
    for name, error in errors.items():
        assert error.startswith(want[name]), (name, error)
    with open_tar(str(tmp_path / "link.tar")) as f:  # a link to a regular file is read
        assert tarfile_names(f.read()) == ["l000.jpg", "l001.jpg"]


def tarfile_names(data: bytes):
    return [i.member for e in read_tar(io.BytesIO(data), "l.tar", batch_size=8) for i in e.images]


# ----------------------------------------------------------------------------------------- compressed tars


@pytest.mark.parametrize("pack", [
    lambda d: F.gzip_members(d, 2), lambda d: F.gzip_members(d, 3), lambda d: F.bzip2_streams(d, 2),
    lambda d: F.xz_streams(d, 3), lambda d: F.zstd_frames(d, 2),
    lambda d: gzip.compress(d) + bytes(3000),  # zero padding after the last member, as gzip allows
], ids=["gzip-2", "gzip-3", "bzip2-2", "xz-3", "zstd-2", "gzip-padded"])
def test_read_tar__every_member_of_a_multi_member_compressed_tar_is_read(pack):
    images, failures, seen, _ = _read(pack(TAR))
    assert images == NAMES and failures == [] and "tars_corrupt" not in seen


def test_read_tar__two_whole_gzipped_tars_concatenated_read_the_first_and_report_the_second():
    second = M.build_tar(F._members("b", 2, 9))
    images, failures, _, _ = _read(gzip.compress(TAR) + gzip.compress(second))
    assert images == NAMES
    [failure] = failures
    assert failure.member is None and "data after the end-of-archive blocks" in failure.error


def test_read_tar__data_after_a_gzip_member_that_starts_no_member_is_reported_after_the_images():
    images, failures, _, _ = _read(gzip.compress(TAR) + b"not gzip")
    assert images == NAMES and len(failures) == 1 and "starts no new member" in failures[0].error


@pytest.mark.parametrize("single_stream", [True, False], ids=["one-stream-96MiB", "streams-4GiB"])
def test_read_tar__gibs_of_compressed_zeros_after_the_end_are_never_decompressed(single_stream):
    zeros = (96 << 20) if single_stream else (4 << 30)
    payload, _, jpegs = F.trailing_zeros_tar(0, zeros, single_stream=single_stream)
    images, failures, seen, seconds = _read(payload)
    assert images == list(jpegs) and failures == []
    assert seconds < 2.0 and seen["bytes_read"] < 200_000, f"{seconds:.1f} s: the zeros were decompressed"


def test_read_tar__only_a_nonzero_byte_within_the_trailing_check_is_reported():
    end = F._end_of_members(TAR) + 512  # tarfile stops after the first zero block; the check starts there
    images, failures, _, _ = _read(TAR[:end] + bytes(TRAILING_CHECK_BYTES - 600) + b"x")
    assert images == NAMES and len(failures) == 1 and "data after the end-of-archive blocks" in failures[0].error
    assert _read(TAR[:end] + bytes(TRAILING_CHECK_BYTES) + b"x")[:2] == (NAMES, [])  # further on: never read


@pytest.mark.parametrize("fmt", ["gz", "bz2", "xz"])
def test_read_tar__a_decompression_bomb_is_one_read_failure_in_bounded_time(fmt):
    payload, expected, _ = F.bomb_tar(fmt, 0, 4 << 30)
    images, failures, seen, seconds = _read(payload)
    assert images == [expected[0].names[0]]  # the JPEG before the bomb; the one after it is covered
    [failure] = failures
    assert failure.stage == FailureStage.READ and failure.member is None
    assert "over its decompression limit after member 'pad.bin'" in failure.error and "max_expansion=100" in failure.error
    assert seen["tars_corrupt"] == 1 and seen["bytes_read"] <= len(payload)
    assert seconds < 5.0


def test_read_tar__max_expansion_and_max_decompressed_bytes_are_options():
    payload, expected, _ = F.bomb_tar("bz2", 0, EXPANSION_ALLOWANCE // 2)  # any ratio is fine up to 64 MiB
    both = [m.names[0] for m in expected]
    assert _read(payload)[:2] == (both, [])
    images, failures, _, _ = _read(payload, max_decompressed_bytes=1 << 20)
    assert images == both[:1] and "over max_decompressed_bytes=1048576" in failures[0].error
    payload, _, _ = F.bomb_tar("gz", 0, EXPANSION_ALLOWANCE + (16 << 20))  # ~1000:1 past the allowance
    images, failures, _, _ = _read(payload)
    assert images == both[:1] and "max_expansion=100" in failures[0].error
    assert _read(payload, max_expansion=2000)[:2] == (both, [])


def test_read_tar__an_xz_tar_asking_for_more_decompressor_memory_than_the_cap_is_one_read_failure(monkeypatch):
    import lzma

    from beam_tarimg import tario

    monkeypatch.setattr(tario, "MAX_DECOMPRESSOR_BYTES", 1 << 20)  # xz -6 asks for ~9 MiB
    images, failures, _, _ = _read(lzma.compress(TAR, preset=6))
    assert images == [] and len(failures) == 1 and "Memory usage limit" in failures[0].error


def test_read_tar__a_gzip_tar_cut_inside_a_member_keeps_the_members_before_the_cut():
    packed = gzip.compress(TAR)
    images, failures, _, _ = _read(packed[: len(packed) * 3 // 4])
    assert images == NAMES[: len(images)] and len(images) >= 3
    assert len(failures) == 1 and failures[0].member is None and failures[0].stage == FailureStage.READ


def test_read_tar__bzip2_bytes_count_as_stored():
    packed = bz2.compress(TAR)
    _, _, seen, _ = _read(packed)
    assert seen["bytes_read"] == len(packed)


# --------------------------------------------------------------------------------------- a real Beam job


def test_read_images_from_tars__every_hostile_input_accounted_for_on_the_fnapi_runner(tmp_path, read_tars):
    """Every kind of bench.fuzz_inputs in one folder, through ReadImagesFromTars on the FnApiRunner (real DALI on
    the CPU): every JPEG member exactly once as a row or a failure (or covered by its tar's one read failure
    after a bomb or an appended tar), each entry that is no tar exactly one open failure, no hang."""
    folder = tmp_path / "in"
    folder.mkdir()
    plans, entries = F.write_inputs(str(folder), 0)
    start = time.perf_counter()
    result = read_tars(str(folder), batch_size=16)
    seconds = time.perf_counter() - start
    rows = [tuple(i.image_path.split("/", 1)) + (None,) for i in result.images]
    failures = [f.to_dict() for f in result.failures]
    acc = fuzz.account(plans, rows, failures)
    assert (acc["lost"], acc["duplicated"], acc["unexplained"], acc["tar_failures_duplicated"]) == (0, 0, 0, 0), \
        acc["examples"]
    assert acc["rows"] == sum(len(p.members) for p in plans) - acc["covered_by_tar_failure"]
    assert F.check_entries(entries, failures) == (0, [])
    by_stage = {}
    for f in result.failures:
        by_stage[f.stage] = by_stage.get(f.stage, 0) + 1
    assert by_stage == {FailureStage.OPEN: len(entries), FailureStage.READ: 4}  # 3 bombs + cat-gzip
    assert result.counters["tars_failed"] == len(entries)
    assert seconds < 120


# ------------------------------------------------------------------------------------------- object stores


@pytest.fixture(scope="module")
def s3_bucket():
    """A bucket on moto's S3 server on 127.0.0.1, for Beam's s3:// in this process (``FileSystems.set_options``)."""
    import socket

    import boto3
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.options.pipeline_options import PipelineOptions
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    before = FileSystems._pipeline_options
    try:
        endpoint = f"http://127.0.0.1:{port}"
        client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing",
                              aws_secret_access_key="testing", region_name="us-east-1")
        client.create_bucket(Bucket="inputs")
        FileSystems.set_options(PipelineOptions(["--s3_endpoint_url", endpoint, "--s3_access_key_id", "testing",
                                                 "--s3_secret_access_key", "testing",
                                                 "--s3_region_name", "us-east-1"]))
        yield client
    finally:
        FileSystems.set_options(before)
        server.stop()


def test_object_store__glob_character_names_are_matched_and_a_folder_marker_is_an_open_failure(s3_bucket):
    names = list(F.GLOB_NAMES) + ["gzip2.tar"]
    for name in names:
        s3_bucket.put_object(Bucket="inputs", Key=f"d/{name}",
                             Body=F.gzip_members(TAR, 2) if name == "gzip2.tar" else TAR)
    s3_bucket.put_object(Bucket="inputs", Key="d/folder.tar/", Body=b"")  # what consoles write for a "folder"
    s3_bucket.put_object(Bucket="inputs", Key="d/sub/deeper.tar", Body=TAR)
    matched = [m.path for m in match_tars(tar_pattern("s3://inputs/d/"))]
    assert matched == sorted(f"s3://inputs/d/{n}" for n in names)
    for path in matched:
        with open_tar(path) as f:
            assert tarfile_names(f.read()) == NAMES
    assert [m.path for m in match_tars("s3://inputs/d/**/")] == ["s3://inputs/d/folder.tar/"]
    with pytest.raises(NotARegularFile, match="folder marker"):
        open_tar("s3://inputs/d/folder.tar/")
