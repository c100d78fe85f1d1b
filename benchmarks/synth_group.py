"""Synthetic participant-level outputs for mninorm's group level, with a planted volume change.

What the participant level would have written for ``--participants`` people, in a real template's
space, without running a registration: each normalised T1w is the template's T1w (times a random
gain, plus noise), the brain mask is the template's, and both log-Jacobian maps are noise plus, for
group ``A`` (the first half), ``+--effect`` inside a sphere: group A has ``exp(effect)`` times more
tissue there. The QC tables hold typical values, all ``pass``. ``BIDS_DIR`` gets a
``dataset_description.json`` and a ``participants.tsv`` with the column ``group`` (A / B).

    python benchmarks/synth_group.py make /tmp/synth/bids /tmp/synth/out --participants 20
    /usr/bin/time -v mninorm /tmp/synth/bids /tmp/synth/out group --group-by group
    python benchmarks/synth_group.py check /tmp/synth/out

``check`` compares the t map with the planted sphere (peak and mean t inside; largest and mean
|t| in the rest of the brain). Templates come from ``TEMPLATEFLOW_HOME`` (default: the shared
data's folder); the default is MNI152NLin2009cAsym at res-1 (193x229x193, 1 mm).

``tests/test_group.py`` writes its small synthetic cohorts with ``write_t1w`` from here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bids_app.outputs import derivatives as drv
from bids_app.participant.discovery import T1wInput
from bids_app.reports import qc
from bids_app.spaces import OutputSpace, parse_output_space

SHARED_TEMPLATEFLOW = Path(__file__).resolve().parents[2] / "shared" / "data" / "templateflow"
# The planted sphere, in template (MNI) millimetres: left posterior insula / putamen region.
DEFAULT_CENTRE_MM = (-30.0, -10.0, 5.0)
DEFAULT_RADIUS_MM = 10.0
TYPICAL_QC = {  # metric -> (mean, sd) of the synthetic QC tables
    "ncc": (0.80, 0.01),
    "mi": (0.9, 0.05),
    "nmi": (1.25, 0.01),
    "dice": (0.985, 0.003),
    "jacobian_min": (0.3, 0.05),
    "jacobian_max": (3.0, 0.3),
    "folding_fraction": (0.0, 0.0),
    "logjac_median": (0.0, 0.01),
    "logjac_iqr": (0.32, 0.02),
    "affine_volume_ratio": (1.0, 0.08),
    "brain_volume_ml": (1250.0, 100.0),
}


@dataclass(frozen=True)
class SpaceImages:
    """One T1w's maps in one space (arrays on the grid ``affine``)."""

    affine: np.ndarray
    t1w: np.ndarray
    mask: np.ndarray
    logjac_total: np.ndarray
    logjac_nonlinear: np.ndarray


def write_t1w(
    output_dir: Path,
    subject: str,
    spaces: dict[OutputSpace, SpaceImages],
    session: str | None = None,
    run: str | None = None,
    metrics: dict | None = None,
    status: str = "pass",
    run_ok: bool = True,
) -> T1wInput:
    """A T1w's participant-level outputs: run record, maps per space, QC table (one row per
    template, ``metrics`` and ``status`` on each)."""
    import nibabel as nib

    prefix = (
        f"sub-{subject}" + (f"_ses-{session}" if session else "") + (f"_run-{run}" if run else "")
    )
    relpath = (
        f"sub-{subject}/" + (f"ses-{session}/" if session else "") + f"anat/{prefix}_T1w.nii.gz"
    )
    entities = {"session": session} if session else {}
    t1w = T1wInput(subject=subject, path=Path(relpath), relpath=relpath, entities=entities)
    record = {
        "Source": drv.bids_uri(relpath),
        "Status": "ok" if run_ok else "failed",
        "Error": None if run_ok else "synthetic failure",
        "OutputSpaces": [str(space) for space in spaces],
        "Preset": "synthetic",
    }
    drv.write_json(record, drv.run_record_path(output_dir, t1w))
    if run_ok:
        for space, images in spaces.items():
            for kind in ("t1w", "mask", "logjac_total", "logjac_nonlinear"):
                dtype = np.uint8 if kind == "mask" else np.float32
                data = np.asarray(getattr(images, kind), dtype=dtype)
                drv.write_nifti(
                    nib.Nifti1Image(data, images.affine),
                    drv.space_path(output_dir, t1w, kind, space),
                )
    _write_qc(output_dir, t1w, record, spaces, metrics or {}, status if run_ok else "fail")
    return t1w


def _write_qc(output_dir, t1w, record, spaces, metrics, status) -> None:
    rows = []
    for template in dict.fromkeys(space.template for space in spaces):
        row = {
            "participant_id": f"sub-{t1w.subject}",
            "session_id": f"ses-{t1w.session}" if t1w.session else None,
            "source": record["Source"],
            "template": template,
            "space": template,
            "participant_status": status,
            "status": status,
            "status_reasons": None if status == "pass" else f"synthetic {status}",
            "run_status": record["Status"],
            **metrics,
        }
        rows.append("\t".join(qc.format_value(row.get(column)) for column in qc.COLUMNS))
    drv.write_text(
        "\n".join(["\t".join(qc.COLUMNS), *rows]) + "\n", drv.qc_path(output_dir, t1w, "table")
    )


def sphere(shape, affine: np.ndarray, centre_mm, radius_mm: float) -> np.ndarray:
    """Voxels whose centre lies within ``radius_mm`` of ``centre_mm`` (world coordinates)."""
    ijk = np.indices(shape, dtype=np.float32).reshape(3, -1)
    world = affine[:3, :3].astype(np.float32) @ ijk + affine[:3, 3:4].astype(np.float32)
    distance = np.linalg.norm(world - np.asarray(centre_mm, np.float32)[:, None], axis=0)
    return (distance <= radius_mm).reshape(shape)


