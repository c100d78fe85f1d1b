"""The group report's section on the model (group/model.py, inference.py): what was tested, how it
was corrected, the results table and the FWE-thresholded t maps over the study's mean T1w."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bids_app.group.clusters import COLUMNS
from bids_app.group.inference import FWE_ALPHA, fwe_threshold
from bids_app.report import _e

T_LIMIT = 6.0  # colour scale of the thresholded t maps
MAX_PEAK_SLICES = 5  # the figures cut through the peaks of at most this many clusters
_CORRECTIONS = {"voxel": ("model_logp_fwe", "voxel-wise (max-t)"), "tfce": ("model_logp_tfce_fwe",
                "TFCE")}  # fmt: skip


def model_section(output_dir: Path, section, background) -> str:
    """``background``: (mean T1w, mask, cuts, zooms) on the RAS-reoriented grid, or None."""
    inference = section.inference
    model, spec = inference.model, inference.spec
    parts = ["<h3>Model and family-wise error corrected statistics</h3>"]
    if not model.usable:
        parts.append(f'<p class="error">No model: {_e(model.problem)}</p>')
        return "\n".join(parts)
    record = model.record()
    counts = ", ".join(f"{k}: {v}" for k, v in model.counts.items())
    left_out = "; ".join(f"{k} ({v})" for k, v in record["LeftOut"].items()) or "none"
    permutations = (
        f"{spec.n_permutations} permutations (seed {spec.seed}; "
        f"{'voxel-wise max-t and TFCE' if spec.tfce else 'voxel-wise max-t'})"
        if spec.n_permutations and model.statistic == "t"
        else "none (parametric, uncorrected maps only)"
    )
    parts.append(
        f"<p><code>{_e(record['Formula'])}</code>; tested: {_e(model.contrast)} "
        f"({model.statistic} test); {_e(counts)} participant(s); left out: {_e(left_out)}. "
        f"Smoothing {spec.smoothing_fwhm:g} mm FWHM inside the brain; permutations: "
        f"{_e(permutations)}.</p>"
    )
    for result in inference.jacobians:
        parts.append(f"<h4>{_e(result.jacobian)} log-Jacobian</h4>")
        table = result.paths.get("model_clusters")
        if table is None:
            continue
        link = _e(table.relative_to(output_dir).as_posix())
        if not result.clusters:
            parts.append(
                f'<p>No voxel survives FWE p &lt; {FWE_ALPHA:g} (<a href="{link}">table</a>).</p>'
            )
            continue
        parts.append(
            f'<p>Clusters with FWE p &lt; {FWE_ALPHA:g} (<a href="{link}">{_e(table.name)}</a>):'
            "</p>" + _table(result.clusters)
        )
        if background is not None:
            parts += _figures(result, background)
    return "\n".join(parts)


def _table(clusters) -> str:
    header = "".join(f'<th title="{_e(d)}">{_e(c)}</th>' for c, d in COLUMNS.items())
    rows = "".join(
        "<tr>" + "".join(f"<td>{_e(str(v))}</td>" for v in c.row().values()) + "</tr>"
        for c in clusters
    )
    return f'<table class="sortable"><thead><tr>{header}</tr></thead><tbody>{rows}</tbody></table>'


def _figures(result, background) -> list[str]:
    import nibabel as nib

    from bids_app.group.collect import canonical_array
    from bids_app.group.pictures import mosaic_png
    from bids_app.group.report import _figure

    mean, mask, cuts, zooms = background

    def volume(path: Path) -> np.ndarray:
        img = nib.load(str(path))
        return canonical_array(np.asarray(img.dataobj, dtype=np.float32), img.affine)

    t = volume(result.paths["model_t"])
    parts = []
    for correction, (kind, words) in _CORRECTIONS.items():
        if kind not in result.paths or not any(c.correction == correction for c in result.clusters):
            continue
        shown = np.where(volume(result.paths[kind]) > fwe_threshold(), t, 0.0)
        picture = mosaic_png(mean, mask, peak_cuts(shown) or cuts, zooms, shown, T_LIMIT, 1e-6)
        parts.append(
            _figure(
                picture,
                f"Sections through the peaks of the largest clusters: t map ({result.jacobian} "
                f"log-Jacobian) where the {words} FWE-corrected p < "
                f"{FWE_ALPHA:g}, over the study's mean T1w; red: more tissue (or a positive "
                f"slope), blue: less; colours saturate at |t| = {T_LIMIT:g}.",
            )
        )
    return parts


def peak_cuts(shown: np.ndarray, most: int = MAX_PEAK_SLICES):
    """Sections through the peaks (largest |t|) of the ``most`` largest clusters of non-zero
    voxels of a RAS-ordered volume; None when there is none."""
    from scipy import ndimage

    from bids_app.figures import Cuts

    labels, count = ndimage.label(shown != 0, ndimage.generate_binary_structure(3, 3))
    if count == 0:
        return None
    sizes = np.bincount(labels.ravel())[1:]
    peaks = []
    for index in np.argsort(sizes)[::-1][:most] + 1:
        values = np.where(labels == index, np.abs(shown), -1.0)
        peaks.append(np.unravel_index(int(np.argmax(values)), shown.shape))
    return Cuts(*(tuple(sorted({int(p[axis]) for p in peaks})) for axis in range(3)))
