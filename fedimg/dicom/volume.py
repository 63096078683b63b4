"""Turn one validated series into a volume: voxels plus a RAS affine.

Three storages are handled, all ending as a list of 2D slices sorted along
the slice normal (see :mod:`fedimg.dicom.geometry`):

- classic single-frame files, one slice each;
- enhanced multi-frame objects, one slice per frame, geometry from
  (5200,9230) Per-frame Functional Groups Sequence
  (:mod:`fedimg.dicom.multiframe`);
- Siemens mosaics, one slice per tile (:mod:`fedimg.dicom.mosaic`).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np

from fedimg.dicom.geometry import SeriesGeometry, Slice, compute_geometry
from fedimg.dicom.index import DicomHeader, SeriesGroup
from fedimg.dicom.mosaic import split_tiles, tile_positions
from fedimg.dicom.pixels import (
    apply_modality_lut,
    check_codec,
    check_modality_lut,
    decode_stored,
    modality_volume,
    read_native,
    read_slice,
    rescale,
)
from fedimg.dicom.reasons import Reason, RefusedError

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


@dataclass
class Volume:
    """A converted series, kept in the stored integer type where the modality LUT allows.

    When every slice has the same (0028,1053) Rescale Slope and (0028,1052)
    Rescale Intercept and integer stored values, ``stored`` holds those
    integers and modality values are ``stored * slope + intercept``: half the
    memory of float32 for 16-bit data. Otherwise (slopes that differ between
    slices or frames, float pixel data) ``stored`` already holds float32
    modality values, and ``slope``/``intercept`` are 1 and 0.

    Attributes:
        stored: (i, j, k) = (columns, rows, slices) array in Fortran order
            (each slice one contiguous block, the NIfTI layout).
        geometry: the validated geometry; ``geometry.affine_ras`` maps voxels to RAS mm.
        modality: (0008,0060) Modality.
        slope: the (uniform) Rescale Slope of ``stored``.
        intercept: the (uniform) Rescale Intercept of ``stored``.
    """

    stored: np.ndarray
    geometry: SeriesGeometry
    modality: str
    slope: float = 1.0
    intercept: float = 0.0

    @property
    def affine(self) -> np.ndarray:
        """4x4 voxel-to-RAS affine."""
        return self.geometry.affine_ras

    @property
    def is_scaled(self) -> bool:
        """True when ``stored`` holds integers that the modality LUT (slope, intercept) turns into values."""
        return bool(np.issubdtype(self.stored.dtype, np.integer))

    @property
    def data(self) -> np.ndarray:
        """Modality values (Hounsfield units for CT) as float32 (i, j, k).

        For a scaled volume this builds a new whole-volume float32 array
        (twice the bytes of 16-bit stored values) on every access; code that
        can work on ``stored`` with ``slope``/``intercept`` should.
        """
        if not self.is_scaled:
            return self.stored
        return modality_volume(self.stored, self.slope, self.intercept)


def _mosaic_slices(h: DicomHeader, index: int) -> list[Slice]:
    info = h.mosaic
    if info is None or h.ipp is None or h.iop is None or h.pixel_spacing is None or not h.rows or not h.columns:
        raise RefusedError(Reason.NO_GEOMETRY, "mosaic without (0020,0032), (0020,0037) or (0028,0030)")
    spacing = h.spacing_between_slices
    if spacing is None or not math.isfinite(spacing) or spacing <= 0:
        # A mosaic file has one position for all its tiles: without the spacing the
        # slice positions are unknown, and guessing would be silently wrong.
        raise RefusedError(Reason.NO_GEOMETRY, "mosaic without a finite, positive (0018,0088) Spacing Between Slices")
    positions = tile_positions(info, h.ipp, h.iop, h.pixel_spacing, h.rows, h.columns, spacing)
    return [
        Slice(
            ipp=p,
            iop=h.iop,
            pixel_spacing=h.pixel_spacing,
            rows=info.tile_rows,
            columns=info.tile_columns,
            source=(index, k),
        )
        for k, p in enumerate(positions)
    ]


def _frame_slices(h: DicomHeader, index: int) -> list[Slice]:
    return [
        Slice(ipp=f.ipp, iop=f.iop, pixel_spacing=f.pixel_spacing, rows=h.rows, columns=h.columns, source=(index, k))
        for k, f in enumerate(h.frames)
    ]


def series_slices(group: SeriesGroup) -> list[DicomHeader | Slice]:
    """The 2D slices of a group, whatever their storage (headers only, no pixels).

    Raises:
        RefusedError: UNSUPPORTED_MULTIFRAME or NO_GEOMETRY when the layout of a
            multi-frame object or mosaic cannot be read; DUPLICATE_POSITION when
            one (0008,0018) SOP Instance UID appears twice.
    """
    for h in group.headers:
        if h.sop_class_uid == SEG_SOP_CLASS:
            raise RefusedError(
                Reason.UNSUPPORTED_MULTIFRAME,
                "DICOM SEG is a label object; it is read with its image by `fedimg preprocess`",
            )
        if h.layout_error:
            reason = Reason.NO_GEOMETRY if h.is_mosaic else Reason.UNSUPPORTED_MULTIFRAME
            raise RefusedError(reason, h.layout_error)
    uids = Counter(h.sop_instance_uid for h in group.headers if h.sop_instance_uid)
    repeated = sum(n - 1 for n in uids.values() if n > 1)
    if repeated:
        raise RefusedError(
            Reason.DUPLICATE_POSITION, f"{repeated} file(s) repeat a (0008,0018) SOP Instance UID of this series"
        )
    slices: list[DicomHeader | Slice] = []
    for idx, h in enumerate(group.headers):
        if h.mosaic is not None:
            slices.extend(_mosaic_slices(h, idx))
        elif h.frames:
            slices.extend(_frame_slices(h, idx))
        elif h.number_of_frames > 1:
            raise RefusedError(Reason.UNSUPPORTED_MULTIFRAME, "multi-frame object without per-frame geometry")
        else:
            slices.append(h)
    return slices


def series_geometry(
    group: SeriesGroup, *, min_slices: int = 3, spacing_tolerance: float = 1e-3, orientation_tolerance: float = 1e-4
) -> SeriesGeometry:
    """Validate a group's geometry from headers only (no pixels read).

    Raises:
        RefusedError: see :func:`series_slices` and
            :func:`fedimg.dicom.geometry.compute_geometry`; CODEC_MISSING when a
            file's transfer syntax has no installed decoder (known from the
            header, so refused before any pixel is read).
    """
    slices = series_slices(group)
    geo = compute_geometry(
        slices, min_slices=min_slices, spacing_tolerance=spacing_tolerance, orientation_tolerance=orientation_tolerance
    )
    for ts in sorted({h.transfer_syntax for h in group.headers}):
        check_codec(ts)
    return geo


def _as_modality_values(buf: np.ndarray, scales: list[tuple[float, float]]) -> np.ndarray:
    """A float32 (n, rows, cols) buffer holding the modality values of the ``len(scales)`` slices decoded so far."""
    out = np.empty(buf.shape, dtype=np.float32)
    for k, (slope, intercept) in enumerate(scales):
        out[k] = apply_modality_lut(buf[k], slope, intercept)
    return out


def _decode_file(h: DicomHeader) -> tuple[np.ndarray, tuple[float, float]]:
    """Masked stored values and modality LUT of one file.

    Uncompressed little-endian pixels are read by the offset the header pass noted (the file is not
    parsed a second time); everything else, and a file changed since it was indexed, is decoded by pydicom.
    """
    if h.native is not None:
        stored = read_native(h.path, h.native)
        if stored is not None:
            return stored, (h.native.slope, h.native.intercept)
    ds = read_slice(str(h.path))
    stored = decode_stored(ds)
    return stored, rescale(ds)


def load_volume(group: SeriesGroup, geometry: SeriesGeometry) -> Volume:
    """Decode the pixels of a group whose geometry was validated.

    Every file is decoded once, its slices copied into one (slices, rows,
    columns) buffer in the stored integer type, so the peak is the stored
    pixel bytes plus one file. The modality LUT is read per slice (per frame
    for enhanced objects, whose (0028,9145) values may differ by frame): when
    it is the same for every slice, the volume keeps the integers and the one
    LUT (see :class:`Volume`); when it differs, or the pixels are floats,
    the volume holds float32 modality values, each slice with its own LUT.

    Raises:
        RefusedError: if any slice cannot be decoded (the whole series is refused:
            a volume with a missing slice would be silently wrong).
    """
    cols, rows, n = geometry.shape
    sources = geometry.sources or tuple((i, 0) for i in geometry.order)
    # (k, row, column) in C order: slice k is one contiguous block, and the (i, j, k) view below is the
    # Fortran-ordered array NIfTI writers stream without a copy.
    buf: np.ndarray | None = None
    scales: list[tuple[float, float]] = []
    cached_index: int | None = None
    stored: np.ndarray | None = None
    lut = (1.0, 0.0)
    for k, (hi, fi) in enumerate(sources):
        h = group.headers[hi]
        if hi != cached_index:
            stored, lut = _decode_file(h)
            if h.mosaic is not None:
                if stored.ndim != 2 or stored.shape != (h.rows, h.columns):
                    raise RefusedError(
                        Reason.MIXED_SERIES,
                        f"mosaic decodes to {list(stored.shape)}, header says {[h.rows, h.columns]}",
                    )
                stored = split_tiles(stored, h.mosaic)
            elif stored.ndim == 2:
                stored = stored[None]
            cached_index = hi
        if stored is None or fi >= stored.shape[0]:
            raise RefusedError(Reason.MIXED_SERIES, f"slice {k} refers to a frame the pixel data does not hold")
        slope, intercept = (h.frames[fi].slope, h.frames[fi].intercept) if h.frames else lut
        check_modality_lut(slope, intercept)
        sl = stored[fi]
        if sl.shape != (rows, cols):
            raise RefusedError(Reason.MIXED_SERIES, f"slice {k} decodes to {sl.shape}, header says {(rows, cols)}")
        if buf is None:
            buf = np.empty((n, rows, cols), dtype=sl.dtype if np.issubdtype(sl.dtype, np.integer) else np.float32)
        if buf.dtype != np.float32:
            same_lut = not scales or (slope, intercept) == scales[0]
            if not (same_lut and np.can_cast(sl.dtype, buf.dtype)):
                # Another LUT (or type) than the slices before: no single scaling describes the series.
                buf = _as_modality_values(buf, scales)
        buf[k] = apply_modality_lut(sl, slope, intercept) if buf.dtype == np.float32 else sl
        scales.append((slope, intercept))
    if buf is None:
        raise RefusedError(Reason.MIXED_SERIES, "the series has no slice")
    data = buf.transpose(2, 1, 0)  # pixels are (rows, columns); volume axes are (i=column, j=row, k)
    if data.dtype == np.float32:
        return Volume(stored=data, geometry=geometry, modality=group.modality)
    slope, intercept = scales[0]
    return Volume(stored=data, geometry=geometry, modality=group.modality, slope=slope, intercept=intercept)
