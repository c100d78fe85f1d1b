"""Where to start the head-to-template registration: a search over several starting points.

A single start (the image centres, or the centres of mass) fails on real scans: a neck and
shoulders drag the centre of mass 50 mm below the brain, scanner origins lie far from the head,
heads are tilted by 30 degrees. So the template brain's centre is placed on two estimates of the
participant's brain centre (the head's centre of mass, and a point below the top of the head at
the template's own top-to-brain distance) under a grid of rotations; every start is scored by the
correlation of the participant with the template head around the template's brain (4 mm copies,
a few milliseconds a start), and the best few are refined by a local search over translation,
rotation and size. The registration engine's affine stage starts from the best.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from nibabel.affines import apply_affine

log = logging.getLogger(__name__)

_COARSE_MM = 4.0  # the participant's copy for the search, and the grid the score is taken on
_SMOOTHING_MM = 3.0  # Gaussian sigma before taking 4 mm copies (no aliasing of the skull)
# Rotations tried from each centre (degrees about the R, A and S axes): head tilts in the scanner
# are mostly nods (about R), up to ~30 degrees; rolls and turns are smaller.
_NODS_DEG = (-30, -20, -10, 0, 10, 20, 30)
_ROLLS_DEG = (-20, -10, 0, 10, 20)
_TURNS_DEG = (-20, 0, 20)
_REFINED = 4  # how many of the best starts get the local search
# Local search: first step and smallest step of translation (mm), rotation (deg), log-size.
_STEPS = {"shift": (8.0, 1.0), "angle": (6.0, 1.0), "size": (0.08, 0.02)}
_SCORE_MARGIN_MM = 15.0  # the score looks at the brain and this much around it (skull, scalp)
_SAME_START_MM = 10.0  # two results closer than this (at the brain's edge) are the same start


@dataclass(frozen=True)
class HeadStart:
    """One result of the search: a template-to-participant similarity and how well it fits."""

    label: str  # where it started from
    affine: np.ndarray  # RAS 4x4, template points -> participant points
    score: float  # correlation with the template head around its brain (higher is better)


@dataclass(frozen=True)
class _Pose:
    centre_label: str
    centre: np.ndarray  # participant point where the template brain's centre goes
    angles: tuple  # degrees about R, A, S
    log_size: float = 0.0

    def moved(self, **change) -> _Pose:
        values = {"centre": self.centre, "angles": self.angles, "log_size": self.log_size}
        values.update(change)
        return _Pose(self.centre_label, **values)

    def label(self) -> str:
        nod, roll, turn = (round(a) for a in self.angles)
        return f"{self.centre_label}, rotated {nod:+d}/{roll:+d}/{turn:+d} deg about R/A/S"


def search_head_starts(template_head, template_mask, t1w_img) -> list[HeadStart]:
    """The best starts, refined, best first (ANTs images in, no registration run)."""
    from bids_app.transforms.orientation import ants_to_nifti

    template_brain = ants_to_nifti(template_mask)
    brain_centre = _centre_of_mass(np.asarray(template_brain.dataobj) > 0.5, template_brain.affine)
    top_to_brain_mm = _head_top(_foreground(template_head)) - brain_centre[2]
    coarse = _coarse_copy(t1w_img)
    scorer = _Scorer(ants_to_nifti(template_head), template_brain, ants_to_nifti(coarse))

    def score(pose: _Pose) -> float:
        return scorer.score(_similarity(pose, brain_centre))

    centres = _participant_centres(_foreground(coarse), top_to_brain_mm)
    poses = [
        _Pose(label, centre, angles)
        for label, centre in centres.items()
        for angles in itertools.product(_NODS_DEG, _ROLLS_DEG, _TURNS_DEG)
    ]
    ranked = sorted(poses, key=score, reverse=True)
    results = []
    for pose in ranked[:_REFINED]:
        best = _climb(pose, score)
        results.append(HeadStart(best.label(), _similarity(best, brain_centre), score(best)))
    results.sort(key=lambda r: -r.score)
    log.debug("head starts: %s", "; ".join(f"{r.label} ({r.score:.3f})" for r in results))
    return results


def write_start(template_image, template_mask, t1w_img, path: Path) -> Path:
    """The search's best start as a linear ITK composite (.h5), for a registration to begin at."""
    from bids_app.transforms import CompositeTransform, write_composite

    best = search_head_starts(template_image, template_mask, t1w_img)[0]
    log.debug("start of the registration: %s (score %.3f)", best.label, best.score)
    return write_composite(CompositeTransform((best.affine,)), path)


def distinct_starts(results: list[HeadStart], brain_radius_mm: float = 70.0) -> list[HeadStart]:
    """The results that differ from every better one (by more than _SAME_START_MM at the edge)."""
    kept: list[HeadStart] = []
    for result in results:
        differences = [_difference_mm(result.affine, k.affine, brain_radius_mm) for k in kept]
        if all(difference > _SAME_START_MM for difference in differences):
            kept.append(result)
    return kept


