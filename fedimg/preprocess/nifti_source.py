"""``fedimg preprocess --from-nifti``: a public NIfTI segmentation data set as a site's input.

Most public segmentation sets (Medical Segmentation Decathlon, KiTS, BraTS,
nnU-Net raw data) are NIfTI images plus NIfTI labels. Two layouts of SRC are
read:

1. ``SRC/dataset.json`` (Decathlon)::

       {"modality": {"0": "CT"},
        "labels": {"0": "background", "1": "liver", "2": "tumour"},
        "training": [{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}, ...],
        "test": ["./imagesTs/y.nii.gz", ...]}

   ``training`` pairs images with labels; a training item may carry a
   ``"patient"`` string (a fedimg extension: cases with the same value are
   one patient for the split). ``test`` images have no label: skipped
   (DATASET_TEST_IMAGE). ``labels`` may also be nnU-Net v2's
   ``{"background": 0, "liver": 1}``; ``modality`` may be ``channel_names``.
2. No ``dataset.json``: ``imagesTr/`` + ``labelsTr/`` (or ``images/`` +
   ``labels/``): an image pairs with the label of the same file name, or
   with the one without nnU-Net's channel suffix (``x_0000.nii.gz`` ->
   ``x.nii.gz``). ``imagesTs/`` images are skipped as test images.

The data set must agree with the spec before anything is written: where
``dataset.json`` names its labels, every class of the spec must be named there at its value
(``labels.values``; names compared without case, ``-``/space as ``_``), and
the dataset's modality must be the spec's (CT, or any MR contrast).
Otherwise the run stops with a one-line error.

Each pair becomes one case through the same chain as a DICOM study
(:func:`fedimg.preprocess.cases.normalize_case`: orientation, spacing,
intensity, label values and ``labels.others``); the label must lie on the
image's grid up to axis flips and permutations (LABEL_GEOMETRY_MISMATCH
otherwise). One channel per case: a 4D image with several volumes (BraTS,
Decathlon prostate) or a case with several nnU-Net channel files is refused
(MULTICHANNEL_IMAGE).

Case ids are keyed pseudonyms of the image's relative path under
de-identification (an unkeyed hash with ``--no-deid``). Patients, for the
split by patient: a training item's ``"patient"``; else ``--patient-regex``
(its first group, or the whole match, on the image's file name without
``.nii``/``.nii.gz``; every image must match); else the BraTS 2023 naming
rule (``BraTS-GLI-00000-001``: patient ``BraTS-GLI-00000``, time point
``001``); else every case is its own patient (KiTS ``case_00000``, Decathlon
``liver_3``: one case per patient). Patient names are keyed like DICOM
Patient IDs and never written.

Every input file gets exactly one manifest row: images and labels
(converted or refused), ``dataset.json`` (skipped, DATASET_DESCRIPTION), and
every other file (skipped, NOT_IN_DATASET; links and unreadable entries with
their own reasons).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import nibabel as nib
import numpy as np

from fedimg.config import PreprocessSpec
from fedimg.dicom.index import FileProblem
from fedimg.dicom.labels import load_nifti_on
from fedimg.dicom.reasons import Reason, RefusedError
from fedimg.preprocess.cases import (
    CaseContext,
    CaseRecord,
    mark_converted,
    new_record,
    normalize_case,
    reuse_case,
    write_case,
)
from fedimg.preprocess.manifest import REFUSED, SKIPPED, ManifestRow, mark
from fedimg.preprocess.outdir import RECORD_FILES, read_marker
from fedimg.preprocess.scan import PreprocessInputError, check_source

logger = logging.getLogger(__name__)

DATASET_JSON = "dataset.json"
NIFTI_SUFFIX = re.compile(r"(?i)\.nii(\.gz)?$")
CHANNEL_SUFFIX = re.compile(r"_(\d{4})$")  # nnU-Net: x_0000.nii.gz is channel 0 of case x
#: (images, labels) folder pairs of a data set without dataset.json, in the order they are looked for.
PAIR_LAYOUTS = (("imagesTr", "labelsTr"), ("images", "labels"))
TEST_FOLDER = "imagesTs"
#: BraTS 2023+ names: BraTS-<cohort>-<patient>-<time point>[-<contrast>]: one patient's time points are one patient.
BRATS_PATIENT = re.compile(r"^(BraTS-[A-Za-z]+-\d{5})-\d{3}(?:-|$)")
#: The namespace of NIfTI case ids: never a DICOM Study Instance UID (those are digits and dots).
CASE_NAMESPACE = "nifti"
WHAT = "NIfTI images and labels (dataset.json, or imagesTr/ and labelsTr/)"


@dataclass
class NiftiCase:
    """One image of the data set and its label.

    Attributes:
        image_rel, image_path: the image (relative POSIX path, absolute path).
        label_rel, label_path: its label, or None.
        patient: the patient's name for the split (memory only; keyed before it is kept), "" for none.
        refusal: why the case is refused before any voxel is read, else None.
    """

    image_rel: str
    image_path: Path
    label_rel: str | None = None
    label_path: Path | None = None
    patient: str = ""
    refusal: tuple[Reason, str] | None = None

    @property
    def files(self) -> list[tuple[str, Path]]:
        """``(relative, absolute)`` of the case's input files."""
        out = [(self.image_rel, self.image_path)]
        if self.label_rel is not None and self.label_path is not None:
            out.append((self.label_rel, self.label_path))
        return out


