"""Group level, step 5: ``group.html``, one self-contained page for the whole cohort.

Per space: the QC table (click a column to sort it; status sorts fail first), a thumbnail of every
normalised T1w with the template brain's outline (all at the same slices, to spot the misfit in
one scroll), links to each participant's ``sub-<label>.html``, and figures of the study's mean T1w
and of the group statistics. This module gathers what the page shows; the layout is
``reports/templates/group.html.j2`` on the participant reports' page shell and style. The PNGs are
embedded (base64), so the page can be mailed or moved alone.
"""

from __future__ import annotations

import base64
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bids_app.group.cohort import CohortRow, SpaceCohort
from bids_app.group.collect import SpaceResults, canonical_array, canonical_zooms, take_preview
from bids_app.group.design import Design
from bids_app.group.maps import SpaceMaps
from bids_app.group.pictures import mosaic_png, thumbnail_png
from bids_app.outputs import derivatives as drv
from bids_app.reports.html import format_number, render
from bids_app.reports.participant import QC_ROWS

log = logging.getLogger(__name__)

MOSAIC_SLICES = 5
STAT_DISPLAY = {"t": (5.0, 2.0), "F": (20.0, 4.0)}  # colour-scale limit, display threshold
_STATUS_ORDER = {"fail": 0, "warn": 1, "pass": 2}  # sorting: the worst first
_TABLE_HEADERS = {  # metric -> short column header; formats are the participant report's
    "ncc": "NCC",
    "nmi": "NMI",
    "dice": "Dice",
    "folding_fraction": "folding",
    "logjac_median": "logjac median",
    "logjac_iqr": "logjac IQR",
    "affine_volume_ratio": "volume ratio",
    "brain_volume_ml": "brain ml",
}
_TABLE_METRICS = {metric: (header, QC_ROWS[metric][1]) for metric, header in _TABLE_HEADERS.items()}


@dataclass(frozen=True)
class SpaceSection:
    """Everything the page shows about one space."""

    cohort: SpaceCohort
    maps: SpaceMaps
    design: Design | None = field(default=None, compare=False)
    group_values: dict = field(default_factory=dict, compare=False)  # subject -> --group-by value
    inference: object | None = field(default=None, compare=False)  # inference.SpaceInference
    inference: object | None = field(default=None, compare=False)  # inference.SpaceInference

    @property
    def space(self) -> SpaceResults:
        return self.cohort.space


def write_group_report(output_dir: Path, sections: list[SpaceSection], messages: list[str]) -> Path:
    """``output_dir/group.html``."""
    page = render_html(output_dir, sections, messages)
    return drv.write_text(page, drv.group_report_path(output_dir))


# ---- the page: the data each template shows (reports/templates/group*) ------------------------
#
# group.html.j2 lays out, per space, a title, the grid and notes, then the space's ``parts`` in
# order: each a ``Part`` naming its partial in reports/templates/group/ and the data that partial
# reads as ``part.data``. To add a section (the statistics helper's results table, say):
#   1. write reports/templates/group/_results.html.j2 laying out ``part.data`` (macros for badges
#      and figures in _macros.html.j2, the ``number`` filter for values; a ``class="sortable"``
#      table with ``data-sort`` on its cells sorts by click; styles go in static/group.css);
#   2. gather its data here or in its own module: plain values (a dataclass or dict), no HTML;
#   3. append ``Part("group/_results.html.j2", data)`` to ``parts`` in ``_space_view`` where it
#      should appear (after the maps, for results).


@dataclass(frozen=True)
class Part:
    """One part of a space's section: its partial (under reports/templates/) and its data."""

    template: str
    data: object


@dataclass(frozen=True)
class SpaceView:
    anchor: str
    title: str
    grid: str | None
    notes: list[str]
    parts: list[Part]


def render_html(output_dir: Path, sections: list[SpaceSection], messages: list[str]) -> str:
    subjects = sorted({row.result.subject for s in sections for row in s.cohort.rows})
    return render(
        "group.html.j2",
        navigation=[(f"space-{s.space.label}", str(s.space.space)) for s in sections],
        alerts=messages,
        n_subjects=len(subjects),
        summary=[_summary_row(section) for section in sections],
        table_path=drv.group_table_path(output_dir, "qc").relative_to(output_dir).as_posix(),
        spaces=[_space_view(output_dir, section) for section in sections],
    )


def _summary_row(section: SpaceSection) -> dict:
    cohort = section.cohort
    statuses = [row.status for row in cohort.rows]
    counts = ", ".join(f"{statuses.count(s)} {s}" for s in (*_STATUS_ORDER, "n/a")
                       if statuses.count(s))  # fmt: skip
    return {
        "space": str(section.space.space),
        "t1w": len(cohort.rows),
        "statuses": counts,
        "outliers": sum(bool(row.outlier_reasons) for row in cohort.rows),
        "included": len(cohort.included),
        "participants": len(section.maps.participants),
    }


