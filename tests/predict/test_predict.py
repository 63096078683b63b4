"""``fedimg predict``: a trained package on new studies, outputs on the source grid, no PHI by default.

The segmentation tests train a tiny UNet with ``train_local`` on one synthetic
CT site (8 studies, 6 mm spec, 10 epochs) and predict on the raw DICOM
studies of that site:

* the DICOM SEG read back (by the source instances it references, and by
  highdicom's own geometry) equals the NIfTI label map voxel for voxel, and
  the NIfTI lies on the acquisition grid of the source series;
* on the spec grid, predict reproduces validation exactly (same chain, same
  model, same sliding window): its Dice against the preprocessed labels of
  the validation cases equals the validation Dice of the package;
* on the source grid, its Dice against the phantom's ground truth is within
  0.05 of the validation Dice (the 6 mm label map is resampled with nearest
  neighbour onto a ~1.6 x 1.6 x 3 mm grid: its boundary is up to one 6 mm
  voxel off, which on these 100-200 ml organs moves Dice by a few hundredths;
  measured 0.02);
* no identifier of the synthetic studies appears in any output or console line.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch

from fedimg import config as cfg
from fedimg.cli import main
from fedimg.dicom.deid import Pseudonymizer, SiteSecret
from fedimg.dicom.geometry import LPS_TO_RAS
from fedimg.dicom.index import group_series, scan
from fedimg.dicom.volume import load_volume, series_geometry
from fedimg.models.package import load_package, write_package
from fedimg.models.registry import build_model
from fedimg.predict import predict
from fedimg.predict.infer import resample_labels
from fedimg.preprocess.pipeline import case_id_for, preprocess
from tests.conftest import CT_SPEC, MR_SPEC, REPO, shared, tiny_experiment

pytestmark = pytest.mark.slow

CLASSES = ["organ", "lesion"]
SOURCE_DICE_TOLERANCE = 0.05


# --------------------------------------------------------------------------- helpers


def _series(folder: Path, description: str | None = None):
    """(group, geometry) of the one series in ``folder`` (or the one whose description matches)."""
    import re

    groups = group_series(scan(folder).headers)
    if description:
        groups = [g for g in groups if re.search(description, g.description)]
    assert len(groups) == 1
    return groups[0], series_geometry(groups[0])


def _dice(pred: np.ndarray, truth: np.ndarray, c: int) -> float:
    a, b = pred == c, truth == c
    if not a.any() and not b.any():
        return 1.0  # as validation scores an absent class that is also not predicted
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def _truth_on(case: dict, raw: Path, nifti: nib.Nifti1Image) -> np.ndarray:
    """The phantom's ground-truth label on the prediction's grid (nearest neighbour: identical grids map 1:1)."""
    shape = nifti.shape
    if case["label_format"] == "nifti":
        t = nib.load(raw / case["label_path"])
        return resample_labels(np.asarray(t.dataobj), t.affine, shape, nifti.affine)
    g, geo = _series(raw / case["label_series_dir"])
    vol = load_volume(g, geo)
    return resample_labels(np.rint(vol.data).astype(np.uint8), vol.affine, shape, nifti.affine)


def _seg_by_source(seg_path: Path, source_uids: list[str]) -> np.ndarray:
    """The SEG's label map on the source slices it references, as (i, j, k) like the NIfTI."""
    seg = hd.seg.segread(str(seg_path))
    arr = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=source_uids,
        combine_segments=True,
        relabel=False,
        assert_missing_frames_are_empty=False,
    )
    return np.transpose(arr, (2, 1, 0))