@dataclass
class NiftiDataset:
    """What :func:`read_dataset` found: every input entry, the rows already decided, and the cases."""

    files: list[str]
    rows: dict[str, ManifestRow]
    cases: list[NiftiCase] = field(default_factory=list)
    layout: str = ""


def _stem(rel: str) -> str:
    """The file name without ``.nii`` / ``.nii.gz``."""
    return NIFTI_SUFFIX.sub("", PurePosixPath(rel).name)


def _is_nifti(rel: str) -> bool:
    name = PurePosixPath(rel).name
    return bool(NIFTI_SUFFIX.search(name)) and not name.startswith(".")


def _norm_name(name: str) -> str:
    return re.sub(r"[\s\-]+", "_", name.strip().lower())


def _dataset_path(value: Any, where: str) -> str:
    """A dataset.json path as a relative POSIX path inside SRC (the path itself is never quoted: it may be PHI)."""
    if not isinstance(value, str) or not value.strip():
        raise PreprocessInputError(f"{DATASET_JSON} {where}: expected a relative file path (a string), got none")
    text = value.strip().replace("\\", "/")
    pure = PurePosixPath(text)
    if pure.is_absolute() or ".." in pure.parts:
        raise PreprocessInputError(
            f"{DATASET_JSON} {where}: expected a path inside SRC (relative, no '..'), got one that leaves it; "
            "fix the entry"
        )
    parts = [p for p in pure.parts if p not in (".", "")]
    if not parts:
        raise PreprocessInputError(f"{DATASET_JSON} {where}: expected a file path, got the folder itself")
    return "/".join(parts)


