"""Whole-head robustness cases: what real datasets do to a head, with the brain mask moved along.

A perturbation takes a clean whole-head T1w image and its reference brain mask (one grid, any
orientation or voxel size) and returns the perturbed head, the reference mask on the perturbed
head's grid, and ``world``: the 4x4 map (RAS mm) from a point of the clean head's world to the
same anatomical point in the perturbed head's world (identity when only the grid or the
intensities change). Where the brain is comes from the mask (its centroid and its extents in world
RAS), never from fixed coordinates. Every random choice comes from ``seed`` (and the perturbation's
name, so that two perturbations with one seed do not share their draws).

Resampling pulls each output voxel through the exact world-to-voxel chain
``clean voxel <- clean affine^-1 <- world^-1 <- perturbed affine <- perturbed voxel`` with
``scipy.ndimage.affine_transform``; masks are resampled linearly and thresholded at 0.5.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import nibabel as nib
import numpy as np
from scipy import ndimage

log = logging.getLogger(__name__)

PERTURBATIONS: dict[str, str] = {
    "origin": "world origin moved 50-100 mm away from the brain centre (header only)",
    "rotate": "head rotated 30 deg about the brain centre (mostly pitch), field of view enlarged",
    "tilt-origin": "head rotated 20-30 deg and the world origin moved 50-100 mm away",
    "crop-chin": "field of view cut 25 mm below the lowest brain voxel (no chin, no neck)",
    "crop-top": "field of view cut 3 mm above the highest brain voxel (top of the skull lost)",
    "deface": "face (eyes, nose, mouth, chin) zeroed below a sloping plane, brain untouched",
    "conform": "FreeSurfer-conformed: 256^3 1 mm LIA, white matter at 110, uint8",
    "aniso": "resampled to 0.8 x 0.8 x 1.3 mm voxels (1.3 mm along the axis nearest S)",
    "iso2mm": "resampled to 2 mm isotropic voxels",
    "bias": "multiplied by a smooth bias field (factor ~3.3 between brightest and darkest)",
}

_FWHM_PER_SIGMA = 2.3548
_LIA = np.array([[-1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])  # voxel axes -> RAS


@dataclass(frozen=True)
class Perturbed:
    image: nib.Nifti1Image  # the perturbed head (float32; uint8 for "conform")
    mask: nib.Nifti1Image  # the reference brain mask on the perturbed image's grid (uint8 0/1)
    world: np.ndarray  # 4x4 RAS mm: clean-world point -> perturbed-world point
    description: str


@dataclass(frozen=True)
class _Scan:
    """A head in memory: intensities, the brain (bool) and their shared voxel -> RAS affine."""

    data: np.ndarray
    brain: np.ndarray
    affine: np.ndarray

    @property
    def zooms(self) -> np.ndarray:
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    def brain_points(self) -> np.ndarray:
        """World RAS (mm) of every brain voxel centre, (N, 3)."""
        return nib.affines.apply_affine(self.affine, np.argwhere(self.brain))


# ---- public helpers ---------------------------------------------------------------------------


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two masks on one grid (1.0 when both are empty)."""
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    if a.shape != b.shape:
        raise ValueError(f"dice of masks with different shapes {a.shape} and {b.shape}")
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def mask_centroid_world(mask: nib.Nifti1Image) -> np.ndarray:
    """The centre of mass of a mask's voxels, in world RAS mm."""
    inside = np.argwhere(np.asanyarray(mask.dataobj) > 0.5)
    if inside.size == 0:
        raise ValueError("the mask is empty: no brain to find the centre of")
    return nib.affines.apply_affine(mask.affine, inside.mean(axis=0))


def perturb(image: nib.Nifti1Image, mask: nib.Nifti1Image, name: str, seed: int = 0) -> Perturbed:
    """Apply the perturbation ``name`` (a key of PERTURBATIONS) to a head and its brain mask."""
    if name not in _MAKERS:
        raise ValueError(f"unknown perturbation {name!r}; use one of {', '.join(PERTURBATIONS)}")
    scan = _read(image, mask)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    out, world, description = _MAKERS[name](scan, rng)
    log.debug("%s (seed %d): %s", name, seed, description)
    lost = int(scan.brain.sum()) - int(out.brain.sum())
    if name in ("origin", "crop-chin", "crop-top", "deface") and lost:
        raise RuntimeError(f"{name} removed {lost} brain voxels; it must remove none")
    return Perturbed(
        image=_nifti(out.data, out.affine, image.header),
        mask=_nifti(out.brain.astype(np.uint8), out.affine, image.header),
        world=world,
        description=description,
    )


