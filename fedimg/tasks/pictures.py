"""Prediction-vs-reference pictures of one validation case: axial, coronal and sagittal through the lesion.

Shown in the radiological convention, whatever the axis order of the stored
volume (its axis codes are read from the NIfTI header; preprocessing writes
RAS): the patient's right is on the image's left in the axial and coronal
panels, anterior is up in the axial panel, superior is up in the coronal and
sagittal panels, and anterior is on the left of the sagittal panel. Every
panel edge carries its direction letter (R/L, A/P, S/I) and pixels keep the
voxel spacing's aspect ratio.

Each foreground class has its own colour (named in a legend from
``task.class_names``); the reference is drawn as an outline and the model's
prediction as a translucent fill, so both can be told apart where they
overlap. The three slices cross at the centre of the reference's smallest
structure present (the lesion in an organ-and-lesion task; the organ when the
case has no lesion), or of the prediction's when the reference is empty. The
picture names the case by its index in the validation list only: no patient
identifier, date or path.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np

#: Class colours (RGB 0..1), class 1 first: distinguishable and colour-blind friendly (Okabe-Ito).
COLOURS = [
    (0.90, 0.62, 0.0),
    (0.34, 0.71, 0.91),
    (0.0, 0.62, 0.45),
    (0.94, 0.89, 0.26),
    (0.0, 0.45, 0.70),
    (0.84, 0.37, 0.0),
    (0.80, 0.47, 0.65),
]

#: What every picture says about its orientation (also the TensorBoard caption of the pictures).
CONVENTION = (
    "Radiological convention: the patient's right is on the image's left (axial and coronal), anterior is up "
    "(axial), superior is up (coronal, sagittal), anterior is left (sagittal)."
)
HOW_TO_READ = (
    "Each picture is one validation case (by its index in the site's validation list, no patient identifier): "
    "axial, coronal and sagittal slices through the centre of the smallest reference structure present "
    "(the lesion when the case has one). Outline = reference (ground truth); translucent fill = the model's "
    "prediction; one colour per class, named in the legend. " + CONVENTION
)

# Per panel: the RAS axes shown as (rows, columns) after the radiological flips, and the edge letters
# (top, bottom, left, right).
_PANELS = (
    ("axial", 2, (1, 0), ("A", "P", "R", "L")),
    ("coronal", 1, (2, 0), ("S", "I", "R", "L")),
    ("sagittal", 0, (2, 1), ("S", "I", "A", "P")),
)


def to_ras(volume: np.ndarray, axcodes: str, spacing: Sequence[float]) -> tuple[np.ndarray, tuple[float, ...]]:
    """``volume`` (3D, axes as ``axcodes`` say) and its spacing reordered to RAS (axis 0 towards the right).

    Raises:
        ValueError: ``axcodes`` are not three codes of L/R, A/P and S/I.
    """
    from nibabel.orientations import apply_orientation, axcodes2ornt, ornt_transform

    codes = tuple(str(axcodes).upper())
    axes = sorted("LRAPSI".find(c) // 2 if c and c in "LRAPSI" else -1 for c in codes)
    if axes != [0, 1, 2]:
        raise ValueError(f"axis codes must be one of L/R, A/P and S/I each (e.g. 'RAS'), got {axcodes!r}")
    ornt = ornt_transform(axcodes2ornt(codes), axcodes2ornt(("R", "A", "S")))
    out_spacing = [1.0, 1.0, 1.0]
    for src, (dst, _) in enumerate(ornt):
        out_spacing[int(dst)] = float(spacing[src])
    return apply_orientation(volume, ornt), tuple(out_spacing)


def radiological_slice(volume: np.ndarray, panel: str, index: int) -> np.ndarray:
    """One slice of a RAS volume as displayed: (rows, columns), flipped to the radiological convention."""
    for name, axis, _, _ in _PANELS:
        if name == panel:
            plane = np.take(volume, index, axis=axis)  # the remaining two axes in RAS order
            # Rows run from the plane's second axis' positive end (A or S) down; columns from the first axis'
            # positive end (R, or A in the sagittal plane) to the left of the image.
            return plane.T[::-1, ::-1]
    raise ValueError(f"panel must be one of axial, coronal, sagittal, got {panel!r}")


def focus(label: np.ndarray, pred: np.ndarray) -> tuple[tuple[int, int, int], int | None]:
    """The voxel the three slices cross at, and the class it was chosen by (None: the volume's centre).

    The smallest foreground class present in the reference (the prediction
    when the reference is empty); the voxel of that class nearest its
    centroid, so a slice never misses a ring-shaped or split structure.
    """
    for source in (label, pred):
        classes, counts = np.unique(source[source > 0], return_counts=True)
        if classes.size:
            cls = int(classes[int(np.argmin(counts))])
            voxels = np.argwhere(source == cls)
            centre = voxels.mean(axis=0)
            nearest = voxels[int(np.argmin(((voxels - centre) ** 2).sum(axis=1)))]
            return (int(nearest[0]), int(nearest[1]), int(nearest[2])), cls
    return (label.shape[0] // 2, label.shape[1] // 2, label.shape[2] // 2), None


def _window(image: np.ndarray) -> np.ndarray:
    lo, hi = (float(v) for v in np.percentile(image, [0.5, 99.5]))
    if hi <= lo:
        return np.zeros_like(image, dtype=np.float32)
    return np.clip((image - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def case_picture(
    image: np.ndarray,
    label: np.ndarray,
    pred: np.ndarray,
    class_names: Sequence[str],
    case_index: int,
    spacing: Sequence[float] | None = None,
    axcodes: str = "RAS",
) -> np.ndarray:
    """The three-panel picture of one case as an RGB array (H, W, 3, uint8).

    Args:
        image: the case's 3D image.
        label: the reference's class indices on the same grid (0: background, c: ``class_names[c - 1]``).
        pred: the prediction's class indices.
        class_names: foreground class names in label order.
        case_index: the case's position in the validation list (the only case detail shown).
        spacing: voxel spacing in mm along the stored axes (None: 1 mm each).
        axcodes: the stored axes' orientation codes (nibabel's, e.g. ``RAS``).
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    sp = tuple(float(s) for s in spacing) if spacing is not None else (1.0, 1.0, 1.0)
    img, ras_spacing = to_ras(np.asarray(image, dtype=np.float32), axcodes, sp)
    lab, _ = to_ras(np.asarray(label), axcodes, sp)
    prd, _ = to_ras(np.asarray(pred), axcodes, sp)
    img = _window(img)
    centre, cls = focus(lab, prd)
    colours = [COLOURS[i % len(COLOURS)] for i in range(len(class_names))]

    fig = Figure(figsize=(10.5, 4.9), dpi=100)
    where = "the centre of the " + (class_names[cls - 1] if cls else "volume (nothing segmented)")
    fig.text(0.5, 0.975, f"validation case {case_index}: slices through {where}", ha="center", va="top", fontsize=11)
    fig.text(0.5, 0.915, CONVENTION, ha="center", va="top", fontsize=7.5, color="0.25", wrap=True)
    for n, (panel, axis, (row_axis, col_axis), (top, bottom, left, right)) in enumerate(_PANELS):
        ax = fig.add_axes((0.01 + n * 0.33, 0.17, 0.31, 0.68))
        k = centre[axis]
        base = radiological_slice(img, panel, k)
        ax.imshow(
            base,
            cmap="gray",
            vmin=0,
            vmax=1,
            interpolation="nearest",
            aspect=ras_spacing[row_axis] / ras_spacing[col_axis],
        )
        ref = radiological_slice(lab, panel, k)
        out = radiological_slice(prd, panel, k)
        fill = np.zeros((*out.shape, 4), dtype=np.float32)
        for c, colour in enumerate(colours, start=1):
            fill[out == c] = (*colour, 0.45)
        ax.imshow(fill, interpolation="nearest", aspect=ras_spacing[row_axis] / ras_spacing[col_axis])
        for c, colour in enumerate(colours, start=1):
            mask = ref == c
            if mask.any() and not mask.all():
                ax.contour(mask.astype(np.float32), levels=[0.5], colors=[colour], linewidths=1.4)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{panel} (slice {k + 1}/{img.shape[axis]})", fontsize=9)
        style: dict[str, Any] = {"color": "yellow", "fontsize": 10, "fontweight": "bold", "transform": ax.transAxes}
        ax.text(0.5, 0.985, top, ha="center", va="top", **style)
        ax.text(0.5, 0.015, bottom, ha="center", va="bottom", **style)
        ax.text(0.015, 0.5, left, ha="left", va="center", **style)
        ax.text(0.985, 0.5, right, ha="right", va="center", **style)
    handles: list[Any] = [
        Patch(facecolor=(*colour, 0.45), edgecolor=colour, label=name)
        for name, colour in zip(class_names, colours, strict=True)
    ]
    handles += [
        Line2D([], [], color="0.2", linewidth=1.4, label="outline: reference"),
        Patch(facecolor=(0.2, 0.2, 0.2, 0.45), label="fill: model prediction"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), fontsize=9, frameon=False)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    buf.seek(0)
    from PIL import Image

    return np.asarray(Image.open(buf).convert("RGB"))
