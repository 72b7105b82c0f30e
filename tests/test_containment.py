"""The supervised decoder process: a native crash, an abort or a hang in the decoder costs only its image.

Real DALI in a real child process. The deterministic crashes are real signals raised inside the decoder
process, on request (``decoder_process.CRASH_TEST_ENV``: the process kills itself when a run holds an image with
given bytes), as browsers test their renderer crashes; ``test_decoder__real_dali_crasher_among_good_images``
uses a JPEG that really crashes DALI 2.4 in some batches.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from beam_tarimg.decode import ImageDecoder, claimed_bytes, plan_runs
from beam_tarimg.decoder_process import CRASH_TEST_ENV
from conftest import make_jpeg, pillow_rgb

MARKER = b"crash-me-please"


def _marked(jpeg: bytes, marker: bytes = MARKER) -> bytes:
    """A good JPEG with ``marker`` in a comment segment."""
    return jpeg[:2] + b"\xff\xfe" + (len(marker) + 2).to_bytes(2, "big") + marker + jpeg[2:]


def _decoder(monkeypatch, signal_name="SIGSEGV", marker=MARKER, **kwargs) -> ImageDecoder:
    monkeypatch.setenv(CRASH_TEST_ENV, f"{signal_name}:{marker.hex()}")
    kwargs.setdefault("max_batch_size", 16)
    return ImageDecoder(num_threads=2, device="cpu", **kwargs)


@pytest.mark.parametrize("signal_name", ["SIGSEGV", "SIGABRT", "SIGKILL"])
def test_decoder__a_crash_costs_only_the_image_that_caused_it(monkeypatch, signal_name):
    decoder = _decoder(monkeypatch, signal_name)
    blobs = [make_jpeg(i, 40 + i, 30) for i in range(16)]
    blobs[5] = _marked(blobs[5])
    outcomes = decoder.decode(blobs)
    assert outcomes[5].pixels is None
    assert outcomes[5].error == f"decoder process crashed ({signal_name})"
    for i, (blob, outcome) in enumerate(zip(blobs, outcomes)):
        if i != 5:
            assert outcome.decoder == "cpu" and np.array_equal(outcome.pixels, pillow_rgb(blob))
    # 16 -> 8 -> 4 -> 2 -> 1: each run holding the culprit killed its process; the rest were decoded again.
    assert decoder.crashes == 5
    # The decoder goes on in a new process.
    (again,) = decoder.decode([blobs[0]])
    assert np.array_equal(again.pixels, pillow_rgb(blobs[0]))


def test_decoder__several_culprits_in_one_batch_each_cost_only_themselves(monkeypatch):
    decoder = _decoder(monkeypatch)
    blobs = [make_jpeg(i) for i in range(12)]
    culprits = {0, 7, 11}
    for i in culprits:
        blobs[i] = _marked(blobs[i])
    outcomes = decoder.decode(blobs)
    assert {i for i, o in enumerate(outcomes) if o.pixels is None} == culprits
    assert all("SIGSEGV" in outcomes[i].error for i in culprits)
    for i in set(range(12)) - culprits:
        assert np.array_equal(outcomes[i].pixels, pillow_rgb(blobs[i]))


@pytest.mark.timeout(60)  # takes seconds; should the run timeout itself break, this fails, named, in a minute
def test_decoder__a_hung_decoder_process_is_killed_after_the_run_timeout(monkeypatch):
    # SIGSTOP freezes the decoder process mid-run, as a decoder stuck in a loop would be.
    decoder = _decoder(monkeypatch, "SIGSTOP", max_batch_size=4, run_timeout_s=2)
    blobs = [make_jpeg(i) for i in range(4)]
    blobs[2] = _marked(blobs[2])
    outcomes = decoder.decode(blobs)
    assert outcomes[2].pixels is None and outcomes[2].error == "decoder process timed out after 2 s (killed)"
    assert [o.pixels is not None for o in outcomes] == [True, True, False, True]
    assert decoder.crashes == 3  # 4 -> 2 -> 1


def test_decoder__the_decoder_process_dies_with_its_parent(tmp_path):
    script = (
        "import sys; sys.path.insert(0, 'tests')\n"
        "from beam_tarimg.decode import ImageDecoder\n"
        "d = ImageDecoder(max_batch_size=2, num_threads=1, device='cpu')\n"
        "print(d._process.pid, flush=True)\n"
        "import time; time.sleep(120)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        os.kill(child, 0)  # alive
    finally:
        parent.kill()
        parent.wait(timeout=30)
    for _ in range(100):
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        # A zombie is gone for good: its parent (the killed process) was reaped and it waits for init.
        with open(f"/proc/{child}/stat") as f:
            if f.read().split(") ", 1)[1].startswith("Z"):
                return
        time.sleep(0.1)
    pytest.fail("the decoder process outlived its parent by more than 10 s")


def test_decoder__outlives_the_thread_that_built_it():
    # Beam runs setup() on pool threads that come and go; the decoder process must stay with the process.
    import threading

    built = []
    thread = threading.Thread(target=lambda: built.append(ImageDecoder(max_batch_size=2, num_threads=1, device="cpu")))
    thread.start()
    thread.join()
    time.sleep(1.5)
    (outcome,) = built[0].decode([make_jpeg(1)])
    assert outcome.pixels is not None and built[0].crashes == 0


def test_decoder__shared_memory_is_reused_once_no_image_of_a_run_is_alive():
    decoder = ImageDecoder(max_batch_size=8, num_threads=2, device="cpu")
    blobs = [make_jpeg(i) for i in range(8)]
    for _ in range(20):
        outcomes = decoder.decode(blobs)
        assert np.array_equal(outcomes[3].pixels, pillow_rgb(blobs[3]))
        del outcomes
    assert len(decoder._process._slots) == 1
    kept = [decoder.decode(blobs) for _ in range(3)]  # runs whose images are kept hold their slots
    assert len(decoder._process._slots) == 3
    for outcomes in kept:
        assert all(np.array_equal(o.pixels, pillow_rgb(b)) for o, b in zip(outcomes, blobs))


def test_plan_runs__bounds_images_and_bytes_and_puts_a_larger_image_alone():
    assert plan_runs([10] * 7, max_images=3, max_bytes=1000) == [[0, 1, 2], [3, 4, 5], [6]]
    assert plan_runs([40, 40, 40, 10, 500, 10], max_images=10, max_bytes=100) == [[0, 1], [2, 3], [4], [5]]
    assert plan_runs([], max_images=3, max_bytes=10) == []


def test_decoder__runs_hold_at_most_the_budget_of_decoded_bytes():
    blobs = [make_jpeg(i, 200, 100) for i in range(10)]  # 60,000 bytes of pixels each
    assert claimed_bytes(blobs[0]) == 60_000
    decoder = ImageDecoder(max_batch_size=10, num_threads=2, device="cpu", max_run_bytes=840_000)
    runs = []
    for run, outcomes in decoder.decode_runs(blobs):
        runs.append(run)
        assert sum(o.pixels.nbytes for o in outcomes) <= 840_000 // 7  # planned at a seventh of the budget
        for i, o in zip(run, outcomes):
            assert np.array_equal(o.pixels, pillow_rgb(blobs[i]))
    assert runs == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    in_process = ImageDecoder(max_batch_size=10, num_threads=2, device="cpu", max_run_bytes=840_000,
                              isolation="none")  # a half: 420,000 bytes, seven images
    assert [run for run, _ in in_process.decode_runs(blobs)] == [[0, 1, 2, 3, 4, 5, 6], [7, 8, 9]]


def _vm_hwm_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_decoder__large_images_stay_within_the_run_budget_in_the_decoder_process():
    # 12 images of 2000x1500 (9 MB of pixels each, 108 MB in all) with a 64 MiB budget: runs are planned at a
    # seventh of it, so one image per run, and the decoder process's peak stays within the budget (DALI's buffers
    # and the three runs' shared memory in turn: the one written, the one waiting, the one held downstream).
    rng = np.random.default_rng(0)
    from beam_tarimg.sample import encode_jpeg, photo_like_image

    blobs = [encode_jpeg(photo_like_image(rng, 2000, 1500)) for _ in range(3)] * 4
    budget = 64 << 20
    decoder = ImageDecoder(max_batch_size=12, num_threads=2, device="cpu", max_run_bytes=budget)
    decoder.decode([make_jpeg(0)])
    before = _vm_hwm_kib(decoder._process.pid) * 1024
    for run, outcomes in decoder.decode_runs(blobs):
        assert len(run) == 1
        del outcomes
    grown = _vm_hwm_kib(decoder._process.pid) * 1024 - before
    assert grown <= budget, f"decoder process grew by {grown >> 20} MiB"


def test_decoder__isolation_none_decodes_in_this_process():
    decoder = ImageDecoder(max_batch_size=4, num_threads=2, device="cpu", isolation="none")
    blobs = [make_jpeg(i) for i in range(6)]
    outcomes = decoder.decode(blobs)
    assert all(np.array_equal(o.pixels, pillow_rgb(b)) for o, b in zip(outcomes, blobs))
    assert decoder.crashes == 0 and decoder.builds == 1


def _sof_component_count_2(seed: int) -> bytes:
    """Issue 9's crasher: a 64x48 JPEG whose only change is the SOF component count 3 -> 2."""
    jpeg = bytearray(make_jpeg(seed, 64, 48))
    sof = jpeg.index(b"\xff\xc0")
    assert jpeg[sof + 9] == 3
    jpeg[sof + 9] = 2
    return bytes(jpeg)


