"""Fixtures that build tiny real images, a miniature TemplateFlow folder and BIDS datasets.

The brain is nilearn's copy of the MNI152 2009a (symmetric) template, resampled to 3 mm so that
real ANTs registrations take seconds. Nothing here needs ../shared or the network.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from contextlib import contextmanager, redirect_stderr
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from browser import browser  # noqa: F401 - one session-wide browser for every module (by name)
from fakes import FakeEngines
from scipy import ndimage

TEST_TEMPLATE = "MNI152NLin2009aSym"  # what nilearn's brain really is
GRID_MM = 3.0
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# TemplateFlow reads TEMPLATEFLOW_HOME when first imported: point it at the miniature before that.
_TF_HOME = Path(tempfile.mkdtemp(prefix="mninorm-tf-"))
os.environ["TEMPLATEFLOW_HOME"] = str(_TF_HOME)
os.environ["TEMPLATEFLOW_AUTOUPDATE"] = "0"


@contextmanager
def logging_restored():
    """The commands' ``main`` points logging at the stderr pytest captures for the test that calls
    it: put the root logger's handlers and level back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:], root.level = handlers, level


# ---- images -----------------------------------------------------------------------------------


def nilearn_brain() -> nib.Nifti1Image:
    """nilearn's MNI152 2009a brain (skull-stripped, 1 mm), shipped inside the nilearn wheel."""
    import nilearn.datasets

    path = (
        Path(nilearn.datasets.__file__).parent
        / "data"
        / ("mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
    )
    return nib.load(str(path))


def resample_to_grid(img: nib.Nifti1Image, affine: np.ndarray, shape, order=1) -> nib.Nifti1Image:
    from nibabel.processing import resample_from_to

    return resample_from_to(img, (tuple(shape), affine), order=order, mode="constant", cval=0.0)


def isotropic_grid(img: nib.Nifti1Image, mm: float, pad_mm: float = 0.0):
    """An RAS grid of ``mm`` voxels covering ``img`` (plus a margin)."""
    corners = (
        np.array(np.meshgrid(*[[0, s - 1] for s in img.shape[:3]], indexing="ij")).reshape(3, -1).T
    )
    world = nib.affines.apply_affine(img.affine, corners)
    low, high = world.min(0) - pad_mm, world.max(0) + pad_mm
    shape = np.ceil((high - low) / mm).astype(int) + 1
    affine = np.diag([mm, mm, mm, 1.0])
    affine[:3, 3] = low
    return affine, tuple(shape)


def with_skull(brain: nib.Nifti1Image, seed: int = 0) -> nib.Nifti1Image:
    """A crude head: a bright shell (skull/scalp) around the brain and a noisy background."""
    data = np.asarray(brain.dataobj, dtype=np.float32)
    zoom = float(brain.header.get_zooms()[0])
    inside = ndimage.binary_fill_holes(data > 0)
    near = ndimage.binary_dilation(inside, iterations=max(1, round(4 / zoom)))
    far = ndimage.binary_dilation(inside, iterations=max(2, round(13 / zoom)))
    shell = far & ~near
    rng = np.random.default_rng(seed)
    head = data.copy()
    head[shell] = 0.8 * data.max()
    head[far & ~inside & ~shell] = 0.15 * data.max()  # CSF-dark gap between brain and skull
    head += rng.normal(0, 0.01 * data.max(), data.shape).astype(np.float32)
    return nib.Nifti1Image(np.clip(head, 0, None), brain.affine)


def brain_mask_of(brain: nib.Nifti1Image) -> nib.Nifti1Image:
    data = np.asarray(brain.dataobj) > 0
    return nib.Nifti1Image(ndimage.binary_fill_holes(data).astype(np.uint8), brain.affine)


def reorient(img: nib.Nifti1Image, codes: str) -> nib.Nifti1Image:
    """The same image (same world positions) stored with another voxel axis orientation."""
    target = nib.orientations.axcodes2ornt(tuple(codes))
    current = nib.orientations.io_orientation(img.affine)
    transform = nib.orientations.ornt_transform(current, target)
    return img.as_reoriented(transform)


def warp_image(source: nib.Nifti1Image, to_source, affine: np.ndarray, shape, order=1):
    """The image on grid (affine, shape) whose voxel at world x shows ``source`` at to_source(x)."""
    ijk = np.indices(shape).reshape(3, -1).T
    world = nib.affines.apply_affine(affine, ijk)
    src_world = to_source(world)
    src_ijk = nib.affines.apply_affine(np.linalg.inv(source.affine), src_world)
    values = ndimage.map_coordinates(
        np.asarray(source.dataobj, dtype=np.float32), src_ijk.T, order=order, mode="constant"
    )
    return nib.Nifti1Image(values.reshape(shape).astype(np.float32), affine)


def known_affine(rot_deg=(8.0, -6.0, 5.0), shift=(4.0, -6.0, 3.0), scale=(1.06, 0.95, 1.02)):
    """A rotation/scaling/translation in RAS mm (4x4)."""
    from scipy.spatial.transform import Rotation

    matrix = Rotation.from_euler("xyz", rot_deg, degrees=True).as_matrix() @ np.diag(scale)
    affine = np.eye(4)
    affine[:3, :3] = matrix
    affine[:3, 3] = shift
    return affine


def smooth_warp(points: np.ndarray, amplitude=2.5, wavelength=90.0) -> np.ndarray:
    """A smooth, invertible displacement (mm) of RAS points, a few mm at most."""
    k = 2 * np.pi / wavelength
    x, y, z = points.T
    return np.stack(
        [amplitude * np.sin(k * y), amplitude * np.sin(k * z), amplitude * np.sin(k * x)], axis=1
    )


# ---- the miniature TemplateFlow folder ----------------------------------------------------------


@pytest.fixture(scope="session")
def template_brain() -> nib.Nifti1Image:
    """The test template's brain on its 3 mm grid."""
    brain = nilearn_brain()
    affine, shape = isotropic_grid(brain, GRID_MM)
    return resample_to_grid(brain, affine, shape)


@pytest.fixture(scope="session")
def templateflow_home(template_brain) -> Path:
    folder = _TF_HOME / f"tpl-{TEST_TEMPLATE}"
    if not folder.exists():
        folder.mkdir(parents=True)
        head = with_skull(template_brain, seed=1)
        mask = brain_mask_of(template_brain)
        head.to_filename(folder / f"tpl-{TEST_TEMPLATE}_res-01_T1w.nii.gz")
        mask.to_filename(folder / f"tpl-{TEST_TEMPLATE}_res-01_desc-brain_mask.nii.gz")
        # res-02: a coarser grid (6 mm), for tests of several output resolutions
        affine, shape = isotropic_grid(template_brain, 2 * GRID_MM)
        resample_to_grid(head, affine, shape).to_filename(
            folder / f"tpl-{TEST_TEMPLATE}_res-02_T1w.nii.gz"
        )
        resample_to_grid(mask, affine, shape, order=0).to_filename(
            folder / f"tpl-{TEST_TEMPLATE}_res-02_desc-brain_mask.nii.gz"
        )
        (folder / "template_description.json").write_text(
            json.dumps(
                {
                    "Identifier": TEST_TEMPLATE,
                    "Name": "MNI152 2009a symmetric (nilearn copy, 3 mm test miniature)",
                    "TemplateFlowVersion": "test",
                    "ReferencesAndLinks": ["https://doi.org/10.1016/j.neuroimage.2010.07.033"],
                }
            )
        )
    return _TF_HOME


# ---- BIDS datasets ----------------------------------------------------------------------------


def write_dataset_description(root: Path, name="test") -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(
        json.dumps({"Name": name, "BIDSVersion": "1.9.0", "DatasetType": "raw"})
    )


def save_t1w(img: nib.Nifti1Image, root: Path, subject: str, session=None, run=None) -> Path:
    folder = root / f"sub-{subject}" / (f"ses-{session}" if session else "") / "anat"
    folder.mkdir(parents=True, exist_ok=True)
    name = (
        f"sub-{subject}" + (f"_ses-{session}" if session else "") + (f"_run-{run}" if run else "")
    )
    path = folder / f"{name}_T1w.nii.gz"
    img.to_filename(path)
    return path


def participant_brain(template_brain, affine=None, grid_codes="RAS", zooms=(3.0, 3.5, 3.0)):
    """The template brain moved by ``affine`` (participant -> template points) onto a new grid."""
    affine = known_affine() if affine is None else affine
    to_template = lambda pts: pts @ affine[:3, :3].T + affine[:3, 3]  # noqa: E731
    grid_affine, shape = isotropic_grid(template_brain, 1.0, pad_mm=10)
    grid_affine = grid_affine @ np.diag([*zooms, 1.0])
    shape = tuple(int(np.ceil(s / z)) for s, z in zip(shape, zooms, strict=True))
    moved = warp_image(template_brain, to_template, grid_affine, shape)
    return reorient(moved, grid_codes)


# ---- one participant-level run on a tiny dataset, shared by the end-to-end tests ----------------

E2E_SPACE = TEST_TEMPLATE


def tree_digest(root: Path) -> dict:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# The participants' poses in ``dataset`` (participant points -> template points)
DATASET_POSES = {
    "sub-01": known_affine(),
    "sub-02": known_affine(rot_deg=(-5, 4, -7), shift=(-3, 5, -4), scale=(0.96, 1.04, 1.0)),
}


def dataset_engines() -> FakeEngines:
    """The fake engine that finds ``dataset``'s participants where they are."""
    return FakeEngines({sub: np.linalg.inv(pose) for sub, pose in DATASET_POSES.items()})


@pytest.fixture(scope="session")
def dataset(tmp_path_factory, template_brain, templateflow_home):
    """sub-01: a skull-stripped brain, run-1 stored RAS and run-2 the same image stored LAS;
    sub-02: a whole head stored LIA; sub-03: a 4D T1w (fails); sub-04: no T1w at all."""
    root = tmp_path_factory.mktemp("bids")
    write_dataset_description(root)
    brain = participant_brain(template_brain, DATASET_POSES["sub-01"])
    save_t1w(brain, root, "01", session="1", run="1")
    save_t1w(reorient(brain, "LAS"), root, "01", session="1", run="2")
    head_brain = participant_brain(template_brain, DATASET_POSES["sub-02"], "LIA")
    save_t1w(with_skull(head_brain, seed=2), root, "02")
    four_d = nib.Nifti1Image(np.stack([brain.get_fdata()] * 2, axis=-1), brain.affine)
    save_t1w(four_d, root, "03")
    (root / "sub-04" / "anat").mkdir(parents=True)
    (root / "sub-04" / "anat" / "sub-04_T2w.nii.gz").write_bytes(b"")
    truths = {"sub-02": brain_mask_of(head_brain)}
    return root, truths


@pytest.fixture(scope="session")
def run(dataset, tmp_path_factory):
    """One participant-level run, each participant in its own process, as users run it, two at a
    time (one thread each), with stderr and stdout going to a file (``console``: all that a user
    would see, not a terminal).

    The registrations are the fake engine's (tests/fakes.py): what a real one adds is checked by
    tests/test_registration.py and the real end-to-end run of tests/test_cli.py."""
    root, truths = dataset
    from bids_app.cli import main
    from bids_app.logs import output_to

    before = tree_digest(root)
    out = tmp_path_factory.mktemp("out")
    console = tmp_path_factory.mktemp("console") / "console.txt"
    # The console handler writes to sys.stderr's file; the participants' processes inherit the
    # file descriptors 1 and 2.
    with open(console, "a") as stream, redirect_stderr(stream), output_to(console):
        code = main(
            [str(root), str(out), "participant", "--output-spaces", E2E_SPACE,
             f"{E2E_SPACE}:res-2", "--preset", "fast", "--nthreads", "2", "--omp-nthreads", "1",
             "--skip-bids-validation"],
            engines=dataset_engines(),
        )  # fmt: skip
    return {
        "root": root, "out": out, "code": code, "before": before, "truths": truths,
        "console": console.read_text(),
    }  # fmt: skip


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not here (extra tests on real data)")
    return SHARED_DATA
