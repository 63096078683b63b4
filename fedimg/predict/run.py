"""``fedimg predict PKG SRC DST``: a model package applied to new studies, outputs per study.

DST (claimed as a ``predict`` output folder, :mod:`fedimg.preprocess.outdir`)::

    DST/
      predictions.csv            one row per study: study_id, status, per-class volume (ml) or probability
      summary.json               the package, the de-identification mode, each study's status (no input path)
      <study_id>/                segmentation only
        prediction.nii.gz        label map (0 background, 1..N classes) on the source acquisition grid
        prediction_seg.dcm       DICOM SEG referencing the source series (DICOM input)
        overlay.png              overlay montage with a legend per class
        predictions.csv          class, label value, voxels, volume_ml

De-identification contract
--------------------------
Without ``--keep-identifiers`` (the default) nothing written to DST, and
nothing printed, carries an identifier of the input: studies are named by
the keyed case pseudonym of ``fedimg preprocess`` (HMAC of the Study and
Series Instance UIDs with the site secret; a keyed hash of the path for
NIfTI input); NIfTI headers carry no free text; the CSV files and
``summary.json`` hold pseudonyms, reason codes and numbers only; the SEG is
built from de-identified copies of the source (PS3.15 basic profile with the
spec's ``deid`` options and the site's keyed UIDs, dates shifted per
patient): its patient module holds the patient pseudonym, and its references
(Study, Series, SOP Instance and Frame of Reference UIDs) are the keyed UIDs
that ``fedimg preprocess --write-dicom`` copies of the same files carry, so
it can be opened with those copies, not with the identified originals. The
keyed ids need the site secret (``--secret-file`` or ``FEDIMG_SECRET_FILE``);
without it and without ``--keep-identifiers`` predict refuses to run. A
crosswalk from study ids back to the inputs (paths, UIDs, accession numbers)
is written only when asked (``--crosswalk FILE``, owner-only, outside SRC and
DST). Series whose pixels may carry burned-in text are refused, as in
preprocessing.

With ``--keep-identifiers`` the SEG references the original series and
copies its patient and study modules (name, ID, birth date, sex, study
date, accession number, as highdicom copies them), ``predictions.csv`` adds
the Study and Series Instance UIDs, the Accession Number and the source
folder, and studies are named by the unkeyed case id of
``preprocess --no-deid``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedimg.atomic import write_json, write_nifti
from fedimg.dicom.reasons import Reason, RefusedError
from fedimg.models.package import ModelPackage, load_package
from fedimg.predict.inputs import StudyInput, find_inputs
from fedimg.preprocess.outdir import claim, precheck

logger = logging.getLogger(__name__)

STATE_FILE = ".fedimg_predict_state.json"
CROSSWALK_KEYS = frozenset({"study_id", "input", "study_instance_uid", "series_instance_uid", "accession_number"})


@dataclass
class StudyResult:
    """One study's outcome (PHI-free)."""

    study_id: str
    status: str  # "predicted" or "refused"
    reason: str = ""
    detail: str = ""
    volumes_ml: dict[str, float] = field(default_factory=dict)
    probabilities: dict[str, float] = field(default_factory=dict)
    predicted_class: str = ""
    seg: str = ""  # "written", "not written: why", "" (not DICOM / classification)
    outputs: list[str] = field(default_factory=list)


@dataclass
class PredictResult:
    """What a predict run did (also ``DST/summary.json``)."""

    dst: str
    task: str
    class_names: list[str]
    studies: list[StudyResult]
    files: int
    skipped: dict[str, int]
    deidentified: bool
    device: str
    amp: bool
    seconds: float

    @property
    def predicted(self) -> int:
        """Studies with a prediction."""
        return sum(s.status == "predicted" for s in self.studies)

    def table(self) -> str:
        """A console summary: per study its id and result (no identifiers without --keep-identifiers)."""
        lines = [
            f"predict: {len(self.studies)} stud{'y' if len(self.studies) == 1 else 'ies'} found in "
            f"{self.files} file(s): {self.predicted} predicted, {len(self.studies) - self.predicted} refused "
            f"({self.device}{', AMP' if self.amp else ''}, {self.seconds:.0f} s)"
        ]
        if self.skipped:
            lines.append("  files not used: " + ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items())))
        for s in self.studies:
            if s.status != "predicted":
                lines.append(f"  {s.study_id}  refused: {s.reason}: {s.detail}")
            elif self.task == "segmentation":
                vols = "  ".join(f"{c} {v:.1f} ml" for c, v in s.volumes_ml.items())
                lines.append(f"  {s.study_id}  {vols}" + (f"  (SEG {s.seg})" if s.seg and s.seg != "written" else ""))
            else:
                probs = "  ".join(f"p({c}) {v:.3f}" for c, v in s.probabilities.items())
                lines.append(f"  {s.study_id}  {s.predicted_class}  {probs}")
        lines.append(
            f"  outputs: {self.dst} (predictions.csv, summary.json"
            + (", one folder per study)" if self.task == "segmentation" else ")")
        )
        return "\n".join(lines)


