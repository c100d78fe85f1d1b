"""The benchmark loop: for every case and setting, run the setting's child process, measure it,
score its transforms, and rewrite the CSV (so an interrupted run loses at most one row).

Rows already in the CSV are not run again unless ``force`` (``skipped`` rows are re-checked: the
reason, e.g. a missing mninorm option, may have gone).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

from benchmarks import report, score
from benchmarks.cases import PAIRS, Case, CaseDef, prepare_case
from benchmarks.measure import run_measured
from benchmarks.report import Row
from benchmarks.settings import (
    REFERENCE,
    SETTINGS,
    Setting,
    build_command,
    get_setting,
    mninorm_transforms,
)

log = logging.getLogger(__name__)

DEFAULT_SEED = 20240229  # mninorm's default: every setting gets the same one


def run_benchmark(
    cases: list[CaseDef],
    settings: list[Setting],
    out_dir: Path,
    *,
    force: bool = False,
    threads: int = 2,
    seed: int = DEFAULT_SEED,
    timeout_scale: float = 1.0,
    argv: list[str] | None = None,
) -> dict[tuple[str, str], Row]:
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    report.record_invocation(out_dir, argv or ["(python API)"], started, None)
    rows = report.read_rows(out_dir)
    for definition in cases:
        todo = [s for s in settings if _needs_run(rows.get((definition.name, s.name)), force)]
        for setting in settings:
            if setting not in todo:
                log.info("%s / %s: in the CSV already, not run again (--force does)",
                         definition.name, setting.name)  # fmt: skip
        if not todo:
            continue
        try:
            case = prepare_case(definition, out_dir)
        except Exception as err:  # missing data, a bad truth: record it for these rows, go on
            log.error("%s: the case could not be built: %s", definition.name, err)
            for setting in todo:
                rows[(definition.name, setting.name)] = Row(
                    definition.name, definition.kind, setting.name, "failed",
                    f"case not built: {err}", definition.grid_mm,
                )  # fmt: skip
            report.write_rows(out_dir, rows)
            continue
        for setting in todo:
            row = run_one(case, setting, out_dir, threads=threads, seed=seed,
                          timeout_scale=timeout_scale)  # fmt: skip
            rows[row.key] = row
            report.write_rows(out_dir, rows)
            _log_row(row)
    rows = update_pairs(rows, out_dir, force=force)
    report.write_rows(out_dir, rows)
    report.record_invocation(out_dir, argv or ["(python API)"], started, time.time())
    return rows


def _needs_run(previous: Row | None, force: bool) -> bool:
    # A skipped row is re-checked: its reason (a missing mninorm option) may be gone.
    return force or previous is None or previous.status == "skipped"


def run_one(case: Case, setting: Setting, out_dir: Path, *, threads: int, seed: int,
            timeout_scale: float = 1.0) -> Row:  # fmt: skip
    run_dir = out_dir / "runs" / case.name / setting.name
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    base = Row(case.name, case.kind, setting.name, "ok", grid_mm=case.definition.grid_mm,
               threads=threads, seed=seed)  # fmt: skip
    command = build_command(setting, case, run_dir, seed, threads)
    if command.skip_reason:
        return replace(base, status="skipped", reason=command.skip_reason)
    log.info("%s / %s: running (%s)", case.name, setting.name, setting.what)
    load_start = os.getloadavg()[0]
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    measured = run_measured(
        command.argv, env=command.env, log_path=run_dir / "log.txt",
        timeout_s=setting.timeout_s(case.definition.grid_mm) * timeout_scale,
    )  # fmt: skip
    base = replace(
        base, wall_s=measured.wall_s, cpu_s=measured.cpu_s, peak_rss_mb=measured.peak_rss_mb,
        load1_start=load_start, load1_end=os.getloadavg()[0], started=started,
        returncode=measured.returncode,
    )  # fmt: skip
    if measured.timed_out:
        return replace(base, status="timeout", reason=f"stopped after {measured.wall_s:.0f} s")
    if measured.returncode != 0:
        return replace(base, status="failed", reason=_last_line(run_dir / "log.txt"))
    try:
        transforms = (
            mninorm_transforms(case, run_dir)
            if setting.runner == "mninorm"
            else json.loads((run_dir / "transforms.json").read_text())["transforms"]
        )
        return replace(base, **score_run(case, transforms, run_dir))
    except Exception as err:  # a broken transform file is that setting's failure, not ours
        log.exception("%s / %s: scoring failed", case.name, setting.name)
        return replace(base, status="failed", reason=f"scoring: {err}")


def score_run(case: Case, transforms: list[str], run_dir: Path) -> dict:
    """The figures of one run; also keeps what pairs need (the warped labels) in ``run_dir``."""
    folding = score.score_folding(transforms, case.fixed, case.fixed_mask, run_dir)
    figures = {"folding_share": folding.share, "jacobian_min": folding.jacobian_min}
    if case.kind == "synthetic":
        errors = score.score_landmarks(transforms, case.landmarks)
        figures.update(landmark_mean_mm=errors.mean_mm, landmark_p95_mm=errors.p95_mm,
                       landmark_max_mm=errors.max_mm)  # fmt: skip
    else:
        score.warp_labels(transforms, case.fixed, case.labels, run_dir / "labels_in_fixed.nii.gz")
        warped_mask = score.warp_labels(
            transforms, case.fixed, case.moving_mask, run_dir / "mask_in_fixed.nii.gz"
        )
        figures["dice_brain_mask"] = score.dice(
            score.read_labels(warped_mask) > 0, score.read_labels(case.fixed_mask) > 0
        )
    return figures


def update_pairs(rows: dict, out_dir: Path, *, force: bool = False) -> dict:
    """Label overlap between the two participants of each pair, per setting where both ran."""
    rows = dict(rows)
    for pair, (first, second) in PAIRS.items():
        for setting in dict.fromkeys(s for (_, s) in rows):
            a, b = rows.get((first, setting)), rows.get((second, setting))
            if a is None or b is None or not (a.ok and b.ok):
                continue
            current = rows.get((pair, setting))
            newest = max(a.started, b.started)
            if current is not None and current.started >= newest and not force:
                continue
            rows[(pair, setting)] = pair_row(pair, a, b, out_dir)
            _log_row(rows[(pair, setting)])
    return rows


def pair_row(pair: str, a: Row, b: Row, out_dir: Path) -> Row:
    folders = [out_dir / "runs" / row.case / row.setting for row in (a, b)]
    overlap = score.label_overlap(
        *(score.read_labels(folder / "labels_in_fixed.nii.gz") for folder in folders)
    )
    details = out_dir / "runs" / pair / a.setting / "overlap.json"
    details.parent.mkdir(parents=True, exist_ok=True)
    details.write_text(json.dumps(overlap.per_structure, indent=1))
    return Row(
        pair, "pair", a.setting, "ok", grid_mm=a.grid_mm,
        wall_s=a.wall_s + b.wall_s, cpu_s=a.cpu_s + b.cpu_s,
        peak_rss_mb=max(a.peak_rss_mb, b.peak_rss_mb),
        dice_subcortical=overlap.subcortical_mean, dice_cortical=overlap.cortical_mean,
        dice_white_matter=overlap.white_matter_mean,
        dice_brain_mask=(a.dice_brain_mask + b.dice_brain_mask) / 2,
        folding_share=max(a.folding_share, b.folding_share),
        jacobian_min=min(a.jacobian_min, b.jacobian_min),
        threads=a.threads, seed=a.seed, started=max(a.started, b.started),
    )  # fmt: skip


def write_report(out_dir: Path, rows: dict) -> Path:
    descriptions = {name: s.what for name, s in SETTINGS.items()}
    for _, name in rows:
        if name not in descriptions:
            try:
                descriptions[name] = get_setting(name).what
            except ValueError:  # a setting made elsewhere (the tests'): its name says enough
                continue
    return report.write_markdown(out_dir, rows, REFERENCE, descriptions)


def _last_line(log_path: Path) -> str:
    lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip()[:300] if lines else "no output"


def _log_row(row: Row) -> None:
    shown = (
        ("landmark_mean_mm", "landmarks mean {:.2f} mm"),
        ("dice_subcortical", "Dice subcortical {:.3f}"),
        ("dice_cortical", "cortical {:.3f}"),
        ("dice_brain_mask", "Dice brain mask {:.3f}"),
        ("folding_share", "folding {:.2%}"),
    )
    figures = ", ".join(
        text.format(getattr(row, name)) for name, text in shown if getattr(row, name) is not None
    )
    timing = f"{row.wall_s:.0f} s" if row.wall_s is not None else ""
    log.info("%s / %s: %s %s %s %s", row.case, row.setting, row.status, timing, figures,
             row.reason)  # fmt: skip
