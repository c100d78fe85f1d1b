"""Report figures: mosaics of three orthogonal views, several slices each (matplotlib).

Every figure is a grid of 3 rows (sagittal, coronal, axial) by ``n`` slices, drawn in the
neurological convention (the participant's left on the left, anterior up in axial views). Figures
that are meant to be flicked between (the normalised T1w and the template) share slices, size and
layout exactly, so that misalignment jumps out when one replaces the other.

Matplotlib is used through ``Figure`` objects and the Agg canvas, never ``pyplot``: no global
state, no display needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bids_app.outputs import derivatives as drv

VIEWS = ("sagittal", "coronal", "axial")  # the fixed axis is x, y, z of a RAS array
N_SLICES = 7
PANEL_INCHES = 1.75
DPI = 96
OUTLINE_COLOURS = {"brain": "#ff3b30", "template": "#33d17a", "lesion": "#ffcc00"}
LOGJAC_LIMIT = 0.5  # colour scale of log-Jacobian maps: +-0.5 = volume ratio 0.61 ... 1.65


@dataclass(frozen=True)
class Cuts:
    """Voxel indices of the slices shown, per view (x for sagittal, y coronal, z axial)."""

    sagittal: tuple[int, ...]
    coronal: tuple[int, ...]
    axial: tuple[int, ...]

    def of(self, view: str) -> tuple[int, ...]:
        return getattr(self, view)


def choose_cuts(mask: np.ndarray, n: int = N_SLICES) -> Cuts:
    """``n`` slices per view spread over the brain's extent (its outer 12% left out)."""
    inside = np.argwhere(mask > 0)
    if inside.size == 0:
        low, high = np.zeros(3, int), np.array(mask.shape) - 1
    else:
        low, high = inside.min(0), inside.max(0)
    per_axis = []
    for axis in range(3):
        span = high[axis] - low[axis]
        positions = np.linspace(low[axis] + 0.12 * span, high[axis] - 0.12 * span, n)
        per_axis.append(tuple(int(round(p)) for p in positions))
    return Cuts(*per_axis)


def canonical(img):
    import nibabel as nib

    return nib.as_closest_canonical(img)


