"""Reading ITK composite transform files (.h5) into plain arrays, in RAS world coordinates.

The file format (ITK's HDF5 transform IO) is kept here, apart from the mathematics in ``jacobian``.
ITK stores points and vectors in LPS; everything returned here is RAS (see ``images.lps_ras_flip``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bids_app.images import LPS_RAS, lps_ras_flip, ras_affine_from_itk


@dataclass(frozen=True)
class DisplacementField:
    """Displacements (RAS mm, shape (X, Y, Z, 3)) on a grid with a RAS voxel-to-world affine."""

    vectors: np.ndarray
    affine: np.ndarray


@dataclass(frozen=True)
class CompositeTransform:
    """ITK applies the *last* transform to a point first; ``parts`` keeps the file's order."""

    parts: tuple  # np.ndarray (4x4 RAS affine) or DisplacementField

    @property
    def linear(self) -> np.ndarray:
        """The product of the linear parts (what remains when the fields are left out)."""
        total = np.eye(4)
        for part in self.parts:
            if isinstance(part, np.ndarray):
                total = total @ part
        return total

    @property
    def fields(self) -> tuple[DisplacementField, ...]:
        return tuple(p for p in self.parts if isinstance(p, DisplacementField))

    def map_points(self, points_ras: np.ndarray) -> np.ndarray:
        """Map RAS points (N, 3) through the whole composite (fields by linear interpolation)."""
        points = np.asarray(points_ras, dtype=float)
        for part in reversed(self.parts):
            if isinstance(part, np.ndarray):
                points = points @ part[:3, :3].T + part[:3, 3]
            else:
                points = points + sample_field(part, points)
        return points


def read_composite(path: Path) -> CompositeTransform:
    import h5py

    parts = []
    with h5py.File(path, "r") as h5:
        group = h5["TransformGroup"]
        for key in sorted(group, key=int):
            kind = _decode(group[key]["TransformType"][0])
            if kind.startswith("CompositeTransform"):
                continue
            params = np.asarray(group[key]["TransformParameters"], dtype=float)
            fixed = np.asarray(group[key]["TransformFixedParameters"], dtype=float)
            if kind.startswith(("AffineTransform", "MatrixOffsetTransformBase")):
                parts.append(_affine_from_itk(params, fixed))
            elif kind.startswith("DisplacementFieldTransform"):
                parts.append(_field_from_itk(params, fixed))
            else:
                raise ValueError(f"{path}: transform type {kind} is not supported here")
    return CompositeTransform(tuple(parts))


def _decode(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _affine_from_itk(params: np.ndarray, center: np.ndarray) -> np.ndarray:
    """ITK: y = M (x - c) + t + c, in LPS  ->  a 4x4 RAS matrix."""
    matrix = params[:9].reshape(3, 3)
    translation = params[9:12]
    lps = np.eye(4)
    lps[:3, :3] = matrix
    lps[:3, 3] = translation + center - matrix @ center
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    return flip @ lps @ flip


def _field_from_itk(params: np.ndarray, fixed: np.ndarray) -> DisplacementField:
    size = fixed[0:3].astype(int)
    origin, spacing, direction = fixed[3:6], fixed[6:9], fixed[9:18].reshape(3, 3)
    # ITK stores vectors with the first index varying fastest.
    vectors = params.reshape(size[2], size[1], size[0], 3).transpose(2, 1, 0, 3)
    return DisplacementField(
        vectors=lps_ras_flip(vectors).astype(np.float32),
        affine=ras_affine_from_itk(origin, spacing, direction),
    )


def sample_field(field: DisplacementField, points_ras: np.ndarray) -> np.ndarray:
    """Trilinear interpolation of the field at RAS points; zero outside the grid (as ITK does)."""
    from scipy.ndimage import map_coordinates

    inverse = np.linalg.inv(field.affine)
    ijk = points_ras @ inverse[:3, :3].T + inverse[:3, 3]
    return np.stack(
        [
            map_coordinates(field.vectors[..., c], ijk.T, order=1, mode="constant", cval=0.0)
            for c in range(3)
        ],
        axis=1,
    )


__all__ = ["CompositeTransform", "DisplacementField", "read_composite", "sample_field", "LPS_RAS"]
