"""The group level from top to bottom: collect -> cohort -> design -> maps -> table -> report.

It reads only what the participant level wrote in ``output_dir`` (and, for ``--group-by``, the
input dataset's ``participants.tsv``), so it can run long after, elsewhere, and as often as
participants are added: every run recomputes everything from the files there now. Outputs are
written atomically; our group outputs that this run did not rewrite (a space no participant has
any more, maps that can no longer be made) are removed, files of any other origin never are.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from bids_app.errors import MninormError
from bids_app.group.cohort import build_cohort, write_table
from bids_app.group.collect import collect
from bids_app.group.design import Design, build_design, read_participants
from bids_app.group.maps import Reading, write_space_maps
from bids_app.group.model import ModelSpec
from bids_app.group.report import SpaceSection, write_group_report
from bids_app.outputs import derivatives as drv

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GroupSettings:
    output_dir: Path
    bids_dir: Path | None = None  # only for participants.tsv; may be absent
    group_by: str | None = None  # a participants.tsv column
    participant_labels: tuple[str, ...] = ()
    session_labels: tuple[str, ...] = ()
    model: ModelSpec | None = None  # None: the uncorrected maps only (no smoothing, covariates)
    workers: int = 1  # local processes reading the maps (--nthreads)
    dask_scheduler: str | None = None  # read them on this Dask cluster instead


@dataclass(frozen=True)
class GroupOutcome:
    table: Path
    report: Path
    written: tuple[Path, ...]  # the maps
    removed: tuple[Path, ...]  # stale group outputs of ours
    spaces: tuple[str, ...]  # every space found, '<template>[:cohort-N][:res-N]'
    spaces_without_maps: tuple[str, ...]
    design_problems: tuple[str, ...]  # why --group-by gave no comparison (per space)


def run_group(settings: GroupSettings, fetch_template: Callable | None = None) -> GroupOutcome:
    if fetch_template is None:
        from bids_app.templates import fetch_template
    output_dir = Path(settings.output_dir)
    client = None
    if settings.dask_scheduler:
        from bids_app.scheduler import connect

        client = connect(settings.dask_scheduler)
    try:
        return _collect_and_write(settings, output_dir, fetch_template, client)
    finally:
        if client is not None:
            client.close()


def _collect_and_write(settings: GroupSettings, output_dir: Path, fetch_template, client):
    from bids_app.reports.participant import cached_templates

    collection = collect(
        output_dir,
        cached_templates(fetch_template),
        settings.participant_labels,
        settings.session_labels,
        settings.workers,
        client,
    )
    cohorts = [build_cohort(space) for space in collection.spaces]
    column = settings.group_by
    table = read_participants(settings.bids_dir, column) if column else None
    atlases = {}  # OutputSpace -> Atlas
    if column and settings.model is not None and settings.model.atlas:
        from bids_app.group.clusters import load_atlases

        # a wrong --atlas (or a TemplateFlow atlas not here) fails before any work
        atlases = load_atlases(settings.model.atlas, [c.space.space for c in cohorts])
    if column and settings.model is not None:
        from bids_app.group.inference import permuting, require_stats_extra

        if permuting(settings.model):
            require_stats_extra()  # before any work
    reading = Reading(settings.workers, client)
    try:
        return _write_outputs(
            output_dir, collection, cohorts, column, table, settings.model, atlases, reading
        )
    except OSError as err:  # disk full, permissions: the previous outputs are still whole
        raise MninormError(
            f"could not write the group outputs in {output_dir} ({err}); make room or fix the "
            "permissions, then run the group level again (outputs already there are unchanged or "
            "complete: every file is written whole or not at all)"
        ) from err


def _write_outputs(
    output_dir, collection, cohorts, column, table, spec, atlases, reading: Reading
) -> GroupOutcome:
    sections, written, messages, problems, empty = [], [], [], [], []
    for cohort in cohorts:
        design = build_design(column, table, cohort.subjects) if column else None
        if design is not None and not design.usable:
            problems.append(f"{cohort.space.space}: {design.problem}")
        maps = write_space_maps(output_dir, cohort, design, reading)
        inference = None
        if maps.written and design is not None and design.usable and spec is not None:
            atlas = atlases.get(cohort.space.space)
            inference = _infer(output_dir, cohort, design, table, spec, atlas, reading)
            if not inference.model.usable:
                problems.append(f"{cohort.space.space}: {inference.model.problem}")
            written += inference.written
        if not maps.written:
            empty.append(str(cohort.space.space))
            messages.append(
                f"{cohort.space.space}: no group maps, no T1w is usable "
                f"({len(cohort.rows)} found; see the table for why)"
            )
        written += maps.written
        sections.append(SpaceSection(cohort, maps, design, inference=inference))
    for message in messages:
        log.error("%s", message)
    for problem in dict.fromkeys(problems):
        log.error("%s", problem)
    values, table_column = _group_values(table, column, collection.subjects)
    sections = [replace(section, group_values=values) for section in sections]
    table_path = write_table(output_dir, cohorts, values, table_column)
    report = write_group_report(output_dir, sections, [*messages, *dict.fromkeys(problems)])
    removed = remove_stale_outputs(output_dir, sections, set(written), column and _contrast(column))
    drv.add_to_bidsignore(output_dir)
    included = sum(len(c.included) for c in cohorts)
    log.info(
        "group level: %d participant(s), %d T1w x space row(s), %d in the maps; %s; %s",
        len(collection.subjects), sum(len(c.rows) for c in cohorts), included, table_path, report,
    )  # fmt: skip
    return GroupOutcome(
        table_path, report, tuple(written), tuple(removed),
        tuple(str(c.space.space) for c in cohorts), tuple(empty), tuple(dict.fromkeys(problems)),
    )  # fmt: skip


def _infer(output_dir, cohort, design, table, spec, atlas, reading=None):
    """The model of one space and, when it can be estimated, its maps and results table."""
    from bids_app.group.inference import SpaceInference, permuting, write_space_inference
    from bids_app.group.model import build_model

    volumes = {}
    for row in cohort.included:
        volumes.setdefault(row.result.subject, []).append(row.metrics.get("brain_volume_ml"))
    volumes = {s: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
               for s, v in ((s, np.array(v, float)) for s, v in volumes.items())}  # fmt: skip
    model = build_model(design, table, spec.covariates, volumes)
    if not model.usable:
        return SpaceInference(model, spec)
    if permuting(spec):
        log.info("%s: the permutation model loads every compared participant's maps "
                 "(smoothed, inside the mask) into memory", cohort.space.space)  # fmt: skip
    return write_space_inference(output_dir, cohort, model, spec, atlas, reading)


def _group_values(table, column: str | None, subjects) -> tuple[dict, str | None]:
    """subject -> the --group-by value, for the table (when participants.tsv has the column)."""
    if table is None or table.problem or column not in table.columns:
        return {}, None
    values = {}
    for subject in subjects:
        value = (table.values.get(subject) or {}).get(column)
        values[subject] = None if value in (None, "", "n/a") else value
    return values, column


def _contrast(column: str) -> str:
    return Design(column).contrast


def remove_stale_outputs(
    output_dir: Path, sections: list[SpaceSection], written: set[Path], contrast: str | None
) -> list[Path]:
    """Remove our maps (and sidecars) that this run did not rewrite, except the statistics of
    other --group-by columns in spaces that still exist (another question; their sidecars say
    who was in them), and our outputs under an older version's names (rewritten under the new)."""
    folder = drv.group_dir(output_dir)
    if not folder.is_dir():
        return []
    spaces = {section.space.label for section in sections}
    removed = []
    for path in sorted(folder.iterdir()):
        if path.is_file() and drv.is_legacy_group_output(path.name):
            path.unlink()
            removed.append(path)
            log.info("removed %s: an older mninorm's name", path.relative_to(output_dir))
            continue
        parsed = drv.parse_group_output(path.name)
        if parsed is None or not path.is_file():
            continue  # not ours
        _, space, file_contrast = parsed
        stem = path.name.removesuffix(".json")
        if path in written or any(path.with_name(stem + e) in written for e in (".nii.gz", ".tsv")):
            continue
        other_question = file_contrast is not None and file_contrast != contrast
        if space in spaces and other_question:
            continue
        path.unlink()
        removed.append(path)
        log.info("removed the stale group output %s", path.relative_to(output_dir))
    return removed
