"""``python -m benchmarks heads``: does brain extraction hold on real whole heads?

Cases (built once under ``<out>/cases/``, see ``build_cases``):

* every real scan of ``../shared/data/heads`` as it is, with a reference mask made by the most
  careful extraction available here (mninorm's extraction with the ANTs engine, every template
  tried; figures in ``<out>/references/`` to check it by eye);
* the two ``labelled-heads`` as they are, with FreeSurfer's brain masks as the reference;
* each of those two heads put through every perturbation of ``perturb.py`` (origin far from the
  head, 30 degree tilts, cropped chin or skull top, defaced, FreeSurfer-conformed, anisotropic or
  2 mm voxels, a strong bias field), with the FreeSurfer mask moved along.

Each case runs the whole ``mninorm`` participant command, per setting, and is scored by the Dice of
the native brain mask with the reference, the QC verdict and its reasons, the attempts the
fallback made, the affine volume ratio, wall time and peak memory and, for a perturbed head, the
landmark error: template points mapped through its transform against the same points mapped
through the unperturbed head's transform and then moved by the known perturbation.

Results: ``<out>/heads.csv`` (one row per case and setting, resumable) and ``<out>/heads.md``.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.affines import apply_affine

from benchmarks.cases import DATA_ROOT
from benchmarks.measure import run_measured
from benchmarks.perturb import PERTURBATIONS, dice, perturb
from benchmarks.settings import THREAD_VARIABLES

log = logging.getLogger(__name__)

TEMPLATE = "MNI152NLin2009cAsym"
LANDMARKS = 2000
# Settings compared: mninorm's options on top of the default command.
SETTINGS: dict[str, tuple[str, ...]] = {
    "default": (),
    "no-fallback": ("--no-fallback",),
    "mni-head": ("--brain-template", TEMPLATE),  # extraction against the output template's head
}
PERTURBED_BASES = ("lh01", "lh02")  # the heads with FreeSurfer masks: their truth moves exactly
_TIMEOUT_S = 1800
STATUSES = ("pass", "warn", "fail")


@dataclass(frozen=True)
class HeadCase:
    name: str  # letters and digits: also the BIDS participant label
    t1w: Path
    reference: Path  # brain mask on the T1w's grid
    reference_kind: str  # "FreeSurfer", "FreeSurfer, moved", "careful extraction"
    what: str
    base: str = ""  # perturbed cases: the case they were made from
    world: Path | None = None  # perturbed cases: .npy 4x4, base world -> this case's world


@dataclass
class Row:
    case: str
    setting: str
    what: str
    reference: str
    status: str = ""  # the run: ok / failed / timeout
    dice: float | None = None
    qc: str = ""
    qc_reasons: str = ""
    attempts: int | None = None
    kept: int | None = None
    affine_volume_ratio: float | None = None
    brain_volume_ml: float | None = None
    landmark_mean_mm: float | None = None
    landmark_max_mm: float | None = None
    wall_s: float | None = None
    peak_mb: float | None = None
    note: str = ""


# ---- cases --------------------------------------------------------------------------------------


def build_cases(out: Path, threads: int) -> list[HeadCase]:
    """Every case, made once (files are reused when present)."""
    cases = _labelled_cases(out)
    for base in [c for c in cases if c.name in PERTURBED_BASES]:
        for kind in PERTURBATIONS:
            cases.append(_perturbed_case(out, base, kind))
    cases += _real_cases(out, threads)
    return cases


def _labelled_cases(out: Path) -> list[HeadCase]:
    root = DATA_ROOT / "labelled-heads"
    cases = []
    for number in ("01", "02"):
        t1w = root / f"sub-{number}" / "anat" / f"sub-{number}_T1w.nii.gz"
        masks = root / "derivatives" / "freesurfer" / f"sub-{number}" / "anat"
        mask = masks / f"sub-{number}_desc-brain_mask.nii.gz"
        if t1w.is_file() and mask.is_file():
            what = f"labelled-heads sub-{number} as it is (FreeSurfer-conformed, defaced)"
            cases.append(HeadCase(f"lh{number}", t1w, mask, "FreeSurfer", what))
    return cases


def _perturbed_case(out: Path, base: HeadCase, kind: str) -> HeadCase:
    name = base.name + kind.replace("-", "").replace("iso2mm", "2mm")
    folder = out / "cases" / name
    t1w, mask, world = folder / "t1w.nii.gz", folder / "reference_mask.nii.gz", folder / "world.npy"
    if not (t1w.is_file() and mask.is_file() and world.is_file()):
        folder.mkdir(parents=True, exist_ok=True)
        made = perturb(nib.load(base.t1w), nib.load(base.reference), kind, seed=int(base.name[-2:]))
        nib.save(made.image, t1w)
        nib.save(made.mask, mask)
        np.save(world, made.world)
    what = f"{base.name}: {PERTURBATIONS[kind]}"
    return HeadCase(name, t1w, mask, "FreeSurfer, moved", what, base=base.name, world=world)


def _real_cases(out: Path, threads: int) -> list[HeadCase]:
    cases = []
    for t1w in sorted((DATA_ROOT / "heads").glob("sub-*/anat/*_T1w.nii.gz")):
        source = t1w.name[: -len("_T1w.nii.gz")]
        name = "heads" + source.replace("sub-", "").replace("_run-", "r").replace("_", "")
        reference = out / "references" / f"{name}_mask.nii.gz"
        if not reference.is_file():
            make_reference(t1w, reference, out / "references" / f"{name}.png", threads)
        what = f"heads {source} as it is"
        cases.append(HeadCase(name, t1w, reference, "careful extraction", what))
    return cases


def make_reference(t1w: Path, mask_path: Path, figure: Path, threads: int) -> None:
    """A reference mask by the most careful extraction here: ANTs engine, both templates tried.

    It runs in a child process so that ITK starts with the benchmark's thread count.
    """
    mask_path.parent.mkdir(parents=True, exist_ok=True)
    env = _environment(threads)
    code = (
        "import sys; from benchmarks.heads import _reference_in_process as r; "
        "r(*map(__import__('pathlib').Path, sys.argv[1:]))"
    )
    result = run_measured(
        [sys.executable, "-c", code, str(t1w), str(mask_path), str(figure)],
        env=env, log_path=mask_path.with_suffix(".log"), timeout_s=_TIMEOUT_S,
    )  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"reference mask for {t1w} failed: see {mask_path.with_suffix('.log')}")


def _reference_in_process(t1w: Path, mask_path: Path, figure: Path) -> None:
    import ants
    from templateflow import api

    from bids_app.participant.bias import correct_bias
    from bids_app.participant.brain import BrainTemplate, extract_brain, extraction_plans
    from bids_app.participant.images import load_t1w
    from bids_app.registration import get_engine
    from bids_app.transforms.orientation import ants_to_nifti, nifti_to_ants

    def template(name):
        head = api.get(name, resolution=1, desc=None, suffix="T1w", extension=".nii.gz")
        mask = api.get(name, resolution=1, desc="brain", suffix="mask", extension=".nii.gz")
        return BrainTemplate(name, ants.image_read(str(head)), ants.image_read(str(mask)))

    nifti, _ = load_t1w(t1w)
    preproc = correct_bias(nifti_to_ants(nifti))
    plans = extraction_plans(
        [template("OASIS30ANTs"), template(TEMPLATE)], [get_engine("ants")], fallback=True
    )
    work = mask_path.parent / "work" / mask_path.name.split("_")[0]
    extraction = extract_brain(preproc, plans, work / "x_", seed=1)
    nib.save(ants_to_nifti(extraction.mask_img, dtype=np.uint8), mask_path)
    shutil.rmtree(work, ignore_errors=True)
    draw_masks(ants_to_nifti(preproc), {"reference": nib.load(mask_path)}, figure)


# ---- runs ---------------------------------------------------------------------------------------


def run_case(case: HeadCase, setting: str, out: Path, threads: int) -> Row:
    bids = _bids_dataset(out, case)
    run_dir = out / "runs" / setting / case.name
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    argv = [
        sys.executable, "-m", "bids_app", str(bids), str(run_dir / "out"), "participant",
        "--nthreads", str(threads), "--omp-nthreads", str(threads), *SETTINGS[setting],
    ]  # fmt: skip
    measured = run_measured(
        argv, env=_environment(threads), log_path=run_dir / "mninorm.log", timeout_s=_TIMEOUT_S
    )
    row = Row(case.name, setting, case.what, case.reference_kind)
    row.wall_s, row.peak_mb = round(measured.wall_s, 1), round(measured.peak_rss_mb)
    row.status = "timeout" if measured.timed_out else "ok"
    _score(row, case, run_dir / "out", out)
    return row


def _score(row: Row, case: HeadCase, output: Path, out: Path) -> None:
    anat = output / f"sub-{case.name}" / "anat"
    record = _read_json(next((output / f"sub-{case.name}" / "log").glob("*_run.json"), None))
    extraction = record.get("BrainExtraction", {})
    row.attempts = len(extraction.get("Attempts", [])) or None
    row.kept = extraction.get("KeptAttempt")
    if record.get("Status") != "ok":
        row.status = "failed" if row.status == "ok" else row.status
    qc = _read_qc(next(anat.glob("*_qc.tsv"), None))
    row.qc = qc.get("status", "fail" if row.status != "ok" else "")
    row.qc_reasons = qc.get("status_reasons", record.get("Error") or "")
    row.affine_volume_ratio = _number(qc.get("affine_volume_ratio"))
    mask_path = anat / f"sub-{case.name}_desc-brain_mask.nii.gz"
    if not mask_path.is_file():
        return
    mask = nib.load(mask_path)
    voxel_ml = float(np.prod(mask.header.get_zooms()[:3])) / 1000
    row.brain_volume_ml = round(float((np.asarray(mask.dataobj) > 0).sum()) * voxel_ml, 1)
    reference = _on_grid(nib.load(case.reference), mask)
    row.dice = round(dice(np.asarray(mask.dataobj) > 0, reference), 4)
    preproc = nib.load(anat / f"sub-{case.name}_desc-preproc_T1w.nii.gz")
    figure = out / "figures" / row.setting / f"{case.name}.png"
    draw_masks(preproc, {"reference": _as_image(reference, mask), "mninorm": mask}, figure)
    if case.base:
        _score_landmarks(row, case, output, out)


def _score_landmarks(row: Row, case: HeadCase, output: Path, out: Path) -> None:
    from benchmarks.score import map_points

    base_output = out / "runs" / row.setting / case.base / "out"
    # The forward transform (from-T1w_to-template) maps template points to the participant's.
    forward = f"_from-T1w_to-{TEMPLATE}_mode-image_xfm.h5"
    mine = next((output / f"sub-{case.name}" / "anat").glob(f"*{forward}"), None)
    base = next((base_output / f"sub-{case.base}" / "anat").glob(f"*{forward}"), None)
    if mine is None or base is None:
        return
    points = _template_landmarks()
    truth = apply_affine(np.load(case.world), map_points([str(base)], points))
    distance = np.linalg.norm(map_points([str(mine)], points) - truth, axis=1)
    row.landmark_mean_mm = round(float(distance.mean()), 2)
    row.landmark_max_mm = round(float(distance.max()), 2)


def _template_landmarks() -> np.ndarray:
    """LANDMARKS points inside the template's brain (seeded, the same for every run)."""
    from templateflow import api

    path = api.get(TEMPLATE, resolution=1, desc="brain", suffix="mask", extension=".nii.gz")
    mask = nib.load(path)
    inside = np.argwhere(np.asarray(mask.dataobj) > 0)
    chosen = np.random.default_rng(0).choice(len(inside), LANDMARKS, replace=False)
    return apply_affine(mask.affine, inside[chosen].astype(float))


