"""Selection, the first stage after indexing: which series is each study's image, and where its label is.

:func:`select_series` groups the image headers into a :class:`StudyPlan` per
study: its candidate image series (:class:`ImageCandidate`, geometry
validated from headers alone) and the labels that may belong to it. The
labels are one typed union, :data:`LabelSource`, of

- :class:`DicomMask`: a mask series (TCIA style) on the image's grid,
- :class:`DicomSeg`: a DICOM SEG object, read through highdicom,
- :class:`NiftiLabel`: a NIfTI label file in the study's folder,

each with the files it accounts for (``files``) and a ``load`` that brings
its stored values onto the image grid. :func:`choose_label` picks one per
image (masks, then SEG, then NIfTI) and gives every other label its manifest
row. ``fedimg predict`` selects a study's image with the same
:func:`select_series`.

Every file decided here gets its manifest row in ``rows``; nothing is decoded.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedimg.config import PreprocessSpec
from fedimg.dicom.geometry import SeriesGeometry
from fedimg.dicom.index import DicomHeader, Index, SeriesGroup, group_series
from fedimg.dicom.labels import (
    SEG_SOP_CLASS,
    check_mask_grid,
    load_nifti_on_grid,
    load_seg_on_grid,
    match_nifti_to_study,
)
from fedimg.dicom.planar import PlanarGeometry, planar_geometry
from fedimg.dicom.reasons import Reason, RefusedError
from fedimg.dicom.resample import RESAMPLABLE, load_regularized
from fedimg.dicom.volume import load_volume, series_geometry
from fedimg.preprocess.labels_csv import LabelSheet, class_index
from fedimg.preprocess.manifest import REFUSED, SKIPPED, ManifestRow, mark
from fedimg.safepath import is_uid

#: CSV files in an export are label sheets, not images: claimed and skipped (LABEL_SHEET).
CSV_NAME_REGEX = r"(?i)\.csv$"

Files = list[tuple[str, Path]]  # (path relative to SRC, absolute path)


@dataclass
class ImageCandidate:
    """A study's candidate image series.

    Attributes:
        group: the series' files.
        geometry: the validated stack (:class:`SeriesGeometry`) or single frame
            (:class:`PlanarGeometry`); None for an irregular stack.
        irregular: why the stack is irregular, when it is resampled
            (``geometry.irregular: resample``); None for a regular one.
    """

    group: SeriesGroup
    geometry: SeriesGeometry | PlanarGeometry | None
    irregular: Reason | None = None

    @property
    def files(self) -> Files:
        """The series' files."""
        return [(h.rel, h.path) for h in self.group.headers]

    def stack(self) -> SeriesGeometry:
        """The geometry of a regular 3D stack (labels are placed on it).

        Raises:
            ValueError: the image is a single frame or an irregular stack (it has no such grid).
        """
        if not isinstance(self.geometry, SeriesGeometry):
            raise ValueError(f"expected a regular 3D stack, got {type(self.geometry).__name__} geometry")
        return self.geometry

    def planar(self) -> PlanarGeometry:
        """The geometry of a single-frame (2D) image.

        Raises:
            ValueError: the image is a stack.
        """
        if not isinstance(self.geometry, PlanarGeometry):
            raise ValueError(f"expected a single-frame image, got {type(self.geometry).__name__} geometry")
        return self.geometry


@dataclass
class DicomMask:
    """A DICOM mask series on the image's frame of reference (its geometry checked against the image's)."""

    group: SeriesGroup
    geometry: SeriesGeometry | None = None  # None: follows an irregular image, resampled like it

    @property
    def files(self) -> Files:
        """The mask's files."""
        return [(h.rel, h.path) for h in self.group.headers]

    def load(
        self, image: ImageCandidate, image_data: np.ndarray, image_affine: np.ndarray
    ) -> tuple[np.ndarray, tuple[float, float]]:
        """Stored values on the image grid and their ``(slope, intercept)``."""
        if image.irregular is not None:
            reg = load_regularized(self.group, image.irregular, order=0)
            if reg.data.shape != image_data.shape or not np.allclose(reg.affine_ras, image_affine, atol=1e-3):
                raise RefusedError(Reason.LABEL_GEOMETRY_MISMATCH, "resampled mask and image grids differ")
            return reg.data, (1.0, 0.0)
        if self.geometry is None:
            raise ValueError("a DICOM mask without its own geometry only follows an irregular (resampled) image")
        mask = load_volume(self.group, self.geometry)
        return mask.stored, (mask.slope, mask.intercept)


