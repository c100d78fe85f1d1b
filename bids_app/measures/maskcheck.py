"""Does a native brain mask look like a whole brain? Checks against the template's brain mask.

The template's brain mask is brought onto the participant by a *linear* template-to-T1w mapping
only: a nonlinear warp would bend the template to fit a wrong mask and hide the error (a mask that
cut off the cerebellum was stretched over the template, QC dice 0.98). Against it the mask must

* cover every sector of the brain (octants around the brain's centre and the four quadrants of its
  lowest quarter, where the cerebellum and the temporal poles are): a missed lobe empties one;
* stay close to it: the share of the mask more than a linear fit's error (4 mm) outside it is
  skull, neck or eyes;
* hold about the placed template brain's volume.

Used twice with the same function: by brain extraction to decide whether to try again, and by QC
(from the files on disk, with the final transform's linear part) to grade the mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from nibabel.affines import apply_affine

from bids_app.measures.similarity import dice

# Mask voxels farther than this outside the (linearly placed) template brain count as "outside":
# about a linear fit's error, less than the skull's thickness (4-8 mm). Calibrated on the
# whole-head benchmark (docs/outputs.md, Quality control): good masks have 0-0.6 % of their
# voxels this far out, masks with 5 mm of skull 8-12 %, with the neck 6-7 %.
OUTSIDE_DISTANCE_MM = 4.0
# Limits of a whole brain's mask (brain extraction's checks and QC's fail thresholds): see
# docs/outputs.md ("How the mask limits were set") for how the whole-head benchmark set them.
# On the whole-head benchmark's calibration (benchmarks/heads.py): good masks covered >= 0.79 of
# every sector, masks without the cerebellum or a temporal lobe <= 0.42; good masks had volume
# ratios 0.92-1.04, with 5 mm of skull 1.26-1.32.
LIMITS = {
    "volume_ml": (700.0, 2400.0),
    "min_sector_coverage": (0.60, 1.0),
    "outside_fraction": (0.0, 0.04),
    "volume_ratio": (0.75, 1.25),
}
_GRID_MM = 2.0  # where sectors are counted: coarse enough to be quick, fine enough for a lobe
_LOW_QUARTER = 25.0  # percentile of the template brain's S coordinate: its lowest quarter


@dataclass(frozen=True)
class MaskCheck:
    volume_ml: float  # the native mask
    template_dice: float  # native mask (linearly in template space) vs the template's brain mask
    min_sector_coverage: float  # the worst sector's share of template brain that the mask covers
    worst_sector: str
    outside_fraction: float  # share of the mask > OUTSIDE_DISTANCE_MM outside the template brain
    volume_ratio: float  # the mask's volume over the placed template brain's
    sector_coverage: dict  # sector name -> coverage


def binary_problem(data: np.ndarray) -> str | None:
    """Why ``data`` is not a usable 0/1 mask ("not binary (values ...)" or "empty"), or None;
    the caller names the file and the fix."""
    values = np.unique(data[np.isfinite(data)])
    if not np.all(np.isin(values, (0, 1))):
        return f"not binary (values {values[:5].tolist()}...)"
    if not values.max(initial=0) > 0:
        return "empty"
    return None


def mask_problems(check: MaskCheck) -> list[str]:
    """What is wrong with a mask, in words (empty when it passes every limit)."""
    problems = []
    low, high = LIMITS["volume_ml"]
    if not low <= check.volume_ml <= high:
        problems.append(f"brain mask of {check.volume_ml:.0f} ml (plausible {low:.0f}-{high:.0f})")
    if check.min_sector_coverage < LIMITS["min_sector_coverage"][0]:
        problems.append(
            f"the mask misses part of the brain: it covers {check.min_sector_coverage:.0%} of the "
            f"template brain's {check.worst_sector} sector"
        )
    if check.outside_fraction > LIMITS["outside_fraction"][1]:
        problems.append(
            f"{check.outside_fraction:.0%} of the mask lies over {OUTSIDE_DISTANCE_MM:g} mm "
            "outside the template brain (skull, neck or eyes included)"
        )
    low, high = LIMITS["volume_ratio"]
    if not low <= check.volume_ratio <= high:
        problems.append(
            f"the mask holds {check.volume_ratio:.2f} times the placed template brain's volume "
            f"(plausible {low}-{high}): too {'tight' if check.volume_ratio < low else 'loose'}"
        )
    return problems


def check_mask(native, template_mask, template_to_t1w: np.ndarray) -> MaskCheck:
    """Compare a native mask with the template's mask placed by a RAS 4x4 mapping (nibabel images).

    ``template_to_t1w`` maps template points to participant points (mm, RAS), as the linear part
    of every forward transform mninorm writes does.
    """
    native_inside = np.asarray(native.dataobj) > 0.5
    template = _coarse(template_mask)
    template_inside = np.asarray(template.dataobj) > 0.5

    # The native mask, pulled onto the coarse template grid through the linear mapping.
    points = _voxel_centres(template.affine, template.shape)
    covered = _sample(native_inside, native.affine, apply_affine(template_to_t1w, points)) > 0.5
    covered = covered.reshape(template.shape)

    sectors = _sectors(template_inside, template.affine)
    coverage = {name: float(covered[w].mean()) for name, w in sectors.items() if w.any()}
    worst = min(coverage, key=coverage.get)
    volume_ml = float(native_inside.sum()) * _voxel_volume(native.affine) / 1000.0
    placed_ml = float(template_inside.sum()) * _voxel_volume(template.affine) / 1000.0
    placed_ml *= abs(float(np.linalg.det(template_to_t1w[:3, :3])))
    return MaskCheck(
        volume_ml=volume_ml,
        template_dice=dice(covered, template_inside),
        min_sector_coverage=coverage[worst],
        worst_sector=worst,
        outside_fraction=_outside_fraction(native_inside, native.affine, template, template_to_t1w),
        volume_ratio=volume_ml / placed_ml if placed_ml else float("inf"),
        sector_coverage=coverage,
    )


def _outside_fraction(native_inside, native_affine, template, template_to_t1w) -> float:
    """Share of the native mask farther than OUTSIDE_DISTANCE_MM from the placed template brain."""
    from scipy import ndimage

    template_inside = np.asarray(template.dataobj) > 0.5
    zooms = np.sqrt((template.affine[:3, :3] ** 2).sum(axis=0))
    distance_mm = ndimage.distance_transform_edt(~template_inside, sampling=zooms)
    # Native voxels on a ~2 mm lattice are enough to count a share.
    step = np.maximum(1, np.round(_GRID_MM / _zooms(native_affine)).astype(int))
    index = np.argwhere(native_inside[:: step[0], :: step[1], :: step[2]]) * step
    if not len(index):
        return 1.0
    in_template = apply_affine(np.linalg.inv(template_to_t1w), apply_affine(native_affine, index))
    # Beyond the template's grid counts as far outside (a neck below the field of view).
    far = _sample(distance_mm, template.affine, in_template, outside=1e3)
    return float((far > OUTSIDE_DISTANCE_MM).mean())


def _sectors(inside: np.ndarray, affine: np.ndarray) -> dict[str, np.ndarray]:
    """Octants around the brain's centre, and the quadrants of its lowest quarter."""
    world = apply_affine(affine, np.argwhere(inside))
    centre = world.mean(axis=0)
    low = np.percentile(world[:, 2], _LOW_QUARTER)
    grid = apply_affine(affine, _voxel_centres_index(inside.shape)).reshape(*inside.shape, 3)
    left = grid[..., 0] < centre[0]
    front = grid[..., 1] >= centre[1]
    top = grid[..., 2] >= centre[2]
    bottom_quarter = grid[..., 2] < low
    sectors = {}
    for lr_name, lr in (("left", left), ("right", ~left)):
        for ap_name, ap in (("anterior", front), ("posterior", ~front)):
            for si_name, si in (("superior", top), ("inferior", ~top)):
                sectors[f"{lr_name} {ap_name} {si_name}"] = inside & lr & ap & si
            sectors[f"{lr_name} {ap_name} lowest quarter"] = inside & lr & ap & bottom_quarter
    return sectors


def _coarse(img):
    """The template mask on a ~2 mm grid (as a float share, thresholded by the callers)."""
    import nibabel as nib
    from nibabel.processing import resample_to_output

    if min(_zooms(img.affine)) >= _GRID_MM - 1e-3:
        return img
    data = nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.float32), img.affine)
    return resample_to_output(data, voxel_sizes=(_GRID_MM,) * 3, order=1)


def _sample(volume, affine, points_world, outside: float = 0.0) -> np.ndarray:
    from scipy import ndimage

    index = apply_affine(np.linalg.inv(affine), points_world)
    return ndimage.map_coordinates(
        np.asarray(volume, dtype=np.float32), index.T, order=1, mode="constant", cval=outside
    )


def _voxel_centres(affine, shape) -> np.ndarray:
    return apply_affine(affine, _voxel_centres_index(shape))


def _voxel_centres_index(shape) -> np.ndarray:
    return np.indices(shape, dtype=np.float32).reshape(3, -1).T


def _zooms(affine) -> np.ndarray:
    return np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))


def _voxel_volume(affine) -> float:
    return float(abs(np.linalg.det(np.asarray(affine)[:3, :3])))
