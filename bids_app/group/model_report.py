"""The group page's part on the model (group/model.py, inference.py): what was tested, how it
was corrected, the results table and the FWE-thresholded t (or F) maps over the study's mean
T1w.
Plain data for ``reports/templates/group/_results.html.j2``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bids_app.group.clusters import columns_for
from bids_app.group.inference import FWE_ALPHA, fwe_threshold

T_LIMIT = 6.0  # colour scale of the thresholded t maps
F_LIMIT = 20.0  # and of F maps (one colour: F >= 0)
MAX_PEAK_SLICES = 5  # the figures cut through the peaks of at most this many clusters
_CORRECTIONS = {"voxel": ("model_logp_fwe", "voxel-wise (max-{statistic})"),
                "tfce": ("model_logp_tfce_fwe", "TFCE")}  # fmt: skip


@dataclass(frozen=True)
class JacobianResults:
    jacobian: str
    table: tuple[str, str] | None  # (href, name) of the clusters TSV; None: no permutations
    rows: list = field(default_factory=list)  # one dict per cluster (columns_for's keys)
    figures: list = field(default_factory=list)  # (PNG data URI, caption)


@dataclass(frozen=True)
class ResultsView:
    problem: str | None  # why there is no model
    formula: str = ""
    summary: str = ""
    alpha: float = FWE_ALPHA
    columns: list = field(default_factory=list)  # (name, description)
    jacobians: list = field(default_factory=list)  # JacobianResults


def results_view(output_dir: Path, section, background, png_uri) -> ResultsView:
    """``background``: (mean T1w, mask, cuts, zooms) on the RAS-reoriented grid, or None."""
    inference = section.inference
    model, spec = inference.model, inference.spec
    if not model.usable:
        return ResultsView(model.problem)
    record = model.record()
    counts = ", ".join(f"{k}: {v}" for k, v in model.counts.items())
    left_out = "; ".join(f"{k} ({v})" for k, v in record["LeftOut"].items()) or "none"
    permutations = (
        f"{spec.n_permutations} permutations (seed {spec.seed}; "
        f"voxel-wise max-{model.statistic}{' and TFCE' if spec.tfce else ''})"
        if spec.n_permutations
        else "none (parametric, uncorrected maps only)"
    )
    summary = (
        f"tested: {model.contrast} ({model.statistic} test); {counts} participant(s); left out: "
        f"{left_out}. Smoothing {spec.smoothing_fwhm:g} mm FWHM inside the brain; "
        f"permutations: {permutations}."
    )
    jacobians = []
    for result in inference.jacobians:
        table = result.paths.get("model_clusters")
        jacobians.append(
            JacobianResults(
                result.jacobian,
                None if table is None else (table.relative_to(output_dir).as_posix(), table.name),
                [c.row() for c in result.clusters],
                _figures(result, model.statistic, background, png_uri)
                if background is not None and result.clusters
                else [],
            )
        )
    return ResultsView(
        None, record["Formula"], summary, FWE_ALPHA, list(columns_for(model.statistic).items()),
        jacobians,
    )


def _figures(result, statistic, background, png_uri) -> list[tuple[str, str]]:
    import nibabel as nib

    from bids_app.group.collect import canonical_array
    from bids_app.group.pictures import mosaic_png

    mean, mask, cuts, zooms = background

    def volume(path: Path) -> np.ndarray:
        img = nib.load(str(path))
        return canonical_array(np.asarray(img.dataobj, dtype=np.float32), img.affine)

    values = volume(result.paths[f"model_{statistic}"])
    limit = T_LIMIT if statistic == "t" else F_LIMIT
    colours = (
        f"red: more tissue (or a positive slope), blue: less; colours saturate at |t| = {limit:g}"
        if statistic == "t"
        else f"F has no direction (red: any difference between the groups), saturating at "
        f"F = {limit:g}"
    )
    shown_figures = []
    for correction, (kind, words) in _CORRECTIONS.items():
        if kind not in result.paths or not any(c.correction == correction for c in result.clusters):
            continue
        shown = np.where(volume(result.paths[kind]) > fwe_threshold(), values, 0.0)
        picture = mosaic_png(mean, mask, peak_cuts(shown) or cuts, zooms, shown, limit, 1e-6)
        shown_figures.append((
            png_uri(picture),
            f"Sections through the peaks of the largest clusters: {statistic} map "
            f"({result.jacobian} log-Jacobian) where the {words.format(statistic=statistic)} "
            f"FWE-corrected p < {FWE_ALPHA:g}, over the study's mean T1w; {colours}.",
        ))  # fmt: skip
    return shown_figures


def peak_cuts(shown: np.ndarray, most: int = MAX_PEAK_SLICES):
    """Sections through the peaks (largest |t|) of the ``most`` largest clusters of non-zero
    voxels of a RAS-ordered volume; None when there is none."""
    from scipy import ndimage

    from bids_app.reports.figures import Cuts

    labels, count = ndimage.label(shown != 0, ndimage.generate_binary_structure(3, 3))
    if count == 0:
        return None
    sizes = np.bincount(labels.ravel())[1:]
    peaks = []
    for index in np.argsort(sizes)[::-1][:most] + 1:
        values = np.where(labels == index, np.abs(shown), -1.0)
        peaks.append(np.unravel_index(int(np.argmax(values)), shown.shape))
    return Cuts(*(tuple(sorted({int(p[axis]) for p in peaks})) for axis in range(3)))
