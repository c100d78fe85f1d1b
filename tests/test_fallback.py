"""Brain-extraction fallback: a first attempt made to fail on purpose is followed by another that
succeeds, and the run record, the mask's sidecar, the QC table and the report say so; with
--no-fallback the same T1w fails, with the reason."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from conftest import (
    E2E_SPACE,
    known_affine,
    participant_brain,
    save_t1w,
    with_skull,
    write_dataset_description,
)
from fakes import FakeEngines

from bids_app.errors import ExitCode
from bids_app.settings import DEFAULT_ENGINE

# The participant's pose: participant points -> template points
POSE = known_affine(rot_deg=(10, -4, 6), shift=(2, -3, 4), scale=(1.02, 0.98, 1.0))


@pytest.fixture(scope="module")
def head_dataset(tmp_path_factory, template_brain, templateflow_home):
    root = tmp_path_factory.mktemp("fallback_bids")
    write_dataset_description(root)
    save_t1w(with_skull(participant_brain(template_brain, POSE, "LIA"), seed=5), root, "01")
    return root


def _run(root, out, *extra):
    """The fake engine (tests/fakes.py) finds the participant's pose, except that its first
    head-to-template affine 'diverges': the volume blown up 27 times, as a real head's did (a
    volume ratio of 523)."""
    from bids_app.cli import main

    return main(
        [str(root), str(out), "participant", "--output-spaces", E2E_SPACE, "--preset", "fast",
         "--nthreads", "2", "--skip-bids-validation", "--in-process", *extra],
        engines=FakeEngines({"sub-01": np.linalg.inv(POSE)}, diverging={DEFAULT_ENGINE: 1}),
    )  # fmt: skip


def test_a_failed_first_attempt_is_retried_and_recorded(head_dataset, tmp_path):
    out = tmp_path / "out"
    assert _run(head_dataset, out) == ExitCode.OK

    record = json.loads((out / "sub-01/log/sub-01_desc-mninorm_run.json").read_text())
    extraction = record["BrainExtraction"]
    first, *others = extraction["Attempts"]
    assert first["Attempt"] == 1 and "diverged" in " ".join(first["Problems"])
    assert first["HeadVolumeRatio"] > 10
    assert others and others[-1]["Problems"] == []
    assert extraction["KeptAttempt"] == others[-1]["Attempt"]
    assert others[-1]["Why"].startswith("fallback")

    sidecar = json.loads((out / "sub-01/anat/sub-01_desc-brain_mask.json").read_text())
    assert sidecar["BrainExtraction"]["KeptAttempt"] == extraction["KeptAttempt"]
    assert f"attempt {extraction['KeptAttempt']} of {len(extraction['Attempts'])}" in (
        sidecar["Method"]
    )
    with open(out / "sub-01/anat/sub-01_desc-mninorm_qc.tsv", newline="") as handle:
        row = next(csv.DictReader(handle, delimiter="\t"))
    assert row["extraction_attempts"] == str(len(extraction["Attempts"]))
    assert row["status"] != "fail"
    report = (out / "sub-01.html").read_text()
    assert f"Brain extraction: {len(extraction['Attempts'])} attempt(s), fallback on" in report
    assert "diverged" in report


def test_without_fallback_the_t1w_fails_with_the_reason(head_dataset, tmp_path):
    out = tmp_path / "out"
    assert _run(head_dataset, out, "--no-fallback") == ExitCode.PARTICIPANT_FAILED

    record = json.loads((out / "sub-01/log/sub-01_desc-mninorm_run.json").read_text())
    assert record["Status"] == "failed"
    assert "no brain-extraction attempt passed" in record["Error"]
    assert "diverged" in record["Error"]
    assert len(record["BrainExtraction"]["Attempts"]) == 1
    with open(out / "sub-01/anat/sub-01_desc-mninorm_qc.tsv", newline="") as handle:
        row = next(csv.DictReader(handle, delimiter="\t"))
    assert row["status"] == "fail" and "diverged" in row["status_reasons"]


class _RealEngineDivergingFirst:
    """The real Greedy engine, except that its first head-to-template affine is blown up 27
    times: the attempts after it register for real."""

    name = "greedy"
    threads = 2

    def __init__(self):
        from bids_app.registration.greedy import GreedyEngine

        self.real = GreedyEngine(threads=2)
        self.sabotaged = False

    def register(self, fixed, moving, *, preset, **options):
        from bids_app.transforms import CompositeTransform, read_composite, write_composite

        result = self.real.register(fixed, moving, preset=preset, **options)
        if preset == "head-linear" and not self.sabotaged:
            self.sabotaged = True
            diverged = read_composite(result.forward_xfm).linear @ np.diag([3.0, 3.0, 3.0, 1.0])
            write_composite(CompositeTransform((diverged,)), result.forward_xfm)
        return result


@pytest.mark.slow
def test_real_registrations_rescue_a_diverged_first_attempt(head_dataset, tmp_path):
    """The same, with real registrations after the sabotaged one (the fake test's counterpart)."""
    from bids_app.cli import main
    from bids_app.registration import get_engine

    sabotaged = _RealEngineDivergingFirst()
    def engines(name, threads):
        return sabotaged if name == "greedy" else get_engine(name, threads)

    out = tmp_path / "out"
    code = main(
        [str(head_dataset), str(out), "participant", "--output-spaces", E2E_SPACE, "--preset",
         "fast", "--engine", "greedy", "--nthreads", "2", "--skip-bids-validation",
         "--in-process"],
        engines=engines,
    )  # fmt: skip
    assert code == ExitCode.OK
    record = json.loads((out / "sub-01/log/sub-01_desc-mninorm_run.json").read_text())
    first, *others = record["BrainExtraction"]["Attempts"]
    assert "diverged" in " ".join(first["Problems"])
    assert others[-1]["Problems"] == [] and others[-1]["MinSectorCoverage"] > 0.8
    with open(out / "sub-01/anat/sub-01_desc-mninorm_qc.tsv", newline="") as handle:
        assert next(csv.DictReader(handle, delimiter="\t"))["status"] != "fail"
