"""``fedimg preprocess``: a site's DICOM tree -> normalized volumes, datalist, manifest.

The stages, each in its own module:

1. :mod:`fedimg.dicom.index` reads every header (no pixels) and groups series.
2. Series are selected per study: one image series, its label (a DICOM mask
   series or a NIfTI file), everything else skipped with a reason.
3. :mod:`fedimg.dicom.geometry` validates each selected series from headers
   alone, before any pixel is decoded.
4. :mod:`fedimg.dicom.volume` decodes pixels; the label is brought onto the
   image grid and checked.
5. :mod:`fedimg.preprocess.transforms` applies the shared MONAI chain.
6. Outputs are written atomically; every input file gets exactly one row in
   ``manifest.jsonl`` and the accounting ``inputs == converted + refused +
   skipped`` is checked before the run reports success.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import re
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from fedimg import config as cfgmod
from fedimg.config import PreprocessSpec
from fedimg.dicom.geometry import SeriesGeometry
from fedimg.dicom.index import DicomHeader, SeriesGroup, group_series
from fedimg.dicom.labels import (
    SEG_SOP_CLASS,
    check_mask_grid,
    load_seg_on_grid,
    load_nifti_on_grid,
    map_label_values,
    match_nifti_to_study,
)
from fedimg.dicom.quiet import quiet_dicom, quiet_dicom_call
from fedimg.dicom.reasons import Reason, RefusedError
from fedimg.dicom.resample import RESAMPLABLE, load_regularized
from fedimg.dicom.volume import load_volume, series_geometry
from fedimg.preprocess.convert import default_workers
from fedimg.preprocess.io import write_json, write_jsonl, write_nifti
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
from fedimg.preprocess.scan import PreprocessInputError, index_source
from fedimg.preprocess.transforms import apply_spec

logger = logging.getLogger(__name__)

__all__ = ["PreprocessInputError", "PreprocessResult", "preprocess"]


@dataclass
class CaseRecord:
    """A converted case."""

    case_id: str
    image: str
    label: str | None
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    label_counts: dict[str, int] = field(default_factory=dict)
    split: str = "training"


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

    def table(self) -> str:
        """A human-readable summary: counts, reasons with what to do, cases, paths."""
        summary = {"inputs": self.src_files, "counts": self.counts, "reasons": self.reasons,
                   "outputs": self.outputs}
        lines = [
            render_table(summary, f"site {self.site}"),
            f"  cases: {len(self.cases)} ({sum(c.split == 'training' for c in self.cases)} training, "
            f"{sum(c.split == 'validation' for c in self.cases)} validation)",
            f"  datalist: {self.datalist}",
            f"  manifest: {self.manifest}",
        ]
        return "\n".join(lines)


def case_id_for(study_uid: str, series_uid: str) -> str:
    """A stable, file-name-safe case id that does not spell out a UID."""
    digest = hashlib.sha256(f"{study_uid}|{series_uid}".encode()).hexdigest()
    return f"case-{digest[:12]}"


def _split(case_ids: list[str], val_fraction: float, seed: int) -> dict[str, str]:
    """Deterministic split: order by a seeded hash, the first share goes to validation."""
    ordered = sorted(case_ids, key=lambda c: hashlib.sha256(f"{seed}:{c}".encode()).hexdigest())
    n_val = max(1, int(round(len(ordered) * val_fraction))) if len(ordered) >= 2 else 0
    return {c: ("validation" if i < n_val else "training") for i, c in enumerate(ordered)}


class _Study:
    def __init__(self, uid: str) -> None:
        self.uid = uid
        # (group, geometry) or, for a stack to resample (geometry.irregular), (group, None, reason)
        self.images: list[tuple] = []
        self.masks: list[SeriesGroup] = []
        self.niftis: list[tuple[Path, str]] = []
        self.segs: list[DicomHeader] = []


def _study_task(args: tuple) -> tuple[dict[str, ManifestRow], CaseRecord | None]:
    """Worker: convert one study; returns its manifest rows and case record."""
    study, spec, dst, class_values, geo_kwargs, pseudonymizer = args
    local: dict[str, ManifestRow] = {}
    with quiet_dicom():
        rec = _convert_study(study, spec, dst, local, class_values, geo_kwargs, pseudonymizer)
    return local, rec


@quiet_dicom_call
def preprocess(src: str | Path, dst: str | Path, spec: PreprocessSpec, site: str,
               progress: bool = True, workers: int | None = 1,
               pseudonymizer: Any | None = None, crosswalk: str | Path | None = None,
               write_dicom: str | Path | None = None) -> PreprocessResult:
    """Convert and normalize every case under ``src`` into ``dst``.

    Args:
        src: the site's raw export (read only; never modified).
        dst: output folder: ``images/``, ``labels/``, ``datalist.json``,
            ``manifest.jsonl``, ``spec.yaml``, ``summary.json``.
        spec: the shared preprocessing spec.
        site: the site's name (recorded in the summary and logs).
        progress: show tqdm progress bars.
        workers: processes converting studies in parallel (None: CPU count).
        pseudonymizer: a :class:`fedimg.dicom.deid.Pseudonymizer` holding the
            site secret. With it, case ids (and so file names) are keyed
            HMAC pseudonyms, and manifest ``input`` fields are keyed hashes of
            the paths; the path crosswalk is kept in ``DST/private/`` with
            owner-only permissions. Without it, case ids are unkeyed hashes and
            inputs are plain relative paths.
        crosswalk: with a pseudonymizer, where to keep the hash-to-path
            crosswalk (owner-only, a site-private location outside ``dst``);
            None keeps none.
        write_dicom: with a pseudonymizer, a folder for de-identified DICOM
            copies of every converted series (PS3.15 Basic Profile, keyed).
            Objects that may carry burned-in text are refused.

    Raises:
        PreprocessInputError: ``src`` is missing, empty, or holds no DICOM.
    """
    src, dst = Path(src), Path(dst)
    label_re = re.compile(spec.series.label_description_regex)
    image_re = re.compile(spec.series.image_description_regex) if spec.series.image_description_regex else None
    scanned = index_source(src, claim=[spec.series.label_nifti_name_regex], label=site, progress=progress)
    index, rows, image_headers = scanned.index, scanned.rows, scanned.image_headers

    studies: dict[str, _Study] = {}
    # DICOM SEG objects are labels, read through highdicom, not image series.
    for h in [h for h in image_headers if h.sop_class_uid == SEG_SOP_CLASS]:
        studies.setdefault(h.study_uid, _Study(h.study_uid)).segs.append(h)
    image_headers = [h for h in image_headers if h.sop_class_uid != SEG_SOP_CLASS]
    geo_kwargs = dict(min_slices=spec.geometry.min_slices, spacing_tolerance=spec.geometry.spacing_tolerance,
                      orientation_tolerance=spec.geometry.orientation_tolerance)
    groups = group_series(image_headers, spec.geometry.orientation_tolerance)
    per_series = Counter(g.series_uid for g in groups)
    for g in groups:
        study = studies.setdefault(g.study_uid, _Study(g.study_uid))
        if label_re.search(g.description):
            study.masks.append(g)
            continue
        if g.modality.upper() != spec.series.image_modality:
            _mark(rows, g.rels, SKIPPED, Reason.MODALITY_NOT_SELECTED,
                  f"modality {g.modality or '?'}; spec selects {spec.series.image_modality}")
            continue
        if image_re is not None and not image_re.search(g.description):
            _mark(rows, g.rels, SKIPPED, Reason.SERIES_NOT_SELECTED,
                  "(0008,103E) Series Description does not match series.image_description_regex")
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

    # NIfTI labels: attach each to the one study whose files sit under its nearest folder.
    study_dirs: dict[str, set[str]] = defaultdict(set)
    for h in index.headers:
        study_dirs[h.study_uid].add(Path(h.rel).parent.as_posix())
    for path, rel in index.other_files:
        owner = match_nifti_to_study(rel, study_dirs)
        if owner is None or owner not in studies:
            rows[rel] = ManifestRow(rel, REFUSED, Reason.LABEL_UNMATCHED.value,
                                    "no single study's files share this label's folder")
        else:
            studies[owner].niftis.append((path, rel))

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

    tasks = [(study, spec, dst, class_values, geo_kwargs, pseudonymizer) for study in work]
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
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=n_workers, mp_context=ctx) as pool:
                for local_rows, rec in pool.map(_study_task, tasks):
                    rows.update(local_rows)
                    if rec is not None:
                        cases.append(rec)
                    bar.update(1)

    # The split orders cases by the data (unkeyed, never written), not by the pseudonyms: the same
    # export gets the same split whatever the site secret, and pseudonyms stay unlinkable.
    keys = {getattr(c, "_split_key", c.case_id): c for c in cases}
    split = _split(list(keys), spec.split.val_fraction, spec.split.seed)
    for key, c in keys.items():
        c.split = split[key]
    cases.sort(key=lambda c: c.case_id)

    # Every file must be accounted for exactly once.
    ordered_rows = finalize(rows, scanned.files)

    dst.mkdir(parents=True, exist_ok=True)
    class_map = {"0": "background", **{str(i + 1): n for i, n in enumerate(spec.labels.classes)}}
    datalist = {
        "name": spec.name,
        "site": site,
        "labels": class_map,
        "training": [_dl_item(c) for c in cases if c.split == "training"],
        "validation": [_dl_item(c) for c in cases if c.split == "validation"],
    }
    write_json(dst / "datalist.json", datalist)
    if pseudonymizer is not None and write_dicom is not None:
        _write_deidentified(ordered_rows, scanned.index.root, Path(write_dicom), pseudonymizer, spec)
    if pseudonymizer is not None:
        # Paths of a PACS export spell out names and accession numbers: the manifest gets keyed
        # hashes; a crosswalk back to the paths is kept only where the site asks, owner-only.
        if crosswalk is not None:
            cw = Path(crosswalk)
            write_jsonl(cw, ({"input_hash": pseudonymizer.path_hash(r.input), "input": r.input}
                             for r in ordered_rows))
            os.chmod(cw, 0o600)
        for r in ordered_rows:
            r.input = pseudonymizer.path_hash(r.input)
    write_jsonl(dst / "manifest.jsonl", (r.to_json() for r in ordered_rows))
    cfgmod.save(spec, dst / "spec.yaml")
    account = summarize(ordered_rows)
    result = PreprocessResult(
        site=site,
        src_files=len(scanned.files),
        counts=account["counts"],
        reasons=account["reasons"],
        outputs=account["outputs"],
        cases=cases,
        datalist=str(dst / "datalist.json"),
        manifest=str(dst / "manifest.jsonl"),
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
    logger.debug("site %s: %d cases, %s", site, len(cases), dict(result.counts))
    return result


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


def _write_deidentified(ordered: list[ManifestRow], root: Path, out: Path, pseudonymizer: Any,
                        spec: PreprocessSpec) -> None:
    """Write de-identified DICOM copies of every converted file (``--write-dicom``).

    Files land in ``out/<case_id>/<role>/<new SOP Instance UID>.dcm``: no name
    carries an identifier. An object that may carry burned-in text is refused
    (its case is withdrawn from the copies, never passed on).
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
        for r, ds in datasets:
            clean = deidentify(ds, pseudonymizer, covariates=spec.deid.covariates,
                               descriptor_allowlist=spec.deid.keep_descriptors,
                               private_allowlist=[tuple(x) for x in spec.deid.private_allowlist])
            target = out / case_id / (r.role or "image") / f"{clean.SOPInstanceUID}.dcm"
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.tmp")
            clean.save_as(tmp, enforce_file_format=True)
            os.replace(tmp, target)


