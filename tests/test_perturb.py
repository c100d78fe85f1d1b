"""Whole-head perturbations (benchmarks/perturb.py) on a synthetic head whose geometry is known.

The head is an ellipsoid of scalp around an ellipsoidal, textured brain, plus a "nose" in front
of and below the brain, on two grids: oblique LIA at 3 mm and PSR with unequal voxels. Every
perturbation must carry the reference brain mask along with the image: the perturbed mask, pulled
back through ``world``, lands on the clean mask.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.transform import Rotation

from benchmarks.perturb import PERTURBATIONS, dice, mask_centroid_world, perturb

HEAD_CENTRE = np.array([5.0, 20.0, -10.0])  # world RAS mm: the centre of the field of view
BRAIN_CENTRE = HEAD_CENTRE + [0.0, 5.0, 15.0]
BRAIN_RADII = np.array([55.0, 68.0, 52.0])
HEAD_RADII = np.array([72.0, 90.0, 85.0])
NOSE_CENTRE, NOSE_RADIUS = np.array([5.0, 106.0, -25.0]), 8.0
SEEDED = ("origin", "rotate", "tilt-origin", "deface", "bias")  # the others draw nothing
EXACT = ("origin", "crop-chin", "crop-top", "deface", "bias")  # no resampling: the mask is kept


# ---- the synthetic head -----------------------------------------------------------------------


def _grid(kind: str) -> tuple[np.ndarray, tuple[int, int, int]]:
    """A voxel -> RAS affine and a shape whose field of view is centred on HEAD_CENTRE."""
    if kind == "oblique-lia":  # FreeSurfer's axes, tilted 10, -6 and 4 deg
        axes = np.array([[-1.0, 0, 0], [0, 0, 1.0], [0, -1.0, 0]]) * 3.0
        axes = Rotation.from_euler("xyz", [10, -6, 4], degrees=True).as_matrix() @ axes
        shape = (64, 64, 64)
    else:  # "psr": IXI's sagittal axes, unequal voxels
        axes = np.array([[0, 0, 2.5], [-3.0, 0, 0], [0, 3.5, 0]])
        shape = (64, 57, 78)
    affine = np.eye(4)
    affine[:3, :3] = axes
    affine[:3, 3] = HEAD_CENTRE - axes @ ((np.array(shape) - 1) / 2)
    return affine, shape


def _world(affine: np.ndarray, shape) -> np.ndarray:
    return nib.affines.apply_affine(affine, np.indices(shape).reshape(3, -1).T).reshape(*shape, 3)


def _inside(points: np.ndarray, centre, radii) -> np.ndarray:
    return np.sum(((points - centre) / radii) ** 2, axis=-1) <= 1.0


def _brain_texture(points: np.ndarray) -> np.ndarray:
    """Asymmetric, smooth: a rotation in the wrong sense would not line it up again."""
    x, y, z = np.moveaxis(points - BRAIN_CENTRE, -1, 0)
    return 100 + 15 * np.sin(x / 9 + 0.3) * np.cos(y / 11) + 10 * np.sin(z / 7 + x / 23)


def synthetic_head(kind: str = "oblique-lia"):
    """(head image, brain mask image, world RAS of every voxel, nose mask)."""
    affine, shape = _grid(kind)
    points = _world(affine, shape)
    brain = _inside(points, BRAIN_CENTRE, BRAIN_RADII)
    head = _inside(points, HEAD_CENTRE, HEAD_RADII)
    nose = _inside(points, NOSE_CENTRE, NOSE_RADIUS)
    rng = np.random.default_rng(0)
    data = np.abs(rng.normal(0.0, 1.0, shape))  # background noise
    data[head | nose] = 60.0
    data[brain] = _brain_texture(points[brain])
    return (
        nib.Nifti1Image(data.astype(np.float32), affine),
        nib.Nifti1Image(brain.astype(np.uint8), affine),
        points,
        nose,
    )


@pytest.fixture(scope="module", params=["oblique-lia", "psr"])
def head(request):
    return synthetic_head(request.param)


@pytest.fixture(scope="module")
def perturbed(head):
    image, mask, _, _ = head
    return {name: perturb(image, mask, name, seed=3) for name in PERTURBATIONS}


def _pull_back(result, clean: nib.Nifti1Image, volume: nib.Nifti1Image, order=1) -> np.ndarray:
    """``volume`` (on the perturbed grid) sampled at the perturbed partners of the clean voxels."""
    clean_to_perturbed = np.linalg.inv(volume.affine) @ result.world @ clean.affine
    # a whole-voxel shift (crops) must stay whole: x.0000001 beyond the last slice reads as 0
    near = np.round(clean_to_perturbed)
    clean_to_perturbed = np.where(
        np.abs(clean_to_perturbed - near) < 1e-6, near, clean_to_perturbed
    )
    return ndimage.affine_transform(
        np.asarray(volume.dataobj, dtype=np.float32),
        clean_to_perturbed[:3, :3],
        clean_to_perturbed[:3, 3],
        output_shape=clean.shape,
        order=order,
    )


def _voxel_mm3(img: nib.Nifti1Image) -> float:
    return float(abs(np.linalg.det(img.affine[:3, :3])))


def _rotation_degrees(world: np.ndarray) -> float:
    return float(np.degrees(np.arccos(np.clip((np.trace(world[:3, :3]) - 1) / 2, -1, 1))))


# ---- every perturbation -----------------------------------------------------------------------


def test_the_table_names_every_perturbation():
    assert list(PERTURBATIONS) == [
        "origin", "rotate", "tilt-origin", "crop-chin", "crop-top",
        "deface", "conform", "aniso", "iso2mm", "bias",
    ]  # fmt: skip


@pytest.mark.parametrize("name", PERTURBATIONS)
def test_the_mask_centroid_moves_with_world(head, perturbed, name):
    _, mask, _, _ = head
    result = perturbed[name]
    expected = nib.affines.apply_affine(result.world, mask_centroid_world(mask))
    # a tenth of the clean voxel (2.5-3.5 mm); measured: under 0.05 mm
    assert np.linalg.norm(mask_centroid_world(result.mask) - expected) < 0.3


@pytest.mark.parametrize("name", PERTURBATIONS)
def test_the_brain_volume_is_kept(head, perturbed, name):
    _, mask, _, _ = head
    result = perturbed[name]
    before = np.count_nonzero(np.asarray(mask.dataobj)) * _voxel_mm3(mask)
    after = np.count_nonzero(np.asarray(result.mask.dataobj)) * _voxel_mm3(result.mask)
    if name in EXACT:
        assert after == pytest.approx(before, rel=1e-6)
    else:
        assert after == pytest.approx(before, rel=0.03)


@pytest.mark.parametrize("name", PERTURBATIONS)
def test_the_mask_pulled_back_through_world_is_the_clean_mask(head, perturbed, name):
    image, mask, _, _ = head
    result = perturbed[name]
    back = _pull_back(result, mask, result.mask) > 0.5
    assert dice(back, np.asarray(mask.dataobj)) > (0.999 if name in EXACT else 0.95)


@pytest.mark.parametrize("name", [n for n in PERTURBATIONS if n != "bias"])
def test_the_brain_content_pulled_back_through_world_matches(head, perturbed, name):
    """The texture lines up again: the image moved by ``world`` too, in the same sense."""
    image, mask, _, _ = head
    result = perturbed[name]
    back = _pull_back(result, image, result.image)
    core = ndimage.binary_erosion(np.asarray(mask.dataobj) > 0, iterations=2)
    clean = np.asarray(image.dataobj)[core]
    assert np.corrcoef(back[core], clean)[0, 1] > 0.95


@pytest.mark.parametrize("name", PERTURBATIONS)
def test_outputs_are_nifti_with_the_affine_in_qform_and_sform(perturbed, name):
    result = perturbed[name]
    assert result.image.get_data_dtype() == (np.uint8 if name == "conform" else np.float32)
    assert result.mask.get_data_dtype() == np.uint8
    assert set(np.unique(np.asarray(result.mask.dataobj))) <= {0, 1}
    assert result.image.shape == result.mask.shape
    np.testing.assert_allclose(result.image.affine, result.mask.affine)
    for img in (result.image, result.mask):
        qform, qcode = img.get_qform(coded=True)
        sform, scode = img.get_sform(coded=True)
        assert qcode > 0 and scode > 0
        np.testing.assert_allclose(qform, img.affine, atol=1e-4)
        np.testing.assert_allclose(sform, img.affine, atol=1e-6)
        assert img.header.get_xyzt_units()[0] == "mm"
    assert result.world.shape == (4, 4)
    assert result.description


@pytest.mark.parametrize("name", SEEDED)
def test_the_same_seed_gives_the_same_case(head, name):
    image, mask, _, _ = head
    first, again = perturb(image, mask, name, seed=5), perturb(image, mask, name, seed=5)
    np.testing.assert_array_equal(first.image.get_fdata(), again.image.get_fdata())
    np.testing.assert_array_equal(first.world, again.world)
    assert perturb(image, mask, name, seed=6).description != first.description


# ---- each perturbation's own promise ----------------------------------------------------------


@pytest.mark.parametrize("seed", range(20))
def test_origin_moves_only_the_header(head, seed):
    image, mask, _, _ = head
    result = perturb(image, mask, "origin", seed=seed)
    np.testing.assert_array_equal(result.image.get_fdata(), image.get_fdata())
    np.testing.assert_allclose(result.world[:3, :3], np.eye(3))
    np.testing.assert_allclose(result.image.affine, result.world @ image.affine)
    assert 50.0 <= np.linalg.norm(mask_centroid_world(result.mask)) <= 100.0


@pytest.mark.parametrize("seed", range(5))
def test_rotate_is_a_30_degree_mostly_pitch_rotation_about_the_brain_centre(head, seed):
    image, mask, _, _ = head
    result = perturb(image, mask, "rotate", seed=seed)
    rotation = result.world[:3, :3]
    np.testing.assert_allclose(rotation @ rotation.T, np.eye(3), atol=1e-9)
    assert np.linalg.det(rotation) == pytest.approx(1.0)
    assert _rotation_degrees(result.world) == pytest.approx(30.0, abs=0.01)
    axis = Rotation.from_matrix(rotation).as_rotvec()
    assert abs(axis[0]) == max(abs(axis))  # about L-R more than any other axis
    centre = mask_centroid_world(mask)
    np.testing.assert_allclose(nib.affines.apply_affine(result.world, centre), centre, atol=1e-9)


@pytest.mark.parametrize("seed", range(5))
def test_tilt_origin_rotates_20_to_30_degrees_and_moves_the_origin(head, seed):
    image, mask, _, _ = head
    result = perturb(image, mask, "tilt-origin", seed=seed)
    assert 20.0 <= _rotation_degrees(result.world) <= 30.0
    assert 50.0 <= np.linalg.norm(mask_centroid_world(result.mask)) <= 100.0


@pytest.mark.parametrize("name", ["rotate", "tilt-origin"])
def test_rotation_enlarges_the_field_of_view_so_no_head_is_lost(head, perturbed, name):
    image, _, _, _ = head
    result = perturbed[name]
    assert np.prod(result.image.shape) > np.prod(image.shape)  # the head nearly fills the clean one
    clean, rotated = image.get_fdata(), result.image.get_fdata()
    total = float(clean[clean > 10].sum()) * _voxel_mm3(image)  # tissue, not background noise
    moved = float(rotated[rotated > 10].sum()) * _voxel_mm3(result.image)
    assert moved == pytest.approx(total, rel=0.01)


@pytest.mark.parametrize(
    ("name", "below", "margin"), [("crop-chin", True, 25.0), ("crop-top", False, 3.0)]
)
def test_crops_cut_the_field_of_view_at_the_margin_from_the_brain(
    head, perturbed, name, below, margin
):
    image, mask, points, _ = head
    result = perturbed[name]
    np.testing.assert_array_equal(result.world, np.eye(4))
    assert np.count_nonzero(np.asarray(result.mask.dataobj)) == np.count_nonzero(mask.dataobj)
    # a real crop: fewer slices along one axis, the same world positions and values
    lost = [a - b for a, b in zip(image.shape, result.image.shape, strict=True)]
    assert sorted(lost)[:2] == [0, 0] and max(lost) > 0
    axis = int(np.argmax(lost))
    shift = np.linalg.solve(image.affine, result.image.affine)
    np.testing.assert_allclose(shift[:3, :3], np.eye(3), atol=1e-6)
    start = int(round(shift[axis, 3]))
    kept = np.take(image.get_fdata(), range(start, start + result.image.shape[axis]), axis=axis)
    np.testing.assert_array_equal(result.image.get_fdata(), kept)
    # the cut lies on the end slice: the point ``margin`` below (above) the brain's extreme voxel
    brain_z = points[np.asarray(mask.dataobj) > 0]
    extreme = brain_z[np.argmin(brain_z[:, 2])] if below else brain_z[np.argmax(brain_z[:, 2])]
    target = extreme + [0.0, 0.0, -margin if below else margin]
    at = nib.affines.apply_affine(np.linalg.inv(result.image.affine), target)[axis]
    ends = np.array([0, result.image.shape[axis] - 1])
    assert np.min(np.abs(at - ends)) < 1.0


def test_deface_removes_the_face_and_no_brain(head, perturbed):
    image, mask, points, nose = head
    result = perturbed["deface"]
    clean, defaced = image.get_fdata(), result.image.get_fdata()
    brain = np.asarray(mask.dataobj) > 0
    np.testing.assert_array_equal(np.asarray(result.mask.dataobj) > 0, brain)
    np.testing.assert_array_equal(defaced[brain], clean[brain])
    assert nose.sum() > 20 and np.all(defaced[nose] == 0)
    zeroed = (defaced != clean) & (clean > 10)
    assert zeroed.sum() > nose.sum()
    brain_points = points[brain]
    middle = 0.5 * (brain_points[:, 2].min() + brain_points[:, 2].max())
    assert np.all(points[zeroed][:, 2] < middle)  # the face only: nothing above mid height,
    assert np.all(points[zeroed][:, 1] > brain_points[:, 1].mean())  # nothing at the back
    assert np.all(defaced[defaced != clean] == 0)  # zeroed, not changed otherwise


def test_conform_gives_freesurfer_s_grid_and_intensities(head, perturbed):
    result = perturbed["conform"]
    assert result.image.shape == (256, 256, 256)
    assert result.image.get_data_dtype() == np.uint8
    assert nib.aff2axcodes(result.image.affine) == ("L", "I", "A")
    np.testing.assert_allclose(result.image.header.get_zooms(), (1.0, 1.0, 1.0))
    # FreeSurfer's centre: voxel (128, 128, 128) is the clean volume's centre voxel n / 2
    image, _, _, _ = head
    centre = nib.affines.apply_affine(image.affine, np.array(image.shape) / 2)
    np.testing.assert_allclose(
        nib.affines.apply_affine(result.image.affine, [128] * 3), centre, atol=1e-4
    )
    brain = np.asarray(result.mask.dataobj) > 0
    white = np.percentile(np.asarray(result.image.dataobj)[brain], 92.5)
    assert white == pytest.approx(110, abs=3)


@pytest.mark.parametrize(("name", "zooms"), [("aniso", (0.8, 0.8, 1.3)), ("iso2mm", (2, 2, 2))])
def test_resampling_gives_the_voxel_sizes_asked(head, perturbed, name, zooms):
    image, _, _, _ = head
    result = perturbed[name]
    got = np.linalg.norm(result.image.affine[:3, :3], axis=0)
    clean_zooms = np.linalg.norm(image.affine[:3, :3], axis=0)
    expected = np.full(3, min(zooms))
    expected[np.argmax(np.abs(image.affine[2, :3]) / clean_zooms)] = max(zooms)  # nearest S
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(result.image.header.get_zooms(), expected, atol=1e-4)
    assert nib.aff2axcodes(result.image.affine) == nib.aff2axcodes(image.affine)
    # the same field of view: the same centre, the same size within a voxel
    extent = np.array(image.shape) * clean_zooms
    assert np.all(np.abs(np.array(result.image.shape) * got - extent) <= got)
    centres = [
        nib.affines.apply_affine(i.affine, (np.array(i.shape) - 1) / 2)
        for i in (image, result.image)
    ]
    np.testing.assert_allclose(centres[0], centres[1], atol=1e-4)  # float32 header


def test_bias_multiplies_by_a_smooth_field_of_the_strength_asked(head, perturbed):
    image, mask, _, _ = head
    result = perturbed["bias"]
    clean = image.get_fdata()
    tissue = clean > 10
    log_field = np.log(result.image.get_fdata()[tissue] / clean[tissue])
    assert np.ptp(log_field) == pytest.approx(1.2, abs=0.05)
    brain_field = np.log(result.image.get_fdata() / np.maximum(clean, 1e-6))
    brain = np.asarray(mask.dataobj) > 0
    assert np.std(brain_field[brain]) > 0.1  # the brain is shaded, not just the scalp
    # smooth: along every axis, neighbouring voxels of tissue differ by under 1.5 % per mm
    shaded = np.where(tissue, brain_field, np.nan)
    for axis, spacing in enumerate(np.linalg.norm(image.affine[:3, :3], axis=0)):
        assert np.nanmax(np.abs(np.diff(shaded, axis=axis))) / spacing < 0.015


# ---- errors and helpers -----------------------------------------------------------------------


def test_an_unknown_perturbation_is_refused_with_the_known_ones(head):
    image, mask, _, _ = head
    with pytest.raises(ValueError, match="use one of origin, rotate"):
        perturb(image, mask, "flip", seed=0)


def test_a_mask_on_another_grid_is_refused(head):
    image, mask, _, _ = head
    moved = nib.Nifti1Image(np.asarray(mask.dataobj), mask.affine @ np.diag([2.0, 2, 2, 1]))
    with pytest.raises(ValueError, match="on the image's grid"):
        perturb(image, moved, "origin")


def test_dice():
    a = np.zeros((4, 4), bool)
    b = a.copy()
    assert dice(a, b) == 1.0
    a[0, :2] = True
    b[0, 1:3] = True
    assert dice(a, b) == pytest.approx(0.5)


def test_mask_centroid_is_in_world_coordinates():
    affine = np.diag([-2.0, 3.0, 1.0, 1.0])
    affine[:3, 3] = [10.0, -5.0, 2.0]
    data = np.zeros((5, 5, 5), np.uint8)
    data[1:4, 2, 4] = 1  # voxel centre (2, 2, 4)
    centroid = mask_centroid_world(nib.Nifti1Image(data, affine))
    np.testing.assert_allclose(centroid, [6.0, 1.0, 6.0])


# ---- on a real head (../shared/data) ----------------------------------------------------------


@pytest.mark.shared
@pytest.mark.slow  # about 30 s for the ten perturbations of a 256^3 head
def test_perturbations_of_a_real_head_keep_its_freesurfer_brain(shared_data):
    folder = shared_data / "labelled-heads"
    image = nib.load(folder / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    mask = nib.load(
        folder / "derivatives" / "freesurfer" / "sub-01" / "anat" / "sub-01_desc-brain_mask.nii.gz"
    )
    centroid = mask_centroid_world(mask)
    volume = np.count_nonzero(np.asarray(mask.dataobj)) * _voxel_mm3(mask)
    for name in PERTURBATIONS:
        result = perturb(image, mask, name, seed=1)
        expected = nib.affines.apply_affine(result.world, centroid)
        assert np.linalg.norm(mask_centroid_world(result.mask) - expected) < 0.5, name
        after = np.count_nonzero(np.asarray(result.mask.dataobj)) * _voxel_mm3(result.mask)
        assert after == pytest.approx(volume, rel=0.01), name
