"""Writing synthetic CT image series, DICOM mask series and NIfTI labels.

Every DICOM file is a proper Part 10 file: 128-byte preamble, File Meta
Information with (0002,0010) Transfer Syntax UID Explicit VR Little Endian and
(0002,0002)/(0002,0003) Media Storage SOP Class/Instance UIDs matching the
dataset, written with ``enforce_file_format=True``.
"""

from __future__ import annotations

import datetime as _dt
import gzip
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, ExplicitVRLittleEndian

from fedimg.synth.geometry import SeriesGeometry
from fedimg.synth.identity import SiteIdentity, StudyIdentity
from fedimg.synth.layout import instance_file_name
from fedimg.synth.profiles import SiteProfile

CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2")
SECONDARY_CAPTURE_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.7")
PRIVATE_CREATOR = "FEDIMG_SYNTH"
PRIVATE_GROUP = 0x0011
MASK_SERIES_DESCRIPTION = "Mask_Segmentation"
SOFTWARE_VERSION = "fedimg.synth 1"


@dataclass(frozen=True)
class StudyContext:
    """What every series of one study shares.

    Attributes:
        profile: the site's scanner/export profile.
        site: site-level identifiers (institution, station...).
        study: patient and study identifiers.
        study_instance_uid: (0020,000D) Study Instance UID.
        frame_of_reference_uid: (0020,0052) Frame of Reference UID, shared by
            the image and its mask so they can be overlaid.
        geometry: the image grid.
    """

    profile: SiteProfile
    site: SiteIdentity
    study: StudyIdentity
    study_instance_uid: UID
    frame_of_reference_uid: UID
    geometry: SeriesGeometry


@dataclass(frozen=True)
class SeriesSpec:
    """One series to write.

    Attributes:
        series_instance_uid: (0020,000E) Series Instance UID.
        sop_instance_uids: (0008,0018) SOP Instance UID per slice, Instance
            Number order.
        series_number: (0020,0011) Series Number.
        series_description: (0008,103E) Series Description.
        minutes_after_study: series start, relative to (0008,0030) Study Time.
    """

    series_instance_uid: UID
    sop_instance_uids: Sequence[UID]
    series_number: int
    series_description: str
    minutes_after_study: int


def write_ct_series(folder: Path, context: StudyContext, spec: SeriesSpec, stored: np.ndarray) -> list[Path]:
    """Write a CT Image Storage series, one file per slice.

    Args:
        folder: series folder; created if missing.
        context: the study.
        spec: UIDs, number and description of the series.
        stored: stored pixel values, shape ``(n_slices, Rows, Columns)`` in
            Instance Number order, int16 or uint16 matching (0028,0103)
            Pixel Representation of the profile.

    Returns:
        The written files in Instance Number order.

    Raises:
        ValueError: if ``stored`` does not match the geometry or the dtype.
    """
    profile = context.profile
    geometry = context.geometry
    expected_dtype = np.int16 if profile.pixel_representation == 1 else np.uint16
    _check_pixels(stored, geometry, expected_dtype)
    common = _common_attributes(context, spec)
    common.update(
        {
            "SOPClassUID": CT_IMAGE_STORAGE,
            "ImageType": (
                ["ORIGINAL", "PRIMARY", "AXIAL"]
                if profile.orientation == "axial"
                # Sagittal/coronal CT are multiplanar reformats of the axial acquisition.
                else ["DERIVED", "SECONDARY", "REFORMATTED"]
            ),
            "BodyPartExamined": "ABDOMEN",
            "ProtocolName": profile.protocol_name,
            "KVP": _ds(profile.kvp),
            "XRayTubeCurrent": 200,
            "ExposureTime": 500,
            "ConvolutionKernel": profile.convolution_kernel,
            "AcquisitionNumber": 1,
            "BitsStored": profile.bits_stored,
            "HighBit": profile.bits_stored - 1,
            "PixelRepresentation": profile.pixel_representation,
            "RescaleIntercept": _ds(profile.rescale_intercept),
            "RescaleSlope": _ds(profile.rescale_slope),
            "RescaleType": "HU",
            "WindowCenter": _ds(profile.window_center),
            "WindowWidth": _ds(profile.window_width),
        }
    )
    return _write_slices(folder, context, spec, common, stored, per_slice=None)


