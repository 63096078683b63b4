"""Label subsets (issue 16): ``labels.others: background`` narrows a multi-label segmentation to the spec's classes.

Checked on the real TotalSegmentator CT series and its pixel-aligned 32-label
NIfTI segmentation, on a DICOM SEG with a segment outside the spec, and on
known arrays: the classes land exactly where the source holds their values,
every other value becomes background and is counted in the manifest and
summary, and without the option the case is refused with a message that
counts the unexpected values and says it is cut.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel import orientations as ornt

from fedimg import config as cfg
from fedimg.dicom.labels import check_label_values, map_label_values
from fedimg.dicom.reasons import Reason, RefusedError
from fedimg.preprocess.pipeline import preprocess
from tests.conftest import shared

TS = "dicom/totalsegmentator/tests/reference_files"
# Two classes of TotalSegmentator's (v2) map, by their label values.
CLASSES = {"spleen": 1, "liver": 5}


def _spec(**labels) -> cfg.PreprocessSpec:
    """A CT spec on the TotalSegmentator series' own grid (LAS, 0.977 x 0.977 x 2 mm): no resampling blur."""
    return cfg.from_dict(
        cfg.PreprocessSpec,
        {
            "name": "ts_subset",
            "modality": "CT",
            "orientation": "LAS",
            "target_spacing": [0.9765625, 0.9765625, 2.0],
            "labels": {"classes": list(CLASSES), "values": dict(CLASSES), **labels},
        },
    )


def _ts_study(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """The CT series and its segmentation as one study folder; the segmentation's values and affine."""
    ref = shared(TS)
    src = tmp_path / "src" / "study"
    shutil.copytree(ref / "example_ct_dicom", src / "ct")
    shutil.copy(ref / "example_seg_dicom.nii.gz", src / "example_seg_dicom.nii.gz")
    seg = nib.load(str(ref / "example_seg_dicom.nii.gz"))
    return tmp_path / "src", np.asarray(seg.dataobj), seg.affine


def _rows(dst: Path) -> list[dict]:
    return [json.loads(x) for x in (dst / "manifest.jsonl").read_text(encoding="utf-8").splitlines()]


def test_refusal_counts_the_unexpected_values_and_says_the_list_is_cut():
    raw = np.zeros((4, 4, 4), dtype=np.uint8)
    raw.flat[:14] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]  # 12 values beyond classes 1, 2
    with pytest.raises(RefusedError) as info:
        check_label_values(raw, [1, 2])
    assert info.value.reason == Reason.LABEL_VALUES_UNEXPECTED
    assert "12 unexpected values, e.g. 3, 4, 5, 6, 7 and 7 more" in info.value.detail
    assert "labels.others: background" in info.value.detail  # says how to narrow instead
    few = np.array([[[0, 1, 9, 3]]], dtype=np.int16)
    with pytest.raises(RefusedError, match=r"2 unexpected values: 3, 9 outside"):
        map_label_values(few, [1])
    with pytest.raises(RefusedError, match=r"1 unexpected value: 7 outside"):
        check_label_values(np.array([[[0.0, 7.0]]], dtype=np.float32), [1])


def test_others_background_maps_every_other_value_to_zero_and_counts_it():
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 40, size=(9, 8, 7)).astype(np.uint16)
    mapped = check_label_values(raw, [5, 17], others="background")
    expected = {v: int((raw == v).sum()) for v in np.unique(raw).tolist() if v not in (0, 5, 17)}
    assert mapped == expected
    out = map_label_values(raw, [5, 17], others="background")
    assert set(np.unique(out).tolist()) <= {0, 1, 2}
    assert np.array_equal(out == 1, raw == 5) and np.array_equal(out == 2, raw == 17)
    # The same through the modality LUT (a DICOM mask stored with a slope): values are stored * 2.
    out_scaled = map_label_values(raw, [10, 34], (2.0, 0.0), others="background")
    assert np.array_equal(out_scaled, out)


def test_others_is_validated_and_defaults_to_refuse():
    base = {"name": "x", "modality": "CT", "target_spacing": [3.0, 3.0, 3.0]}
    assert cfg.from_dict(cfg.PreprocessSpec, base).labels.others == "refuse"
    with pytest.raises(cfg.ConfigError, match=r"labels.others: expected one of 'refuse', 'background'"):
        cfg.from_dict(cfg.PreprocessSpec, {**base, "labels": {"others": "ignore"}})
    cls = {
        "name": "c",
        "modality": "DX",
        "task": "classification",
        "spatial_dims": 2,
        "target_size": [32, 32],
        "series": {"image_modality": "DX"},
        "labels": {"classes": ["a", "b"], "others": "background"},
    }
    with pytest.raises(cfg.ConfigError, match=r"labels.others maps voxel values of segmentation labels"):
        cfg.from_dict(cfg.PreprocessSpec, cls)


