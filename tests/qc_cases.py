"""Output folders for the QC and report tests: synthetic ones, and deliberately bad
normalisations made from a real run's outputs.

``write_synthetic_outputs`` writes what a run writes for one T1w, with the template itself as the
participant, optionally shifted: a perfect (or a misaligned) normalisation whose QC is known.
``write_itk_composite`` writes an ITK composite transform (.h5) as ANTs lays it out.
``drop_nonlinear_stage`` keeps only the affine stage of a registration that mninorm ran: the
affine part of the written composite transform is exactly what the rigid and affine stages found
(SyN only adds the displacement field). The T1w, the brain mask and the log-Jacobian maps are
then rewritten as an affine-only registration would have written them.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from bids_app.outputs import derivatives as drv
from bids_app.reports.qc import T1wRecord
from bids_app.spaces import OutputSpace
from bids_app.transforms import read_composite
from bids_app.transforms.orientation import ants_to_nifti

_RAS_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def write_itk_composite(path: Path, affine_ras: np.ndarray, field_lps=None) -> Path:
    """An ITK composite (.h5): an affine (RAS 4x4, template -> participant points) and, optionally,
    a displacement field ``(vectors (X, Y, Z, 3) in LPS mm, origin_lps, spacing_mm)`` on an LPS grid
    with an identity direction, in the layout ANTs writes."""
    import h5py

    lps = _RAS_LPS @ affine_ras @ _RAS_LPS
    parts = [
        ("CompositeTransform_float_3_3", None, None),
        (
            "AffineTransform_float_3_3",
            np.concatenate([lps[:3, :3].ravel(), lps[:3, 3]]).astype(np.float32),
            np.zeros(3),  # centre
        ),
    ]
    if field_lps is not None:
        vectors, origin, spacing = field_lps
        parts.append(
            (
                "DisplacementFieldTransform_float_3_3",
                # ITK orders voxels with the first index fastest
                np.asarray(vectors, np.float32).transpose(2, 1, 0, 3).ravel(),
                np.concatenate([vectors.shape[:3], origin, [spacing] * 3, np.eye(3).ravel()]),
            )
        )
    with h5py.File(path, "w") as h5:
        for index, (kind, params, fixed) in enumerate(parts):
            group = h5.create_group(f"TransformGroup/{index}")
            group.create_dataset(
                "TransformType", data=np.array([kind.encode()], dtype=object),
                dtype=h5py.string_dtype(),
            )  # fmt: skip
            if params is not None:
                group.create_dataset("TransformParameters", data=params)
                group.create_dataset("TransformFixedParameters", data=fixed.astype(float))
    return path


def _settings(engine: str, preset: str):
    from bids_app.settings import Settings

    return Settings(
        bids_dir=Path("bids"), output_dir=Path("out"), analysis_level="participant",
        engine=engine, preset=preset, random_seed=1,
    )  # fmt: skip


def recorded_provenance(t1w, engine: str, preset: str, stripped_input: bool = False) -> dict:
    """What the pipeline records (``pipeline._provenance``) for a T1w run with this engine and
    preset: the sidecars' "Registration", "BrainMaskMethod", "Software"..."""
    from bids_app.participant.images import HeaderReport
    from bids_app.participant.pipeline import _provenance

    header = HeaderReport("LIA", (1.0, 1.0, 1.0), (10, 10, 10), ("reoriented LIA -> RAS",))
    return _provenance(
        t1w, _settings(engine, preset), header, recorded_extraction(engine, stripped_input)
    )


def recorded_registration_entry(engine: str, preset: str) -> dict:
    """The run record's "Registration" as the pipeline writes it (``_registration_record``)."""
    from bids_app.participant.pipeline import _registration_record

    return _registration_record(_settings(engine, preset)).to_json()


