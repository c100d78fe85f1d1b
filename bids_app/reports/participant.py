"""Per-participant QC, figures and a self-contained HTML report, built only from what is on disk.

``write_participant_report(output_dir, subject)`` reads the participant's run records, measures the
QC (``qc.py``), draws the figures (``figures.py``) into ``sub-<label>/figures/``, writes
``sub-<label>.html`` at the output root and the methods paragraph ``logs/CITATION.md``
(``methods.py``). Nothing comes from memory of a run, so ``mninorm ... --reports-only`` rebuilds
all of it.

The page needs no network: styles and the small script are inline, figures are PNG files next to
it referred to by relative paths, fonts are the system's.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bids_app import __version__
from bids_app.outputs import derivatives as drv
from bids_app.reports import qc
from bids_app.reports.methods import methods_text, recorded_registration

log = logging.getLogger(__name__)

# QC table of the report: column -> (label, how to show the value)
QC_ROWS = {
    "ncc": ("Correlation with the template (NCC)", "{:.3f}"),
    "mi": ("Mutual information (bits)", "{:.3f}"),
    "nmi": ("Normalised mutual information", "{:.3f}"),
    "dice": ("Dice of the brain masks", "{:.3f}"),
    "jacobian_min": ("Smallest Jacobian determinant (nonlinear part)", "{:.3f}"),
    "jacobian_max": ("Largest Jacobian determinant (nonlinear part)", "{:.3f}"),
    "folding_fraction": ("Folded voxels (determinant <= 0)", "{:.4%}"),
    "logjac_median": ("Median log-Jacobian (nonlinear part)", "{:+.3f}"),
    "logjac_iqr": ("Interquartile range of the log-Jacobian", "{:.3f}"),
    "affine_volume_ratio": ("Global volume ratio (affine part)", "{:.3f}"),
    "brain_volume_ml": ("Native brain volume (ml)", "{:.0f}"),
    "mask_min_sector_coverage": ("Brain mask: least-covered template brain sector", "{:.0%}"),
    "mask_volume_ratio": ("Brain mask: volume over the placed template brain's", "{:.2f}"),
    "mask_outside_fraction": ("Brain mask: share far outside the template brain", "{:.1%}"),
}


@dataclass(frozen=True)
class ParticipantReport:
    subject: str
    status: str
    report: Path
    qc_tables: tuple[Path, ...]
    figures: tuple[Path, ...]


@dataclass(frozen=True)
class _Figures:
    """Relative paths (from the output root) of one T1w's figures, per template."""

    brain_mask: str | None
    normalisation: dict  # template -> (participant figure, template figure)
    logjac: dict  # template -> figure
    problems: tuple[str, ...] = ()


def write_participant_report(
    output_dir: Path, subject: str, fetch_template: Callable | None = None
) -> ParticipantReport:
    """QC tables, figures, ``sub-<label>.html`` and ``logs/CITATION.md`` for one participant."""
    if fetch_template is None:
        from bids_app.templates import fetch_template
    fetch_template = cached_templates(fetch_template)
    output_dir = Path(output_dir)
    records = qc.collect_records(output_dir, subject)
    if not records:
        raise FileNotFoundError(
            f"sub-{subject}: no run record in {drv.run_record_dir(output_dir, subject)}; "
            "run the participant level first"
        )
    results = [qc.measure_t1w(output_dir, record, fetch_template) for record in records]
    status = qc.worst(result.status for result in results)
    tables = tuple(qc.write_qc(output_dir, result, status) for result in results)
    figures = {
        result.record: _draw_figures(output_dir, result, fetch_template) for result in results
    }
    citation = methods_text(output_dir, records, fetch_template)
    if any(record.ok for record in records) or not (output_dir / drv.CITATION).is_file():
        # A participant whose every T1w failed has no sidecars to tell what ran: the text of one
        # that succeeded stays (participants' reports are written in any order).
        drv.write_text(citation, output_dir / drv.CITATION)
    page = render_html(subject, status, results, figures, citation)
    report = drv.write_text(page, drv.report_path(output_dir, subject))
    log.info("sub-%s: QC %s; report %s", subject, status, report)
    written = tuple(
        output_dir / path
        for drawn in figures.values()
        for path in _figure_list(drawn)
    )  # fmt: skip
    return ParticipantReport(subject, status, report, tables, written)


