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


# ---- headers that cannot say where left is (issue 18): refused, with the repair -------------


def _with_raw_header(path, **fields):
    """Write ``_image()`` to ``path`` (.nii), then set header ``fields`` in the file's bytes:
    nibabel refuses to write some broken geometry (negative pixdim with a qform) itself."""
    _image().to_filename(path)
    raw = bytearray(path.read_bytes())
    header = nib.Nifti1Header(bytes(raw[:348]))
    for name, value in fields.items():
        if name.startswith("pixdim"):
            header["pixdim"][int(name[-1])] = value
        else:
            header[name] = value
    raw[:348] = header.binaryblock
    path.write_bytes(bytes(raw))


def _no_orientation(path):
    _with_raw_header(path, qform_code=0, sform_code=0)


def _no_orientation_pixdim_zero(path):  # the catalogue's case: codes 0 and pixdim 0
    _with_raw_header(path, qform_code=0, sform_code=0, pixdim1=0.0, pixdim2=0.0, pixdim3=0.0)


def _zero_voxel_size(path):
    _with_raw_header(path, qform_code=1, sform_code=1, pixdim2=0.0)


def _negative_voxel_size_with_qform_only(path):
    _with_raw_header(path, qform_code=1, sform_code=0, pixdim1=-2.0)


def _negative_voxel_size_with_sform(path):
    _with_raw_header(path, qform_code=1, sform_code=1, pixdim3=-3.0)


def _nan_voxel_size(path):
    _with_raw_header(path, qform_code=1, sform_code=1, pixdim1=float("nan"))


def _singular_sform(path):
    # sform rows x and y equal: the voxel axes span a plane, not a volume
    _with_raw_header(path, qform_code=0, sform_code=1, srow_x=[2.0, 0, 0, 0], srow_y=[2.0, 0, 0, 0])


def _nan_sform(path):
    _with_raw_header(path, qform_code=0, sform_code=1, srow_z=[0, 0, float("nan"), 0])


def _mirrored_qform_and_sform(path):
    img = _image()
    img.set_sform(np.diag([2.0, 2.5, 3.0, 1.0]), code=1)
    img.set_qform(np.diag([-2.0, 2.5, 3.0, 1.0]), code=1)  # x flipped: the mirror image
    img.to_filename(path)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_no_orientation, "gives no orientation (qform_code and sform_code are both 0)"),
        (_no_orientation_pixdim_zero, "voxel sizes (pixdim) are 0, 0, 0"),
        (_zero_voxel_size, "voxel sizes (pixdim) are 2, 0, 3"),
        (_negative_voxel_size_with_qform_only, "voxel sizes (pixdim) are -2, 2.5, 3"),
        (_negative_voxel_size_with_sform, "voxel sizes (pixdim) are 2, 2.5, -3"),
        (_nan_voxel_size, "voxel sizes (pixdim) are nan, 2.5, 3"),
        (_singular_sform, "the sform is singular"),
        (_nan_sform, "the sform holds NaN"),
        (_mirrored_qform_and_sform, "qform and sform are mirror images"),
    ],
)
def test_headers_without_a_trustworthy_orientation_are_refused_with_the_repair(
    tmp_path, make, message
):
    path = tmp_path / "sub-01_T1w.nii"
    make(path)
    with pytest.raises(ImageError) as caught:
        load_t1w(path)
    text = str(caught.value)
    assert str(path) in text
    assert message in text
    assert "check left and right against the acquisition" in text and "sform" in text
    assert "\n" not in text  # one line


@pytest.mark.parametrize(("qform_code", "sform_code"), [(1, 0), (0, 1), (0, 2)])
def test_one_valid_form_is_enough(tmp_path, qform_code, sform_code):
    affine = np.diag([-2.0, 2.5, 3.0, 1.0])  # LAS
    img = _image()
    img.set_qform(affine, code=qform_code)
    img.set_sform(affine, code=sform_code)
    path = tmp_path / "t1w.nii"
    img.to_filename(path)
    loaded, report = load_t1w(path)
    assert report.source_orientation == "LAS"
    assert report.source_zooms == pytest.approx((2.0, 2.5, 3.0))
    # Reoriented: voxel (0, 0, 0) of the file is at the +x end of the RAS image
    np.testing.assert_allclose(loaded.get_fdata()[-1, 0, 0], img.get_fdata()[0, 0, 0], rtol=1e-6)


def test_a_qform_and_sform_that_differ_by_a_rotation_stay_a_recorded_fix(tmp_path):
    """Not a mirror (same handedness): the sform is used, as before issue 18."""
    sform = _oblique_lia_affine()
    qform = sform.copy()
    qform[:3, :3] = sform[:3, :3] @ np.array([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]])  # 90 deg turn
    img = _image()
    img.set_sform(sform, code=1)
    img.set_qform(qform, code=1)
    path = tmp_path / "t1w.nii"
    img.to_filename(path)
    loaded, report = load_t1w(path)
    assert np.sign(np.linalg.det(qform[:3, :3])) == np.sign(np.linalg.det(sform[:3, :3]))
    assert "qform and sform disagreed" in " ".join(report.actions)
    assert report.source_orientation == "".join(nib.aff2axcodes(sform))
