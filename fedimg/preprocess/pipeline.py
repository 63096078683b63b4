"""``fedimg preprocess``: a site's DICOM tree -> normalized images, datalist, manifest.

The stages, each in its own module; this one only runs them in order:

1. index (:mod:`fedimg.preprocess.scan`, :mod:`fedimg.dicom.index`): every
   header is read (no pixels); non-image objects and localizers are decided.
2. selection (:mod:`fedimg.preprocess.plan`): a typed plan per study: its
   candidate image series with geometry validated from headers alone, and
   its labels (DICOM mask series, SEG, NIfTI file); for classification, the
   study's class from the site's labels CSV (:mod:`fedimg.preprocess.labels_csv`).
3. case conversion (:mod:`fedimg.preprocess.cases`), one worker per study:
   reused unchanged, or decoded, brought onto the spec's grid
   (:mod:`fedimg.preprocess.transforms`) and written.
4. split (:mod:`fedimg.preprocess.splits`): by patient, stable across runs.
5. outputs (:mod:`fedimg.preprocess.outputs`, :mod:`fedimg.preprocess.copies`):
   datalist, manifest, summary, state; every input file has exactly one
   manifest row and ``inputs == converted + refused + skipped`` is checked
   before the run reports success.

A NIfTI data set (``from_nifti``: Decathlon ``dataset.json``, or
``imagesTr/`` + ``labelsTr/``) replaces stages 1-2 with
:mod:`fedimg.preprocess.nifti_source`, which also makes each pair one case
through the same chain; stages 4-5 are shared.

Re-runs into the same DST are incremental (:mod:`fedimg.preprocess.state`):
a case whose input files are unchanged is reused, every case keeps its
training/validation split, and outputs of cases that are gone are removed.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from fedimg import config as cfgmod
from fedimg.config import BurnedInReview, PreprocessSpec
from fedimg.dicom.quiet import quiet_dicom_call
from fedimg.preprocess.cases import NO_PATIENT_ID, CaseContext, CaseRecord, case_id_for, convert_study
from fedimg.preprocess.copies import write_deidentified
from fedimg.preprocess.labels_csv import LabelsCsvError, LabelSheet, read_labels_csv
from fedimg.preprocess.manifest import ManifestRow, finalize, render_table, summarize
from fedimg.preprocess.nifti_source import NiftiDataset, convert_nifti_case, looks_like_dataset, read_dataset
from fedimg.preprocess.outdir import OutputDir, check_separate, claim, precheck
from fedimg.preprocess.outputs import (
    check_crosswalk,
    deid_account,
    save_spec,
    save_state_and_prune,
    write_datalist,
    write_manifest,
    write_summary,
)
from fedimg.preprocess.plan import (
    CSV_NAME_REGEX,
    StudyPlan,
    attach_other_files,
    classify,
    geometry_kwargs,
    mark_unreadable,
    refuse_labelless_studies,
    select_series,
)
from fedimg.preprocess.scan import PreprocessInputError, ScanResult, index_source
from fedimg.preprocess.splits import Assignment, CaseKey
from fedimg.preprocess.splits import assign as assign_splits
from fedimg.preprocess.state import PreprocessState, load_previous
from fedimg.preprocess.workers import default_workers, worker_pool
from fedimg.safepath import is_uid, printable_path

logger = logging.getLogger(__name__)

__all__ = ["CaseRecord", "LabelsCsvError", "PreprocessInputError", "PreprocessResult", "case_id_for", "preprocess"]


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
    reviews_used: dict[str, int] = field(default_factory=dict)  # a person's recorded decision -> files it let through
    patients: int = 0  # distinct patients among the cases (cases without a Patient ID count as their own)
    cases_without_patient_id: int = 0
    source: str = "dicom"  # or "nifti" (--from-nifti)
    # labels.others: background: cases whose label held values outside the classes, and those source voxels
    cases_with_other_labels: int = 0
    label_voxels_to_background: int = 0

    @property
    def problem(self) -> str | None:
        """Why this run's output cannot train a model (no case, or no validation case); None when usable."""
        if not self.cases:
            return (
                f"site {self.site}: no case was converted ({self.src_files} input files); the manifest says why "
                "for each file: fedimg manifest DST"
            )
        if not any(c.split == "validation" for c in self.cases):
            return (
                f"site {self.site}: {len(self.cases)} case(s), none of them for validation (a site needs at "
                "least 2 cases to hold one out); add studies, or check the refusals: fedimg manifest DST"
            )
        return None

    def table(self) -> str:
        """A human-readable summary: counts, reasons with what to do, cases, paths."""
        summary = {"inputs": self.src_files, "counts": self.counts, "reasons": self.reasons, "outputs": self.outputs}
        lines = [
            render_table(summary, f"site {self.site}"),
            f"  cases: {len(self.cases)} ({sum(c.split == 'training' for c in self.cases)} training, "
            f"{sum(c.split == 'validation' for c in self.cases)} validation"
            + (
                f", {sum(c.split == 'test' for c in self.cases)} test"
                if any(c.split == "test" for c in self.cases)
                else ""
            )
            + f"; {self.patients} patient(s), split by patient); "
            f"{self.cases_converted} converted, {self.cases_reused} reused unchanged"
            + (f", {self.cases_removed} removed (inputs gone or refused)" if self.cases_removed else ""),
        ]
        if self.cases_with_other_labels:
            lines.append(
                f"  labels.others: background: {self.label_voxels_to_background} label voxel(s) of values outside "
                f"the classes mapped to background in {self.cases_with_other_labels} case(s)"
            )
        if self.labels_csv is not None:
            lc = self.labels_csv
            lines.append(
                f"  labels CSV: {lc['rows']} rows, {lc['rows_matched']} matched a study, "
                f"{lc['rows_unmatched']} matched none"
                + (f", {lc['rows_without_key']} without a key" if lc["rows_without_key"] else "")
            )
        for review, n in self.reviews_used.items():
            lines.append(f"  {n} file(s) converted by a person's decision: {review}")
        lines += [f"  datalist: {self.datalist}", f"  manifest: {self.manifest}"]
        return "\n".join(lines)


