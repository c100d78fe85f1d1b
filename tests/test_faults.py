"""The fault catalogue of issue 18, as tests: bad inputs and faults beside a good participant.

sub-02 is the good participant (the whole head of conftest's ``dataset``: its outputs are the
golden list's sub-02 lines); the other participants carry the faults. The bad inputs, a full disk
and a read-only input tree share one run (``catalogue``: each fault is one participant of it);
faults of the participants' processes (killed from outside, two jobs at once, SIGTERM) have runs
of their own. Each case asserts the exit code, the message, that nothing is left half-written (no
temporary file; every image, transform and JSON reads whole), that the input is untouched, and
that the good participant's outputs are complete. Registrations are the fake engine's
(tests/fakes.py): the faults are in the plumbing, which a real engine does not change.
"""

from __future__ import annotations

import errno
import gzip
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import redirect_stderr
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import DATASET_POSES, TEST_TEMPLATE, tree_digest
from fakes import DyingEngines, FakeEngines

from bids_app.cli import main
from bids_app.errors import ExitCode
from bids_app.logs import output_to
from bids_app.outputs import derivatives as drv

SPACE = TEST_TEMPLATE
GOLDEN = Path(__file__).parent / "data" / "golden_outputs.txt"
TESTS = Path(__file__).parent
# Participants that are copies of conftest's sub-02 (a head) or sub-01 (a brain): their poses
# An oblique header: sub-02's head with its world turned by this rotation (sub-13's pose follows)
OBLIQUE = nib.affines.from_matvec(
    nib.eulerangles.euler2mat(z=np.radians(10), x=np.radians(15)), [4.0, -3.0, 2.0]
)
POSES = {"sub-02": DATASET_POSES["sub-02"], "sub-09": DATASET_POSES["sub-02"],
         "sub-11": DATASET_POSES["sub-01"], "sub-12": DATASET_POSES["sub-02"],
         "sub-13": DATASET_POSES["sub-02"] @ np.linalg.inv(OBLIQUE),
         "sub-14": DATASET_POSES["sub-02"]}  # fmt: skip


def _engines() -> FakeEngines:
    return FakeEngines({sub: np.linalg.inv(pose) for sub, pose in POSES.items()})


def _golden(subject: str) -> list[str]:
    """The golden list's files of conftest's sub-02, for ``subject`` (a copy of its head)."""
    lines = [line for line in GOLDEN.read_text().splitlines() if line and line[0] != "#"]
    mine = [line for line in lines if line.startswith("sub-02/") or line == "sub-02.html"]
    return sorted(line.replace("sub-02", f"sub-{subject}") for line in mine)


def _files(root: Path, subject: str | None = None) -> list[str]:
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    if subject is None:
        return files
    return [f for f in files if f.startswith(f"sub-{subject}/") or f == f"sub-{subject}.html"]


# ---- the dataset and the run ------------------------------------------------------------------


def _good_dataset(source: Path, root: Path) -> Path:
    """A dataset holding the good participant, sub-02."""
    root.mkdir()
    shutil.copy(source / "dataset_description.json", root)
    shutil.copytree(source / "sub-02", root / "sub-02")
    return root


@pytest.fixture
def bids(dataset, tmp_path) -> Path:
    return _good_dataset(dataset[0], tmp_path / "bids")


def _good_head(bids: Path) -> nib.Nifti1Image:
    return nib.load(bids / "sub-02" / "anat" / "sub-02_T1w.nii.gz")


def _t1w_path(bids: Path, subject: str) -> Path:
    folder = bids / f"sub-{subject}" / "anat"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"sub-{subject}_T1w.nii.gz"


def _copy_good(bids: Path, subject: str) -> None:
    shutil.copy(bids / "sub-02" / "anat" / "sub-02_T1w.nii.gz", _t1w_path(bids, subject))


ARGS = ["--output-spaces", SPACE, f"{SPACE}:res-2", "--preset", "fast", "--skip-bids-validation"]


def _run(bids: Path, out: Path, *extra: str, engines=None) -> tuple[int, str]:
    """``mninorm bids out participant`` in this process, as test_cli's session run; the console
    (what a user sees) as text."""
    console = bids.parent / f"{out.name}-console.txt"
    with open(console, "a") as stream, redirect_stderr(stream), output_to(console):
        code = main(
            [str(bids), str(out), "participant", *ARGS, *extra], engines=engines or _engines()
        )
    return code, console.read_text()


def _record(out: Path, subject: str) -> dict:
    return json.loads((out / f"sub-{subject}" / "log" / f"sub-{subject}_desc-mninorm_run.json")
                      .read_text())  # fmt: skip


