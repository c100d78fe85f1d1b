"""Quantitative QC of each normalisation, computed only from what is on disk.

For every T1w that has a run record (``sub-X/log/<source>_desc-mninorm_run.json``) and every
template it was registered to, this module measures how well the normalised T1w matches the
template, how much the warp distorts, and grades the result ``pass`` / ``warn`` / ``fail`` by the
thresholds in ``RULES``. It reads the output folder and the template files only, so the QC can be
rebuilt at any time (``mninorm ... --reports-only``).

One TSV per T1w, ``<source>_desc-mninorm_qc.tsv`` in its ``anat`` folder, one row per template;
its JSON sidecar documents every column and the thresholds. The rows of all participants
concatenate into a group table that sorts by ``participant_status`` or ``status``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bids_app.errors import RunRecordError
from bids_app.measures.maskcheck import LIMITS as MASK_LIMITS
from bids_app.measures.maskcheck import OUTSIDE_DISTANCE_MM, check_mask
from bids_app.measures.similarity import MI_BINS, correlation, dice, mutual_information
from bids_app.outputs import derivatives as drv
from bids_app.outputs.record import RunRecord, read_run_record
from bids_app.outputs.source import T1wInput
from bids_app.spaces import OutputSpace, parse_output_space

log = logging.getLogger(__name__)

STATUSES = ("pass", "warn", "fail")  # from best to worst

# A determinant <= 0 is folding. The on-disk log-Jacobian maps floor it at log(1e-6); QC recomputes
# determinants from the transform itself, so the count is exact.


@dataclass(frozen=True)
class Rule:
    """A metric is ``warn`` outside ``warn_range`` and ``fail`` outside ``fail_range``."""

    column: str
    warn_range: tuple[float, float]
    fail_range: tuple[float, float]
    why: str

    def grade(self, value: float | None) -> str:
        if value is None or not math.isfinite(value):
            return "pass"  # a metric that could not be measured is reported as n/a, not graded
        if not self.fail_range[0] <= value <= self.fail_range[1]:
            return "fail"
        if not self.warn_range[0] <= value <= self.warn_range[1]:
            return "warn"
        return "pass"

    def describe(self) -> str:
        """E.g. 'warn below 0.7, fail below 0.6' or 'warn outside 0.6-1.6, fail outside 0.4-2.5'."""
        return f"warn {_fmt_range(self.warn_range)}, fail {_fmt_range(self.fail_range)}"


_INF = math.inf

# Thresholds (docs/outputs.md, "Quality control"). On the whole-head benchmark (python -m
# benchmarks heads, default setting, 2026-12-01) the 32 good normalisations had ncc 0.75-0.84
# (0.67 on heads sub-06 run-1, its strong bias field) and dice 0.983-0.990. Measured on older code:
# the same registration without its nonlinear stage had ncc 0.55; a front-back flipped header 0.45
# with ANTs, 0.61 with Greedy (its warp bends the mirror image further), hence fail below 0.65.
RULES: tuple[Rule, ...] = (
    Rule(
        "ncc",
        (0.70, _INF),
        (0.65, _INF),
        "the normalised T1w does not look like the template inside the template's brain",
    ),
    Rule(
        "dice",
        (0.93, _INF),
        (0.85, _INF),
        "the warped brain mask does not cover the template's brain",
    ),
    Rule(
        "folding_fraction",
        (-_INF, 1e-4),
        (-_INF, 1e-2),
        "the warp folds (non-positive Jacobian determinants) inside the brain",
    ),
    Rule(
        "logjac_iqr",
        (-_INF, 0.50),
        (-_INF, 1.00),
        "the warp stretches and squeezes the brain much more than usual",
    ),
    Rule(
        "affine_volume_ratio",
        (0.6, 1.6),
        (0.4, 2.5),
        "the affine part scales or mirrors the brain implausibly (wrong voxel sizes or a "
        "flipped axis in the header?)",
    ),
    # The native mask against the template's, placed by the final transform's linear part only
    # (maskcheck.py): fail thresholds are brain extraction's own limits, which decide fallback.
    Rule(
        "mask_min_sector_coverage",
        (MASK_LIMITS["min_sector_coverage"][0] + 0.10, _INF),
        (MASK_LIMITS["min_sector_coverage"][0], _INF),
        "the brain mask misses part of the brain (a lobe, the cerebellum): it leaves a sector "
        "of the template's brain uncovered",
    ),
    Rule(
        "mask_volume_ratio",
        (0.85, 1.15),
        MASK_LIMITS["volume_ratio"],
        "the brain mask is much smaller or larger than the template's brain placed on the T1w "
        "(a mask too tight, or holding skull)",
    ),
    Rule(
        "mask_outside_fraction",
        (-_INF, MASK_LIMITS["outside_fraction"][1] / 2),
        (-_INF, MASK_LIMITS["outside_fraction"][1]),
        "the brain mask reaches far outside the brain (skull, neck or eyes included)",
    ),
    Rule(
        "brain_volume_ml",
        (800.0, 2300.0),
        (400.0, 3500.0),
        "the native brain mask is implausibly small or large (brain extraction failed?)",
    ),
)

# Every column of the QC table, in order, with its meaning (written to the JSON sidecar).
COLUMNS: dict[str, str] = {
    "participant_id": "participant label with 'sub-'",
    "session_id": "session label with 'ses-', n/a without sessions",
    "source": "the input T1w (BIDS URI)",
    "template": "TemplateFlow identifier of the template",
    "space": "the output grid the image metrics were measured on (the finest one written)",
    "participant_status": "the worst status of all the participant's T1w rows",
    "status": "pass / warn / fail for this T1w and template, by the thresholds in 'Thresholds'",
    "status_reasons": "why the status is not 'pass' ('; '-separated), n/a if it is",
    "run_status": "ok or failed (from the run record)",
    "ncc": "Pearson (normalised cross-) correlation of the normalised T1w with the template T1w "
    "inside the template's brain mask; 1 = identical up to brightness and contrast",
    "mi": f"mutual information (bits, {MI_BINS}x{MI_BINS} histogram) of the normalised T1w and "
    "the template T1w inside the template's brain mask",
    "nmi": "normalised mutual information (H(a) + H(b)) / H(a, b), between 1 (independent) and 2",
    "dice": "Dice overlap of the brain mask in template space with the template's brain mask",
    "jacobian_min": "smallest Jacobian determinant of the nonlinear (SyN) part inside the "
    "template's brain, computed from the transform file (1 = no local volume change)",
    "jacobian_max": "largest such determinant",
    "folding_fraction": "share of template-brain voxels where that determinant is <= 0 (folding)",
    "logjac_median": "median of the nonlinear log-Jacobian map inside the template's brain",
    "logjac_iqr": "interquartile range (robust spread) of the nonlinear log-Jacobian map inside "
    "the template's brain",
    "affine_volume_ratio": "det of the affine part: the participant's global volume over the "
    "template's; negative when the affine mirrors the brain (a flipped header axis)",
    "brain_volume_ml": "volume of the native brain mask, in millilitres",
    "mask_min_sector_coverage": "the native brain mask against the template's brain mask placed "
    "on the T1w by the final transform's linear part (no warp to hide a miss): the smallest "
    "share of a sector of the template brain (octants, and the quadrants of its lowest quarter, "
    "where the cerebellum and temporal poles are) that the mask covers",
    "mask_volume_ratio": "volume of the native brain mask over that of the template's brain mask "
    "placed on the T1w by the final transform's linear part",
    "mask_outside_fraction": "share of the native brain mask lying more than "
    f"{OUTSIDE_DISTANCE_MM:g} mm outside that placed template brain (skull, neck, eyes)",
    "source_orientation": "voxel axis orientation of the input before it was reoriented to RAS",
    "header_fixes": "what the header check changed ('; '-separated), n/a if nothing",
    "skull_strip": "the skull-strip decision (mode: what was done)",
    "extraction_attempts": "brain-extraction attempts made (more than 1: the fallback fired; "
    "the run record and the mask's sidecar say what each attempt was and why), n/a when the "
    "input was already skull-stripped",
    "extraction_kept": "the attempt whose mask was kept",
    "preset": "registration preset",
    "seconds_total": "wall time for this T1w, in seconds",
    "step_seconds": "wall time of each step, 'step=seconds' ('; '-separated)",
}


@dataclass(frozen=True)
class T1wRecord:
    """The run record of one T1w as found on disk, and that T1w (whose outputs are named after
    it)."""

    t1w: T1wInput
    path: Path
    content: RunRecord = field(hash=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.content.ok

    @property
    def prefix(self) -> str:
        return drv.source_prefix(self.t1w)


@dataclass(frozen=True)
class SpaceQC:
    """The QC of one T1w against one template."""

    template: str
    space: OutputSpace | None
    metrics: dict = field(hash=False, compare=False)  # column -> float (nan = not measured)
    status: str = "pass"
    reasons: tuple[str, ...] = ()


@dataclass(frozen=True)
class T1wQC:
    record: T1wRecord
    spaces: tuple[SpaceQC, ...]

    @property
    def status(self) -> str:
        return worst(s.status for s in self.spaces)


def worst(statuses) -> str:
    statuses = list(statuses)
    return max(statuses, key=STATUSES.index) if statuses else "fail"


# ---- reading what is on disk -----------------------------------------------------------------


def collect_records(output_dir: Path, subject: str) -> list[T1wRecord]:
    """Every readable run record of one participant (all sessions and runs), sorted by source; an
    unreadable one is skipped with a warning."""
    records = []
    for path in sorted(drv.run_record_dir(output_dir, subject).glob(f"*_{drv.RUN_RECORD}")):
        try:
            content = read_run_record(path)
        except RunRecordError as err:
            log.warning("sub-%s: %s; skipped", subject, err)
            continue
        records.append(T1wRecord(_t1w_from_record(subject, path, content), path, content))
    return records


def subjects_on_disk(output_dir: Path) -> list[str]:
    """Participants that have at least one run record in ``output_dir``."""
    return sorted(
        folder.name[4:]
        for folder in output_dir.glob("sub-*")
        if folder.is_dir() and any(drv.run_record_dir(output_dir, folder.name[4:]).glob("*.json"))
    )


def _t1w_from_record(subject: str, path: Path, content: RunRecord) -> T1wInput:
    source = str(content.source)
    relpath = source.split(":", 2)[-1] if source.startswith("bids:") else ""
    prefix = path.name[: -len(f"_{drv.RUN_RECORD}")]
    if not relpath:  # a hand-made record: rebuild the name from the prefix
        relpath = f"{prefix}_T1w.nii.gz"
    entities = dict(part.split("-", 1) for part in prefix.split("_") if "-" in part)
    session = {"session": entities["ses"]} if "ses" in entities else {}
    return T1wInput(subject=subject, path=Path(relpath), relpath=relpath, entities=session)


def spaces_by_template(record: T1wRecord) -> dict[str, list[OutputSpace]]:
    spaces: dict[str, list[OutputSpace]] = {}
    for text in record.content.output_spaces:
        space = parse_output_space(text)
        spaces.setdefault(space.key, []).append(space)
    return spaces


def measured_space(spaces: list[OutputSpace], fetch_template: Callable) -> OutputSpace:
    """The finest grid written for a template: image metrics are measured there."""
    if len(spaces) == 1:
        return spaces[0]
    return min(spaces, key=lambda s: min(s.find_grid(fetch_template).zooms_mm))


# ---- metrics ---------------------------------------------------------------------------------


def jacobian_summary(composite, template_mask_img) -> dict:
    """Exact determinants of a forward transform's displacement field (a ``CompositeTransform``,
    as read from its .h5) inside the template's brain."""
    from nibabel.processing import resample_from_to

    from bids_app.transforms.jacobian import field_determinant, folding_fraction

    # Signed: a 12-parameter affine can mirror a brain whose header flips an axis, and then fit
    # it well (Greedy did, on the flipped-header QC case); a negative ratio fails the rule.
    summary = {"affine_volume_ratio": float(np.linalg.det(composite.linear[:3, :3]))}
    if not composite.fields:  # an affine-only transform: no local volume change at all
        return {**summary, "jacobian_min": 1.0, "jacobian_max": 1.0, "folding_fraction": 0.0}
    if len(composite.fields) != 1:
        raise ValueError("the forward transform holds several displacement fields, not one")
    displacement = composite.fields[0]
    determinant = field_determinant(displacement)
    mask = resample_from_to(template_mask_img, (determinant.shape, displacement.affine), order=0)
    inside = np.asarray(mask.dataobj) > 0
    values = determinant[inside] if inside.any() else determinant.ravel()
    return {
        **summary,
        "jacobian_min": float(values.min()),
        "jacobian_max": float(values.max()),
        "folding_fraction": folding_fraction(values),
    }