def _climb(pose: _Pose, score) -> _Pose:
    """Coordinate ascent: try +-step on each parameter, keep the best, halve steps when stuck."""
    steps = {kind: first for kind, (first, _) in _STEPS.items()}
    best, best_score = pose, score(pose)
    while any(steps[kind] >= smallest for kind, (_, smallest) in _STEPS.items()):
        trials = [neighbour for sign in (-1, 1) for neighbour in _neighbours(best, steps, sign)]
        scored = [(score(trial), trial) for trial in trials]
        top_score, top = max(scored, key=lambda pair: pair[0])
        if top_score > best_score:
            best, best_score = top, top_score
        else:
            steps = {kind: step / 2 for kind, step in steps.items()}
    return best


def _neighbours(pose: _Pose, steps: dict, sign: int):
    for axis in range(3):
        shift = np.zeros(3)
        shift[axis] = sign * steps["shift"]
        yield pose.moved(centre=pose.centre + shift)
        angles = list(pose.angles)
        angles[axis] += sign * steps["angle"]
        yield pose.moved(angles=tuple(angles))
    yield pose.moved(log_size=pose.log_size + sign * steps["size"])


def _difference_mm(a: np.ndarray, b: np.ndarray, radius: float) -> float:
    """Largest displacement between two mappings over the corners of a brain-sized cube."""
    corners = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)]) * radius
    return float(np.linalg.norm(apply_affine(a, corners) - apply_affine(b, corners), axis=1).max())


class _Scorer:
    """Correlation of the participant with the template head, near the template's brain."""

    def __init__(self, template, template_brain, participant):
        from nibabel.processing import resample_to_output
        from scipy import ndimage

        grid = resample_to_output(template, voxel_sizes=(_COARSE_MM,) * 3, order=1)
        brain = resample_to_output(template_brain, voxel_sizes=(_COARSE_MM,) * 3, order=1)
        near_brain = ndimage.distance_transform_edt(np.asarray(brain.dataobj) < 0.5) * _COARSE_MM
        self.region = near_brain <= _SCORE_MARGIN_MM
        self.values = np.asarray(grid.dataobj, dtype=np.float32)[self.region]
        self.points = apply_affine(grid.affine, np.argwhere(self.region).astype(np.float32))
        self.participant = np.asarray(participant.dataobj, dtype=np.float32)
        self.to_voxels = np.linalg.inv(participant.affine)

    def score(self, template_to_participant: np.ndarray) -> float:
        from scipy import ndimage

        index = apply_affine(self.to_voxels @ template_to_participant, self.points)
        moved = ndimage.map_coordinates(
            self.participant, index.T, order=1, mode="constant", cval=0.0
        )
        if moved.std() == 0:
            return -1.0
        return float(np.corrcoef(moved, self.values)[0, 1])


def _coarse_copy(t1w_img):
    import ants

    smooth = ants.smooth_image(t1w_img, _SMOOTHING_MM, sigma_in_physical_coordinates=True)
    return ants.resample_image(smooth, (_COARSE_MM,) * 3, use_voxels=False, interp_type=0)


def _foreground(image) -> tuple[np.ndarray, np.ndarray]:
    """The head (Otsu threshold, largest piece, holes filled) and its RAS affine."""
    import ants

    from bids_app.participant.images import clean_mask
    from bids_app.transforms.orientation import ants_to_nifti

    inside = clean_mask(ants.threshold_image(image, "Otsu", 1)).numpy() > 0
    return inside, ants_to_nifti(image).affine


def _participant_centres(foreground, top_to_brain_mm: float) -> dict:
    inside, grid_affine = foreground
    centres = {"head's centre of mass": _centre_of_mass(inside, grid_affine)}
    world = apply_affine(grid_affine, np.argwhere(inside).astype(float))
    top = world[:, 2].max()
    upper = world[world[:, 2] >= top - 2 * top_to_brain_mm]
    below_top = np.array([*upper[:, :2].mean(axis=0), top - top_to_brain_mm])
    if np.linalg.norm(below_top - centres["head's centre of mass"]) > _SAME_START_MM:
        centres["below the top of the head"] = below_top
    return centres


def _head_top(foreground) -> float:
    inside, grid_affine = foreground
    return float(apply_affine(grid_affine, np.argwhere(inside).astype(float))[:, 2].max())


def _centre_of_mass(inside: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return apply_affine(affine, np.argwhere(inside).mean(axis=0, keepdims=True))[0]


def _similarity(pose: _Pose, template_centre: np.ndarray) -> np.ndarray:
    """x -> centre + s R (x - template_centre), R = Rz Ry Rx (degrees about R, A, S)."""
    from scipy.spatial.transform import Rotation

    rotation = Rotation.from_euler("xyz", pose.angles, degrees=True).as_matrix()
    linear = np.exp(pose.log_size) * rotation
    matrix = np.eye(4)
    matrix[:3, :3] = linear
    matrix[:3, 3] = pose.centre - linear @ template_centre
    return matrix

