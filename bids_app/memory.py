"""How much memory a participant needs, and how many participants may run at once within
``--mem-mb`` (as fMRIPrep's ``--mem``).

A participant's peak grows with the voxels of its T1w (float copies through bias correction,
brain extraction and registration) and with the template grids the run reads (each template's
res-1 head and mask, the brain-extraction template, each output grid). The model is linear in both
and calibrated on measured peaks (docs/usage.md, "Memory"); it answers in MiB, the unit of
``--mem-mb``.

A participant starts only while the estimates of those running and its own sum to the budget or
less (``MemoryBudget``), and at most as many as the threads allow. A participant that alone needs
more than the budget is not started: it fails with that reason instead of being killed by the
system.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

MIB = 2**20


@dataclass(frozen=True)
class MemoryModel:
    """Peak memory (MiB) = ``fixed_mib`` + per-voxel costs of the T1w and of the template grids."""

    fixed_mib: float  # Python, the libraries, the process tree: what a tiny image still costs
    t1w_bytes_per_voxel: float
    template_bytes_per_voxel: float

    def estimate_mib(self, t1w_voxels: int, template_voxels: int) -> float:
        return (
            self.fixed_mib
            + t1w_voxels * self.t1w_bytes_per_voxel / MIB
            + template_voxels * self.template_bytes_per_voxel / MIB
        )


# Calibration (docs/usage.md, "Memory", has the commands). T1w: the whole-head benchmark's peaks
# (docs/benchmark.md, setting default: 15 scans of 1.3 to 40 million voxels, Greedy, preset
# precise, MNI152NLin2009cAsym + OASIS30ANTs: 19.2 million template voxels) fit 1200 MiB + 46 MiB
# per million T1w voxels, no scan more than 131 MiB above the line: the line is raised by that
# much. Templates: heads sub-01 peaked at 1300 MiB with MNI152NLin2009cAsym, 1357 MiB with
# MNI152NLin6Asym added (7.2 million voxels): 57 MiB, about a float32 head and mask per voxel.
_T1W_BYTES_PER_VOXEL = 46 * MIB / 1e6
_TEMPLATE_BYTES_PER_VOXEL = 57 * MIB / 7_221_032
_BENCHMARK_TEMPLATE_VOXELS = 8_530_021 + 10_672_000
_INTERCEPT_MIB = 1200 + 131
DEFAULT_MODEL = MemoryModel(
    fixed_mib=_INTERCEPT_MIB - _BENCHMARK_TEMPLATE_VOXELS * _TEMPLATE_BYTES_PER_VOXEL / MIB,
    t1w_bytes_per_voxel=_T1W_BYTES_PER_VOXEL,
    template_bytes_per_voxel=_TEMPLATE_BYTES_PER_VOXEL,
)


def image_voxels(path: Path) -> int:
    """Voxels of the first three dimensions, from the header only (the data are not read); 0 for
    a file that cannot be read (loading it fails the T1w with the reason, before any big step)."""
    try:
        shape = nib.load(str(path)).shape
    except Exception:  # nibabel raises several types for unreadable files
        return 0
    return int(np.prod(shape[:3], dtype=np.int64))


def template_voxels(grid_paths) -> int:
    """The voxels of every distinct template grid a run reads (each counted once)."""
    return sum(image_voxels(path) for path in set(grid_paths))


def participant_estimate_mib(
    t1w_paths, template_voxels: int, model: MemoryModel = DEFAULT_MODEL
) -> float:
    """A participant's T1ws run one after the other: its peak is its largest T1w's."""
    return max(model.estimate_mib(image_voxels(path), template_voxels) for path in t1w_paths)


@dataclass(frozen=True)
class MemoryPlan:
    """Who may run, and how many at once, within ``budget_mib``."""

    budget_mib: int
    estimates_mib: dict  # participant label -> estimated peak (MiB)
    slots: int  # participants at once that the threads allow

    @property
    def too_large(self) -> tuple[str, ...]:
        """Participants that alone need more than the budget: not started."""
        return tuple(sub for sub, mib in self.estimates_mib.items() if mib > self.budget_mib)

    @property
    def most_at_once(self) -> int:
        """The most participants that can run together: the smallest estimates that fit."""
        count, total = 0, 0.0
        for mib in sorted(self.estimates_mib.values())[: self.slots]:
            if total + mib > self.budget_mib:
                break
            count, total = count + 1, total + mib
        return count

    @property
    def alone(self) -> tuple[str, ...]:
        """Participants that fit, but beside no other that fits (with the smallest, too much)."""
        fitting = {s: m for s, m in self.estimates_mib.items() if m <= self.budget_mib}
        if self.slots < 2 or len(fitting) < 2:
            return ()
        return tuple(
            sub
            for sub, mib in fitting.items()
            if mib + min(m for s, m in fitting.items() if s != sub) > self.budget_mib
        )

    def describe(self) -> str:
        each = ", ".join(f"sub-{sub} {mib:.0f}" for sub, mib in self.estimates_mib.items())
        text = (
            f"memory plan for --mem-mb {self.budget_mib}: estimated peak per participant (MiB): "
            f"{each}; up to {self.most_at_once} at a time (the threads allow {self.slots}), a "
            f"participant starting only while the estimates of those running and its own sum to "
            f"{self.budget_mib} MiB or less"
        )
        if self.alone:
            text += "; run alone: " + ", ".join(f"sub-{s}" for s in self.alone)
        if self.too_large:
            text += "; too large to start: " + ", ".join(f"sub-{s}" for s in self.too_large)
        return text

    def refusal(self, subject: str) -> str:
        """Why ``subject`` is not started (it is one of ``too_large``)."""
        return (
            f"not started: it needs about {self.estimates_mib[subject]:.0f} MiB (estimated from "
            f"its image size and the template grids), more than --mem-mb {self.budget_mib}; run "
            "it with a larger --mem-mb on a machine that has that memory"
        )


class MemoryBudget:
    """``--mem-mb`` shared by the threads that start participants' processes: each reserves its
    participant's estimate before starting it, and waits while the others leave too little."""

    def __init__(self, total_mib: float):
        self._total = self._free = float(total_mib)
        self._changed = threading.Condition()

    @contextmanager
    def reserve(self, mib: float):
        if mib > self._total:  # it would wait forever: MemoryPlan.too_large are not started
            raise ValueError(f"{mib:.0f} MiB is more than the whole budget, {self._total:.0f}")
        with self._changed:
            self._changed.wait_for(lambda: mib <= self._free)
            self._free -= mib
        try:
            yield
        finally:
            with self._changed:
                self._free += mib
                self._changed.notify_all()
