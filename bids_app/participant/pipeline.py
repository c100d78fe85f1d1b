"""The participant level: the literal sequence of steps for one T1w, and the participant loop.

Each participant runs in its own short-lived process (ANTs' memory grows over long loops and a
crash must not take the others down); one T1w's failure never stops the other T1ws.
"""

from __future__ import annotations

import logging
import multiprocessing
import tempfile
import threading
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, wait
from contextlib import nullcontext
from dataclasses import dataclass
from logging.handlers import QueueListener
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from bids_app import logs, progress
from bids_app.errors import BrainExtractionError, MemoryBudgetError, MninormError
from bids_app.outputs import derivatives as drv
from bids_app.outputs.provenance import RunInfo, utc_now
from bids_app.outputs.record import (
    BrainExtractionRecord,
    ExtractionAttempt,
    RegistrationRecord,
    RunRecord,
    write_run_record,
)
from bids_app.outputs.source import T1wInput
from bids_app.participant import resume
from bids_app.participant.brain import Attempt, BrainExtraction
from bids_app.participant.headstart import write_start
from bids_app.settings import Settings
from bids_app.spaces import OutputSpace
from bids_app.templates import Template

log = logging.getLogger(__name__)

# Tissue within this distance of the brain edge still informs the metric: edges matter.
_MASK_DILATION_VOX = 2


@dataclass(frozen=True)
class TemplateSet:
    """One template: the grid registration uses (res-1) and one grid per requested output space."""

    name: str
    registration: Template
    outputs: dict  # OutputSpace -> Template


@dataclass(frozen=True)
class Templates:
    """Every template a run needs, found before any parallel work."""

    spaces: dict  # template name -> TemplateSet
    brain: Template | None  # the head brain extraction registers to (None: the first space's)


# The summary's word for a T1w that resume skipped (its outputs were complete and unchanged)
SKIPPED = "ok (unchanged since its last run: skipped)"


@dataclass(frozen=True)
class T1wOutcome:
    source: str  # path relative to bids_dir
    subject: str
    ok: bool
    message: str = ""
    outputs: tuple[Path, ...] = ()
    seconds: float = 0.0


def resolve_templates(settings: Settings) -> Templates:
    """Find every template file before any parallel work (TemplateFlow is not process-safe)."""
    return Templates(_resolve_spaces(settings.output_spaces), _resolve_brain_template(settings))


def _resolve_brain_template(settings: Settings) -> Template | None:
    from bids_app.errors import TemplateUnavailableError
    from bids_app.templates import fetch_template

    if settings.skull_strip == "skip" or settings.brain_template in settings.templates:
        return None
    try:
        return fetch_template(settings.brain_template)  # its registration grid
    except TemplateUnavailableError as err:
        if settings.brain_template_required:
            raise
        log.warning(
            "brain extraction template %s not found (%s); brain extraction registers to %s's "
            "head instead", settings.brain_template, err, settings.templates[0],
        )  # fmt: skip
        return None


def _resolve_spaces(spaces: tuple[OutputSpace, ...]) -> dict[str, TemplateSet]:
    """Per template (and cohort): the registration grid, and the grid of each output space
    (None in the space: the registration grid)."""
    from bids_app.templates import fetch_template

    sets: dict[str, TemplateSet] = {}
    for space in spaces:
        if space.key not in sets:
            registration = space.find_registration_grid(fetch_template)
            sets[space.key] = TemplateSet(space.key, registration, {})
        template_set = sets[space.key]
        registration = template_set.registration
        template_set.outputs[space] = (
            registration  # found already
            if space.resolution in (None, registration.resolution)
            else space.find_grid(fetch_template)
        )
    return sets


# ---- one T1w, top to bottom ------------------------------------------------------------------


