"""Group level, step 2: the cohort QC table, robust outlier flags, and which T1w enter the maps.

One row per T1w and space. The status and metrics are the participant level's own QC table
(``<source>_desc-mninorm_qc.tsv``, graded by fixed thresholds in ``bids_app/reports/qc.py``). On
top of them, each metric is compared with the cohort, per space, robustly: a T1w is an outlier when
``|x - median| / (1.4826 MAD) > 3.5`` on the side that signals a problem (the modified z-score of
Iglewicz and Hoaglin; where MAD is 0, ``1.2533 x`` the mean absolute deviation replaces it). A
normalisation can pass every fixed threshold and still be far from all the others.

A T1w enters the group maps when its files are usable and its QC status is pass or warn; outliers
are flagged, not dropped (a person may look unusual for good reasons: look at them first).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bids_app import __version__
from bids_app.group.collect import SpaceResults, T1wResult
from bids_app.outputs import derivatives as drv
from bids_app.reports import qc

log = logging.getLogger(__name__)

INCLUDED_STATUSES = ("pass", "warn")
ROBUST_Z_LIMIT = 3.5
MIN_ROWS_FOR_OUTLIERS = 10  # below, MAD is so noisy that normal values get flagged
_MAD_TO_SD = 1.4826  # MAD of a normal sample x 1.4826 = its standard deviation
_MEAN_AD_TO_SD = 1.2533  # the same for the mean absolute deviation (sqrt(pi / 2))

# Metric -> the side that signals a problem: "low", "high" or "both".
ROBUST_METRICS: dict[str, str] = {
    "ncc": "low",
    "nmi": "low",
    "dice": "low",
    "folding_fraction": "high",
    "logjac_iqr": "high",
    "logjac_median": "both",
    "affine_volume_ratio": "both",
    "brain_volume_ml": "both",
}
METRICS = (
    "ncc", "mi", "nmi", "dice", "jacobian_min", "jacobian_max", "folding_fraction",
    "logjac_median", "logjac_iqr", "affine_volume_ratio", "brain_volume_ml",
)  # fmt: skip

# The group table's columns (before the metrics, whose meanings are qc.COLUMNS').
COLUMNS: dict[str, str] = {
    "participant_id": "participant label with 'sub-'",
    "session_id": "session label with 'ses-', n/a without sessions",
    "run": "run label, n/a without runs",
    "source": "the input T1w (BIDS URI)",
    "template": "TemplateFlow identifier of the template",
    "space": "the template grid of this row's maps: '<template>[:cohort-N][:res-N]' (a custom "
    "template: its folder)",
    "status": "pass / warn / fail from the participant level's QC (fixed thresholds); n/a when "
    "its QC table is missing",
    "status_reasons": "why the status is not 'pass', from the participant level's QC",
    "outlier": "yes when a QC metric is a robust outlier of this space's cohort (see "
    "'OutlierRule'); n/a when there were too few rows to judge",
    "outlier_reasons": "each outlying metric with its robust z-score ('; '-separated)",
    "robust_z_max": "the largest robust z-score of the row's metrics, on the side that signals a "
    "problem (sort on it to see the most unusual first)",
    "included": "yes if this T1w enters the space's group maps",
    "exclusion_reason": "why it does not, n/a if it does",
}


@dataclass(frozen=True)
class CohortRow:
    result: T1wResult
    status: str  # pass / warn / fail, or n/a without a QC table
    status_reasons: str | None
    metrics: dict = field(compare=False, hash=False)  # metric -> float (nan: not measured)
    robust_z: dict = field(default_factory=dict, compare=False, hash=False)
    outlier_reasons: tuple[str, ...] = ()
    exclusion: str | None = None  # why it is not in the group maps; None: it is

    @property
    def included(self) -> bool:
        return self.exclusion is None

    @property
    def judged(self) -> bool:
        return bool(self.robust_z)

    @property
    def robust_z_max(self) -> float:
        values = [z for z in self.robust_z.values() if math.isfinite(z)]
        return max(values) if values else math.nan


@dataclass(frozen=True)
class SpaceCohort:
    space: SpaceResults
    rows: tuple[CohortRow, ...]
    outlier_note: str | None = None  # why outliers were not judged

    @property
    def included(self) -> tuple[CohortRow, ...]:
        return tuple(row for row in self.rows if row.included)

    @property
    def subjects(self) -> tuple[str, ...]:
        """Participants with at least one included T1w, sorted."""
        return tuple(sorted({row.result.subject for row in self.included}))


def build_cohort(space: SpaceResults) -> SpaceCohort:
    rows = [_row(result) for result in space.results]
    rows, note = flag_outliers(rows)
    for row in rows:
        if row.outlier_reasons:
            log.warning("sub-%s: %s (%s) is a QC outlier: %s", row.result.subject,
                        row.result.prefix, space.space, "; ".join(row.outlier_reasons))  # fmt: skip
    return SpaceCohort(space, tuple(rows), note)


def _row(result: T1wResult) -> CohortRow:
    status, reasons, metrics, problem = _read_qc(result)
    if result.problem:
        exclusion = result.problem
    elif problem:
        exclusion = problem
    elif status not in INCLUDED_STATUSES:
        exclusion = f"QC {status}: {reasons or 'see its QC table'}"
    else:
        exclusion = None
    return CohortRow(result, status, reasons, metrics, exclusion=exclusion)


def _read_qc(result: T1wResult) -> tuple[str, str | None, dict, str | None]:
    """(status, status reasons, metrics, problem) from the T1w's participant-level QC table."""
    path = result.paths["qc"]
    rebuild = (
        f"rebuild it with `mninorm bids_dir output_dir participant --reports-only "
        f"--participant-label {result.subject}`"
    )
    empty = dict.fromkeys(METRICS, math.nan)
    if not path.is_file():
        return "n/a", None, empty, f"its QC table {path.name} is missing: {rebuild}"
    try:
        rows = qc.read_qc_table(path)
    except (OSError, ValueError, UnicodeDecodeError) as err:
        return "n/a", None, empty, f"its QC table {path.name} cannot be read ({err}): {rebuild}"
    row = next((r for r in rows if r.get("template") == result.space.key), None)
    if row is None or row.get("status") not in qc.STATUSES:
        return (
            "n/a",
            None,
            empty,
            f"its QC table {path.name} has no row for {result.space.key}",
        )
    metrics = {metric: _number(row.get(metric)) for metric in METRICS}
    reasons = row.get("status_reasons")
    return row["status"], None if reasons in (None, "", "n/a") else reasons, metrics, None


