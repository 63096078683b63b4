"""Single 2D images: projection radiographs (DX, CR, MG) and single slices.

A 2D spec (``spatial_dims: 2``) takes one image per study: a series holding
exactly one single-frame instance. There is no slice stack, so none of the
stack checks of :mod:`fedimg.dicom.geometry` apply; what is checked, from
the header alone, is:

- one instance and one frame: several instances in the series, or
  (0028,0008) Number of Frames above 1, is ``NOT_SINGLE_IMAGE``;
- (0028,0010) Rows and (0028,0011) Columns are positive;
- the pixel size: (0028,0030) Pixel Spacing, else (0018,1164) Imager Pixel
  Spacing (the detector plane: radiographs often carry only this one);
  both finite and positive, else ``NO_GEOMETRY``;
- an installed decoder for the transfer syntax (``CODEC_MISSING``).

Pixels are decoded with the modality LUT, and (0028,0004) MONOCHROME1 is
inverted so that higher values are brighter for every image
(:func:`fedimg.dicom.pixels.invert_monochrome1`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypeGuard

import numpy as np

from fedimg.dicom.index import SeriesGroup
from fedimg.dicom.pixels import apply_modality_lut, check_codec, decode_stored, invert_monochrome1, read_slice, rescale
from fedimg.dicom.reasons import Reason, RefusedError

_GREYSCALE = ("MONOCHROME1", "MONOCHROME2", "")


@dataclass(frozen=True)
class PlanarGeometry:
    """Geometry of a single 2D image.

    Attributes:
        rows: (0028,0010) Rows.
        columns: (0028,0011) Columns.
        row_spacing: mm between rows (first value of the spacing attribute).
        column_spacing: mm between columns (second value).
        spacing_source: the tag the spacing came from.
        iop: (0020,0037) Image Orientation Patient, when present (a CT/MR slice).
        ipp: (0020,0032) Image Position Patient, when present.
    """

    rows: int
    columns: int
    row_spacing: float
    column_spacing: float
    spacing_source: str
    iop: tuple[float, ...] | None = None
    ipp: tuple[float, ...] | None = None


def _valid(spacing: tuple[float, float] | None) -> TypeGuard[tuple[float, float]]:
    return spacing is not None and all(math.isfinite(v) and v > 0 for v in spacing)


def planar_geometry(group: SeriesGroup, instances_in_series: int | None = None) -> PlanarGeometry:
    """Validate a single-image series from its header (no pixels read).

    Args:
        group: the series group.
        instances_in_series: files of this (0020,000E) Series Instance UID in
            the study, over every group it was split into (default: the
            group's own count).

    Raises:
        RefusedError: NOT_SINGLE_IMAGE, NO_GEOMETRY, UNSUPPORTED_PIXELS or
            CODEC_MISSING.
    """
    n = max(len(group.headers), instances_in_series or 0)
    if n > 1:
        raise RefusedError(
            Reason.NOT_SINGLE_IMAGE,
            f"the series holds {n} instances; a 2D spec takes a series of exactly one "
            "single-frame image (export each view as its own series, or use a 3D spec)",
        )
    h = group.first
    if h.number_of_frames > 1 or h.mosaic is not None or len(h.frames) > 1:
        frames = h.number_of_frames if h.number_of_frames > 1 else max(len(h.frames), 2)
        raise RefusedError(
            Reason.NOT_SINGLE_IMAGE,
            f"(0028,0008) Number of Frames is {frames} (or a mosaic); a 2D spec takes one single-frame image",
        )
    if not h.rows or not h.columns or h.rows <= 0 or h.columns <= 0:
        raise RefusedError(Reason.NO_GEOMETRY, "(0028,0010) Rows / (0028,0011) Columns missing or not positive")
    if h.photometric_interpretation not in _GREYSCALE:
        raise RefusedError(
            Reason.UNSUPPORTED_PIXELS,
            f"(0028,0004) Photometric Interpretation {h.photometric_interpretation}; "
            "expected MONOCHROME1 or MONOCHROME2",
        )
    if _valid(h.pixel_spacing):
        spacing, source = h.pixel_spacing, "(0028,0030) Pixel Spacing"
    elif _valid(h.imager_pixel_spacing):
        spacing, source = h.imager_pixel_spacing, "(0018,1164) Imager Pixel Spacing"
    else:
        raise RefusedError(
            Reason.NO_GEOMETRY,
            "no finite, positive (0028,0030) Pixel Spacing or (0018,1164) Imager Pixel Spacing; "
            "re-export with the pixel size",
        )
    check_codec(h.transfer_syntax)
    iop = h.iop if h.iop is not None and all(math.isfinite(v) for v in h.iop) else None
    ipp = h.ipp if h.ipp is not None and all(math.isfinite(v) for v in h.ipp) else None
    return PlanarGeometry(
        rows=int(h.rows),
        columns=int(h.columns),
        row_spacing=float(spacing[0]),
        column_spacing=float(spacing[1]),
        spacing_source=source,
        iop=iop if ipp is not None else None,
        ipp=ipp if iop is not None else None,
    )


def load_planar(group: SeriesGroup, geometry: PlanarGeometry) -> np.ndarray:
    """Decode the single image: float32 ``(rows, columns)``, modality LUT applied, higher = brighter.

    Raises:
        RefusedError: NOT_SINGLE_IMAGE when the pixel data holds several
            frames; MIXED_SERIES when its size disagrees with the header; see
            :func:`fedimg.dicom.pixels.decode_stored` for the rest.
    """
    ds = read_slice(str(group.first.path))
    stored = decode_stored(ds)
    if stored.ndim != 2:
        raise RefusedError(
            Reason.NOT_SINGLE_IMAGE,
            f"pixel data decodes to {stored.ndim}D shape {list(stored.shape)}; a 2D spec takes one single-frame image",
        )
    if stored.shape != (geometry.rows, geometry.columns):
        raise RefusedError(
            Reason.MIXED_SERIES,
            f"pixel data decodes to {list(stored.shape)}, header says {[geometry.rows, geometry.columns]}",
        )
    return apply_modality_lut(invert_monochrome1(stored, ds), *rescale(ds))
