"""Beam's portable services for tests, and a probe job that records where each image was decoded.

The portable path that Flink and Spark use (a job service, SDK workers over the Fn API) runs here with Beam's
own Python job service and a worker pool. Everything started here runs in its own session and is killed as a
process group on the way out, whatever happened; every wait is bounded and gives up early when the process it
waits on has died, with the logs of every process in the error.

The worker pool starts each SDK worker with the bare command ``python``: ``service_env()`` puts this
interpreter's ``bin`` first on ``PATH`` (and the repository on ``PYTHONPATH``), or the workers die and the
client waits forever. ``run_job`` notices a worker that died and fails instead.

Run as a script it has two commands:

  ``python tests/_portable.py job-service --port=P``
      Beam's ``apache_beam.runners.portability.local_job_service_main``, unchanged except that the FnApiRunner
      behind it honours ``--direct_num_workers`` from the job's options. Beam 2.77's job service calls
      ``FnApiRunner.run_via_runner_api`` directly, which never reads that option, so it starts exactly one
      SDK worker per environment whatever ``--sdk_worker_parallelism`` (read by Flink and Spark only) says.
  ``python tests/_portable.py probe-job --input DIR --output PREFIX [--batch_size N] [Beam flags]``
      ``ReadImagesFromTars`` -> one JSON line per image (id, path, shape, sha256 of the pixels, metadata and
      the pid of the process that decoded it) -> ``WriteToText(PREFIX)``; prints ``METRICS <json>``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
THIS_FILE = Path(__file__).resolve()

# The worker pool's log line for each SDK worker it starts (apache_beam/runners/worker/worker_pool_main.py).
WORKER_STARTED = "Starting worker with command"
# How long a job client may keep running after one of its SDK workers died before the job counts as hung.
DEAD_WORKER_GRACE_S = 10.0


def service_env(extra: Optional[Dict[str, str]] = None, path_first: Optional[str] = None) -> Dict[str, str]:
    """The environment for every process started here: ``path_first`` (default: this interpreter's ``bin``)
    first on ``PATH``, the repository importable."""
    env = dict(os.environ)
    first = path_first or str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([first] + [p for p in env.get("PATH", "").split(os.pathsep) if p and p != first])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), str(THIS_FILE.parent), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    return env


def free_port() -> int:
    """A TCP port that was free a moment ago (the service binds it right after; a clash fails loudly)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _tail(path: Path, chars: int = 5000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "<no log>"
    return text[-chars:]


def _processes() -> Iterator[tuple]:
    """(pid, state, ppid, pgrp) of every process (Linux /proc)."""
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        yield int(stat.split("/")[2]), fields[0], int(fields[1]), int(fields[2])


def _children(pid: int) -> List[int]:
    """Live (non-zombie) child processes of ``pid``."""
    return [p for p, state, ppid, _ in _processes() if ppid == pid and state != "Z"]


def group_members(pgid: int) -> List[int]:
    """Live (non-zombie) processes of process group ``pgid``."""
    return [p for p, state, _, pgrp in _processes() if pgrp == pgid and state != "Z"]


@dataclasses.dataclass
class Service:
    """A process started in its own session, so that it and its children can be killed as one group."""

    name: str
    proc: subprocess.Popen
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def describe(self) -> str:
        return f"--- {self.name} (pid {self.proc.pid}, exit {self.proc.poll()}), log {self.log}:\n{_tail(self.log)}"

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM to the whole process group, then SIGKILL to whatever is left; never raises."""
        pgid = self.proc.pid  # start_new_session=True: the group id is the leader's pid
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=wait_s)
            deadline = time.monotonic() + wait_s
            while group_members(pgid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if self.proc.poll() is not None and not group_members(pgid):
                return


def start_service(name: str, argv: Sequence[str], log_dir: Path, env: Dict[str, str]) -> Service:
    log = Path(log_dir) / f"{name}.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            list(argv), stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            cwd=str(REPO_ROOT), start_new_session=True,
        )
    return Service(name, proc, log)


def wait_for_port(service: Service, port: int, timeout_s: float) -> None:
    """Polls ``localhost:port`` until it accepts; raises (with the log) if the process died or time ran out."""
    deadline = time.monotonic() + timeout_s
    while True:
        if service.proc.poll() is not None:
            raise RuntimeError(f"{service.name} exited before listening on port {port}\n{service.describe()}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            if s.connect_ex(("localhost", port)) == 0:
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{service.name} not listening on port {port} after {timeout_s}s\n{service.describe()}")
        time.sleep(0.1)


@dataclasses.dataclass
class PortableServices:
    """A running job service and worker pool, and the Beam flags that send a job to them."""

    job_service: Service
    worker_pool: Service
    job_port: int
    pool_port: int
    env: Dict[str, str]
    log_dir: Path

    def pipeline_flags(self, workers: int = 2) -> List[str]:
        """``PortableRunner`` flags for ``workers`` SDK workers (processes) from the pool.

        ``--sdk_worker_parallelism`` is what Flink and Spark read; the Python job service reads
        ``--direct_num_workers`` (see the module docstring). Both are passed.
        """
        return [
            "--runner=PortableRunner",
            f"--job_endpoint=localhost:{self.job_port}",
            "--environment_type=EXTERNAL",
            f"--environment_config=localhost:{self.pool_port}",
            f"--sdk_worker_parallelism={workers}",
            f"--direct_num_workers={workers}",
        ]

    def workers_started(self) -> int:
        return self.worker_pool.log_text().count(WORKER_STARTED)

    def workers_alive(self) -> int:
        return len(_children(self.worker_pool.proc.pid))

    def describe(self) -> str:
        return "\n".join(s.describe() for s in (self.job_service, self.worker_pool))

    def run_job(self, argv: Sequence[str], name: str = "client", timeout_s: float = 180.0) -> str:
        """Runs a job client (``python ARGV...``) to completion in its own process group; returns its output.

        Fails (never hangs) when the client runs past ``timeout_s``, when the job service or pool dies, or
        when an SDK worker died and the client is still waiting ``DEAD_WORKER_GRACE_S`` later. Every failure
        carries the logs of the client, the job service and the pool.
        """
        client = start_service(name, [sys.executable, *argv], self.log_dir, self.env)
        deadline = time.monotonic() + timeout_s
        worker_died_at = None
        try:
            while client.proc.poll() is None:
                problem = None
                for s in (self.job_service, self.worker_pool):
                    if s.proc.poll() is not None:
                        problem = f"{s.name} died"
                if problem is None and self.workers_alive() < self.workers_started():
                    worker_died_at = worker_died_at or time.monotonic()
                    if time.monotonic() - worker_died_at > DEAD_WORKER_GRACE_S:
                        problem = (f"an SDK worker died ({self.workers_started()} started, {self.workers_alive()} "
                                   f"alive) and the client is still waiting")
                if problem is None and time.monotonic() > deadline:
                    problem = f"the job did not finish in {timeout_s}s"
                if problem:
                    raise AssertionError(f"job {name}: {problem}\n{client.describe()}\n{self.describe()}")
                time.sleep(0.2)
            if client.proc.returncode != 0:
                raise AssertionError(
                    f"job {name} failed with exit {client.proc.returncode}\n{client.describe()}\n{self.describe()}"
                )
            return client.log_text()
        finally:
            client.stop()


def start_worker_pool(log_dir: Path, env: Dict[str, str], name: str = "worker_pool") -> tuple:
    """Beam's process worker pool on a free port: (service, port). The caller waits for the port."""
    port = free_port()
    pool = start_service(
        name, [sys.executable, "-m", "apache_beam.runners.worker.worker_pool_main", f"--service_port={port}"],
        log_dir, env,
    )
    return pool, port


@contextlib.contextmanager
def portable_services(log_dir: Path, startup_timeout_s: float = 60.0,
                      env: Optional[Dict[str, str]] = None) -> Iterator[PortableServices]:
    """Starts Beam's Python job service and a process worker pool; stops both (and all workers) on exit."""
    env = env or service_env()
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    started: List[Service] = []
    try:
        pool, pool_port = start_worker_pool(log_dir, env)
        started.append(pool)
        job_port = free_port()
        job = start_service(
            "job_service",
            [py, str(THIS_FILE), "job-service", f"--port={job_port}", f"--staging_dir={log_dir / 'staging'}"],
            log_dir, env,
        )
        started.append(job)
        wait_for_port(pool, pool_port, startup_timeout_s)
        wait_for_port(job, job_port, startup_timeout_s)
        yield PortableServices(job, pool, job_port, pool_port, env, log_dir)
    finally:
        for s in reversed(started):
            s.stop()


# ---------------------------------------------------------------------------------------------------------------
# The probe job: what each runner decoded, and where.


def image_digest(pixels) -> str:
    """sha256 of the raw bytes of a uint8 HxWxC array (what the Parquet sink stores as image_data)."""
    import numpy as np

    return hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest()


def pillow_reference(tar_paths: Sequence[str]) -> Dict[str, dict]:
    """image_id -> what a correct reader yields for it, decoded here with Pillow (EXIF orientation applied,
    RGB), which DALI's CPU decoder matches bit for bit on these images: image_path, shape, sha256, mean_rgb
    and the metadata of its .json/.txt sidecars."""
    import io
    import tarfile

    import numpy as np
    from PIL import Image, ImageOps

    ref: Dict[str, dict] = {}
    for tar_path in tar_paths:
        with tarfile.open(tar_path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
        for name, data in members.items():
            key, ext = name.rsplit(".", 1)
            if ext.lower() not in ("jpg", "jpeg"):
                continue
            with Image.open(io.BytesIO(data)) as im:
                pixels = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
            meta = json.loads(members[key + ".json"]) if key + ".json" in members else {}
            if key + ".txt" in members:
                meta["caption"] = members[key + ".txt"].decode("utf-8")
            ref[key] = {
                "image_path": f"{os.path.basename(tar_path)}/{name}",
                "shape": list(pixels.shape),
                "sha256": image_digest(pixels),
                "mean_rgb": mean_rgb(pixels),
                "metadata": meta,
            }
    return ref


def mean_rgb(pixels) -> tuple:
    """The mean colour of an HxWx3 image, rounded so that equal pixels give equal keys."""
    return tuple(round(float(v), 6) for v in pixels.reshape(-1, 3).mean(axis=0, dtype="float64"))


def probe_rows_by_id(rows: Sequence[dict]) -> Dict[str, dict]:
    """The probe job's rows keyed by image_id, without the pid; fails on a duplicate id."""
    out: Dict[str, dict] = {}
    for row in rows:
        assert row["image_id"] not in out, f"image {row['image_id']} came out twice"
        out[row["image_id"]] = {k: row[k] for k in ("image_path", "shape", "sha256", "metadata")}
    return out


def expected_rows(reference: Dict[str, dict]) -> Dict[str, dict]:
    return {k: {f: v[f] for f in ("image_path", "shape", "sha256", "metadata")} for k, v in reference.items()}


def _describe_images(batch):
    pid = os.getpid()
    for image in batch:
        yield json.dumps({
            "image_id": image.image_id,
            "image_path": image.image_path,
            "shape": list(image.image_data.shape),
            "sha256": image_digest(image.image_data),
            "metadata": image.metadata,
            "pid": pid,
        }, sort_keys=True)


def build_probe(pipeline, input_pattern: str, output_prefix: str, **read_kwargs):
    """Adds ReadImagesFromTars -> JSON line per image -> WriteToText(output_prefix) to ``pipeline``."""
    import apache_beam as beam

    from beam_tarimg import ReadImagesFromTars

    return (
        pipeline
        | "Read" >> ReadImagesFromTars(input_pattern, **read_kwargs)
        | "Describe" >> beam.FlatMap(_describe_images)
        | "Write" >> beam.io.WriteToText(output_prefix, file_name_suffix=".jsonl")
    )


def read_probe_output(output_prefix: str) -> List[dict]:
    rows = []
    for path in sorted(glob.glob(output_prefix + "*.jsonl")):
        with open(path) as f:
            rows.extend(json.loads(line) for line in f if line.strip())
    return rows


def beam_counters(result) -> Dict[str, int]:
    """Committed ``beam_tarimg`` counters of a finished pipeline, summed over steps."""
    from apache_beam.metrics import MetricsFilter

    from beam_tarimg.transforms import NAMESPACE

    counters: Dict[str, int] = {}
    for c in result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]:
        counters[c.key.metric.name] = counters.get(c.key.metric.name, 0) + (c.committed or 0)
    return counters


def counter_steps(result) -> Dict[str, List[str]]:
    """``beam_tarimg`` counter name -> the steps that reported it."""
    from apache_beam.metrics import MetricsFilter

    from beam_tarimg.transforms import NAMESPACE

    steps: Dict[str, List[str]] = {}
    for c in result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]:
        steps.setdefault(c.key.metric.name, []).append(c.key.step)
    return steps


def parse_output_line(output: str, tag: str):
    """The JSON after ``TAG `` on the last such line of a job's output."""
    for line in reversed(output.splitlines()):
        if line.startswith(tag + " "):
            return json.loads(line[len(tag) + 1:])
    raise AssertionError(f"no {tag} line in the job's output:\n{output[-3000:]}")


def _probe_main(argv: Sequence[str]) -> int:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    parser = argparse.ArgumentParser(prog="tests/_portable.py probe-job")
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--batch_size", type=int, default=4)
    args, beam_args = parser.parse_known_args(argv)
    p = beam.Pipeline(options=PipelineOptions(beam_args))
    build_probe(p, args.input, args.output, batch_size=args.batch_size, include_metadata=True)
    result = p.run()
    result.wait_until_finish()
    print("METRICS " + json.dumps(beam_counters(result), sort_keys=True), flush=True)
    print("STEPS " + json.dumps(counter_steps(result)), flush=True)
    return 0


def _job_service_main(argv: Sequence[str]) -> int:
    from apache_beam.options.pipeline_options import DirectOptions
    from apache_beam.runners.portability import local_job_service_main
    from apache_beam.runners.portability.fn_api_runner import fn_runner

    original = fn_runner.FnApiRunner.run_via_runner_api
    if not hasattr(fn_runner.FnApiRunner(), "_num_workers"):
        raise SystemExit("this Beam's FnApiRunner has no _num_workers: update tests/_portable.py")

    def run_via_runner_api(self, pipeline_proto, options):
        # Options arrive from the job's JSON: the number may be a string.
        self._num_workers = int(options.view_as(DirectOptions).direct_num_workers or 1)
        return original(self, pipeline_proto, options)

    fn_runner.FnApiRunner.run_via_runner_api = run_via_runner_api
    local_job_service_main.run(list(argv))
    return 0


if __name__ == "__main__":
    command, rest = (sys.argv[1], sys.argv[2:]) if len(sys.argv) > 1 else ("", [])
    if command == "job-service":
        sys.exit(_job_service_main(rest))
    if command == "probe-job":
        sys.exit(_probe_main(rest))
    sys.exit(f"usage: {sys.argv[0]} job-service|probe-job ...")