def _number(text: str | None) -> float:
    try:
        return float(text) if text not in (None, "", "n/a") else math.nan
    except ValueError:
        return math.nan


# ---- robust outliers -------------------------------------------------------------------------


def robust_z(values: np.ndarray) -> np.ndarray:
    """Modified z-scores ``(x - median) / (1.4826 MAD)`` (MAD 0: 1.2533 mean absolute deviation;
    both 0: every value is the median, all scores 0)."""
    values = np.asarray(values, dtype=np.float64)
    median = np.median(values)
    deviations = np.abs(values - median)
    scale = _MAD_TO_SD * np.median(deviations)
    if scale == 0:
        scale = _MEAN_AD_TO_SD * deviations.mean()
    if scale == 0:
        return np.zeros_like(values)
    return (values - median) / scale


def flag_outliers(rows: list[CohortRow]) -> tuple[list[CohortRow], str | None]:
    """Rows with ``robust_z`` and ``outlier_reasons`` set, per metric over the rows that have it."""
    from dataclasses import replace

    scores: dict[int, dict[str, float]] = {i: {} for i in range(len(rows))}
    reasons: dict[int, list[str]] = {i: [] for i in range(len(rows))}
    judged_any = False
    for metric, side in ROBUST_METRICS.items():
        measured = [i for i, row in enumerate(rows) if math.isfinite(row.metrics[metric])]
        if len(measured) < MIN_ROWS_FOR_OUTLIERS:
            continue
        judged_any = True
        z = robust_z(np.array([rows[i].metrics[metric] for i in measured]))
        for i, score in zip(measured, z, strict=True):
            severity = {"low": -score, "high": score, "both": abs(score)}[side]
            scores[i][metric] = float(severity)
            if severity > ROBUST_Z_LIMIT:
                value = rows[i].metrics[metric]
                reasons[i].append(f"{metric} = {value:.4g} (robust z {score:+.1f})")
    note = None
    if not judged_any:
        count = sum(math.isfinite(row.metrics["ncc"]) for row in rows)
        note = (
            f"outliers not judged: {count} T1w with QC metrics in this space, "
            f"{MIN_ROWS_FOR_OUTLIERS} needed"
        )
    flagged = [
        replace(row, robust_z=scores[i], outlier_reasons=tuple(reasons[i]))
        for i, row in enumerate(rows)
    ]
    return flagged, note