def process_t1w(
    t1w: T1wInput,
    settings: Settings,
    templates: Templates,
    work_dir: Path,
    learnt: dict,
) -> T1wOutcome:
    """All steps for one T1w. ``learnt`` (``RunRecord`` fields by name) is filled as they go, so
    a failure's run record keeps what was known."""
    import ants

    from bids_app.participant.bias import correct_bias
    from bids_app.participant.brain import looks_skull_stripped, mask_from_nonzero
    from bids_app.participant.images import load_t1w
    from bids_app.participant.lesion import fixed_without_lesion, without_lesion
    from bids_app.transforms.orientation import nifti_to_ants

    timer = _StepTimer(learnt.setdefault("step_seconds", {}), t1w, settings)
    engine = settings.engines(settings.engine, settings.omp_nthreads)
    prefix = drv.source_prefix(t1w)
    work = work_dir / f"sub-{t1w.subject}" / prefix
    work.mkdir(parents=True, exist_ok=True)

    with timer("load"):
        nifti, header = load_t1w(t1w.path)
        t1w_img = nifti_to_ants(nifti)
    stripped_input = _skull_stripped_input(settings.skull_strip, nifti, looks_skull_stripped)
    lesion = _load_lesion(t1w, nifti, learnt)
    lesion_img = None if lesion is None else nifti_to_ants(lesion.img)
    learnt.update(
        source_orientation=header.source_orientation,
        source_shape=tuple(header.source_shape),
        source_zooms_mm=tuple(header.source_zooms),
        header_fixes=tuple(header.actions),
        skull_strip_decision=f"{settings.skull_strip}: "
        + ("input already skull-stripped" if stripped_input else "brain extracted"),
    )
    log.info(
        "sub-%s: %s (%s, header: %s); skull strip: %s",
        t1w.subject, t1w.relpath, header.source_orientation,
        "; ".join(header.actions) or "fine", "no (already stripped)" if stripped_input else "yes",
    )  # fmt: skip

    # Each template's head and brain mask, read once: brain extraction and registration share them.
    template_images = {
        name: (
            ants.image_read(str(templates.spaces[name].registration.t1w_path)),
            ants.image_read(str(templates.spaces[name].registration.mask_path)),
        )
        for name in settings.templates
    }
    if stripped_input:
        with timer("brain_mask"):
            extraction = BrainExtraction(mask_from_nonzero(t1w_img), None, True)
        with timer("bias"):
            preproc = correct_bias(t1w_img, extraction.mask_img)
    else:
        with timer("bias"):
            preproc = correct_bias(t1w_img)
        with timer("brain_mask"):
            extraction = _extract_brain(
                preproc, settings, templates, template_images, work, lesion_img
            )
        learnt["brain_extraction"] = BrainExtractionRecord(
            fallback=settings.fallback,
            kept_attempt=extraction.kept,
            attempts=tuple(_attempt_record(attempt) for attempt in extraction.attempts),
        )
        if not any(attempt.ok for attempt in extraction.attempts):
            raise BrainExtractionError(
                f"{t1w.relpath}: no brain-extraction attempt passed its checks "
                f"({'; '.join(extraction.attempts[extraction.kept - 1].problems)}); check the "
                "image in the report, or give a skull-stripped T1w with --skull-strip skip"
            )
    mask = extraction.mask_img
    if lesion_img is not None:  # the lesion is brain: kept inside the mask whatever extraction did
        kept = np.maximum(mask.numpy(), lesion_img.numpy() > 0).astype(np.float32)
        mask = mask.new_image_like(kept)

    provenance = _provenance(t1w, settings, header, extraction)
    if lesion is not None:
        provenance["LesionMask"] = lesion.as_record()
    outputs = _write_native(
        t1w, settings, preproc, mask, provenance, learnt.get("brain_extraction")
    )

    brain = preproc * mask
    moving_mask = ants.iMath(mask, "MD", _MASK_DILATION_VOX)
    for name in settings.templates:
        template_set = templates.spaces[name]
        with timer(f"register_{name}"):
            fixed_head, fixed_mask = template_images[name]
            fixed_brain = fixed_head * fixed_mask
            initial_xfm = (
                extraction.linear_xfm
                if extraction.template == name
                else write_start(fixed_brain, fixed_mask, brain, work / f"{name}_start.h5")
            )
            metric_fixed_mask = ants.iMath(fixed_mask, "MD", _MASK_DILATION_VOX)
            metric_moving_mask = moving_mask
            if lesion_img is not None:  # cost-function masking (participant/lesion.py)
                metric_fixed_mask = fixed_without_lesion(
                    fixed_brain, metric_fixed_mask, lesion_img, initial_xfm
                )
                metric_moving_mask = without_lesion(moving_mask, lesion_img)
            result = engine.register(
                fixed_brain,
                brain,
                preset=settings.preset,
                out_prefix=work / f"{name}_",
                seed=settings.random_seed,
                fixed_mask=metric_fixed_mask,
                moving_mask=metric_moving_mask,
                initial_xfm=initial_xfm,
            )
        with timer(f"outputs_{name}"):
            outputs += _write_template_outputs(
                t1w, settings, template_set, result, preproc, mask, provenance, lesion_img
            )
    seconds = timer.total()
    log.info("sub-%s: %s done in %.0f s", t1w.subject, t1w.relpath, seconds)
    return T1wOutcome(t1w.relpath, t1w.subject, True, "", tuple(outputs), seconds)


