"""The one place where RAS (NIfTI, nibabel, our outputs) meets LPS (ITK, ANTs, Greedy), and the
only conversion between nibabel and ANTs images.

ITK stores points, vectors and grids in LPS: x and y point the other way. Every conversion in the
package goes through these functions, so a sign can only be wrong in one place.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np

LPS_RAS = np.diag([-1.0, -1.0, 1.0])  # its own inverse: RAS <-> LPS for points and vectors


def lps_ras_flip(array: np.ndarray) -> np.ndarray:
    """Flip the x and y signs of points/vectors (last axis of length 3): RAS <-> LPS."""
    return np.asarray(array) * np.array([-1.0, -1.0, 1.0], dtype=np.asarray(array).dtype)


def lps_ras_affine(matrix: np.ndarray) -> np.ndarray:
    """A 4x4 point transform expressed in LPS as the same transform in RAS (and back)."""
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    return flip @ np.asarray(matrix, dtype=float) @ flip


def ras_affine_from_itk(
    origin: np.ndarray, spacing: np.ndarray, direction: np.ndarray
) -> np.ndarray:
    """The NIfTI (RAS) voxel-to-world affine of an ITK grid given in LPS."""
    affine = np.eye(4)
    affine[:3, :3] = LPS_RAS @ (np.asarray(direction).reshape(3, 3) * np.asarray(spacing))
    affine[:3, 3] = lps_ras_flip(np.asarray(origin, dtype=float))
    return affine


def itk_grid_from_ras(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(origin, spacing, direction) in LPS of a grid given by its RAS voxel-to-world affine."""
    lps = LPS_RAS @ np.asarray(affine, dtype=float)[:3, :3]
    spacing = np.sqrt((lps**2).sum(axis=0))
    return lps_ras_flip(np.asarray(affine, dtype=float)[:3, 3]), spacing, lps / spacing


def nifti_to_ants(img: nib.Nifti1Image):
    """A nibabel image as an ANTs image with the same voxels and physical space."""
    import ants

    origin, spacing, direction = itk_grid_from_ras(img.affine)
    data = np.asarray(img.dataobj, dtype=np.float32)
    return ants.from_numpy(
        data, origin=origin.tolist(), spacing=spacing.tolist(), direction=direction
    )


def ants_to_nifti(image, dtype=np.float32) -> nib.Nifti1Image:
    """An ANTs image as a nibabel image (RAS affine), with sform and qform set."""
    affine = ras_affine_from_itk(
        np.asarray(image.origin), np.asarray(image.spacing), np.asarray(image.direction)
    )
    out = nib.Nifti1Image(image.numpy().astype(dtype), affine)
    out.set_qform(affine, code=1)
    out.set_sform(affine, code=1)
    return out
