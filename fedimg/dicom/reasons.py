"""Reason codes for files and series that are not converted.

Every input file ends in exactly one manifest row whose ``reason`` is one of
these codes (or empty for a converted file). Codes are stable strings: tools
and people grep for them.
"""

from __future__ import annotations

from enum import Enum


class Reason(str, Enum):
    """Why a file or series was refused or skipped, with what to do about it.

    Each member is its code (the string in the manifest) and its advice
    (:attr:`advice`, shown in the end-of-run table and in
    ``docs/reason-codes.md``, which ``tools/gen_reason_codes.py`` generates
    from this class): one place for both. The comment lines group the codes.
    """

    advice: str

    def __new__(cls, code: str, advice: str = "") -> Reason:
        member = str.__new__(cls, code)
        member._value_ = code
        member.advice = advice
        return member

    # file level
    NOT_DICOM = "NOT_DICOM", "not a DICOM file; remove it from the export or ignore"
    TRUNCATED = "TRUNCATED", "file ends early; re-export this series from PACS"
    NO_PIXELS = "NO_PIXELS", "image object without pixels; re-export this series"
    NON_IMAGE_OBJECT = "NON_IMAGE_OBJECT", "report/presentation/RT object; nothing to convert"
    LOCALIZER = "LOCALIZER", "scout image; nothing to convert"
    # folder entries that are not read (symbolic links, special files, permissions)
    UNREADABLE = "UNREADABLE", "file or folder could not be opened or listed; make it readable for this user, run again"
    NOT_REGULAR_FILE = "NOT_REGULAR_FILE", "a FIFO, socket or device, not a file; remove it from the export"
    BROKEN_LINK = "BROKEN_LINK", "symbolic link to nothing; copy the file it meant into the export, or remove the link"
    SYMLINK_LOOP = "SYMLINK_LOOP", "symbolic links that lead back to themselves; remove the loop"
    SYMLINK_OUTSIDE_SOURCE = (
        "SYMLINK_OUTSIDE_SOURCE",
        "link out of the source, not followed; copy its target into the export",
    )
    SYMLINK_INSIDE_SOURCE = (
        "SYMLINK_INSIDE_SOURCE",
        "link to a file or folder of the source; read under its own path, nothing to do",
    )
    # series level
    NO_GEOMETRY = "NO_GEOMETRY", "position/orientation/spacing tags missing; re-export with full headers"
    TOO_FEW_SLICES = "TOO_FEW_SLICES", "too few slices for a volume; check the series is complete"
    DUPLICATE_POSITION = "DUPLICATE_POSITION", "two slices at one position; remove duplicates or re-export"
    SLICE_GAP = "SLICE_GAP", "slices missing; re-export the complete series"
    NONUNIFORM_SPACING = "NONUNIFORM_SPACING", "uneven slice spacing; re-export or reconstruct at uniform spacing"
    GANTRY_TILT = (
        "GANTRY_TILT",
        "tilted gantry; reconstruct without tilt, or set geometry.irregular: resample in the spec (preprocess)",
    )
    MIXED_SERIES = "MIXED_SERIES", "one series mixes geometries; split it at the modality"
    CODEC_MISSING = (
        "CODEC_MISSING",
        "compressed with a codec no installed decoder reads (the detail names it); re-export uncompressed",
    )
    PIXEL_DECODE_ERROR = "PIXEL_DECODE_ERROR", "pixel data could not be decoded; re-export uncompressed"
    UNSUPPORTED_MULTIFRAME = (
        "UNSUPPORTED_MULTIFRAME",
        "multi-frame object without usable per-frame geometry; export as classic single-frame images",
    )
    UNSUPPORTED_PIXELS = "UNSUPPORTED_PIXELS", "colour or unusual pixels; not a greyscale volume"
    NOT_SINGLE_IMAGE = "NOT_SINGLE_IMAGE", "2D spec: export each view as its own single-frame series"
    # selection / study level
    MODALITY_NOT_SELECTED = "MODALITY_NOT_SELECTED", "modality not used by this spec"
    SERIES_NOT_SELECTED = "SERIES_NOT_SELECTED", "series not selected by the spec's description pattern"
    AMBIGUOUS_IMAGE_SERIES = (
        "AMBIGUOUS_IMAGE_SERIES",
        "several candidate images in a study; narrow the spec's series pattern",
    )
    # labels
    NO_LABEL = "NO_LABEL", "no label for this image (mask/NIfTI, or a row in --labels-csv); add it"
    LABEL_UNMATCHED = "LABEL_UNMATCHED", "label could not be matched to exactly one image"
    LABEL_GEOMETRY_MISMATCH = (
        "LABEL_GEOMETRY_MISMATCH",
        "label grid differs from its image; re-export the label on the image grid",
    )
    LABEL_VALUES_UNEXPECTED = (
        "LABEL_VALUES_UNEXPECTED",
        "label values outside the spec's classes; fix labels.values or the CSV, or set labels.others: background",
    )
    IMAGE_REFUSED = "IMAGE_REFUSED", "its image was refused; see the image's row"
    PARTNER_REFUSED = "PARTNER_REFUSED", "its label was refused (the detail names why); see the label's row"
    NOT_A_LABEL = "NOT_A_LABEL", "unreadable label file"
    LABEL_NOT_USED = "LABEL_NOT_USED", "segmentation label; a classification spec reads classes from the labels CSV"
    LABEL_SHEET = "LABEL_SHEET", "a CSV file, not an image; labels are read only through --labels-csv"
    FEDIMG_RECORD = (
        "FEDIMG_RECORD",
        "fedimg's own record of the folder (marker, journal, pull manifest); nothing to convert",
    )
    LABEL_UNREADABLE = (
        "LABEL_UNREADABLE",
        "no label found, and an UNREADABLE entry nearby may hold it; make it readable, run again",
    )
    # NIfTI data sets (preprocess --from-nifti)
    DATASET_DESCRIPTION = (
        "DATASET_DESCRIPTION",
        "the data set's dataset.json: read (pairs, labels, modality), not converted; nothing to do",
    )
    NOT_IN_DATASET = (
        "NOT_IN_DATASET",
        "not an image or label of the data set (not listed in dataset.json, or outside images/ and labels/)",
    )
    DATASET_TEST_IMAGE = (
        "DATASET_TEST_IMAGE",
        "an image of the data set's test part, which has no labels; nothing to train on",
    )
    NIFTI_UNREADABLE = "NIFTI_UNREADABLE", "NIfTI image could not be read (truncated, or not NIfTI); re-export it"
    MULTICHANNEL_IMAGE = (
        "MULTICHANNEL_IMAGE",
        "several channels in one case (4D image, or nnU-Net _0000/_0001 files); export one channel per case",
    )
    # output names
    UNSAFE_NAME = (
        "UNSAFE_NAME",
        "(0008,0018) is not a UID (digits and dots, <= 64), it would name a copy; fix or drop --write-dicom",
    )
    # de-identification
    BURNED_IN_ANNOTATION = (
        "BURNED_IN_ANNOTATION",
        "may carry burned-in text; review the pixels, then re-export with (0028,0301) NO",
    )

    def __str__(self) -> str:
        return self.value


class RefusedError(Exception):
    """A series or file cannot be converted correctly.

    Attributes:
        reason: the :class:`Reason` code.
        detail: a short, PHI-free explanation (numbers and tag names only).
    """

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail
