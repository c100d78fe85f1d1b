"""ITK composite transform files (.h5), read and written in the layout ``antsRegistration`` writes.

The reader and writer are exact inverses: both deal in the RAS parts of ``model.CompositeTransform``
(4x4 affines and ``DisplacementField``s, in the file's order: ITK applies the *last* part to a point
first), stored as ITK stores them, in LPS. Engines other than ANTs use it, so that
``antsApplyTransforms``, ``ants.apply_transforms`` and our own reader take their output unchanged.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bids_app.transforms.model import CompositeTransform, DisplacementField
from bids_app.transforms.orientation import (
    LPS_RAS,
    itk_grid_from_ras,
    lps_ras_affine,
    lps_ras_flip,
    ras_affine_from_itk,
)

# antsRegistration --float 1 writes single-precision parameters; fixed parameters are always double.
_PRECISION = "float"
_PARAMETER_DTYPE = np.float32
# Compressed in chunks of at most 2**20 values, as ITK does when it compresses (antsRegistration);
# byte shuffling first (an HDF5 built-in filter, so any ITK reads it) makes float fields ~20 %
# smaller than deflate alone, and is faster.
_CHUNK = 2**20
_DEFLATE_LEVEL = 4


def write_composite(transform: CompositeTransform, path: Path) -> Path:
    """Write ``transform`` to ``path`` as an ITK composite transform (HDF5)."""
    import h5py

    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w", libver=("earliest", "v108")) as h5:
        _write_string(h5, "HDFVersion", h5py.version.hdf5_version)
        group = h5.create_group("TransformGroup")
        _write_string(group.create_group("0"), "TransformType", _type_name("CompositeTransform"))
        for index, part in enumerate(transform.parts, start=1):
            if isinstance(part, DisplacementField):
                kind, params, fixed = "DisplacementFieldTransform", *_field_to_itk(part)
            else:
                kind, params, fixed = "AffineTransform", *_affine_to_itk(np.asarray(part))
            entry = group.create_group(str(index))
            _write_string(entry, "TransformType", _type_name(kind))
            entry.create_dataset("TransformFixedParameters", data=fixed.astype(np.float64))
            _write_parameters(entry, params.astype(_PARAMETER_DTYPE))
    return path


def read_composite(path: Path) -> CompositeTransform:
    """Read an ITK composite transform (.h5) as RAS parts, in the file's order."""
    import h5py

    parts = []
    with h5py.File(path, "r") as h5:
        group = h5["TransformGroup"]
        for key in sorted(group, key=int):
            kind = _decode(group[key]["TransformType"][0])
            if kind.startswith("CompositeTransform"):
                continue
            params = np.asarray(group[key]["TransformParameters"], dtype=float)
            fixed = np.asarray(group[key]["TransformFixedParameters"], dtype=float)
            if kind.startswith(("AffineTransform", "MatrixOffsetTransformBase")):
                parts.append(_affine_from_itk(params, fixed))
            elif kind.startswith("DisplacementFieldTransform"):
                parts.append(_field_from_itk(params, fixed))
            else:
                raise ValueError(f"{path}: transform type {kind} is not supported here")
    return CompositeTransform(tuple(parts))


def _decode(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _affine_from_itk(params: np.ndarray, center: np.ndarray) -> np.ndarray:
    """ITK: y = M (x - c) + t + c, in LPS  ->  a 4x4 RAS matrix."""
    matrix = params[:9].reshape(3, 3)
    translation = params[9:12]
    lps = np.eye(4)
    lps[:3, :3] = matrix
    lps[:3, 3] = translation + center - matrix @ center
    return lps_ras_affine(lps)


def _field_from_itk(params: np.ndarray, fixed: np.ndarray) -> DisplacementField:
    size = fixed[0:3].astype(int)
    origin, spacing, direction = fixed[3:6], fixed[6:9], fixed[9:18].reshape(3, 3)
    # ITK stores vectors with the first index varying fastest.
    vectors = params.reshape(size[2], size[1], size[0], 3).transpose(2, 1, 0, 3)
    return DisplacementField(
        vectors=lps_ras_flip(vectors).astype(np.float32),
        affine=ras_affine_from_itk(origin, spacing, direction),
    )


def _write_parameters(group, params: np.ndarray) -> None:
    chunked = {}
    if params.size > 12:  # fields, not affines
        chunked = dict(
            chunks=(min(params.size, _CHUNK),),
            shuffle=True,
            compression="gzip",
            compression_opts=_DEFLATE_LEVEL,
        )
    group.create_dataset("TransformParameters", data=params, **chunked)


def _type_name(kind: str) -> str:
    return f"{kind}_{_PRECISION}_3_3"


def _write_string(group, name: str, value: str) -> None:
    """ITK reads variable-length ASCII strings, stored as an array of one."""
    import h5py

    group.create_dataset(name, data=[value], dtype=h5py.string_dtype("ascii"))


def _affine_to_itk(ras: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A 4x4 RAS matrix -> ITK's (matrix, translation) parameters in LPS, rotation centre 0."""
    if ras.shape != (4, 4) or not np.allclose(ras[3], [0, 0, 0, 1]):
        raise ValueError(f"expected a 4x4 affine matrix with last row 0 0 0 1, got\n{ras}")
    matrix = LPS_RAS @ ras[:3, :3] @ LPS_RAS
    translation = lps_ras_flip(ras[:3, 3])
    return np.concatenate([matrix.ravel(), translation]), np.zeros(3)


def _field_to_itk(field: DisplacementField) -> tuple[np.ndarray, np.ndarray]:
    """RAS vectors on a RAS grid -> ITK's flat LPS vectors (first index fastest) and grid."""
    vectors = np.asarray(field.vectors)
    if vectors.ndim != 4 or vectors.shape[3] != 3:
        raise ValueError(f"expected vectors of shape (X, Y, Z, 3), not {vectors.shape}")
    origin, spacing, direction = itk_grid_from_ras(field.affine)
    flat = lps_ras_flip(vectors).transpose(2, 1, 0, 3).ravel()
    fixed = np.concatenate([np.array(vectors.shape[:3], float), origin, spacing, direction.ravel()])
    return flat, fixed
