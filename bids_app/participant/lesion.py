"""Lesion masks: found next to the T1w, checked, and used as cost-function masks.

A lesion (stroke, tumour, MS plaque) has no counterpart in the template: left in the similarity
metric, it pulls healthy template tissue onto itself. Its voxels are therefore left out of the
metric of every registration (brain extraction's head registrations and the brain registration):

* as a *moving* mask (participant space, exact) for engines that use one (ANTs);
* as a hole in the *fixed* mask (template space), the lesion carried there by the registration's
  starting transform and dilated to cover that start's error. Greedy needs this: its moving mask
  (``-mm``) is not passed (registration/greedy.py: it derails the affine line search), while its
  fixed mask (``-gm``) restricts the metric to the template voxels inside it.

The lesion stays inside the brain mask (a CSF-like lesion would otherwise be cut out by brain
extraction).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bids_app.errors import ImageError
from bids_app.measures.maskcheck import binary_problem

log = logging.getLogger(__name__)

# fMRIPrep's convention; pybids knows neither the label entity nor (validating) the roi suffix,
# so the files are listed next to the T1w and their entities parsed by pybids.
LESION_GLOB = "*_label-lesion_roi.nii*"
# Entities that do not tie a lesion mask to a T1w (the rest must agree with the T1w's)
_NOT_TYING = {"suffix", "label", "extension", "datatype", "subject"}
# A lesion mostly outside the head is a mask of another image (or on another grid)
_MIN_INSIDE_HEAD = 0.5
# Template-space hole: the lesion carried by the starting transform, dilated by this (voxels)
_FIXED_HOLE_DILATION_VOX = 2


@dataclass(frozen=True)
class Lesion:
    """A T1w's lesion mask on the T1w's (RAS) grid."""

    path: Path
    relpath: str
    img: object  # nibabel image, uint8 0/1, on the T1w grid
    voxels: int
    volume_ml: float
    resampled: bool  # it was on another grid than the T1w

    def as_record(self) -> dict:
        return {
            "Source": f"bids:raw:{self.relpath}",  # outputs.derivatives.bids_uri: the input dataset
            "Voxels": self.voxels,
            "VolumeML": round(self.volume_ml, 3),
            "Resampled": self.resampled,
            "Use": "excluded from the similarity metric of brain extraction and of every "
            "registration stage (cost-function masking); kept inside the brain mask",
        }


def find_lesion(t1w_path: Path, t1w_entities: dict) -> Path | None:
    """The lesion mask of one T1w, in its folder: every entity the mask has beyond the subject
    (session, acquisition, run...) must be the T1w's; the most specific match wins."""
    from bids.layout import parse_file_entities

    tied = []
    for candidate in sorted(Path(t1w_path).parent.glob(LESION_GLOB)):
        entities = {
            k: v for k, v in parse_file_entities(str(candidate)).items() if k not in _NOT_TYING
        }
        if f"sub-{t1w_entities.get('subject')}_" not in candidate.name:
            continue
        if all(str(t1w_entities.get(k)) == str(v) for k, v in entities.items()):
            tied.append((len(entities), candidate))
    if not tied:
        return None
    tied.sort(key=lambda pair: -pair[0])
    if len(tied) > 1 and tied[0][0] == tied[1][0]:
        names = ", ".join(path.name for _, path in tied[:2])
        raise ImageError(
            f"several lesion masks fit {Path(t1w_path).name} ({names}): give each the run or "
            "acquisition entity of its T1w"
        )
    return tied[0][1]


def load_lesion(path: Path, relpath: str, t1w_img) -> Lesion:
    """The lesion mask on the T1w's grid (nearest neighbour when it is on another grid), checked:
    binary, not empty, inside the head."""
    import nibabel as nib
    from nibabel.processing import resample_from_to

    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj)
    except Exception as err:  # nibabel raises several kinds for a corrupt file
        raise ImageError(f"lesion mask {path} is unreadable ({err})") from err
    data = np.squeeze(data)
    if data.ndim != 3:
        raise ImageError(f"lesion mask {path} must be a 3D image (shape {data.shape})")
    problem = binary_problem(data)
    if problem == "empty":
        raise ImageError(f"lesion mask {path} is empty: remove it, or draw the lesion with 1")
    if problem:
        raise ImageError(
            f"lesion mask {path} is {problem}: it must be 0 outside the lesion and 1 inside "
            "(threshold a probability map first)"
        )
    img = nib.Nifti1Image(data.astype(np.uint8), img.affine)
    same_grid = img.shape == t1w_img.shape[:3] and np.allclose(
        img.affine, t1w_img.affine, atol=1e-3
    )
    if not same_grid:
        img = resample_from_to(img, (t1w_img.shape[:3], t1w_img.affine), order=0)
    lesion = np.asarray(img.dataobj) > 0
    _check_inside_head(lesion, np.asarray(t1w_img.dataobj), path)
    voxel_ml = float(np.prod(t1w_img.header.get_zooms()[:3])) / 1000.0
    out = nib.Nifti1Image(lesion.astype(np.uint8), t1w_img.affine)
    return Lesion(path, relpath, out, int(lesion.sum()), lesion.sum() * voxel_ml, not same_grid)


def _check_inside_head(lesion: np.ndarray, t1w: np.ndarray, path: Path) -> None:
    if not lesion.any():
        raise ImageError(
            f"lesion mask {path} lies outside the T1w's field of view: is it the mask of this "
            "T1w (check its affine)?"
        )
    head = t1w > 0.05 * np.percentile(t1w[t1w > 0], 99) if (t1w > 0).any() else t1w > 0
    inside = float(head[lesion].mean())
    if inside < _MIN_INSIDE_HEAD:
        raise ImageError(
            f"lesion mask {path}: only {inside:.0%} of it lies inside the head: is it the mask "
            "of this T1w, on its grid (check its affine and orientation)?"
        )


# ---- as cost-function masks -------------------------------------------------------------------


def without_lesion(mask_img, lesion_img):
    """A moving (participant-space) mask with the lesion's voxels removed (ANTs images)."""
    base = np.ones(lesion_img.shape, np.float32) if mask_img is None else mask_img.numpy()
    return lesion_img.new_image_like((base * (lesion_img.numpy() <= 0)).astype(np.float32))


def fixed_without_lesion(fixed_img, fixed_mask, lesion_img, start_xfm: Path):
    """A fixed (template-space) mask with a hole where the starting transform puts the lesion,
    dilated (the start is only approximately right)."""
    import ants

    carried = ants.apply_transforms(fixed_img, lesion_img, [str(start_xfm)], interpolator="linear")
    hole = ants.threshold_image(carried, 0.1, 1e9, 1, 0)
    hole = ants.iMath(hole, "MD", _FIXED_HOLE_DILATION_VOX)
    base = np.ones(fixed_img.shape, np.float32) if fixed_mask is None else fixed_mask.numpy()
    return fixed_img.new_image_like((base * (hole.numpy() <= 0)).astype(np.float32))