def test_decoder__real_dali_crasher_among_good_images():
    # Among 63 good images this mutant crashed DALI 2.4 in 3 of 4 runs (FIELD-NOTES). Whether or not it
    # crashes this time, every good image comes out exact and the mutant exactly once.
    decoder = ImageDecoder(max_batch_size=64, num_threads=2, device="cpu")
    blobs = [make_jpeg(1000 + i, 64, 48) for i in range(63)]
    blobs.insert(17, _sof_component_count_2(7))
    outcomes = decoder.decode(blobs)
    assert len(outcomes) == 64
    for i, (blob, outcome) in enumerate(zip(blobs, outcomes)):
        if i != 17:
            assert np.array_equal(outcome.pixels, pillow_rgb(blob)), i
    assert (outcomes[17].pixels is None) != (outcomes[17].error is None)


def test_decoder__bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="isolation"):
        ImageDecoder(max_batch_size=2, isolation="thread")
    with pytest.raises(ValueError, match="max_run_bytes"):
        ImageDecoder(max_batch_size=2, max_run_bytes=0)
    with pytest.raises(ValueError, match="run_timeout_s"):
        ImageDecoder(max_batch_size=2, run_timeout_s=0)


def test_decoder__ctrl_c_is_the_parents_to_handle(monkeypatch):
    decoder = ImageDecoder(max_batch_size=2, num_threads=1, device="cpu")
    os.kill(decoder._process.pid, signal.SIGINT)
    (outcome,) = decoder.decode([make_jpeg(1)])
    assert outcome.pixels is not None and decoder.crashes == 0


