"""What ``fedimg predict`` reads: the studies under SRC and each study's image, chosen as preprocessing chooses it.

SRC is a DICOM study folder, a PACS export holding several studies, NIfTI
images, or a single NIfTI file. DICOM files are indexed from their headers
and every study's image series is selected by
:func:`fedimg.preprocess.plan.select_series` with the package's own spec
(modality, series description, geometry checks): the same series that
preprocessing would have turned into a training case. NIfTI files whose
name matches ``series.label_nifti_name_regex`` are labels and are skipped;
every other NIfTI file is one image (3D specs only: a 2D spec needs the
DICOM pixel spacing).
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedimg.config import PreprocessSpec
from fedimg.dicom.index import SeriesGroup, scan
from fedimg.dicom.reasons import Reason
from fedimg.preprocess.scan import PreprocessInputError

NIFTI_REGEX = r"(?i)\.nii(\.gz)?$"
CSV_REGEX = r"(?i)\.csv$"


@dataclass
class StudyInput:
    """One image to predict on.

    Attributes:
        kind: ``dicom`` or ``nifti``.
        study_uid: (0020,000D) Study Instance UID (DICOM; an identifier: memory only).
        series_uid: (0020,000E) Series Instance UID of the image series (DICOM).
        accession: (0008,0050) Accession Number (DICOM; memory only).
        group: the image series (DICOM).
        geometry: its validated geometry (``SeriesGeometry`` or ``PlanarGeometry``).
        path: the NIfTI file (NIfTI).
        rel: the series folder or file relative to SRC (spells out names in a PACS
            export: written only with --keep-identifiers or into the crosswalk).
        refusal: (reason, PHI-free detail) when the study cannot be predicted.
    """

    kind: str
    rel: str
    study_uid: str = ""
    series_uid: str = ""
    accession: str = ""
    group: SeriesGroup | None = None
    geometry: Any = None
    path: Path | None = None
    refusal: tuple[Reason, str] | None = None
    files: int = 1

    def study_id(self, pseudonymizer: Any | None) -> str:
        """The opaque id that names the study's outputs.

        With the site secret: the keyed case pseudonym ``fedimg preprocess``
        gives the same series (:meth:`fedimg.dicom.deid.Pseudonymizer.case`);
        without (``--keep-identifiers``): the unkeyed case id of
        ``preprocess --no-deid``. A NIfTI input: a (keyed) hash of its path.
        """
        if self.kind == "dicom":
            if pseudonymizer is not None:
                return pseudonymizer.case(self.study_uid, self.series_uid)
            from fedimg.preprocess.cases import case_id_for

            return case_id_for(self.study_uid, self.series_uid)
        if pseudonymizer is not None:
            return "nifti-" + pseudonymizer.path_hash(self.rel)
        return "nifti-" + hashlib.sha256(self.rel.encode()).hexdigest()[:16]

    def series(self) -> SeriesGroup:
        """The image series of a DICOM input.

        Raises:
            ValueError: the input is not a DICOM series (a NIfTI file has none).
        """
        if self.group is None:
            raise ValueError(f"expected a DICOM input with its image series, got a {self.kind} input")
        return self.group


@dataclass
class Inputs:
    """The studies found under SRC and an account of every other file (counts by reason, no paths)."""

    studies: list[StudyInput]
    files: int
    skipped: Counter = field(default_factory=Counter)  # "status:REASON" -> files


def find_inputs(src: Path, spec: PreprocessSpec) -> Inputs:
    """Index SRC and select each study's image as preprocessing would.

    Raises:
        PreprocessInputError: SRC is missing or holds neither DICOM files nor NIfTI images.
    """
    from fedimg.dicom.quiet import quiet_dicom
    from fedimg.preprocess.manifest import ManifestRow
    from fedimg.preprocess.plan import select_series

    if not src.exists():
        raise PreprocessInputError(
            "SRC does not exist: expected a DICOM study folder, a PACS export or NIfTI images; check the SRC argument"
        )
    if src.is_file():
        if not re.search(NIFTI_REGEX, src.name):
            raise PreprocessInputError(
                "SRC is a file that is not a NIfTI image (.nii, .nii.gz): expected a folder "
                "of DICOM files or NIfTI images, or one NIfTI file"
            )
        return Inputs(studies=_nifti_inputs([(src, src.name)], spec), files=1)
    with quiet_dicom():
        index = scan(src, claim=[NIFTI_REGEX, CSV_REGEX])
    rows: dict[str, ManifestRow] = {
        p.rel: ManifestRow(p.rel, "refused", p.reason.value, p.detail) for p in index.problems
    }
    image_headers = []
    for h in index.headers:
        if h.is_non_image:
            rows[h.rel] = ManifestRow(h.rel, "skipped", Reason.NON_IMAGE_OBJECT.value, "")
        elif h.is_localizer:
            rows[h.rel] = ManifestRow(h.rel, "skipped", Reason.LOCALIZER.value, "")
        else:
            image_headers.append(h)
    studies: list[StudyInput] = []
    if image_headers:
        with quiet_dicom():
            selected = select_series(image_headers, spec, rows)
        by_study: dict[str, list[Any]] = {}
        for h in image_headers:
            by_study.setdefault(h.study_uid, []).append(h)
        for study in selected.values():
            studies.extend(_dicom_inputs(study) or _refused_study(by_study.get(study.uid, []), rows))
            for m in study.masks:  # labels: predict does not read them
                for rel in m.rels:
                    rows[rel] = ManifestRow(rel, "skipped", Reason.LABEL_NOT_USED.value, "")
            for h in study.segs:
                rows[h.rel] = ManifestRow(h.rel, "skipped", Reason.LABEL_NOT_USED.value, "")
    niftis = [(p, rel) for p, rel in index.other_files if re.search(NIFTI_REGEX, p.name)]
    label_re = re.compile(spec.series.label_nifti_name_regex)
    for p, rel in niftis:
        if label_re.search(p.name):
            rows[rel] = ManifestRow(rel, "skipped", Reason.LABEL_NOT_USED.value, "")
    images = [(p, rel) for p, rel in niftis if not label_re.search(p.name)]
    if images and spec.spatial_dims == 2:
        for _, rel in images:
            rows[rel] = ManifestRow(rel, "skipped", Reason.SERIES_NOT_SELECTED.value, "")
        images = []
    studies.extend(_nifti_inputs(images, spec))
    for p, rel in index.other_files:
        if re.search(CSV_REGEX, p.name):
            rows[rel] = ManifestRow(rel, "skipped", Reason.LABEL_SHEET.value, "")
    if not studies and not index.headers:
        raise PreprocessInputError(
            f"no DICOM files or NIfTI images in SRC: found {index.n_files} file(s), none of "
            "them DICOM or NIfTI; expected a DICOM study folder, a PACS export or NIfTI images"
        )
    skipped = Counter(f"{r.status}:{r.reason}" for r in rows.values())
    return Inputs(studies=studies, files=index.n_files, skipped=skipped)


def _dicom_inputs(study: Any) -> list[StudyInput]:
    """The study's one image series, or a refusal when it has none usable or several."""
    if not study.images:
        return []
    candidate = study.images[0]
    group, geo = candidate.group, candidate.geometry
    h = group.first
    item = StudyInput(
        kind="dicom",
        rel=h.folder,
        study_uid=study.uid,
        series_uid=group.series_uid,
        accession=h.accession_number,
        group=group,
        geometry=geo,
        files=len(group.headers),
    )
    if len(study.images) > 1:
        item.refusal = (
            Reason.AMBIGUOUS_IMAGE_SERIES,
            f"{len(study.images)} candidate image series in one study; narrow "
            "series.image_description_regex in the spec",
        )
    elif candidate.irregular is not None:
        item.refusal = (
            candidate.irregular,
            "irregular slice geometry: predict writes onto the acquisition grid, which "
            "is not a regular grid here (preprocessing resampled such series)",
        )
    return [item]


def _refused_study(headers: list[Any], rows: dict[str, Any]) -> list[StudyInput]:
    """A study whose candidate image series were all refused (geometry, codec...): reported with the first reason."""
    for h in headers:
        row = rows.get(h.rel)
        if row is not None and row.status == "refused":
            try:
                reason = Reason(row.reason)
            except ValueError:
                continue
            n = sum(1 for x in headers if x.series_uid == h.series_uid)
            return [
                StudyInput(
                    kind="dicom",
                    rel=h.folder,
                    study_uid=h.study_uid,
                    series_uid=h.series_uid,
                    accession=h.accession_number,
                    refusal=(reason, row.detail),
                    files=n,
                )
            ]
    return []


def _nifti_inputs(files: list[tuple[Path, str]], spec: PreprocessSpec) -> list[StudyInput]:
    if files and spec.spatial_dims == 2:
        raise PreprocessInputError(
            "SRC holds NIfTI images, but the package's spec is 2D: a 2D spec needs the "
            "DICOM pixel spacing; pass the DICOM images"
        )
    return [StudyInput(kind="nifti", rel=rel, path=p) for p, rel in sorted(files, key=lambda x: x[1])]


__all__ = ["Inputs", "StudyInput", "find_inputs"]
