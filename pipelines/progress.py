"""Live progress of a job on a local runner: tars done of matched, images, failures, images/s, elapsed.

The counts travel through a side channel, not through Beam's metrics: the local runners (the FnApiRunner and
the DirectRunner, which runs on it) make a job's metrics visible only once ``pipeline.run()`` has returned.
So the job's own pass-through steps (``pipelines.steps``: ``TarDoneFn``, ``CountImagesFn``, and the failures
step, through ``report``) append one short line per event to a file of their process in a folder that the driver names in
the environment variable ``BEAM_TARIMG_PROGRESS_DIR``. The SDK worker processes of
``--direct_running_mode multi_processing`` inherit the variable; where it is absent (a cluster's workers),
reporting does nothing and the runner's UI and the job's Beam counters serve instead.

``ProgressDisplay`` runs in the driver: a thread reads the new lines of those files twice a second and shows
a ``tqdm`` bar on a terminal, or prints one line every ``BEAM_TARIMG_PROGRESS_INTERVAL`` seconds (default
10) when stderr is not a terminal (a log file, CI).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
import time
from typing import Dict, Optional, TextIO

from pipelines import supervise

ENV_DIR = "BEAM_TARIMG_PROGRESS_DIR"
ENV_INTERVAL = "BEAM_TARIMG_PROGRESS_INTERVAL"
DEFAULT_INTERVAL_S = 10.0
_POLL_S = 0.5

TARS, IMAGES, FAILURES = "t", "i", "f"

_lock = threading.Lock()
_fd: Optional[int] = None
_fd_key: Optional[tuple] = None


def report(kind: str, n: int = 1) -> None:
    """Appends ``"<kind> <n>"`` to this process's progress file; does nothing outside a local job."""
    global _fd, _fd_key
    folder = os.environ.get(ENV_DIR)
    if not folder or n <= 0:
        return
    key = (folder, os.getpid())
    try:
        with _lock:
            if _fd_key != key:
                _fd = os.open(os.path.join(folder, f"{os.getpid()}.progress"),
                              os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                _fd_key = key
            os.write(_fd, f"{kind} {n}\n".encode("ascii"))  # one small O_APPEND write: never interleaved
    except OSError:  # the driver has gone or removed the folder: progress is best-effort
        pass


class _Reader:
    """Sums the progress files of one folder, reading only what was appended since the last call."""

    def __init__(self, folder: str):
        self.folder = folder
        self.totals: Dict[str, int] = {TARS: 0, IMAGES: 0, FAILURES: 0}
        self._offsets: Dict[str, int] = {}

    def poll(self) -> Dict[str, int]:
        try:
            names = os.listdir(self.folder)
        except OSError:
            return self.totals
        for name in names:
            path = os.path.join(self.folder, name)
            offset = self._offsets.get(name, 0)
            try:
                with open(path, "rb") as f:
                    f.seek(offset)
                    data = f.read()
            except OSError:
                continue
            end = data.rfind(b"\n") + 1  # a line being written is counted next time
            for line in data[:end].splitlines():
                kind, _, n = line.decode("ascii", "replace").partition(" ")
                if kind in self.totals and n.isdigit():
                    self.totals[kind] += int(n)
            self._offsets[name] = offset + end
        return self.totals


def format_line(prog: str, tars_total: int, totals: Dict[str, int], seconds: float) -> str:
    images = totals[IMAGES]
    rate = images / seconds if seconds > 0 else 0.0
    return (f"{prog}: {totals[TARS]}/{tars_total} tars, {images} images, {totals[FAILURES]} failures, "
            f"{rate:.1f} images/s, {seconds:.0f} s")


def _interval() -> float:
    try:
        value = float(os.environ.get(ENV_INTERVAL, DEFAULT_INTERVAL_S))
    except ValueError:
        value = DEFAULT_INTERVAL_S
    return value if value > 0 else DEFAULT_INTERVAL_S


class ProgressDisplay:
    """Context manager around ``pipeline.run()``: names the side channel's folder and shows the counts.

    ``enabled=False`` makes it do nothing (``--quiet``, or a runner whose workers are elsewhere).
    """

    def __init__(self, prog: str, tars_total: int, enabled: bool = True, stream: Optional[TextIO] = None):
        self.prog = prog.split()[-1].rsplit(".", 1)[-1]
        self.tars_total = tars_total
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._folder: Optional[str] = None
        self._previous_env: Optional[str] = None
        self._bar = None
        self._start = 0.0

    def __enter__(self) -> "ProgressDisplay":
        if not self.enabled:
            return self
        # Under the command's supervisor, inside its private folder: it removes that folder even when this
        # process is killed (Ctrl-C), so that no empty progress folder is left in the temp folder.
        self._folder = tempfile.mkdtemp(prefix="beam-tarimg-progress-",
                                        dir=os.environ.get(supervise.ENV_CONTROL) or None)
        self._previous_env = os.environ.get(ENV_DIR)
        os.environ[ENV_DIR] = self._folder
        self._reader = _Reader(self._folder)
        self._start = time.monotonic()
        if _isatty(self.stream):
            from tqdm import tqdm

            self._bar = tqdm(total=self.tars_total, unit="tar", desc=self.prog, file=self.stream,
                             dynamic_ncols=True, leave=True)
        self._thread = threading.Thread(target=self._loop, name="beam-tarimg-progress", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        interval = _interval()
        next_line = interval
        while not self._stop.wait(_POLL_S):
            totals = self._reader.poll()
            elapsed = time.monotonic() - self._start
            if self._bar is not None:
                self._update_bar(totals, elapsed)
            elif elapsed >= next_line:
                print(format_line(self.prog, self.tars_total, totals, elapsed), file=self.stream, flush=True)
                next_line = elapsed + interval

    def _update_bar(self, totals: Dict[str, int], elapsed: float) -> None:
        rate = totals[IMAGES] / elapsed if elapsed > 0 else 0.0
        self._bar.n = min(totals[TARS], self.tars_total)
        self._bar.set_postfix_str(f"{totals[IMAGES]} images, {totals[FAILURES]} failures, {rate:.1f} images/s",
                                  refresh=False)
        self._bar.refresh()

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.enabled:
            return
        self._stop.set()
        self._thread.join()
        totals = self._reader.poll()
        elapsed = time.monotonic() - self._start
        if exc_type is None:
            if self._bar is not None:
                self._update_bar(totals, elapsed)
            else:
                print(format_line(self.prog, self.tars_total, totals, elapsed), file=self.stream, flush=True)
        if self._bar is not None:
            self._bar.close()
        if self._previous_env is None:
            os.environ.pop(ENV_DIR, None)
        else:
            os.environ[ENV_DIR] = self._previous_env
        shutil.rmtree(self._folder, ignore_errors=True)


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
