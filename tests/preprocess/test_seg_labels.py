"""DICOM SEG labels (read with highdicom) land on the image grid like the NIfTI labels they replace."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from fedimg.preprocess.pipeline import preprocess


def _make_seg(series_dir: Path, label_nifti: Path, out: Path) -> None:
    """Write a multi-segment DICOM SEG equivalent to the NIfTI label, referencing the CT slices."""
    datasets = [pydicom.dcmread(p) for p in sorted(series_dir.iterdir())]
    normal = np.cross(
        np.array(datasets[0].ImageOrientationPatient[:3], float),
        np.array(datasets[0].ImageOrientationPatient[3:], float),
    )
    datasets.sort(key=lambda d: float(np.dot(np.array(d.ImagePositionPatient, float), normal)))
    lbl = nib.load(label_nifti)
    # Sample the NIfTI label at each slice's pixel centres (world RAS) to build frames.
    inv = np.linalg.inv(lbl.affine)
    data = np.asarray(lbl.dataobj)
    frames = []
    for ds in datasets:
        rows, cols = int(ds.Rows), int(ds.Columns)
        iop = np.array(ds.ImageOrientationPatient, float)
        ipp = np.array(ds.ImagePositionPatient, float)
        dr, dc = (float(v) for v in ds.PixelSpacing)
        r, c = np.mgrid[0:rows, 0:cols]
        lps = ipp + c[..., None] * dc * iop[:3] + r[..., None] * dr * iop[3:]
        ras = lps * [-1, -1, 1]
        vox = np.rint(np.c_[ras.reshape(-1, 3), np.ones(rows * cols)] @ inv.T)[:, :3].astype(int)
        frames.append(data[vox[:, 0], vox[:, 1], vox[:, 2]].reshape(rows, cols))
    pixel_array = np.stack(frames).astype(np.uint8)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=i,
            segment_label=name,
            segmented_property_category=codes.SCT.Organ
            if name == "organ"
            else codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Organ if name == "organ" else codes.SCT.Neoplasm,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        )
        for i, name in ((1, "organ"), (2, "lesion"))
    ]
    seg = hd.seg.Segmentation(
        source_images=datasets,
        pixel_array=pixel_array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=900,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="fedimg-test",
        manufacturer_model_name="test",
        software_versions="0",
        device_serial_number="0",
    )
    seg.save_as(out)


@pytest.mark.slow
def test_seg_label_equals_nifti_label(small_synth, ct_spec, tmp_path):
    truth = json.loads(small_synth.ground_truth_path.read_text())
    cases = truth["sites"]["site-1"]["cases"]
    case = next((c for c in cases if c["has_lesion"]), cases[0])
    src_nifti = tmp_path / "nifti"
    shutil.copytree(small_synth.out_dir / "site-1", src_nifti)
    ref = preprocess(src_nifti, tmp_path / "ref", ct_spec, site="site-1", progress=False)

    src_seg = tmp_path / "seg"
    shutil.copytree(small_synth.out_dir / "site-1", src_seg)
    label_rel = case["label_path"].split("/", 1)[1]
    series_rel = case["image_series_dir"].split("/", 1)[1]
    _make_seg(src_seg / series_rel, src_seg / label_rel, src_seg / Path(label_rel).parent.parent / "seg.dcm")
    shutil.rmtree(src_seg / Path(label_rel).parent)  # the SEG replaces the NIfTI label
    res = preprocess(src_seg, tmp_path / "out", ct_spec, site="site-1", progress=False)

    rows = [json.loads(x) for x in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    seg_row = next(r for r in rows if r["input"].endswith("seg.dcm"))
    assert seg_row["status"] == "converted" and seg_row["role"] == "label"
    assert len(res.cases) == len(ref.cases)
    by_id = {c.case_id: c for c in ref.cases}
    target = next(c for c in res.cases if c.case_id == seg_row["case_id"])
    a = np.asarray(nib.load(tmp_path / "out" / target.label).dataobj)
    b = np.asarray(nib.load(tmp_path / "ref" / by_id[target.case_id].label).dataobj)
    assert a.shape == b.shape
    assert (a == b).mean() > 0.999  # identical but for the NIfTI sampling round trip
    assert (a == 1).sum() > 0
    assert ((a == 2).sum() > 0) == case["has_lesion"]


def test_seg_that_references_other_slices_is_refused(small_synth, ct_spec, tmp_path):
    truth = json.loads(small_synth.ground_truth_path.read_text())
    c1, c2 = truth["sites"]["site-1"]["cases"][:2]
    src = tmp_path / "src"
    shutil.copytree(small_synth.out_dir / "site-1", src)
    # A SEG built on study 2's slices but claiming study 1 (same study and frame of reference):
    # its frames reference slices study 1 does not have, so it cannot be placed.
    seg_path = src / Path(c1["label_path"].split("/", 1)[1]).parent.parent / "seg.dcm"
    _make_seg(src / c2["image_series_dir"].split("/", 1)[1], src / c2["label_path"].split("/", 1)[1], seg_path)
    ds = pydicom.dcmread(seg_path)
    ds.StudyInstanceUID = c1["study_instance_uid"]
    ds.FrameOfReferenceUID = c1["frame_of_reference_uid"]
    ds.save_as(seg_path)
    res = preprocess(src, tmp_path / "out", ct_spec, site="site-1", progress=False)
    rows = {
        json.loads(x)["input"]: json.loads(x) for x in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()
    }
    row = rows[seg_path.relative_to(src).as_posix()]
    assert row["status"] == "refused" and row["reason"] in ("LABEL_UNMATCHED", "IMAGE_REFUSED")
    # Study 1 falls back to its own NIfTI label or is refused with the SEG; never mislabelled.
    assert sum(res.counts.values()) == res.src_files
