"""One registration in its own process: ``python -m benchmarks.child <spec.json>``.

The parent measures this whole process from outside (``measure.py``). It writes the transforms
(ANTs order: fixed -> moving points, as ``ants.apply_transforms`` takes them) to
``<out_dir>/transforms.json``. Thread counts come from the environment, set before ``import ants``
(ITK reads ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` at import).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

from bids_app.transforms.orientation import LPS_RAS, lps_ras_affine


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    for name in ("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "OMP_NUM_THREADS"):
        os.environ[name] = str(spec["threads"])
    out_dir = Path(spec["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    runner = RUNNERS[spec["runner"]]
    transforms = runner(spec, out_dir)
    (out_dir / "transforms.json").write_text(json.dumps({"transforms": transforms}, indent=1))
    return 0


# ---- ANTs ---------------------------------------------------------------------------------------


def run_ants(spec: dict, out_dir: Path) -> list[str]:
    import ants

    # ants.registration reads this at call time; set_ants_deterministic would force one thread.
    ants.config._random_seed = spec["seed"]
    fixed = ants.image_read(spec["fixed"], pixeltype="float")
    moving = ants.image_read(spec["moving"], pixeltype="float")
    mask = ants.image_read(spec["fixed_mask"])
    result = ants.registration(
        fixed, moving, type_of_transform=spec["options"]["type_of_transform"], mask=mask,
        outprefix=str(out_dir / "ants_"),
    )  # fmt: skip
    return list(result["fwdtransforms"])


def smriprep_arguments(fixed: str, moving: str, masks: str, prefix: str, seed: int) -> list[str]:
    """niworkflows' t1w-mni_registration_precise_000.json as antsRegistration arguments."""
    args = [
        "--dimensionality", "3", "--float", "1",
        "--collapse-output-transforms", "1", "--write-composite-transform", "1",
        "--output", f"[{prefix}]",
        "--interpolation", "LanczosWindowedSinc",
        "--winsorize-image-intensities", "[0.005,0.995]",
        "--use-histogram-matching", "1",
        "--initial-moving-transform", f"[{fixed},{moving},1]",
        "--random-seed", str(seed),
    ]  # fmt: skip
    stages = (
        ("Rigid[0.05]", f"MI[{fixed},{moving},1,56,Regular,0.25]", "[100x100,1e-6,20]", "2x1",
         "2x1vox"),
        ("Affine[0.08]", f"MI[{fixed},{moving},1,56,Regular,0.25]", "[100x100,1e-6,20]", "2x1",
         "1x0vox"),
        ("SyN[0.1,3.0,0.0]", f"CC[{fixed},{moving},1,4]", "[100x70x50x20,1e-6,10]", "8x4x2x1",
         "3x2x1x0vox"),
    )  # fmt: skip
    for transform, metric, convergence, shrink, smoothing in stages:
        args += [
            "--transform", transform, "--metric", metric, "--convergence", convergence,
            "--shrink-factors", shrink, "--smoothing-sigmas", smoothing, "--masks", masks,
        ]  # fmt: skip
    return args


def run_smriprep(spec: dict, out_dir: Path) -> list[str]:
    import ants
    from ants.internal import get_lib_fn, get_pointer_string

    # antsRegistration casts in-memory images blindly: images float, masks unsigned char.
    fixed = ants.image_read(spec["fixed"], pixeltype="float")
    moving = ants.image_read(spec["moving"], pixeltype="float")
    mask = ants.image_read(spec["fixed_mask"], pixeltype="unsigned char")
    prefix = str(out_dir / "smriprep_")
    args = smriprep_arguments(
        get_pointer_string(fixed), get_pointer_string(moving),
        f"[{get_pointer_string(mask)},NA]", prefix, spec["seed"],
    )  # fmt: skip
    status = get_lib_fn("antsRegistration")(args)
    composite = Path(f"{prefix}Composite.h5")
    if status != 0 or not composite.is_file():
        raise RuntimeError(f"antsRegistration failed with status {status}")
    return [str(composite)]


# ---- Greedy -------------------------------------------------------------------------------------


