"""Running one measurement in a fresh subprocess and watching its process tree.

CPU time: the worker reports the CPU time of its timed region itself (``RUSAGE_SELF`` plus
``RUSAGE_CHILDREN`` for the subprocesses it waited for, or the sum its own children report); as a cross-check
the parent also takes ``os.wait4``'s rusage of the worker (which covers every descendant that was waited for)
and samples live descendants through psutil when it is installed, else through ``/proc``.

Memory: the worker reports its own ``VmHWM`` (exact peak RSS of that one process); the parent samples the
whole tree every ``interval`` seconds and keeps the peak of the sum of PSS (proportional set size, so pages
shared after a fork are counted once; RSS where PSS is unreadable).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional

RESULT_PREFIX = "BENCH_RESULT "

try:  # optional
    import psutil  # type: ignore
except ImportError:  # pragma: no cover - depends on the environment
    psutil = None

_PAGE = os.sysconf("SC_PAGE_SIZE")
_TICK = os.sysconf("SC_CLK_TCK")


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _children_map() -> Dict[int, List[int]]:
    kids: Dict[int, List[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rfind(b")") + 2 :].split()[1])
        kids.setdefault(ppid, []).append(int(name))
    return kids


def descendants(pid: int) -> List[int]:
    """``pid`` and every live process below it."""
    if psutil is not None:
        try:
            p = psutil.Process(pid)
            return [pid] + [c.pid for c in p.children(recursive=True)]
        except psutil.Error:
            return []
    kids = _children_map()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, ()))
    return out


def proc_memory_kb(pid: int) -> Optional[int]:
    """PSS of one process in KiB (RSS when smaps_rollup is unreadable); None when it is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * _PAGE // 1024
    except OSError:
        return None


def proc_cpu_s(pid: int) -> Optional[float]:
    """utime + stime of one live process (not its children)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def vm_hwm_kb(pid: str = "self") -> Optional[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class _TreeSampler(threading.Thread):
    def __init__(self, pid: int, interval: float):
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.peak_kb = 0
        self.max_procs = 0
        self.cpu_seen: Dict[int, float] = {}
        self._halt = threading.Event()

    def run(self):
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)

    def sample(self):
        pids = descendants(self.pid)
        total = 0
        for p in pids:
            kb = proc_memory_kb(p)
            if kb is not None:
                total += kb
            cpu = proc_cpu_s(p)
            if cpu is not None:
                self.cpu_seen[p] = cpu
        self.max_procs = max(self.max_procs, len(pids))
        self.peak_kb = max(self.peak_kb, total)

    def stop(self):
        self._halt.set()
        self.join()


def run_worker(args: List[str], env: Dict[str, str], cwd: str, timeout: float, interval: float = 0.1) -> Dict:
    """Runs ``python -m bench.worker ARGS`` in ``env``; returns the worker's JSON result plus what the parent saw
    under ``"parent"``. Raises RuntimeError with the worker's output tail when it fails."""
    cmd = [sys.executable, "-m", "bench.worker", *args]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    sampler = _TreeSampler(proc.pid, interval)
    sampler.start()
    out_chunks: List[bytes] = []
    err_chunks: List[bytes] = []
    readers = [
        threading.Thread(target=lambda: out_chunks.append(proc.stdout.read()), daemon=True),
        threading.Thread(target=lambda: err_chunks.append(proc.stderr.read()), daemon=True),
    ]
    for t in readers:
        t.start()
    deadline = start + timeout
    status = rusage = None
    while True:
        pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() > deadline:
            for p in reversed(descendants(proc.pid)):
                try:
                    os.kill(p, 9)
                except OSError:
                    pass
            pid, status, rusage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.02)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    sampler.stop()
    for t in readers:
        t.join(5)
    out = b"".join(out_chunks).decode(errors="replace")
    err = b"".join(err_chunks).decode(errors="replace")
    result = None
    for line in out.splitlines():
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX) :])
    if proc.returncode != 0 or result is None:
        tail = (out + "\n" + err)[-3000:]
        why = "timed out" if wall >= timeout else f"exit code {proc.returncode}"
        raise RuntimeError(f"worker {' '.join(args[:1])} failed ({why}):\n{tail}")
    result["parent"] = {
        "wall_s": wall,
        "rusage_cpu_s": rusage.ru_utime + rusage.ru_stime,
        "rusage_maxrss_kb": rusage.ru_maxrss,
        "sampled_cpu_s": sum(sampler.cpu_seen.values()),
        "tree_peak_kb": sampler.peak_kb,
        "max_procs": sampler.max_procs,
        "stderr_tail": err[-600:],
    }
    return result