def _assert_nothing_half_written(out: Path) -> None:
    """No temporary file of an atomic write; every file of a known kind reads whole."""
    import h5py

    files = [p for p in out.rglob("*") if p.is_file()]
    hidden = [p for p in files if p.name.startswith(".") and p.name != ".bidsignore"]
    assert not hidden and not [p for p in files if ".part" in p.name]
    for path in files:
        if path.name.endswith(".nii.gz"):
            assert np.isfinite(nib.load(path).get_fdata()).all(), path
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".h5":
            with h5py.File(path, "r") as handle:
                assert list(handle.keys()), path


def _assert_good_participant_complete(out: Path, subject: str = "02") -> None:
    assert _files(out, subject) == _golden(subject)
    assert _record(out, subject)["Status"] == "ok"


# ---- bad inputs, a full disk, a read-only tree: one run, one faulty participant each ------------


def _truncated(bids, subject):
    _copy_good(bids, subject)
    path = _t1w_path(bids, subject)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def _not_nifti(bids, subject):
    with gzip.open(_t1w_path(bids, subject), "wb") as handle:
        handle.write(b"a scanner export that is not an image")


def _four_d(bids, subject):
    head = _good_head(bids)
    data = np.asarray(head.dataobj)
    four_d = nib.Nifti1Image(np.stack([data, data], axis=-1), head.affine)
    four_d.to_filename(_t1w_path(bids, subject))


def _all_nan(bids, subject):
    head = _good_head(bids)
    nans = nib.Nifti1Image(np.full(head.shape, np.nan, np.float32), head.affine)
    nans.to_filename(_t1w_path(bids, subject))


def _all_zero(bids, subject):
    head = _good_head(bids)
    zeros = nib.Nifti1Image(np.zeros(head.shape, np.float32), head.affine)
    zeros.to_filename(_t1w_path(bids, subject))


def _no_orientation(bids, subject):
    """The catalogue's header: qform_code = sform_code = 0 and pixdim 0 (issue 18)."""
    head = _good_head(bids)
    img = nib.Nifti1Image(np.asarray(head.dataobj), head.affine)
    img.set_qform(None, code=0)
    img.set_sform(None, code=0)
    path = _t1w_path(bids, subject).with_suffix("")  # .nii: its header's bytes edited below
    img.to_filename(path)
    raw = bytearray(path.read_bytes())
    header = nib.Nifti1Header(bytes(raw[:348]))
    header["pixdim"][1:4] = 0.0
    raw[:348] = header.binaryblock
    path.write_bytes(bytes(raw))


def _mirrored_forms(bids, subject):
    head = _good_head(bids)
    img = nib.Nifti1Image(np.asarray(head.dataobj), head.affine)
    mirrored = head.affine.copy()
    mirrored[0, :] *= -1  # left and right swapped
    img.set_sform(head.affine, code=1)
    img.set_qform(mirrored, code=1)
    img.to_filename(_t1w_path(bids, subject))


def _no_t1w(bids, subject):
    folder = _t1w_path(bids, subject).parent
    _good_head(bids).to_filename(folder / f"sub-{subject}_T2w.nii.gz")


def _disk_fills(bids, subject):
    """A good image (conftest's skull-stripped sub-01: quicker than a head); the disk fills
    while its normalised images are written (``catalogue``)."""
    source = bids.parent / "source"
    name = "sub-01_ses-1_run-1_T1w.nii.gz"
    shutil.copy(source / "sub-01" / "ses-1" / "anat" / name, _t1w_path(bids, subject))


def _oblique(bids, subject):
    """sub-02's head with an oblique header (its world turned and moved): processed as it is."""
    head = _good_head(bids)
    nib.Nifti1Image(np.asarray(head.dataobj), OBLIQUE @ head.affine).to_filename(
        _t1w_path(bids, subject)
    )


def _thick_slabs(bids, subject):
    """sub-02's head as 10 mm slabs along its third axis (slices averaged in blocks): the same
    world, so the same pose; processed as it is."""
    head = _good_head(bids)
    data = np.asarray(head.dataobj, dtype=np.float32)
    block = max(2, round(10.0 / head.header.get_zooms()[2]))
    depth = data.shape[2] // block * block
    slabs = data[:, :, :depth].reshape(*data.shape[:2], -1, block).mean(axis=-1)
    affine = head.affine.copy()
    affine[:3, 3] += affine[:3, 2] * (block - 1) / 2  # a slab's centre is its slices' mean
    affine[:3, 2] *= block
    nib.Nifti1Image(slabs, affine).to_filename(_t1w_path(bids, subject))


