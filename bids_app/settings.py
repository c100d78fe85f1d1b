"""Settings built once from the command line, validated, and passed down explicitly."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from bids_app.errors import MissingInputError, UsageError
from bids_app.registration.base import USER_PRESETS
from bids_app.registration.registry import DEFAULT_ENGINE, EngineFactory, get_engine
from bids_app.spaces import DEFAULT_SPACE, OutputSpace

log = logging.getLogger(__name__)

DEFAULT_SEED = 20240229  # fixed so that two runs of the same input agree; recorded in sidecars
PRESETS = USER_PRESETS
SKULL_STRIP_MODES = ("auto", "force", "skip")
# The template head brain extraction registers to, as sMRIPrep does (its brain mask includes the
# cerebellum); when it is absent and not asked for, the first output template's head is used.
DEFAULT_BRAIN_TEMPLATE = "OASIS30ANTs"


# ITK (so ANTs and Greedy) and the BLAS/OpenMP libraries read their thread counts from these
THREAD_VARIABLES = (
    "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS",
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
)


def set_thread_environment(threads: int) -> None:
    """Once, before ``ants`` is imported (here or in the participants' processes): ITK reads its
    thread count at import."""
    for name in THREAD_VARIABLES:
        os.environ[name] = str(threads)


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
        """Distinct templates (with their cohort): one registration each, whatever the
        resolutions asked. Keys of ``OutputSpace.key``."""
        return tuple(dict.fromkeys(space.key for space in self.output_spaces))

    def template_space(self, key: str) -> OutputSpace:
        """The template of ``key`` on its registration grid (resolution None)."""
        space = next(s for s in self.output_spaces if s.key == key)
        return OutputSpace(space.template, None, space.cohort, space.folder)

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
