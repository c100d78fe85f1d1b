"""Writing ITK composite transforms: ANTs reads what we write as the mapping it stands for."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from conftest import known_affine, smooth_warp

from bids_app.transforms import (
    CompositeTransform,
    DisplacementField,
    read_composite,
    write_composite,
)


def _ants_map_points(points_ras: np.ndarray, path) -> np.ndarray:
    import ants

    lps = pd.DataFrame(points_ras * [-1, -1, 1], columns=["x", "y", "z"])
    return ants.apply_transforms_to_points(3, lps, [str(path)]).to_numpy() * [-1, -1, 1]


def _oblique_lia_grid(shape=(40, 44, 36), mm=(2.0, 2.5, 3.0)) -> np.ndarray:
    """An RAS voxel-to-world affine stored LIA, tilted by 10 degrees: every sign and axis swap."""
    from scipy.spatial.transform import Rotation

    lia = np.array([[-1.0, 0, 0], [0, 0, 1], [0, -1, 0]])  # voxel i -> L, j -> I, k -> A
    axes = Rotation.from_euler("z", 10, degrees=True).as_matrix() @ lia @ np.diag(mm)
    affine = np.eye(4)
    affine[:3, :3] = axes
    affine[:3, 3] = -axes @ (np.array(shape) - 1) / 2  # centred on the origin
    return affine


def _field_of(function, affine: np.ndarray, shape) -> DisplacementField:
    ijk = np.indices(shape).reshape(3, -1).T
    world = nib.affines.apply_affine(affine, ijk)
    return DisplacementField(function(world).reshape(*shape, 3).astype(np.float32), affine)


def _points_inside(affine, shape, count=300, seed=0) -> np.ndarray:
    margin = 3
    rng = np.random.default_rng(seed)
    ijk = rng.uniform(margin, np.array(shape) - 1 - margin, size=(count, 3))
    return nib.affines.apply_affine(affine, ijk)


@pytest.mark.parametrize("with_field", [True, False])
def test_ants_maps_points_through_a_written_composite_as_its_parts_say(tmp_path, with_field):
    shape = (40, 44, 36)
    grid = _oblique_lia_grid(shape)
    affine = known_affine()
    field = _field_of(smooth_warp, grid, shape)
    parts = (affine, field) if with_field else (affine,)
    path = write_composite(CompositeTransform(parts), tmp_path / "xfm.h5")

    points = _points_inside(grid, shape)
    moved = points + smooth_warp(points) if with_field else points
    expected = moved @ affine[:3, :3].T + affine[:3, 3]  # ITK: the last part first
    # Linear interpolation of a 90 mm sine on a 2-3 mm grid is good to ~0.01 mm.
    np.testing.assert_allclose(_ants_map_points(points, path), expected, atol=0.02)
    # Our reader gives the parts back.
    back = read_composite(path)
    np.testing.assert_allclose(back.parts[0], affine, atol=1e-5)
    if with_field:
        np.testing.assert_allclose(back.parts[1].affine, grid, atol=1e-6)
        np.testing.assert_allclose(back.parts[1].vectors, field.vectors, atol=1e-6)


def test_an_inverse_composite_field_first_then_affine_undoes_the_forward(tmp_path):
    """[field v, A^-1] (as an inverse composite is stored) maps y to A^-1 y + v(A^-1 y)."""
    shape = (40, 44, 36)
    grid = _oblique_lia_grid(shape)
    affine = known_affine()
    field = _field_of(smooth_warp, grid, shape)
    inverse = np.linalg.inv(affine)
    path = write_composite(CompositeTransform((field, inverse)), tmp_path / "inverse.h5")
    points = _points_inside(grid, shape) @ affine[:3, :3].T + affine[:3, 3]
    z = points @ inverse[:3, :3].T + inverse[:3, 3]
    np.testing.assert_allclose(_ants_map_points(points, path), z + smooth_warp(z), atol=0.02)


def test_malformed_parts_are_refused_with_the_reason(tmp_path):
    with pytest.raises(ValueError, match="4x4"):
        write_composite(CompositeTransform((np.eye(3),)), tmp_path / "a.h5")
    bad_field = DisplacementField(np.zeros((4, 4, 4, 2), np.float32), np.eye(4))
    with pytest.raises(ValueError, match=r"\(X, Y, Z, 3\)"):
        write_composite(CompositeTransform((np.eye(4), bad_field)), tmp_path / "b.h5")
