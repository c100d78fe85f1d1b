"""Jacobian determinants of transforms, computed from plain arrays (engine-independent).

For a composite ``T(p) = A(p + u(p))`` (ANTs applies the field first, then the affine), defined on
the template grid and mapping template points to participant points:

* nonlinear part: ``log det(I + du/dp)``;
* whole transform: ``log |det A| + log det(I + du/dp)``.

Both are > 0 where the participant's tissue is larger than the template's at that location.
"""

from __future__ import annotations

import numpy as np

from bids_app.transforms.model import CompositeTransform, DisplacementField

# A determinant <= 0 means folding; its log is undefined. It is stored as log of this floor, so the
# map stays finite and the folded voxels stand out (and are counted by QC).
_DETERMINANT_FLOOR = 1e-6


def field_determinant(field: DisplacementField) -> np.ndarray:
    """det(I + du/dp) at every voxel of the field's grid (central differences, in mm)."""
    vectors = field.vectors.astype(np.float64)
    # d u_c / d index_a, for components c and voxel axes a
    by_index = np.stack(
        [np.stack(np.gradient(vectors[..., c], axis=(0, 1, 2)), axis=-1) for c in range(3)],
        axis=-2,
    )  # (..., 3 components, 3 index axes)
    index_to_world = np.linalg.inv(field.affine[:3, :3])  # d index / d p
    by_world = by_index @ index_to_world
    jacobian = by_world + np.eye(3)
    return np.linalg.det(jacobian).astype(np.float32)


def log_jacobians(transform: CompositeTransform) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(nonlinear log-J, whole-transform log-J, grid affine) for a [affine..., field] composite."""
    fields = transform.fields
    if len(fields) != 1:
        raise ValueError(f"expected one displacement field in the transform, found {len(fields)}")
    field = fields[0]
    determinant = field_determinant(field)
    nonlinear = np.log(np.maximum(determinant, _DETERMINANT_FLOOR)).astype(np.float32)
    linear_log = float(np.log(abs(np.linalg.det(transform.linear[:3, :3]))))
    return nonlinear, (nonlinear + linear_log).astype(np.float32), field.affine


def folding_fraction(determinant: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Share of voxels (inside ``mask``) whose determinant is not positive."""
    values = determinant if mask is None else determinant[mask > 0]
    return float((values <= 0).mean()) if values.size else 0.0