def _extract_brain(
    preproc, settings: Settings, templates: Templates, template_images, work: Path, lesion_img=None
):
    """Brain extraction with its fallback plan: the extraction template first, then the first
    output template's head, then the other engine."""
    from bids_app.participant.brain import BrainTemplate, extract_brain, extraction_plans
    from bids_app.registration.registry import ENGINES

    candidates = []
    if templates.brain is not None:
        candidates.append(
            BrainTemplate(
                templates.brain.name,
                _ants_read(templates.brain.t1w_path),
                _ants_read(templates.brain.mask_path),
            )
        )
    elif settings.brain_template in template_images:  # one of the output templates was asked for
        asked = settings.brain_template
        candidates.append(BrainTemplate(asked, *template_images[asked]))
    first = settings.templates[0]
    if first not in [candidate.name for candidate in candidates]:
        candidates.append(BrainTemplate(first, *template_images[first]))
    engines = [settings.engines(settings.engine, settings.omp_nthreads)]
    engines += [
        settings.engines(name, settings.omp_nthreads) for name in ENGINES if name != settings.engine
    ]
    plans = extraction_plans(candidates, engines, settings.fallback)
    return extract_brain(preproc, plans, work / "brain_", settings.random_seed, lesion_img)


def _load_lesion(t1w: T1wInput, nifti, learnt: dict):
    """The T1w's lesion mask (label-lesion_roi in its folder) on its grid, or None."""
    from bids_app.participant.lesion import find_lesion, load_lesion

    path = find_lesion(t1w.path, {**t1w.entities, "subject": t1w.subject})
    if path is None:
        return None
    relpath = (Path(t1w.relpath).parent / path.name).as_posix()
    lesion = load_lesion(path, relpath, nifti)
    learnt["lesion_mask"] = lesion.as_record()
    log.info(
        "sub-%s: lesion mask %s (%.1f ml%s): left out of the registration metrics",
        t1w.subject, path.name, lesion.volume_ml, ", resampled onto the T1w grid"
        if lesion.resampled else "",
    )  # fmt: skip
    return lesion


def _ants_read(path: Path):
    import ants

    return ants.image_read(str(path))


def _skull_stripped_input(mode: str, nifti, looks_skull_stripped) -> bool:
    if mode == "skip":
        return True
    if mode == "force":
        return False
    voxel_volume = float(np.prod(nifti.header.get_zooms()[:3]))
    return looks_skull_stripped(np.asarray(nifti.dataobj), voxel_volume)


def _attempt_record(attempt: Attempt) -> ExtractionAttempt:
    """One attempt as the run record and the mask's sidecar keep it (rounded for reading)."""
    check = attempt.check
    return ExtractionAttempt(
        number=attempt.number,
        why=attempt.why,
        template=attempt.template,
        engine=attempt.engine,
        start=attempt.start,
        start_score=round(attempt.start_score, 4),
        head_volume_ratio=round(attempt.head_volume_ratio, 3),
        problems=tuple(attempt.problems),
        seconds=round(attempt.seconds, 1),
        **(
            {}
            if check is None
            else dict(
                brain_volume_ml=round(check.volume_ml, 1),
                template_mask_dice=round(check.template_dice, 4),
                min_sector_coverage=round(check.min_sector_coverage, 4),
                worst_sector=check.worst_sector,
                outside_fraction=round(check.outside_fraction, 4),
                volume_ratio=round(check.volume_ratio, 4),
            )
        ),
    )


def _write_native(
    t1w, settings, preproc, mask, provenance, extraction: BrainExtractionRecord | None
) -> list[Path]:
    from bids_app.transforms.orientation import ants_to_nifti

    out = settings.output_dir
    t1w_path = drv.native_path(out, t1w, "t1w")
    mask_path = drv.native_path(out, t1w, "mask")
    drv.write_nifti(ants_to_nifti(preproc), t1w_path)
    drv.write_nifti(ants_to_nifti(mask, dtype=np.uint8), mask_path)
    drv.write_json(
        {**provenance, "Description": "Bias-corrected (N4) T1w, reoriented to RAS"},
        drv.sidecar_path(t1w_path),
    )
    drv.write_json(
        {
            "Description": "Brain mask of the T1w, on the grid of its desc-preproc_T1w",
            "Type": "Brain",
            "SpatialReference": drv.derivative_uri(out, t1w_path),
            "Sources": [drv.derivative_uri(out, t1w_path)],
            "RawSources": provenance["Sources"],
            "Method": provenance["BrainMaskMethod"],
            # Every attempt, as the run record has them (absent for skull-stripped inputs).
            **({"BrainExtraction": extraction.to_json()} if extraction is not None else {}),
        },
        drv.sidecar_path(mask_path),
    )
    return [t1w_path, mask_path]