@dataclass
class DicomSeg:
    """A DICOM SEG object referencing the image's instances."""

    header: DicomHeader

    @property
    def files(self) -> Files:
        """The SEG file."""
        return [(self.header.rel, self.header.path)]

    def load(
        self, image: ImageCandidate, image_data: np.ndarray, image_affine: np.ndarray
    ) -> tuple[np.ndarray, tuple[float, float]]:
        """Its segments on the image grid (through the referenced instances)."""
        geo = image.stack()
        uids = [image.group.headers[i].sop_instance_uid for i in geo.order]
        return load_seg_on_grid(self.header.path, uids, geo), (1.0, 0.0)


@dataclass
class NiftiLabel:
    """A NIfTI label file in the study's folder."""

    path: Path
    rel: str

    @property
    def files(self) -> Files:
        """The NIfTI file."""
        return [(self.rel, self.path)]

    def load(
        self, image: ImageCandidate, image_data: np.ndarray, image_affine: np.ndarray
    ) -> tuple[np.ndarray, tuple[float, float]]:
        """Its values on the image grid (axis permutation and flips only) and its ``(slope, intercept)``."""
        return load_nifti_on_grid(self.path, image.stack())


LabelSource = DicomMask | DicomSeg | NiftiLabel


@dataclass
class ClassLabel:
    """A classification study's class from the labels CSV, or the PHI-free reason it has none."""

    index: int | None
    refusal: tuple[Reason, str] | None = None


@dataclass
class StudyPlan:
    """One study: its candidate image series and every label that may be its image's.

    Attributes:
        uid: (0020,000D) Study Instance UID (memory only).
        images: candidate image series (exactly one becomes a case).
        masks, segs, niftis: segmentation labels found for the study.
        cls: classification: the study's class from the labels CSV.
        unreadable: PHI-free detail when an UNREADABLE entry beside the study's
            files may hold its label.
    """

    uid: str
    images: list[ImageCandidate] = field(default_factory=list)
    masks: list[SeriesGroup] = field(default_factory=list)
    segs: list[DicomHeader] = field(default_factory=list)
    niftis: list[NiftiLabel] = field(default_factory=list)
    cls: ClassLabel | None = None
    unreadable: str | None = None

    @property
    def label_rels(self) -> list[str]:
        """Every label file of the study."""
        return [rel for m in self.masks for rel in m.rels] + [h.rel for h in self.segs] + [n.rel for n in self.niftis]


def geometry_kwargs(spec: PreprocessSpec) -> dict[str, Any]:
    """The spec's geometry checks as keyword arguments of :func:`fedimg.dicom.volume.series_geometry`."""
    return dict(
        min_slices=spec.geometry.min_slices,
        spacing_tolerance=spec.geometry.spacing_tolerance,
        orientation_tolerance=spec.geometry.orientation_tolerance,
    )


def _unsafe_uid_detail(headers: list[DicomHeader]) -> str:
    """Why a series of a study with a non-UID (0008,0018) is refused under ``--write-dicom`` (PHI-free)."""
    bad = sum(not is_uid(h.sop_instance_uid) for h in headers)
    if not bad:
        return (
            "another series of this study has a (0008,0018) SOP Instance UID that is not a UID; "
            "--write-dicom copies whole cases, each file named by its UID"
        )
    return (
        f"{bad} of {len(headers)} file(s) have a (0008,0018) SOP Instance UID that is not a UID (expected "
        "digits and dots, at most 64 characters); --write-dicom names each de-identified copy by it"
    )