def _space_view(output_dir: Path, section: SpaceSection) -> SpaceView:
    space = section.space
    grid = space.grid
    notes = list(space.notes)
    if section.cohort.outlier_note:
        notes.append(f"{section.cohort.outlier_note}.")
    parts = [Part("group/_table.html.j2", _table(output_dir, section))]
    if space.cuts is not None:
        parts.append(Part("group/_gallery.html.j2", _gallery(output_dir, section)))
    parts.append(Part("group/_maps.html.j2", _maps(output_dir, section)))
    if section.inference is not None:
        from bids_app.group.model_report import results_view

        background = _background(output_dir, section) if space.cuts is not None else None
        view = results_view(output_dir, section, background, _png_uri)
        parts.append(Part("group/_results.html.j2", view))
    return SpaceView(
        anchor=f"space-{space.label}",
        title=str(space.space),
        grid=None if grid is None else (
            f"{grid.origin}, {'x'.join(map(str, grid.shape))} voxels of "
            f"{'x'.join(f'{z:g}' for z in grid.zooms)} mm"
        ),
        notes=notes,
        parts=parts,
    )  # fmt: skip


# ---- the table -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CohortTable:
    group_column: str | None  # the --group-by column, when there is one
    metric_headers: list[str]
    rows: list[dict]


def _table(output_dir: Path, section: SpaceSection) -> CohortTable:
    design = section.design
    return CohortTable(
        group_column=None if design is None else design.column,
        metric_headers=[label for label, _ in _TABLE_METRICS.values()],
        rows=[_table_row(output_dir, row, section) for row in section.cohort.rows],
    )


def _table_row(output_dir: Path, row: CohortRow, section: SpaceSection) -> dict:
    """One T1w: texts, and the sort keys of the cells whose text does not sort right."""
    result = row.result
    reasons = [r for r in (row.exclusion, row.status_reasons, *row.outlier_reasons) if r]
    return {
        "subject": result.subject,
        "report": _participant_page(output_dir, result.subject),
        "session": result.session,
        "run": result.run,
        "status": row.status,
        "status_order": _STATUS_ORDER.get(row.status, 3),
        "outlier": ("yes" if row.outlier_reasons else "no") if row.judged else "n/a",
        "robust_z": (format_number(row.robust_z_max, "{:.1f}"), _sort_number(-row.robust_z_max)),
        "included": row.included,
        "group_value": section.group_values.get(result.subject) or "",
        "metrics": [
            (format_number(row.metrics[metric], form), _sort_number(row.metrics[metric]))
            for metric, (_, form) in _TABLE_METRICS.items()
        ],
        "reasons": "; ".join(dict.fromkeys(reasons)),
        "thumbnail": _thumb_id(row) if section.space.cuts is not None else None,
    }


def _sort_number(value: float) -> str:
    return "" if value is None or not math.isfinite(value) else f"{value:.6g}"


def _participant_page(output_dir: Path, subject: str) -> str | None:
    """The participant's ``sub-<label>.html`` (relative to the group page), when it exists."""
    page = drv.report_path(output_dir, subject)
    return page.name if page.is_file() else None


# ---- thumbnails ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Gallery:
    outline_origin: str  # what the green outline is
    items: list[dict]


def _gallery(output_dir: Path, section: SpaceSection) -> Gallery:
    space = section.space
    outline, outline_origin = _outline(output_dir, section)
    zooms = canonical_zooms(space.grid)
    items = []
    for row in section.cohort.rows:
        result = row.result
        classes = ["thumb", row.status]
        if row.outlier_reasons:
            classes.append("outlier")
        if not row.included:
            classes.append("excluded")
        picture = None
        if result.preview is not None:
            picture = _png_uri(thumbnail_png(result.preview, outline, zooms))
        items.append({
            "id": _thumb_id(row),
            "classes": classes,
            "picture": picture,
            "missing": row.exclusion or "no image",
            "subject": result.subject,
            "report": _participant_page(output_dir, result.subject),
            "name": result.prefix.removeprefix(f"sub-{result.subject}").lstrip("_"),
            "status": row.status,
            "outlier": bool(row.outlier_reasons),
            "included": row.included,
        })  # fmt: skip
    return Gallery(outline_origin, items)


def _thumb_id(row: CohortRow) -> str:
    return f"thumb-{drv.space_label(row.result.space)}-{row.result.prefix}"