def _write_template_outputs(
    t1w, settings, template_set, result, preproc, mask, provenance, lesion_img=None
):
    import ants

    from bids_app.transforms import read_composite
    from bids_app.transforms.jacobian import log_jacobians
    from bids_app.transforms.orientation import ants_to_nifti, nifti_to_ants

    out = settings.output_dir
    name = template_set.name
    forward = drv.copy_file(result.forward_xfm, drv.transform_path(out, t1w, "t1w2std_xfm", name))
    inverse = drv.copy_file(result.inverse_xfm, drv.transform_path(out, t1w, "std2t1w_xfm", name))
    for path, source, target in ((forward, "T1w", name), (inverse, name, "T1w")):
        drv.write_json(
            {"From": source, "To": target, "Type": "ITK composite (HDF5)",
             "Registration": provenance["Registration"]},
            drv.sidecar_path(path),
        )  # fmt: skip
    written = [forward, inverse]

    nonlinear, total, field_affine = log_jacobians(read_composite(result.forward_xfm))
    import nibabel as nib

    logjac = {
        "logjac_nonlinear": nifti_to_ants(nib.Nifti1Image(nonlinear, field_affine)),
        "logjac_total": nifti_to_ants(nib.Nifti1Image(total, field_affine)),
    }
    for space, template in template_set.outputs.items():
        grid = ants.image_read(str(template.t1w_path))
        images = {
            # Cubic B-spline: ~9x faster than Lanczos on a 1 mm grid (7 s vs 64 s, one thread);
            # its slight undershoot at the brain's edge is clipped (a T1w is never negative).
            "t1w": _clip_negative(
                ants.apply_transforms(
                    grid, preproc, [str(result.forward_xfm)], interpolator="bSpline"
                )
            ),
            "mask": ants.threshold_image(
                ants.apply_transforms(grid, mask, [str(result.forward_xfm)], interpolator="linear"),
                0.5, 1e9, 1, 0,
            ),
        }  # fmt: skip
        for kind, image in logjac.items():
            images[kind] = ants.resample_image_to_target(image, grid, interp_type="linear")
        if lesion_img is not None:
            images["lesion"] = ants.threshold_image(
                ants.apply_transforms(
                    grid, lesion_img, [str(result.forward_xfm)], interpolator="linear"
                ),
                0.5, 1e9, 1, 0,
            )  # fmt: skip
        for kind, image in images.items():
            path = drv.space_path(out, t1w, kind, space)
            dtype = np.uint8 if kind in ("mask", "lesion") else np.float32
            drv.write_nifti(ants_to_nifti(image, dtype=dtype), path)
            drv.write_json(
                _space_sidecar(
                    kind, space, template, provenance, forward, out, template_set.registration
                ),
                drv.sidecar_path(path),
            )
            written.append(path)
    return written


def _clip_negative(image):
    return image.new_image_like(np.maximum(image.numpy(), 0))


_SPACE_DESCRIPTIONS = {
    "t1w": "The bias-corrected T1w (desc-preproc_T1w) resampled onto the template grid with the "
    "from-T1w_to-<template> transform in Sources.",
    "mask": "The native brain mask (desc-brain_mask) resampled onto the template grid with the "
    "from-T1w_to-<template> transform in Sources.",
    "lesion": "The lesion mask (label-lesion_roi next to the T1w) resampled onto the template grid "
    "with the from-T1w_to-<template> transform in Sources (linear, thresholded at 0.5).",
    "logjac_nonlinear": (
        "Natural log of the Jacobian determinant of the nonlinear (SyN) part of the "
        "template-to-T1w mapping, in template space: > 0 where the participant's tissue is larger "
        "than the template's at that location, after removing the global affine size difference."
    ),
    "logjac_total": (
        "Natural log of the Jacobian determinant of the whole template-to-T1w mapping (affine "
        "included), in template space: > 0 where the participant's tissue is larger than the "
        "template's at that location."
    ),
}


def _space_sidecar(kind, space, template, provenance, forward, out, registration_grid) -> dict:
    sidecar = {
        "SkullStripped": provenance["SkullStripped"] if kind == "t1w" else None,
        "Sources": [drv.derivative_uri(out, forward)],
        "RawSources": provenance["Sources"],
        "SpatialReference": _templateflow_uri(template),
        "Template": _template_entry(template, registration_grid),
        "Registration": provenance["Registration"],
        "LesionMask": provenance.get("LesionMask"),
        "Software": provenance["Software"],
    }
    if space.resolution is not None or template.resolution != 1:
        sidecar["Resolution"] = _resolution_text(space, template)
    sidecar["Description"] = _SPACE_DESCRIPTIONS[kind]
    if kind.startswith("logjac"):
        sidecar["Units"] = "log(volume ratio)"
    if kind == "mask":
        sidecar["Type"] = "Brain"
    if kind == "lesion":
        sidecar["Type"] = "Lesion"
    return {k: v for k, v in sidecar.items() if v is not None}


def _template_entry(template: Template, registration_grid: Template) -> dict:
    entry = {
        "Identifier": template.name,
        "Name": template.full_name,
        "Cohort": template.cohort,
        "Custom": template.custom or None,  # not TemplateFlow's: a folder in its layout
        "Folder": str(template.t1w_path.parent) if template.custom else None,
        "ResolutionIndex": template.resolution,
        "VoxelSizeMM": list(template.zooms_mm),
        "TemplateFlowVersion": template.metadata_version,
        # the grid the registration ran on, when it is not res-1 (a template without res-1 here)
        "RegistrationGrid": None
        if registration_grid.resolution == 1
        else f"{registration_grid.grid_label} "
        f"({'x'.join(f'{z:g}' for z in registration_grid.zooms_mm)} mm)",
    }
    return {k: v for k, v in entry.items() if v is not None}


