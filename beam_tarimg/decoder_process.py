"""The decoder's own process: one ``DaliDecoder`` in a child process that the calling process supervises.

DALI can crash (segfault, abort) rather than raise on some damaged JPEGs, and no process survives its own
segfault. So the pipeline (and its GPU context) lives in a child that runs this module in a fresh interpreter
(``python -I``: nothing is forked from a process with DALI or CUDA threads, and nothing in the user's folder
shadows the standard library or this package; see ``_child_command``).
This module owns the child's whole life: start, feed, read, notice its death, restart, stop.

Runs are pipelined: ``submit()`` hands a run over and returns at once, ``result()`` waits for it, so the caller
reads and checks the next run (and hands the last one downstream) while the child decodes. The child takes
requests one after the other and answers each in order; several may wait in its queue.

Protocol, over a Unix socket pair (length-prefixed pickles of small metadata; neither encoded bytes nor pixels
travel in them):

1. parent -> child: the ``DaliDecoder`` arguments; child -> parent: ``("ready", builds)`` or ``("error", text)``.
2. parent -> child: ``("decode", run id, input slot, [encoded lengths], [dali.Plan as a tuple, or None, ...],
   output slot or None, [slot ids to unmap])``, a slot being ``(id, size, is_new)``; each new slot's memfd
   follows as SCM_RIGHTS ancillary data. The encoded bytes lie one after the other in the input slot (the only
   copy of them the parent makes); the output slot is sized from the headers' claims. The child decodes them
   with the same ``DaliDecoder.decode`` that runs in-process (which checks each DALI image against its plan's
   frame size and orients it), copies the pixels one after the other into the output slot, each into a region
   of exactly the shape it announces (the only copy of upright pixels: the parent hands out views of the slot),
   and answers ``("decoded", run id, [(shape|None, dtype, decoder, error)], builds, overflow, seconds)``. When the
   pixels do not fit the output slot (a header that claimed too little, or no header), the child writes them to
   a memfd of its own of ``overflow`` bytes, which follows the answer as SCM_RIGHTS data.

An output slot (a ``memfd``, so no /dev/shm size limit applies and nothing leaks if either side dies) is reused
once no run is in flight in it and no view of its last run is alive (a weak reference to the run's base array
tells); free slots beyond ``max_free_bytes`` are unmapped. If the child dies, times out, or breaks the protocol,
the oldest run in flight (the one it was decoding) raises ``DecoderCrashed``, the runs queued behind it raise
``DecoderCrashed`` with ``lost=True`` (never started: submit them again), and the next run starts a new child.
"""

from __future__ import annotations

import atexit
import collections
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
_MIN_IN_SLOT = 4 << 20


class DecoderCrashed(Exception):
    """The decoder process died, timed out or broke the protocol during a run. ``str()`` says how.

    ``lost``: True for a run that was queued behind the one the process died in: it never started, and is
    submitted again as it is (it is no suspect)."""

    def __init__(self, message: str, lost: bool = False):
        super().__init__(message)
        self.lost = lost


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
    """One shared-memory buffer: a memfd mapped here. An output slot is reused when no run is in flight in it
    and no view of its last run is alive; an input slot when no run is in flight in it."""

    __slots__ = ("id", "fd", "mm", "size", "run", "busy", "__weakref__")

    def __init__(self, slot_id: int, size: int, name: str = "beam_tarimg", fd: Optional[int] = None):
        self.id = slot_id
        self.size = size
        self.fd = os.memfd_create(f"{name}-{slot_id}", os.MFD_CLOEXEC) if fd is None else fd
        try:
            if fd is None:
                os.ftruncate(self.fd, size)
            self.mm = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self.fd)
            raise
        self.run: Optional[weakref.ref] = None  # the base array of the run it holds
        self.busy = False  # a run in flight reads or writes it

    @property
    def free(self) -> bool:
        return not self.busy and (self.run is None or self.run() is None)

    def close(self) -> None:
        self.run = None
        self.mm.close()
        os.close(self.fd)


