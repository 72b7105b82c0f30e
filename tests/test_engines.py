"""The plugin on the engines our users run: Flink, Spark and Prism, started here for real.

- flink: Beam's Flink 1.19 job server with its embedded mini-cluster, parallelism 2.
- flink-cluster: a standalone Flink session cluster on 127.0.0.1, a JobManager and a TaskManager in processes of
  their own (Flink's own entry points), that the job server submits to over REST, as on a real cluster.
- spark: Beam's Spark 3 job server, ``local[2]``.
- prism: Beam's Prism runner (Go), from ``--prism_location``.
On Flink and Spark the SDK harness is an EXTERNAL worker pool: two SDK worker processes per job, started on the
engine's request. Each engine starts once per module (tests/_engines.py) and is stopped with all it started.

Every pipeline runs on tars with sidecars, a corrupt JPEG, a bad ``.json`` sidecar, a ``.jpeg`` member, a cut tar
and a JPEG that crashes the decoder process (a real SIGSEGV inside it, on request: ``CRASH_TEST_ENV``), and
must give exactly what the FnApiRunner gives: every image row, every failure record, every byte of the jobs'
output files.

These tests need the venv, jars and Prism that `make engines` builds at one Beam version (2.62.0); `make test`
runs them under that venv. Under any other Beam they skip: a job server of another Beam version is never paired
with this SDK.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import tarfile
import time
import uuid
from pathlib import Path

import pytest

import _engines as E
from _portable import read_probe_output, service_env
from beam_tarimg.decoder_process import CRASH_TEST_ENV
from beam_tarimg.sample import make_sample_dataset
from conftest import digest, make_jpeg, write_tar

pytestmark = pytest.mark.slow

_BUILT = sorted(p.name[len("venv-beam-"):] for p in E.ENGINES_DIR.glob("venv-beam-*"))
if _BUILT and E.beam_version() not in _BUILT:
    pytest.skip(f"the engines are built for Beam {', '.join(_BUILT)}, this is Beam {E.beam_version()}: `make test` "
                f"runs these tests under {E.ENGINES_DIR}/venv-beam-{_BUILT[-1]}", allow_module_level=True)
_MISSING = [m for m in (E.missing(E.flink_jar()), E.missing(E.spark_jar()), E.missing(E.prism_binary())) if m]
if _MISSING:
    pytest.skip("; ".join(_MISSING), allow_module_level=True)



def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")  # pytest then tears the fixtures down: the engines are stopped


signal.signal(signal.SIGTERM, _terminate)

ENGINES = ["flink", "flink-cluster", "spark", "prism"]
WORKERS = 2
BATCH = 4
CRASH_MARKER = b"crash-the-decoder-process"
# Distributed runners: "auto" spreads encoded batches before the decode. Prism counts as local.
EXPECTED_REDISTRIBUTE = {"flink": "encoded", "flink-cluster": "encoded", "spark": "encoded", "prism": "none"}
# An SDK worker killed mid-run: the mini-cluster has Flink's default (no restart for a batch job without
# checkpoints) and Spark's local master does not retry tasks: the job fails. The standalone cluster has a
# restart strategy in its configuration (E.FLINK_CLUSTER_RESTARTS): Flink restarts the job, and the restart
# either completes (every image written once) or fails again ("call already cancelled" from the dead worker's
# channel, seen in 1 of 5 runs) until its attempts are spent: both end with no partial output.
EXPECTED_AFTER_KILL = {"flink": {"failed"}, "flink-cluster": {"retried", "failed"}, "spark": {"failed"}}


def _marked(jpeg: bytes) -> bytes:
    """A good JPEG with the crash marker in a comment segment: the decoder process kills itself with SIGSEGV
    on a run that holds it."""
    return jpeg[:2] + b"\xff\xfe" + (len(CRASH_MARKER) + 2).to_bytes(2, "big") + CRASH_MARKER + jpeg[2:]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """3 sample tars x 6 images with .json/.txt sidecars, a tar of trouble, and a tar cut inside a member."""
    folder = tmp_path_factory.mktemp("tars")
    make_sample_dataset(str(folder), num_tars=3, images_per_tar=6, seed=21)
    write_tar(folder / "trouble.tar", [
        ("a/good.jpeg", make_jpeg(1, 64, 48)),
        ("a/good.json", b'{"caption": "kept"}'),
        ("b/corrupt.jpg", b"\xff\xd8\xff\xe0" + b"not the rest of a JPEG" * 8),
        ("c/crash.jpg", _marked(make_jpeg(2, 56, 40))),
        ("d/badside.jpg", make_jpeg(3, 40, 40)),
        ("d/badside.json", b"{not json"),
        ("e/after.jpg", make_jpeg(4, 32, 48)),
    ])
    whole = write_tar(folder / "cut-source.tar.tmp", [(f"cut/{i}.jpg", make_jpeg(10 + i, 48, 40)) for i in range(3)])
    with tarfile.open(whole) as tf:
        last = tf.getmembers()[-1]
    data = Path(whole).read_bytes()
    (folder / "cut.tar").write_bytes(data[: last.offset_data + last.size // 2])  # inside the last member's data
    os.remove(whole)
    return folder


@pytest.fixture(scope="module")
def token():
    """Marks this module's processes (in their environment) so that the test can find what they left."""
    return uuid.uuid4().hex


