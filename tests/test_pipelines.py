"""The runnable pipelines: real DALI (CPU), the FnApiRunner, real files in tmp_path.

Successful runs call ``run(argv)`` in this process (fast); the command-line behaviour (exit codes, one-line
errors, no traceback) is checked on ``python -m pipelines.<name>`` subprocesses.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from beam_tarimg.sample import encode_jpeg, make_sample_dataset, photo_like_image, write_tar
from pipelines import summarize, tar_to_parquet, tar_to_tfrecord

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOOD_TARS, IMAGES_PER_TAR = 2, 6
CORRUPT = b"\xff\xd8\xff\xe0" + b"this is not the rest of a JPEG" * 4


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two good tars of 6 small images with sidecars, and a third with one good and one corrupt JPEG."""
    root = tmp_path_factory.mktemp("shards")
    make_sample_dataset(str(root), num_tars=GOOD_TARS, images_per_tar=IMAGES_PER_TAR, seed=1, size=(48, 32))
    rng = np.random.default_rng(3)
    write_tar(str(root / "00002.tar"), [
        ("good.jpg", encode_jpeg(photo_like_image(rng, 40, 30))),
        ("broken.jpg", CORRUPT),
        ("notes.cls", b"not an image"),
    ])
    return root


def _run_quietly(run, argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        summary = run(argv)
    return summary, out.getvalue()


@pytest.fixture(scope="module")
def parquet_run(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("parquet_out")
    argv = ["--input", str(shards), "--output", str(out / "images"), "--failures", str(out / "failures.jsonl"),
            "--include_metadata", "--batch_size", "4", "--runner", "FnApiRunner"]
    summary, stdout = _run_quietly(tar_to_parquet.run, argv)
    return {"summary": summary, "stdout": stdout, "out": out, "shards": shards}


def test_tar_to_parquet__writes_every_decodable_image_and_summarises_the_beam_metrics(parquet_run):
    s = parquet_run["summary"]
    good = GOOD_TARS * IMAGES_PER_TAR + 1
    assert (s["tars"], s["tars_failed"], s["tars_corrupt"]) == (3, 0, 0)
    assert (s["images_written"], s["images_decoded"]) == (good, good)
    assert (s["images_failed"], s["failures"], s["members_skipped"]) == (1, 1, 1)
    assert s["runner"] == "FnApiRunner" and s["images_per_second"] > 0
    assert s["output_files"] and all(os.path.exists(f) for f in s["output_files"])
    assert s["counters"]["images_written"] == good
    table = pq.read_table(s["output_files"], columns=["image_id", "image_path", "metadata"])
    rows = {r["image_path"]: r for r in table.to_pylist()}
    assert len(rows) == good and "00002.tar/good.jpg" in rows and "00002.tar/broken.jpg" not in rows
    meta = json.loads(rows["00000.tar/000000000.jpg"]["metadata"])
    assert meta["key"] == "000000000" and meta["caption"].endswith("sample 000000000")


def test_tar_to_parquet__prints_the_summary_then_the_first_rows_of_the_output(parquet_run):
    stdout, s = parquet_run["stdout"], parquet_run["summary"]
    assert f"images written   {s['images_written']}" in stdout
    assert "failures         1" in stdout and s["output_files"][0] in stdout
    preview = stdout.split("first rows of", 1)[1].splitlines()[1:]
    assert preview[0].split() == ["image_id", "image_path", "shape", "metadata"]
    assert len(preview) == 1 + 5
    assert all(len(line.split()) >= 4 and "x" in line.split()[2] for line in preview[1:])


def test_failures_file_holds_one_json_line_per_lost_image_with_tar_member_stage_and_error(parquet_run):
    with open(parquet_run["out"] / "failures.jsonl", encoding="utf-8") as f:
        lines = [json.loads(line) for line in f if line.strip()]
    assert len(lines) == 1
    (failure,) = lines
    assert set(failure) == {"tar", "member", "stage", "error"}
    assert failure["tar"] == str(parquet_run["shards"] / "00002.tar")
    assert (failure["member"], failure["stage"]) == ("broken.jpg", "decode")
    assert failure["error"]


def test_failures_file_is_not_written_when_nothing_was_lost(shards, tmp_path):
    failures = tmp_path / "failures.jsonl"
    summary, stdout = _run_quietly(tar_to_tfrecord.run, [
        "--input", str(shards / "00000.tar"), "--output", str(tmp_path / "images"), "--failures", str(failures),
        "--preview_rows", "0", "--quiet",
    ])
    assert summary["failures"] == 0 and summary["images_written"] == IMAGES_PER_TAR
    assert not failures.exists() and "none written: nothing was lost" in stdout


def test_tar_to_tfrecord__defaults_to_the_fnapi_runner_and_writes_records_the_reader_gives_back(shards, tmp_path):
    from beam_tarimg.tfrecordio import example_to_image, read_records

    summary, stdout = _run_quietly(tar_to_tfrecord.run, [
        "--input", str(shards / "*.tar"), "--output", str(tmp_path / "images"), "--image_format", "png",
        "--preview_rows", "2",
    ])
    assert summary["runner"] == "FnApiRunner"
    assert summary["output_files"] and all(
        re.fullmatch(r"images-\d{5}-of-\d{5}\.tfrecord", os.path.basename(f)) for f in summary["output_files"])
    images = []
    for path in summary["output_files"]:
        with open(path, "rb") as f:
            images += [example_to_image(record) for record in read_records(f)]
    assert len(images) == summary["images_written"] == GOOD_TARS * IMAGES_PER_TAR + 1
    assert all(image.image_data.shape == (32, 48, 3) for image in images if image.image_id != "good")
    assert all(image.metadata == {} for image in images)  # --include_metadata was not given
    assert len(stdout.split("first rows of", 1)[1].splitlines()) == 1 + 1 + 2


def test_summarize__passes_beam_flags_through_and_writes_nothing(shards, tmp_path):
    summary, stdout = _run_quietly(summarize.run, [
        "--input", str(shards), "--runner", "FnApiRunner",
        "--direct_running_mode", "multi_threading", "--direct_num_workers", "2",
    ])
    assert summary["images_decoded"] == GOOD_TARS * IMAGES_PER_TAR + 1
    assert summary["images_written"] == 0 and summary["output_files"] == []
    assert "images decoded" in stdout and "first rows" not in stdout


def _help(run, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(["--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_help_lists_the_pipeline_flags_and_exits_0(capsys):
    out = _help(tar_to_parquet.run, capsys)
    for flag in ("--input", "--output", "--batch_size", "--num_threads", "--device", "--extensions",
                 "--include_metadata", "--failures", "--image_format", "--codec", "--row_group_mb", "--runner"):
        assert flag in out
    assert "original" in out and "zstd" in out


@pytest.mark.parametrize("run,absent", [
    (tar_to_tfrecord.run, ("--codec", "--row_group_mb")),
    (summarize.run, ("--output", "--image_format", "--jpeg_quality", "--num_shards", "--codec", "--row_group_mb",
                     "--preview_rows")),
])
def test_help_shows_each_job_only_the_flags_it_uses(capsys, run, absent):
    out = _help(run, capsys)
    assert "--input" in out and "--batch_size" in out
    for flag in absent:
        assert flag not in out, flag


@pytest.mark.parametrize("run,required,ext", [
    (tar_to_parquet.run, ("--input INPUT", "--output OUTPUT"), ".parquet"),
    (tar_to_tfrecord.run, ("--input INPUT", "--output OUTPUT"), ".tfrecord"),
    (summarize.run, ("--input INPUT",), None),
])
def test_help_shows_required_flags_as_required_and_each_job_its_own_texts(capsys, run, required, ext):
    out = _help(run, capsys)
    usage = " ".join(out.split("\n\n")[0].split())
    for flag in required:
        assert f" {flag} " in usage and f"[{flag}]" not in usage, usage
    assert "required flags:" in out
    text = " ".join(out.split())
    if ext is not None:
        other = ".tfrecord" if ext == ".parquet" else ".parquet"
        assert f"00004{ext}" in text and other not in text
    else:  # summarize writes no output: its --overwrite and --include_metadata say what they do there
        assert "shards" not in text.split("--overwrite", 1)[1].split("--quiet")[0]
        assert "--failures file of an earlier run" in text
        assert "metadata column" not in text and "metadata failure" in text


def test_the_flags_known_without_beam_are_exactly_beams_own():
    # parse_args checks the Beam flags from Beam's source, without importing Beam; Beam's option classes must
    # agree (this fails on a Beam upgrade that defines flags elsewhere).
    from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser

    from beam_tarimg import transforms
    from pipelines import options

    beam = _BeamArgumentParser(allow_abbrev=False, add_help=False)
    seen = set()
    for cls in PipelineOptions.__subclasses__():
        if cls.__module__.startswith("apache_beam.") and cls not in seen:
            seen.add(cls)
            cls._add_argparse_args(beam)
    ours = options.beam_flag_parser()
    assert {o for a in ours._actions for o in a.option_strings} == {o for a in beam._actions for o in a.option_strings}
    nargs0 = {o for a in beam._actions if a.nargs == 0 for o in a.option_strings}
    assert nargs0 == {o for a in ours._actions if a.nargs == 0 for o in a.option_strings}
    assert options.LOCAL_RUNNERS == transforms._LOCAL_RUNNERS


def test_a_flag_of_another_job_is_a_usage_error(shards, tmp_path):
    from pipelines.options import UsageError

    with pytest.raises(UsageError, match="unrecognized arguments: --codec zstd"):
        tar_to_tfrecord.run(["--input", str(shards), "--output", str(tmp_path / "o"), "--codec", "zstd"])
    with pytest.raises(UsageError, match="unrecognized arguments: --output"):
        summarize.run(["--input", str(shards), "--output", str(tmp_path / "o")])


def test_tar_to_parquet__default_output_holds_each_jpeg_unchanged_in_a_hugging_face_image_column(parquet_run):
    import tarfile

    members = {}
    for name in ("00000.tar", "00001.tar", "00002.tar"):
        with tarfile.open(parquet_run["shards"] / name) as tar:
            members.update({f"{name}/{m.name}": tar.extractfile(m).read() for m in tar.getmembers()})
    table = pq.read_table(parquet_run["summary"]["output_files"])
    assert b"huggingface" in table.schema.metadata
    assert set(table.column("image_format").to_pylist()) == {"original"}
    for row in table.select(["image_path", "image"]).to_pylist():
        assert row["image"] == {"bytes": members[row["image_path"]], "path": row["image_path"]}


def test_tar_to_parquet__codec_and_image_format_flags_reach_the_parquet_file(shards, tmp_path):
    summary, _ = _run_quietly(tar_to_parquet.run, [
        "--input", str(shards / "00000.tar"), "--output", str(tmp_path / "images"), "--codec", "zstd",
        "--image_format", "raw", "--preview_rows", "0",
    ])
    (path,) = summary["output_files"]
    pf = pq.ParquetFile(path)
    assert pf.schema_arrow.names == ["image_id", "image_path", "height", "width", "channels", "image_format",
                                     "image_data", "metadata"]
    assert {pf.metadata.row_group(0).column(i).compression for i in range(pf.metadata.num_columns)} == {"ZSTD"}
    assert summary["images_written"] == IMAGES_PER_TAR


def test_the_options_are_a_beam_pipeline_options_subclass():
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipelines.options import TarImagesOptions

    opts = PipelineOptions(["--input", "x/*.tar", "--batch_size", "7", "--include_metadata"]).view_as(
        TarImagesOptions)
    assert (opts.input, opts.batch_size, opts.include_metadata, opts.device) == ("x/*.tar", 7, True, "auto")


# --- the command line --------------------------------------------------------------------------------------


def _cli(module, *args):
    return subprocess.run([sys.executable, "-m", f"pipelines.{module}", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_demo_command_exits_0_and_prints_the_summary_and_rows(shards, tmp_path):
    proc = _cli("tar_to_parquet", "--input", str(shards), "--output", str(tmp_path / "demo" / "images"),
                "--failures", str(tmp_path / "demo" / "failures.jsonl"), "--runner", "FnApiRunner")
    assert proc.returncode == 0, proc.stderr
    assert "images written   13" in proc.stdout and "first rows of" in proc.stdout
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "case,args,message",
    [
        ("unknown flag", ["--output", "{tmp}/o", "--bogus_flag", "1"], "unrecognized arguments: --bogus_flag"),
        ("bad value", ["--output", "{tmp}/o", "--batch_size", "many"], "--batch_size"),
        ("bad choice", ["--output", "{tmp}/o", "--device", "tpu"], "--device"),
        ("bad Beam value", ["--output", "{tmp}/o", "--direct_num_workers", "two"], "--direct_num_workers"),
        ("unknown runner", ["--output", "{tmp}/o", "--runner", "NoSuchRunner"], "NoSuchRunner"),
        ("missing output", [], "the following arguments are required: --output"),
        ("no match", ["--input", "{tmp}/nothing-*.tar", "--output", "{tmp}/o"], "no files match"),
        ("unwritable output", ["--output", "{tmp}/a_file/images"], "is not writable"),
        ("unwritable failures", ["--output", "{tmp}/o", "--failures", "{tmp}/a_file/f.jsonl"], "is not writable"),
    ],
)
def test_user_errors_exit_2_before_any_work_with_one_line_and_no_traceback(shards, tmp_path, case, args, message):
    (tmp_path / "a_file").write_text("a regular file, not a directory")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "--input" not in args:
        args = ["--input", str(shards), *args]
    proc = _cli("tar_to_parquet", *args)
    assert proc.returncode == 2, (case, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and message in lines[0], (case, proc.stderr)
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert not [name for name in os.listdir(tmp_path) if name.startswith(("o-", "o.", "beam-temp"))]


# --- resize on decode in the writing jobs ------------------------------------------------------------------


def _written_images(summary):
    """{image_id: (pixels decoded from the stored bytes with Pillow, image_format, the bytes' first 8)} of a job's
    output files, Parquet or TFRecord."""
    from PIL import Image

    from beam_tarimg.tfrecordio import example_pb2, read_records

    rows = []
    for path in summary["output_files"]:
        if path.endswith(".parquet"):
            rows += [(r["image_id"], r["image"]["bytes"], r["image_format"]) for r in pq.read_table(path).to_pylist()]
            continue
        with open(path, "rb") as f:
            for record in read_records(f):
                feature = example_pb2().Example.FromString(record).features.feature
                rows.append(tuple(feature[k].bytes_list.value[0] for k in ("image/source_id", "image/encoded",
                                                                           "image/format")))
    return {(i.decode() if isinstance(i, bytes) else i): (np.asarray(Image.open(io.BytesIO(data))),
                                                          fmt.decode() if isinstance(fmt, bytes) else fmt, data[:8])
            for i, data, fmt in rows}


@pytest.mark.parametrize("job,format_flags", [
    (tar_to_parquet, ["--image_format", "png"]),
    (tar_to_tfrecord, []),  # png is the default with --resize
])
def test_writing_jobs_with_resize__rows_hold_as_png_exactly_the_pixels_the_reader_resizes_to(
        shards, tmp_path, read_tars, job, format_flags):
    from beam_tarimg import Resize

    summary, _ = _run_quietly(job.run, [
        "--input", str(shards), "--output", str(tmp_path / "o" / "images"), "--resize", "64", "--crop", "48",
        *format_flags, "--failures", str(tmp_path / "o" / "failures.jsonl"), "--batch_size", "4", "--quiet",
        "--preview_rows", "1", "--runner", "FnApiRunner",
    ])
    assert (summary["images_written"], summary["failures"]) == (GOOD_TARS * IMAGES_PER_TAR + 1, 1)
    written = _written_images(summary)
    expected = {i.image_id: i.image_data for i in read_tars(str(shards), resize=Resize(64, crop=48)).images}
    assert sorted(written) == sorted(expected)
    for image_id, (pixels, fmt, head) in written.items():
        assert fmt == "png" and head == b"\x89PNG\r\n\x1a\n"
        assert pixels.shape == (48, 48, 3)
        np.testing.assert_array_equal(pixels, expected[image_id], err_msg=image_id)
    (failure,) = [json.loads(line) for line in (tmp_path / "o" / "failures.jsonl").read_text().splitlines()]
    assert failure["member"] == "broken.jpg"


@pytest.mark.parametrize("job,args,message", [
    ("tar_to_parquet", ["--resize", "64", "--image_format", "original"],
     "--image_format original stores each JPEG's own bytes, not the resized pixels"),
    ("tar_to_tfrecord", ["--resize", "64", "--image_format", "original"], "with --resize use png"),
    ("tar_to_parquet", ["--resize", "64", "--dtype", "float32"], "unrecognized arguments: --dtype float32"),
    ("tar_to_tfrecord", ["--resize", "64", "--layout", "CHW"], "unrecognized arguments: --layout CHW"),
    ("tar_to_parquet", ["--resize", "64", "--mean", "127"], "unrecognized arguments: --mean 127"),
    ("tar_to_parquet", ["--crop", "48"], "--crop needs --resize"),
    ("tar_to_tfrecord", ["--resize", "64", "--crop", "80"], "--resize: crop (80, 80) is larger than size=64"),
    ("tar_to_parquet", ["--resize", "64x48"], "--resize: size"),
    ("tar_to_parquet", ["--resize", "64", "--resize_mode", "letterbox", "--crop", "32"], "crop is for mode"),
])
def test_writing_jobs_resize_usage_errors_come_back_before_beam_is_imported(shards, tmp_path, job, args, message):
    argv = ["--input", str(shards), "--output", str(tmp_path / "o" / "images"), *args]
    probe = (
        "import sys\n"
        f"from pipelines import {job}\n"
        "from pipelines.options import UsageError\n"
        "try:\n"
        f"    {job}.run({argv!r})\n"
        "except UsageError as e:\n"
        "    print('USAGE', e)\n"
        "print('HEAVY', sorted(m for m in ('apache_beam', 'nvidia.dali', 'pyarrow') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert "USAGE" in proc.stdout and message in proc.stdout, (proc.stdout, proc.stderr)
    assert "HEAVY []" in proc.stdout
    assert not (tmp_path / "o").exists()


def test_writing_job_resize_usage_error_on_the_command_line_is_one_line_and_exit_2(shards, tmp_path):
    proc = _cli("tar_to_parquet", "--input", str(shards), "--output", str(tmp_path / "o"), "--resize", "224",
                "--image_format", "original")
    assert proc.returncode == 2 and proc.stdout == ""
    (line,) = proc.stderr.strip().splitlines()
    assert "error:" in line and "--image_format original" in line and "png" in line
