"""The group report's pictures, composed as pixel arrays and saved as PNG bytes.

A group page holds a picture for every T1w. Drawn with matplotlib axes (about 25 ms each, plus a
figure per picture) they would dominate the group level's run time, so they are composed
directly: grey sections windowed as the participant figures are (``figures.grey_window``), the
brain outline as the edge pixels of the mask, statistics as a diverging colour overlay above a
display threshold. Sections are 2D arrays cut from RAS-ordered volumes with rows going up, as
``figures.take_slice`` and ``collect.take_preview`` cut them.
"""

from __future__ import annotations

import io

import numpy as np

from bids_app.reports.figures import OUTLINE_COLOURS, VIEWS, grey_window, take_slice

THUMBNAIL_PIXELS = 100  # sections are enlarged or decimated to about this height
MOSAIC_PIXELS = 150  # (enlarged only: the mosaics keep every voxel of fine grids)
GAP_PIXELS = 2
_AXES = {"sagittal": (1, 2), "coronal": (0, 2), "axial": (0, 1)}  # (column axis, row axis)


def thumbnail_png(preview: tuple, outline: tuple | None, zooms) -> bytes:
    """One panel per view (``collect.PREVIEW_VIEWS`` order) side by side, outline in green."""
    vmin, vmax = grey_window(np.concatenate([s.ravel() for s in preview]), None)
    tallest = _tallest(preview, VIEWS, zooms)
    step = max(1, int(round(tallest / THUMBNAIL_PIXELS)))  # 1 mm grids: every other voxel
    scale = max(1, int(round(THUMBNAIL_PIXELS / tallest)))
    panels = []
    for i, (view, section) in enumerate(zip(VIEWS, preview, strict=True)):
        edge = None if outline is None else outline[i][::step, ::step]
        panels.append(panel(section[::step, ::step], view, zooms, scale, (vmin, vmax), edge))
    return to_png(_row(panels))


def mosaic_png(
    background: np.ndarray, mask: np.ndarray, cuts, zooms,
    overlay: np.ndarray | None = None, limit: float = 1.0, threshold: float = 0.0,
) -> bytes:  # fmt: skip
    """Rows of sagittal, coronal and axial sections at ``cuts`` (``figures.Cuts``) of RAS-ordered
    volumes: ``background`` in grey with ``mask``'s outline; ``overlay`` (if given) in blue-red
    over +-``limit`` inside the mask where ``|overlay| >= threshold``."""
    vmin, vmax = grey_window(background, mask)
    firsts = [take_slice(background, view, cuts.of(view)[0]) for view in VIEWS]
    scale = max(1, int(round(MOSAIC_PIXELS / _tallest(firsts, VIEWS, zooms))))
    rows = []
    for view in VIEWS:
        panels = []
        for index in cuts.of(view):
            values = None if overlay is None else take_slice(overlay, view, index)
            inside = take_slice(mask, view, index)
            picture = panel(
                take_slice(background, view, index), view, zooms, scale, (vmin, vmax), inside,
                values, inside, limit, threshold,
            )  # fmt: skip
            panels.append(picture)
        rows.append(_row(panels))
    return to_png(_column(rows))


def panel(
    section, view, zooms, scale: int, window, outline=None, overlay=None, inside=None,
    limit: float = 1.0, threshold: float = 0.0,
) -> np.ndarray:  # fmt: skip
    """One section as an RGB uint8 picture, top row up, voxels shown at their true proportions."""
    vmin, vmax = window
    grey = np.clip((np.asarray(section, np.float32) - vmin) / max(vmax - vmin, 1e-12), 0, 1)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    if overlay is not None:
        import matplotlib

        values = np.asarray(overlay, np.float32)
        shown = np.abs(values) >= threshold
        if inside is not None:
            shown &= np.asarray(inside) > 0
        colours = matplotlib.colormaps["RdBu_r"](np.clip((values / limit + 1) / 2, 0, 1))[..., :3]
        rgb[shown] = 0.15 * rgb[shown] + 0.85 * colours[shown]
    repeats = _repeats(view, zooms, scale)
    rgb = _enlarge(rgb, repeats)
    if outline is not None:
        rgb[_edge(_enlarge(np.asarray(outline) > 0, repeats))] = _rgb(OUTLINE_COLOURS["template"])
    return (rgb[::-1] * 255).round().astype(np.uint8)  # row 0 of a picture is its top


def to_png(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def _tallest(sections, views, zooms) -> int:
    """The height in pixels of the tallest section, at one pixel per finest voxel size."""
    return max(
        s.shape[0] * _repeats(view, zooms, 1)[0] for s, view in zip(sections, views, strict=True)
    )


def _repeats(view: str, zooms, scale: int) -> tuple[int, int]:
    """Pixels per voxel along (rows, columns) of a section: anisotropic voxels keep their shape."""
    column_axis, row_axis = _AXES[view]
    finest = min(zooms)
    return (
        scale * max(1, int(round(zooms[row_axis] / finest))),
        scale * max(1, int(round(zooms[column_axis] / finest))),
    )


def _enlarge(image: np.ndarray, repeats: tuple[int, int]) -> np.ndarray:
    return np.repeat(np.repeat(image, repeats[0], axis=0), repeats[1], axis=1)


def _edge(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return mask & ~ndimage.binary_erosion(mask)


def _rgb(colour: str) -> tuple[float, float, float]:
    return tuple(int(colour[i : i + 2], 16) / 255 for i in (1, 3, 5))


def _row(panels: list[np.ndarray]) -> np.ndarray:
    height = max(p.shape[0] for p in panels)
    padded = [_pad(p, height, p.shape[1]) for p in panels]
    gap = np.zeros((height, GAP_PIXELS, 3), np.uint8)
    pieces = [piece for p in padded for piece in (p, gap)][:-1]
    return np.concatenate(pieces, axis=1)


def _column(rows: list[np.ndarray]) -> np.ndarray:
    width = max(r.shape[1] for r in rows)
    padded = [_pad(r, r.shape[0], width) for r in rows]
    gap = np.zeros((GAP_PIXELS, width, 3), np.uint8)
    pieces = [piece for r in padded for piece in (r, gap)][:-1]
    return np.concatenate(pieces, axis=0)


def _pad(picture: np.ndarray, height: int, width: int) -> np.ndarray:
    """``picture`` centred on a black canvas of ``height`` x ``width``."""
    canvas = np.zeros((height, width, 3), np.uint8)
    top, left = (height - picture.shape[0]) // 2, (width - picture.shape[1]) // 2
    canvas[top : top + picture.shape[0], left : left + picture.shape[1]] = picture
    return canvas
