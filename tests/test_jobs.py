"""The jobs as a user runs them: ``python -m pipelines.<job>`` subprocesses on real tars, real runners.

Progress on stderr, interrupts (SIGINT/SIGTERM end the job, its worker processes and its partial outputs),
exit codes that tell, refusing to mix runs in one output prefix, and no noise. Every subprocess has a
bounded wait and is killed when it runs past it, so that a regression fails instead of hanging.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pyarrow.parquet as pq
import pytest

from beam_tarimg.sample import encode_jpeg, photo_like_image, write_tar

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 300
PROGRESS_LINE = re.compile(r"^tar_to_parquet: (\d+)/(\d+) tars, (\d+) images, (\d+) failures, [\d.]+ images/s, \d+ s$")


def _cli(module, *args, env=None, timeout=TIMEOUT_S):
    return subprocess.run([sys.executable, "-m", f"pipelines.{module}", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def _left_in(folder):
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


# --- progress ----------------------------------------------------------------------------------------------


def test_progress__prints_lines_while_a_multi_process_run_goes_and_no_warning(shards, tmp_path):
    proc = _cli("tar_to_parquet", "--input", str(shards), "--output", str(tmp_path / "images"),
                "--runner", "DirectRunner", "--direct_running_mode", "multi_processing", "--direct_num_workers", "2",
                env={"BEAM_TARIMG_PROGRESS_INTERVAL": "0.2"})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    progress = [PROGRESS_LINE.match(line) for line in lines]
    assert all(progress), [line for line, m in zip(lines, progress) if not m]  # nothing else on stderr
    assert len(progress) >= 2  # lines during the run, and the last one at its end
    assert all(int(m.group(2)) == 3 for m in progress)
    assert [int(m.group(1)) for m in progress] == sorted(int(m.group(1)) for m in progress)
    assert progress[-1].groups() == ("3", "3", "13", "1")


def test_progress__quiet_turns_it_off(shards, tmp_path):
    proc = _cli("summarize", "--input", str(shards), "--quiet", "--runner", "FnApiRunner",
                env={"BEAM_TARIMG_PROGRESS_INTERVAL": "0.2"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "" and "images decoded   13" in proc.stdout


# --- interrupts --------------------------------------------------------------------------------------------


def _processes_with(mark: str):
    """Live processes whose environment holds ``mark`` (every process a job started inherits it)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read()
            with open(f"/proc/{entry}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if mark.encode() in environ and state != b"Z":
            found.append(int(entry))
    return found


_FNAPI = ["--runner", "FnApiRunner"]
_MULTI = ["--runner", "DirectRunner", "--direct_running_mode", "multi_processing", "--direct_num_workers", "2"]


_STOP_MARKER = b"beam-tarimg-test-stop"


@contextlib.contextmanager
def _job_mid_write(tmp_path, runner):
    """A tar_to_parquet job stopped mid-write: its tar holds 12 images, then one carrying a marker on which the
    decoder process stops itself (SIGSTOP, ``decoder_process.CRASH_TEST_ENV``), so the job has decoded and
    written the first images and waits (up to ``run_timeout_s``) for the rest. (A FIFO fed half a tar did this
    before; a FIFO is now an ``open`` failure, never opened.) Yields (process, output folder, mark); every
    process of the job has ``mark`` in its environment. The job runs in its own process group."""
    from beam_tarimg.decoder_process import CRASH_TEST_ENV

    data_dir, out = tmp_path / "in", tmp_path / "out"
    data_dir.mkdir()
    rng = np.random.default_rng(0)
    images = [(f"{i:03d}.jpg", encode_jpeg(photo_like_image(rng, 512, 384))) for i in range(13)]
    comment = b"\xff\xfe" + (len(_STOP_MARKER) + 2).to_bytes(2, "big") + _STOP_MARKER
    images[-1] = (images[-1][0], images[-1][1][:2] + comment + images[-1][1][2:])
    write_tar(str(data_dir / "00000.tar"), images)
    mark = f"beam-tarimg-test-{uuid.uuid4().hex}"
    temp = tmp_path / "temp"  # the job's temp folder (its progress files, the supervisor's private folder)
    temp.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines.tar_to_parquet", "--input", str(data_dir), "--output",
         str(out / "images"), "--failures", str(out / "failures.jsonl"), "--batch_size", "4",
         "--row_group_mb", "1", "--image_format", "raw", *runner],  # raw: a row group fills fast
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, "BEAM_TARIMG_TEST_MARK": mark, "TMPDIR": str(temp),
             "BEAM_TARIMG_PROGRESS_INTERVAL": "0.2", CRASH_TEST_ENV: "SIGSTOP:" + _STOP_MARKER.hex()})
    try:
        deadline = time.monotonic() + TIMEOUT_S
        partial = []
        while not partial and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
            partial = [os.path.join(root, name) for root, _, names in os.walk(out) for name in names
                       if os.path.getsize(os.path.join(root, name)) > 0]
        assert partial and any("beam-temp-" in p for p in partial), (proc.poll(), _left_in(out))
        assert len(_processes_with(mark)) >= 2  # the command and the job's process (and SDK workers)
        assert [n for n in _left_in(temp) if n.startswith("beam-tarimg-job-")]  # the progress folder is in it
        yield proc, out, mark
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


