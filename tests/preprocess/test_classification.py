"""Classification labels from a site's CSV: end to end on synthetic CT, refusals, usage errors, no leaks."""

from __future__ import annotations

import csv
import dataclasses
import gzip
import json
import shutil
from pathlib import Path

import pytest

from fedimg import config as cfg
from fedimg.cli import main
from fedimg.dicom.deid import Pseudonymizer, SiteSecret
from fedimg.preprocess.labels_csv import LabelsCsvError, class_index, read_labels_csv
from fedimg.preprocess.pipeline import PreprocessInputError, case_id_for, preprocess
from tests.conftest import REPO

CT_CLS = REPO / "configs" / "preprocessing" / "ct_lesion_cls.yaml"


@pytest.fixture(scope="module")
def cls_spec() -> cfg.PreprocessSpec:
    """The 3D classification spec at 6 mm (tiny volumes: the labels are what is tested)."""
    return dataclasses.replace(cfg.load(cfg.PreprocessSpec, CT_CLS), target_spacing=(6.0, 6.0, 6.0))


def _truth(small_synth, site: str) -> list[dict]:
    return json.loads(small_synth.ground_truth_path.read_text())["sites"][site]["cases"]


def _manifest(dst: Path) -> list[dict]:
    return [json.loads(line) for line in (dst / "manifest.jsonl").read_text().splitlines()]


def _write_csv(path: Path, rows: list[list[str]], header=("AccessionNumber", "StudyInstanceUID", "label")) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def _scan(root: Path, needles: set[str]) -> list[str]:
    """Every needle found in a file name or file (gzip members decompressed) under ``root``."""
    hits = []
    for p in root.rglob("*"):
        rel = p.relative_to(root).as_posix()
        hits += [f"name {rel}" for n in needles if n in rel]
        if p.is_file():
            data = p.read_bytes()
            blobs = [data, gzip.decompress(data)] if data[:2] == b"\x1f\x8b" else [data]
            hits += [f"{rel}: {n}" for n in needles for b in blobs if n.encode() in b]
    return hits


def test_labels_follow_the_pseudonymized_cases_and_nothing_leaks(small_synth, cls_spec, tmp_path):
    """Every case's datalist label is the ground-truth lesion flag; no accession number or UID reaches DST."""
    site = "site-2"  # DICOM mask labels: the mask series must be skipped, not taken as a second image
    src = small_synth.out_dir / site
    secret = SiteSecret.generate(tmp_path / "site.secret")
    p = Pseudonymizer(secret)
    dst = tmp_path / "out"
    res = preprocess(src, dst, cls_spec, site=site, progress=False, pseudonymizer=p, labels_csv=src / "labels.csv")
    truth = _truth(small_synth, site)
    assert len(res.cases) == len(truth) and res.cases_converted == len(truth)
    expected = {p.case(c["study_instance_uid"], c["series_instance_uid"]): int(c["has_lesion"]) for c in truth}
    dl = json.loads((dst / "datalist.json").read_text())
    assert (dl["task"], dl["spatial_dims"], dl["labels"]) == ("classification", 3, {"0": "no_lesion", "1": "lesion"})
    items = dl["training"] + dl["validation"]
    assert {it["case_id"]: it["label"] for it in items} == expected
    assert all(isinstance(it["label"], int) and (dst / it["image"]).is_file() for it in items)
    assert not (dst / "labels").exists()  # classification writes no label volumes
    rows = _manifest(dst)
    assert len(rows) == res.src_files == sum(1 for f in src.rglob("*") if f.is_file())
    reasons = {(r["status"], r["reason"]) for r in rows}
    assert reasons == {("converted", ""), ("skipped", "LABEL_NOT_USED"), ("skipped", "LABEL_SHEET")}
    summary = json.loads((dst / "summary.json").read_text())
    assert summary["labels_csv"]["rows_matched"] == len(truth) and summary["labels_csv"]["rows_unmatched"] == 0
    assert summary["task"] == "classification" and summary["cases_reused"] == 0
    needles = (
        {c["identifiers"]["accession_number"] for c in truth}
        | {c["study_instance_uid"] for c in truth}
        | {c["series_instance_uid"] for c in truth}
        | {c["identifiers"]["patient_id"] for c in truth}
        | {c["identifiers"]["last_name"] for c in truth}
    )
    assert not _scan(dst, needles)
    # Positive control: the raw export (folders and the label sheet) does hold them.
    assert _scan(src, {truth[0]["identifiers"]["accession_number"], truth[0]["study_instance_uid"]})


