"""Group level, step 4: the study's average maps and the voxel-wise group comparison, per space.

Each participant counts once: their value is the mean of their included T1w (sessions, runs) in
the space, so a participant scanned twice does not weigh double and the comparison's observations
are independent. Statistics stream over participants in label order, in float64 (Welford's
update; groups combined with Chan's formula): the participants are split into contiguous blocks
read in parallel (``Reading``: local processes, or the Dask cluster of ``--dask-scheduler``), each
holding one participant's images and its partial sums (count, mean, M2 per map kind and group) at a
time, and the partial sums are merged (``group/accumulate.py``). Memory does not grow with the
cohort, and the result does not depend on the order participants were processed in. (With lesion
masks, the log-Jacobian maps are read one participant at a time in this process; the permutation
model of ``group/inference.py`` loads the data it needs itself.)

Written per space (names in ``derivatives.GROUP_SPACE_OUTPUTS``):

- mean and SD (n - 1) of the normalised T1w, each T1w first divided by its median inside its own
  brain mask (scanners' intensity units differ; a study template needs a common scale);
- the share of participants whose brain mask covers each voxel (``label-brain_probseg``);
- mean and SD of both log-Jacobian maps (total: absolute local volume; nonlinear: after the
  global, affine size difference is removed);
- with ``--group-by``, for both log-Jacobians: two levels, the pooled-variance two-sample t map
  (the GLM with one indicator per group) and the mean difference; more levels, the one-way ANOVA
  F map. Uncorrected voxel-wise statistics; voxels where the variance is 0 get 0.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from bids_app import __version__
from bids_app.errors import MninormError
from bids_app.group.accumulate import RunningStats
from bids_app.group.cohort import CohortRow, SpaceCohort
from bids_app.group.collect import Grid, read_map
from bids_app.group.design import Design
from bids_app.group.lesions import (
    LesionFreeStats,
    any_lesion,
    lesion_sidecar,
    participant_lesions,
)
from bids_app.outputs import derivatives as drv

log = logging.getLogger(__name__)

JACOBIANS = {
    "total": "the whole template-to-T1w mapping (affine included): absolute local volume; "
    "use it when absolute volume matters",
    "nonlinear": "the nonlinear (SyN) part only: local volume after the global (affine) size "
    "difference is removed, as if head size were a nuisance covariate",
}


# Fewer participants than this per worker: read them in this process (starting processes costs
# more than it saves)
MIN_PARTICIPANTS_PER_WORKER = 16


@dataclass(frozen=True)
class Reading:
    """How the participants' maps are read: ``workers`` local processes, or the Dask ``client``."""

    workers: int = 1
    client: object | None = field(default=None, compare=False)

    def workers_for(self, participants: int) -> int:
        return max(1, min(self.workers, participants // MIN_PARTICIPANTS_PER_WORKER))


@dataclass(frozen=True)
class StatMap:
    kind: str  # "t" or "F"
    jacobian: str
    path: Path
    df: tuple[int, ...]
    peak: float  # the largest value (the report shows it)


@dataclass(frozen=True)
class SpaceMaps:
    """What was written for one space."""

    space_label: str
    participants: tuple[str, ...]
    written: tuple[Path, ...]
    stats: tuple[StatMap, ...] = ()
    design: Design | None = field(default=None, compare=False)


def write_space_maps(
    output_dir: Path, cohort: SpaceCohort, design: Design | None, reading: Reading = Reading()
) -> SpaceMaps:
    """Every map of one space (nothing when no T1w is included)."""
    grid = cohort.space.grid
    by_subject = _rows_by_subject(cohort)
    if not by_subject or grid is None:
        return SpaceMaps(cohort.space.label, (), ())
    context = _Context(output_dir, cohort, grid, by_subject, design)
    lesions = participant_lesions(by_subject, grid)
    sums = _accumulate(context, reading, jacobians=not lesions)
    written = _write_t1w_maps(context, sums)
    stats = []
    for jacobian in JACOBIANS:
        paths, stat_maps = _write_jacobian_maps(context, jacobian, sums, lesions)
        written += paths
        stats += stat_maps
    return SpaceMaps(cohort.space.label, tuple(by_subject), tuple(written), tuple(stats), design)


@dataclass(frozen=True)
class _Context:
    output_dir: Path
    cohort: SpaceCohort
    grid: Grid
    by_subject: dict = field(compare=False)  # subject -> included rows, in label order
    design: Design | None

    @property
    def label(self) -> str:
        return self.cohort.space.label

    def path(self, kind: str, jacobian: str = "", contrast: str = "") -> Path:
        return drv.group_space_path(self.output_dir, kind, self.label, jacobian, contrast)


def _rows_by_subject(cohort: SpaceCohort) -> dict[str, tuple[CohortRow, ...]]:
    by_subject: dict[str, list[CohortRow]] = {}
    for row in sorted(cohort.included, key=lambda r: r.result.sort_key()):
        by_subject.setdefault(row.result.subject, []).append(row)
    return {subject: tuple(rows) for subject, rows in sorted(by_subject.items())}


# ---- one participant's value -----------------------------------------------------------------


def _load(row: CohortRow, kind: str, grid: Grid) -> np.ndarray:
    return _load_at(row.result.subject, row.result.paths[kind], grid)


def _load_at(subject: str, path: Path, grid: Grid) -> np.ndarray:
    data, problem = read_map(path, grid)
    if problem:  # it was readable a moment ago: another job is rewriting this participant
        raise MninormError(
            f"sub-{subject}: {problem} (it changed while the group level was "
            "running); run the group level again once the participant level has finished"
        )
    return data


def scaled_t1w(row: CohortRow, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """(the normalised T1w divided by its median inside its own brain mask (float64), that mask)."""
    return _scaled_t1w_at(row.result.subject, row.result.paths, grid)


def _scaled_t1w_at(subject: str, paths: dict, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    t1w = _load_at(subject, paths["t1w"], grid).astype(np.float64)
    inside = _load_at(subject, paths["mask"], grid) > 0
    median = float(np.median(t1w[inside])) if inside.any() else 0.0
    if median > 0:
        t1w /= median
    else:
        log.warning("sub-%s: %s has no positive median inside its brain mask; not rescaled",
                    subject, paths["t1w"].name)  # fmt: skip
    return t1w, inside


def participant_mean(rows: tuple[CohortRow, ...], read) -> np.ndarray:
    """The mean of ``read(row)`` over one participant's rows (float64)."""
    total = read(rows[0]).astype(np.float64)
    for row in rows[1:]:
        total += read(row)
    if len(rows) > 1:
        total /= len(rows)
    return total


# ---- the partial sums, read in parallel ------------------------------------------------------


@dataclass(frozen=True)
class _Rows:
    """What a worker needs of one participant's rows (picklable, small)."""

    subject: str
    level: str | None  # the --group-by level when comparing, else None
    paths: tuple[dict, ...]  # per included T1w: kind -> Path


def _accumulate(context: _Context, reading: Reading, jacobians: bool) -> dict:
    """(kind, level) -> RunningStats: ("t1w", None), ("mask", None) and, with ``jacobians``,
    ("logjac_<jacobian>", the participant's group or None) for each Jacobian."""
    from bids_app.group.accumulate import accumulate_keyed

    design = context.design
    comparing = design is not None and design.usable and not design.numeric
    items = [
        _Rows(subject, design.level_of.get(subject) if comparing else None,
              tuple(dict(row.result.paths) for row in rows))
        for subject, rows in context.by_subject.items()
    ]  # fmt: skip
    step = partial(participant_sums, grid=context.grid, jacobians=jacobians)
    if reading.client is not None:
        log.info("%s: reading %d participants' maps on the Dask cluster", context.label, len(items))
        return accumulate_keyed(items, step, client=reading.client)
    workers = reading.workers_for(len(items))
    log.info("%s: reading %d participants' maps in %d process(es)", context.label, len(items),
             workers)  # fmt: skip
    return accumulate_keyed(items, step, workers=workers)


def participant_sums(item: _Rows, grid: Grid, jacobians: bool):
    """One participant's (key, float64 values): their T1w (scaled), brain mask and log-Jacobians,
    each the mean over their included T1w."""
    t1w, mask = None, None
    for paths in item.paths:  # a participant's sessions and runs: their mean counts once
        more_t1w, inside = _scaled_t1w_at(item.subject, paths, grid)
        t1w = more_t1w if t1w is None else t1w + more_t1w
        mask = inside.astype(np.float64) if mask is None else mask + inside
    count = len(item.paths)
    if count > 1:
        t1w /= count
        mask /= count
    yield ("t1w", None), t1w
    yield ("mask", None), mask
    if not jacobians:
        return
    for jacobian in JACOBIANS:
        kind = f"logjac_{jacobian}"
        values = _load_at(item.subject, item.paths[0][kind], grid).astype(np.float64)
        for paths in item.paths[1:]:
            values += _load_at(item.subject, paths[kind], grid)
        if count > 1:
            values /= count
        yield (kind, item.level), values


# ---- the maps --------------------------------------------------------------------------------


def _write_t1w_maps(context: _Context, sums: dict) -> list[Path]:
    grid = context.grid
    t1w_stats = sums[("t1w", None)]
    count = t1w_stats.count
    sources = _sources(context, ("t1w", "mask"))
    common = _common_sidecar(context, sources)
    written = [
        _write(context.path("t1w_mean"), t1w_stats.mean, {
            **common, "Description": f"Voxel-wise mean of {count} participants' normalised T1w, "
            "each divided by its median inside its own brain mask (relative intensity).",
            "Units": "relative intensity (median inside the brain = 1)",
        }, grid),
        _write(context.path("brain_probseg"), sums[("mask", None)].mean, {
            **common, "Description": f"Share of the {count} participants whose brain mask (in "
            "template space) covers each voxel.",
            "Units": "fraction", "Type": "Brain",
        }, grid),
    ]  # fmt: skip
    sd = t1w_stats.sd()
    if sd is not None:
        written.append(
            _write(context.path("t1w_sd"), sd, {
                **common, "Description": f"Voxel-wise standard deviation (n - 1) of {count} "
                "participants' normalised T1w, each divided by its median inside its brain mask.",
                "Units": "relative intensity",
            }, grid)
        )  # fmt: skip
    return written


def _write_jacobian_maps(
    context: _Context, jacobian: str, sums: dict, lesions: dict
) -> tuple[list[Path], list[StatMap]]:
    grid, design = context.grid, context.design
    kind = f"logjac_{jacobian}"
    comparing = design is not None and design.usable and not design.numeric
    lesion_free = LesionFreeStats(grid.shape) if lesions else None
    cells: dict[str | None, RunningStats] = {}
    if lesion_free is None:  # merged partial sums, per group
        cells = {level: stats for (key, level), stats in sums.items() if key == kind}
    for subject, rows in context.by_subject.items() if lesion_free is not None else ():
        level = design.level_of.get(subject) if comparing else None
        values = participant_mean(rows, lambda r: _load(r, kind, grid))
        lesion_free.add(values, lesions.get(subject))
        cells.setdefault(level, RunningStats()).add(values)
    written, stat_maps = [], []
    if comparing:
        groups = [cells[level] for level in design.levels]
        if lesions:  # tests need every participant at a voxel: lesioned voxels left out
            covered = any_lesion(lesions, grid.shape)
            for group in groups:
                group.mean[covered] = 0.0
                group.m2[covered] = 0.0
        if len(groups) == 2:
            written_now, stat = _write_t_maps(context, jacobian, *groups)
        else:
            written_now, stat = _write_f_map(context, jacobian, groups)
        written += written_now
        stat_maps.append(stat)
    overall = RunningStats()
    for level in sorted(cells, key=lambda key: (key is None, key or "")):
        overall.absorb(cells.pop(level))
    common = _common_sidecar(context, _sources(context, (kind,)))
    meaning = f"Log-Jacobian of {JACOBIANS[jacobian]}"
    mean, sd = overall.mean, overall.sd()
    if lesion_free is not None:  # per voxel, the participants whose lesion is elsewhere
        if jacobian == next(iter(JACOBIANS)):
            written.append(_write_lesion_free_count(context, lesion_free.count, lesions, common))
        mean, sd = lesion_free.mean, None if sd is None else lesion_free.sd()
        common = {**common, **lesion_sidecar(lesions)}
    written.append(
        _write(context.path("logjac_mean", jacobian), mean, {
            **common, "Description": f"Voxel-wise mean of {overall.count} participants' "
            f"log-Jacobian maps. {meaning}.", "Jacobian": jacobian,
            "Units": "log(volume ratio participant / template)",
        }, grid)
    )  # fmt: skip
    if sd is not None:
        written.append(
            _write(context.path("logjac_sd", jacobian), sd, {
                **common, "Description": f"Voxel-wise standard deviation (n - 1) of "
                f"{overall.count} participants' log-Jacobian maps. {meaning}.",
                "Jacobian": jacobian, "Units": "log(volume ratio)",
            }, grid)
        )  # fmt: skip
    return written, stat_maps


def _write_lesion_free_count(context: _Context, count, lesions, common) -> Path:
    return _write(context.path("lesion_free_count"), count, {
        **common, **lesion_sidecar(lesions), "Description": "Number of participants whose "
        "log-Jacobian counts at each voxel: those whose lesion mask does not cover it.",
        "Units": "participants",
    }, context.grid)  # fmt: skip


def two_sample_t(a: RunningStats, b: RunningStats) -> tuple[np.ndarray, np.ndarray, int]:
    """(t, mean difference a - b, degrees of freedom) with the pooled variance."""
    df = a.count + b.count - 2
    effect = a.mean - b.mean
    variance = a.m2 + b.m2
    variance *= (1.0 / a.count + 1.0 / b.count) / df
    np.sqrt(variance, out=variance)
    t = np.divide(effect, variance, out=np.zeros_like(effect), where=variance > 0)
    return t, effect, df


def one_way_f(groups: list[RunningStats]) -> tuple[np.ndarray, tuple[int, int]]:
    """(F, (between df, within df)) of a one-way ANOVA."""
    total = sum(g.count for g in groups)
    df = (len(groups) - 1, total - len(groups))
    grand = sum(g.mean * g.count for g in groups) / total
    between = sum(g.count * (g.mean - grand) ** 2 for g in groups) / df[0]
    within = sum(g.m2 for g in groups) / df[1]
    return np.divide(between, within, out=np.zeros_like(between), where=within > 0), df


def _write_t_maps(context: _Context, jacobian, a, b) -> tuple[list[Path], StatMap]:
    design = context.design
    t, effect, df = two_sample_t(a, b)
    first, second = design.levels
    sidecar = _stat_sidecar(context, jacobian, "t", [df])
    t_path = context.path("t", jacobian, design.contrast)
    effect_path = context.path("effect", jacobian, design.contrast)
    written = [
        _write(t_path, t, {
            **sidecar, "Description": f"Two-sample t statistic (pooled variance) of the {jacobian} "
            f"log-Jacobian maps, {first!r} minus {second!r}: > 0 where the {first!r} group's "
            f"tissue is larger than the {second!r} group's, relative to the template. Uncorrected.",
        }, context.grid),
        _write(effect_path, effect, {
            **sidecar, "Description": f"Mean {jacobian} log-Jacobian of {first!r} minus that of "
            f"{second!r} (the effect the t map tests; exp(value) is the ratio of local volumes).",
            "Units": "log(volume ratio)",
        }, context.grid),
    ]  # fmt: skip
    log.info("%s: t map of %s (%s, df %d): max t %.2f, min t %.2f", context.label, design.column,
             jacobian, df, float(t.max()), float(t.min()))  # fmt: skip
    return written, StatMap("t", jacobian, t_path, (df,), float(np.abs(t).max()))


def _write_f_map(context: _Context, jacobian, groups) -> tuple[list[Path], StatMap]:
    design = context.design
    f, df = one_way_f(groups)
    path = context.path("F", jacobian, design.contrast)
    _write(path, f, {
        **_stat_sidecar(context, jacobian, "F", list(df)),
        "Description": f"One-way ANOVA F statistic of the {jacobian} log-Jacobian maps across the "
        f"{len(groups)} levels of {design.column!r}: large where the groups' mean local volumes "
        "differ. Uncorrected.",
    }, context.grid)  # fmt: skip
    return [path], StatMap("F", jacobian, path, df, float(f.max()))


# ---- sidecars --------------------------------------------------------------------------------


def _write(path: Path, data: np.ndarray, sidecar: dict, grid: Grid) -> Path:
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(data, dtype=np.float32), grid.affine)
    drv.write_nifti(img, path)  # sets the units (mm)
    drv.write_json(sidecar, drv.sidecar_path(path))
    return path


def _sources(context: _Context, kinds: tuple[str, ...]) -> list[str]:
    return [
        drv.derivative_uri(context.output_dir, row.result.paths[kind])
        for rows in context.by_subject.values()
        for row in rows
        for kind in kinds
    ]


def _common_sidecar(context: _Context, sources: list[str]) -> dict:
    space = context.cohort.space
    sidecar = {
        "Space": str(space.space),
        "Grid": f"{space.grid.origin} grid, {'x'.join(map(str, space.grid.shape))} voxels of "
        f"{'x'.join(f'{z:g}' for z in space.grid.zooms)} mm",
        "Participants": [f"sub-{s}" for s in context.by_subject],
        "ParticipantCount": len(context.by_subject),
        "T1wCount": sum(len(rows) for rows in context.by_subject.values()),
        "OnePerParticipant": "each participant's value is the mean of their included T1w "
        "(sessions, runs) in this space",
        "Excluded": _excluded(context.cohort),
        "Sources": sources,
        "GeneratedBy": {"Name": "mninorm", "Version": __version__, "Level": "group"},
    }
    if space.template is not None:
        template = space.template
        sidecar["SpatialReference"] = (
            f"https://templateflow.s3.amazonaws.com/tpl-{template.name}/{template.t1w_path.name}"
        )
    return sidecar


def _excluded(cohort: SpaceCohort, design: Design | None = None) -> list[dict]:
    excluded = [
        {"Participant": f"sub-{row.result.subject}", "Source": row.result.source,
         "Reason": row.exclusion}
        for row in cohort.rows
        if not row.included
    ]  # fmt: skip
    if design is not None:
        for row in cohort.included:
            reason = design.excluded.get(row.result.subject)
            if reason:
                excluded.append(
                    {"Participant": f"sub-{row.result.subject}", "Source": row.result.source,
                     "Reason": reason}
                )  # fmt: skip
    return excluded


def _stat_sidecar(context: _Context, jacobian: str, statistic: str, df: list[int]) -> dict:
    design = context.design
    compared = {s: rows for s, rows in context.by_subject.items() if s in design.level_of}
    return {
        "Statistic": statistic,
        "DegreesOfFreedom": df,
        "MultipleComparisonCorrection": "none: uncorrected voxel-wise statistics; correct them "
        "(e.g. permutations with threshold-free cluster enhancement) before any claim",
        "Jacobian": {"Kind": jacobian, "Meaning": JACOBIANS[jacobian]},
        "GroupBy": {
            "Column": design.column,
            "File": design.source.name if design.source else None,
            "Levels": list(design.levels),
            "Contrast": f"{design.levels[0]} minus {design.levels[1]}"
            if statistic == "t"
            else "any difference between the levels' means",
            "Counts": design.counts,
            "Participants": {
                level: [f"sub-{s}" for s in design.members(level)] for level in design.levels
            },
        },  # fmt: skip
        "Model": "two-sample t test with pooled variance (the GLM with one indicator per group)"
        if statistic == "t"
        else "one-way ANOVA (the GLM with one indicator per level)",
        "ZeroVarianceVoxels": "set to 0",
        "Space": str(context.cohort.space.space),
        "OnePerParticipant": "each participant's value is the mean of their included T1w "
        "(sessions, runs) in this space",
        "Included": [row.result.source for rows in compared.values() for row in rows],
        "Excluded": _excluded(context.cohort, design),
        "Sources": [
            drv.derivative_uri(context.output_dir, row.result.paths[f"logjac_{jacobian}"])
            for rows in compared.values()
            for row in rows
        ],
        "GeneratedBy": {"Name": "mninorm", "Version": __version__, "Level": "group"},
    }