@pytest.fixture(scope="module")
def env(token):
    return service_env({CRASH_TEST_ENV: f"SIGSEGV:{CRASH_MARKER.hex()}", "BEAM_TARIMG_ENGINE_TEST": token})


def _probe(folder, out_prefix, flags, log_dir, env, name, engine=None):
    client = E.run_client([str(E.THIS_FILE), "probe", "--input", str(folder), "--output", str(out_prefix),
                           "--batch_size", str(BATCH), *flags], log_dir, env, name, engine)
    text = client.log_text()
    out = {}
    for tag in ("REDISTRIBUTE", "STATE", "METRICS"):
        lines = [line for line in text.splitlines() if line.startswith(tag + " ")]
        assert lines, f"no {tag} line in the probe's output:\n{text[-3000:]}"
        out[tag] = json.loads(lines[-1][len(tag) + 1:])
    images = read_probe_output(str(out_prefix) + "-images")
    failures = read_probe_output(str(out_prefix) + "-failures")
    return images, failures, out


def _by_id(images):
    rows = {}
    for row in images:
        assert row["image_id"] not in rows, f"{row['image_id']} came out twice"
        rows[row["image_id"]] = {k: v for k, v in row.items() if k != "pid"}
    return rows


def _failure_set(failures):
    keys = [json.dumps(f, sort_keys=True) for f in failures]
    assert len(keys) == len(set(keys)), "a failure record came out twice"
    return sorted(keys)


def _job(module, folder, out, flags, log_dir, env, name, engine=None, extra=()):
    E.run_client(["-m", module, "--input", str(folder), "--output", str(out / "images"),
                  "--failures", str(out / "failures.jsonl"), "--include_metadata", "--batch_size", str(BATCH),
                  "--quiet", "--preview_rows", "0", *extra, *flags], log_dir, env, name, engine)
    return out


def _parquet_rows(out: Path) -> dict:
    import pyarrow.parquet as pq

    rows = {}
    for f in sorted(out.glob("images*")):
        for row in pq.read_table(f).to_pylist():
            assert row["image_id"] not in rows, f"{row['image_id']} written twice"
            rows[row["image_id"]] = digest(row)
    return rows


def _tfrecords(out: Path) -> list:
    from beam_tarimg.tfrecordio import read_records

    records = []
    for f in sorted(out.glob("images*")):
        with open(f, "rb") as fh:
            records += [hashlib.sha256(r).hexdigest() for r in read_records(fh, str(f))]
    assert len(records) == len(set(records)), "a record was written twice"
    return sorted(records)


def _failure_lines(out: Path) -> list:
    path = out / "failures.jsonl"
    return sorted(path.read_text().splitlines()) if path.exists() else []


def _left_over(out: Path) -> list:
    """What a finished job must not leave: Beam's temp folders and files, partial files."""
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if "beam-temp" in p.name or p.name.startswith("."))


@pytest.fixture(scope="module")
def reference(dataset, env, tmp_path_factory):
    """What the FnApiRunner gives for the probe and both jobs, under this same Beam."""
    root = tmp_path_factory.mktemp("reference")
    flags = [f"--runner={E.FN_API_RUNNER}"]
    images, failures, out = _probe(dataset, root / "probe", flags, root, env, "fnapi_probe")
    parquet = _job("pipelines.tar_to_parquet", dataset, root / "parquet", flags, root, env, "fnapi_parquet")
    tfrecord = _job("pipelines.tar_to_tfrecord", dataset, root / "tfrecord", flags, root, env, "fnapi_tfrecord")
    ref = {
        "images": _by_id(images), "failures": _failure_set(failures), "metrics": out["METRICS"],
        "parquet": _parquet_rows(parquet), "parquet_failures": _failure_lines(parquet),
        "tfrecord": _tfrecords(tfrecord), "tfrecord_failures": _failure_lines(tfrecord),
    }
    # The data is what it says it is: 3 x 6 + 3 + 2 images; the corrupt, crashing, cut and sidecar failures.
    assert len(ref["images"]) == 23, sorted(ref["images"])
    stages = sorted((json.loads(f)["member"] or "", json.loads(f)["stage"]) for f in ref["failures"])
    assert stages == [("", "read"), ("b/corrupt.jpg", "decode"), ("c/crash.jpg", "decode"),
                      ("d/badside.json", "metadata")], stages
    crash = [json.loads(f) for f in ref["failures"] if json.loads(f)["member"] == "c/crash.jpg"]
    assert crash[0]["error"] == "decoder process crashed (SIGSEGV)", crash
    return ref


