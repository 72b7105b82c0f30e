"""``python -m bench.engines``: the reader on each real engine, against the FnApiRunner and the limit, in one run.

Run under the engines' venv (``make bench-engines``): Flink (mini-cluster and standalone cluster), Spark
``local[2]`` and Prism are started as the engine tests start them (tests/_engines.py); each case is
``ReadImagesFromTars -> count`` on the ImageNet-like corpus, submitted by a client process, at N/4 and N
images in every round, after one warm-up job at N/4 on the freshly started engine. Reported per engine (medians over rounds):

- marginal images/s, (N - N/4) / (T(N) - T(N/4)), wall time from the client's start to its end, so the
  job's constant costs (submission, staging, worker start-up) cancel out; its ratio to the limit (simplejpeg,
  one process per core, bytes in memory) and to the FnApiRunner, measured in the same rounds;
- the decode window's rate: images decoded between the first decoded batch and the last of the N job, over
  that time (the job's constant costs excluded), against the limit;
- CPU: marginal CPU ms per image of the SDK worker processes with their decoder processes, against the limit's
  (what moves least with the machine's load), and of the engine's own processes (JVMs);
- the start-up of the engine (job server, cluster) and the whole time of the N/4 job;
- peak memory (PSS) of one SDK worker process with its decoder process, and of all of them together.

Writes ``bench/results/engines-<time>.{md,json}`` and ``bench/results/engines-latest.*``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import _engines as E  # noqa: E402
from _portable import service_env  # noqa: E402
from bench import corpus as K  # noqa: E402
from bench.measure import RESULT_PREFIX, descendants, proc_cpu_s, proc_memory_kb, run_worker  # noqa: E402

RESULTS = REPO / "bench" / "results"
ENGINES = ["fnapi", "flink", "flink-cluster", "spark", "prism"]


class _WorkerSampler(threading.Thread):
    """Peak PSS of each SDK worker process (with everything below it: its decoder process) and of all of them
    together, and the CPU seconds of those processes and of the engine's own (the JVMs), sampled every
    ``interval`` s. ``roots()`` gives the SDK worker pids of the moment, ``engine_roots`` the engine's services."""

    def __init__(self, roots, engine_roots=(), interval: float = 0.2):
        super().__init__(daemon=True)
        self.roots, self.engine_roots, self.interval = roots, list(engine_roots), interval
        self.peak_one_kb = self.peak_all_kb = 0
        self.cpu_workers: Dict[int, float] = {}
        self.cpu_engine: Dict[int, float] = {}
        self.cpu_engine_start: Dict[int, float] = {}
        self._halt = threading.Event()

    def _cpu(self, pids, into: Dict[int, float], start: Dict[int, float] = None):
        for p in pids:
            cpu = proc_cpu_s(p)
            if cpu is not None:
                if start is not None:
                    start.setdefault(p, cpu)
                into[p] = cpu

    def run(self):
        while not self._halt.is_set():
            total = 0
            for root in self.roots():
                tree = descendants(root)
                self._cpu(tree, self.cpu_workers)
                kb = sum(proc_memory_kb(p) or 0 for p in tree)
                self.peak_one_kb = max(self.peak_one_kb, kb)
                total += kb
            for root in self.engine_roots:
                self._cpu(descendants(root), self.cpu_engine, self.cpu_engine_start)
            self.peak_all_kb = max(self.peak_all_kb, total)
            self._halt.wait(self.interval)

    def stop(self):
        self._halt.set()
        self.join()

    @property
    def worker_cpu_s(self) -> float:
        return sum(self.cpu_workers.values())

    @property
    def engine_cpu_s(self) -> float:
        return sum(v - self.cpu_engine_start.get(p, 0.0) for p, v in self.cpu_engine.items())


def _stamp(batch):
    return time.time(), len(batch)


def _count_main(argv: List[str]) -> int:
    """The client: ReadImagesFromTars -> count; prints BENCH_RESULT {"images", "t_work"}."""
    t0 = time.perf_counter()
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from beam_tarimg import ReadImagesFromTars

    ap = argparse.ArgumentParser()
    ap.add_argument("--input", required=True)
    ap.add_argument("--out", required=True)
    args, beam_args = ap.parse_known_args(argv)
    p = beam.Pipeline(options=PipelineOptions(beam_args))
    _ = (p | "Read" >> ReadImagesFromTars(args.input, batch_size=100)
         | "Stamp" >> beam.Map(_stamp) | "All" >> beam.combiners.ToList()
         | "Json" >> beam.Map(json.dumps) | "Write" >> beam.io.WriteToText(args.out))
    p.run().wait_until_finish()
    t_work = time.perf_counter() - t0
    stamps = sorted(tuple(x) for f in Path(args.out).parent.glob(Path(args.out).name + "*")
                    for line in f.read_text().splitlines() for x in json.loads(line))
    images = sum(n for _, n in stamps)
    # The decode window: from the first decoded batch to the last (constant costs before and after excluded).
    window = stamps[-1][0] - stamps[0][0]
    window_rate = (images - stamps[0][1]) / window if window > 0 else None
    print(RESULT_PREFIX + json.dumps({"images": images, "t_work": t_work, "window_rate": window_rate}), flush=True)
    return 0