class _Pool:
    """Slots of one kind (output or input), reused smallest-fit; free ones beyond ``max_free_bytes`` unmapped."""

    def __init__(self, name: str, max_free_bytes: int, min_size: int):
        self.name = name
        self.max_free_bytes = max_free_bytes
        self.min_size = min_size
        self.slots: Dict[int, _Slot] = {}
        self.mapped: set = set()  # slot ids the current child has mapped
        self.unmap: List[int] = []  # slot ids the current child should unmap
        self._next = 0

    def new_id(self) -> int:
        self._next += 1
        return self._next - 1

    def take(self, size: int) -> _Slot:
        """The smallest free slot that holds ``size`` bytes, or a new one; trims free slots beyond the bound."""
        free = [s for s in self.slots.values() if s.free]
        fitting = [s for s in free if s.size >= size]
        if fitting:
            slot = min(fitting, key=lambda s: s.size)
        else:
            slot = _Slot(self.new_id(), _size_class(max(self.min_size, size)), self.name)
            self.slots[slot.id] = slot
        self.trim(keep=slot)
        return slot

    def adopt(self, fd: int, size: int) -> _Slot:
        slot = _Slot(self.new_id(), size, self.name, fd=fd)
        self.slots[slot.id] = slot
        return slot

    def trim(self, keep: Optional[_Slot] = None) -> None:
        others = sorted((s for s in self.slots.values() if s.free and s is not keep), key=lambda s: s.size)
        held = sum(s.size for s in others)
        while others and held > self.max_free_bytes:
            victim = others.pop()  # the largest free slot first
            held -= victim.size
            self.drop(victim)

    def drop(self, slot: _Slot) -> None:
        del self.slots[slot.id]
        slot.close()
        if slot.id in self.mapped:
            self.unmap.append(slot.id)

    def reset_child(self) -> None:
        """A new child has mapped nothing."""
        self.mapped = set()
        self.unmap = []

    def close(self) -> None:
        for slot in list(self.slots.values()):
            if slot.free:
                slot.close()
        self.slots.clear()


def _size_class(size: int) -> int:
    """``size`` rounded up to the next 2^k or 1.5 x 2^k bytes, so that the runs of a stream, which differ by a few
    percent, fit each other's slots (a new slot costs page faults on its first run; pages never written cost
    nothing, so the rounding costs address space only)."""
    p = 1 << (max(size, 1) - 1).bit_length()  # the next power of two
    return p * 3 // 4 if p * 3 // 4 >= size else p


