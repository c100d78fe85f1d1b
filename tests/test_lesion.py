"""Lesion masks: found next to their T1w, checked, used as cost-function masks, written out."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import (
    DATASET_POSES,
    TEST_TEMPLATE,
    logging_restored,
    participant_brain,
    reorient,
    save_t1w,
    with_skull,
    write_dataset_description,
)
from fakes import FakeEngines

from bids_app.errors import ExitCode, ImageError
from bids_app.participant.lesion import find_lesion, fixed_without_lesion, load_lesion

# ---- which mask belongs to which T1w ----------------------------------------------------------


@pytest.mark.parametrize(
    ("files", "t1w", "expected"),
    [
        (["sub-01_label-lesion_roi.nii.gz"], "sub-01_run-1_T1w.nii.gz",
         "sub-01_label-lesion_roi.nii.gz"),
        (["sub-01_label-lesion_roi.nii.gz", "sub-01_run-2_label-lesion_roi.nii.gz"],
         "sub-01_run-2_T1w.nii.gz", "sub-01_run-2_label-lesion_roi.nii.gz"),  # the most specific
        (["sub-01_run-2_label-lesion_roi.nii.gz"], "sub-01_run-1_T1w.nii.gz", None),  # another run
        (["sub-01_ses-1_label-lesion_roi.nii.gz"], "sub-01_ses-1_run-1_T1w.nii.gz",
         "sub-01_ses-1_label-lesion_roi.nii.gz"),
        (["sub-01_acq-flair_label-lesion_roi.nii.gz"], "sub-01_acq-mprage_T1w.nii.gz", None),
        (["sub-01_desc-lesion_mask.nii.gz"], "sub-01_T1w.nii.gz", None),  # not the convention
    ],
)  # fmt: skip
def test_a_lesion_mask_is_tied_to_its_t1w_by_its_entities(tmp_path, files, t1w, expected):
    from bids.layout import parse_file_entities

    for name in [*files, t1w]:
        (tmp_path / name).write_bytes(b"")
    entities = parse_file_entities(str(tmp_path / t1w))
    found = find_lesion(tmp_path / t1w, entities)
    assert (found.name if found else None) == expected


def test_two_equally_fitting_lesion_masks_are_an_error(tmp_path):
    from bids.layout import parse_file_entities

    for name in ("sub-01_run-1_T1w.nii.gz", "sub-01_run-1_label-lesion_roi.nii.gz",
                 "sub-01_run-1_label-lesion_roi.nii"):  # fmt: skip
        (tmp_path / name).write_bytes(b"")
    t1w = tmp_path / "sub-01_run-1_T1w.nii.gz"
    with pytest.raises(ImageError, match="several lesion masks"):
        find_lesion(t1w, parse_file_entities(str(t1w)))


# ---- loading and checking ---------------------------------------------------------------------

# A lesion in template (RAS mm) coordinates: left hemisphere, inside the test brain
LESION_CENTRE_MM = np.array([-28.0, -12.0, 18.0])
LESION_RADIUS_MM = 11.0


def _sphere(img: nib.Nifti1Image, centre: np.ndarray, radius: float) -> np.ndarray:
    ijk = np.indices(img.shape[:3]).reshape(3, -1).T
    xyz = nib.affines.apply_affine(img.affine, ijk)
    return (np.linalg.norm(xyz - centre, axis=1) <= radius).reshape(img.shape[:3])


def _participant_centre(subject: str) -> np.ndarray:
    """The lesion centre in the participant's space (the pose maps participant -> template)."""
    return nib.affines.apply_affine(np.linalg.inv(DATASET_POSES[subject]), LESION_CENTRE_MM)


@pytest.fixture(scope="module")
def brain_with_lesion(template_brain):
    """sub-01's brain with a CSF-like sphere, and the sphere as a mask on the same grid."""
    brain = participant_brain(template_brain, DATASET_POSES["sub-01"])
    lesion = _sphere(brain, _participant_centre("sub-01"), LESION_RADIUS_MM)
    data = brain.get_fdata(dtype=np.float32)
    inside = data > 0
    assert lesion.sum() > 0 and inside[lesion].all()
    data[lesion] = 0.15 * np.percentile(data[inside], 50)
    return nib.Nifti1Image(data, brain.affine), nib.Nifti1Image(
        lesion.astype(np.uint8), brain.affine
    )


def test_a_lesion_mask_on_the_t1w_grid_is_used_as_it_is(brain_with_lesion, tmp_path):
    t1w, mask = brain_with_lesion
    mask.to_filename(tmp_path / "lesion.nii.gz")
    lesion = load_lesion(tmp_path / "lesion.nii.gz", "sub-01/anat/x", t1w)
    assert not lesion.resampled
    assert np.array_equal(np.asarray(lesion.img.dataobj), np.asarray(mask.dataobj))
    voxel_ml = np.prod(t1w.header.get_zooms()[:3]) / 1000
    assert lesion.volume_ml == pytest.approx(lesion.voxels * voxel_ml)


