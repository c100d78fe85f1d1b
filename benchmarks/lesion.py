"""Lesion cases: ``python -m benchmarks lesion --out DIR`` (docs/benchmark.md, issue 17).

A lesion case is a synthetic case (``cases.py``: known transform Phi, fixed image = the source)
whose *moving* image (the participant) has a region of the brain replaced by CSF-like intensity,
as a stroke cavity looks on a T1w. The template (the fixed image) stays healthy. The lesion is
drawn in fixed space (a blob grown from a point of the brain to a share of the brain's volume)
and carried into the moving image through Phi, so the truth near it is still Phi.

Each lesion is registered three ways by the ``mninorm`` command (default engine, Greedy):

* ``clean``: the case without the lesion (what registration does without any lesion);
* ``lesion``: the lesioned image, no lesion mask;
* ``lesion+mask``: the lesioned image with its ``label-lesion_roi`` mask next to the T1w.

Scores, on the fixed grid, against the truth: landmark error (voxel centres of the region,
jittered) and the log-Jacobian error |log det D(estimate) - log det D(Phi)|, in the lesion and in
the brain within 10 mm around it (outside the lesion).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from benchmarks import score
from benchmarks.cases import CASES, Case, prepare_case, world_points
from benchmarks.measure import run_measured
from benchmarks.settings import _mninorm_command, get_setting, mninorm_transforms

log = logging.getLogger(__name__)

NEAR_MM = 10.0
MODES = ("clean", "lesion", "lesion+mask")


@dataclass(frozen=True)
class LesionDef:
    name: str
    base: str  # a synthetic case of cases.CASES
    offset_mm: tuple[float, float, float]  # from the brain's centroid (fixed space, RAS)
    share: float  # of the brain's volume
    seed: int


LESIONS: dict[str, LesionDef] = {
    lesion.name: lesion
    for lesion in (
        LesionDef("ds01-frontal-l-3pc", "ds01-2mm", (-30.0, 35.0, 15.0), 0.03, 1),
        LesionDef("ds01-parietal-r-5pc", "ds01-2mm", (35.0, -35.0, 25.0), 0.05, 2),
        LesionDef("ds01-temporal-l-2pc", "ds01-2mm", (-45.0, -10.0, -15.0), 0.02, 3),
        # seconds, no ../shared needed: the tests' lesion case
        LesionDef("tiny-central-4pc", "tiny-6mm", (20.0, 0.0, 10.0), 0.04, 4),
    )
}  # fmt: skip


# ---- building the lesion ------------------------------------------------------------------------


def grow_lesion(brain: np.ndarray, affine: np.ndarray, offset_mm, share: float, rng) -> np.ndarray:
    """A blob of ``share`` of the brain's voxels around the brain point nearest centroid + offset:
    the brain voxels nearest the seed by a distance with a smooth random warp (irregular edge)."""
    points = world_points(affine, brain.shape)[brain.ravel()]
    target = points.mean(0) + np.asarray(offset_mm, float)
    seed = points[np.argmin(np.linalg.norm(points - target, axis=1))]
    zoom = float(np.mean(np.linalg.norm(affine[:3, :3], axis=0)))
    noise = ndimage.gaussian_filter(rng.normal(size=brain.shape), 8.0 / zoom)
    noise = noise[brain] / (np.abs(noise[brain]).max() or 1.0)
    distance = np.linalg.norm(points - seed, axis=1) * (1.0 + 0.35 * noise)
    count = max(1, int(round(share * brain.sum())))
    chosen = np.argsort(distance)[:count]
    lesion = np.zeros(brain.size, bool)
    lesion[np.flatnonzero(brain.ravel())[chosen]] = True
    lesion = lesion.reshape(brain.shape)
    labels, n = ndimage.label(lesion)
    if n > 1:  # one connected lesion
        sizes = ndimage.sum(lesion, labels, range(1, n + 1))
        lesion = labels == (1 + int(np.argmax(sizes)))
    return lesion


def lesioned_moving(case: Case, lesion_fixed: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
    """The case's moving image with the lesion (carried by Phi) at CSF-like intensity with the
    case's noise, and the lesion mask on the moving grid (weight >= 0.5)."""
    truth = case.truth()
    fixed = nib.load(case.fixed)
    moving = nib.load(case.moving)
    data = np.asarray(moving.dataobj, dtype=np.float32)
    inside = np.asarray(nib.load(case.moving_mask).dataobj) > 0
    # Only moving voxels near Phi(lesion) can be in it: a box around them (3 voxels of margin).
    lesion_points = nib.affines.apply_affine(fixed.affine, np.argwhere(lesion_fixed))
    in_moving = nib.affines.apply_affine(np.linalg.inv(moving.affine), truth.forward(lesion_points))
    low = np.maximum(np.floor(in_moving.min(0)).astype(int) - 3, 0)
    high = np.minimum(np.ceil(in_moving.max(0)).astype(int) + 4, data.shape)
    box = np.indices(high - low).reshape(3, -1).T + low
    source, residual = truth.inverse(nib.affines.apply_affine(moving.affine, box))
    if residual > 0.01:
        raise RuntimeError(f"{case.name}: Phi^-1 residual {residual:.3g} mm near the lesion")
    ijk = nib.affines.apply_affine(np.linalg.inv(fixed.affine), source)
    weight = ndimage.map_coordinates(lesion_fixed.astype(np.float32), ijk.T, order=1, cval=0.0)
    weights = np.zeros(data.shape, np.float32)
    weights[tuple(box.T)] = weight
    weights *= inside  # the lesion is brain: none outside the moving brain
    csf = float(np.percentile(data[inside], 2))  # the darkest brain tissue of a T1w: CSF
    sigma = float(case.checks.get("noise_sigma", 0.03 * np.percentile(data[inside], 99)))
    cavity = np.sqrt((csf + rng.normal(0, sigma, data.shape)) ** 2
                     + rng.normal(0, sigma, data.shape) ** 2)  # fmt: skip
    out = (1.0 - weights) * data + weights * cavity
    return out.astype(np.float32), weights >= 0.5


