"""The group level's own TFCE and permutation test (bids_app/group/tfce.py), on tiny volumes."""

import numpy as np
import pytest
from scipy import stats
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


# ---- F: several tested columns (three or more groups) -----------------------------------------


def three_groups(effect, seed, n=18, shape=(12, 12, 10), covariate=False):
    """n participants' smooth noise in three groups (A, B, C in turn); group C's maps get a
    Gaussian bump of height ``effect`` (a single peak at ``centre``; ``ball``: within 2.5 voxels).
    The design: intercept, indicators of B and C (tested), and a nuisance covariate when asked."""
    rng = np.random.default_rng(seed)
    mask = np.ones(shape, bool)
    mask[0], mask[-1] = False, False
    grid = np.indices(shape).transpose(1, 2, 3, 0)
    centre = np.array([5, 7, 4])
    distance = np.linalg.norm(grid - centre, axis=-1)
    ball, bump = distance <= 2.5, np.exp(-(distance**2) / (2 * 2.0**2))
    group = np.arange(n) % 3
    maps = []
    for i in range(n):
        volume = gaussian_filter(rng.normal(size=shape), 1.0)
        maps.append((volume / 0.2 + effect * bump * (group[i] == 2))[mask])
    columns = [np.ones(n), (group == 1).astype(float), (group == 2).astype(float)]
    if covariate:
        columns.append(rng.normal(size=n))
    return np.array(maps), np.column_stack(columns), mask, ball, group, centre


def test_the_observed_f_equals_the_glm_f_and_scipys_one_way_anova():
    data, matrix, _, _, group, _ = three_groups(0.5, seed=8)
    null = permutation_test(data, matrix, (1, 2), 10, seed=0)
    np.testing.assert_allclose(null.t, fit_glm(data, matrix, (1, 2)).statistic, rtol=1e-8)
    anova = stats.f_oneway(*(data[group == g] for g in range(3)), axis=0).statistic
    np.testing.assert_allclose(null.t, anova, rtol=1e-8)
    assert (null.max_t >= 0).all() and null.max_t.shape == (10,)


def test_the_observed_f_with_a_covariate_equals_the_glm_f():
    data, matrix, _, _, _, _ = three_groups(0.5, seed=9, covariate=True)
    data = data + 0.7 * matrix[:, 3:4]  # the covariate carries an effect of its own
    null = permutation_test(data, matrix, (1, 2), 10, seed=0)
    np.testing.assert_allclose(null.t, fit_glm(data, matrix, (1, 2)).statistic, rtol=1e-8)


def test_one_tested_column_is_a_t_whose_square_is_the_f_of_that_column():
    data, matrix, _, _, _, _ = three_groups(0.5, seed=10, covariate=True)
    t = permutation_test(data, matrix, 2, 5, seed=0).t
    np.testing.assert_allclose(t, fit_glm(data, matrix, (2,)).statistic, rtol=1e-8)
    assert (t < 0).any() and (t > 0).any()  # the sign is kept


def test_a_planted_three_group_effect_is_found_with_its_peak_within_one_voxel():
    data, matrix, mask, ball, _, centre = three_groups(3.0, seed=11)
    null = permutation_test(data, matrix, (1, 2), 200, seed=1, mask=mask)
    ijk = np.argwhere(mask)
    # voxel-wise max-F finds the bump's top; TFCE most of it
    for logp, score, share in ((null.logp_fwe(), null.t, 0.1),
                               (null.logp_tfce_fwe(), null.tfce, 0.5)):  # fmt: skip
        assert (logp[ball[mask]] > FWE).mean() > share
        peak = ijk[np.argmax(np.where(logp > FWE, score, -np.inf))]
        assert np.abs(peak - centre).max() <= 1, peak
    assert (null.tfce >= 0).all()  # one-sided


def test_a_null_three_group_cohort_gives_no_fwe_significant_voxel():
    data, matrix, mask, _, _, _ = three_groups(0.0, seed=12)
    null = permutation_test(data, matrix, (1, 2), 200, seed=2, mask=mask)
    assert null.logp_fwe().max() < FWE
    assert null.logp_tfce_fwe().max() < FWE


def test_f_permutations_do_not_depend_on_the_processes():
    data, matrix, mask, _, _, _ = three_groups(0.8, seed=13, covariate=True)
    one = permutation_test(data, matrix, (1, 2), 40, seed=7, mask=mask, n_jobs=1)
    two = permutation_test(data, matrix, (1, 2), 40, seed=7, mask=mask, n_jobs=2)
    np.testing.assert_allclose(one.max_t, two.max_t, rtol=1e-12)
    np.testing.assert_allclose(one.max_tfce, two.max_tfce, rtol=1e-12)
    np.testing.assert_array_equal(one.logp_fwe(), two.logp_fwe())
    np.testing.assert_array_equal(one.logp_tfce_fwe(), two.logp_tfce_fwe())
