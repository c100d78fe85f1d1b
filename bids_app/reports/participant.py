"""Per-participant QC, figures and a self-contained HTML report, built only from what is on disk.

``write_participant_report(output_dir, subject)`` reads the participant's run records, measures the
QC (``qc.py``), draws the figures (``figures.py``) into ``sub-<label>/figures/``, writes
``sub-<label>.html`` at the output root and the methods paragraph ``logs/CITATION.md``
(``methods.py``). Nothing comes from memory of a run, so ``mninorm ... --reports-only`` rebuilds
all of it.

The page is laid out by ``reports/templates/participant.html.j2`` (this module gathers what it
shows) and needs no network: styles and the small script are inline, figures are PNG files next
to it referred to by relative paths, fonts are the system's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bids_app.outputs import derivatives as drv
from bids_app.outputs.record import BrainExtractionRecord
from bids_app.reports import qc
from bids_app.reports.html import format_number, format_seconds, render
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
    lesion: bool = False  # the lesion is outlined in the figures


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
    from bids_app.outputs.source import strip_prefix

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
    native_lesion = recorded_lesion_path(output_dir, record.content.lesion_mask)
    if record.content.lesion_mask and native_lesion is None:
        problems.append("the lesion mask named in the run record is not found (not outlined)")
    if native_t1w.is_file() and native_mask.is_file():
        path = drv.figure_path(output_dir, t1w, "brain_mask")
        lesion_img = None if native_lesion is None else nib.load(native_lesion)
        figures.plot_brain_mask(nib.load(native_t1w), nib.load(native_mask), path, lesion_img)
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
        space_lesion = drv.space_path(output_dir, t1w, "lesion", space)
        lesion_img = nib.load(space_lesion) if space_lesion.is_file() else None
        if record.content.lesion_mask and lesion_img is None:
            problems.append(f"the lesion mask in {space} is missing (not outlined)")
        figures.plot_normalisation(
            nib.load(normalised), template_t1w, template_mask, pair, lesion_img
        )
        path = drv.figure_path(output_dir, t1w, "logjac_nonlinear", space)
        figures.plot_log_jacobian(nib.load(logjac_map), template_t1w, template_mask, path)
        normalisation[space_qc.template] = tuple(relative(p) for p in pair)
        logjac[space_qc.template] = relative(path)
    lesion = bool(record.content.lesion_mask)
    return _Figures(brain_mask, normalisation, logjac, tuple(problems), lesion)


def recorded_lesion_path(output_dir: Path, lesion_record: dict | None) -> Path | None:
    """The input lesion mask a run record names (``LesionMask.Source``, a BIDS URI into the raw
    dataset that ``dataset_description.json``'s DatasetLinks locates), if it is still there."""
    import json
    from urllib.parse import unquote, urlparse

    source = (lesion_record or {}).get("Source", "")
    prefix = next((p for p in ("bids:raw:", "bids::") if source.startswith(p)), None)
    if prefix is None:
        return None
    try:
        description = json.loads((output_dir / "dataset_description.json").read_text())
        raw = urlparse(description["DatasetLinks"]["raw"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    path = Path(unquote(raw.path)) / source[len(prefix) :]
    return path if raw.scheme == "file" and path.is_file() else None


def _figure_list(drawn: _Figures) -> list[str]:
    paths = [drawn.brain_mask] if drawn.brain_mask else []
    for pair in drawn.normalisation.values():
        paths += list(pair)
    return paths + list(drawn.logjac.values())


# ---- the page: the data each template shows (reports/templates/participant*) -------------------


@dataclass(frozen=True)
class SpaceView:
    """One template's part of a T1w's section."""

    template: str
    grid: str | None  # the output space, when it names a grid beyond the template
    flicker: tuple[str, str] | None  # (normalised T1w, template) figures
    logjac: str | None
    qc: dict | None  # {"rows": [{label, value, thresholds, verdict}], "reasons": [...]}


@dataclass(frozen=True)
class T1wView:
    """One T1w's section of the page."""

    anchor: str
    name: str
    status: str
    summary: list  # (label, text or None)
    outputs: list  # (href, file name)
    error: str | None  # why the T1w failed
    problems: tuple[str, ...]  # figures that could not be drawn
    brain_mask: str | None
    lesion: bool  # the figures outline the lesion
    extraction: dict | None  # {"header", "attempts" (rows of texts), "fallback"}
    spaces: list  # SpaceView


@dataclass(frozen=True)
class RunView:
    """One invocation that wrote some of the participant's T1w: label/value rows (value, and
    whether it is code), or only the T1w names when the run was not recorded."""

    names: str
    rows: list  # (label, text, is_code)


def render_html(subject: str, status: str, results, figures: dict, citation: str) -> str:
    return render(
        "participant.html.j2",
        subject=subject,
        status=status,
        overview=_overview(results),
        t1ws=[_t1w_view(result, figures[result.record]) for result in results],
        methods=_methods_blocks(citation),
        runs=_about([result.record for result in results]),
        citation_path=drv.CITATION,
    )


def _overview(results) -> list[dict]:
    return [
        {
            "anchor": _anchor(result.record),
            "name": result.record.t1w.path.name,
            "template": space_qc.template,
            "status": space_qc.status,
            "metrics": space_qc.metrics,
            "reasons": "; ".join(space_qc.reasons),
        }
        for result in results
        for space_qc in result.spaces
    ]


def _t1w_view(result: qc.T1wQC, drawn: _Figures) -> T1wView:
    record = result.record
    content = record.content
    outputs = content.outputs
    return T1wView(
        anchor=_anchor(record),
        name=record.t1w.path.name,
        status=result.status,
        summary=_summary_rows(record),
        outputs=[(uri.split("::", 1)[-1], uri.split("/")[-1]) for uri in outputs],
        error=None if record.ok else (content.error or "unknown error"),
        problems=drawn.problems,
        brain_mask=drawn.brain_mask,
        lesion=drawn.lesion,
        extraction=_attempts(content.brain_extraction),
        spaces=[_space_view(space_qc, drawn) for space_qc in result.spaces],
    )


def _space_view(space_qc: qc.SpaceQC, drawn: _Figures) -> SpaceView:
    template = space_qc.template
    has_qc = space_qc.metrics or space_qc.reasons
    return SpaceView(
        template=template,
        grid=None if str(space_qc.space) == template else str(space_qc.space),
        flicker=drawn.normalisation.get(template),
        logjac=drawn.logjac.get(template),
        qc={"rows": _qc_rows(space_qc), "reasons": space_qc.reasons} if has_qc else None,
    )


def _attempts(extraction: BrainExtractionRecord | None) -> dict | None:
    """Every brain-extraction attempt: what, why, its checks, and which one was kept."""
    attempts = extraction.attempts if extraction is not None else ()
    if not attempts:
        return None
    kept = extraction.kept_attempt
    header = ("attempt", "why", "template", "engine", "start", "head volume ratio", "brain ml",
              "least-covered sector", "outside share", "problems", "time")  # fmt: skip
    rows = []
    for attempt in attempts:
        sector = attempt.min_sector_coverage
        rows.append((
            f"{attempt.number}{' (kept)' if attempt.number == kept else ''}",
            attempt.why, attempt.template, attempt.engine,
            attempt.start, format_number(attempt.head_volume_ratio, "{:.2f}"),
            format_number(attempt.brain_volume_ml, "{:.0f}"),
            None if sector is None else f"{sector:.0%} ({attempt.worst_sector})",
            format_number(attempt.outside_fraction, "{:.1%}"),
            "; ".join(attempt.problems) or "none",
            format_seconds(attempt.seconds),
        ))  # fmt: skip
    fallback = "on" if extraction.fallback else "off (--no-fallback)"
    return {"header": header, "attempts": rows, "fallback": fallback}


def _summary_rows(record: qc.T1wRecord) -> list[tuple[str, object]]:
    content = record.content
    steps = content.step_seconds
    software = content.software
    zooms = content.source_zooms_mm or ()
    return [
        ("Input", content.source),
        ("Run", content.status),
        ("Input orientation", content.source_orientation),
        ("Input shape", " x ".join(map(str, content.source_shape or ())) or None),
        ("Input voxel size (mm)", " x ".join(f"{z:.3g}" for z in zooms) or None),
        ("Header fixes", "; ".join(content.header_fixes or ()) or "none needed"),
        ("Skull strip", content.skull_strip_decision),
        ("Output spaces", ", ".join(content.output_spaces)),
        ("Registration", recorded_registration(content).summary()),
        ("Random seed; threads", f"{content.random_seed}; {content.threads}"),
        ("Run time", format_seconds(content.total_seconds)),
        ("Steps", ", ".join(f"{k} {format_seconds(v)}" for k, v in steps.items()) or None),
        ("Software", ", ".join(f"{k} {v}" for k, v in software.items()) or None),
    ]


def _about(records) -> list[RunView]:
    """'About this run': each invocation that wrote this participant's T1w outputs, from their
    run records (a T1w rerun alone has another run identifier than the others)."""
    runs: dict[str, list] = {}
    for record in records:
        runs.setdefault(record.content.run_uuid or "", []).append(record)
    views = []
    for run_uuid, members in runs.items():
        names = ", ".join(record.t1w.path.name for record in members)
        if not run_uuid:
            views.append(RunView(names, []))
            continue
        content = members[0].content
        rows = [
            ("Run identifier", run_uuid, True),
            ("Command line", content.command_line or "n/a", True),
            ("Run started (UTC)", content.run_start_time or "n/a", False),
        ]
        rows += [
            (
                f"{record.t1w.path.name} (UTC)",
                f"{record.content.start_time} to {record.content.end_time}",
                False,
            )
            for record in members
        ]
        rows += [
            (
                "CPUs",
                f"{_or_na(content.cpu_count)} on the machine, "
                f"{_or_na(content.cpu_affinity_count)} usable by the run",
                False,
            ),
            (
                "Threads",
                f"{_or_na(content.threads)} per participant, "
                f"{_or_na(content.parallel_participants)} participant(s) at a time, "
                f"{_or_na(content.threads_total)} in all",
                False,
            ),
            (
                "Software",
                ", ".join(f"{k} {v}" for k, v in content.software.items()),
                False,
            ),
        ]
        views.append(RunView(names, rows))
    return views


def _qc_rows(space_qc: qc.SpaceQC) -> list[dict]:
    rules = {rule.column: rule for rule in qc.RULES}
    rows = []
    for column, (label, form) in QC_ROWS.items():
        value = space_qc.metrics.get(column)
        rule = rules.get(column)
        rows.append({
            "label": label,
            "value": format_number(value, form),
            "thresholds": rule.describe() if rule else "",
            "verdict": rule.grade(value) if rule else "",
        })  # fmt: skip
    return rows


def _methods_blocks(citation: str) -> list[tuple[str, object]]:
    """The methods text (Markdown of a known shape) as headings, lists and paragraphs."""
    blocks = []
    for block in citation.strip().split("\n\n"):
        if block.startswith("# "):
            continue
        if block.startswith("## "):
            blocks.append(("heading", block[3:]))
        elif block.startswith("- "):
            blocks.append(("list", [line[2:] for line in block.splitlines()]))
        else:
            blocks.append(("paragraph", block))
    return blocks


def _or_na(value) -> str:
    return "n/a" if value is None else str(value)


def _anchor(record: qc.T1wRecord) -> str:
    return f"t1w-{record.prefix}"
