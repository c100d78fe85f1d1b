"""The scale benchmark (``python -m benchmarks scale``): indexing a large dataset and resuming a
finished run, on this machine, each measured in a fresh process.

- ``index``: a BIDS dataset of ``--participants`` participants of tiny T1w files (one 4x4x4
  image each); the time ``collect_t1w`` takes for ``--requested`` of them without a saved index,
  with ``--bids-database-dir`` the first time (it indexes and saves) and the second time (it
  reads), and, with ``--whole``, pybids indexing the whole dataset (what the participant level did
  before indexing only the requested participants).
- ``resume``: ``--resume-participants`` skull-stripped participants (nilearn's brain at 4 mm,
  each moved a little) on a miniature TemplateFlow made of the same brain, run with the tests'
  fake engine (``tests/fakes.py``: no registration) and then again three ways: unchanged (every
  T1w must be skipped: its run record's identifier unchanged), with another preset (every T1w
  redone), with one input changed (that one redone).
- ``group``: ``--group-participants`` synthetic participants' outputs on the
  ``--group-resolution`` mm grid (``benchmarks/synth_group.py``; at most ``--group-distinct``
  distinct ones, the rest hard links to them under new labels), and the real group level run
  on them end to end (``mninorm ... group``; with ``--group-compare``, ``--group-by group
  --n-permutations 0``) with each ``--group-workers`` count as ``--nthreads`` (wall time, CPU
  time, peak memory of the process tree).
- ``dask``: the same participants' first run with the local executor (``--nthreads 2
  --omp-nthreads 1``) and on a Dask LocalCluster of 2 single-threaded worker processes with
  mninorm's worker settings (wall time, CPU time, complete participants, exit code); with
  ``--dask-defaults``, once more with Dask's default settings; with ``--dask-kill-after S``, once
  more with one worker process killed S seconds in; ``--dask-repeats N`` runs the first two N
  times each, alternating; ``--dask-side-by-side`` runs the local executor and a one-worker
  cluster (one participant at a time each) at the same time. The resume part's synthetic
  participants and the fake engine, or, with ``--dask-dataset DIR``, the first
  ``--dask-participants`` of a real BIDS dataset with the real engine and ``--dask-preset``.

Results: ``<out>/scale.json`` and the lines printed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TINY_SHAPE = (4, 4, 4)
RESUME_TEMPLATE = "MNI152NLin2009aSym"
RESUME_GRID_MM = 4.0


def _labels(count: int) -> list[str]:
    return [f"{i + 1:04d}" for i in range(count)]


# ---- indexing ---------------------------------------------------------------------------------


def make_tiny_dataset(root: Path, participants: int) -> None:
    import nibabel as nib

    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(
        json.dumps({"Name": "scale benchmark", "BIDSVersion": "1.9.0", "DatasetType": "raw"})
    )
    tiny = root / ".tiny.nii.gz"
    nib.Nifti1Image(np.ones(TINY_SHAPE, np.int16), np.eye(4)).to_filename(tiny)
    data = tiny.read_bytes()
    tiny.unlink()
    lines = ["participant_id\tage"]
    for label in _labels(participants):
        anat = root / f"sub-{label}" / "anat"
        anat.mkdir(parents=True, exist_ok=True)
        (anat / f"sub-{label}_T1w.nii.gz").write_bytes(data)
        (anat / f"sub-{label}_T1w.json").write_text('{"RepetitionTime": 2.3}\n')
        lines.append(f"sub-{label}\t30")
    (root / "participants.tsv").write_text("\n".join(lines) + "\n")


_INDEX_CHILD = """
import sys, time, json
from pathlib import Path
start = time.perf_counter()
from bids_app.participant.discovery import collect_t1w
imported = time.perf_counter()
labels = tuple(json.loads(sys.argv[2]))
database = Path(sys.argv[3]) if sys.argv[3] != "-" else None
if sys.argv[4] == "whole":
    from bids import BIDSLayout
    layout = BIDSLayout(sys.argv[1], validate=True, database_path=None)
    found = len(layout.get(suffix="T1w", extension=[".nii", ".nii.gz"]))
else:
    selection = collect_t1w(Path(sys.argv[1]), labels, validate=True, database_dir=database)
    found = sum(len(t) for t in selection.t1w_by_subject.values())