def _resolution_text(space: OutputSpace, template: Template) -> str:
    """Which grid of the template the outputs are on, said whenever it is not res-1."""
    voxels = f"{'x'.join(f'{z:g}' for z in template.zooms_mm)} mm voxels"
    source = "custom template" if template.custom else "TemplateFlow"
    if template.resolution is None:
        return f"the single grid of {source} {template.name} (no res- entity): {voxels}"
    text = f"{source} res-{template.resolution:02d} grid of {template.name}: {voxels}"
    if space.resolution is None:
        text += " (the finest grid available: res-01 was not)"
    return text


def _templateflow_uri(template: Template) -> str:
    """SpatialReference: TemplateFlow's address of the grid, or a custom template's file."""
    if template.custom:
        return template.t1w_path.resolve().as_uri()
    folder = f"tpl-{template.name}/" + (f"cohort-{template.cohort}/" if template.cohort else "")
    return f"https://templateflow.s3.amazonaws.com/{folder}{template.t1w_path.name}"


def _provenance(t1w, settings, header, extraction: BrainExtraction) -> dict:
    from bids_app.registration.registry import ENGINES, get_preset

    preset = get_preset(settings.engine, settings.preset)
    engine = ENGINES[settings.engine]
    versions = _software_versions(settings.engine)
    return {
        "SkullStripped": extraction.skull_stripped_input,
        "Sources": [drv.bids_uri(t1w.relpath)],
        "SourceOrientation": header.source_orientation,
        "HeaderFixes": list(header.actions),
        "BrainMaskMethod": extraction.method,
        "Registration": {
            "Engine": engine.label,
            "EngineVersion": versions[engine.package],
            "Preset": preset.name,
            "Stages": preset.description,
            "TemplateGridMM": preset.grid_mm,
            "RandomSeed": settings.random_seed,
            "Threads": settings.omp_nthreads,
            # How _write_template_outputs resamples (the report's methods text reads this)
            "OutputInterpolation": {
                "T1w": "cubic B-spline, negative values set to 0",
                "BrainMask": "linear, thresholded at 0.5",
                "LogJacobian": "linear (from the displacement field's grid)",
            },
        },
        "Software": versions,
    }


def _registration_record(settings: Settings) -> RegistrationRecord:
    """What the methods text needs of the registration, from the registry, while it is known."""
    from bids_app.registration.registry import ENGINES, get_preset

    engine = ENGINES[settings.engine]
    preset = get_preset(settings.engine, settings.preset)
    return RegistrationRecord(
        engine_label=engine.label,
        engine_package=engine.package,
        engine_version=_software_versions(settings.engine)[engine.package],
        preset=preset.name,
        stages=preset.description,
        methods=tuple(preset.methods(masks=True)),
        references=dict(preset.references),
    )


def _software_versions(engine: str = "ants") -> dict:
    from importlib.metadata import PackageNotFoundError, version

    from bids_app.registration.registry import ENGINES

    versions = {}
    packages = ("mninorm", "antspyx", ENGINES[engine].package, "nibabel", "numpy", "pybids",
                "templateflow")  # fmt: skip
    for package in dict.fromkeys(packages):  # antspyx once when it is also the engine
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "unknown"
    return versions


class _StepTimer:
    """Times the steps of one T1w into ``steps`` (the run record's StepSeconds) and announces each
    step's start and end (``progress`` events: the console's lines and live view)."""

    def __init__(self, steps: dict, t1w: T1wInput, settings: Settings):
        self.steps = steps
        self._start = time.perf_counter()
        self._subject = t1w.subject
        self._t1w = drv.source_prefix(t1w)
        self._registration = _registration_words(settings)

    def __call__(self, name: str):
        timer = self
        label = progress.describe_step(name, self._registration)

        class _Step:
            def __enter__(self):
                progress.announce(
                    log, progress.StepStarted(timer._subject, timer._t1w, name, label),
                    "sub-%s: %s...", timer._subject, label,
                )  # fmt: skip
                self.start = time.perf_counter()

            def __exit__(self, kind, *exc):
                seconds = time.perf_counter() - self.start
                timer.steps[name] = round(seconds, 2)
                event = progress.StepEnded(
                    timer._subject, timer._t1w, name, label, seconds, ok=kind is None
                )
                outcome = "done" if kind is None else "failed"
                progress.announce(
                    log, event, "sub-%s: %s %s in %.1f s", timer._subject, label, outcome, seconds
                )

        return _Step()

    def total(self) -> float:
        return time.perf_counter() - self._start


