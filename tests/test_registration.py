"""Real registrations recover known geometry (3 mm images, the 'fast' preset), for every engine.

Both engines must write the same thing: ITK composite .h5 files that ANTs reads, in which the
forward transform maps template points to participant points. The ground truth below is built
with ``conftest.warp_image``, independently of either engine.
"""

from __future__ import annotations

import io
from pathlib import Path

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

from bids_app.participant.images import load_t1w
from bids_app.registration import get_engine
from bids_app.registration.greedy import GreedyEngine, to_sitk
from bids_app.transforms import read_composite
from bids_app.transforms.jacobian import log_jacobians
from bids_app.transforms.orientation import nifti_to_ants

ENGINES = ["ants", "greedy"]


def _ants_map_points(points_ras: np.ndarray, transform_path) -> np.ndarray:
    """ANTs' own point mapping (independent of bids_app.transforms), RAS in and out."""
    import ants

    lps = pd.DataFrame(points_ras * [-1, -1, 1], columns=["x", "y", "z"])
    return ants.apply_transforms_to_points(3, lps, [str(transform_path)]).to_numpy() * [-1, -1, 1]


def _engine(name: str):
    # Greedy also keeps its own warps, so that tests can compare them with the .h5 files.
    return GreedyEngine(keep_greedy_files=True) if name == "greedy" else get_engine(name)


@pytest.fixture(scope="module")
def fixed_brain(template_brain):
    """The template's brain cropped to the brain plus 4 voxels (beyond the registration mask's
    2-voxel dilation): the same voxels, a third fewer of them (ANTs' SyN takes a fifth less)."""
    inside = np.argwhere(np.asarray(template_brain.dataobj) > 0)
    low = np.maximum(inside.min(0) - 4, 0)
    high = np.minimum(inside.max(0) + 5, template_brain.shape)
    return template_brain.slicer[low[0] : high[0], low[1] : high[1], low[2] : high[2]]


