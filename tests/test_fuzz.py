"""The fuzz harness (``bench.fuzz``, ``make fuzz``): its mutators and accounting, a small seeded slice through the
decode core and the public job, and the issue's known crasher (real DALI on the CPU, the FnApiRunner)."""

from __future__ import annotations

import json
import sys
import time


from bench import fuzz
from bench import mutate as M
from conftest import make_jpeg, write_tar


def test_mutators__same_seed_gives_the_same_mutants_and_each_differs_from_every_base():
    a = fuzz.make_plan(seed=7, jpeg_mutants=120, tar_mutants=25)
    b = fuzz.make_plan(seed=7, jpeg_mutants=120, tar_mutants=25)
    assert a == b
    bases = {base.data for base in M.base_jpegs(7)}
    mutants = [it for it in a.items if it.kind != fuzz.GOOD]
    assert len(mutants) == 120 and len(a.tar_mutants) == 25
    assert all(it.data not in bases for it in mutants)
    assert all(it.data in bases for it in a.items if it.kind == fuzz.GOOD)
    assert len({it.kind for it in mutants}) >= 20 and set(it.kind for it in mutants) <= set(M.JPEG_KINDS)
    assert fuzz.make_plan(seed=8, jpeg_mutants=120, tar_mutants=25) != a


def test_mutators__sof_component_count_changes_that_byte_only():
    good = make_jpeg(0, width=64, height=48)
    bad = M.sof_component_count(good, 2)
    sof = next(i for i in range(len(good) - 1) if good[i] == 0xFF and good[i + 1] == 0xC0)
    diff = [i for i in range(len(good)) if good[i] != bad[i]]
    assert len(bad) == len(good) and diff == [sof + 9] and (good[sof + 9], bad[sof + 9]) == (3, 2)


def test_run_process__kills_a_hung_process_group_and_reports_the_hang(tmp_path):
    script = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    out, err = tmp_path / "out", tmp_path / "err"
    res = fuzz.run_process([sys.executable, "-c", script], 3.0, str(out), str(err))
    assert res.hung and res.returncode == -9 and res.seconds < 30
    grandchild = int(out.read_text().split()[0])
    deadline = time.monotonic() + 10
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(grandchild)  # killed with its process group


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def test_run_process__reports_a_segfault_as_its_signal(tmp_path):
    res = fuzz.run_process([sys.executable, "-c", "import ctypes; ctypes.string_at(0)"], 60.0,
                           str(tmp_path / "out"), str(tmp_path / "err"))
    assert (res.returncode, res.hung, fuzz.signal_name(res.returncode)) == (-11, False, "SIGSEGV")


def _plan(name, members, damage=None, kind="k"):
    return fuzz.TarPlan(name, kind, tuple(members), damage, {})


def test_account__every_member_once_and_a_tar_failure_covers_only_what_follows_the_damage():
    def m(name, offset, required=True, fuzzy=False):
        return M.ExpectedMember((name,), offset, required, fuzzy, None)

    plans = [
        _plan("a.tar", [m("1.jpg", 0), m("2.jpg", 1024), m("3.jpg", 2048)], damage=1024),
        _plan("b.tar", [m("1.jpg", 0), m("dup.jpg", 1024), m("dup.jpg", 2048)]),
        _plan("c.tar", [m("x.jpg", 0, fuzzy=True), m("y.jpg", 1024, required=False)]),
    ]
    rows = [("a.tar", "1.jpg", None), ("b.tar", "1.jpg", None), ("b.tar", "dup.jpg", None),
            ("c.tar", "caf%E9.jpg", None)]
    failures = [{"tar": "/in/a.tar", "member": None, "stage": "read", "error": "cut"},
                {"tar": "/in/b.tar", "member": "dup.jpg", "stage": "decode", "error": "bad"}]
    acc = fuzz.account(plans, rows, failures)
    assert (acc["lost"], acc["duplicated"], acc["unexplained"], acc["covered_by_tar_failure"]) == (0, 0, 0, 2)
    assert (acc["rows"], acc["failure_records"]) == (4, 1)

    # The damage point is a.tar's second member: its first member may not hide behind the tar failure.
    acc = fuzz.account(plans, rows[1:] + [("b.tar", "1.jpg", None)], failures)
    assert (acc["lost"], acc["duplicated"], acc["lost_by_kind"]) == (1, 1, {"k": 1})
    # A well-formed tar (no damage point): a tar failure covers nothing; an unknown name is unexplained.
    acc = fuzz.account(plans[1:], rows[1:3] + [("b.tar", "zzz.jpg", None)],
                       [{"tar": "b.tar", "member": None, "stage": "read", "error": "?"}])
    assert (acc["lost"], acc["unexplained"], acc["tar_failures_unexpected"]) == (2, 1, 1)


