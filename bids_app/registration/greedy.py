"""The Greedy engine (PICSL Greedy, PyPI ``picsl-greedy``): affine, then diffeomorphic registration
with a local NCC metric, run in-process on in-memory images.

Its outputs are converted to what ``antsRegistration`` writes (see ``base``): ITK composite .h5
files of [affine, displacement field] (forward) and [inverse field, inverse affine] (inverse).
Greedy's conventions, checked by tests/test_registration.py:

* its affine matrices map *fixed* (template) points to *moving* (participant) points, in RAS
  (ITK works in LPS): the matrix is the same RAS 4x4 that ``transforms.read_composite`` returns;
* its warps are ITK vector images on the fixed grid, displacements in LPS mm; ``-r warp affine``
  maps a fixed point x to A(x + u(x)), the order of an ANTs [affine, field] composite;
* ``-oinv`` writes the inverse of the warp alone (not of the affine);
* ``-wp 0``: warps are kept at full precision (by default Greedy rounds them to 0.1 voxel).

The Python bindings cannot take vector images or (in 1.4.0.3) affine matrices as inputs, so
affine matrices go through a small text file (Greedy's own .mat format) in the work folder.
"""

from __future__ import annotations

import io
import logging
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bids_app.errors import RegistrationError
from bids_app.registration.base import RegistrationResult, by_level, one_line, stages_sentence
from bids_app.registration.grid import as_pixeltype, fixed_on_grid

log = logging.getLogger(__name__)
# Greedy's own messages (every iteration with -vv), under its package's name: the console treats
# them as another package's, and leaves them to the T1w's log file (bids_app.logs).
greedy_log = logging.getLogger("picsl_greedy")

PACKAGE = "picsl-greedy"


@dataclass(frozen=True)
class AffineStage:
    metric: str  # "NMI", "MI", "SSD" or "NCC RxRxR"
    iterations: tuple[int, ...]  # per level, coarsest first (one level halves the resolution)
    dof: int = 12  # 6 rigid, 7 similarity, 12 affine
    # Where to start without an initial transform: "image-centers" (-ia-image-centers) or
    # "moments" (centres of mass matched, Greedy's -moments 1, as the ANTs engine starts)
    initialisation: str = "image-centers"

    def arguments(self) -> list[str]:
        levels = _levels(self.iterations)
        return ["-a", "-dof", str(self.dof), "-m", *self.metric.split(), "-n", levels]

    def summary(self) -> str:
        return f"{_DOF_WORDS[self.dof]} ({self.metric})"

    def describe(self) -> str:
        """The stage as a methods clause."""
        name, *radius = self.metric.split()
        metric = _METRIC_WORDS[name] + (f", radius {radius[0]} voxels" if radius else "")
        return (
            f"{_DOF_WORDS[self.dof]} ({self.dof} degrees of freedom) with {metric}; "
            f"{_pyramid(self.iterations)}"
        )


@dataclass(frozen=True)
class DeformableStage:
    ncc_radius: int  # voxels, in each direction
    iterations: tuple[int, ...]
    # -s: smoothing of the update (gradient) field, then of the whole warp (Greedy's defaults)
    smoothing: tuple[str, str] = ("1.732vox", "0.7071vox")
    step: float = 1.0  # -e, the greedy step size
    # -sv: the warp is the exponential of a stationary velocity field. Measured on a 1 mm whole
    # head (sub-02): the inverse comes cheaper (77 s instead of 108 s in all), the round trip is
    # tighter (0.03 instead of 0.05 mm mean) and the Jacobians less extreme than plain greedy.
    stationary_velocity: bool = True

    def arguments(self) -> list[str]:
        r = self.ncc_radius
        return [
            "-m", "NCC", f"{r}x{r}x{r}",
            "-n", _levels(self.iterations),
            "-s", *self.smoothing,
            "-e", f"{self.step:g}",
            *(["-sv"] if self.stationary_velocity else []),
        ]  # fmt: skip

    def summary(self) -> str:
        if self.stationary_velocity:
            return f"diffeomorphic (stationary velocity, NCC radius {self.ncc_radius})"
        return f"greedy diffeomorphic (NCC radius {self.ncc_radius})"

    def describe(self) -> str:
        """The stage as a methods clause."""
        model = (
            "the warp being the exponential of a stationary velocity field"
            if self.stationary_velocity
            else "the warp composed of small greedy updates"
        )
        update, warp = (_voxels(sigma) for sigma in self.smoothing)
        window = 2 * self.ncc_radius + 1
        return (
            f"diffeomorphic ({model}; step size {self.step:g}; update field smoothed by a Gaussian "
            f"of standard deviation {update}, the warp by one of {warp}) with normalised "
            f"cross-correlation in a {window}x{window}x{window}-voxel window (radius "
            f"{self.ncc_radius}); {_pyramid(self.iterations)}"
        )


