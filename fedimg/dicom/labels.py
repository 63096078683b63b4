"""Labels that come with a study: DICOM mask series and NIfTI label volumes.

A DICOM mask series (as in TCIA's Brain-Tumor-Progression "MaskTumor") is a
separate series whose pixels are label values. It is matched to its image by
(0020,0052) Frame of Reference UID and identical voxel grid. A NIfTI label
file is matched to the study whose files live under its nearest folder, and
must lie on the image grid up to a permutation/flip of axes. Anything else is
refused with LABEL_GEOMETRY_MISMATCH: a label that is off by a voxel trains a
wrong model silently.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations as ornt

from fedimg.dicom.geometry import SeriesGeometry, same_grid
from fedimg.dicom.reasons import Reason, RefusedError


def match_nifti_to_study(nifti_rel: str, study_dirs: dict[str, set[str]]) -> str | None:
    """Find the study a NIfTI label belongs to.

    Walk up from the NIfTI's folder; the first folder that holds files of
    exactly one study wins. Returns the study key or None (zero or several).

    Args:
        nifti_rel: the label's path relative to the export root.
        study_dirs: study key -> set of folders (relative, POSIX) holding its files.
    """
    parent = Path(nifti_rel).parent
    for folder in [parent, *parent.parents]:
        prefix = folder.as_posix()
        hits = [
            study for study, dirs in study_dirs.items()
            if any(d == prefix or prefix == "." or d.startswith(prefix + "/") for d in dirs)
        ]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            return None
    return None


def load_nifti_on_grid(path: Path, grid: SeriesGeometry, tolerance_mm: float = 1e-2) -> np.ndarray:
    """Load a NIfTI label and bring it onto the image grid (axis permutation/flip only).

    Raises:
        RefusedError: LABEL_GEOMETRY_MISMATCH when the label's grid is not the
            image's grid; NOT_A_LABEL when the file is not a readable 3D volume.
    """
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj)
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types on bad files
        raise RefusedError(Reason.NOT_A_LABEL, f"unreadable NIfTI ({type(exc).__name__})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise RefusedError(Reason.LABEL_GEOMETRY_MISMATCH, f"label has {data.ndim} dimensions, expected 3")
    src = ornt.io_orientation(img.affine)
    dst = ornt.io_orientation(grid.affine_ras)
    transform = ornt.ornt_transform(src, dst)
    data = ornt.apply_orientation(data, transform)
    affine = img.affine @ ornt.inv_ornt_aff(transform, img.shape[:3])
    if tuple(data.shape) != tuple(grid.shape):
        raise RefusedError(Reason.LABEL_GEOMETRY_MISMATCH,
                           f"label shape {list(data.shape)} vs image {list(grid.shape)}")
    corners = np.array([[0, 0, 0, 1], [s - 1 for s in grid.shape] + [1]], dtype=float).T
    dev = float(np.abs(affine @ corners - grid.affine_ras @ corners).max())
    if dev > tolerance_mm:
        raise RefusedError(Reason.LABEL_GEOMETRY_MISMATCH,
                           f"label grid differs from the image grid by up to {dev:.3g} mm")
    return np.ascontiguousarray(data)


def check_mask_grid(image: SeriesGeometry, mask: SeriesGeometry, tolerance_mm: float = 1e-2) -> None:
    """Refuse a DICOM mask series whose grid differs from its image's."""
    ok, why = same_grid(image, mask, tolerance_mm)
    if not ok:
        raise RefusedError(Reason.LABEL_GEOMETRY_MISMATCH, why)


def map_label_values(raw: np.ndarray, class_values: list[int]) -> np.ndarray:
    """Map source label values to 0..N (N = number of classes, in order).

    Args:
        raw: label voxels as stored.
        class_values: the stored value of class 1, 2, ... N.

    Raises:
        RefusedError: LABEL_VALUES_UNEXPECTED if the label holds a value that
            is neither 0 nor a class value (a mismatched label map).
    """
    values = np.rint(raw).astype(np.int64)
    present = set(np.unique(values).tolist())
    unexpected = sorted(present - {0, *class_values})
    if unexpected:
        raise RefusedError(Reason.LABEL_VALUES_UNEXPECTED,
                           f"label holds values {unexpected[:8]} outside background 0 and classes "
                           f"{class_values}; set labels.values in the spec")
    out = np.zeros(values.shape, dtype=np.uint8)
    for idx, v in enumerate(class_values, start=1):
        out[values == v] = idx
    return out


SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


def load_seg_on_grid(path: Path, source_sop_uids: list[str], grid: SeriesGeometry) -> np.ndarray:
    """Read a DICOM SEG (with highdicom) onto the image grid, via its source references.

    The SEG's frames are matched to the image's slices through the SOP
    Instance UIDs they reference, so the label lands on exactly the image's
    slices; segment numbers become the stored label values.

    Args:
        path: the SEG file.
        source_sop_uids: the image's (0008,0018) SOP Instance UIDs in slice (k) order.
        grid: the image's validated geometry (for the shape check).

    Raises:
        RefusedError: NOT_A_LABEL for an unreadable SEG, LABEL_UNMATCHED when it
            does not reference this image's slices, LABEL_GEOMETRY_MISMATCH when
            its frames do not fit the image's matrix.
    """
    try:
        import highdicom as hd

        seg = hd.seg.segread(str(path))
    except Exception as exc:  # noqa: BLE001 - highdicom/pydicom raise many types on bad files
        raise RefusedError(Reason.NOT_A_LABEL, f"unreadable DICOM SEG ({type(exc).__name__})") from None
    try:
        arr = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=source_sop_uids,
            combine_segments=True,
            relabel=False,
            assert_missing_frames_are_empty=False,
        )
    except (KeyError, ValueError, RuntimeError) as exc:
        raise RefusedError(Reason.LABEL_UNMATCHED,
                           f"DICOM SEG frames do not reference this image's slices ({type(exc).__name__})") from None
    cols, rows, n = grid.shape
    if arr.shape != (n, rows, cols):
        raise RefusedError(Reason.LABEL_GEOMETRY_MISMATCH,
                           f"SEG frames {list(arr.shape)} vs image slices x rows x columns {[n, rows, cols]}")
    return np.ascontiguousarray(np.transpose(arr, (2, 1, 0)))  # (k, row, col) -> (i=col, j=row, k)
