"""``fedimg preprocess``: a site's DICOM tree -> normalized images, datalist, manifest.

The stages, each in its own module:

1. :mod:`fedimg.dicom.index` reads every header (no pixels) and groups series.
2. Series are selected per study: one image series and, for segmentation,
   its label (a DICOM mask series, a SEG or a NIfTI file); for
   classification, the study's class from the site's labels CSV
   (:mod:`fedimg.preprocess.labels_csv`). Everything else is skipped with a
   reason.
3. Geometry is validated from headers alone, before any pixel is decoded:
   the slice stack of a volume (:mod:`fedimg.dicom.geometry`), or the single
   frame and pixel size of a 2D image (:mod:`fedimg.dicom.planar`).
4. Pixels are decoded (:mod:`fedimg.dicom.volume`, :mod:`fedimg.dicom.planar`);
   a segmentation label is brought onto the image grid and checked.
5. :mod:`fedimg.preprocess.transforms` applies the shared MONAI chain.
6. Outputs are written atomically; every input file gets exactly one row in
   ``manifest.jsonl`` and the accounting ``inputs == converted + refused +
   skipped`` is checked before the run reports success.

Re-runs into the same DST are incremental (:mod:`fedimg.preprocess.state`):
a case whose input files are unchanged is reused, every case keeps its
training/validation split, and outputs of cases that are gone are removed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from fedimg import config as cfgmod
from fedimg.config import PreprocessSpec
from fedimg.datalist import Datalist, DatalistItem
from fedimg.dicom.index import DicomHeader, SeriesGroup, group_series
from fedimg.dicom.labels import (
    SEG_SOP_CLASS,
    check_label_values,
    check_mask_grid,
    load_nifti_on_grid,
    load_seg_on_grid,
    map_label_values,
    match_nifti_to_study,
)
from fedimg.dicom.planar import PlanarGeometry, load_planar, planar_geometry
from fedimg.dicom.quiet import quiet_dicom, quiet_dicom_call
from fedimg.dicom.reasons import Reason, RefusedError
from fedimg.dicom.resample import RESAMPLABLE, load_regularized
from fedimg.dicom.volume import load_volume, series_geometry
from fedimg.preprocess.io import TMP_PREFIX, write_json, write_jsonl, write_nifti
from fedimg.preprocess.labels_csv import LabelSheet, LabelsCsvError, class_index, read_labels_csv
from fedimg.preprocess.manifest import (
    CONVERTED,
    REFUSED,
    SKIPPED,
    ManifestRow,
    finalize,
    render_table,
    summarize,
)
from fedimg.preprocess.manifest import mark as _mark
from fedimg.preprocess.outdir import OutputDir, OutputDirError, announce, check_separate, claim, precheck
from fedimg.preprocess.scan import PreprocessInputError, ScanResult, index_source
from fedimg.preprocess.splits import Assignment, CaseKey
from fedimg.preprocess.splits import assign as assign_splits
from fedimg.preprocess.state import (
    PreprocessState,
    inputs_fingerprint,
    load_previous,
    save_state,
)
from fedimg.preprocess.transforms import apply_spec, apply_spec_2d
from fedimg.preprocess.workers import default_workers, worker_pool
from fedimg.safepath import UnsafePathError, child_path, is_uid, printable_path, uid_component

logger = logging.getLogger(__name__)

__all__ = ["LabelsCsvError", "PreprocessInputError", "PreprocessResult", "preprocess"]

#: CSV files in an export are label sheets, not images: claimed and skipped (LABEL_SHEET).
CSV_NAME_REGEX = r"(?i)\.csv$"


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


@dataclass
class PreprocessResult:
    """What a preprocessing run did; also written as ``DST/summary.json``."""

    site: str
    src_files: int
    counts: dict[str, int]
    reasons: dict[str, int]  # "status:REASON" -> files, as in the manifest account
    outputs: int
    cases: list[CaseRecord]
    datalist: str
    manifest: str
    task: str = "segmentation"
    spatial_dims: int = 3
    cases_converted: int = 0
    cases_reused: int = 0
    cases_removed: int = 0  # cases of earlier runs whose inputs are gone (or now refused): outputs removed
    labels_csv: dict[str, Any] | None = None  # classification: counts of CSV rows (never keys)
    patients: int = 0  # distinct patients among the cases (cases without a Patient ID count as their own)
    cases_without_patient_id: int = 0

    @property
    def problem(self) -> str | None:
        """Why this run's output cannot train a model (no case, or no validation case); None when usable."""
        if not self.cases:
            return (f"site {self.site}: no case was converted ({self.src_files} input files); the manifest says why "
                    "for each file: fedimg manifest DST")
        if not any(c.split == "validation" for c in self.cases):
            return (f"site {self.site}: {len(self.cases)} case(s), none of them for validation (a site needs at "
                    "least 2 cases to hold one out); add studies, or check the refusals: fedimg manifest DST")
        return None

    def table(self) -> str:
        """A human-readable summary: counts, reasons with what to do, cases, paths."""
        summary = {"inputs": self.src_files, "counts": self.counts, "reasons": self.reasons,
                   "outputs": self.outputs}
        lines = [
            render_table(summary, f"site {self.site}"),
            f"  cases: {len(self.cases)} ({sum(c.split == 'training' for c in self.cases)} training, "
            f"{sum(c.split == 'validation' for c in self.cases)} validation"
            + (f", {sum(c.split == 'test' for c in self.cases)} test" if any(c.split == "test" for c in self.cases)
               else "")
            + f"; {self.patients} patient(s), split by patient); "
            f"{self.cases_converted} converted, {self.cases_reused} reused unchanged"
            + (f", {self.cases_removed} removed (inputs gone or refused)" if self.cases_removed else ""),
        ]
        if self.labels_csv is not None:
            lc = self.labels_csv
            lines.append(f"  labels CSV: {lc['rows']} rows, {lc['rows_matched']} matched a study, "
                         f"{lc['rows_unmatched']} matched none" +
                         (f", {lc['rows_without_key']} without a key" if lc["rows_without_key"] else ""))
        lines += [f"  datalist: {self.datalist}", f"  manifest: {self.manifest}"]
        return "\n".join(lines)


