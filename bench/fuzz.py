"""``python -m bench.fuzz`` (``make fuzz``): seeded, structure-aware fuzzing of the decode core and the public job.

What it runs (everything deterministic for a ``--seed``):

1. JPEG mutants (``bench.mutate``: header segments, SOF/SOS fields, markers, restart markers, entropy data,
   progressive scans, stacked mutations) mixed with good images (about one good image per three mutants).
2. The decode core: ``ImageDecoder(max_batch_size=B, device="cpu").decode()`` on consecutive batches of B
   inputs, in child processes (a few batches each), so that a native crash of the process calling the decoder
   is observed, not fatal: the batch in flight is recorded as a crash and a new child goes on with the next
   batch. Checked per batch: one outcome per input; each outcome has pixels (uint8 HxWx3) or an error, not both;
   every good image decodes, pixel-equal to Pillow's ``ImageOps.exif_transpose(...).convert("RGB")``.
3. The public job: the same JPEG inputs packed into tars (``--members-per-tar`` members each), and the tar
   mutants (one mutation per tar: a damaged header ends its tar), run through ``python -m pipelines.tar_to_parquet
   ... --runner FnApiRunner`` in a subprocess of its own process group, with a timeout (a hung job is killed and
   reported). Then every JPEG member put in a tar is accounted for: it must come out exactly once, as a Parquet
   row (``image_path`` = ``<tar file name>/<member>``) or a failure record naming that tar and member. The only
   exception: a member whose first header block sits at or after its tar's damage point (``TarMutant.damage``:
   the mutated header, the member holding a cut, the end of the first archive) may instead be covered by that
   tar's one tar-level ``read`` failure (member None). Good JPEGs that reach the reader intact must come out as
   rows, pixel-equal to Pillow's decode.
4. Hostile inputs (``bench.fuzz_inputs``; ``--skip-inputs`` leaves them out): one more job over folder entries
   that are no tar (a FIFO, a directory, a link to /dev/zero, ...), names with glob characters, multi-member and
   bomb-compressed tars, accounted the same way; each entry that is no tar must be one ``open`` failure.

``--resize`` runs 2 and 3 with resize on decode (``Resize(64, crop=48)``; the job with ``--resize 64 --crop 48``):
the same rules, the pixels compared with that Resize's Pillow path (``Resize.apply_pillow`` after Pillow's
decode and ``exif_transpose``): exactly where Pillow decoded, within 2 levels where DALI did (their filters round
differently). ``make fuzz`` runs it after the plain run.

The report (stdout; ``--json PATH`` for a machine-readable one) gives the mutants run per kind, the job runs,
their exit codes, hangs, members lost or duplicated (per mutation kind), decoder crashes contained (the job's
``decoder crashes`` summary line when it prints one, else the failure records that say the decoder crashed),
failures by stage and peak memory. Exit status 1 on any job exit other than 0, any hang, any member lost,
duplicated or unexplained, or any decode-core invariant broken (a crash of the process calling the decoder
included).
"""

from __future__ import annotations

import argparse
import collections
import glob
import io
import json
import os
import pickle
import posixpath
import random
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from bench import fuzz_inputs, fuzz_pixels
from bench import mutate as M
from bench.measure import _TreeSampler, descendants, vm_hwm_kb

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOOD = "good"


class Item(NamedTuple):
    """One JPEG input: ``kind`` is a mutation kind or ``"good"``; ``name`` its member name in the job's tars."""

    index: int
    kind: str
    data: bytes

    @property
    def name(self) -> str:
        return f"{self.index:05d}.{self.kind}.jpg"


class Plan(NamedTuple):
    items: List[Item]
    tar_mutants: List[M.TarMutant]