def _dl_item(c: CaseRecord) -> dict[str, Any]:
    item: dict[str, Any] = {"image": c.image, "case_id": c.case_id}
    if c.label:
        item["label"] = c.label
    return item


def _convert_study(study: _Study, spec: PreprocessSpec, dst: Path, rows: dict[str, ManifestRow],
                   class_values: list[int], geo_kwargs: dict[str, Any],
                   pseudonymizer: Any | None = None) -> CaseRecord | None:
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
    image_fref = group.first.frame_of_reference_uid

    # Choose the label: DICOM masks on the image's frame of reference, then NIfTI files.
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

    if pseudonymizer is not None:
        # Pixels may carry burned-in names: such objects are refused, never converted.
        risky = _burned_in(group)
        if risky is None and label_source is not None and label_source[0].startswith("dicom"):
            risky = _burned_in(label_source[1][0])
        if risky is not None:
            _mark(rows, group.rels, REFUSED, Reason.BURNED_IN_ANNOTATION, risky, case_id=case_id)
            if label_source is not None:
                kind, obj = label_source
                _mark(rows, obj[0].rels if kind.startswith("dicom") else [obj[1]], REFUSED,
                      Reason.BURNED_IN_ANNOTATION, risky, case_id=case_id)
            return None

    def refuse_all(reason: Reason, detail: str) -> None:
        _mark(rows, group.rels, REFUSED, reason, detail, case_id=case_id)
        if label_source is not None:
            kind, obj = label_source
            rels = obj[0].rels if kind.startswith("dicom") else [obj[1]]
            _mark(rows, rels, REFUSED, Reason.IMAGE_REFUSED if reason != Reason.LABEL_GEOMETRY_MISMATCH
                  and reason != Reason.LABEL_VALUES_UNEXPECTED else reason, detail, case_id=case_id)

    if label_source is None and spec.labels.required:
        refuse_all(Reason.NO_LABEL, "no label series or NIfTI label matched this image; labels.required is true")
        return None

    correction: str | None = None
    try:
        if irregular_reason is not None:
            reg = load_regularized(group, irregular_reason)
            image_data, image_affine, correction = reg.data, reg.affine_ras, reg.correction
        else:
            volume = load_volume(group, geo)
            image_data, image_affine = volume.data, volume.affine
        label = None
        if label_source is not None:
            kind, obj = label_source
            if kind == "dicom_irregular":
                mreg = load_regularized(obj[0], irregular_reason, order=0)  # type: ignore[arg-type]
                if mreg.data.shape != image_data.shape or not np.allclose(mreg.affine_ras, image_affine, atol=1e-3):
                    raise RefusedError(Reason.LABEL_GEOMETRY_MISMATCH, "resampled mask and image grids differ")
                raw = mreg.data
            elif kind == "dicom":
                mvol = load_volume(obj[0], obj[1])
                raw = mvol.data
            elif kind == "seg":
                uids = [group.headers[i].sop_instance_uid for i in geo.order]
                raw = load_seg_on_grid(obj[0], uids, geo)
            else:
                raw = load_nifti_on_grid(obj[0], geo)
            label = map_label_values(raw, class_values)
        image_arr, label_arr, affine = apply_spec(spec, image_data, image_affine, label)
    except RefusedError as exc:
        refuse_all(exc.reason, exc.detail)
        return None

    image_rel = f"images/{case_id}.nii.gz"
    write_nifti(dst / image_rel, image_arr.astype(np.float32), affine)
    label_rel = None
    counts: dict[str, int] = {}
    if label_arr is not None:
        label_rel = f"labels/{case_id}.nii.gz"
        write_nifti(dst / label_rel, label_arr.astype(np.uint8), affine)
        counts = {name: int((label_arr == i + 1).sum()) for i, name in enumerate(spec.labels.classes)}
    _mark(rows, group.rels, CONVERTED, "", "", output=image_rel, case_id=case_id, role="image",
          correction=correction)
    if label_source is not None:
        kind, obj = label_source
        rels = obj[0].rels if kind.startswith("dicom") else [obj[1]]
        _mark(rows, rels, CONVERTED, "", "", output=label_rel, case_id=case_id, role="label", correction=correction)
    spacing = tuple(float(v) for v in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))
    rec = CaseRecord(case_id=case_id, image=image_rel, label=label_rel,
                     shape=tuple(int(s) for s in image_arr.shape),  # type: ignore[arg-type]
                     spacing=spacing, label_counts=counts)  # type: ignore[arg-type]
    rec._split_key = case_id_for(study.uid, group.series_uid)  # type: ignore[attr-defined]  # not serialized
    return rec