@quiet_dicom_call
def preprocess(
    src: str | Path,
    dst: str | Path,
    spec: PreprocessSpec,
    site: str,
    progress: bool = True,
    workers: int | None = 1,
    pseudonymizer: Any | None = None,
    crosswalk: str | Path | None = None,
    write_dicom: str | Path | None = None,
    labels_csv: str | Path | None = None,
    reviews: Sequence[BurnedInReview] = (),
    from_nifti: bool = False,
    patient_regex: str | None = None,
) -> PreprocessResult:
    """Convert and normalize every case under ``src`` into ``dst``.

    Re-runs are incremental. Running again into the same ``dst`` with the
    same spec and the same site secret, after the site added, changed or
    removed studies:

    - reuses every case whose input files (relative paths, sizes and
      modification times) are unchanged: nothing of it is decoded again;
      only new and changed studies are converted;
    - keeps the split of every case and patient seen before (also of a case
      that was missing for a while); new patients go to the held-out splits
      until each reaches its share (``split.val_fraction``, ``test_fraction``) again, in
      seeded-hash order, whole patients at a time (:mod:`fedimg.preprocess.splits`);
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
        reviews: the site's reviewed exceptions to the burned-in text refusal
            (:class:`fedimg.config.BurnedInReview`, from the site config);
            every file they let through says so in its manifest row.
        from_nifti: ``src`` is a NIfTI segmentation data set (Decathlon
            ``dataset.json``, or ``imagesTr/`` + ``labelsTr/``), not DICOM
            (:mod:`fedimg.preprocess.nifti_source`); segmentation specs only,
            without ``write_dicom`` and ``labels_csv``.
        patient_regex: with ``from_nifti``: finds each case's patient in its
            image's file name (group 1, or the whole match), for the split by
            patient; default: the data set's own rule, else one patient per case.

    Raises:
        PreprocessInputError: ``src`` is missing, empty, or holds no DICOM; a
            classification spec without ``labels_csv`` or a segmentation spec
            with one; :class:`LabelsCsvError` for a missing or unreadable CSV
            or missing columns; ``IncompatibleOutputError`` (see above). All
            are raised before anything is written.
    """
    site = cfgmod.validate_site_name(site, "site")
    src, dst = Path(src), Path(dst)
    if pseudonymizer is None and (write_dicom is not None or crosswalk is not None):
        raise PreprocessInputError(
            "--write-dicom and --crosswalk need de-identification: drop --no-deid and pass --secret-file PATH"
        )
    sheet: LabelSheet | None = None
    if from_nifti:
        _check_nifti_arguments(spec, write_dicom, labels_csv)
    elif patient_regex is not None:
        raise PreprocessInputError(
            "--patient-regex reads patients from NIfTI file names (--from-nifti); a DICOM export's patients "
            "come from (0010,0020) Patient ID: drop --patient-regex"
        )
    elif spec.is_classification:
        if labels_csv is None:
            raise PreprocessInputError(
                f"spec {spec.name!r} is a classification spec (task: classification): expected --labels-csv FILE "
                "(the site's CSV of study key and class), found none"
            )
        sheet = read_labels_csv(labels_csv, spec.labels)
    elif labels_csv is not None:
        raise PreprocessInputError(
            f"--labels-csv was given, but spec {spec.name!r} is a segmentation spec whose labels come from mask "
            "series or NIfTI files; drop --labels-csv, or use a spec with task: classification"
        )
    # Every output location is checked before any work; DST is claimed (created, locked) only then.
    precheck(dst, "preprocess", src=src)
    if write_dicom is not None:
        check_separate(dst, write_dicom, src_name="DST", dst_name="--write-dicom")
        precheck(write_dicom, "dicom-copies", src=src, what="--write-dicom")
    if crosswalk is not None:
        check_crosswalk(Path(crosswalk), src, dst)
    load_previous(dst, spec, pseudonymizer)  # refuses a DST of another spec or secret, before any work
    if from_nifti:
        dataset = read_dataset(src, spec, patient_regex)  # refuses a data set that disagrees with the spec
        with claim(dst, "preprocess", src=src) as out:
            return _nifti_into(out, dataset, spec, site, progress, workers, pseudonymizer, crosswalk)
    try:
        scanned = index_source(
            src, claim=[spec.series.label_nifti_name_regex, CSV_NAME_REGEX], label=site, progress=progress
        )
    except PreprocessInputError as exc:
        if looks_like_dataset(src):
            raise PreprocessInputError(
                f"{exc}; SRC looks like a NIfTI data set (dataset.json, or imagesTr/ and labelsTr/): add --from-nifti"
            ) from None
        raise
    with claim(dst, "preprocess", src=src) as out:
        return _preprocess_into(
            out,
            scanned,
            src,
            spec,
            site,
            progress,
            workers,
            pseudonymizer,
            crosswalk,
            write_dicom,
            labels_csv,
            sheet,
            tuple(reviews),
        )


