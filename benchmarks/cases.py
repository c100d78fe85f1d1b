"""Benchmark cases: a table of definitions, and the images each one is made of (seeded, cached).

A *synthetic* case has a known answer: a real brain image I (a source) becomes the fixed image
(I on an RAS grid of ``grid_mm``) and the moving image M(y) = I(Phi^-1(y)) on another grid and
orientation, with a bias field and noise; Phi (``truth.KnownTransform``) is a random affine plus
a smooth random warp. Landmarks x inside the fixed brain have the true partners y = Phi(x).

A *labelled* case is a real participant with FreeSurfer labels (the moving image) and a template
brain (the fixed image); its labels are compared with another participant's in template space.

Everything is written under ``<out>/cases/<name>/`` once and reused (``case.json`` records the
definition; a changed definition rebuilds the case).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from benchmarks.truth import KnownTransform, random_affine, random_bumps

log = logging.getLogger(__name__)

DATA_ROOT = Path(
    os.environ.get("MNINORM_BENCH_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)
GENERATOR_VERSION = 1  # bump when the generation changes: cached cases are rebuilt
LANDMARKS = 2000
_FWHM_PER_SIGMA = 2.3548


@dataclass(frozen=True)
class CaseDef:
    name: str
    kind: str  # "synthetic" or "labelled"
    source: str  # key of SOURCES (synthetic: the brain I; labelled: the participant)
    grid_mm: float  # the fixed image's grid (RAS, isotropic)
    seed: int = 0
    moving_zooms: tuple[float, float, float] = (1.1, 1.2, 1.3)
    moving_axes: str = "LIA"  # voxel axis codes of the moving grid
    oblique_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)  # extra tilt of the moving grid
    max_warp_mm: float = 5.0  # largest |u| of the smooth warp inside the brain
    bias: float = 0.2  # largest |log| of the multiplicative bias field
    noise: float = 0.03  # Rician sigma as a share of the brain's 99th intensity percentile
    fixed_source: str = ""  # labelled cases: the template brain
    labels: str = ""  # labelled cases: the label file next to the participant's image
    groups: tuple[str, ...] = ("full",)  # "quick", "full", "test"

    @property
    def label(self) -> str:
        """BIDS- and TemplateFlow-safe form of the name (letters and digits)."""
        return re.sub(r"[^A-Za-z0-9]", "", self.name)


@dataclass(frozen=True)
class Case:
    definition: CaseDef
    folder: Path
    fixed: Path
    fixed_mask: Path
    moving: Path
    moving_mask: Path
    whole_head: bool
    landmarks: Path | None = None  # synthetic: npz with fixed_ras, moving_ras (N, 3)
    labels: Path | None = None  # labelled: the participant's labels on the moving grid
    checks: dict = field(default_factory=dict, hash=False)

    @property
    def name(self) -> str:
        return self.definition.name

    @property
    def kind(self) -> str:
        return self.definition.kind

    def truth(self) -> KnownTransform:
        data = json.loads((self.folder / "case.json").read_text())
        return KnownTransform.from_json(data["truth"])


_SYNTHETIC_GRIDS = {
    # same seed = same transform and moving image: the 1 mm case differs only by its fixed grid
    "ds01": dict(seed=101, moving_axes="LIA", moving_zooms=(1.1, 1.2, 1.3), oblique_deg=(6, -4, 3)),
}

CASES: dict[str, CaseDef] = {
    case.name: case
    for case in (
        CaseDef("ds01-2mm", "synthetic", "ds002748/sub-01", 2.0, groups=("quick", "full"),
                **_SYNTHETIC_GRIDS["ds01"]),
        CaseDef("head02-2mm", "synthetic", "heads/sub-02", 2.0, seed=102, moving_axes="LPS",
                moving_zooms=(1.2, 1.1, 1.25), oblique_deg=(0, 5, -5)),
        CaseDef("nlin6-2mm", "synthetic", "templateflow/MNI152NLin6Asym", 2.0, seed=103,
                moving_axes="PIR", moving_zooms=(1.3, 1.1, 1.2), oblique_deg=(-5, 3, 7)),
        CaseDef("nilearn-2mm", "synthetic", "nilearn/MNI152NLin2009aSym", 2.0, seed=104,
                moving_axes="ASL", moving_zooms=(1.0, 1.25, 1.15)),
        CaseDef("ds01-1mm", "synthetic", "ds002748/sub-01", 1.0, **_SYNTHETIC_GRIDS["ds01"]),
        CaseDef("bert-2mm", "labelled", "labelled/bert", 2.0,
                fixed_source="templateflow/MNI152NLin2009cAsym", labels="aparc+aseg.mgz"),
        CaseDef("niivue-2mm", "labelled", "labelled/niivue", 2.0,
                fixed_source="templateflow/MNI152NLin2009cAsym", labels="aparc.a2009s+aseg.mgz"),
        # seconds, no ../shared needed (nilearn's brain): the tests' case, and a smoke test
        CaseDef("tiny-6mm", "synthetic", "nilearn/MNI152NLin2009aSym", 6.0, seed=7,
                moving_axes="LIA", moving_zooms=(6.5, 7.0, 6.0), oblique_deg=(4, -3, 2),
                max_warp_mm=6.0, groups=("test",)),
    )
}  # fmt: skip

# Label overlap is measured between participants: both must be registered by a setting.
PAIRS: dict[str, tuple[str, str]] = {"bert+niivue-2mm": ("bert-2mm", "niivue-2mm")}


def select_cases(group: str, names: list[str] | None = None) -> list[CaseDef]:
    if names:
        unknown = [n for n in names if n not in CASES]
        if unknown:
            raise ValueError(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(CASES)}")
        return [CASES[n] for n in names]
    return [case for case in CASES.values() if group in case.groups]


# ---- sources: a brain image, its brain mask, and whether it is a whole head --------------------


@dataclass(frozen=True)
class Source:
    image: nib.Nifti1Image  # float32
    mask: np.ndarray  # bool, on the image's grid
    whole_head: bool


def load_source(key: str, cache: Path) -> Source:
    kind, _, name = key.partition("/")
    if kind == "ds002748":  # already skull-stripped: the brain is the non-zero voxels
        path = DATA_ROOT / "ds002748" / name / "anat" / f"{name}_T1w.nii.gz"
        mask = _filled(np.asarray(nib.load(path).dataobj) > 0)
        image = bias_corrected(path, mask, cache / f"ds002748-{name}_desc-n4_T1w.nii.gz")
        return Source(image, mask, False)
    if kind == "templateflow":  # the template brain = T1w x brain mask
        folder = DATA_ROOT / "templateflow" / f"tpl-{name}"
        t1w = nib.load(folder / f"tpl-{name}_res-01_T1w.nii.gz")
        mask = (
            np.asarray(nib.load(folder / f"tpl-{name}_res-01_desc-brain_mask.nii.gz").dataobj) > 0
        )
        return Source(_float_image(t1w, mask), mask, False)
    if kind == "nilearn":  # MNI 2009a brain, shipped inside the nilearn wheel
        from nilearn.datasets import load_mni152_brain_mask, load_mni152_template

        mask = np.asarray(load_mni152_brain_mask(resolution=1).dataobj) > 0
        return Source(_float_image(load_mni152_template(resolution=1), mask), mask, False)
    if kind == "heads":  # whole head, no mask shipped: one derived by registration, cached
        path = DATA_ROOT / "heads" / name / "anat" / f"{name}_T1w.nii.gz"
        mask = derived_brain_mask(path, cache / f"heads-{name}_desc-brain_mask.nii.gz")
        image = bias_corrected(path, None, cache / f"heads-{name}_desc-n4_T1w.nii.gz")
        return Source(image, mask, True)
    if kind == "labelled":
        image = _float_image(nib.load(DATA_ROOT / "labelled" / name / "norm.mgz"))
        return Source(image, _filled(image.get_fdata() > 0), False)
    raise ValueError(f"unknown source {key!r}")


def bias_corrected(path: Path, mask: np.ndarray | None, cached: Path) -> nib.Nifti1Image:
    """A real scan with its own intensity non-uniformity removed (ANTsPy N4, sMRIPrep's settings).

    The source plays the template (the fixed image); templates are bias-free, and a setting
    that corrects the moving image's bias (mninorm does) would otherwise be scored against a
    fixed image that keeps the scan's own shading. Measured on ds01-2mm with Greedy: 0.24 mm
    uncorrected on both sides, 0.46 mm when only the moving image is corrected, 0.29 mm when
    both are. Made once, cached.
    """
    if not cached.is_file():
        import ants

        log.info("%s: N4 bias correction of the source (once)", path.name)
        image = ants.image_read(str(path))
        mask_img = None
        if mask is not None:
            mask_img = image.new_image_like(mask.astype(np.float32))
        corrected = ants.n4_bias_field_correction(
            ants.iMath(image, "TruncateIntensity", 0.01, 0.999),
            mask=mask_img,
            shrink_factor=4,
            convergence={"iters": [50, 50, 50, 50], "tol": 1e-7},
        )
        if mask is not None:
            corrected = corrected * mask_img
        cached.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cached.parent) as tmp:
            ants.image_write(corrected, str(Path(tmp) / "n4.nii.gz"))
            os.replace(Path(tmp) / "n4.nii.gz", cached)
    # the original header: ANTs' round trip of the affine is not bit-exact
    return nib.Nifti1Image(
        np.asarray(nib.load(cached).dataobj, dtype=np.float32), nib.load(path).affine
    )


def _float_image(img, mask=None) -> nib.Nifti1Image:
    data = np.asarray(img.dataobj, dtype=np.float32)
    if mask is not None:
        data = data * mask
    return nib.Nifti1Image(data, img.affine)


def _filled(mask: np.ndarray) -> np.ndarray:
    return ndimage.binary_fill_holes(mask)


def derived_brain_mask(head_path: Path, cached: Path) -> np.ndarray:
    """A brain mask for a whole-head scan: MNI152NLin2009cAsym's head registered to it (ANTsPy
    'SyN' at 2 mm), the template's brain mask brought back. Only picks landmarks and serves as the
    fixed mask, so approximate is enough; made once and cached."""
    if not cached.is_file():
        import ants

        log.info("%s: deriving a brain mask by registration (once, about a minute)", head_path.name)
        folder = DATA_ROOT / "templateflow" / "tpl-MNI152NLin2009cAsym"
        template = ants.image_read(str(folder / "tpl-MNI152NLin2009cAsym_res-01_T1w.nii.gz"))
        template_mask = ants.image_read(
            str(folder / "tpl-MNI152NLin2009cAsym_res-01_desc-brain_mask.nii.gz")
        )
        head = ants.image_read(str(head_path))
        coarse = [ants.resample_image(img, (2, 2, 2), False, 0) for img in (head, template)]
        ants.config._random_seed = 1  # read by ants.registration; the mask should not vary
        reg = ants.registration(coarse[0], coarse[1], "SyN")
        mask = ants.apply_transforms(head, template_mask, reg["fwdtransforms"], "genericLabel")
        cached.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cached.parent) as tmp:
            ants.image_write(mask, str(Path(tmp) / "mask.nii.gz"))
            data = np.asarray(nib.load(Path(tmp) / "mask.nii.gz").dataobj) > 0.5
            affine = nib.load(head_path).affine
            nib.Nifti1Image(_filled(data).astype(np.uint8), affine).to_filename(
                Path(tmp) / "filled.nii.gz"
            )
            os.replace(Path(tmp) / "filled.nii.gz", cached)
    return np.asarray(nib.load(cached).dataobj) > 0


# ---- grids and resampling -----------------------------------------------------------------------


def world_points(affine: np.ndarray, shape) -> np.ndarray:
    ijk = np.indices(shape, dtype=np.float32).reshape(3, -1).T
    return ijk @ affine[:3, :3].T.astype(np.float32) + affine[:3, 3].astype(np.float32)


def support_bounds(source: Source) -> tuple[np.ndarray, np.ndarray]:
    """World bounding box of what is visible: the brain, or the head for whole-head scans."""
    data = source.image.get_fdata()
    visible = (
        data > 0.05 * np.percentile(data[source.mask], 99) if source.whole_head else source.mask
    )
    ijk = np.argwhere(visible)
    corners = np.array([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)])
    low, high = ijk.min(0), ijk.max(0)
    world = nib.affines.apply_affine(source.image.affine, low + corners * (high - low))
    return world.min(0), world.max(0)


def ras_grid(low: np.ndarray, high: np.ndarray, mm: float, margin_mm: float = 8.0):
    """An RAS grid of ``mm`` voxels covering [low, high] plus a margin: (affine, shape)."""
    low, high = low - margin_mm, high + margin_mm
    shape = tuple(int(s) for s in np.ceil((high - low) / mm).astype(int) + 1)
    affine = np.diag([mm, mm, mm, 1.0])
    affine[:3, 3] = low
    return affine, shape


def oriented_grid(corners_world: np.ndarray, zooms, axes: str, oblique_deg):
    """A grid with voxel axes ``axes`` (e.g. LIA) tilted by ``oblique_deg``, covering the points."""
    from scipy.spatial.transform import Rotation

    ornt = nib.orientations.axcodes2ornt(tuple(axes))
    direction = np.zeros((3, 3))
    for voxel_axis, (world_axis, sign) in enumerate(ornt):
        direction[int(world_axis), voxel_axis] = sign
    direction = Rotation.from_euler("xyz", oblique_deg, degrees=True).as_matrix() @ direction
    frame = corners_world @ direction  # coordinates along the grid's axes
    low, high = frame.min(0), frame.max(0)
    zooms = np.asarray(zooms, float)
    shape = tuple(int(s) for s in np.ceil((high - low) / zooms).astype(int) + 1)
    affine = np.eye(4)
    affine[:3, :3] = direction @ np.diag(zooms)
    affine[:3, 3] = direction @ low
    return affine, shape


def smoothed_for(image: nib.Nifti1Image, target_mm: float) -> np.ndarray:
    """The image blurred so that sampling it at ``target_mm`` does not alias."""
    zooms = np.asarray(image.header.get_zooms()[:3], float)
    sigma_mm = np.sqrt(np.clip(target_mm**2 - zooms**2, 0, None)) / _FWHM_PER_SIGMA
    data = np.asarray(image.dataobj, dtype=np.float32)
    return ndimage.gaussian_filter(data, sigma_mm / zooms) if sigma_mm.any() else data


def sample(data: np.ndarray, affine: np.ndarray, points: np.ndarray, order: int) -> np.ndarray:
    """Values of a volume at world points (spline order; 0 outside). ``data`` must already be
    spline-filtered for order > 1 (``ndimage.spline_filter``)."""
    inverse = np.linalg.inv(affine)
    ijk = points @ inverse[:3, :3].T + inverse[:3, 3]
    return ndimage.map_coordinates(data, ijk.T, order=order, mode="constant", prefilter=False)


# ---- building a case ----------------------------------------------------------------------------


def prepare_case(definition: CaseDef, out_root: Path) -> Case:
    """The case's files under ``out_root/cases/<name>``, built once (atomically) and reused."""
    folder = out_root / "cases" / definition.name
    wanted = {**asdict(definition), "generator_version": GENERATOR_VERSION}
    wanted = json.loads(json.dumps(wanted))  # tuples -> lists, as read back from disk
    record = folder / "case.json"
    if record.is_file() and json.loads(record.read_text())["definition"] == wanted:
        return _load_case(definition, folder)
    if folder.exists():
        log.warning("%s: definition changed, rebuilding the case (re-run its rows with --force)",
                    definition.name)  # fmt: skip
        shutil.rmtree(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    cache = out_root / "cases" / "_sources"
    builders = {"synthetic": _build_synthetic, "labelled": _build_labelled}
    if definition.kind not in builders:
        raise ValueError(f"{definition.name}: unknown kind {definition.kind!r}")
    # Built in a hidden sibling folder, then renamed: an interrupted build leaves no half case.
    build = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{definition.name}-"))
    try:
        extra = builders[definition.kind](definition, build, cache)
        (build / "case.json").write_text(json.dumps({"definition": wanted, **extra}, indent=1))
        os.replace(build, folder)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    return _load_case(definition, folder)


def _load_case(definition: CaseDef, folder: Path) -> Case:
    data = json.loads((folder / "case.json").read_text())
    optional = {
        name: folder / file
        for name, file in (("landmarks", "landmarks.npz"), ("labels", "labels.nii.gz"))
        if (folder / file).is_file()
    }
    return Case(
        definition=definition,
        folder=folder,
        fixed=folder / "fixed.nii.gz",
        fixed_mask=folder / "fixed_mask.nii.gz",
        moving=folder / "moving.nii.gz",
        moving_mask=folder / "moving_mask.nii.gz",
        whole_head=bool(data["whole_head"]),
        checks=data.get("checks", {}),
        **optional,
    )


def _write_fixed(source: Source, mm: float, folder: Path) -> tuple[np.ndarray, tuple]:
    """The source on an RAS grid of ``mm`` (anti-aliased) and its brain mask there."""
    affine, shape = ras_grid(*support_bounds(source), mm)
    points = world_points(affine, shape)
    fixed = sample(smoothed_for(source.image, mm), source.image.affine, points, order=1)
    mask = sample(source.mask.astype(np.float32), source.image.affine, points, order=1) >= 0.5
    nib.Nifti1Image(fixed.reshape(shape).astype(np.float32), affine).to_filename(
        folder / "fixed.nii.gz"
    )
    nib.Nifti1Image(mask.reshape(shape).astype(np.uint8), affine).to_filename(
        folder / "fixed_mask.nii.gz"
    )
    return affine, shape


def _build_synthetic(definition: CaseDef, folder: Path, cache: Path) -> dict:
    rng = np.random.default_rng(definition.seed)
    source = load_source(definition.source, cache)
    log.info("%s: building the fixed image (%g mm)", definition.name, definition.grid_mm)
    fixed_affine, fixed_shape = _write_fixed(source, definition.grid_mm, folder)
    fixed_mask = np.asarray(nib.load(folder / "fixed_mask.nii.gz").dataobj) > 0

    # The known transform, centred on the brain; its size is fixed by the seed, not the grid.
    brain_points = nib.affines.apply_affine(source.image.affine, np.argwhere(source.mask))
    centre = brain_points.mean(0)
    affine = random_affine(rng, centre)
    subset = brain_points[rng.choice(len(brain_points), min(20000, len(brain_points)), False)]
    truth = KnownTransform(affine, random_bumps(rng, subset, definition.max_warp_mm))

    log.info("%s: building the moving image", definition.name)
    checks = _write_moving(definition, source, truth, folder, rng)
    checks.update(_write_landmarks(fixed_affine, fixed_mask, truth, folder, rng))
    # The Jacobian of Phi over the fixed brain, analytically: a folded truth is a broken case.
    mask_points = world_points(fixed_affine, fixed_shape)[fixed_mask.ravel()]
    determinants = truth.jacobian_determinant(mask_points)
    checks["truth_jacobian_min"] = float(determinants.min())
    checks["truth_jacobian_max"] = float(determinants.max())
    checks["truth_max_warp_mm"] = float(
        np.linalg.norm(truth.bumps.displacement(mask_points), axis=1).max()
    )
    if checks["truth_jacobian_min"] <= 0 or checks["inversion_residual_max_mm"] >= 0.01:
        raise RuntimeError(f"{definition.name}: bad ground truth {checks}; change its seed")
    return {"truth": truth.to_json(), "checks": checks, "whole_head": source.whole_head}


def _write_moving(definition, source: Source, truth: KnownTransform, folder: Path, rng) -> dict:
    """M(y) = I(Phi^-1(y)) x bias(y) + Rician noise, on a grid of its own orientation."""
    low, high = support_bounds(source)
    margin = definition.max_warp_mm + 10.0
    corners = np.array([[x, y, z] for x in (low[0] - margin, high[0] + margin)
                        for y in (low[1] - margin, high[1] + margin)
                        for z in (low[2] - margin, high[2] + margin)])  # fmt: skip
    moved_corners = corners @ truth.affine[:3, :3].T + truth.affine[:3, 3]
    affine, shape = oriented_grid(
        moved_corners, definition.moving_zooms, definition.moving_axes, definition.oblique_deg
    )
    points = world_points(affine, shape).astype(float)
    source_points, residual = truth.inverse(points)
    del points
    smoothed = smoothed_for(source.image, float(np.mean(definition.moving_zooms)))
    coefficients = ndimage.spline_filter(smoothed, order=3, output=np.float32)
    values = np.clip(sample(coefficients, source.image.affine, source_points, order=3), 0, None)
    inside = sample(source.mask.astype(np.float32), source.image.affine, source_points, 1) >= 0.5
    del coefficients, source_points
    world = world_points(affine, shape)
    values = values * bias_field(world, inside, definition.bias, rng)
    sigma = definition.noise * float(np.percentile(values[inside], 99))
    noisy = np.sqrt((values + rng.normal(0, sigma, values.shape)) ** 2
                    + rng.normal(0, sigma, values.shape) ** 2)  # fmt: skip
    # a skull-stripped image stays one: exact zero background
    values = noisy if source.whole_head else np.where(inside, noisy, 0.0)
    nib.Nifti1Image(values.reshape(shape).astype(np.float32), affine).to_filename(
        folder / "moving.nii.gz"
    )
    nib.Nifti1Image(inside.reshape(shape).astype(np.uint8), affine).to_filename(
        folder / "moving_mask.nii.gz"
    )
    return {
        "inversion_residual_max_mm": residual,
        "moving_shape": list(shape),
        "moving_axes": "".join(nib.aff2axcodes(affine)),
        "noise_sigma": sigma,
    }


def bias_field(points: np.ndarray, inside: np.ndarray, strength: float, rng) -> np.ndarray:
    """A smooth multiplicative field: exp(linear ramp + two broad bumps), max |log| = strength."""
    centre = points[inside].mean(0)
    offsets = (points - centre) / 100.0
    log_field = offsets @ rng.normal(size=3)
    for _ in range(2):
        bump_centre = points[inside][rng.integers(inside.sum())]
        log_field += rng.normal() * np.exp(-np.sum((points - bump_centre) ** 2, 1) / (2 * 60.0**2))
    peak = np.abs(log_field[inside]).max()
    return np.exp(log_field * (strength / peak if peak > 0 else 0.0)).astype(np.float32)


def _write_landmarks(fixed_affine, fixed_mask: np.ndarray, truth: KnownTransform, folder, rng):
    """Random points inside the fixed brain (jittered within their voxel) and Phi of them."""
    voxels = np.argwhere(fixed_mask)
    chosen = voxels[rng.choice(len(voxels), min(LANDMARKS, len(voxels)), replace=False)]
    jittered = chosen + rng.uniform(-0.45, 0.45, chosen.shape)
    fixed_ras = nib.affines.apply_affine(fixed_affine, jittered)
    moving_ras = truth.forward(fixed_ras)
    np.savez(folder / "landmarks.npz", fixed_ras=fixed_ras, moving_ras=moving_ras)
    distance = np.linalg.norm(moving_ras - fixed_ras, axis=1)
    return {"landmarks": len(fixed_ras), "identity_error_mean_mm": float(distance.mean())}


def _build_labelled(definition: CaseDef, folder: Path, cache: Path) -> dict:
    template = load_source(definition.fixed_source, cache)
    _write_fixed(template, definition.grid_mm, folder)
    participant = load_source(definition.source, cache)
    participant.image.to_filename(folder / "moving.nii.gz")
    nib.Nifti1Image(participant.mask.astype(np.uint8), participant.image.affine).to_filename(
        folder / "moving_mask.nii.gz"
    )
    labels = nib.load(DATA_ROOT / definition.source / definition.labels)
    nib.Nifti1Image(np.asarray(labels.dataobj, dtype=np.int32), labels.affine).to_filename(
        folder / "labels.nii.gz"
    )
    return {"checks": {"labels": definition.labels}, "whole_head": False}
