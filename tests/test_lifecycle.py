"""The decoder process's life cycle: shared-memory slots after their runs are released, the decoder process's
end when its parent dies mid-run, and one decoder shared by several threads.

Real DALI in a real child process; a long run is the real decoder process stalled on request
(``decoder_process.CRASH_TEST_ENV`` with ``STALL``), as the crash tests make it crash on request.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from beam_tarimg.decode import ImageDecoder
from beam_tarimg.decoder_process import CRASH_TEST_ENV
from conftest import make_jpeg, pillow_rgb
from test_containment import MARKER, _marked


def _slots_mapped_in(pid: int) -> set:
    """The shared-memory slot ids that process ``pid`` has mapped (memfds named ``beam_tarimg-<id>``)."""
    with open(f"/proc/{pid}/maps") as f:
        return {int(m) for m in re.findall(r"/memfd:beam_tarimg-(\d+)", f.read())}


def test_decoder_process__free_slots_beyond_the_budget_are_unmapped_in_both_processes():
    # max_run_bytes=112 MiB: runs are planned at 16 MiB (a seventh), and free slots are kept for reuse up to
    # that, not beyond. Small runs each take a slot of the minimum size, 16 MiB.
    decoder = ImageDecoder(max_batch_size=8, num_threads=1, device="cpu", max_run_bytes=112 << 20)
    process = decoder._process
    blobs = [make_jpeg(i) for i in range(8)]
    kept = [decoder.decode(blobs) for _ in range(3)]  # three runs alive: three slots in use
    slots = dict(process._slots)
    assert sorted(slots) == [0, 1, 2] and {s.size for s in slots.values()} == {16 << 20}
    assert _slots_mapped_in(process.pid) == {0, 1, 2}
    for outcomes in kept:
        assert all(np.array_equal(o.pixels, pillow_rgb(b)) for o, b in zip(outcomes, blobs))

    del kept, outcomes  # all three free: 48 MiB held for reuse, over the 16 MiB budget
    first = decoder.decode(blobs)  # takes one; of the other two, one (16 MiB) may stay free
    assert len(process._slots) == 2
    assert sum(s.size for s in process._slots.values() if s.free) == 16 << 20
    (victim,) = set(slots) - set(process._slots)
    assert slots[victim].mm.closed  # unmapped here at once

    del first
    again = decoder.decode(blobs)  # the next run tells the decoder process to unmap it too
    assert all(np.array_equal(o.pixels, pillow_rgb(b)) for o, b in zip(again, blobs))
    assert _slots_mapped_in(process.pid) == set(process._slots) == set(slots) - {victim}
    assert decoder.crashes == 0


def _gone_or_zombie(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:  # a zombie is gone for good: its parent is dead and it waits for init to reap it
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1].startswith("Z")
    except FileNotFoundError:
        return True


def test_decoder_process__ends_within_seconds_when_its_parent_dies_mid_run(monkeypatch):
    # Busy in a run, the decoder process does not read its socket, so the closed socket cannot end it: only
    # its watch on the parent pid does.
    monkeypatch.setenv(CRASH_TEST_ENV, f"STALL:{MARKER.hex()}")
    script = (
        "import sys\n"
        "from beam_tarimg.decode import ImageDecoder\n"
        "d = ImageDecoder(max_batch_size=2, num_threads=1, device='cpu')\n"
        "print(d._process.pid, flush=True)\n"
        "d.decode([bytes.fromhex(sys.argv[1])])\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script, _marked(make_jpeg(1)).hex()], stdout=subprocess.PIPE,
                              text=True)
    child = None
    try:
        child = int(parent.stdout.readline())
        time.sleep(1.5)  # the run reaches the decoder process within milliseconds; it stalls there
        assert parent.poll() is None and not _gone_or_zombie(child)
        parent.kill()
        parent.wait(timeout=30)
        killed = time.monotonic()
        while not _gone_or_zombie(child):
            if time.monotonic() - killed > 5.0:
                pytest.fail("the decoder process, busy in a run, outlived its parent by more than 5 s")
            time.sleep(0.05)
        print(f"\ndecoder process gone {time.monotonic() - killed:.2f} s after its parent")
    finally:
        if parent.poll() is None:
            parent.kill()
        if child is not None and not _gone_or_zombie(child):
            os.kill(child, signal.SIGKILL)


@pytest.mark.parametrize("isolation", ["process", "none"])
def test_decoder__threads_sharing_one_decoder_get_exact_outputs_and_no_crash(isolation):
    # What every DoFn of a worker process does with its one shared decoder (transforms._SharedDecoder).
    # A run here takes milliseconds: a short run timeout ends a thread stuck waiting for a reply another took.
    decoder = ImageDecoder(max_batch_size=4, num_threads=1, device="cpu", isolation=isolation, run_timeout_s=10)
    corpus = [make_jpeg(300 + i, 32 + i % 7, 24 + i % 5) for i in range(24)]
    reference = [pillow_rgb(b) for b in corpus]
    n_threads = 4
    barrier = threading.Barrier(n_threads)
    results = [[] for _ in range(n_threads)]
    errors = []

    def work(t: int) -> None:
        try:
            mine = list(range(t, len(corpus), n_threads))
            barrier.wait()
            for rep in range(4):
                size = 2 + (t + rep) % 5  # calls of 2..6 images: one DALI run or two
                for s in range(0, len(mine), size):
                    chunk = mine[s : s + size]
                    for i, o in zip(chunk, decoder.decode([corpus[i] for i in chunk])):
                        results[t].append((i, o.decoder, None if o.pixels is None else o.pixels.copy(), o.error))
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,), daemon=True) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    assert not any(th.is_alive() for th in threads), "a decode call did not return"
    assert not errors, errors
    assert decoder.crashes == 0
    for t in range(n_threads):
        assert len(results[t]) == 4 * len(range(t, len(corpus), n_threads))
        for i, name, pixels, error in results[t]:
            assert (name, error) == ("cpu", None), (i, name, error)
            assert np.array_equal(pixels, reference[i]), i
    decoder.close()
