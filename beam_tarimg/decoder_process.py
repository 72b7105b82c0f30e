"""The decoder's own process: one ``DaliDecoder`` in a child process that the calling process supervises.

DALI can crash (segfault, abort) rather than raise on some damaged JPEGs, and no process survives its own
segfault. So the pipeline (and its GPU context) lives in a child that runs this module in a fresh interpreter
(``python -I``: nothing is forked from a process with DALI or CUDA threads, and nothing in the user's folder
shadows the standard library or this package; see ``_child_command``).
This module owns the child's whole life: start, feed, read, notice its death, restart, stop.

Protocol, over a Unix socket pair (length-prefixed pickles; only small metadata and the encoded bytes travel
in them, never pixels):

1. parent -> child: the ``DaliDecoder`` arguments; child -> parent: ``("ready", builds)`` or ``("error", text)``.
2. parent -> child: ``("decode", [bytes, ...], [dali.Plan as a tuple, or None, ...], [slot ids to unmap])``;
   the child decodes them with the same ``DaliDecoder.decode`` that runs in-process (which checks each DALI
   image against its plan's frame size and orients it) and answers ``("decoded", [(shape|None, decoder,
   error, dtype str|None)], builds)``.
3. If any pixels came out, parent -> child: ``("write", slot id, slot size, is_new)`` (a new slot's memfd follows
   as SCM_RIGHTS ancillary data); the child copies the pixels, one after the other, into that shared-memory
   slot, each into a region of exactly the shape it announced, and answers ``("written",)``. This copy is the
   only one for upright images: the parent hands out views of the slot.

A slot (a ``memfd``, so no /dev/shm size limit applies and nothing leaks if either side dies) is reused once no
view of its last run is alive (a weak reference to the run's base array tells); free slots beyond
``max_free_bytes`` are unmapped. If the child dies, times out, or breaks the protocol, the run raises
``DecoderCrashed`` and the next run starts a new child.
"""

from __future__ import annotations

import atexit
import logging
import math
import mmap
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import weakref
from typing import Dict, List, Optional, Sequence

import numpy as np

from beam_tarimg.dali import DecodeOutcome

_LOG = logging.getLogger(__name__)

_HEADER = struct.Struct("!Q")
_MAX_MESSAGE = 1 << 34  # a sanity bound on one message (16 GiB): anything larger is a broken stream
START_TIMEOUT_S = 300.0  # importing DALI and building a pipeline (a GPU context included) on a busy machine
_MAX_REPLY = 1 << 24  # the child's replies are shapes and error texts: a larger length means a broken stream
_MIN_SLOT = 16 << 20


class DecoderCrashed(Exception):
    """The decoder process died, timed out or broke the protocol during a run. ``str()`` says how."""


def _send(sock: socket.socket, obj, deadline: Optional[float] = None) -> None:
    payload = pickle.dumps(obj, protocol=5)
    if deadline is not None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout("timed out")
        sock.settimeout(left)
    sock.sendall(_HEADER.pack(len(payload)))
    sock.sendall(payload)


def _recv_exact(sock: socket.socket, n: int, deadline: Optional[float]) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout("timed out")
            sock.settimeout(left)
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise EOFError("the other side closed the connection")
        got += k
    return buf


def _recv(sock: socket.socket, deadline: Optional[float] = None, limit: int = _MAX_MESSAGE):
    (n,) = _HEADER.unpack(_recv_exact(sock, _HEADER.size, deadline))
    if n > limit:
        raise EOFError(f"message of {n} bytes: the stream is broken")
    return pickle.loads(_recv_exact(sock, n, deadline))


class _Slot:
    """One shared-memory buffer: a memfd mapped here, reused when no view of its last run is alive."""

    __slots__ = ("id", "fd", "mm", "size", "run", "__weakref__")

    def __init__(self, slot_id: int, size: int):
        self.id = slot_id
        self.size = size
        self.fd = os.memfd_create(f"beam_tarimg-{slot_id}", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, size)
            self.mm = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self.fd)
            raise
        self.run: Optional[weakref.ref] = None  # the base array of the run it holds

    @property
    def free(self) -> bool:
        return self.run is None or self.run() is None

    def close(self) -> None:
        self.run = None
        self.mm.close()
        os.close(self.fd)


def _signal_name(returncode: int) -> str:
    if returncode < 0:
        try:
            return signal.Signals(-returncode).name
        except ValueError:
            return f"signal {-returncode}"
    return f"exit code {returncode}"