# ---- the perturbations ------------------------------------------------------------------------

_Maker = Callable[[_Scan, np.random.Generator], tuple[_Scan, np.ndarray, str]]


def _move_origin(scan: _Scan, rng: np.random.Generator) -> tuple[_Scan, np.ndarray, str]:
    centre = _centroid(scan)
    direction = _unit(rng.normal(size=3))
    distance = rng.uniform(50.0, 100.0)
    world = _translation(direction * distance - centre)
    moved = _Scan(scan.data, scan.brain, world @ scan.affine)
    description = (
        f"world origin moved: brain centre now {distance:.1f} mm from (0,0,0) "
        f"towards RAS {_fmt(direction)} (was {np.linalg.norm(centre):.1f} mm)"
    )
    return moved, world, description


def _rotate(scan: _Scan, rng: np.random.Generator) -> tuple[_Scan, np.ndarray, str]:
    return _rotated(scan, rng, 30.0)


def _tilt_and_move_origin(scan: _Scan, rng: np.random.Generator) -> tuple[_Scan, np.ndarray, str]:
    rotated, rotation, rotated_text = _rotated(scan, rng, rng.uniform(20.0, 30.0))
    moved, translation, moved_text = _move_origin(rotated, rng)
    return moved, translation @ rotation, f"{rotated_text}; then {moved_text}"


def _rotated(
    scan: _Scan, rng: np.random.Generator, degrees: float
) -> tuple[_Scan, np.ndarray, str]:
    """The head rotated about the brain centre, on the clean grid's axes, enlarged to hold it."""
    # Mostly a nod (pitch, about L-R) with some roll and yaw mixed in; either sense.
    axis = _unit(np.array([1.0, rng.uniform(-0.7, 0.7), rng.uniform(-0.7, 0.7)]))
    degrees = float(degrees * rng.choice([-1.0, 1.0]))
    centre = _centroid(scan)
    world = _translation(centre) @ _rotation(axis, degrees) @ _translation(-centre)

    # The rotated head's outline in the clean grid's voxel frame: the new grid keeps the clean
    # grid's axes and voxel sizes, and grows (never shrinks) to take in the whole head.
    outline = _outline(_head(scan))
    to_clean_voxels = np.linalg.inv(scan.affine) @ world @ scan.affine
    moved = nib.affines.apply_affine(to_clean_voxels, outline)
    low = np.minimum(np.floor(moved.min(axis=0)) - 2, 0).astype(int)
    high = np.maximum(np.ceil(moved.max(axis=0)) + 2, np.array(scan.data.shape) - 1).astype(int)
    affine = scan.affine @ _translation(low)
    shape = tuple(int(n) for n in high - low + 1)
    out = _resampled(scan, affine, shape, world)
    description = (
        f"rotated {degrees:+.1f} deg about axis RAS {_fmt(axis)} through the brain centre "
        f"{_fmt(centre)}; grid {scan.data.shape} -> {shape}"
    )
    return out, world, description


def _crop_chin(scan: _Scan, rng: np.random.Generator) -> tuple[_Scan, np.ndarray, str]:
    return _cropped_along_s(scan, below=True, margin_mm=25.0)


def _crop_top(scan: _Scan, rng: np.random.Generator) -> tuple[_Scan, np.ndarray, str]:
    return _cropped_along_s(scan, below=False, margin_mm=3.0)


def _cropped_along_s(scan: _Scan, below: bool, margin_mm: float) -> tuple[_Scan, np.ndarray, str]:
    """Slices removed along the voxel axis nearest S beyond ``margin_mm`` from the brain.

    The cut is the slice through the point ``margin_mm`` straight below (above) the lowest
    (highest) brain voxel; on an oblique grid it never goes into a slice holding brain.
    """
    axis = _axis_nearest(scan.affine, 2)
    points = scan.brain_points()
    extreme = points[np.argmin(points[:, 2])] if below else points[np.argmax(points[:, 2])]
    target = extreme + np.array([0.0, 0.0, -margin_mm if below else margin_mm])
    cut = nib.affines.apply_affine(np.linalg.inv(scan.affine), target)[axis]
    brain_slices = np.flatnonzero(np.any(scan.brain, axis=tuple(set(range(3)) - {axis})))
    size = scan.data.shape[axis]
    upwards = scan.affine[2, axis] > 0  # does the index grow towards S?
    if below == upwards:  # keep the slices from the cut to the end of the axis
        start, stop = min(max(int(np.ceil(cut - 1e-6)), 0), int(brain_slices[0])), size
    else:  # keep the slices from the start of the axis to the cut
        start, stop = 0, max(min(int(np.floor(cut + 1e-6)) + 1, size), int(brain_slices[-1]) + 1)
    keep = [slice(None)] * 3
    keep[axis] = slice(start, stop)
    offset = np.zeros(3)
    offset[axis] = start
    out = _Scan(
        np.ascontiguousarray(scan.data[tuple(keep)]),
        np.ascontiguousarray(scan.brain[tuple(keep)]),
        scan.affine @ _translation(offset),
    )
    removed = size - (stop - start)
    where = "below" if below else "above"
    if removed == 0:
        log.warning("the field of view ends within %g mm %s the brain: no cut", margin_mm, where)
    description = (
        f"field of view cut {margin_mm:g} mm {where} the brain: {removed} of {size} slices "
        f"({removed * scan.zooms[axis]:.0f} mm) removed along voxel axis {axis}"
    )
    return out, np.eye(4), description


