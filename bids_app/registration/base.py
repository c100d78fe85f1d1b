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
class EngineInfo:
    label: str  # how sidecars name the engine
    package: str  # the Python distribution whose version the sidecars record


ENGINES: dict[str, EngineInfo] = {
    "ants": EngineInfo("ANTsPy antsRegistration", "antspyx"),
    "greedy": EngineInfo("Greedy (picsl-greedy)", "picsl-greedy"),
}


@dataclass(frozen=True)
class RegistrationResult:
    forward_xfm: Path
    inverse_xfm: Path
    seconds: float


class RegistrationEngine(Protocol):
    name: str

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


def get_engine(name: str = "ants") -> RegistrationEngine:
    if name == "ants":
        from bids_app.registration.ants import AntsEngine

        return AntsEngine()
    if name == "greedy":
        from bids_app.registration.greedy import GreedyEngine

        return GreedyEngine()
    raise ValueError(f"unknown registration engine {name!r}; choose one of {', '.join(ENGINES)}")


def get_preset(engine: str, name: str):
    """An engine's named preset (``name``, ``grid_mm``, ``description``, and its stages)."""
    if engine == "ants":
        from bids_app.registration.ants import get_preset as ants_preset

        return ants_preset(name)
    if engine == "greedy":
        from bids_app.registration.greedy import get_preset as greedy_preset

        return greedy_preset(name)
    raise ValueError(f"unknown registration engine {engine!r}; choose one of {', '.join(ENGINES)}")
