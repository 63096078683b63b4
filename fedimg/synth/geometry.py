"""Image grid of one synthetic series in DICOM patient space.

Conventions used throughout :mod:`fedimg.synth`:

* DICOM patient coordinates are LPS millimetres.
* Voxel index ``(i, j, k)``: ``i`` is the column index (along a row, the
  first vector of (0020,0037) Image Orientation Patient), ``j`` the row index
  (the second vector), ``k`` the slice index in (0020,0013) Instance Number
  order (``k = InstanceNumber - 1``).
* The LPS affine maps ``(i, j, k, 1)`` to millimetres:
  ``[row_dir * dx, col_dir * dy, slice_dir * dz, IPP of instance 1]``.
  The RAS (NIfTI) affine negates its first two rows.

Feet-first geometry: a feet-first patient is rotated 180 degrees about the
vertical axis relative to head-first, so the scanner's image frame, fixed to
the gantry, sees the patient's left-right and head-foot axes reversed. For
axial images this is the familiar (0020,0037) ``[-1,0,0, 0,1,0]``. We apply
the same rule to every plane: for FFS the row direction is reversed and the
column direction kept (images stay head-up for sagittal and coronal), which
reverses the slice normal as well and keeps the frame right-handed.

Slice order: head-first series run against the normal with increasing
Instance Number, feet-first series along it, so a reader that trusts
Instance Number instead of sorting by position along the normal gets one of
the two wrong.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedimg.synth.profiles import SiteProfile

FOV_INPLANE_MM = 200.0
FOV_SLICE_MM = 180.0

# (0020,0037) Image Orientation Patient for head-first supine, per plane.
_HFS_ORIENTATION: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
    "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
}

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def image_orientation(orientation: str, patient_position: str) -> tuple[np.ndarray, np.ndarray]:
    """Row and column direction cosines of (0020,0037) Image Orientation Patient.

    Args:
        orientation: ``axial``, ``sagittal`` or ``coronal``.
        patient_position: ``HFS`` or ``FFS`` ((0018,5100) Patient Position).

    Returns:
        ``(row_dir, col_dir)`` as float64 unit vectors in LPS.

    Raises:
        ValueError: for an unknown plane or patient position.
    """
    if orientation not in _HFS_ORIENTATION:
        raise ValueError(f"orientation must be one of {tuple(_HFS_ORIENTATION)}, got {orientation!r}")
    if patient_position not in ("HFS", "FFS"):
        raise ValueError(f"patient_position must be 'HFS' or 'FFS', got {patient_position!r}")
    row, col = (np.asarray(v, dtype=np.float64) for v in _HFS_ORIENTATION[orientation])
    if patient_position == "FFS":
        # 180-degree rotation about the column direction: see the module docstring.
        row = -row
    return row + 0.0, col + 0.0  # "+ 0.0" turns -0.0 into 0.0 for clean headers


@dataclass(frozen=True)
class SeriesGeometry:
    """Regular grid of one series.

    Attributes:
        row_dir: unit vector of increasing column index ``i``.
        col_dir: unit vector of increasing row index ``j``.
        slice_dir: unit vector of increasing Instance Number (``+normal`` or
            ``-normal``).
        pixel_spacing_mm: in-plane spacing (square pixels).
        slice_spacing_mm: distance between consecutive slice centres.
        n_columns: (0028,0011) Columns.
        n_rows: (0028,0010) Rows.
        n_slices: number of instances.
        origin: (0020,0032) Image Position Patient of instance 1, LPS mm.
    """

    row_dir: tuple[float, float, float]
    col_dir: tuple[float, float, float]
    slice_dir: tuple[float, float, float]
    pixel_spacing_mm: float
    slice_spacing_mm: float
    n_columns: int
    n_rows: int
    n_slices: int
    origin: tuple[float, float, float]

    @classmethod
    def from_profile(
        cls,
        profile: SiteProfile,
        fov_inplane_mm: float = FOV_INPLANE_MM,
        fov_slice_mm: float = FOV_SLICE_MM,
    ) -> SeriesGeometry:
        """Grid of a site's series, centred on the origin.

        Args:
            profile: spacing, plane and patient position of the site.
            fov_inplane_mm: in-plane field of view; the matrix is
                ``round(fov / pixel_spacing)``.
            fov_slice_mm: extent along the slice direction; the number of
                slices is ``round(fov / slice_spacing)``.

        Returns:
            The geometry, with the grid centre at LPS (0, 0, 0).
        """
        row, col = image_orientation(profile.orientation, profile.patient_position)
        normal = np.cross(row, col)
        slice_dir = -normal if profile.patient_position == "HFS" else normal
        matrix = int(round(fov_inplane_mm / profile.pixel_spacing_mm))
        n_slices = int(round(fov_slice_mm / profile.slice_spacing_mm))
        ps = profile.pixel_spacing_mm
        dz = profile.slice_spacing_mm
        centre_offset = (
            (matrix - 1) / 2.0 * ps * row + (matrix - 1) / 2.0 * ps * col + (n_slices - 1) / 2.0 * dz * slice_dir
        )
        return cls(
            row_dir=_vec(row),
            col_dir=_vec(col),
            slice_dir=_vec(slice_dir),
            pixel_spacing_mm=float(ps),
            slice_spacing_mm=float(dz),
            n_columns=matrix,
            n_rows=matrix,
            n_slices=n_slices,
            origin=_vec(-centre_offset),
        )

    @property
    def shape(self) -> tuple[int, int, int]:
        """Voxel grid shape ``(i, j, k)`` = (columns, rows, slices)."""
        return (self.n_columns, self.n_rows, self.n_slices)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size along ``(i, j, k)`` in mm."""
        return (self.pixel_spacing_mm, self.pixel_spacing_mm, self.slice_spacing_mm)

    @property
    def normal(self) -> np.ndarray:
        """Slice normal ``row_dir x col_dir``."""
        return np.cross(np.asarray(self.row_dir), np.asarray(self.col_dir)) + 0.0

    @property
    def image_orientation_patient(self) -> list[float]:
        """(0020,0037) Image Orientation Patient, six values."""
        return [*self.row_dir, *self.col_dir]

    def image_position_patient(self, k: int) -> tuple[float, float, float]:
        """(0020,0032) Image Position Patient of slice ``k`` (Instance Number ``k + 1``).

        Rounded to micrometres: these are exactly the values written to the
        files, so readers and ground truth agree to well below 1e-4 mm.
        """
        position = np.asarray(self.origin) + k * self.slice_spacing_mm * np.asarray(self.slice_dir)
        return _vec(position)

    def slice_location(self, k: int) -> float:
        """(0020,1041) Slice Location: position of slice ``k`` along the normal."""
        return round(float(np.dot(self.image_position_patient(k), self.normal)), 6) + 0.0

    @property
    def affine_lps(self) -> np.ndarray:
        """4x4 voxel ``(i, j, k)`` to LPS mm affine."""
        affine = np.eye(4)
        affine[:3, 0] = np.asarray(self.row_dir) * self.pixel_spacing_mm
        affine[:3, 1] = np.asarray(self.col_dir) * self.pixel_spacing_mm
        affine[:3, 2] = np.asarray(self.slice_dir) * self.slice_spacing_mm
        affine[:3, 3] = self.origin
        return affine + 0.0

    @property
    def affine_ras(self) -> np.ndarray:
        """4x4 voxel ``(i, j, k)`` to RAS mm affine (the NIfTI affine)."""
        return LPS_TO_RAS @ self.affine_lps + 0.0

    def inplane_offsets(self) -> np.ndarray:
        """Offsets of all pixel centres of a slice from its IPP.

        Returns:
            float64 array of shape ``(3, n_rows * n_columns)`` in row-major
            pixel order (``j`` slow, ``i`` fast), so sampled values reshape
            directly to a ``(Rows, Columns)`` pixel array. Column-major layout
            lets :meth:`Phantom.sample` read coordinates without copying.
        """
        jj, ii = np.meshgrid(
            np.arange(self.n_rows, dtype=np.float64),
            np.arange(self.n_columns, dtype=np.float64),
            indexing="ij",
        )
        ii = ii.ravel() * self.pixel_spacing_mm
        jj = jj.ravel() * self.pixel_spacing_mm
        row = np.asarray(self.row_dir)[:, None]
        col = np.asarray(self.col_dir)[:, None]
        return row * ii[None, :] + col * jj[None, :]


def _vec(values: np.ndarray | tuple[float, ...]) -> tuple[float, float, float]:
    x, y, z = (round(float(v), 6) + 0.0 for v in values)
    return (x, y, z)