def grade(metrics: dict) -> tuple[str, tuple[str, ...]]:
    """The status by ``RULES``, and a reason for every rule that is not passed."""
    status, reasons = "pass", []
    for rule in RULES:
        verdict = rule.grade(metrics.get(rule.column))
        if verdict != "pass":
            value = metrics[rule.column]
            reasons.append(f"{rule.column} = {value:.4g} ({verdict}: {rule.why})")
            status = worst([status, verdict])
    return status, tuple(reasons)


# ---- one T1w ---------------------------------------------------------------------------------


def measure_t1w(output_dir: Path, record: T1wRecord, fetch_template: Callable) -> T1wQC:
    """QC rows of one T1w: one per template it was (or should have been) registered to."""
    rows = []
    for template, spaces in spaces_by_template(record).items():
        if not record.ok:
            error = record.content.error or "unknown error"
            rows.append(SpaceQC(template, None, {}, "fail", (f"the run failed: {error}",)))
            continue
        try:
            space = measured_space(spaces, fetch_template)
            metrics = measure_space(output_dir, record, space, fetch_template)
        except FileNotFoundError as err:
            missing = f"an output is missing ({Path(err.filename or str(err)).name})"
            rows.append(SpaceQC(template, spaces[0], {}, "fail", (missing,)))
            continue
        except (OSError, ValueError) as err:  # unreadable or inconsistent outputs
            rows.append(SpaceQC(template, spaces[0], {}, "fail", (f"unusable outputs: {err}",)))
            continue
        status, reasons = grade(metrics)
        rows.append(SpaceQC(template, space, metrics, status, reasons))
    if not rows:  # a record without output spaces: nothing can be graded
        rows.append(SpaceQC("n/a", None, {}, "fail", ("the run record names no output space",)))
    return T1wQC(record, tuple(rows))


