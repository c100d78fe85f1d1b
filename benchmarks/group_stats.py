"""The group level's statistics on synthetic cohorts: sensitivity, family-wise error, run time.

Cohorts are made as ``benchmarks/synth_group.py`` makes them (white Gaussian noise of SD
``--noise`` in every participant's log-Jacobian map, plus ``effect`` in a sphere of radius 10 mm
at (-30, -10, 5) mm for group A, the first half), but in memory and on the brain mask of
MNI152NLin6Asym res-2 (2 mm) or a coarser grid taken from it (every 2nd or 3rd voxel: 4 or 6 mm).
They go through the group level's own arithmetic (``bids_app/group/inference.py``: masked
smoothing, the GLM; the permutations and TFCE of ``bids_app/group/tfce.py``), so the figures are
the command's.

Studies (``--studies``, comma-separated):

- ``sensitivity``: one cohort per (effect, FWHM); the share of the planted sphere's voxels with FWE
  p < 0.05 (voxel-wise max-t and TFCE), and the significant voxels farther than the FWHM from it.
- ``null``: ``--null-cohorts`` cohorts without an effect; the family-wise false-positive rate (a
  cohort with any voxel at FWE p < 0.05) with its exact (Clopper-Pearson) 95% interval.
- ``target``: the sensitivity study on the 2 mm grid at the default smoothing and effect 0.1.
- ``timing``: ``--n-permutations`` permutations of 50 participants on the 2 mm grid, voxel-wise
  only, then voxel-wise + TFCE (the default) over ``--tfce-timing-permutations`` (1000), scaled
  to ``--n-permutations`` when fewer.

    python -m benchmarks stats --out bench_stats/
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from benchmarks.synth_group import DEFAULT_CENTRE_MM, DEFAULT_RADIUS_MM, SHARED_TEMPLATEFLOW, sphere

log = logging.getLogger(__name__)

TEMPLATE = ("MNI152NLin6Asym", 2)
FWE = -math.log10(0.05)


@dataclass(frozen=True)
class StatsSettings:
    out: Path
    studies: tuple[str, ...] = ("sensitivity", "null", "timing")
    participants: int = 20
    noise: float = 0.05
    effects: tuple[float, ...] = (0.1, 0.03, 0.02)
    fwhms: tuple[float, ...] = (0.0, 4.0, 6.0, 8.0, 12.0)
    sensitivity_step: int = 2  # grid step of the sensitivity study (x 2 mm)
    sensitivity_permutations: int = 1000
    sensitivity_tfce_permutations: int = 100
    null_cohorts: int = 100
    null_step: int = 3
    null_permutations: int = 100
    null_fwhm: float = 6.0
    null_shard: tuple[int, int] = (0, 1)  # (K, N): the cohorts i with i % N == K
    timing_participants: int = 50
    n_permutations: int = 1000
    tfce_timing_permutations: int = 1000  # fewer: timed and scaled to n_permutations
    jobs: int = 2
    seed: int = 0


@dataclass(frozen=True)
class Grid:
    mask: np.ndarray
    affine: np.ndarray
    zooms: tuple[float, float, float]
    planted: np.ndarray  # the sphere, inside the mask

    @property
    def label(self) -> str:
        return f"{self.zooms[0]:g} mm"


def load_grid(step: int) -> Grid:
    """The template's brain mask (2 mm), keeping every ``step``-th voxel."""
    import nibabel as nib

    from bids_app.templates import fetch_template

    template = fetch_template(*TEMPLATE)
    img = nib.load(str(template.mask_path))
    mask = np.asarray(img.dataobj)[::step, ::step, ::step] > 0
    affine = img.affine @ np.diag([step, step, step, 1.0])
    zooms = tuple(float(z) for z in np.sqrt((affine[:3, :3] ** 2).sum(0)))
    planted = sphere(mask.shape, affine, DEFAULT_CENTRE_MM, DEFAULT_RADIUS_MM) & mask
    return Grid(mask, affine, zooms, planted)


