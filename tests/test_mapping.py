"""mninorm-transform: points, voxel coordinates, images and ROI volumes, on a real run's outputs."""

from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from conftest import E2E_SPACE, known_affine

from bids_app.errors import ExitCode
from bids_app.transform_cli import main
from bids_app.transforms.mapping import find_transforms, map_points

SPACE = E2E_SPACE


def _brain_points(mask_path, count=200, seed=5) -> np.ndarray:
    from scipy import ndimage

    mask = nib.load(mask_path)
    inside = ndimage.binary_erosion(mask.get_fdata() > 0, iterations=2)
    ijk = np.argwhere(inside)
    chosen = np.random.default_rng(seed).choice(len(ijk), size=min(count, len(ijk)), replace=False)
    return nib.affines.apply_affine(mask.affine, ijk[chosen])


def _anat(run, subject, session=None):
    folder = run["out"] / f"sub-{subject}"
    return (folder / f"ses-{session}" if session else folder) / "anat"


def _write(table: dict, path):
    pd.DataFrame(table).to_csv(path, sep="\t", index=False)
    return path


def test_points_go_to_the_template_and_back_within_a_tenth_of_a_millimetre(run, tmp_path):
    points = _brain_points(_anat(run, "02") / "sub-02_desc-brain_mask.nii.gz")
    source = _write({"name": [f"p{i}" for i in range(len(points))], "x": points[:, 0],
                     "y": points[:, 1], "z": points[:, 2]}, tmp_path / "points.tsv")  # fmt: skip
    common = ["--participant-label", "02"]
    assert main(["points", str(run["out"]), str(source), str(tmp_path / "mni.tsv"), *common,
                 "--from-space", "T1w", "--to-space", SPACE]) == 0  # fmt: skip
    mni = pd.read_csv(tmp_path / "mni.tsv", sep="\t")
    assert list(mni["name"]) == [f"p{i}" for i in range(len(points))]  # other columns carried
    back_in = _write({"x": mni[f"x_{SPACE}"], "y": mni[f"y_{SPACE}"], "z": mni[f"z_{SPACE}"]},
                     tmp_path / "back_in.tsv")  # fmt: skip
    # T1w in any case is the native space (and the columns are named with its usual spelling)
    assert main(["points", str(run["out"]), str(back_in), str(tmp_path / "back.tsv"), *common,
                 "--from-space", SPACE, "--to-space", "t1w"]) == 0  # fmt: skip
    back = pd.read_csv(tmp_path / "back.tsv", sep="\t")[["x_T1w", "y_T1w", "z_T1w"]].to_numpy()
    errors = np.linalg.norm(back - points, axis=1)
    moved = np.linalg.norm(mni[[f"x_{SPACE}", f"y_{SPACE}", f"z_{SPACE}"]].to_numpy() - points, 1)
    print(
        f"\nround trip T1w -> {SPACE} -> T1w: max {errors.max():.3f} mm, mean {errors.mean():.3f}"
    )
    # SyN's inverse field is a numerical inverse: a few points near strong local deformation of
    # these coarse 3 mm images come back up to ~0.25 mm off (measured: max 0.23 mm, mean 0.03 mm).
    assert np.percentile(errors, 95) < 0.1
    assert errors.max() < 0.5
    assert moved.mean() > 3  # the points did move: the round trip is not trivially exact


def test_points_of_a_known_affine_participant_land_where_the_affine_puts_them(run):
    # sub-01 was made by moving the template brain with known_affine(): T1w x -> template A x.
    truth = known_affine()
    transforms = find_transforms(run["out"], "01", SPACE, session="1", run="1")
    points = _brain_points(_anat(run, "01", "1") / "sub-01_ses-1_run-1_desc-brain_mask.nii.gz")
    mapped = map_points(points, transforms, SPACE)
    errors = np.linalg.norm(mapped - nib.affines.apply_affine(truth, points), axis=1)
    print(f"\nknown affine: mean {errors.mean():.2f} mm, p95 {np.percentile(errors, 95):.2f} mm")
    # Within the registration's own error on these 3 mm images (see test_registration.py).
    assert errors.mean() < 1.0
    assert np.percentile(errors, 95) < 2.0


def _dice(a, b) -> float:
    a, b = a > 0, b > 0
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def test_warping_the_native_mask_reproduces_the_pipelines_template_space_mask(run, tmp_path):
    folder = _anat(run, "02")
    out = tmp_path / "mask_mni.nii.gz"
    assert main(["image", str(run["out"]), str(folder / "sub-02_desc-brain_mask.nii.gz"), str(out),
                 "--participant-label", "02", "--from-space", "T1w",
                 "--to-space", SPACE]) == 0  # fmt: skip
    written = nib.load(folder / f"sub-02_space-{SPACE}_desc-brain_mask.nii.gz")
    mine = nib.load(out)
    np.testing.assert_allclose(mine.affine, written.affine, atol=1e-4)
    assert set(np.unique(mine.get_fdata())) <= {0.0, 1.0}  # label interpolation chosen for a mask
    assert _dice(mine.get_fdata(), written.get_fdata()) > 0.95