def predict(
    package: str | Path | ModelPackage,
    src: str | Path,
    dst: str | Path,
    pseudonymizer: Any | None = None,
    keep_identifiers: bool = False,
    crosswalk: str | Path | None = None,
    device: str = "auto",
    amp: bool = True,
    seg: bool = True,
    png: bool = True,
    progress: bool = True,
) -> PredictResult:
    """Apply a model package to every study under ``src``; write the outputs into ``dst``.

    Args:
        package: a package folder (or a loaded package).
        src: a DICOM study folder, a PACS export, NIfTI images or one NIfTI file (read only).
        dst: the output folder (new, empty, or an earlier predict output).
        pseudonymizer: the site's :class:`fedimg.dicom.deid.Pseudonymizer` (de-identified outputs).
        keep_identifiers: write identified outputs instead (see the module docstring).
        crosswalk: where to keep the study-id-to-input crosswalk (owner-only), or None.
        device: ``auto`` (CUDA when present), ``cpu`` or ``cuda``.
        amp: mixed precision on CUDA (ignored on the CPU).
        seg: write DICOM SEG objects for DICOM input.
        png: write overlay montages.
        progress: show a progress bar.

    Raises:
        fedimg.models.package.PackageError: the package is invalid or has no spec.
        fedimg.dicom.deid.DeidError: neither a pseudonymizer nor ``keep_identifiers``.
        OutputDirError: ``dst`` may not be written (see :func:`fedimg.preprocess.outdir.claim`),
            or ``crosswalk`` lies inside SRC or DST.
        PreprocessInputError: ``src`` is missing or holds no DICOM or NIfTI image.
    """
    from fedimg import runtime
    from fedimg.dicom.deid import DeidError

    t0 = time.perf_counter()
    pkg = package if isinstance(package, ModelPackage) else load_package(package)
    spec = pkg.require_spec()
    if pseudonymizer is None and not keep_identifiers:
        raise DeidError(
            "predictions are de-identified by default and need this site's secret: expected "
            "--secret-file PATH or the environment variable FEDIMG_SECRET_FILE, found neither; pass "
            "the secret the site preprocesses with, or --keep-identifiers for identified outputs"
        )
    src, dst = Path(src), Path(dst)
    precheck(dst, "predict", src=src)
    if crosswalk is not None:
        from fedimg.preprocess.outputs import check_crosswalk

        check_crosswalk(Path(crosswalk), src, dst, CROSSWALK_KEYS)
    rt = runtime.setup(device, amp, 0)
    inputs = find_inputs(src, spec)
    model = pkg.build_model().to(rt.device)
    results: list[StudyResult] = []
    with claim(dst, "predict", src=src) as out:
        previous = _previous_outputs(out.path)
        from tqdm.auto import tqdm

        for item in tqdm(inputs.studies, desc="predict", unit="study", disable=not progress):
            sid = item.study_id(pseudonymizer)
            if item.refusal is not None:
                results.append(StudyResult(sid, "refused", item.refusal[0].value, item.refusal[1]))
                continue
            try:
                results.append(_predict_study(item, sid, pkg, model, rt, out, pseudonymizer, seg, png))
            except RefusedError as exc:
                results.append(StudyResult(sid, "refused", exc.reason.value, exc.detail))
        res = PredictResult(
            dst=str(out.path),
            task=pkg.task,
            class_names=pkg.class_names,
            studies=results,
            files=inputs.files,
            skipped=dict(inputs.skipped),
            deidentified=pseudonymizer is not None,
            device=str(rt.device),
            amp=rt.amp,
            seconds=0.0,
        )
        _write_tables(out.path, res, inputs.studies, pseudonymizer, keep_identifiers)
        res.seconds = time.perf_counter() - t0
        _write_summary(out.path, res, pkg)
        current = {rel for s in results for rel in s.outputs}
        out.prune(previous | out.journaled(), keep=current)
        _remove_empty_dirs(out.path, previous - current)
        write_json(out.path / STATE_FILE, {"outputs": sorted(current)})
        out.clear_journal()
    if crosswalk is not None:
        _write_crosswalk(Path(crosswalk), inputs.studies, pseudonymizer)
    logger.debug("predict: %d studies, %d predicted", len(results), res.predicted)
    return res


def _previous_outputs(folder: Path) -> set[str]:
    try:
        data = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    return {str(r) for r in data.get("outputs", []) if isinstance(r, str)} if isinstance(data, dict) else set()