def _register(engine, template_brain, participant: nib.Nifti1Image, tmp_path, seed=7):
    import ants

    fixed = nifti_to_ants(template_brain)
    moving_nifti, _ = load_t1w(_save(participant, tmp_path / "participant.nii.gz"))
    return _engine(engine).register(
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


# ---- a known affine and a smooth warp, on an LIA-stored anisotropic grid ------------------------
# The affine also shrinks volumes by a known factor: the forward transform's total log-Jacobian is
# known in closed form, so ANTs' one registration (its slowest test) shows both the recovered
# geometry and its Jacobians (the smooth warp changes volumes by at most (a k)^3 = 0.5 %).

S = 1.12  # the participant is S times the template's size (times the affine's own scales)
PARTICIPANT_TO_TEMPLATE = known_affine(scale=tuple(v / S for v in (1.06, 0.95, 1.02)))


def _to_template(points):
    """The ground truth: participant world -> template world (warp, then affine)."""
    affine = PARTICIPANT_TO_TEMPLATE
    moved = points + smooth_warp(points)
    return moved @ affine[:3, :3].T + affine[:3, 3]


@pytest.fixture(scope="module", params=ENGINES)
def lia_case(request, template_brain, fixed_brain, tmp_path_factory):
    """One registration per engine of a participant with a known warp, shared by the tests."""
    grid, shape = isotropic_grid(template_brain, 1.0, pad_mm=25)  # room for the larger brain
    zooms = np.array([2.6, 3.4, 3.0])
    grid = grid @ np.diag([*zooms, 1.0])
    shape = tuple(int(np.ceil(s / z)) for s, z in zip(shape, zooms, strict=True))
    participant = reorient(warp_image(template_brain, _to_template, grid, shape), "LIA")
    folder = tmp_path_factory.mktemp(f"lia_{request.param}")
    result = _register(request.param, fixed_brain, participant, folder)
    return {"engine": request.param, "participant": participant, "result": result, "dir": folder}


def test_known_affine_and_warp_on_an_lia_anisotropic_grid_are_recovered(lia_case):
    participant, result = lia_case["participant"], lia_case["result"]
    landmarks = _brain_points(participant)
    recovered = _ants_map_points(_to_template(landmarks), result.forward_xfm)
    errors = np.linalg.norm(recovered - landmarks, axis=1)
    print(
        f"\n{lia_case['engine']}: landmark error (mm), known affine + warp, LIA 2.6x3.4x3 mm: "
        f"mean {errors.mean():.2f}, p95 {np.percentile(errors, 95):.2f}, max {errors.max():.2f}"
    )
    assert errors.mean() < 1.5
    assert np.percentile(errors, 95) < 3.0
    # Without registration the same points are this far off: the test can fail.
    assert np.linalg.norm(_to_template(landmarks) - landmarks, axis=1).mean() > 5.0
    # Our reader of the .h5 agrees with ANTs' own mapping.
    ours = read_composite(result.forward_xfm).map_points(_to_template(landmarks))
    np.testing.assert_allclose(ours, recovered, atol=0.02)


def test_inverse_transform_maps_participant_points_to_the_template_and_back(lia_case):
    participant, result = lia_case["participant"], lia_case["result"]
    landmarks = _brain_points(participant)
    to_template = _ants_map_points(landmarks, result.inverse_xfm)
    errors = np.linalg.norm(to_template - _to_template(landmarks), axis=1)
    round_trip = np.linalg.norm(
        _ants_map_points(to_template, result.forward_xfm) - landmarks, axis=1
    )
    print(
        f"\n{lia_case['engine']}: inverse landmark error mean {errors.mean():.2f} mm; "
        f"round trip mean {round_trip.mean():.3f}, max {round_trip.max():.3f} mm"
    )
    assert errors.mean() < 1.5
    assert round_trip.mean() < 0.1
    assert round_trip.max() < 0.5


# ---- the known volume change: the Jacobians -----------------------------------------------------


@pytest.mark.parametrize("lia_case", ["ants"], indirect=True)
def test_known_volume_change_gives_total_log_jacobian_minus_log_det_of_the_affine(
    lia_case, fixed_brain
):
    """The forward transform (template -> participant points) grows volumes by
    1 / det(PARTICIPANT_TO_TEMPLATE) (3 ln S less the affine's own scales): all of it in the
    affine part, none in the field."""
    expected = -np.log(np.linalg.det(PARTICIPANT_TO_TEMPLATE[:3, :3]))
    assert expected > 0.3  # a change the registration must find: the test can fail
    _assert_volume_change_in_the_affine(
        lia_case["result"].forward_xfm, fixed_brain, expected, f"{lia_case['engine']}, LIA"
    )


def _assert_volume_change_in_the_affine(forward_xfm, template_brain, expected, label):
    """Inside the template's brain the total log-Jacobian is ``expected`` and the field's own is
    about 0: the volume change is in the affine part, none in the field."""
    from scipy import ndimage

    nonlinear, total, field_affine = log_jacobians(read_composite(forward_xfm))
    mask = brain_mask_of(template_brain)
    inside = ndimage.binary_erosion(np.asarray(mask.dataobj) > 0, iterations=2)
    assert np.allclose(field_affine, template_brain.affine, atol=1e-3)  # maps on the template grid
    print(
        f"\n{label}: median total log-J {np.median(total[inside]):.4f} (expected "
        f"{expected:.4f}), median nonlinear {np.median(nonlinear[inside]):.4f}"
    )
    assert np.median(total[inside]) == pytest.approx(expected, abs=0.03)
    assert abs(np.median(nonlinear[inside])) < 0.03
    assert abs(float(nonlinear[inside].mean())) < 0.05


@pytest.mark.parametrize("lia_case", ["greedy"], indirect=True)
def test_greedy_h5_resamples_as_greedy_itself_does(lia_case, fixed_brain):
    """ants.apply_transforms with our .h5 == Greedy's own reslicing with its own warp + matrix."""
    import ants
    from picsl_greedy import Greedy3D

    folder = lia_case["dir"]
    fixed = nifti_to_ants(fixed_brain)
    moving = ants.image_read(str(folder / "participant.nii.gz"))
    ours = ants.apply_transforms(fixed, moving, [str(lia_case["result"].forward_xfm)]).numpy()
    greedy = Greedy3D()
    greedy.execute(
        f"-d 3 -rf fixed -rm moving resliced -r {folder}/reg_greedy_warp.nii.gz "
        f"{folder}/reg_greedy_affine.mat",
        out=io.StringIO(), fixed=to_sitk(fixed), moving=to_sitk(moving), resliced=None,
    )  # fmt: skip
    theirs = _sitk_array(greedy["resliced"])
    inside = theirs > 0.05 * theirs.max()
    assert inside.mean() > 0.1
    assert np.corrcoef(ours[inside], theirs[inside])[0, 1] > 0.999
    assert np.abs(ours - theirs).max() < 1e-3 * theirs.max()


def _sitk_array(image) -> np.ndarray:
    """SimpleITK's (k, j, i[, component]) array indexed (i, j, k[, component]), as ANTs does."""
    import SimpleITK as sitk

    array = sitk.GetArrayFromImage(image)
    return array.transpose(2, 1, 0, *range(3, array.ndim))


@pytest.mark.parametrize("lia_case", ["greedy"], indirect=True)
def test_greedy_warps_are_lps_vectors_composed_after_its_ras_matrix(lia_case):
    """Our .h5 holds Greedy's own parts: its .mat as the RAS matrix, its warp's LPS vectors
    flipped to RAS (the resampling test above shows that this reading of them is Greedy's)."""
    import SimpleITK as sitk

    folder = lia_case["dir"]
    matrix = np.loadtxt(folder / "reg_greedy_affine.mat")
    warp = _sitk_array(sitk.ReadImage(str(folder / "reg_greedy_warp.nii.gz")))
    transform = read_composite(lia_case["result"].forward_xfm)
    assert len(transform.parts) == 2
    np.testing.assert_allclose(transform.parts[0], matrix, atol=1e-4)
    np.testing.assert_allclose(transform.parts[1].vectors, warp * [-1, -1, 1], atol=1e-4)
    assert np.abs(warp).max() > 1.0  # the warp is not trivial: the test can fail


# ---- uniform scaling: a known Jacobian ---------------------------------------------------------


# ANTs' Jacobians: test_known_volume_change_gives_total_log_jacobian_minus_log_det_of_the_affine,
# on the LIA case it registers anyway. On that case Greedy's 'fast' preset recovers the landmarks
# but puts a -0.10 median log-Jacobian into its field (total 0.27, not 0.31): it keeps this case.
@pytest.mark.parametrize("engine", ["greedy"])
def test_uniformly_scaled_template_gives_total_log_jacobian_three_log_s(
    engine, template_brain, fixed_brain, tmp_path
):
    from scipy import ndimage

    s = 1.12
    centre = nib.affines.apply_affine(
        template_brain.affine, ndimage.center_of_mass(np.asarray(template_brain.dataobj) > 0)
    )
    grid, shape = isotropic_grid(template_brain, 3.0, pad_mm=20)
    participant = warp_image(template_brain, lambda p: centre + (p - centre) / s, grid, shape)

    result = _register(engine, fixed_brain, participant, tmp_path)
    _assert_volume_change_in_the_affine(
        result.forward_xfm, fixed_brain, 3 * np.log(s), f"{engine}, scaling s={s}"
    )


# ---- linear registration of an LAS-stored head, and the initial transform -----------------------


def test_greedy_linear_result_is_honoured_as_the_initial_transform(template_brain, tmp_path):
    """head-linear recovers a known affine of an LAS-stored image (RAS/LPS conventions of the
    matrices); head-syn, which has no linear stage, starts from it and keeps it exactly."""
    affine = known_affine(rot_deg=(10.0, -5.0, 7.0), shift=(6.0, -8.0, 5.0))
    to_template = lambda p: p @ affine[:3, :3].T + affine[:3, 3]  # noqa: E731
    grid, shape = isotropic_grid(template_brain, 3.0, pad_mm=15)
    participant = reorient(warp_image(template_brain, to_template, grid, shape), "LAS")
    moving_nifti, _ = load_t1w(_save(participant, tmp_path / "participant.nii.gz"))
    fixed, moving = nifti_to_ants(template_brain), nifti_to_ants(moving_nifti)
    engine = _engine("greedy")

    linear = engine.register(
        fixed, moving, preset="head-linear", out_prefix=tmp_path / "lin_", seed=7
    )
    linear_part = read_composite(linear.forward_xfm)
    assert not linear_part.fields
    landmarks = _brain_points(participant)
    errors = np.linalg.norm(
        _ants_map_points(to_template(landmarks), linear.forward_xfm) - landmarks, axis=1
    )
    assert errors.mean() < 1.0
    # The inverse is the inverse matrix.
    np.testing.assert_allclose(
        read_composite(linear.inverse_xfm).linear @ linear_part.linear, np.eye(4), atol=1e-4
    )

    warped = engine.register(
        fixed, moving, preset="head-syn", out_prefix=tmp_path / "syn_", seed=7,
        initial_xfm=linear.forward_xfm,
    )  # fmt: skip
    np.testing.assert_allclose(
        read_composite(warped.forward_xfm).linear, linear_part.linear, atol=1e-5
    )
    errors = np.linalg.norm(
        _ants_map_points(to_template(landmarks), warped.forward_xfm) - landmarks, axis=1
    )
    assert errors.mean() < 1.0


# ---- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("lia_case", ["greedy"], indirect=True)
def test_greedy_refuses_a_deformable_initial_transform_naming_the_file(lia_case, template_brain):
    from bids_app.errors import RegistrationError

    fixed = nifti_to_ants(template_brain)
    with pytest.raises(RegistrationError, match="holds a displacement field") as err:
        _engine("greedy").register(
            fixed, fixed, preset="fast", out_prefix=lia_case["dir"] / "again_", seed=7,
            initial_xfm=lia_case["result"].forward_xfm,
        )  # fmt: skip
    assert str(lia_case["result"].forward_xfm) in str(err.value)


def test_greedy_engine_without_picsl_greedy_says_how_to_install_it(monkeypatch, template_brain):
    import sys

    from bids_app.errors import RegistrationError

    monkeypatch.setitem(sys.modules, "picsl_greedy", None)  # import fails as if not installed
    fixed = nifti_to_ants(template_brain)
    with pytest.raises(RegistrationError, match=r"pip install \"picsl-greedy>=1.4\"") as err:
        get_engine("greedy").register(fixed, fixed, preset="fast", out_prefix=Path("x_"), seed=1)
    assert "--engine ants" in str(err.value)


@pytest.mark.parametrize("engine", ENGINES)
def test_every_engine_offers_the_presets_the_pipeline_asks_for(engine):
    """The protocol's presets (base.REQUIRED_PRESETS), with a deformable stage where the
    pipeline reads a displacement field (all but base.LINEAR_PRESETS); the fake engine
    (tests/fakes.py) offers the same."""
    from bids_app.registration.base import LINEAR_PRESETS, REQUIRED_PRESETS
    from bids_app.registration.registry import get_preset

    for name in REQUIRED_PRESETS:
        preset = get_preset(engine, name)
        deformable = any(word in preset.description for word in ("SyN", "diffeomorphic"))
        assert deformable == (name not in LINEAR_PRESETS), (name, preset.description)
