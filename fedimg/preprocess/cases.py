"""Case conversion: one study's plan becomes one case, either reused from an earlier run or converted.

:func:`convert_case` runs in a worker process per study. It refuses what
cannot become a case (several candidate images, burned-in text under
de-identification, no label), then either

- :func:`reuse_case`: the study's input files are unchanged since the last
  run (same relative paths, sizes, modification times): the earlier outputs
  stand and nothing is decoded; or
- :func:`convert_new_case`: pixels are decoded, the label is brought onto the
  image grid and checked, the spec's chain is applied and the outputs are
  written (announced in DST's journal first).

Every input file of the study gets its manifest row; the case's record
carries what the later stages need (its patient's key for the split, the
fingerprint of its inputs for the next run).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedimg.atomic import write_nifti
from fedimg.config import BurnedInReview, PreprocessSpec
from fedimg.dicom.deid import series_burned_in_risk
from fedimg.dicom.labels import check_label_values, map_label_values
from fedimg.dicom.planar import load_planar
from fedimg.dicom.quiet import quiet_dicom
from fedimg.dicom.reasons import Reason, RefusedError
from fedimg.dicom.resample import load_regularized
from fedimg.dicom.volume import load_volume
from fedimg.preprocess.manifest import CONVERTED, REFUSED, ManifestRow, mark
from fedimg.preprocess.outdir import announce
from fedimg.preprocess.plan import DicomMask, ImageCandidate, LabelSource, StudyPlan, choose_label
from fedimg.preprocess.state import inputs_fingerprint
from fedimg.preprocess.transforms import apply_spec, apply_spec_2d

#: Prefix of the patient key of a case whose files carry no (0010,0020) Patient ID: it is its own patient.
NO_PATIENT_ID = "case:"


@dataclass
class CaseRecord:
    """A converted case.

    Attributes:
        case_id: file-name-safe id (a keyed pseudonym under de-identification).
        image: image path relative to DST.
        label: segmentation: label path relative to DST (or None);
            classification: the 0-based class index.
        shape: output array shape ((H, W) for 2D).
        spacing: output voxel / pixel size in mm.
        label_counts: segmentation: voxels per class.
        split: ``training``, ``validation`` or ``test`` (always by patient:
            :mod:`fedimg.preprocess.splits`).
        fold: the cross-validation fold (``split.folds``), else None.
        reused: the outputs of an earlier run were reused (inputs unchanged).
        patient_key: the key its patient is split by (a keyed pseudonym; see :func:`patient_key`).
        order_key: an unkeyed hash of the study's UIDs that orders new patients; never written.
        inputs: the fingerprint of its input files (the state file's reuse test).
        correction: an explicit geometric correction applied (irregular stacks), else None.
        other_values: segmentation with ``labels.others: background``: distinct
            label values outside the spec's classes that were mapped to background.
        others_to_background: the voxels of the source label that held them.
    """

    case_id: str
    image: str
    label: str | int | None
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    label_counts: dict[str, int] = field(default_factory=dict)
    split: str = "training"
    fold: int | None = None
    reused: bool = False
    patient_key: str = ""
    order_key: str = ""
    inputs: str = ""
    correction: str | None = None
    other_values: int = 0
    others_to_background: int = 0

    def summary(self) -> dict[str, Any]:
        """The case as ``summary.json`` lists it (no keys or fingerprints)."""
        out = asdict(self)
        for private in ("patient_key", "order_key", "inputs"):
            out.pop(private)
        return out

    def state_entry(self) -> dict[str, Any]:
        """What the state file keeps of the case for the next run."""
        return {
            "inputs": self.inputs,
            "image": self.image,
            "label": self.label if isinstance(self.label, str) else None,
            "shape": list(self.shape),
            "spacing": list(self.spacing),
            "label_counts": self.label_counts,
            "correction": self.correction,
            "other_values": self.other_values,
            "others_to_background": self.others_to_background,
        }


@dataclass(frozen=True)
class CaseContext:
    """What every study's conversion needs (sent to each worker)."""

    spec: PreprocessSpec
    dst: Path
    pseudonymizer: Any | None
    previous: dict[str, dict[str, Any]]  # case id -> the previous run's state entry
    geo_kwargs: dict[str, Any]
    reviews: tuple[BurnedInReview, ...] = ()  # the site's reviewed burned-in exceptions

    @property
    def class_values(self) -> list[int]:
        """The stored label value of each class."""
        return [self.spec.labels.source_value(c) for c in self.spec.labels.classes]


def case_id_for(study_uid: str, series_uid: str) -> str:
    """A stable, file-name-safe case id that does not spell out a UID (unkeyed: ``--no-deid``)."""
    digest = hashlib.sha256(f"{study_uid}|{series_uid}".encode()).hexdigest()
    return f"case-{digest[:12]}"


def patient_key(patient_id: str, case_id: str, pseudonymizer: Any | None) -> str:
    """The key a case's patient is split by: a keyed pseudonym (unkeyed hash under --no-deid), never the ID."""
    if not patient_id:
        return NO_PATIENT_ID + case_id
    if pseudonymizer is not None:
        return pseudonymizer.patient(patient_id)
    return "P" + hashlib.sha256(patient_id.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def convert_study(args: tuple[StudyPlan, CaseContext]) -> tuple[dict[str, ManifestRow], CaseRecord | None]:
    """Worker entry: one study's manifest rows and case record."""
    study, ctx = args
    rows: dict[str, ManifestRow] = {}
    with quiet_dicom():
        rec = convert_case(study, ctx, rows)
    return rows, rec


#: Refusals caused by the label: the label's rows carry the reason, the image's rows PARTNER_REFUSED.
LABEL_REASONS = frozenset({Reason.LABEL_GEOMETRY_MISMATCH, Reason.LABEL_VALUES_UNEXPECTED, Reason.NOT_A_LABEL})


@dataclass(frozen=True)
class Refusal:
    """Why a study cannot become a case, and which of its files caused it (``image`` or ``label``)."""

    reason: Reason
    detail: str
    culprit: str = "image"


def convert_case(study: StudyPlan, ctx: CaseContext, rows: dict[str, ManifestRow]) -> CaseRecord | None:
    """The study's case (reused or converted), or None when it is refused (rows say why)."""
    if len(study.images) > 1:
        for image in study.images:
            mark(
                rows,
                image.group.rels,
                REFUSED,
                Reason.AMBIGUOUS_IMAGE_SERIES,
                f"{len(study.images)} candidate image series in one study; narrow series.image_description_regex "
                "in the spec",
            )
        mark(rows, study.label_rels, REFUSED, Reason.IMAGE_REFUSED, "its study has no single image series")
        return None
    image = study.images[0]
    group, spec = image.group, ctx.spec
    case_id = (
        ctx.pseudonymizer.case(study.uid, group.series_uid)
        if ctx.pseudonymizer is not None
        else case_id_for(study.uid, group.series_uid)
    )
    label = None if spec.is_classification else choose_label(study, image, rows, ctx.geo_kwargs)
    label_rels = [rel for rel, _ in label.files] if label is not None else []
    reviews: dict[str, str] = {}  # "image" / "label" -> the review that let it through
    refusal = _refusal(study, image, label, ctx, reviews)
    if refusal is not None:
        _refuse(rows, refusal, group.rels, label_rels, case_id)
        return None
    class_label = study.cls.index if spec.is_classification and study.cls is not None else None
    order = case_id_for(study.uid, group.series_uid)
    rec = new_record(
        case_id, group.first.patient_id, order, image.files + (label.files if label else []), ctx.pseudonymizer
    )
    try:
        rec = reuse_case(rec, ctx, label is not None) or convert_new_case(rec, image, label, ctx)
    except RefusedError as exc:
        culprit = "label" if exc.reason in LABEL_REASONS else "image"
        _refuse(rows, Refusal(exc.reason, exc.detail, culprit), group.rels, label_rels, case_id)
        return None
    if spec.is_classification:
        rec.label = class_label
    mark_converted(rows, group.rels, label_rels, rec, reviews)
    return rec


def new_record(
    case_id: str, patient_id: str, order_key: str, files: list[tuple[str, Path]], pseudonymizer: Any | None
) -> CaseRecord:
    """The record of a case about to be reused or converted: its keys for the split and its inputs' fingerprint.

    Args:
        patient_id: the patient's identifier (memory only: keyed here), "" when unknown.
        order_key: an unkeyed, data-derived hash that orders new patients in the split.
        files: ``(relative path, absolute path)`` of every input file of the case.
    """
    return CaseRecord(
        case_id=case_id,
        image="",
        label=None,
        shape=(),
        spacing=(),
        patient_key=patient_key(patient_id, case_id, pseudonymizer),
        order_key=order_key,
        inputs=inputs_fingerprint(files, pseudonymizer),
    )


def mark_converted(
    rows: dict[str, ManifestRow],
    image_rels: list[str],
    label_rels: list[str],
    rec: CaseRecord,
    reviews: dict[str, str] | None = None,
) -> None:
    """The manifest rows of a converted case's image and label files.

    Args:
        reviews: ``"image"`` / ``"label"`` -> the site's recorded review that let it through (burned-in text).
    """
    reviews = reviews or {}
    mark(rows, image_rels, CONVERTED, "", "", output=rec.image, case_id=rec.case_id, role="image",
         correction=rec.correction, review=reviews.get("image"))  # fmt: skip
    detail = ""
    if rec.other_values:
        detail = (
            f"{rec.others_to_background} voxel(s) of {rec.other_values} label value(s) outside the spec's classes "
            "mapped to background (labels.others: background)"
        )
    mark(
        rows,
        label_rels,
        CONVERTED,
        "",
        detail,
        output=rec.label,
        case_id=rec.case_id,
        role="label",
        correction=rec.correction,
        review=reviews.get("label"),
        others_to_background=rec.others_to_background if rec.other_values else None,
    )


def _refuse(
    rows: dict[str, ManifestRow], refusal: Refusal, image_rels: list[str], label_rels: list[str], case_id: str
) -> None:
    """The culprit's rows carry the reason; its partner's rows say they were refused because of it."""
    if refusal.culprit == "label":
        mark(rows, label_rels, REFUSED, refusal.reason, refusal.detail, case_id=case_id)
        mark(
            rows,
            image_rels,
            REFUSED,
            Reason.PARTNER_REFUSED,
            f"its label was refused ({refusal.reason.value}); the image itself was not the cause",
            case_id=case_id,
        )
    else:
        mark(rows, image_rels, REFUSED, refusal.reason, refusal.detail, case_id=case_id)
        mark(
            rows,
            label_rels,
            REFUSED,
            Reason.IMAGE_REFUSED,
            f"its image was refused ({refusal.reason.value})",
            case_id=case_id,
        )


def _burned_in(headers: list[Any], description: str, ctx: CaseContext) -> tuple[str | None, str | None]:
    """(why the series is refused, or None; the review that let it through, or None) under de-identification."""
    risk = series_burned_in_risk(headers)
    if risk is None:
        return None, None
    sop_class = headers[0].sop_class_uid if headers else ""
    for i, review in enumerate(ctx.reviews, start=1):
        if review.matches(description, sop_class):
            return None, f"{review.record(i)}: {risk}"
    if headers and all(h.identity_removed for h in headers):
        hint = (
            "these files declare (0012,0062) Patient Identity Removed YES: if their publisher de-identified them "
            "(e.g. TCIA), preprocess with --no-deid instead, or have a person review the pixels and list the "
            "series in the site config's deid.burned_in_reviewed (--site-config)"
        )
    else:
        hint = (
            "have a person review the pixels, then re-export with (0028,0301) NO or list the series in the site "
            "config's deid.burned_in_reviewed (--site-config)"
        )
    return f"{risk}; {hint}", None


def _refusal(
    study: StudyPlan, image: ImageCandidate, label: LabelSource | None, ctx: CaseContext, reviews: dict[str, str]
) -> Refusal | None:
    """Why the study cannot become a case before any pixel is read (None: it can); notes the reviews used."""
    spec = ctx.spec
    if ctx.pseudonymizer is not None:
        # Pixels may carry burned-in names: such objects are refused, never converted, unless a person reviewed them.
        for role, group in (("image", image.group), ("label", label.group if isinstance(label, DicomMask) else None)):
            if group is None:
                continue
            risk, review = _burned_in(group.headers, group.description, ctx)
            if risk is not None:
                return Refusal(Reason.BURNED_IN_ANNOTATION, risk, role)
            if review is not None:
                reviews[role] = review
    if spec.is_classification:
        cls = study.cls
        if cls is None:
            return Refusal(Reason.NO_LABEL, "no labels CSV was read")
        return Refusal(*cls.refusal) if cls.refusal is not None else None
    if label is None and study.unreadable:
        return Refusal(Reason.LABEL_UNREADABLE, study.unreadable)  # held, also when labels are optional
    if label is None and spec.labels.required:
        return Refusal(Reason.NO_LABEL, "no label series or NIfTI label matched this image; labels.required is true")
    return None


def reuse_case(rec: CaseRecord, ctx: CaseContext, with_label: bool) -> CaseRecord | None:
    """The case from an earlier run's outputs, if its inputs are unchanged and its outputs still there.

    The state file's output paths must be the ones this run would write
    (``images/<case_id>.nii.gz``...): an edited state file cannot point the
    datalist at a file outside DST.
    """
    entry = ctx.previous.get(rec.case_id)
    image_rel, label_rel = f"images/{rec.case_id}.nii.gz", f"labels/{rec.case_id}.nii.gz"
    if (
        not entry
        or entry.get("inputs") != rec.inputs
        or entry.get("image") != image_rel
        or not (ctx.dst / image_rel).is_file()
    ):
        return None
    if with_label != (entry.get("label") is not None):
        return None
    if with_label and (entry.get("label") != label_rel or not (ctx.dst / label_rel).is_file()):
        return None
    rec.image, rec.label = image_rel, entry.get("label")
    rec.shape = tuple(int(v) for v in entry["shape"])
    rec.spacing = tuple(float(v) for v in entry["spacing"])
    rec.label_counts = dict(entry.get("label_counts") or {})
    rec.correction = entry.get("correction")
    rec.other_values = int(entry.get("other_values") or 0)
    rec.others_to_background = int(entry.get("others_to_background") or 0)
    rec.reused = True
    return rec


def convert_new_case(rec: CaseRecord, image: ImageCandidate, label: LabelSource | None, ctx: CaseContext) -> CaseRecord:
    """Decode, resample and normalize the study; write its outputs.

    Raises:
        RefusedError: the pixels or the label cannot be converted correctly (the reason says why).
    """
    spec = ctx.spec
    if spec.spatial_dims == 2:
        planar = image.planar()
        image_arr, affine = apply_spec_2d(spec, load_planar(image.group, planar), planar)
        label_arr = None
    else:
        image_arr, label_arr, affine, rec.correction = _volume_and_label(image, label, ctx, rec)
    return write_case(rec, image_arr, label_arr, affine, ctx)


def write_case(
    rec: CaseRecord, image_arr: np.ndarray, label_arr: np.ndarray | None, affine: np.ndarray, ctx: CaseContext
) -> CaseRecord:
    """Write a normalized case (announced in DST's journal first) and record its outputs."""
    spec = ctx.spec
    rec.image = f"images/{rec.case_id}.nii.gz"
    rec.label = None if label_arr is None else f"labels/{rec.case_id}.nii.gz"
    announce(ctx.dst, [r for r in (rec.image, rec.label) if r])  # recorded as fedimg's before they exist
    write_nifti(ctx.dst / rec.image, np.asarray(image_arr, dtype=np.float32), affine)
    if label_arr is not None:
        write_nifti(ctx.dst / str(rec.label), label_arr.astype(np.uint8), affine)
        rec.label_counts = {name: int((label_arr == i + 1).sum()) for i, name in enumerate(spec.labels.classes)}
    rec.shape = tuple(int(s) for s in image_arr.shape)
    rec.spacing = tuple(float(v) for v in np.sqrt((affine[:3, : image_arr.ndim] ** 2).sum(axis=0)))
    return rec


def _volume_and_label(
    image: ImageCandidate, label: LabelSource | None, ctx: CaseContext, rec: CaseRecord
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, str | None]:
    """A 3D case on the spec's grid: (image, label 0..N or None, affine, correction)."""
    correction: str | None = None
    scale = (1.0, 0.0)
    if image.irregular is not None:
        reg = load_regularized(image.group, image.irregular)
        data, affine, correction = reg.data, reg.affine_ras, reg.correction
    else:
        # Stored integers plus their modality LUT: no float copy of the whole volume is made.
        volume = load_volume(image.group, image.stack())
        data, affine, scale = volume.stored, volume.affine, (volume.slope, volume.intercept)
    raw, label_scale = None, (1.0, 0.0)
    if label is not None:
        raw, label_scale = label.load(image, data, affine)
    image_arr, label_arr, out_affine = normalize_case(ctx, rec, data, affine, scale, raw, label_scale)
    return image_arr, label_arr, out_affine, correction


def normalize_case(
    ctx: CaseContext,
    rec: CaseRecord,
    data: np.ndarray,
    affine: np.ndarray,
    scale: tuple[float, float],
    raw: np.ndarray | None,
    label_scale: tuple[float, float],
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """A 3D volume (and its label on the same grid) through the spec's chain: (image, label 0..N, affine).

    The label's values are checked against the spec's classes first
    (``labels.others``); the values mapped to background are counted into ``rec``.

    Args:
        data: (i, j, k) stored voxels; ``scale`` = (slope, intercept) makes them modality values.
        affine: voxel-to-RAS affine of ``data`` (and ``raw``).
        raw: the label's stored voxels on ``data``'s grid, or None.
        label_scale: ``(slope, intercept)`` of ``raw``.

    Raises:
        RefusedError: LABEL_VALUES_UNEXPECTED (``labels.others: refuse``).
    """
    others = ctx.spec.labels.others
    if raw is not None:
        mapped = check_label_values(raw, ctx.class_values, label_scale, others)
        rec.other_values, rec.others_to_background = len(mapped), int(sum(mapped.values()))
    # Nearest-neighbour resampling copies source values, so mapping them to 0..N after it is the same as
    # before it, on the (small) output grid.
    image_arr, resampled, out_affine = apply_spec(ctx.spec, data, affine, raw, scale=scale)
    label_arr = None if resampled is None else map_label_values(resampled, ctx.class_values, label_scale, others)
    return image_arr, label_arr, out_affine


__all__ = [
    "NO_PATIENT_ID",
    "CaseContext",
    "CaseRecord",
    "case_id_for",
    "convert_case",
    "convert_new_case",
    "convert_study",
    "mark_converted",
    "new_record",
    "normalize_case",
    "patient_key",
    "reuse_case",
    "write_case",
]
