"""``python -m bench [CASE ...] [--quick]``: build the corpus, run the cases one after another, write the results.

Each measurement runs in a fresh ``python -m bench.worker`` subprocess (so peak RSS is per case). Every case runs
once at N/4 as a warm-up, then ``--reps`` rounds, each running every case at N/4 and at N in turn (so all cases
see the same mix of machine load); a case's images/s is the median over the rounds of
(N - N/4) / (T(N) - T(N/4)), and its ratio to the limit the median of the per-round ratios.
Results: ``bench/results/results-<time>.{md,json,png}`` and ``bench/results/latest.*``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import statistics
import time
from typing import Dict, List, Optional

from bench import cases as C
from bench import corpus as K
from bench.measure import cores, psutil, run_worker
from bench.report import chart, markdown

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "bench", "results")
TAR_KINDS = {"dali_webdataset", "tario", "reader", "pipeline"}
TARGETS = (
    # name, numerator case, denominator case, op, target
    ("Reader / Limit (reader-mp vs limit, ImageNet-like)", "reader-mp", "limit", ">=", 0.90),
    ("tar -> Parquet, default flags / Limit (ImageNet-like)", "tar-to-parquet", "limit", ">=", 0.80),
    ("tar -> Parquet, default flags: output bytes / input tar bytes", "tar-to-parquet", None, "<=", 1.1),
    ("Memory: peak RSS 5,000-image tar / 500-image tar", "memory-5000", "memory-500", "<=", 1.2),
)


def _load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def machine_info() -> Dict:
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = {"python": platform.python_version()}
    for mod in ("apache_beam", "nvidia.dali", "simplejpeg", "numpy", "PIL", "pyarrow"):
        try:
            spec = importlib.util.find_spec(mod)
        except (ImportError, ValueError):
            spec = None
        versions[mod] = _version(mod) if spec else None
    return {"git": _git(), "cores": cores(), "nproc": os.cpu_count(), "cpu_model": model, "mem_gb": mem_gb,
            "platform": platform.platform(), "versions": versions, "psutil": psutil is not None,
            "load_start": _load()}


def _git() -> Dict:
    """The checkout measured: commit, and whether the code under test had local changes (read-only git)."""
    import subprocess

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    changed = git("status", "--porcelain", "--", "beam_tarimg", "pipelines")
    return {"commit": git("rev-parse", "--short", "HEAD") or "unknown",
            "subject": git("log", "-1", "--format=%s"),
            "local_changes": [line[3:] for line in changed.splitlines()]}


def _version(mod: str) -> Optional[str]:
    from importlib import metadata

    dist = {"apache_beam": "apache-beam", "nvidia.dali": "nvidia-dali-cuda120", "PIL": "Pillow"}.get(mod, mod)
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def worker_env(case: C.Case) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(case.alloc_env)
    return env


def _available(case: C.Case) -> Optional[str]:
    if case.needs:
        try:
            found = importlib.util.find_spec(case.needs) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            return f"{case.needs} does not exist (yet)"
    if case.kind == "limit" and importlib.util.find_spec("simplejpeg") is None:
        return "simplejpeg is not installed (pip install simplejpeg)"
    return None


def _mean_pixels(folder: str) -> float:
    from beam_tarimg.jpeg import image_dimensions

    dims = [image_dimensions(b) for b in K.load_jpegs(folder)]
    dims = [d for d in dims if d]
    return sum(w * h for w, h in dims) / max(1, len(dims))


class CaseRun:
    """The runs of one case: its N, its views, its subprocess environment, and the results so far."""

    def __init__(self, case: C.Case, folders: Dict[str, str], scratch: str, variant: Optional[tuple] = None):
        self.case = case
        self.variant = variant  # (name, folder holding a beam_tarimg package) or None: this checkout's
        self.name = case.name if variant is None else f"{case.name}@{variant[0]}"
        self.cwd = REPO if variant is None else variant[1]
        self.base = folders[case.corpus]
        self.n = case.passes * K.images_per_tar(self.base) * len(K.tar_paths(self.base))
        self.sizes = [self.n // 4, self.n] if case.marginal else [self.n]
        self.scratch = scratch
        self.env = worker_env(case)
        if variant is not None:  # the variant's beam_tarimg first, for the worker and its SDK worker processes
            self.env["PYTHONPATH"] = variant[1] + os.pathsep + self.env["PYTHONPATH"]
        self.pairs: List[Dict[int, Dict]] = []
        self.loads: List[float] = []
        self.error: Optional[str] = None
        self.seconds = 0.0
        self.folders = {size: (K.view(self.base, size) if case.kind in TAR_KINDS else self.base) for size in self.sizes}

    def run(self, size: int, log, label: str) -> Dict:
        start = time.perf_counter()
        args = [self.case.name, "--input", self.folders[size], "--n", str(size), "--scratch", self.scratch]
        r = run_worker(args, self.env, self.cwd, timeout=600)
        self.seconds += time.perf_counter() - start
        r["load"] = os.getloadavg()[0]
        self.loads.append(r["load"])
        if r.get("images") is not None and r["images"] != size:
            raise RuntimeError(f"{self.case.name}: the worker counted {r['images']} images, expected {size}")
        log(f"  {label} {self.name} n={size}: {r['t_work']:.2f} s, cpu {r['cpu_work']:.2f} s, "
            f"peak {_peak_kb(r) / 1024:.0f} MB, load {r['load']:.2f}")
        return r

    def fail(self, e: Exception, log) -> None:
        self.error = str(e)
        log(f"{self.name}: FAILED: {self.error[-1500:]}")


def _peak_kb(r: Dict) -> int:
    return max(r.get("vmhwm_kb") or 0, r["parent"]["tree_peak_kb"] if r["parent"]["max_procs"] > 1 else 0)


def summarise(cr: CaseRun) -> Dict:
    case, n, sizes = cr.case, cr.n, cr.sizes
    ncores = cores()
    title = case.title if cr.variant is None else f"{case.title}; beam_tarimg from {cr.variant[1]}"
    row = {"name": cr.name, "group": case.group, "corpus": case.corpus, "title": title,
           "allocator": case.allocator, "n": n, "decodes": case.kind != "tario", "marginal": case.marginal,
           "variant": cr.variant[0] if cr.variant else None,
           "case_s": cr.seconds, "load_start": statistics.median(cr.loads) if cr.loads else 0.0,
           "loads": cr.loads, "runs_raw": cr.pairs}
    rates, mps, cpu, startup, peaks, cpu_ms = [], [], [], [], [], []
    for pair in cr.pairs:
        full = pair[n]
        peaks.append(_peak_kb(full) / 1024)
        if case.marginal:
            q = pair[sizes[0]]
            dt = full["t_work"] - q["t_work"]
            if dt <= 0:
                rates.append(None)
                continue
            rate = (n - sizes[0]) / dt
            rates.append(rate)
            if full.get("pixels") is not None and q.get("pixels") is not None:
                mps.append((full["pixels"] - q["pixels"]) / dt / 1e6)
            cpu.append((full["cpu_work"] - q["cpu_work"]) / dt / ncores)
            cpu_ms.append(1000 * (full["cpu_work"] - q["cpu_work"]) / (n - sizes[0]))
            startup.append(full["t_work"] - n / rate)
        else:
            rates.append(n / full["t_work"])
            if full.get("pixels") is not None:
                mps.append(full["pixels"] / full["t_work"] / 1e6)
            cpu.append(full["cpu_work"] / full["t_work"] / ncores)
            cpu_ms.append(1000 * full["cpu_work"] / n)
    valid = [r for r in rates if r is not None]
    med = lambda xs: statistics.median(xs) if xs else None  # noqa: E731
    row.update({
        "runs": len(valid),
        "images_per_s": med(valid),
        "images_per_s_by_round": rates,
        "mp_per_s": med(mps),
        "cpu_util": med(cpu),
        "cpu_ms_per_image": med(cpu_ms),
        "startup_s": med(startup) if case.marginal else None,
        "peak_rss_mb": med(peaks),
        "peak_rss_mb_all": peaks,
    })
    # From the smallest run: a view's later passes repeat the same JPEGs, which Parquet's dictionary encoding
    # would store once, so only a run over distinct images (N/4: at most one pass) gives an honest size.
    sizes_ratio = [pair[sizes[0]]["output_bytes"] / pair[sizes[0]]["input_bytes"] for pair in cr.pairs
                   if pair[sizes[0]].get("output_bytes") and pair[sizes[0]].get("input_bytes")]
    if sizes_ratio:
        row["output_x_input"] = med(sizes_ratio)
    if cr.pairs:
        first = cr.pairs[0][n]
        row["startup_parts"] = {k: first.get(k) for k in ("import_s", "build_s", "first_batch_s")}
    return row


def _paired_ratio(a: Dict, b: Dict) -> Optional[float]:
    """Median over the rounds of a's rate / b's rate in the same round (both measured under the same load)."""
    ra, rb = a.get("images_per_s_by_round") or [], b.get("images_per_s_by_round") or []
    ratios = [x / y for x, y in zip(ra, rb) if x and y]
    return statistics.median(ratios) if ratios else None


def _targets(rows: Dict[str, Dict]) -> List[Dict]:
    out = []
    for name, num, den, op, target in TARGETS:
        if den is None:  # a size ratio of one case: its output bytes / its input bytes
            a = rows.get(num) or {}
            value = a.get("output_x_input")
            met = None if value is None else value <= target
            detail = "" if value is None else (f"{num}: output {value:.3f} x the bytes of the tars it read "
                                               f"(median, runs of N/4 images, each image once).")
            out.append({"name": name, "value": value, "op": op, "target": target, "met": met,
                        "detail": detail or "The case was not run or was skipped."})
            continue
        a, b = rows.get(num), rows.get(den)
        key = "peak_rss_mb" if op == "<=" else "images_per_s"
        value = None
        if a and b and a.get(key) and b.get(key):
            value = a[key] / b[key] if key == "peak_rss_mb" else _paired_ratio(a, b)
        met = None if value is None else (value >= target if op == ">=" else value <= target)
        detail = ""
        if value is not None:
            unit = "MB" if key == "peak_rss_mb" else "images/s"
            detail = f"{num} {a[key]:,.0f} {unit} / {den} {b[key]:,.0f} {unit} (medians)"
            if key == "images_per_s":
                detail += "; the value is the median of the per-round ratios"
                if a.get("cpu_ms_per_image") and b.get("cpu_ms_per_image"):
                    detail += (f"; CPU per image {a['cpu_ms_per_image']:.3f} vs {b['cpu_ms_per_image']:.3f} ms "
                               f"(CPU-efficiency ratio {b['cpu_ms_per_image'] / a['cpu_ms_per_image']:.2f})")
            detail += "."
        elif a is None or b is None or a.get("skipped") or b.get("skipped"):
            detail = "A case it needs was not run or was skipped."
        out.append({"name": name, "value": value, "op": op, "target": target, "met": met, "detail": detail})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("cases", nargs="*", help=f"cases to run (default: all): {', '.join(C.BY_NAME)}")
    ap.add_argument("--quick", action="store_true",
                    help="smoke mode: small corpus, one repetition, no warm-up (~1-2 minutes)")
    ap.add_argument("--reps", type=int, default=None, help="repetitions per case (default 3; 1 with --quick)")
    ap.add_argument("--no-warmup", action="store_true", help="skip the warm-up run of each case")
    ap.add_argument("--corpus-root", default=None, help="where the corpus is cached (default bench/results/corpus)")
    ap.add_argument("--out", default=RESULTS, help="results folder (default bench/results)")
    ap.add_argument("--chart", default=None, help="also write the chart here (e.g. bench/chart.png)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=DIR",
                    help="also run every selected case that uses beam_tarimg with the beam_tarimg package found "
                         "in DIR (e.g. a patched copy), in the same rounds; its rows are named CASE@NAME")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    args = ap.parse_args(argv)

    if args.list:
        for c in C.CASES:
            print(f"{c.name:18} {c.corpus:9} {c.allocator:14} {c.title}")
        return 0
    variants = []
    for spec in args.variant:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not os.path.isfile(os.path.join(folder, "beam_tarimg", "__init__.py")):
            ap.error(f"--variant wants NAME=DIR with DIR/beam_tarimg/__init__.py, got {spec!r}")
        variants.append((name, os.path.abspath(folder)))
    selected = [C.get(name) for name in args.cases] if args.cases else [c for c in C.CASES if c.quick or not args.quick]
    reps = args.reps or (1 if args.quick else 3)
    warmup = not (args.no_warmup or args.quick)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    t_start = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.0f}s] {msg}", flush=True)

    machine = machine_info()
    log(f"{machine['cores']} cores ({machine['cpu_model']}), {machine['mem_gb']:.0f} GB, load {machine['load_start']}"
        f", psutil {'yes' if machine['psutil'] else 'no (using /proc)'}")
    specs = [K.QUICK_IMAGENET, K.QUICK_HD] if args.quick else [K.IMAGENET, K.HD]
    needed = {c.corpus for c in selected}
    specs = [s for s in specs if s.name in needed or (s.name == "imagenet" and needed & {"mem-500", "mem-5000"})]
    folders = K.ensure_corpus(args.corpus_root or K.default_root(), specs,
                              with_mem=bool(needed & {"mem-500", "mem-5000"}), log=log)
    corpus_s = time.perf_counter() - t_start
    mean_px = {name: _mean_pixels(folders[name]) for name in ("imagenet", "hd") if name in folders}
    scratch = os.path.join(args.out, "scratch")
    os.makedirs(scratch, exist_ok=True)

    rows: Dict[str, Dict] = {}
    runs: List[CaseRun] = []
    for case in selected:
        skip = _available(case)
        if skip:
            log(f"{case.name}: skipped: {skip}")
            rows[case.name] = {"name": case.name, "group": case.group, "corpus": case.corpus, "title": case.title,
                               "allocator": case.allocator, "skipped": skip}
            continue
        rows[case.name] = {}  # keeps the case order
        runs.append(CaseRun(case, folders, scratch))
        if case.kind in ("core", "reader", "pipeline"):
            for name, folder in variants:
                rows[f"{case.name}@{name}"] = {}
                runs.append(CaseRun(case, folders, scratch, (name, folder)))
    # Rounds: every case once per round, so that each case samples the machine's load over the whole run and
    # the ratios to the limit can be taken within a round.
    if warmup:
        log(f"warm-up: one run of N/4 per case ({len(runs)} cases)")
        for cr in runs:
            try:
                cr.run(cr.sizes[0], log, "warm-up")
            except Exception as e:  # one failing case must not lose the others
                cr.fail(e, log)
    try:
        for rep in range(reps):
            log(f"round {rep + 1}/{reps}")
            for cr in runs:
                if cr.error:
                    continue
                try:
                    cr.pairs.append({size: cr.run(size, log, f"[{rep + 1}/{reps}]") for size in cr.sizes})
                except Exception as e:
                    cr.fail(e, log)
    except KeyboardInterrupt:
        log("interrupted: writing the rounds measured so far")
    for cr in runs:
        case = cr.case
        if cr.error:
            text = cr.error
            rows[cr.name] = {"name": cr.name, "group": case.group, "corpus": case.corpus, "title": case.title,
                               "allocator": case.allocator, "error": text[-4000:],
                               "error_short": text.strip().splitlines()[-1][:120] if text.strip() else "?"}
            continue
        row = summarise(cr)
        if row["mp_per_s"] is None and row["images_per_s"] and case.kind == "pipeline" and case.corpus in mean_px:
            row["mp_per_s"] = row["images_per_s"] * mean_px[case.corpus] / 1e6
            row["mp_estimated"] = True
        rows[cr.name] = row
        log(f"{cr.name}: {row['images_per_s'] or 0:,.0f} images/s, {row['mp_per_s'] or 0:,.1f} MP/s, "
            f"CPU {row['cpu_util'] or 0:.2f}, {row['cpu_ms_per_image'] or 0:.3f} CPU ms/img, "
            f"peak {row['peak_rss_mb'] or 0:,.0f} MB ({row['case_s']:.0f} s)")

    # ratios to the limit of the same corpus set
    for row in rows.values():
        limit_name = {"imagenet": "limit", "hd": "limit-hd"}.get(row["corpus"])
        lim = rows.get(limit_name or "")
        if row.get("images_per_s") and lim and lim.get("images_per_s") and row.get("marginal") and row.get("decodes"):
            row["x_limit"] = _paired_ratio(row, lim)
            if row.get("cpu_ms_per_image") and lim.get("cpu_ms_per_image"):
                row["cpu_x_limit"] = lim["cpu_ms_per_image"] / row["cpu_ms_per_image"]
    shutil.rmtree(scratch, ignore_errors=True)
    machine["load_end"] = _load()
    total = time.perf_counter() - t_start
    run = {"started": started, "mode": "quick" if args.quick else ("full" if not args.cases else "selected cases"),
           "total_s": total, "corpus_s": corpus_s, "reps": reps, "warmup": warmup, "machine": machine,
           "corpus": folders, "mean_pixels": mean_px, "cases": list(rows.values()), "targets": _targets(rows),
           "allocators": C.ALLOCATOR_NOTE}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    paths = {ext: os.path.join(args.out, f"results-{stamp}.{ext}") for ext in ("json", "md", "png")}
    with open(paths["json"], "w") as f:
        json.dump(run, f, indent=1, default=str)
    with open(paths["md"], "w") as f:
        f.write(markdown(run))
    chart(run, paths["png"])
    for ext, path in paths.items():
        shutil.copyfile(path, os.path.join(args.out, f"latest.{ext}"))
    if args.chart:
        chart(run, args.chart)
    print()
    print(markdown(run))
    log(f"done in {total:.0f} s; results: {paths['md']}, {paths['json']}, chart {paths['png']}")
    return 0