def write_mask_series(
    folder: Path,
    context: StudyContext,
    spec: SeriesSpec,
    label: np.ndarray,
    image_spec: SeriesSpec,
) -> list[Path]:
    """Write a label volume as a DICOM mask series.

    Modelled on TCIA Brain-Tumor-Progression's "MaskTumor" series: Secondary
    Capture Image Storage whose slices carry the image's full geometry
    ((0020,0037), (0020,0032) per slice, (0028,0030)), the same (0020,0052)
    Frame of Reference UID and Study, their own Series Instance UID,
    (0008,0008) Image Type DERIVED\\SECONDARY\\OTHER, and pixel values equal to
    the label values. (0028,0301) Burned In Annotation is explicitly NO,
    and each slice points back at its image slice through (0008,2112) Source
    Image Sequence, so de-identification must keep those references
    consistent.

    Args:
        folder: series folder; created if missing.
        context: the study (geometry of the image series).
        spec: UIDs, number and description of the mask series.
        label: uint8 labels ``(n_slices, Rows, Columns)`` in Instance Number
            order (0 background, 1 organ, 2 lesion).
        image_spec: the image series the mask belongs to.

    Returns:
        The written files in Instance Number order.
    """
    _check_pixels(label, context.geometry, np.uint8)
    common = _common_attributes(context, spec)
    common.update(
        {
            "SOPClassUID": SECONDARY_CAPTURE_IMAGE_STORAGE,
            "ImageType": ["DERIVED", "SECONDARY", "OTHER"],
            "ConversionType": "WSD",
            "BurnedInAnnotation": "NO",
            "BitsStored": 16,
            "HighBit": 15,
            "PixelRepresentation": 0,
            "ReferencedSeriesSequence": _referenced_series(image_spec.series_instance_uid),
        }
    )

    def per_slice(ds: Dataset, k: int) -> None:
        source = Dataset()
        source.ReferencedSOPClassUID = CT_IMAGE_STORAGE
        source.ReferencedSOPInstanceUID = image_spec.sop_instance_uids[k]
        ds.SourceImageSequence = DicomSequence([source])

    return _write_slices(folder, context, spec, common, label.astype(np.uint16), per_slice)


def write_label_nifti(path: Path, label: np.ndarray, geometry: SeriesGeometry) -> None:
    """Write a label volume as gzipped NIfTI-1 on exactly the image grid.

    Voxel axes are ``(i, j, k)`` = (column, row, slice in Instance Number
    order) and the affine is :attr:`SeriesGeometry.affine_ras` (qform and
    sform, code 1 "scanner"). The gzip header carries no time stamp or file
    name, so equal inputs give equal bytes.

    Args:
        path: target ``.nii.gz`` file; parent folders are created.
        label: uint8 ``(n_slices, Rows, Columns)`` in Instance Number order.
        geometry: the image grid.
    """
    _check_pixels(label, geometry, np.uint8)
    data = np.ascontiguousarray(label.transpose(2, 1, 0))
    affine = geometry.affine_ras
    image = nib.Nifti1Image(data, affine)
    image.header.set_qform(affine, code=1)
    image.header.set_sform(affine, code=1)
    image.header.set_xyzt_units(xyz="mm")
    image.header["descrip"] = b"fedimg synth label"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(image.to_bytes(), compresslevel=6, mtime=0))


def _check_pixels(array: np.ndarray, geometry: SeriesGeometry, dtype: type) -> None:
    expected = (geometry.n_slices, geometry.n_rows, geometry.n_columns)
    if array.shape != expected or array.dtype != np.dtype(dtype):
        raise ValueError(
            f"pixel array must have shape (slices, rows, columns) = {expected} and dtype "
            f"{np.dtype(dtype)}, got shape {array.shape} and dtype {array.dtype}; "
            "render it with fedimg.synth.render on the same geometry"
        )