def _bids_dataset(out: Path, case: HeadCase) -> Path:
    root = out / "bids" / case.name
    anat = root / f"sub-{case.name}" / "anat"
    if not anat.is_dir():
        anat.mkdir(parents=True)
        (root / "dataset_description.json").write_text(
            json.dumps({"Name": f"mninorm heads benchmark: {case.name}", "BIDSVersion": "1.9.0"})
        )
        os.symlink(case.t1w.resolve(), anat / f"sub-{case.name}_T1w.nii.gz")
    return root


def _environment(threads: int) -> dict:
    env = dict(os.environ)
    env.setdefault("TEMPLATEFLOW_HOME", str(DATA_ROOT / "templateflow"))
    env["TEMPLATEFLOW_AUTOUPDATE"] = "0"
    for name in THREAD_VARIABLES:
        env[name] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parents[1]),
                                                      env.get("PYTHONPATH")]))  # fmt: skip
    return env


# ---- figures ------------------------------------------------------------------------------------


def draw_masks(image, masks: dict, path: Path) -> None:
    """Three orthogonal slices through the brain with each mask's outline (reference: green)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image = nib.as_closest_canonical(image)
    data = np.asarray(image.dataobj, dtype=np.float32)
    outlines = {k: np.asarray(_on_grid_image(m, image).dataobj) > 0.5 for k, m in masks.items()}
    centre = np.round(np.argwhere(next(iter(outlines.values()))).mean(axis=0)).astype(int)
    zooms = image.header.get_zooms()[:3]
    figure, axes = plt.subplots(1, 3, figsize=(9, 3.2))
    for axis, ax in enumerate(axes):
        cut = [slice(None)] * 3
        cut[axis] = centre[axis]
        shown = [i for i in range(3) if i != axis]
        aspect = zooms[shown[1]] / zooms[shown[0]]
        ax.imshow(data[tuple(cut)].T, origin="lower", cmap="gray", aspect=aspect,
                  vmax=np.percentile(data, 99.5))  # fmt: skip
        for outline, colour in zip(outlines.values(), ("lime", "red"), strict=False):
            ax.contour(outline[tuple(cut)].T.astype(float), [0.5], colors=colour, linewidths=0.8)
        ax.axis("off")
    figure.suptitle(f"{path.stem}: " + ", ".join(
        f"{label} ({colour})" for label, colour in zip(outlines, ("green", "red"), strict=False)
    ), fontsize=9)  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=70)
    plt.close(figure)


def _on_grid(mask, target) -> np.ndarray:
    return np.asarray(_on_grid_image(mask, target).dataobj) > 0.5


def _on_grid_image(mask, target):
    from nibabel.processing import resample_from_to

    source = nib.Nifti1Image(np.asarray(mask.dataobj, dtype=np.float32), mask.affine)
    return resample_from_to(source, (target.shape[:3], target.affine), order=1)


def _as_image(inside: np.ndarray, like) -> nib.Nifti1Image:
    return nib.Nifti1Image(inside.astype(np.uint8), like.affine)



def _read_json(path: Path | None) -> dict:
    return json.loads(path.read_text()) if path is not None and path.is_file() else {}


def _read_qc(path: Path | None) -> dict:
    if path is None:
        return {}
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    return rows[0] if rows else {}


def _number(text) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if np.isfinite(value) else None


# ---- the table ----------------------------------------------------------------------------------


def read_rows(out: Path) -> dict:
    path = out / "heads.csv"
    if not path.is_file():
        return {}
    with open(path, newline="") as handle:
        rows = [Row(**{k: _parse(k, v) for k, v in r.items()}) for r in csv.DictReader(handle)]
    return {(r.case, r.setting): r for r in rows}


def _parse(key: str, value: str):
    text_fields = {"case", "setting", "what", "reference", "status", "qc", "qc_reasons", "note"}
    if key in text_fields:
        return value
    if value == "":
        return None
    return int(float(value)) if key in ("attempts", "kept") else float(value)


def write_rows(out: Path, rows: dict) -> None:
    path = out / "heads.csv"
    temporary = path.with_suffix(".tmp")
    with open(temporary, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(asdict(next(iter(rows.values())))))
        writer.writeheader()
        for row in rows.values():
            writer.writerow({k: "" if v is None else v for k, v in asdict(row).items()})
    temporary.replace(path)


def write_report(out: Path, rows: dict) -> Path:
    lines = ["# Whole-head robustness of brain extraction", ""]
    for setting in dict.fromkeys(r.setting for r in rows.values()):
        mine = [r for r in rows.values() if r.setting == setting]
        lines += [f"## Setting `{setting}` (mninorm {' '.join(SETTINGS[setting]) or 'defaults'})",
                  "", *_summary(mine), "",
                  "| case | what | reference | Dice | QC | attempts (kept) "
                  "| landmark mean / max mm | affine vol. ratio | brain ml | wall s | peak MB "
                  "| QC reasons | note |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in mine:
            lines.append(
                f"| {r.case} | {r.what} | {r.reference} | {_f(r.dice, 3)} | {r.qc or r.status} | "
                f"{_f(r.attempts, 0)} ({_f(r.kept, 0)}) | {_f(r.landmark_mean_mm, 2)} / "
                f"{_f(r.landmark_max_mm, 2)} | {_f(r.affine_volume_ratio, 2)} | "
                f"{_f(r.brain_volume_ml, 0)} | {_f(r.wall_s, 0)} | {_f(r.peak_mb, 0)} | "
                f"{r.qc_reasons or ''} | {r.note} |"
            )
        lines.append("")
    path = out / "heads.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _summary(rows: list[Row]) -> list[str]:
    dices = [r.dice for r in rows if r.dice is not None]
    bad_good = [r for r in rows if r.dice is not None and r.dice >= 0.90 and r.qc == "fail"]
    missed = [r for r in rows if (r.dice is None or r.dice < 0.90) and r.qc != "fail"]
    catastrophic = [
        r for r in rows
        if (r.affine_volume_ratio is not None and not 0.5 <= r.affine_volume_ratio <= 2)
        or (r.landmark_mean_mm is not None and r.landmark_mean_mm > 5)
    ]  # fmt: skip
    walls = [r.wall_s for r in rows if r.wall_s is not None and (r.attempts or 1) == 1]
    return [
        f"- cases: {len(rows)}; Dice min {_f(min(dices, default=None), 3)}, median "
        f"{_f(float(np.median(dices)) if dices else None, 3)}; >= 0.95: "
        f"{sum(d >= 0.95 for d in dices)}; < 0.90: {sum(d < 0.90 for d in dices)}",
        f"- QC: {', '.join(f'{s} {sum(r.qc == s for r in rows)}' for s in STATUSES)}"
        f"; Dice < 0.90 not failed by QC: {len(missed)}; Dice >= 0.90 failed by QC: "
        f"{len(bad_good)}; catastrophic (affine volume ratio outside 0.5-2 or landmark error "
        f"> 5 mm): {len(catastrophic)}",
        f"- fallback fired on {sum((r.attempts or 0) > 1 for r in rows)} case(s); wall time "
        f"without fallback: median {_f(float(np.median(walls)) if walls else None, 0)} s, max "
        f"{_f(max(walls, default=None), 0)} s; peak memory max "
        f"{_f(max((r.peak_mb for r in rows if r.peak_mb), default=None), 0)} MB",
    ]


def _f(value, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _same_as_default(default: Row | None, setting: str) -> Row | None:
    """Without fallback a run is the default run wherever the fallback did not fire (same code,
    seed and first attempt): that row is reused rather than run again."""
    if setting != "no-fallback" or default is None or default.attempts != 1:
        return None
    return Row(**{**asdict(default), "setting": setting,
                  "note": "the default run: its fallback did not fire"})  # fmt: skip


# ---- calibration of the mask checks ------------------------------------------------------------

# FreeSurfer labels (aseg / aparc+aseg) of what a failed extraction cuts off.
_CEREBELLUM = (7, 8, 46, 47)
_TEMPORAL_CORTEX = (1, 6, 7, 9, 15, 16, 30, 33, 34)  # + 1000 (left) or 2000 (right), Desikan
# Deep structures kept when a lobe is cut: ventricles, basal ganglia, thalamus, brainstem.
_DEEP = (4, 43, 10, 49, 11, 50, 12, 51, 13, 52, 16, 28, 60)


def calibrate(out: Path, setting: str = "default") -> list[dict]:
    """The mask checks (as QC computes them) on good masks and on masks damaged the ways brain
    extraction fails: without the cerebellum or a temporal lobe, with the skull, with the neck.

    Each labelled head's damaged FreeSurfer masks are measured with the linear part of mninorm's
    final transform for that head (``setting``'s run), exactly as QC would measure them.
    """
    from bids_app.measures.maskcheck import check_mask
    from bids_app.transforms import read_composite

    template_mask = nib.load(_template_file("mask"))
    rows = []
    for base in PERTURBED_BASES:
        number = base[-2:]
        output = out / "runs" / setting / base / "out" / f"sub-{base}" / "anat"
        forward = next(output.glob(f"*_from-T1w_to-{TEMPLATE}_mode-image_xfm.h5"), None)
        if forward is None:
            continue
        linear = read_composite(forward).linear
        labels_dir = DATA_ROOT / "labelled-heads" / "derivatives" / "freesurfer" / f"sub-{number}"
        reference = nib.load(labels_dir / "anat" / f"sub-{number}_desc-brain_mask.nii.gz")
        aparc = nib.load(labels_dir / "anat" / f"sub-{number}_desc-aparcaseg_dseg.nii.gz")
        head = nib.load(DATA_ROOT / "labelled-heads" / f"sub-{number}/anat/sub-{number}_T1w.nii.gz")
        inside = np.asarray(reference.dataobj) > 0
        mninorm_mask = nib.load(output / f"sub-{base}_desc-brain_mask.nii.gz")
        variants = {"FreeSurfer mask": inside, "mninorm's mask": _on_grid(mninorm_mask, reference)}
        variants.update(_damaged(inside, np.asarray(aparc.dataobj).astype(int), head, reference))
        for name, mask in variants.items():
            check = check_mask(_as_image(mask, reference), template_mask, linear)
            rows.append({
                "head": base, "mask": name, "dice": round(dice(mask, inside), 3),
                "min_sector_coverage": round(check.min_sector_coverage, 3),
                "worst_sector": check.worst_sector,
                "outside_fraction": round(check.outside_fraction, 3),
                "volume_ratio": round(check.volume_ratio, 3),
                "volume_ml": round(check.volume_ml),
            })  # fmt: skip
    return rows


def _damaged(inside: np.ndarray, aparc: np.ndarray, head, reference) -> dict:
    from scipy import ndimage

    zooms = np.asarray(reference.header.get_zooms()[:3], float)
    damaged = {"no cerebellum": inside & ~np.isin(aparc, _CEREBELLUM)}
    cortex = aparc >= 1000
    # Every brain voxel goes with its nearest cortex label: a lobe's cortex and white matter.
    _, nearest = ndimage.distance_transform_edt(~cortex, sampling=zooms, return_indices=True)
    nearest_label = aparc[tuple(nearest)]
    for side, offset in (("left", 1000), ("right", 2000)):
        temporal = np.isin(nearest_label, [offset + label for label in _TEMPORAL_CORTEX])
        damaged[f"no {side} temporal lobe"] = inside & ~(temporal & ~np.isin(aparc, _DEEP))
    outside_mm = ndimage.distance_transform_edt(~inside, sampling=zooms)
    for mm in (5, 10):
        damaged[f"with {mm} mm of skull and scalp"] = outside_mm <= mm
    damaged["with the neck"] = inside | _neck(inside, head, reference)
    return damaged


def _neck(inside: np.ndarray, head, reference) -> np.ndarray:
    """Head tissue from the brain's lowest point to 40 mm below it, within 40 mm of its axis."""
    data = np.asarray(_on_grid_image(head, reference).dataobj, dtype=np.float32)
    world = apply_affine(reference.affine, np.argwhere(inside).astype(float))
    low, centre = world[:, 2].min(), world.mean(axis=0)
    grid = apply_affine(reference.affine, np.indices(inside.shape).reshape(3, -1).T.astype(float))
    grid = grid.reshape(*inside.shape, 3)
    below = (grid[..., 2] < low + 5) & (grid[..., 2] > low - 40)
    near_axis = np.hypot(grid[..., 0] - centre[0], grid[..., 1] - centre[1]) < 40
    return below & near_axis & (data > np.percentile(data[inside], 5))


def _template_file(kind: str) -> Path:
    from templateflow import api

    desc, suffix = ("brain", "mask") if kind == "mask" else (None, "T1w")
    return Path(api.get(TEMPLATE, resolution=1, desc=desc, suffix=suffix, extension=".nii.gz"))


def calibration_table(rows: list[dict]) -> list[str]:
    from bids_app.measures.maskcheck import LIMITS

    lines = [
        "## Calibration of the mask checks",
        "",
        "Masks of the two labelled heads, damaged the ways brain extraction fails, measured as QC "
        "measures them (the linear part of mninorm's final transform for that head). Limits: "
        f"min sector coverage >= {LIMITS['min_sector_coverage'][0]}, outside fraction <= "
        f"{LIMITS['outside_fraction'][1]}, volume ratio {LIMITS['volume_ratio'][0]}-"
        f"{LIMITS['volume_ratio'][1]}.",
        "",
        "| head | mask | Dice with FreeSurfer | min sector coverage (sector) | outside fraction "
        "| volume ratio | volume ml |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['head']} | {r['mask']} | {r['dice']:.3f} | {r['min_sector_coverage']:.3f} "
            f"({r['worst_sector']}) | {r['outside_fraction']:.3f} | {r['volume_ratio']:.2f} | "
            f"{r['volume_ml']} |"
        )
    return lines


# ---- the command --------------------------------------------------------------------------------


def run(out: Path, case_names: list[str] | None, settings: list[str], threads: int,
        force: bool, report_only: bool = False) -> int:  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    if report_only:
        return _report(out, read_rows(out))
    # Scoring reads the template here too (landmarks, calibration): the same offline home.
    environment = _environment(threads)
    for name in ("TEMPLATEFLOW_HOME", "TEMPLATEFLOW_AUTOUPDATE"):
        os.environ[name] = environment[name]
    cases = build_cases(out, threads)
    if case_names:
        unknown = set(case_names) - {c.name for c in cases}
        if unknown:
            log.error("unknown case(s) %s; known: %s", ", ".join(sorted(unknown)),
                      ", ".join(c.name for c in cases))  # fmt: skip
            return 2
        # Perturbed cases need their base's run for the landmark error: run it first.
        wanted = set(case_names) | {c.base for c in cases if c.name in case_names and c.base}
        cases = [c for c in cases if c.name in wanted]
    rows = read_rows(out)
    for setting in settings:
        for case in cases:
            if (case.name, setting) in rows and not force:
                continue
            same = _same_as_default(rows.get((case.name, "default")), setting)
            if same is not None:
                rows[(case.name, setting)] = same
                continue
            log.info("heads benchmark: %s / %s", case.name, setting)
            rows[(case.name, setting)] = run_case(case, setting, out, threads)
            write_rows(out, rows)
            log.info("  %s", asdict(rows[(case.name, setting)]))
    return _report(out, rows)


def _report(out: Path, rows: dict) -> int:
    """heads.md from the CSV, with the calibration of the mask checks on the default runs."""
    os.environ.setdefault("TEMPLATEFLOW_HOME", str(DATA_ROOT / "templateflow"))
    path = write_report(out, rows)
    calibration = calibrate(out)
    if calibration:
        with open(path, "a") as report:
            report.write("\n".join(calibration_table(calibration)) + "\n")
    print(path.read_text())
    return 0
