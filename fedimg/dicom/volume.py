"""Turn one validated series into a volume: voxels plus a RAS affine."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedimg.dicom.geometry import SeriesGeometry, compute_geometry
from fedimg.dicom.index import SeriesGroup
from fedimg.dicom.pixels import decode_slice, read_slice
from fedimg.dicom.reasons import Reason, RefusedError


@dataclass
class Volume:
    """A converted series.

    Attributes:
        data: float32 array (i, j, k) = (columns, rows, slices), modality values
            (Hounsfield units for CT).
        geometry: the validated geometry; ``geometry.affine_ras`` maps voxels to RAS mm.
        modality: (0008,0060) Modality.
    """

    data: np.ndarray
    geometry: SeriesGeometry
    modality: str

    @property
    def affine(self) -> np.ndarray:
        """4x4 voxel-to-RAS affine."""
        return self.geometry.affine_ras


def series_geometry(group: SeriesGroup, *, min_slices: int = 3, spacing_tolerance: float = 1e-3,
                    orientation_tolerance: float = 1e-4) -> SeriesGeometry:
    """Validate a group's geometry from headers only (no pixels read)."""
    if any(h.is_enhanced for h in group.headers):
        raise RefusedError(Reason.UNSUPPORTED_MULTIFRAME,
                           "enhanced / multi-frame objects are not converted yet")
    return compute_geometry(group.headers, min_slices=min_slices, spacing_tolerance=spacing_tolerance,
                            orientation_tolerance=orientation_tolerance)


def load_volume(group: SeriesGroup, geometry: SeriesGeometry) -> Volume:
    """Decode the pixels of a group whose geometry was validated.

    Raises:
        RefusedError: if any slice cannot be decoded (the whole series is refused:
            a volume with a missing slice would be silently wrong).
    """
    cols, rows, n = geometry.shape
    data = np.empty((cols, rows, n), dtype=np.float32)
    for k, idx in enumerate(geometry.order):
        ds = read_slice(str(group.headers[idx].path))
        sl = decode_slice(ds)
        if sl.shape != (rows, cols):
            raise RefusedError(Reason.MIXED_SERIES,
                               f"slice {k} decodes to {sl.shape}, header says {(rows, cols)}")
        data[:, :, k] = sl.T  # pixel_array is (rows, columns); volume axes are (i=column, j=row)
    return Volume(data=data, geometry=geometry, modality=group.modality)