def _registration_words(settings: Settings) -> str:
    """'Greedy, 1.5 mm grid': how the T1w is registered, for the progress lines."""
    from bids_app.registration.registry import ENGINES, get_preset

    grid = get_preset(settings.engine, settings.preset).grid_mm
    return f"{ENGINES[settings.engine].short}, {grid:g} mm grid"


# ---- the participant loop --------------------------------------------------------------------


def run_participant(
    subject: str, t1ws: tuple[T1wInput, ...], settings: Settings, templates, work_dir: Path,
    run: RunInfo, verbosity: logs.Verbosity, refusal: str | None = None,
) -> list[T1wOutcome]:  # fmt: skip
    """Every T1w of one participant; a failing T1w is reported and the next one still runs.

    What is said while a T1w runs, and what compiled code prints, goes to its log file. With a
    ``refusal`` (the memory plan's), each T1w fails with it, unprocessed, as any failure is told.
    """
    start = time.perf_counter()
    outcomes = []
    for t1w in t1ws:
        log_path = drv.t1w_log_path(settings.output_dir, t1w)
        with logs.t1w_log(log_path, drv.source_prefix(t1w), verbosity):
            outcomes.append(_run_t1w(t1w, settings, templates, work_dir, run, refusal))
    write_report(subject, settings)
    ok = sum(outcome.ok for outcome in outcomes)
    event = progress.ParticipantEnded(subject, ok, len(outcomes) - ok, time.perf_counter() - start)
    progress.announce(log, event, "sub-%s: %d T1w ok, %d failed", subject, ok, event.failed)
    return outcomes


def _run_t1w(
    t1w: T1wInput, settings: Settings, templates, work_dir: Path, run: RunInfo,
    refusal: str | None = None,
):  # fmt: skip
    prefix = drv.source_prefix(t1w)
    started = utc_now()
    start = time.perf_counter()
    progress.announce(
        log, progress.T1wStarted(t1w.subject, prefix, t1w.relpath),
        "sub-%s: %s started (run %s)", t1w.subject, t1w.relpath, run.run_uuid,
    )  # fmt: skip
    learnt: dict = {}
    resume_fields = _resume_fields(t1w, settings)
    _write_started_record(settings, t1w, run, started, resume_fields)
    # A killed run's temporary files: nothing else would remove them
    drv.remove_partial_files(settings.output_dir / f"sub-{t1w.subject}")
    try:
        if refusal is not None:
            raise MemoryBudgetError(refusal)
        outcome = process_t1w(t1w, settings, templates, work_dir, learnt)
    except MninormError as err:
        outcome = failed_outcome(t1w, str(err), start)
    except OSError as err:  # a full disk, a folder made read-only: the writes are atomic
        log.info("sub-%s: %s", t1w.subject, traceback.format_exc())
        outcome = failed_outcome(
            t1w,
            f"{type(err).__name__}: {err}; make room or fix the permissions, then run this "
            "participant again (no output was left half-written)",
            start,
        )
    except Exception as err:  # anything else: still isolate it, and keep the traceback
        # INFO: the T1w's log file keeps it; the console shows it with -v.
        log.info("sub-%s: %s", t1w.subject, traceback.format_exc())
        outcome = failed_outcome(t1w, f"unexpected {type(err).__name__}: {err}", start)
    _write_run_record(settings, t1w, outcome, learnt, run, started, resume_fields)
    progress.announce(
        log, progress.T1wEnded(t1w.subject, prefix, outcome.ok, outcome.seconds),
        "sub-%s: %s %s; run record %s", t1w.subject, t1w.relpath,
        "ok" if outcome.ok else "failed", drv.run_record_path(settings.output_dir, t1w),
    )  # fmt: skip
    return outcome


def _resume_fields(t1w: T1wInput, settings: Settings) -> dict | None:
    try:
        return resume.fingerprint(t1w, settings).as_record()
    except OSError:  # an unreadable input: loading it fails and says so
        return None


def write_report(subject: str, settings: Settings) -> None:
    """QC, figures and the HTML report, from what is on disk; their failure never fails a T1w."""
    try:
        from bids_app.reports.participant import write_participant_report

        write_participant_report(settings.output_dir, subject)
    except Exception as err:
        log.debug("sub-%s: %s", subject, traceback.format_exc())
        log.warning("sub-%s: QC and report not written (%s: %s)", subject, type(err).__name__, err)


def _write_started_record(
    settings: Settings, t1w: T1wInput, run: RunInfo, started: str, resume_fields: dict | None
) -> None:
    """Before the first output is (over)written: a record without an end time, which resume
    redoes and reports show as failed if the run is killed (it is replaced when the T1w ends)."""
    record = RunRecord(
        **_run_fields(settings, t1w, run, started, resume_fields),
        status="failed",
        error=f"started at {started} and did not end (the run was killed or is still running)",
    )
    _save_run_record(record, settings, t1w)