def rebuild_reports(output_dir: Path, participant_labels: tuple[str, ...] = ()) -> list[str]:
    """``--reports-only``: QC and reports of the selected participants found in ``output_dir``.

    Returns the participants whose report could not be built (each is logged).
    """
    from bids_app.errors import NothingMatchedError
    from bids_app.participant.discovery import strip_prefix

    available = qc.subjects_on_disk(output_dir)
    wanted = [strip_prefix(label, "sub-") for label in participant_labels] or available
    unknown = [label for label in wanted if label not in available]
    if unknown or not wanted:
        raise NothingMatchedError(
            f"no run record of participant(s) {', '.join(unknown) or '(any)'} in {output_dir}: "
            "--reports-only rebuilds reports of participants already processed there ("
            + (", ".join(available) or "none")
            + ")"
        )
    failed = []
    for subject in dict.fromkeys(wanted):
        try:
            write_participant_report(output_dir, subject)
        except Exception as err:
            log.debug("sub-%s: report failed", subject, exc_info=True)
            log.error(
                "sub-%s: QC and report not written (%s: %s)", subject, type(err).__name__, err
            )
            failed.append(subject)
    return failed


def cached_templates(fetch_template: Callable) -> Callable:
    found: dict = {}

    def fetch(*query):
        if query not in found:
            found[query] = fetch_template(*query)
        return found[query]

    return fetch


# ---- figures ---------------------------------------------------------------------------------


def _draw_figures(output_dir: Path, result: qc.T1wQC, fetch_template) -> _Figures:
    import nibabel as nib

    from bids_app.reports import figures

    record, t1w = result.record, result.record.t1w
    if not record.ok:
        return _Figures(None, {}, {})
    problems = []

    def relative(path: Path) -> str:
        return path.relative_to(output_dir).as_posix()

    brain_mask = None
    native_t1w = drv.native_path(output_dir, t1w, "t1w")
    native_mask = drv.native_path(output_dir, t1w, "mask")
    if native_t1w.is_file() and native_mask.is_file():
        path = drv.figure_path(output_dir, t1w, "brain_mask")
        figures.plot_brain_mask(nib.load(native_t1w), nib.load(native_mask), path)
        brain_mask = relative(path)
    else:
        problems.append("the native T1w or brain mask is missing")
    normalisation, logjac = {}, {}
    for space_qc in result.spaces:
        space = space_qc.space
        if space is None or space_qc.template == "n/a":
            continue
        if not space_qc.metrics:  # QC could not read this template's outputs: nothing to draw
            problems.append(f"the {space} outputs are missing or unusable")
            continue
        template = space.find_grid(fetch_template)
        normalised = drv.space_path(output_dir, t1w, "t1w", space)
        logjac_map = drv.space_path(output_dir, t1w, "logjac_nonlinear", space)
        if not normalised.is_file() or not logjac_map.is_file():
            problems.append(f"the {space} outputs are missing")
            continue
        pair = (
            drv.figure_path(output_dir, t1w, "space_t1w", space),
            drv.figure_path(output_dir, t1w, "space_template", space),
        )
        template_t1w, template_mask = nib.load(template.t1w_path), nib.load(template.mask_path)
        figures.plot_normalisation(nib.load(normalised), template_t1w, template_mask, pair)
        path = drv.figure_path(output_dir, t1w, "logjac_nonlinear", space)
        figures.plot_log_jacobian(nib.load(logjac_map), template_t1w, template_mask, path)
        normalisation[space_qc.template] = tuple(relative(p) for p in pair)
        logjac[space_qc.template] = relative(path)
    return _Figures(brain_mask, normalisation, logjac, tuple(problems))


def _figure_list(drawn: _Figures) -> list[str]:
    paths = [drawn.brain_mask] if drawn.brain_mask else []
    for pair in drawn.normalisation.values():
        paths += list(pair)
    return paths + list(drawn.logjac.values())


# ---- the page --------------------------------------------------------------------------------


