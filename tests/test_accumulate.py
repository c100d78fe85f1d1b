"""group/accumulate.py: mean and SD read in parallel blocks and merged equal numpy's over the
whole stack, whatever the number of blocks; a map on another grid is refused."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from bids_app.errors import MninormError
from bids_app.group.accumulate import (
    accumulate,
    accumulate_keyed,
    participant_values,
    split_blocks,
)
from bids_app.group.collect import Grid

SHAPE = (5, 6, 4)
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


@pytest.fixture
def cohort(tmp_path):
    """17 participants, the third with two runs (their mean counts once), values with an offset
    far from zero (where a naive sum of squares loses precision)."""
    rng = np.random.default_rng(3)
    participants, values = [], []
    for index in range(17):
        runs = 2 if index == 2 else 1
        paths, data = [], []
        for run in range(runs):
            image = (1000 + rng.normal(0, 0.5, SHAPE)).astype(np.float32)
            path = tmp_path / f"sub-{index:02d}_run-{run}.nii.gz"
            nib.Nifti1Image(image, AFFINE).to_filename(path)
            paths.append(path)
            data.append(image.astype(np.float64))
        participants.append(tuple(paths))
        values.append(np.mean(data, axis=0))
    return participants, np.stack(values), Grid(SHAPE, AFFINE, "test")


def test_blocks_are_contiguous_and_cover_everyone_once():
    items = list(range(10))
    for count in (1, 2, 3, 4, 10, 20):
        blocks = split_blocks(items, count)
        assert [item for block in blocks for item in block] == items
        assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_merged_blocks_give_the_stacks_mean_and_sd(cohort, workers):
    participants, stack, grid = cohort
    stats = accumulate(participants, grid, workers=workers)
    assert stats.count == len(participants)
    np.testing.assert_allclose(stats.mean, stack.mean(axis=0), rtol=0, atol=1e-9)
    np.testing.assert_allclose(stats.sd(), stack.std(axis=0, ddof=1), rtol=1e-9, atol=1e-9)


def test_a_map_on_another_grid_is_refused(cohort, tmp_path):
    participants, _, grid = cohort
    other = tmp_path / "sub-99.nii.gz"
    nib.Nifti1Image(np.zeros((5, 6, 5), np.float32), AFFINE).to_filename(other)
    with pytest.raises(MninormError, match="sub-99.nii.gz is on another grid"):
        accumulate([*participants, (other,)], grid, workers=1)


def test_a_dask_cluster_gives_the_same_result(cohort):
    distributed = pytest.importorskip("distributed")
    participants, stack, grid = cohort
    with distributed.Client(
        processes=False, n_workers=2, threads_per_worker=1, dashboard_address=None
    ) as client:
        stats = accumulate(participants, grid, client=client)
    assert stats.count == len(participants)
    np.testing.assert_allclose(stats.mean, stack.mean(axis=0), rtol=0, atol=1e-9)
    np.testing.assert_allclose(stats.sd(), stack.std(axis=0, ddof=1), rtol=1e-9, atol=1e-9)


def _by_parity(item):
    """Test step: a participant's map under its parity, and again under the key 'all'."""
    index, paths = item
    values = participant_values(paths, GRID)
    yield ("odd" if index % 2 else "even"), values.copy()
    yield "all", values


GRID = Grid(SHAPE, AFFINE, "test")


@pytest.mark.parametrize("workers", [1, 2])
def test_keyed_blocks_give_each_keys_mean_and_sd(cohort, workers):
    participants, stack, _ = cohort
    items = list(enumerate(participants))
    stats = accumulate_keyed(items, _by_parity, workers=workers)
    assert list(stats) == ["even", "all", "odd"]  # the order keys were first met
    for key, rows in (("even", stack[0::2]), ("odd", stack[1::2]), ("all", stack)):
        assert stats[key].count == len(rows)
        np.testing.assert_allclose(stats[key].mean, rows.mean(axis=0), rtol=0, atol=1e-9)
        np.testing.assert_allclose(stats[key].sd(), rows.std(axis=0, ddof=1), rtol=1e-9, atol=1e-9)
