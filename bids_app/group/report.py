"""Group level, step 5: ``group.html``, one self-contained page for the whole cohort.

Per space: the QC table (click a column to sort it; status sorts fail first), a thumbnail of every
normalised T1w with the template brain's outline (all at the same slices, to spot the misfit in
one scroll), links to each participant's ``sub-<label>.html``, and figures of the study's mean T1w
and of the group statistics. The page's style is the participant reports' own; the PNGs are
embedded (base64), so the page can be mailed or moved alone.
"""

from __future__ import annotations

import base64
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bids_app import __version__
from bids_app import derivatives as drv
from bids_app.group.cohort import CohortRow, SpaceCohort
from bids_app.group.collect import SpaceResults, canonical_array, canonical_zooms, take_preview
from bids_app.group.design import Design
from bids_app.group.maps import SpaceMaps
from bids_app.group.pictures import mosaic_png, thumbnail_png
from bids_app.report import _STYLE, QC_ROWS, _badge, _e, _number

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

    @property
    def space(self) -> SpaceResults:
        return self.cohort.space


def write_group_report(output_dir: Path, sections: list[SpaceSection], messages: list[str]) -> Path:
    """``output_dir/group.html``."""
    page = render_html(output_dir, sections, messages)
    return drv.write_text(page, drv.group_report_path(output_dir))


def render_html(output_dir: Path, sections: list[SpaceSection], messages: list[str]) -> str:
    subjects = sorted({row.result.subject for s in sections for row in s.cohort.rows})
    navigation = "".join(
        f'<li><a href="#space-{_e(s.space.label)}">{_e(str(s.space.space))}</a></li>'
        for s in sections
    )
    alerts = "".join(f'<p class="error">{_e(message)}</p>' for message in messages)
    return _PAGE.format(
        style=_STYLE + _GROUP_STYLE,
        script=_SCRIPT,
        version=_e(__version__),
        navigation=navigation,
        summary=_summary(sections, len(subjects)),
        alerts=alerts,
        sections="\n".join(_space_section(output_dir, section) for section in sections),
        table=_e(drv.group_table_path(output_dir, "qc").relative_to(output_dir).as_posix()),
    )


