"""Siemens mosaics: one file that holds a whole volume as a grid of tiles.

Siemens MR scanners (EPI, DWI, fMRI) store every slice of one volume in a
single 2D image: (0008,0008) Image Type contains ``MOSAIC``, (0028,0010) Rows
and (0028,0011) Columns describe the whole grid, and the private CSA image
header (0029,1010) says how many tiles are real (``NumberOfImagesInMosaic``)
and which way the slices advance (``SliceNormalVector``).

(0020,0032) Image Position Patient of a mosaic is the position of the first
voxel of the *whole grid*, as if it were one huge slice; the first tile's
true position is shifted by half the difference between the grid and the
tile sizes along each in-plane axis. This is the correction dcm2niix and
nibabel apply; without it the volume is misplaced by tens of millimetres.

Only header values are used here; tiles are cut out of the decoded pixels by
:func:`split_tiles`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

CSA_IMAGE_HEADER_INFO = "(0029,1010) CSA Image Header Info"


class MosaicError(ValueError):
    """A mosaic whose CSA header is missing or inconsistent (PHI-free message)."""


@dataclass(frozen=True)
class MosaicInfo:
    """Header facts of one Siemens mosaic.

    Attributes:
        n_images: number of real tiles, CSA ``NumberOfImagesInMosaic``.
        tiles_per_side: the grid is tiles_per_side x tiles_per_side tiles.
        tile_rows: rows of one tile.
        tile_columns: columns of one tile.
        slice_normal: unit vector (LPS) along which tiles advance, CSA ``SliceNormalVector``.
    """

    n_images: int
    tiles_per_side: int
    tile_rows: int
    tile_columns: int
    slice_normal: tuple[float, float, float]


def is_mosaic_type(image_type: tuple[str, ...]) -> bool:
    """(0008,0008) Image Type marks a Siemens mosaic."""
    return "MOSAIC" in image_type


def read_mosaic_info(ds: Any, rows: int, columns: int) -> MosaicInfo:
    """Read the mosaic layout from the CSA image header of ``ds`` (no pixel decode).

    Args:
        ds: a pydicom dataset (pixels may be deferred).
        rows: (0028,0010) Rows of the whole grid.
        columns: (0028,0011) Columns of the whole grid.

    Raises:
        MosaicError: the CSA header is missing or unreadable, or its values do
            not fit the grid.
    """
    with warnings.catch_warnings():
        # Imported here, for mosaics only (nibabel.nicom costs every `fedimg convert` start-up otherwise).
        # It warns on import that its DICOM readers are experimental; only its CSA header parser is used,
        # which is stable and small.
        warnings.simplefilter("ignore")
        from nibabel.nicom import csareader
    try:
        csa = csareader.get_csa_header(ds, "image")
    except Exception as exc:  # noqa: BLE001 - the CSA parser raises many types on bad bytes
        raise MosaicError(f"{CSA_IMAGE_HEADER_INFO} unreadable ({type(exc).__name__})") from None
    if not csa:
        raise MosaicError(f"mosaic without {CSA_IMAGE_HEADER_INFO}")
    try:
        n = int(csareader.get_n_mosaic(csa))
        normal = csareader.get_slice_normal(csa)
    except Exception as exc:  # noqa: BLE001
        raise MosaicError(
            f"{CSA_IMAGE_HEADER_INFO} lacks NumberOfImagesInMosaic/SliceNormalVector ({type(exc).__name__})"
        ) from None
    if n < 1 or normal is None or len(normal) != 3:
        raise MosaicError(f"{CSA_IMAGE_HEADER_INFO} has no usable NumberOfImagesInMosaic/SliceNormalVector")
    side = math.ceil(math.sqrt(n))
    if rows % side or columns % side:
        raise MosaicError(f"mosaic grid {rows}x{columns} is not divisible into {side}x{side} tiles")
    vec = np.asarray([float(v) for v in normal], dtype=float)
    norm = float(np.linalg.norm(vec))
    if norm < 1e-6:
        raise MosaicError(f"{CSA_IMAGE_HEADER_INFO} SliceNormalVector is zero")
    vec = vec / norm
    return MosaicInfo(
        n_images=n,
        tiles_per_side=side,
        tile_rows=rows // side,
        tile_columns=columns // side,
        slice_normal=(float(vec[0]), float(vec[1]), float(vec[2])),
    )


def tile_positions(
    info: MosaicInfo,
    ipp: tuple[float, ...],
    iop: tuple[float, ...],
    pixel_spacing: tuple[float, float],
    rows: int,
    columns: int,
    slice_spacing: float,
) -> list[tuple[float, float, float]]:
    """(0020,0032)-equivalent LPS position of each tile, in storage order.

    Args:
        info: the mosaic layout.
        ipp: (0020,0032) Image Position Patient of the whole grid.
        iop: (0020,0037) Image Orientation Patient.
        pixel_spacing: (0028,0030) Pixel Spacing (row spacing, column spacing).
        rows: (0028,0010) Rows of the grid.
        columns: (0028,0011) Columns of the grid.
        slice_spacing: distance between tile centres along the slice normal:
            (0018,0088) Spacing Between Slices, the only per-file record of it
            (there is one position per file, not per tile).
    """
    row_cos = np.asarray(iop[:3], dtype=float)
    col_cos = np.asarray(iop[3:], dtype=float)
    # The grid's IPP is its top-left voxel; the first tile is centred within the grid.
    shift_rows = (rows - info.tile_rows) / 2.0
    shift_cols = (columns - info.tile_columns) / 2.0
    first = (
        np.asarray(ipp, dtype=float) + col_cos * pixel_spacing[0] * shift_rows + row_cos * pixel_spacing[1] * shift_cols
    )
    normal = np.asarray(info.slice_normal, dtype=float)
    centres = [first + k * slice_spacing * normal for k in range(info.n_images)]
    return [(float(c[0]), float(c[1]), float(c[2])) for c in centres]


def split_tiles(grid: np.ndarray, info: MosaicInfo) -> np.ndarray:
    """Cut a decoded mosaic (rows, columns) into (n_images, tile_rows, tile_columns).

    Tiles are stored row-major across the grid, in acquisition-storage order.
    """
    out = np.empty((info.n_images, info.tile_rows, info.tile_columns), dtype=grid.dtype)
    for k in range(info.n_images):
        r, c = divmod(k, info.tiles_per_side)
        out[k] = grid[
            r * info.tile_rows : (r + 1) * info.tile_rows, c * info.tile_columns : (c + 1) * info.tile_columns
        ]
    return out