def recorded_extraction(engine: str, stripped_input: bool = False):
    """A brain extraction as the pipeline records it: one attempt that passed its checks."""
    from bids_app.participant.brain import Attempt, BrainExtraction

    if stripped_input:
        return BrainExtraction(None, None, True)
    attempt = Attempt(
        number=1, template="OASIS30ANTs", engine=engine, start="head's centre of mass",
        start_score=0.6, why="first attempt", head_volume_ratio=1.0, check=None, problems=(),
        seconds=10.0,
    )  # fmt: skip
    return BrainExtraction(None, None, False, (attempt,), kept=1)


def write_synthetic_outputs(
    output_dir: Path,
    template,
    subject: str = "01",
    shift_voxels: int = 0,
    status: str = "ok",
    engine: str = "greedy",
    preset: str = "fast",
    run: str | None = None,
) -> Path:
    """A run's outputs for one T1w whose image is the template itself (shifted along y by
    ``shift_voxels``), with an identity transform, and the sidecars and run record the pipeline
    writes for a run with ``engine`` and ``preset``. Returns the run record's path."""
    from bids_app.participant.discovery import T1wInput

    name = f"sub-{subject}" + (f"_run-{run}" if run else "") + "_T1w.nii.gz"
    relpath = f"sub-{subject}/anat/{name}"
    entities = {"run": run} if run else {}
    t1w = T1wInput(subject=subject, path=Path(relpath), relpath=relpath, entities=entities)
    space = OutputSpace(template.name)
    head = nib.load(str(template.t1w_path))
    mask = nib.load(str(template.mask_path))
    provenance = recorded_provenance(t1w, engine, preset)
    record = {
        "Source": drv.bids_uri(relpath),
        "SourceOrientation": "LIA",
        "SourceShape": list(head.shape),
        "SourceZoomsMM": [float(z) for z in head.header.get_zooms()],
        "HeaderFixes": ["reoriented LIA -> RAS"],
        "SkullStripDecision": "auto: brain extracted",
        "StepSeconds": {"load": 0.1, "bias": 1.0, "brain_mask": 2.0},
        "Status": status,
        "Error": None if status == "ok" else "a T1w must be a 3D image",
        "TotalSeconds": 3.1,
        "OutputSpaces": [str(space)],
        "Preset": preset,
        "Engine": engine,
        "RandomSeed": 1,
        "Threads": 1,
        "Outputs": [],
        "Software": {"mninorm": "test"},
        "Registration": recorded_registration_entry(engine, preset),
    }
    record_path = drv.run_record_path(output_dir, t1w)
    record_path.parent.mkdir(parents=True, exist_ok=True)
    record_path.write_text(json.dumps(record))
    if status != "ok":
        return record_path
    anat = drv.anat_dir(output_dir, t1w)
    anat.mkdir(parents=True, exist_ok=True)
    nib.save(head, drv.native_path(output_dir, t1w, "t1w"))
    nib.save(mask, drv.native_path(output_dir, t1w, "mask"))
    drv.write_json(provenance, drv.sidecar_path(drv.native_path(output_dir, t1w, "t1w")))
    drv.write_json(
        {"Type": "Brain", "Method": provenance["BrainMaskMethod"]},
        drv.sidecar_path(drv.native_path(output_dir, t1w, "mask")),
    )

    def shifted(img, dtype):
        data = np.roll(np.asarray(img.dataobj).astype(dtype), shift_voxels, axis=1)
        return nib.Nifti1Image(data, img.affine)

    nib.save(shifted(head, np.float32), drv.space_path(output_dir, t1w, "t1w", space))
    nib.save(shifted(mask, np.uint8), drv.space_path(output_dir, t1w, "mask", space))
    zeros = nib.Nifti1Image(np.zeros(head.shape, np.float32), head.affine)
    for kind in ("logjac_nonlinear", "logjac_total"):
        nib.save(zeros, drv.space_path(output_dir, t1w, kind, space))
    write_itk_composite(
        drv.transform_path(output_dir, t1w, "t1w2std_xfm", template.name), np.eye(4)
    )
    drv.write_json(
        {"Registration": provenance["Registration"], "Software": provenance["Software"]},
        drv.sidecar_path(drv.space_path(output_dir, t1w, "t1w", space)),
    )
    return record_path