def _summary(sections: list[SpaceSection], n_subjects: int) -> str:
    rows = []
    for section in sections:
        cohort = section.cohort
        statuses = [row.status for row in cohort.rows]
        counts = ", ".join(f"{statuses.count(s)} {s}" for s in (*_STATUS_ORDER, "n/a")
                           if statuses.count(s))  # fmt: skip
        outliers = sum(bool(row.outlier_reasons) for row in cohort.rows)
        rows.append(
            f"<tr><td>{_e(str(section.space.space))}</td><td>{len(cohort.rows)}</td>"
            f"<td>{_e(counts)}</td><td>{outliers}</td><td>{len(cohort.included)}</td>"
            f"<td>{len(section.maps.participants)}</td></tr>"
        )
    return (
        f"<p>{n_subjects} participant(s) with results in this folder.</p>"
        '<table class="overview"><thead><tr><th>space</th><th>T1w</th><th>QC status</th>'
        "<th>outliers</th><th>T1w in the maps</th><th>participants in the maps</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _space_section(output_dir: Path, section: SpaceSection) -> str:
    space = section.space
    anchor = f"space-{_e(space.label)}"
    parts = [f'<section id="{anchor}">', f"<h2>{_e(str(space.space))}</h2>"]
    grid = space.grid
    if grid is not None:
        parts.append(
            f"<p>Grid: {_e(grid.origin)}, {'x'.join(map(str, grid.shape))} voxels of "
            f"{'x'.join(f'{z:g}' for z in grid.zooms)} mm.</p>"
        )
    parts += [f'<p class="note">{_e(note)}</p>' for note in space.notes]
    if section.cohort.outlier_note:
        parts.append(f'<p class="note">{_e(section.cohort.outlier_note)}.</p>')
    parts.append("<h3>QC of every normalisation</h3>" + _table(output_dir, section))
    if space.cuts is not None:
        parts.append(_gallery(output_dir, section))
    parts.append(_maps(output_dir, section))
    parts.append("</section>")
    return "\n".join(parts)


# ---- the table -------------------------------------------------------------------------------


def _table(output_dir: Path, section: SpaceSection) -> str:
    design = section.design
    group_header = f"<th>{_e(design.column)}</th>" if design is not None else ""
    headers = (
        "<th>participant</th><th>session</th><th>run</th><th>status</th><th>outlier</th>"
        "<th>robust z</th><th>in maps</th>" + group_header
        + "".join(f"<th>{_e(label)}</th>" for label, _ in _TABLE_METRICS.values())
        + "<th>reasons</th>"
    )  # fmt: skip
    body = "".join(_table_row(output_dir, row, section) for row in section.cohort.rows)
    return (
        '<table class="sortable cohort"><thead><tr>'
        f"{headers}</tr></thead><tbody>{body}</tbody></table>"
    )


def _table_row(output_dir: Path, row: CohortRow, section: SpaceSection) -> str:
    result = row.result
    design = section.design
    outlier = ("yes" if row.outlier_reasons else "no") if row.judged else "n/a"
    cells = [
        _cell(_participant_link(output_dir, result.subject), f"sub-{result.subject}"),
        _cell(_e(result.session or "n/a"), result.session or ""),
        _cell(_e(result.run or "n/a"), result.run or ""),
        _cell(_badge(row.status), _STATUS_ORDER.get(row.status, 3)),
        _cell(
            f'<span class="flag {outlier}">{outlier}</span>', {"yes": 0, "no": 1}.get(outlier, 2)
        ),
        _cell(_number(row.robust_z_max, "{:.1f}"), _sort_number(-row.robust_z_max)),
        _cell("yes" if row.included else "no", 0 if row.included else 1),
    ]
    if design is not None:
        value = section.group_values.get(result.subject) or ""
        cells.append(_cell(_e(value or "n/a"), value))
    for metric, (_, form) in _TABLE_METRICS.items():
        value = row.metrics[metric]
        cells.append(_cell(_number(value, form), _sort_number(value)))
    reasons = [r for r in (row.exclusion, row.status_reasons, *row.outlier_reasons) if r]
    text = "; ".join(dict.fromkeys(reasons))
    cells.append(_cell(_e(text) or "none", text))
    link = f' data-thumbnail="#{_thumb_id(row)}"' if section.space.cuts is not None else ""
    return f"<tr{link}>{''.join(cells)}</tr>"


def _cell(content: str, key) -> str:
    return f'<td data-sort="{_e(key)}">{content}</td>'


def _sort_number(value: float) -> str:
    return "" if value is None or not math.isfinite(value) else f"{value:.6g}"


def _participant_link(output_dir: Path, subject: str) -> str:
    page = drv.report_path(output_dir, subject)
    if page.is_file():
        return f'<a href="{_e(page.name)}">sub-{_e(subject)}</a>'
    return f"sub-{_e(subject)}"


# ---- thumbnails ------------------------------------------------------------------------------


def _gallery(output_dir: Path, section: SpaceSection) -> str:
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
        if result.preview is not None:
            picture = (
                f'<img src="{_png_uri(thumbnail_png(result.preview, outline, zooms))}" alt="">'
            )
        else:
            picture = f'<div class="missing">{_e(row.exclusion or "no image")}</div>'
        tags = _badge(row.status)
        if row.outlier_reasons:
            tags += ' <span class="flag yes">outlier</span>'
        if not row.included:
            tags += ' <span class="flag excluded">not in maps</span>'
        items.append(
            f'<figure class="{" ".join(classes)}" id="{_thumb_id(row)}">{picture}'
            f"<figcaption>{_participant_link(output_dir, result.subject)} "
            f"{_e(result.prefix.removeprefix(f'sub-{result.subject}').lstrip('_'))} {tags}"
            "</figcaption></figure>"
        )
    return (
        "<h3>Every normalised T1w</h3>"
        "<p>Sagittal, coronal and axial slices at the same place for everyone, with "
        f"{_e(outline_origin)} (green). A brain that does not fill the outline like the others "
        "is the misfit.</p>"
        f'<div class="gallery">{"".join(items)}</div>'
    )


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


def _maps(output_dir: Path, section: SpaceSection) -> str:
    maps = section.maps
    parts = ["<h3>Group maps</h3>"]
    if not maps.written:
        parts.append(
            '<p class="error">No group map: no T1w of this space is usable (see the table).</p>'
        )
        return "\n".join(parts)
    parts.append(
        f"<p>{len(maps.participants)} participant(s), each counted once (the mean of their "
        "included T1w). Files:</p><ul>"
        + "".join(
            f'<li><a href="{_e(p.relative_to(output_dir).as_posix())}">{_e(p.name)}</a></li>'
            for p in maps.written
        )
        + "</ul>"
    )
    design = section.design
    if design is not None and not design.usable:
        parts.append(f'<p class="error">No group comparison: {_e(design.problem)}</p>')
    elif design is not None and design.numeric:
        parts.append(
            f"<p>Correlation with <code>{_e(design.column)}</code>: {len(design.level_of)} "
            f"participant(s); {len(design.excluded)} without a value left out.</p>"
        )
    elif design is not None:
        counts = ", ".join(f"{level!r}: {n}" for level, n in design.counts.items())
        parts.append(
            f"<p>Groups by <code>{_e(design.column)}</code>: {_e(counts)}; "
            f"{len(design.excluded)} participant(s) without a value left out. "
            "Statistics are uncorrected for multiple comparisons.</p>"
        )
    if section.space.cuts is not None:
        parts += _map_figures(output_dir, section)
    if section.inference is not None:
        from bids_app.group.model_report import model_section

        background = _background(output_dir, section) if section.space.cuts is not None else None
        parts.append(model_section(output_dir, section, background))
    return "\n".join(parts)


def _background(output_dir: Path, section: SpaceSection):
    """(mean T1w, brain mask, cuts, zooms) on the RAS grid, for the model's figures."""
    import nibabel as nib

    from bids_app import figures

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


def _map_figures(output_dir: Path, section: SpaceSection) -> list[str]:
    import nibabel as nib

    from bids_app import figures

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
    parts = [
        _figure(
            mosaic_png(mean, mask, cuts, zooms),
            "The study's mean normalised T1w (each T1w scaled to its median inside its brain "
            "mask), with the brain outline.",
        )
    ]
    for stat in section.maps.stats:
        limit, threshold = STAT_DISPLAY[stat.kind]
        picture = mosaic_png(mean, mask, cuts, zooms, volume(stat.path), limit, threshold)
        parts.append(_figure(picture, _stat_caption(section.design, stat, limit, threshold)))
    return parts


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


def _figure(png: bytes, caption: str) -> str:
    return (
        f'<figure><img src="{_png_uri(png)}" alt="{_e(caption)}">'
        f"<figcaption>{_e(caption)}</figcaption></figure>"
    )


_GROUP_STYLE = """
table.sortable th { cursor: pointer; user-select: none; white-space: nowrap; }
table.sortable th[aria-sort="ascending"]::after { content: " \\25B2"; }
table.sortable th[aria-sort="descending"]::after { content: " \\25BC"; }
table.cohort td { white-space: nowrap; }
table.cohort td:last-child { white-space: normal; min-width: 20em; font-size: .95em; }
table.cohort tr.highlight { background: #fff6c2; }
.flag { font-size: .8em; font-weight: 700; padding: .05em .4em; border-radius: .6em; }
.flag.yes { background: #ffd9d6; color: #9b1c12; }
.flag.excluded { background: #e4e4e4; color: #333; }
.note { background: #f1f4ff; padding: .4em .8em; border-radius: .3em; }
.gallery { display: flex; flex-wrap: wrap; gap: .5em; }
.gallery figure.thumb { margin: 0; padding: .2em; border: 3px solid transparent;
  border-radius: .3em; max-width: 24em; }
.gallery figure.thumb.warn { border-color: #f0c24b; }
.gallery figure.thumb.fail, .gallery figure.thumb.outlier { border-color: #e0473c; }
.gallery figure.thumb.excluded img { opacity: .6; }
.gallery figure.thumb:target { outline: 3px solid #3478f6; }
.gallery figcaption { font-size: .78em; margin-top: .2em; }
.gallery .missing { width: 14em; height: 5em; background: #222; color: #eee; font-size: .75em;
  padding: .4em; overflow: hidden; }
"""

_SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  var headers = table.querySelectorAll("thead th");
  headers.forEach(function (header, column) {
    header.title = "sort by this column";
    header.addEventListener("click", function () {
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      var ascending = header.getAttribute("aria-sort") !== "ascending";
      headers.forEach(function (h) { h.removeAttribute("aria-sort"); });
      header.setAttribute("aria-sort", ascending ? "ascending" : "descending");
      rows.sort(function (a, b) {
        var x = a.cells[column].dataset.sort, y = b.cells[column].dataset.sort;
        if (x === y) { return 0; }
        if (x === "") { return 1; }  // no value: last, whichever the direction
        if (y === "") { return -1; }
        var nx = Number(x), ny = Number(y);
        var order = (isNaN(nx) || isNaN(ny)) ? (x < y ? -1 : 1) : nx - ny;
        return ascending ? order : -order;
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
  table.querySelectorAll("tbody tr[data-thumbnail]").forEach(function (row) {
    row.addEventListener("dblclick", function () {
      location.hash = row.dataset.thumbnail;
    });
  });
});
"""

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>mninorm group report</title>
<style>{style}</style>
</head>
<body>
<header>
<h1>mninorm group report</h1>
<ul>{navigation}</ul>
</header>
<section id="summary">
<h2>Summary</h2>
{alerts}
{summary}
<p>Each T1w's status comes from its participant-level QC (fixed thresholds); "outlier" compares
each QC metric with the cohort (robust z-score above 3.5 on the side that signals a problem).
T1w whose QC fails or whose files are missing or corrupt are left out of the group maps; outliers
are only flagged. The full table, with every metric: <a href="{table}">{table}</a>. Click a column
header to sort; double-click a row to jump to its thumbnail.</p>
</section>
{sections}
<footer>mninorm {version}, group level. Built from the files in this folder; rebuild with
<code>mninorm bids_dir output_dir group</code>.</footer>
<script>{script}</script>
</body>
</html>
"""
