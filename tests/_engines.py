"""Real engines for the tests: Beam's Flink and Spark job servers, a standalone Flink cluster, Prism.

`make engines` builds everything here needs into ``build/engines`` (or ``$BEAM_TARIMG_ENGINES``): the job-server
jars (shaded from the runners' artifacts on Maven Central, ``engines/*.pom.xml``), Prism (``go install``) and a
venv whose Beam is the same version as the jars. Each service is started the way Beam's own runner tests start
it (``flink_runner_test.py``: ``java -jar JOB_SERVER_JAR --flink-master [local] --job-port P ...``) in its own
process group, waited for on its port, and stopped as a group: no JVM or Python process outlives a test session.

Pipelines are submitted by a client process (``python tests/_engines.py probe ...`` or a job of ``pipelines/``)
with ``--job_endpoint`` pointing at the running job server, so no JVM is started per pipeline. SDK workers come
from a worker pool (``--environment_type=EXTERNAL``, ``_portable.start_worker_pool``): processes the engine
asks for, as a cluster's SDK harness containers are.

Run as a script: ``python tests/_engines.py probe --input PATTERN --output PREFIX [--batch_size N] [Beam flags]``
runs ``ReadImagesFromTars(...).with_failures()`` and writes one JSON line per image (id, path, shape, sha256 of
the pixels, metadata, the pid that decoded it) to ``PREFIX-images*`` and one per failure to ``PREFIX-failures*``,
then prints ``METRICS <json>`` (counters, distributions and string sets the runner reported, by name and step).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import json
import os
import sys
import time
import urllib.request
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

from _portable import (
    REPO_ROOT,
    WORKER_STARTED,
    Service,
    _children,
    free_port,
    image_digest,
    start_service,
    start_worker_pool,
    wait_for_port,
)

THIS_FILE = Path(__file__).resolve()
ENGINES_DIR = Path(os.environ.get("BEAM_TARIMG_ENGINES") or REPO_ROOT / "build" / "engines").resolve()
FN_API_RUNNER = "apache_beam.runners.portability.fn_api_runner.FnApiRunner"  # every Beam version knows this name
# Beam's flink_runner_test.py starts the job server with these (Java 17 closes the JDK's internals).
FLINK_JAVA_OPENS = [f"--add-opens=java.base/{p}=ALL-UNNAMED" for p in ("java.lang", "java.nio", "java.util")]
# What Beam's SparkRunner adds when it starts the Spark job server itself (spark_runner.py), for Java 17.
SPARK_JAVA_OPENS = [
    f"--add-opens=java.base/{p}=ALL-UNNAMED"
    for p in ("java.lang", "java.lang.invoke", "java.lang.reflect", "java.io", "java.net", "java.nio", "java.util",
              "java.util.concurrent", "java.util.concurrent.atomic", "sun.nio.ch", "sun.nio.cs", "sun.security.action",
              "sun.util.calendar")
]
STARTUP_TIMEOUT_S = 120.0
# The standalone cluster restarts a failed job (twice, after a second), as a production cluster is set up to.
FLINK_CLUSTER_RESTARTS = {"restart-strategy.type": "fixed-delay", "restart-strategy.fixed-delay.attempts": "2",
                          "restart-strategy.fixed-delay.delay": "1 s"}
DECODER_PROCESS_MODULE = "beam_tarimg.decoder_process"


def beam_version() -> str:
    import apache_beam

    return apache_beam.__version__


def flink_jar() -> Path:
    return ENGINES_DIR / "flink" / f"beam-runners-flink-1.19-job-server-{beam_version()}.jar"


def spark_jar() -> Path:
    return ENGINES_DIR / "spark" / f"beam-runners-spark-3-job-server-{beam_version()}.jar"


def prism_binary() -> Path:
    return ENGINES_DIR / f"prism-{beam_version()}" / "prism"


def missing(path: Path) -> Optional[str]:
    """Why ``path`` cannot be used (None if it can)."""
    if not path.exists():
        return f"{path} is missing: `make engines` builds it (needs java, mvn and go)"
    return None


# ---------------------------------------------------------------------------------------------------------------
# Services


@dataclasses.dataclass
class Engine:
    """A running engine: the services behind it and the Beam flags that send a pipeline to it."""

    name: str
    runner: str  # the --runner a user names for it
    services: List[Service]
    flags: List[str]  # everything but --runner
    pool: Optional[Service] = None  # the SDK worker pool, for EXTERNAL environments
    workers: int = 1  # SDK worker processes a job gets
    started_s: float = 0.0  # how long the engine took to start (job server, cluster)

    def pipeline_flags(self, runner: Optional[str] = None) -> List[str]:
        return [f"--runner={runner or self.runner}", *self.flags]

    def workers_started(self) -> int:
        return self.pool.log_text().count(WORKER_STARTED) if self.pool else 0

    def worker_pids(self) -> List[int]:
        return _children(self.pool.proc.pid) if self.pool else []

    def describe(self) -> str:
        return "\n".join(s.describe() for s in self.services)

    def check_alive(self) -> Optional[str]:
        for s in self.services:
            if s.proc.poll() is not None:
                return f"{s.name} died"
        return None


def flink_conf_dir(folder: Path, parallelism: int, extra: Optional[Dict[str, str]] = None) -> Path:
    """A Flink configuration folder (``config.yaml``, Flink 1.19's format; ``flink-conf.yaml`` for older readers)."""
    folder.mkdir(parents=True, exist_ok=True)
    conf = {"parallelism.default": str(parallelism), "taskmanager.numberOfTaskSlots": str(parallelism), **(extra or {})}
    text = "".join(f"{k}: {v}\n" for k, v in conf.items())
    (folder / "config.yaml").write_text(text)
    (folder / "flink-conf.yaml").write_text(text)
    return folder


def start_flink_job_server(log_dir: Path, env: Dict[str, str], master: str, conf_dir: Path,
                           name: str = "flink_job_server") -> tuple:
    port = free_port()
    server = start_service(name, [
        "java", *FLINK_JAVA_OPENS, "-jar", str(flink_jar()), "--flink-master", master,
        "--flink-conf-dir", str(conf_dir), "--artifacts-dir", str(log_dir / f"{name}-artifacts"),
        "--job-host", "localhost", "--job-port", str(port), "--artifact-port", "0", "--expansion-port", "-1",
    ], log_dir, env)
    wait_for_port(server, port, STARTUP_TIMEOUT_S)
    return server, port


def start_spark_job_server(log_dir: Path, env: Dict[str, str], master: str, name: str = "spark_job_server") -> tuple:
    port = free_port()
    server = start_service(name, [
        "java", *SPARK_JAVA_OPENS, "-jar", str(spark_jar()), "--spark-master-url", master,
        "--artifacts-dir", str(log_dir / f"{name}-artifacts"),
        "--job-host", "localhost", "--job-port", str(port), "--artifact-port", "0", "--expansion-port", "-1",
    ], log_dir, env)
    wait_for_port(server, port, STARTUP_TIMEOUT_S)
    return server, port


# A standalone TaskManager started without Flink's scripts must be given what `taskmanager.sh` computes: its
# CPU cores and every memory pool (Flink refuses to start otherwise). Small, for a 2-core test machine.
_TASKMANAGER_RESOURCES = {
    "taskmanager.cpu.cores": "2.0",
    "taskmanager.memory.framework.heap.size": "128m",
    "taskmanager.memory.task.heap.size": "384m",
    "taskmanager.memory.managed.size": "64m",
    "taskmanager.memory.network.min": "160m",
    "taskmanager.memory.network.max": "160m",
    "taskmanager.memory.framework.off-heap.size": "128m",
    "taskmanager.memory.task.off-heap.size": "0m",
    "taskmanager.memory.jvm-metaspace.size": "256m",
    "taskmanager.memory.jvm-overhead.min": "192m",
    "taskmanager.memory.jvm-overhead.max": "192m",
    # A batch job's sort-shuffle partitions each want 512 network buffers by default: too many for this size.
    "taskmanager.network.sort-shuffle.min-buffers": "64",
}


def _flink_overview(rest_port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{rest_port}/overview", timeout=5) as r:
        return json.loads(r.read())


def start_flink_cluster(log_dir: Path, env: Dict[str, str], slots: int) -> tuple:
    """A standalone Flink session cluster on 127.0.0.1: a JobManager process and a TaskManager process, both
    from Flink's own entry points (the classes Flink's `jobmanager.sh`/`taskmanager.sh` start), with Flink's
    jars from the job-server jar. Returns ([jobmanager, taskmanager], rest_port) once the TaskManager has
    registered its slots."""
    rest_port, rpc_port = free_port(), free_port()
    conf = flink_conf_dir(log_dir / "flink-cluster-conf", slots, {
        "jobmanager.rpc.address": "localhost", "jobmanager.rpc.port": str(rpc_port),
        "jobmanager.bind-host": "127.0.0.1", "rest.address": "localhost", "rest.bind-address": "127.0.0.1",
        "rest.port": str(rest_port), "taskmanager.bind-host": "127.0.0.1", "taskmanager.host": "localhost",
        "jobmanager.memory.process.size": "768m", "classloader.check-leaked-classloader": "false",
        **_TASKMANAGER_RESOURCES, **FLINK_CLUSTER_RESTARTS,
    })
    cluster_env = {**env, "FLINK_CONF_DIR": str(conf)}
    classpath = ["-cp", str(flink_jar())]
    jobmanager = start_service("flink_jobmanager", [
        "java", *FLINK_JAVA_OPENS, "-Xmx384m", *classpath,
        "org.apache.flink.runtime.entrypoint.StandaloneSessionClusterEntrypoint", "--configDir", str(conf),
    ], log_dir, cluster_env)
    taskmanager = start_service("flink_taskmanager", [
        "java", *FLINK_JAVA_OPENS, "-Xmx512m", *classpath,
        "org.apache.flink.runtime.taskexecutor.TaskManagerRunner", "--configDir", str(conf),
    ], log_dir, cluster_env)
    processes = [jobmanager, taskmanager]
    try:
        wait_for_port(jobmanager, rest_port, STARTUP_TIMEOUT_S)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            for p in processes:
                if p.proc.poll() is not None:
                    raise RuntimeError(f"{p.name} exited\n{p.describe()}")
            with contextlib.suppress(OSError, ValueError):
                if _flink_overview(rest_port).get("slots-total", 0) >= slots:
                    return processes, rest_port
            if time.monotonic() > deadline:
                raise TimeoutError("the TaskManager did not register\n" + "\n".join(p.describe() for p in processes))
            time.sleep(0.2)
    except BaseException:
        for p in reversed(processes):
            p.stop()
        raise


@contextlib.contextmanager
def engine(name: str, log_dir: Path, env: Dict[str, str], workers: int = 2) -> Iterator[Engine]:
    """Starts engine ``name`` ("flink", "flink-cluster", "spark", "prism") and stops everything it started.

    flink: Beam's Flink job server with its embedded mini-cluster (``--flink-master [local]``), parallelism
      ``workers``, SDK workers from a pool. flink-cluster: a standalone JobManager and TaskManager, the job server
      submitting to them over REST. spark: Beam's Spark job server, ``local[workers]``. prism: Beam's Prism, started
      by PrismRunner itself from ``--prism_location``, SDK harness in the client (LOOPBACK).
    """
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    started: List[Service] = []
    t0 = time.monotonic()
    try:
        if name == "prism":
            yield Engine(name, "PrismRunner", [], [f"--prism_location={prism_binary()}",
                                                    "--environment_type=LOOPBACK"], workers=1)
            return
        pool, pool_port = start_worker_pool(log_dir, env)
        wait_for_port(pool, pool_port, STARTUP_TIMEOUT_S)
        started.append(pool)
        sdk = ["--environment_type=EXTERNAL", f"--environment_config=localhost:{pool_port}",
               f"--sdk_worker_parallelism={workers}"]
        if name == "flink":
            server, port = start_flink_job_server(log_dir, env, "[local]", flink_conf_dir(log_dir / "flink-conf", workers))
            started.append(server)
            flags, runner = [f"--job_endpoint=localhost:{port}", f"--parallelism={workers}", *sdk], "FlinkRunner"
        elif name == "flink-cluster":
            processes, rest_port = start_flink_cluster(log_dir, env, workers)
            started += processes
            server, port = start_flink_job_server(log_dir, env, f"localhost:{rest_port}",
                                                  flink_conf_dir(log_dir / "flink-client-conf", workers,
                                                                 FLINK_CLUSTER_RESTARTS))
            started.append(server)
            flags, runner = [f"--job_endpoint=localhost:{port}", f"--parallelism={workers}", *sdk], "FlinkRunner"
        elif name == "spark":
            server, port = start_spark_job_server(log_dir, env, f"local[{workers}]")
            started.append(server)
            flags, runner = [f"--job_endpoint=localhost:{port}", *sdk], "SparkRunner"
        else:
            raise ValueError(f"unknown engine {name!r}")
        yield Engine(name, runner, started, flags, pool=pool, workers=workers, started_s=time.monotonic() - t0)
    finally:
        for s in reversed(started):
            s.stop()


def run_client(argv: Sequence[str], log_dir: Path, env: Dict[str, str], name: str,
               engine_: Optional[Engine] = None, timeout_s: float = 300.0, check: bool = True) -> Service:
    """Runs ``python ARGV...`` to completion in its own process group; fails (never hangs) when it runs past
    ``timeout_s`` or a service of the engine dies, with every log in the error. Returns the finished client."""
    client = start_service(name, [sys.executable, *argv], Path(log_dir), env)
    deadline = time.monotonic() + timeout_s
    try:
        while client.proc.poll() is None:
            problem = engine_.check_alive() if engine_ else None
            if problem is None and time.monotonic() > deadline:
                problem = f"did not finish in {timeout_s}s"
            if problem:
                raise AssertionError(f"{name}: {problem}\n{client.describe()}\n{engine_.describe() if engine_ else ''}")
            time.sleep(0.2)
        if check and client.proc.returncode != 0:
            raise AssertionError(f"{name} failed with exit {client.proc.returncode}\n{client.describe()}\n"
                                 f"{engine_.describe() if engine_ else ''}")
        return client
    finally:
        client.stop()


def processes_running(word: str, token: str) -> List[int]:
    """Live processes whose command line holds ``word`` (an argument, or part of one: the decoder process runs
    ``python -I -c <a bootstrap naming beam_tarimg.decoder_process>``) and whose environment holds ``token``
    (this test's processes)."""
    found = []
    for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
        pid = int(cmdline.split("/")[2])
        try:
            with open(cmdline, "rb") as f:
                args = f.read().split(b"\0")
            if not any(word.encode() in arg for arg in args):
                continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                if token.encode() not in f.read():
                    continue
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
        except OSError:
            continue
        found.append(pid)
    return found


def wait_until_gone(module: str, token: str, timeout_s: float = 20.0) -> List[int]:
    """Waits up to ``timeout_s`` for the processes of ``processes_running(module, token)`` to end; returns what
    is left."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = processes_running(module, token)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


# ---------------------------------------------------------------------------------------------------------------
# The probe job


def _image_lines(batch):
    pid = os.getpid()
    for image in batch:
        yield json.dumps({
            "image_id": image.image_id, "image_path": image.image_path, "shape": list(image.image_data.shape),
            "sha256": image_digest(image.image_data), "metadata": image.metadata, "pid": pid,
        }, sort_keys=True)


def _failure_line(failure) -> str:
    return json.dumps(failure.to_dict(), sort_keys=True)


def metrics_json(result) -> dict:
    """Every beam_tarimg metric the runner reported: {"counters"|"distributions"|"string_sets": {name: {step:
    value}}}; committed values where the runner has them, else attempted."""
    from apache_beam.metrics import MetricsFilter

    from beam_tarimg.transforms import NAMESPACE

    out: dict = {}
    for kind, values in result.metrics().query(MetricsFilter().with_namespace(NAMESPACE)).items():
        for m in values:
            value = m.committed if m.committed is not None else m.attempted
            if kind == "distributions":
                value = {"count": value.count, "sum": value.sum, "min": value.min, "max": value.max}
            elif isinstance(value, (set, frozenset)):
                value = sorted(value)
            out.setdefault(kind, {}).setdefault(m.key.metric.name, {})[m.key.step] = value
    return out


def _probe_main(argv: Sequence[str]) -> int:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from beam_tarimg import ReadAllImagesFromTars, ReadImagesFromTars

    parser = argparse.ArgumentParser(prog="tests/_engines.py probe")
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--batch_size", type=int, default=4)
    args, beam_args = parser.parse_known_args(argv)
    p = beam.Pipeline(options=PipelineOptions(beam_args))
    read = ReadImagesFromTars(args.input, batch_size=args.batch_size, include_metadata=True)
    print("REDISTRIBUTE " + json.dumps(ReadAllImagesFromTars().redistribute_mode(p)), flush=True)
    batches, failures = p | "Read" >> read.with_failures()
    _ = (batches | "DescribeImages" >> beam.FlatMap(_image_lines)
         | "WriteImages" >> beam.io.WriteToText(args.output + "-images", file_name_suffix=".jsonl"))
    _ = (failures | "DescribeFailures" >> beam.Map(_failure_line)
         | "WriteFailures" >> beam.io.WriteToText(args.output + "-failures", file_name_suffix=".jsonl"))
    result = p.run()
    state = result.wait_until_finish()
    print("STATE " + json.dumps(str(state)), flush=True)
    print("METRICS " + json.dumps(metrics_json(result), sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    command, rest = (sys.argv[1], sys.argv[2:]) if len(sys.argv) > 1 else ("", [])
    if command == "probe":
        import _engines  # the probe's functions must pickle by reference to an importable module, not __main__

        sys.exit(_engines._probe_main(rest))
    sys.exit(f"usage: {sys.argv[0]} probe ...")
