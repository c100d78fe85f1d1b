"""Extra end-to-end runs on real scans from ../shared/data (skipped when it is absent).

They run the command in a subprocess so it can use the real TemplateFlow folder there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.shared]
SPACE = "MNI152NLin2009cAsym"


def _mninorm(shared_data, bids, out, *extra):
    env = {
        **os.environ,
        "TEMPLATEFLOW_HOME": str(shared_data / "templateflow"),
        "TEMPLATEFLOW_AUTOUPDATE": "0",
    }
    return subprocess.run(
        [sys.executable, "-m", "bids_app", str(bids), str(out), "participant", *extra],
        capture_output=True, text=True, env=env, timeout=1800,
    )  # fmt: skip


def _dice(a, b) -> float:
    a, b = a > 0, b > 0
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def test_whole_head_scan_is_skull_stripped_and_normalised(shared_data, tmp_path):
    result = _mninorm(
        shared_data,
        shared_data / "heads",
        tmp_path,
        "--participant-label",
        "01",
        "--preset",
        "fast",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    anat = tmp_path / "sub-01" / "anat"
    native_mask = nib.load(anat / "sub-01_desc-brain_mask.nii.gz")
    litres = native_mask.get_fdata().sum() * np.prod(native_mask.header.get_zooms()) / 1e6
    assert 0.9 < litres < 2.0  # a brain, not a head or a fragment
    warped = nib.load(anat / f"sub-01_space-{SPACE}_desc-brain_mask.nii.gz").get_fdata()
    template_mask = nib.load(
        shared_data / "templateflow" / f"tpl-{SPACE}" / f"tpl-{SPACE}_res-01_desc-brain_mask.nii.gz"
    ).get_fdata()
    assert _dice(warped, template_mask) > 0.9
    sidecar = json.loads((anat / "sub-01_desc-preproc_T1w.json").read_text())
    assert sidecar["SkullStripped"] is False


def test_already_skull_stripped_scan_is_detected_and_normalised(shared_data, tmp_path):
    result = _mninorm(
        shared_data, shared_data / "ds002748", tmp_path, "--participant-label", "01",
        "--preset", "fast", "--skip-bids-validation",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    anat = tmp_path / "sub-01" / "anat"
    sidecar = json.loads((anat / f"sub-01_space-{SPACE}_desc-preproc_T1w.json").read_text())
    assert sidecar["SkullStripped"] is True
    assert (
        json.loads((anat / "sub-01_desc-preproc_T1w.json").read_text())["SourceOrientation"]
        == "LAS"
    )
    warped = nib.load(anat / f"sub-01_space-{SPACE}_desc-brain_mask.nii.gz").get_fdata()
    template_mask = nib.load(
        shared_data / "templateflow" / f"tpl-{SPACE}" / f"tpl-{SPACE}_res-01_desc-brain_mask.nii.gz"
    ).get_fdata()
    assert _dice(warped, template_mask) > 0.9


@pytest.mark.parametrize("label", ["01", "02"])
def test_whole_head_mask_matches_freesurfer(shared_data, tmp_path, label):
    """Brain extraction on a real whole head (labelled-heads: FreeSurfer-conformed, defaced) agrees
    with FreeSurfer's brain mask (Dice >= 0.95), and QC passes the mask."""
    result = _mninorm(
        shared_data, shared_data / "labelled-heads", tmp_path, "--participant-label", label,
        "--preset", "fast", "--skip-bids-validation",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    from nibabel.processing import resample_from_to

    mask = nib.load(tmp_path / f"sub-{label}" / "anat" / f"sub-{label}_desc-brain_mask.nii.gz")
    freesurfer = nib.load(
        shared_data / "labelled-heads" / "derivatives" / "freesurfer" / f"sub-{label}" / "anat"
        / f"sub-{label}_desc-brain_mask.nii.gz"
    )  # fmt: skip
    truth = resample_from_to(freesurfer, mask, order=0).get_fdata()
    assert _dice(mask.get_fdata(), truth) >= 0.95
    qc_table = tmp_path / f"sub-{label}" / "anat" / f"sub-{label}_desc-mninorm_qc.tsv"
    header, row = qc_table.read_text().splitlines()[:2]
    qc = dict(zip(header.split("\t"), row.split("\t"), strict=True))
    assert qc["status"] != "fail", qc["status_reasons"]
    assert float(qc["mask_min_sector_coverage"]) > 0.8