def _check_nifti_arguments(spec: PreprocessSpec, write_dicom: str | Path | None, labels_csv: str | Path | None) -> None:
    """A NIfTI data set (``from_nifti``) takes segmentation specs, and no DICOM-only option."""
    if spec.is_classification:
        raise PreprocessInputError(
            f"--from-nifti reads segmentation data sets (images and label volumes), but spec {spec.name!r} is a "
            "classification spec; use a segmentation spec"
        )
    stray = [o for o, v in (("--write-dicom", write_dicom), ("--labels-csv", labels_csv)) if v is not None]
    if stray:
        raise PreprocessInputError(
            f"{' and '.join(stray)} appl{'y' if len(stray) > 1 else 'ies'} to DICOM exports; a NIfTI data set "
            "(--from-nifti) has no DICOM to copy and its labels are volumes: drop them"
        )


def _nifti_into(
    out: OutputDir,
    dataset: NiftiDataset,
    spec: PreprocessSpec,
    site: str,
    progress: bool,
    workers: int | None,
    pseudonymizer: Any | None,
    crosswalk: str | Path | None,
) -> PreprocessResult:
    """The stages of a NIfTI data set's run in a claimed and locked DST."""
    previous = load_previous(out.path, spec, pseudonymizer)
    ctx = CaseContext(spec=spec, dst=out.path, pseudonymizer=pseudonymizer, previous=previous.cases, geo_kwargs={})
    tasks = [(case, ctx) for case in dataset.cases]
    cases = _convert_all(tasks, convert_nifti_case, dataset.rows, site, workers, progress)
    assignment = _split(cases, spec, previous)
    ordered = finalize(dataset.rows, dataset.files)  # every file accounted for exactly once
    write_datalist(out.path, spec, site, cases)
    return _finish(out, spec, site, ordered, cases, previous, assignment, pseudonymizer, crosswalk, "nifti")