def render_html(subject: str, status: str, results, figures: dict, citation: str) -> str:
    sections = "\n".join(_t1w_section(result, figures[result.record]) for result in results)
    navigation = "".join(
        f'<li><a href="#{_anchor(r.record)}">{_e(r.record.t1w.path.name)}</a> '
        f"{_badge(r.status)}</li>"
        for r in results
    )
    return _PAGE.format(
        subject=_e(subject),
        status_badge=_badge(status),
        version=_e(__version__),
        navigation=navigation,
        overview=_overview(results),
        sections=sections,
        methods=_methods_html(citation),
        about=_about([result.record for result in results]),
        citation_path=_e(drv.CITATION),
        style=_STYLE,
        script=_SCRIPT,
    )


def _overview(results) -> str:
    rows = []
    for result in results:
        for space_qc in result.spaces:
            metrics = space_qc.metrics
            rows.append(
                "<tr>"
                f'<td><a href="#{_anchor(result.record)}">{_e(result.record.t1w.path.name)}</a>'
                "</td>"
                f"<td>{_e(space_qc.template)}</td><td>{_badge(space_qc.status)}</td>"
                f"<td>{_number(metrics.get('ncc'), '{:.3f}')}</td>"
                f"<td>{_number(metrics.get('dice'), '{:.3f}')}</td>"
                f"<td>{_number(metrics.get('folding_fraction'), '{:.4%}')}</td>"
                f"<td>{_e('; '.join(space_qc.reasons)) or 'none'}</td>"
                "</tr>"
            )
    return (
        '<table class="overview"><thead><tr><th>T1w</th><th>template</th><th>status</th>'
        "<th>NCC</th><th>Dice</th><th>folding</th><th>reasons</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _t1w_section(result: qc.T1wQC, drawn: _Figures) -> str:
    record = result.record
    content = record.content
    parts = [
        f'<section class="t1w" id="{_anchor(record)}">',
        f"<h2>{_e(record.t1w.path.name)} {_badge(result.status)}</h2>",
        "<h3>Summary</h3>",
        _summary_table(record),
    ]
    if not record.ok:
        parts.append(
            f'<p class="error">This T1w failed: {_e(content.get("Error") or "unknown error")}</p>'
        )
    for problem in drawn.problems:
        parts.append(f'<p class="error">No figure: {_e(problem)}.</p>')
    if drawn.brain_mask:
        parts.append(
            "<h3>Brain mask</h3>"
            + _figure(
                drawn.brain_mask,
                "Brain mask (red outline) on the bias-corrected T1w in its own space. Check that "
                "the outline follows the brain's edge: no skull or eyes inside, no cortex cut off.",
            )
        )
    parts.append(_attempts_table(content.get("BrainExtraction") or {}))
    for space_qc in result.spaces:
        template = space_qc.template
        if template in drawn.normalisation:
            participant_png, template_png = drawn.normalisation[template]
            grid = "" if str(space_qc.space) == template else f" ({_e(str(space_qc.space))} grid)"
            parts.append(f"<h3>Normalisation to {_e(template)}{grid}</h3>")
            parts.append(_flicker(template, participant_png, template_png))
        if template in drawn.logjac:
            parts.append(
                "<h3>Log-Jacobian (nonlinear part)</h3>"
                + _figure(
                    drawn.logjac[template],
                    "Log of the Jacobian determinant of the nonlinear part, in template space: "
                    "red where the participant's tissue is larger than the template's, blue where "
                    "smaller (colour scale +-0.5). Smooth, symmetric blobs are expected; speckle, "
                    "stripes or saturated patches point to a poor warp.",
                )
            )
        if space_qc.metrics or space_qc.reasons:
            parts.append(f"<h3>QC against {_e(template)}</h3>" + _qc_table(space_qc))
    parts.append("</section>")
    return "\n".join(parts)


def _attempts_table(extraction: dict) -> str:
    """Every brain-extraction attempt: what, why, its checks, and which one was kept."""
    attempts = extraction.get("Attempts") or []
    if not attempts:
        return ""
    kept = extraction.get("KeptAttempt")
    header = ("attempt", "why", "template", "engine", "start", "head volume ratio", "brain ml",
              "least-covered sector", "outside share", "problems", "time")  # fmt: skip
    rows = []
    for attempt in attempts:
        sector = attempt.get("MinSectorCoverage")
        cells = (
            f"{attempt.get('Attempt')}{' (kept)' if attempt.get('Attempt') == kept else ''}",
            attempt.get("Why"), attempt.get("Template"), attempt.get("Engine"),
            attempt.get("Start"), _number(attempt.get("HeadVolumeRatio"), "{:.2f}"),
            _number(attempt.get("BrainVolumeML"), "{:.0f}"),
            None if sector is None else f"{sector:.0%} ({attempt.get('WorstSector')})",
            _number(attempt.get("OutsideFraction"), "{:.1%}"),
            "; ".join(attempt.get("Problems") or []) or "none",
            _seconds(attempt.get("Seconds")),
        )  # fmt: skip
        rows.append("<tr>" + "".join(f"<td>{_e(c) if c else 'n/a'}</td>" for c in cells) + "</tr>")
    fallback = "on" if extraction.get("Fallback", True) else "off (--no-fallback)"
    return (
        f"<h3>Brain extraction: {len(attempts)} attempt(s), fallback {fallback}</h3>"
        '<table class="attempts"><thead><tr>'
        + "".join(f"<th>{_e(h)}</th>" for h in header)
        + f"</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def _summary_table(record: qc.RunRecord) -> str:
    content = record.content
    steps = content.get("StepSeconds") or {}
    software = content.get("Software") or {}
    zooms = content.get("SourceZoomsMM") or []
    rows = [
        ("Input", content.get("Source")),
        ("Run", content.get("Status")),
        ("Input orientation", content.get("SourceOrientation")),
        ("Input shape", " x ".join(map(str, content.get("SourceShape") or [])) or None),
        ("Input voxel size (mm)", " x ".join(f"{z:.3g}" for z in zooms) or None),
        ("Header fixes", "; ".join(content.get("HeaderFixes") or []) or "none needed"),
        ("Skull strip", content.get("SkullStripDecision")),
        ("Output spaces", ", ".join(content.get("OutputSpaces") or [])),
        ("Registration", recorded_registration(content).summary()),
        ("Random seed; threads", f"{content.get('RandomSeed')}; {content.get('Threads')}"),
        ("Run time", _seconds(content.get("TotalSeconds"))),
        ("Steps", ", ".join(f"{k} {_seconds(v)}" for k, v in steps.items()) or None),
        ("Software", ", ".join(f"{k} {v}" for k, v in software.items()) or None),
    ]
    body = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v) if v else 'n/a'}</td></tr>" for k, v in rows)
    outputs = content.get("Outputs") or []
    links = "".join(
        f'<li><a href="{_e(uri.split("::", 1)[-1])}">{_e(uri.split("/")[-1])}</a></li>'
        for uri in outputs
    )
    details = (
        f"<details><summary>{len(outputs)} output file(s)</summary><ul>{links}</ul></details>"
        if outputs
        else ""
    )
    return f'<table class="summary"><tbody>{body}</tbody></table>{details}'


