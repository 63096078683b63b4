"""Header-only index of a folder tree: which files are DICOM, and how they group.

Pixel data is never read here (values over 4 KiB are deferred), so indexing a large
export is fast. Files are grouped by (0020,000D) Study Instance UID and
(0020,000E) Series Instance UID, and a series that mixes orientations, matrix
sizes, echoes or (0020,0011) Series Numbers is split into sub-series: one
volume per group, never two series stacked (see :func:`group_series` for
mosaics, multi-frame objects and copies of a series in several folders).

The layout of a Siemens mosaic (CSA header (0029,1010)) and the per-frame
geometry of an enhanced multi-frame object ((5200,9230)) are header values
and are read here too; pixels are still never decoded.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import stat
import struct
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import pydicom
from pydicom.errors import InvalidDicomError

from fedimg.dicom.mosaic import MosaicError, MosaicInfo, is_mosaic_type, read_mosaic_info
from fedimg.dicom.multiframe import FrameInfo, MultiFrameError, read_frames
from fedimg.dicom.pixels import NativePixels, native_pixels
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
_DEFLATED_TS = "1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian
_UNDEFINED_LENGTH = 0xFFFFFFFF
_PREAMBLE_LEN = 128
_META_START = _PREAMBLE_LEN + 4 + 12  # preamble, 'DICM', (0002,0000) element (explicit VR UL)
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
        accession_number: (0008,0050) Accession Number (an identifier: used
            in memory only, to find a study's row in a site's labels CSV).
        identity_removed: (0012,0062) Patient Identity Removed is YES (the file says it was de-identified).
        patient_id: (0010,0020) Patient ID, as ``issuer|id`` when (0010,0021)
            Issuer of Patient ID is set (an identifier: used in memory only, to
            keep each patient's studies on one side of the split; empty when absent).
        imager_pixel_spacing: (0018,1164) Imager Pixel Spacing (row, column) of
            projection radiographs, used when (0028,0030) is absent.
        photometric_interpretation: (0028,0004), e.g. MONOCHROME1.
        native: where the uncompressed pixels lie in the file, for reading them by offset
            (:func:`fedimg.dicom.pixels.read_native`); None: the file is decoded by pydicom.
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
    # (0028,0301) Burned In Annotation as stored ("" when empty, None when absent)
    burned_in_annotation: str | None = None
    series_number: int | None = None
    acquisition_number: int | None = None
    transfer_syntax: str = ""
    spacing_between_slices: float | None = None
    mosaic: MosaicInfo | None = None
    frames: tuple[FrameInfo, ...] = ()
    layout_error: str = ""
    accession_number: str = ""
    patient_id: str = ""
    identity_removed: bool = False
    imager_pixel_spacing: tuple[float, float] | None = None
    photometric_interpretation: str = ""
    native: NativePixels | None = None

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
        # An object without pixels is a non-image object only when it names its
        # (0008,0016) SOP Class UID: an empty one is a broken file (refused by
        # :func:`read_header`), not something to skip.
        return bool(self.sop_class_uid) and not self.has_pixels


@dataclass
class FileProblem:
    """A file that could not be indexed as DICOM, or a folder entry that is not read.

    Attributes:
        path: the entry's path (under the scanned root, links not resolved).
        rel: path relative to the scanned root (for the manifest); a folder
            entry (an unreadable folder, a link to a folder) has its own row.
        reason: why it was not indexed.
        detail: PHI-free explanation (never the entry's name or a link's target).
        skipped: nothing is lost by not reading it (a link to an entry that is
            read under its own path); otherwise it is refused.
    """

    path: Path
    rel: str
    reason: Reason
    detail: str
    skipped: bool = False


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


def _os_error(exc: OSError) -> str:
    """``PermissionError, EACCES``: a PHI-free name for an OS error (its message may quote the path)."""
    code = errno.errorcode.get(exc.errno, str(exc.errno)) if exc.errno is not None else "no errno"
    return f"{type(exc).__name__}, {code}"


def _within(path: str, base: str) -> bool:
    """Whether the resolved ``path`` is ``base`` or below it."""
    return path == base or path.startswith(base.rstrip(os.sep) + os.sep)


def _link_problem(path: Path, rel: str, base: str) -> FileProblem:
    """The manifest fate of a symbolic link: links are never followed while walking.

    A link whose target lies inside the source is skipped (the target is
    walked and read under its own path: reading it twice would duplicate
    slices); a link out of the source is refused (its target is not the
    site's export); broken links and loops are refused with their own reasons.
    """
    try:
        st = os.stat(path)  # follows the link
    except (FileNotFoundError, NotADirectoryError):
        return FileProblem(path, rel, Reason.BROKEN_LINK, "symbolic link to a target that does not exist")
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return FileProblem(path, rel, Reason.SYMLINK_LOOP, "symbolic link that leads back to itself")
        return FileProblem(
            path, rel, Reason.UNREADABLE, f"symbolic link whose target cannot be read ({_os_error(exc)})"
        )
    kind = "folder" if stat.S_ISDIR(st.st_mode) else "file" if stat.S_ISREG(st.st_mode) else "special file"
    if not _within(os.path.realpath(path), base):
        return FileProblem(
            path,
            rel,
            Reason.SYMLINK_OUTSIDE_SOURCE,
            f"symbolic link to a {kind} outside the source folder; not followed",
        )
    return FileProblem(
        path,
        rel,
        Reason.SYMLINK_INSIDE_SOURCE,
        f"symbolic link to a {kind} inside the source folder, which is read under its own path",
        skipped=True,
    )


def _special_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device file"
    return "special file"


def walk_source(root: Path) -> Iterator[Path | FileProblem]:
    """Every entry under ``root``, in a stable order: regular files as paths, the rest as problems.

    Nothing outside ``root`` is read: symbolic links (to files or folders)
    are never followed but each gets a :class:`FileProblem` (see
    :func:`_link_problem`), as do FIFOs, sockets and device files
    (NOT_REGULAR_FILE) and folders that cannot be listed (UNREADABLE, one
    problem for the folder). A folder's files come before its sub-folders,
    names sorted, like ``os.walk``.

    Raises:
        OSError: ``root`` itself cannot be listed.
    """
    root = Path(root)
    base = os.path.realpath(root)  # SRC may itself be a link (the site named it): its target is the source
    stack = [""]
    while stack:
        prefix = stack.pop()
        folder = root / prefix if prefix else root
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            if not prefix:
                raise
            yield FileProblem(folder, prefix, Reason.UNREADABLE, f"folder could not be listed ({_os_error(exc)})")
            continue
        subfolders = []
        for entry in entries:
            rel = f"{prefix}/{entry.name}" if prefix else entry.name
            path = folder / entry.name
            try:
                if entry.is_symlink():
                    yield _link_problem(path, rel, base)
                elif entry.is_dir(follow_symlinks=False):
                    subfolders.append(rel)
                elif entry.is_file(follow_symlinks=False):
                    yield path
                else:
                    kind = _special_kind(entry.stat(follow_symlinks=False).st_mode)
                    yield FileProblem(path, rel, Reason.NOT_REGULAR_FILE, f"a {kind}, not a regular file")
            except OSError as exc:
                yield FileProblem(path, rel, Reason.UNREADABLE, f"entry could not be examined ({_os_error(exc)})")
        stack.extend(reversed(subfolders))


def iter_files(root: Path) -> Iterator[Path]:
    """All regular files under ``root``, recursively, in a stable order (see :func:`walk_source`)."""
    for entry in walk_source(root):
        if isinstance(entry, Path):
            yield entry


def _floats(value: object, n: int) -> tuple[float, ...] | None:
    if not isinstance(value, Iterable):
        return None
    try:
        items = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return items if len(items) == n else None


def _int(value: object) -> int | None:
    # Any header value is tried (the checker knows no int() of an object): what int() refuses is None.
    try:
        return int(value) if value not in (None, "") else None  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None


def _float(value: object) -> float | None:
    # As _int: any header value is tried, what float() refuses is None.
    try:
        return float(value) if value not in (None, "") else None  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _has_dicm_prefix(path: Path) -> bool:
    """Whether the file starts with the 128-byte preamble and the ``DICM`` prefix (PS3.10 7.1)."""
    try:
        with path.open("rb") as fh:
            head = fh.read(_PREAMBLE_LEN + 4)
    except OSError:
        return False
    return len(head) == _PREAMBLE_LEN + 4 and head[_PREAMBLE_LEN:] == b"DICM"


def _tag_name(tag: int) -> str:
    """``(gggg,eeee)``: a PHI-free name for a tag."""
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _truncation(ds: pydicom.Dataset, size: int, prefixed: bool) -> str:
    """Why ``ds`` was read from a truncated file, or ``""`` if nothing says so.

    pydicom stops quietly at the end of a file: a value cut short is returned
    shorter than its declared length, and a file cut inside its file meta
    gives a dataset with only some (0002,xxxx) elements. Three checks, all on
    header facts (no value is converted, no pixel is read):

    - the (0002,0000) File Meta Information Group Length promises more bytes
      than the file holds;
    - a value read into memory is shorter than its declared length;
    - a value left on disk (deferred, e.g. (7FE0,0010) Pixel Data) ends after
      the end of the file. Skipped for Deflated Explicit VR Little Endian
      (1.2.840.10008.1.2.1.99), whose value offsets are in the inflated
      stream, not in the file; decoding still catches real truncation there.

    Args:
        ds: a dataset read with deferred large values, none accessed yet.
        size: the file size in bytes.
        prefixed: the file has the preamble and ``DICM`` prefix.
    """
    meta = ds.file_meta
    group_length = meta.get("FileMetaInformationGroupLength") if meta is not None else None
    if prefixed and isinstance(group_length, int) and _META_START + group_length > size:
        return (
            f"file ends inside the file meta ((0002,0000) group length {group_length}, "
            f"{max(size - _META_START, 0)} bytes present)"
        )
    deflated = str(meta.get("TransferSyntaxUID", "")) == _DEFLATED_TS if meta is not None else False
    # keys(), not the Dataset itself: iterating a Dataset yields DataElements and reads every deferred value.
    for tag in ds.keys():  # noqa: SIM118
        raw = ds.get_item(tag, keep_deferred=True)
        length = getattr(raw, "length", None)
        if not isinstance(length, int) or length == _UNDEFINED_LENGTH:
            continue
        value = getattr(raw, "value", None)
        if isinstance(value, bytes) and len(value) < length:
            return f"{_tag_name(int(tag))} value needs {length} bytes, file ends after {len(value)}"
        tell = getattr(raw, "value_tell", None)
        if value is None and isinstance(tell, int) and not deflated and tell + length > size:
            what = "pixel data" if int(tag) in _PIXEL_TAGS else f"{_tag_name(int(tag))} value"
            return f"{what} needs {length} bytes, file ends after {max(size - tell, 0)}"
    return ""


def _patient_key(ds: pydicom.Dataset) -> str:
    """``issuer|id`` from (0010,0021) and (0010,0020); empty when the Patient ID is absent or blank."""
    pid = str(ds.get("PatientID", "") or "").strip()
    if not pid:
        return ""
    issuer = str(ds.get("IssuerOfPatientID", "") or "").strip()
    return f"{issuer}|{pid}" if issuer else pid


def read_header(path: Path, rel: str) -> DicomHeader | FileProblem:
    """Read one file's header; return a :class:`FileProblem` if it is not usable DICOM.

    Refusals (file level): UNREADABLE when the OS refuses to open or read the
    file (an ``OSError`` with an errno: permissions, I/O error); NOT_DICOM
    for files pydicom cannot parse or that
    name no (0008,0016) SOP Class UID and hold no pixel data; TRUNCATED when
    the file ends before a value it declares (see :func:`_truncation`) or the
    parser runs out of bytes after a ``DICM`` prefix; NO_PIXELS for an image
    SOP class without (7FE0,0010) Pixel Data.
    """
    try:
        # Taken before the read: a file changed during or after it no longer matches (see read_native).
        before: os.stat_result | None = path.stat()
    except OSError:
        before = None
    try:
        # defer_size keeps large values (pixel data) on disk: one pass, no pixel decode.
        ds = pydicom.dcmread(path, defer_size=4096)
    except InvalidDicomError:
        return FileProblem(path, rel, Reason.NOT_DICOM, "no DICOM preamble/prefix or file meta")
    except OSError as exc:
        if exc.errno is not None:
            # The OS refused (permissions, I/O error): the file may be fine, it was not read.
            return FileProblem(path, rel, Reason.UNREADABLE, f"file could not be opened or read ({_os_error(exc)})")
        # pydicom's own OSError ("No tag to read at file position ..."): the bytes ran out.
        return FileProblem(path, rel, Reason.TRUNCATED, f"header could not be read ({type(exc).__name__})")
    except EOFError as exc:
        return FileProblem(path, rel, Reason.TRUNCATED, f"header could not be read ({type(exc).__name__})")
    except struct.error:
        # pydicom unpacks a tag or length from too few bytes: a header cut short.
        if _has_dicm_prefix(path):
            return FileProblem(path, rel, Reason.TRUNCATED, "header cut short (struct.error reading a tag or length)")
        return FileProblem(path, rel, Reason.NOT_DICOM, "unreadable header (struct.error)")
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on corrupt input
        return FileProblem(path, rel, Reason.NOT_DICOM, f"unreadable header ({type(exc).__name__})")

    size = path.stat().st_size
    prefixed = _has_dicm_prefix(path)
    cut = _truncation(ds, size, prefixed)
    if cut:
        return FileProblem(path, rel, Reason.TRUNCATED, cut)
    is_dicomdir = ds.file_meta.get("MediaStorageSOPClassUID", "") == "1.2.840.10008.1.3.10" or (
        "DirectoryRecordSequence" in ds
    )
    sop_class = str(ds.get("SOPClassUID", ds.file_meta.get("MediaStorageSOPClassUID", "")))
    spacing = _floats(ds.get("PixelSpacing"), 2)
    imager_spacing = _floats(ds.get("ImagerPixelSpacing"), 2)
    try:
        inst = int(ds.get("InstanceNumber")) if ds.get("InstanceNumber") not in (None, "") else None
    except (TypeError, ValueError):
        inst = None
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        frames = 1
    has_pixels = any(t in ds for t in _PIXEL_TAGS)
    if not has_pixels and not is_dicomdir and not sop_class:
        # Nothing says what this is: e.g. 128 zero bytes + 'DICM' + garbage, which
        # pydicom reads as an empty dataset. Not a "non-image object" to skip.
        if prefixed and size <= _PREAMBLE_LEN + 4:
            return FileProblem(path, rel, Reason.TRUNCATED, "file ends after the DICM prefix")
        return FileProblem(path, rel, Reason.NOT_DICOM, "no (0008,0016) SOP Class UID and no pixel data")
    # (0028,0010) Rows / (0028,0011) Columns may be present but empty (zero length):
    # None here, refused later as NO_GEOMETRY.
    rows = _int(ds.get("Rows"))
    columns = _int(ds.get("Columns"))
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
    # Pixel data cut by the end of the file was refused above (_truncation).
    if (
        not has_pixels
        and sop_class.startswith(_IMAGE_SOP_PREFIXES)
        and not sop_class.startswith(_NON_IMAGE_SOP_PREFIXES)
        and sop_class != _KOS_SOP
        and not is_dicomdir
    ):
        return FileProblem(
            path, rel, Reason.NO_PIXELS, "image object without (7FE0,0010) Pixel Data; the file may be truncated"
        )
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
        burned_in_annotation=(str(ds.get("BurnedInAnnotation") or "") if "BurnedInAnnotation" in ds else None),
        series_number=_int(ds.get("SeriesNumber")),
        acquisition_number=_int(ds.get("AcquisitionNumber")),
        transfer_syntax=str(ds.file_meta.get("TransferSyntaxUID", "")),
        spacing_between_slices=_float(ds.get("SpacingBetweenSlices")),
        mosaic=mosaic,
        frames=frame_info,
        layout_error=layout_error,
        accession_number=str(ds.get("AccessionNumber", "") or ""),
        patient_id=_patient_key(ds),
        identity_removed=str(ds.get("PatientIdentityRemoved", "") or "").strip().upper() == "YES",
        imager_pixel_spacing=(imager_spacing[0], imager_spacing[1]) if imager_spacing else None,
        photometric_interpretation=str(ds.get("PhotometricInterpretation", "") or "").strip().upper(),
        native=native_pixels(ds, before) if has_pixels and before is not None else None,
    )


def _unreadable(path: Path, rel: str) -> FileProblem | None:
    """An UNREADABLE problem if the OS refuses to open ``path`` for reading, else None.

    ``O_NONBLOCK``: a file swapped for a FIFO since the walk must not hang the run.
    """
    try:
        os.close(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)))
    except OSError as exc:
        return FileProblem(path, rel, Reason.UNREADABLE, f"file could not be opened ({_os_error(exc)})")
    return None


class _Progress(Protocol):
    """A tqdm-like progress bar: :func:`scan` only calls ``update``."""

    def update(self, n: int = 1, /) -> object: ...


def _index_entry(
    entry: Path | FileProblem, root: Path, claim: tuple[str, ...]
) -> DicomHeader | FileProblem | tuple[Path, str]:
    """What :func:`scan` records for one entry: its header, its problem, or (path, rel) of a claimed file."""
    import re

    # An entry that is not read (link, special file, unreadable folder) arrives as its problem; a file
    # the OS refuses to open is one too, also a claimed one (a label that cannot be read is reported).
    if isinstance(entry, FileProblem):
        return entry
    rel = entry.relative_to(root).as_posix()
    problem = _unreadable(entry, rel)
    if problem is not None:
        return problem
    if any(re.search(p, entry.name) for p in claim):
        return entry, rel
    return read_header(entry, rel)


def _index_chunk(chunk: list[Path | FileProblem], root: Path, claim: tuple[str, ...]) -> list:
    """:func:`_index_entry` of several entries, in a worker process (pydicom's warnings quoting values silenced)."""
    from fedimg.dicom.quiet import quiet_dicom

    with quiet_dicom():
        return [_index_entry(e, root, claim) for e in chunk]


def scan(
    root: Path,
    claim: Iterable[str] = (),
    progress: _Progress | None = None,
    entries: Iterable[Path | FileProblem] | None = None,
    executor: Executor | None = None,
) -> Index:
    """Index every entry under ``root``.

    Args:
        root: folder to scan recursively.
        claim: regular expressions (on the file name) of non-DICOM files that
            another step handles, e.g. NIfTI labels; they are not reported as
            ``NOT_DICOM`` (but as UNREADABLE when they cannot be opened).
        progress: optional tqdm-like object with ``update(n)``.
        entries: the result of :func:`walk_source` on ``root``, when the
            caller has walked it already (default: walk it here).
        executor: worker processes that read the headers in chunks (the result, order included, is the
            same as without); None reads them here.
    """
    import re

    claimed = tuple(claim)
    for p in claimed:
        re.compile(p)  # a bad pattern fails here, in the caller, not in a worker
    headers: list[DicomHeader] = []
    problems: list[FileProblem] = []
    other: list[tuple[Path, str]] = []
    items = walk_source(root) if entries is None else entries
    results: Iterable[list]
    if executor is None:
        results = ([_index_entry(e, root, claimed)] for e in items)
    else:
        listed = list(items)
        size = max(1, min(32, len(listed) // 16))  # small chunks: the progress bar moves, the workers stay even
        chunks = [listed[i : i + size] for i in range(0, len(listed), size)]
        results = executor.map(_index_chunk, chunks, [root] * len(chunks), [claimed] * len(chunks))
    for chunk in results:
        for result in chunk:
            if isinstance(result, DicomHeader):
                headers.append(result)
            elif isinstance(result, FileProblem):
                problems.append(result)
            else:
                other.append(result)
        if progress is not None:
            progress.update(len(chunk))
    return Index(root=root, headers=headers, problems=problems, other_files=other)


def _round_iop(iop: tuple[float, ...] | None, tol: float) -> tuple | None:
    """(0020,0037) rounded to the grouping tolerance.

    A NaN or infinite component is kept as its text ("nan", "inf"): the slices
    still group together and :func:`fedimg.dicom.geometry.compute_geometry`
    refuses them as NO_GEOMETRY (``round`` of NaN would raise).
    """
    if iop is None:
        return None
    step = max(tol, 1e-6) * 10
    return tuple(round(v / step) if math.isfinite(v) else str(v) for v in iop)


def _position_key(h: DicomHeader) -> tuple | None:
    """A slice's position rounded to 1 micrometre (duplicates compare equal)."""
    if h.ipp is None or not all(math.isfinite(v) for v in h.ipp):
        return None  # a non-finite position is refused by the geometry checks
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
                sub = by_folder.setdefault(
                    h.folder, SeriesGroup(g.study_uid, g.series_uid, g.key + ("folder", h.folder))
                )
                sub.headers.append(h)
            out.extend(by_folder.values())
        else:
            out.append(g)
    out.sort(key=lambda g: (g.study_uid, g.series_uid, g.first.rel))
    return out