def cohort(grid: Grid, n: int, effect: float, noise: float, rng) -> np.ndarray:
    """participants x voxels (the mask's), group A (the first half) with ``effect`` planted."""
    data = rng.normal(0, noise, (n, int(grid.mask.sum()))).astype(np.float32)
    data[: n // 2, grid.planted[grid.mask]] += effect
    return data


def design(n: int) -> np.ndarray:
    return np.column_stack([np.ones(n), np.r_[np.ones(n // 2), np.zeros(n - n // 2)]])


def smoothed(grid: Grid, data: np.ndarray, fwhm: float) -> np.ndarray:
    from bids_app.group.inference import mask_weight, smooth_in_mask

    if fwhm <= 0:
        return data
    weight = mask_weight(grid.mask, fwhm, grid.zooms)
    volume = np.zeros(grid.mask.shape, np.float32)
    out = np.empty_like(data)
    for i, row in enumerate(data):
        volume[grid.mask] = row
        out[i] = smooth_in_mask(volume, grid.mask, fwhm, grid.zooms, weight)[grid.mask]
    return out


def analyse(grid, data, n_perm, tfce, seed, jobs):
    from bids_app.group.inference import permute
    from bids_app.group.model import ModelSpec

    spec = ModelSpec(n_permutations=n_perm, tfce=tfce, seed=seed, n_jobs=jobs)
    return permute(data, design(len(data)), 1, grid.mask, grid.affine, spec)


# ---- the studies -----------------------------------------------------------------------------


def sensitivity(settings: StatsSettings) -> list[dict]:
    grid = load_grid(settings.sensitivity_step)
    planted = grid.planted[grid.mask]
    centre = np.asarray(DEFAULT_CENTRE_MM)
    ijk = np.argwhere(grid.mask)
    world = ijk @ grid.affine[:3, :3].T + grid.affine[:3, 3]
    distance = np.linalg.norm(world - centre, axis=1)
    rows = []
    for effect in settings.effects:
        data = cohort(grid, settings.participants, effect, settings.noise,
                      np.random.default_rng(settings.seed))  # fmt: skip
        for fwhm in settings.fwhms:
            smooth = smoothed(grid, data, fwhm)
            far = distance > DEFAULT_RADIUS_MM + max(fwhm, grid.zooms[0])
            for tfce, n_perm in ((False, settings.sensitivity_permutations),
                                 (True, settings.sensitivity_tfce_permutations)):  # fmt: skip
                result = analyse(grid, smooth, n_perm, tfce, settings.seed, settings.jobs)
                logp = result.logp_tfce_fwe if tfce else result.logp_fwe
                significant = logp > FWE
                row = {
                    "grid": grid.label, "participants": settings.participants,
                    "effect": effect, "noise": settings.noise, "fwhm_mm": fwhm,
                    "inference": "TFCE" if tfce else "voxel-wise", "permutations": n_perm,
                    "planted_voxels": int(planted.sum()),
                    "sensitivity": round(float(significant[planted].mean()), 3),
                    "detected": bool(significant[planted].any()),
                    "significant_far_voxels": int(significant[far].sum()),
                    "seconds": round(result.seconds, 1),
                }  # fmt: skip
                log.info("sensitivity %s", row)
                rows.append(row)
    return rows


def null(settings: StatsSettings) -> list[dict]:
    """Cohort ``i`` is drawn from seed ``seed + 1 + i`` and permuted with seed ``seed + i``, so
    shards (``--null-shard K/N``: the cohorts with i % N == K) can run apart and be merged."""
    grid = load_grid(settings.null_step)
    shard, shards = settings.null_shard
    started = time.monotonic()
    cohorts = []
    for index in range(shard, settings.null_cohorts, shards):
        rng = np.random.default_rng(settings.seed + 1 + index)
        data = smoothed(grid, cohort(grid, settings.participants, 0.0, settings.noise, rng),
                        settings.null_fwhm)  # fmt: skip
        result = analyse(grid, data, settings.null_permutations, True, settings.seed + index,
                         settings.jobs)  # fmt: skip
        cohorts.append({
            "cohort": index, "voxel-wise": bool((result.logp_fwe > FWE).any()),
            "TFCE": bool((result.logp_tfce_fwe > FWE).any()),
            "max_logp_fwe": round(float(result.logp_fwe.max()), 3),
            "max_logp_tfce_fwe": round(float(result.logp_tfce_fwe.max()), 3),
        })  # fmt: skip
        if len(cohorts) % 10 == 0:
            log.info("null: %d cohorts, %d / %d false positives (voxel-wise / TFCE), %.0f s",
                     len(cohorts), sum(c["voxel-wise"] for c in cohorts),
                     sum(c["TFCE"] for c in cohorts), time.monotonic() - started)  # fmt: skip
    shard_path = settings.out / f"stats_null_shard{shard}of{shards}.json"
    shard_path.write_text(json.dumps({"Grid": grid.label, "Cohorts": cohorts}, indent=2) + "\n")
    return null_summary(settings, grid, int(grid.mask.sum()))


def null_summary(settings: StatsSettings, grid: Grid, voxels: int) -> list[dict]:
    """The false-positive rates over every shard written so far for these settings."""
    from scipy.stats import binomtest

    cohorts = {}
    for path in sorted(settings.out.glob("stats_null_shard*.json")):
        for row in json.loads(path.read_text())["Cohorts"]:
            cohorts[row["cohort"]] = row
    rows = []
    for inference in ("voxel-wise", "TFCE"):
        count = sum(row[inference] for row in cohorts.values())
        interval = binomtest(count, len(cohorts)).proportion_ci(0.95, method="exact")
        rows.append({
            "grid": grid.label, "voxels": voxels, "participants": settings.participants,
            "fwhm_mm": settings.null_fwhm, "permutations": settings.null_permutations,
            "cohorts": len(cohorts), "inference": inference,
            "false_positive_cohorts": count, "fwer": round(count / len(cohorts), 3),
            "ci95_low": round(interval.low, 3), "ci95_high": round(interval.high, 3),
        })  # fmt: skip
    return rows


def timing(settings: StatsSettings) -> list[dict]:
    grid = load_grid(1)
    n = settings.timing_participants
    data = smoothed(grid, cohort(grid, n, 0.0, settings.noise, np.random.default_rng(2)), 6.0)
    rows = []
    for tfce, n_perm in ((False, settings.n_permutations),
                         (True, settings.tfce_timing_permutations)):  # fmt: skip
        result = analyse(grid, data, n_perm, tfce, settings.seed, settings.jobs)
        scaled = result.seconds * settings.n_permutations / n_perm
        rows.append({
            "grid": grid.label, "voxels": int(grid.mask.sum()), "participants": n,
            "inference": "voxel-wise + TFCE" if tfce else "voxel-wise", "jobs": settings.jobs,
            "permutations_timed": n_perm, "seconds_timed": round(result.seconds, 1),
            f"seconds_for_{settings.n_permutations}": round(scaled, 1),
            # processor time of the permutations over the processes: on a machine shared with
            # other jobs, cpu / jobs is the wall time the same run takes on free cores
            "cpu_seconds_timed": round(result.cpu_seconds, 1),
            f"free_core_seconds_for_{settings.n_permutations}": round(
                result.cpu_seconds / settings.jobs * settings.n_permutations / n_perm, 1),
            "load_average": round(os.getloadavg()[0], 1),
            "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        })  # fmt: skip
        log.info("timing %s", rows[-1])
    return rows


def target(settings: StatsSettings) -> list[dict]:
    """The issue's target: the 10 mm sphere at the synthetic cohort's effect (0.1), found by
    TFCE in a 20-participant cohort on the 2 mm grid at the default smoothing."""
    from bids_app.group.model import DEFAULT_SMOOTHING_FWHM

    one = replace(settings, sensitivity_step=1, effects=(settings.effects[0],),
                  fwhms=(DEFAULT_SMOOTHING_FWHM,))  # fmt: skip
    return sensitivity(one)


STUDIES = {"sensitivity": sensitivity, "null": null, "timing": timing, "target": target}


def run(settings: StatsSettings, argv: list[str]) -> int:
    os.environ.setdefault("TEMPLATEFLOW_HOME", str(SHARED_TEMPLATEFLOW))
    os.environ.setdefault("TEMPLATEFLOW_AUTOUPDATE", "0")
    settings.out.mkdir(parents=True, exist_ok=True)
    for study in settings.studies:
        if study not in STUDIES:
            log.error("unknown study %r: choose from %s", study, ", ".join(STUDIES))
            return 2
    for study in settings.studies:
        started = time.monotonic()
        rows = STUDIES[study](settings)
        record = {
            "Command": " ".join(argv),
            "Settings": {k: (str(v) if isinstance(v, Path) else v)
                         for k, v in asdict(replace(settings, out=settings.out)).items()},
            "Seconds": round(time.monotonic() - started),
            "Rows": rows,
        }  # fmt: skip
        path = settings.out / f"stats_{study}.json"  # null: the summary of every shard so far
        path.write_text(json.dumps(record, indent=2) + "\n")
        print(markdown(study, rows))
        log.info("%s written (%.0f s)", path, time.monotonic() - started)
    return 0


def markdown(title: str, rows: list[dict]) -> str:
    if not rows:
        return f"{title}: no rows"
    columns = list(rows[0])
    lines = [f"### {title}", "", "| " + " | ".join(columns) + " |",
             "|" + "---|" * len(columns)]  # fmt: skip
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"
