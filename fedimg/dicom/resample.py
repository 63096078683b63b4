"""Explicit correction of irregular stacks: gantry tilt, uneven spacing, missing slices.

A spec may ask (``geometry.irregular: resample``) for such a stack to be
resampled onto a regular, orthogonal grid instead of refused. The grid keeps
the slices' in-plane axes and pixel spacing; slices are placed along the
slice normal at the median spacing between the first and last slice. Each
target slice is interpolated linearly between the two source slices around
it, each sampled bilinearly at the target's in-plane position (which removes
the shear of a tilted gantry). The correction is recorded in the manifest,
never applied silently. Labels use nearest-neighbour sampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedimg.dicom.geometry import LPS_TO_RAS
from fedimg.dicom.index import SeriesGroup
from fedimg.dicom.pixels import decode_slice, read_slice
from fedimg.dicom.reasons import Reason, RefusedError

# Refusals that an explicit resampling can correct.
RESAMPLABLE = frozenset({Reason.GANTRY_TILT, Reason.NONUNIFORM_SPACING, Reason.SLICE_GAP})

# A correction that would interpolate across more than this many median spacings is refused:
# filling a large hole invents anatomy.
MAX_GAP_SPACINGS = 2.5


@dataclass(frozen=True)
class Regularized:
    """A resampled stack.

    Attributes:
        data: (i, j, k) array on the regular grid.
        affine_ras: 4x4 voxel-to-RAS affine of the regular grid.
        correction: PHI-free description for the manifest.
    """

    data: np.ndarray
    affine_ras: np.ndarray
    correction: str


def regularize(
    data: np.ndarray,
    positions_lps: np.ndarray,
    row_cos: np.ndarray,
    col_cos: np.ndarray,
    col_spacing: float,
    row_spacing: float,
    order: int = 1,
) -> Regularized:
    """Resample slices at arbitrary positions onto a regular orthogonal grid.

    Args:
        data: (i, j, n) slices; slice ``k`` lies at ``positions_lps[k]`` (its
            (0020,0032) Image Position Patient).
        positions_lps: (n, 3) slice origins in LPS mm.
        row_cos, col_cos: the (0020,0037) direction cosines shared by all slices.
        col_spacing, row_spacing: (0028,0030) spacing across columns (i) and rows (j).
        order: 1 for images (linear), 0 for labels (nearest).

    Raises:
        ValueError: fewer than two slices, or a hole wider than
            ``MAX_GAP_SPACINGS`` median spacings.
    """
    n = data.shape[2]
    if n < 2:
        raise ValueError("at least two slices are needed to resample a stack")
    normal = np.cross(row_cos, col_cos)
    dist = positions_lps @ normal
    order_idx = np.argsort(dist, kind="stable")
    dist = dist[order_idx]
    pos = positions_lps[order_idx]
    vol = data[:, :, order_idx]
    steps = np.diff(dist)
    step = float(np.median(steps))
    if step <= 0:
        raise ValueError("slices share one position; nothing to resample")
    if steps.max() > MAX_GAP_SPACINGS * step:
        raise ValueError(
            f"a hole of {steps.max():.3g} mm is wider than {MAX_GAP_SPACINGS} slice spacings "
            f"({step:.3g} mm); refusing to invent slices"
        )
    n_out = int(round((dist[-1] - dist[0]) / step)) + 1
    origin = pos[0]
    ni, nj = vol.shape[0], vol.shape[1]
    ii, jj = np.meshgrid(np.arange(ni, dtype=np.float64), np.arange(nj, dtype=np.float64), indexing="ij")
    fill = float(vol.min())
    out = np.empty((ni, nj, n_out), dtype=np.float32 if order else vol.dtype)

    from scipy import ndimage  # here, not at import: `fedimg convert` loads this module but rarely resamples

    def sample(k: int, target: np.ndarray) -> np.ndarray:
        # In-plane offset of the target slice origin relative to source slice k, in voxels.
        d = target - pos[k]
        du = float(d @ row_cos) / col_spacing
        dv = float(d @ col_cos) / row_spacing
        if abs(du) < 1e-9 and abs(dv) < 1e-9:
            return vol[:, :, k].astype(np.float64)
        return ndimage.map_coordinates(
            vol[:, :, k].astype(np.float64), [ii + du, jj + dv], order=order, mode="constant", cval=fill
        )

    for k in range(n_out):
        d_t = dist[0] + k * step
        target = origin + (d_t - dist[0]) * normal
        b = int(np.searchsorted(dist, d_t - 1e-6))
        b = min(max(b, 1), n - 1)
        a = b - 1
        w = (d_t - dist[a]) / (dist[b] - dist[a])
        w = min(max(w, 0.0), 1.0)
        if order == 0:
            out[:, :, k] = sample(a if w < 0.5 else b, target)
        else:
            out[:, :, k] = (1 - w) * sample(a, target) + w * sample(b, target)

    lps = np.eye(4)
    lps[:3, 0] = row_cos * col_spacing
    lps[:3, 1] = col_cos * row_spacing
    lps[:3, 2] = normal * step
    lps[:3, 3] = origin
    shear = pos[-1] - pos[0]
    along = float(shear @ normal)
    tilt = float(np.degrees(np.arctan2(np.linalg.norm(shear - along * normal), abs(along))))
    parts = [f"resampled {n} slices onto {n_out} at {step:.4g} mm along the normal"]
    if tilt > 1e-3:
        parts.append(f"gantry tilt {tilt:.3g} degrees removed")
    if steps.max() - steps.min() > 1e-3 * step:
        parts.append(f"spacing {steps.min():.4g}-{steps.max():.4g} mm made uniform")
    return Regularized(data=out, affine_ras=LPS_TO_RAS @ lps, correction="; ".join(parts))


def load_regularized(group: SeriesGroup, reason: Reason, order: int = 1) -> Regularized:
    """Decode a classic single-frame series and resample it onto a regular grid.

    Args:
        group: the series (one file per slice).
        reason: the refusal being corrected (recorded in the correction text).
        order: 1 for images, 0 for label series.

    Raises:
        RefusedError: the original ``reason`` when the stack cannot be corrected
            (multi-frame or mosaic files, missing geometry, a hole too wide).
    """
    hs = group.headers
    first_spacing = hs[0].pixel_spacing
    if (
        any(h.is_enhanced for h in hs)
        or any(h.iop is None or h.ipp is None or h.pixel_spacing is None for h in hs)
        or first_spacing is None
    ):
        raise RefusedError(reason, "cannot resample: only complete single-frame series are corrected")
    iop = np.array(hs[0].iop, dtype=float)
    row_cos, col_cos = iop[:3] / np.linalg.norm(iop[:3]), iop[3:] / np.linalg.norm(iop[3:])
    row_spacing, col_spacing = float(first_spacing[0]), float(first_spacing[1])
    positions = np.array([h.ipp for h in hs], dtype=float)
    if not np.all(np.isfinite(positions)) or min(row_spacing, col_spacing) <= 0:
        raise RefusedError(reason, "cannot resample: invalid positions or spacing")
    slices = [decode_slice(read_slice(str(h.path))).T for h in hs]
    if len({s.shape for s in slices}) != 1:
        raise RefusedError(Reason.MIXED_SERIES, "slices differ in matrix size")
    try:
        reg = regularize(np.stack(slices, axis=2), positions, row_cos, col_cos, col_spacing, row_spacing, order)
    except ValueError as exc:
        raise RefusedError(reason, f"cannot resample: {exc}") from None
    return Regularized(reg.data, reg.affine_ras, f"{reason.value} corrected: {reg.correction}")
