"""Scores, computed here and never by the code under test.

ANTsPy is used only as the *reader* of the transform files every setting writes
(``apply_transforms_to_points``, ``apply_transforms``); the ground truth, the finite-difference
Jacobians and the overlaps are numpy/scipy.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from bids_app.transforms.orientation import LPS_RAS

log = logging.getLogger(__name__)


# ---- landmarks ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LandmarkErrors:
    mean_mm: float
    p95_mm: float
    max_mm: float


def landmark_errors(estimated: np.ndarray, true: np.ndarray) -> LandmarkErrors:
    distance = np.linalg.norm(np.asarray(estimated) - np.asarray(true), axis=1)
    return LandmarkErrors(
        float(distance.mean()), float(np.percentile(distance, 95)), float(distance.max())
    )


def map_points(transforms: list[str], points_ras: np.ndarray) -> np.ndarray:
    """Fixed-space RAS points through a transform list (fixed -> moving, as ANTs reads it)."""
    import ants
    import pandas as pd

    lps = np.asarray(points_ras, float) @ LPS_RAS
    table = pd.DataFrame({"x": lps[:, 0], "y": lps[:, 1], "z": lps[:, 2]})
    # Never let ANTsPy guess inversions ([.mat, warp] lists default to inverting the matrix).
    mapped = ants.apply_transforms_to_points(3, table, transforms, [False] * len(transforms))
    return mapped[["x", "y", "z"]].to_numpy(float) @ LPS_RAS


def score_landmarks(transforms: list[str], landmarks: Path) -> LandmarkErrors:
    pairs = np.load(landmarks)
    return landmark_errors(map_points(transforms, pairs["fixed_ras"]), pairs["moving_ras"])


# ---- folding ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Folding:
    share: float  # voxels of the fixed mask with det <= 0
    jacobian_min: float
    jacobian_max: float


def composed_field(transforms: list[str], fixed: Path, prefix: Path) -> Path:
    """The whole transform as one displacement field on the fixed grid (ANTs writes it)."""
    import ants

    image = ants.image_read(str(fixed))
    out = ants.apply_transforms(
        image, image, transforms, whichtoinvert=[False] * len(transforms), compose=str(prefix)
    )
    return Path(out)


def field_jacobian(vectors_ras: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """det(I + du/dx) of a displacement field (X, Y, Z, 3, RAS mm) on a grid with a voxel -> RAS
    affine: central differences along voxel axes, then the chain rule through the affine."""
    per_voxel = np.stack(
        [np.stack(np.gradient(vectors_ras[..., c], axis=(0, 1, 2)), axis=-1) for c in range(3)],
        axis=-2,
    )  # (..., component, voxel axis)
    gradient = per_voxel @ np.linalg.inv(affine[:3, :3])
    return np.linalg.det(np.eye(3) + gradient)


def read_displacement_field(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """An ITK displacement field file -> (RAS vectors (X, Y, Z, 3), voxel -> RAS affine)."""
    image = nib.load(path)
    vectors = np.asarray(image.dataobj, dtype=np.float64).reshape(*image.shape[:3], 3)
    return vectors @ LPS_RAS, image.affine


def score_folding(transforms: list[str], fixed: Path, fixed_mask: Path, work: Path) -> Folding:
    field_path = composed_field(transforms, fixed, work / "composed_")
    vectors, affine = read_displacement_field(field_path)
    mask = np.asarray(nib.load(fixed_mask).dataobj) > 0
    determinants = field_jacobian(vectors, affine)[mask]
    field_path.unlink()  # large, and rebuilt in seconds
    return Folding(
        float(np.mean(determinants <= 0)), float(determinants.min()), float(determinants.max())
    )


# ---- labels -------------------------------------------------------------------------------------

# FreeSurfer aseg labels (FreeSurferColorLUT.txt): left, right
SUBCORTICAL = {
    "thalamus": (10, 49),
    "caudate": (11, 50),
    "putamen": (12, 51),
    "pallidum": (13, 52),
    "hippocampus": (17, 53),
    "amygdala": (18, 54),
    "accumbens": (26, 58),
    "ventral-dc": (28, 60),
    "lateral-ventricle": (4, 43),
    "cerebellum-cortex": (8, 47),
    "cerebellum-white-matter": (7, 46),
}
MIDLINE = {"brainstem": 16, "3rd-ventricle": 14, "4th-ventricle": 15}
CEREBRAL_WHITE_MATTER = (2, 41)


def cortex_labels(labels: np.ndarray, hemisphere: str) -> np.ndarray:
    """Every cortical label of one hemisphere merged (aseg 3/42, DKT/Desikan 1000s/2000s,
    Destrieux 11100s/12100s): the participants have different parcellations."""
    aseg, desikan, destrieux = (3, 1000, 11100) if hemisphere == "lh" else (42, 2000, 12100)
    return (
        (labels == aseg)
        | ((labels >= desikan) & (labels < desikan + 1000))
        | ((labels >= destrieux) & (labels < destrieux + 100))
    )


def structures(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Named boolean masks of the structures compared (hemispheres apart)."""
    out = {}
    for name, (left, right) in SUBCORTICAL.items():
        out[f"sub:left-{name}"] = labels == left
        out[f"sub:right-{name}"] = labels == right
    for name, value in MIDLINE.items():
        out[f"sub:{name}"] = labels == value
    out["ctx:left-cortex"] = cortex_labels(labels, "lh")
    out["ctx:right-cortex"] = cortex_labels(labels, "rh")
    out["wm:left-cerebral-white-matter"] = labels == CEREBRAL_WHITE_MATTER[0]
    out["wm:right-cerebral-white-matter"] = labels == CEREBRAL_WHITE_MATTER[1]
    return out


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return float("nan") if total == 0 else 2.0 * int((a & b).sum()) / total


@dataclass(frozen=True)
class Overlap:
    subcortical_mean: float
    cortical_mean: float
    white_matter_mean: float
    per_structure: dict


def label_overlap(labels_a: np.ndarray, labels_b: np.ndarray) -> Overlap:
    """Dice per structure between two label volumes on one grid, and the means per group."""
    a, b = structures(labels_a), structures(labels_b)
    per = {name: dice(a[name], b[name]) for name in a}

    def mean(prefix):
        values = [v for k, v in per.items() if k.startswith(prefix) and not np.isnan(v)]
        return float(np.mean(values)) if values else float("nan")

    return Overlap(mean("sub:"), mean("ctx:"), mean("wm:"), per)


def warp_labels(transforms: list[str], fixed: Path, labels: Path, out: Path) -> Path:
    """A label image resampled onto the fixed grid (ANTs genericLabel: no new label values)."""
    import ants

    warped = ants.apply_transforms(
        ants.image_read(str(fixed)), ants.image_read(str(labels)), transforms,
        interpolator="genericLabel", whichtoinvert=[False] * len(transforms),
    )  # fmt: skip
    ants.image_write(warped, str(out))
    return out


def read_labels(path: Path) -> np.ndarray:
    return np.rint(np.asarray(nib.load(path).dataobj)).astype(np.int32)