def test_missing_row_and_bad_value_are_refused_without_quoting_the_key(small_synth, cls_spec, tmp_path):
    site = "site-1"
    src = small_synth.out_dir / site
    truth = _truth(small_synth, site)
    assert len(truth) == 3
    acc = [c["identifiers"]["accession_number"] for c in truth]
    sheet = _write_csv(
        tmp_path / "labels.csv",
        [
            [f"  {acc[0]} ", "", "lesion" if truth[0]["has_lesion"] else "0"],  # whitespace stripped; index accepted
            [acc[1], "", "maybe"],  # not a class
            ["A000000000", "", "lesion"],  # no such study: counted, never named
            ["", "", "lesion"],  # no key
        ],
    )  # acc[2]: no row at all
    res = preprocess(src, tmp_path / "out", cls_spec, site=site, progress=False, labels_csv=sheet)
    assert len(res.cases) == 1 and res.cases[0].label == int(truth[0]["has_lesion"])
    assert res.cases[0].case_id == case_id_for(truth[0]["study_instance_uid"], truth[0]["series_instance_uid"])
    rows = _manifest(tmp_path / "out")  # --no-deid style run: inputs are relative paths

    def image_rows(case):
        folder = case["image_series_dir"].split("/", 1)[1] + "/"
        return [r for r in rows if r["input"].startswith(folder)]

    bad, missing = image_rows(truth[1]), image_rows(truth[2])
    assert bad and {(r["status"], r["reason"]) for r in bad} == {("refused", "LABEL_VALUES_UNEXPECTED")}
    assert "no_lesion, lesion" in bad[0]["detail"] and "maybe" not in bad[0]["detail"]
    assert missing and {(r["status"], r["reason"]) for r in missing} == {("refused", "NO_LABEL")}
    assert "(0008,0050) Accession Number" in missing[0]["detail"]
    for r in bad + missing:
        assert not any(a in r["detail"] for a in acc)
    assert res.labels_csv == {
        "key": "(0008,0050) Accession Number",
        "key_column": "AccessionNumber",
        "label_column": "label",
        "rows": 4,
        "rows_matched": 2,
        "rows_unmatched": 1,
        "rows_without_key": 1,
    }
    assert "A000000000" not in (tmp_path / "out" / "summary.json").read_text()
    assert "1 matched none" in res.table()


def test_study_uid_key_and_custom_columns(small_synth, cls_spec, tmp_path):
    site = "site-1"
    truth = _truth(small_synth, site)
    spec = dataclasses.replace(
        cls_spec,
        labels=dataclasses.replace(
            cls_spec.labels, csv_key="study_uid", csv_key_column=None, csv_label_column="Diagnosis"
        ),
    )
    sheet = tmp_path / "uid.csv"
    # Excel writes a byte-order mark; the key column is the default for study_uid.
    sheet.write_text(
        "StudyInstanceUID,Diagnosis\n" + "".join(f"{c['study_instance_uid']},{int(c['has_lesion'])}\n" for c in truth),
        encoding="utf-8-sig",
    )
    res = preprocess(small_synth.out_dir / site, tmp_path / "out", spec, site=site, progress=False, labels_csv=sheet)
    got = {c.case_id: c.label for c in res.cases}
    assert got == {case_id_for(c["study_instance_uid"], c["series_instance_uid"]): int(c["has_lesion"]) for c in truth}


def test_labels_csv_reader_errors_name_columns_not_values(tmp_path):
    labels = cfg.LabelSpec(classes=["no_lesion", "lesion"])
    with pytest.raises(LabelsCsvError, match="does not exist.*'AccessionNumber'.*'label'"):
        read_labels_csv(tmp_path / "nope.csv", labels)
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(LabelsCsvError, match="is empty"):
        read_labels_csv(tmp_path / "empty.csv", labels)
    _write_csv(tmp_path / "cols.csv", [["A123", "x"]], header=("Accession", "Class"))
    with pytest.raises(
        LabelsCsvError,
        match=r"lacks the column\(s\) 'AccessionNumber' and 'label'.*found "
        r"columns: 'Accession', 'Class'",
    ):
        read_labels_csv(tmp_path / "cols.csv", labels)
    (tmp_path / "semi.csv").write_text("AccessionNumber;label\nA1;lesion\n")
    with pytest.raises(LabelsCsvError, match="another separator"):
        read_labels_csv(tmp_path / "semi.csv", labels)
    _write_csv(tmp_path / "dup.csv", [["A9", "", "lesion"], ["A9", "", "no_lesion"]])
    with pytest.raises(LabelsCsvError, match="two different classes \\(lines 2 and 3\\)") as err:
        read_labels_csv(tmp_path / "dup.csv", labels)
    assert "A9" not in str(err.value)
    (tmp_path / "latin.csv").write_bytes(b"AccessionNumber,label\nA1,l\xe9sion\n")
    with pytest.raises(LabelsCsvError, match="UnicodeDecodeError"):
        read_labels_csv(tmp_path / "latin.csv", labels)
    assert [class_index(v, labels.classes) for v in ("lesion", " LESION ", "0", "1", "2", "", "x")] == [
        1,
        1,
        0,
        1,
        None,
        None,
        None,
    ]