def _common_attributes(context: StudyContext, spec: SeriesSpec) -> dict[str, Any]:
    """Patient, study, equipment, frame-of-reference and plane attributes."""
    profile = context.profile
    study = context.study
    patient = study.patient
    site = context.site
    geometry = context.geometry
    series_time = _add_minutes(study.study_date, study.study_time, spec.minutes_after_study)
    return {
        "SpecificCharacterSet": "ISO_IR 100",
        # Patient module: all fake, all to be removed by de-identification.
        "PatientName": patient.dicom_name,
        "PatientID": patient.patient_id,
        "PatientBirthDate": patient.birth_date,
        "PatientSex": patient.sex,
        "PatientAge": study.patient_age,
        "PatientWeight": _ds(patient.weight_kg),
        "PatientSize": _ds(patient.size_m),
        # General Study.
        "StudyInstanceUID": context.study_instance_uid,
        "StudyDate": study.study_date,
        "StudyTime": study.study_time,
        "AccessionNumber": study.accession_number,
        "StudyID": study.study_id,
        "ReferringPhysicianName": study.referring_physician,
        "StudyDescription": study.study_description,
        # General Series.
        "Modality": "CT",
        "SeriesInstanceUID": spec.series_instance_uid,
        "SeriesNumber": spec.series_number,
        "SeriesDescription": spec.series_description,
        "SeriesDate": series_time[0],
        "SeriesTime": series_time[1],
        "AcquisitionDate": series_time[0],
        "AcquisitionTime": series_time[1],
        "ContentDate": series_time[0],
        "ContentTime": series_time[1],
        "InstanceCreationDate": series_time[0],
        "InstanceCreationTime": series_time[1],
        "PerformingPhysicianName": study.performing_physician,
        "OperatorsName": study.operator,
        "PatientPosition": profile.patient_position,
        # General Equipment.
        "Manufacturer": profile.manufacturer,
        "ManufacturerModelName": profile.model_name,
        "InstitutionName": site.institution_name,
        "InstitutionAddress": site.institution_address,
        "InstitutionalDepartmentName": site.department,
        "StationName": site.station_name,
        "DeviceSerialNumber": site.device_serial_number,
        "SoftwareVersions": SOFTWARE_VERSION,
        # Frame of Reference and Image Plane.
        "FrameOfReferenceUID": context.frame_of_reference_uid,
        "PositionReferenceIndicator": "",
        "ImageOrientationPatient": [_ds(v) for v in geometry.image_orientation_patient],
        "PixelSpacing": [_ds(geometry.pixel_spacing_mm), _ds(geometry.pixel_spacing_mm)],
        "SliceThickness": _ds(geometry.slice_spacing_mm),
        "SpacingBetweenSlices": _ds(geometry.slice_spacing_mm),
        # Image Pixel.
        "SamplesPerPixel": 1,
        "PhotometricInterpretation": "MONOCHROME2",
        "Rows": geometry.n_rows,
        "Columns": geometry.n_columns,
        "BitsAllocated": 16,
    }