def _remove_empty_dirs(root: Path, rels: set[str]) -> None:
    for parent in sorted({Path(r).parent for r in rels}, key=lambda p: -len(p.parts)):
        d = root / parent
        if parent != Path(".") and d.is_dir() and not any(d.iterdir()):
            d.rmdir()


def _load_image(item: StudyInput) -> tuple[np.ndarray, np.ndarray]:
    """The image on its acquisition grid: (i, j, k) voxels and the voxel-to-RAS affine."""
    if item.kind == "dicom":
        from fedimg.dicom.volume import load_volume

        vol = load_volume(item.series(), item.geometry)
        return vol.data, vol.affine
    import nibabel as nib
    from nibabel.spatialimages import SpatialImage

    try:
        img = nib.load(str(item.path))
        if not isinstance(img, SpatialImage):  # e.g. CIFTI-2 or GIFTI: no voxel grid, no affine
            raise TypeError(f"{type(img).__name__} is not a volume")
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types on bad files
        raise RefusedError(Reason.NOT_A_LABEL, f"unreadable NIfTI image ({type(exc).__name__})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise RefusedError(Reason.NOT_SINGLE_IMAGE, f"NIfTI image has {data.ndim} dimensions; expected a 3D volume")
    return data, np.asarray(img.affine, dtype=np.float64)


def _predict_study(
    item: StudyInput,
    sid: str,
    pkg: ModelPackage,
    model: Any,
    rt: Any,
    out: Any,
    pseudonymizer: Any | None,
    want_seg: bool,
    want_png: bool,
) -> StudyResult:
    from fedimg.dicom.quiet import quiet_dicom

    spec = pkg.require_spec()
    if pseudonymizer is not None and item.kind == "dicom":
        from fedimg.dicom.deid import series_burned_in_risk

        risky = series_burned_in_risk(item.series().headers)
        if risky is not None:
            return StudyResult(sid, "refused", Reason.BURNED_IN_ANNOTATION.value, risky)
    if pkg.task == "classification":
        return _classify_study(item, sid, pkg, model, rt)
    with quiet_dicom():
        image, affine = _load_image(item)
    from fedimg.predict.infer import segment

    seg = segment(model, pkg.experiment, spec, image, affine, rt)
    names = pkg.class_names
    volumes = seg.volumes_ml(len(names))
    res = StudyResult(sid, "predicted", volumes_ml=dict(zip(names, volumes)))
    label_rel = f"{sid}/prediction.nii.gz"
    out.record([label_rel])
    write_nifti(out.path / label_rel, seg.labels, seg.affine)
    res.outputs.append(label_rel)
    counts = np.bincount(seg.labels.ravel(), minlength=len(names) + 1)
    table_rel = f"{sid}/predictions.csv"
    out.record([table_rel])
    from fedimg.predict.report import overlay_montage, write_csv

    write_csv(
        out.path / table_rel,
        ["class", "label_value", "voxels", "volume_ml"],
        [[n, i + 1, int(counts[i + 1]), volumes[i]] for i, n in enumerate(names)],
    )
    res.outputs.append(table_rel)
    if want_png:
        png_rel = f"{sid}/overlay.png"
        out.record([png_rel])
        overlay_montage(
            out.path / png_rel,
            seg.image,
            seg.labels,
            names,
            volumes,
            f"{sid} ({pkg.experiment.name})",
            spec.modality,
            spec.intensity.ct_window,
        )
        res.outputs.append(png_rel)
    if item.kind == "dicom" and want_seg:
        res.seg = _write_seg(item, sid, pkg, seg.labels, out, pseudonymizer, res)
    return res


def _write_seg(
    item: StudyInput,
    sid: str,
    pkg: ModelPackage,
    labels: np.ndarray,
    out: Any,
    pseudonymizer: Any | None,
    res: StudyResult,
) -> str:
    """Write the study's DICOM SEG; returns "written" or why not (PHI-free)."""
    import pydicom
    from pydicom.uid import generate_uid

    from fedimg.dicom.quiet import quiet_dicom
    from fedimg.predict.seg import build_seg, can_reference, write_seg

    why = can_reference(item.series(), item.geometry)
    if why is not None:
        return f"not written: {why}"
    spec = pkg.require_spec()
    sha = str((pkg.meta.get("weights") or {}).get("sha256", ""))
    with quiet_dicom():
        datasets: list[pydicom.Dataset] = [pydicom.dcmread(h.path) for h in item.series().headers]
        if pseudonymizer is not None:
            from fedimg.dicom.deid import deidentify

            datasets = [
                deidentify(
                    ds,
                    pseudonymizer,
                    covariates=spec.deid.covariates,
                    descriptor_allowlist=spec.deid.keep_descriptors,
                    private_allowlist=spec.deid.private_allowlist,
                )
                for ds in datasets
            ]
            series_uid = pseudonymizer.uid(f"fedimg-predict-seg-series|{sha}|{item.series_uid}")
            sop_uid = pseudonymizer.uid(f"fedimg-predict-seg-instance|{sha}|{item.series_uid}")
        else:
            series_uid = generate_uid(entropy_srcs=["fedimg-predict-seg-series", sha, item.series_uid])
            sop_uid = generate_uid(entropy_srcs=["fedimg-predict-seg-instance", sha, item.series_uid])
        try:
            obj = build_seg(
                datasets,
                item.series(),
                item.geometry,
                labels,
                pkg.class_names,
                series_uid,
                sop_uid,
                pkg.experiment.name,
                str(pkg.meta.get("fedimg_version", "")),
                sha[:16],
            )
        except Exception as exc:  # noqa: BLE001 - highdicom refuses some sources; the message may quote values
            logger.warning("study %s: DICOM SEG not written (%s)", sid, type(exc).__name__)
            return f"not written: highdicom refused the source ({type(exc).__name__})"
    rel = f"{sid}/prediction_seg.dcm"
    out.record([rel])
    write_seg(out.path / rel, obj, deidentified=pseudonymizer is not None)
    res.outputs.append(rel)
    return "written"


def _classify_study(item: StudyInput, sid: str, pkg: ModelPackage, model: Any, rt: Any) -> StudyResult:
    from fedimg.dicom.quiet import quiet_dicom
    from fedimg.predict.infer import classify
    from fedimg.preprocess.transforms import apply_spec, apply_spec_2d

    spec = pkg.require_spec()
    with quiet_dicom():
        if spec.spatial_dims == 2:
            from fedimg.dicom.planar import load_planar

            prepared, _ = apply_spec_2d(spec, load_planar(item.series(), item.geometry), item.geometry)
        else:
            image, affine = _load_image(item)
            prepared, _, _ = apply_spec(spec, image, affine)
    probs = classify(model, pkg.experiment, prepared, rt)
    names = pkg.class_names
    return StudyResult(
        sid,
        "predicted",
        probabilities={n: float(p) for n, p in zip(names, probs)},
        predicted_class=names[int(np.argmax(probs))],
    )


def _write_tables(
    dst: Path, res: PredictResult, items: list[StudyInput], pseudonymizer: Any | None, keep: bool
) -> None:
    from fedimg.predict.report import write_csv

    names = res.class_names
    ident = {it.study_id(pseudonymizer): it for it in items}
    header = ["study_id", "status"]
    if keep:
        header += ["study_instance_uid", "series_instance_uid", "accession_number", "source"]
    if res.task == "segmentation":
        header += [f"{c}_ml" for c in names]
    else:
        header += ["predicted_class"] + [f"p_{c}" for c in names]
    rows = []
    for s in res.studies:
        row: list[Any] = [s.study_id, s.status if s.status == "predicted" else f"refused:{s.reason}"]
        if keep:
            it = ident[s.study_id]
            row += [it.study_uid, it.series_uid, it.accession, it.rel]
        if res.task == "segmentation":
            row += [s.volumes_ml.get(c, "") for c in names]
        else:
            row += [s.predicted_class] + [s.probabilities.get(c, "") for c in names]
        rows.append(row)
    write_csv(dst / "predictions.csv", header, rows)


def _write_summary(dst: Path, res: PredictResult, pkg: ModelPackage) -> None:
    chosen = pkg.chosen_on
    summary = {
        "package": {
            "path": str(pkg.path),
            "experiment": pkg.experiment.name,
            "sha256": (pkg.meta.get("weights") or {}).get("sha256"),
            "fedimg_version": pkg.meta.get("fedimg_version"),
            "created": pkg.meta.get("created"),
            "chosen_on": {k: chosen.get(k) for k in ("metric", "value", "cases")},
        },
        "spec": pkg.spec.name if pkg.spec else None,
        "deidentification": (
            "keyed pseudonyms (site secret); SEG from de-identified source copies"
            if res.deidentified
            else "none: --keep-identifiers"
        ),
        **{k: v for k, v in asdict(res).items() if k != "dst"},
    }
    write_json(dst / "summary.json", summary)


def _write_crosswalk(path: Path, items: list[StudyInput], pseudonymizer: Any | None) -> None:
    from fedimg.atomic import write_jsonl

    write_jsonl(
        path,
        (
            {
                "study_id": it.study_id(pseudonymizer),
                "input": it.rel,
                "study_instance_uid": it.study_uid,
                "series_instance_uid": it.series_uid,
                "accession_number": it.accession,
            }
            for it in items
        ),
    )
    os.chmod(path, 0o600)


__all__ = ["PredictResult", "StudyResult", "predict"]
