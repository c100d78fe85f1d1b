"""Mask clean-up: one connected piece, no holes, on the image's own grid."""

from __future__ import annotations

import numpy as np

from bids_app.participant.images import clean_mask


def _ants_mask(data: np.ndarray):
    import ants

    return ants.from_numpy(
        data.astype("float32"), origin=(-30.0, 12.0, 5.0), spacing=(1.0, 1.2, 2.0)
    )


def _planted_mask() -> tuple[np.ndarray, np.ndarray]:
    """A cube with a closed cavity, a tunnel open to the outside, and a stray island."""
    data = np.zeros((40, 36, 30), dtype=bool)
    data[5:30, 5:30, 5:25] = True
    data[12:18, 12:18, 10:16] = False  # closed cavity: must be filled
    data[15:17, 15:17, 0:8] = False  # tunnel from the top face: not a hole, must stay open
    data[34:38, 30:34, 26:29] = True  # island: not the largest piece, must go
    expected = data.copy()
    expected[12:18, 12:18, 10:16] = True
    expected[34:38, 30:34, 26:29] = False
    return data, expected


def test_keeps_largest_piece_and_fills_closed_holes_only():
    data, expected = _planted_mask()
    cleaned = clean_mask(_ants_mask(data))
    np.testing.assert_array_equal(cleaned.numpy() > 0, expected)


def test_matches_itk_fill_holes_and_keeps_geometry():
    import ants

    data, _ = _planted_mask()
    img = _ants_mask(data)
    itk = ants.iMath(ants.iMath(img, "GetLargestComponent"), "FillHoles")
    cleaned = clean_mask(img)
    np.testing.assert_array_equal(cleaned.numpy() > 0, itk.numpy() > 0)
    assert cleaned.spacing == img.spacing and cleaned.origin == img.origin
    assert cleaned.pixeltype == "float"


def test_empty_mask_stays_empty():
    cleaned = clean_mask(_ants_mask(np.zeros((8, 8, 8), dtype=bool)))
    assert not cleaned.numpy().any()