def select_series(
    image_headers: list[DicomHeader],
    spec: PreprocessSpec,
    rows: dict[str, ManifestRow],
    unsafe: set[str] | frozenset[str] = frozenset(),
) -> dict[str, StudyPlan]:
    """Group image headers into studies and pick each study's candidate image series as the spec says.

    Label series (``series.label_description_regex``) and DICOM SEG objects
    become the study's labels (segmentation); series of other modalities, or
    whose description misses ``series.image_description_regex``, are skipped;
    a candidate's geometry is validated from its headers.

    Args:
        unsafe: Study Instance UIDs whose files are refused whole (UNSAFE_NAME).

    Returns:
        Study Instance UID -> its plan.
    """
    studies: dict[str, StudyPlan] = {}
    for h in [h for h in image_headers if h.sop_class_uid == SEG_SOP_CLASS]:
        # DICOM SEG objects are labels, read through highdicom, not image series.
        study = studies.setdefault(h.study_uid, StudyPlan(h.study_uid))
        if spec.is_classification:
            rows[h.rel] = ManifestRow(
                h.rel,
                SKIPPED,
                Reason.LABEL_NOT_USED.value,
                "a DICOM SEG; a classification spec takes classes from the labels CSV",
            )
        elif h.study_uid in unsafe:
            rows[h.rel] = ManifestRow(h.rel, REFUSED, Reason.UNSAFE_NAME.value, _unsafe_uid_detail([h]))
        else:
            study.segs.append(h)
    images = [h for h in image_headers if h.sop_class_uid != SEG_SOP_CLASS]
    groups = group_series(images, spec.geometry.orientation_tolerance)
    ctx = _Selection(
        spec, rows, unsafe, Counter(g.series_uid for g in groups), Counter((h.study_uid, h.series_uid) for h in images)
    )
    for g in groups:
        ctx.place(g, studies.setdefault(g.study_uid, StudyPlan(g.study_uid)))
    return studies


@dataclass
class _Selection:
    """The rules :func:`select_series` applies to each series group."""

    spec: PreprocessSpec
    rows: dict[str, ManifestRow]
    unsafe: set[str] | frozenset[str]
    groups_per_series: Counter
    files_per_series: Counter

    def __post_init__(self) -> None:
        s = self.spec.series
        self.label_re = re.compile(s.label_description_regex)
        self.image_re = re.compile(s.image_description_regex) if s.image_description_regex else None

    def place(self, g: SeriesGroup, study: StudyPlan) -> None:
        """Decide one series group: a label, skipped, refused, or a candidate image."""
        spec, rows = self.spec, self.rows
        if self.label_re.search(g.description):
            if spec.is_classification:
                mark(
                    rows,
                    g.rels,
                    SKIPPED,
                    Reason.LABEL_NOT_USED,
                    "a label series (series.label_description_regex); "
                    "a classification spec takes classes from the labels CSV",
                )
            elif g.study_uid in self.unsafe:
                mark(rows, g.rels, REFUSED, Reason.UNSAFE_NAME, _unsafe_uid_detail(g.headers))
            else:
                study.masks.append(g)
        elif g.modality.upper() not in spec.series.modalities:
            mark(
                rows,
                g.rels,
                SKIPPED,
                Reason.MODALITY_NOT_SELECTED,
                f"modality {g.modality or '?'}; spec selects {', '.join(spec.series.modalities)}",
            )
        elif self.image_re is not None and not self.image_re.search(g.description):
            mark(
                rows,
                g.rels,
                SKIPPED,
                Reason.SERIES_NOT_SELECTED,
                "(0008,103E) Series Description does not match series.image_description_regex",
            )
        elif g.study_uid in self.unsafe:
            mark(rows, g.rels, REFUSED, Reason.UNSAFE_NAME, _unsafe_uid_detail(g.headers))
        else:
            candidate = self._geometry(g)
            if candidate is not None:
                study.images.append(candidate)

    def _geometry(self, g: SeriesGroup) -> ImageCandidate | None:
        """The group as a candidate image with its validated geometry, or None (refused, row written)."""
        try:
            if self.spec.spatial_dims == 2:
                return ImageCandidate(g, planar_geometry(g, self.files_per_series[(g.study_uid, g.series_uid)]))
            return ImageCandidate(g, series_geometry(g, **geometry_kwargs(self.spec)))
        except RefusedError as exc:
            if self.spec.spatial_dims == 3 and self.spec.geometry.irregular == "resample" and exc.reason in RESAMPLABLE:
                return ImageCandidate(g, None, irregular=exc.reason)
            n = self.groups_per_series[g.series_uid]
            extra = f" (series split into {n} groups)" if n > 1 and self.spec.spatial_dims == 3 else ""
            mark(self.rows, g.rels, REFUSED, exc.reason, exc.detail + extra)
            return None


