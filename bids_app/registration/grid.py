"""Grid helpers every engine shares: the template on a preset's grid, pixel types ITK expects."""

from __future__ import annotations


def as_pixeltype(image, pixeltype: str):
    return image if image.pixeltype == pixeltype else image.clone(pixeltype)


def fixed_on_grid(fixed, fixed_mask, grid_mm: float):
    """The template (float) and its mask (float 0/1, or None) on a preset's grid: every engine's
    displacement field lives on that grid."""
    fixed = to_grid(as_pixeltype(fixed, "float"), grid_mm, "linear")
    if fixed_mask is not None:
        fixed_mask = to_grid(as_pixeltype(fixed_mask, "float"), grid_mm, "nearestNeighbor")
    return fixed, fixed_mask


def to_grid(image, grid_mm: float, interpolation: str):
    """Resample ``image`` to an isotropic ``grid_mm`` grid if that is coarser than its own."""
    import ants

    if min(image.spacing) >= grid_mm - 1e-6:
        return image
    interp = {"linear": 0, "nearestNeighbor": 1}[interpolation]
    return ants.resample_image(image, (grid_mm,) * 3, use_voxels=False, interp_type=interp)