def test_usage_errors_exit_2_before_any_work(small_synth, tmp_path, capsys):
    src = str(small_synth.out_dir / "site-1")

    def run(*extra: str) -> str:
        rc = main(["preprocess", src, str(tmp_path / "out"), "--site", "s", "--quiet", "--no-deid", *extra])
        assert rc == 2
        lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("fedimg preprocess: error")]
        assert len(lines) == 1
        return lines[0]

    assert "expected --labels-csv FILE" in run("--spec", str(CT_CLS))
    assert "drop --labels-csv" in run(
        "--spec", str(REPO / "configs/preprocessing/ct_phantom.yaml"), "--labels-csv", f"{src}/labels.csv"
    )
    assert "does not exist" in run("--spec", str(CT_CLS), "--labels-csv", str(tmp_path / "missing.csv"))
    _write_csv(tmp_path / "cols.csv", [["x", "y"]], header=("acc", "class"))
    line = run("--spec", str(CT_CLS), "--labels-csv", str(tmp_path / "cols.csv"))
    assert "'AccessionNumber'" in line and "found columns: 'acc', 'class'" in line
    assert not (tmp_path / "out").exists()
    # The library call says the same.
    spec = cfg.load(cfg.PreprocessSpec, CT_CLS)
    with pytest.raises(PreprocessInputError, match="classification spec"):
        preprocess(src, tmp_path / "out", spec, site="s", progress=False)


def test_classification_spec_validation(tmp_path):
    base = {
        "name": "c",
        "modality": "CT",
        "target_spacing": [3, 3, 3],
        "task": "classification",
        "labels": {"classes": ["no_lesion", "lesion"]},
    }
    spec = cfg.from_dict(cfg.PreprocessSpec, base)
    assert spec.labels.key_column == "AccessionNumber" and spec.labels.key_tag.startswith("(0008,0050)")
    for bad, message in (
        ({"labels": {"classes": ["only"]}}, "at least 2 classes"),
        ({"labels": {"classes": ["a", "b"], "values": {"a": 3}}}, "remove labels.values"),
        ({"labels": {"classes": ["a", "b"], "csv_key": "patient"}}, "labels.csv_key: expected one of"),
        ({"spatial_dims": 2}, "missing required key target_size"),
        ({"spatial_dims": 2, "target_size": [64, 64]}, "target_spacing is for 3D specs"),
        ({"modality": "DX"}, "modality must be CT or MR for a 3D spec"),
    ):
        with pytest.raises(cfg.ConfigError, match=message):
            cfg.from_dict(cfg.PreprocessSpec, {**base, **bad})
    with pytest.raises(cfg.ConfigError, match="supports task: classification only"):
        cfg.from_dict(cfg.PreprocessSpec, {"name": "s", "modality": "DX", "spatial_dims": 2, "target_size": [8, 8]})
    # Saved specs load back (DST/spec.yaml is compared on re-runs).
    for name in ("ct_lesion_cls", "dx_chest_cls", "ct_phantom", "mr_brain_tcia"):
        loaded = cfg.load(cfg.PreprocessSpec, REPO / "configs" / "preprocessing" / f"{name}.yaml")
        cfg.save(loaded, tmp_path / f"{name}.yaml")
        assert cfg.load(cfg.PreprocessSpec, tmp_path / f"{name}.yaml") == loaded


def test_label_sheet_inside_the_export_gets_one_skipped_row(small_synth, cls_spec, tmp_path):
    """The CSV named by --labels-csv, and any other CSV in the export, are accounted for, never refused."""
    src = tmp_path / "export"
    shutil.copytree(small_synth.out_dir / "site-1", src)
    shutil.copy(src / "labels.csv", src / "old_sheet.csv")
    preprocess(src, tmp_path / "out", cls_spec, site="s", progress=False, labels_csv=src / "labels.csv")
    rows = {r["input"]: r for r in _manifest(tmp_path / "out")}
    assert rows["labels.csv"]["reason"] == rows["old_sheet.csv"]["reason"] == "LABEL_SHEET"
    assert "--labels-csv" in rows["labels.csv"]["detail"] and rows["labels.csv"]["status"] == "skipped"
