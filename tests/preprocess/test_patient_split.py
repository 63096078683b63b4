"""Preprocessing splits by patient: several studies of one patient never straddle training and evaluation."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pydicom
import pydicom.uid
import pytest

from fedimg import config as cfg
from fedimg.datalist import Datalist
from fedimg.preprocess.pipeline import preprocess
from tests.conftest import CT_SPEC, MR_SPEC, shared

pytestmark = pytest.mark.slow


def _regroup_patients(site: Path, n_patients: int) -> dict[str, str]:
    """Give the studies of a synthetic site to ``n_patients`` patients (rewrites (0010,0020) in a copy).

    Returns:
        study folder (relative to ``site``) -> patient.
    """
    studies = sorted(p.relative_to(site).as_posix() for p in site.glob("*/*") if p.is_dir())
    owner = {s: f"PAT{i % n_patients}" for i, s in enumerate(studies)}
    for study, patient in owner.items():
        for f in (site / study).rglob("*.dcm"):
            ds = pydicom.dcmread(f)
            ds.PatientID = patient
            ds.save_as(f)
    return owner


def _splits_by_patient(dst: Path, owner: dict[str, str]) -> dict[str, set[str]]:
    rows = [json.loads(line) for line in (dst / "manifest.jsonl").read_text().splitlines()]
    case_study = {r["case_id"]: "/".join(r["input"].split("/")[:2]) for r in rows if r.get("role") == "image"}
    dl = Datalist.read(dst / "datalist.json")
    sides: dict[str, set[str]] = {}
    for split in ("training", "validation", "test"):
        for item in dl.split_items(split):
            sides.setdefault(owner[case_study[item.case_id]], set()).add(split)
    return sides


@pytest.fixture(scope="module")
def multi_study_site(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    from fedimg.synth import generate

    res = generate(tmp_path_factory.mktemp("pts") / "raw", n_sites=1, n_cases=9, seed=21, progress=False)
    site = res.out_dir / next(iter(res.sites))
    return site, _regroup_patients(site, 4)


def _spec(**split: object) -> cfg.PreprocessSpec:
    spec = cfg.load(cfg.PreprocessSpec, CT_SPEC)
    return dataclasses.replace(spec, target_spacing=(6.0, 6.0, 6.0), split=dataclasses.replace(spec.split, **split))


def test_no_patient_straddles_training_and_evaluation(multi_study_site, tmp_path: Path) -> None:
    site, owner = multi_study_site
    res = preprocess(site, tmp_path / "dst", _spec(val_fraction=0.3, test_fraction=0.25), site="s", progress=False)
    assert res.patients == 4 and res.cases_without_patient_id == 0
    sides = _splits_by_patient(tmp_path / "dst", owner)
    assert len(sides) == 4 and all(len(s) == 1 for s in sides.values()), sides
    assert {next(iter(s)) for s in sides.values()} == {"training", "validation", "test"}
    summary = json.loads((tmp_path / "dst" / "summary.json").read_text())
    assert summary["patients"] == 4

    # A new study of a validation patient joins the validation side on the next run.
    val_patient = next(p for p, s in sides.items() if s == {"validation"})
    donor = next(s for s, p in owner.items() if p != val_patient and sides[p] == {"training"})
    grown = tmp_path / "grown"
    shutil.copytree(site, grown)
    new_study = grown / (donor.split("/")[0] + "_B") / donor.split("/")[1]
    shutil.copytree(site / donor, new_study)
    new_uid: dict[str, str] = {}
    for f in new_study.rglob("*.dcm"):  # a new study: new UIDs, consistent across its files
        ds = pydicom.dcmread(f)
        ds.PatientID = val_patient
        for attr in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
            if attr in ds:
                old = str(getattr(ds, attr))
                setattr(ds, attr, new_uid.setdefault(old, pydicom.uid.generate_uid()))
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(f)
    dst = tmp_path / "dst"  # the same DST: an incremental run
    again = preprocess(grown, dst, _spec(val_fraction=0.3, test_fraction=0.25), site="s", progress=False)
    owner2 = {**owner, new_study.relative_to(grown).as_posix(): val_patient}
    assert _splits_by_patient(dst, owner2) == {**sides, val_patient: {"validation"}}
    assert len(again.cases) == 10 and again.cases_reused == 9


def test_folds_hold_whole_patients_and_data_fold_picks_one(multi_study_site, tmp_path: Path) -> None:
    from fedimg.data.datasets import read_datalist

    site, owner = multi_study_site
    preprocess(site, tmp_path / "dst", _spec(folds=3), site="s", progress=False)
    dl = Datalist.read(tmp_path / "dst" / "datalist.json")
    assert dl.folds == 3 and not dl.test
    rows = [json.loads(line) for line in (tmp_path / "dst" / "manifest.jsonl").read_text().splitlines()]
    study_of = {r["case_id"]: "/".join(r["input"].split("/")[:2]) for r in rows if r.get("role") == "image"}
    folds_of: dict[str, set[int]] = {}
    for item in dl.training + dl.validation:
        folds_of.setdefault(owner[study_of[item.case_id]], set()).add(item.fold)
    assert all(len(f) == 1 for f in folds_of.values())
    assert {i.fold for i in dl.validation} == {0}  # fold 0 is the datalist's own validation split
    for k in range(3):
        data = read_datalist(tmp_path / "dst" / "datalist.json", fold=k)
        assert {i["case_id"] for i in data.validation} == {
            i.case_id for i in dl.training + dl.validation if i.fold == k
        }
        assert not {i["case_id"] for i in data.validation} & {i["case_id"] for i in data.training}


def test_tcia_patient_with_two_studies_stays_on_one_side(tmp_path: Path) -> None:
    src = shared("dicom/tcia_brain_tumor_progression")
    spec = cfg.load(cfg.PreprocessSpec, MR_SPEC)
    for seed in range(4):  # whatever the draw, PGBM-001's two studies go together
        dst = tmp_path / f"out{seed}"
        res = preprocess(
            src,
            dst,
            dataclasses.replace(spec, split=dataclasses.replace(spec.split, seed=seed)),
            site="tcia",
            progress=False,
        )
        assert len(res.cases) == 3 and res.patients == 2
        rows = [json.loads(line) for line in (dst / "manifest.jsonl").read_text().splitlines()]
        patient_of = {r["case_id"]: r["input"].split("/")[0] for r in rows if r.get("role") == "image"}
        sides = {p: {c.split for c in res.cases if patient_of[c.case_id] == p} for p in set(patient_of.values())}
        assert sides["PGBM-001"] in ({"training"}, {"validation"}) and len(sides["PGBM-008"]) == 1
        assert sides["PGBM-001"] != sides["PGBM-008"]
