"""The scale benchmark's Dask part (benchmarks/scale.py), its plumbing only: a stand-in command
that writes run records instead of mninorm, measured with the local executor's and the
LocalCluster's bookkeeping, and a worker of a real LocalCluster killed mid-run. (The part itself,
on the synthetic cohort or a real dataset, takes minutes: docs/scale.md has its command.)"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("psutil")
from benchmarks import scale  # noqa: E402
from benchmarks.__main__ import build_parser  # noqa: E402

# Writes a run record per participant (sub-02's failed), prints a failure line, burns a little CPU
# and exits with mninorm's "a participant failed" code
_STAND_IN = """
import json, sys, time
from pathlib import Path
out = Path(sys.argv[1])
for label, status in (("01", "ok"), ("02", "failed")):
    log = out / f"sub-{label}" / "log"
    log.mkdir(parents=True)
    (log / f"sub-{label}_desc-mninorm_run.json").write_text(
        json.dumps({"Status": status, "EndTime": "2026-01-01T00:00:00"}))
print("sub-02 [2/2] FAILED in 1 s")
end = time.process_time() + 0.5
while time.process_time() < end:
    pass
time.sleep(float(sys.argv[2]))
if len(sys.argv) > 4:  # --dask-scheduler ADDRESS: are its workers (a restarted one too) daemonic?
    import multiprocessing, distributed
    with distributed.Client(sys.argv[4]) as client:
        client.wait_for_workers(2, timeout=60)
        daemonic = client.run(lambda: multiprocessing.current_process().daemon)
    print("daemonic workers:", sum(daemonic.values()), "of", len(daemonic))
sys.exit(1)
"""


def _command(sleep: float):
    def command(results: Path, *extra: str) -> list[str]:
        return [sys.executable, "-c", _STAND_IN, str(results), str(sleep), *extra]

    return command


def test_a_run_is_measured_and_its_participants_counted(tmp_path):
    row = scale._run_executor(tmp_path, "local", _command(0.0), ["01", "02", "03"])
    assert row["code"] == 1
    assert row["complete"] == 1  # 01 ok; 02 failed; 03 never ran
    assert row["failures"] == ["sub-02 [2/2] FAILED in 1 s"]
    assert row["cpu_seconds"] >= 0.4  # the child's, counted once it is reaped
    assert row["seconds"] >= 0.4
    assert "killed" not in row


def test_complete_needs_every_record_ok_and_ended(tmp_path):
    records = {"01": [("ok", "t")], "02": [("ok", "t"), ("failed", "t")], "03": [("ok", None)]}
    for label, contents in records.items():
        log = tmp_path / f"sub-{label}" / "log"
        log.mkdir(parents=True)
        for run, (status, end) in enumerate(contents):
            (log / f"sub-{label}_run-{run}_desc-mninorm_run.json").write_text(
                json.dumps({"Status": status, "EndTime": end})
            )
    assert scale.complete_participants(tmp_path, ["01", "02", "03", "04"]) == ["01"]


def test_a_worker_of_the_cluster_is_killed_mid_run_and_restarted_non_daemonic(tmp_path):
    pytest.importorskip("distributed")
    row = scale._run_executor(
        tmp_path, "killed", _command(6.0), ["01", "02"], cluster=True, kill_after=2.0
    )
    killed = row["killed"]
    assert "error" not in killed, killed
    assert killed["worker"].startswith("tcp://") and killed["pid"] != os.getpid()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(killed["pid"]):
        time.sleep(0.1)
    assert not _alive(killed["pid"])
    assert row["code"] == 1 and row["complete"] == 1
    # the worker the nanny started again may start a participant's process, as the first ones
    assert "daemonic workers: 0 of 2" in Path(row["log"]).read_text()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_the_dask_options_reach_the_part():
    args = build_parser().parse_args([
        "scale", "--parts", "dask", "--dask-dataset", "/data/ds", "--dask-participants", "2",
        "--dask-preset", "precise", "--dask-kill-after", "30", "--dask-repeats", "2",
    ])  # fmt: skip
    assert args.parts == ["dask"] and args.dask_dataset == Path("/data/ds")
    assert (args.dask_participants, args.dask_preset, args.dask_kill_after) == (2, "precise", 30.0)
    assert args.dask_repeats == 2


def test_repeated_runs_alternate_so_a_drift_falls_on_both_executors():
    order = scale.alternating(3)
    assert order == [(0, False), (0, True), (1, True), (1, False), (2, False), (2, True)]
    for repeats in (2, 4):  # an even count: a linear drift adds the same total to each executor
        order = scale.alternating(repeats)
        drift = [sum(i for i, (_, c) in enumerate(order) if c == on) for on in (False, True)]
        assert drift[0] == drift[1] > 0 and len(order) == 2 * repeats


def test_the_means_are_over_the_plain_runs_only():
    rows = {
        "a": {"executor": "local", "seconds": 10.0, "participant_seconds": 8.0},
        "b": {"executor": "local", "seconds": 12.0, "participant_seconds": 9.0},
        "c": {"executor": "cluster", "seconds": 11.0, "participant_seconds": 9.0},
        "killed": {"seconds": 99.0, "participant_seconds": 1.0},
    }
    assert scale.executor_means(rows) == {
        "local": {"seconds": 11.0, "participant_seconds": 8.5},
        "cluster": {"seconds": 11.0, "participant_seconds": 9.0},
    }


# Notes when it ran, its --nthreads and --dask-scheduler, and a run record of 2 s of own time
_SIDE_STAND_IN = """
import json, sys, time
from pathlib import Path
out, argv = Path(sys.argv[1]), sys.argv[2:]
began = time.time()
time.sleep(1.0)
log = out / "sub-01" / "log"
log.mkdir(parents=True)
(log / "sub-01_desc-mninorm_run.json").write_text(
    json.dumps({"Status": "ok", "EndTime": "t", "TotalSeconds": 2.0}))
(out / "ran.json").write_text(json.dumps({"began": began, "ended": time.time(), "argv": argv}))
"""


def test_side_by_side_runs_both_executors_at_the_same_time(tmp_path):
    pytest.importorskip("distributed")

    def command(results: Path, *extra: str, nthreads: int = 2) -> list[str]:
        return [sys.executable, "-c", _SIDE_STAND_IN, str(results), "--nthreads", str(nthreads),
                *extra]  # fmt: skip

    rows = scale._run_side_by_side(tmp_path, command, ["01"])
    assert set(rows) == {scale.SIDE_LOCAL, scale.SIDE_CLUSTER}
    ran = {
        name: json.loads((tmp_path / f"{name}_out" / "ran.json").read_text())
        for name in ("side_local", "side_cluster")
    }
    local, cluster = ran["side_local"], ran["side_cluster"]
    assert local["began"] < cluster["ended"] and cluster["began"] < local["ended"]  # overlapped
    assert local["argv"] == ["--nthreads", "1"]
    assert cluster["argv"][:3] == ["--nthreads", "1", "--dask-scheduler"]
    for row in rows.values():
        assert (row["code"], row["complete"], row["participant_seconds"]) == (0, 1, 2.0)
        assert row["cpu_seconds"] is None and row["seconds"] >= 1.0