@dataclass(frozen=True)
class Preset:
    name: str
    grid_mm: float  # the template is resampled to this grid first: the warp lives on it
    affine: AffineStage | None
    deformable: DeformableStage | None

    @property
    def stages(self) -> tuple:
        return tuple(stage for stage in (self.affine, self.deformable) if stage is not None)

    @property
    def description(self) -> str:
        return one_line(self.stages, self.grid_mm)

    def methods(self, masks: bool = True) -> tuple[str, ...]:
        """See ``base.EnginePreset``; ``masks``: whether brain masks were given (they are in the
        brain-to-template registration)."""
        clauses = [stage.describe() for stage in self.stages]
        tool = f"Greedy [Greedy] through its Python bindings ({PACKAGE})"
        sentences = [stages_sentence(tool, self.name, self.grid_mm, clauses)]
        if masks:  # GreedyEngine.register does not pass the moving image's mask on
            sentences.append("The metric was restricted to the template's brain mask.")
        return tuple(sentences)

    @property
    def references(self) -> dict[str, str]:
        return REFERENCES


REFERENCES = {
    # The reference the Greedy project asks users to cite (its documentation's "cite" page).
    "Greedy": "Yushkevich PA, Pluta J, Wang H, Wisse LEM, Das S, Wolk D (2016). IC-P-174: Fast "
    "automatic segmentation of hippocampal subfields and medial temporal lobe subregions in 3 "
    "Tesla and 7 Tesla T2-weighted MRI. Alzheimer's & Dementia 12(7S):P126-P127. "
    "https://doi.org/10.1016/j.jalz.2016.06.205",
}

_DOF_WORDS = {6: "rigid", 7: "similarity", 12: "affine"}
_METRIC_WORDS = {
    "NMI": "normalised mutual information",
    "MI": "mutual information",
    "SSD": "sum of squared differences",
    "NCC": "normalised cross-correlation",
}


def _levels(iterations: tuple[int, ...]) -> str:
    return "x".join(map(str, iterations))


def _pyramid(iterations: tuple[int, ...]) -> str:
    """Greedy's -n: one level per entry, coarsest first, each halving the resolution."""
    shrink = [2 ** (len(iterations) - 1 - level) for level in range(len(iterations))]
    return f"{by_level(iterations)} iterations at shrink factors {by_level(shrink)}"


def _voxels(sigma: str) -> str:
    """Greedy's '1.732vox' or '2mm' in words."""
    for unit, word in (("vox", "voxels"), ("mm", "mm")):
        if sigma.endswith(unit):
            return f"{sigma[: -len(unit)]} {word}"
    return sigma


PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        # The 1.5 mm grid (templates coarser than that are used as they are): on the benchmark's
        # 1 mm case the mean landmark error was 0.25 mm on a 2 mm grid, 0.21 on 1.5 mm and 0.20
        # on 1 mm (antsRegistrationSyN[s] at 1 mm: 0.17 mm in 14 min). On a 1 mm whole head a
        # 1 mm grid took 4.0 GB, over the 3 GB budget of a whole participant; 1.5 mm took 1.9 GB.
        Preset(
            "precise",
            grid_mm=1.5,
            affine=AffineStage("NMI", (100, 50, 10), initialisation="moments"),
            # Plain greedy updates, not -sv (benchmark, 2 mm cases): the labelled pair's cortical
            # Dice was 0.673 (reference antsRegistrationSyN[s]: 0.671) against 0.654 with -sv in
            # the run before; landmark error 0.28/0.51/0.41 mm against 0.27/0.52/0.39; no
            # folding. For `fast` (3 mm grid) -sv did better: 0.37/0.55/0.50 mm against
            # 0.42/0.59/0.50 without it.
            deformable=DeformableStage(2, (100, 50, 10), stationary_velocity=False),
        ),
        Preset(
            "fast",
            grid_mm=3.0,
            affine=AffineStage("NMI", (100, 50), initialisation="moments"),
            deformable=DeformableStage(2, (100, 50)),
        ),
        # Internal, for template-based brain extraction: head to template head, linear then warp.
        Preset(
            "head-linear",
            grid_mm=4.0,
            affine=AffineStage("NMI", (100, 50)),
            deformable=None,
        ),
        Preset(
            "head-syn",
            grid_mm=4.0,
            affine=None,
            deformable=DeformableStage(2, (40, 20)),
        ),
    )
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


