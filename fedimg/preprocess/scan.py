"""The first stage shared by ``convert`` and ``preprocess``: check the source, index it.

Non-image objects and localizers are skipped with a reason here; what is
left are image headers, ready to be grouped into series.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

from tqdm.std import tqdm  # not tqdm.auto: it imports asyncio and notebook support at every start-up

from fedimg.dicom.index import DicomHeader, FileProblem, Index, scan, walk_source
from fedimg.dicom.reasons import Reason
from fedimg.errors import UserError
from fedimg.preprocess.manifest import REFUSED, SKIPPED, ManifestRow
from fedimg.preprocess.outdir import RECORD_FILES, read_marker


class PreprocessInputError(UserError, ValueError):
    """The source folder cannot be processed at all (missing, empty, no DICOM)."""


@dataclass
class ScanResult:
    """Everything the later stages start from."""

    files: list[str]  # every input entry (files, links, special files, unreadable folders), relative POSIX path
    index: Index
    rows: dict[str, ManifestRow]  # files already decided (problems, non-image, localizers)
    image_headers: list[DicomHeader]


def check_source(src: Path, what: str = "DICOM files") -> list[Path | FileProblem]:
    """All entries under ``src`` (see :func:`fedimg.dicom.index.walk_source`).

    Clear errors for a missing, non-folder, unlistable or empty source.

    Args:
        what: what the folder should hold, as the errors say it.
    """
    if not src.exists():
        raise PreprocessInputError(
            f"source folder does not exist: expected a folder of {what}, found nothing at the "
            "given path; check the SRC argument"
        )
    if not src.is_dir():
        raise PreprocessInputError(f"source is a file: expected a folder of {what}; pass its parent folder")
    try:
        entries = list(walk_source(src))
    except OSError as exc:
        raise PreprocessInputError(
            f"source folder could not be listed ({type(exc).__name__}): expected a folder this user may read; "
            "check its permissions"
        ) from None
    if not entries:
        raise PreprocessInputError(f"source folder is empty: expected {what} (any depth), found 0 files")
    return entries


def index_source(
    src: Path,
    claim: Iterable[str] = (),
    label: str = "",
    progress: bool = True,
    executor: Callable[[int], Executor | None] | None = None,
) -> ScanResult:
    """Index ``src`` (headers only) and decide the files that carry no image volume.

    Args:
        executor: given the number of entries, worker processes to read the headers in
            (see :func:`fedimg.dicom.index.scan`), or None to read them in this process.

    Raises:
        PreprocessInputError: see :func:`check_source`, or no DICOM file at all.
    """
    entries = check_source(src)
    with tqdm(
        total=len(entries), desc=f"{label}: index" if label else "index", unit="file", disable=not progress
    ) as bar:
        pool = executor(len(entries)) if executor is not None else None
        index = scan(src, claim=claim, progress=bar, entries=entries, executor=pool)
    if not index.headers:
        reasons = Counter(p.reason.value for p in index.problems)
        found = ", ".join(f"{n} {r}" for r, n in reasons.most_common()) or "only non-DICOM label files"
        raise PreprocessInputError(
            f"no DICOM files in source: expected DICOM files (any depth), found {len(entries)} file(s): {found}"
        )
    rows: dict[str, ManifestRow] = {}
    own = read_marker(src) is not None  # a folder fedimg made, e.g. a pull: its records are not images
    for p in index.problems:
        if own and p.rel in RECORD_FILES:
            rows[p.rel] = ManifestRow(p.rel, SKIPPED, Reason.FEDIMG_RECORD.value, "fedimg's record of this folder")
            continue
        rows[p.rel] = ManifestRow(p.rel, SKIPPED if p.skipped else REFUSED, p.reason.value, p.detail)
    image_headers: list[DicomHeader] = []
    for h in index.headers:
        if h.is_non_image:
            rows[h.rel] = ManifestRow(
                h.rel, SKIPPED, Reason.NON_IMAGE_OBJECT.value, f"modality {h.modality or '?'}, not an image volume"
            )
        elif h.is_localizer:
            rows[h.rel] = ManifestRow(h.rel, SKIPPED, Reason.LOCALIZER.value, "(0008,0008) Image Type LOCALIZER")
        else:
            image_headers.append(h)
    # Every entry is an input: regular files, and the links, special files and unreadable folders
    # that were not read (each has its row above).
    files = [e.rel if isinstance(e, FileProblem) else e.relative_to(src).as_posix() for e in entries]
    return ScanResult(files=files, index=index, rows=rows, image_headers=image_headers)