#: Prefix of the patient key of a case whose files carry no (0010,0020) Patient ID: it is its own patient.
NO_PATIENT_ID = "case:"


def _patient_key(patient_id: str, case_id: str, pseudonymizer: Any | None) -> str:
    """The key a case's patient is split by: a keyed pseudonym (unkeyed hash under --no-deid), never the ID."""
    if not patient_id:
        return NO_PATIENT_ID + case_id
    if pseudonymizer is not None:
        return pseudonymizer.patient(patient_id)
    return "P" + hashlib.sha256(patient_id.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def case_id_for(study_uid: str, series_uid: str) -> str:
    """A stable, file-name-safe case id that does not spell out a UID."""
    digest = hashlib.sha256(f"{study_uid}|{series_uid}".encode()).hexdigest()
    return f"case-{digest[:12]}"


class _Study:
    def __init__(self, uid: str) -> None:
        self.uid = uid
        # (group, geometry) or, for a stack to resample (geometry.irregular), (group, None, reason)
        self.images: list[tuple] = []
        self.masks: list[SeriesGroup] = []
        self.niftis: list[tuple[Path, str]] = []
        self.segs: list[DicomHeader] = []
        # classification: (class index, None) or (None, (reason, detail)) from the labels CSV
        self.cls: tuple[int | None, tuple[Reason, str] | None] | None = None
        # PHI-free detail when an UNREADABLE entry beside the study's files may hold its label
        self.unreadable: str | None = None


def _unsafe_uid_detail(headers: list[DicomHeader]) -> str:
    """Why a series of a study with a non-UID (0008,0018) is refused under ``--write-dicom`` (PHI-free)."""
    bad = sum(not is_uid(h.sop_instance_uid) for h in headers)
    if not bad:
        return ("another series of this study has a (0008,0018) SOP Instance UID that is not a UID; "
                "--write-dicom copies whole cases, each file named by its UID")
    return (f"{bad} of {len(headers)} file(s) have a (0008,0018) SOP Instance UID that is not a UID (expected "
            "digits and dots, at most 64 characters); --write-dicom names each de-identified copy by it")


def _unreadable_near(unreadable: list[str], folders: dict[str, set[str]]) -> dict[str, list[str]]:
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
            hits = [uid for uid, dirs in folders.items()
                    if any(not prefix or d == prefix or d.startswith(prefix + "/") for d in dirs)]
            if hits:
                for uid in hits:
                    near[uid].append(rel)
                break
    return near


def _unreadable_detail(near: list[str], ref: Any) -> str:
    """PHI-free detail of an image held for unreadable entries; ``ref`` shows a path as its manifest row does."""
    shown = ", ".join(ref(r) for r in near[:3]) + (f" and {len(near) - 3} more" if len(near) > 3 else "")
    return (f"no label was found for this image, and {len(near)} entr{'y' if len(near) == 1 else 'ies'} beside its "
            f"files could not be read (UNREADABLE row(s) {shown}); its label may be there: make it readable and "
            "run again")


def _study_task(args: tuple) -> tuple[dict[str, ManifestRow], CaseRecord | None]:
    """Worker: convert one study; returns its manifest rows and case record."""
    study, spec, dst, class_values, geo_kwargs, pseudonymizer, previous = args
    local: dict[str, ManifestRow] = {}
    with quiet_dicom():
        rec = _convert_study(study, spec, dst, local, class_values, geo_kwargs, pseudonymizer, previous)
    return local, rec


def _study_key(study: _Study, spec: PreprocessSpec) -> str:
    """The study's value of the CSV key attribute (an identifier: memory only)."""
    h = study.images[0][0].first
    return (h.accession_number if spec.labels.csv_key == "accession" else h.study_uid).strip()


def _classify(study: _Study, spec: PreprocessSpec, sheet: LabelSheet) -> tuple[int | None, tuple[Reason, str] | None]:
    """The study's class from the CSV, or a PHI-free refusal (the key is never quoted)."""
    tag = spec.labels.key_tag
    key = _study_key(study, spec)
    if not key:
        return None, (Reason.NO_LABEL, f"{tag} is empty in this study, so it has no row in the labels CSV; "
                                       "set labels.csv_key to another key, or add the attribute")
    value = sheet.lookup(key)
    if value is None:
        return None, (Reason.NO_LABEL, f"no row in the labels CSV for this study's {tag} (column "
                                       f"{sheet.key_column!r}); add a row for it")
    idx = class_index(value, spec.labels.classes)
    if idx is None:
        classes = ", ".join(spec.labels.classes)
        what = "is empty" if not value else "is not a class"
        return None, (Reason.LABEL_VALUES_UNEXPECTED,
                      f"the labels CSV's {sheet.label_column!r} cell for this study {what}; expected one of "
                      f"{classes} (or an index 0..{len(spec.labels.classes) - 1}); fix the CSV")
    return idx, None


@quiet_dicom_call
def preprocess(src: str | Path, dst: str | Path, spec: PreprocessSpec, site: str,
               progress: bool = True, workers: int | None = 1,
               pseudonymizer: Any | None = None, crosswalk: str | Path | None = None,
               write_dicom: str | Path | None = None,
               labels_csv: str | Path | None = None) -> PreprocessResult:
    """Convert and normalize every case under ``src`` into ``dst``.

    Re-runs are incremental. Running again into the same ``dst`` with the
    same spec and the same site secret, after the site added, changed or
    removed studies:

    - reuses every case whose input files (relative paths, sizes and
      modification times) are unchanged: nothing of it is decoded again;
      only new and changed studies are converted;
    - keeps the training/validation split of every case seen before (also
      of a case that was missing for a while); new cases go to validation
      until the validation share reaches ``split.val_fraction`` again, in
      seeded-hash order (see :func:`fedimg.preprocess.state.assign_splits`);
    - rewrites the manifest and datalist for the current source: one row per
      current file; cases whose inputs are gone (or that are now refused)
      leave the datalist and their outputs are removed;
    - reads the labels CSV again, so reused classification cases carry the
      labels of the current CSV.

    ``dst`` must be new, empty, or an earlier ``preprocess`` output, and must
    not overlap ``src`` (:mod:`fedimg.preprocess.outdir`); the same holds for
    ``write_dicom`` (a ``dicom-copies`` folder). While the run works, ``dst``
    is locked: a second run into it is refused at once. Outputs of cases that
    are gone are removed only if fedimg's records say it wrote them.

    A ``dst`` written with another spec (its ``spec.yaml`` differs) or
    another site secret (or with/without de-identification) is refused with
    :class:`fedimg.preprocess.state.IncompatibleOutputError` before any work:
    mixing would put outputs of two specs in one datalist, or redraw the
    split and move validation cases into training. Use a new ``dst``, or
    empty it to start over.

    Args:
        src: the site's raw export (read only; never modified).
        dst: output folder: ``images/``, ``labels/``, ``datalist.json``,
            ``manifest.jsonl``, ``spec.yaml``, ``summary.json`` and the
            site-private ``.fedimg_preprocess_state.json``.
        spec: the shared preprocessing spec.
        site: the site's name (recorded in the summary and logs).
        progress: show tqdm progress bars.
        workers: processes converting studies in parallel (None: CPU count).
        pseudonymizer: a :class:`fedimg.dicom.deid.Pseudonymizer` holding the
            site secret. With it, case ids (and so file names) are keyed
            HMAC pseudonyms, and manifest ``input`` fields are keyed hashes of
            the paths. Without it, case ids are unkeyed hashes and inputs are
            plain relative paths.
        crosswalk: with a pseudonymizer, where to keep the hash-to-path
            crosswalk (owner-only, a site-private location outside ``dst``);
            None keeps none.
        write_dicom: with a pseudonymizer, a folder for de-identified DICOM
            copies of every converted series (PS3.15 Basic Profile, keyed).
            Objects that may carry burned-in text are refused.
        labels_csv: classification specs only (and required there): the
            site's CSV of study key -> class (see
            :mod:`fedimg.preprocess.labels_csv`). A CSV file inside ``src``
            gets a manifest row, skipped as ``LABEL_SHEET``.

    Raises:
        PreprocessInputError: ``src`` is missing, empty, or holds no DICOM; a
            classification spec without ``labels_csv`` or a segmentation spec
            with one; :class:`LabelsCsvError` for a missing or unreadable CSV
            or missing columns; ``IncompatibleOutputError`` (see above). All
            are raised before anything is written.
    """
    site = cfgmod.validate_site_name(site, "site")
    src, dst = Path(src), Path(dst)
    sheet: LabelSheet | None = None
    if spec.is_classification:
        if labels_csv is None:
            raise PreprocessInputError(
                f"spec {spec.name!r} is a classification spec (task: classification): expected --labels-csv FILE "
                "(the site's CSV of study key and class), found none")
        sheet = read_labels_csv(labels_csv, spec.labels)
    elif labels_csv is not None:
        raise PreprocessInputError(
            f"--labels-csv was given, but spec {spec.name!r} is a segmentation spec whose labels come from mask "
            "series or NIfTI files; drop --labels-csv, or use a spec with task: classification")
    # Every output location is checked before any work; DST is claimed (created, locked) only then.
    precheck(dst, "preprocess", src=src)
    if write_dicom is not None:
        check_separate(dst, write_dicom, src_name="DST", dst_name="--write-dicom")
        precheck(write_dicom, "dicom-copies", src=src, what="--write-dicom")
    if crosswalk is not None:
        check_crosswalk(Path(crosswalk), src, dst)
    load_previous(dst, spec, pseudonymizer)  # refuses a DST of another spec or secret, before any work
    scanned = index_source(src, claim=[spec.series.label_nifti_name_regex, CSV_NAME_REGEX], label=site,
                           progress=progress)
    with claim(dst, "preprocess", src=src) as out:
        return _preprocess_into(out, scanned, src, spec, site, progress, workers, pseudonymizer, crosswalk,
                                write_dicom, labels_csv, sheet)


CROSSWALK_KEYS = frozenset({"input_hash", "input"})


def check_crosswalk(path: Path, src: Path, dst: Path, keys: frozenset[str] = CROSSWALK_KEYS) -> None:
    """The crosswalk links pseudonyms to input paths: it stays outside SRC and DST, and replaces only a crosswalk.

    Args:
        keys: the keys of a crosswalk line of this command (an existing file must start with one).
    """
    for folder, name in ((src, "SRC"), (dst, "DST")):
        try:
            Path(os.path.realpath(path)).relative_to(os.path.realpath(folder))
        except ValueError:
            continue
        raise OutputDirError(f"--crosswalk lies inside {name}: expected a site-private file outside SRC and DST "
                             "(DST is what is shared or read next); choose a path elsewhere, e.g. beside the site "
                             "secret")
    if path.exists():
        first = b""
        if path.is_file():
            with path.open("rb") as fh:
                first = fh.readline()
        try:
            ok = set(json.loads(first)) == set(keys)
        except (ValueError, TypeError):
            ok = False
        if not ok:
            raise OutputDirError("--crosswalk names an existing file that is not a fedimg crosswalk: expected a new "
                                 "path (or the crosswalk of an earlier run, which is replaced); fedimg never "
                                 "overwrites a file it did not write: choose another path")


def geometry_kwargs(spec: PreprocessSpec) -> dict[str, Any]:
    """The spec's geometry checks as keyword arguments of :func:`fedimg.dicom.volume.series_geometry`."""
    return dict(min_slices=spec.geometry.min_slices, spacing_tolerance=spec.geometry.spacing_tolerance,
                orientation_tolerance=spec.geometry.orientation_tolerance)


def select_series(image_headers: list[DicomHeader], spec: PreprocessSpec, rows: dict[str, ManifestRow],
                  unsafe: set[str] | frozenset[str] = frozenset()) -> dict[str, _Study]:
    """Group image headers into studies and pick each study's candidate image series as the spec says.

    Label series (``series.label_description_regex``) and DICOM SEG objects
    become the study's labels (segmentation); series of other modalities, or
    whose description misses ``series.image_description_regex``, are skipped;
    a candidate's geometry is validated from its headers. Files decided here
    get their manifest row in ``rows``. ``fedimg predict`` selects a study's
    image exactly like this.

    Args:
        unsafe: Study Instance UIDs whose files are refused whole (UNSAFE_NAME).

    Returns:
        Study Instance UID -> study (``images``: candidate image series with their geometry).
    """
    label_re = re.compile(spec.series.label_description_regex)
    image_re = re.compile(spec.series.image_description_regex) if spec.series.image_description_regex else None
    classify = spec.is_classification
    studies: dict[str, _Study] = {}
    # DICOM SEG objects are labels, read through highdicom, not image series.
    for h in [h for h in image_headers if h.sop_class_uid == SEG_SOP_CLASS]:
        if classify:
            rows[h.rel] = ManifestRow(h.rel, SKIPPED, Reason.LABEL_NOT_USED.value,
                                      "a DICOM SEG; a classification spec takes classes from the labels CSV")
            continue
        study = studies.setdefault(h.study_uid, _Study(h.study_uid))
        if h.study_uid in unsafe:
            rows[h.rel] = ManifestRow(h.rel, REFUSED, Reason.UNSAFE_NAME.value, _unsafe_uid_detail([h]))
            continue
        study.segs.append(h)
    image_headers = [h for h in image_headers if h.sop_class_uid != SEG_SOP_CLASS]
    geo_kwargs = geometry_kwargs(spec)
    groups = group_series(image_headers, spec.geometry.orientation_tolerance)
    per_series = Counter(g.series_uid for g in groups)
    files_per_series = Counter((h.study_uid, h.series_uid) for h in image_headers)
    modalities = spec.series.modalities
    for g in groups:
        study = studies.setdefault(g.study_uid, _Study(g.study_uid))
        if label_re.search(g.description):
            if classify:
                _mark(rows, g.rels, SKIPPED, Reason.LABEL_NOT_USED,
                      "a label series (series.label_description_regex); a classification spec takes classes "
                      "from the labels CSV")
            elif g.study_uid in unsafe:
                _mark(rows, g.rels, REFUSED, Reason.UNSAFE_NAME, _unsafe_uid_detail(g.headers))
            else:
                study.masks.append(g)
            continue
        if g.modality.upper() not in modalities:
            _mark(rows, g.rels, SKIPPED, Reason.MODALITY_NOT_SELECTED,
                  f"modality {g.modality or '?'}; spec selects {', '.join(modalities)}")
            continue
        if image_re is not None and not image_re.search(g.description):
            _mark(rows, g.rels, SKIPPED, Reason.SERIES_NOT_SELECTED,
                  "(0008,103E) Series Description does not match series.image_description_regex")
            continue
        if g.study_uid in unsafe:
            _mark(rows, g.rels, REFUSED, Reason.UNSAFE_NAME, _unsafe_uid_detail(g.headers))
            continue
        if spec.spatial_dims == 2:
            try:
                study.images.append((g, planar_geometry(g, files_per_series[(g.study_uid, g.series_uid)])))
            except RefusedError as exc:
                _mark(rows, g.rels, REFUSED, exc.reason, exc.detail)
            continue
        try:
            geo = series_geometry(g, **geo_kwargs)
        except RefusedError as exc:
            if spec.geometry.irregular == "resample" and exc.reason in RESAMPLABLE:
                study.images.append((g, None, exc.reason))
                continue
            extra = f" (series split into {per_series[g.series_uid]} groups)" if per_series[g.series_uid] > 1 else ""
            _mark(rows, g.rels, REFUSED, exc.reason, exc.detail + extra)
            continue
        study.images.append((g, geo))
    return studies


def _preprocess_into(out: OutputDir, scanned: ScanResult, src: Path, spec: PreprocessSpec, site: str, progress: bool, workers: int | None,
                     pseudonymizer: Any | None, crosswalk: str | Path | None, write_dicom: str | Path | None,
                     labels_csv: str | Path | None, sheet: LabelSheet | None) -> PreprocessResult:
    """The body of :func:`preprocess`, in a claimed and locked DST."""
    dst = out.path
    previous = load_previous(dst, spec, pseudonymizer)

    csv_re = re.compile(CSV_NAME_REGEX)
    index, rows = scanned.index, scanned.rows
    classify = spec.is_classification
    used_csv = Path(labels_csv).resolve() if labels_csv is not None else None
    geo_kwargs = geometry_kwargs(spec)
    # --write-dicom names each copy by its (0008,0018): a study holding a value that is not a UID is
    # refused whole (neither converted nor copied), never written under a crafted name.
    copies = pseudonymizer is not None and write_dicom is not None
    unsafe = {h.study_uid for h in scanned.image_headers if copies and not is_uid(h.sop_instance_uid)}
    studies = select_series(scanned.image_headers, spec, rows, unsafe)

    # Claimed non-DICOM files: label sheets (CSV) are skipped; NIfTI labels go to the one study
    # whose files sit under their nearest folder.
    study_dirs: dict[str, set[str]] = defaultdict(set)
    for h in index.headers:
        study_dirs[h.study_uid].add(Path(h.rel).parent.as_posix())
    for path, rel in index.other_files:
        if csv_re.search(path.name):
            this_run = used_csv is not None and path.resolve() == used_csv
            rows[rel] = ManifestRow(rel, SKIPPED, Reason.LABEL_SHEET.value,
                                    "the labels CSV of this run (--labels-csv): read, not converted" if this_run
                                    else "a CSV file, not an image; labels are read only from --labels-csv")
            continue
        if classify:
            rows[rel] = ManifestRow(rel, SKIPPED, Reason.LABEL_NOT_USED.value,
                                    "a NIfTI label; a classification spec takes classes from the labels CSV")
            continue
        owner = match_nifti_to_study(rel, study_dirs)
        if owner is None or owner not in studies:
            rows[rel] = ManifestRow(rel, REFUSED, Reason.LABEL_UNMATCHED.value,
                                    "no single study's files share this label's folder")
        else:
            studies[owner].niftis.append((path, rel))

    # A label lost to an unreadable folder or file must not read as "no label, add it".
    unreadable = [p.rel for p in index.problems if p.reason == Reason.UNREADABLE]
    if unreadable:
        folders: dict[str, set[str]] = defaultdict(set)
        for h in index.headers:
            folders[h.study_uid].add(h.folder)
        ref = pseudonymizer.path_hash if pseudonymizer is not None else printable_path
        for uid, near in _unreadable_near(unreadable, folders).items():
            if uid in studies:
                studies[uid].unreadable = _unreadable_detail(near, ref)

    cases: list[CaseRecord] = []
    work = [s for s in studies.values() if s.images]
    class_values = [spec.labels.source_value(c) for c in spec.labels.classes]
    for study in studies.values():
        if not study.images:
            for m in study.masks:
                _mark(rows, m.rels, REFUSED, Reason.IMAGE_REFUSED, "no usable image series in this study")
            for _, rel in study.niftis:
                rows[rel] = ManifestRow(rel, REFUSED, Reason.IMAGE_REFUSED.value, "no usable image series in this study")
            _mark(rows, [h.rel for h in study.segs], REFUSED, Reason.IMAGE_REFUSED,
                  "no usable image series in this study")
        elif sheet is not None:
            study.cls = _classify(study, spec, sheet)

    tasks = [(study, spec, dst, class_values, geo_kwargs, pseudonymizer, previous.cases) for study in work]
    n_workers = default_workers() if workers is None else max(1, workers)
    with tqdm(total=len(work), desc=f"{site}: convert", unit="case", disable=not progress) as bar:
        if n_workers <= 1 or len(tasks) <= 1:
            results = (_study_task(t) for t in tasks)
            for local_rows, rec in results:
                rows.update(local_rows)
                if rec is not None:
                    cases.append(rec)
                bar.update(1)
        else:
            # One study per task: a worker holds one case in memory at a time. "spawn", not
            # fork: the workers run torch (MONAI transforms), whose thread pools do not survive fork.
            with worker_pool(n_workers, "spawn") as pool:
                for local_rows, rec in pool.map(_study_task, tasks):
                    rows.update(local_rows)
                    if rec is not None:
                        cases.append(rec)
                    bar.update(1)

    # Split by patient. New patients are ordered by the data (unkeyed, never written), not by the pseudonyms:
    # the same export gets the same split whatever the site secret. Cases and patients of earlier runs keep
    # their side.
    keys = {c.case_id: CaseKey(patient=getattr(c, "_patient_key"), order=getattr(c, "_split_key"))
            for c in cases}
    assignment = assign_splits(keys, spec.split.val_fraction, spec.split.seed, test_fraction=spec.split.test_fraction,
                               folds=spec.split.folds, previous_cases=previous.splits,
                               previous_patients=previous.patients, previous_folds=previous.folds)
    for c in cases:
        c.split = assignment.splits[c.case_id]
        c.fold = assignment.folds.get(c.case_id)
    cases.sort(key=lambda c: c.case_id)

    # Every file must be accounted for exactly once.
    ordered_rows = finalize(rows, scanned.files)

    dst.mkdir(parents=True, exist_ok=True)
    if classify:
        class_map = {str(i): n for i, n in enumerate(spec.labels.classes)}
    else:
        class_map = {"0": "background", **{str(i + 1): n for i, n in enumerate(spec.labels.classes)}}
    datalist = Datalist(name=spec.name, site=site, task=spec.task, spatial_dims=spec.spatial_dims, labels=class_map,
                        folds=spec.split.folds)
    for c in cases:
        datalist.split_items(c.split).append(DatalistItem(image=c.image, case_id=c.case_id, label=c.label,
                                                          fold=c.fold))
    datalist.write(dst / "datalist.json")
    if pseudonymizer is not None and write_dicom is not None:
        with claim(write_dicom, "dicom-copies", src=src, what="--write-dicom") as copies:
            _write_deidentified(ordered_rows, scanned.index.root, copies, pseudonymizer, spec)
    if pseudonymizer is not None:
        # Paths of a PACS export spell out names and accession numbers: the manifest gets keyed
        # hashes; a crosswalk back to the paths is kept only where the site asks, owner-only.
        if crosswalk is not None:
            cw = Path(crosswalk)
            write_jsonl(cw, ({"input_hash": pseudonymizer.path_hash(r.input), "input": printable_path(r.input)}
                             for r in ordered_rows))
            os.chmod(cw, 0o600)
        for r in ordered_rows:
            r.input = pseudonymizer.path_hash(r.input)
    write_jsonl(dst / "manifest.jsonl", (r.to_json() for r in ordered_rows))
    cfgmod.save(spec, dst / "spec.yaml")
    removed = _save_state_and_prune(out, previous, cases, assignment)
    account = summarize(ordered_rows)
    labels_account = None
    if sheet is not None:
        tag_of = (lambda h: h.accession_number) if spec.labels.csv_key == "accession" else (lambda h: h.study_uid)
        labels_account = sheet.account({tag_of(h).strip() for h in index.headers if tag_of(h).strip()})
    result = PreprocessResult(
        site=site,
        src_files=len(scanned.files),
        counts=account["counts"],
        reasons=account["reasons"],
        outputs=account["outputs"],
        cases=cases,
        datalist=str(dst / "datalist.json"),
        manifest=str(dst / "manifest.jsonl"),
        task=spec.task,
        spatial_dims=spec.spatial_dims,
        cases_converted=sum(not c.reused for c in cases),
        cases_reused=sum(c.reused for c in cases),
        cases_removed=removed,
        patients=len({getattr(c, "_patient_key") for c in cases}),
        cases_without_patient_id=sum(getattr(c, "_patient_key").startswith(NO_PATIENT_ID) for c in cases),
        labels_csv=labels_account,
    )
    from fedimg.dicom.deid import ENGINE, TABLE_EDITION

    deid = ({"profile": f"{TABLE_EDITION} Basic Profile, Retain Longitudinal Temporal Information "
                        "with Modified Dates, Clean Descriptors (allow-list)",
             "engine": ENGINE, "covariates": list(spec.deid.covariates),
             "case_ids": "HMAC-SHA256 pseudonyms (site secret)", "manifest_inputs": "HMAC-SHA256 path hashes",
             "crosswalk": "kept at the site (owner-only)" if crosswalk is not None else "not kept"}
            if pseudonymizer is not None else
            {"case_ids": "unkeyed hashes (no site secret given)", "manifest_inputs": "relative paths"})
    write_json(dst / "summary.json", {**asdict(result), "cases": [asdict(c) for c in cases], "pseudonyms": deid})
    logger.debug("site %s: %d cases (%d reused), %s", site, len(cases), result.cases_reused, dict(result.counts))
    return result


def _save_state_and_prune(out: OutputDir, previous: PreprocessState, cases: list[CaseRecord],
                          assignment: Assignment) -> int:
    """Record the current cases for the next run, and remove outputs no current case refers to.

    Only files fedimg's records say it wrote are removed: the outputs of the
    previous state's cases and those announced in DST's journal (a killed
    run's). A file someone else put into DST is never touched.

    Returns:
        The number of cases of the previous run that are no longer cases.
    """
    dst = out.path
    state = PreprocessState(spec_sha256=previous.spec_sha256, deid_key=previous.deid_key,
                            splits={**previous.splits, **{c.case_id: c.split for c in cases}},
                            patients={**previous.patients, **assignment.patient_splits},
                            folds={**previous.folds, **assignment.patient_folds})
    for c in cases:
        state.cases[c.case_id] = {
            "inputs": getattr(c, "_inputs_fp", ""),
            "image": c.image,
            "label": c.label if isinstance(c.label, str) else None,
            "shape": list(c.shape),
            "spacing": list(c.spacing),
            "label_counts": c.label_counts,
            "correction": getattr(c, "_correction", None),
        }
    save_state(dst, state)
    keep = {c.image for c in cases} | {c.label for c in cases if isinstance(c.label, str)}
    written = {str(v) for entry in previous.cases.values() for k, v in entry.items()
               if k in ("image", "label") and isinstance(v, str)}
    out.prune(written | out.journaled(), keep=keep)
    out.clear_journal()
    return len(set(previous.cases) - {c.case_id for c in cases})


def _burned_in(group: SeriesGroup) -> str | None:
    """PHI-free reason if the series' objects may carry burned-in text.

    Decided from the headers indexed earlier ((0028,0301), Modality, SOP Class): no file is read again.
    """
    from pydicom.dataset import Dataset

    from fedimg.dicom.deid import burned_in_risk

    for h in group.headers:
        ds = Dataset()
        ds.Modality = h.modality
        ds.SOPClassUID = h.sop_class_uid
        if h.burned_in_annotation is not None:
            ds.BurnedInAnnotation = h.burned_in_annotation
        risk = burned_in_risk(ds)
        if risk:
            return risk
    return None


def _write_deidentified(ordered: list[ManifestRow], root: Path, copies: OutputDir, pseudonymizer: Any,
                        spec: PreprocessSpec) -> None:
    """Write de-identified DICOM copies of every converted file (``--write-dicom``).

    Files land in ``<--write-dicom>/<case_id>/<role>/<new SOP Instance UID>.dcm``: no name
    carries an identifier. An object that may carry burned-in text is refused
    (its case is withdrawn from the copies, never passed on). Every name is
    checked before a case's first copy is written: the UID must be a UID and
    the path must resolve inside the folder (:func:`fedimg.safepath.child_path`),
    else the case is withdrawn from the copies with an UNSAFE_NAME note.
    """
    import pydicom

    from fedimg.dicom.deid import burned_in_risk, deidentify

    by_case: dict[str, list[ManifestRow]] = defaultdict(list)
    for r in ordered:
        if r.status == CONVERTED and r.case_id:
            by_case[r.case_id].append(r)
    for case_id, case_rows in sorted(by_case.items()):
        datasets = []
        risk = None
        for r in case_rows:
            try:
                ds = pydicom.dcmread(root / r.input)
            except Exception:  # noqa: BLE001 - e.g. a NIfTI label row: nothing to copy
                continue
            risk = risk or burned_in_risk(ds)
            datasets.append((r, ds))
        if risk:
            for r, _ in datasets:
                r.detail = f"{Reason.BURNED_IN_ANNOTATION.value}: not copied to --write-dicom ({risk})"
            continue
        cleaned = []
        try:
            for r, ds in datasets:
                clean = deidentify(ds, pseudonymizer, covariates=spec.deid.covariates,
                                   descriptor_allowlist=spec.deid.keep_descriptors,
                                   private_allowlist=[tuple(x) for x in spec.deid.private_allowlist])
                name = uid_component(str(clean.SOPInstanceUID), "(0008,0018) SOP Instance UID of a copy") + ".dcm"
                target = child_path(copies.path, case_id, r.role or "image", name, what="--write-dicom name")
                cleaned.append((target, clean))
        except UnsafePathError as exc:
            for r in case_rows:
                r.detail = f"{Reason.UNSAFE_NAME.value}: not copied to --write-dicom ({exc})"
            continue
        for target, clean in cleaned:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f"{TMP_PREFIX}{target.name}")
            clean.save_as(tmp, enforce_file_format=True)
            os.replace(tmp, target)