def typical_metrics(rng: np.random.Generator) -> dict:
    return {m: float(mean + sd * rng.standard_normal()) for m, (mean, sd) in TYPICAL_QC.items()}


def make(
    bids_dir: Path, output_dir: Path, participants: int, space: OutputSpace, effect: float,
    noise: float, centre_mm, radius_mm: float, seed: int,
) -> None:  # fmt: skip
    import nibabel as nib

    from bids_app.templates import fetch_template

    template = space.find_grid(fetch_template)
    head = nib.load(str(template.t1w_path))
    template_t1w = np.asarray(head.dataobj, dtype=np.float32)
    mask = (np.asarray(nib.load(str(template.mask_path)).dataobj) > 0).astype(np.uint8)
    planted = sphere(template_t1w.shape, head.affine, centre_mm, radius_mm) & (mask > 0)
    rng = np.random.default_rng(seed)
    labels = [f"{i + 1:02d}" for i in range(participants)]
    groups = {label: "A" if i < participants // 2 else "B" for i, label in enumerate(labels)}
    scale = float(np.percentile(template_t1w[mask > 0], 99))
    for label in labels:
        t1w = template_t1w * rng.uniform(0.8, 1.2)
        t1w += rng.normal(0, 0.02 * scale, t1w.shape).astype(np.float32)
        logjacs = []
        for _ in range(2):  # total, nonlinear
            logjac = rng.normal(0, noise, t1w.shape).astype(np.float32)
            if groups[label] == "A":
                logjac[planted] += effect
            logjacs.append(logjac)
        images = SpaceImages(head.affine, t1w, mask, *logjacs)
        write_t1w(output_dir, label, {space: images}, metrics=typical_metrics(rng))
        print(f"sub-{label} ({groups[label]}) written", file=sys.stderr)
    bids_dir.mkdir(parents=True, exist_ok=True)
    (bids_dir / "dataset_description.json").write_text(
        json.dumps({"Name": "synthetic group-level cohort", "BIDSVersion": "1.9.0"})
    )
    lines = ["participant_id\tgroup", *(f"sub-{label}\t{groups[label]}" for label in labels)]
    (bids_dir / "participants.tsv").write_text("\n".join(lines) + "\n")
    truth = {"Space": str(space), "CentreMM": list(centre_mm), "RadiusMM": radius_mm,
             "Effect": effect, "Noise": noise, "PlantedVoxels": int(planted.sum())}  # fmt: skip
    (output_dir / "synthetic_truth.json").write_text(json.dumps(truth, indent=2) + "\n")


def check(output_dir: Path, jacobian: str = "total") -> dict:
    """The t map against the planted sphere (``synthetic_truth.json`` written by ``make``)."""
    import nibabel as nib

    truth = json.loads((output_dir / "synthetic_truth.json").read_text())
    space = parse_output_space(truth["Space"])
    label = drv.space_label(space)
    t_img = nib.load(str(drv.group_space_path(output_dir, "t", label, jacobian, "group")))
    t = np.asarray(t_img.dataobj, dtype=np.float64)
    brain = (
        np.asarray(nib.load(str(drv.group_space_path(output_dir, "brain_probseg", label))).dataobj)
        >= 0.5
    )
    inside = sphere(t.shape, t_img.affine, truth["CentreMM"], truth["RadiusMM"]) & brain
    outside = brain & ~inside
    return {
        "planted_voxels": int(inside.sum()),
        "peak_t_inside": round(float(t[inside].max()), 2),
        "mean_t_inside": round(float(t[inside].mean()), 2),
        "max_abs_t_outside": round(float(np.abs(t[outside]).max()), 2),
        "mean_abs_t_outside": round(float(np.abs(t[outside]).mean()), 3),
        "share_outside_above_peak_inside": float((np.abs(t[outside]) > t[inside].max()).mean()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    make_parser = commands.add_parser("make", help="write the cohort")
    make_parser.add_argument("bids_dir", type=Path)
    make_parser.add_argument("output_dir", type=Path)
    make_parser.add_argument("--participants", type=int, default=20)
    make_parser.add_argument("--space", default="MNI152NLin2009cAsym", help="Template[:res-N]")
    make_parser.add_argument("--effect", type=float, default=0.1, help="log-volume change in A")
    make_parser.add_argument("--noise", type=float, default=0.05, help="log-Jacobian noise SD")
    make_parser.add_argument("--centre-mm", type=float, nargs=3, default=DEFAULT_CENTRE_MM)
    make_parser.add_argument("--radius-mm", type=float, default=DEFAULT_RADIUS_MM)
    make_parser.add_argument("--seed", type=int, default=0)
    check_parser = commands.add_parser("check", help="the t map against the planted sphere")
    check_parser.add_argument("output_dir", type=Path)
    check_parser.add_argument("--jacobian", choices=("total", "nonlinear"), default="total")
    args = parser.parse_args(argv)
    if args.command == "make":
        os.environ.setdefault("TEMPLATEFLOW_HOME", str(SHARED_TEMPLATEFLOW))
        os.environ.setdefault("TEMPLATEFLOW_AUTOUPDATE", "0")
        make(args.bids_dir, args.output_dir, args.participants, parse_output_space(args.space),
             args.effect, args.noise, args.centre_mm, args.radius_mm, args.seed)  # fmt: skip
    else:
        print(json.dumps(check(args.output_dir, args.jacobian), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
