"""Group level, step 4b: the model's maps, smoothed, with permutation inference.

For each log-Jacobian (total, nonlinear): every participant's map (the mean of their T1w in the
space) is smoothed inside the analysis mask, the general linear model of ``model.py`` is fitted
voxel by voxel, and the tested effect is assessed three ways: parametric (uncorrected), and
family-wise error corrected by permutations (``tfce.py``: Freedman-Lane as nilearn's
``permuted_ols``, max-type over the mask), voxel-wise on t (or F, three or more groups) and with
threshold-free cluster enhancement (TFCE, on by default; of sqrt(F) for F).

Smoothing inside the brain: the data times the mask and the mask are smoothed alike and divided,
so voxels near the edge are averages of brain voxels only (no dilution by the zeros outside).
The analysis mask is the voxels that at least half of the model's participants' brain masks cover.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bids_app import __version__
from bids_app.errors import MninormError
from bids_app.group.clusters import Atlas, Cluster, find_clusters, write_clusters
from bids_app.group.model import Model, ModelSpec
from bids_app.group.tfce import STEP as TFCE_STEP
from bids_app.group.tfce import E as TFCE_E
from bids_app.group.tfce import H as TFCE_H
from bids_app.outputs import derivatives as drv

log = logging.getLogger(__name__)

FWE_ALPHA = 0.05
MASK_SHARE = 0.5  # a voxel is analysed where this share of the participants' masks cover it
_FWHM_PER_SIGMA = math.sqrt(8 * math.log(2))


@dataclass(frozen=True)
class Fit:
    """The model fitted at every voxel (vectors over the analysis mask)."""

    statistic: np.ndarray  # t (one tested column) or F
    effect: np.ndarray | None  # the tested coefficient (t models only)
    logp: np.ndarray  # -log10 of the parametric p value (two-sided for t)
    df: tuple[int, ...]


@dataclass(frozen=True)
class Permutations:
    logp_fwe: np.ndarray  # voxel-wise max-t (or max-F) FWE, -log10 p
    tfce: np.ndarray | None = None
    logp_tfce_fwe: np.ndarray | None = None
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # summed over the processes


@dataclass(frozen=True)
class JacobianInference:
    jacobian: str
    paths: dict = field(compare=False, hash=False)  # output kind -> Path
    clusters: tuple[Cluster, ...] = ()
    peak: float = 0.0  # the largest |t| or F
    seconds: float = 0.0  # the permutations' wall time


@dataclass(frozen=True)
class SpaceInference:
    """What the model wrote for one space (``model.problem`` set: nothing)."""

    model: Model
    spec: ModelSpec
    written: tuple[Path, ...] = ()
    jacobians: tuple[JacobianInference, ...] = ()


# ---- the arithmetic (arrays only: the benchmark and tests use these directly) -----------------


def sigma_voxels(fwhm_mm: float, zooms) -> tuple[float, ...]:
    return tuple(fwhm_mm / _FWHM_PER_SIGMA / float(z) for z in zooms)


def mask_weight(mask: np.ndarray, fwhm_mm: float, zooms) -> np.ndarray | None:
    """The smoothed mask that ``smooth_in_mask`` divides by: the same for every participant of
    a space, so computed once and passed in (None without smoothing)."""
    from scipy.ndimage import gaussian_filter

    if fwhm_mm <= 0:
        return None
    inside = np.asarray(mask, bool).astype(np.float32)
    return gaussian_filter(inside, sigma_voxels(fwhm_mm, zooms), mode="constant")


def smooth_in_mask(
    volume: np.ndarray, mask: np.ndarray, fwhm_mm: float, zooms, weight: np.ndarray | None = None
) -> np.ndarray:
    """``volume`` smoothed with a Gaussian of ``fwhm_mm`` using only the voxels in ``mask``
    (normalised by the smoothed mask, ``weight``: ``mask_weight``'s, computed here if not given);
    0 outside ``mask``."""
    from scipy.ndimage import gaussian_filter

    inside = np.asarray(mask, bool)
    if fwhm_mm <= 0:
        return np.where(inside, volume, 0).astype(np.float32)
    sigma = sigma_voxels(fwhm_mm, zooms)
    if weight is None:
        weight = mask_weight(inside, fwhm_mm, zooms)
    smoothed = gaussian_filter(
        np.where(inside, volume, 0).astype(np.float32), sigma, mode="constant"
    )
    return np.divide(smoothed, weight, out=np.zeros_like(smoothed), where=inside & (weight > 0))


def fit_glm(data: np.ndarray, matrix: np.ndarray, tested: tuple[int, ...]) -> Fit:
    """Ordinary least squares of ``data`` (participants x voxels) on ``matrix``; a t test of the
    tested column (one) or an F test of the tested columns (several)."""
    data = np.asarray(data, np.float64)
    n, p = matrix.shape
    df = n - p
    inverse = np.linalg.pinv(matrix.T @ matrix)
    beta = inverse @ matrix.T @ data
    residuals = data - matrix @ beta
    sigma2 = np.einsum("ij,ij->j", residuals, residuals) / df
    return _tests(beta, sigma2, inverse, tested, df)


# A residual sum of squares below this share of the sum of y^2 is rounding: no variance
_RSS_ROUNDING = 1e-12


def fit_glm_sums(sums, matrix: np.ndarray, tested: tuple[int, ...]) -> Fit:
    """``fit_glm`` from ``accumulate.GlmSums`` of the data (X^T Y and the sum of y^2, added
    participant by participant in ``matrix``'s row order): beta = (X^T X)^-1 X^T Y, and the
    residual sum of squares = sum y^2 - sum over terms of beta * X^T Y."""
    n, p = matrix.shape
    if sums.count != n:
        raise ValueError(f"{sums.count} participants' maps summed for a model of {n}")
    df = n - p
    inverse = np.linalg.pinv(matrix.T @ matrix)
    beta = inverse @ sums.xty
    rss = sums.yy - np.einsum("iv,iv->v", beta, sums.xty)
    rss[rss <= _RSS_ROUNDING * sums.yy] = 0.0
    return _tests(beta, rss / df, inverse, tested, df)


def _tests(beta, sigma2, inverse, tested: tuple[int, ...], df: int) -> Fit:
    """The t test of one tested coefficient, or the F test of several."""
    from scipy import stats

    positive = sigma2 > 0
    if len(tested) == 1:
        column = tested[0]
        effect = beta[column]
        se = np.sqrt(sigma2 * inverse[column, column])
        t = np.divide(effect, se, out=np.zeros_like(effect), where=positive)
        logp = -(math.log(2) + stats.t.logsf(np.abs(t), df)) / math.log(10)
        return Fit(t, effect, logp, (df,))
    picked = beta[list(tested)]
    middle = np.linalg.inv(inverse[np.ix_(tested, tested)])
    q = len(tested)
    numerator = np.einsum("iv,ij,jv->v", picked, middle, picked) / q
    f = np.divide(numerator, sigma2, out=np.zeros_like(numerator), where=positive)
    logp = -stats.f.logsf(f, q, df) / math.log(10)
    return Fit(f, None, logp, (q, df))


def permute(
    data: np.ndarray, matrix: np.ndarray, column: int | tuple[int, ...], mask: np.ndarray, affine,
    spec: ModelSpec,
) -> Permutations:  # fmt: skip
    """Permutation FWE p values of one tested column (two-sided t) or several (F;
    ``tfce.permutation_test``: Freedman-Lane, max-statistic, TFCE on the mask's bounding box when
    ``spec.tfce``)."""
    from bids_app.group.tfce import permutation_test

    require_stats_extra()
    box = crop_to_mask(mask, affine)[0] if spec.tfce else None  # fewer voxels to label
    started = time.monotonic()
    null = permutation_test(data, matrix, column, spec.n_permutations, spec.seed, mask=box,
                            n_jobs=spec.n_jobs)  # fmt: skip
    seconds = time.monotonic() - started
    return Permutations(
        null.logp_fwe(), null.tfce, null.logp_tfce_fwe(), seconds, null.cpu_seconds
    )


def crop_to_mask(mask: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``mask`` cut to its bounding box (plus one voxel), and that box's affine. The in-mask
    voxels keep their order (C order), so vectors over the mask stay valid."""
    found = np.argwhere(mask)
    low = np.maximum(found.min(0) - 1, 0)
    high = np.minimum(found.max(0) + 2, mask.shape)
    box = tuple(slice(a, b) for a, b in zip(low, high, strict=True))
    shifted = affine.copy()
    shifted[:3, 3] = affine[:3, :3] @ low + affine[:3, 3]
    return mask[box], shifted


def require_stats_extra() -> None:
    """joblib (the 'stats' extra), which spreads the permutations over processes (``tfce.py``),
    or an error naming the extra to install."""
    try:
        import joblib  # noqa: F401
    except ImportError as err:
        raise MninormError(
            "--n-permutations needs joblib: pip install 'mninorm[stats]' (the container has "
            "it), or give --n-permutations 0 for the parametric maps only"
        ) from err


def fwe_threshold() -> float:
    return -math.log10(FWE_ALPHA)


# ---- the group level's files -----------------------------------------------------------------


def permuting(spec: ModelSpec) -> bool:
    """Whether the model's maps get permutation inference (which needs every participant's data
    at once); otherwise the fit streams over the participants (``fit_glm_sums``)."""
    return spec.n_permutations > 0


def write_space_inference(
    output_dir: Path, cohort, model: Model, spec: ModelSpec, atlas: Atlas | None, reading=None
) -> SpaceInference:
    """Every model map of one space, and its results table. Without permutations the maps are
    read in parallel as ``reading`` (``maps.Reading``) says, and never all held at once."""
    from bids_app.group.lesions import any_lesion, participant_lesions
    from bids_app.group.maps import JACOBIANS, _load, participant_mean

    grid = cohort.space.grid
    rows = {}
    for row in sorted(cohort.included, key=lambda r: r.result.sort_key()):
        rows.setdefault(row.result.subject, []).append(row)
    rows = {s: tuple(rows[s]) for s in model.subjects}
    coverage = sum(
        participant_mean(r, lambda row: _load(row, "mask", grid) > 0) for r in rows.values()
    )
    mask = coverage >= MASK_SHARE * len(rows)
    lesions = participant_lesions(rows, grid)
    if lesions:  # the model needs every participant at a voxel (group/lesions.py)
        mask &= ~any_lesion(lesions, grid.shape)
    written, results = [], []
    jacobians = spec.jacobians or tuple(JACOBIANS)
    weight = mask_weight(mask, spec.smoothing_fwhm, grid.zooms)
    fits = {}
    if not permuting(spec):
        fits = streamed_fits(model, spec, rows, mask, weight, grid, jacobians, reading)
    for jacobian in jacobians:

        def read(row, kind=f"logjac_{jacobian}"):
            return _load(row, kind, grid)

        data = None
        if jacobian not in fits:
            data = np.stack([
                smooth_in_mask(participant_mean(r, read), mask, spec.smoothing_fwhm,
                               grid.zooms, weight)[mask]
                for r in rows.values()
            ])  # fmt: skip
        paths, result = _write_jacobian(output_dir, cohort, model, spec, atlas, jacobian, data,
                                        mask, rows, fits.get(jacobian))  # fmt: skip
        written += paths
        results.append(result)
    return SpaceInference(model, spec, tuple(written), tuple(results))


@dataclass(frozen=True)
class _ModelRow:
    """What a worker needs of one participant of the model (picklable, small)."""

    subject: str
    x: tuple[float, ...]  # their row of the design matrix
    paths: tuple[dict, ...]  # per included T1w: kind -> Path


def streamed_fits(model: Model, spec: ModelSpec, rows: dict, mask: np.ndarray, weight, grid,
                  jacobians, reading=None) -> dict[str, Fit]:  # fmt: skip
    """jacobian -> the model fitted from sums (``accumulate.GlmSums``) over the participants,
    each one's maps read, smoothed and added in a worker (``accumulate_keyed``)."""
    from functools import partial

    from bids_app.group.accumulate import GlmSums, accumulate_keyed
    from bids_app.group.maps import Reading

    reading = reading or Reading()
    items = [
        _ModelRow(subject, tuple(float(v) for v in model.matrix[i]),
                  tuple(dict(row.result.paths) for row in rows[subject]))
        for i, subject in enumerate(model.subjects)
    ]  # fmt: skip
    step = partial(participant_model_values, grid=grid, mask=mask, weight=weight,
                   fwhm=spec.smoothing_fwhm, jacobians=tuple(jacobians))  # fmt: skip
    workers = 1 if reading.client is not None else reading.workers_for(len(items))
    log.info("the model's fit streams over %d participants' maps (%s)", len(items),
             "on the Dask cluster" if reading.client is not None else f"{workers} process(es)")
    sums = accumulate_keyed(items, step, workers, reading.client, new=GlmSums)
    return {jacobian: fit_glm_sums(sums[jacobian], model.matrix, model.tested)
            for jacobian in jacobians}  # fmt: skip


def participant_model_values(item: _ModelRow, grid, mask, weight, fwhm: float, jacobians):
    """(jacobian, (design row, the participant's smoothed in-mask values)) for each Jacobian, each
    map the mean over the participant's included T1w, as the stacked data of the permutations."""
    from bids_app.group.maps import _load_at, participant_mean

    for jacobian in jacobians:

        def read(paths, kind=f"logjac_{jacobian}"):
            return _load_at(item.subject, paths[kind], grid)

        values = participant_mean(item.paths, read)
        yield jacobian, (item.x, smooth_in_mask(values, mask, fwhm, grid.zooms, weight)[mask])


def _write_jacobian(output_dir, cohort, model, spec, atlas, jacobian, data, mask, rows, fit=None):
    """The maps of one Jacobian, from ``data`` (participants x in-mask voxels), or from ``fit``
    when the data were streamed (no permutations)."""
    from bids_app.group.maps import _write

    grid, label, contrast = cohort.space.grid, cohort.space.label, _contrast_label(model.column)
    if fit is None:
        fit = fit_glm(data, model.matrix, model.tested)
    sidecar = _sidecar(output_dir, cohort, model, spec, jacobian, fit, rows)

    def volume(values):
        full = np.zeros(grid.shape, np.float32)
        full[mask] = values
        return full

    def write(kind, values, description, **more):
        path = drv.group_space_path(output_dir, kind, label, jacobian, contrast)
        _write(path, volume(values), {**sidecar, "Description": description, **more}, grid)
        paths[kind] = path

    paths = {}
    what = (
        f"the {jacobian} log-Jacobian maps (smoothed {spec.smoothing_fwhm:g} mm FWHM in the brain)"
    )
    if model.statistic == "F":
        write("model_F", fit.statistic, f"F statistic of {what}: {model.contrast}.",
              Statistic="F", MultipleComparisonCorrection="none")  # fmt: skip
    else:
        write("model_t", fit.statistic, f"t statistic of {what}: {model.contrast}.",
              Statistic="t", MultipleComparisonCorrection="none")  # fmt: skip
        write(
            "model_effect",
            fit.effect,
            f"Estimated effect in {what}: {model.contrast} "
            "(exp(value) is a ratio of local volumes).",
            Statistic="effect",
            Units="log(volume ratio)" + ("" if model.kind == "groups" else " per unit"),
        )
    write("model_logp", fit.logp, f"-log10 p, uncorrected, parametric ({model.statistic} "
          f"distribution{', two-sided' if model.statistic == 't' else ''}), of {what}.",
          Statistic="-log10 p", MultipleComparisonCorrection="none")  # fmt: skip
    permutations = None
    if permuting(spec):
        permutations = permute(data, model.matrix, model.tested, mask, grid.affine, spec)
        correction = {"PermutationSeconds": round(permutations.seconds, 1)}
        write(
            "model_logp_fwe",
            permutations.logp_fwe,
            "-log10 p, family-wise error corrected "
            f"over the analysis mask by the maximum {_max_words(model)} of {spec.n_permutations} "
            f"permutations ({_sides(model)}), of {what}.",
            Statistic="-log10 p",
            MultipleComparisonCorrection="FWE, voxel-wise (max-statistic)",
            **correction,
        )
        if permutations.tfce is not None:
            write(
                "model_tfce",
                permutations.tfce,
                f"Threshold-free cluster enhancement (E {TFCE_E:g}, H {TFCE_H:g}, height step "
                f"{TFCE_STEP:g}, 6-connectivity) of the {_tfce_input(model)} map of {what}.",
                Statistic="TFCE",
            )
            write(
                "model_logp_tfce_fwe",
                permutations.logp_tfce_fwe,
                "-log10 p, family-wise "
                "error corrected over the analysis mask by the maximum TFCE of "
                f"{spec.n_permutations} permutations ({_sides(model)}), of {what}.",
                Statistic="-log10 p",
                MultipleComparisonCorrection="FWE, TFCE",
                **correction,
            )
        log.info("%s: %s, %d permutations%s of %d participants x %d voxels: %.0f s", label,
                 jacobian, spec.n_permutations, " with TFCE" if spec.tfce else "", data.shape[0],
                 data.shape[1], permutations.seconds)  # fmt: skip
    clusters = ()
    if permutations is not None:
        maps = {"voxel": permutations.logp_fwe, "tfce": permutations.logp_tfce_fwe}
        effect = None if fit.effect is None else volume(fit.effect)  # F: no direction
        clusters = tuple(
            cluster
            for correction, logp in maps.items()
            if logp is not None
            for cluster in find_clusters(
                volume(logp) > fwe_threshold(),
                volume(fit.statistic),
                volume(logp),
                effect,
                grid.affine,
                atlas,
                correction,
            )  # fmt: skip
        )
        table = drv.group_space_path(output_dir, "model_clusters", label, jacobian, contrast)
        write_clusters(table, clusters, model.statistic, {
            **sidecar, "Description": f"Clusters of voxels with FWE-corrected p < {FWE_ALPHA} "
            f"(voxel-wise max-{model.statistic}"
            f"{' and TFCE' if permutations.tfce is not None else ''}) in {what}, 26-connected, "
            + ("positive and negative effects apart; peak = largest |t|."
               if model.statistic == "t" else "any direction (F test); peak = largest F."),
            "Atlas": atlas.record() if atlas else None,
        })  # fmt: skip
        paths["model_clusters"] = table
    result = JacobianInference(
        jacobian,
        paths,
        clusters,
        float(np.abs(fit.statistic).max(initial=0.0)),
        permutations.seconds if permutations else 0.0,
    )
    return list(paths.values()), result


def _max_words(model: Model) -> str:
    return "|t|" if model.statistic == "t" else "F"


def _sides(model: Model) -> str:
    return "two-sided" if model.statistic == "t" else "one-sided, F >= 0"


def _tfce_input(model: Model) -> str:
    return "t" if model.statistic == "t" else "sqrt(F)"


def _contrast_label(column: str) -> str:
    from bids_app.group.design import Design

    return Design(column).contrast


def _lesion_clause(rows) -> str:
    from bids_app.group.lesions import lesion_path

    with_lesion = sorted(
        {s for s, subject_rows in rows.items() for r in subject_rows
         if lesion_path(r.result.paths["t1w"]).is_file()}
    )  # fmt: skip
    if not with_lesion:
        return ""
    return (
        ", minus the voxels covered by the lesion mask (label-lesion_roi) of any of them "
        f"({', '.join(f'sub-{s}' for s in with_lesion)})"
    )


def _sidecar(output_dir, cohort, model, spec, jacobian, fit, rows) -> dict:
    from bids_app.group.maps import JACOBIANS

    return {
        "Space": str(cohort.space.space),
        "Jacobian": {"Kind": jacobian, "Meaning": JACOBIANS[jacobian]},
        "Model": model.record(),
        "DegreesOfFreedom": list(fit.df),
        "Smoothing": {
            "FWHMmm": spec.smoothing_fwhm,
            "Method": "Gaussian inside the analysis "
            "mask (data x mask and mask smoothed alike, then divided)",
        },  # fmt: skip
        "AnalysisMask": f"voxels covered by the brain masks of at least {MASK_SHARE:.0%} of the "
        "model's participants" + _lesion_clause(rows),
        "Permutations": {
            "Count": spec.n_permutations,
            "Seed": spec.seed,
            "TFCE": spec.tfce and permuting(spec),
            "Method": "Freedman-Lane (residuals of the nuisance columns permuted), "
            f"{_sides(model)}, max-{model.statistic} over the analysis mask (mninorm's "
            "bids_app/group/tfce.py)",
            **({"TFCEParameters": {"E": TFCE_E, "H": TFCE_H, "HeightStep": TFCE_STEP,
                                   "Connectivity": 6, "Map": _tfce_input(model)}}
               if spec.tfce and permuting(spec) else {}),
        },  # fmt: skip
        "OnePerParticipant": "each participant's map is the mean of their included T1w "
        "(sessions, runs) in this space",
        "Sources": [
            drv.derivative_uri(output_dir, row.result.paths[f"logjac_{jacobian}"])
            for subject_rows in rows.values()
            for row in subject_rows
        ],
        "GeneratedBy": {"Name": "mninorm", "Version": __version__, "Level": "group"},
    }
