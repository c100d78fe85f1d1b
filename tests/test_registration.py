"""Real ANTs registrations recover known geometry (3 mm images, the 'fast' preset)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from conftest import (
    brain_mask_of,
    isotropic_grid,
    known_affine,
    reorient,
    smooth_warp,
    warp_image,
)

from bids_app.images import load_t1w, nifti_to_ants
from bids_app.jacobian import log_jacobians
from bids_app.registration import get_engine
from bids_app.transforms import read_composite


def _ants_map_points(points_ras: np.ndarray, transform_path) -> np.ndarray:
    """ANTs' own point mapping (independent of bids_app.transforms), RAS in and out."""
    import ants

    lps = pd.DataFrame(points_ras * [-1, -1, 1], columns=["x", "y", "z"])
    return ants.apply_transforms_to_points(3, lps, [str(transform_path)]).to_numpy() * [-1, -1, 1]


def _register(template_brain, participant: nib.Nifti1Image, tmp_path, seed=7):
    import ants

    fixed = nifti_to_ants(template_brain)
    moving_nifti, _ = load_t1w(_save(participant, tmp_path / "participant.nii.gz"))
    return get_engine("ants").register(
        fixed,
        nifti_to_ants(moving_nifti),
        preset="fast",
        out_prefix=tmp_path / "reg_",
        seed=seed,
        fixed_mask=ants.iMath(nifti_to_ants(brain_mask_of(template_brain)), "MD", 2),
    )


def _save(img, path):
    img.to_filename(path)
    return path


def _brain_points(img: nib.Nifti1Image, count=400, seed=3) -> np.ndarray:
    """World coordinates of random voxels well inside the brain."""
    from scipy import ndimage

    inside = ndimage.binary_erosion(np.asarray(img.dataobj) > 0, iterations=2)
    ijk = np.argwhere(inside)
    chosen = np.random.default_rng(seed).choice(len(ijk), size=min(count, len(ijk)), replace=False)
    return nib.affines.apply_affine(img.affine, ijk[chosen])


def test_known_affine_and_warp_on_an_lia_anisotropic_grid_are_recovered(template_brain, tmp_path):
    affine = known_affine()

    def to_template(points):  # participant world -> template world: warp, then affine
        moved = points + smooth_warp(points)
        return moved @ affine[:3, :3].T + affine[:3, 3]

    grid, shape = isotropic_grid(template_brain, 1.0, pad_mm=15)
    zooms = np.array([2.6, 3.4, 3.0])
    grid = grid @ np.diag([*zooms, 1.0])
    shape = tuple(int(np.ceil(s / z)) for s, z in zip(shape, zooms, strict=True))
    participant = reorient(warp_image(template_brain, to_template, grid, shape), "LIA")

    result = _register(template_brain, participant, tmp_path)

    landmarks = _brain_points(participant)
    recovered = _ants_map_points(to_template(landmarks), result.forward_xfm)
    errors = np.linalg.norm(recovered - landmarks, axis=1)
    print(
        f"\nlandmark error (mm), known affine + warp, LIA 2.6x3.4x3 mm: mean {errors.mean():.2f}, "
        f"p95 {np.percentile(errors, 95):.2f}, max {errors.max():.2f}"
    )
    assert errors.mean() < 1.5
    assert np.percentile(errors, 95) < 3.0
    # Without registration the same points are this far off: the test can fail.
    assert np.linalg.norm(to_template(landmarks) - landmarks, axis=1).mean() > 5.0
    # Our reader of the .h5 agrees with ANTs' own mapping.
    ours = read_composite(result.forward_xfm).map_points(to_template(landmarks))
    np.testing.assert_allclose(ours, recovered, atol=0.02)


def test_uniformly_scaled_template_gives_total_log_jacobian_three_log_s(template_brain, tmp_path):
    from scipy import ndimage

    s = 1.12
    centre = nib.affines.apply_affine(
        template_brain.affine, ndimage.center_of_mass(np.asarray(template_brain.dataobj) > 0)
    )
    grid, shape = isotropic_grid(template_brain, 3.0, pad_mm=20)
    participant = warp_image(template_brain, lambda p: centre + (p - centre) / s, grid, shape)

    result = _register(template_brain, participant, tmp_path)
    nonlinear, total, field_affine = log_jacobians(read_composite(result.forward_xfm))

    mask = brain_mask_of(template_brain)
    inside = ndimage.binary_erosion(np.asarray(mask.dataobj) > 0, iterations=2)
    assert np.allclose(field_affine, template_brain.affine, atol=1e-3)  # maps on the template grid
    print(
        f"\nscaling s={s}: median total log-J {np.median(total[inside]):.4f} "
        f"(3 ln s = {3 * np.log(s):.4f}), median nonlinear {np.median(nonlinear[inside]):.4f}"
    )
    assert np.median(total[inside]) == pytest.approx(3 * np.log(s), abs=0.03)
    assert abs(np.median(nonlinear[inside])) < 0.03
    assert abs(float(nonlinear[inside].mean())) < 0.05
