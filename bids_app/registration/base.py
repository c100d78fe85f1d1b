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
    raise ValueError(f"unknown registration engine {name!r}")