def test_fuzz__seeded_slice_through_the_decode_core_and_the_job_is_clean(tmp_path):
    """150 JPEG mutants and 30 tar mutants through both paths: no process death, no hang, nothing lost."""
    out = tmp_path / "report.json"
    rc = fuzz.main(["--seed", "1", "--jpeg-mutants", "150", "--tar-mutants", "30", "--job-timeout", "120",
                    "--core-timeout", "120", "--unchecked-batches", "2", "--skip-inputs", "--json", str(out)])
    r = json.loads(out.read_text())
    assert (r["jpeg_mutants"], r["tar_mutants"]) == (150, 30)
    assert sum(r["jpeg_mutants_by_kind"].values()) == 150 and sum(r["tar_mutants_by_kind"].values()) == 30
    assert r["core"]["batches"] == -(-(150 + 50) // 64) and not r["core"]["crashes"] and not r["core"]["hangs"]
    assert r["core"]["violations"] == []
    # The same inputs given to DALI unfiltered: whatever crashes DALI is contained, nothing else changes.
    unchecked = r["core_unchecked"]
    assert unchecked["batches"] == 2 and not unchecked["crashes"] and unchecked["violations"] == []
    assert r["job_runs"] == 2 and r["job_exit_codes"] == [0, 0] and r["hangs"] == 0
    assert (r["members_lost"], r["members_duplicated"], r["outputs_unexplained"]) == (0, 0, 0)
    jpeg_job = next(j for j in r["jobs"] if j["name"] == "jpeg-0")
    assert jpeg_job["accounting"]["rows"] + jpeg_job["accounting"]["failure_records"] == 200
    assert rc == 0 and r["verdict"] == "pass" and r["problems"] == []


def test_fuzz__seeded_slice_with_resize_on_decode_is_clean(tmp_path):
    """The same harness with ``--resize`` (Resize(64, crop=48), the job with ``--resize 64 --crop 48``): one
    outcome per input, good images equal to the Resize's Pillow path (within 2 levels where DALI decoded), no
    crash, nothing lost. Before the fix in Resize.geometry, seed 1's zero-width frames failed whole batches."""
    out = tmp_path / "report.json"
    rc = fuzz.main(["--seed", "1", "--resize", "--jpeg-mutants", "450", "--tar-mutants", "0", "--skip-inputs",
                    "--unchecked-batches", "1", "--job-timeout", "120", "--core-timeout", "120", "--json", str(out)])
    r = json.loads(out.read_text())
    assert r["resize"].startswith("Resize(size=64, crop=(48, 48)")
    assert r["jpeg_mutants_by_kind"]["sof_dimensions"] >= 1
    assert not r["core"]["crashes"] and not r["core"]["hangs"] and r["core"]["violations"] == []
    assert r["core_unchecked"]["violations"] == [] and not r["core_unchecked"]["crashes"]
    assert r["job_runs"] == 1 and r["job_exit_codes"] == [0] and r["hangs"] == 0
    assert (r["members_lost"], r["members_duplicated"], r["outputs_unexplained"]) == (0, 0, 0)
    assert rc == 0 and r["verdict"] == "pass" and r["problems"] == []


def test_job__sof_component_count_crasher_among_63_good_images_costs_only_itself(tmp_path):
    """The issue's crasher: a 64x48 JPEG whose SOF component count is 2 instead of 3, in one batch of 64 with
    63 good images, through ``python -m pipelines.tar_to_parquet``: exit 0, every good image pixel-exact, the
    mutant exactly once (a row or a failure)."""
    # First in its batch: on the code before containment this crashed the job in 3 of 4 runs measured.
    good = {f"{i:03d}.jpg": make_jpeg(100 + i, width=64, height=48) for i in range(1, 64)}
    crasher = M.sof_component_count(make_jpeg(100, width=64, height=48), 2)
    members = [("000.jpg", crasher)] + sorted(good.items())
    in_dir, out_dir = tmp_path / "in", tmp_path / "out"
    in_dir.mkdir()
    write_tar(in_dir / "crasher.tar", members)
    cmd = [sys.executable, "-m", "pipelines.tar_to_parquet", "--input", str(in_dir), "--output",
           str(out_dir / "images"), "--failures", str(out_dir / "failures.jsonl"), "--batch_size", "64",
           "--device", "cpu", "--runner", "FnApiRunner", "--image_format", "raw"]  # pixels, for read_outputs
    out_dir.mkdir()
    res = fuzz.run_process(cmd, 300.0, str(out_dir / "stdout.txt"), str(out_dir / "stderr.txt"))
    assert (res.returncode, res.hung) == (0, False), (out_dir / "stderr.txt").read_text()[-2000:]
    rows, failures, problems = fuzz.read_outputs(str(out_dir), {("crasher.tar", n): d for n, d in good.items()})
    assert problems == []
    by_member = {}
    for tar, member, pixels_ok in rows:
        assert tar == "crasher.tar"
        by_member.setdefault(member, []).append(pixels_ok)
    for name in good:
        assert by_member.get(name) == [True], name  # once, pixel-equal to Pillow's decode
    mutant_rows = by_member.get("000.jpg", [])
    mutant_failures = [f for f in failures if f["member"] == "000.jpg"]
    assert len(mutant_rows) + len(mutant_failures) == 1
    assert set(by_member) <= set(good) | {"000.jpg"}
    assert [f for f in failures if f["member"] != "000.jpg"] == []