def _about(records) -> str:
    """'About this run': each invocation that wrote this participant's T1w outputs, from their
    run records (a T1w rerun alone has another run identifier than the others)."""
    runs: dict[str, list] = {}
    for record in records:
        runs.setdefault(record.content.get("RunUUID") or "", []).append(record)
    tables = []
    for run_uuid, members in runs.items():
        content = members[0].content
        if not run_uuid:
            names = ", ".join(record.t1w.path.name for record in members)
            tables.append(f"<p>{_e(names)}: not recorded (run by an older mninorm).</p>")
            continue
        rows = [
            ("Run identifier", f"<code>{_e(run_uuid)}</code>"),
            ("Command line", f"<code>{_e(content.get('CommandLine') or 'n/a')}</code>"),
            ("Run started (UTC)", _e(content.get("RunStartTime") or "n/a")),
        ]
        rows += [
            (
                f"{record.t1w.path.name} (UTC)",
                _e(f"{record.content.get('StartTime')} to {record.content.get('EndTime')}"),
            )
            for record in members
        ]
        rows += [
            (
                "CPUs",
                _e(
                    f"{content.get('CPUCount', 'n/a')} on the machine, "
                    f"{content.get('CPUAffinityCount', 'n/a')} usable by the run"
                ),
            ),
            (
                "Threads",
                _e(
                    f"{content.get('Threads', 'n/a')} per participant, "
                    f"{content.get('ParallelParticipants', 'n/a')} participant(s) at a time, "
                    f"{content.get('ThreadsTotal', 'n/a')} in all"
                ),
            ),
            (
                "Software",
                _e(", ".join(f"{k} {v}" for k, v in (content.get("Software") or {}).items())),
            ),
        ]
        body = "".join(f"<tr><th>{_e(label)}</th><td>{value}</td></tr>" for label, value in rows)
        tables.append(f'<table class="summary about"><tbody>{body}</tbody></table>')
    return "\n".join(tables)


