"""Pictures and tables of predictions: an overlay montage per study and CSV files.

The montage shows up to 12 source slices (the acquisition plane, displayed
as DICOM viewers do: rows down, columns right) across the extent of the
predicted structures, each class in its own colour, with a legend naming
every class and its volume. Its title is the opaque study id only.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedimg.atomic import TMP_PREFIX
from fedimg.tasks.pictures import COLOURS

MAX_TILES = 12


def _window(image: np.ndarray, modality: str, ct_window: Sequence[float]) -> np.ndarray:
    if modality == "CT":
        lo, hi = float(ct_window[0]), float(ct_window[1])
    else:
        lo, hi = (float(v) for v in np.percentile(image, [0.5, 99.5]))
    if hi <= lo:
        return np.zeros_like(image, dtype=np.float32)
    return np.clip((image - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def pick_slices(labels: np.ndarray, limit: int = MAX_TILES) -> list[int]:
    """Slice indices k spread over the predicted structures' extent (the whole volume when nothing was found)."""
    n = labels.shape[2]
    present = np.flatnonzero(labels.reshape(-1, n).any(axis=0))
    lo, hi = (int(present[0]), int(present[-1])) if present.size else (0, n - 1)
    count = min(limit, hi - lo + 1)
    return sorted({int(round(v)) for v in np.linspace(lo, hi, count)})


def montage(
    image: np.ndarray, labels: np.ndarray, n_classes: int, ks: list[int], columns: int = 4, gap: int = 4
) -> np.ndarray:
    """The chosen slices side by side as one RGB array (float, 0..1), classes blended in their colours.

    Args:
        image: the windowed image, (i, j, k) in [0, 1].
        labels: class indices on the same grid.
        n_classes: classes 1..N.
        ks: slice indices to show.
    """
    tiles = []
    for k in ks:
        base = image[:, :, k].T  # (i=column, j=row) -> (row, column), as viewers show a slice
        rgb = np.repeat(base[..., None], 3, axis=-1)
        lab = labels[:, :, k].T
        for c in range(1, n_classes + 1):
            m = lab == c
            if m.any():
                rgb[m] = 0.45 * rgb[m] + 0.55 * np.asarray(COLOURS[(c - 1) % len(COLOURS)])
        tiles.append(rgb)
    h, w = tiles[0].shape[:2]
    cols = min(columns, len(tiles))
    rows = int(np.ceil(len(tiles) / cols))
    out = np.ones((rows * (h + gap) - gap, cols * (w + gap) - gap, 3), dtype=np.float32)
    for n, tile in enumerate(tiles):
        r, c = divmod(n, cols)
        out[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = tile
    return out


def overlay_montage(
    path: Path,
    image: np.ndarray,
    labels: np.ndarray,
    class_names: list[str],
    volumes_ml: list[float],
    title: str,
    modality: str,
    ct_window: Sequence[float],
) -> None:
    """Write the overlay montage PNG atomically: slices, their numbers, a legend with each class's volume."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    ks = pick_slices(labels)
    grid = montage(_window(image, modality, ct_window), labels, len(class_names), ks)
    height, width = grid.shape[:2]
    scale = max(1.0, 600.0 / max(height, width))  # small matrices are shown larger
    img_w, img_h = width * scale / 100, height * scale / 100  # inches at 100 dpi
    top, bottom = 0.35, 0.45  # title and legend bands
    fig = Figure(figsize=(img_w, img_h + top + bottom), dpi=100)
    total = img_h + top + bottom
    ax = fig.add_axes((0, bottom / total, 1, img_h / total))
    ax.imshow(grid, interpolation="nearest")
    ax.axis("off")
    h, w = labels.shape[1], labels.shape[0]
    cols = min(4, len(ks))
    for n, k in enumerate(ks):
        r, c = divmod(n, cols)
        ax.text(
            c * (w + 4) + 2,
            r * (h + 4) + 2,
            f"{k + 1}/{labels.shape[2]}",
            color="white",
            fontsize=7,
            va="top",
            ha="left",
        )
    handles = [
        Patch(color=COLOURS[i % len(COLOURS)], label=f"{name}: {volumes_ml[i]:.1f} ml")
        for i, name in enumerate(class_names)
    ]
    fig.legend(
        handles=handles,
        loc="lower center",
        ncol=min(4, len(handles)),
        fontsize=9,
        frameon=False,
        bbox_to_anchor=(0.5, 0.0),
    )
    fig.text(0.5, 1 - 0.05 / total, title, fontsize=10, ha="center", va="top")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": "fedimg"})
    _write_bytes(path, buf.getvalue())


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    """Write a CSV file atomically (floats with 6 significant digits)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for row in rows:
        w.writerow([f"{v:.6g}" if isinstance(v, float) else v for v in row])
    _write_bytes(path, buf.getvalue().encode("utf-8"))


__all__ = ["COLOURS", "overlay_montage", "pick_slices", "write_csv"]