class GreedyEngine:
    name = "greedy"

    def __init__(self, threads: int = 1, keep_greedy_files: bool = False):
        self.threads = threads
        # Also write Greedy's own warps next to the .h5 files (tests compare the two).
        self.keep_greedy_files = keep_greedy_files

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
        chosen = get_preset(preset)
        greedy = _new_greedy()
        fixed, fixed_mask = fixed_on_grid(fixed, fixed_mask, chosen.grid_mm)
        images = {"fixed": to_sitk(fixed), "moving": to_sitk(as_pixeltype(moving, "float"))}
        if fixed_mask is not None:
            images["fixed_mask"] = to_sitk(fixed_mask)
        # moving_mask is not passed on: Greedy 1.4's -mm derails its affine line search (benchmark
        # case ds01-2mm: 28.5 mm mean landmark error with it, 0.24 mm without). The pipeline's
        # moving image is already brain-masked, which is what the mask would achieve.
        out_prefix.parent.mkdir(parents=True, exist_ok=True)
        run = _Runner(greedy, images, seed, preset, self.threads)

        start = time.perf_counter()
        affine = read_initial_affine(initial_xfm) if initial_xfm is not None else None
        if chosen.affine is not None:
            affine = run.affine(chosen.affine, affine, out_prefix)
        elif affine is None:  # no linear stage and nothing to start from: match centres of mass
            affine = run.moments()
        affine_path = write_greedy_affine(affine, Path(f"{out_prefix}greedy_affine.mat"))
        if chosen.deformable is None:
            parts = CompositeParts(affine)
        else:
            warp, inverse_warp = run.deformable(chosen.deformable, affine_path)
            _check_on_grid(warp, images["fixed"], preset)
            parts = CompositeParts(affine, field_from_sitk(warp), field_from_sitk(inverse_warp))
            if self.keep_greedy_files:
                _write_sitk(warp, Path(f"{out_prefix}greedy_warp.nii.gz"))
                _write_sitk(inverse_warp, Path(f"{out_prefix}greedy_inverse_warp.nii.gz"))
        forward_path = Path(f"{out_prefix}Composite.h5")
        inverse_path = Path(f"{out_prefix}InverseComposite.h5")
        parts.write(forward_path, inverse_path)
        seconds = time.perf_counter() - start
        log.debug("greedy preset %s done in %.1f s", preset, seconds)
        return RegistrationResult(forward_path, inverse_path, seconds)


@dataclass(frozen=True)
class CompositeParts:
    """Template -> participant: x -> A (x + u(x)); the reverse: y -> z + v(z), z = A^-1 y."""

    affine: np.ndarray  # RAS 4x4, template points -> participant points
    field: object = None  # DisplacementField u, on the template grid
    inverse_field: object = None  # DisplacementField v, (id + v) = (id + u)^-1

    def write(self, forward_path: Path, inverse_path: Path) -> None:
        from bids_app.transforms import CompositeTransform, write_composite

        inverse_affine = np.linalg.inv(self.affine)
        if self.field is None:
            forward, inverse = (self.affine,), (inverse_affine,)
        else:  # ITK applies the last part first
            forward, inverse = (self.affine, self.field), (self.inverse_field, inverse_affine)
        write_composite(CompositeTransform(forward), forward_path)
        write_composite(CompositeTransform(inverse), inverse_path)


class _Runner:
    """Greedy command lines on the named in-memory images of one registration."""

    def __init__(self, greedy, images: dict, seed: int, preset: str, threads: int):
        self.greedy = greedy
        self.images = images
        self.preset = preset
        if seed == 0:
            log.warning("Greedy reads --random-seed 0 as 'no seed': this run is not repeatable")
        self.common = ["-d", "3", "-threads", str(threads), "-seed", str(seed)]
        self.common += ["-V", "1" if log.isEnabledFor(logging.DEBUG) else "0"]

    def _pair(self) -> list[str]:
        masks = ["-gm", "fixed_mask"] if "fixed_mask" in self.images else []
        return ["-i", "fixed", "moving", *masks]

    def affine(self, stage: AffineStage, initial: np.ndarray | None, out_prefix: Path):
        if initial is None and stage.initialisation == "moments":
            initial = self.moments()
        if initial is None:
            start = ["-ia-image-centers"]
        else:
            path = write_greedy_affine(initial, Path(f"{out_prefix}greedy_initial.mat"))
            start = ["-ia", _quote(path)]
        self.execute([*stage.arguments(), *self._pair(), *start, "-o", "affine"], affine=None)
        return np.asarray(self.greedy["affine"], dtype=float)

    def moments(self) -> np.ndarray:
        self.execute(["-moments", "1", "-i", "fixed", "moving", "-o", "affine"], affine=None)
        return np.asarray(self.greedy["affine"], dtype=float)

    def deformable(self, stage: DeformableStage, affine_path: Path):
        self.execute(
            [*stage.arguments(), *self._pair(), "-it", _quote(affine_path),
             "-wp", "0",
             "-o", "warp", "-oinv", "inverse_warp"],
            warp=None, inverse_warp=None,
        )  # fmt: skip
        return self.greedy["warp"], self.greedy["inverse_warp"]

    def execute(self, arguments: list[str], **outputs) -> None:
        command = " ".join([*self.common, *arguments])
        log.debug("greedy %s", command)
        messages = io.StringIO()
        try:
            self.greedy.execute(command, out=messages, err=messages, **self.images, **outputs)
        except RuntimeError as err:
            raise RegistrationError(
                f"greedy (preset {self.preset}) failed: {err}; check the input's orientation "
                "and brain mask, run with -v for Greedy's messages, or use --engine ants"
            ) from err
        finally:
            if messages.getvalue().strip():
                greedy_log.debug("greedy output:\n%s", messages.getvalue().rstrip())