def _label_rels(label_source: tuple[str, Any] | None) -> list[str]:
    if label_source is None:
        return []
    kind, obj = label_source
    return obj[0].rels if kind.startswith("dicom") else [obj[1]]


def _label_files(label_source: tuple[str, Any] | None) -> list[tuple[str, Path]]:
    if label_source is None:
        return []
    kind, obj = label_source
    if kind.startswith("dicom"):
        return [(h.rel, h.path) for h in obj[0].headers]
    return [(obj[1], Path(obj[0]))]


def _reusable(entry: dict[str, Any] | None, fingerprint: str, dst: Path, with_label: bool, case_id: str) -> bool:
    """Whether an earlier run's outputs of this case may stand for a new conversion.

    The state file's output paths must be the ones this run would write
    (``images/<case_id>.nii.gz``...): an edited state file cannot point the
    datalist at a file outside DST.
    """
    if not entry or entry.get("inputs") != fingerprint or entry.get("image") != f"images/{case_id}.nii.gz":
        return False
    if not (dst / str(entry["image"])).is_file():
        return False
    label = entry.get("label")
    if not with_label:
        return label is None
    return label == f"labels/{case_id}.nii.gz" and (dst / label).is_file()


def _convert_study(study: _Study, spec: PreprocessSpec, dst: Path, rows: dict[str, ManifestRow],
                   class_values: list[int], geo_kwargs: dict[str, Any],
                   pseudonymizer: Any | None = None,
                   previous: dict[str, dict[str, Any]] | None = None) -> CaseRecord | None:
    if len(study.images) > 1:
        for g, *_ in study.images:
            _mark(rows, g.rels, REFUSED, Reason.AMBIGUOUS_IMAGE_SERIES,
                  f"{len(study.images)} candidate image series in one study; narrow "
                  "series.image_description_regex in the spec")
        for m in study.masks:
            _mark(rows, m.rels, REFUSED, Reason.IMAGE_REFUSED, "its study has no single image series")
        for _, rel in study.niftis:
            rows[rel] = ManifestRow(rel, REFUSED, Reason.IMAGE_REFUSED.value, "its study has no single image series")
        _mark(rows, [h.rel for h in study.segs], REFUSED, Reason.IMAGE_REFUSED, "its study has no single image series")
        return None
    group, geo, *irregular = study.images[0]
    irregular_reason: Reason | None = irregular[0] if irregular else None
    case_id = (pseudonymizer.case(study.uid, group.series_uid) if pseudonymizer is not None
               else case_id_for(study.uid, group.series_uid))
    patient_key = _patient_key(group.first.patient_id, case_id, pseudonymizer)
    label_source = None if spec.is_classification else _choose_label(study, group, geo, irregular_reason, rows,
                                                                      geo_kwargs)

    if pseudonymizer is not None:
        # Pixels may carry burned-in names: such objects are refused, never converted.
        risky = _burned_in(group)
        if risky is None and label_source is not None and label_source[0].startswith("dicom"):
            risky = _burned_in(label_source[1][0])
        if risky is not None:
            _mark(rows, group.rels, REFUSED, Reason.BURNED_IN_ANNOTATION, risky, case_id=case_id)
            _mark(rows, _label_rels(label_source), REFUSED, Reason.BURNED_IN_ANNOTATION, risky, case_id=case_id)
            return None

    def refuse_all(reason: Reason, detail: str) -> None:
        _mark(rows, group.rels, REFUSED, reason, detail, case_id=case_id)
        _mark(rows, _label_rels(label_source), REFUSED, Reason.IMAGE_REFUSED if reason != Reason.LABEL_GEOMETRY_MISMATCH
              and reason != Reason.LABEL_VALUES_UNEXPECTED else reason, detail, case_id=case_id)

    class_label: int | None = None
    if spec.is_classification:
        class_label, refusal = study.cls or (None, (Reason.NO_LABEL, "no labels CSV was read"))
        if refusal is not None:
            refuse_all(*refusal)
            return None
    elif label_source is None and study.unreadable:
        refuse_all(Reason.LABEL_UNREADABLE, study.unreadable)  # held, also when labels are optional
        return None
    elif label_source is None and spec.labels.required:
        refuse_all(Reason.NO_LABEL, "no label series or NIfTI label matched this image; labels.required is true")
        return None

    fingerprint = inputs_fingerprint([(h.rel, h.path) for h in group.headers] + _label_files(label_source),
                                     pseudonymizer)
    split_key = case_id_for(study.uid, group.series_uid)
    entry = (previous or {}).get(case_id)
    if _reusable(entry, fingerprint, dst, label_source is not None, case_id):
        # Unchanged inputs: the earlier outputs stand; nothing is decoded.
        correction = entry.get("correction")  # type: ignore[union-attr]
        image_rel, label_rel = str(entry["image"]), entry.get("label")  # type: ignore[index,union-attr]
        _mark(rows, group.rels, CONVERTED, "", "", output=image_rel, case_id=case_id, role="image",
              correction=correction)
        _mark(rows, _label_rels(label_source), CONVERTED, "", "", output=label_rel, case_id=case_id, role="label",
              correction=correction)
        rec = CaseRecord(case_id=case_id, image=image_rel,
                         label=class_label if spec.is_classification else label_rel,
                         shape=tuple(int(v) for v in entry["shape"]),  # type: ignore[index]
                         spacing=tuple(float(v) for v in entry["spacing"]),  # type: ignore[index]
                         label_counts=dict(entry.get("label_counts") or {}), reused=True)  # type: ignore[union-attr]
        rec._split_key = split_key  # type: ignore[attr-defined]  # not serialized
        rec._patient_key = patient_key  # type: ignore[attr-defined]
        rec._inputs_fp = fingerprint  # type: ignore[attr-defined]
        rec._correction = correction  # type: ignore[attr-defined]
        return rec

    correction: str | None = None
    try:
        if spec.spatial_dims == 2:
            planar: PlanarGeometry = geo
            image_arr, affine = apply_spec_2d(spec, load_planar(group, planar), planar)
            label_arr = None
        else:
            image_scale = (1.0, 0.0)
            if irregular_reason is not None:
                reg = load_regularized(group, irregular_reason)
                image_data, image_affine, correction = reg.data, reg.affine_ras, reg.correction
            else:
                # Stored integers plus their modality LUT: no float copy of the whole volume is made.
                volume = load_volume(group, geo)
                image_data, image_affine = volume.stored, volume.affine
                image_scale = (volume.slope, volume.intercept)
            raw, label_scale = None, (1.0, 0.0)
            if label_source is not None:
                raw, label_scale = _load_label(label_source, group, geo, irregular_reason, image_data, image_affine)
                check_label_values(raw, class_values, label_scale)
            # Nearest-neighbour resampling copies source values, so mapping them to 0..N after it is the same
            # as before it, on the (small) output grid.
            image_arr, resampled, affine = apply_spec(spec, image_data, image_affine, raw, scale=image_scale)
            label_arr = None if resampled is None else map_label_values(resampled, class_values, label_scale)
    except RefusedError as exc:
        refuse_all(exc.reason, exc.detail)
        return None

    image_rel = f"images/{case_id}.nii.gz"
    label_rel = None if label_arr is None else f"labels/{case_id}.nii.gz"
    announce(dst, [r for r in (image_rel, label_rel) if r])  # recorded as fedimg's before they exist
    write_nifti(dst / image_rel, np.asarray(image_arr, dtype=np.float32), affine)
    counts: dict[str, int] = {}
    if label_arr is not None:
        write_nifti(dst / label_rel, label_arr.astype(np.uint8), affine)
        counts = {name: int((label_arr == i + 1).sum()) for i, name in enumerate(spec.labels.classes)}
    _mark(rows, group.rels, CONVERTED, "", "", output=image_rel, case_id=case_id, role="image",
          correction=correction)
    _mark(rows, _label_rels(label_source), CONVERTED, "", "", output=label_rel, case_id=case_id, role="label",
          correction=correction)
    n_axes = image_arr.ndim
    spacing = tuple(float(v) for v in np.sqrt((affine[:3, :n_axes] ** 2).sum(axis=0)))
    rec = CaseRecord(case_id=case_id, image=image_rel, label=class_label if spec.is_classification else label_rel,
                     shape=tuple(int(s) for s in image_arr.shape), spacing=spacing, label_counts=counts)
    rec._split_key = split_key  # type: ignore[attr-defined]  # not serialized
    rec._patient_key = patient_key  # type: ignore[attr-defined]
    rec._inputs_fp = fingerprint  # type: ignore[attr-defined]
    rec._correction = correction  # type: ignore[attr-defined]
    return rec


