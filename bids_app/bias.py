"""N4 bias-field correction."""

from __future__ import annotations

# N4 fits a smooth B-spline field (control points every 200 mm), so it is estimated on a copy
# shrunk to ~8 mm voxels and applied at full resolution. On a 1 mm head (heads sub-02, one
# thread) this took 29 s against 167 s at sMRIPrep's shrink factor 4, with fields that differ by
# 2.5 % (rms of the log-field difference inside the head; the field itself spans 86 %).
_SHRUNK_VOXEL_MM = 8.0
_MAX_SHRINK = 8  # ITK's N4 shrinks by an integer factor


def shrink_factor(zooms_mm) -> int:
    """The integer factor that brings the finest voxel size closest to ``_SHRUNK_VOXEL_MM``."""
    return max(1, min(_MAX_SHRINK, round(_SHRUNK_VOXEL_MM / min(zooms_mm))))


def correct_bias(t1w_img, mask=None):
    """N4 on an ANTs image, after truncating intensity outliers (as sMRIPrep does).

    Returns a float image; its scale is arbitrary, like any T1w.
    """
    import ants

    truncated = ants.iMath(t1w_img, "TruncateIntensity", 0.01, 0.999)
    return ants.n4_bias_field_correction(
        truncated,
        mask=mask,
        shrink_factor=shrink_factor(t1w_img.spacing),
        convergence={"iters": [50, 50, 50, 50], "tol": 1e-7},
        spline_param=200,
    )