class _Ticket:
    """One run handed to the decoder process: what ``result()`` needs to answer it."""

    __slots__ = ("id", "n", "out", "inp", "submitted", "reply", "crash", "done", "decode_s", "__weakref__")

    def __init__(self, run_id: int, n: int, out: Optional[_Slot], inp: Optional[_Slot]):
        self.id = run_id
        self.n = n
        self.out = out
        self.inp = inp
        self.submitted = time.monotonic()
        self.reply = None  # ("decoded", ...) and the overflow slot, once read
        self.crash: Optional[DecoderCrashed] = None
        self.done = False
        self.decode_s = 0.0  # the decoder process's own time for the run


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

    ``submit()`` hands a run over (returns a ticket at once); ``result(ticket)`` returns its outcomes, pixels as
    views of shared memory, or raises ``DecoderCrashed``. ``decode()`` is the two in one. Thread-safe: runs are
    answered in the order they were submitted, whichever thread waits for them.
    ``builds`` counts DALI pipelines built over all the children; ``starts`` counts the children started.
    """

    def __init__(self, config: dict, run_timeout_s: float, max_free_bytes: int = 1 << 30):
        self._config = dict(config)
        self._run_timeout_s = float(run_timeout_s)
        self._out = _Pool("beam_tarimg", int(max_free_bytes), _MIN_SLOT)
        # Encoded bytes are ~5-10% of the pixels they decode to: input slots are kept up to a fraction of that.
        self._in = _Pool("beam_tarimg-in", max(_MIN_IN_SLOT, int(max_free_bytes) // 8), _MIN_IN_SLOT)
        self._proc: Optional[subprocess.Popen] = None
        self._sock: Optional[socket.socket] = None
        self._pending: "collections.deque[_Ticket]" = collections.deque()  # submitted, not yet answered
        self._next_run = 0
        self._last_answer = time.monotonic()  # when the child last answered (it then took the next run)
        self._builds_before = 0  # builds by children that are gone
        self._builds_now = 0
        self.starts = 0
        self._lock = threading.RLock()
        self._start()  # fail now, not at the first run, if DALI cannot start here
        _finalizers.add(self)

    @property
    def builds(self) -> int:
        return self._builds_before + self._builds_now

    @property
    def pid(self) -> Optional[int]:
        return None if self._proc is None else self._proc.pid

    @property
    def _slots(self) -> Dict[int, _Slot]:  # the output slots (tests look at them)
        return self._out.slots

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
        # numpy's OpenBLAS starts a thread per core that spins after start-up; nothing here does linear algebra
        # (measured: 2.5% of the decoder process's CPU).
        env.setdefault("OPENBLAS_NUM_THREADS", "1")
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
        self._out.reset_child()
        self._in.reset_child()
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

    def _crashed(self, crash: DecoderCrashed) -> None:
        """The child is gone: the oldest run in flight gets ``crash``, the ones queued behind it are lost."""
        for i, ticket in enumerate(self._pending):
            ticket.crash = crash if i == 0 else DecoderCrashed(f"queued behind a run that {crash}", lost=True)
            ticket.done = True
            self._release(ticket)
        self._pending.clear()

    def _release(self, ticket: _Ticket) -> None:
        for slot in (ticket.out, ticket.inp):
            if slot is not None:
                slot.busy = False

    # -- runs ---------------------------------------------------------------------------------------------------

    def decode(self, encoded: Sequence, plans: Sequence[Optional[tuple]], out_bytes: int = 0) -> List[DecodeOutcome]:
        """Decodes one run and waits for it: ``result(submit(...))``."""
        return self.result(self.submit(encoded, plans, out_bytes))

    def submit(self, encoded: Sequence, plans: Sequence[Optional[tuple]], out_bytes: int = 0) -> _Ticket:
        """Hands one run (``plans``: ``DaliDecoder.decode``'s) to the decoder process and returns at once.
        ``out_bytes``: the pixel bytes the run will make, as far as the headers tell (the output slot's size; a
        run that makes more costs the child a buffer of its own, no more).

        Raises RuntimeError when no decoder process can be started (twice in a row); a failure to hand the run
        over shows as a ``DecoderCrashed`` from ``result()``."""
        with self._lock:
            if self._proc is None:
                try:
                    self._start()
                except RuntimeError as first:
                    _LOG.warning("beam_tarimg: %s; trying once more", first)
                    time.sleep(1.0)
                    self._start()
            lengths = [len(b) for b in encoded]
            inp = self._in.take(sum(lengths)) if sum(lengths) else None
            out = self._out.take(out_bytes) if out_bytes > 0 else None
            ticket = _Ticket(self._next_run, len(encoded), out, inp)
            self._next_run += 1
            for slot in (out, inp):
                if slot is not None:
                    slot.busy = True
            if not self._pending:
                self._last_answer = time.monotonic()  # the child is idle: it starts this run now
            self._pending.append(ticket)
            if inp is not None:
                view = memoryview(inp.mm)
                offset = 0
                for blob, n in zip(encoded, lengths):
                    view[offset : offset + n] = blob
                    offset += n
                del view
            try:
                self._send_run(ticket, lengths, plans)
            except BaseException as e:
                self._failed(e, "handing a run over")
            return ticket

    def _send_run(self, ticket: _Ticket, lengths: List[int], plans) -> None:
        sock = self._sock
        deadline = time.monotonic() + self._run_timeout_s
        new = []
        slots = []
        for pool, slot in ((self._in, ticket.inp), (self._out, ticket.out)):
            if slot is None:
                slots.append(None)
                continue
            is_new = slot.id not in pool.mapped
            slots.append((slot.id, slot.size, is_new))
            if is_new:
                new.append((pool, slot))
        unmap = (self._in.unmap, self._out.unmap)
        self._in.unmap, self._out.unmap = [], []
        plans = [None if p is None else tuple(p) for p in plans]
        _send(sock, ("decode", ticket.id, slots[0], lengths, plans, slots[1], unmap), deadline)
        for pool, ids in zip((self._in, self._out), unmap):
            pool.mapped.difference_update(ids)
        for pool, slot in new:
            socket.send_fds(sock, [b"F"], [slot.fd])
            pool.mapped.add(slot.id)

    def _failed(self, e: BaseException, doing: str) -> None:
        """The protocol broke (``e``) while ``doing``: ends the child, settles every run in flight, re-raises
        what is not the child's fault (KeyboardInterrupt, MemoryError, ...)."""
        if isinstance(e, socket.timeout):
            if self._proc is not None:
                self._proc.kill()
            self._reap("timed out")
            self._crashed(DecoderCrashed(f"decoder process timed out after {self._run_timeout_s:g} s (killed)"))
            return
        if isinstance(e, (OSError, EOFError, pickle.UnpicklingError, ValueError, IndexError, TypeError)):
            reason = self._reap(f"{type(e).__name__}: {e}")
            self._crashed(DecoderCrashed(f"decoder process crashed ({reason})"))
            return
        # Interrupted mid-protocol: an answer may still be on its way, and the next run would read it as its
        # own. This child is never used again.
        if self._proc is not None:
            self._proc.kill()
        self._reap("interrupted")
        self._crashed(DecoderCrashed(f"decoder process interrupted while {doing}"))
        raise e

    def result(self, ticket: _Ticket) -> List[DecodeOutcome]:
        """The outcomes of a submitted run, pixels as views of shared memory. Raises ``DecoderCrashed`` when the
        process died, timed out or broke the protocol during the run (``lost=True``: before it started)."""
        with self._lock:
            while not ticket.done:
                self._read_answer()
            if ticket.crash is not None:
                raise ticket.crash
            meta, base = ticket.reply
            ticket.reply = None
        if base is None:
            return [DecodeOutcome(None, None, error) for _, _, _, error in meta]
        outcomes = []
        offset = 0
        for shape, dtype, decoder, error in meta:
            if shape is None:
                outcomes.append(DecodeOutcome(None, None, error))
                continue
            n = _nbytes(shape, dtype)
            outcomes.append(DecodeOutcome(base[offset : offset + n].view(dtype).reshape(shape), decoder, None))
            offset += n
        return outcomes

    def _read_answer(self) -> None:
        """Reads the answer to the oldest run in flight (or settles every run in flight when the child is gone)."""
        ticket = self._pending[0]
        # The child took this run when it answered the one before (or when this one came, if it was idle).
        deadline = max(ticket.submitted, self._last_answer) + self._run_timeout_s
        try:
            reply = _recv(self._sock, deadline, _MAX_REPLY)
            if reply[0] != "decoded" or reply[1] != ticket.id:
                raise EOFError(f"unexpected reply {reply[:2]!r} to run {ticket.id}")
            meta, self._builds_now, overflow, ticket.decode_s = reply[2], reply[3], reply[4], reply[5]
            if len(meta) != ticket.n:
                raise EOFError(f"{len(meta)} outcomes for {ticket.n} images")
            total = sum(_nbytes(shape, dtype) for shape, dtype, _, _ in meta if shape is not None)
            extra = None
            if overflow:
                _, fds, _, _ = socket.recv_fds(self._sock, 1, 1)
                if not fds:
                    raise EOFError("no buffer came with an overflowing answer")
                extra = self._out.adopt(fds[0], overflow)
            slot = extra if extra is not None else ticket.out
            if total > (0 if slot is None else slot.size):
                raise EOFError(f"{total} bytes of pixels announced for a buffer of {0 if slot is None else slot.size}")
        except BaseException as e:
            self._failed(e, "waiting for a run")
            return
        self._last_answer = time.monotonic()
        self._pending.popleft()
        if extra is not None and ticket.out is not None:
            ticket.out.run = None  # not written: free for the next run
        base = None
        if total:
            # The run's base array, and the slot's weak reference to it, before the slot stops being busy:
            # from then on its views keep it from reuse.
            base = np.frombuffer(slot.mm, dtype=np.uint8, count=total)
            slot.run = weakref.ref(base)
        self._release(ticket)
        ticket.reply = (meta, base)
        ticket.done = True

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                try:
                    _send(self._sock, ("close",))
                except OSError:
                    pass
            self._reap("closed")
            self._crashed(DecoderCrashed("decoder closed"))
            self._out.close()
            self._in.close()


def _nbytes(shape, dtype) -> int:
    return math.prod(shape) * np.dtype(dtype).itemsize



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
    maps: Dict[tuple, mmap.mmap] = {}  # (kind, slot id) -> its mapping; kind 0: input, 1: output

    def mapped(kind: int, slot) -> Optional[mmap.mmap]:
        if slot is None:
            return None
        slot_id, size, new = slot
        if new:
            _, fds, _, _ = socket.recv_fds(sock, 1, 1)
            old = maps.pop((kind, slot_id), None)
            if old is not None:
                old.close()
            maps[(kind, slot_id)] = mmap.mmap(fds[0], size, flags=mmap.MAP_SHARED,
                                              prot=mmap.PROT_READ | mmap.PROT_WRITE)
            os.close(fds[0])
        return maps[(kind, slot_id)]

    while True:
        try:
            message = _recv(sock)
        except EOFError:
            return
        if message[0] == "close":
            return
        _, run_id, in_slot, lengths, plans, out_slot, unmap = message
        for kind, ids in enumerate(unmap):
            for slot_id in ids:
                mm = maps.pop((kind, slot_id), None)
                if mm is not None:
                    mm.close()
        in_mm = mapped(0, in_slot)
        out_mm = mapped(1, out_slot)
        encoded = []
        offset = 0
        for n in lengths:  # views of the input slot: DALI copies what it is fed, Pillow reads them as they are
            encoded.append(np.frombuffer(in_mm, dtype=np.uint8, count=n, offset=offset) if n else b"")
            offset += n
        if crash_request is not None and any(crash_request[1] in bytes(blob) for blob in encoded):
            crash_request[0]()
        started = time.perf_counter()
        outcomes = decoder.decode(encoded, plans)
        decode_s = time.perf_counter() - started
        del encoded
        meta = [
            (None, None, None, o.error) if o.pixels is None else (tuple(o.pixels.shape), o.pixels.dtype.str,
                                                                   o.decoder, None)
            for o in outcomes
        ]
        total = sum(o.pixels.nbytes for o in outcomes if o.pixels is not None)
        overflow = None
        if total and (out_mm is None or total > len(out_mm)):
            fd = os.memfd_create(f"beam_tarimg-overflow-{run_id}", os.MFD_CLOEXEC)
            os.ftruncate(fd, total)
            overflow = (fd, mmap.mmap(fd, total, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE))
        if total:
            out = np.frombuffer(overflow[1] if overflow else out_mm, dtype=np.uint8)
            offset = 0
            for o in outcomes:
                if o.pixels is not None:
                    n = o.pixels.nbytes
                    np.copyto(out[offset : offset + n].view(o.pixels.dtype).reshape(o.pixels.shape), o.pixels)
                    offset += n
            del out
        del outcomes  # release DALI's output before the next run
        _send(sock, ("decoded", run_id, meta, decoder.builds, total if overflow else 0, decode_s))
        if overflow is not None:
            socket.send_fds(sock, [b"F"], [overflow[0]])
            overflow[1].close()
            os.close(overflow[0])


if __name__ == "__main__":
    _child_main(int(sys.argv[1]))