def _outline(output_dir: Path, section: SpaceSection) -> tuple[tuple | None, str]:
    """The outline slices, and what they are (the template's mask, or the cohort's)."""
    space = section.space
    if space.outline is not None:
        return space.outline, f"the outline of the {space.space.template} brain mask"
    probseg = drv.group_space_path(output_dir, "brain_probseg", space.label)
    if not probseg.is_file() or probseg not in section.maps.written:
        return None, "no outline (neither the template nor a cohort mask is available)"
    import nibabel as nib

    img = nib.load(str(probseg))
    data = canonical_array(np.asarray(img.dataobj, dtype=np.float32) >= 0.5, img.affine)
    return (
        take_preview(data.astype(np.float32), space.cuts),
        "the outline of the cohort's mean brain mask (voxels inside half of the participants' "
        "masks; the template is not available here)",
    )


def _png_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


# ---- the maps --------------------------------------------------------------------------------


@dataclass(frozen=True)
class MapsView:
    files: list[tuple[str, str]]  # (href, name) of every map written; none: no usable T1w
    n_participants: int
    design: Design | None
    group_counts: str  # participants per level of the design
    figures: list[tuple[str, str]]  # (PNG data URI, caption)


def _maps(output_dir: Path, section: SpaceSection) -> MapsView:
    maps = section.maps
    design = section.design
    written = bool(maps.written)
    return MapsView(
        files=[(p.relative_to(output_dir).as_posix(), p.name) for p in maps.written],
        n_participants=len(maps.participants),
        design=design,
        group_counts=(
            f"a correlation, {len(design.level_of)} participant(s)"
            if design is not None and design.usable and design.numeric
            else ", ".join(f"{level!r}: {n}" for level, n in design.counts.items())
            if design is not None and design.usable
            else ""
        ),
        figures=(
            _map_figures(output_dir, section) if written and section.space.cuts is not None else []
        ),
    )


def _map_figures(output_dir: Path, section: SpaceSection) -> list[tuple[str, str]]:
    import nibabel as nib

    from bids_app.reports import figures

    space = section.space
    mean_path = drv.group_space_path(output_dir, "t1w_mean", space.label)
    if mean_path not in section.maps.written:
        return []
    mask_path = (
        space.template.mask_path
        if space.template is not None
        else drv.group_space_path(output_dir, "brain_probseg", space.label)
    )

    def volume(path: Path) -> np.ndarray:
        img = nib.load(str(path))
        return canonical_array(np.asarray(img.dataobj, dtype=np.float32), img.affine)

    mean, mask = volume(mean_path), volume(mask_path) >= 0.5
    cuts = figures.choose_cuts(mask, MOSAIC_SLICES)
    zooms = canonical_zooms(space.grid)
    shown = [
        (
            _png_uri(mosaic_png(mean, mask, cuts, zooms)),
            "The study's mean normalised T1w (each T1w scaled to its median inside its brain "
            "mask), with the brain outline.",
        )
    ]
    for stat in section.maps.stats:
        limit, threshold = STAT_DISPLAY[stat.kind]
        picture = mosaic_png(mean, mask, cuts, zooms, volume(stat.path), limit, threshold)
        shown.append((_png_uri(picture), _stat_caption(section.design, stat, limit, threshold)))
    return shown


def _background(output_dir: Path, section: SpaceSection):
    """(mean T1w, brain mask, cuts, zooms) on the RAS grid, for the model's figures."""
    import nibabel as nib

    from bids_app.reports import figures

    space = section.space
    mean_path = drv.group_space_path(output_dir, "t1w_mean", space.label)
    if mean_path not in section.maps.written:
        return None
    mask_path = drv.group_space_path(output_dir, "brain_probseg", space.label)
    volumes = []
    for path in (mean_path, mask_path):
        img = nib.load(str(path))
        volumes.append(canonical_array(np.asarray(img.dataobj, dtype=np.float32), img.affine))
    mask = volumes[1] >= 0.5
    return volumes[0], mask, figures.choose_cuts(mask, MOSAIC_SLICES), canonical_zooms(space.grid)


def _stat_caption(design: Design, stat, limit: float, threshold: float) -> str:
    df = ", ".join(map(str, stat.df))
    if stat.kind == "t":
        first, second = design.levels
        meaning = (
            f"red where {first!r} has more tissue than {second!r} (log-Jacobian {stat.jacobian}), "
            "blue where less"
        )
    else:
        meaning = f"large where the levels of {design.column!r} differ"
    return (
        f"{stat.kind} map ({stat.jacobian} log-Jacobian, df {df}, largest |{stat.kind}| "
        f"{stat.peak:.2f}) over the mean T1w, shown inside the brain where |{stat.kind}| >= "
        f"{threshold:g}, colours saturating at {limit:g}: {meaning}. Uncorrected: coloured "
        "voxels are not findings."
    )
