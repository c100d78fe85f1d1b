"""ITK composite transforms (.h5): ANTs and nitransforms read what we write as the mapping it
stands for, and we read what ANTs writes as ANTs does."""

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


# ---- nitransforms, an independent reader (and ANTs as a writer) ---------------------------------
# A composite maps points of the fixed (template) space to the moving (T1w) space, the last part
# first; our CompositeTransform.map_points and nitransforms' TransformChain.map both map points
# that way (no inversion), in RAS mm. ITK's files are in LPS: a wrong sign on either side moves
# points by twice a displacement (up to 5 mm here), or by a translation.


def _nitransforms_map_points(points_ras: np.ndarray, path) -> np.ndarray:
    pytest.importorskip("nitransforms", reason="a test dependency: pip install -e '.[test]'")
    from nitransforms.manip import load

    return load(path, fmt="itk").map(points_ras)  # the ITK .h5 reader, not its X5 one


def _grid_nodes(affine, shape, count=300, seed=1) -> np.ndarray:
    """Points on field grid nodes, away from the edges: fields are exact there, whatever the
    interpolation (nitransforms' is cubic, ITK's and ours linear)."""
    rng = np.random.default_rng(seed)
    ijk = rng.integers(3, np.array(shape) - 3, size=(count, 3))
    return nib.affines.apply_affine(affine, ijk)


@pytest.mark.filterwarnings("ignore:Reference space not set")
def test_nitransforms_reads_our_affine_and_field_composite_as_its_parts_say(tmp_path):
    shape = (40, 44, 36)
    grid = _oblique_lia_grid(shape)
    affine = known_affine()
    field = _field_of(smooth_warp, grid, shape)
    path = write_composite(CompositeTransform((affine, field)), tmp_path / "xfm.h5")

    on_nodes = _grid_nodes(grid, shape)
    moved = on_nodes + smooth_warp(on_nodes)
    expected = moved @ affine[:3, :3].T + affine[:3, 3]  # the field first, then the affine
    theirs = _nitransforms_map_points(on_nodes, path)
    # float32 parameters: a few 1e-6 mm
    np.testing.assert_allclose(theirs, expected, atol=1e-4)
    np.testing.assert_allclose(read_composite(path).map_points(on_nodes), theirs, atol=1e-4)
    # Between nodes both interpolate a 90 mm sine sampled every 2-3 mm: a few hundredths of a mm.
    between = _points_inside(grid, shape)
    ours = read_composite(path).map_points(between)
    np.testing.assert_allclose(_nitransforms_map_points(between, path), ours, atol=0.03)


@pytest.mark.filterwarnings("ignore:Reference space not set")
def test_nitransforms_reads_our_inverse_composite_field_after_the_affine(tmp_path):
    """[field v, A^-1] maps y to z + v(z), z = A^-1 y: the affine is applied first."""
    shape = (40, 44, 36)
    grid = _oblique_lia_grid(shape)
    affine = known_affine()
    inverse = np.linalg.inv(affine)
    field = _field_of(smooth_warp, grid, shape)
    path = write_composite(CompositeTransform((field, inverse)), tmp_path / "inverse.h5")

    z = _points_inside(grid, shape)
    points = z @ affine[:3, :3].T + affine[:3, 3]
    theirs = _nitransforms_map_points(points, path)
    np.testing.assert_allclose(theirs, z + smooth_warp(z), atol=0.03)
    np.testing.assert_allclose(read_composite(path).map_points(points), theirs, atol=0.03)


def _ants_composite(path) -> np.ndarray:
    """A composite ANTs writes itself, from parameters in ITK's own terms (LPS): an affine about
    a centre that is not the origin (our writer always uses 0), then a smooth field on an oblique,
    anisotropic grid. Returns LPS points whose affine images are well inside the field's grid."""
    import ants
    from scipy.spatial.transform import Rotation

    shape, spacing = (30, 34, 26), np.array([2.5, 2.0, 3.0])
    direction = Rotation.from_euler("xz", [12, -9], degrees=True).as_matrix() @ np.diag([1, -1, -1])
    origin = -direction @ (spacing * (np.array(shape) - 1) / 2) + [3.0, -5.0, 4.0]
    ijk = np.indices(shape).reshape(3, -1).T
    nodes = (ijk * spacing) @ direction.T + origin
    image = ants.from_numpy(
        smooth_warp(nodes).reshape(*shape, 3).astype(np.float32), origin=tuple(origin),
        spacing=tuple(spacing), direction=direction, has_components=True,
    )  # fmt: skip
    linear = ants.create_ants_transform(
        transform_type="AffineTransform", dimension=3,
        matrix=known_affine()[:3, :3], translation=(4.0, -2.0, 6.0), center=(10.0, -25.0, 7.0),
    )  # fmt: skip
    field = ants.transform_from_displacement_field(image)
    # compose_ants_transforms([A, F]) stores [F, A]: ITK applies A to a point first.
    ants.write_transform(ants.compose_ants_transforms([linear, field]), str(path))

    rng = np.random.default_rng(2)
    inside = np.all((ijk >= 4) & (ijk < np.array(shape) - 4), axis=1)
    targets = nodes[rng.choice(np.flatnonzero(inside), 300, replace=False)]
    targets += rng.uniform(-1.0, 1.0, targets.shape)  # between the nodes too
    undo = linear.invert()
    return np.array([undo.apply_to_point(tuple(q)) for q in targets])


@pytest.mark.filterwarnings("ignore:Reference space not set")
def test_our_reader_maps_points_through_a_composite_ants_wrote_as_ants_and_nitransforms_do(
    tmp_path,
):
    path = tmp_path / "ants.h5"
    points = _ants_composite(path) * [-1, -1, 1]  # RAS
    transform = read_composite(path)
    assert [type(p).__name__ for p in transform.parts] == ["DisplacementField", "ndarray"]
    ours = transform.map_points(points)
    # ITK interpolates fields linearly, as we do; the affine about its centre must be exact.
    np.testing.assert_allclose(ours, _ants_map_points(points, path), atol=1e-4)
    np.testing.assert_allclose(_nitransforms_map_points(points, path), ours, atol=0.03)
    assert np.abs(ours - points).max() > 5  # the transform moves the points: not a vacuous check