def _dataset_labels(raw: Any) -> dict[int, str]:
    """``labels`` of dataset.json as value -> name (Decathlon ``{"1": "liver"}`` or nnU-Net v2 ``{"liver": 1}``)."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise PreprocessInputError(
            f'{DATASET_JSON} labels: expected a mapping like {{"0": "background", "1": "liver"}}, '
            f"got {type(raw).__name__}"
        )
    out: dict[int, str] = {}
    for key, value in raw.items():
        if isinstance(value, str) and str(key).strip().lstrip("-").isdigit():
            out[int(key)] = value
        elif isinstance(value, int) and not isinstance(value, bool):
            out[value] = str(key)
        else:
            raise PreprocessInputError(
                f'{DATASET_JSON} labels: expected value -> name ({{"1": "liver"}}) or name -> value '
                f'({{"liver": 1}}) entries, got one of type {type(value).__name__} (nnU-Net region lists are not '
                "read); fix dataset.json"
            )
    return out


def check_labels(spec: PreprocessSpec, names: dict[int, str]) -> None:
    """The spec's classes must be the data set's labels at their values (``labels.values``).

    Raises:
        PreprocessInputError: a class's value is missing in dataset.json or names another class.
    """
    if not names:
        return
    listed = ", ".join(f"{v} {names[v]!r}" for v in sorted(names)[:12]) + (" ..." if len(names) > 12 else "")
    for cls in spec.labels.classes:
        value = spec.labels.source_value(cls)
        if value not in names:
            raise PreprocessInputError(
                f"spec class {cls!r} has label value {value}, but {DATASET_JSON} lists no value {value} (it lists "
                f"{listed}); set labels.values so that each class has the data set's value for it"
            )
        if _norm_name(names[value]) != _norm_name(cls):
            raise PreprocessInputError(
                f"spec class {cls!r} has label value {value}, which {DATASET_JSON} names {names[value]!r}; "
                f"expected the same class at the same value: set labels.values (the data set lists {listed}) or "
                "rename the class"
            )


def check_modality(spec: PreprocessSpec, raw: Any) -> None:
    """The data set's modality (``modality`` or ``channel_names``) must be the spec's: CT, or any MR contrast.

    Raises:
        PreprocessInputError: a CT data set under an MR spec or the other way round.
    """
    if not isinstance(raw, dict) or not raw:
        return
    names = [str(v).strip() for v in raw.values()]
    is_ct = [n.upper() == "CT" for n in names]
    if (spec.modality == "CT" and not all(is_ct)) or (spec.modality == "MR" and any(is_ct)):
        raise PreprocessInputError(
            f"{DATASET_JSON} gives the modality {', '.join(names)}, but spec {spec.name!r} normalizes "
            f"{spec.modality} (modality: {spec.modality}); use a spec of the data set's modality"
        )


class _Patients:
    """The patient of each case: a training item's ``patient``, ``--patient-regex``, the BraTS rule, or itself."""

    def __init__(self, regex: str | None) -> None:
        self.unmatched = 0
        try:
            self.regex = re.compile(regex) if regex else None
        except re.error as exc:
            raise PreprocessInputError(f"--patient-regex is not a valid regular expression ({exc})") from None

    def __call__(self, image_rel: str, given: Any) -> str:
        if isinstance(given, str) and given.strip():
            return given.strip()
        if given is not None and not isinstance(given, str):
            raise PreprocessInputError(
                f'{DATASET_JSON}: expected "patient" as a string (the cases of one patient share it), '
                f"got {type(given).__name__}"
            )
        name = CHANNEL_SUFFIX.sub("", _stem(image_rel))
        if self.regex is not None:
            m = self.regex.search(name)
            if m is None:
                self.unmatched += 1
                return ""
            return m.group(1) if m.groups() and m.group(1) else m.group(0)
        m = BRATS_PATIENT.match(name)
        return m.group(1) if m else ""


def looks_like_dataset(src: Path) -> bool:
    """SRC has the top-level shape of a NIfTI data set (a ``dataset.json``, or an images/labels folder pair)."""
    return (src / DATASET_JSON).is_file() or any((src / i).is_dir() and (src / lbl).is_dir() for i, lbl in PAIR_LAYOUTS)


