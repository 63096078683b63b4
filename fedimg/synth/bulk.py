"""One large axial CT series, written slice by slice: for memory benchmarks and tests.

:func:`fedimg.synth.generate` builds whole multi-site federations in memory;
this writes a single study of any size (2000 slices of 512 x 512 are 1 GB
of pixels) while holding one slice at a time, plus its label as an
uncompressed NIfTI on the image grid (organ = 1, lesion = 2, as the shipped
``ct_phantom`` spec expects). Stored values are uint16 with 12 bits stored
and a modality LUT (default slope 1, intercept -1024), as most CT scanners
export; ``slopes`` gives each slice its own (0028,1053) Rescale Slope.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from fedimg.synth.writer import CT_IMAGE_STORAGE

#: (0018,0088)-free axial geometry: slices along +z (LPS), rows along +y, columns along +x.
_IOP = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def phantom_slice(
    k: int, n: int, rows: int, cols: int, intercept: float = -1024.0, slope: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Stored values (uint16, 12 bits) and label (uint8) of slice ``k`` of ``n`` of an abdomen-like phantom.

    Body 40 HU, organ 90 HU (label 1), lesion 20 HU (label 2), air -1000 HU,
    plus a deterministic +-11 HU texture so that no slice is constant.
    """
    y, x = np.ogrid[:rows, :cols]
    cy, cx = rows / 2, cols / 2
    body = ((y - cy) / (0.38 * rows)) ** 2 + ((x - cx) / (0.45 * cols)) ** 2 <= 1
    z = (k - n / 2) / (0.3 * n)
    organ = ((y - cy) / (0.15 * rows)) ** 2 + ((x - 0.6 * cols) / (0.12 * cols)) ** 2 + z**2 <= 1
    lesion = ((y - cy) / (0.04 * rows)) ** 2 + ((x - 0.62 * cols) / (0.04 * cols)) ** 2 + (z / 0.15) ** 2 <= 1
    hu = np.full((rows, cols), -1000.0)
    hu[body] = 40.0
    hu[organ] = 90.0
    hu[lesion] = 20.0
    hu += (np.arange(rows)[:, None] * 7 + np.arange(cols)[None, :] * 13 + k * 3) % 23 - 11
    label = np.zeros((rows, cols), dtype=np.uint8)
    label[organ] = 1
    label[lesion] = 2
    stored = np.rint((hu - intercept) / slope).clip(0, 4095).astype(np.uint16)
    return stored, label


def write_bulk_ct(
    study: Path,
    n: int,
    rows: int,
    cols: int,
    spacing: tuple[float, float, float] = (0.7, 0.7, 1.0),
    *,
    intercept: float = -1024.0,
    slopes: Sequence[float] | None = None,
    label: bool = True,
) -> Path:
    """Write an axial CT series of ``n`` slices into ``study/ct/`` and its label as ``study/segmentation.nii``.

    Args:
        study: the study folder (created).
        n: slices.
        rows: (0028,0010) Rows.
        cols: (0028,0011) Columns.
        spacing: (row spacing, column spacing, slice spacing) in mm.
        intercept: (0028,1052) Rescale Intercept of every slice.
        slopes: (0028,1053) Rescale Slope per slice (default 1 for all).
        label: also write the label NIfTI.

    Returns:
        ``study``.
    """
    slopes = [1.0] * n if slopes is None else list(slopes)
    if len(slopes) != n:
        raise ValueError(f"slopes: expected {n} values (one per slice), got {len(slopes)}")
    (study / "ct").mkdir(parents=True, exist_ok=True)
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    row_mm, col_mm, dz = spacing
    origin = (-0.5 * cols * col_mm, -0.5 * rows * row_mm, -0.5 * n * dz)  # LPS mm of slice 0's first pixel
    labels = np.empty((cols, rows, n), dtype=np.uint8, order="F") if label else None
    for k in range(n):
        stored, lab = phantom_slice(k, n, rows, cols, intercept, slopes[k])
        if labels is not None:
            labels[:, :, k] = lab.T
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.Modality = "CT"
        ds.PatientID = "SYNTH-BULK"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.SeriesDescription = "Abdomen 1.0 B30f"
        ds.SeriesNumber = 2
        ds.InstanceNumber = k + 1
        ds.ImageOrientationPatient = list(_IOP)
        ds.ImagePositionPatient = [origin[0], origin[1], origin[2] + k * dz]
        ds.PixelSpacing = [row_mm, col_mm]
        ds.SliceThickness = dz
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        ds.PixelRepresentation = 0
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = f"{slopes[k]:g}", f"{intercept:g}", "HU"
        ds.PixelData = stored.tobytes()
        ds.save_as(study / "ct" / f"{k:05d}.dcm", enforce_file_format=True)
    if labels is not None:
        # Voxel (i, j, k) = (column, row, slice) sits at LPS origin + i*col_mm x + j*row_mm y + k*dz z.
        lps = np.diag([col_mm, row_mm, dz, 1.0])
        lps[:3, 3] = origin
        affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
        img = nib.Nifti1Image(labels, affine)
        img.header.set_qform(affine, code=1)
        img.header.set_sform(affine, code=1)
        nib.save(img, str(study / "segmentation.nii"))
    return study