def test_decoder_process__a_batch_that_really_crashes_dali_is_reported_and_the_next_run_works():
    # jpeg.dali_rejects keeps these from DALI in normal use; here the check is bypassed (rejects all None)
    # to give DALI 2.4 what crashes it for real: 64 JPEGs with a stray SOI marker before the scan (crashed
    # 5 of 5 runs when measured). A run that survives is accepted; a crash must be reported, not fatal.
    from beam_tarimg.decoder_process import DecoderCrashed

    decoder = ImageDecoder(max_batch_size=64, num_threads=2, device="cpu", fallback=False)
    jpeg = make_jpeg(1, 64, 48)
    sos = jpeg.index(b"\xff\xda")
    crasher = jpeg[:sos] + b"\xff\xd8" + jpeg[sos:]
    crashed = 0
    for _ in range(3):
        try:
            decoder._process.decode([crasher] * 64, [None] * 64)
        except DecoderCrashed as e:
            assert str(e) == "decoder process crashed (SIGSEGV)" or "SIGABRT" in str(e), e
            crashed += 1
        (good,) = decoder.decode([jpeg])
        assert np.array_equal(good.pixels, pillow_rgb(jpeg))
    print(f"\n{crashed} of 3 runs of 64 stray-SOI JPEGs crashed the decoder process")