def run_greedy(spec: dict, out_dir: Path) -> list[str]:
    from picsl_greedy import Greedy3D

    common = f"-d 3 -threads {spec['threads']} -seed {spec['seed']} "
    images = f"-i {spec['fixed']} {spec['moving']} -gm {spec['fixed_mask']} "
    affine_ras = out_dir / "greedy_affine_ras.mat"
    warp = out_dir / "greedy_warp.nii.gz"
    # Each level halves the grid: coarse images (the tests' 6 mm case) need fewer levels.
    affine_levels = spec["options"].get("affine_iterations", "100x50x10")
    warp_levels = spec["options"].get("deformable_iterations", "100x50x10")
    greedy = Greedy3D()
    greedy.execute(
        common + images + f"-a -dof 12 -m NMI -ia-image-centers -n {affine_levels} -o {affine_ras}"
    )
    # -wp 0: keep the warp's full precision (Greedy rounds it to 0.1 voxel by default)
    greedy.execute(
        common + images + f"-it {affine_ras} -m NCC 2x2x2 -n {warp_levels} -wp 0 -o {warp}"
    )
    return greedy_to_ants(affine_ras, warp, out_dir)


def greedy_to_ants(affine_ras: Path, warp: Path | None, out_dir: Path) -> list[str]:
    """Greedy's chain ``-r warp affine`` (x -> A(x + w(x)), its .mat in RAS) as an ANTs list.

    Greedy's warp is an ITK displacement image (LPS vectors, as ANTs reads it); only the matrix
    needs the RAS -> LPS flip."""
    itk_affine = out_dir / "greedy_affine_itk.mat"
    write_itk_affine(np.loadtxt(affine_ras), itk_affine)
    return ([str(warp)] if warp is not None else []) + [str(itk_affine)]


def write_itk_affine(affine_ras: np.ndarray, path: Path) -> None:
    """A 4x4 RAS point map as an ITK AffineTransform file (LPS)."""
    import ants

    lps = lps_ras_affine(affine_ras)
    transform = ants.create_ants_transform(
        transform_type="AffineTransform", dimension=3, matrix=lps[:3, :3],
        translation=lps[:3, 3], center=np.zeros(3),
    )  # fmt: skip
    ants.write_transform(transform, str(path))


# ---- diagnostics: the true transform and no transform -------------------------------------------


def run_oracle(spec: dict, out_dir: Path) -> list[str]:
    """Phi(x) = A (x + u(x)) as ANTs files: u on a grid over the fixed image (<= 2 mm, so that
    linear interpolation of the bumps stays far below 0.05 mm), then A."""
    import nibabel as nib

    from benchmarks.truth import KnownTransform

    case = json.loads((Path(spec["case_folder"]) / "case.json").read_text())
    truth = KnownTransform.from_json(case["truth"])
    fixed = nib.load(spec["fixed"])
    spacing = min(2.0, float(min(fixed.header.get_zooms()[:3])))
    corners = np.array([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)])
    world = nib.affines.apply_affine(fixed.affine, corners * (np.array(fixed.shape[:3]) - 1))
    low, high = world.min(0), world.max(0)
    shape = tuple(int(s) for s in np.ceil((high - low) / spacing).astype(int) + 1)
    grid = np.indices(shape).reshape(3, -1).T * spacing + low
    field = truth.bumps.displacement(grid).reshape(*shape, 3)
    field_path = out_dir / "oracle_field.nii.gz"
    write_displacement_field(field, low, spacing, field_path)
    affine_path = out_dir / "oracle_affine.mat"
    write_itk_affine(truth.affine, affine_path)
    return [str(field_path), str(affine_path)]


def write_displacement_field(field_ras: np.ndarray, origin_ras, spacing: float, path: Path):
    """RAS vectors on an RAS-aligned grid -> an ITK displacement field file (LPS)."""
    import ants

    image = ants.from_numpy(
        (field_ras @ LPS_RAS).astype(np.float32),
        origin=tuple(LPS_RAS @ np.asarray(origin_ras, float)),
        spacing=(spacing,) * 3,
        direction=LPS_RAS,
        has_components=True,
    )
    ants.image_write(image, str(path))


def run_identity(spec: dict, out_dir: Path) -> list[str]:
    path = out_dir / "identity.mat"
    write_itk_affine(np.eye(4), path)
    return [str(path)]


RUNNERS = {
    "ants": run_ants,
    "smriprep": run_smriprep,
    "greedy": run_greedy,
    "oracle": run_oracle,
    "identity": run_identity,
}

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