def read_dataset(src: Path, spec: PreprocessSpec, patient_regex: str | None = None) -> NiftiDataset:
    """Read SRC's layout (nothing is decoded): its cases, and the rows of every file that is not one.

    Raises:
        PreprocessInputError: SRC is missing or empty, has neither layout,
            its dataset.json is malformed or disagrees with the spec (labels,
            modality), or ``patient_regex`` is invalid or misses an image.
    """
    entries = check_source(src, WHAT)
    files: list[str] = []
    regular: dict[str, Path] = {}
    rows: dict[str, ManifestRow] = {}
    own = read_marker(src) is not None
    for e in entries:
        if isinstance(e, FileProblem):
            files.append(e.rel)
            rows[e.rel] = ManifestRow(e.rel, SKIPPED if e.skipped else REFUSED, e.reason.value, e.detail)
            continue
        rel = e.relative_to(src).as_posix()
        files.append(rel)
        if own and rel in RECORD_FILES:
            rows[rel] = ManifestRow(rel, SKIPPED, Reason.FEDIMG_RECORD.value, "fedimg's record of this folder")
        else:
            regular[rel] = e
    patients = _Patients(patient_regex)
    if DATASET_JSON in regular:
        dataset = _from_dataset_json(src, spec, regular, rows, patients)
    else:
        dataset = _from_folders(src, regular, rows, patients)
    if patients.unmatched:
        raise PreprocessInputError(
            f"--patient-regex matched no part of the file names of {patients.unmatched} of "
            f"{len(dataset.cases)} image(s): expected a pattern that finds the patient in every image's name "
            "(e.g. '^(BraTS-GLI-\\d+)-\\d+'); fix the pattern, or leave it out (each case is then its own patient)"
        )
    in_cases = {c.image_rel for c in dataset.cases} | {c.label_rel for c in dataset.cases if c.label_rel}
    for rel in regular:
        if rel not in rows and rel not in in_cases:
            rows[rel] = ManifestRow(
                rel,
                SKIPPED,
                Reason.NOT_IN_DATASET.value,
                "a hidden file" if PurePosixPath(rel).name.startswith(".") else _not_listed(dataset.layout, rel),
            )
    dataset.files = files
    dataset.rows = rows
    return dataset


def _not_listed(layout: str, rel: str) -> str:
    if layout == DATASET_JSON:
        return "a NIfTI file that dataset.json does not list" if _is_nifti(rel) else "not listed in dataset.json"
    return f"not a NIfTI file directly in the data set's {layout}"