def _new_greedy():
    try:
        from picsl_greedy import Greedy3D
    except ImportError as err:
        raise RegistrationError(
            f"--engine greedy needs the Python package {PACKAGE} ({err}); install it with "
            f"'pip install \"{PACKAGE}>=1.4\"' or use --engine ants"
        ) from err
    return Greedy3D()


def _quote(path: Path) -> str:
    return shlex.quote(str(path))


# ---- conversions -------------------------------------------------------------------------------


def to_sitk(image):
    """An ANTs image as a SimpleITK image (both ITK: same LPS origin, spacing, direction)."""
    import SimpleITK as sitk

    # ANTs' arrays are indexed (i, j, k), SimpleITK's (k, j, i).
    out = sitk.GetImageFromArray(np.ascontiguousarray(image.numpy().transpose(2, 1, 0)))
    out.SetOrigin(tuple(float(v) for v in image.origin))
    out.SetSpacing(tuple(float(v) for v in image.spacing))
    out.SetDirection(tuple(float(v) for v in np.asarray(image.direction).ravel()))
    return out


def field_from_sitk(warp):
    """A Greedy warp (SimpleITK vector image, LPS mm) as a ``DisplacementField`` (RAS)."""
    import SimpleITK as sitk

    from bids_app.transforms import DisplacementField
    from bids_app.transforms.orientation import lps_ras_flip, ras_affine_from_itk

    vectors = sitk.GetArrayFromImage(warp).transpose(2, 1, 0, 3)  # (k, j, i, c) -> (i, j, k, c)
    affine = ras_affine_from_itk(
        np.asarray(warp.GetOrigin()), np.asarray(warp.GetSpacing()), np.asarray(warp.GetDirection())
    )
    return DisplacementField(lps_ras_flip(vectors).astype(np.float32), affine)


def _check_on_grid(warp, fixed, preset: str) -> None:
    same = (
        warp.GetSize() == fixed.GetSize()
        and np.allclose(warp.GetOrigin(), fixed.GetOrigin(), atol=1e-4)
        and np.allclose(warp.GetSpacing(), fixed.GetSpacing(), atol=1e-6)
        and np.allclose(warp.GetDirection(), fixed.GetDirection(), atol=1e-6)
    )
    if not same:
        raise RegistrationError(
            f"greedy (preset {preset}) returned a warp on another grid than the template's; "
            "this mninorm version expects Greedy to work on the fixed image's grid"
        )


def _write_sitk(image, path: Path) -> None:
    import SimpleITK as sitk

    sitk.WriteImage(image, str(path))


# ---- Greedy's affine files -------------------------------------------------------------------


def write_greedy_affine(ras: np.ndarray, path: Path) -> Path:
    """Greedy's .mat: the 4x4 RAS matrix mapping fixed points to moving points, as text."""
    np.savetxt(path, np.asarray(ras, dtype=float), fmt="%.10f")
    return path


def read_initial_affine(path: Path) -> np.ndarray:
    """The linear part of an earlier registration's forward .h5, as Greedy's RAS matrix."""
    from bids_app.transforms import read_composite

    try:
        transform = read_composite(Path(path))
    except (OSError, KeyError, ValueError) as err:
        raise RegistrationError(
            f"{path}: cannot be read as an ITK composite transform ({err}); pass the forward .h5 "
            "of an earlier registration as the initial transform"
        ) from err
    if transform.fields:
        raise RegistrationError(
            f"{path}: the initial transform holds a displacement field; Greedy starts from a "
            "linear transform only: pass a linear registration's forward .h5 (e.g. head-linear)"
        )
    return transform.linear
