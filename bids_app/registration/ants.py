"""The ANTsPy engine: ``antsRegistration`` run in-process with stages built from named presets.

``ants`` is imported inside functions: ITK reads ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` at import,
and the command sets it first.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from bids_app.errors import RegistrationError
from bids_app.registration.base import RegistrationResult, by_level, one_line, stages_sentence
from bids_app.registration.grid import as_pixeltype, fixed_on_grid

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    transform: str  # e.g. "Rigid[0.1]", "Affine[0.1]", "SyN[0.1,3,0]"
    metric: str  # "MI" (Mattes) or "CC"
    metric_parameter: int  # histogram bins (MI) or neighbourhood radius in voxels (CC)
    iterations: tuple[int, ...]
    shrink_factors: tuple[int, ...]
    smoothing_vox: tuple[float, ...]
    sampling: float = 1.0  # share of voxels the MI metric samples (regular grid); 1 = all
    convergence: str = "1e-6,10"

    def arguments(self, fixed: str, moving: str, masks: str | None) -> list[str]:
        if self.metric == "MI":
            metric = f"MI[{fixed},{moving},1,{self.metric_parameter},Regular,{self.sampling}]"
        else:
            metric = f"{self.metric}[{fixed},{moving},1,{self.metric_parameter}]"
        return [
            "--transform", self.transform,
            "--metric", metric,
            "--convergence", f"[{'x'.join(map(str, self.iterations))},{self.convergence}]",
            "--shrink-factors", "x".join(map(str, self.shrink_factors)),
            "--smoothing-sigmas", "x".join(f"{s:g}" for s in self.smoothing_vox) + "vox",
        ] + (["--masks", masks] if masks else [])  # fmt: skip

    @property
    def kind(self) -> str:
        return self.transform.split("[")[0]

    @property
    def transform_parameters(self) -> tuple[str, ...]:
        return tuple(self.transform.split("[", 1)[1].rstrip("]").split(","))

    def summary(self) -> str:
        """E.g. 'affine (Mattes MI)' or 'SyN (CC radius 2)'."""
        metric = (
            "Mattes MI" if self.metric == "MI" else f"{self.metric} radius {self.metric_parameter}"
        )
        return f"{_TRANSFORM_WORDS[self.kind]} ({metric})"

    def describe(self) -> str:
        """The stage as a methods clause: transform, metric, iterations, pyramid."""
        step, *field_variances = self.transform_parameters
        transform = f"{_TRANSFORM_WORDS[self.kind]} (gradient step {step}"
        if self.kind == "SyN":
            update, total = field_variances
            total = "not smoothed" if float(total) == 0 else f"smoothed likewise, variance {total}"
            transform += (
                f"; update field smoothed by a Gaussian of variance {update} voxels squared, "
                f"total field {total}) [SyN]"
            )
        else:
            transform += ")"
        if self.metric == "MI":
            metric = (
                f"Mattes mutual information, {self.metric_parameter} bins, "
                f"{self.sampling:.0%} of the voxels sampled on a regular grid"
            )
        else:
            metric = f"neighbourhood cross-correlation, radius {self.metric_parameter} voxels"
        return (
            f"{transform} with {metric}; {by_level(self.iterations)} iterations at shrink "
            f"factors {by_level(self.shrink_factors)}, Gaussian smoothing "
            f"{by_level(self.smoothing_vox)} voxels"
        )


_TRANSFORM_WORDS = {"Rigid": "rigid", "Affine": "affine", "SyN": "SyN"}


@dataclass(frozen=True)
class Preset:
    name: str
    grid_mm: float  # the template is resampled to this grid first: the SyN field lives on it
    stages: tuple[Stage, ...]

    @property
    def description(self) -> str:
        return one_line(self.stages, self.grid_mm)

    def methods(self, masks: bool = True) -> tuple[str, ...]:
        """See ``base.EnginePreset``; ``masks``: whether brain masks were given (they are in the
        brain-to-template registration)."""
        low, high = WINSORIZE_QUANTILES
        clauses = [stage.describe() for stage in self.stages]
        sentences = [
            stages_sentence("antsRegistration (ANTs)", self.name, self.grid_mm, clauses),
            f"Intensities were winsorised to their {low:.1%}-{high:.1%} quantiles"
            + (", histogram matching was used" if HISTOGRAM_MATCHING else "")
            + (" and the metric was restricted to the brain masks of both images" if masks else "")
            + ".",
        ]
        thresholds = {stage.convergence for stage in self.stages}
        if len(thresholds) == 1:
            threshold, window = thresholds.pop().split(",")
            sentences.append(
                "Each level stopped at its iteration limit or once the metric changed by less "
                f"than {threshold} over {window} iterations."
            )
        return tuple(sentences)

    @property
    def references(self) -> dict[str, str]:
        return REFERENCES


# What every registration of this engine does besides its stages (``AntsEngine.register``).
WINSORIZE_QUANTILES = (0.005, 0.995)
HISTOGRAM_MATCHING = True

REFERENCES = {
    "SyN": "Avants BB, Epstein CL, Grossman M, Gee JC (2008). Symmetric diffeomorphic image "
    "registration with cross-correlation: evaluating automated labeling of elderly and "
    "neurodegenerative brain. Medical Image Analysis 12(1):26-41. "
    "https://doi.org/10.1016/j.media.2007.06.004",
}


def _linear(kind: str, iterations, shrink, smoothing, sampling=0.25) -> Stage:
    return Stage(f"{kind}[0.1]", "MI", 32, iterations, shrink, smoothing, sampling)


PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset(
            "precise",
            grid_mm=2.0,
            stages=(
                _linear("Rigid", (500, 250, 100), (4, 2, 1), (2, 1, 0)),
                _linear("Affine", (500, 250, 100), (4, 2, 1), (2, 1, 0)),
                Stage("SyN[0.2,3,0]", "CC", 2, (100, 70, 20), (4, 2, 1), (2, 1, 0)),
            ),
        ),
        Preset(
            "fast",
            grid_mm=3.0,
            # The linear stages as in "precise" (cheap on this grid): with two levels only, 4 of
            # 5 repeats of the benchmark's ds01-2mm case stopped in a wrong rotation (8.7 mm).
            stages=(
                _linear("Rigid", (500, 250, 100), (4, 2, 1), (2, 1, 0)),
                _linear("Affine", (500, 250, 100), (4, 2, 1), (2, 1, 0)),
                Stage("SyN[0.25,3,0]", "CC", 2, (30, 15), (2, 1), (1, 0)),
            ),
        ),
        # Internal, for template-based brain extraction: head to template head, linear then SyN.
        Preset(
            "head-linear",
            grid_mm=4.0,
            stages=(
                _linear("Rigid", (200, 100), (2, 1), (1, 0)),
                _linear("Affine", (200, 100), (2, 1), (1, 0)),
            ),
        ),
        Preset(
            "head-syn",
            grid_mm=4.0,
            stages=(Stage("SyN[0.25,3,0]", "CC", 2, (20, 10), (2, 1), (1, 0)),),
        ),
    )
}

def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


class AntsEngine:
    name = "ants"

    def __init__(self, threads: int = 1):
        # ANTsPy takes no thread count per call: ITK reads it from the environment when ``ants``
        # is first imported, and the command sets that once before (set_thread_environment).
        self.threads = threads

    def register(
        self,
        fixed,
        moving,
        *,
        preset: str,
        out_prefix: Path,
        seed: int,
        fixed_mask=None,
        moving_mask=None,
        initial_xfm: Path | None = None,
    ) -> RegistrationResult:
        from ants.internal import get_lib_fn, get_pointer_string

        chosen = get_preset(preset)
        # antsRegistration casts in-memory images blindly: images must be float, masks uint8.
        fixed, fixed_mask = fixed_on_grid(fixed, fixed_mask, chosen.grid_mm)
        moving = as_pixeltype(moving, "float")
        if fixed_mask is not None:
            fixed_mask = as_pixeltype(fixed_mask, "unsigned char")
        if moving_mask is not None:
            moving_mask = as_pixeltype(moving_mask, "unsigned char")
        out_prefix.parent.mkdir(parents=True, exist_ok=True)
        fixed_ptr, moving_ptr = get_pointer_string(fixed), get_pointer_string(moving)
        masks = None
        if fixed_mask is not None or moving_mask is not None:
            # antsRegistration takes both or none: a missing one covers its whole image.
            whole = "unsigned char"
            fixed_mask = (
                fixed_mask if fixed_mask is not None else as_pixeltype(fixed * 0 + 1, whole)
            )
            moving_mask = (
                moving_mask if moving_mask is not None else as_pixeltype(moving * 0 + 1, whole)
            )
            masks = f"[{get_pointer_string(fixed_mask)},{get_pointer_string(moving_mask)}]"
        initial = (
            str(initial_xfm) if initial_xfm is not None else f"[{fixed_ptr},{moving_ptr},1]"
        )  # 1 = align centres of mass
        args = [
            "--dimensionality", "3",
            "--float", "1",
            "--collapse-output-transforms", "1",
            "--write-composite-transform", "1",
            "--output", f"[{out_prefix}]",
            "--interpolation", "Linear",
            "--winsorize-image-intensities", "[{:g},{:g}]".format(*WINSORIZE_QUANTILES),
            "--use-histogram-matching", str(int(HISTOGRAM_MATCHING)),
            "--random-seed", str(seed),
            "--initial-moving-transform", initial,
            "--verbose", "1" if log.isEnabledFor(logging.DEBUG) else "0",
        ]  # fmt: skip
        for stage in chosen.stages:
            args += stage.arguments(fixed_ptr, moving_ptr, masks)
        log.debug("antsRegistration %s", " ".join(args))
        start = time.perf_counter()
        status = get_lib_fn("antsRegistration")(args)
        seconds = time.perf_counter() - start
        forward = Path(f"{out_prefix}Composite.h5")
        inverse = Path(f"{out_prefix}InverseComposite.h5")
        if status != 0 or not forward.is_file() or not inverse.is_file():
            raise RegistrationError(
                f"antsRegistration (preset {preset}) failed with status {status}; "
                "check the input's orientation and brain mask, or run with -v for details"
            )
        return RegistrationResult(forward, inverse, seconds)