# participants whose unusual input must be processed as any other: their outputs are complete
HELD = {"13": _oblique, "14": _thick_slabs}

# participant -> (how its input is made, what the console and its run record say)
CATALOGUE = {
    "03": (_truncated, "sub-03_T1w.nii.gz: the image data is truncated or corrupt"),
    "04": (_not_nifti, "sub-04_T1w.nii.gz: cannot be read as NIfTI"),
    "05": (_four_d, "sub-05_T1w.nii.gz: a T1w must be a 3D image"),
    "06": (_all_nan, "sub-06_T1w.nii.gz: every voxel is NaN or infinite"),
    "07": (_all_zero, "sub-07_T1w.nii.gz: every voxel has the value 0.0"),
    "08": (_no_orientation, "sub-08_T1w.nii: the header's voxel sizes (pixdim) are 0, 0, 0"),
    "09": (_mirrored_forms, "sub-09_T1w.nii.gz: the qform and sform are mirror images"),
    "10": (_no_t1w, "sub-10: no T1w image found"),
    "11": (_disk_fills, "[Errno 28] No space left on device"),
}


@pytest.fixture(scope="module")
def catalogue(dataset, tmp_path_factory):
    """One run, in this process (the writer is replaced there): every participant of
    ``CATALOGUE`` beside sub-02, the whole input tree without write permission. The disk "fills"
    while sub-11's normalised images are written: the atomic writer has half a file under its
    temporary name when the write raises ENOSPC (a 12 MB file system did the same)."""
    folder = tmp_path_factory.mktemp("catalogue")
    (folder / "source").symlink_to(dataset[0])
    bids = _good_dataset(dataset[0], folder / "bids")
    for subject, (make, _) in CATALOGUE.items():
        make(bids, subject)
    for subject, make in HELD.items():
        make(bids, subject)
    modes = {path: path.stat().st_mode for path in [bids, *bids.rglob("*")]}
    for path, mode in sorted(modes.items(), reverse=True):  # files before their folders
        path.chmod(mode & ~0o222)
    before, listing = tree_digest(bids), sorted(bids.rglob("*"))
    real_write_nifti = drv.write_nifti

    def write_nifti(img, path):
        if path.name.startswith("sub-11_space-"):
            with drv.atomic_path(path) as tmp:
                tmp.write_bytes(b"\x1f\x8b half an image")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))
        return real_write_nifti(img, path)

    out = folder / "out"
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(drv, "write_nifti", write_nifti)
            code, console = _run(bids, out, "--in-process")
        unchanged = tree_digest(bids) == before and sorted(bids.rglob("*")) == listing
        modes_kept = all(path.stat().st_mode == mode & ~0o222 for path, mode in modes.items())
    finally:
        for path, mode in modes.items():
            path.chmod(mode)
    return {"out": out, "code": code, "console": console, "input_unchanged": unchanged,
            "modes_kept": modes_kept, "bids": bids}  # fmt: skip


def test_catalogue_exits_1_and_the_good_participant_is_complete(catalogue):
    assert catalogue["code"] == ExitCode.PARTICIPANT_FAILED
    assert "Traceback" not in catalogue["console"]
    _assert_good_participant_complete(catalogue["out"])


@pytest.mark.parametrize("subject", sorted(HELD))
def test_an_oblique_header_or_thick_slabs_are_processed_whole(catalogue, subject):
    _assert_good_participant_complete(catalogue["out"], subject)
    record = _record(catalogue["out"], subject)
    assert record["SourceShape"] == list(nib.load(catalogue["bids"] / f"sub-{subject}" / "anat"
                                                  / f"sub-{subject}_T1w.nii.gz").shape)  # fmt: skip


def test_catalogue_leaves_nothing_half_written(catalogue):
    _assert_nothing_half_written(catalogue["out"])


def test_catalogue_never_writes_to_the_read_only_input(catalogue):
    """(As root the permissions are not enforced: then what shows it is that nothing in the tree
    changed, appeared or lost its read-only mode.)"""
    assert catalogue["input_unchanged"] and catalogue["modes_kept"]


@pytest.mark.parametrize("subject", sorted(CATALOGUE))
def test_catalogue_fault_fails_its_participant_with_a_one_line_message(catalogue, subject):
    make, message = CATALOGUE[subject]
    out, console = catalogue["out"], catalogue["console"]
    assert message in console
    if make is _no_t1w:
        return  # no T1w: nothing to record
    record = _record(out, subject)
    assert record["Status"] == "failed"
    assert message.split(": ", 1)[-1] in record["Error"] and "\n" not in record["Error"]
    assert not list((out / f"sub-{subject}").rglob("*_space-*.nii.gz"))  # nothing normalised


