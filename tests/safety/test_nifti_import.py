"""``fedimg preprocess --from-nifti`` (issue 16): a public NIfTI segmentation data set as a site's input.

Built from real data (TotalSegmentator's CT and its segmentation, cut into
Decathlon-style cases, :mod:`tests.safety.nifti_data`) and small synthetic
volumes for the layouts. Checked on the outputs: each case is the spec's
chain applied to its pair (voxel for voxel on the source's own grid), every
input file has exactly one manifest row, case ids are keyed pseudonyms and
no input name is written under de-identification, re-runs reuse cases and
keep the split, patients group by the documented rules, and a data set that
disagrees with the spec is refused before anything is written.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fedimg import config as cfg
from fedimg.cli import main
from fedimg.dicom.deid import Pseudonymizer, SiteSecret
from fedimg.preprocess.nifti_source import read_dataset
from fedimg.preprocess.pipeline import PreprocessInputError, preprocess
from tests.safety.nifti_data import CLASSES, crop, make_decathlon, rows, spec, write_dataset

OFFSETS = (0, 21, 42)


def _decathlon(tmp_path: Path, **kw) -> tuple[Path, dict]:
    src = tmp_path / "Task99_TSeg"
    return src, make_decathlon(src, OFFSETS, **kw)


def _small(path: Path, shape=(8, 8, 6), value=None, affine=None, dtype=np.int16) -> np.ndarray:
    """A small synthetic volume (label values when ``value`` is given)."""
    rng = np.random.default_rng(len(str(path)))
    if value is None:
        data = rng.integers(-100, 200, size=shape).astype(dtype)
    else:
        data = np.zeros(shape, dtype=np.uint8)
        data[2:5, 2:5, 1:4] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]) if affine is None else affine), str(path))
    return data


def _layout_spec() -> cfg.PreprocessSpec:
    return cfg.from_dict(
        cfg.PreprocessSpec,
        {"name": "small", "modality": "CT", "target_spacing": [2.0, 2.0, 2.0], "labels": {"classes": ["blob"]}},
    )


def test_decathlon_cases_are_the_spec_chain_of_their_pairs_and_every_file_has_one_row(tmp_path):
    src, dataset = _decathlon(tmp_path)
    # What real downloads hold besides the pairs: a readme, macOS metadata, an unlisted NIfTI, a test image,
    # and a training item whose label file is missing.
    (src / "README.md").write_text("TotalSegmentator crops\n")
    (src / "imagesTr" / "._tseg_000.nii.gz").write_bytes(b"\x00\x05\x16\x07")
    _small(src / "imagesTr" / "unlisted.nii.gz")
    _small(src / "imagesTs" / "tseg_900.nii.gz")
    image, _, affine = crop(30)
    nib.save(nib.Nifti1Image(image, affine), str(src / "imagesTr" / "tseg_nolabel.nii.gz"))
    dataset["training"].append({"image": "imagesTr/tseg_nolabel.nii.gz", "label": "labelsTr/tseg_nolabel.nii.gz"})
    dataset["test"] = ["./imagesTs/tseg_900.nii.gz"]
    write_dataset(src, dataset)

    res = preprocess(src, tmp_path / "out", spec(), site="site-1", progress=False, workers=1, from_nifti=True)
    by_input = rows(tmp_path / "out")
    files = sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file())
    assert sorted(by_input) == files and res.src_files == len(files)  # every input file: exactly one row
    fate = {k: (r["status"], r["reason"]) for k, r in by_input.items()}
    assert fate["dataset.json"] == ("skipped", "DATASET_DESCRIPTION")
    assert fate["README.md"] == ("skipped", "NOT_IN_DATASET")
    assert fate["imagesTr/._tseg_000.nii.gz"] == ("skipped", "NOT_IN_DATASET")
    assert fate["imagesTr/unlisted.nii.gz"] == ("skipped", "NOT_IN_DATASET")
    assert fate["imagesTs/tseg_900.nii.gz"] == ("skipped", "DATASET_TEST_IMAGE")
    assert fate["imagesTr/tseg_nolabel.nii.gz"] == ("refused", "NO_LABEL")
    assert "training[3].label" in by_input["imagesTr/tseg_nolabel.nii.gz"]["detail"]
    assert res.counts == {"converted": 6, "refused": 1, "skipped": 5}
    assert res.source == "nifti" and len(res.cases) == 3 and res.patients == 3

    for i, x0 in enumerate(OFFSETS):
        image_row, label_row = by_input[f"imagesTr/tseg_{i:03d}.nii.gz"], by_input[f"labelsTr/tseg_{i:03d}.nii.gz"]
        assert image_row["status"] == label_row["status"] == "converted"
        assert image_row["case_id"] == label_row["case_id"] and label_row["role"] == "label"
        src_image, src_label, src_affine = crop(x0)
        out_image = nib.load(str(tmp_path / "out" / image_row["output"]))
        out_label = np.asarray(nib.load(str(tmp_path / "out" / label_row["output"])).dataobj)
        # 3 mm RAS source, 3 mm RAS spec: the output grid is the source grid, voxel for voxel.
        assert np.allclose(out_image.affine, src_affine, atol=1e-4) and out_label.shape == src_label.shape
        for idx, value in enumerate(CLASSES.values(), start=1):
            assert np.array_equal(out_label == idx, src_label == value)
        assert set(np.unique(out_label).tolist()) <= {0, 1, 2}
        others = int(np.isin(src_label, [0, *CLASSES.values()], invert=True).sum())
        assert label_row["others_to_background"] == others > 0
        window = np.clip((src_image.astype(np.float64) + 160.0) / 400.0, 0.0, 1.0)  # the spec's CT window
        np.testing.assert_allclose(out_image.get_fdata(), window, atol=1e-5)
    datalist = json.loads((tmp_path / "out" / "datalist.json").read_text())
    assert datalist["labels"] == {"0": "background", "1": "spleen", "2": "liver"}
    assert len(datalist["training"]) + len(datalist["validation"]) == 3 and datalist["validation"]


def test_case_ids_are_keyed_and_no_input_name_is_written_under_deid(tmp_path):
    src, _ = _decathlon(tmp_path)
    pseudonymizer = Pseudonymizer(SiteSecret.generate(tmp_path / "site.secret"))
    res = preprocess(
        src, tmp_path / "out", spec(6.0), site="site-1", progress=False, workers=1, from_nifti=True,
        pseudonymizer=pseudonymizer, crosswalk=tmp_path / "crosswalk.jsonl",
    )  # fmt: skip
    expected = {pseudonymizer.case("nifti", f"imagesTr/tseg_{i:03d}.nii.gz") for i in range(len(OFFSETS))}
    assert {c.case_id for c in res.cases} == expected
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file() and not path.name.endswith(".nii.gz"):
            text = path.read_text(encoding="utf-8")
            assert "tseg" not in text and "imagesTr" not in text and "Task99" not in text, path.name
    manifest = rows(tmp_path / "out")
    assert set(manifest) == {pseudonymizer.path_hash(p) for p in ["dataset.json"] + [
        f"{d}/tseg_{i:03d}.nii.gz" for d in ("imagesTr", "labelsTr") for i in range(len(OFFSETS))
    ]}  # fmt: skip
    crosswalk = [json.loads(x) for x in (tmp_path / "crosswalk.jsonl").read_text().splitlines()]
    assert {c["input"] for c in crosswalk} >= {"dataset.json", "imagesTr/tseg_000.nii.gz"}
    # Without a secret: unkeyed ids, the same for everyone, different from the keyed ones.
    plain = preprocess(src, tmp_path / "plain", spec(6.0), site="site-1", progress=False, workers=1, from_nifti=True)
    assert {c.case_id for c in plain.cases}.isdisjoint(expected)


def test_rerun_reuses_unchanged_cases_keeps_the_split_and_converts_the_changed_one(tmp_path):
    src, _ = _decathlon(tmp_path)
    first = preprocess(src, tmp_path / "out", spec(6.0), site="site-1", progress=False, workers=1, from_nifti=True)
    splits = {c.case_id: c.split for c in first.cases}
    again = preprocess(src, tmp_path / "out", spec(6.0), site="site-1", progress=False, workers=1, from_nifti=True)
    assert again.cases_reused == 3 and again.cases_converted == 0
    assert {c.case_id: c.split for c in again.cases} == splits
    assert [c.others_to_background for c in again.cases] == [c.others_to_background for c in first.cases]
    label = src / "labelsTr" / "tseg_001.nii.gz"
    img = nib.load(str(label))
    data = np.asarray(img.dataobj).copy()
    data[data == 5] = 0  # the liver removed from one case
    nib.save(nib.Nifti1Image(data, img.affine), str(label))
    third = preprocess(src, tmp_path / "out", spec(6.0), site="site-1", progress=False, workers=1, from_nifti=True)
    assert third.cases_reused == 2 and third.cases_converted == 1
    changed = next(c for c in third.cases if not c.reused)
    assert changed.label_counts["liver"] == 0 and {c.case_id: c.split for c in third.cases} == splits


def test_labels_others_refuse_names_the_count_for_nifti_cases(tmp_path):
    src, _ = _decathlon(tmp_path)
    res = preprocess(
        src, tmp_path / "out", spec(6.0, others="refuse"), site="site-1", progress=False, workers=1, from_nifti=True
    )
    assert res.cases == []
    refused = [r for r in rows(tmp_path / "out").values() if r["status"] == "refused"]
    assert len(refused) == 6 and {r["reason"] for r in refused} == {"LABEL_VALUES_UNEXPECTED"}
    assert all(
        "unexpected values, e.g. 2, 3, 4, 6, 7 and" in r["detail"] and "more outside" in r["detail"] for r in refused
    )


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ({"0": "background", "1": "spleen", "5": "stomach"}, "spec class 'liver' has label value 5, which dataset"),
        ({"0": "background", "1": "spleen"}, "spec class 'liver' has label value 5, but dataset.json lists no value 5"),
        ({"background": 0, "Spleen": 1, "liver": 5}, None),  # nnU-Net v2 name -> value; names compared without case
    ],
)
def test_dataset_labels_must_name_the_spec_classes_at_their_values(tmp_path, labels, message):
    src, _ = _decathlon(tmp_path, labels=labels)
    dst = tmp_path / "out"
    if message is None:
        assert len(read_dataset(src, spec()).cases) == 3
        return
    with pytest.raises(PreprocessInputError, match=message):
        preprocess(src, dst, spec(), site="site-1", progress=False, from_nifti=True)
    assert not dst.exists()  # refused before anything was written


def test_a_dataset_that_disagrees_with_the_spec_or_leaves_src_is_refused_in_one_line(tmp_path, capsys):
    src, dataset = _decathlon(tmp_path)
    mr = dataclasses.replace(spec(), modality="MR", series=cfg.SeriesSelection(image_modality="MR"))
    with pytest.raises(PreprocessInputError, match=r"dataset.json gives the modality CT, but spec .* normalizes MR"):
        read_dataset(src, mr)
    dataset["training"][1]["image"] = "../../secret_patient_name.nii.gz"
    write_dataset(src, dataset)
    spec_file = tmp_path / "spec.yaml"
    cfg.save(spec(), spec_file)
    argv = ["preprocess", "--from-nifti", str(src), str(tmp_path / "o"), "--spec", str(spec_file), "--site", "s-1"]
    assert main([*argv, "--no-deid", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "training[1].image: expected a path inside SRC" in err and "secret_patient_name" not in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "o").exists()
    dataset["training"][1]["image"] = dataset["training"][0]["image"]
    write_dataset(src, dataset)
    with pytest.raises(PreprocessInputError, match=r"training\[1\].image names the file training\[0\].image names"):
        read_dataset(src, spec())
    pseudonymizer = Pseudonymizer(SiteSecret(b"k" * 32))
    with pytest.raises(PreprocessInputError, match=r"--write-dicom applies to DICOM exports"):
        preprocess(
            src,
            tmp_path / "x",
            spec(),
            site="s",
            from_nifti=True,
            write_dicom=tmp_path / "c",
            pseudonymizer=pseudonymizer,
        )
    with pytest.raises(PreprocessInputError, match=r"--patient-regex reads patients from NIfTI file names"):
        preprocess(src, tmp_path / "x", spec(), site="s", patient_regex="^(p)")
    with pytest.raises(PreprocessInputError, match=r"expected dataset.json at its top, or exactly one of the folder"):
        read_dataset(tmp_path, spec())  # the data set's parent: hint at the sub-folder
    assert "Task99_TSeg/): pass that folder as SRC" in str(
        pytest.raises(PreprocessInputError, read_dataset, tmp_path, spec()).value
    )


def test_folder_layout_pairs_by_name_and_refuses_what_is_not_one_channel(tmp_path):
    src = tmp_path / "src"
    _small(src / "imagesTr" / "a.nii.gz")
    _small(src / "labelsTr" / "a.nii.gz", value=1)
    _small(src / "imagesTr" / "b_0000.nii.gz")  # nnU-Net channel 0 of case b, its label b.nii.gz
    _small(src / "labelsTr" / "b.nii.gz", value=1)
    _small(src / "imagesTr" / "c_0000.nii.gz")  # two channels of case c
    _small(src / "imagesTr" / "c_0001.nii.gz")
    _small(src / "labelsTr" / "c.nii.gz", value=1)
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 6, 4), np.int16), np.eye(4)), str(src / "imagesTr" / "d.nii.gz"))
    _small(src / "labelsTr" / "d.nii.gz", value=1, affine=np.eye(4))
    _small(src / "imagesTr" / "g.nii.gz")
    _small(src / "labelsTr" / "g.nii.gz", value=1, affine=np.diag([2.0, 2.0, 2.5, 1.0]))  # another grid
    _small(src / "labelsTr" / "e.nii.gz", value=1)  # no image
    _small(src / "imagesTs" / "f.nii.gz")
    (src / "imagesTr" / "h.nii.gz").write_bytes(b"not a nifti at all")
    _small(src / "labelsTr" / "h.nii.gz", value=1)
    res = preprocess(src, tmp_path / "out", _layout_spec(), site="s-1", progress=False, workers=1, from_nifti=True)
    fate = {k: (r["status"], r["reason"]) for k, r in rows(tmp_path / "out").items()}
    assert fate == {
        "imagesTr/a.nii.gz": ("converted", ""),
        "labelsTr/a.nii.gz": ("converted", ""),
        "imagesTr/b_0000.nii.gz": ("converted", ""),
        "labelsTr/b.nii.gz": ("converted", ""),
        "imagesTr/c_0000.nii.gz": ("refused", "MULTICHANNEL_IMAGE"),
        "imagesTr/c_0001.nii.gz": ("refused", "MULTICHANNEL_IMAGE"),
        "labelsTr/c.nii.gz": ("refused", "IMAGE_REFUSED"),
        "imagesTr/d.nii.gz": ("refused", "MULTICHANNEL_IMAGE"),
        "labelsTr/d.nii.gz": ("refused", "IMAGE_REFUSED"),
        "imagesTr/g.nii.gz": ("refused", "LABEL_GEOMETRY_MISMATCH"),
        "labelsTr/g.nii.gz": ("refused", "LABEL_GEOMETRY_MISMATCH"),
        "labelsTr/e.nii.gz": ("refused", "LABEL_UNMATCHED"),
        "imagesTs/f.nii.gz": ("skipped", "DATASET_TEST_IMAGE"),
        "imagesTr/h.nii.gz": ("refused", "NIFTI_UNREADABLE"),
        "labelsTr/h.nii.gz": ("refused", "IMAGE_REFUSED"),
    }
    assert len(res.cases) == 2
    assert "a 4D image of 4 volumes" in rows(tmp_path / "out")["imagesTr/d.nii.gz"]["detail"]


def _named_cases(src: Path, names: list[str]) -> None:
    for name in names:
        _small(src / "imagesTr" / f"{name}.nii.gz")
        _small(src / "labelsTr" / f"{name}.nii.gz", value=1)


def test_patients_come_from_the_regex_or_the_brats_rule_else_each_case_is_its_own(tmp_path):
    src = tmp_path / "src"
    _named_cases(src, ["p01_a", "p01_b", "p01_c", "p02_a", "p03_a", "p04_a"])
    res = preprocess(
        src, tmp_path / "out", _layout_spec(), site="s", progress=False, from_nifti=True, patient_regex=r"^(p\d+)_"
    )
    assert res.patients == 4
    by_input = rows(tmp_path / "out")
    split_of = {c.case_id: c.split for c in res.cases}
    p01 = {split_of[by_input[f"imagesTr/p01_{x}.nii.gz"]["case_id"]] for x in "abc"}
    assert len(p01) == 1  # one patient's cases on one side of the split
    assert preprocess(src, tmp_path / "own", _layout_spec(), site="s", progress=False, from_nifti=True).patients == 6
    with pytest.raises(PreprocessInputError, match=r"matched no part of the file names of 2 of 6 image"):
        read_dataset(src, _layout_spec(), r"^(p0[12])_")
    with pytest.raises(PreprocessInputError, match=r"--patient-regex is not a valid regular expression"):
        read_dataset(src, _layout_spec(), r"^(p")

    brats = tmp_path / "brats"
    _named_cases(brats, ["BraTS-GLI-00001-000", "BraTS-GLI-00001-001", "BraTS-GLI-00002-000", "BraTS-GLI-00003-000"])
    cases = read_dataset(brats, _layout_spec()).cases
    assert sorted(c.patient for c in cases) == [
        "BraTS-GLI-00001",
        "BraTS-GLI-00001",
        "BraTS-GLI-00002",
        "BraTS-GLI-00003",
    ]

    dj = tmp_path / "dj"
    _named_cases(dj, ["x1", "x2", "x3"])
    write_dataset(dj, {
        "labels": {"0": "background", "1": "blob"},
        "training": [
            {"image": f"imagesTr/{n}.nii.gz", "label": f"labelsTr/{n}.nii.gz", "patient": p}
            for n, p in (("x1", "A"), ("x2", "A"), ("x3", "B"))
        ],
    })  # fmt: skip
    assert [c.patient for c in read_dataset(dj, _layout_spec()).cases] == ["A", "A", "B"]


def test_cli_from_nifti_writes_a_usable_site(tmp_path, capsys):
    src, _ = _decathlon(tmp_path)
    spec_file = tmp_path / "spec.yaml"
    cfg.save(spec(6.0), spec_file)
    argv = ["preprocess", "--from-nifti", str(src), str(tmp_path / "out"), "--spec", str(spec_file)]
    assert main([*argv, "--site", "site-1", "--no-deid", "--quiet", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "cases: 3 (2 training, 1 validation; 3 patient(s)" in out
    assert "labels.others: background:" in out and "mapped to background in 3 case(s)" in out


def test_a_nifti_data_set_passed_without_the_flag_gets_the_hint(tmp_path, capsys):
    src, _ = _decathlon(tmp_path)
    spec_file = tmp_path / "spec.yaml"
    cfg.save(spec(6.0), spec_file)
    argv = ["preprocess", str(src), str(tmp_path / "out"), "--spec", str(spec_file), "--site", "site-1"]
    assert main([*argv, "--no-deid", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedimg preprocess: error: no DICOM files in source") and err.endswith("add --from-nifti")
