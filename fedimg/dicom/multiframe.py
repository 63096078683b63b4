"""Enhanced multi-frame objects: geometry and modality LUT per frame.

An enhanced CT/MR object keeps every slice as a frame of one file. Per-frame
values live in (5200,9230) Per-frame Functional Groups Sequence; values that
are the same for all frames may instead be in (5200,9229) Shared Functional
Groups Sequence. The macros used here:

- (0020,9113) Plane Position Sequence -> (0020,0032) Image Position Patient
- (0020,9116) Plane Orientation Sequence -> (0020,0037) Image Orientation Patient
- (0028,9110) Pixel Measures Sequence -> (0028,0030) Pixel Spacing
- (0028,9145) Pixel Value Transformation Sequence -> (0028,1053) Rescale Slope,
  (0028,1052) Rescale Intercept

Only headers are read here; pixels are decoded later, once per file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


class MultiFrameError(ValueError):
    """A multi-frame object whose per-frame geometry cannot be read (PHI-free message)."""


@dataclass(frozen=True)
class FrameInfo:
    """Geometry and modality LUT of one frame.

    Attributes:
        ipp: (0020,0032) Image Position Patient of the frame (LPS mm).
        iop: (0020,0037) Image Orientation Patient.
        pixel_spacing: (0028,0030) Pixel Spacing (row spacing, column spacing).
        slope: (0028,1053) Rescale Slope.
        intercept: (0028,1052) Rescale Intercept.
    """

    ipp: tuple[float, ...] | None
    iop: tuple[float, ...] | None
    pixel_spacing: tuple[float, float] | None
    slope: float = 1.0
    intercept: float = 0.0


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    try:
        items = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return items if len(items) == n else None


def _number(value: Any, default: Any) -> float:
    """A modality LUT value as float: ``default`` when absent or empty, NaN when unparsable.

    NaN (never an exception here, at indexing time) makes
    :func:`fedimg.dicom.pixels.apply_modality_lut` refuse the series with
    PIXEL_DECODE_ERROR when its pixels are decoded.
    """
    if value in (None, ""):
        value = default
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _item(group: Any, keyword: str) -> Any:
    """First item of a functional-group macro sequence, or None."""
    if group is None:
        return None
    seq = group.get(keyword)
    if not seq:
        return None
    return seq[0]


def _lookup(per_frame: Any, shared: Any, macro: str, attr: str) -> Any:
    """A per-frame value, falling back to the shared functional groups."""
    for group in (per_frame, shared):
        item = _item(group, macro)
        if item is not None and attr in item:
            return item.get(attr)
    return None


def read_frames(ds: Any) -> tuple[FrameInfo, ...]:
    """Per-frame geometry of an enhanced multi-frame dataset (no pixel decode).

    Args:
        ds: a pydicom dataset with (0028,0008) Number of Frames.

    Raises:
        MultiFrameError: (5200,9230) Per-frame Functional Groups Sequence is
            absent or does not have one item per frame.
    """
    try:
        n = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        raise MultiFrameError("(0028,0008) Number of Frames is not an integer") from None
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is None:
        raise MultiFrameError("multi-frame object without (5200,9230) Per-frame Functional Groups Sequence")
    if len(per_frame) != n:
        raise MultiFrameError(f"(5200,9230) holds {len(per_frame)} items for {n} frames")
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    shared = shared_seq[0] if shared_seq else None
    # Top-level rescale is allowed for legacy-converted objects; functional groups win.
    top_slope = ds.get("RescaleSlope", 1)
    top_inter = ds.get("RescaleIntercept", 0)
    frames = []
    for item in per_frame:
        slope = _lookup(item, shared, "PixelValueTransformationSequence", "RescaleSlope")
        inter = _lookup(item, shared, "PixelValueTransformationSequence", "RescaleIntercept")
        spacing = _floats(_lookup(item, shared, "PixelMeasuresSequence", "PixelSpacing"), 2)
        frames.append(
            FrameInfo(
                ipp=_floats(_lookup(item, shared, "PlanePositionSequence", "ImagePositionPatient"), 3),
                iop=_floats(_lookup(item, shared, "PlaneOrientationSequence", "ImageOrientationPatient"), 6),
                pixel_spacing=(spacing[0], spacing[1]) if spacing else None,
                slope=_number(slope, _number(top_slope, 1.0) or 1.0),
                intercept=_number(inter, _number(top_inter, 0.0)),
            )
        )
    return tuple(frames)