def test_no_orientation_header_names_the_repair(catalogue):
    """Issue 18: such a file was processed as if 1 mm and LAS, and reported a success."""
    line = next(line for line in catalogue["console"].splitlines() if "sub-08_T1w.nii: the" in line)
    assert "check left and right against the acquisition" in line and "sform" in line


def test_full_disk_says_what_to_do_and_keeps_what_was_written_whole(catalogue):
    record = _record(catalogue["out"], "11")
    assert "make room or fix the permissions" in record["Error"]
    # the native outputs were written before the disk filled: whole, and kept
    anat = catalogue["out"] / "sub-11" / "anat"
    assert (anat / "sub-11_desc-preproc_T1w.nii.gz").is_file()


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (lambda b, o: [b / "sub-02", o], ExitCode.INVALID_BIDS, "not a BIDS dataset"),
        (lambda b, o: [b, o, "--participant-label", "../sub-02"], ExitCode.NOTHING_MATCHED,
         "participant label(s) ../sub-02 not found"),
        (lambda b, o: [b, o, "--participant-label", "02/../../etc"], ExitCode.NOTHING_MATCHED,
         "not found"),
    ],
)  # fmt: skip
def test_no_dataset_or_a_label_with_path_characters_writes_nothing(
    bids, tmp_path, argv, code, message
):
    out = tmp_path / "out"
    bids_dir, out_dir, *extra = argv(bids, out)
    console_path = tmp_path / "console.txt"
    with open(console_path, "a") as stream, redirect_stderr(stream):
        result = main([str(bids_dir), str(out_dir), "participant", *ARGS, *extra])
    console = console_path.read_text()
    assert result == code and message in console and "Traceback" not in console
    assert not out.exists()


def _unwritable_by_a_file(tmp_path: Path) -> Path:
    """output_dir below a regular file: no one can create it, root included."""
    (tmp_path / "a-file").write_text("")
    return tmp_path / "a-file" / "out"


def _unwritable_by_permissions(tmp_path: Path) -> Path:
    if os.geteuid() == 0:
        pytest.skip("root writes whatever the permissions say (the case above covers root)")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    return locked / "out"


@pytest.mark.parametrize("where", [_unwritable_by_a_file, _unwritable_by_permissions])
def test_an_unwritable_output_folder_is_one_line_before_any_work(bids, tmp_path, where):
    out = where(tmp_path)
    code, console = _run(bids, out, "--in-process")
    assert code == ExitCode.PARTICIPANT_FAILED
    assert f"cannot write in output_dir {out}" in console and "Traceback" not in console
    assert "started" not in console  # no participant began


def test_mem_mb_refuses_a_participant_that_alone_needs_more(bids, tmp_path):
    """The fake dataset's tiny images still need the model's fixed part (~1.2 GiB): with
    --mem-mb 1000 none may start, and each says why, where the reports read it."""
    _copy_good(bids, "09")
    out = tmp_path / "out"
    code, console = _run(bids, out, "--in-process", "--mem-mb", "1000")
    assert code == ExitCode.PARTICIPANT_FAILED
    assert "too large to start: sub-02, sub-09" in console
    for subject in ("02", "09"):
        assert f"sub-{subject}_T1w.nii.gz: FAILED: not started: it needs about" in console
        record = _record(out, subject)
        assert record["Status"] == "failed" and "more than --mem-mb 1000" in record["Error"]
        assert not list((out / f"sub-{subject}").rglob("*.nii.gz"))  # nothing was computed
    _assert_nothing_half_written(out)


# ---- participants' processes: killed from outside, two jobs at once, SIGTERM ----------------
# Each participant's process takes tens of seconds to start on a loaded machine: slow.