# The decoder process runs in isolated mode (-I: no script folder or current folder, no user site-packages, no
# PYTHON* variables on its sys.path), so that nothing in the user's folder (a types.py next to their script)
# shadows the standard library or this package in it; the folder holding the beam_tarimg this process imported
# (site-packages, or a source checkout) goes first, and this process's other sys.path entries (PYTHONPATH,
# user site-packages, staged packages) last, behind the standard library and site-packages. Environment
# variables other than PYTHON* still reach it (the allocator settings below, CRASH_TEST_ENV).
_BOOTSTRAP = (
    "import json, runpy, sys\n"
    "first, last = json.loads(sys.argv.pop(1))\n"
    "sys.path[:0] = first\n"
    "sys.path += [p for p in last if p not in sys.path]\n"
    "runpy.run_module('beam_tarimg.decoder_process', run_name='__main__', alter_sys=True)\n"
)


def _child_command() -> List[str]:
    """``python -I -c <bootstrap> <paths>``: the decoder process's command, before its own arguments."""
    import json

    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = [[package_root], [os.path.abspath(p) for p in sys.path if p]]
    return [sys.executable, "-I", "-c", _BOOTSTRAP, json.dumps(paths)]


class DecoderProcess:
    """Runs ``DaliDecoder`` runs in a supervised child process; see the module docstring.

    ``decode()`` returns the outcomes of one run, pixels as views of shared memory, or raises
    ``DecoderCrashed``. Not thread-safe by itself (``ImageDecoder`` holds a lock around it).
    ``builds`` counts DALI pipelines built over all the children; ``starts`` counts the children started.
    """

    def __init__(self, config: dict, run_timeout_s: float, max_free_bytes: int = 1 << 30):
        self._config = dict(config)
        self._run_timeout_s = float(run_timeout_s)
        self._max_free_bytes = int(max_free_bytes)
        self._proc: Optional[subprocess.Popen] = None
        self._sock: Optional[socket.socket] = None
        self._slots: Dict[int, _Slot] = {}
        self._mapped: set = set()  # slot ids the current child has mapped
        self._unmap: List[int] = []  # slot ids the current child should unmap
        self._next_slot = 0
        self._builds_before = 0  # builds by children that are gone
        self._builds_now = 0
        self.starts = 0
        self._close_lock = threading.Lock()
        self._start()  # fail now, not at the first run, if DALI cannot start here
        _finalizers.add(self)

    @property
    def builds(self) -> int:
        return self._builds_before + self._builds_now

    @property
    def pid(self) -> Optional[int]:
        return None if self._proc is None else self._proc.pid

    # -- the child's life cycle ---------------------------------------------------------------------------------

    def _start(self) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # Blocking, whatever socket.setdefaulttimeout() says (Beam's GCS auth sets 60 s process-wide, which
        # makes new sockets non-blocking underneath): the child inherits the descriptor's mode.
        parent.setblocking(True)
        child.setblocking(True)
        env = dict(os.environ)
        # glibc: buffers of 4 MiB and more (the pixels of large images) come from mmap and go back to the system
        # when freed, so that the decoder process does not keep the peak of its largest runs (by default glibc
        # raises its mmap threshold after each such free, up to 32 MiB, and keeps those buffers on its heaps);
        # and the heap keeps up to 64 MiB free at its top rather than returning (and page-faulting back) the
        # ImageNet-sized outputs of every run: a fixed mmap threshold alone sets the trim threshold to 128 KiB,
        # which cost 35% of the decode throughput here (0.75 vs 0.57 ms of CPU per image).
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(4 << 20))
        env.setdefault("MALLOC_TRIM_THRESHOLD_", str(64 << 20))
        try:
            stdout = sys.stderr.fileno()  # DALI's messages go to stderr; nothing may write to our stdout
        except (AttributeError, OSError, ValueError):
            stdout = subprocess.DEVNULL
        try:
            self._proc = subprocess.Popen(
                [*_child_command(), str(child.fileno()), str(os.getpid())],
                pass_fds=(child.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                env=env,
            )
        finally:
            child.close()
        self._sock = parent
        self._mapped = set()
        self._unmap = []
        self.starts += 1
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            _send(parent, self._config, deadline)
            reply = _recv(parent, deadline)
        except (OSError, EOFError, pickle.UnpicklingError) as e:
            reason = self._reap(f"{type(e).__name__}: {e}")
            raise RuntimeError(f"the DALI decoder process did not start: {reason}") from None
        if reply[0] != "ready":
            self._reap("refused to start")
            raise RuntimeError(f"the DALI decoder process could not build its pipeline: {reply[1]}")
        self._builds_now = reply[1]

    def _reap(self, why: str) -> str:
        """Ends the child (killing it if it still runs) and says how it ended."""
        proc, sock = self._proc, self._sock
        self._proc = self._sock = None
        self._builds_before += self._builds_now
        self._builds_now = 0
        if sock is not None:
            sock.close()
        if proc is None:
            return why
        killed = False
        try:
            returncode = proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            killed = True
            try:
                returncode = proc.wait(timeout=30.0)
            except subprocess.TimeoutExpired:  # stuck in the kernel (a GPU driver call): leave it to init
                _LOG.warning("beam_tarimg: decoder process %d did not die within 30 s of SIGKILL", proc.pid)
                return why
        if killed:
            return why
        return f"{_signal_name(returncode)}" if returncode < 0 else f"{why}, {_signal_name(returncode)}"

    # -- runs ---------------------------------------------------------------------------------------------------

    def decode(self, encoded: Sequence[bytes], plans: Sequence[Optional[tuple]]) -> List[DecodeOutcome]:
        """Decodes one run (``plans``: ``DaliDecoder.decode``'s) in the decoder process.

        Raises ``DecoderCrashed`` when the process dies, times out or breaks the protocol during the run, and
        RuntimeError when no new decoder process can be started (twice in a row) after a crash."""
        if self._proc is None:
            try:
                self._start()
            except RuntimeError as first:
                _LOG.warning("beam_tarimg: %s; trying once more", first)
                time.sleep(1.0)
                self._start()
        sock = self._sock
        deadline = time.monotonic() + self._run_timeout_s
        slot = None
        try:
            unmap, self._unmap = self._unmap, []
            plans = [None if p is None else tuple(p) for p in plans]
            _send(sock, ("decode", [bytes(b) for b in encoded], plans, unmap), deadline)
            self._mapped.difference_update(unmap)
            reply = _recv(sock, deadline, _MAX_REPLY)
            if reply[0] != "decoded":
                raise EOFError(f"unexpected reply {reply[0]!r}: {reply[1] if len(reply) > 1 else ''}")
            meta, self._builds_now = reply[1], reply[2]
            if len(meta) != len(encoded):
                raise EOFError(f"{len(meta)} outcomes for {len(encoded)} images")
            total = sum(math.prod(shape) * np.dtype(dt).itemsize for shape, _, _, dt in meta if shape is not None)
            if not total:
                return [DecodeOutcome(None, None, error) for _, _, error, _ in meta]
            slot = self._take_slot(total)
            new = slot.id not in self._mapped
            _send(sock, ("write", slot.id, slot.size, new), deadline)
            if new:
                socket.send_fds(sock, [b"F"], [slot.fd])
                self._mapped.add(slot.id)
            reply = _recv(sock, deadline, _MAX_REPLY)
            if reply[0] != "written":
                raise EOFError(f"unexpected reply {reply[0]!r}")
        except socket.timeout:
            self._proc.kill()
            self._reap("timed out")
            raise DecoderCrashed(
                f"decoder process timed out after {self._run_timeout_s:g} s (killed)"
            ) from None
        except (OSError, EOFError, pickle.UnpicklingError, ValueError, IndexError, TypeError) as e:
            reason = self._reap(f"{type(e).__name__}: {e}")
            raise DecoderCrashed(f"decoder process crashed ({reason})") from None
        except BaseException:
            # Interrupted mid-protocol (KeyboardInterrupt, MemoryError, ...): a reply may still be on its way,
            # and the next run would read it as its own. This child is never used again.
            if self._proc is not None:
                self._proc.kill()
            self._reap("interrupted")
            raise
        base = np.frombuffer(slot.mm, dtype=np.uint8, count=total)
        slot.run = weakref.ref(base)
        outcomes = []
        offset = 0
        for shape, decoder, error, dt in meta:
            if shape is None:
                outcomes.append(DecodeOutcome(None, None, error))
                continue
            n = math.prod(shape) * np.dtype(dt).itemsize
            outcomes.append(DecodeOutcome(base[offset : offset + n].view(dt).reshape(shape), decoder, None))
            offset += n
        return outcomes

    def _take_slot(self, size: int) -> _Slot:
        """The smallest free slot that holds ``size`` bytes, or a new one; trims free slots beyond the bound."""
        free = [s for s in self._slots.values() if s.free]
        fitting = [s for s in free if s.size >= size]
        if fitting:
            slot = min(fitting, key=lambda s: s.size)
        else:
            slot = _Slot(self._next_slot, max(_MIN_SLOT, -(-size // mmap.PAGESIZE) * mmap.PAGESIZE))
            self._next_slot += 1
            self._slots[slot.id] = slot
        others = sorted((s for s in free if s is not slot), key=lambda s: s.size)
        held = sum(s.size for s in others)
        while others and held > self._max_free_bytes:
            victim = others.pop()  # the largest free slot first
            held -= victim.size
            del self._slots[victim.id]
            victim.close()
            if victim.id in self._mapped:
                self._unmap.append(victim.id)
        return slot

    def close(self) -> None:
        with self._close_lock:
            if self._sock is not None:
                try:
                    _send(self._sock, ("close",))
                except OSError:
                    pass
            self._reap("closed")
            for slot in list(self._slots.values()):
                if slot.free:
                    slot.close()
            self._slots.clear()


# Children are stopped at interpreter exit (they also die with this process: see _child_main).
_finalizers: "weakref.WeakSet[DecoderProcess]" = weakref.WeakSet()


def _close_all() -> None:
    for process in list(_finalizers):
        try:
            process.close()
        except Exception:  # best effort at exit
            pass


atexit.register(_close_all)


# -- the child ------------------------------------------------------------------------------------------------


def _die_with_parent(parent_pid: int) -> None:
    """Ends this process soon after its parent is gone (a worker killed mid-run leaves no decoder behind).

    Idle, the decoder reads EOF from its socket when the parent dies; busy inside DALI it does not, so a
    daemon thread watches the parent pid. (Not ``PR_SET_PDEATHSIG``: it fires when the *thread* that started
    the child exits, and Beam runs ``setup()`` on pool threads that come and go.)
    """

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="beam_tarimg-parent-watch", daemon=True).start()


# A crash on request, for testing the supervision with a real signal in the real decoder process (as browsers
# have crash pages): "SIGSEGV:<hex bytes>" makes the decoder process kill itself with that signal when a run
# holds an image containing those bytes; "STALL:<hex bytes>" makes it sleep for an hour there instead (busy in
# a long run, as far as anyone outside can tell). Read once, when the decoder process starts; unset in normal use.
CRASH_TEST_ENV = "BEAM_TARIMG_TEST_CRASH_ON"


def _crash_request():
    spec = os.environ.get(CRASH_TEST_ENV)
    if not spec:
        return None
    name, _, marker = spec.partition(":")
    if name == "STALL":
        return (lambda: time.sleep(3600.0)), bytes.fromhex(marker)
    signum = signal.Signals[name]
    return (lambda: os.kill(os.getpid(), signum)), bytes.fromhex(marker)


def _child_main(fd: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops us
    _die_with_parent(int(sys.argv[2]))
    crash_request = _crash_request()
    sock = socket.socket(fileno=fd)
    sock.setblocking(True)
    from beam_tarimg.dali import DaliDecoder

    config = _recv(sock)
    try:
        decoder = DaliDecoder(**config)
    except Exception as e:
        _send(sock, ("error", f"{type(e).__name__}: {e}"))
        return
    _send(sock, ("ready", decoder.builds))
    try:
        _serve(sock, decoder, crash_request)
    except (BrokenPipeError, ConnectionResetError):  # the parent went away mid-run: nothing to report to
        return


def _serve(sock: socket.socket, decoder, crash_request) -> None:
    maps: Dict[int, mmap.mmap] = {}
    while True:
        try:
            message = _recv(sock)
        except EOFError:
            return
        if message[0] == "close":
            return
        _, encoded, plans, unmap = message
        for slot_id in unmap:
            mm = maps.pop(slot_id, None)
            if mm is not None:
                mm.close()
        if crash_request is not None and any(crash_request[1] in blob for blob in encoded):
            crash_request[0]()
        outcomes = decoder.decode(encoded, plans)
        meta = [
            (None, None, o.error, None) if o.pixels is None
            else (tuple(o.pixels.shape), o.decoder, None, o.pixels.dtype.str)
            for o in outcomes
        ]
        _send(sock, ("decoded", meta, decoder.builds))
        if not any(o.pixels is not None for o in outcomes):
            continue
        _, slot_id, size, new = _recv(sock)
        if new:
            _, fds, _, _ = socket.recv_fds(sock, 1, 1)
            old = maps.pop(slot_id, None)
            if old is not None:
                old.close()
            maps[slot_id] = mmap.mmap(fds[0], size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            os.close(fds[0])
        out = np.frombuffer(maps[slot_id], dtype=np.uint8)
        offset = 0
        for o in outcomes:
            if o.pixels is not None:
                n = o.pixels.nbytes
                np.copyto(out[offset : offset + n].view(o.pixels.dtype).reshape(o.pixels.shape), o.pixels)
                offset += n
        del out, outcomes  # release the map's buffer and DALI's output before the next run
        _send(sock, ("written",))


if __name__ == "__main__":
    _child_main(int(sys.argv[1]))