def _assert_seg_geometry_matches(seg_path: Path, nifti: nib.Nifti1Image) -> None:
    """highdicom's own reading of the SEG (plane positions, orientation, spacing) lands on the NIfTI's voxels."""
    vol = hd.seg.segread(str(seg_path)).get_volume(combine_segments=True, relabel=False)
    arr = np.asarray(vol.array)
    idx = np.indices(arr.shape).reshape(3, -1)
    world_ras = LPS_TO_RAS @ vol.affine @ np.vstack([idx, np.ones(idx.shape[1])])
    vox = (np.linalg.inv(nifti.affine) @ world_ras)[:3]
    assert np.abs(vox - np.rint(vox)).max() < 1e-3  # SEG voxels are the NIfTI's voxels
    vi = np.rint(vox).astype(int)
    data = np.asarray(nifti.dataobj)
    assert all((vi[a] >= 0).all() and (vi[a] < data.shape[a]).all() for a in range(3))
    assert np.array_equal(data[vi[0], vi[1], vi[2]], arr.reshape(-1).astype(data.dtype))
    assert int((data > 0).sum()) == int((arr > 0).sum())  # every labelled voxel is in the SEG


def _identifiers(ground_truth: dict, site: str, raw: Path) -> tuple[set[str], set[str]]:
    """Every fake identifier synth wrote into the site's studies (and the PHI-bearing folder names); the UIDs apart."""
    idents: set[str] = set()
    uids: set[str] = set()
    for case in ground_truth["sites"][site]["cases"]:
        idents |= {v for v in case["identifiers"].values() if isinstance(v, str) and len(v) >= 4}
        idents |= set(Path(case["study_dir"]).parts[1:])  # e.g. SMH7756857_BROWN, 20170729_A886198100
        uids |= {case.get(k) or "" for k in ("study_instance_uid", "series_instance_uid", "frame_of_reference_uid")}
    for h in scan(raw / site).headers:
        uids.add(h.sop_instance_uid)
    return idents - {""}, uids - {""}


def _assert_no_phi(folder: Path, texts: list[str], ids: tuple[set[str], set[str]]) -> int:
    """No identifier in any file under ``folder`` nor in ``texts``; returns the number of files checked.

    Text is searched for every identifier; short all-digit ones (a 5-digit Study ID) only as whole values, since
    any digit string appears by chance inside the 39-digit keyed UIDs. DICOM files are checked element by element:
    no UID equals an original UID, no other value holds an identifier.
    """
    import re

    idents, uids = ids
    short = {i for i in idents if i.isdigit() and len(i) < 8}
    long = idents - short

    def check_text(text: str, where: str) -> None:
        upper = text.upper()
        for ident in long:
            assert ident.upper() not in upper, f"identifier {ident!r} found in {where}"
        for ident in short:
            assert not re.search(rf"(?<![\d.]){ident}(?![\d.])", text), f"identifier {ident!r} found in {where}"

    for i, text in enumerate(texts):
        check_text(text, f"console output #{i}")
        for uid in uids:
            assert uid not in text
    n = 0
    for p in sorted(folder.rglob("*")):
        if not p.is_file():
            continue
        n += 1
        if p.suffix == ".dcm":
            ds = pydicom.dcmread(p)
            for el in [*ds.file_meta.iterall(), *ds.iterall()]:
                if el.keyword in ("PixelData", "FloatPixelData") or el.VR == "SQ":
                    continue
                values = el.value if isinstance(el.value, (list, pydicom.multival.MultiValue)) else [el.value]
                for v in values:
                    if el.VR == "UI":
                        assert str(v) not in uids, f"{p.name}: {el.keyword} is an original UID"
                    else:
                        check_text(str(v), f"{p.name} {el.keyword}")
            continue
        data = p.read_bytes()
        data = gzip.decompress(data) if p.suffix == ".gz" else data
        check_text(data.decode("latin-1"), p.name)
        for uid in uids:
            assert uid.encode() not in data, f"an original UID in {p.name}"
    return n