def prepare_lesion(definition: LesionDef, out: Path) -> tuple[Case, Path, dict]:
    """The base case, its lesioned moving image and the lesion mask in ``out/lesions/<name>``
    (built once): (the lesioned case, the moving-grid lesion mask, the checks)."""
    base = prepare_case(CASES[definition.base], out)
    folder = out / "lesions" / definition.name
    record = folder / "lesion.json"
    wanted = json.loads(json.dumps(definition.__dict__))
    if not (record.is_file() and json.loads(record.read_text())["definition"] == wanted):
        shutil.rmtree(folder, ignore_errors=True)
        rng = np.random.default_rng(definition.seed)
        fixed_mask = nib.load(base.fixed_mask)
        brain = np.asarray(fixed_mask.dataobj) > 0
        lesion = grow_lesion(brain, fixed_mask.affine, definition.offset_mm, definition.share, rng)
        moving, moving_lesion = lesioned_moving(base, lesion, rng)
        build = out / "lesions" / f".{definition.name}"
        shutil.rmtree(build, ignore_errors=True)
        build.mkdir(parents=True)
        moving_img = nib.load(base.moving)
        nib.Nifti1Image(moving, moving_img.affine).to_filename(build / "moving.nii.gz")
        nib.Nifti1Image(moving_lesion.astype(np.uint8), moving_img.affine).to_filename(
            build / "lesion_moving.nii.gz"
        )
        nib.Nifti1Image(lesion.astype(np.uint8), fixed_mask.affine).to_filename(
            build / "lesion_fixed.nii.gz"
        )
        checks = {
            "lesion_share_of_brain": float(lesion.sum() / brain.sum()),
            "lesion_ml_fixed": float(lesion.sum() * abs(np.linalg.det(fixed_mask.affine)) / 1e3),
            "lesion_ml_moving": float(
                moving_lesion.sum() * abs(np.linalg.det(moving_img.affine)) / 1e3
            ),
        }
        (build / "lesion.json").write_text(
            json.dumps({"definition": wanted, "checks": checks}, indent=1)
        )
        os.replace(build, folder)
    checks = json.loads(record.read_text())["checks"]
    return replace(base, moving=folder / "moving.nii.gz"), folder, checks