@pytest.mark.slow
def test_totalsegmentator_narrowed_to_two_classes_matches_the_source_mask(tmp_path):
    src, seg, seg_affine = _ts_study(tmp_path)
    res = preprocess(src, tmp_path / "out", _spec(others="background"), site="site-1", progress=False, workers=1)
    (case,) = res.cases
    out = nib.load(str(tmp_path / "out" / str(case.label)))
    label = np.asarray(out.dataobj)
    # On the source's own grid, the output is the source segmentation, axes matched by their directions.
    transform = ornt.ornt_transform(ornt.io_orientation(seg_affine), ornt.io_orientation(out.affine))
    src_on_out = ornt.apply_orientation(seg, transform)
    assert label.shape == src_on_out.shape
    assert set(np.unique(label).tolist()) == {0, 1, 2}
    for idx, (name, value) in enumerate(CLASSES.items(), start=1):
        assert np.array_equal(label == idx, src_on_out == value), name
        assert case.label_counts[name] == int((seg == value).sum()) > 1000
    others = {v: int((seg == v).sum()) for v in np.unique(seg).tolist() if v not in (0, *CLASSES.values())}
    assert len(others) == 29
    # Counts only: the label row and the summary say how many voxels were mapped to background.
    (label_row,) = [r for r in _rows(tmp_path / "out") if r.get("role") == "label"]
    assert label_row["status"] == "converted" and label_row["others_to_background"] == sum(others.values())
    assert "29 label value(s) outside the spec's classes mapped to background" in label_row["detail"]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["label_voxels_to_background"] == sum(others.values())
    assert summary["cases_with_other_labels"] == 1
    assert summary["cases"][0]["other_values"] == 29

    # Without labels.others: background the same study is refused, and the message counts and cuts.
    refused = preprocess(src, tmp_path / "refused", _spec(), site="site-1", progress=False, workers=1)
    assert refused.cases == []
    rows = _rows(tmp_path / "refused")
    # The label carries the reason; the image rows say their label was the cause.
    assert {(r["status"], r["reason"]) for r in rows if r.get("role") != "image"} >= {
        ("refused", "LABEL_VALUES_UNEXPECTED")
    }
    label_rows = [r for r in rows if r["reason"] == "LABEL_VALUES_UNEXPECTED"]
    image_rows = [r for r in rows if r["reason"] != "LABEL_VALUES_UNEXPECTED"]
    assert len(label_rows) == 1 and image_rows
    assert {(r["status"], r["reason"]) for r in image_rows} == {("refused", "PARTNER_REFUSED")}
    first = sorted(others)[:5]
    detail = label_rows[0]["detail"]
    assert f"29 unexpected values, e.g. {', '.join(map(str, first))} and 24 more" in detail, detail


@pytest.mark.slow
def test_seg_segment_outside_the_spec_becomes_background(small_synth, ct_spec, tmp_path):
    from tests.preprocess.test_seg_labels import _make_seg

    truth = json.loads(small_synth.ground_truth_path.read_text())
    case = truth["sites"]["site-1"]["cases"][0]
    src = tmp_path / "src"
    shutil.copytree(small_synth.out_dir / "site-1", src)
    label_rel = case["label_path"].split("/", 1)[1]
    series_rel = case["image_series_dir"].split("/", 1)[1]
    # A second segment for sure: the organ's voxels in the upper half of its slices become value 2.
    nifti = nib.load(str(src / label_rel))
    source_label = np.asarray(nifti.dataobj).copy()
    ks = np.flatnonzero((source_label == 1).any(axis=(0, 1)))
    source_label[..., ks[len(ks) // 2] :][source_label[..., ks[len(ks) // 2] :] == 1] = 2
    nib.save(nib.Nifti1Image(source_label, nifti.affine), str(src / label_rel))
    _make_seg(src / series_rel, src / label_rel, src / Path(label_rel).parent.parent / "seg.dcm")
    shutil.rmtree(src / Path(label_rel).parent)  # the SEG (segments organ=1, second=2) is the study's label
    organ_only = dataclasses.replace(
        ct_spec,
        target_spacing=(6.0, 6.0, 6.0),
        labels=cfg.LabelSpec(classes=["organ"], values={"organ": 1}, others="background"),
    )
    refuse = dataclasses.replace(organ_only, labels=cfg.LabelSpec(classes=["organ"], values={"organ": 1}))
    res = preprocess(src, tmp_path / "out", organ_only, site="site-1", progress=False, workers=1)
    seg_row = next(r for r in _rows(tmp_path / "out") if r["input"].endswith("seg.dcm"))
    assert seg_row["status"] == "converted"
    target = next(c for c in res.cases if c.case_id == seg_row["case_id"])
    label = np.asarray(nib.load(str(tmp_path / "out" / str(target.label))).dataobj)
    assert set(np.unique(label).tolist()) == {0, 1} and target.label_counts["organ"] > 0
    assert target.other_values == 1  # the second segment
    # The SEG was sampled from the NIfTI label on the image grid: its second segment holds the source's voxels.
    assert seg_row["others_to_background"] == pytest.approx(int((source_label == 2).sum()), rel=0.01)
    refused = preprocess(src, tmp_path / "refused", refuse, site="site-1", progress=False, workers=1)
    row = next(r for r in _rows(tmp_path / "refused") if r["input"].endswith("seg.dcm"))
    assert (row["status"], row["reason"]) == ("refused", "LABEL_VALUES_UNEXPECTED")
    assert "1 unexpected value: 2 outside" in row["detail"]
    assert seg_row["case_id"] not in {c.case_id for c in refused.cases}