def _run_case(engine, name, folder, n, log_dir, env) -> dict:
    out = Path(tempfile.mkdtemp(prefix="bench-engines-", dir=log_dir)) / "count"
    flags = engine.pipeline_flags() if engine else [f"--runner={E.FN_API_RUNNER}"]
    client = E.start_service(f"{name}-{n}", [sys.executable, "-m", "bench.engines", "count", "--input", folder,
                                             "--out", str(out), *flags], log_dir, env)
    if engine and engine.pool:
        roots = engine.worker_pids
    else:  # LOOPBACK / in-process: the client is the SDK worker
        roots = lambda: [client.proc.pid]  # noqa: E731
    services = [sv.proc.pid for sv in engine.services if sv is not engine.pool] if engine else []
    sampler = _WorkerSampler(roots, services)
    sampler.start()
    try:
        client.proc.wait(timeout=1800)
    finally:
        sampler.stop()
        client.stop()
    text = client.log_text()
    lines = [line for line in text.splitlines() if line.startswith(RESULT_PREFIX)]
    if client.proc.returncode != 0 or not lines:
        raise RuntimeError(f"{name} at n={n} failed:\n{text[-3000:]}")
    result = json.loads(lines[-1][len(RESULT_PREFIX):])
    if result["images"] != n:
        raise RuntimeError(f"{name} at n={n} counted {result['images']} images")
    result.update(peak_worker_kb=sampler.peak_one_kb, peak_workers_kb=sampler.peak_all_kb,
                  worker_cpu_s=sampler.worker_cpu_s, engine_cpu_s=sampler.engine_cpu_s)
    return result