def _load_json(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise PreprocessInputError(f"{DATASET_JSON} could not be read ({type(exc).__name__})") from None
    except json.JSONDecodeError as exc:
        raise PreprocessInputError(
            f"{DATASET_JSON} is not valid JSON ({exc.msg} at line {exc.lineno}); fix it, or remove it to pair "
            "imagesTr/ with labelsTr/ by file name"
        ) from None
    if not isinstance(raw, dict):
        raise PreprocessInputError(f"{DATASET_JSON}: expected a JSON object, got {type(raw).__name__}")
    return raw


def _from_dataset_json(
    src: Path, spec: PreprocessSpec, regular: dict[str, Path], rows: dict[str, ManifestRow], patients: _Patients
) -> NiftiDataset:
    """Cases from a Decathlon ``dataset.json``."""
    raw = _load_json(src / DATASET_JSON)
    rows[DATASET_JSON] = ManifestRow(
        DATASET_JSON,
        SKIPPED,
        Reason.DATASET_DESCRIPTION.value,
        "the data set's description: pairs, labels and modality were read from it",
    )
    check_modality(spec, raw.get("modality", raw.get("channel_names")))
    check_labels(spec, _dataset_labels(raw.get("labels")))
    training = raw.get("training")
    if not isinstance(training, list):
        raise PreprocessInputError(
            f'{DATASET_JSON}: expected "training" as a list of {{"image": ..., "label": ...}} items, '
            f"got {type(training).__name__ if training is not None else 'none'}"
        )
    out = NiftiDataset(files=[], rows=rows, layout=DATASET_JSON)
    used: dict[str, str] = {}

    def claim(rel: str, where: str) -> None:
        if rel in used:
            raise PreprocessInputError(
                f"{DATASET_JSON}: {where} names the file {used[rel]} names already; expected each image and label once"
            )
        used[rel] = where

    for i, item in enumerate(training):
        where = f"training[{i}]"
        if not isinstance(item, dict):
            raise PreprocessInputError(f'{DATASET_JSON} {where}: expected {{"image": ..., "label": ...}}')
        if isinstance(item.get("image"), list):
            raise PreprocessInputError(
                f"{DATASET_JSON} {where}.image is a list of channel files; fedimg reads one single-channel "
                "image per case: list one file per case"
            )
        image = _dataset_path(item.get("image"), f"{where}.image")
        claim(image, f"{where}.image")
        label = None
        if item.get("label") is not None:
            label = _dataset_path(item.get("label"), f"{where}.label")
            claim(label, f"{where}.label")
        case = _pair(image, label, regular, rows, patients(image, item.get("patient")), where)
        if case is not None:
            out.cases.append(case)
    test = raw.get("test") or []
    if not isinstance(test, list):
        raise PreprocessInputError(f'{DATASET_JSON}: expected "test" as a list of image paths')
    for i, item in enumerate(test):
        value = item.get("image") if isinstance(item, dict) else item
        rel = _dataset_path(value, f"test[{i}]")
        claim(rel, f"test[{i}]")
        if rel in regular:
            rows[rel] = ManifestRow(
                rel, SKIPPED, Reason.DATASET_TEST_IMAGE.value, "listed under test in dataset.json (no label)"
            )
    return out


def _pair(
    image: str,
    label: str | None,
    regular: dict[str, Path],
    rows: dict[str, ManifestRow],
    patient: str,
    where: str,
) -> NiftiCase | None:
    """A case of an image and its label as dataset.json pairs them; None when the image is no input file.

    A missing image leaves nothing to convert (its label, if present, is
    refused); a missing label refuses the image (NO_LABEL).
    """
    if image not in regular:
        if label is not None and label in regular:
            mark(
                rows,
                [label],
                REFUSED,
                Reason.IMAGE_REFUSED,
                f"dataset.json {where}.image names no readable regular file in SRC (missing, a link, or unreadable)",
            )
        return None
    case = NiftiCase(image, regular[image], patient=patient)
    if label is not None and label in regular:
        case.label_rel, case.label_path = label, regular[label]
    elif label is not None:
        case.refusal = (
            Reason.NO_LABEL,
            f"dataset.json {where}.label names no readable regular file in SRC (missing, a link, or unreadable)",
        )
    return case


def _from_folders(
    src: Path, regular: dict[str, Path], rows: dict[str, ManifestRow], patients: _Patients
) -> NiftiDataset:
    """Cases of ``imagesTr/`` + ``labelsTr/`` (or ``images/`` + ``labels/``), paired by file name."""
    present = [(i, lbl) for i, lbl in PAIR_LAYOUTS if (src / i).is_dir() and (src / lbl).is_dir()]
    if len(present) != 1:
        nested = sorted(p.parent.name for p in src.glob(f"*/{DATASET_JSON}"))
        hint = f"; a sub-folder holds one ({nested[0]}/): pass that folder as SRC" if nested and not present else ""
        raise PreprocessInputError(
            f"SRC is not a NIfTI data set fedimg reads: expected {DATASET_JSON} at its top, or exactly one of the "
            "folder pairs imagesTr/ + labelsTr/ or images/ + labels/, found "
            + ("both pairs" if present else "neither")
            + hint
        )
    images_dir, labels_dir = present[0]
    layout = f"{images_dir}/ and {labels_dir}/"
    out = NiftiDataset(files=[], rows=rows, layout=layout)

    def direct(folder: str) -> dict[str, str]:
        return {
            rel: _stem(rel)
            for rel in regular
            if PurePosixPath(rel).parent.as_posix() == folder and _is_nifti(rel) and rel not in rows
        }

    labels = {stem: rel for rel, stem in direct(labels_dir).items()}
    by_case: dict[str, list[str]] = {}
    for rel, stem in direct(images_dir).items():
        key = stem if stem in labels else CHANNEL_SUFFIX.sub("", stem)
        by_case.setdefault(key, []).append(rel)
    for rel in direct(TEST_FOLDER):
        rows[rel] = ManifestRow(rel, SKIPPED, Reason.DATASET_TEST_IMAGE.value, f"an image in {TEST_FOLDER}/ (no label)")
    matched: set[str] = set()
    for key, images in sorted(by_case.items()):
        label_rel = labels.get(key)
        if label_rel is not None:
            matched.add(label_rel)
        if len(images) > 1:
            detail = (
                f"{len(images)} channel files of one case (nnU-Net _0000, _0001 ...); fedimg reads one "
                "single-channel image per case"
            )
            mark(rows, images, REFUSED, Reason.MULTICHANNEL_IMAGE, detail)
            if label_rel is not None:
                mark(rows, [label_rel], REFUSED, Reason.IMAGE_REFUSED, "its case has several channel files")
            continue
        (image,) = images
        case = NiftiCase(image, regular[image], patient=patients(image, None))
        if label_rel is not None:
            case.label_rel, case.label_path = label_rel, regular[label_rel]
        out.cases.append(case)
    for rel in labels.values():
        if rel not in matched:
            rows[rel] = ManifestRow(
                rel, REFUSED, Reason.LABEL_UNMATCHED.value, f"no image of the same name in {images_dir}/"
            )
    return out


def case_ids(image_rel: str, pseudonymizer: Any | None) -> tuple[str, str]:
    """``(case id, order key)`` of a NIfTI case: a keyed pseudonym of the image's path (unkeyed hash without one),
    and the unkeyed hash that orders new patients in the split."""
    digest = hashlib.sha256(os.fsencode(f"{CASE_NAMESPACE}|{image_rel}")).hexdigest()
    order = f"case-{digest[:12]}"
    if pseudonymizer is not None:
        return pseudonymizer.case(CASE_NAMESPACE, image_rel), order
    return order, order


def convert_nifti_case(args: tuple[NiftiCase, CaseContext]) -> tuple[dict[str, ManifestRow], CaseRecord | None]:
    """Worker entry: one NIfTI case's manifest rows and record (None when refused)."""
    case, ctx = args
    rows: dict[str, ManifestRow] = {}
    return rows, _convert(case, ctx, rows)


def _convert(case: NiftiCase, ctx: CaseContext, rows: dict[str, ManifestRow]) -> CaseRecord | None:
    case_id, order = case_ids(case.image_rel, ctx.pseudonymizer)
    label_rels = [case.label_rel] if case.label_rel is not None else []

    def refuse_all(reason: Reason, detail: str) -> None:
        mark(rows, [case.image_rel], REFUSED, reason, detail, case_id=case_id)
        label_owned = reason in (Reason.LABEL_GEOMETRY_MISMATCH, Reason.LABEL_VALUES_UNEXPECTED, Reason.NOT_A_LABEL)
        label_reason = reason if label_owned else Reason.IMAGE_REFUSED
        mark(rows, label_rels, REFUSED, label_reason, detail, case_id=case_id)

    if case.refusal is not None:
        refuse_all(*case.refusal)
        return None
    if case.label_rel is None and ctx.spec.labels.required:
        refuse_all(Reason.NO_LABEL, "no label for this image in the data set; labels.required is true")
        return None
    rec = new_record(case_id, case.patient, order, case.files, ctx.pseudonymizer)
    try:
        rec = reuse_case(rec, ctx, case.label_rel is not None) or _convert_new(rec, case, ctx)
    except RefusedError as exc:
        refuse_all(exc.reason, exc.detail)
        return None
    mark_converted(rows, [case.image_rel], label_rels, rec)
    return rec


def load_nifti_image(path: Path, min_slices: int) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """A NIfTI image volume as stored: ``(voxels, voxel-to-RAS affine, (slope, intercept))``.

    Raises:
        RefusedError: NIFTI_UNREADABLE, MULTICHANNEL_IMAGE (a 4D image of
            several volumes), UNSUPPORTED_PIXELS (not 3D, complex or RGB
            voxels, NaN or infinite values), NO_GEOMETRY (a singular or
            non-finite affine), TOO_FEW_SLICES.
    """
    try:
        img: Any = nib.load(str(path))  # a NIfTI image (nibabel types it as any file-based image)
        proxy = img.dataobj
        shape = tuple(int(s) for s in img.shape)
        affine = np.asarray(img.affine, dtype=np.float64)
        dtype = np.dtype(img.get_data_dtype())
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types on bad files
        raise RefusedError(Reason.NIFTI_UNREADABLE, f"not a readable NIfTI file ({type(exc).__name__})") from None
    if len(shape) == 4 and shape[3] > 1:
        raise RefusedError(
            Reason.MULTICHANNEL_IMAGE,
            f"a 4D image of {shape[3]} volumes (channels or time points); fedimg reads one single-channel "
            "volume per case",
        )
    if len(shape) not in (3, 4) or any(s < 1 for s in shape):
        raise RefusedError(Reason.UNSUPPORTED_PIXELS, f"a {len(shape)}D image {list(shape)}; expected a 3D volume")
    if dtype.fields is not None or dtype.kind not in "biuf":
        raise RefusedError(Reason.UNSUPPORTED_PIXELS, f"voxels of type {dtype}; expected greyscale numbers")
    if not np.all(np.isfinite(affine)) or abs(float(np.linalg.det(affine[:3, :3]))) < 1e-12:
        raise RefusedError(Reason.NO_GEOMETRY, "the NIfTI affine (sform/qform) is singular or not finite")
    if min(shape[:3]) < min_slices:
        raise RefusedError(
            Reason.TOO_FEW_SLICES,
            f"{min(shape[:3])} voxel(s) along an axis of {list(shape[:3])}; geometry.min_slices is {min_slices}",
        )
    try:
        data = np.asarray(proxy.get_unscaled())
        slope, inter = (float(v) for v in (proxy.slope, proxy.inter))
    except Exception as exc:  # noqa: BLE001 - a truncated gzip stream shows only here
        raise RefusedError(Reason.NIFTI_UNREADABLE, f"its voxels could not be read ({type(exc).__name__})") from None
    if data.ndim == 4:
        data = data[..., 0]
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        raise RefusedError(Reason.UNSUPPORTED_PIXELS, "the image holds NaN or infinite values")
    if not (np.isfinite(slope) and np.isfinite(inter)) or slope == 0:
        raise RefusedError(Reason.UNSUPPORTED_PIXELS, "the image's scl_slope / scl_inter are not usable numbers")
    return data, affine, (slope, inter)


def _convert_new(rec: CaseRecord, case: NiftiCase, ctx: CaseContext) -> CaseRecord:
    """Read, check, normalize and write one case."""
    data, affine, scale = load_nifti_image(case.image_path, ctx.spec.geometry.min_slices)
    raw, label_scale = None, (1.0, 0.0)
    if case.label_path is not None:
        raw, label_scale = load_nifti_on(case.label_path, tuple(data.shape), affine)
    image_arr, label_arr, out_affine = normalize_case(ctx, rec, data, affine, scale, raw, label_scale)
    return write_case(rec, image_arr, label_arr, out_affine, ctx)


__all__ = [
    "DATASET_JSON",
    "NiftiCase",
    "NiftiDataset",
    "case_ids",
    "check_labels",
    "check_modality",
    "convert_nifti_case",
    "load_nifti_image",
    "looks_like_dataset",
    "read_dataset",
]