end = time.perf_counter()
print(json.dumps({"seconds": end - imported, "import_seconds": imported - start, "t1w": found}))
"""


def _time_index(root: Path, labels, database: Path | None, mode: str = "selected") -> dict:
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", _INDEX_CHILD, str(root), json.dumps(list(labels)),
         str(database) if database else "-", mode],
        capture_output=True, text=True, check=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_seconds"] = time.perf_counter() - start
    return result


def bench_index(out: Path, participants: int, requested: int, whole: bool) -> dict:
    root = out / f"bids_{participants}"
    if not (root / "participants.tsv").is_file():
        shutil.rmtree(root, ignore_errors=True)
        started = time.perf_counter()
        make_tiny_dataset(root, participants)
        print(
            f"dataset of {participants} participants made in {time.perf_counter() - started:.1f} s"
        )
    database = out / "index_db"
    shutil.rmtree(database, ignore_errors=True)
    labels = _labels(participants)[:: max(1, participants // requested)][:requested]
    rows = {
        "no saved index": _time_index(root, labels, None),
        "--bids-database-dir, first call (indexes, saves)": _time_index(root, labels, database),
        "--bids-database-dir, second call (reads)": _time_index(root, labels, database),
    }
    if whole:
        rows["whole dataset indexed (pybids default)"] = _time_index(root, (), None, "whole")
    for name, row in rows.items():
        print(
            f"index {requested} of {participants}: {name}: {row['seconds']:.2f} s "
            f"(process {row['process_seconds']:.1f} s, {row['t1w']} T1w)"
        )
    return {"participants": participants, "requested": requested, "rows": rows}


# ---- resume -----------------------------------------------------------------------------------


def _brain(grid_mm: float):
    import nibabel as nib
    import nilearn.datasets
    from nibabel.processing import resample_from_to

    path = (
        Path(nilearn.datasets.__file__).parent
        / "data"
        / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    )
    brain = nib.load(str(path))
    shape = tuple(int(np.ceil(s / grid_mm)) for s in brain.shape)
    affine = brain.affine @ np.diag([grid_mm, grid_mm, grid_mm, 1.0])
    return resample_from_to(brain, (shape, affine), order=1)


def make_resume_inputs(out: Path, participants: int) -> tuple[Path, Path]:
    """A miniature TemplateFlow (the brain, with a mask) and a dataset of moved copies."""
    import nibabel as nib

    templateflow = out / "templateflow"
    folder = templateflow / f"tpl-{RESUME_TEMPLATE}"
    brain = _brain(RESUME_GRID_MM)
    data = np.asarray(brain.dataobj, dtype=np.float32)
    if not folder.is_dir():
        folder.mkdir(parents=True)
        nib.Nifti1Image(data, brain.affine).to_filename(
            folder / f"tpl-{RESUME_TEMPLATE}_res-01_T1w.nii.gz"
        )
        mask = (data > 0.2 * data.max()).astype(np.uint8)
        nib.Nifti1Image(mask, brain.affine).to_filename(
            folder / f"tpl-{RESUME_TEMPLATE}_res-01_desc-brain_mask.nii.gz"
        )
        (folder / "template_description.json").write_text(
            json.dumps(
                {
                    "Identifier": RESUME_TEMPLATE,
                    "Name": "scale benchmark miniature",
                    "TemplateFlowVersion": "bench",
                }
            )  # fmt: skip
        )
    root = out / "resume_bids"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text(
        json.dumps({"Name": "resume benchmark", "BIDSVersion": "1.9.0", "DatasetType": "raw"})
    )
    rng = np.random.default_rng(0)
    for label in _labels(participants):
        affine = brain.affine.copy()
        affine[:3, 3] += rng.uniform(-4, 4, 3)  # each participant a little elsewhere
        anat = root / f"sub-{label}" / "anat"
        anat.mkdir(parents=True)
        nib.Nifti1Image(data, affine).to_filename(anat / f"sub-{label}_T1w.nii.gz")
    return templateflow, root


_RESUME_CHILD = """
import sys, time, json
sys.path.insert(0, sys.argv[1])
from fakes import FakeEngines
from bids_app.cli import main
start = time.perf_counter()
code = main(json.loads(sys.argv[2]), engines=FakeEngines())
print(json.dumps({"code": int(code), "seconds": time.perf_counter() - start}))
"""


def _mninorm(root: Path, out: Path, templateflow: Path, *extra: str) -> dict:
    argv = [str(root), str(out), "participant", "--output-spaces", RESUME_TEMPLATE,
            "--preset", "fast", "--nthreads", "2", "--omp-nthreads", "1",
            "--skip-bids-validation", "-q", *extra]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", _RESUME_CHILD, str(ROOT / "tests"), json.dumps(argv)],
        capture_output=True, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "TEMPLATEFLOW_HOME": str(templateflow),
             "TEMPLATEFLOW_AUTOUPDATE": "0"},
    )  # fmt: skip
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"mninorm failed ({done.returncode}): {done.stderr[-2000:]}")
    result = json.loads(lines[-1])
    result["process_seconds"] = time.perf_counter() - start
    return result


def _run_ids(out: Path) -> dict:
    return {
        path.parent.parent.name: json.loads(path.read_text())["RunUUID"]
        for path in sorted(out.glob("sub-*/log/*_desc-mninorm_run.json"))
    }


def bench_resume(out: Path, participants: int) -> dict:
    templateflow, root = make_resume_inputs(out, participants)
    results = out / "resume_out"
    shutil.rmtree(results, ignore_errors=True)
    rows = {"first run": _mninorm(root, results, templateflow)}
    first = _run_ids(results)
    rows["unchanged"] = _mninorm(root, results, templateflow)
    unchanged = _run_ids(results)
    rows["unchanged"]["redone"] = sorted(s for s in first if unchanged[s] != first[s])
    rows["--preset precise"] = _mninorm(root, results, templateflow, "--preset", "precise")
    precise = _run_ids(results)
    rows["--preset precise"]["redone"] = sorted(s for s in first if precise[s] != unchanged[s])
    changed = root / "sub-0003" / "anat" / "sub-0003_T1w.nii.gz"
    import nibabel as nib

    img = nib.load(changed)
    data = np.asarray(img.dataobj, dtype=np.float32)
    data[0, 0, 0] += 1.0
    nib.Nifti1Image(data, img.affine).to_filename(changed)
    rows["one input changed"] = _mninorm(root, results, templateflow, "--preset", "precise")
    last = _run_ids(results)
    rows["one input changed"]["redone"] = sorted(s for s in first if last[s] != precise[s])
    for name, row in rows.items():
        redone = row.get("redone")
        what = "" if redone is None else f"; redone: {len(redone)} ({', '.join(redone[:3])})"
        print(
            f"resume, {participants} participants, {name}: {row['seconds']:.1f} s in mninorm "
            f"({row['seconds'] / participants:.2f} s per participant; process "
            f"{row['process_seconds']:.1f} s; exit {row['code']}){what}"
        )
    return {"participants": participants, "rows": rows}


# The fake engine's command for the executors' comparison: its exit code is mninorm's
_FAKE_CHILD = _RESUME_CHILD + "sys.exit(int(code))\n"
LOCAL_EXECUTOR = "local executor, --nthreads 2 --omp-nthreads 1"
LOCAL_CLUSTER = "LocalCluster, 2 workers of 1 thread"


@dataclass(frozen=True)
class DaskRuns:
    """What the ``dask`` part runs: ``participants`` of ``dataset`` (the real engine; ``None``:
    the resume part's synthetic ones and the fake engine) with ``preset``; the local executor
    and a LocalCluster with mninorm's worker settings ``repeats`` times each, in the order
    local, cluster, cluster, local, ... (so that a drift of the machine's speed during the runs
    falls on both alike); ``defaults``: a run on a LocalCluster with Dask's own settings;
    ``kill_after``: a run whose worker is killed that many seconds in; ``side_by_side``: the
    local executor and a one-worker LocalCluster, one participant at a time each, run at the
    same time on the same participants (each into its own folder), so that both see the same
    machine: a drift of its speed, which shifts runs made one after the other, falls on both."""

    participants: int
    dataset: Path | None = None
    preset: str = "fast"
    kill_after: float | None = None
    defaults: bool = False
    repeats: int = 1
    side_by_side: bool = False


def bench_dask(out: Path, runs: DaskRuns) -> dict:
    """The participants' first runs of ``runs`` (``DaskRuns``), each into a fresh output folder
    (``TEMPLATEFLOW_HOME`` as set, else ``../shared/data/templateflow``)."""
    saved = dict(os.environ)
    try:
        return _bench_dask(out, runs)
    finally:  # the later parts see the environment they were given
        os.environ.clear()
        os.environ.update(saved)


def _bench_dask(out: Path, runs: DaskRuns) -> dict:
    dataset, preset = runs.dataset, runs.preset
    if dataset is None:
        templateflow, root = make_resume_inputs(out, runs.participants)
        labels = _labels(runs.participants)
    else:
        root = Path(dataset).resolve()
        labels = _dataset_labels(root)[: runs.participants]
        templateflow = Path(
            os.environ.get("TEMPLATEFLOW_HOME") or ROOT.parent / "shared" / "data" / "templateflow"
        )
    # The workers inherit this environment: this checkout (and, for the fake engine, tests/ to
    # unpickle it) on their paths, the same templates
    paths = (str(ROOT),) if dataset is not None else (str(ROOT), str(ROOT / "tests"))
    os.environ.update(PYTHONPATH=os.pathsep.join(paths), TEMPLATEFLOW_HOME=str(templateflow),
                      TEMPLATEFLOW_AUTOUPDATE="0")  # fmt: skip
    if dataset is None:
        sys.path.insert(0, str(ROOT / "tests"))

    def command(results: Path, *extra: str, nthreads: int = 2) -> list[str]:
        argv = [str(root), str(results), "participant", "--participant-label", *labels,
                "--preset", preset, "--nthreads", str(nthreads), "--omp-nthreads", "1",
                "--skip-bids-validation", *extra]  # fmt: skip
        if dataset is not None:
            return [sys.executable, "-m", "bids_app", *argv]
        argv += ["--output-spaces", RESUME_TEMPLATE]
        return [sys.executable, "-c", _FAKE_CHILD, str(ROOT / "tests"), json.dumps(argv)]

    rows = {}
    for repeat, executor in alternating(runs.repeats):
        name, suffix = (LOCAL_CLUSTER, "cluster") if executor else (LOCAL_EXECUTOR, "local")
        if runs.repeats > 1:
            name, suffix = f"{name}, run {repeat + 1}", f"{suffix}_{repeat + 1}"
        row = _run_executor(out, f"dask_{suffix}", command, labels, cluster=executor)
        rows[name] = {**row, "executor": "cluster" if executor else "local"}
    if runs.defaults:
        rows[f"{LOCAL_CLUSTER}, Dask's default settings"] = _run_executor(
            out, "dask_defaults", command, labels, cluster=True, dask_defaults=True
        )
    if runs.kill_after is not None:
        rows[f"{LOCAL_CLUSTER}, one killed after {runs.kill_after:g} s"] = _run_executor(
            out, "dask_killed", command, labels, cluster=True, kill_after=runs.kill_after
        )
    if runs.side_by_side:
        rows.update(_run_side_by_side(out, command, labels))
    what = f"{root.name}, preset {preset}" if dataset is not None else "synthetic, fake engine"
    for name, row in rows.items():
        print(
            f"dask, {len(labels)} participants ({what}), {name}: {row['seconds']:.1f} s "
            + (f"(CPU {row['cpu_seconds']:.1f} s) " if row["cpu_seconds"] is not None else "")
            + f"(participants' own {row['participant_seconds']:.1f} s); "
            f"{row['complete']}/{len(labels)} complete; "
            f"exit {row['code']}" + (f"; killed {row['killed']}" if row.get("killed") else "")
        )
        for line in row["failures"]:
            print(f"    {line}")
    means = executor_means(rows)
    if runs.repeats > 1:
        print(f"dask, mean of {runs.repeats} runs each: " + "; ".join(
            f"{name} {mean['seconds']:.1f} s (participants' own {mean['participant_seconds']:.1f})"
            for name, mean in means.items()
        ))  # fmt: skip
    return {"participants": len(labels), "dataset": str(root) if dataset is not None else None,
            "engine": "real" if dataset is not None else "fake", "preset": preset,
            "repeats": runs.repeats, "rows": rows, "means": means}  # fmt: skip


def executor_means(rows: dict) -> dict:
    """Per executor, the mean wall time and participants' own time of its plain runs (not the
    killed one nor the one with Dask's defaults)."""
    means = {}
    for executor in ("local", "cluster"):
        plain = [row for row in rows.values() if row.get("executor") == executor]
        if plain:
            means[executor] = {
                key: round(sum(row[key] for row in plain) / len(plain), 1)
                for key in ("seconds", "participant_seconds")
            }
    return means


SIDE_LOCAL = "side by side: local executor, --nthreads 1 --omp-nthreads 1"
SIDE_CLUSTER = "side by side: LocalCluster, 1 worker of 1 thread"


def _run_side_by_side(out: Path, command, labels) -> dict:
    """The local executor and the cluster at the same time, one participant at a time each, on
    the same participants: wall time, participants' own time, complete, exit code (no CPU
    time: the two share the machine's)."""
    from concurrent.futures import ThreadPoolExecutor

    from benchmarks.measure import run_measured

    names = {SIDE_LOCAL: "side_local", SIDE_CLUSTER: "side_cluster"}
    for name in names.values():
        shutil.rmtree(out / f"{name}_out", ignore_errors=True)
    with _local_cluster(workers=1) as cluster, ThreadPoolExecutor(2) as pool:
        extra = {SIDE_LOCAL: (), SIDE_CLUSTER: ("--dask-scheduler", cluster.scheduler_address)}
        measured = {
            row: pool.submit(
                run_measured, command(out / f"{name}_out", *extra[row], nthreads=1),
                env=dict(os.environ), log_path=out / f"{name}.log", timeout_s=6 * 3600,
            )
            for row, name in names.items()
        }  # fmt: skip
        return {row: _row(measured[row].result(), out, name, labels) for row, name in names.items()}


def alternating(repeats: int) -> list[tuple[int, bool]]:
    """(repeat, on the cluster) in the order local, cluster, cluster, local, local, ..."""
    order = []
    for repeat in range(repeats):
        pair = [False, True] if repeat % 2 == 0 else [True, False]
        order += [(repeat, cluster) for cluster in pair]
    return order


def _dataset_labels(root: Path) -> list[str]:
    return sorted(p.name.removeprefix("sub-") for p in root.glob("sub-*") if p.is_dir())


def _run_executor(
    out: Path, name: str, command, labels, cluster: bool = False,
    kill_after: float | None = None, dask_defaults: bool = False,
) -> dict:  # fmt: skip
    """One run of ``command`` into a fresh ``<out>/<name>_out``, measured: wall time of the
    command; CPU time of every process it (and, with ``cluster``, the LocalCluster started for it
    and closed after it) ran and waited for; participants whose every run record ends ``ok``;
    exit code; the log's failure lines."""
    import resource

    from benchmarks.measure import run_measured

    results, log_path = out / f"{name}_out", out / f"{name}.log"
    shutil.rmtree(results, ignore_errors=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    killed: dict = {}
    with _local_cluster(dask_defaults) if cluster else contextlib.nullcontext() as local_cluster:
        extra = ("--dask-scheduler", local_cluster.scheduler_address) if cluster else ()
        timer = None
        if kill_after is not None:
            timer = threading.Timer(kill_after, _kill_a_worker, (local_cluster, killed))
            timer.start()
        measured = run_measured(command(results, *extra), env=dict(os.environ),
                                log_path=log_path, timeout_s=6 * 3600)  # fmt: skip
        if timer is not None:
            timer.cancel()
    # (closed: its worker processes reaped, their CPU time counted)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    row = _row(measured, out, name, labels, cpu_seconds=round(cpu, 1))
    if killed:
        row["killed"] = killed
    return row


def _row(measured, out: Path, name: str, labels, cpu_seconds: float | None = None) -> dict:
    """The figures of one run named ``name`` (outputs in ``<out>/<name>_out``, its log in
    ``<out>/<name>.log``), as ``scale.json`` keeps them."""
    results, log_path = out / f"{name}_out", out / f"{name}.log"
    return {
        "seconds": round(measured.wall_s, 1), "cpu_seconds": cpu_seconds,
        "complete": len(complete_participants(results, labels)), "code": measured.returncode,
        "participant_seconds": participant_seconds(results),
        "failures": failure_lines(log_path), "log": str(log_path),
    }  # fmt: skip


@contextlib.contextmanager
def _local_cluster(dask_defaults: bool = False, workers: int = 2):
    import dask
    import distributed

    from bids_app.scheduler import CLUSTER_CONFIG

    # For the first workers and for those the nannies start again after a kill (the whole
    # cluster's life); a daemonic worker may not start the participant's process at all
    config = {"distributed.worker.daemon": False} if dask_defaults else CLUSTER_CONFIG
    with dask.config.set(config):
        cluster = distributed.LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
        )
        try:
            yield cluster
        finally:
            cluster.close()


def _kill_a_worker(cluster, killed: dict) -> None:
    """SIGKILL one worker process of ``cluster`` (one running a task if any), noting which."""
    import distributed

    try:
        with distributed.Client(cluster.scheduler_address, timeout=60) as client:
            processing = client.processing()
            busy = [address for address, keys in processing.items() if keys]
            pids = client.run(os.getpid)
            victim = (busy or sorted(pids))[0]
            os.kill(pids[victim], signal.SIGKILL)
            running = sorted(str(key) for key in processing.get(victim, ()))
            killed.update(worker=victim, pid=pids[victim], running=running)
    except Exception as err:  # noqa: BLE001 - the row says the kill did not happen, and why
        killed["error"] = f"{type(err).__name__}: {err}"


def participant_seconds(results: Path) -> float:
    """The sum of the run records' own times (``TotalSeconds``): the participants' work, without
    the executor's (starting processes, scheduling)."""
    total = 0.0
    for record in results.glob("sub-*/log/*_desc-mninorm_run.json"):
        total += json.loads(record.read_text()).get("TotalSeconds") or 0.0
    return round(total, 1)


def complete_participants(results: Path, labels) -> list[str]:
    """The labels whose run records (at least one) all say ``Status: ok`` with an end time."""
    complete = []
    for label in labels:
        records = sorted((results / f"sub-{label}" / "log").glob("*_desc-mninorm_run.json"))
        contents = [json.loads(path.read_text()) for path in records]
        if contents and all(c.get("Status") == "ok" and c.get("EndTime") for c in contents):
            complete.append(label)
    return complete


FAILURE_WORDS = ("FAILED", "failed", "ERROR", "Error", "KilledWorker")


def failure_lines(log_path: Path, limit: int = 20) -> list[str]:
    """The log's lines that report a failure (at most ``limit``)."""
    if not log_path.is_file():
        return []
    lines = log_path.read_text(errors="replace").splitlines()
    return [line.strip() for line in lines if any(w in line for w in FAILURE_WORDS)][:limit]


def make_group_inputs(
    out: Path, participants: int, resolution: int = 2, distinct: int = 100
) -> tuple[Path, Path]:
    """(bids folder, output folder) of ``participants`` synthetic participant outputs on the
    ``resolution`` mm grid: at most ``distinct`` ones written by benchmarks/synth_group.py (that
    takes seconds each), the rest their files hard-linked under new labels (the run record and
    QC table rewritten with the label): every participant is read and decompressed in full."""
    unique = min(participants, distinct)
    source = out / f"group_res-{resolution}_distinct-{unique}"
    if not (source / "out" / "synthetic_truth.json").is_file():
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / "synth_group.py"), "make",
             str(source / "bids"), str(source / "out"), "--participants", str(unique),
             "--space", f"MNI152NLin6Asym:res-{resolution}"],
            check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        print(f"{unique} synthetic participants written in {time.perf_counter() - started:.0f} s")
    cohort = out / f"group_res-{resolution}_{participants}"
    bids, results = cohort / "bids", cohort / "out"
    if (bids / "participants.tsv").is_file():
        return bids, results
    shutil.rmtree(cohort, ignore_errors=True)
    sources = sorted(path.name.removeprefix("sub-") for path in (source / "out").glob("sub-*"))
    groups = ["participant_id\tgroup"]
    for index, label in enumerate(_labels(participants)):
        _link_participant(source / "out", sources[index % unique], results, label)
        groups.append(f"sub-{label}\t{'AB'[index % 2]}")
    bids.mkdir(parents=True)
    (bids / "dataset_description.json").write_text(
        json.dumps({"Name": "scale benchmark, group level", "BIDSVersion": "1.9.0"})
    )
    (bids / "participants.tsv").write_text("\n".join(groups) + "\n")
    return bids, results