def _limit(folder: str, n: int, env: Dict[str, str]) -> dict:
    return run_worker(["limit", "--input", folder, "--n", str(n)], env, str(REPO), timeout=900)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.engines", description=__doc__.split("\n\n")[0])
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--passes", type=int, default=1, help="N = passes x the corpus set (8 x 500 images)")
    ap.add_argument("--quick", action="store_true", help="the small corpus (4 x 100 images), one round")
    args = ap.parse_args(argv)
    spec = K.QUICK_IMAGENET if args.quick else K.IMAGENET
    rounds = 1 if args.quick else args.rounds
    folder = K.ensure_corpus(K.default_root(), [spec], with_mem=False)["imagenet"]
    n = spec.images * args.passes
    small = n // 4 - (n // 4) % spec.images_per_tar or spec.images_per_tar
    views = {small: K.view(folder, small), n: K.view(folder, n)}
    names = [e for e in args.engines.split(",") if e]
    log_dir = Path(tempfile.mkdtemp(prefix="bench-engines-logs-"))
    env = service_env({"BEAM_TARIMG_ENGINE_TEST": "bench"})
    print(f"bench.engines: Beam {E.beam_version()}, N={n} and {small} images, {rounds} round(s), logs {log_dir}",
          file=sys.stderr, flush=True)

    runs: Dict[str, List[dict]] = {name: [] for name in ["limit", *names]}
    startup: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(rounds):
        l_small, l_large = _limit(views[small], small, env), _limit(views[n], n, env)
        runs["limit"].append({"rate": (n - small) / (l_large["t_work"] - l_small["t_work"]),
                              "cpu_ms": 1000 * (l_large["cpu_work"] - l_small["cpu_work"]) / (n - small)})
        for name in names:
            ctx = E.engine(name, log_dir / f"{name}-{r}", env) if name != "fnapi" else None
            if ctx is None:
                engine = None
                small_r = _run_case(None, name, views[small], small, log_dir, env)
                large_r = _run_case(None, name, views[n], n, log_dir, env)
            else:
                with ctx as engine:
                    startup[name].append(engine.started_s)
                    # A fresh JVM's first job pays class loading, JIT and staging: warm the engine up first.
                    _run_case(engine, name, views[small], small, log_dir, env)
                    small_r = _run_case(engine, name, views[small], small, log_dir, env)
                    large_r = _run_case(engine, name, views[n], n, log_dir, env)
            runs[name].append({
                "rate": (n - small) / (large_r["t_work"] - small_r["t_work"]),
                "window_rate": large_r["window_rate"],
                "worker_cpu_ms": 1000 * (large_r["worker_cpu_s"] - small_r["worker_cpu_s"]) / (n - small),
                "engine_cpu_ms": 1000 * (large_r["engine_cpu_s"] - small_r["engine_cpu_s"]) / (n - small),
                "t_small": small_r["t_work"], "t_large": large_r["t_work"],
                "peak_worker_mb": max(small_r["peak_worker_kb"], large_r["peak_worker_kb"]) / 1024,
                "peak_workers_mb": max(small_r["peak_workers_kb"], large_r["peak_workers_kb"]) / 1024,
            })
            last = runs[name][-1]
            print(f"round {r + 1}: {name}: {last['rate']:.0f} img/s marginal, {last['window_rate'] or 0:.0f} in the "
                  f"decode window, {last['worker_cpu_ms']:.2f} + {last['engine_cpu_ms']:.2f} CPU ms/img "
                  f"(limit {runs['limit'][-1]['rate']:.0f} img/s, {runs['limit'][-1]['cpu_ms']:.2f} ms/img)",
                  file=sys.stderr, flush=True)

    def med(values):
        return statistics.median(values) if values else None

    table = []
    for name in names:
        rs = runs[name]
        ratios = [x["rate"] / lim["rate"] for x, lim in zip(rs, runs["limit"])]
        vs_fn = [x["rate"] / f["rate"] for x, f in zip(rs, runs.get("fnapi", []))] if "fnapi" in runs else []
        table.append({
            "engine": name, "images_per_s": med([x["rate"] for x in rs]), "x_limit": med(ratios),
            "window_x_limit": med([x["window_rate"] / lim["rate"] for x, lim in zip(rs, runs["limit"])
                                   if x["window_rate"]]),
            "worker_cpu_ms": med([x["worker_cpu_ms"] for x in rs]), "engine_cpu_ms": med([x["engine_cpu_ms"] for x in rs]),
            "cpu_efficiency": med([lim["cpu_ms"] / x["worker_cpu_ms"] for x, lim in zip(rs, runs["limit"])]),
            "x_limit_all": ratios, "x_fnapi": med(vs_fn), "startup_s": med(startup.get(name, [])),
            "t_small_s": med([x["t_small"] for x in rs]),
            "peak_worker_mb": med([x["peak_worker_mb"] for x in rs]),
            "peak_workers_mb": med([x["peak_workers_mb"] for x in rs]),
        })
    report = {"beam": E.beam_version(), "n": n, "n_small": small, "rounds": rounds,
              "limit_images_per_s": med([x["rate"] for x in runs["limit"]]),
              "limit_cpu_ms": med([x["cpu_ms"] for x in runs["limit"]]), "engines": table, "runs": runs,
              "load": os.getloadavg()}
    md = [f"Beam {report['beam']}, N = {n} / {small} ImageNet-like images, {rounds} round(s), "
          f"limit {report['limit_images_per_s']:.0f} images/s and {report['limit_cpu_ms']:.2f} CPU ms/image (medians)",
          "",
          "| engine | images/s (marginal) | x limit (rounds) | x FnApiRunner | decode window x limit "
          "| SDK worker CPU ms/img (x limit's efficiency) | engine JVM CPU ms/img | engine start-up s | job of N/4, s "
          "| peak PSS, one SDK worker + decoder, MB | all SDK workers, MB |",
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

    def fmt(v, spec=".2f"):
        return "-" if v is None else format(v, spec)

    for row in table:
        md.append(f"| {row['engine']} | {fmt(row['images_per_s'], '.0f')} | {fmt(row['x_limit'])} "
                  f"({', '.join(format(x, '.2f') for x in row['x_limit_all'])}) | {fmt(row['x_fnapi'])} | "
                  f"{fmt(row['window_x_limit'])} | {fmt(row['worker_cpu_ms'])} ({fmt(row['cpu_efficiency'])}) | "
                  f"{fmt(row['engine_cpu_ms'])} | {fmt(row['startup_s'], '.1f')} | {fmt(row['t_small_s'], '.1f')} | {fmt(row['peak_worker_mb'], '.0f')} | "
                  f"{fmt(row['peak_workers_mb'], '.0f')} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for suffix, text in (("md", "\n".join(md) + "\n"), ("json", json.dumps(report, indent=1))):
        for path in (RESULTS / f"engines-{stamp}.{suffix}", RESULTS / f"engines-latest.{suffix}"):
            path.write_text(text)
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "count":
        from bench import engines  # the pipeline's functions must pickle by reference to a module, not __main__

        sys.exit(engines._count_main(sys.argv[2:]))
    sys.exit(main())
