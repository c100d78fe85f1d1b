"""Brain extraction: decide whether it is needed, and do it by registration to the template.

The template's brain mask is brought back onto the participant through a head-to-template
registration, then cleaned up (one connected piece, no holes).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# An image whose non-zero voxels fill less than this looks like a brain without its head: a whole
# head is ~3-5 litres, a brain (with cerebellum, without CSF outside it) 1-1.8 litres.
_STRIPPED_MAX_LITRES = 2.3
_STRIPPED_MIN_ZERO_SHARE = 0.3


@dataclass(frozen=True)
class BrainExtraction:
    mask_img: object  # ANTs image, 0/1, on the participant's grid
    linear_xfm: Path | None  # head-to-template linear transform, to start the main registration
    skull_stripped_input: bool


def looks_skull_stripped(data: np.ndarray, voxel_volume_mm3: float) -> bool:
    """True for images whose background and skull are exactly zero and the rest brain-sized."""
    nonzero = data != 0
    zero_share = 1.0 - float(nonzero.mean())
    litres = float(nonzero.sum()) * voxel_volume_mm3 / 1e6
    return zero_share >= _STRIPPED_MIN_ZERO_SHARE and litres <= _STRIPPED_MAX_LITRES


def mask_from_nonzero(t1w_img):
    """The brain mask of an already skull-stripped image: its non-zero voxels, cleaned up."""
    import ants

    return clean_mask(ants.threshold_image(t1w_img, 1e-6, None, 1, 0))


def clean_mask(mask_img):
    """Keep the largest connected piece (face-connected) and fill its holes.

    scipy rather than ITK's ``iMath FillHoles``: the same mask, 0.5 s instead of 9 s on a 1 mm
    volume (measured on the labelled bert T1w, one thread).
    """
    from scipy import ndimage

    inside = mask_img.numpy() > 0
    pieces, count = ndimage.label(inside)
    if count > 1:
        sizes = np.bincount(pieces.ravel())
        sizes[0] = 0  # the background is not a piece
        inside = pieces == sizes.argmax()
    filled = ndimage.binary_fill_holes(inside)
    return mask_img.new_image_like(filled.astype("float32"))


def extract_brain(t1w_img, template_head, template_mask, engine, work_prefix: Path, seed: int):
    """Register the head to the template head and bring the template's brain mask back."""
    import ants

    linear = engine.register(
        template_head,
        t1w_img,
        preset="head-linear",
        out_prefix=Path(f"{work_prefix}lin_"),
        seed=seed,
    )
    warp = engine.register(
        template_head,
        t1w_img,
        preset="head-syn",
        out_prefix=Path(f"{work_prefix}syn_"),
        seed=seed,
        initial_xfm=linear.forward_xfm,
    )
    probability = ants.apply_transforms(
        t1w_img, template_mask, [str(warp.inverse_xfm)], interpolator="linear"
    )
    mask = clean_mask(ants.threshold_image(probability, 0.5, 1e9, 1, 0))
    return BrainExtraction(mask, linear.forward_xfm, skull_stripped_input=False)
