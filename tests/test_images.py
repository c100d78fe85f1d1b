"""Header checks, reorientation and the nibabel <-> ANTs conversion."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest
from conftest import reorient

from bids_app.errors import ImageError
from bids_app.participant.images import load_t1w
from bids_app.transforms.orientation import ants_to_nifti, nifti_to_ants


def _image(shape=(12, 14, 10), affine=None, seed=0):
    data = np.random.default_rng(seed).random(shape).astype(np.float32) + 1
    return nib.Nifti1Image(data, np.diag([2.0, 2.5, 3.0, 1.0]) if affine is None else affine)


def _oblique_lia_affine():
    from scipy.spatial.transform import Rotation

    lia = np.array([[-1.0, 0, 0], [0, 0, 1], [0, -1, 0]]) * [1.0, 1.2, 0.9]
    affine = np.eye(4)
    affine[:3, :3] = Rotation.from_euler("z", 12, degrees=True).as_matrix() @ lia
    affine[:3, 3] = [40.0, -30.0, 25.0]
    return affine


@pytest.mark.parametrize("codes", ["LAS", "LIA", "RAS", "PSR"])
def test_reorientation_to_ras_keeps_every_voxel_at_its_world_position(tmp_path, codes):
    original = _image()
    stored = reorient(original, codes)
    path = tmp_path / "t1w.nii.gz"
    stored.to_filename(path)
    loaded, report = load_t1w(path)
    assert nib.aff2axcodes(loaded.affine) == ("R", "A", "S")
    assert report.source_orientation == codes
    assert ("reoriented" in " ".join(report.actions)) == (codes != "RAS")
    # The voxel at world position p has the same value before and after.
    for ijk in [(0, 0, 0), (5, 7, 3), (11, 13, 9)]:
        world = nib.affines.apply_affine(original.affine, ijk)
        back = np.round(nib.affines.apply_affine(np.linalg.inv(loaded.affine), world)).astype(int)
        assert loaded.get_fdata()[tuple(back)] == pytest.approx(original.get_fdata()[ijk])


@pytest.mark.parametrize("affine", [np.diag([2.0, 2.5, 3.0, 1.0]), _oblique_lia_affine()])
def test_nifti_to_ants_matches_itks_own_reading_of_the_file(tmp_path, affine):
    import ants

    img = _image(affine=affine)
    path = tmp_path / "img.nii.gz"
    img.to_filename(path)
    by_itk = ants.image_read(str(path))
    ours = nifti_to_ants(img)
    np.testing.assert_allclose(ours.origin, by_itk.origin, atol=1e-4)
    np.testing.assert_allclose(ours.spacing, by_itk.spacing, atol=1e-5)
    np.testing.assert_allclose(ours.direction, by_itk.direction, atol=1e-5)
    np.testing.assert_array_equal(ours.numpy(), by_itk.numpy())
    np.testing.assert_allclose(ants_to_nifti(ours).affine, affine, atol=1e-4)


def test_singleton_4th_dimension_is_dropped(tmp_path):
    path = tmp_path / "t1w.nii.gz"
    nib.Nifti1Image(
        np.ones((6, 6, 6, 1), np.float32) + np.arange(6)[:, None, None, None], np.eye(4)
    ).to_filename(path)
    loaded, report = load_t1w(path)
    assert loaded.shape == (6, 6, 6)
    assert "singleton" in " ".join(report.actions)


def test_partial_nans_are_zeroed_and_reported(tmp_path):
    data = _image().get_fdata().astype(np.float32)
    data[0, 0, :3] = np.nan
    path = tmp_path / "t1w.nii.gz"
    nib.Nifti1Image(data, np.eye(4)).to_filename(path)
    loaded, report = load_t1w(path)
    assert np.isfinite(loaded.get_fdata()).all()
    assert "3 NaN" in " ".join(report.actions)


def test_disagreeing_qform_and_sform_use_the_sform_and_say_so(tmp_path):
    img = _image()
    sform = img.affine.copy()
    qform = sform.copy()
    qform[:3, 3] += [5.0, 0, 0]
    img.set_sform(sform, code=1)
    img.set_qform(qform, code=1)
    path = tmp_path / "t1w.nii.gz"
    img.to_filename(path)
    loaded, report = load_t1w(path)
    np.testing.assert_allclose(loaded.affine[:3, 3], sform[:3, 3])
    assert "qform and sform disagreed" in " ".join(report.actions)


def _truncated(path):
    _image(shape=(40, 40, 40)).to_filename(path)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def _four_d(path):
    nib.Nifti1Image(np.ones((6, 6, 6, 3), np.float32), np.eye(4)).to_filename(path)


def _all_nan(path):
    nib.Nifti1Image(np.full((6, 6, 6), np.nan, np.float32), np.eye(4)).to_filename(path)


def _all_zero(path):
    nib.Nifti1Image(np.zeros((6, 6, 6), np.float32), np.eye(4)).to_filename(path)


def _not_nifti(path):
    with gzip.open(path, "wb") as handle:
        handle.write(b"this is not an image")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_truncated, "truncated or corrupt"),
        (_four_d, "must be a 3D image"),
        (_all_nan, "NaN"),
        (_all_zero, "holds no image"),
        (_not_nifti, "cannot be read as NIfTI"),
    ],
)
def test_bad_images_raise_an_error_naming_the_file(tmp_path, make, message):
    path = tmp_path / "sub-01_T1w.nii.gz"
    make(path)
    with pytest.raises(ImageError) as caught:
        load_t1w(path)
    assert str(path) in str(caught.value)
    assert message in str(caught.value)