def _qc_table(space_qc: qc.SpaceQC) -> str:
    rules = {rule.column: rule for rule in qc.RULES}
    rows = []
    for column, (label, form) in QC_ROWS.items():
        value = space_qc.metrics.get(column)
        rule = rules.get(column)
        verdict = rule.grade(value) if rule else ""
        rows.append(
            f"<tr><th>{_e(label)}</th><td>{_number(value, form)}</td>"
            f"<td>{_e(rule.describe()) if rule else ''}</td>"
            f"<td>{_badge(verdict) if verdict else ''}</td></tr>"
        )
    reasons = "".join(f"<li>{_e(reason)}</li>" for reason in space_qc.reasons)
    return (
        '<table class="qc"><thead><tr><th>metric</th><th>value</th><th>thresholds</th>'
        f"<th>verdict</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
        + (f'<ul class="reasons">{reasons}</ul>' if reasons else "")
    )


def _figure(src: str, caption: str) -> str:
    return (
        f'<figure><img src="{_e(src)}" alt="{_e(caption)}">'
        f"<figcaption>{_e(caption)}</figcaption></figure>"
    )


def _flicker(template: str, participant_png: str, template_png: str) -> str:
    return f"""<figure class="flicker">
<div class="stack">
<img class="participant" src="{_e(participant_png)}" alt="normalised T1w with the outline of the \
{_e(template)} brain">
<img class="template" src="{_e(template_png)}" alt="the {_e(template)} template with its brain \
outline">
</div>
<figcaption><button type="button" aria-pressed="false">Show the template</button>
Showing <b class="shows-participant">the normalised T1w</b><b class="shows-template">the \
template</b>, with the template's brain outline (green). Hover over the image, or press the \
button, to flick between the two: anatomy that jumps marks a misalignment.</figcaption>
</figure>"""


def _methods_html(citation: str) -> str:
    blocks = []
    for block in citation.strip().split("\n\n"):
        if block.startswith("# "):
            continue
        if block.startswith("## "):
            blocks.append(f"<h3>{_e(block[3:])}</h3>")
        elif block.startswith("- "):
            items = "".join(f"<li>{_e(line[2:])}</li>" for line in block.splitlines())
            blocks.append(f"<ul>{items}</ul>")
        else:
            blocks.append(f'<p class="methods">{_e(block)}</p>')
    return "\n".join(blocks)


def _anchor(record: qc.RunRecord) -> str:
    return f"t1w-{record.prefix}"


def _badge(status: str) -> str:
    return f'<span class="badge {_e(status)}">{_e(status)}</span>'


def _number(value, form: str) -> str:
    import math

    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return form.format(value)


def _seconds(value) -> str | None:
    if value is None:
        return None
    value = float(value)
    return f"{value:.0f} s" if value < 120 else f"{value / 60:.1f} min"


def _e(value) -> str:
    return html.escape(str(value), quote=True)


_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
  margin: 0 auto; max-width: 1280px; padding: 0 1.2em 3em; color: #1d1d1f; background: #fff; }
header { position: sticky; top: 0; background: #fff; border-bottom: 1px solid #ddd;
  padding: .6em 0; z-index: 2; }
header h1 { margin: 0; font-size: 1.4em; }
header ul { margin: .3em 0 0; padding: 0; list-style: none; display: flex; flex-wrap: wrap;
  gap: .3em 1.2em; font-size: .9em; }