def _write_run_record(
    settings: Settings, t1w: T1wInput, outcome: T1wOutcome, learnt: dict, run: RunInfo,
    started: str, resume_fields: dict | None = None,
) -> None:  # fmt: skip
    """What happened to one T1w, success or not, and in which run: reports and QC read it from
    disk."""
    record = RunRecord(
        **_run_fields(settings, t1w, run, started, resume_fields),
        **learnt,
        status="ok" if outcome.ok else "failed",
        error=outcome.message or None,
        total_seconds=round(outcome.seconds, 1),
        threads=settings.omp_nthreads,
        outputs=tuple(drv.derivative_uri(settings.output_dir, path) for path in outcome.outputs),
        software=_software_versions(settings.engine),
        registration=_registration_record(settings),
        cpu_count=run.cpu_count,
        cpu_affinity_count=run.cpu_affinity,
        end_time=utc_now(),
        threads_total=settings.nthreads,
        parallel_participants=1 if settings.in_process else settings.parallel_participants,
    )
    _save_run_record(record, settings, t1w)


def _run_fields(
    settings: Settings, t1w: T1wInput, run: RunInfo, started: str, resume_fields: dict | None
) -> dict:
    """What the started and the final record both say: the input, the settings, the invocation
    (the same for all its participants) and when this T1w started."""
    return dict(
        source=drv.bids_uri(t1w.relpath),
        output_spaces=tuple(str(space) for space in settings.output_spaces),
        preset=settings.preset,
        engine=settings.engine,
        random_seed=settings.random_seed,
        run_uuid=run.run_uuid,
        command_line=run.command_line,
        run_start_time=run.start_time,
        start_time=started,
        resume=resume_fields,
    )


def _save_run_record(record: RunRecord, settings: Settings, t1w: T1wInput) -> None:
    try:
        write_run_record(record, drv.run_record_path(settings.output_dir, t1w))
    except OSError as err:  # the record is a convenience; its loss must not fail the T1w
        log.warning("sub-%s: could not write the run record: %s", t1w.subject, err)


def failed_outcome(t1w: T1wInput, message: str, start: float) -> T1wOutcome:
    log.error("sub-%s: %s failed: %s", t1w.subject, t1w.relpath, message)
    return T1wOutcome(t1w.relpath, t1w.subject, False, message, (), time.perf_counter() - start)


def run_participants(
    by_subject: dict, settings: Settings, templates, work_dir: Path, run: RunInfo,
    verbosity: logs.Verbosity, remote=None,
) -> list[T1wOutcome]:  # fmt: skip
    """All participants, ``settings.parallel_participants`` at a time, each in its own process
    (with ``settings.in_process``, one after the other in this one); or, given ``remote`` (the
    command passes ``cluster.run_on_cluster`` for ``--dask-scheduler``), all sent to it at once.

    With ``settings.mem_mb``, a participant starts only while the memory estimates of those
    running and its own fit in it (``memory``), and one that alone needs more is not started: it
    fails with that reason (first, here).
    Progress is announced as log records (``progress``): the run's start and end here, the rest
    by the participants; a participant's process sends its records here through a queue.
    """
    plan, refusals = None, {}
    if settings.mem_mb is not None:
        plan = plan_memory(by_subject, settings, templates)
        log.info("%s", plan.describe())
        refusals = {subject: plan.refusal(subject) for subject in plan.too_large}
    parallel = 1 if settings.in_process else settings.parallel_participants
    if remote is not None:
        parallel = len(by_subject)  # the cluster's workers decide; all are sent at once
    start = progress.RunStarted(
        tuple(by_subject), tuple(len(t1ws) for t1ws in by_subject.values()), settings.templates,
        parallel,
    )  # fmt: skip
    progress.announce(log, start, "%d participant(s), %d at a time", len(by_subject), parallel)
    try:
        if remote is not None:
            return remote(by_subject, settings, templates, run, verbosity)
        outcomes = {}
        for subject, reason in refusals.items():  # in this process, before any child starts
            outcomes[subject] = run_participant(
                subject, by_subject[subject], settings, templates, work_dir, run, verbosity, reason
            )
        runnable = {sub: t1ws for sub, t1ws in by_subject.items() if sub not in refusals}
        if settings.in_process:
            for subject, t1ws in runnable.items():
                outcomes[subject] = run_participant(
                    subject, t1ws, settings, templates, work_dir, run, verbosity
                )
        elif runnable:
            outcomes.update(
                _run_in_children(runnable, settings, templates, work_dir, run, verbosity, plan)
            )
        return [outcome for subject in by_subject for outcome in outcomes[subject]]
    finally:
        progress.announce(log, progress.RunEnded(), "every participant ran")


