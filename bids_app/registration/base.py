"""The registration seam: what every engine takes and returns.

Engines register a *moving* image (the participant) to a *fixed* image (the template) and write
ITK composite transforms (.h5) that ``antsApplyTransforms`` and ``ants.apply_transforms`` read as
they are:

* ``forward_xfm``: maps template points to participant points, so it resamples the participant
  *into* template space (named ``from-T1w_to-<template>``, as sMRIPrep does);
* ``inverse_xfm``: the reverse (``from-<template>_to-T1w``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class RegistrationResult:
    forward_xfm: Path
    inverse_xfm: Path
    seconds: float


# What users choose with --preset.
USER_PRESETS = ("precise", "fast")
# The presets every engine offers: the users' and brain extraction's (participant/brain.py: the
# head's affine, then a coarse warp from it).
REQUIRED_PRESETS = (*USER_PRESETS, "head-linear", "head-syn")
# Their transforms are one affine; the others' are [affine, displacement field] (forward).
LINEAR_PRESETS = ("head-linear",)


class RegistrationEngine(Protocol):
    """An engine offers every preset of ``REQUIRED_PRESETS`` by name.

    ``register`` writes the forward and inverse composites (see the module's docstring): one
    affine for ``LINEAR_PRESETS``, else [affine, field] forward and [field, affine] inverse, the
    field on the fixed image's (preset) grid. ``initial_xfm`` (a linear .h5) is where the affine
    starts; a preset without an affine stage (``head-syn``) keeps it as it is.
    """

    name: str
    threads: int  # ITK/OpenMP threads one registration may use

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
        """Register ``moving`` to ``fixed`` (ANTs images) with a named preset."""
        ...


class EnginePreset(Protocol):
    """What every engine's preset tells about itself (its stages are the engine's own kind)."""

    name: str
    grid_mm: float  # the template is resampled to this grid first: the warp lives on it

    @property
    def description(self) -> str:
        """One line, e.g. 'affine (NMI) -> ... on a 3 mm template grid' (sidecars, report)."""
        ...

    def methods(self, masks: bool = True) -> tuple[str, ...]:
        """Sentences of a methods section, citing ``[key]`` of ``references``."""
        ...

    @property
    def references(self) -> dict[str, str]:
        """The engine's references: key -> full reference."""
        ...


def one_line(stages, grid_mm: float) -> str:
    """A preset's ``description``: its stages' summaries and its grid."""
    return " -> ".join(stage.summary() for stage in stages) + f" on a {grid_mm:g} mm template grid"


def stages_sentence(tool: str, preset: str, grid_mm: float, clauses: list[str]) -> str:
    """The first sentence of an engine's methods: what ran, on which grid, in which stages.

    Every engine registers on the template resampled by ``grid.fixed_on_grid``."""
    count = _NUMBERS.get(len(clauses), str(len(clauses)))
    return (
        f"Registration used {tool}, preset `{preset}`, on the template resampled to a "
        f"{grid_mm:g} mm grid (templates with coarser voxels were used as they were), in "
        f"{count} stage{'s' if len(clauses) != 1 else ''}: " + "; then ".join(clauses) + "."
    )


_NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four"}


def by_level(values) -> str:
    """Per-level values as the engines' command lines write them, e.g. '100x50x10'."""
    return "x".join(f"{v:g}" for v in values)