def write_affine_xfm(affine_ras: np.ndarray, path: Path) -> Path:
    """An ITK .h5 file holding only ``affine_ras`` (template points -> participant points)."""
    import ants

    lps = _RAS_LPS @ affine_ras @ _RAS_LPS
    transform = ants.create_ants_transform(
        "AffineTransform", precision="float", dimension=3,
        matrix=lps[:3, :3], translation=lps[:3, 3], center=np.zeros(3),
    )  # fmt: skip
    ants.write_transform(transform, str(path))
    return path


def drop_nonlinear_stage(
    output_dir: Path, record: T1wRecord, spaces: list[OutputSpace], fetch_template
) -> None:
    """Rewrite one T1w's template-space outputs as if only the affine stage had run."""
    import ants

    t1w = record.t1w
    templates = {space.template for space in spaces}
    for template in templates:
        forward = drv.transform_path(output_dir, t1w, "t1w2std_xfm", template)
        linear = read_composite(forward).linear
        write_affine_xfm(linear, forward)
    native_t1w = ants.image_read(str(drv.native_path(output_dir, t1w, "t1w")))
    native_mask = ants.image_read(str(drv.native_path(output_dir, t1w, "mask")))
    for space in spaces:
        forward = drv.transform_path(output_dir, t1w, "t1w2std_xfm", space.template)
        grid = ants.image_read(str(space.find_grid(fetch_template).t1w_path))
        t1w_img = ants.apply_transforms(grid, native_t1w, [str(forward)], interpolator="bSpline")
        mask_img = ants.threshold_image(
            ants.apply_transforms(grid, native_mask, [str(forward)], interpolator="linear"),
            0.5, 1e9, 1, 0,
        )  # fmt: skip
        nib.save(ants_to_nifti(t1w_img), drv.space_path(output_dir, t1w, "t1w", space))
        nib.save(
            ants_to_nifti(mask_img, dtype=np.uint8), drv.space_path(output_dir, t1w, "mask", space)
        )
        reference = nib.load(str(drv.space_path(output_dir, t1w, "logjac_nonlinear", space)))
        log_det = float(np.log(abs(np.linalg.det(read_composite(forward).linear[:3, :3]))))
        for kind, value in (("logjac_nonlinear", 0.0), ("logjac_total", log_det)):
            flat = np.full(reference.shape, value, dtype=np.float32)
            nib.save(
                nib.Nifti1Image(flat, reference.affine),
                drv.space_path(output_dir, t1w, kind, space),
            )


def templates_in(home: Path):
    """A ``fetch_template`` that reads a TemplateFlow folder directly (the templateflow client
    is bound to the TEMPLATEFLOW_HOME it was first imported with: the tests' miniature)."""
    from bids_app.templates import Template

    def fetch(name: str, resolution: int | None = None, cohort=None, folder=None) -> Template:
        resolution = 1 if resolution is None else resolution
        folder = home / f"tpl-{name}"
        t1w_path = folder / f"tpl-{name}_res-{resolution:02d}_T1w.nii.gz"
        metadata = json.loads((folder / "template_description.json").read_text())
        return Template(
            name=name,
            resolution=resolution,
            t1w_path=t1w_path,
            mask_path=folder / f"tpl-{name}_res-{resolution:02d}_desc-brain_mask.nii.gz",
            zooms_mm=tuple(float(z) for z in nib.load(t1w_path).header.get_zooms()[:3]),
            metadata_version=str(metadata.get("TemplateFlowVersion", "unknown")),
            citations=tuple(metadata.get("ReferencesAndLinks", [])),
            full_name=str(metadata.get("Name", name)),
        )

    return fetch
