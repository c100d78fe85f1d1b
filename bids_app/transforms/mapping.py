"""Moving coordinates and images between a participant's T1w space and a template space, with
the transforms a participant-level run wrote.

Conventions: coordinates are RAS+ millimetres (NIfTI/scanner/MNI world coordinates). An *image*
is resampled into template space with ``from-T1w_to-<TPL>`` (that file maps template points to T1w
points), so a *point* moves from T1w to template space with the other file, ``from-<TPL>_to-T1w``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from bids_app.errors import MissingInputError, NothingMatchedError, UsageError
from bids_app.spaces import NATIVE_SPACE
from bids_app.transforms.orientation import lps_ras_flip

log = logging.getLogger(__name__)

NATIVE = NATIVE_SPACE


@dataclass(frozen=True)
class ParticipantTransforms:
    """The files of one normalised T1w in an mninorm output folder."""

    t1w2std_xfm: Path  # resamples T1w images into the template; maps template points to T1w
    std2t1w_xfm: Path  # resamples template images onto the T1w; maps T1w points to the template
    native_t1w: Path  # the native grid (desc-preproc_T1w)
    template: str


def find_transforms(
    output_dir: Path,
    subject: str,
    template: str,
    session: str | None = None,
    run: str | None = None,
) -> ParticipantTransforms:
    """Find one T1w's transforms with pybids; a clear error names what is missing or ambiguous."""
    from bids import BIDSLayout

    if not (output_dir / "dataset_description.json").is_file():
        raise MissingInputError(
            f"{output_dir} is not an mninorm output folder (no dataset_description.json)"
        )
    layout = BIDSLayout(
        str(output_dir), validate=False, config=["bids", "derivatives"], database_path=None
    )
    subject = subject.removeprefix("sub-")
    if subject not in layout.get_subjects():
        raise NothingMatchedError(
            f"no participant {subject!r} in {output_dir}; there are: "
            f"{', '.join(sorted(layout.get_subjects())) or 'none'}"
        )
    query = {"subject": subject, "datatype": "anat", "extension": ".h5", "suffix": "xfm"}
    if session:
        query["session"] = session.removeprefix("ses-")
    if run:
        query["run"] = run.removeprefix("run-")
    # by name: a cohort template's key holds a second entity (to-MNIPediatricAsym_cohort-2)
    forward = _one(layout, query, f"_from-{NATIVE}_to-{template}_mode-image_xfm.h5", "forward")
    inverse = _one(layout, query, f"_from-{template}_to-{NATIVE}_mode-image_xfm.h5", "inverse")
    native = Path(str(forward).replace(f"_from-T1w_to-{template}_mode-image_xfm.h5", ""))
    native = native.with_name(native.name + "_desc-preproc_T1w.nii.gz")
    if not native.is_file():
        raise MissingInputError(f"{native} (the native T1w grid) is missing from {output_dir}")
    return ParticipantTransforms(forward, inverse, native, template)


def _one(layout, query: dict, ending: str, direction: str) -> Path:
    found = [f for f in layout.get(return_type="filename", **query) if f.endswith(ending)]
    what = f"{direction} transform (*{ending})"
    described = ", ".join(f"{k}={v}" for k, v in query.items() if k not in ("extension", "suffix"))
    if not found:
        raise MissingInputError(
            f"no {what} ({described}) in {layout.root}: run the participant level for this "
            "participant and template first"
        )
    if len(found) > 1:
        names = ", ".join(Path(f).name for f in found)
        raise UsageError(f"several T1ws match ({names}): choose one with --session-label / --run")
    return Path(found[0])


# ---- points ---------------------------------------------------------------------------------


def map_points(points_ras: np.ndarray, transforms: ParticipantTransforms, to: str) -> np.ndarray:
    """Map RAS points (N, 3) from T1w space to the template (``to`` = template) or back."""
    import ants
    import pandas as pd

    xfm = transforms.std2t1w_xfm if to != NATIVE else transforms.t1w2std_xfm
    lps = pd.DataFrame(lps_ras_flip(np.asarray(points_ras, float)), columns=["x", "y", "z"])
    mapped = ants.apply_transforms_to_points(3, lps, [str(xfm)])
    return lps_ras_flip(mapped[["x", "y", "z"]].to_numpy())


def voxels_to_world(ijk: np.ndarray, image_path: Path) -> np.ndarray:
    return nib.affines.apply_affine(_affine(image_path), np.asarray(ijk, float))


def world_to_voxels(xyz: np.ndarray, image_path: Path) -> np.ndarray:
    return nib.affines.apply_affine(np.linalg.inv(_affine(image_path)), np.asarray(xyz, float))


def _affine(image_path: Path) -> np.ndarray:
    if not image_path.is_file():
        raise MissingInputError(f"image {image_path} does not exist")
    return nib.load(str(image_path)).affine


# ---- images ---------------------------------------------------------------------------------

INTERPOLATIONS = {
    "label": "genericLabel",  # each voxel takes one of the input's labels: no new values
    "nearest": "nearestNeighbor",
    "linear": "linear",
    "bspline": "bSpline",
    "lanczos": "lanczosWindowedSinc",
}
_MAX_LABELS = 5000


def choose_interpolation(data: np.ndarray) -> str:
    """'label' for images of integer labels (masks, atlases), 'linear' for anything continuous."""
    finite = data[np.isfinite(data)]
    integers = finite.size > 0 and np.allclose(finite, np.round(finite))
    return "label" if integers and np.unique(finite).size <= _MAX_LABELS else "linear"


def warp_image(
    image_path: Path, reference_path: Path, transforms: ParticipantTransforms, to: str,
    interpolation: str = "auto",
) -> tuple[nib.Nifti1Image, str]:  # fmt: skip
    """Resample an image into the template (``to`` = template) or onto the T1w grid."""
    import ants

    from bids_app.transforms.orientation import ants_to_nifti, nifti_to_ants

    if not image_path.is_file():
        raise MissingInputError(f"image {image_path} does not exist")
    source = nib.load(str(image_path))
    data = np.asarray(source.dataobj)
    if data.ndim != 3:
        raise UsageError(f"{image_path}: only 3D images can be warped (shape {data.shape})")
    if interpolation == "auto":
        interpolation = choose_interpolation(data)
    xfm = transforms.t1w2std_xfm if to != NATIVE else transforms.std2t1w_xfm
    reference = nifti_to_ants(nib.load(str(reference_path)))
    moved = ants.apply_transforms(
        reference,
        nifti_to_ants(nib.Nifti1Image(data.astype(np.float32), source.affine)),
        [str(xfm)],
        interpolator=INTERPOLATIONS[interpolation],
    )
    dtype = source.get_data_dtype() if interpolation in ("label", "nearest") else np.float32
    return ants_to_nifti(moved, dtype=dtype), interpolation


def label_volumes(labels: nib.Nifti1Image) -> dict[int, tuple[int, float]]:
    """{label: (voxels, mm^3)} for every non-zero label of an image."""
    data = np.asarray(labels.dataobj).astype(np.int64)
    voxel_mm3 = float(abs(np.linalg.det(labels.affine[:3, :3])))
    values, counts = np.unique(data[data != 0], return_counts=True)
    return {int(v): (int(c), float(c) * voxel_mm3) for v, c in zip(values, counts, strict=True)}