# ---- scoring ------------------------------------------------------------------------------------


def regions(lesion_fixed: np.ndarray, brain: np.ndarray, affine: np.ndarray) -> dict:
    """Boolean masks on the fixed grid: the lesion, and the brain within NEAR_MM around it."""
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    distance = ndimage.distance_transform_edt(~lesion_fixed, sampling=zooms)
    return {"in": lesion_fixed, "near": brain & ~lesion_fixed & (distance <= NEAR_MM)}


def score_lesion_run(transforms: list[str], case: Case, lesion_fixed: Path, work: Path) -> dict:
    fixed = nib.load(case.fixed)
    brain = np.asarray(nib.load(case.fixed_mask).dataobj) > 0
    lesion = np.asarray(nib.load(lesion_fixed).dataobj) > 0
    truth = case.truth()
    field_path = score.composed_field(transforms, case.fixed, work / "composed_")
    vectors, field_affine = score.read_displacement_field(field_path)
    field_path.unlink()
    if not np.allclose(field_affine, fixed.affine, atol=1e-3):
        raise RuntimeError("the composed field is not on the fixed grid")
    log_det = np.log(np.clip(score.field_jacobian(vectors, field_affine), 1e-6, None))
    rng = np.random.default_rng(0)
    figures = {}
    for name, region in (("all", brain), *regions(lesion, brain, fixed.affine).items()):
        voxels = np.argwhere(region)
        jittered = voxels + rng.uniform(-0.45, 0.45, voxels.shape)
        points = nib.affines.apply_affine(fixed.affine, jittered)
        errors = np.linalg.norm(
            score.map_points(transforms, points) - truth.forward(points), axis=1
        )
        centres = nib.affines.apply_affine(fixed.affine, voxels)
        true_log_det = np.log(truth.jacobian_determinant(centres))
        difference = log_det[region] - true_log_det
        figures.update({
            f"{name}_voxels": int(region.sum()),
            f"{name}_landmark_mean_mm": float(errors.mean()),
            f"{name}_landmark_p95_mm": float(np.percentile(errors, 95)),
            f"{name}_logjac_mae": float(np.abs(difference).mean()),
            f"{name}_logjac_bias": float(difference.mean()),
        })  # fmt: skip
    return figures


# ---- running ------------------------------------------------------------------------------------


def run_mode(case: Case, folder: Path, mode: str, preset: str, threads: int, seed: int,
             out: Path) -> dict:  # fmt: skip
    """One mninorm run of the (lesioned) case; the lesion mask next to the T1w for lesion+mask."""
    base = replace(case, moving=case.folder / "moving.nii.gz") if mode == "clean" else case
    run_dir = out / "runs" / folder.name / mode
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    setting = get_setting(f"mninorm-{preset}")
    env = dict(os.environ)
    env.update(
        {name: str(threads) for name in ("OMP_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")}
    )
    command = _mninorm_command(setting, base, run_dir, seed, threads, env)
    if mode == "lesion+mask":
        label = case.definition.label
        shutil.copyfile(
            folder / "lesion_moving.nii.gz",
            run_dir / "bids" / f"sub-{label}" / "anat" / f"sub-{label}_label-lesion_roi.nii.gz",
        )
    log.info("%s / %s: mninorm --preset %s", folder.name, mode, preset)
    measured = run_measured(
        command.argv, env=command.env, log_path=run_dir / "log.txt", timeout_s=3600
    )
    row = {"lesion": folder.name, "mode": mode, "preset": preset, "wall_s": measured.wall_s}
    if measured.returncode != 0:
        return {**row, "status": f"failed (exit {measured.returncode}, see {run_dir}/log.txt)"}
    transforms = mninorm_transforms(base, run_dir)
    figures = score_lesion_run(transforms, base, folder / "lesion_fixed.nii.gz", run_dir)
    shutil.rmtree(run_dir / "bids", ignore_errors=True)
    return {**row, "status": "ok", **figures}