def _choose_label(study: _Study, group: SeriesGroup, geo: Any, irregular_reason: Reason | None,
                  rows: dict[str, ManifestRow], geo_kwargs: dict[str, Any]) -> tuple[str, Any] | None:
    """Segmentation: DICOM masks on the image's frame of reference, then SEG, then NIfTI files.

    Labels that are not chosen get their manifest rows here.
    """
    image_fref = group.first.frame_of_reference_uid
    label_source: tuple[str, Any] | None = None
    for m in study.masks:
        if m.first.frame_of_reference_uid != image_fref:
            _mark(rows, m.rels, REFUSED, Reason.LABEL_UNMATCHED,
                  "(0020,0052) Frame of Reference UID differs from the image series")
            continue
        if irregular_reason is not None:
            # The mask must share the image's irregular slices; it is resampled identically below.
            if sorted(h.ipp for h in m.headers) != sorted(h.ipp for h in group.headers):
                _mark(rows, m.rels, REFUSED, Reason.LABEL_GEOMETRY_MISMATCH,
                      "mask slices are not at the image's slice positions")
                continue
            label_source = label_source or ("dicom_irregular", (m, None))
            continue
        try:
            mgeo = series_geometry(m, **geo_kwargs)
            check_mask_grid(geo, mgeo)
        except RefusedError as exc:
            # Whatever is wrong with the mask's own stack, it cannot be placed on the image grid.
            _mark(rows, m.rels, REFUSED, Reason.LABEL_GEOMETRY_MISMATCH, exc.detail)
            continue
        if label_source is not None:
            _mark(rows, m.rels, REFUSED, Reason.LABEL_UNMATCHED, "a second label for the same image")
            continue
        label_source = ("dicom", (m, mgeo))
    for h in study.segs:
        if irregular_reason is not None:
            _mark(rows, [h.rel], REFUSED, Reason.LABEL_GEOMETRY_MISMATCH,
                  "the image is resampled (geometry.irregular); only a DICOM mask series can follow it")
            continue
        if h.frame_of_reference_uid != image_fref:
            _mark(rows, [h.rel], REFUSED, Reason.LABEL_UNMATCHED,
                  "(0020,0052) Frame of Reference UID differs from the image series")
            continue
        if label_source is not None:
            _mark(rows, [h.rel], REFUSED, Reason.LABEL_UNMATCHED, "a second label for the same image")
            continue
        label_source = ("seg", (h.path, h.rel))
    for path, rel in study.niftis:
        if irregular_reason is not None:
            rows[rel] = ManifestRow(rel, REFUSED, Reason.LABEL_GEOMETRY_MISMATCH.value,
                                    "the image is resampled (geometry.irregular); only a DICOM mask series can follow it")
            continue
        if label_source is not None:
            rows[rel] = ManifestRow(rel, REFUSED, Reason.LABEL_UNMATCHED.value, "a second label for the same image")
            continue
        label_source = ("nifti", (path, rel))
    return label_source


def _load_label(label_source: tuple[str, Any], group: SeriesGroup, geo: Any, irregular_reason: Reason | None,
                image_data: np.ndarray, image_affine: np.ndarray) -> tuple[np.ndarray, tuple[float, float]]:
    """A segmentation label's stored values on the image grid, and their ``(slope, intercept)``.

    Raises:
        RefusedError: LABEL_GEOMETRY_MISMATCH and the label readers' reasons.
    """
    kind, obj = label_source
    if kind == "dicom_irregular":
        mreg = load_regularized(obj[0], irregular_reason, order=0)  # type: ignore[arg-type]
        if mreg.data.shape != image_data.shape or not np.allclose(mreg.affine_ras, image_affine, atol=1e-3):
            raise RefusedError(Reason.LABEL_GEOMETRY_MISMATCH, "resampled mask and image grids differ")
        return mreg.data, (1.0, 0.0)
    if kind == "dicom":
        mask = load_volume(obj[0], obj[1])
        return mask.stored, (mask.slope, mask.intercept)
    if kind == "seg":
        uids = [group.headers[i].sop_instance_uid for i in geo.order]
        return load_seg_on_grid(obj[0], uids, geo), (1.0, 0.0)
    return load_nifti_on_grid(obj[0], geo)
