"""Incremental preprocessing: unchanged cases reused, splits never move, DST mirrors the current source."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from fedimg import config as cfg
from fedimg.dicom.deid import Pseudonymizer, SiteSecret
from fedimg.preprocess.pipeline import preprocess
from fedimg.preprocess.splits import CaseKey, assign
from fedimg.preprocess.state import STATE_FILE, IncompatibleOutputError
from fedimg.synth import generate
from tests.conftest import REPO

DX_SPEC = REPO / "configs" / "preprocessing" / "dx_chest_cls.yaml"


def _manifest(dst: Path) -> list[dict]:
    return [json.loads(line) for line in (dst / "manifest.jsonl").read_text().splitlines()]


def _datalist(dst: Path) -> dict[str, dict]:
    dl = json.loads((dst / "datalist.json").read_text())
    return {it["case_id"]: {**it, "split": split} for split in ("training", "validation") for it in dl[split]}


def _stamp(dst: Path, items: dict[str, dict]) -> dict[str, tuple[int, int]]:
    out = {}
    for cid, it in items.items():
        st = (dst / it["image"]).stat()
        out[cid] = (st.st_ino, st.st_mtime_ns)
    return out


def _n_files(root: Path) -> int:
    return sum(1 for p in root.rglob("*") if p.is_file())


def _study_dirs(site: Path) -> set[str]:
    return {p.relative_to(site).as_posix() for p in site.glob("*/*") if p.is_dir()}


@pytest.fixture(scope="module")
def dx_export(tmp_path_factory):
    """The same DX site exported twice: with 4 studies, and later with 10 (the first 4 byte-identical)."""
    base = tmp_path_factory.mktemp("inc")
    small = generate(base / "small", n_sites=1, n_cases=4, seed=3, progress=False, modality="DX")
    big = generate(base / "big", n_sites=1, n_cases=10, seed=3, progress=False, modality="DX")
    return small.out_dir / "site-1", big.out_dir / "site-1", big


def test_new_studies_convert_alone_and_old_splits_stay(dx_export, tmp_path):
    small, big, truth = dx_export
    spec = cfg.load(cfg.PreprocessSpec, DX_SPEC)
    p = Pseudonymizer(SiteSecret.generate(tmp_path / "site.secret"))
    src, dst = tmp_path / "export", tmp_path / "out"
    shutil.copytree(small, src)

    first = preprocess(src, dst, spec, site="site-1", progress=False, pseudonymizer=p, labels_csv=src / "labels.csv")
    assert (first.cases_converted, first.cases_reused) == (4, 0)
    before = _datalist(dst)
    stamps = _stamp(dst, before)
    assert (dst / STATE_FILE).is_file()

    # The site adds six studies and a new label sheet, in which one old study's class was corrected.
    for rel in sorted(_study_dirs(big) - _study_dirs(src)):
        shutil.copytree(big / rel, src / rel)
    rows = list(csv.DictReader((big / "labels.csv").open()))
    flipped_acc = rows[0]["AccessionNumber"]
    rows[0]["label"] = "lesion" if rows[0]["label"] == "no_lesion" else "no_lesion"
    sheet = tmp_path / "labels_v2.csv"
    with sheet.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)

    second = preprocess(src, dst, spec, site="site-1", progress=False, pseudonymizer=p, labels_csv=sheet)
    assert (second.cases_converted, second.cases_reused, second.cases_removed) == (6, 4, 0)
    after = _datalist(dst)
    assert set(before) < set(after) and len(after) == 10
    assert {c: after[c]["split"] for c in before} == {c: v["split"] for c, v in before.items()}  # nothing moved
    assert _stamp(dst, before) == stamps  # reused outputs were not rewritten
    # The validation share is restored over all cases (1 of the first 4; now 2 of 10).
    assert sum(v["split"] == "validation" for v in before.values()) == 1
    assert sum(v["split"] == "validation" for v in after.values()) == max(1, round(10 * spec.split.val_fraction))
    # Labels come from the current CSV, also for reused cases.
    cases = truth.sites["site-1"]
    flipped = next(c for c in cases if c.identifiers["accession_number"] == flipped_acc)
    expected = {p.case(c.study_instance_uid, c.series_instance_uid): int(c.has_lesion) for c in cases}
    expected[p.case(flipped.study_instance_uid, flipped.series_instance_uid)] ^= 1
    assert {c: v["label"] for c, v in after.items()} == expected
    assert len(_manifest(dst)) == _n_files(src) == second.src_files
    summary = json.loads((dst / "summary.json").read_text())
    assert (summary["cases_reused"], summary["cases_converted"]) == (4, 6)
    assert "6 converted, 4 reused unchanged" in second.table()

    # A changed study is converted again; it keeps its split.
    changed = next(c for c in cases if p.case(c.study_instance_uid, c.series_instance_uid) in before)
    changed_id = p.case(changed.study_instance_uid, changed.series_instance_uid)
    f = next((truth.out_dir / changed.image_series_dir).iterdir()).relative_to(big)
    ds = pydicom.dcmread(src / f)
    ds.PixelData = np.ascontiguousarray(ds.pixel_array[::-1]).astype("<u2").tobytes()  # re-exported upside down
    ds.save_as(src / f, enforce_file_format=True)
    old_image = (dst / after[changed_id]["image"]).read_bytes()
    third = preprocess(src, dst, spec, site="site-1", progress=False, pseudonymizer=p, labels_csv=sheet)
    assert (third.cases_converted, third.cases_reused) == (1, 9)
    again = _datalist(dst)
    assert {c: v["split"] for c, v in again.items()} == {c: v["split"] for c, v in after.items()}
    assert (dst / again[changed_id]["image"]).read_bytes() != old_image
    assert {c: s for c, s in _stamp(dst, again).items() if c != changed_id} == {
        c: s for c, s in _stamp(dst, after).items() if c != changed_id
    }

    # A study that disappears leaves the datalist and DST; when it comes back, it gets its old split back.
    gone = next(c for c, v in again.items() if v["split"] == "validation")
    gone_case = next(c for c in cases if p.case(c.study_instance_uid, c.series_instance_uid) == gone)
    shutil.move(src / gone_case.study_dir.split("/", 1)[1], tmp_path / "parked")
    fourth = preprocess(src, dst, spec, site="site-1", progress=False, pseudonymizer=p, labels_csv=sheet)
    assert fourth.cases_removed == 1 and gone not in _datalist(dst)
    assert not (dst / again[gone]["image"]).exists()
    assert len(_manifest(dst)) == _n_files(src)
    assert {f.name for f in (dst / "images").iterdir()} == {f"{c}.nii.gz" for c in _datalist(dst)}
    shutil.move(tmp_path / "parked", src / gone_case.study_dir.split("/", 1)[1])
    fifth = preprocess(src, dst, spec, site="site-1", progress=False, pseudonymizer=p, labels_csv=sheet)
    assert _datalist(dst)[gone]["split"] == "validation" and fifth.cases_converted == 1


def test_other_spec_or_secret_is_refused_not_mixed(dx_export, tmp_path):
    small, _, _ = dx_export
    spec = cfg.load(cfg.PreprocessSpec, DX_SPEC)
    p = Pseudonymizer(SiteSecret.generate(tmp_path / "a.secret"))
    dst = tmp_path / "out"
    preprocess(small, dst, spec, site="s", progress=False, pseudonymizer=p, labels_csv=small / "labels.csv")
    before = {f.name: f.stat().st_mtime_ns for f in dst.rglob("*") if f.is_file()}
    other_spec = dataclasses.replace(spec, target_size=(64, 64))
    with pytest.raises(IncompatibleOutputError, match="another preprocessing spec.*target_size.*new DST"):
        preprocess(small, dst, other_spec, site="s", progress=False, pseudonymizer=p, labels_csv=small / "labels.csv")
    other = Pseudonymizer(SiteSecret.generate(tmp_path / "b.secret"))
    with pytest.raises(IncompatibleOutputError, match="another site secret"):
        preprocess(small, dst, spec, site="s", progress=False, pseudonymizer=other, labels_csv=small / "labels.csv")
    with pytest.raises(IncompatibleOutputError, match="with/without --no-deid"):
        preprocess(small, dst, spec, site="s", progress=False, labels_csv=small / "labels.csv")
    assert {f.name: f.stat().st_mtime_ns for f in dst.rglob("*") if f.is_file()} == before  # nothing touched
    state = (dst / STATE_FILE).read_text()
    assert all(
        c["identifiers"]["accession_number"] not in state
        for c in json.loads((small.parent / "ground_truth.json").read_text())["sites"]["site-1"]["cases"]
    )


def test_segmentation_rerun_reuses_and_a_changed_label_reconverts(small_synth, ct_spec, tmp_path):
    spec = dataclasses.replace(ct_spec, target_spacing=(6.0, 6.0, 6.0))
    src = tmp_path / "export"
    shutil.copytree(small_synth.out_dir / "site-2", src)  # DICOM mask labels
    dst = tmp_path / "out"
    first = preprocess(src, dst, spec, site="s", progress=False)
    items, first_manifest = _datalist(dst), _manifest(dst)
    label_stamp = {c: (dst / v["label"]).stat().st_mtime_ns for c, v in items.items()}
    second = preprocess(src, dst, spec, site="s", progress=False)
    assert (second.cases_reused, second.cases_converted) == (len(first.cases), 0)
    assert _manifest(dst) == first_manifest and len(first_manifest) == _n_files(src)  # same account
    assert [(c.case_id, c.split, c.label_counts) for c in second.cases] == [
        (c.case_id, c.split, c.label_counts) for c in first.cases
    ]
    # The label of one study is re-exported (new modification time): that case alone is converted again.
    mask_file = sorted(d for d in src.rglob("*") if d.is_dir() and "Mask" in d.name)[0] / "IM0001"
    st = mask_file.stat()
    os.utime(mask_file, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    third = preprocess(src, dst, spec, site="s", progress=False)
    assert (third.cases_reused, third.cases_converted) == (len(first.cases) - 1, 1)
    changed = [c for c, v in items.items() if (dst / v["label"]).stat().st_mtime_ns != label_stamp[c]]
    assert len(changed) == 1


def test_assign_splits_never_moves_a_case_and_keeps_the_share():
    splits: dict[str, str] = {}
    history: dict[str, str] = {}
    patients: dict[str, str] = {}
    for batch in range(8):  # 8 deliveries of 5 studies, one patient each
        keys = {f"case-{i:03d}": CaseKey(patient=f"p{i}", order=f"key-{i}") for i in range(5 * (batch + 1))}
        a = assign(keys, val_fraction=0.2, seed=0, previous_cases=history, previous_patients=patients)
        splits = a.splits
        assert all(splits[c] == s for c, s in history.items())
        history, patients = dict(splits), dict(a.patient_splits)
        assert sum(s == "validation" for s in splits.values()) == max(1, round(len(keys) * 0.2))
    # A fresh split of the same cases is the plain seeded split, whatever the case ids.
    fresh = assign({f"x{i}": CaseKey(patient=f"p{i}", order=f"key-{i}") for i in range(40)}, 0.2, 0).splits
    assert sum(s == "validation" for s in fresh.values()) == 8
    assert assign({"a": CaseKey("p", "k")}, 0.2, 0).splits == {"a": "training"}