section, figure { scroll-margin-top: 6em; }
h2 { margin-top: 2em; border-bottom: 2px solid #333; padding-bottom: .2em; }
h3 { margin: 1.4em 0 .4em; font-size: 1.05em; }
table { border-collapse: collapse; font-size: .88em; margin: .3em 0; }
th, td { text-align: left; padding: .25em .7em; border-bottom: 1px solid #e4e4e4;
  vertical-align: top; }
table.summary th { width: 13em; color: #444; font-weight: 600; }
table.qc td:nth-child(2) { font-variant-numeric: tabular-nums; text-align: right; }
.badge { display: inline-block; padding: .05em .55em; border-radius: .8em; font-size: .8em;
  font-weight: 700; text-transform: uppercase; letter-spacing: .03em; vertical-align: middle; }
.badge.pass { background: #d7f5df; color: #0b5d27; }
.badge.warn { background: #fff0c2; color: #7a5300; }
.badge.fail { background: #ffd9d6; color: #9b1c12; }
.error { background: #ffd9d6; color: #6b130c; padding: .5em .8em; border-radius: .3em; }
figure { margin: .4em 0 1em; }
figure img { max-width: 100%; height: auto; display: block; background: #000; }
figcaption { font-size: .85em; color: #444; margin-top: .3em; max-width: 75em; }
.stack { position: relative; display: inline-block; max-width: 100%; cursor: crosshair; }
.stack img.template { position: absolute; left: 0; top: 0; width: 100%; height: 100%;
  visibility: hidden; }
.stack:hover img.template { visibility: visible; }
.flicker.show-template .stack img.template { visibility: visible; }
.flicker.show-template .stack:hover img.template { visibility: hidden; }
.flicker .shows-template, .flicker.show-template .shows-participant { display: none; }
.flicker.show-template .shows-template { display: inline; }
.flicker:has(.stack:hover) .shows-participant { display: none; }
.flicker:has(.stack:hover) .shows-template { display: inline; }
.flicker.show-template:has(.stack:hover) .shows-participant { display: inline; }
.flicker.show-template:has(.stack:hover) .shows-template { display: none; }
button { font: inherit; font-size: .95em; padding: .15em .7em; margin-right: .5em;
  cursor: pointer; }
p.methods { max-width: 60em; line-height: 1.45; }
details { font-size: .85em; margin: .3em 0; }
footer { margin-top: 3em; font-size: .8em; color: #666; }
"""

_SCRIPT = """
document.querySelectorAll("figure.flicker").forEach(function (figure) {
  var button = figure.querySelector("button");
  button.addEventListener("click", function () {
    var showsTemplate = figure.classList.toggle("show-template");
    button.setAttribute("aria-pressed", showsTemplate ? "true" : "false");
    button.textContent = showsTemplate ? "Show the normalised T1w" : "Show the template";
  });
});
"""

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>sub-{subject}: mninorm report</title>
<style>{style}</style>
</head>
<body>
<header>
<h1>sub-{subject} {status_badge}</h1>
<ul>{navigation}<li><a href="#methods">Methods</a></li>
<li><a href="#about">About this run</a></li></ul>
</header>
<section id="overview">
<h2>Overview</h2>
<p>One row per T1w and template. The status follows the thresholds in each QC table (and in the
JSON sidecar of each <code>*_desc-mninorm_qc.tsv</code>); the participant's status is the worst.</p>
{overview}
</section>
{sections}
<section id="methods">
<h2>Methods</h2>
{methods}
<p>The same text, to paste into a paper: <a href="{citation_path}">{citation_path}</a>.</p>
</section>
<section id="about">
<h2>About this run</h2>
<p>The invocation of <code>mninorm</code> that wrote each T1w's outputs, from its run record
(<code>sub-{subject}/log/*_desc-mninorm_run.json</code>); what it said and what its tools printed
is in the <code>*_desc-mninorm_log.txt</code> next to it.</p>
{about}
</section>
<footer>mninorm {version}. Built from the files in this folder; rebuild with
<code>mninorm bids_dir output_dir participant --reports-only</code>.</footer>
<script>{script}</script>
</body>
</html>
"""
