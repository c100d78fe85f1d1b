"""How alike two images or two masks are: QC's image metrics and the masks' overlap."""

from __future__ import annotations

import math

import numpy as np

MI_BINS = 32  # histogram bins per image for the mutual information


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two samples (NaN when either is constant)."""
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    a, b = a - a.mean(), b - b.mean()
    denominator = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denominator) if denominator > 0 else float("nan")


def mutual_information(a: np.ndarray, b: np.ndarray, bins: int = MI_BINS) -> tuple[float, float]:
    """(mutual information in bits, normalised mutual information) of two samples."""

    def _clipped(x):
        low, high = np.percentile(x, [0.5, 99.5])
        return np.clip(x, low, high), (low, high if high > low else low + 1)

    a, a_range = _clipped(a.astype(np.float64).ravel())
    b, b_range = _clipped(b.astype(np.float64).ravel())
    joint, _, _ = np.histogram2d(a, b, bins=bins, range=(a_range, b_range))
    joint /= joint.sum()

    def _entropy(p):
        p = p[p > 0]
        return float(-(p * np.log2(p)).sum())

    h_a, h_b, h_ab = _entropy(joint.sum(1)), _entropy(joint.sum(0)), _entropy(joint)
    return h_a + h_b - h_ab, ((h_a + h_b) / h_ab if h_ab > 0 else float("nan"))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two masks (voxels > 0); NaN when both are empty."""
    a, b = a > 0, b > 0
    total = int(a.sum() + b.sum())
    return 2 * int((a & b).sum()) / total if total else float("nan")
