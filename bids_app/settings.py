"""Settings built once from the command line, validated, and passed down explicitly."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from bids_app.errors import MissingInputError, UsageError
from bids_app.registration.base import USER_PRESETS
from bids_app.registration.registry import DEFAULT_ENGINE, EngineFactory, get_engine

log = logging.getLogger(__name__)

DEFAULT_SPACE = "MNI152NLin2009cAsym"
DEFAULT_SEED = 20240229  # fixed so that two runs of the same input agree; recorded in sidecars
PRESETS = USER_PRESETS
SKULL_STRIP_MODES = ("auto", "force", "skip")
# The template head brain extraction registers to, as sMRIPrep does (its brain mask includes the
# cerebellum); when it is absent and not asked for, the first output template's head is used.
DEFAULT_BRAIN_TEMPLATE = "OASIS30ANTs"
# The participant's own (native) space, as fMRIPrep and our transform names spell it
# (from-T1w_to-<TPL>); accepted in any case on the command lines.
NATIVE_SPACE = "T1w"

_SPACE_RE = re.compile(r"^(?P<template>[A-Za-z][A-Za-z0-9]*)(?::res-(?P<res>[0-9]+))?$")


@dataclass(frozen=True, order=True)
class OutputSpace:
    """A TemplateFlow template and, optionally, one of its resolution indices (``res-N``)."""

    template: str
    resolution: int | None = (
        None  # TemplateFlow's index, not millimetres; None = the template's res-1
    )

    @property
    def grid_resolution(self) -> int:
        return 1 if self.resolution is None else self.resolution

    def __str__(self) -> str:
        return (
            self.template if self.resolution is None else f"{self.template}:res-{self.resolution}"
        )


def is_native_space(text: str) -> bool:
    """``T1w`` in any spelling (t1w, T1W): the participant's own space, not a template."""
    return text.strip().lower() == NATIVE_SPACE.lower()


def parse_output_space(text: str) -> OutputSpace:
    """Parse ``Template[:res-N]`` (for example ``MNI152NLin6Asym:res-2``)."""
    match = _SPACE_RE.match(text.strip())
    if not match:
        raise UsageError(
            f"malformed output space {text!r}: expected a TemplateFlow identifier with an optional "
            "resolution index, e.g. MNI152NLin2009cAsym or MNI152NLin6Asym:res-2"
        )
    res = match.group("res")
    if res is not None and is_native_space(match.group("template")):
        raise UsageError(
            f"output space {text!r}: {NATIVE_SPACE} takes no resolution index (the native outputs "
            "are on the T1w's own grid); write just T1w, or leave it out"
        )
    return OutputSpace(match.group("template"), int(res) if res is not None else None)


def parse_output_spaces(texts) -> tuple[OutputSpace, ...]:
    """The template spaces of ``--output-spaces``, each once, in the order given.

    ``T1w`` (fMRIPrep's name for the native space) is accepted and adds no space: the native
    outputs are always written. When it is the only one, the default template is used.
    """
    spaces = tuple(dict.fromkeys(parse_output_space(t) for t in texts if not is_native_space(t)))
    if spaces:
        return spaces
    log.info(
        "--output-spaces names no template: %s is used (the %s outputs are always written)",
        DEFAULT_SPACE, NATIVE_SPACE,
    )  # fmt: skip
    return (OutputSpace(DEFAULT_SPACE),)


@dataclass(frozen=True)
class Settings:
    bids_dir: Path
    output_dir: Path
    analysis_level: str
    participant_labels: tuple[str, ...] = ()
    session_labels: tuple[str, ...] = ()
    bids_filters: dict = field(default_factory=dict, hash=False)
    skip_bids_validation: bool = False
    output_spaces: tuple[OutputSpace, ...] = (OutputSpace(DEFAULT_SPACE),)
    work_dir: Path | None = None  # None: a temporary folder, removed afterwards
    nthreads: int = 1  # total threads for the whole run
    omp_nthreads: int = 1  # threads for one participant (ITK/OpenMP)
    random_seed: int = DEFAULT_SEED
    skull_strip: str = "auto"
    preset: str = "precise"
    engine: str = DEFAULT_ENGINE  # one of ENGINES
    brain_template: str = DEFAULT_BRAIN_TEMPLATE
    brain_template_required: bool = False  # True when asked for explicitly: absent is an error
    fallback: bool = True  # further brain-extraction attempts when one fails its checks
    in_process: bool = False  # run participants in this process (tests, debugging)
    mem_mb: int | None = None  # --mem-mb: the memory all running participants share (MiB)
    reports_only: bool = False  # participant level: rebuild the reports from output_dir only
    group_by: str | None = None  # group level: the participants.tsv column to compare groups by
    rerun: bool = False  # redo every T1w, even those whose outputs are complete and unchanged
    bids_database_dir: Path | None = None  # where pybids' index is saved and reused
    dask_scheduler: str | None = None  # a running Dask scheduler's address: participants go there
    # The engines by name (``engine`` and, for brain extraction's fallback, the others): the real
    # ones, or the tests' fake. It must pickle: participants run in spawned processes.
    engines: EngineFactory = field(default=get_engine, compare=False, repr=False)

    @property
    def templates(self) -> tuple[str, ...]:
        """Distinct templates: one registration each, whatever the resolutions asked."""
        return tuple(dict.fromkeys(space.template for space in self.output_spaces))

    @property
    def parallel_participants(self) -> int:
        return max(1, self.nthreads // self.omp_nthreads)


def check_folders(bids_dir: Path, output_dir: Path, work_dir: Path | None) -> None:
    """Refuse folder layouts that would write into the (read-only) input dataset."""
    if not bids_dir.is_dir():
        raise MissingInputError(f"bids_dir {bids_dir} does not exist or is not a folder")
    bids = bids_dir.resolve()
    for name, path in (("output_dir", output_dir), ("work dir", work_dir)):
        if path is None:
            continue
        resolved = path.resolve()
        if resolved == bids or bids in resolved.parents:
            raise UsageError(
                f"{name} {path} is inside the input dataset {bids_dir}: choose a folder outside it "
                "(the input is never written to; it is often mounted read-only)"
            )