@pytest.mark.slow
def test_a_killed_participant_process_fails_alone_within_the_memory_plan(bids, tmp_path):
    """SIGKILL in the middle of writing an output, as the out-of-memory killer sends it: the
    process cannot clean up; the parent reports it and removes what it left half-written. The
    run has a memory plan: with --mem-mb 2000, one participant at a time."""
    _copy_good(bids, "09")
    out = tmp_path / "out"
    poses = {sub: np.linalg.inv(pose) for sub, pose in POSES.items()}
    code, console = _run(
        bids, out, "--nthreads", "2", "--omp-nthreads", "1", "--mem-mb", "2000",
        engines=DyingEngines(["sub-09"], out, poses),
    )  # fmt: skip
    assert code == ExitCode.PARTICIPANT_FAILED
    plan = next(line for line in console.splitlines() if "memory plan" in line)
    assert "--mem-mb 2000" in plan and "up to 1 at a time (the threads allow 2)" in plan
    assert "sub-09/anat/sub-09_T1w.nii.gz: FAILED: the participant's process died" in console
    assert "--mem-mb" in console.split("process died", 1)[1]  # what to do about it
    _assert_nothing_half_written(out)
    assert "sub-09: removed " in console and "being_written" in console  # the cleaning happened
    assert not list((out / "sub-09").rglob("*being_written*"))
    _assert_good_participant_complete(out)
    assert multiprocessing.active_children() == []  # no process left behind


# A job as a user starts it, with the fake engine: ``python -c JOB tests poses.json argv...``
JOB = """
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from fakes import FakeEngines
from bids_app.cli import main
poses = {k: np.array(v) for k, v in json.loads(open(sys.argv[2]).read()).items()}
sys.exit(main(sys.argv[3:], engines=FakeEngines(poses)))
"""


def _start_job(bids: Path, out: Path, tmp_path: Path, *extra: str, log: Path) -> subprocess.Popen:
    poses = tmp_path / "poses.json"
    poses.write_text(json.dumps({s: np.linalg.inv(p).tolist() for s, p in POSES.items()}))
    argv = [str(bids), str(out), "participant", *ARGS, "--nthreads", "2", "--omp-nthreads", "1",
            *extra]  # fmt: skip
    return subprocess.Popen(
        [sys.executable, "-c", JOB, str(TESTS), str(poses), *argv],
        stdout=subprocess.DEVNULL, stderr=open(log, "w"),  # noqa: SIM115 - the job's own file
        env={**os.environ, "TMPDIR": str(tmp_path / "tmp")},
    )  # fmt: skip


@pytest.mark.slow
def test_two_jobs_into_one_output_folder_both_finish_whole(bids, tmp_path):
    """Two jobs at once on the same participants (a resubmitted cluster job beside the first):
    every file is written whole by one of them; the shared files agree."""
    _copy_good(bids, "09")
    (tmp_path / "tmp").mkdir()
    out = tmp_path / "out"
    jobs = [_start_job(bids, out, tmp_path, log=tmp_path / f"job{i}.txt") for i in (1, 2)]
    codes = [job.wait(timeout=600) for job in jobs]
    assert codes == [ExitCode.OK, ExitCode.OK], [(tmp_path / f"job{i}.txt").read_text()
                                                  for i in (1, 2)]  # fmt: skip
    _assert_nothing_half_written(out)
    for subject in ("02", "09"):
        _assert_good_participant_complete(out, subject)
    assert json.loads((out / "dataset_description.json").read_text())["DatasetType"] == "derivative"
    assert not list((tmp_path / "tmp").iterdir())  # both temporary work folders removed


@pytest.mark.slow
def test_sigterm_stops_the_run_cleanly_and_a_rerun_completes_it(bids, tmp_path):
    """SIGTERM to the command only (``docker stop``, ``kill PID``): it ends its participants'
    processes, starts no other, removes its temporary folder and exits 130; a re-run finishes.
    Three participants, two threads, memory for one: one runs, one waits for memory, one waits
    for a thread (a real run with more participants than threads once hung there)."""
    _copy_good(bids, "09")
    _copy_good(bids, "12")
    (tmp_path / "tmp").mkdir()
    out, log = tmp_path / "out", tmp_path / "job.txt"
    job = _start_job(bids, out, tmp_path, "--mem-mb", "2000", log=log)
    deadline = time.monotonic() + 300
    while "started: sub-" not in log.read_text():
        assert job.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)
    job.send_signal(signal.SIGTERM)
    assert job.wait(timeout=120) == ExitCode.INTERRUPTED
    console = log.read_text()
    assert "interrupted" in console and "Traceback" not in console
    assert "sub-09/anat/sub-09_T1w.nii.gz failed: not started: the run was interrupted" in console
    assert "sub-12 [3/3] started" not in console and "3/3 participants done" not in console
    _assert_nothing_half_written(out)
    assert not list((tmp_path / "tmp").iterdir())  # the temporary work folder is gone
    settled = _files(out)
    time.sleep(3)
    assert _files(out) == settled  # no participant's process goes on writing

    code, console = _run(bids, out, "--in-process")
    assert code == ExitCode.OK, console
    _assert_nothing_half_written(out)
    for subject in ("02", "09", "12"):
        _assert_good_participant_complete(out, subject)
