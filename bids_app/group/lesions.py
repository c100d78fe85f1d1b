"""Group level: each participant's lesion voxels left out of the log-Jacobian statistics.

A T1w processed with a lesion mask has ``space-<TPL>_label-lesion_roi.nii.gz`` next to its maps.
Inside the lesion the registration had no image to follow (cost-function masking), so its
log-Jacobian there is the regulariser's guess, not a measurement. Per voxel, the mean and SD use
only the participants whose lesion does not cover it, and a map says how many that is
(``desc-lesionfree`` count). Statistics that need every participant at a voxel (the uncorrected
t/F maps, the permutation model) leave out the voxels any included participant's lesion covers.
A participant with several T1w in the space: a voxel is left out if any of their lesions covers it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

LESION_NAME = "_label-lesion_roi.nii.gz"
_T1W_NAME = "_desc-preproc_T1w.nii.gz"


def lesion_path(t1w_map: Path) -> Path:
    """The template-space lesion mask written next to a normalised T1w (outputs.derivatives)."""
    return t1w_map.with_name(t1w_map.name.replace(_T1W_NAME, LESION_NAME))


def participant_lesions(by_subject: dict, grid) -> dict[str, np.ndarray]:
    """subject -> their lesion (bool, on the group grid), only for participants that have one."""
    from bids_app.errors import MninormError
    from bids_app.group.collect import read_map

    lesions = {}
    for subject, rows in by_subject.items():
        union = None
        for row in rows:
            path = lesion_path(row.result.paths["t1w"])
            if not path.is_file():
                continue
            data, problem = read_map(path, grid)
            if problem:
                raise MninormError(f"sub-{subject}: lesion mask {path.name}: {problem}")
            union = data > 0 if union is None else union | (data > 0)
        if union is not None and union.any():
            lesions[subject] = union
    return lesions


class LesionFreeStats:
    """Voxel-wise count, mean and M2 (Welford) over the participants whose lesion is elsewhere."""

    def __init__(self, shape) -> None:
        self.count = np.zeros(shape, np.int32)
        self.mean = np.zeros(shape, np.float64)
        self.m2 = np.zeros(shape, np.float64)

    def add(self, values: np.ndarray, lesion: np.ndarray | None) -> None:
        keep = np.ones(values.shape, bool) if lesion is None else ~lesion
        self.count[keep] += 1
        delta = values[keep] - self.mean[keep]
        self.mean[keep] += delta / self.count[keep]
        self.m2[keep] += delta * (values[keep] - self.mean[keep])

    def sd(self) -> np.ndarray:
        """Sample SD (n - 1) where at least two participants count; 0 elsewhere."""
        out = np.zeros_like(self.mean)
        enough = self.count >= 2
        out[enough] = np.sqrt(np.maximum(self.m2[enough], 0) / (self.count[enough] - 1))
        return out


def any_lesion(lesions: dict[str, np.ndarray], shape) -> np.ndarray:
    """Voxels that at least one participant's lesion covers."""
    covered = np.zeros(shape, bool)
    for lesion in lesions.values():
        covered |= lesion
    return covered


def lesion_sidecar(lesions: dict[str, np.ndarray]) -> dict:
    return {
        "LesionMasks": {
            "Participants": [f"sub-{s}" for s in lesions],
            "Use": "each participant's template-space lesion (label-lesion_roi) is left out: mean "
            "and SD per voxel over the participants whose lesion does not cover it (see the "
            "desc-lesionfree count map); tests that need every participant at a voxel leave out "
            "the voxels any participant's lesion covers",
        }
    }