def _secret(folder: Path) -> tuple[Path, Pseudonymizer]:
    """A fixed site secret: outputs (and so every check of them) are the same in every run."""
    path = folder / "site.secret"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(b"fedimg-predict-tests-fixed-site-secret-0001\n")
    return path, Pseudonymizer(SiteSecret.load(path))


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """One synthetic CT site (8 studies), preprocessed at 6 mm, a tiny UNet trained 10 epochs; its best package."""
    from fedimg.synth import generate
    from fedimg.training.local import train_local

    base = tmp_path_factory.mktemp("predict")
    synth = generate(base / "raw", n_sites=1, n_cases=8, seed=3, progress=False)
    spec = dataclasses.replace(cfg.load(cfg.PreprocessSpec, CT_SPEC), target_spacing=(6.0, 6.0, 6.0))
    preprocess(synth.out_dir / "site-1", base / "pre", spec, site="site-1", progress=False)
    site = cfg.SiteConfig(name="site-1", datalist=str(base / "pre" / "datalist.json"), device="cpu", num_threads=2)
    exp = tiny_experiment(**{"train.epochs": 10, "optim.lr": 0.01, "data.samples_per_volume": 2})
    res = train_local(exp, site, base / "train", progress=False)
    rows = [json.loads(x) for x in (base / "train" / "metrics.jsonl").read_text().splitlines()]
    secret_path, ps = _secret(base)
    return SimpleNamespace(
        base=base,
        raw=synth.out_dir,
        package=Path(res.packages["best"]),
        best=rows[res.best_epoch - 1],
        secret=secret_path,
        ps=ps,
        truth=json.loads(synth.ground_truth_path.read_text()),
        datalist=json.loads((base / "pre" / "datalist.json").read_text()),
    )


@pytest.fixture()
def untrained_ct(ct_spec, tmp_path) -> Path:
    exp = tiny_experiment()
    torch.manual_seed(0)
    return write_package(
        tmp_path / "pkg",
        build_model(exp.model, exp.task).state_dict(),
        exp,
        dataclasses.replace(ct_spec, target_spacing=(6.0, 6.0, 6.0)),
        {},
        {},
    )


# --------------------------------------------------------------------------- geometry


def test_label_map_survives_the_round_trip_to_the_spec_grid_and_back(ct_spec):
    """A sphere on a sagittal, flipped acquisition grid -> RAS 6 mm spec grid -> back: off by at most one spec voxel."""
    from fedimg.preprocess.transforms import apply_spec

    shape = (60, 50, 40)
    # Sagittal acquisition: i runs anterior->posterior, j superior->inferior, k left->right (LPS origin).
    lps = np.array([[0, 0, 2.5, -50.0], [2.0, 0, 0, -60.0], [0, -2.0, 0, 40.0], [0, 0, 0, 1]])
    affine = LPS_TO_RAS @ lps
    ijk = np.indices(shape).reshape(3, -1)
    world = (affine @ np.vstack([ijk, np.ones(ijk.shape[1])]))[:3]
    centre, radius = np.array([-5.0, 5.0, -20.0]), 30.0
    r = np.linalg.norm(world - centre[:, None], axis=0).reshape(shape)
    label = (r < radius).astype(np.uint8) + (r < radius / 3).astype(np.uint8)  # two nested classes

    exact = dataclasses.replace(ct_spec, target_spacing=(2.5, 2.0, 2.0))  # the source spacing, RAS order
    _, lab_spec, aff_spec = apply_spec(exact, np.zeros(shape, np.float32), affine, label)
    assert not np.allclose(aff_spec[:3, :3], affine[:3, :3])  # the spec grid is reoriented
    assert np.array_equal(resample_labels(lab_spec, aff_spec, shape, affine), label)

    coarse = dataclasses.replace(ct_spec, target_spacing=(6.0, 6.0, 6.0))
    _, lab_spec, aff_spec = apply_spec(coarse, np.zeros(shape, np.float32), affine, label)
    back = resample_labels(lab_spec, aff_spec, shape, affine)
    wrong = back != label
    # Every disagreement lies within one spec voxel (its half-diagonal, twice: there and back) of a boundary.
    near = np.minimum(np.abs(r - radius), np.abs(r - radius / 3)) <= 6.0 * np.sqrt(3)
    assert wrong.any() and not (wrong & ~near).any()
    assert _dice(back, label, 1) > 0.9