def _deface(scan: _Scan, rng: np.random.Generator) -> tuple[_Scan, np.ndarray, str]:
    """The face zeroed as pydeface/mri_deface do, without touching the reference brain.

    Zeroed: what lies in front of a plane that slopes down and back from a point ``recess`` mm
    behind the brain's front at the brain's mid height (``tilt`` degrees from vertical), below
    that height, at most 50 mm behind the brain's front, and more than 4 mm from the brain. The
    last condition lets the cut follow the orbital surface of the frontal lobe, so the eyes go too.
    """
    points = scan.brain_points()
    front = points[:, 1].max()
    middle = 0.5 * (points[:, 2].min() + points[:, 2].max())
    tilt = np.deg2rad(rng.uniform(25.0, 40.0))
    recess = rng.uniform(5.0, 15.0)
    normal = np.array([0.0, np.cos(tilt), -np.sin(tilt)])  # points forward and down
    anchor = np.array([0.0, front - recess, middle])
    face = np.zeros(scan.data.shape, dtype=bool)
    for i, xyz in _world_slabs(scan.affine, scan.data.shape):
        in_front = (xyz - anchor) @ normal > 0
        face[i] = in_front & (xyz[..., 2] < middle) & (xyz[..., 1] > front - 50.0)
    face &= _farther_than(scan, face, 4.0)
    tissue_cm3 = np.count_nonzero(scan.data[face] > _tissue_level(scan)) * np.prod(scan.zooms) / 1e3
    data = scan.data.copy()
    data[face] = 0.0
    description = (
        f"face zeroed ({tissue_cm3:.0f} cm3 of tissue) in front of a plane tilted "
        f"{np.rad2deg(tilt):.0f} deg from vertical, {recess:.0f} mm behind the brain's front at "
        "its mid height"
    )
    return _Scan(data, scan.brain, scan.affine), np.eye(4), description


def _conform(scan: _Scan, rng: np.random.Generator) -> tuple[_Scan, np.ndarray, str]:
    """As FreeSurfer's mri_convert --conform: 256^3 1 mm LIA about the volume's centre, uint8."""
    centre = nib.affines.apply_affine(scan.affine, np.array(scan.data.shape) / 2.0)
    affine = np.eye(4)
    affine[:3, :3] = _LIA
    affine[:3, 3] = centre - _LIA @ np.full(3, 128.0)
    out = _resampled(scan, affine, (256, 256, 256))
    white = float(np.percentile(scan.data[scan.brain], 92.5))  # inside the white matter
    scaled = np.clip(np.rint(out.data * (110.0 / white)), 0, 255).astype(np.uint8)
    in_cube = nib.affines.apply_affine(np.linalg.inv(affine), scan.brain_points())
    outside = np.count_nonzero(np.any((in_cube < -0.5) | (in_cube > 255.5), axis=1))
    if outside:
        log.warning("conform: %d brain voxels lie outside the 256 mm cube, lost", outside)
    description = (
        f"conformed to 256^3 1 mm LIA about {_fmt(centre)}; brain 92.5th percentile "
        f"{white:.4g} -> 110, uint8"
    )
    return _Scan(scaled, out.brain, affine), np.eye(4), description


def _aniso(scan: _Scan, rng: np.random.Generator) -> tuple[_Scan, np.ndarray, str]:
    zooms = np.full(3, 0.8)
    zooms[_axis_nearest(scan.affine, 2)] = 1.3
    return _regridded(scan, zooms)


def _iso2mm(scan: _Scan, rng: np.random.Generator) -> tuple[_Scan, np.ndarray, str]:
    return _regridded(scan, np.full(3, 2.0))


