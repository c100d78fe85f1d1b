"""Brain extraction: decide whether it is needed, and do it by registration to a template head.

One attempt: a search for a good start (``headstart``), the engine's affine and a coarse warp of
the head to the template head, and the template's brain mask brought back onto the participant
(threshold 0.5, one connected piece, no holes). Cheap checks after each stage (``maskcheck``)
decide whether the T1w needs another attempt: from the next distinct start, with another template
(another extraction method), with another engine. The best attempt is kept and every attempt is
recorded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from bids_app.measures.maskcheck import MaskCheck, check_mask, mask_problems
from bids_app.participant.images import clean_mask

log = logging.getLogger(__name__)

# An image whose non-zero voxels fill less than this looks like a brain without its head: a whole
# head is ~3-5 litres, a brain (with cerebellum, without CSF outside it) 1-1.8 litres.
_STRIPPED_MAX_LITRES = 2.3
_STRIPPED_MIN_ZERO_SHARE = 0.3


# Head-to-template affine: the participant's head volume over the template's. Adult heads
# differ from a template by well under a factor 2; a diverged affine was 523 on a real head.
_HEAD_VOLUME_RATIO = (0.5, 2.0)


# The head registrations look at the template's brain and this much around it (skull, scalp), not
# at the rest of its field of view: templates differ there (OASIS30ANTs is cut below the chin,
# MNI152 holds the neck) and so do heads.
_REGION_MARGIN_MM = 15.0


@dataclass(frozen=True)
class BrainTemplate:
    """A template head used for extraction (ANTs images) and its TemplateFlow name."""

    name: str
    head: object
    mask: object

    @cached_property
    def region(self):
        """The brain and _REGION_MARGIN_MM around it, where head registrations look; made only
        when an attempt uses this template (the fallback's templates are often never used)."""
        from scipy import ndimage

        outside_mm = ndimage.distance_transform_edt(
            self.mask.numpy() < 0.5, sampling=self.mask.spacing
        )
        return self.mask.new_image_like((outside_mm <= _REGION_MARGIN_MM).astype("float32"))


@dataclass(frozen=True)
class Plan:
    """What one attempt uses, and why it is made."""

    template: BrainTemplate
    engine: object
    start_rank: int  # 0: the search's best start, 1: the next distinct one, ...
    why: str


@dataclass(frozen=True)
class Attempt:
    """One extraction attempt, as recorded: what, why, its measures and what was wrong."""

    number: int
    template: str
    engine: str
    start: str
    start_score: float
    why: str
    head_volume_ratio: float
    check: MaskCheck | None
    problems: tuple[str, ...]
    seconds: float

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class BrainExtraction:
    mask_img: object  # ANTs image, 0/1, on the participant's grid
    linear_xfm: Path | None  # head-to-template linear transform, to start the main registration
    skull_stripped_input: bool
    attempts: tuple[Attempt, ...] = ()
    kept: int = 0  # the number of the attempt whose mask is used (0: no attempt, input mask)

    @property
    def template(self) -> str | None:
        """The template the kept attempt registered to (its linear_xfm starts from it)."""
        return None if self.skull_stripped_input else self.attempts[self.kept - 1].template

    @property
    def method(self) -> str:
        if self.skull_stripped_input:
            return "non-zero voxels of the already skull-stripped input"
        chosen = self.attempts[self.kept - 1]
        verdict = "passed the mask checks" if chosen.ok else "kept although it failed them"
        return (
            f"the {chosen.template} template's brain mask brought back onto the T1w by a "
            f"head-to-template registration ({chosen.engine}: a start chosen by a search over "
            f"head positions and tilts, an affine, then a coarse diffeomorphic warp); attempt "
            f"{chosen.number} of {len(self.attempts)}, which {verdict}"
        )


def looks_skull_stripped(data: np.ndarray, voxel_volume_mm3: float) -> bool:
    """True for images whose background and skull are exactly zero and the rest brain-sized."""
    nonzero = data != 0
    zero_share = 1.0 - float(nonzero.mean())
    litres = float(nonzero.sum()) * voxel_volume_mm3 / 1e6
    return zero_share >= _STRIPPED_MIN_ZERO_SHARE and litres <= _STRIPPED_MAX_LITRES


def mask_from_nonzero(t1w_img):
    """The brain mask of an already skull-stripped image: its non-zero voxels, cleaned up."""
    import ants

    return clean_mask(ants.threshold_image(t1w_img, 1e-6, None, 1, 0))


def extraction_plans(templates: list[BrainTemplate], engines: list, fallback: bool) -> list[Plan]:
    """The attempts to make, in order; only the first without fallback."""
    first, *other_templates = templates
    main_engine, *other_engines = engines
    plans = [Plan(first, main_engine, 0, "first attempt")]
    if not fallback:
        return plans
    plans.append(Plan(first, main_engine, 1, "fallback: the search's next distinct start"))
    for template in other_templates:
        plans.append(Plan(template, main_engine, 0, f"fallback: another template, {template.name}"))
    for engine in other_engines:
        plans.append(Plan(first, engine, 0, f"fallback: another engine, {engine.name}"))
    return plans


def extract_brain(
    t1w_img, plans: list[Plan], work_prefix: Path, seed: int, lesion_img=None
) -> BrainExtraction:
    """Make the planned attempts until one passes its checks; keep the best one. A lesion mask
    is left out of the head registrations' metric (participant/lesion.py)."""
    from bids_app.participant.headstart import distinct_starts, search_head_starts

    attempts: list[Attempt] = []
    results: list[tuple[object, Path]] = []
    searches: dict[str, list] = {}
    for plan in plans:
        template = plan.template
        if template.name not in searches:
            found = search_head_starts(template.head, template.mask, t1w_img)
            searches[template.name] = distinct_starts(found)
        starts = searches[template.name]
        if plan.start_rank >= len(starts):
            continue  # no other distinct start: nothing new to try
        number = len(attempts) + 1
        attempt, mask, linear_xfm = _attempt(
            t1w_img, plan, starts[plan.start_rank], number, Path(f"{work_prefix}a{number}_"), seed,
            lesion_img,
        )  # fmt: skip
        attempts.append(attempt)
        results.append((mask, linear_xfm))
        log.info(
            "brain extraction attempt %d (%s, %s): %s", number, template.name, plan.engine.name,
            "; ".join(attempt.problems) or "checks passed",
        )  # fmt: skip
        if attempt.ok:
            break
    best = max(range(len(attempts)), key=lambda i: _attempt_rank(attempts[i]))
    mask, linear_xfm = results[best]
    return BrainExtraction(mask, linear_xfm, False, tuple(attempts), attempts[best].number)


def _attempt(t1w_img, plan: Plan, start, number: int, prefix: Path, seed: int, lesion_img=None):
    import time

    import ants

    from bids_app.transforms import CompositeTransform, read_composite, write_composite
    from bids_app.transforms.orientation import ants_to_nifti

    began = time.perf_counter()
    template, engine = plan.template, plan.engine
    prefix.parent.mkdir(parents=True, exist_ok=True)
    initial = write_composite(CompositeTransform((start.affine,)), Path(f"{prefix}start.h5"))
    linear = engine.register(
        template.head, t1w_img, preset="head-linear", out_prefix=Path(f"{prefix}lin_"),
        seed=seed, initial_xfm=initial,
        **_metric_masks(template.head, template.region, lesion_img, initial),
    )  # fmt: skip
    head_affine = read_composite(linear.forward_xfm).linear
    ratio = float(np.linalg.det(head_affine[:3, :3]))
    problems: list[str] = []
    mask, check = None, None
    if not _HEAD_VOLUME_RATIO[0] <= ratio <= _HEAD_VOLUME_RATIO[1]:
        problems.append(
            f"head-to-template affine scales the volume by {ratio:.2f} (plausible "
            f"{_HEAD_VOLUME_RATIO[0]}-{_HEAD_VOLUME_RATIO[1]}): it diverged"
        )
    else:
        warp = engine.register(
            template.head, t1w_img, preset="head-syn", out_prefix=Path(f"{prefix}syn_"),
            seed=seed, initial_xfm=linear.forward_xfm,
            **_metric_masks(template.head, template.region, lesion_img, linear.forward_xfm),
        )  # fmt: skip
        probability = ants.apply_transforms(
            t1w_img, template.mask, [str(warp.inverse_xfm)], interpolator="linear"
        )
        mask = clean_mask(ants.threshold_image(probability, 0.5, 1e9, 1, 0))
        check = check_mask(ants_to_nifti(mask), ants_to_nifti(template.mask), head_affine)
        problems.extend(mask_problems(check))
    attempt = Attempt(
        number=number, template=template.name, engine=engine.name, start=start.label,
        start_score=start.score, why=plan.why, head_volume_ratio=ratio, check=check,
        problems=tuple(problems), seconds=time.perf_counter() - began,
    )  # fmt: skip
    return attempt, mask, linear.forward_xfm


def _metric_masks(head, region, lesion_img, start_xfm) -> dict:
    """The head registrations' masks: the template region, minus the lesion when there is one."""
    if lesion_img is None:
        return {"fixed_mask": region}
    from bids_app.participant.lesion import fixed_without_lesion, without_lesion

    return {
        "fixed_mask": fixed_without_lesion(head, region, lesion_img, start_xfm),
        "moving_mask": without_lesion(None, lesion_img),
    }


def _attempt_rank(attempt: Attempt) -> tuple:
    """Passing attempts first, then the mask that best covers the brain without leaking out."""
    if attempt.check is None:
        return (False, -np.inf)
    check = attempt.check
    return (attempt.ok, check.min_sector_coverage - check.outside_fraction)