def attach_other_files(
    index: Index,
    studies: dict[str, StudyPlan],
    rows: dict[str, ManifestRow],
    spec: PreprocessSpec,
    used_csv: Path | None,
) -> None:
    """The claimed non-DICOM files: label sheets (CSV) are skipped; a NIfTI label joins the one study under it.

    A NIfTI label belongs to the study whose files sit under its nearest
    folder (:func:`fedimg.dicom.labels.match_nifti_to_study`).
    """
    csv_re = re.compile(CSV_NAME_REGEX)
    study_dirs: dict[str, set[str]] = defaultdict(set)
    for h in index.headers:
        study_dirs[h.study_uid].add(Path(h.rel).parent.as_posix())
    for path, rel in index.other_files:
        if csv_re.search(path.name):
            this_run = used_csv is not None and path.resolve() == used_csv
            rows[rel] = ManifestRow(
                rel,
                SKIPPED,
                Reason.LABEL_SHEET.value,
                "the labels CSV of this run (--labels-csv): read, not converted"
                if this_run
                else "a CSV file, not an image; labels are read only from --labels-csv",
            )
        elif spec.is_classification:
            rows[rel] = ManifestRow(
                rel,
                SKIPPED,
                Reason.LABEL_NOT_USED.value,
                "a NIfTI label; a classification spec takes classes from the labels CSV",
            )
        else:
            owner = match_nifti_to_study(rel, study_dirs)
            if owner is None or owner not in studies:
                rows[rel] = ManifestRow(
                    rel, REFUSED, Reason.LABEL_UNMATCHED.value, "no single study's files share this label's folder"
                )
            else:
                studies[owner].niftis.append(NiftiLabel(path, rel))


def unreadable_near(unreadable: list[str], folders: dict[str, set[str]]) -> dict[str, list[str]]:
    """Studies an unreadable entry may hold files of (its label, a slice): study -> the entries.

    Walking up from the entry's folder, the first folder that holds files of
    any study decides: every study with files under it (at any depth) may be
    missing what the entry holds. E.g. ``study/label`` (unlistable) and
    ``study/label/seg.nii.gz`` (unopenable) both point at the study whose
    series sit under ``study/``; an unlistable patient folder at the root
    points at every study (nothing tells which).

    Args:
        unreadable: relative paths of UNREADABLE entries.
        folders: study -> relative folders of its DICOM files (``""`` for the root).
    """
    near: dict[str, list[str]] = defaultdict(list)
    for rel in unreadable:
        parent = Path(rel).parent
        for folder in [parent, *parent.parents]:
            prefix = "" if folder.as_posix() == "." else folder.as_posix()
            hits = [
                uid
                for uid, dirs in folders.items()
                if any(not prefix or d == prefix or d.startswith(prefix + "/") for d in dirs)
            ]
            if hits:
                for uid in hits:
                    near[uid].append(rel)
                break
    return near


def mark_unreadable(index: Index, studies: dict[str, StudyPlan], ref: Any) -> None:
    """Note, on each study an UNREADABLE entry may belong to, that its label may be there (not "no label")."""
    unreadable = [p.rel for p in index.problems if p.reason == Reason.UNREADABLE]
    if not unreadable:
        return
    folders: dict[str, set[str]] = defaultdict(set)
    for h in index.headers:
        folders[h.study_uid].add(h.folder)
    for uid, near in unreadable_near(unreadable, folders).items():
        if uid in studies:
            shown = ", ".join(ref(r) for r in near[:3]) + (f" and {len(near) - 3} more" if len(near) > 3 else "")
            studies[uid].unreadable = (
                f"no label was found for this image, and {len(near)} entr{'y' if len(near) == 1 else 'ies'} beside "
                f"its files could not be read (UNREADABLE row(s) {shown}); its label may be there: make it readable "
                "and run again"
            )


def classify(study: StudyPlan, spec: PreprocessSpec, sheet: LabelSheet) -> ClassLabel:
    """The study's class from the labels CSV, or a PHI-free refusal (the key is never quoted)."""
    tag = spec.labels.key_tag
    h = study.images[0].group.first
    key = (h.accession_number if spec.labels.csv_key == "accession" else h.study_uid).strip()  # memory only
    if not key:
        return ClassLabel(
            None,
            (
                Reason.NO_LABEL,
                f"{tag} is empty in this study, so it has no row in the labels "
                "CSV; set labels.csv_key to another key, or add the attribute",
            ),
        )
    value = sheet.lookup(key)
    if value is None:
        return ClassLabel(
            None,
            (
                Reason.NO_LABEL,
                f"no row in the labels CSV for this study's {tag} (column {sheet.key_column!r}); add a row for it",
            ),
        )
    idx = class_index(value, spec.labels.classes)
    if idx is None:
        what = "is empty" if not value else "is not a class"
        return ClassLabel(
            None,
            (
                Reason.LABEL_VALUES_UNEXPECTED,
                f"the labels CSV's {sheet.label_column!r} cell for this study {what}; expected one "
                f"of {', '.join(spec.labels.classes)} (or an index 0.."
                f"{len(spec.labels.classes) - 1}); fix the CSV",
            ),
        )
    return ClassLabel(idx)