def _preprocess_into(
    out: OutputDir,
    scanned: ScanResult,
    src: Path,
    spec: PreprocessSpec,
    site: str,
    progress: bool,
    workers: int | None,
    pseudonymizer: Any | None,
    crosswalk: str | Path | None,
    write_dicom: str | Path | None,
    labels_csv: str | Path | None,
    sheet: LabelSheet | None,
    reviews: tuple[BurnedInReview, ...] = (),
) -> PreprocessResult:
    """The stages of :func:`preprocess` after indexing, in a claimed and locked DST."""
    dst = out.path
    previous = load_previous(dst, spec, pseudonymizer)
    studies = _plan(scanned, spec, pseudonymizer, write_dicom is not None, labels_csv, sheet)
    ctx = CaseContext(
        spec=spec,
        dst=dst,
        pseudonymizer=pseudonymizer,
        previous=previous.cases,
        geo_kwargs=geometry_kwargs(spec),
        reviews=reviews,
    )
    tasks = [(study, ctx) for study in studies.values() if study.images]
    cases = _convert_all(tasks, convert_study, scanned.rows, site, workers, progress)
    assignment = _split(cases, spec, previous)
    ordered = finalize(scanned.rows, scanned.files)  # every file accounted for exactly once
    write_datalist(dst, spec, site, cases)
    if pseudonymizer is not None and write_dicom is not None:
        with claim(write_dicom, "dicom-copies", src=src, what="--write-dicom") as copies:
            write_deidentified(ordered, scanned.index.root, copies, pseudonymizer, spec)
    labels_account = None
    if sheet is not None:
        key = "accession_number" if spec.labels.csv_key == "accession" else "study_uid"
        labels_account = sheet.account(
            {getattr(h, key).strip() for h in scanned.index.headers if getattr(h, key).strip()}
        )
    return _finish(
        out, spec, site, ordered, cases, previous, assignment, pseudonymizer, crosswalk, "dicom", labels_account
    )


def _finish(
    out: OutputDir,
    spec: PreprocessSpec,
    site: str,
    ordered: list[ManifestRow],
    cases: list[CaseRecord],
    previous: PreprocessState,
    assignment: Assignment,
    pseudonymizer: Any | None,
    crosswalk: str | Path | None,
    source: str,
    labels_account: dict[str, Any] | None = None,
) -> PreprocessResult:
    """The last stage every source shares: manifest, spec, state (pruning outputs of gone cases), summary."""
    dst = out.path
    write_manifest(dst, ordered, pseudonymizer, crosswalk)
    save_spec(dst, spec)
    removed = save_state_and_prune(out, previous, cases, assignment)
    result = _result(site, spec, ordered, cases, removed, dst, source, labels_account)
    write_summary(dst, result, cases, deid_account(spec, pseudonymizer, crosswalk))
    logger.debug("site %s: %d cases (%d reused), %s", site, len(cases), result.cases_reused, dict(result.counts))
    return result