# --------------------------------------------------------------------------- segmentation


def test_predict_segmentation_deidentified(trained, capsys, caplog):
    t = trained
    dst = t.base / "out"
    rc = main(["predict", str(t.package), str(t.raw / "site-1"), str(dst), "--secret-file", str(t.secret), "--quiet"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    cases = t.truth["sites"]["site-1"]["cases"]
    assert "8 predicted, 0 refused" in captured.out
    val_ids = {i["case_id"] for i in t.datalist["validation"]}
    source_dice: dict[str, list[float]] = {c: [] for c in CLASSES}
    all_dice: dict[str, list[float]] = {c: [] for c in CLASSES}
    table = {r["study_id"]: r for r in csv.DictReader((dst / "predictions.csv").open())}
    for case in cases:
        sid = t.ps.case(case["study_instance_uid"], case["series_instance_uid"])
        folder = dst / sid
        assert sorted(p.name for p in folder.iterdir()) == [
            "overlay.png",
            "prediction.nii.gz",
            "prediction_seg.dcm",
            "predictions.csv",
        ]
        nifti = nib.load(folder / "prediction.nii.gz")
        pred = np.asarray(nifti.dataobj)
        # The label map lies on the acquisition grid of the source series (fedimg orders slices along the
        # normal; synth's affine follows Instance Number: the same voxels, k possibly reversed).
        g, geo = _series(t.raw / case["image_series_dir"])
        assert pred.shape == tuple(case["shape"]) == geo.shape and pred.dtype == np.uint8
        assert np.allclose(nifti.affine, geo.affine_ras, atol=1e-4)
        truth_grid = nib.as_closest_canonical(
            nib.Nifti1Image(np.zeros(case["shape"], np.uint8), np.array(case["affine_ras"]))
        )
        assert np.allclose(nib.as_closest_canonical(nifti).affine, truth_grid.affine, atol=1e-4)

        # The SEG, read back through the (de-identified) source instances it references, is the NIfTI.
        keyed = [t.ps.uid(g.headers[i].sop_instance_uid) for i in geo.order]
        assert np.array_equal(_seg_by_source(folder / "prediction_seg.dcm", keyed), pred)
        _assert_seg_geometry_matches(folder / "prediction_seg.dcm", nifti)
        seg = pydicom.dcmread(folder / "prediction_seg.dcm")
        assert [s.SegmentLabel for s in seg.SegmentSequence] == CLASSES
        assert seg.PatientIdentityRemoved == "YES"
        assert seg.PatientID == t.ps.patient(case["identifiers"]["patient_id"])
        assert seg.StudyInstanceUID == t.ps.uid(case["study_instance_uid"])
        assert seg.FrameOfReferenceUID == t.ps.uid(case["frame_of_reference_uid"])
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == t.ps.uid(case["series_instance_uid"])
        assert not seg.get("StudyID") and not seg.get("AccessionNumber") and not seg.get("PatientBirthDate")

        # Volumes in the CSVs are voxel counts times the source voxel volume.
        voxel_ml = abs(np.linalg.det(nifti.affine[:3, :3])) / 1000
        for c, name in enumerate(CLASSES, start=1):
            assert float(table[sid][f"{name}_ml"]) == pytest.approx((pred == c).sum() * voxel_ml, rel=1e-4)
        per_study = {r["class"]: r for r in csv.DictReader((folder / "predictions.csv").open())}
        assert int(per_study["organ"]["voxels"]) == int((pred == 1).sum())

        truth = _truth_on(case, t.raw, nifti)
        for c, name in enumerate(CLASSES, start=1):
            all_dice[name].append(_dice(pred, truth, c))
            if case_id_for(case["study_instance_uid"], case["series_instance_uid"]) in val_ids:
                source_dice[name].append(_dice(pred, truth, c))
    measured = {name: float(np.mean(v)) for name, v in source_dice.items()}
    print(
        f"\nvalidation Dice (spec grid, training): organ {t.best['val_dice/organ']:.3f}, lesion "
        f"{t.best['val_dice/lesion']:.3f}; predict vs phantom truth on the source grid, same validation cases: "
        f"organ {measured['organ']:.3f}, lesion {measured['lesion']:.3f}; all 8 studies: organ "
        f"{np.mean(all_dice['organ']):.3f}, lesion {np.mean(all_dice['lesion']):.3f}"
    )
    assert t.best["val_dice/organ"] > 0.6  # a model worth comparing
    for name in CLASSES:
        assert abs(measured[name] - t.best[f"val_dice/{name}"]) <= SOURCE_DICE_TOLERANCE, name

    summary = json.loads((dst / "summary.json").read_text())
    assert summary["package"]["chosen_on"]["metric"] == "dice_mean"
    assert sum(s["status"] == "predicted" for s in summary["studies"]) == 8 and summary["deidentified"]
    n = _assert_no_phi(dst, [captured.out, captured.err, caplog.text], _identifiers(t.truth, "site-1", t.raw))
    assert n >= 8 * 4 + 2


def test_predict_reproduces_validation_on_the_spec_grid(trained):
    """Same chain, same model, same sliding window: predict's spec-grid output scores exactly the validation Dice."""
    from fedimg import runtime
    from fedimg.predict.infer import segment

    t = trained
    pkg = load_package(t.package)
    rt = runtime.setup("cpu", False, 2)
    model = pkg.build_model()
    by_id = {
        case_id_for(c["study_instance_uid"], c["series_instance_uid"]): c for c in t.truth["sites"]["site-1"]["cases"]
    }
    dice: dict[str, list[float]] = {c: [] for c in CLASSES}
    for item in t.datalist["validation"]:
        g, geo = _series(t.raw / by_id[item["case_id"]]["image_series_dir"])
        vol = load_volume(g, geo)
        res = segment(model, pkg.experiment, pkg.spec, vol.data, vol.affine, rt)
        ref = nib.load(t.base / "pre" / item["label"])
        assert res.spec_labels.shape == ref.shape and np.allclose(res.spec_affine, ref.affine, atol=1e-4)
        for c, name in enumerate(CLASSES, start=1):
            dice[name].append(_dice(res.spec_labels, np.asarray(ref.dataobj), c))
    for name in CLASSES:
        assert np.mean(dice[name]) == pytest.approx(t.best[f"val_dice/{name}"], abs=1e-4)


def test_seg_references_write_dicom_copies_keep_identifiers_and_nifti_input(trained, tmp_path):
    t = trained
    case = next(c for c in t.truth["sites"]["site-1"]["cases"] if c["label_format"] == "nifti")
    src = tmp_path / "src"
    shutil.copytree(t.raw / case["study_dir"], src / Path(case["study_dir"]).name)
    spec = load_package(t.package).spec
    pre = preprocess(
        src, tmp_path / "pre", spec, site="site-1", progress=False, pseudonymizer=t.ps, write_dicom=tmp_path / "copies"
    )
    (case_id,) = [c.case_id for c in pre.cases]

    crosswalk = tmp_path / "private" / "crosswalk.jsonl"
    crosswalk.parent.mkdir()
    res = predict(t.package, src, tmp_path / "deid", pseudonymizer=t.ps, crosswalk=crosswalk, progress=False)
    assert [s.study_id for s in res.studies] == [case_id]  # the preprocess pseudonym of the same series
    seg = pydicom.dcmread(tmp_path / "deid" / case_id / "prediction_seg.dcm")
    copies = [pydicom.dcmread(p) for p in sorted((tmp_path / "copies" / case_id / "image").glob("*.dcm"))]
    ref = seg.ReferencedSeriesSequence[0]
    assert ref.SeriesInstanceUID == copies[0].SeriesInstanceUID
    assert {r.ReferencedSOPInstanceUID for r in ref.ReferencedInstanceSequence} == {d.SOPInstanceUID for d in copies}
    assert (seg.StudyInstanceUID, seg.FrameOfReferenceUID, seg.PatientID, seg.PatientName) == (
        copies[0].StudyInstanceUID,
        copies[0].FrameOfReferenceUID,
        copies[0].PatientID,
        copies[0].PatientName,
    )
    assert oct(crosswalk.stat().st_mode & 0o777) == "0o600"
    row = json.loads(crosswalk.read_text().splitlines()[0])
    assert row["study_id"] == case_id and row["study_instance_uid"] == case["study_instance_uid"]

    kept = predict(t.package, src, tmp_path / "keep", keep_identifiers=True, progress=False)
    sid = case_id_for(case["study_instance_uid"], case["series_instance_uid"])
    assert [s.study_id for s in kept.studies] == [sid]
    seg = pydicom.dcmread(tmp_path / "keep" / sid / "prediction_seg.dcm")
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == case["series_instance_uid"]
    assert str(seg.PatientName) == case["identifiers"]["patient_name"]
    assert seg.get("PatientIdentityRemoved") != "YES"
    row = next(csv.DictReader((tmp_path / "keep" / "predictions.csv").open()))
    assert row["study_instance_uid"] == case["study_instance_uid"]
    assert row["accession_number"] == case["identifiers"]["accession_number"]
    deid_pred = np.asarray(nib.load(tmp_path / "deid" / case_id / "prediction.nii.gz").dataobj)
    assert np.array_equal(np.asarray(nib.load(tmp_path / "keep" / sid / "prediction.nii.gz").dataobj), deid_pred)

    # The same image as NIfTI: the same label map on the same grid (no SEG: there is no DICOM to reference).
    g, geo = _series(src)
    vol = load_volume(g, geo)
    (tmp_path / "nii").mkdir()
    nib.save(nib.Nifti1Image(vol.data, vol.affine), tmp_path / "nii" / "ct.nii.gz")
    res = predict(t.package, tmp_path / "nii", tmp_path / "from_nifti", pseudonymizer=t.ps, progress=False)
    (study,) = res.studies
    assert study.study_id.startswith("nifti-") and study.seg == ""
    out = nib.load(tmp_path / "from_nifti" / study.study_id / "prediction.nii.gz")
    assert np.allclose(out.affine, vol.affine, atol=1e-5)
    assert np.array_equal(np.asarray(out.dataobj), deid_pred)

    # A re-run into the same DST replaces its outputs; files of studies that are gone are removed.
    shutil.rmtree(tmp_path / "nii")
    (tmp_path / "nii").mkdir()
    nib.save(nib.Nifti1Image(vol.data, vol.affine), tmp_path / "nii" / "renamed.nii.gz")
    res2 = predict(t.package, tmp_path / "nii", tmp_path / "from_nifti", pseudonymizer=t.ps, progress=False)
    assert res2.studies[0].study_id != study.study_id
    assert not (tmp_path / "from_nifti" / study.study_id).exists()
    assert (tmp_path / "from_nifti" / res2.studies[0].study_id / "prediction.nii.gz").is_file()


@pytest.mark.gpu
def test_predict_on_cuda_with_amp_agrees_with_the_cpu(trained, tmp_path):
    t = trained
    case = t.truth["sites"]["site-1"]["cases"][0]
    src = tmp_path / "src"
    shutil.copytree(t.raw / case["study_dir"], src / "study")
    cpu = predict(t.package, src, tmp_path / "cpu", pseudonymizer=t.ps, device="cpu", progress=False, png=False)
    gpu = predict(t.package, src, tmp_path / "gpu", pseudonymizer=t.ps, device="cuda", progress=False, png=False)
    assert gpu.device.startswith("cuda") and gpu.amp and not cpu.amp
    sid = cpu.studies[0].study_id
    a = np.asarray(nib.load(tmp_path / "cpu" / sid / "prediction.nii.gz").dataobj)
    b = np.asarray(nib.load(tmp_path / "gpu" / sid / "prediction.nii.gz").dataobj)
    assert (a == b).mean() > 0.999  # fp16 may flip a few boundary voxels, nothing more
    assert gpu.studies[0].seg == "written"


def test_predict_refuses_before_writing(untrained_ct, small_synth, tmp_path, capsys, monkeypatch):
    src = small_synth.out_dir / "site-1"
    monkeypatch.delenv("FEDIMG_SECRET_FILE", raising=False)
    assert main(["predict", str(untrained_ct), str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "needs this site's secret" in err and "--keep-identifiers" in err
    assert not (tmp_path / "out").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert main(["predict", str(untrained_ct), str(src), str(foreign), "--keep-identifiers"]) == 2
    assert "not empty and was not made by fedimg predict" in capsys.readouterr().err
    assert main(["predict", str(untrained_ct), str(src), str(src / "out"), "--keep-identifiers"]) == 2
    assert "DST lies inside SRC" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images")
    assert main(["predict", str(untrained_ct), str(empty), str(tmp_path / "o2"), "--keep-identifiers"]) == 2
    assert "no DICOM files or NIfTI images in SRC" in capsys.readouterr().err
    # A study without a series the spec selects: nothing usable (exit 3), the account says why.
    pkg = load_package(untrained_ct)
    mr_only = dataclasses.replace(pkg.spec, modality="MR", series=cfg.SeriesSelection(image_modality="MR"))
    write_package(tmp_path / "mrpkg", pkg.state_dict, pkg.experiment, mr_only, {}, {})
    assert main(["predict", str(tmp_path / "mrpkg"), str(src), str(tmp_path / "o3"), "--keep-identifiers"]) == 3
    captured = capsys.readouterr()
    assert "skipped:MODALITY_NOT_SELECTED" in captured.out and "nothing usable" in captured.err


# --------------------------------------------------------------------------- real MR


def test_pgbm008_seg_lands_on_the_source_grid(tmp_path):
    """A package with the TCIA brain MR spec on PGBM-008: the T1post series is selected, the SEG fits its grid."""
    from fedimg import runtime
    from fedimg.training.trainer import SiteTrainer

    study = shared("dicom/tcia_brain_tumor_progression/PGBM-008")
    spec = cfg.load(cfg.PreprocessSpec, MR_SPEC)
    pre = preprocess(study, tmp_path / "pre", spec, site="s", progress=False)
    items = [{"image": str(tmp_path / "pre" / c.image), "label": str(tmp_path / "pre" / c.label)} for c in pre.cases]
    # A few steps on the tumour mask: enough for a label map that is neither empty nor everywhere.
    exp = tiny_experiment(
        **{
            "name": "mr_geometry",
            "task.class_names": "[tumor]",
            "task.min_component_voxels": 0,
            "optim.lr": 0.01,
            "data.batch_size": 4,
            "data.samples_per_volume": 4,
        }
    )
    trainer = SiteTrainer(exp, items, [], runtime.setup("cpu", False, 2, seed=0))
    trainer.fit(10)
    package = write_package(tmp_path / "pkg", trainer.state_dict(), exp, spec, {}, {"run": "test"})
    secret_path, ps = _secret(tmp_path)

    res = predict(package, study, tmp_path / "out", pseudonymizer=ps, progress=False, png=False)
    (sres,) = res.studies
    assert sres.status == "predicted" and sres.seg == "written"
    g, geo = _series(study, spec.series.image_description_regex)
    nifti = nib.load(tmp_path / "out" / sres.study_id / "prediction.nii.gz")
    pred = np.asarray(nifti.dataobj)
    assert pred.shape == geo.shape and np.allclose(nifti.affine, geo.affine_ras, atol=1e-4)
    assert 0 < (pred == 1).sum() < pred.size  # a label map whose geometry can be seen
    seg_path = tmp_path / "out" / sres.study_id / "prediction_seg.dcm"
    keyed = [ps.uid(g.headers[i].sop_instance_uid) for i in geo.order]
    assert np.array_equal(_seg_by_source(seg_path, keyed), pred)
    _assert_seg_geometry_matches(seg_path, nifti)

    # dcm2niix's conversion of the same T1post series: the same grid.
    exe = Path(sys.executable).parent / "dcm2niix"
    if not exe.is_file():
        pytest.skip("dcm2niix not installed (pip install dcm2niix): the oracle grid cannot be checked")
    series_dir = g.first.path.parent
    subprocess.run(
        [str(exe), "-z", "n", "-b", "n", "-f", "t1post", "-o", str(tmp_path), str(series_dir)],
        check=True,
        capture_output=True,
    )
    oracle = nib.as_closest_canonical(nib.load(tmp_path / "t1post.nii"))
    ours = nib.as_closest_canonical(nifti)
    assert oracle.shape[:3] == ours.shape and np.allclose(oracle.affine, ours.affine, atol=1e-3)


# --------------------------------------------------------------------------- classification


def test_classification_predict_dx(tmp_path, capsys, caplog):
    from fedimg import runtime
    from fedimg.data.datasets import make_val_loader, read_datalist
    from fedimg.synth import generate
    from fedimg.tasks.classification import ClassificationTask

    synth = generate(tmp_path / "raw", n_sites=1, n_cases=6, seed=5, progress=False, modality="DX")
    site = synth.out_dir / "site-1"
    spec = cfg.load(cfg.PreprocessSpec, REPO / "configs" / "preprocessing" / "dx_chest_cls.yaml")
    secret_path, ps = _secret(tmp_path)
    preprocess(
        site, tmp_path / "pre", spec, site="site-1", progress=False, labels_csv=site / "labels.csv", pseudonymizer=ps
    )
    exp = cfg.load(cfg.ExperimentConfig, REPO / "configs" / "experiments" / "cls_dx_lesion.yaml")
    torch.manual_seed(0)
    model = build_model(exp.model, exp.task)
    package = write_package(tmp_path / "pkg", model.state_dict(), exp, spec, {}, {})

    rc = main(["predict", str(package), str(site), str(tmp_path / "out"), "--secret-file", str(secret_path), "--quiet"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    rows = {r["study_id"]: r for r in csv.DictReader((tmp_path / "out" / "predictions.csv").open())}
    assert list(next(iter(rows.values()))) == ["study_id", "status", "predicted_class", "p_no_lesion", "p_lesion"]
    # The training loader's view of the same studies (preprocessed with the same secret: same case ids).
    dl = read_datalist(tmp_path / "pre" / "datalist.json")
    items = dl.training + dl.validation
    rt = runtime.setup("cpu", False, 2)
    scores, _ = ClassificationTask(exp).scores(model.eval(), make_val_loader(items, exp.data, exp.task, rt.device), rt)
    assert set(rows) == {it["case_id"] for it in items} and len(rows) == 6
    for item, s in zip(items, scores):
        row = rows[item["case_id"]]
        probs = [float(row["p_no_lesion"]), float(row["p_lesion"])]
        assert probs == pytest.approx(list(s), abs=1e-5) and sum(probs) == pytest.approx(1.0, abs=1e-5)
        assert row["predicted_class"] == exp.task.class_names[int(np.argmax(probs))]
    truth = json.loads(synth.ground_truth_path.read_text())
    _assert_no_phi(
        tmp_path / "out", [captured.out, captured.err, caplog.text], _identifiers(truth, "site-1", synth.out_dir)
    )