def _write_slices(
    folder: Path,
    context: StudyContext,
    spec: SeriesSpec,
    common: dict[str, Any],
    pixels: np.ndarray,
    per_slice: Callable[[Dataset, int], None] | None,
) -> list[Path]:
    geometry = context.geometry
    if len(spec.sop_instance_uids) != geometry.n_slices:
        raise ValueError(
            f"need one SOP Instance UID per slice: {geometry.n_slices} slices, got {len(spec.sop_instance_uids)} UIDs"
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    little_endian = pixels.astype(pixels.dtype.newbyteorder("<"), copy=False)
    patient = context.study.patient
    private_value = f"{patient.patient_id} {patient.last_name} {context.profile.name}"
    written = []
    for k in range(geometry.n_slices):
        ds = Dataset()
        for keyword, value in common.items():
            setattr(ds, keyword, value)
        ds.SOPInstanceUID = spec.sop_instance_uids[k]
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [_ds(v) for v in geometry.image_position_patient(k)]
        ds.SliceLocation = _ds(geometry.slice_location(k))
        if per_slice is not None:
            per_slice(ds, k)
        path = folder / instance_file_name(k + 1, context.profile.file_extension)
        _save_instance(ds, path, private_value, little_endian[k].tobytes())
        written.append(path)
    return written


def _save_instance(ds: Dataset, path: Path, private_value: str, pixel_data: bytes) -> None:
    """Finish one instance (private block, pixels, File Meta) and save it as a Part 10 file.

    Args:
        ds: the instance's attributes, without pixels.
        path: the file to write.
        private_value: the identifying text of the private block.
        pixel_data: the little-endian stored values.
    """
    # A private block with an identifier in it: something for
    # de-identification's private-tag rule to remove.
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(0x01, "LO", private_value)
    ds.PixelData = pixel_data

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.save_as(path, enforce_file_format=True)


def _referenced_series(series_uid: UID) -> DicomSequence:
    item = Dataset()
    item.SeriesInstanceUID = series_uid
    return DicomSequence([item])


def _add_minutes(date: str, time: str, minutes: int) -> tuple[str, str]:
    start = _dt.datetime.strptime(date + time[:6], "%Y%m%d%H%M%S")
    moment = start + _dt.timedelta(minutes=minutes)
    return moment.strftime("%Y%m%d"), moment.strftime("%H%M%S")


def _ds(value: float) -> str:
    """Format a number for a DS element (at most 16 characters, no ``-0``)."""
    text = f"{round(float(value), 6) + 0.0:.6f}".rstrip("0").rstrip(".")
    if text in ("-0", ""):
        text = "0"
    if len(text) > 16:
        raise ValueError(f"value {value!r} does not fit a 16-character DS string: {text!r}")
    return text


# --------------------------------------------------------------------------
# Projection radiographs
# --------------------------------------------------------------------------

DX_FOR_PRESENTATION_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1.1")


def write_dx_image(
    folder: Path,
    profile: Any,
    site: SiteIdentity,
    study: StudyIdentity,
    study_instance_uid: UID,
    series_instance_uid: UID,
    sop_instance_uid: UID,
    stored: np.ndarray,
) -> Path:
    """Write one Digital X-Ray Image (For Presentation) as a single-frame Part 10 file.

    Identifiers as in the CT series (patient, study, equipment, a private
    block with the Patient ID). Projection radiographs have no Image Plane
    module: the pixel size is (0018,1164) Imager Pixel Spacing, plus
    (0028,0030) Pixel Spacing where the profile says so; (0020,0020) Patient
    Orientation is ``L\\F`` (columns towards the patient's left, rows towards
    the feet). (0028,0301) Burned In Annotation is NO and (2050,0020)
    Presentation LUT Shape matches the photometric interpretation (INVERSE for
    MONOCHROME1).

    Args:
        folder: series folder; created if missing.
        profile: the site's :class:`fedimg.synth.profiles.DXProfile`.
        site: site identifiers.
        study: patient and study identifiers.
        study_instance_uid: (0020,000D).
        series_instance_uid: (0020,000E).
        sop_instance_uid: (0008,0018).
        stored: uint16 ``(Rows, Columns)`` stored values.

    Returns:
        The written file.

    Raises:
        ValueError: if ``stored`` does not match the profile's matrix.
    """
    if stored.shape != (profile.rows, profile.columns) or stored.dtype != np.uint16:
        raise ValueError(
            f"DX pixels must be uint16 of shape {(profile.rows, profile.columns)}, got "
            f"{stored.dtype} {stored.shape}; render them with fedimg.synth.render"
        )
    patient = study.patient
    attributes = {
        "SOPClassUID": DX_FOR_PRESENTATION_STORAGE,
        "SOPInstanceUID": sop_instance_uid,
        "StudyInstanceUID": study_instance_uid,
        "SeriesInstanceUID": series_instance_uid,
        **_dx_identity_attributes(profile, site, study),
        **_dx_image_attributes(profile),
    }
    ds = Dataset()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / instance_file_name(1, profile.file_extension)
    private_value = f"{patient.patient_id} {patient.last_name} {profile.name}"
    _save_instance(ds, path, private_value, stored.astype("<u2", copy=False).tobytes())
    return path


def _dx_identity_attributes(profile: Any, site: SiteIdentity, study: StudyIdentity) -> dict[str, Any]:
    """A radiograph's patient, study, series and equipment attributes (all but its UIDs).

    Args:
        profile: the site's :class:`fedimg.synth.profiles.DXProfile`.
        site: site identifiers.
        study: patient and study identifiers.

    Returns:
        The attributes by keyword.
    """
    patient = study.patient
    series_time = _add_minutes(study.study_date, study.study_time, 1)
    return {
        "SpecificCharacterSet": "ISO_IR 100",
        "ImageType": ["ORIGINAL", "PRIMARY"],
        "PatientName": patient.dicom_name,
        "PatientID": patient.patient_id,
        "PatientBirthDate": patient.birth_date,
        "PatientSex": patient.sex,
        "PatientAge": study.patient_age,
        "StudyDate": study.study_date,
        "StudyTime": study.study_time,
        "AccessionNumber": study.accession_number,
        "StudyID": study.study_id,
        "ReferringPhysicianName": study.referring_physician,
        "StudyDescription": "XR CHEST 1 VIEW",
        "Modality": "DX",
        "SeriesNumber": profile.series_number,
        "SeriesDescription": profile.series_description,
        "SeriesDate": series_time[0],
        "SeriesTime": series_time[1],
        "AcquisitionDate": series_time[0],
        "AcquisitionTime": series_time[1],
        "ContentDate": series_time[0],
        "ContentTime": series_time[1],
        "OperatorsName": study.operator,
        "Manufacturer": profile.manufacturer,
        "ManufacturerModelName": profile.model_name,
        "InstitutionName": site.institution_name,
        "InstitutionAddress": site.institution_address,
        "StationName": site.station_name,
        "DeviceSerialNumber": site.device_serial_number,
        "SoftwareVersions": SOFTWARE_VERSION,
    }


def _dx_image_attributes(profile: Any) -> dict[str, Any]:
    """A radiograph's acquisition, orientation and pixel attributes, as its site's profile writes them.

    Args:
        profile: the site's :class:`fedimg.synth.profiles.DXProfile`.

    Returns:
        The attributes by keyword.
    """
    spacing = [_ds(profile.pixel_spacing_mm), _ds(profile.pixel_spacing_mm)]
    top = profile.stored_max
    attributes: dict[str, Any] = {
        "BodyPartExamined": "CHEST",
        "ViewPosition": "AP",
        "PatientOrientation": ["L", "F"],
        "PresentationIntentType": "FOR PRESENTATION",
        "KVP": _ds(profile.kvp),
        "DistanceSourceToDetector": "1800",
        "ImagerPixelSpacing": spacing,
        "InstanceNumber": 1,
        "BurnedInAnnotation": "NO",
        "SamplesPerPixel": 1,
        "PhotometricInterpretation": profile.photometric_interpretation,
        "PresentationLUTShape": "INVERSE" if profile.photometric_interpretation == "MONOCHROME1" else "IDENTITY",
        "Rows": profile.rows,
        "Columns": profile.columns,
        "BitsAllocated": 16,
        "BitsStored": profile.bits_stored,
        "HighBit": profile.bits_stored - 1,
        "PixelRepresentation": 0,
        "WindowCenter": _ds(top / 2),
        "WindowWidth": _ds(top),
    }
    if profile.write_pixel_spacing:
        attributes["PixelSpacing"] = spacing
    if profile.write_rescale:
        attributes.update({"RescaleIntercept": "0", "RescaleSlope": "1", "RescaleType": "US"})
    return attributes