def _link_participant(source_out: Path, old: str, results: Path, new: str) -> None:
    for path in sorted((source_out / f"sub-{old}").rglob("*")):
        if not path.is_file():
            continue
        relative = str(path.relative_to(source_out)).replace(f"sub-{old}", f"sub-{new}")
        target = results / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix in (".json", ".tsv"):
            target.write_text(path.read_text().replace(f"sub-{old}", f"sub-{new}"))
        else:
            os.link(path, target)


def bench_group(out: Path, participants: int, resolution: int = 2,
                workers: tuple[int, ...] = (1, 2), compare: bool = False,
                distinct: int = 100) -> dict:  # fmt: skip
    """The real group level (``mninorm BIDS OUT group``: the mean/SD maps, the table and the
    report; with ``compare``, ``--group-by group --n-permutations 0`` adds the parametric t maps
    and the model stage, which loads every participant's maps) on synthetic participant outputs
    on MNI152NLin6Asym's ``resolution`` mm grid, with each ``workers`` as ``--nthreads``; wall
    time and peak memory of the whole process tree (benchmarks/measure.py)."""
    from benchmarks.measure import run_measured

    bids, results = make_group_inputs(out, participants, resolution, distinct)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.setdefault("TEMPLATEFLOW_HOME", str(ROOT.parent / "shared" / "data" / "templateflow"))
    rows = {}
    for count in workers:
        argv = [sys.executable, "-m", "bids_app", str(bids), str(results), "group",
                "--nthreads", str(count)]  # fmt: skip
        if compare:
            argv += ["--group-by", "group", "--n-permutations", "0"]
        name = f"group_res-{resolution}_{participants}{'_compare' if compare else ''}_{count}"
        measured = run_measured(
            argv, env=env, log_path=out / f"{name}.log",
            timeout_s=3600,
        )  # fmt: skip
        rows[f"--nthreads {count}"] = row = {
            "seconds": measured.wall_s, "cpu_seconds": measured.cpu_s,
            "peak_mb_process_tree": measured.peak_rss_mb, "code": measured.returncode,
            "command": " ".join(argv[1:]), "check_seconds": _check_seconds(out / f"{name}.log"),
        }  # fmt: skip
        checked = row["check_seconds"]
        print(
            f"group level{', --group-by' if compare else ''}, {participants} participants on the "
            f"{resolution} mm grid, --nthreads "
            f"{count}: {row['seconds']:.0f} s (CPU {row['cpu_seconds']:.0f} s); peak memory of "
            f"the process tree {row['peak_mb_process_tree']:.0f} MB; exit {row['code']}"
            + (f"; files checked in {checked:.1f} s" if checked is not None else "")
        )
    return {"participants": participants, "resolution_mm": resolution, "group_by": compare,
            "distinct_participants": min(participants, distinct), "rows": rows}  # fmt: skip


