"""Threshold-free cluster enhancement and its permutation test, fast enough to be the default.

TFCE (Smith & Nichols 2009) of a map t at a voxel v is the sum over heights h = dh, 2 dh, ... of
``extent(h, v) ** E * h ** H * dh``, where extent(h, v) is the number of voxels of the
6-connected component of {t >= h} that holds v. Positive and negative effects are enhanced apart
(the negative side is the TFCE of -t, given a minus sign), as nilearn does.

Why it is fast: the heights are a fixed step ``dh`` in t units (not 100 steps per map), so a
permuted map with a null maximum near 4-5 needs 40-50 labellings per side, not 100; each height's
labelling runs on the box that holds the voxels above that height (found from three 1-D maximum
profiles, so high heights label a few voxels, not the whole brain); the extents come from one
``np.bincount`` of the labels, indexed back. The permutations' t maps are matrix products in
batches, and the batches run in ``n_jobs`` processes.

Validity: the TFCE here is one fixed function of a t map (the same heights for the observed map
and every permuted one), so the max-TFCE permutation test controls the family-wise error exactly
whatever the step; the step only changes how closely the sum follows the integral.

Permutations (Freedman-Lane, as nilearn's ``permuted_ols``): the data's residuals after the
nuisance columns are permuted (rows), or sign-flipped when the tested column is constant (a test
of the mean), and refitted on the full design; the unpermuted data give the observed t exactly
(the same t as ``inference.fit_glm``). Every permutation is drawn in the parent from the seed, so
the result is the same whatever ``n_jobs`` (to the last bit of rounding).
p = (1 + #permutations with max >= observed) / (1 + count), as nilearn's.

Several tested columns (an F test, e.g. three or more groups): the same permutations, the full
model refitted, F per voxel (the extra sum of squares of the tested columns over the residual
variance, as ``inference.fit_glm``); one-sided (F >= 0), so max-F and the TFCE of one sign.
TFCE of F runs on sqrt(F): with one tested column sqrt(F) is |t|, so the t maps' step and H = 2
keep their meaning (a height h weighs as t^2, not t^4), and a map whose peak F is 50 needs ~70
heights of 0.1, not 500. Any fixed function would keep the test exact; this one keeps it fast.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

E = 0.5  # extent exponent (Smith & Nichols 2009; nilearn, FSL)
H = 2.0  # height exponent
STEP = 0.1  # dh in t units (Smith & Nichols' choice for t and z maps)
_BATCH = 16  # permutations per matrix product
_SIX = np.array(  # 6-connectivity (faces), as nilearn and FSL
    [[[0, 0, 0], [0, 1, 0], [0, 0, 0]], [[0, 1, 0], [1, 1, 1], [0, 1, 0]],
     [[0, 0, 0], [0, 1, 0], [0, 0, 0]]], bool,
)  # fmt: skip


# ---- TFCE of one map --------------------------------------------------------------------------


def tfce_one_side(volume: np.ndarray, step: float = STEP, e: float = E, h: float = H) -> np.ndarray:
    """The TFCE of the positive part of ``volume`` (3-D), heights step, 2 step, ... <= its max."""
    from scipy.ndimage import label

    out = np.zeros(volume.shape, np.float64)
    top = float(volume.max(initial=0.0))
    if top < step:
        return out
    profiles = [volume.max(axis=tuple(a for a in range(3) if a != axis)) for axis in range(3)]
    for k in range(1, int(np.floor(top / step + 1e-9)) + 1):
        height = k * step
        box = []
        for profile in profiles:
            where = np.flatnonzero(profile >= height)
            box.append(slice(where[0], where[-1] + 1))
        box = tuple(box)
        labels, count = label(volume[box] >= height, _SIX)
        flat = labels.ravel()
        inside = np.flatnonzero(flat)  # the voxels above the height, in the box
        found = flat[inside]
        sizes = np.bincount(found, minlength=count + 1).astype(np.float64)
        gain = sizes**e * (height**h * step)
        part = out[box]  # a view: adding to it adds to ``out``
        shape = part.shape
        strides = np.unravel_index(inside, shape)
        part[strides] += gain[found]
    return out


def tfce(volume: np.ndarray, step: float = STEP, two_sided: bool = True) -> np.ndarray:
    """Signed TFCE of a t map: positive effects enhanced as positive, negative as negative."""
    volume = np.asarray(volume, np.float64)
    enhanced = tfce_one_side(volume, step)
    if two_sided:
        enhanced -= tfce_one_side(-volume, step)
    return enhanced


# ---- the permutation test ---------------------------------------------------------------------


@dataclass(frozen=True)
class Null:
    """What the permutations give: per permutation, the maxima over the mask."""

    t: np.ndarray  # the observed t, or F with several tested columns (vector over the mask)
    tfce: np.ndarray | None  # the observed TFCE (signed for t; of sqrt(F) for F)
    max_t: np.ndarray  # per permutation: max |t| (or max F)
    max_tfce: np.ndarray | None  # per permutation: max |TFCE|
    cpu_seconds: float = 0.0  # the permutations' processor time, summed over the processes

    def logp_fwe(self) -> np.ndarray:
        return _logp_fwe(np.abs(self.t), self.max_t)

    def logp_tfce_fwe(self) -> np.ndarray | None:
        return None if self.tfce is None else _logp_fwe(np.abs(self.tfce), self.max_tfce)


def _logp_fwe(observed: np.ndarray, maxima: np.ndarray) -> np.ndarray:
    ordered = np.sort(maxima)
    at_least = len(ordered) - np.searchsorted(ordered, observed, side="left")
    return -np.log10((1 + at_least) / (1 + len(ordered)))


@dataclass(frozen=True)
class _Problem:
    """The arrays every worker needs (the residualised data and the design's pieces)."""

    residuals: np.ndarray  # participants x voxels: the data after the nuisance columns
    tested: np.ndarray  # participants x q: an orthonormal basis of the tested columns after the
    # nuisance columns (q = 1: the column itself, normalised, so t keeps its sign)
    nuisance: np.ndarray  # participants x k: an orthonormal basis of the nuisance columns
    df: int
    mask: np.ndarray | None  # the box's mask (3-D) for TFCE, or None (voxel-wise only)
    step: float


def permutation_test(
    data: np.ndarray,
    matrix: np.ndarray,
    column: int | tuple[int, ...],
    n_permutations: int,
    seed: int,
    mask: np.ndarray | None = None,
    step: float = STEP,
    n_jobs: int = 1,
) -> Null:
    """Permutation test of ``matrix[:, column]`` on ``data`` (participants x voxels): two-sided
    t for one column, F for several (a tuple of two or more). ``mask``: the 3-D mask whose voxels
    (C order) are ``data``'s columns, for TFCE; None: voxel-wise only."""
    columns = (column,) if isinstance(column, (int, np.integer)) else tuple(column)
    problem = _prepare(np.asarray(data), np.asarray(matrix, np.float64), columns, mask, step)
    observed = _statistic_maps(problem, _identity(len(matrix)))[0]
    observed_tfce = None if mask is None else _tfce_vector(problem, observed)
    plans = _draw(problem, n_permutations, seed)
    # chunks of whole batches: every permutation is computed in the same batch whatever n_jobs,
    # so the result does not depend on it (but for the BLAS's last-bit rounding)
    batches = np.arange(0, n_permutations, _BATCH)
    chunks = [
        np.arange(part[0], min(part[-1] + _BATCH, n_permutations))
        for part in np.array_split(batches, max(1, min(n_jobs, len(batches))))
        if len(part)
    ]
    if len(chunks) > 1:
        from joblib import Parallel, delayed

        parts = Parallel(n_jobs=len(chunks))(
            delayed(_maxima)(problem, plans[chunk]) for chunk in chunks
        )
    else:
        parts = [_maxima(problem, plans)]
    max_t = np.concatenate([p[0] for p in parts])
    max_tfce = None if mask is None else np.concatenate([p[1] for p in parts])
    return Null(observed, observed_tfce, max_t, max_tfce, sum(p[2] for p in parts))


def _prepare(data, matrix, columns, mask, step) -> _Problem:
    n = len(matrix)
    others = [i for i in range(matrix.shape[1]) if i not in columns]
    nuisance = matrix[:, others]
    if nuisance.shape[1]:
        u, s, _ = np.linalg.svd(nuisance, full_matrices=False)
        basis = u[:, s > s.max() * n * np.finfo(float).eps]
    else:
        basis = np.zeros((n, 0))
    tested = matrix[:, list(columns)] - basis @ (basis.T @ matrix[:, list(columns)])
    orthonormal, triangle = np.linalg.qr(tested)
    orthonormal *= np.sign(np.diag(triangle))  # the first column keeps its direction (t's sign)
    data = np.asarray(data, np.float64)
    residuals = data - basis @ (basis.T @ data)
    df = n - basis.shape[1] - len(columns)
    return _Problem(np.ascontiguousarray(residuals), orthonormal, basis, df, mask, step)


def _identity(n: int) -> np.ndarray:
    """One plan: row i of the permuted data is row ``plan[0, i]`` times ``plan[1, i]``."""
    return np.stack([np.arange(n), np.ones(n)])[None]


def _draw(problem: _Problem, count: int, seed: int) -> np.ndarray:
    """``count`` plans (permutations, or sign flips when the tested column is constant)."""
    rng = np.random.default_rng(seed)
    n = len(problem.tested)
    constant_tested = problem.nuisance.shape[1] == 0 and np.all(np.ptp(problem.tested, 0) == 0)
    plans = np.empty((count, 2, n))
    for i in range(count):
        if constant_tested:
            plans[i] = np.stack([np.arange(n), rng.choice([-1.0, 1.0], n)])
        else:
            plans[i] = np.stack([rng.permutation(n), np.ones(n)])
    return plans


def _statistic_maps(problem: _Problem, plans: np.ndarray) -> np.ndarray:
    """t of the tested column, or F of the tested columns, for each plan (plans x voxels): the
    permuted residuals refitted on the full design, as matrix products (one row of weights per
    plan and design column). The design's columns are orthonormal (tested, then nuisance), so
    each product is a projection and the sums of squares are sums of squared products."""
    n, k = problem.nuisance.shape
    q = problem.tested.shape[1]
    columns = np.column_stack([problem.tested, problem.nuisance])  # n x (q + k)
    weights = np.zeros((len(plans), q + k, n))
    for i, (order, signs) in enumerate(plans):
        # (P y)' c = y' (P' c): the weights put c[i] * sign[i] at row order[i]
        weights[i][:, order.astype(int)] = (columns * signs[:, None]).T
    products = (weights.reshape(-1, n) @ problem.residuals).reshape(len(plans), q + k, -1)
    total = np.einsum("ij,ij->j", problem.residuals, problem.residuals)
    explained = (products[:, :q] ** 2).sum(axis=1)  # the tested columns' sum of squares
    variance = np.maximum(total - explained - (products[:, q:] ** 2).sum(axis=1), 0) / problem.df
    if q == 1:  # t = beta / se, beta = c'y / c'c, se^2 = variance / c'c, |c| = 1
        scale = np.sqrt(variance)
        return np.divide(products[:, 0], scale, out=np.zeros_like(scale), where=scale > 0)
    return np.divide(explained / q, variance, out=np.zeros_like(variance), where=variance > 0)


def _tfce_vector(problem: _Problem, statistic: np.ndarray) -> np.ndarray:
    """Signed TFCE of a t map, or TFCE of sqrt(F) (one-sided; the module's docstring says why)."""
    volume = np.zeros(problem.mask.shape)
    if problem.tested.shape[1] == 1:
        volume[problem.mask] = statistic
        return tfce(volume, problem.step)[problem.mask]
    volume[problem.mask] = np.sqrt(np.maximum(statistic, 0))
    return tfce(volume, problem.step, two_sided=False)[problem.mask]


def _maxima(problem: _Problem, plans: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, float]:
    started = time.process_time()
    max_t = np.empty(len(plans))
    max_tfce = None if problem.mask is None else np.empty(len(plans))
    for start in range(0, len(plans), _BATCH):
        maps = _statistic_maps(problem, plans[start : start + _BATCH])
        max_t[start : start + len(maps)] = np.abs(maps).max(axis=1)
        if max_tfce is not None:
            for i, t in enumerate(maps):
                max_tfce[start + i] = np.abs(_tfce_vector(problem, t)).max()
    return max_t, max_tfce, time.process_time() - started
