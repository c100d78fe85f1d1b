"""What is written, as others read it: the BIDS validator (bids-validator-deno), pybids queries,
NIfTI header units, and the naming rules that keep group outputs apart from participants' ones.

The validator tests run the real validator on the session's participant-level run (and on a copy
of it with the group level added); they are skipped where ``bids-validator-deno`` is not installed
(``pip install bids-validator-deno``: a Deno runtime comes with it).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import nibabel as nib
import numpy as np
import pytest
from conftest import logging_restored

from bids_app.cli import main
from bids_app.errors import ExitCode
from bids_app.outputs import derivatives as drv

VALIDATOR = "bids-validator-deno"
# The warnings the participant level used to give and must not give again: every NIfTI's spatial
# units, and the sidecar keys BIDS recommends for derivatives (Description, SpatialReference).
FIXED_WARNINGS = {"NIFTI_UNIT", "SIDECAR_KEY_RECOMMENDED"}


# ---- the BIDS validator ----------------------------------------------------------------------


@pytest.fixture(scope="session")  # session: set up (or skipped) before the session's run
def validator() -> str:
    path = shutil.which(VALIDATOR)
    if path is None:
        pytest.skip(f"{VALIDATOR} is not installed (pip install {VALIDATOR})")
    return path


def validate(validator: str, folder) -> list[dict]:
    """The validator's issues for ``folder``, validated as a derivative dataset."""
    result = subprocess.run(
        [validator, str(folder), "--datasetTypes", "derivative", "--format", "json"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    try:
        report = json.loads(result.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"{VALIDATOR} gave no JSON report (exit {result.returncode}): {result.stderr}")
    return report["issues"]["issues"]


def _summary(issues: list[dict]) -> str:
    return "\n".join(
        f"{i['severity']} {i['code']} {i.get('subCode') or ''} {i.get('location')}" for i in issues
    )


@pytest.fixture(scope="module")
def group_run(run, tmp_path_factory):
    """The session's participant-level outputs plus the group level."""
    out = tmp_path_factory.mktemp("group_run") / "out"
    shutil.copytree(run["out"], out)  # the session's run is shared with other tests
    with logging_restored():
        assert main([str(run["root"]), str(out), "group"]) == ExitCode.OK
    return {"root": run["root"], "out": out}


def test_validator_finds_no_error_in_the_participant_outputs(validator, run):
    issues = validate(validator, run["out"])
    errors = [i for i in issues if i["severity"] == "error"]
    assert not errors, _summary(errors)
    fixed = [i for i in issues if i["code"] in FIXED_WARNINGS]
    assert not fixed, _summary(fixed)


def test_validator_finds_no_error_in_the_group_outputs(validator, group_run):
    issues = validate(validator, group_run["out"])
    errors = [i for i in issues if i["severity"] == "error"]
    assert not errors, _summary(errors)  # group/ and group.html are ignored, not "not included"


def test_bidsignore_names_folders_without_a_trailing_slash():
    """bids-validator-deno 3.0 reported sub-01/figures/, sub-01/log/ and group/ themselves as
    NOT_INCLUDED with "figures/", "log/" and "group/" in .bidsignore (issue: validator errors)."""
    assert {"figures", "log", "logs", "group"} <= set(drv.BIDSIGNORE)
    assert not [line for line in drv.BIDSIGNORE if line.endswith("/")]


# ---- NIfTI units -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "time_unit"),
    [((4, 5, 6), "unknown"), ((4, 5, 6, 3), "sec"), ((4, 5, 6, 3), "msec")],
)
def test_every_nifti_is_written_in_millimetres_keeping_its_time_unit(tmp_path, shape, time_unit):
    img = nib.Nifti1Image(np.zeros(shape, np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
    img.header.set_xyzt_units(xyz="unknown", t=time_unit)
    path = drv.write_nifti(img, tmp_path / "image.nii.gz")
    assert nib.load(path).header.get_xyzt_units() == ("mm", time_unit)


def test_participant_and_group_images_are_in_millimetres(group_run):
    images = sorted(group_run["out"].rglob("*.nii.gz"))
    assert any(p.parent.name == drv.GROUP_DIR for p in images)
    assert any(p.parent.name == "anat" for p in images)
    assert not [p for p in images if nib.load(p).header.get_xyzt_units()[0] != "mm"]


# ---- group outputs are not mistaken for participants' files ------------------------------------


def _suffix(name: str) -> str:
    return re.match(r"^(?:.*_)?([A-Za-z0-9]+)\.", name.rsplit("/", 1)[-1]).group(1)


def test_no_group_output_shares_a_suffix_with_a_participant_output():
    participant = {
        _suffix(name)
        for table in (drv.NATIVE_OUTPUTS, drv.SPACE_OUTPUTS, drv.TRANSFORM_OUTPUTS, drv.QC_OUTPUTS)
        for name in table.values()
    }
    group = {
        _suffix(name) for table in (drv.GROUP_SPACE_OUTPUTS, drv.GROUP_TABLES)
        for name in table.values()
    }  # fmt: skip
    assert participant >= {"T1w", "mask", "logjacobian", "xfm", "qc"}
    assert not participant & group


def _layouts(group_run):
    from bids import BIDSLayout

    out = str(group_run["out"])
    yield "output_dir", BIDSLayout(out, validate=False), {}
    yield "derivatives=", BIDSLayout(
        str(group_run["root"]), validate=False, derivatives=out
    ), {"scope": "derivatives"}  # fmt: skip


@pytest.mark.parametrize("suffix", ["T1w", "mask", "logjacobian", "qc"])
def test_pybids_suffix_queries_find_participant_files_only(group_run, suffix):
    """Issue: get(suffix='T1w') on the output returned the group's mean and SD maps too."""
    for name, layout, scope in _layouts(group_run):
        files = layout.get(suffix=suffix, **scope)
        assert files, name
        not_participants = [f.path for f in files if "subject" not in f.get_entities()]
        assert not not_participants, name
        # The group maps are indexed all the same, under their own suffix.
        assert layout.get(suffix="statmap", **scope), name