def refuse_labelless_studies(studies: dict[str, StudyPlan], rows: dict[str, ManifestRow]) -> None:
    """Labels of studies without a usable image series: refused (IMAGE_REFUSED)."""
    for study in studies.values():
        if not study.images:
            mark(rows, study.label_rels, REFUSED, Reason.IMAGE_REFUSED, "no usable image series in this study")


def choose_label(
    study: StudyPlan, image: ImageCandidate, rows: dict[str, ManifestRow], geo_kwargs: dict[str, Any]
) -> LabelSource | None:
    """Segmentation: a DICOM mask on the image's frame of reference, else a SEG, else a NIfTI file.

    Labels that are not chosen get their manifest rows here.
    """
    chosen: LabelSource | None = None
    fref = image.group.first.frame_of_reference_uid
    second = "a second label for the same image"
    for m in study.masks:
        if m.first.frame_of_reference_uid != fref:
            mark(
                rows,
                m.rels,
                REFUSED,
                Reason.LABEL_UNMATCHED,
                "(0020,0052) Frame of Reference UID differs from the image series",
            )
        elif image.irregular is not None:
            # The mask must share the image's irregular slices; it is resampled identically. A slice without
            # (0020,0032) has no position to share (and None cannot be sorted among positions).
            mask_ipps = [h.ipp for h in m.headers if h.ipp is not None]
            image_ipps = [h.ipp for h in image.group.headers if h.ipp is not None]
            if len(mask_ipps) != len(m.headers) or sorted(mask_ipps) != sorted(image_ipps):
                mark(
                    rows,
                    m.rels,
                    REFUSED,
                    Reason.LABEL_GEOMETRY_MISMATCH,
                    "mask slices are not at the image's slice positions",
                )
            elif chosen is None:
                chosen = DicomMask(m)
            else:
                mark(rows, m.rels, REFUSED, Reason.LABEL_UNMATCHED, second)
        else:
            try:
                mgeo = series_geometry(m, **geo_kwargs)
                check_mask_grid(image.stack(), mgeo)
            except RefusedError as exc:
                # Whatever is wrong with the mask's own stack, it cannot be placed on the image grid.
                mark(rows, m.rels, REFUSED, Reason.LABEL_GEOMETRY_MISMATCH, exc.detail)
                continue
            if chosen is not None:
                mark(rows, m.rels, REFUSED, Reason.LABEL_UNMATCHED, second)
            else:
                chosen = DicomMask(m, mgeo)
    follows = "the image is resampled (geometry.irregular); only a DICOM mask series can follow it"
    for h in study.segs:
        if image.irregular is not None:
            mark(rows, [h.rel], REFUSED, Reason.LABEL_GEOMETRY_MISMATCH, follows)
        elif h.frame_of_reference_uid != fref:
            mark(
                rows,
                [h.rel],
                REFUSED,
                Reason.LABEL_UNMATCHED,
                "(0020,0052) Frame of Reference UID differs from the image series",
            )
        elif chosen is not None:
            mark(rows, [h.rel], REFUSED, Reason.LABEL_UNMATCHED, second)
        else:
            chosen = DicomSeg(h)
    for n in study.niftis:
        if image.irregular is not None:
            mark(rows, [n.rel], REFUSED, Reason.LABEL_GEOMETRY_MISMATCH, follows)
        elif chosen is not None:
            mark(rows, [n.rel], REFUSED, Reason.LABEL_UNMATCHED, second)
        else:
            chosen = n
    return chosen


__all__ = [
    "CSV_NAME_REGEX",
    "ClassLabel",
    "DicomMask",
    "DicomSeg",
    "ImageCandidate",
    "LabelSource",
    "NiftiLabel",
    "StudyPlan",
    "attach_other_files",
    "choose_label",
    "classify",
    "geometry_kwargs",
    "mark_unreadable",
    "refuse_labelless_studies",
    "select_series",
    "unreadable_near",
]
