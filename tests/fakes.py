"""A registration engine that registers nothing: it writes the transforms it is told to.

``FakeEngine`` offers the presets of ``registration.base.REQUIRED_PRESETS`` and writes real ITK
composite files (``registration.composite.write_composite``), so everything after registration
(resampling, Jacobians, QC, reports, the group level) runs as with a real engine, in a fraction of
the time, on transforms known exactly:

* the affine (template points -> participant points) is the participant's known pose, given to
  the constructor: the registration "converges" to it whatever its start. The participant is
  found in ``out_prefix`` (the pipeline's work folder is ``<work>/sub-<label>/...``). Without
  one, the affine stays where it started: ``initial_xfm``'s (brain extraction starts from its
  search, ``headstart``; the main registration from brain extraction's affine or from a
  search), else the identity;
* presets with a deformable stage add ``displacement``, a smooth field known in closed form, on
  the fixed image's grid; its Jacobian is ``log_jacobian``.

What only a real engine shows (that it recovers a known transform, on both engines) is in
tests/test_registration.py; one real end-to-end run is in tests/test_cli.py.

Participants run in spawned processes: ``FakeEngines`` (the ``engines`` factory given to
``cli.main``) pickles, and this module imports nothing from ``conftest``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from bids_app.registration.base import LINEAR_PRESETS, REQUIRED_PRESETS, RegistrationResult

# Small enough for QC to pass a run on known poses; its log-Jacobian still spans +-0.15.
AMPLITUDE_MM = 0.5
WAVELENGTH_MM = 60.0
# What the fake "prints" to descriptor 1, as compiled engines do (Greedy's line search): the
# participant's log file must catch it, the console must not show it.
CHATTER = "FAKE-ENGINE-CHATTER"
# How much a "diverged" head-to-template affine scales the volume (a real one did by 523).
DIVERGED_VOLUME = 27.0


def displacement(points: np.ndarray, amplitude: float = AMPLITUDE_MM) -> np.ndarray:
    """u(p) = a (sin kx, sin ky, sin kz): RAS mm at RAS points (N, 3)."""
    return amplitude * np.sin(2 * np.pi / WAVELENGTH_MM * np.asarray(points, dtype=float))


def log_jacobian(points: np.ndarray, amplitude: float = AMPLITUDE_MM) -> np.ndarray:
    """log det(I + du/dp) of ``displacement``: du/dp is diagonal, a k cos(k p_i)."""
    k = 2 * np.pi / WAVELENGTH_MM
    slopes = amplitude * k * np.cos(k * np.asarray(points, dtype=float))
    return np.log1p(slopes).sum(axis=1)


class FakeEngine:
    """``RegistrationEngine`` without registration (see the module's docstring).

    ``diverging``: how many of the first ``head-linear`` results are blown up by
    ``DIVERGED_VOLUME``, as a real affine that diverged (brain extraction's fallback must catch it).
    """

    def __init__(self, name="greedy", poses=None, amplitude=AMPLITUDE_MM, diverging=0, threads=1):
        self.name = name
        self.threads = threads
        self.poses = dict(poses or {})  # 'sub-01' -> its affine, template -> participant points
        self.amplitude = amplitude
        self.diverging = diverging
        self.calls: list[str] = []  # the presets asked for, in order

    def register(
        self, fixed, moving, *, preset: str, out_prefix: Path, seed: int, fixed_mask=None,
        moving_mask=None, initial_xfm: Path | None = None,
    ) -> RegistrationResult:  # fmt: skip
        from bids_app.transforms import CompositeTransform, read_composite, write_composite

        if preset not in REQUIRED_PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {REQUIRED_PRESETS}")
        start = time.perf_counter()
        self.calls.append(preset)
        os.write(1, f"{CHATTER} {self.name} {preset}\n".encode())
        affine = next((self.poses[p] for p in Path(out_prefix).parts if p in self.poses), None)
        if affine is None:
            affine = np.eye(4) if initial_xfm is None else read_composite(initial_xfm).linear
        if preset == "head-linear" and self.calls.count(preset) <= self.diverging:
            affine = affine @ np.diag([*[DIVERGED_VOLUME ** (1 / 3)] * 3, 1.0])
        if preset in LINEAR_PRESETS:
            forward, inverse = (affine,), (np.linalg.inv(affine),)
        else:
            field, inverse_field = self._fields(fixed)
            forward, inverse = (affine, field), (inverse_field, np.linalg.inv(affine))
        forward_path = write_composite(
            CompositeTransform(forward), Path(f"{out_prefix}Composite.h5")
        )
        inverse_path = write_composite(
            CompositeTransform(inverse), Path(f"{out_prefix}InverseComposite.h5")
        )
        return RegistrationResult(forward_path, inverse_path, time.perf_counter() - start)

    def _fields(self, fixed):
        """``displacement`` u and its inverse v ((id + v) = (id + u)^-1) on the fixed grid."""
        from bids_app.transforms import DisplacementField
        from bids_app.transforms.orientation import ants_to_nifti

        grid = ants_to_nifti(fixed)
        shape, affine = grid.shape[:3], grid.affine
        ijk = np.indices(shape).reshape(3, -1).T
        points = ijk @ affine[:3, :3].T + affine[:3, 3]
        inverse = -displacement(points, self.amplitude)
        for _ in range(30):  # v(z) = -u(z + v(z)): a contraction, as |du/dp| <= a k < 1
            inverse = -displacement(points + inverse, self.amplitude)
        forward = displacement(points, self.amplitude)
        return tuple(
            DisplacementField(vectors.reshape(*shape, 3).astype(np.float32), affine)
            for vectors in (forward, inverse)
        )


class FakeEngines:
    """The ``engines`` factory of ``cli.main``/``Settings``: a new ``FakeEngine`` per call, under
    the name asked for (so the sidecars name a real engine: ``ENGINES`` has no fake).

    ``diverging``: engine name -> its ``FakeEngine``'s ``diverging`` (the others' is 0)."""

    def __init__(self, poses=None, amplitude=AMPLITUDE_MM, diverging=None):
        self.poses, self.amplitude = poses, amplitude
        self.diverging = dict(diverging or {})

    def __call__(self, name: str, threads: int = 1) -> FakeEngine:
        return FakeEngine(name, self.poses, self.amplitude, self.diverging.get(name, 0), threads)


class DyingEngines(FakeEngines):
    """``FakeEngines`` whose engine, registering a participant of ``doomed``, starts writing an
    output (``derivatives.atomic_path`` into ``output_dir``) and is then killed with SIGKILL, as
    the out-of-memory killer does: no ``finally`` runs, the temporary file stays."""

    def __init__(self, doomed, output_dir, poses=None):
        super().__init__(poses)
        self.doomed, self.output_dir = tuple(doomed), Path(output_dir)

    def __call__(self, name: str, threads: int = 1) -> FakeEngine:
        return _DyingEngine(self, name, threads)


class _DyingEngine(FakeEngine):
    def __init__(self, factory: DyingEngines, name: str, threads: int = 1):
        super().__init__(name, factory.poses, factory.amplitude, threads=threads)
        self.factory = factory

    def register(self, fixed, moving, *, out_prefix: Path, **kwargs):
        import signal

        from bids_app.outputs.derivatives import atomic_path

        subject = next((p for p in Path(out_prefix).parts if p in self.factory.doomed), None)
        if subject is not None:
            target = self.factory.output_dir / subject / "anat" / f"{subject}_being_written.h5"
            with atomic_path(target) as tmp:
                tmp.write_bytes(b"half of a transform")
                os.kill(os.getpid(), signal.SIGKILL)
        return super().register(fixed, moving, out_prefix=out_prefix, **kwargs)