@pytest.fixture(scope="module", params=ENGINES)
def engine(request, env, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp(f"engine-{request.param}")
    with E.engine(request.param, log_dir, env, workers=WORKERS) as running:
        yield running


def _counters(metrics: dict) -> dict:
    return {name: sum(steps.values()) for name, steps in metrics.get("counters", {}).items()}


# ---------------------------------------------------------------------------------------------------------------


def test_engine__read_images_with_failures_gives_the_fn_api_runners_images_and_failures(
        engine, dataset, reference, env, token, tmp_path):
    runner = "PortableRunner" if engine.pool else engine.runner  # the generic name, where a job server runs
    images, failures, out = _probe(dataset, tmp_path / "out" / "probe", engine.pipeline_flags(runner), tmp_path,
                                   env, f"{engine.name}_probe", engine)

    assert _by_id(images) == reference["images"]
    assert _failure_set(failures) == reference["failures"]
    assert out["STATE"].endswith("DONE"), out["STATE"]
    assert out["REDISTRIBUTE"] == EXPECTED_REDISTRIBUTE[engine.name]

    pids = {row["pid"] for row in images}
    if engine.pool:  # both SDK workers of the decode stage decoded, each with one decoder of its own
        # (Flink's workers live for one stage: with the default --environment_cache_millis=0 each stage of a
        # batch job gets new ones; the decode stage, after the Reshuffle, is one stage.)
        assert len(pids) == WORKERS, f"images decoded in {len(pids)} SDK worker processes"
    print(f"\n{engine.name} reported: " + json.dumps({k: sorted(v) for k, v in out["METRICS"].items()}))
    counters, ref = _counters(out["METRICS"]), _counters(reference["metrics"])
    # decoder_crashes: the crasher killed a decoder process in each run that held it (the run halved down to
    # it), exactly as on the FnApiRunner, and the job went on.
    decode_counters = ("images_decoded_cpu", "images_failed", "images_decoded_fallback", "tars_read",
                       "tars_corrupt", "members_skipped", "bytes_read", "decoder_crashes")
    assert {k: counters.get(k, 0) for k in decode_counters} == {k: ref.get(k, 0) for k in decode_counters}
    assert counters["decoder_crashes"] >= 1, counters
    assert counters["decoders_built"] == (WORKERS if engine.pool else 1), counters
    assert out["METRICS"]["distributions"]["batch_decode_ms"], out["METRICS"]
    if engine.pool:
        steps = out["METRICS"]["counters"]["decoders_built"]
        # Flink names steps by their transform ids (ref_AppliedPTransform_Read-ReadAll-DecodeBatches-...).
        assert all("DecodeBatches" in step for step in steps), steps
    # The job is over: no decoder process outlives it; nothing but the outputs is left in the output folder.
    assert E.wait_until_gone(E.DECODER_PROCESS_MODULE, token) == []
    assert _left_over(tmp_path / "out") == []


@pytest.mark.parametrize("job,read_output", [("parquet", _parquet_rows), ("tfrecord", _tfrecords)])
def test_engine__a_job_writes_what_the_fn_api_runner_writes(engine, dataset, reference, env, tmp_path, job,
                                                             read_output):
    out = _job(f"pipelines.tar_to_{job}", dataset, tmp_path / job, engine.pipeline_flags(), tmp_path, env,
               f"{engine.name}_{job}", engine)
    assert read_output(out) == reference[job]
    assert _failure_lines(out) == reference[f"{job}_failures"]
    assert _left_over(out) == []


# ---------------------------------------------------------------------------------------------------------------
# An SDK worker killed mid-run


@pytest.fixture(scope="module")
def big_dataset(tmp_path_factory):
    """Enough work (6 tars x 40 images, batches of 4) for a job to be caught in the middle of its decoding."""
    folder = tmp_path_factory.mktemp("big")
    make_sample_dataset(str(folder), num_tars=6, images_per_tar=40, seed=5, sidecars=False, size=(160, 120))
    return folder


def _kill_a_worker_mid_run(engine, token, client, timeout_s=120.0):
    """Waits until a decoder process of this test exists (decoding has begun), then SIGKILLs the SDK worker
    above it. Returns the killed worker's pid, or None if the job finished before."""
    deadline = time.monotonic() + timeout_s
    while client.proc.poll() is None and time.monotonic() < deadline:
        for pid in E.processes_running(E.DECODER_PROCESS_MODULE, token):
            with open(f"/proc/{pid}/stat") as f:
                worker = int(f.read().rsplit(")", 1)[1].split()[1])
            if worker in engine.worker_pids():
                os.kill(worker, signal.SIGKILL)
                return worker
        time.sleep(0.05)
    return None


def test_engine__a_killed_sdk_worker_leaves_no_partial_or_duplicated_output(engine, big_dataset, env, token, tmp_path):
    """What Beam promises: a bundle whose worker died is not committed; the engine retries it (Flink with a
    restart strategy, here the cluster's) or fails the job; file sinks finalise only a finished job's files."""
    if not engine.pool:
        pytest.skip("prism runs the SDK harness in the client (LOOPBACK): no separate SDK worker to kill")
    out = tmp_path / "parquet"
    argv = ["-m", "pipelines.tar_to_parquet", "--input", str(big_dataset), "--output", str(out / "images"),
            "--failures", str(out / "failures.jsonl"), "--batch_size", str(BATCH), "--quiet", "--preview_rows", "0",
            "--image_format", "raw", *engine.pipeline_flags()]
    client = E.start_service(f"{engine.name}_killed", [sys.executable, *argv], tmp_path, env)
    try:
        killed = _kill_a_worker_mid_run(engine, token, client)
        assert killed, f"the job ended before a worker could be killed\n{client.describe()}"
        client.proc.wait(timeout=300)
    finally:
        client.stop()
    code = client.proc.returncode
    files = sorted(p.name for p in out.glob("images*"))
    print(f"\n{engine.name}: SDK worker {killed} killed mid-run -> job exit {code}, {len(files)} output files")
    if code == 0:  # retried: every image exactly once, as if nothing had happened
        rows = _parquet_rows(out)
        assert len(rows) == 240 and not _failure_lines(out)
    else:  # failed: nothing that looks like output is left
        assert code == 1, client.log_text()[-3000:]
        assert files == [] and not (out / "failures.jsonl").exists(), files
    assert ("retried" if code == 0 else "failed") in EXPECTED_AFTER_KILL[engine.name], client.log_text()[-3000:]
    assert E.wait_until_gone(E.DECODER_PROCESS_MODULE, token) == []


# ---------------------------------------------------------------------------------------------------------------
# The runners starting their job server themselves, from the jar: the README's commands


@pytest.mark.parametrize("runner", ["FlinkRunner", "SparkRunner"])
def test_runner_started_job_server__tar_to_parquet_from_the_jar_writes_what_the_fn_api_runner_writes(
        runner, dataset, reference, env, token, tmp_path):
    """``--runner FlinkRunner --flink_master [local] --flink_job_server_jar JAR`` (and Spark's equivalent): Beam
    starts the job server for this one pipeline, its SDK harness in the client (LOOPBACK), and stops it after."""
    flags = {
        "FlinkRunner": ["--flink_master=[local]", f"--flink_job_server_jar={E.flink_jar()}", "--parallelism=2"],
        "SparkRunner": ["--spark_master_url=local[2]", f"--spark_job_server_jar={E.spark_jar()}"],
    }[runner]
    # Beam 2.62's SparkRunner starts `java -jar` without the --add-opens Spark 3 needs on Java 17: the java
    # launcher takes them from JDK_JAVA_OPTIONS (README, "Running on a cluster").
    job_env = {**env, "JDK_JAVA_OPTIONS": " ".join(E.SPARK_JAVA_OPENS)} if runner == "SparkRunner" else env
    out = _job("pipelines.tar_to_parquet", dataset, tmp_path / "parquet",
               [f"--runner={runner}", "--environment_type=LOOPBACK", *flags], tmp_path, job_env, runner)
    assert _parquet_rows(out) == reference["parquet"]
    assert _failure_lines(out) == reference["parquet_failures"]
    assert _left_over(out) == []
    assert E.wait_until_gone(E.DECODER_PROCESS_MODULE, token) == []
    assert E.wait_until_gone("-job-server-", token) == [], "the job server Beam started outlived the job"