def make_plan(seed: int, jpeg_mutants: int, tar_mutants: int, good_every: int = 3) -> Plan:
    """The inputs of a run: ``jpeg_mutants`` mutants with a good image after every ``good_every`` of them (in
    shuffled order), and ``tar_mutants`` mutated tars. Same seed, same bytes."""
    rng = random.Random(f"{seed}/jpeg")  # two streams: a slice of one kind does not change the other
    bases = [b.data for b in M.base_jpegs(seed)]
    kinds_data = [M.mutate_jpeg(rng, bases) for _ in range(jpeg_mutants)]
    goods = [(GOOD, rng.choice(bases)) for _ in range(jpeg_mutants // good_every if good_every else 0)]
    mixed = kinds_data + goods
    rng.shuffle(mixed)
    items = [Item(i, kind, data) for i, (kind, data) in enumerate(mixed)]
    # Tar mutants hold small good JPEGs (the tar is what is mutated).
    small = [b for b in bases if len(b) < 6000] or bases
    rng = random.Random(f"{seed}/tar")
    tars = [M.mutate_tar(rng, small) for _ in range(tar_mutants)]
    return Plan(items, tars)


# ------------------------------------------------------------------------------------------- processes


class ProcResult(NamedTuple):
    returncode: int  # negative: killed by that signal
    hung: bool
    seconds: float
    maxrss_mb: float  # sampled: the largest peak RSS (VmHWM) of any one process of the tree
    tree_peak_mb: float  # sampled: the peak of the summed PSS of the live process tree


class _Sampler(_TreeSampler):
    """bench.measure's tree sampler, plus each process's own peak RSS (VmHWM).

    Not wait4's ru_maxrss: a child forked from this (large) harness process starts with the harness's
    high-water mark, so that figure says more about the harness than about the job.
    """

    def __init__(self, pid: int, interval: float):
        super().__init__(pid, interval)
        self.hwm_kb: Dict[int, int] = {}

    def sample(self):
        super().sample()
        for p in descendants(self.pid):
            kb = vm_hwm_kb(str(p))
            if kb is not None:
                self.hwm_kb[p] = max(kb, self.hwm_kb.get(p, 0))


def signal_name(returncode: int) -> Optional[str]:
    if returncode >= 0:
        return None
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def run_process(cmd: Sequence[str], timeout: float, stdout_path: str, stderr_path: str,
                cwd: str = REPO, env: Optional[Dict[str, str]] = None) -> ProcResult:
    """Runs ``cmd`` in a new process group; after ``timeout`` seconds kills the whole group (hang). Never hangs
    itself: waits with WNOHANG polls, and a killed group is reaped with a bounded wait."""
    start = time.perf_counter()
    with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
        proc = subprocess.Popen(list(cmd), cwd=cwd, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    sampler = _Sampler(proc.pid, 0.2)
    sampler.start()
    hung = False
    status = None
    try:
        while True:
            pid, status = os.waitpid(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - start > timeout:
                hung = True
                _kill_group(proc.pid)
                pid, status = os.waitpid(proc.pid, 0)
                break
            time.sleep(0.05)
    finally:
        sampler.stop()
        if status is None:  # interrupted: leave nothing running
            _kill_group(proc.pid)
    _kill_group(proc.pid)  # grandchildren left behind by a crashed job (a decoder process, Beam workers)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return ProcResult(proc.returncode, hung, time.perf_counter() - start,
                      max(sampler.hwm_kb.values(), default=0) / 1024, sampler.peak_kb / 1024)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for p in descendants(pid)[1:]:  # anything that left the group
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass


# ------------------------------------------------------------------------------------------ decode core


def pillow_rgb(data: bytes) -> np.ndarray:
    """The reference decode (as tests/conftest.pillow_rgb): Pillow, EXIF orientation applied, RGB."""
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


def core_child(in_path: str, out_path: str, batch_size: int, num_threads: int, unchecked: bool = False,
               resize: bool = False) -> None:
    """Decodes the batches pickled at ``in_path``; appends one JSON line per finished batch to ``out_path``
    (flushed, so that the parent knows which batch was in flight when this process died). ``unchecked``: give
    DALI every input first, bypassing ``jpeg.dali_rejects``, so that DALI's crashes reach the containment.
    ``resize``: decode with ``fuzz_pixels.fuzz_resize()``; the references are then its Pillow path, which the
    fallback must give exactly and DALI within ``fuzz_pixels.RESIZE_TOLERANCE``."""
    from beam_tarimg.decode import ImageDecoder

    with open(in_path, "rb") as f:
        batches: List[List[Tuple[str, bytes]]] = pickle.load(f)
    reference, tolerance = (fuzz_pixels.resized_reference, fuzz_pixels.RESIZE_TOLERANCE) if resize else (
        pillow_rgb, 0)
    decoder = ImageDecoder(max_batch_size=batch_size, num_threads=num_threads, device="cpu",
                           resize=fuzz_pixels.fuzz_resize() if resize else None)
    decoder._check_before_dali = not unchecked
    with open(out_path, "a") as out:
        for b, batch in enumerate(batches):
            start = time.perf_counter()
            crashes = getattr(decoder, "crashes", 0)  # decoder processes that died, once containment is there
            outcomes = decoder.decode([data for _, data in batch])
            seconds = time.perf_counter() - start
            crashes = getattr(decoder, "crashes", 0) - crashes
            violations = []
            if len(outcomes) != len(batch):
                violations.append(f"{len(outcomes)} outcomes for {len(batch)} inputs")
            decoded: Dict[str, int] = collections.Counter()
            failed: Dict[str, int] = collections.Counter()
            for (kind, data), outcome in zip(batch, outcomes):
                pixels, who, error = outcome
                if (pixels is None) == (error is None):
                    violations.append(f"{kind}: outcome with pixels={pixels is not None} and error={error!r}")
                    continue
                if pixels is not None:
                    if not (isinstance(pixels, np.ndarray) and pixels.dtype == np.uint8 and pixels.ndim == 3
                            and pixels.shape[2] == 3):
                        violations.append(f"{kind}: pixels are not uint8 HxWx3: {getattr(pixels, 'shape', None)}")
                    decoded[f"{kind}/{who}"] += 1
                else:
                    failed[kind] += 1
                if kind == GOOD:
                    if pixels is None:
                        violations.append(f"good image failed: {error}")
                    elif not fuzz_pixels.matches(pixels, reference(data), 0 if who == "pillow" else tolerance):
                        violations.append(f"good image decoded by {who} differs from Pillow's decode")
                violations += fuzz_pixels.check(kind, data, outcome, reference, tolerance)
            out.write(json.dumps({"batch": b, "seconds": round(seconds, 3), "violations": violations,
                                  "decoded": decoded, "failed": failed, "crashes": crashes}) + "\n")
            out.flush()
            del outcomes


def run_core(items: Sequence[Item], work: str, batch_size: int, batches_per_process: int, timeout: float,
             num_threads: int, log, unchecked: bool = False, resize: bool = False) -> Dict:
    """Runs every batch of ``items`` through the decode core, ``batches_per_process`` batches per child; a
    child that dies (or hangs past ``timeout``) costs its batch in flight, recorded, and a new child goes on."""
    batches = [[(it.kind, it.data) for it in items[i : i + batch_size]] for i in range(0, len(items), batch_size)]
    report = {"inputs": len(items), "batches": len(batches), "processes": 0, "crashes": [], "hangs": [],
              "violations": [], "decoded": collections.Counter(), "failed": collections.Counter(),
              "decoder_crashes_contained": 0, "slowest_batch_s": 0.0, "peak_rss_mb": 0.0, "tree_peak_mb": 0.0}
    start = time.perf_counter()
    next_batch = 0
    while next_batch < len(batches):
        chunk = list(range(next_batch, min(len(batches), next_batch + batches_per_process)))
        n = report["processes"]
        in_path = os.path.join(work, f"core-{n:04d}.pkl")
        out_path = os.path.join(work, f"core-{n:04d}.jsonl")
        with open(in_path, "wb") as f:
            pickle.dump([batches[b] for b in chunk], f)
        cmd = [sys.executable, "-m", "bench.fuzz", "--_core-child", in_path, out_path,
               "--batch-size", str(batch_size), "--num-threads", str(num_threads)]
        if unchecked:
            cmd.append("--_unchecked")
        if resize:
            cmd.append("--resize")
        res = run_process(cmd, timeout, out_path + ".stdout", out_path + ".stderr")
        report["processes"] += 1
        report["peak_rss_mb"] = max(report["peak_rss_mb"], res.maxrss_mb)
        report["tree_peak_mb"] = max(report["tree_peak_mb"], res.tree_peak_mb)
        done = []
        if os.path.exists(out_path):
            with open(out_path) as f:
                done = [json.loads(line) for line in f if line.endswith("\n")]
        for line in done:
            b = chunk[line["batch"]]
            report["decoded"].update(line["decoded"])
            report["failed"].update(line["failed"])
            report["violations"].extend(f"batch {b}: {v}" for v in line["violations"])
            report["slowest_batch_s"] = max(report["slowest_batch_s"], line["seconds"])
            report["decoder_crashes_contained"] += line["crashes"]
        next_batch = chunk[0] + len(done)
        if len(done) == len(chunk) and (res.returncode != 0 or res.hung):
            report["violations"].append(f"core process exited {res.returncode} after its last batch, {chunk[-1]}")
        elif len(done) < len(chunk):  # the batch in flight killed its process, or hung
            kinds = dict(collections.Counter(kind for kind, _ in batches[next_batch]))
            entry = {"batch": next_batch, "exit_code": res.returncode, "signal": signal_name(res.returncode),
                     "kinds": kinds, "stderr_tail": _tail(out_path + ".stderr", 400)}
            if res.hung:
                report["hangs"].append(entry)
                log(f"  core: batch {next_batch} HUNG (killed after {timeout:.0f} s)")
            else:
                report["crashes"].append(entry)
                log(f"  core: batch {next_batch} killed its process (exit {res.returncode}"
                    f"{', ' + entry['signal'] if entry['signal'] else ''})")
            next_batch += 1
        os.remove(in_path)
    report["seconds"] = round(time.perf_counter() - start, 1)
    report["decoded"] = dict(report["decoded"])
    report["failed"] = dict(report["failed"])
    crashed_kinds = collections.Counter()
    for c in report["crashes"] + report["hangs"]:
        crashed_kinds.update({k: 1 for k in c["kinds"] if k != GOOD})
    report["batches_killed_with_kind"] = dict(crashed_kinds)
    return report


def _tail(path: str, n: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - n))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


# ------------------------------------------------------------------------------------------------ jobs


class TarPlan(NamedTuple):
    file_name: str
    kind: str  # a tar mutation kind, or "jpeg" for a tar of JPEG mutants and good images
    members: Tuple[M.ExpectedMember, ...]
    damage: Optional[int]
    member_kinds: Dict[str, str]  # member name -> JPEG mutation kind (JPEG tars)


def write_jpeg_tars(items: Sequence[Item], folder: str, per_tar: int, first: int) -> List[TarPlan]:
    plans = []
    for t, i in enumerate(range(0, len(items), per_tar)):
        chunk = items[i : i + per_tar]
        name = f"j{first + t:04d}.tar"
        data = M.build_tar([(it.name, it.data) for it in chunk], fmt=tarfile.PAX_FORMAT)
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)
        exact = (GOOD,) + tuple(fuzz_pixels.PIXEL_KINDS)  # rows compared with Pillow's decode
        members = tuple(M.ExpectedMember((m.name,), m.offset, True, False, it.data if it.kind in exact else None)
                        for it, m in zip(chunk, M.lay_out(data, {})))
        plans.append(TarPlan(name, "jpeg", members, None, {it.name: it.kind for it in chunk}))
    return plans


def write_mutant_tars(mutants: Sequence[Tuple[int, M.TarMutant]], folder: str) -> List[TarPlan]:
    plans = []
    for n, mutant in mutants:
        name = f"t{n:04d}-{mutant.kind}.tar"
        with open(os.path.join(folder, name), "wb") as f:
            f.write(mutant.data)
        plans.append(TarPlan(name, mutant.kind, mutant.members, mutant.damage, {}))
    return plans


_SUMMARY_LINE = re.compile(r"^  ([a-z][a-z ]*[a-z])\s{2,}(\d+)")


def parse_summary(stdout: str) -> Dict[str, int]:
    """The job's printed summary (``  failures         3 (...)``) as {label: first number}."""
    out = {}
    for line in stdout.splitlines():
        m = _SUMMARY_LINE.match(line)
        if m:
            out[m.group(1)] = int(m.group(2))
    return out


def read_outputs(out_dir: str, want_pixels: Dict[Tuple[str, str], bytes], reference=None, tolerance: int = 0):
    """(rows, failures, problems): rows as (tar, member, pixels-ok-or-None) from the Parquet files, failure
    records as dicts. Pixels are compared only for the (tar, member) pairs in ``want_pixels``: with
    ``reference`` (default ``pillow_rgb``), no value more than ``tolerance`` apart (a row does not say which
    decoder made it)."""
    reference = reference or pillow_rgb
    import pyarrow.parquet as pq

    rows, problems = [], []
    for path in sorted(glob.glob(os.path.join(out_dir, "images-*.parquet"))):
        try:
            pf = pq.ParquetFile(path)
            for batch in pf.iter_batches(batch_size=32, columns=["image_path", "height", "width", "channels",
                                                                  "image_format", "image_data"]):
                for r in batch.to_pylist():
                    tar, _, member = r["image_path"].partition("/")
                    ok = None
                    want = want_pixels.get((tar, member))
                    if want is not None:
                        try:
                            ref = reference(want)
                        except Exception:  # a mutant Pillow cannot decode: nothing to compare with
                            rows.append((tar, member, None))
                            continue
                        shape = (r["height"], r["width"], r["channels"])
                        ok = (r["image_format"] == "raw" and shape == ref.shape and fuzz_pixels.matches(
                            np.frombuffer(r["image_data"], np.uint8).reshape(shape), ref, tolerance))
                    rows.append((tar, member, ok))
        except Exception as e:  # a truncated file from a killed job
            problems.append(f"{os.path.basename(path)} unreadable: {type(e).__name__}: {e}")
    failures = []
    path = os.path.join(out_dir, "failures.jsonl")
    if os.path.exists(path):
        with open(path, "rb") as f:
            for line in f:
                try:
                    failures.append(json.loads(line))
                except ValueError:
                    problems.append(f"failures.jsonl: unparseable line {line[:80]!r}")
    return rows, failures, problems


def account(plans: Sequence[TarPlan], rows, failures) -> Dict:
    """Every expected JPEG member exactly once (see the module docstring). Returns counts and examples."""
    by_tar_rows = collections.defaultdict(list)
    for tar, member, ok in rows:
        by_tar_rows[tar].append((member, "row", ok))
    tar_failures = collections.defaultdict(list)
    member_failures = collections.defaultdict(list)
    for rec in failures:
        tar = posixpath.basename(str(rec.get("tar", "")).rstrip("/"))
        if rec.get("member") is None:
            tar_failures[tar].append(rec)
        else:
            member_failures[tar].append((rec["member"], "failure", rec))
    res = {"expected": 0, "rows": 0, "failure_records": 0, "covered_by_tar_failure": 0, "lost": 0,
           "duplicated": 0, "unexplained": 0, "pixel_mismatches": 0, "good_failed": 0,
           "tar_failures_duplicated": 0, "tar_failures_unexpected": 0,
           "lost_by_kind": collections.Counter(), "duplicated_by_kind": collections.Counter(),
           "examples": []}
    known = {p.file_name for p in plans}
    for tar in set(by_tar_rows) | set(member_failures) | set(tar_failures):
        if tar not in known:
            res["unexplained"] += len(by_tar_rows[tar]) + len(member_failures[tar]) + len(tar_failures[tar])
            res["examples"].append(f"output for a tar the harness never wrote: {tar!r}")
    for plan in plans:
        outputs = by_tar_rows[plan.file_name] + member_failures[plan.file_name]
        tar_fails = tar_failures[plan.file_name]
        read_fails = [r for r in tar_fails if r.get("stage") == "read"]
        if len(tar_fails) > 1:
            res["tar_failures_duplicated"] += 1
            res["examples"].append(f"{plan.file_name}: {len(tar_fails)} tar-level failures")
        if tar_fails and plan.damage is None:
            res["tar_failures_unexpected"] += 1
        coverable = bool(read_fails) and plan.damage is not None
        groups: Dict[str, List[M.ExpectedMember]] = collections.defaultdict(list)
        spelling: Dict[str, str] = {}
        for m in plan.members:
            groups[m.names[0]].append(m)
            for n in m.names:
                spelling.setdefault(n, m.names[0])
        seen: Dict[str, List] = collections.defaultdict(list)
        leftovers = []
        for out in outputs:
            canon = spelling.get(out[0])
            (seen[canon] if canon is not None else leftovers).append(out)
        # Outputs under names the harness cannot predict stand for fuzzy members that did not come out.
        for m in plan.members:
            if leftovers and m.fuzzy and not seen[m.names[0]]:
                seen[m.names[0]].append(leftovers.pop(0))
        if leftovers:
            res["unexplained"] += len(leftovers)
            res["examples"].append(f"{plan.file_name}: unexplained outputs {[o[0] for o in leftovers][:3]!r}")
        for canon, ms in groups.items():
            got = seen[canon]
            kind = plan.member_kinds.get(canon, plan.kind)
            required = [m for m in ms if m.required]
            coverable_here = [m for m in required if coverable and m.offset >= plan.damage]
            need = len(required) - len(coverable_here)
            res["expected"] += len(required)
            res["covered_by_tar_failure"] += min(len(coverable_here), max(0, len(required) - len(got)))
            if len(got) < need:
                res["lost"] += need - len(got)
                res["lost_by_kind"][kind] += need - len(got)
                if len(res["examples"]) < 30:
                    res["examples"].append(f"lost: {plan.file_name}/{canon} ({kind})")
            if len(got) > len(ms):
                res["duplicated"] += len(got) - len(ms)
                res["duplicated_by_kind"][kind] += len(got) - len(ms)
                if len(res["examples"]) < 30:
                    res["examples"].append(f"duplicated x{len(got)}: {plan.file_name}/{canon} ({kind})")
            good = next((m.good for m in ms if m.good is not None), None)
            for member, what, extra in got:
                res["rows" if what == "row" else "failure_records"] += 1
                if good is None:
                    continue
                if what == "row" and extra is False:
                    res["pixel_mismatches"] += 1
                    res["examples"].append(f"pixels differ from Pillow's: {plan.file_name}/{canon}")
                elif what == "failure" and kind == GOOD:
                    res["good_failed"] += 1
                    res["examples"].append(f"good image failed: {plan.file_name}/{canon}: {extra.get('error')}")
    res["lost_by_kind"] = dict(res["lost_by_kind"])
    res["duplicated_by_kind"] = dict(res["duplicated_by_kind"])
    return res


def run_job(name: str, plans: Sequence[TarPlan], in_dir: str, out_dir: str, args, log) -> Dict:
    os.makedirs(out_dir, exist_ok=True)
    cmd = [sys.executable, "-m", "pipelines.tar_to_parquet", "--input", in_dir,
           "--output", os.path.join(out_dir, "images"), "--failures", os.path.join(out_dir, "failures.jsonl"),
           "--batch_size", str(args.batch_size), "--num_threads", str(args.num_threads), "--device", "cpu",
           "--preview_rows", "0", "--runner", args.runner,
           "--image_format", "raw"]  # the decoded pixels, which read_outputs compares with Pillow's
    if args.resize:
        cmd += fuzz_pixels.RESIZE_FLAGS
    res = run_process(cmd, args.job_timeout, os.path.join(out_dir, "stdout.txt"), os.path.join(out_dir, "stderr.txt"))
    with open(os.path.join(out_dir, "stdout.txt"), errors="replace") as f:
        stdout = f.read()
    want = {(p.file_name, m.names[0]): m.good for p in plans for m in p.members if m.good is not None}
    rows, failures, problems = read_outputs(out_dir, want, *((fuzz_pixels.resized_reference,
                                                             fuzz_pixels.RESIZE_TOLERANCE) if args.resize else ()))
    acc = account(plans, rows, failures)
    summary = parse_summary(stdout)
    crash_records = sum(1 for r in failures if r.get("stage") == "decode" and "crash" in str(r.get("error", "")))
    printed = next((v for k, v in summary.items() if "crash" in k), None)
    job = {
        "name": name, "tars": len(plans), "members": sum(len(p.members) for p in plans),
        "exit_code": res.returncode, "signal": signal_name(res.returncode), "hung": res.hung,
        "seconds": round(res.seconds, 1), "peak_rss_mb": round(res.maxrss_mb, 1),
        "tree_peak_mb": round(res.tree_peak_mb, 1), "summary": summary,
        "decoder_crashes": printed if printed is not None else crash_records,
        "decoder_crashes_source": "summary" if printed is not None else "failure records",
        "failures_by_stage": dict(collections.Counter(str(r.get("stage")) for r in failures)),
        "output_problems": problems, "accounting": acc,
        "stderr_tail": _tail(os.path.join(out_dir, "stderr.txt"), 600) if res.returncode or res.hung else "",
    }
    state = "HUNG, killed" if res.hung else f"exit {res.returncode}" + (f" ({job['signal']})" if job["signal"] else "")
    log(f"  job {name}: {len(plans)} tars, {job['members']} JPEG members: {state} in {job['seconds']} s, "
        f"rows {acc['rows']}, failure records {acc['failure_records']}, lost {acc['lost']}, "
        f"duplicated {acc['duplicated']}, peak RSS {job['peak_rss_mb']:.0f} MB")
    return job


# ---------------------------------------------------------------------------------------------- driver


def run(args, log=lambda s: print(s, file=sys.stderr, flush=True)) -> Dict:
    t0 = time.perf_counter()
    plan = make_plan(args.seed, args.jpeg_mutants, args.tar_mutants)
    jpeg_kinds = collections.Counter(it.kind for it in plan.items if it.kind != GOOD)
    tar_kinds = collections.Counter(t.kind for t in plan.tar_mutants)
    log(f"fuzz: seed {args.seed}: {sum(jpeg_kinds.values())} JPEG mutants ({len(jpeg_kinds)} kinds) + "
        f"{len(plan.items) - sum(jpeg_kinds.values())} good images, {len(plan.tar_mutants)} tar mutants "
        f"({len(tar_kinds)} kinds); made in {time.perf_counter() - t0:.1f} s")
    work = args.work or tempfile.mkdtemp(prefix="beam-tarimg-fuzz-")
    os.makedirs(work, exist_ok=True)
    report: Dict = {
        "seed": args.seed, "batch_size": args.batch_size, "work": work,
        "resize": repr(fuzz_pixels.fuzz_resize()) if args.resize else None,
        "jpeg_mutants": sum(jpeg_kinds.values()), "jpeg_mutants_by_kind": dict(sorted(jpeg_kinds.items())),
        "good_images": len(plan.items) - sum(jpeg_kinds.values()),
        "tar_mutants": len(plan.tar_mutants), "tar_mutants_by_kind": dict(sorted(tar_kinds.items())),
        "core": None, "jobs": [],
    }
    if not args.skip_core:
        log(f"core: {len(plan.items)} inputs in batches of {args.batch_size}, "
            f"{args.batches_per_process} batches per process")
        core_dir = os.path.join(work, "core")
        os.makedirs(core_dir, exist_ok=True)
        report["core"] = run_core(plan.items, core_dir, args.batch_size, args.batches_per_process,
                                  args.core_timeout, args.num_threads, log, resize=args.resize)
        c = report["core"]
        log(f"  core: {c['batches']} batches in {c['processes']} processes, {len(c['crashes'])} crashed, "
            f"{len(c['hangs'])} hung, {len(c['violations'])} invariant violations, {c['seconds']} s")
    if args.unchecked_batches:
        # The structure check keeps every known crasher from DALI, so the pass above rarely crashes it: this
        # one gives DALI the first batches unfiltered, so that its crashes really reach the containment.
        items = plan.items[: args.unchecked_batches * args.batch_size]
        log(f"core, structure check bypassed: {len(items)} inputs in batches of {args.batch_size}")
        core_dir = os.path.join(work, "core-unchecked")
        os.makedirs(core_dir, exist_ok=True)
        report["core_unchecked"] = run_core(items, core_dir, args.batch_size, args.batches_per_process,
                                            args.core_timeout, args.num_threads, log, unchecked=True,
                                            resize=args.resize)
        c = report["core_unchecked"]
        log(f"  core, unchecked: {c['batches']} batches, {c['decoder_crashes_contained']} decoder crashes "
            f"contained, {len(c['crashes'])} killed the calling process, {len(c['violations'])} invariant "
            f"violations, {c['seconds']} s")
    if not args.skip_job:
        jobs = []
        per_job = max(1, args.jpeg_tars_per_job)
        jtars_dirs = []
        n_tars = (len(plan.items) + args.members_per_tar - 1) // args.members_per_tar
        for j, first in enumerate(range(0, n_tars, per_job)):
            chunk = plan.items[first * args.members_per_tar : (first + per_job) * args.members_per_tar]
            in_dir = os.path.join(work, f"job-jpeg-{j}", "in")
            os.makedirs(in_dir, exist_ok=True)
            jobs.append((f"jpeg-{j}", write_jpeg_tars(chunk, in_dir, args.members_per_tar, first), in_dir))
            jtars_dirs.append(in_dir)
        numbered = list(enumerate(plan.tar_mutants))
        for j, first in enumerate(range(0, len(numbered), args.tar_mutants_per_job)):
            in_dir = os.path.join(work, f"job-tar-{j}", "in")
            os.makedirs(in_dir, exist_ok=True)
            jobs.append((f"tar-{j}", write_mutant_tars(numbered[first : first + args.tar_mutants_per_job], in_dir),
                         in_dir))
        log(f"jobs: {len(jobs)} runs of python -m pipelines.tar_to_parquet --runner {args.runner} "
            f"(timeout {args.job_timeout:.0f} s each)")
        for name, plans, in_dir in jobs:
            report["jobs"].append(run_job(name, plans, in_dir, os.path.join(os.path.dirname(in_dir), "out"), args, log))
            if not args.keep:
                shutil.rmtree(os.path.join(os.path.dirname(in_dir), "out"), ignore_errors=True)
        if not args.skip_inputs:  # hostile folder entries and compressed tars (bench.fuzz_inputs)
            report["jobs"].append(fuzz_inputs.run_inputs_job(work, args, log))
    report["seconds"] = round(time.perf_counter() - t0, 1)
    _verdict(report)
    if not args.keep and not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return report


def _verdict(report: Dict) -> None:
    problems = []
    jobs = report["jobs"]
    stages = collections.Counter()
    lost_by_kind = collections.Counter()
    for job in jobs:
        acc = job["accounting"]
        stages.update(job["failures_by_stage"])
        lost_by_kind.update(acc["lost_by_kind"])
        if job["hung"]:
            problems.append(f"job {job['name']} hung (killed after its timeout)")
        elif job["exit_code"] != 0:
            problems.append(f"job {job['name']} exited {job['exit_code']}"
                            + (f" ({job['signal']})" if job["signal"] else ""))
        for key in ("lost", "duplicated", "unexplained", "pixel_mismatches", "good_failed", "tar_failures_duplicated"):
            if acc[key]:
                problems.append(f"job {job['name']}: {acc[key]} {key.replace('_', ' ')}")
    core = report["core"]
    for label, c in (("decode core", core), ("decode core, check bypassed", report.get("core_unchecked"))):
        if c is None:
            continue
        if c["crashes"]:
            problems.append(f"{label}: {len(c['crashes'])} batches killed the calling process")
        if c["hangs"]:
            problems.append(f"{label}: {len(c['hangs'])} batches hung")
        if c["violations"]:
            problems.append(f"{label}: {len(c['violations'])} invariant violations")
    report.update({
        "job_runs": len(jobs),
        "job_exit_codes": [j["exit_code"] for j in jobs],
        "hangs": sum(j["hung"] for j in jobs) + (len(core["hangs"]) if core else 0),
        "members_lost": sum(j["accounting"]["lost"] for j in jobs),
        "members_duplicated": sum(j["accounting"]["duplicated"] for j in jobs),
        "outputs_unexplained": sum(j["accounting"]["unexplained"] for j in jobs),
        "lost_by_kind": dict(sorted(lost_by_kind.items())),
        "decoder_crashes_contained": sum(j["decoder_crashes"] for j in jobs),
        "failures_by_stage": dict(sorted(stages.items())),
        "peak_memory_mb": {
            "job_max_process_rss": max((j["peak_rss_mb"] for j in jobs), default=0.0),
            "job_max_tree_pss": max((j["tree_peak_mb"] for j in jobs), default=0.0),
            "core_max_process_rss": round(core["peak_rss_mb"], 1) if core else 0.0,
        },
        "problems": problems,
        "verdict": "fail" if problems else "pass",
    })


def print_report(r: Dict) -> None:
    print(f"fuzz: seed {r['seed']}, {r['seconds']} s: {r['verdict'].upper()}"
          + (f" (decode with {r['resize']})" if r.get("resize") else ""))
    print(f"  JPEG mutants     {r['jpeg_mutants']} (+ {r['good_images']} good images), "
          f"{len(r['jpeg_mutants_by_kind'])} kinds")
    print("    " + ", ".join(f"{k} {v}" for k, v in r["jpeg_mutants_by_kind"].items()))
    print(f"  tar mutants      {r['tar_mutants']}, {len(r['tar_mutants_by_kind'])} kinds")
    print("    " + ", ".join(f"{k} {v}" for k, v in r["tar_mutants_by_kind"].items()))
    c = r["core"]
    if c is not None:
        print(f"  decode core      {c['batches']} batches of {r['batch_size']} in {c['processes']} processes, "
              f"{c['seconds']} s: {len(c['crashes'])} batches killed the process, {len(c['hangs'])} hung, "
              f"{len(c['violations'])} invariant violations; decoder crashes contained "
              f"{c['decoder_crashes_contained']}; slowest batch {c['slowest_batch_s']:.1f} s; "
              f"peak RSS {c['peak_rss_mb']:.0f} MB")
        if c["batches_killed_with_kind"]:
            print("    kinds in killed batches: " + ", ".join(
                f"{k} {v}" for k, v in sorted(c["batches_killed_with_kind"].items(), key=lambda kv: -kv[1])))
        for v in c["violations"][:5]:
            print(f"    {v}")
    u = r.get("core_unchecked")
    if u is not None:
        print(f"  core, unchecked  {u['batches']} batches of {r['batch_size']} given to DALI unfiltered, "
              f"{u['seconds']} s: decoder crashes contained {u['decoder_crashes_contained']}, "
              f"{len(u['crashes'])} batches killed the calling process, {len(u['hangs'])} hung, "
              f"{len(u['violations'])} invariant violations")
        for v in u["violations"][:5]:
            print(f"    {v}")
    print(f"  job runs         {r['job_runs']}, exit codes {r['job_exit_codes']}, hangs {r['hangs']}")
    for j in r["jobs"]:
        a = j["accounting"]
        state = "HUNG" if j["hung"] else f"exit {j['exit_code']}" + (f" {j['signal']}" if j["signal"] else "")
        print(f"    {j['name']:<8} {j['tars']:>4} tars {j['members']:>5} members  {state:<12} {j['seconds']:>6} s  "
              f"rows {a['rows']:>5}  failures {a['failure_records']:>4}  covered {a['covered_by_tar_failure']:>3}  "
              f"lost {a['lost']:>5}  dup {a['duplicated']}  RSS {j['peak_rss_mb']:.0f} MB")
    print(f"  members lost     {r['members_lost']}, duplicated {r['members_duplicated']}, "
          f"unexplained outputs {r['outputs_unexplained']}")
    if r["lost_by_kind"]:
        print("    lost by kind: " + ", ".join(f"{k} {v}" for k, v in sorted(r["lost_by_kind"].items(),
                                                                            key=lambda kv: -kv[1])))
    print(f"  decoder crashes contained {r['decoder_crashes_contained']} in the jobs"
          + (f", {c['decoder_crashes_contained']} in the decode core" if c is not None else ""))
    print("  failures by stage " + (", ".join(f"{k} {v}" for k, v in r["failures_by_stage"].items()) or "none"))
    pm = r["peak_memory_mb"]
    print(f"  peak memory      job {pm['job_max_process_rss']:.0f} MB (largest process), "
          f"{pm['job_max_tree_pss']:.0f} MB (process tree, sampled); core {pm['core_max_process_rss']:.0f} MB")
    for p in r["problems"]:
        print(f"  FAIL: {p}")
    for j in r["jobs"]:
        for e in j["accounting"]["examples"][:5]:
            print(f"    e.g. {j['name']}: {e}")


def parse_args(argv: Optional[Sequence[str]] = None):
    p = argparse.ArgumentParser(prog="python -m bench.fuzz", description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0, help="same seed, same mutants (default 0)")
    p.add_argument("--jpeg-mutants", type=int, default=6000, help="JPEG mutants (default 6000)")
    p.add_argument("--tar-mutants", type=int, default=900, help="mutated tars, one mutation each (default 900)")
    p.add_argument("--batch-size", type=int, default=64, help="decode batch, core and job (default 64)")
    p.add_argument("--num-threads", type=int, default=2, help="DALI threads, core and job (default 2)")
    p.add_argument("--batches-per-process", type=int, default=8, help="decode-core batches per child (default 8)")
    p.add_argument("--members-per-tar", type=int, default=160, help="JPEG members per tar of mutants (160)")
    p.add_argument("--jpeg-tars-per-job", type=int, default=12, help="tars of JPEG mutants per job run (12)")
    p.add_argument("--tar-mutants-per-job", type=int, default=300, help="mutated tars per job run (300)")
    p.add_argument("--job-timeout", type=float, default=240.0, help="seconds before a job counts as hung (240)")
    p.add_argument("--core-timeout", type=float, default=240.0,
                   help="seconds before a decode-core child counts as hung (240)")
    p.add_argument("--runner", default="FnApiRunner", help="the job's Beam runner (default FnApiRunner)")
    p.add_argument("--skip-core", action="store_true", help="do not run the decode core")
    p.add_argument("--skip-job", action="store_true", help="do not run the job")
    p.add_argument("--skip-inputs", action="store_true",
                   help="do not run the job over hostile folder entries and compressed tars (bench.fuzz_inputs)")
    p.add_argument("--work", default=None, help="folder for tars and outputs (default: a temporary one, removed)")
    p.add_argument("--keep", action="store_true", help="keep the tars and the job outputs")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the report as JSON here")
    p.add_argument("--unchecked-batches", type=int, default=24,
                   help="decode-core batches given to DALI with the structure check bypassed, so that DALI's "
                        "crashes reach the containment (default 24; 0: none)")
    p.add_argument("--resize", action="store_true",
                   help="decode with Resize(64, crop=48) (the job: " + " ".join(fuzz_pixels.RESIZE_FLAGS) + "): "
                        "pixels compared with that Resize's Pillow path, exactly where Pillow decoded, within "
                        f"{fuzz_pixels.RESIZE_TOLERANCE} levels where DALI did")
    p.add_argument("--_core-child", nargs=2, default=None, help=argparse.SUPPRESS)
    p.add_argument("--_unchecked", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("jpeg_mutants", "tar_mutants"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0")
    for name in ("batch_size", "num_threads", "batches_per_process", "members_per_tar", "jpeg_tars_per_job",
                 "tar_mutants_per_job"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args._core_child:
        core_child(*args._core_child, batch_size=args.batch_size, num_threads=args.num_threads,
                   unchecked=args._unchecked, resize=args.resize)
        return 0
    # SIGTERM as an exception, so that the finally blocks kill the process groups this harness started.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        report = run(args)
    finally:
        signal.signal(signal.SIGTERM, previous)
    print_report(report)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    return 0 if report["verdict"] == "pass" else 1


if __name__ == "__main__":
    sys.exit(main())