# ---- the table -------------------------------------------------------------------------------


def table_rows(cohorts: list[SpaceCohort], group_values: dict | None = None, column=None):
    """Every row as a dict of TSV cells (``group_values``: subject -> the --group-by value)."""
    lines = []
    for cohort in cohorts:
        for row in cohort.rows:
            result = row.result
            cells = {
                "participant_id": f"sub-{result.subject}",
                "session_id": f"ses-{result.session}" if result.session else None,
                "run": result.run,
                "source": result.source,
                "template": result.space.key,
                "space": str(result.space),
                "status": row.status,
                "status_reasons": row.status_reasons,
                "outlier": ("yes" if row.outlier_reasons else "no") if row.judged else None,
                "outlier_reasons": "; ".join(row.outlier_reasons) or None,
                "robust_z_max": row.robust_z_max,
                "included": "yes" if row.included else "no",
                "exclusion_reason": row.exclusion,
            }
            if column is not None:
                cells[group_column(column)] = (group_values or {}).get(result.subject)
            cells.update({metric: row.metrics[metric] for metric in METRICS})
            lines.append(cells)
    return lines


def group_column(column: str) -> str:
    """The --group-by column's name in the table (prefixed if it clashes with ours)."""
    return f"participants_{column}" if column in COLUMNS or column in METRICS else column


def write_table(
    output_dir: Path, cohorts: list[SpaceCohort], group_values=None, column=None
) -> Path:
    """``group/desc-mninorm_groupqc.tsv`` and its JSON sidecar."""
    rows = table_rows(cohorts, group_values, column)
    columns = list(COLUMNS)
    if column is not None:
        columns.append(group_column(column))
    columns += list(METRICS)
    lines = ["\t".join(columns)]
    lines += ["\t".join(qc.format_value(row[c]) for c in columns) for row in rows]
    path = drv.group_table_path(output_dir, "qc")
    drv.write_text("\n".join(lines) + "\n", path)
    descriptions = {**COLUMNS, **{m: qc.COLUMNS[m] for m in METRICS}}
    if column is not None:
        descriptions[group_column(column)] = f"the participant's '{column}' in participants.tsv"
    sidecar = {
        "Description": "Cohort QC of the normalisations (mninorm group level): one row per T1w "
        "and output space. Rebuilt from the files in output_dir at every group-level run.",
        "InclusionRule": "a T1w enters the space's group maps when its run succeeded, its "
        "template-space maps can be read and lie on the space's grid, and its QC status is "
        + " or ".join(INCLUDED_STATUSES),
        "OutlierRule": {
            "Score": "modified z-score (x - median) / (1.4826 x MAD) per metric and space, "
            "over the rows that have the metric; where MAD is 0, 1.2533 x the mean absolute "
            "deviation replaces it",
            "Limit": ROBUST_Z_LIMIT,
            "Sides": ROBUST_METRICS,
            "MinimumRows": MIN_ROWS_FOR_OUTLIERS,
            "Effect": "flagged only: outliers stay in the group maps unless their QC status fails",
        },
        "Sources": sorted(
            {
                drv.derivative_uri(output_dir, row.result.paths["qc"])
                for cohort in cohorts
                for row in cohort.rows
                if row.result.paths["qc"].is_file()
            }
        ),
        "GeneratedBy": {"Name": "mninorm", "Version": __version__},
        **{name: {"Description": text} for name, text in descriptions.items()},
    }
    drv.write_json(sidecar, drv.group_table_path(output_dir, "qc_sidecar"))
    return path