def _plan(
    scanned: ScanResult,
    spec: PreprocessSpec,
    pseudonymizer: Any | None,
    copies: bool,
    labels_csv: str | Path | None,
    sheet: LabelSheet | None,
) -> dict[str, StudyPlan]:
    """Selection: every study's plan; the files it decides get their manifest rows."""
    rows, index = scanned.rows, scanned.index
    # --write-dicom names each copy by its (0008,0018): a study holding a value that is not a UID is
    # refused whole (neither converted nor copied), never written under a crafted name.
    unsafe = {
        h.study_uid
        for h in scanned.image_headers
        if copies and pseudonymizer is not None and not is_uid(h.sop_instance_uid)
    }
    studies = select_series(scanned.image_headers, spec, rows, unsafe)
    attach_other_files(index, studies, rows, spec, Path(labels_csv).resolve() if labels_csv is not None else None)
    # A label lost to an unreadable folder or file must not read as "no label, add it".
    mark_unreadable(index, studies, pseudonymizer.path_hash if pseudonymizer is not None else printable_path)
    refuse_labelless_studies(studies, rows)
    if sheet is not None:
        for study in studies.values():
            if study.images:
                study.cls = classify(study, spec, sheet)
    return studies


def _convert_all(
    tasks: Sequence[Any],
    convert: Callable[[Any], tuple[dict[str, ManifestRow], CaseRecord | None]],
    rows: dict[str, ManifestRow],
    site: str,
    workers: int | None,
    progress: bool,
) -> list[CaseRecord]:
    """Case conversion of every task (a study, a NIfTI pair) in worker processes (one task each).

    Args:
        convert: a module-level function (sent to the workers) of one task: its rows and case (None: refused).
    """
    cases: list[CaseRecord] = []
    n_workers = default_workers() if workers is None else max(1, workers)
    with tqdm(total=len(tasks), desc=f"{site}: convert", unit="case", disable=not progress) as bar:

        def collect(local_rows: dict[str, ManifestRow], rec: CaseRecord | None) -> None:
            rows.update(local_rows)
            if rec is not None:
                cases.append(rec)
            bar.update(1)

        if n_workers <= 1 or len(tasks) <= 1:
            for task in tasks:
                collect(*convert(task))
        else:
            # A worker holds one case in memory at a time. "spawn", not fork: the workers run torch (MONAI
            # transforms), whose thread pools do not survive fork.
            with worker_pool(n_workers, "spawn") as pool:
                for local_rows, rec in pool.map(convert, tasks):
                    collect(local_rows, rec)
    return sorted(cases, key=lambda c: c.case_id)


def _split(cases: list[CaseRecord], spec: PreprocessSpec, previous: PreprocessState) -> Assignment:
    """Split by patient. New patients are ordered by the data (unkeyed, never written), not by the pseudonyms:
    the same export gets the same split whatever the site secret. Cases and patients of earlier runs keep their
    side."""
    keys = {c.case_id: CaseKey(patient=c.patient_key, order=c.order_key) for c in cases}
    s = spec.split
    assignment = assign_splits(
        keys,
        s.val_fraction,
        s.seed,
        test_fraction=s.test_fraction,
        folds=s.folds,
        previous_cases=previous.splits,
        previous_patients=previous.patients,
        previous_folds=previous.folds,
    )
    for c in cases:
        c.split = assignment.splits[c.case_id]
        c.fold = assignment.folds.get(c.case_id)
    return assignment


def _result(
    site: str,
    spec: PreprocessSpec,
    ordered: list[ManifestRow],
    cases: list[CaseRecord],
    removed: int,
    dst: Path,
    source: str,
    labels_account: dict[str, Any] | None,
) -> PreprocessResult:
    account = summarize(ordered)
    return PreprocessResult(
        site=site,
        src_files=account["inputs"],
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
        reviews_used=dict(Counter(r.review.split(": ", 1)[0] for r in ordered if r.review)),
        patients=len({c.patient_key for c in cases}),
        cases_without_patient_id=sum(c.patient_key.startswith(NO_PATIENT_ID) for c in cases),
        labels_csv=labels_account,
        source=source,
        cases_with_other_labels=sum(c.other_values > 0 for c in cases),
        label_voxels_to_background=sum(c.others_to_background for c in cases),
    )