def test_a_lesion_mask_on_another_grid_is_resampled_onto_the_t1w(brain_with_lesion, tmp_path):
    t1w, mask = brain_with_lesion
    reorient(mask, "LPI").to_filename(tmp_path / "lesion.nii.gz")  # same voxels, flipped storage
    lesion = load_lesion(tmp_path / "lesion.nii.gz", "sub-01/anat/x", t1w)
    assert lesion.resampled
    assert np.array_equal(np.asarray(lesion.img.dataobj), np.asarray(mask.dataobj))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d, a: (d * 0.6, a), "not binary"),
        (lambda d, a: (d * 0, a), "is empty"),
        (lambda d, a: (d, a @ _shifted(400.0)), "outside the T1w's field of view"),
        (lambda d, a: (np.roll(d, 40, axis=0), a), "inside the head"),
    ],
)  # fmt: skip
def test_a_bad_lesion_mask_is_a_clear_error(brain_with_lesion, tmp_path, change, message):
    t1w, mask = brain_with_lesion
    data, affine = change(np.asarray(mask.dataobj).astype(np.float32), mask.affine.copy())
    nib.Nifti1Image(data, affine).to_filename(tmp_path / "lesion.nii.gz")
    with pytest.raises(ImageError, match=message):
        load_lesion(tmp_path / "lesion.nii.gz", "sub-01/anat/x", t1w)


def _shifted(mm: float) -> np.ndarray:
    shift = np.eye(4)
    shift[0, 3] = mm / 3.0  # voxels of the 3 mm grid
    return shift


def test_the_template_space_hole_is_where_the_start_puts_the_lesion(brain_with_lesion, tmp_path):
    """With the start transform the participant's pose, the hole in the fixed mask covers the
    lesion's template-space sphere (plus the dilation), and nothing far from it."""
    import ants

    from bids_app.transforms import CompositeTransform, write_composite
    from bids_app.transforms.orientation import nifti_to_ants

    t1w, mask = brain_with_lesion
    template_grid = participant_brain(t1w, np.eye(4), zooms=(3.0, 3.0, 3.0))  # any RAS grid
    fixed = nifti_to_ants(template_grid)
    start = write_composite(  # template points -> participant points
        CompositeTransform((np.linalg.inv(DATASET_POSES["sub-01"]),)), tmp_path / "start.h5"
    )
    masked = fixed_without_lesion(fixed, None, nifti_to_ants(mask), start).numpy() > 0
    ijk = np.indices(masked.shape).reshape(3, -1).T
    xyz = nib.affines.apply_affine(template_grid.affine, ijk).reshape(*masked.shape, 3)
    distance = np.linalg.norm(xyz - LESION_CENTRE_MM, axis=-1)
    assert not masked[distance <= LESION_RADIUS_MM - 2].any()  # the lesion is out
    assert masked[distance > LESION_RADIUS_MM + 3 * 3.0 + 3].all()  # > dilation + a voxel: kept
    assert isinstance(fixed, ants.ANTsImage)


# ---- end to end: found, used, written -----------------------------------------------------------


class RecordingEngines(FakeEngines):
    """The fake engines, keeping the masks every registration was given (in-process runs)."""

    def __init__(self, poses):
        super().__init__(poses)
        self.calls: list[dict] = []

    def __call__(self, name: str, threads: int = 1):
        engine = super().__call__(name, threads)
        register = engine.register

        def recording(fixed, moving, **kwargs):
            self.calls.append({"fixed": fixed, "moving": moving, **kwargs})
            return register(fixed, moving, **kwargs)

        engine.register = recording
        return engine


