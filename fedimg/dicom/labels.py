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
from nibabel.arrayproxy import ArrayProxy
from nibabel.spatialimages import SpatialImage

from fedimg.dicom.geometry import SeriesGeometry, same_grid
from fedimg.dicom.pixels import apply_modality_lut
from fedimg.dicom.reasons import Reason, RefusedError

#: Voxels per slab when label values are read: bounds the int64 temporaries of a large label.
SLAB_VOXELS = 1 << 21


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
            study
            for study, dirs in study_dirs.items()
            if any(d == prefix or prefix == "." or d.startswith(prefix + "/") for d in dirs)
        ]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            return None
    return None


def load_nifti_on_grid(
    path: Path, grid: SeriesGeometry, tolerance_mm: float = 1e-2
) -> tuple[np.ndarray, tuple[float, float]]:
    """Load a NIfTI label and bring it onto a DICOM image's grid (see :func:`load_nifti_on`)."""
    return load_nifti_on(path, tuple(grid.shape), grid.affine_ras, tolerance_mm)


def load_nifti_on(
    path: Path, shape: tuple[int, ...], affine_ras: np.ndarray, tolerance_mm: float = 1e-2
) -> tuple[np.ndarray, tuple[float, float]]:
    """Load a NIfTI label and bring it onto the image grid ``(shape, affine_ras)`` (axis permutation/flip only).

    Returns:
        The stored voxels on the image grid (a flipped/transposed view, in the
        file's type) and the file's ``(scl_slope, scl_inter)``: values are
        ``stored * slope + inter``. Not scaling here keeps a uint8 label at one
        byte per voxel instead of nibabel's float64.

    Raises:
        RefusedError: LABEL_GEOMETRY_MISMATCH when the label's grid is not the
            image's grid; NOT_A_LABEL when the file is not a readable 3D volume.
    """
    try:
        img = nib.load(str(path))
        if not isinstance(img, SpatialImage):  # e.g. CIFTI-2 or GIFTI: no voxel grid, no affine
            raise TypeError(f"{type(img).__name__} is not a volume")
        proxy = img.dataobj
        if not isinstance(proxy, ArrayProxy):  # only a file-backed proxy keeps the stored values and scaling
            raise TypeError(f"{type(proxy).__name__} is not an array proxy")
        data = np.asarray(proxy.get_unscaled())
        slope, inter = (float(v) for v in (proxy.slope, proxy.inter))
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types on bad files
        raise RefusedError(Reason.NOT_A_LABEL, f"unreadable NIfTI ({type(exc).__name__})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise RefusedError(Reason.LABEL_GEOMETRY_MISMATCH, f"label has {data.ndim} dimensions, expected 3")
    try:
        transform = ornt.ornt_transform(ornt.io_orientation(img.affine), ornt.io_orientation(affine_ras))
    except ValueError:  # a degenerate (singular, NaN) affine has no axis orientation
        raise RefusedError(
            Reason.LABEL_GEOMETRY_MISMATCH, "the label's affine gives its axes no direction (singular or NaN)"
        ) from None
    data = ornt.apply_orientation(data, transform)
    affine = img.affine @ ornt.inv_ornt_aff(transform, img.shape[:3])
    if tuple(data.shape) != tuple(shape):
        raise RefusedError(Reason.LABEL_GEOMETRY_MISMATCH, f"label shape {list(data.shape)} vs image {list(shape)}")
    corners = np.array([[0, 0, 0, 1], [s - 1 for s in shape] + [1]], dtype=float).T
    dev = float(np.abs(affine @ corners - affine_ras @ corners).max())
    if dev > tolerance_mm:
        raise RefusedError(
            Reason.LABEL_GEOMETRY_MISMATCH, f"label grid differs from the image grid by up to {dev:.3g} mm"
        )
    return data, (slope, inter)


def check_mask_grid(image: SeriesGeometry, mask: SeriesGeometry, tolerance_mm: float = 1e-2) -> None:
    """Refuse a DICOM mask series whose grid differs from its image's."""
    ok, why = same_grid(image, mask, tolerance_mm)
    if not ok:
        raise RefusedError(Reason.LABEL_GEOMETRY_MISMATCH, why)


def _slabs(raw: np.ndarray) -> list[slice]:
    """Ranges along the last axis of about :data:`SLAB_VOXELS` voxels each."""
    n = raw.shape[-1] if raw.ndim else 1
    step = max(1, SLAB_VOXELS // max(1, raw.size // max(n, 1)))
    return [slice(k, min(k + step, n)) for k in range(0, n, step)]


def _slab_values(slab: np.ndarray, scale: tuple[float, float]) -> np.ndarray:
    """Label values of a slab: ``rint(stored * slope + intercept)`` (the float32 modality values, rounded)."""
    if scale == (1.0, 0.0) and (np.issubdtype(slab.dtype, np.integer) or slab.dtype == np.bool_):
        return slab.astype(np.int64)
    values = apply_modality_lut(slab, *scale) if scale != (1.0, 0.0) else slab
    return np.rint(values).astype(np.int64)


#: Unexpected label values a refusal names before it says how many more there are.
SHOWN_VALUES = 5


def unexpected_values_text(values: list[int]) -> str:
    """``"12 unexpected values, e.g. 3, 5, 7, 9, 11 and 7 more"``: the count, the first few, and that it is cut."""
    n = len(values)
    shown = ", ".join(str(v) for v in values[:SHOWN_VALUES])
    if n == 1:
        return f"1 unexpected value: {shown}"
    if n <= SHOWN_VALUES:
        return f"{n} unexpected values: {shown}"
    return f"{n} unexpected values, e.g. {shown} and {n - SHOWN_VALUES} more"


def label_value_counts(raw: np.ndarray, scale: tuple[float, float] = (1.0, 0.0)) -> dict[int, int]:
    """Voxels per label value, read slab by slab (values are ``rint(raw * slope + intercept)``)."""
    counts: dict[int, int] = {}
    for sl in _slabs(raw):
        slab = raw[..., sl]
        if scale == (1.0, 0.0) and slab.dtype in (np.uint8, np.uint16):
            binned = np.bincount(slab.ravel())
            values = np.flatnonzero(binned)
            pairs = zip(values.tolist(), binned[values].tolist())
        else:
            uniq, n = np.unique(_slab_values(slab, scale), return_counts=True)
            pairs = zip(uniq.tolist(), n.tolist())
        for v, c in pairs:
            counts[v] = counts.get(v, 0) + c
    return counts


def check_label_values(
    raw: np.ndarray,
    class_values: list[int],
    scale: tuple[float, float] = (1.0, 0.0),
    others: str = "refuse",
) -> dict[int, int]:
    """Check that a label holds only 0 and the class values, reading it slab by slab.

    Args:
        raw: label voxels as stored (any type and axis order).
        class_values: the stored value of class 1, 2, ... N.
        scale: ``(slope, intercept)``: values are ``rint(raw * slope + intercept)``.
        others: the spec's ``labels.others``: ``refuse`` a label holding any
            other value, or ``background``: accept it (its other values are
            mapped to 0 by :func:`map_label_values`).

    Returns:
        Voxels per other value (empty when the label holds none): what
        ``others: background`` maps to background.

    Raises:
        RefusedError: LABEL_VALUES_UNEXPECTED (a mismatched label map) under ``others: refuse``; the detail
            counts the distinct unexpected values and names the first few.
    """
    allowed = {0, *class_values}
    unexpected = {v: n for v, n in sorted(label_value_counts(raw, scale).items()) if v not in allowed}
    if unexpected and others != "background":
        raise RefusedError(
            Reason.LABEL_VALUES_UNEXPECTED,
            f"label holds {unexpected_values_text(list(unexpected))} outside background 0 and classes "
            f"{class_values}; set labels.values in the spec, or labels.others: background to map every other "
            "value to background",
        )
    return unexpected


def map_label_values(
    raw: np.ndarray, class_values: list[int], scale: tuple[float, float] = (1.0, 0.0), others: str = "refuse"
) -> np.ndarray:
    """Map source label values to 0..N (N = number of classes, in order), as uint8.

    Read slab by slab, so the temporaries stay small whatever the label's size.

    Args:
        raw: label voxels as stored.
        class_values: the stored value of class 1, 2, ... N.
        scale: ``(slope, intercept)`` of ``raw`` (a DICOM mask's modality LUT,
            a NIfTI label's scl_slope / scl_inter): values are
            ``rint(raw * slope + intercept)``.
        others: ``refuse`` (see below) or ``background``: every value that is
            neither 0 nor a class value becomes 0.

    Raises:
        RefusedError: LABEL_VALUES_UNEXPECTED under ``others: refuse`` if the
            label holds a value that is neither 0 nor a class value (a
            mismatched label map).
    """
    if others != "background":
        check_label_values(raw, class_values, scale)
    out = np.zeros(raw.shape, dtype=np.uint8)
    for sl in _slabs(raw):
        values = _slab_values(raw[..., sl], scale)
        target = out[..., sl]
        for idx, v in enumerate(class_values, start=1):
            target[values == v] = idx
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
        raise RefusedError(
            Reason.LABEL_UNMATCHED, f"DICOM SEG frames do not reference this image's slices ({type(exc).__name__})"
        ) from None
    cols, rows, n = grid.shape
    if arr.shape != (n, rows, cols):
        raise RefusedError(
            Reason.LABEL_GEOMETRY_MISMATCH,
            f"SEG frames {list(arr.shape)} vs image slices x rows x columns {[n, rows, cols]}",
        )
    return np.transpose(arr, (2, 1, 0))  # (k, row, col) -> (i=col, j=row, k), a view
