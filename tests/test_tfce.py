"""The group level's own TFCE and permutation test (bids_app/group/tfce.py), on tiny volumes."""

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from bids_app.group.inference import fit_glm
from bids_app.group.tfce import permutation_test, tfce

FWE = -np.log10(0.05)


def reference_tfce(volume, step, e=0.5, h=2.0):
    """TFCE from its definition: at every height, flood-fill each voxel's 6-connected component
    of the voxels at or above the height; sum extent^E * height^H * step (positive side)."""
    out = np.zeros(volume.shape)
    height = step
    while height <= volume.max() + 1e-12:
        above = volume >= height
        seen = np.zeros(volume.shape, bool)
        for start in zip(*np.nonzero(above), strict=True):
            if seen[start]:
                continue
            component, todo = [], [start]
            seen[start] = True
            while todo:
                voxel = todo.pop()
                component.append(voxel)
                for axis in range(3):
                    for delta in (-1, 1):
                        near = list(voxel)
                        near[axis] += delta
                        near = tuple(near)
                        if all(0 <= near[a] < volume.shape[a] for a in range(3)) and (
                            above[near] and not seen[near]
                        ):
                            seen[near] = True
                            todo.append(near)
            for voxel in component:
                out[voxel] += len(component) ** e * height**h * step
        height += step
    return out


def smooth_noise(shape, seed, sigma=1.0):
    field = gaussian_filter(np.random.default_rng(seed).normal(size=shape), sigma)
    return 3 * field / field.std()


def test_tfce_equals_the_definition_on_a_tiny_volume():
    volume = smooth_noise((7, 6, 5), 1)
    step = 0.25
    expected = reference_tfce(volume, step) - reference_tfce(-volume, step)
    np.testing.assert_allclose(tfce(volume, step), expected, rtol=1e-10, atol=1e-12)
    assert (tfce(volume, step) > 0).sum() and (tfce(volume, step) < 0).sum()  # both signs there


def test_tfce_agrees_with_nilearns():
    from nilearn.mass_univariate._utils import calculate_tfce
    from scipy.ndimage import generate_binary_structure

    volume = smooth_noise((16, 14, 12), 2, sigma=1.5)
    theirs = calculate_tfce(volume[..., None], generate_binary_structure(3, 1))[..., 0]
    # nilearn: 100 heights up to the map's largest |value| on either side, sums without dh
    side = max(volume.max(), -volume.min())
    dh = side / 100
    positive = tfce(np.where(volume > 0, volume, 0), dh, two_sided=False)
    if volume.max() >= side:  # the same heights: the same sums, times dh
        np.testing.assert_allclose(positive, np.maximum(theirs, 0) * dh, rtol=1e-9, atol=1e-9)
    # the default step (0.1 in t units) follows the same integral within the step's error
    ours = tfce(volume)
    inside = np.abs(theirs * dh) > 0.05 * np.abs(theirs * dh).max()
    relative = np.abs(ours[inside] - theirs[inside] * dh) / np.abs(theirs[inside] * dh)
    assert np.median(relative) < 0.05 and relative.max() < 0.25


def test_the_observed_t_equals_the_glm_t_with_covariates():
    rng = np.random.default_rng(3)
    n, voxels = 14, 40
    matrix = np.column_stack([np.ones(n), np.r_[np.ones(7), np.zeros(7)], rng.normal(size=n)])
    data = rng.normal(size=(n, voxels)) + matrix[:, 2:3] * 0.5
    null = permutation_test(data, matrix, 1, 20, seed=0)
    np.testing.assert_allclose(null.t, fit_glm(data, matrix, (1,)).statistic, rtol=1e-4, atol=1e-4)
    assert null.max_t.shape == (20,) and (null.max_t > 0).all()


def cohort(effect, seed, n=16, shape=(12, 12, 10)):
    """n participants' smooth noise, ``effect`` added to group A (first half) in a ball."""
    rng = np.random.default_rng(seed)
    mask = np.ones(shape, bool)
    mask[0], mask[-1] = False, False  # a mask smaller than the grid
    grid = np.indices(shape).transpose(1, 2, 3, 0)
    ball = np.linalg.norm(grid - np.array(shape) / 2, axis=-1) <= 2.5
    maps = []
    for i in range(n):
        volume = gaussian_filter(rng.normal(size=shape), 1.0)
        maps.append((volume / 0.2 + effect * ball * (i < n // 2))[mask])
    matrix = np.column_stack([np.ones(n), np.r_[np.ones(n // 2), np.zeros(n - n // 2)]])
    return np.array(maps), matrix, mask, ball[mask]


def test_a_planted_effect_is_found_by_tfce_fwe():
    data, matrix, mask, ball = cohort(1.5, seed=4)
    null = permutation_test(data, matrix, 1, 200, seed=1, mask=mask)
    logp = null.logp_tfce_fwe()
    assert (logp[ball] > FWE).mean() > 0.5
    assert np.argmax(np.abs(null.tfce)) in np.flatnonzero(ball)
    assert (null.tfce[ball] > 0).all()  # group A minus B: positive


def test_a_null_cohort_gives_no_fwe_significant_voxel():
    data, matrix, mask, _ = cohort(0.0, seed=5)
    null = permutation_test(data, matrix, 1, 200, seed=2, mask=mask)
    assert null.logp_tfce_fwe().max() < FWE
    assert null.logp_fwe().max() < FWE


@pytest.mark.parametrize("jobs", [2])
def test_the_same_seed_gives_the_same_result_whatever_the_processes(jobs):
    data, matrix, mask, _ = cohort(0.5, seed=6)
    one = permutation_test(data, matrix, 1, 30, seed=7, mask=mask, n_jobs=1)
    many = permutation_test(data, matrix, 1, 30, seed=7, mask=mask, n_jobs=jobs)
    # the same permutations in the same batches: equal up to the BLAS's last-bit rounding
    np.testing.assert_allclose(one.max_t, many.max_t, rtol=1e-12)
    np.testing.assert_allclose(one.max_tfce, many.max_tfce, rtol=1e-12)
    np.testing.assert_array_equal(one.logp_tfce_fwe(), many.logp_tfce_fwe())
    other = permutation_test(data, matrix, 1, 30, seed=8, mask=mask)
    assert not np.array_equal(one.max_t, other.max_t)


def test_tfce_is_on_by_default_and_no_tfce_turns_it_off(tmp_path):
    from bids_app.cli import build_parser, model_spec_from_args, settings_from_args

    def spec(*more):
        argv = [str(tmp_path / "bids"), str(tmp_path / "out"), "group", "--group-by", "group"]
        (tmp_path / "bids").mkdir(exist_ok=True)
        args = build_parser().parse_args([*argv, *more])
        return model_spec_from_args(args, settings_from_args(args))

    assert spec().tfce and spec().n_permutations > 0
    assert not spec("--no-tfce").tfce
    assert not spec("--n-permutations", "0").tfce  # nothing to correct with