def _check_seconds(log_path: Path) -> float | None:
    """The seconds the group level's log says the check of the files took (summed over spaces)."""
    import re

    found = re.findall(r"checked the files of \d+ T1w .* in ([0-9.]+) s", log_path.read_text())
    return round(sum(float(s) for s in found), 1) if found else None


def run(out: Path, parts: list[str], participants: int, requested: int, whole: bool,
        resume_participants: int, group_participants: int = 1000, group_resolution: int = 2,
        group_workers: tuple[int, ...] = (1, 2), group_compare: bool = False,
        group_distinct: int = 100, dask: DaskRuns | None = None) -> int:  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "scale.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    if "index" in parts:
        results["index"] = bench_index(out, participants, requested, whole)
    if "resume" in parts:
        results["resume"] = bench_resume(out, resume_participants)
    if "dask" in parts:
        dask = dask or DaskRuns(resume_participants)
        results["dask" if dask.dataset is None else "dask_real"] = bench_dask(out, dask)
    if "group" in parts:
        key = f"group_res-{group_resolution}_{group_participants}" + (
            "_group-by" if group_compare else ""
        )
        results[key] = bench_group(
            out, group_participants, group_resolution, group_workers, group_compare,
            group_distinct,
        )
    results_path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results in {results_path}")
    return 0