def measure_space(output_dir: Path, record: T1wRecord, space: OutputSpace, fetch_template) -> dict:
    import nibabel as nib

    from bids_app.transforms import read_composite

    t1w = record.t1w
    template = space.find_grid(fetch_template)
    template_t1w = _load(template.t1w_path)
    template_mask_img = _load(template.mask_path)
    template_mask = np.asarray(template_mask_img.dataobj) > 0
    normalised = _load(drv.space_path(output_dir, t1w, "t1w", space)).get_fdata(dtype=np.float32)
    warped_mask = np.asarray(_load(drv.space_path(output_dir, t1w, "mask", space)).dataobj)
    logjac = _load(drv.space_path(output_dir, t1w, "logjac_nonlinear", space))
    if normalised.shape != template_mask.shape:
        raise ValueError(
            f"{t1w.relpath}: the normalised T1w grid {normalised.shape} is not the template's "
            f"{template_mask.shape} ({space})"
        )
    inside_normalised = normalised[template_mask]
    inside_template = template_t1w.get_fdata(dtype=np.float32)[template_mask]
    mi, nmi = mutual_information(inside_normalised, inside_template)
    logjac_inside = logjac.get_fdata(dtype=np.float32)[template_mask]
    q25, q50, q75 = np.percentile(logjac_inside, [25, 50, 75])
    registration_mask = nib.load(str(space.find_registration_grid(fetch_template).mask_path))
    forward = drv.transform_path(output_dir, t1w, "t1w2std_xfm", space.key)
    composite = read_composite(_existing(forward))  # read once: its field is large
    native_mask = _load(drv.native_path(output_dir, t1w, "mask"))
    voxel_ml = float(np.prod(native_mask.header.get_zooms()[:3])) / 1000.0
    # The mask against the template's, placed by the linear part only (a warp would hide a miss).
    mask_check = check_mask(native_mask, registration_mask, composite.linear)
    return {
        "ncc": correlation(inside_normalised, inside_template),
        "mi": mi,
        "nmi": nmi,
        "dice": dice(warped_mask, template_mask),
        **jacobian_summary(composite, registration_mask),
        "logjac_median": float(q50),
        "logjac_iqr": float(q75 - q25),
        "brain_volume_ml": float((np.asarray(native_mask.dataobj) > 0).sum() * voxel_ml),
        "mask_min_sector_coverage": mask_check.min_sector_coverage,
        "mask_outside_fraction": mask_check.outside_fraction,
        "mask_volume_ratio": mask_check.volume_ratio,
    }


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(2, "no such file", str(path))
    return path