@pytest.fixture
def octant_atlas(tmp_path, templateflow_home):
    """An atlas in template space: labels 1-8, the template brain cut into octants."""
    template_mask = nib.load(
        templateflow_home / f"tpl-{SPACE}" / f"tpl-{SPACE}_res-01_desc-brain_mask.nii.gz"
    )
    inside = template_mask.get_fdata() > 0
    ijk = np.argwhere(inside)
    labels = np.zeros(inside.shape, np.int16)
    labels[tuple(ijk.T)] = ((ijk > ijk.mean(0)) * [1, 2, 4]).sum(1) + 1
    path = tmp_path / "atlas.nii.gz"
    nib.Nifti1Image(labels, template_mask.affine).to_filename(path)
    return path, inside


def test_an_atlas_goes_to_native_space_and_back_keeping_its_labels(run, tmp_path, octant_atlas):
    atlas, inside = octant_atlas
    native, back = tmp_path / "native.nii.gz", tmp_path / "back.nii.gz"
    common = ["--participant-label", "02"]
    assert main(["image", str(run["out"]), str(atlas), str(native), *common,
                 "--from-space", SPACE, "--to-space", "T1w"]) == 0  # fmt: skip
    assert main(["image", str(run["out"]), str(native), str(back), *common,
                 "--from-space", "T1w", "--to-space", SPACE]) == 0  # fmt: skip
    for path in (native, back):
        assert set(np.unique(nib.load(path).get_fdata()).astype(int)) == set(range(9))
    agreement = (nib.load(back).get_fdata() == nib.load(atlas).get_fdata())[inside]
    assert agreement.mean() > 0.85


def test_roi_volumes_in_native_space_add_up_to_the_brain(run, tmp_path, octant_atlas):
    atlas, _ = octant_atlas
    names = _write({"index": list(range(1, 9)), "name": [f"octant{i}" for i in range(1, 9)]},
                   tmp_path / "labels.tsv")  # fmt: skip
    out = tmp_path / "volumes.tsv"
    assert main(["rois", str(run["out"]), str(atlas), str(out), "--participant-label", "02",
                 "--template", SPACE, "--labels", str(names)]) == 0  # fmt: skip
    table = pd.read_csv(out, sep="\t")
    assert list(table["label"]) == list(range(1, 9))
    assert table["name"].iloc[0] == "octant1"
    native_mask = nib.load(_anat(run, "02") / "sub-02_desc-brain_mask.nii.gz")
    brain_mm3 = native_mask.get_fdata().sum() * np.prod(native_mask.header.get_zooms())
    assert table["volume_mm3"].sum() == pytest.approx(brain_mm3, rel=0.1)


@pytest.mark.parametrize(("subject", "session", "name"), [
    ("01", "1", "sub-01_ses-1_run-2_T1w.nii.gz"),  # stored LAS
    ("02", None, "sub-02_T1w.nii.gz"),  # stored LIA
])  # fmt: skip
def test_voxel_indices_of_las_and_lia_images_give_nibabels_world_coordinates(
    run, tmp_path, subject, session, name
):
    image = run["root"] / f"sub-{subject}" / (f"ses-{session}" if session else "") / "anat" / name
    img = nib.load(image)
    ijk = np.array([[0, 0, 0], [10, 5, 7], [s - 1 for s in img.shape[:3]]])
    source = _write({"i": ijk[:, 0], "j": ijk[:, 1], "k": ijk[:, 2]}, tmp_path / "ijk.tsv")
    out = tmp_path / "xyz.tsv"
    assert main(["coords", str(image), str(source), str(out), "--to", "world"]) == 0
    xyz = pd.read_csv(out, sep="\t")[["x", "y", "z"]].to_numpy()
    np.testing.assert_allclose(xyz, nib.affines.apply_affine(img.affine, ijk), atol=1e-3)


def test_a_missing_inverse_transform_is_named(run, tmp_path, capsys):
    copy = tmp_path / "out"
    shutil.copytree(run["out"], copy)
    next((copy / "sub-02" / "anat").glob(f"*_from-{SPACE}_to-T1w_*xfm.h5")).unlink()
    points = _write({"x": [0.0], "y": [0.0], "z": [0.0]}, tmp_path / "p.tsv")
    code = main(["points", str(copy), str(points), str(tmp_path / "o.tsv"), "--participant-label",
                 "02", "--from-space", "T1w", "--to-space", SPACE])  # fmt: skip
    assert code == ExitCode.MISSING_INPUT
    assert "no inverse transform" in capsys.readouterr().err


def test_two_templates_or_two_native_spaces_are_a_usage_error(run, tmp_path):
    points = _write({"x": [0.0], "y": [0.0], "z": [0.0]}, tmp_path / "p.tsv")
    code = main(["points", str(run["out"]), str(points), str(tmp_path / "o.tsv"),
                 "--participant-label", "02", "--from-space", "T1w",
                 "--to-space", "T1w"])  # fmt: skip
    assert code == ExitCode.USAGE