@pytest.fixture(scope="module")
def lesion_run(template_brain, templateflow_home, brain_with_lesion, tmp_path_factory):
    """sub-01: a skull-stripped brain and its lesion on the same grid; sub-02: a whole head (brain
    extraction runs) whose lesion mask is stored on another grid (LAS); sub-03: a non-binary
    lesion mask (that T1w fails, the others do not)."""
    from bids_app.cli import main

    root = tmp_path_factory.mktemp("lesion-bids")
    write_dataset_description(root)
    brain, mask = brain_with_lesion
    t1w = save_t1w(brain, root, "01")
    mask.to_filename(t1w.parent / "sub-01_label-lesion_roi.nii.gz")
    head = participant_brain(template_brain, DATASET_POSES["sub-02"])
    head_lesion = _sphere(head, _participant_centre("sub-02"), LESION_RADIUS_MM)
    head_data = head.get_fdata(dtype=np.float32)
    head_data[head_lesion] *= 0.15
    t1w = save_t1w(with_skull(nib.Nifti1Image(head_data, head.affine), seed=2), root, "02")
    lesion_img = nib.Nifti1Image(head_lesion.astype(np.uint8), head.affine)
    reorient(lesion_img, "LAS").to_filename(t1w.parent / "sub-02_label-lesion_roi.nii.gz")
    t1w = save_t1w(brain, root, "03")
    nib.Nifti1Image(np.asarray(mask.dataobj) * 0.5, mask.affine).to_filename(
        t1w.parent / "sub-03_label-lesion_roi.nii.gz"
    )
    out = tmp_path_factory.mktemp("lesion-out")
    poses = {"sub-01": DATASET_POSES["sub-01"], "sub-02": DATASET_POSES["sub-02"],
             "sub-03": DATASET_POSES["sub-01"]}  # fmt: skip
    engines = RecordingEngines({s: np.linalg.inv(p) for s, p in poses.items()})
    with logging_restored():
        code = main(
            [str(root), str(out), "participant", "--output-spaces", TEST_TEMPLATE, "--preset",
             "fast", "--skip-bids-validation", "--in-process"],
            engines=engines,
        )  # fmt: skip
    return {"root": root, "out": out, "code": code, "calls": engines.calls}


def _anat(out: Path, subject: str) -> Path:
    return out / f"sub-{subject}" / "anat"


def test_one_bad_lesion_mask_fails_only_its_t1w(lesion_run):
    out = lesion_run["out"]
    assert lesion_run["code"] == ExitCode.PARTICIPANT_FAILED
    record = json.loads((out / "sub-03" / "log" / "sub-03_desc-mninorm_run.json").read_text())
    assert record["Status"] == "failed" and "not binary" in record["Error"]
    for subject in ("01", "02"):
        record = json.loads(
            (out / f"sub-{subject}" / "log" / f"sub-{subject}_desc-mninorm_run.json").read_text()
        )
        assert record["Status"] == "ok", record.get("Error")
        assert record["LesionMask"]["Source"].endswith(f"sub-{subject}_label-lesion_roi.nii.gz")
        assert record["LesionMask"]["Resampled"] is (subject == "02")


def test_every_registration_leaves_the_lesion_out_of_its_metric(lesion_run):
    calls = [c for c in lesion_run["calls"] if "sub-0" in str(c["out_prefix"])]
    presets = {c["preset"] for c in calls}
    assert {"head-linear", "head-syn", "fast"} <= presets  # brain extraction (sub-02) and the rest
    for call in calls:
        moving_mask = call["moving_mask"].numpy() > 0
        subject = next(p for p in Path(call["out_prefix"]).parts if p.startswith("sub-"))
        centre = _participant_centre(subject)
        moving = call["moving"]
        ijk = np.indices(moving.shape).reshape(3, -1).T
        from bids_app.transforms.orientation import ants_to_nifti

        grid = ants_to_nifti(moving)
        xyz = nib.affines.apply_affine(grid.affine, ijk).reshape(*moving.shape, 3)
        distance = np.linalg.norm(xyz - centre, axis=-1)
        assert not moving_mask[distance <= LESION_RADIUS_MM - 3].any(), call["preset"]
        assert moving_mask[(distance > LESION_RADIUS_MM + 4) & (distance < 25)].any()
        # the template-space hole, where the (exact) fake start puts the lesion
        fixed_mask = call["fixed_mask"].numpy() > 0
        fixed = ants_to_nifti(call["fixed_mask"])
        ijk = np.indices(fixed_mask.shape).reshape(3, -1).T
        xyz = nib.affines.apply_affine(fixed.affine, ijk).reshape(*fixed_mask.shape, 3)
        hole = np.linalg.norm(xyz - LESION_CENTRE_MM, axis=-1) <= LESION_RADIUS_MM - 3
        assert not fixed_mask[hole].any(), call["preset"]