def _load(path: Path):
    import nibabel as nib

    return nib.as_closest_canonical(nib.load(str(_existing(path))))


# ---- the table -------------------------------------------------------------------------------


def table_rows(qc: T1wQC, participant_status: str) -> list[dict]:
    content = qc.record.content
    session = qc.record.t1w.session
    extraction = content.brain_extraction
    rows = []
    for space_qc in qc.spaces:
        row = {
            "participant_id": f"sub-{qc.record.t1w.subject}",
            "session_id": f"ses-{session}" if session else None,
            "source": content.source,
            "template": space_qc.template,
            "space": str(space_qc.space) if space_qc.space else None,
            "participant_status": participant_status,
            "status": space_qc.status,
            "status_reasons": "; ".join(space_qc.reasons) or None,
            "run_status": content.status,
        }
        for column in COLUMNS:
            if column not in row and column in space_qc.metrics:
                row[column] = space_qc.metrics[column]
        row.update(
            source_orientation=content.source_orientation,
            header_fixes="; ".join(content.header_fixes or ()) or None,
            skull_strip=content.skull_strip_decision,
            extraction_attempts=(len(extraction.attempts) or None) if extraction else None,
            extraction_kept=extraction.kept_attempt if extraction else None,
            preset=content.preset,
            seconds_total=content.total_seconds,
            step_seconds="; ".join(f"{k}={v:g}" for k, v in content.step_seconds.items()) or None,
        )
        rows.append({column: row.get(column) for column in COLUMNS})
    return rows