def run(out: Path, names: list[str] | None, preset: str, threads: int, seed: int,
        force: bool) -> int:  # fmt: skip
    names = names or [n for n, d in LESIONS.items() if not d.base.startswith("tiny")]
    unknown = [n for n in names if n not in LESIONS]
    if unknown:
        log.error("unknown lesion case(s) %s; known: %s", ", ".join(unknown), ", ".join(LESIONS))
        return 2
    out.mkdir(parents=True, exist_ok=True)
    table = out / "lesion.csv"
    rows = {(r["lesion"], r["mode"], r["preset"]): r for r in read_rows(table)}
    started = time.time()
    for name in names:
        case, folder, checks = prepare_lesion(LESIONS[name], out)
        log.info("%s: lesion %.1f%% of the brain (%.1f ml)", name,
                 100 * checks["lesion_share_of_brain"], checks["lesion_ml_fixed"])  # fmt: skip
        for mode in MODES:
            key = (name, mode, preset)
            if key in rows and rows[key]["status"] == "ok" and not force:
                continue
            rows[key] = {**run_mode(case, folder, mode, preset, threads, seed, out),
                         "lesion_share": checks["lesion_share_of_brain"]}  # fmt: skip
            write_rows(table, list(rows.values()))
    report = write_report(out, list(rows.values()))
    print(report.read_text())
    log.info("%s (%.0f s)", report, time.time() - started)
    return 0 if all(r["status"] == "ok" for r in rows.values()) else 1


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open() as handle:
        return list(csv.DictReader(handle))


def write_rows(path: Path, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(key for row in rows for key in row))
    temporary = path.with_suffix(".csv.tmp")
    with temporary.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(temporary, path)


def write_report(out: Path, rows: list[dict]) -> Path:
    """lesion.md: one line per lesion and mode."""
    columns = [
        ("near_landmark_mean_mm", "near: landmark mean (mm)"),
        ("near_landmark_p95_mm", "near: landmark p95 (mm)"),
        ("near_logjac_mae", "near: mean abs log-Jacobian error"),
        ("in_landmark_mean_mm", "in lesion: landmark mean (mm)"),
        ("in_logjac_mae", "in lesion: mean abs log-Jacobian error"),
        ("all_landmark_mean_mm", "whole brain: landmark mean (mm)"),
    ]
    lines = [
        "# Lesion cases", "",
        f"near = brain voxels within {NEAR_MM:g} mm of the lesion, outside it (fixed grid); "
        "errors against the known transform.", "",
        "| lesion | share | mode | preset | " + " | ".join(t for _, t in columns) + " | wall (s) |",
        "|---" * (len(columns) + 5) + "|",
    ]  # fmt: skip
    for row in sorted(rows, key=lambda r: (r["lesion"], MODES.index(r["mode"]))):
        if row["status"] != "ok":
            lines.append(f"| {row['lesion']} | | {row['mode']} | {row['preset']} | "
                         f"{row['status']} |")  # fmt: skip
            continue
        values = " | ".join(f"{float(row[key]):.3f}" for key, _ in columns)
        lines.append(
            f"| {row['lesion']} | {100 * float(row['lesion_share']):.1f}% | {row['mode']} | "
            f"{row['preset']} | {values} | {float(row['wall_s']):.0f} |"
        )
    path = out / "lesion.md"
    path.write_text("\n".join(lines) + "\n")
    return path
