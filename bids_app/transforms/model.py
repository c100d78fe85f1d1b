"""The transforms themselves, apart from any file format: affines and displacement fields in RAS
world coordinates (millimetres), chained as ITK chains them. ``itk.py`` reads and writes them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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