def format_value(value) -> str:
    """TSV cell text: BIDS 'n/a' for missing values, floats with 6 significant digits."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value).replace("\t", " ").replace("\n", " ")


def write_qc(output_dir: Path, qc: T1wQC, participant_status: str) -> Path:
    """The TSV of one T1w and its JSON sidecar (column meanings, thresholds, status)."""
    rows = table_rows(qc, participant_status)
    lines = ["\t".join(COLUMNS)]
    lines += ["\t".join(format_value(row[column]) for column in COLUMNS) for row in rows]
    path = drv.qc_path(output_dir, qc.record.t1w, "table")
    drv.write_text("\n".join(lines) + "\n", path)
    sidecar = {
        "Description": "Quality control of the normalisation of one T1w, one row per template "
        "(mninorm). Computed from the outputs on disk; rebuild with --reports-only.",
        "Status": qc.status,
        "ParticipantStatus": participant_status,
        "Thresholds": {
            rule.column: {
                "WarnWhenOutside": _json_range(rule.warn_range),
                "FailWhenOutside": _json_range(rule.fail_range),
                "Meaning": rule.why,
            }
            for rule in RULES
        },
        "StatusRules": "fail: the run failed, an output is missing, or a metric is outside its "
        "fail range; warn: a metric is outside its warn range; pass otherwise. The participant's "
        "status is the worst of its rows.",
        "Sources": [drv.derivative_uri(output_dir, qc.record.path)],
        **{column: {"Description": text} for column, text in COLUMNS.items()},
    }
    drv.write_json(sidecar, drv.qc_path(output_dir, qc.record.t1w, "sidecar"))
    return path


def read_qc_table(path: Path) -> list[dict]:
    """The rows of a QC TSV as dicts of strings ('n/a' kept as it is)."""
    header, *lines = path.read_text().splitlines()
    columns = header.split("\t")
    return [dict(zip(columns, line.split("\t"), strict=True)) for line in lines if line]


def _fmt_range(bounds: tuple[float, float]) -> str:
    low, high = bounds
    if low == -_INF:
        return f"above {high:g}"
    if high == _INF:
        return f"below {low:g}"
    return f"outside {low:g}-{high:g}"


def _json_range(bounds: tuple[float, float]) -> list:
    return [None if not math.isfinite(b) else b for b in bounds]
