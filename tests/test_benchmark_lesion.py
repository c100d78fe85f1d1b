"""The lesion cases of the benchmark (benchmarks/lesion.py): the lesion is what it says it is, and
(slow) the whole comparison runs on the 6 mm case from nilearn's brain."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
pytest.importorskip("psutil")
from benchmarks import lesion  # noqa: E402


def _ball_brain(shape=(40, 40, 40), mm=3.0):
    affine = np.diag([mm, mm, mm, 1.0])
    ijk = np.indices(shape).reshape(3, -1).T
    brain = (np.linalg.norm(ijk - np.array(shape) / 2, axis=1) < 15).reshape(shape)
    return brain, affine


@pytest.mark.parametrize("share", [0.02, 0.05])
def test_a_grown_lesion_is_one_blob_of_the_asked_share_inside_the_brain(share):
    brain, affine = _ball_brain()
    grown = lesion.grow_lesion(brain, affine, (15.0, 0.0, 0.0), share, np.random.default_rng(0))
    assert not (grown & ~brain).any()
    assert ndimage.label(grown)[1] == 1
    assert grown.sum() == pytest.approx(share * brain.sum(), rel=0.05)  # bar small strays
    centre = nib.affines.apply_affine(affine, np.argwhere(grown).mean(0))
    brain_centre = nib.affines.apply_affine(affine, np.argwhere(brain).mean(0))
    assert centre[0] - brain_centre[0] > 5  # towards the offset (+x)


@pytest.fixture(scope="module")
def tiny_lesion(tmp_path_factory):
    out = tmp_path_factory.mktemp("lesion-bench")
    case, folder, checks = lesion.prepare_lesion(lesion.LESIONS["tiny-central-4pc"], out)
    return case, folder, checks


def test_the_lesion_is_carried_into_the_moving_image_by_the_truth(tiny_lesion):
    """Moving-grid lesion voxels map (through Phi^-1) into the fixed-grid lesion, their volume is
    the fixed one times det(A) (Phi's volume change), and they are dark (CSF-like)."""
    case, folder, checks = tiny_lesion
    assert checks["lesion_share_of_brain"] == pytest.approx(0.04, rel=0.1)
    fixed_lesion = nib.load(folder / "lesion_fixed.nii.gz")
    moving_lesion = nib.load(folder / "lesion_moving.nii.gz")
    truth = case.truth()
    in_moving = np.argwhere(np.asarray(moving_lesion.dataobj) > 0)
    points, _ = truth.inverse(nib.affines.apply_affine(moving_lesion.affine, in_moving))
    ijk = np.rint(nib.affines.apply_affine(np.linalg.inv(fixed_lesion.affine), points)).astype(int)
    fixed = np.asarray(fixed_lesion.dataobj) > 0
    dilated = ndimage.binary_dilation(fixed)
    assert dilated[tuple(ijk.T)].mean() > 0.95  # within a (6 mm) voxel of the fixed lesion
    ratio = checks["lesion_ml_moving"] / checks["lesion_ml_fixed"]
    assert ratio == pytest.approx(abs(np.linalg.det(truth.affine[:3, :3])), rel=0.35)
    moving = np.asarray(nib.load(folder / "moving.nii.gz").dataobj)
    original = np.asarray(nib.load(case.folder / "moving.nii.gz").dataobj)
    brain = np.asarray(nib.load(case.moving_mask).dataobj) > 0
    lesioned = np.asarray(moving_lesion.dataobj) > 0
    assert np.median(moving[lesioned]) < 0.5 * np.median(original[lesioned])
    far = brain.copy()
    far[lesioned] = False
    assert np.mean(moving[far] == original[far]) > 0.8  # the rest of the image is untouched


def test_regions_near_the_lesion_are_within_10_mm_and_outside_it():
    brain, affine = _ball_brain()
    grown = lesion.grow_lesion(brain, affine, (0.0, 0.0, 0.0), 0.03, np.random.default_rng(1))
    near = lesion.regions(grown, brain, affine)["near"]
    assert near.any() and not (near & grown).any() and not (near & ~brain).any()
    distance = ndimage.distance_transform_edt(~grown, sampling=3.0)
    assert distance[near].max() <= lesion.NEAR_MM


@pytest.mark.slow
def test_tiny_lesion_comparison_runs_and_the_mask_helps_near_the_lesion(tmp_path):
    os.environ.setdefault("TEMPLATEFLOW_AUTOUPDATE", "0")
    code = lesion.run(tmp_path, ["tiny-central-4pc"], "precise", 1, 20240229, False)
    assert code == 0
    rows = {r["mode"]: r for r in lesion.read_rows(tmp_path / "lesion.csv")}
    assert set(rows) == set(lesion.MODES)
    near = {mode: float(rows[mode]["near_landmark_mean_mm"]) for mode in rows}
    assert near["clean"] < near["lesion"] and near["lesion+mask"] < near["lesion"]
    assert (tmp_path / "lesion.md").read_text().count("tiny-central-4pc") == 3
