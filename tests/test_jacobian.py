"""Jacobian determinants against fields whose answer is known analytically."""

from __future__ import annotations

import numpy as np
import pytest

from bids_app.transforms import CompositeTransform, DisplacementField
from bids_app.transforms.jacobian import field_determinant, folding_fraction, log_jacobians


def _grid_affine(kind: str) -> np.ndarray:
    affine = np.eye(4)
    if kind == "ras":
        affine[:3, :3] = np.diag([2.0, 2.0, 2.0])
    elif kind == "lia":  # flipped and permuted axes, anisotropic voxels
        affine[:3, :3] = np.array([[-2.0, 0, 0], [0, 0, 2.5], [0, -1.5, 0]])
    affine[:3, 3] = [-30.0, -20.0, -25.0]
    return affine


def _world(affine, shape):
    ijk = np.indices(shape).reshape(3, -1).T
    return (ijk @ affine[:3, :3].T + affine[:3, 3]).reshape(*shape, 3)


@pytest.mark.parametrize("grid", ["ras", "lia"])
def test_linear_displacement_gives_the_product_of_stretches(grid):
    affine = _grid_affine(grid)
    world = _world(affine, (20, 24, 22))
    stretch = np.array([0.1, -0.2, 0.05])
    field = DisplacementField((world * stretch).astype(np.float32), affine)
    expected = np.prod(1 + stretch)
    np.testing.assert_allclose(field_determinant(field), expected, rtol=1e-4)


@pytest.mark.parametrize("grid", ["ras", "lia"])
def test_sinusoidal_displacement_matches_its_analytic_jacobian(grid):
    affine = _grid_affine(grid)
    world = _world(affine, (40, 40, 40))
    amplitude, k = 1.5, 2 * np.pi / 60.0
    vectors = np.zeros_like(world)
    vectors[..., 0] = amplitude * np.sin(k * world[..., 0])  # u_x(x): det = 1 + A k cos(k x)
    expected = 1 + amplitude * k * np.cos(k * world[..., 0])
    determinant = field_determinant(DisplacementField(vectors.astype(np.float32), affine))
    interior = (slice(2, -2),) * 3  # central differences are one-sided at the border
    np.testing.assert_allclose(determinant[interior], expected[interior], atol=5e-3)


def test_uniform_scaling_gives_total_log_jacobian_of_three_log_s():
    s = 1.1
    affine = _grid_affine("ras")
    scaling = np.diag([s, s, s, 1.0])
    zero_field = DisplacementField(np.zeros((10, 10, 10, 3), np.float32), affine)
    nonlinear, total, grid = log_jacobians(CompositeTransform((scaling, zero_field)))
    np.testing.assert_allclose(nonlinear, 0.0, atol=1e-6)
    np.testing.assert_allclose(total, 3 * np.log(s), atol=1e-5)
    np.testing.assert_array_equal(grid, affine)


def test_folding_is_counted_and_kept_finite():
    affine = _grid_affine("ras")
    world = _world(affine, (12, 12, 12))
    vectors = np.zeros_like(world)
    vectors[..., 0] = -1.5 * world[..., 0]  # det = 1 - 1.5 < 0 everywhere
    field = DisplacementField(vectors.astype(np.float32), affine)
    determinant = field_determinant(field)
    assert folding_fraction(determinant) == 1.0
    nonlinear, _, _ = log_jacobians(CompositeTransform((np.eye(4), field)))
    assert np.isfinite(nonlinear).all() and (nonlinear < -10).all()