def plot_mosaic(
    background,
    path: Path,
    cuts: Cuts,
    *,
    outlines: tuple = (),
    overlay=None,
    overlay_limit: float = LOGJAC_LIMIT,
    overlay_label: str = "",
    window_mask=None,
) -> Path:
    """Write a PNG mosaic of ``background`` (a RAS nibabel image) with optional outlines.

    ``outlines``: (mask image, colour) pairs drawn as contours; ``overlay``: a signed map shown
    in a diverging colour scale of +-``overlay_limit`` over the background, with a colour bar;
    ``window_mask``: the grey-level window is taken from the voxels inside it.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    data = np.asarray(background.dataobj, dtype=np.float32)
    zooms = background.header.get_zooms()[:3]
    outline_data = [(np.asarray(img.dataobj) > 0, colour) for img, colour in outlines]
    overlay_data = None if overlay is None else np.asarray(overlay.dataobj, dtype=np.float32)
    for other in [o for o, _ in outline_data] + ([overlay_data] if overlay is not None else []):
        if other.shape[:3] != data.shape[:3]:
            raise ValueError(f"{path.name}: layers on different grids {other.shape} {data.shape}")
    inside = (
        np.ones(data.shape[:3], dtype=bool)
        if window_mask is None
        else np.asarray(window_mask.dataobj) > 0
    )
    vmin, vmax = grey_window(data, None if window_mask is None else inside)

    n = max(len(cuts.of(view)) for view in VIEWS)
    colour_bar = overlay is not None
    width = n * PANEL_INCHES + (0.9 if colour_bar else 0.0)
    figure = Figure(figsize=(width, 3 * PANEL_INCHES), dpi=DPI, facecolor="black")
    FigureCanvasAgg(figure)
    right = 1 - 0.9 / width if colour_bar else 1.0
    grid = figure.add_gridspec(3, n, left=0, right=right, bottom=0, top=1, wspace=0.0, hspace=0.0)
    image = None
    for row, view in enumerate(VIEWS):
        for column, index in enumerate(cuts.of(view)):
            axes = figure.add_subplot(grid[row, column])
            axes.set_facecolor("black")
            axes.set_axis_off()
            aspect = _aspect(view, zooms)
            axes.imshow(
                take_slice(data, view, index), cmap="gray", vmin=vmin, vmax=vmax,
                origin="lower", aspect=aspect, interpolation="bilinear",
            )  # fmt: skip
            if overlay_data is not None:
                values = take_slice(overlay_data, view, index)
                image = axes.imshow(
                    np.ma.masked_where(~take_slice(inside, view, index), values), cmap="RdBu_r",
                    vmin=-overlay_limit, vmax=overlay_limit, origin="lower", aspect=aspect,
                    interpolation="nearest", alpha=0.85,
                )  # fmt: skip
            for mask, colour in outline_data:
                section = take_slice(mask, view, index).astype(np.float32)
                if section.any():
                    axes.contour(section, levels=[0.5], colors=[colour], linewidths=1.0)
            axes.text(
                0.03, 0.97, _coordinate_label(background.affine, data.shape, view, index),
                transform=axes.transAxes, color="white", fontsize=7, va="top", ha="left",
            )  # fmt: skip
    if colour_bar and image is not None:
        bar_axes = figure.add_axes((right + 0.15 * (1 - right), 0.1, 0.2 * (1 - right), 0.8))
        bar = figure.colorbar(image, cax=bar_axes)
        bar.set_label(overlay_label, color="white", fontsize=8)
        bar.ax.tick_params(colors="white", labelsize=7)
    with drv.atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=DPI, facecolor="black")
    return path


def grey_window(data: np.ndarray, mask: np.ndarray | None) -> tuple[float, float]:
    """The grey-level range shown (0.5th to 99.5th percentile), over ``mask`` or the nonzero
    voxels; the group pictures (group/pictures.py) window their sections the same way."""
    values = data[mask > 0] if mask is not None and (mask > 0).any() else data[data != 0]
    if values.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(values, [0.5, 99.5])
    return float(low), float(high if high > low else low + 1)


def take_slice(data: np.ndarray, view: str, index: int) -> np.ndarray:
    """A 2D section, transposed so that rows go up (superior or anterior) with origin='lower'."""
    axis = VIEWS.index(view)
    index = int(np.clip(index, 0, data.shape[axis] - 1))
    section = (slice(None),) * axis + (index,)
    return data[section].T  # a view, not a copy


def _aspect(view: str, zooms) -> float:
    # rows over columns of the shown section: sagittal (y, z), coronal (x, z), axial (x, y)
    column_axis, row_axis = {"sagittal": (1, 2), "coronal": (0, 2), "axial": (0, 1)}[view]
    return float(zooms[row_axis]) / float(zooms[column_axis])


def _coordinate_label(affine: np.ndarray, shape, view: str, index: int) -> str:
    """World position (mm) of the slice, taken at its centre."""
    axis = VIEWS.index(view)
    centre = (np.array(shape[:3], dtype=float) - 1) / 2
    centre[axis] = index
    position = float((affine[:3, :3] @ centre + affine[:3, 3])[axis])
    return f"{'xyz'[axis]}={position:.0f}"


# ---- the figures of one T1w ------------------------------------------------------------------


def plot_brain_mask(t1w_img, mask_img, path: Path, lesion_img=None) -> Path:
    """The native brain mask outlined on the native (bias-corrected) T1w, and the lesion (its own
    colour) when the T1w had a lesion mask; the middle slices go through the lesion then."""
    t1w_img, mask_img = canonical(t1w_img), canonical(mask_img)
    lesion = _lesion_outline(lesion_img, t1w_img)
    return plot_mosaic(
        t1w_img, path, _cuts_through_lesion(np.asarray(mask_img.dataobj), lesion),
        outlines=((mask_img, OUTLINE_COLOURS["brain"]), *lesion), window_mask=mask_img,
    )  # fmt: skip


def plot_normalisation(
    normalised_img, template_img, template_mask_img, paths: tuple[Path, Path], lesion_img=None
):
    """Two mosaics with the same slices and the template's brain outline: the normalised T1w
    (``paths[0]``) and the template (``paths[1]``), to flick between; the lesion in template
    space outlined on both when the T1w had a lesion mask."""
    normalised_img, template_img = canonical(normalised_img), canonical(template_img)
    template_mask_img = canonical(template_mask_img)
    lesion = _lesion_outline(lesion_img, template_img)
    cuts = _cuts_through_lesion(np.asarray(template_mask_img.dataobj), lesion)
    outline = ((template_mask_img, OUTLINE_COLOURS["template"]), *lesion)
    for img, path in zip((normalised_img, template_img), paths, strict=True):
        plot_mosaic(img, path, cuts, outlines=outline, window_mask=template_mask_img)
    return paths


def _lesion_outline(lesion_img, background) -> tuple:
    """The (lesion, colour) outline on the background's grid; none without a lesion."""
    if lesion_img is None:
        return ()
    lesion_img = canonical(lesion_img)
    if lesion_img.shape[:3] != background.shape[:3] or not np.allclose(
        lesion_img.affine, background.affine, atol=1e-3
    ):
        from nibabel.processing import resample_from_to

        lesion_img = resample_from_to(lesion_img, (background.shape[:3], background.affine), 0)
    return ((lesion_img, OUTLINE_COLOURS["lesion"]),)


def _cuts_through_lesion(mask: np.ndarray, lesion_outline: tuple) -> Cuts:
    """The brain's cuts, with the middle slice of each view moved onto the lesion's centre (a
    small lesion could fall between the slices otherwise)."""
    cuts = choose_cuts(mask)
    lesion = np.asarray(lesion_outline[0][0].dataobj) > 0 if lesion_outline else None
    if lesion is None or not lesion.any():
        return cuts
    centre = np.rint(np.argwhere(lesion).mean(0)).astype(int)
    moved = []
    for axis, view in enumerate(VIEWS):
        indices = sorted({*cuts.of(view)} - {cuts.of(view)[len(cuts.of(view)) // 2]}
                         | {int(centre[axis])})  # fmt: skip
        moved.append(tuple(indices))
    return Cuts(*moved)


def plot_log_jacobian(logjac_img, template_img, template_mask_img, path: Path) -> Path:
    """The nonlinear log-Jacobian map over the template, inside the template's brain."""
    logjac_img, template_img = canonical(logjac_img), canonical(template_img)
    template_mask_img = canonical(template_mask_img)
    return plot_mosaic(
        template_img, path, choose_cuts(np.asarray(template_mask_img.dataobj)),
        overlay=logjac_img, window_mask=template_mask_img,
        overlay_label="log(volume participant / template)",
    )  # fmt: skip
