"""Resume (bids_app/participant/resume.py): a re-run skips the T1ws whose outputs are complete and
unchanged, and redoes exactly the others (changed preset, changed input, killed or damaged run)."""

from __future__ import annotations

import gzip
import json
import shutil
import time
from pathlib import Path

import pytest
from conftest import TEST_TEMPLATE, dataset_engines, logging_restored

from bids_app.cli import main
from bids_app.errors import ExitCode
from bids_app.participant.resume import file_sha256

# The run record (under the output folder) of each T1w of sub-01: two runs of a skull-stripped
# brain (no brain extraction: each T1w takes seconds with the fake engine)
T1WS = {
    "run-1": "sub-01/log/sub-01_ses-1_run-1_desc-mninorm_run.json",
    "run-2": "sub-01/log/sub-01_ses-1_run-2_desc-mninorm_run.json",
}


class CountingEngines:
    """The dataset's fake engines, counting the registrations asked of them (in this process)."""

    def __init__(self):
        self.engines = dataset_engines()
        self.calls = 0

    def __call__(self, name, threads=1):
        engine = self.engines(name, threads)
        register = engine.register

        def counted(*args, **kwargs):
            self.calls += 1
            return register(*args, **kwargs)

        engine.register = counted
        return engine


# The output-affecting settings of conftest's session run (``run``), whose outputs the first run
# here is: a re-run with them has nothing to redo.
SPACES = [TEST_TEMPLATE, f"{TEST_TEMPLATE}:res-2"]


def _mninorm(root: Path, out: Path, *extra: str, engines=None) -> tuple[int, CountingEngines]:
    engines = engines or CountingEngines()
    with logging_restored():
        code = main(
            [str(root), str(out), "participant", "--participant-label", "01",
             "--output-spaces", *SPACES, "--preset", "fast", "--nthreads", "1",
             "--skip-bids-validation", "--in-process", *extra],
            engines=engines,
        )  # fmt: skip
    return code, engines


def _run_ids(out: Path) -> dict:
    return {name: json.loads((out / path).read_text())["RunUUID"] for name, path in T1WS.items()}


@pytest.fixture(scope="module")
def first(run):
    """One complete first run: the session's (conftest's ``run``, with the fake engine, as here),
    read only; the tests change copies of its outputs (``copy``) and of its input."""
    record = json.loads((run["out"] / T1WS["run-1"]).read_text())
    assert record["Status"] == "ok" and record["Resume"]["Settings"]["OutputSpaces"] == SPACES
    return run["root"], run["out"]


@pytest.fixture
def copy(first, tmp_path):
    """The first run's outputs, copied so that each test changes its own."""
    root, out = first
    shutil.copytree(out, tmp_path / "out")
    return root, tmp_path / "out"


def test_the_run_record_holds_the_input_hash_and_the_output_settings(first):
    root, out = first
    record = json.loads((out / T1WS["run-2"]).read_text())
    resume = record["Resume"]
    t1w = root / "sub-01/ses-1/anat/sub-01_ses-1_run-2_T1w.nii.gz"
    assert resume["InputSHA256"] == {"T1w": file_sha256(t1w)}
    assert resume["Settings"]["Preset"] == "fast"
    assert resume["Settings"]["OutputSpaces"] == SPACES
    assert record["EndTime"]


def test_an_unchanged_rerun_registers_nothing_and_writes_nothing(copy, capfd):
    root, out = copy
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    start = time.perf_counter()
    code, engines = _mninorm(root, out)
    seconds = time.perf_counter() - start
    assert code == ExitCode.OK
    assert engines.calls == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    assert seconds < 1.0 * len(T1WS) + 3  # <= 1 s per T1w, plus the command's start
    summary = [line for line in capfd.readouterr().err.splitlines() if "_T1w.nii.gz: ok (" in line]
    assert len(summary) == len(T1WS)
    assert all("unchanged since its last run: skipped" in line for line in summary)


@pytest.mark.slow
def test_a_changed_preset_redoes_every_t1w(copy):
    root, out = copy
    before = _run_ids(out)
    code, engines = _mninorm(root, out, "--preset", "precise", engines=None)
    # The fake engine takes 'precise' too: every T1w ran again, under the new run's identifier.
    assert code == ExitCode.OK
    after = _run_ids(out)
    assert all(after[name] != before[name] for name in T1WS)
    record = json.loads((out / T1WS["run-1"]).read_text())
    assert record["Resume"]["Settings"]["Preset"] == "precise"


def test_a_changed_input_file_redoes_that_t1w_only(copy, tmp_path):
    root, out = copy
    changed = tmp_path / "bids"
    shutil.copytree(root, changed)
    t1w = changed / "sub-01/ses-1/anat/sub-01_ses-1_run-2_T1w.nii.gz"
    import nibabel as nib

    img = nib.load(t1w)
    data = img.get_fdata()
    data[0, 0, 0] += 1.0  # one voxel: the content hash changes, the file name does not
    nib.Nifti1Image(data, img.affine, img.header).to_filename(t1w)
    before = _run_ids(out)
    code, engines = _mninorm(changed, out)
    assert code == ExitCode.OK
    after = _run_ids(out)
    assert {name for name in T1WS if after[name] != before[name]} == {"run-2"}
    assert engines.calls > 0


def test_a_killed_run_and_a_truncated_output_are_redone(copy):
    root, out = copy
    # A run killed after its start record: the record has no end time.
    record_path = out / T1WS["run-1"]
    record = json.loads(record_path.read_text())
    del record["EndTime"]
    record_path.write_text(json.dumps(record))
    # An output cut short (a disk that filled up, a copy that stopped).
    image = (
        out / "sub-01/ses-1/anat/sub-01_ses-1_run-2_space-MNI152NLin2009aSym_desc-brain_mask.nii.gz"
    )
    raw = gzip.decompress(image.read_bytes())
    image.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    before = _run_ids(out)
    code, _ = _mninorm(root, out)
    assert code == ExitCode.OK
    after = _run_ids(out)
    assert {name for name in T1WS if after[name] != before[name]} == {"run-1", "run-2"}
    assert len(gzip.decompress(image.read_bytes())) == len(raw)


@pytest.mark.slow
def test_a_missing_output_is_redone_and_rerun_redoes_everything(copy):
    root, out = copy
    (out / "sub-01/ses-1/anat/sub-01_ses-1_run-2_desc-brain_mask.json").unlink()
    before = _run_ids(out)
    _mninorm(root, out)
    middle = _run_ids(out)
    assert {name for name in T1WS if middle[name] != before[name]} == {"run-2"}
    code, engines = _mninorm(root, out, "--rerun")
    assert code == ExitCode.OK
    after = _run_ids(out)
    assert all(after[name] != middle[name] for name in T1WS)
    assert engines.calls > 0
