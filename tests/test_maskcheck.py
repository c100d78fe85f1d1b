"""Mask checks against the linearly placed template brain: a whole brain passes; one without its
cerebellum or a temporal lobe, or with the skull, does not (brain extraction's fallback and QC)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from conftest import brain_mask_of, known_affine, warp_image
from scipy import ndimage

from bids_app.measures.maskcheck import LIMITS, check_mask, mask_problems
from bids_app.reports import qc

TO_TEMPLATE = known_affine(rot_deg=(12.0, -5.0, 20.0), shift=(6.0, -9.0, 4.0), scale=(1.05, 1, 1))


@pytest.fixture(scope="module")
def placed(template_brain):
    """The template's brain mask, and the same brain placed on a participant grid (1.5 mm, tilted):
    with the mapping template -> participant that the check gets."""
    template_mask = brain_mask_of(template_brain)
    grid = np.diag([1.5, 1.5, 1.5, 1.0])
    grid[:3, 3] = -100.0
    to_template = lambda pts: pts @ TO_TEMPLATE[:3, :3].T + TO_TEMPLATE[:3, 3]  # noqa: E731
    native = warp_image(template_mask, to_template, grid, (134, 134, 134), order=0)
    return template_mask, native, np.linalg.inv(TO_TEMPLATE)


def _remove(native: nib.Nifti1Image, template_to_native: np.ndarray, where) -> nib.Nifti1Image:
    """The native mask without the voxels whose template position satisfies ``where(x, y, z)``."""
    inside = np.asarray(native.dataobj) > 0
    ijk = np.argwhere(inside)
    world = nib.affines.apply_affine(native.affine, ijk)
    template_points = nib.affines.apply_affine(np.linalg.inv(template_to_native), world)
    cut = where(*template_points.T)
    data = inside.copy()
    data[tuple(ijk[cut].T)] = False
    return nib.Nifti1Image(data.astype(np.uint8), native.affine)


def test_a_whole_brain_passes(placed):
    template_mask, native, template_to_native = placed
    check = check_mask(native, template_mask, template_to_native)
    assert check.min_sector_coverage > 0.95
    assert check.outside_fraction < 0.01
    assert check.template_dice > 0.95
    # The participant's brain is the template's shrunk by the known affine's determinant, 1.05.
    volume = float(np.asarray(template_mask.dataobj).sum()) * 27.0 / 1000 / 1.05
    assert check.volume_ml == pytest.approx(volume, rel=0.03)
    assert mask_problems(check) == []


def _centre(template_mask):
    ijk = np.argwhere(np.asarray(template_mask.dataobj) > 0)
    points = nib.affines.apply_affine(template_mask.affine, ijk)
    return points.mean(axis=0), points.min(axis=0), points.max(axis=0)


@pytest.mark.parametrize("missing", ["cerebellum", "left temporal lobe", "right temporal lobe"])
def test_a_brain_missing_a_part_fails(placed, missing):
    template_mask, native, template_to_native = placed
    centre, low, high = _centre(template_mask)
    bottom = low[2] + 0.3 * (centre[2] - low[2])  # the lowest ~third below the centre
    if missing == "cerebellum":
        cut = lambda x, y, z: (z < bottom + 20) & (y < centre[1] - 10)  # noqa: E731
    else:
        side = -1 if missing.startswith("left") else 1
        cut = lambda x, y, z: (side * (x - centre[0]) > 30) & (z < centre[2] - 5) & (  # noqa: E731
            y > centre[1] - 25
        )
    damaged = _remove(native, template_to_native, cut)
    check = check_mask(damaged, template_mask, template_to_native)
    assert check.min_sector_coverage < LIMITS["min_sector_coverage"][0]
    assert any("misses part of the brain" in p for p in mask_problems(check))
    status, reasons = qc.grade({"mask_min_sector_coverage": check.min_sector_coverage})
    assert status == "fail", reasons


def test_a_mask_with_the_skull_fails(placed):
    template_mask, native, template_to_native = placed
    inside = np.asarray(native.dataobj) > 0
    with_skull = ndimage.binary_dilation(inside, iterations=8)  # 12 mm of skull and scalp
    check = check_mask(
        nib.Nifti1Image(with_skull.astype(np.uint8), native.affine),
        template_mask,
        template_to_native,
    )
    assert check.outside_fraction > LIMITS["outside_fraction"][1]
    assert any("outside the template brain" in p for p in mask_problems(check))
    status, _ = qc.grade({"mask_outside_fraction": check.outside_fraction})
    assert status == "fail"


def test_a_wrong_placement_is_not_mistaken_for_a_good_mask(placed):
    """The check trusts its mapping: the same whole brain under a 25 mm shifted mapping fails."""
    template_mask, native, template_to_native = placed
    shifted = template_to_native.copy()
    shifted[:3, 3] += (0.0, 0.0, 25.0)
    assert mask_problems(check_mask(native, template_mask, shifted))


def test_a_mask_much_too_tight_fails(placed):
    """Eroded by 7.5 mm all round: far less than a brain's volume."""
    template_mask, native, template_to_native = placed
    inside = np.asarray(native.dataobj) > 0
    tight = ndimage.binary_erosion(inside, iterations=5)
    check = check_mask(
        nib.Nifti1Image(tight.astype(np.uint8), native.affine), template_mask, template_to_native
    )
    assert check.volume_ratio < LIMITS["volume_ratio"][0]
    assert any("too tight" in p for p in mask_problems(check))
    status, _ = qc.grade({"mask_volume_ratio": check.volume_ratio})
    assert status == "fail"
