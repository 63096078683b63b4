"""Slice ordering, spacing checks and the voxel-to-world affine of a series.

Rules (see docs/dicom.md): slices are sorted by (0020,0032) Image Position
Patient projected on the slice normal (the cross product of the two
(0020,0037) Image Orientation Patient vectors), never by (0020,0013) Instance
Number. Slice spacing comes from consecutive positions, never from
(0018,0050) Slice Thickness or (0018,0088) Spacing Between Slices. Gaps,
duplicates, uneven spacing and gantry tilt are refused with a reason code
rather than producing a silently wrong volume.

Voxel axes are (i, j, k) = (column, row, slice): i runs along the first IOP
vector (the row direction) with spacing (0028,0030)[1], j along the second
with spacing (0028,0030)[0], k along the sorted slices. DICOM patient space
is LPS; NIfTI world space is RAS, so x and y are negated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedimg.dicom.reasons import Reason, RefusedError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class SeriesGeometry:
    """Geometry of a validated series.

    Attributes:
        order: indices into the input slices (headers or frames), sorted along
            the slice normal.
        affine_ras: 4x4 voxel (i, j, k) to RAS mm.
        shape: (columns, rows, slices).
        spacing: (column spacing, row spacing, slice spacing) in mm.
        sources: per output slice k, (header index, frame index) in the series
            group: frame 0 of a single-frame file, a frame of an enhanced
            object, or a tile of a mosaic.
    """

    order: tuple[int, ...]
    affine_ras: np.ndarray
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    sources: tuple[tuple[int, int], ...] = ()

    @property
    def affine_lps(self) -> np.ndarray:
        """4x4 voxel to DICOM patient (LPS) mm."""
        return LPS_TO_RAS @ self.affine_ras


@dataclass(frozen=True)
class Slice:
    """One 2D slice of a series whatever its storage: a file, a frame or a mosaic tile.

    Attributes:
        ipp: (0020,0032) Image Position Patient (LPS mm) of its first voxel.
        iop: (0020,0037) Image Orientation Patient.
        pixel_spacing: (0028,0030) Pixel Spacing (row spacing, column spacing).
        rows: rows of the slice.
        columns: columns of the slice.
        source: (header index, frame index) in the series group.
    """

    ipp: tuple[float, ...] | None
    iop: tuple[float, ...] | None
    pixel_spacing: tuple[float, float] | None
    rows: int | None
    columns: int | None
    source: tuple[int, int]


def _unit(v: np.ndarray) -> np.ndarray:
    n = float(np.linalg.norm(v))
    if n < 1e-6:
        raise RefusedError(Reason.NO_GEOMETRY, "(0020,0037) Image Orientation Patient has a zero vector")
    return v / n


def compute_geometry(
    headers: Sequence[Any],
    *,
    min_slices: int = 3,
    spacing_tolerance: float = 1e-3,
    orientation_tolerance: float = 1e-4,
) -> SeriesGeometry:
    """Sort the slices of a series and build its affine.

    Args:
        headers: one item per slice with ``ipp``, ``iop``, ``pixel_spacing``,
            ``rows`` and ``columns``: :class:`~fedimg.dicom.index.DicomHeader`
            of single-frame files, or :class:`Slice` (frames, mosaic tiles),
            whose ``source`` is kept in :attr:`SeriesGeometry.sources`.
        min_slices: fewer slices than this is ``TOO_FEW_SLICES``.
        spacing_tolerance: relative tolerance on slice spacing uniformity and
            on the angle (radians) between the slice step and the normal.
        orientation_tolerance: absolute tolerance on IOP components between slices.

    Raises:
        RefusedError: with NO_GEOMETRY (missing, non-finite or non-positive
            (0020,0037), (0020,0032), (0028,0030), (0028,0010), (0028,0011)),
            TOO_FEW_SLICES, MIXED_SERIES, DUPLICATE_POSITION, SLICE_GAP,
            NONUNIFORM_SPACING or GANTRY_TILT.
    """
    missing = [
        name
        for name, ok in (
            ("(0020,0037) Image Orientation Patient", all(h.iop is not None for h in headers)),
            ("(0020,0032) Image Position Patient", all(h.ipp is not None for h in headers)),
            ("(0028,0030) Pixel Spacing", all(h.pixel_spacing is not None for h in headers)),
            ("(0028,0010) Rows / (0028,0011) Columns", all(h.rows and h.columns for h in headers)),
        )
        if not ok
    ]
    if missing:
        raise RefusedError(Reason.NO_GEOMETRY, "missing " + ", ".join(missing))
    n = len(headers)
    if n < min_slices:
        raise RefusedError(Reason.TOO_FEW_SLICES, f"{n} slice(s), at least {min_slices} needed")

    iops = np.array([h.iop for h in headers], dtype=float)
    ipps = np.array([h.ipp for h in headers], dtype=float)
    spacings = np.array([h.pixel_spacing for h in headers], dtype=float)
    # NaN/inf compare False with every tolerance below, so they would slip through
    # and give a singular or NaN affine: every geometry value must be finite.
    not_finite = [
        name
        for name, values in (
            ("(0020,0037) Image Orientation Patient", iops),
            ("(0020,0032) Image Position Patient", ipps),
            ("(0028,0030) Pixel Spacing", spacings),
        )
        if not np.isfinite(values).all()
    ]
    if not_finite:
        raise RefusedError(Reason.NO_GEOMETRY, "not a finite number in " + ", ".join(not_finite))
    if (spacings <= 0).any():
        raise RefusedError(Reason.NO_GEOMETRY, "(0028,0030) Pixel Spacing is not positive")
    if np.abs(iops - iops[0]).max() > max(orientation_tolerance, 1e-6) * 10:
        raise RefusedError(Reason.MIXED_SERIES, "slices disagree on (0020,0037) Image Orientation Patient")
    if np.abs(spacings - spacings[0]).max() > 1e-4 * spacings[0].max():
        raise RefusedError(Reason.MIXED_SERIES, "slices disagree on (0028,0030) Pixel Spacing")
    if len({(h.rows, h.columns) for h in headers}) != 1:
        raise RefusedError(Reason.MIXED_SERIES, "slices disagree on matrix size")

    row_cos = _unit(iops[0, :3])
    col_cos = _unit(iops[0, 3:])
    if abs(float(row_cos @ col_cos)) > 1e-3:
        raise RefusedError(Reason.NO_GEOMETRY, "(0020,0037) orientation vectors are not orthogonal")
    normal = np.cross(row_cos, col_cos)

    dist = ipps @ normal
    order = np.argsort(dist, kind="stable")
    dist = dist[order]
    ipps = ipps[order]
    steps = np.diff(dist)
    median = float(np.median(steps))
    if median <= 1e-6 or steps.min() < 0.01 * median:
        dup = int((steps < max(0.01 * median, 1e-4)).sum())
        raise RefusedError(Reason.DUPLICATE_POSITION, f"{dup} pair(s) of slices share a position along the normal")
    rel_dev = np.abs(steps - median) / median
    if rel_dev.max() > spacing_tolerance:
        ratios = steps / median
        if np.all(np.abs(ratios - np.round(ratios)) < 10 * spacing_tolerance) and ratios.max() >= 1.5:
            missing_n = int(np.round(ratios).sum() - len(ratios))
            raise RefusedError(Reason.SLICE_GAP, f"{missing_n} slice(s) missing at spacing {median:.4g} mm")
        raise RefusedError(
            Reason.NONUNIFORM_SPACING,
            f"slice spacing varies from {steps.min():.4g} to {steps.max():.4g} mm "
            f"(tolerance {spacing_tolerance:g} relative)",
        )

    step = (ipps[-1] - ipps[0]) / (n - 1)
    cos_angle = float(abs(step @ normal) / np.linalg.norm(step))
    angle = float(np.arccos(min(1.0, cos_angle)))
    if angle > spacing_tolerance:
        raise RefusedError(
            Reason.GANTRY_TILT, f"slice positions deviate {np.degrees(angle):.3g} degrees from the normal"
        )
    # Positions must lie on one line: a residual means mixed stacks or in-plane shifts.
    expected = ipps[0] + np.outer(np.arange(n), step)
    resid = float(np.abs(ipps - expected).max())
    if resid > max(spacing_tolerance * median, 1e-3):
        raise RefusedError(Reason.NONUNIFORM_SPACING, f"slice positions deviate {resid:.3g} mm from a straight stack")

    row_spacing, col_spacing = float(spacings[0][0]), float(spacings[0][1])
    lps = np.eye(4)
    lps[:3, 0] = row_cos * col_spacing  # i: along a row, i.e. across columns
    lps[:3, 1] = col_cos * row_spacing  # j: down a column, i.e. across rows
    lps[:3, 2] = step
    lps[:3, 3] = ipps[0]
    first = headers[int(order[0])]
    sources = tuple(getattr(headers[int(i)], "source", (int(i), 0)) for i in order)
    return SeriesGeometry(
        order=tuple(int(i) for i in order),
        affine_ras=LPS_TO_RAS @ lps,
        shape=(int(first.columns or 0), int(first.rows or 0), n),
        spacing=(col_spacing, row_spacing, float(np.linalg.norm(step))),
        sources=sources,
    )


def same_grid(a: SeriesGeometry, b: SeriesGeometry, tolerance_mm: float = 1e-2) -> tuple[bool, str]:
    """Whether two series share a voxel grid; returns (ok, PHI-free explanation)."""
    if a.shape != b.shape:
        return False, f"shape {list(b.shape)} vs image {list(a.shape)}"
    corners = np.array([[0, 0, 0, 1], [a.shape[0] - 1, a.shape[1] - 1, a.shape[2] - 1, 1]], dtype=float).T
    dev = float(np.abs(a.affine_ras @ corners - b.affine_ras @ corners).max())
    if dev > tolerance_mm:
        return False, f"voxel grids differ by up to {dev:.3g} mm (tolerance {tolerance_mm:g} mm)"
    return True, ""