def test_decoder__refuses_without_decoding_what_claims_more_than_it_can_hold():
    jpeg = make_jpeg(40, 16, 16, grayscale=True, quality=75)
    sof = jpeg.index(b"\xff\xc0")
    bomb = jpeg[: sof + 5] + (9400).to_bytes(2, "big") + (9400).to_bytes(2, "big") + jpeg[sof + 9 :]
    big = make_jpeg(3, 300, 200)
    good = make_jpeg(1)
    decoder = ImageDecoder(max_batch_size=8, num_threads=2, device="cpu")  # 9400x9400 is under max_pixels
    out = decoder.decode([bomb, good])
    assert out[0].pixels is None and "claims 9400x9400" in out[0].error and out[0].error.startswith("not decoded")
    assert np.array_equal(out[1].pixels, pillow_rgb(good))
    small = ImageDecoder(max_batch_size=8, num_threads=2, device="cpu", max_pixels=50_000)
    out = small.decode([big, good])
    assert out[0].pixels is None and "max_pixels=50000" in out[0].error
    assert np.array_equal(out[1].pixels, pillow_rgb(good))
    assert decoder.builds == 1 and small.builds == 1  # nothing refused went to DALI


def test_decoder__works_after_a_process_wide_default_socket_timeout():
    # Beam's GCS auth calls socket.setdefaulttimeout(60): new sockets are then non-blocking underneath, and
    # the decoder process's socket with them, unless it says otherwise.
    import socket

    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(60)
    try:
        decoder = ImageDecoder(max_batch_size=8, num_threads=2, device="cpu")
        blobs = [make_jpeg(i, 300, 200) for i in range(8)]  # runs big enough to need more than one read
        for _ in range(3):
            outcomes = decoder.decode(blobs)
            assert all(np.array_equal(o.pixels, pillow_rgb(b)) for o, b in zip(outcomes, blobs))
        assert decoder.crashes == 0
    finally:
        socket.setdefaulttimeout(previous)


def test_decoder__a_run_interrupted_in_this_process_leaves_no_stale_reply_for_the_next():
    # Ctrl-C (here: a timer raising KeyboardInterrupt) while the parent waits for a run: the decoder process
    # may still answer that run later; the next run must get its own outcomes, not those.
    from beam_tarimg.sample import encode_jpeg, photo_like_image

    rng = np.random.default_rng(1)
    slow = [encode_jpeg(photo_like_image(rng, 2000, 1500)) for _ in range(2)] * 12  # ~1 s to decode
    decoder = ImageDecoder(max_batch_size=24, num_threads=1, device="cpu", max_run_bytes=1 << 30)

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    # SIGALRM is also the test's time limit (pytest-timeout): borrowed here, and given back with what was left.
    previous = signal.signal(signal.SIGALRM, interrupt)
    limit_left, _ = signal.getitimer(signal.ITIMER_REAL)
    start = time.monotonic()
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.1)
        with pytest.raises(KeyboardInterrupt):
            decoder.decode(slow)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if limit_left:
            signal.setitimer(signal.ITIMER_REAL, max(limit_left - (time.monotonic() - start), 0.001))
    small = [make_jpeg(i, 30 + i, 20) for i in range(6)]
    outcomes = decoder.decode(small)
    assert all(np.array_equal(o.pixels, pillow_rgb(b)) for o, b in zip(outcomes, small))
    assert decoder.crashes == 0


def test_decoder__a_types_py_in_the_users_folder_does_not_break_the_decoder_process(tmp_path):
    # A user's script, run from its own folder (which Python puts first on sys.path) next to a types.py that
    # shadows the standard library's; beam_tarimg imported from this source checkout through PYTHONPATH. The
    # decoder process must use the standard library's types, and still get its environment (the crash request).
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    (tmp_path / "types.py").write_text("raise ImportError('the user folder shadowed the standard library')\n")
    (tmp_path / "job.py").write_text(
        "import sys\n"
        "from beam_tarimg.decode import ImageDecoder\n"
        "from conftest import make_jpeg\n"
        "from test_containment import _marked\n"
        "decoder = ImageDecoder(max_batch_size=4, num_threads=1, device='cpu')\n"
        "outcomes = decoder.decode([make_jpeg(1, 40, 30), _marked(make_jpeg(2))])\n"
        "print('SHAPE', outcomes[0].pixels.shape, outcomes[0].decoder)\n"
        "print('CRASH', outcomes[1].error)\n"
    )
    env = {**os.environ, CRASH_TEST_ENV: f"SIGABRT:{MARKER.hex()}",
           "PYTHONPATH": os.pathsep.join([repo, os.path.join(repo, "tests")])}
    proc = subprocess.run([sys.executable, "job.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "SHAPE (30, 40, 3) cpu" in proc.stdout
    assert "CRASH decoder process crashed (SIGABRT)" in proc.stdout
