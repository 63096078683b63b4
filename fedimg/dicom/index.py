"""Header-only index of a folder tree: which files are DICOM, and how they group.

Pixel data is never read here (values over 4 KiB are deferred), so indexing a large
export is fast. Files are grouped by (0020,000D) Study Instance UID and
(0020,000E) Series Instance UID, and a series that mixes orientations, matrix
sizes or echoes is split into sub-series: one volume per group, never two
series stacked.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import pydicom
from pydicom.errors import InvalidDicomError

from fedimg.dicom.mosaic import MosaicError, MosaicInfo, is_mosaic_type, read_mosaic_info
from fedimg.dicom.multiframe import FrameInfo, MultiFrameError, read_frames
from fedimg.dicom.reasons import Reason

logger = logging.getLogger(__name__)

# SOP classes that carry no image volume: SR, PR, KOS, RTSTRUCT, raw data...
_NON_IMAGE_MODALITIES = {"SR", "PR", "KO", "RTSTRUCT", "RTPLAN", "RTRECORD", "REG", "DOC"}
_IMAGE_SOP_PREFIXES = ("1.2.840.10008.5.1.4.1.1.",)
_NON_IMAGE_SOP_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.88.",  # structured reports
    "1.2.840.10008.5.1.4.1.1.11.",  # presentation states
    "1.2.840.10008.5.1.4.1.1.481.",  # RT objects (RTSTRUCT, RTPLAN...)
    "1.2.840.10008.5.1.4.1.1.66",  # raw data, registration
    "1.2.840.10008.5.1.4.1.1.104.",  # encapsulated documents
)
_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # Pixel Data, Float, Double Float
_KOS_SOP = "1.2.840.10008.5.1.4.1.1.88.59"
_ENHANCED_SOP = {
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT
    "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR
    "1.2.840.10008.5.1.4.1.1.4.4",  # Legacy converted enhanced MR
    "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation
}


@dataclass
class DicomHeader:
    """The header facts fedimg needs from one DICOM file (no pixels).

    Attributes:
        path: absolute path of the file.
        rel: path relative to the scanned root (for the manifest).
        series_number: (0020,0011) Series Number; copies of one series saved
            under one Series Instance UID with different numbers are split on it.
        acquisition_number: (0020,0012) Acquisition Number.
        transfer_syntax: (0002,0010) Transfer Syntax UID.
        spacing_between_slices: (0018,0088) Spacing Between Slices (used only for
            mosaics, whose file carries a single position).
        mosaic: layout of a Siemens mosaic, from the CSA header.
        frames: per-frame geometry of an enhanced multi-frame object.
        layout_error: PHI-free reason the mosaic / multi-frame layout could not be
            read (the series is refused on it).
    """

    path: Path
    rel: str
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    modality: str
    series_description: str
    image_type: tuple[str, ...]
    frame_of_reference_uid: str | None
    rows: int | None
    columns: int | None
    iop: tuple[float, ...] | None
    ipp: tuple[float, ...] | None
    pixel_spacing: tuple[float, float] | None
    instance_number: int | None
    echo_number: str | None
    number_of_frames: int
    has_pixels: bool
    is_dicomdir: bool = False
    series_number: int | None = None
    acquisition_number: int | None = None
    transfer_syntax: str = ""
    spacing_between_slices: float | None = None
    mosaic: MosaicInfo | None = None
    frames: tuple[FrameInfo, ...] = ()
    layout_error: str = ""

    @property
    def folder(self) -> str:
        """Relative folder of the file (for splitting copies of one series)."""
        return self.rel.rsplit("/", 1)[0] if "/" in self.rel else ""

    @property
    def is_mosaic(self) -> bool:
        """A Siemens mosaic: one file holds a whole volume as tiles ((0008,0008) Image Type MOSAIC)."""
        return is_mosaic_type(self.image_type)

    @property
    def is_localizer(self) -> bool:
        """(0008,0008) Image Type says LOCALIZER (scout / topogram)."""
        return "LOCALIZER" in self.image_type

    @property
    def is_enhanced(self) -> bool:
        """An enhanced (multi-frame) object: per-frame geometry lives in (5200,9230)."""
        return self.sop_class_uid in _ENHANCED_SOP or self.number_of_frames > 1

    @property
    def is_non_image(self) -> bool:
        """SR, PR, KOS, RTSTRUCT and other objects without an image volume."""
        if self.is_dicomdir:
            return True
        if self.modality.upper() in _NON_IMAGE_MODALITIES:
            return True
        if self.sop_class_uid.startswith(_NON_IMAGE_SOP_PREFIXES) or self.sop_class_uid == _KOS_SOP:
            return self.sop_class_uid != "1.2.840.10008.5.1.4.1.1.66.4"  # SEG is an image-like label
        return not self.has_pixels


@dataclass
class FileProblem:
    """A file that could not be indexed as DICOM."""

    path: Path
    rel: str
    reason: Reason
    detail: str


@dataclass
class SeriesGroup:
    """Files of one series that share orientation, matrix size and echo."""

    study_uid: str
    series_uid: str
    key: tuple
    headers: list[DicomHeader] = field(default_factory=list)

    @property
    def first(self) -> DicomHeader:
        """A representative header."""
        return self.headers[0]

    @property
    def modality(self) -> str:
        """(0008,0060) Modality."""
        return self.first.modality

    @property
    def description(self) -> str:
        """(0008,103E) Series Description (site-local use only: may carry PHI)."""
        return self.first.series_description

    @property
    def rels(self) -> list[str]:
        """Relative paths of the files in this group."""
        return [h.rel for h in self.headers]


@dataclass
class Index:
    """Everything found under a root folder."""

    root: Path
    headers: list[DicomHeader]
    problems: list[FileProblem]
    other_files: list[tuple[Path, str]]  # non-DICOM files claimed by another step (e.g. NIfTI labels)

    @property
    def n_files(self) -> int:
        """Number of files scanned."""
        return len(self.headers) + len(self.problems) + len(self.other_files)


def iter_files(root: Path) -> Iterator[Path]:
    """All regular files under ``root``, recursively, in a stable order."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if p.is_file():
                yield p