def _regridded(scan: _Scan, zooms: np.ndarray) -> tuple[_Scan, np.ndarray, str]:
    """The same field of view and axes with other voxel sizes.

    Where a voxel grows, the image is first smoothed (Gaussian, FWHM^2 = new^2 - old^2) as the
    larger voxel of a real acquisition averages its content; interpolation alone would keep the
    fine noise and alias edges.
    """
    old = scan.zooms
    ratio = zooms / old
    old_shape = np.array(scan.data.shape)
    shape = tuple(int(n) for n in np.maximum(np.rint(old_shape / ratio), 1))
    # New voxel j sits at old voxel coordinate r j + offset; both fields of view share a centre.
    new_to_old = np.diag([*ratio, 1.0])
    new_to_old[:3, 3] = (old_shape - 1) / 2 - ratio * (np.array(shape) - 1) / 2
    sigma = np.sqrt(np.clip(zooms**2 - old**2, 0, None)) / _FWHM_PER_SIGMA / old
    data = ndimage.gaussian_filter(scan.data, sigma) if np.any(sigma > 0) else scan.data
    out = _resampled(_Scan(data, scan.brain, scan.affine), scan.affine @ new_to_old, shape)
    description = f"resampled from {_fmt(old, 2)} mm to {_fmt(zooms, 2)} mm voxels, grid {shape}"
    return out, np.eye(4), description


def _bias(scan: _Scan, rng: np.random.Generator) -> tuple[_Scan, np.ndarray, str]:
    """A smooth multiplicative field: a ramp and three wide Gaussians in world mm (log domain),
    scaled to a peak-to-peak of 1.2 over the head (a factor e^1.2 ~ 3.3)."""
    points = scan.brain_points()
    centre = points.mean(axis=0)
    half = 0.5 * (points.max(axis=0) - points.min(axis=0))
    ramp = _unit(rng.normal(size=3)) * rng.uniform(0.004, 0.008)  # log units per mm
    centres = centre + rng.uniform(-1.2, 1.2, size=(3, 3)) * half
    sigmas = rng.uniform(45.0, 80.0, size=3)
    amplitudes = rng.choice([-1.0, 1.0], size=3) * rng.uniform(0.5, 1.0, size=3)
    field = np.empty(scan.data.shape, dtype=np.float32)
    for i, xyz in _world_slabs(scan.affine, scan.data.shape):
        value = (xyz - centre) @ ramp
        for bump, sigma, amplitude in zip(centres, sigmas, amplitudes, strict=True):
            value += amplitude * np.exp(-np.sum((xyz - bump) ** 2, axis=-1) / (2 * sigma**2))
        field[i] = value
    inside = field[_head(scan)]
    low, high = float(inside.min()), float(inside.max())
    field = np.clip((field - 0.5 * (low + high)) * (1.2 / (high - low)), -0.6, 0.6)
    data = (scan.data * np.exp(field)).astype(np.float32)
    description = (
        "bias field: log peak-to-peak 1.2 over the head (x3.3), ramp "
        f"{np.linalg.norm(ramp) * 100:.2f}/100 mm towards RAS {_fmt(_unit(ramp))} and "
        f"Gaussians of {_fmt(sigmas, 0)} mm"
    )
    return _Scan(data, scan.brain, scan.affine), np.eye(4), description


_MAKERS: dict[str, _Maker] = {
    "origin": _move_origin,
    "rotate": _rotate,
    "tilt-origin": _tilt_and_move_origin,
    "crop-chin": _crop_chin,
    "crop-top": _crop_top,
    "deface": _deface,
    "conform": _conform,
    "aniso": _aniso,
    "iso2mm": _iso2mm,
    "bias": _bias,
}


# ---- images, grids and geometry ---------------------------------------------------------------


def _read(image: nib.Nifti1Image, mask: nib.Nifti1Image) -> _Scan:
    data = np.asarray(image.get_fdata(dtype=np.float32))
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"a 3D head is needed, not an image of shape {data.shape}")
    brain = np.asanyarray(mask.dataobj) > 0.5
    if brain.ndim == 4 and brain.shape[3] == 1:
        brain = brain[..., 0]
    if brain.shape != data.shape or not np.allclose(mask.affine, image.affine, atol=1e-3):
        raise ValueError(
            f"the mask (shape {brain.shape}) must be on the image's grid (shape {data.shape}); "
            "resample it onto the image first"
        )
    if not brain.any():
        raise ValueError("the brain mask is empty")
    return _Scan(data, brain, np.asarray(image.affine, dtype=float))


def _nifti(data: np.ndarray, affine: np.ndarray, like: nib.Nifti1Header) -> nib.Nifti1Image:
    """A NIfTI image whose qform and sform both hold ``affine``, units mm and s."""
    img = nib.Nifti1Image(data, affine)
    img.set_data_dtype(data.dtype)
    qform_code = int(like["qform_code"]) if isinstance(like, nib.Nifti1Header) else 0
    sform_code = int(like["sform_code"]) if isinstance(like, nib.Nifti1Header) else 0
    img.set_qform(affine, code=qform_code or 1)
    img.set_sform(affine, code=sform_code or 1)
    img.header.set_xyzt_units("mm", "sec")
    return img


def _resampled(
    scan: _Scan, affine: np.ndarray, shape: tuple[int, ...], world: np.ndarray | None = None
) -> _Scan:
    """``scan`` pulled onto the grid (affine, shape), whose world is ``world`` x clean world."""
    world = np.eye(4) if world is None else world
    out_to_in = np.linalg.inv(scan.affine) @ np.linalg.inv(world) @ affine

    def pull(volume: np.ndarray) -> np.ndarray:
        return ndimage.affine_transform(
            volume, out_to_in[:3, :3], out_to_in[:3, 3], output_shape=tuple(shape),
            order=1, mode="constant", cval=0.0, output=np.float32,
        )  # fmt: skip

    return _Scan(pull(scan.data), pull(scan.brain.astype(np.float32)) > 0.5, affine)


def _head(scan: _Scan) -> np.ndarray:
    """The head: the largest connected region of tissue, and the brain."""
    bright = scan.data > _tissue_level(scan)
    labels, count = ndimage.label(bright)
    if count == 0:
        return scan.brain.copy()
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return (labels == np.argmax(sizes)) | scan.brain


def _tissue_level(scan: _Scan) -> float:
    """Above the background noise, below any tissue: a tenth of the brain's median intensity."""
    return 0.1 * float(np.median(scan.data[scan.brain]))


def _outline(region: np.ndarray) -> np.ndarray:
    """Voxel indices (N, 3) of the region's surface."""
    return np.argwhere(region & ~ndimage.binary_erosion(region)).astype(float)


def _farther_than(scan: _Scan, region: np.ndarray, mm: float) -> np.ndarray:
    """True where a voxel of ``region`` is more than ``mm`` from every brain voxel centre."""
    far = np.ones(region.shape, dtype=bool)
    if not region.any():
        return far
    # Brain voxels within ``mm`` of the region lie in the region's box grown by ``mm``.
    reach = np.ceil(mm / scan.zooms).astype(int) + 1
    found = np.argwhere(region)
    low = np.maximum(found.min(axis=0) - reach, 0)
    high = np.minimum(found.max(axis=0) + reach + 1, region.shape)
    box = tuple(slice(lo, hi) for lo, hi in zip(low, high, strict=True))
    far[box] = ndimage.distance_transform_edt(~scan.brain[box], sampling=scan.zooms) > mm
    return far


def _world_slabs(affine: np.ndarray, shape: tuple[int, ...]) -> Iterator[tuple[int, np.ndarray]]:
    """World RAS of every voxel centre, one slab (shape[1], shape[2], 3) at a time along axis 0."""
    j, k = np.meshgrid(np.arange(shape[1]), np.arange(shape[2]), indexing="ij")
    plane = np.stack([j, k], axis=-1) @ affine[:3, 1:3].T
    for i in range(shape[0]):
        yield i, plane + (affine[:3, 0] * i + affine[:3, 3])


def _centroid(scan: _Scan) -> np.ndarray:
    return nib.affines.apply_affine(scan.affine, np.argwhere(scan.brain).mean(axis=0))


def _axis_nearest(affine: np.ndarray, world_axis: int) -> int:
    """The voxel axis most parallel to a world axis (0 R, 1 A, 2 S)."""
    directions = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    return int(np.argmax(np.abs(directions[world_axis])))


def _rotation(axis: np.ndarray, degrees: float) -> np.ndarray:
    """4x4 rotation by ``degrees`` about a unit ``axis`` through the origin (right-handed)."""
    x, y, z = axis
    cross = np.array([[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]])
    angle = np.deg2rad(degrees)
    out = np.eye(4)
    out[:3, :3] = np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross
    return out


def _translation(offset: np.ndarray) -> np.ndarray:
    out = np.eye(4)
    out[:3, 3] = offset
    return out


def _unit(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector)


def _fmt(values: np.ndarray, decimals: int = 2) -> str:
    return "(" + ", ".join(f"{v:.{decimals}f}" for v in values) + ")"