def test_the_lesion_is_written_in_template_space_and_kept_in_the_brain_mask(lesion_run):
    out = lesion_run["out"]
    for subject in ("01", "02"):
        anat = _anat(out, subject)
        roi = nib.load(anat / f"sub-{subject}_space-{TEST_TEMPLATE}_label-lesion_roi.nii.gz")
        data = np.asarray(roi.dataobj)
        assert data.dtype == np.uint8 and set(np.unique(data)) == {0, 1}
        centre = nib.affines.apply_affine(roi.affine, np.argwhere(data > 0).mean(axis=0))
        assert np.linalg.norm(centre - LESION_CENTRE_MM) < 3.0  # one 3 mm voxel (fake warp 0.5)
        volume = data.sum() * np.prod(roi.header.get_zooms()) / 1000
        sphere = 4 / 3 * np.pi * LESION_RADIUS_MM**3 / 1000
        scale = abs(np.linalg.det(DATASET_POSES[f"sub-{subject}"][:3, :3]))
        assert volume == pytest.approx(sphere * scale, rel=0.35)
        sidecar = json.loads(
            (anat / f"sub-{subject}_space-{TEST_TEMPLATE}_label-lesion_roi.json").read_text()
        )
        assert sidecar["Type"] == "Lesion" and "LesionMask" in sidecar
        t1w_sidecar = json.loads(
            (anat / f"sub-{subject}_space-{TEST_TEMPLATE}_desc-preproc_T1w.json").read_text()
        )
        assert "cost-function" in t1w_sidecar["LesionMask"]["Use"]
        native_mask = np.asarray(nib.load(anat / f"sub-{subject}_desc-brain_mask.nii.gz").dataobj)
        native_t1w = nib.load(anat / f"sub-{subject}_desc-preproc_T1w.nii.gz")
        ijk = np.indices(native_mask.shape).reshape(3, -1).T
        xyz = nib.affines.apply_affine(native_t1w.affine, ijk).reshape(*native_mask.shape, 3)
        lesion = np.linalg.norm(xyz - _participant_centre(f"sub-{subject}"), axis=-1) <= 9.0
        assert native_mask[lesion].all()  # kept inside the brain mask
    citation = (out / "logs" / "CITATION.md").read_text() if (out / "logs").is_dir() else ""
    methods = citation or "".join(p.read_text() for p in out.glob("sub-01*.html"))
    assert "lesion mask given with the T1w" in methods


# ---- drawn in the report ------------------------------------------------------------------------


def _lesion_coloured_pixels(png: Path) -> int:
    """Pixels of the lesion's outline colour (figures.OUTLINE_COLOURS['lesion'], anti-aliased)."""
    from PIL import Image

    from bids_app.reports.figures import OUTLINE_COLOURS

    target = np.array([int(OUTLINE_COLOURS["lesion"][i : i + 2], 16) for i in (1, 3, 5)])
    rgb = np.asarray(Image.open(png).convert("RGB"), dtype=float)
    return int((np.abs(rgb - target).max(axis=-1) < 40).sum())


def test_the_report_figures_outline_the_lesion(lesion_run, tmp_path):
    from bids_app.reports.figures import plot_brain_mask

    out = lesion_run["out"]
    figures = out / "sub-01" / "figures"
    native = figures / "sub-01_desc-brain_mask.png"
    pair = sorted(figures.glob(f"sub-01_space-{TEST_TEMPLATE}_*.png"))
    assert native.is_file() and pair
    assert _lesion_coloured_pixels(native) > 20
    flicker = [p for p in pair if "logjac" not in p.name.lower() and "jacobian" not in p.name]
    assert len(flicker) == 2 and all(_lesion_coloured_pixels(p) > 20 for p in flicker)
    # the control: the same figure without the lesion has none of its colour
    anat = _anat(out, "01")
    plain = plot_brain_mask(
        nib.load(anat / "sub-01_desc-preproc_T1w.nii.gz"),
        nib.load(anat / "sub-01_desc-brain_mask.nii.gz"), tmp_path / "plain.png",
    )  # fmt: skip
    assert _lesion_coloured_pixels(plain) == 0
    page = (out / "sub-01.html").read_text()
    assert "outlined in yellow" in page and "Yellow outline: the lesion carried into" in page


def test_a_lesion_mask_gone_from_the_raw_dataset_is_said_not_drawn(lesion_run, tmp_path):
    from bids_app.reports.participant import recorded_lesion_path

    out = lesion_run["out"]
    record = json.loads((out / "sub-01" / "log" / "sub-01_desc-mninorm_run.json").read_text())
    found = recorded_lesion_path(out, record["LesionMask"])
    assert found == lesion_run["root"] / "sub-01" / "anat" / "sub-01_label-lesion_roi.nii.gz"
    (tmp_path / "dataset_description.json").write_text(
        json.dumps({"DatasetLinks": {"raw": (tmp_path / "gone").as_uri()}})
    )
    assert recorded_lesion_path(tmp_path, record["LesionMask"]) is None
    assert recorded_lesion_path(out, None) is None


def test_the_validator_accepts_the_lesion_outputs(lesion_run):
    import shutil

    from test_derivatives import VALIDATOR, validate

    if shutil.which(VALIDATOR) is None:
        pytest.skip(f"{VALIDATOR} is not installed (pip install {VALIDATOR})")
    assert list(lesion_run["out"].rglob("*_label-lesion_roi.nii.gz"))
    issues = validate(shutil.which(VALIDATOR), lesion_run["out"])
    about_lesions = [i for i in issues if "lesion" in str(i.get("location"))]
    errors = [i for i in issues if i["severity"] == "error"]
    assert not errors and not about_lesions, [
        (i["severity"], i["code"], i.get("location")) for i in errors + about_lesions
    ]
