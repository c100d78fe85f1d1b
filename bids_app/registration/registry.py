"""The one registry of engines: their names, how sidecars and methods name them, their presets.

Every other place (the command's choices, the sidecars, the methods text) reads it from here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from bids_app.registration import ants, greedy
from bids_app.registration.base import EnginePreset, RegistrationEngine


@dataclass(frozen=True)
class EngineInfo:
    label: str  # how sidecars name the engine
    package: str  # the Python distribution whose version the sidecars record
    short: str  # how the progress lines name it
    make: Callable[[int], RegistrationEngine]  # threads -> a new engine
    preset: Callable[[str], EnginePreset]  # preset name -> its stages, description and methods


ENGINES: dict[str, EngineInfo] = {
    "ants": EngineInfo(
        "ANTsPy antsRegistration", "antspyx", "ANTs", ants.AntsEngine, ants.get_preset
    ),
    "greedy": EngineInfo(
        "Greedy (picsl-greedy)", greedy.PACKAGE, "Greedy", greedy.GreedyEngine, greedy.get_preset
    ),
}
# Greedy: on the registration benchmark (docs/benchmark.md) as accurate as ANTs'
# antsRegistrationSyN[s] or better, in a fraction of its time; ANTs stays one option away.
DEFAULT_ENGINE = "greedy"

# Engines by name and thread count: ``get_engine``, or the tests' fake (tests/fakes.py). It must
# pickle (by reference: a module-level function or class instance), as participants run in
# spawned processes.
EngineFactory = Callable[[str, int], RegistrationEngine]


def get_engine(name: str = DEFAULT_ENGINE, threads: int = 1) -> RegistrationEngine:
    """A real engine, by name (``Settings.engines``' default)."""
    return _info(name).make(threads)


def get_preset(engine: str, name: str) -> EnginePreset:
    """An engine's named preset: its stages, and how it describes and cites itself."""
    return _info(engine).preset(name)


def _info(engine: str) -> EngineInfo:
    try:
        return ENGINES[engine]
    except KeyError:
        choices = ", ".join(ENGINES)
        raise ValueError(f"unknown engine {engine!r}; choose one of {choices}") from None
