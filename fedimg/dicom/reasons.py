"""Reason codes for files and series that are not converted.

Every input file ends in exactly one manifest row whose ``reason`` is one of
these codes (or empty for a converted file). Codes are stable strings: tools
and people grep for them.
"""

from __future__ import annotations

from enum import Enum


class Reason(str, Enum):
    """Why a file or series was refused or skipped."""

    # file level
    NOT_DICOM = "NOT_DICOM"
    TRUNCATED = "TRUNCATED"
    NO_PIXELS = "NO_PIXELS"
    NON_IMAGE_OBJECT = "NON_IMAGE_OBJECT"
    LOCALIZER = "LOCALIZER"
    # folder entries that are not read (symbolic links, special files, permissions)
    UNREADABLE = "UNREADABLE"  # a file or folder the OS refused to open or list (permissions, I/O error)
    NOT_REGULAR_FILE = "NOT_REGULAR_FILE"  # a FIFO, socket or device file
    BROKEN_LINK = "BROKEN_LINK"  # a symbolic link whose target does not exist
    SYMLINK_LOOP = "SYMLINK_LOOP"  # a symbolic link that resolves to itself through other links
    SYMLINK_OUTSIDE_SOURCE = "SYMLINK_OUTSIDE_SOURCE"  # a link to a file or folder outside SRC: not followed
    SYMLINK_INSIDE_SOURCE = "SYMLINK_INSIDE_SOURCE"  # a link to an entry inside SRC, read under its own path (skipped)
    # series level
    NO_GEOMETRY = "NO_GEOMETRY"
    TOO_FEW_SLICES = "TOO_FEW_SLICES"
    DUPLICATE_POSITION = "DUPLICATE_POSITION"
    SLICE_GAP = "SLICE_GAP"
    NONUNIFORM_SPACING = "NONUNIFORM_SPACING"
    GANTRY_TILT = "GANTRY_TILT"
    MIXED_SERIES = "MIXED_SERIES"
    CODEC_MISSING = "CODEC_MISSING"
    PIXEL_DECODE_ERROR = "PIXEL_DECODE_ERROR"
    UNSUPPORTED_MULTIFRAME = "UNSUPPORTED_MULTIFRAME"
    UNSUPPORTED_PIXELS = "UNSUPPORTED_PIXELS"
    NOT_SINGLE_IMAGE = "NOT_SINGLE_IMAGE"  # a 2D spec met a series of several instances or frames
    # selection / study level
    MODALITY_NOT_SELECTED = "MODALITY_NOT_SELECTED"
    SERIES_NOT_SELECTED = "SERIES_NOT_SELECTED"
    AMBIGUOUS_IMAGE_SERIES = "AMBIGUOUS_IMAGE_SERIES"
    # labels
    NO_LABEL = "NO_LABEL"
    LABEL_UNMATCHED = "LABEL_UNMATCHED"
    LABEL_GEOMETRY_MISMATCH = "LABEL_GEOMETRY_MISMATCH"
    LABEL_VALUES_UNEXPECTED = "LABEL_VALUES_UNEXPECTED"
    IMAGE_REFUSED = "IMAGE_REFUSED"
    NOT_A_LABEL = "NOT_A_LABEL"
    LABEL_NOT_USED = "LABEL_NOT_USED"  # a segmentation label met by a classification spec (skipped)
    LABEL_SHEET = "LABEL_SHEET"  # a CSV file in the export: labels come only through --labels-csv (skipped)
    LABEL_UNREADABLE = "LABEL_UNREADABLE"  # no label found, and an unreadable entry near the image may hold it
    # output names
    UNSAFE_NAME = "UNSAFE_NAME"  # a header value that names an output file is not a valid UID (--write-dicom)
    # de-identification
    BURNED_IN_ANNOTATION = "BURNED_IN_ANNOTATION"

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