@pytest.mark.slow
@pytest.mark.parametrize("sig,code,runner,to_group", [
    (signal.SIGINT, 130, _FNAPI, False),
    (signal.SIGTERM, 143, _FNAPI, False),
    (signal.SIGINT, 130, _MULTI, False),
    (signal.SIGINT, 130, _MULTI, True),
], ids=["SIGINT-FnApiRunner", "SIGTERM-FnApiRunner", "SIGINT-DirectRunner-multi_processing",
        "Ctrl-C-to-the-process-group-DirectRunner-multi_processing"])
def test_interrupt__mid_write_exits_128_plus_signal_ends_every_process_and_leaves_no_partial_file(
        tmp_path, sig, code, runner, to_group):
    with _job_mid_write(tmp_path, runner) as (proc, out, mark):
        if to_group:  # what a terminal does on Ctrl-C
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    lines = [line for line in stderr.strip().splitlines() if not PROGRESS_LINE.match(line)]
    assert len(lines) == 1 and f"interrupted by {signal.Signals(sig).name}" in lines[0], stderr
    assert "Traceback" not in stderr
    assert _left_in(out) == []  # no beam-temp-* folder, no partial shard, no failures file
    assert _processes_with(mark) == []
    assert [n for n in _left_in(tmp_path / "temp") if n.startswith("beam-tarimg-")] == []  # no progress folder


def test_the_cleanup_after_an_interrupt_removes_local_partial_outputs_without_importing_beam(tmp_path):
    # The supervising command's cleanup, as it runs after killing the job: it must not import Beam (seconds)
    # before giving the prompt back.
    out, control = tmp_path / "out", tmp_path / "control"
    out.mkdir()
    control.mkdir()
    (out / "images-00000-of-00002.parquet").write_bytes(b"PAR1 half")
    staging = out / f"beam-temp-images-{uuid.uuid4().hex}"
    staging.mkdir()
    (staging / "partial").write_bytes(b"half a file")
    (out / "failures.jsonl").write_text("{}\n")
    (out / "other.txt").write_text("not this job's")
    (control / "job.json").write_text(json.dumps(
        {"output": str(out / "images"), "failures": str(out / "failures.jsonl"), "beam_args": []}))
    probe = ("import sys\n"
             "from pipelines import supervise\n"
             f"removed = supervise._remove_partial_outputs({str(control)!r})\n"
             "print('RESULT', removed, 'apache_beam' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert "RESULT 3 False" in proc.stdout, proc.stderr
    assert _left_in(out) == ["other.txt"]


@pytest.mark.slow
def test_killing_the_process_group_kills_the_whole_job_and_overwrite_cleans_what_it_left(tmp_path, shards):
    with _job_mid_write(tmp_path, _MULTI) as (proc, out, mark):
        os.killpg(proc.pid, signal.SIGKILL)  # a CI timeout: nobody gets to clean up
        proc.communicate(timeout=120)
        deadline = time.monotonic() + 60
        while _processes_with(mark) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _processes_with(mark) == []
    assert any(n.startswith("beam-temp-images-") for n in _left_in(out))
    args = ["--input", str(shards), "--output", str(out / "images"), "--failures", str(out / "failures.jsonl"),
            "--quiet", "--runner", "FnApiRunner"]
    refused = _cli("tar_to_parquet", *args)
    assert refused.returncode == 2 and "beam-temp-images-" in refused.stderr, refused.stderr
    rerun = _cli("tar_to_parquet", *args, "--overwrite")
    assert rerun.returncode == 0, rerun.stderr
    assert not [n for n in _left_in(out) if n.startswith("beam-temp-")]


# --- exit codes --------------------------------------------------------------------------------------------


def test_a_run_that_writes_no_image_exits_3_and_says_why_by_stage_without_failures_flag(tmp_path):
    data = tmp_path / "in"
    data.mkdir()
    (data / "notes.tar").write_text("a text file renamed .tar\n" * 40)
    (data / "empty.tar").write_bytes(b"")
    proc = _cli("tar_to_parquet", "--input", str(data), "--output", str(tmp_path / "out" / "images"),
                "--quiet", "--runner", "FnApiRunner")
    assert proc.returncode == 3, (proc.stdout, proc.stderr)
    assert "images written   0" in proc.stdout and "done" not in proc.stdout and "first rows" not in proc.stdout
    assert _left_in(tmp_path / "out") == []  # no shard without a row
    err = proc.stderr.splitlines()
    assert err[0].endswith("error: 2 tars matched but no image was written; 2 failures"), proc.stderr
    assert "failures by stage: read 2" in err[1]
    reasons = err[2:]
    assert len(reasons) == 2 and {"notes.tar", "empty.tar"} == {
        os.path.basename(line.split()[1].rstrip(":")) for line in reasons}
    assert all(line.split()[0] == "read" and len(line.split(": ", 1)[1]) > 0 for line in reasons)
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("job,ext", [("tar_to_parquet", "parquet"), ("tar_to_tfrecord", "tfrecord")])
def test_an_all_failed_run_leaves_only_its_failures_file_and_the_next_run_is_refused_only_for_that(
        tmp_path, job, ext):
    data, out = tmp_path / "in", tmp_path / "out"
    data.mkdir()
    write_tar(str(data / "bad.tar"), [("a.jpg", b"\xff\xd8 not a JPEG"), ("b.jpg", b"")])
    args = ["--input", str(data), "--output", str(out / "images"), "--quiet", "--runner", "FnApiRunner"]
    first = _cli(job, *args, "--failures", str(out / "failures.jsonl"))
    assert first.returncode == 3, first.stderr
    assert _left_in(out) == ["failures.jsonl"]  # no 0-row shard beside it
    assert len((out / "failures.jsonl").read_text().splitlines()) == 2
    assert "done" not in first.stdout and "first rows" not in first.stdout
    assert "none: no image to write" in first.stdout
    if job != "tar_to_parquet":
        return
    # The same output prefix again: nothing of ours is in the way.
    again = _cli(job, *args)
    assert again.returncode == 3, again.stderr
    # The failures file is the earlier run's record: replacing it takes --overwrite, as any earlier output.
    refused = _cli(job, *args, "--failures", str(out / "failures.jsonl"))
    assert refused.returncode == 2 and "failures.jsonl" in refused.stderr and "--overwrite" in refused.stderr


def test_summarize_that_decodes_nothing_exits_3_too(tmp_path):
    write_tar(str(tmp_path / "only-text.tar"), [("a.txt", b"no image here")])
    proc = _cli("summarize", "--input", str(tmp_path), "--quiet", "--runner", "FnApiRunner")
    assert proc.returncode == 3, proc.stderr
    assert "no image was decoded; 0 failures" in proc.stderr and "--extensions" in proc.stderr


def test_help_documents_every_exit_code():
    proc = _cli("tar_to_parquet", "--help")
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    for code in ("0 done", "1 the pipeline failed", "2 usage error", "3 tars matched but no image", "130", "143"):
        assert code in text, code
    assert "--overwrite" in text and "--quiet" in text


# --- existing outputs --------------------------------------------------------------------------------------


def test_rerun_into_an_existing_prefix_exits_2_and_overwrite_leaves_only_the_new_run(shards, tmp_path):
    out = tmp_path / "out"
    args = ["--input", str(shards), "--output", str(out / "images"), "--failures", str(out / "failures.jsonl"),
            "--quiet", "--runner", "FnApiRunner", "--preview_rows", "0"]
    first = _cli("tar_to_parquet", *args)
    assert first.returncode == 0, first.stderr
    shards_first = [n for n in _left_in(out) if n.endswith(".parquet")]
    assert shards_first and "failures.jsonl" in _left_in(out)

    # What an earlier run with other shard counts, or an interrupted Beam write, leaves behind:
    (out / "images-00002-of-00003.parquet").write_bytes(b"PAR1 an old shard")
    stale = out / f"beam-temp-images-{uuid.uuid4().hex}"
    stale.mkdir()
    (stale / "partial").write_bytes(b"half a file")
    (out / "other.txt").write_text("not this job's")
    before = _left_in(out)

    again = _cli("tar_to_parquet", *args)
    assert again.returncode == 2
    lines = again.stderr.strip().splitlines()
    assert len(lines) == 1 and "--overwrite" in lines[0] and "earlier run" in lines[0], again.stderr
    assert _left_in(out) == before  # refused before touching anything

    over = _cli("tar_to_parquet", *args, "--overwrite")
    assert over.returncode == 0, over.stderr
    left = _left_in(out)
    assert "other.txt" in left and "images-00002-of-00003.parquet" not in left
    assert not [n for n in left if n.startswith("beam-temp-")]
    new_shards = [str(out / n) for n in left if n.endswith(".parquet")]
    assert pq.read_table(new_shards).num_rows == 13


def test_num_shards_on_a_local_runner_is_refused_with_the_reason(shards, tmp_path):
    proc = _cli("tar_to_parquet", "--input", str(shards), "--output", str(tmp_path / "images"),
                "--num_shards", "3", "--runner", "FnApiRunner")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--num_shards 3" in lines[0] and "in memory" in lines[0]
    assert _left_in(tmp_path) == []


def test_a_tar_with_only_failures_leaves_no_empty_file_and_the_failures_file_only_when_something_was_lost(
        shards, tmp_path):
    out = tmp_path / "out"
    proc = _cli("tar_to_parquet", "--input", str(shards / "00000.tar"), "--output", str(out / "images"),
                "--failures", str(out / "failures.jsonl"), "--quiet", "--runner", "FnApiRunner")
    assert proc.returncode == 0, proc.stderr
    assert "none written: nothing was lost" in proc.stdout
    assert "failures.jsonl" not in _left_in(out)
    assert all(os.path.getsize(out / n) > 0 for n in _left_in(out))


# --- quiet and quick ---------------------------------------------------------------------------------------


_USAGE_ERRORS = {
    "help": (["--help"], 0),
    "bad value": (["--input", "x", "--batch_size", "many"], 2),
    "bad choice": (["--input", "x", "--device", "tpu"], 2),
    "missing input": (["--output", "{tmp}/o"], 2),
    "missing output": (["--input", "{shards}"], 2),
    "unknown Beam flag": (["--input", "{shards}", "--output", "{tmp}/o", "--bogus_flag", "1"], 2),
    "bad Beam value": (["--input", "{shards}", "--output", "{tmp}/o", "--direct_num_workers", "two"], 2),
    "no match": (["--input", "{tmp}/nothing-*.tar", "--output", "{tmp}/o"], 2),
    "no such folder": (["--input", "{tmp}/no-such-folder/", "--output", "{tmp}/o"], 2),
    "num_shards on a local runner": (["--input", "{shards}", "--output", "{tmp}/o", "--num_shards", "2"], 2),
    "earlier run": (["--input", "{shards}", "--output", "{tmp}/old/images"], 2),
    "unwritable output": (["--input", "{shards}", "--output", "{tmp}/a_file/images"], 2),
}


@pytest.mark.parametrize("case", list(_USAGE_ERRORS))
def test_help_and_usage_errors_import_neither_beam_nor_dali(case, shards, tmp_path):
    # As the job's own process runs (the supervising parent imports less still). Beam's import alone takes
    # seconds: a usage error must come back before it.
    args, code = _USAGE_ERRORS[case]
    args = [a.replace("{tmp}", str(tmp_path)).replace("{shards}", str(shards)) for a in args]
    (tmp_path / "a_file").write_text("a regular file, not a folder")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "images-00000-of-00001.parquet").write_bytes(b"PAR1 an earlier run's shard")
    control = tmp_path / "control"
    control.mkdir()
    env = {**os.environ, "BEAM_TARIMG_CONTROL_DIR": str(control)}
    probe = (
        "import runpy, sys\n"
        f"sys.argv = ['tar_to_parquet', *{args!r}]\n"
        "try:\n"
        "    runpy.run_module('pipelines.tar_to_parquet', run_name='__main__', alter_sys=True)\n"
        "except SystemExit as e:\n"
        "    code = e.code\n"
        "heavy = sorted(m for m in ('apache_beam', 'nvidia.dali', 'pyarrow') if m in sys.modules)\n"
        "print('RESULT', code, heavy, file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True,
                          timeout=TIMEOUT_S, env=env)
    assert f"RESULT {code} []" in proc.stderr, proc.stderr
    assert (code == 0) == ("--overwrite" in proc.stdout)  # the help, or one error line
    assert code == 0 or len(proc.stderr.strip().splitlines()) == 2 and "error:" in proc.stderr
    assert not [n for n in os.listdir(tmp_path) if n.startswith(("o-", "beam-temp"))]


def test_failure_examples_are_sampled_per_job_even_when_jobs_share_a_process(tmp_path, capsys):
    from pipelines import summarize

    data = tmp_path / "in"
    data.mkdir()
    for i in range(5):
        (data / f"text{i}.tar").write_text("not a tar\n" * 40)
    for _ in range(2):  # the second job in this process gets its own sample
        summary = summarize.run(["--input", str(data), "--quiet", "--runner", "FnApiRunner"])
        assert summary["exit_code"] == 3 and summary["failures_by_stage"] == {"read": 5}
        examples = summary["failure_examples"]
        assert len(examples) == 3 and {e["stage"] for e in examples} == {"read"}
        assert all(e["tar"].startswith(str(data)) and e["error"] for e in examples)
