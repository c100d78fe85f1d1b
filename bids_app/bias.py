"""N4 bias-field correction."""

from __future__ import annotations


def correct_bias(t1w_img, mask=None):
    """N4 on an ANTs image, after truncating intensity outliers (as sMRIPrep does).

    The field is estimated on a 4x shrunk copy (fast; the field is smooth) and applied at full
    resolution. Returns a float image; its scale is arbitrary, like any T1w.
    """
    import ants

    truncated = ants.iMath(t1w_img, "TruncateIntensity", 0.01, 0.999)
    return ants.n4_bias_field_correction(
        truncated,
        mask=mask,
        shrink_factor=4,
        convergence={"iters": [50, 50, 50, 50], "tol": 1e-7},
        spline_param=200,
    )