def _floats(value: object, n: int) -> tuple[float, ...] | None:
    try:
        items = tuple(float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    return items if len(items) == n else None


def _int(value: object) -> int | None:
    try:
        return int(value) if value not in (None, "") else None  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None


def _float(value: object) -> float | None:
    try:
        return float(value) if value not in (None, "") else None  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def read_header(path: Path, rel: str) -> DicomHeader | FileProblem:
    """Read one file's header; return a :class:`FileProblem` if it is not usable DICOM."""
    try:
        # defer_size keeps large values (pixel data) on disk: one pass, no pixel decode.
        ds = pydicom.dcmread(path, defer_size=4096)
    except InvalidDicomError:
        return FileProblem(path, rel, Reason.NOT_DICOM, "no DICOM preamble/prefix or file meta")
    except (EOFError, OSError) as exc:
        return FileProblem(path, rel, Reason.TRUNCATED, f"header could not be read ({type(exc).__name__})")
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on corrupt input
        return FileProblem(path, rel, Reason.NOT_DICOM, f"unreadable header ({type(exc).__name__})")

    is_dicomdir = ds.file_meta.get("MediaStorageSOPClassUID", "") == "1.2.840.10008.1.3.10" or (
        "DirectoryRecordSequence" in ds
    )
    sop_class = str(ds.get("SOPClassUID", ds.file_meta.get("MediaStorageSOPClassUID", "")))
    spacing = _floats(ds.get("PixelSpacing"), 2)
    try:
        inst = int(ds.get("InstanceNumber")) if ds.get("InstanceNumber") not in (None, "") else None
    except (TypeError, ValueError):
        inst = None
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        frames = 1
    has_pixels = any(t in ds for t in _PIXEL_TAGS)
    rows = int(ds.Rows) if "Rows" in ds else None
    columns = int(ds.Columns) if "Columns" in ds else None
    image_type = tuple(str(v).upper() for v in (ds.get("ImageType") or []))
    mosaic: MosaicInfo | None = None
    frame_info: tuple[FrameInfo, ...] = ()
    layout_error = ""
    if has_pixels and is_mosaic_type(image_type) and rows and columns:
        try:
            mosaic = read_mosaic_info(ds, rows, columns)
        except MosaicError as exc:
            layout_error = str(exc)
    if (has_pixels and frames > 1) or (sop_class in _ENHANCED_SOP and "PerFrameFunctionalGroupsSequence" in ds):
        try:
            frame_info = read_frames(ds)
        except MultiFrameError as exc:
            layout_error = str(exc)
    if has_pixels:
        # A deferred element knows where its value starts and how long it is: a file
        # that ends before that is truncated (decoding it would fail or read garbage).
        tag = next(t for t in _PIXEL_TAGS if t in ds)
        raw = ds.get_item(tag, keep_deferred=True)
        length = getattr(raw, "length", None)
        tell = getattr(raw, "value_tell", None)
        if length is not None and tell is not None and length != 0xFFFFFFFF:
            size = path.stat().st_size
            if tell + length > size:
                return FileProblem(path, rel, Reason.TRUNCATED,
                                   f"pixel data needs {length} bytes, file ends after {size - tell}")
    elif sop_class.startswith(_IMAGE_SOP_PREFIXES) and not sop_class.startswith(_NON_IMAGE_SOP_PREFIXES) \
            and sop_class != _KOS_SOP and not is_dicomdir:
        return FileProblem(path, rel, Reason.NO_PIXELS,
                           "image object without (7FE0,0010) Pixel Data; the file may be truncated")
    return DicomHeader(
        path=path,
        rel=rel,
        sop_class_uid=sop_class,
        sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
        study_uid=str(ds.get("StudyInstanceUID", "")),
        series_uid=str(ds.get("SeriesInstanceUID", "")),
        modality=str(ds.get("Modality", "")),
        series_description=str(ds.get("SeriesDescription", "")),
        image_type=image_type,
        frame_of_reference_uid=str(ds.FrameOfReferenceUID) if "FrameOfReferenceUID" in ds else None,
        rows=rows,
        columns=columns,
        iop=_floats(ds.get("ImageOrientationPatient"), 6),
        ipp=_floats(ds.get("ImagePositionPatient"), 3),
        pixel_spacing=(spacing[0], spacing[1]) if spacing else None,
        instance_number=inst,
        echo_number=str(ds.get("EchoNumbers", "")) or None,
        number_of_frames=frames,
        has_pixels=has_pixels,
        is_dicomdir=is_dicomdir,
        series_number=_int(ds.get("SeriesNumber")),
        acquisition_number=_int(ds.get("AcquisitionNumber")),
        transfer_syntax=str(ds.file_meta.get("TransferSyntaxUID", "")),
        spacing_between_slices=_float(ds.get("SpacingBetweenSlices")),
        mosaic=mosaic,
        frames=frame_info,
        layout_error=layout_error,
    )


def scan(root: Path, claim: Iterable[str] = (), progress: object | None = None) -> Index:
    """Index every file under ``root``.

    Args:
        root: folder to scan recursively.
        claim: regular expressions (on the file name) of non-DICOM files that
            another step handles, e.g. NIfTI labels; they are not reported as
            ``NOT_DICOM``.
        progress: optional tqdm-like object with ``update(n)``.
    """
    import re

    patterns = [re.compile(p) for p in claim]
    headers: list[DicomHeader] = []
    problems: list[FileProblem] = []
    other: list[tuple[Path, str]] = []
    for path in iter_files(root):
        rel = path.relative_to(root).as_posix()
        if any(p.search(path.name) for p in patterns):
            other.append((path, rel))
        else:
            result = read_header(path, rel)
            (headers if isinstance(result, DicomHeader) else problems).append(result)  # type: ignore[arg-type]
        if progress is not None:
            progress.update(1)  # type: ignore[attr-defined]
    return Index(root=root, headers=headers, problems=problems, other_files=other)


def _round_iop(iop: tuple[float, ...] | None, tol: float) -> tuple | None:
    if iop is None:
        return None
    step = max(tol, 1e-6) * 10
    return tuple(round(v / step) for v in iop)


def _position_key(h: DicomHeader) -> tuple | None:
    """A slice's position rounded to 1 micrometre (duplicates compare equal)."""
    if h.ipp is None:
        return None
    return tuple(round(v, 3) for v in h.ipp)


def _has_duplicates(headers: list[DicomHeader]) -> bool:
    """Whether a group holds the same instance, or the same position, twice."""
    uids = [h.sop_instance_uid for h in headers if h.sop_instance_uid]
    if len(uids) != len(set(uids)):
        return True
    positions = [_position_key(h) for h in headers]
    known = [p for p in positions if p is not None]
    return len(known) != len(set(known))


def group_series(headers: list[DicomHeader], orientation_tolerance: float = 1e-4) -> list[SeriesGroup]:
    """Group image headers into series, split by orientation, matrix size and echo.

    Beyond (0020,000E) Series Instance UID, a group is split on:

    - (0020,0011) Series Number: two exports that reuse one Series Instance UID
      with different numbers are different series (dcm2niix splits them too).
    - one file per group for Siemens mosaics and enhanced multi-frame objects:
      each such file already holds a complete volume (a time point of an fMRI
      run, one echo...), so stacking two of them would double every slice.
    - the folder, when the group holds one (0008,0018) SOP Instance UID or one
      (0020,0032) position twice and its files span several folders: the same
      series copied twice (e.g. re-exported in another transfer syntax) is two
      copies, not one volume. A series spread over several folders without
      duplicates (PACS exports that cap files per folder) stays one group.
      Duplicates that remain inside one folder are refused later
      (DUPLICATE_POSITION), never silently dropped.
    """
    groups: dict[tuple, SeriesGroup] = {}
    for h in headers:
        key: tuple = (
            h.study_uid,
            h.series_uid,
            _round_iop(h.iop, orientation_tolerance),
            h.rows,
            h.columns,
            h.echo_number,
            h.series_number,
        )
        if h.is_mosaic or h.number_of_frames > 1 or h.frames:
            key = key + ("file", h.rel)
        if key not in groups:
            groups[key] = SeriesGroup(h.study_uid, h.series_uid, key)
        groups[key].headers.append(h)
    out: list[SeriesGroup] = []
    for g in groups.values():
        folders = {h.folder for h in g.headers}
        if len(folders) > 1 and _has_duplicates(g.headers):
            by_folder: dict[str, SeriesGroup] = {}
            for h in g.headers:
                sub = by_folder.setdefault(h.folder, SeriesGroup(g.study_uid, g.series_uid, g.key + ("folder", h.folder)))
                sub.headers.append(h)
            out.extend(by_folder.values())
        else:
            out.append(g)
    out.sort(key=lambda g: (g.study_uid, g.series_uid, g.first.rel))
    return out


def split_counts(groups: list[SeriesGroup]) -> dict[str, int]:
    """How many groups each series was split into (for the MIXED_SERIES note)."""
    counts: dict[str, int] = defaultdict(int)
    for g in groups:
        counts[g.series_uid] += 1
    return dict(counts)
