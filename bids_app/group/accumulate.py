"""Voxel-wise mean and SD over many participants' maps, read in parallel and merged.

The participants are split into contiguous blocks (in label order); one process per block (local
processes, or tasks on a Dask cluster) streams its participants through a ``RunningStats``
(Welford's update) and hands back that partial result; the partial results are merged with Chan's
formula (``RunningStats.absorb``) in block order. Each process holds one partial result and one
participant's maps at a time, and the parent at most one partial result per block, whatever the
cohort's size. The t and F maps of ``group/maps.py`` need nothing more than per-group
``RunningStats``, so each group can be accumulated this way.

``accumulate`` takes the participants' map paths (one kind of map); ``accumulate_keyed`` runs a
function that turns one item (a participant) into several (key, values) pairs, e.g. every map kind
of one participant with their group, and returns one merged ``RunningStats`` per key: that is what
``group/maps.py`` uses for the mean/SD and the parametric t/F maps.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Iterable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from bids_app.errors import MninormError
from bids_app.group.collect import Grid, read_map, split_blocks

log = logging.getLogger(__name__)

# One participant: the paths of their maps of one kind (several T1w: sessions, runs), averaged
Participant = tuple[Path, ...]


class RunningStats:
    """Voxel-wise count, mean and sum of squared deviations (M2), updated one image at a time."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: np.ndarray | None = None
        self.m2: np.ndarray | None = None

    def add(self, values: np.ndarray) -> None:
        """Welford's update. ``values`` (float64) is consumed: it is overwritten."""
        self.count += 1
        if self.mean is None:
            self.mean, self.m2 = values, np.zeros_like(values)
            return
        delta = values - self.mean
        self.mean += delta / self.count
        values -= self.mean  # x - new mean
        values *= delta
        self.m2 += values

    def absorb(self, other: RunningStats) -> None:
        """Chan et al.'s combination of two partial results; ``other`` is consumed."""
        if other.count == 0:
            return
        if self.count == 0:
            self.count, self.mean, self.m2 = other.count, other.mean, other.m2
            return
        total = self.count + other.count
        delta = other.mean - self.mean
        self.mean += delta * (other.count / total)
        delta *= delta
        delta *= self.count * other.count / total
        self.m2 += other.m2
        self.m2 += delta
        self.count = total
        other.mean = other.m2 = None

    def sd(self) -> np.ndarray | None:
        """Sample standard deviation (n - 1); None for fewer than two images."""
        if self.count < 2:
            return None
        return np.sqrt(np.maximum(self.m2, 0) / (self.count - 1))


def participant_values(paths: Participant, grid: Grid) -> np.ndarray:
    """The mean of one participant's maps (float64), each checked against ``grid``."""
    total = None
    for path in paths:
        data, problem = read_map(path, grid)
        if problem:
            raise MninormError(
                f"{problem}; run the group level again once the participant level has finished"
            )
        total = data.astype(np.float64) if total is None else total + data
    total /= len(paths)
    return total


def block_stats(block: list[Participant], grid: Grid) -> RunningStats:
    stats = RunningStats()
    for paths in block:
        stats.add(participant_values(paths, grid))
    return stats


def accumulate(
    participants: list[Participant], grid: Grid, workers: int = 1, client=None
) -> RunningStats:
    """Count, mean and M2 of the participants' maps; ``workers`` local processes, or the Dask
    ``client``'s cluster (one task per block, as many blocks as it has worker threads)."""
    if client is not None:
        workers = max(1, sum(client.nthreads().values()))
    blocks = split_blocks(participants, workers)
    if client is not None:
        futures = [client.submit(block_stats, block, grid, pure=False) for block in blocks]
        return _merge(_results(futures))
    if len(blocks) == 1:
        return block_stats(blocks[0], grid)
    with ProcessPoolExecutor(len(blocks), mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(block_stats, block, grid) for block in blocks]
        return _merge(_results(futures))


def _results(futures: list):
    """Each future's result in order, the future dropped first: a merged partial result is not
    kept alive by its future."""
    futures.reverse()
    while futures:
        yield futures.pop().result()


def _merge(partials) -> RunningStats:
    """In block order, each partial result dropped once merged."""
    total = RunningStats()
    for partial in partials:
        total.absorb(partial)
    return total


# ---- several keys at once ------------------------------------------------------------------------

# One item -> its (key, float64 values) pairs; module-level (or a functools.partial of one) so it
# can be pickled to a worker process
Step = Callable[[object], Iterable[tuple[Hashable, np.ndarray]]]


def keyed_block_stats(block: list, step: Step, new: Callable = RunningStats) -> dict:
    stats: dict = {}
    for item in block:
        for key, values in step(item):
            stats.setdefault(key, new()).add(values)
    return stats


def accumulate_keyed(
    items: list, step: Step, workers: int = 1, client=None, new: Callable = RunningStats
) -> dict:
    """key -> ``RunningStats`` (or another accumulator ``new()`` with ``add`` and ``absorb``,
    e.g. ``GlmSums``) of every values ``step`` gave for that key, over ``items`` split in
    ``workers`` blocks run by local processes (or one task per worker thread of the Dask
    ``client``) and merged in block order. Keys appear in the order they were first met."""
    if client is not None:
        workers = max(1, sum(client.nthreads().values()))
    blocks = split_blocks(items, workers)
    if client is not None:
        futures = [
            client.submit(keyed_block_stats, block, step, new, pure=False) for block in blocks
        ]
        return _merge_keyed(_results(futures), new)
    if len(blocks) <= 1:
        return keyed_block_stats(blocks[0] if blocks else [], step, new)
    with ProcessPoolExecutor(len(blocks), mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(keyed_block_stats, block, step, new) for block in blocks]
        return _merge_keyed(_results(futures), new)


def _merge_keyed(partials, new: Callable = RunningStats) -> dict:
    total: dict = {}
    for partial in partials:
        for key, stats in partial.items():
            total.setdefault(key, new()).absorb(stats)
    return total


# ---- the general linear model's sufficient statistics ------------------------------------------


class GlmSums:
    """What ordinary least squares needs of the data, added one participant at a time: X^T Y
    (terms x voxels), the sum of y^2 per voxel and the count, in float64. With X^T X (from the
    design matrix, known before any map is read) they give the coefficients and the residual sum
    of squares (``inference.fit_glm_sums``), so memory is one partial result, whatever the
    cohort's size. ``add`` takes (the participant's design row, their values)."""

    def __init__(self) -> None:
        self.count = 0
        self.xty: np.ndarray | None = None
        self.yy: np.ndarray | None = None

    def add(self, row: tuple) -> None:
        x, y = row
        y = np.asarray(y, np.float64)
        if self.xty is None:
            self.xty = np.zeros((len(x), y.size))
            self.yy = np.zeros(y.size)
        for term, value in enumerate(x):
            self.xty[term] += float(value) * y
        self.yy += y * y
        self.count += 1

    def absorb(self, other: GlmSums) -> None:
        """``other``'s sums added to these; ``other`` is consumed."""
        if other.count == 0:
            return
        if self.count == 0:
            self.count, self.xty, self.yy = other.count, other.xty, other.yy
        else:
            self.count += other.count
            self.xty += other.xty
            self.yy += other.yy
        other.xty = other.yy = None