def plan_memory(by_subject: dict, settings: Settings, templates: Templates):
    """Each participant's memory estimate against ``settings.mem_mb`` (``memory.MemoryPlan``)."""
    from bids_app.memory import MemoryPlan, participant_estimate_mib, template_voxels

    grids = {template_set.registration.t1w_path for template_set in templates.spaces.values()}
    grids |= {t.t1w_path for s in templates.spaces.values() for t in s.outputs.values()}
    if templates.brain is not None:
        grids.add(templates.brain.t1w_path)
    voxels = template_voxels(grids)
    estimates = {
        subject: participant_estimate_mib([t1w.path for t1w in t1ws], voxels)
        for subject, t1ws in by_subject.items()
    }
    slots = 1 if settings.in_process else settings.parallel_participants
    return MemoryPlan(settings.mem_mb, estimates, slots)


def _run_in_children(
    by_subject, settings, templates, work_dir, run, verbosity, plan=None
) -> dict:  # fmt: skip
    from bids_app.memory import MemoryBudget

    queue = get_context("spawn").Queue()
    listener = QueueListener(queue, logs.Relay())
    listener.start()
    budget = MemoryBudget(plan.budget_mib) if plan is not None else None
    stop = threading.Event()
    threads = ThreadPoolExecutor(settings.parallel_participants)
    futures = {}
    try:
        shared = (settings, templates, work_dir, run, verbosity, queue)
        for subject, t1ws in by_subject.items():
            memory = budget.reserve(plan.estimates_mib[subject]) if budget else nullcontext()
            futures[subject] = threads.submit(
                _run_within_budget, memory, stop, subject, t1ws, *shared
            )
        return {subject: future.result() for subject, future in futures.items()}
    except BaseException:  # Ctrl-C, SIGTERM (cli): no new participant, and end the running ones
        stop.set()
        threads.shutdown(wait=False, cancel_futures=True)
        _end_children(futures.values())
        raise
    finally:
        threads.shutdown(wait=True)
        listener.stop()  # after the records still in the queue
        queue.close()
        queue.join_thread()


def _run_within_budget(reservation, stop: threading.Event, subject, t1ws, *args):
    """Start the participant's process once its memory is reserved (``memory.MemoryBudget``),
    unless the run is being stopped meanwhile."""
    with reservation:
        if stop.is_set():
            start = time.perf_counter()
            message = "not started: the run was interrupted"
            return [failed_outcome(t1w, message, start) for t1w in t1ws]
        return _run_in_child(subject, t1ws, *args)


def _end_children(futures) -> None:
    """Terminate the participants' processes until every thread that starts them is done (one
    may be starting a process while this runs)."""
    running = [future for future in futures if not future.done()]  # done: cancelled ones too
    while running:
        for child in multiprocessing.active_children():
            child.terminate()
        wait(running, timeout=0.5)
        running = [future for future in running if not future.done()]


def _run_in_child(
    subject, t1ws, settings, templates, work_dir, run, verbosity, queue
) -> list[T1wOutcome]:
    # A fresh process per participant; "spawn" so ITK starts with the thread settings of os.environ.
    with ProcessPoolExecutor(
        max_workers=1, mp_context=get_context("spawn"),
        initializer=logs.configure_child, initargs=(queue, verbosity),
    ) as pool:  # fmt: skip
        try:
            return pool.submit(
                _participant_in_child, subject, t1ws, settings, templates, work_dir, run, verbosity
            ).result()
        except Exception as err:  # the process died (memory, segfault): report, go on
            message = (
                f"the participant's process died ({type(err).__name__}: {err}); if the system "
                "ran out of memory, run fewer participants at once (--mem-mb) or give it more"
            )
            # A process killed while writing leaves the temporary file of that write behind.
            for path in drv.remove_partial_files(settings.output_dir / f"sub-{subject}"):
                log.info("sub-%s: removed %s, left half-written by the process", subject, path)
            outcomes = [failed_outcome(t1w, message, time.perf_counter()) for t1w in t1ws]
            event = progress.ParticipantEnded(subject, 0, len(t1ws), 0.0)
            progress.announce(log, event, "sub-%s: the participant's process died", subject)
            return outcomes


def _participant_in_child(*args) -> list[T1wOutcome]:
    try:
        return run_participant(*args)
    finally:
        logs.flush_child()  # its last records reach the console before its result


class WorkFolder:
    """The given work folder (kept), or a temporary one (removed)."""

    def __init__(self, path: Path | None):
        self._path = path
        self._tmp = None

    def __enter__(self) -> Path:
        if self._path is not None:
            self._path.mkdir(parents=True, exist_ok=True)
            return self._path
        self._tmp = tempfile.TemporaryDirectory(prefix="mninorm-")
        return Path(self._tmp.name)

    def __exit__(self, *exc):
        if self._tmp is not None:
            self._tmp.cleanup()
