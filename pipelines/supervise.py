"""The command line's supervisor: runs a job in a child process, and ends it cleanly on SIGINT or SIGTERM.

Beam's local runners cannot be stopped from inside: a Ctrl-C during ``pipeline.run()`` surfaces as a
``RuntimeError`` (with a long traceback) while DoFn threads and the SDK worker processes of
``--direct_running_mode multi_processing`` go on writing, and Beam's file sinks leave ``beam-temp-*`` folders
of partial files behind. So ``python -m pipelines.<job>`` starts the same command again as a child that ignores SIGINT (as do the
processes it starts, which inherit that: a terminal's Ctrl-C reaches the whole foreground process group, and
only this parent acts on it) and waits for it. The child stays in this process group, so that whoever kills
the group (a CI timeout, a harness) kills the job too. The child tells the parent, through files in a
private folder, where it is about to write (``announce_outputs``) and when the pipeline has finished
(``announce_done``). On SIGINT, SIGTERM or SIGHUP the parent kills the child and every process below it, then
removes the job's shards, failures file and Beam staging folders (unless the pipeline had
already finished, in which case its outputs are complete and stay) and the private folder (the progress
display's files are in it too), prints one line, and exits with
128 + the signal number: 130 for SIGINT, 143 for SIGTERM (129 for SIGHUP: the terminal closed).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from typing import List, Optional, Sequence

ENV_CONTROL = "BEAM_TARIMG_CONTROL_DIR"
EXIT_SIGINT = 128 + signal.SIGINT  # 130
EXIT_SIGTERM = 128 + signal.SIGTERM  # 143
_JOB = "job.json"
_DONE = "done"
_KILL_WAIT_S = 30


class _Interrupted(Exception):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def should_supervise(argv: Optional[Sequence[str]] = None) -> bool:
    """Not in the child itself, not for ``--help``, and only when run as ``python -m <module>``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if os.environ.get(ENV_CONTROL) or any(a in ("-h", "--help") for a in argv):
        return False
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec is not None and bool(spec.name)


def announce_outputs(output: Optional[str], failures: Optional[str], beam_args: Sequence[str]) -> None:
    """In the child: what the job is about to write (and the Beam flags that reach that filesystem)."""
    folder = os.environ.get(ENV_CONTROL)
    if not folder:
        return
    tmp = os.path.join(folder, _JOB + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"output": output, "failures": failures, "beam_args": list(beam_args)}, f)
    os.replace(tmp, os.path.join(folder, _JOB))


def announce_done() -> None:
    """In the child: the pipeline has finished; its outputs are complete."""
    folder = os.environ.get(ENV_CONTROL)
    if folder:
        open(os.path.join(folder, _DONE), "w").close()


def supervise(prog: str) -> int:
    """Runs ``python -m <__main__'s module> <same flags>`` as a supervised child; returns the exit code."""
    module = sys.modules["__main__"].__spec__.name
    folder = tempfile.mkdtemp(prefix="beam-tarimg-job-")
    env = dict(os.environ, **{ENV_CONTROL: folder})

    def interrupted(signum, _frame):
        raise _Interrupted(signum)

    previous = {s: signal.signal(s, interrupted) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    child = None
    try:
        child = subprocess.Popen([sys.executable, "-m", module, *sys.argv[1:]], env=env,
                                 stdin=subprocess.DEVNULL, preexec_fn=_ignore_sigint)
        code = child.wait()
        if code < 0:
            print(f"{prog}: error: the job's process died of signal {-code}", file=sys.stderr)
            return 1
        return code
    except _Interrupted as e:
        for s, handler in previous.items():  # a second Ctrl-C must not cut the cleanup short
            signal.signal(s, signal.SIG_IGN)
        stopped = _stop(child) if child is not None else 0
        removed = _remove_partial_outputs(folder)
        name = signal.Signals(e.signum).name
        done = f", {removed} partial outputs removed" if removed else ""
        if sys.stderr.isatty():  # end the progress bar's line
            print(file=sys.stderr)
        print(f"{prog}: interrupted by {name}; the job stopped ({stopped} processes ended{done})",
              file=sys.stderr, flush=True)
        return 128 + e.signum
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        shutil.rmtree(folder, ignore_errors=True)


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _descendants(pid: int) -> List[int]:
    """Every live process below ``pid`` (Linux /proc; empty elsewhere)."""
    children = {}
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return []
    for entry in entries:
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode("ascii", "replace")
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _stop(child: subprocess.Popen) -> int:
    """Kills the child and every process below it, all found before any is killed (a process whose parent
    dies is handed to init, out of reach of the tree), and all stopped before any is killed (so that none
    prints a traceback about another's death); returns how many processes that was."""
    victims = [child.pid, *_descendants(child.pid)]
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for pid in victims:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
    try:
        child.wait(timeout=_KILL_WAIT_S)
    except subprocess.TimeoutExpired:
        pass
    return len(victims)


def _remove_partial_outputs(folder: str) -> int:
    """Removes what an unfinished job wrote; nothing if it had not started writing or had finished."""
    job_path = os.path.join(folder, _JOB)
    if not os.path.exists(job_path) or os.path.exists(os.path.join(folder, _DONE)):
        return 0
    with open(job_path, encoding="utf-8") as f:
        job = json.load(f)
    from pipelines import outputs

    if not all(outputs.is_local(p) for p in (job["output"], job["failures"]) if p):
        # A bucket: Beam's filesystems, with the job's endpoint and keys (importing Beam takes seconds; local
        # files are removed without it, so that Ctrl-C gives the prompt back at once).
        from apache_beam.io.filesystems import FileSystems
        from apache_beam.options.pipeline_options import PipelineOptions

        FileSystems.set_options(PipelineOptions(job["beam_args"]))
    return outputs.remove(outputs.job_files(job["output"], job["failures"]))
