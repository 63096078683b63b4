"""2D images: synthetic DX radiographs end to end, MONOCHROME1 inversion, single-image refusals."""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from fedimg import config as cfg
from fedimg.dicom.deid import Pseudonymizer, SiteSecret
from fedimg.dicom.pixels import invert_monochrome1
from fedimg.preprocess.pipeline import preprocess
from fedimg.synth import generate
from tests.conftest import REPO

DX_SPEC = REPO / "configs" / "preprocessing" / "dx_chest_cls.yaml"


@pytest.fixture(scope="module")
def dx_synth(tmp_path_factory):
    """Three DX sites (MONOCHROME2, MONOCHROME1 with only Imager Pixel Spacing, MONOCHROME1): 4, 5, 3 studies."""
    return generate(tmp_path_factory.mktemp("dx") / "raw", n_sites=3, n_cases=4, seed=5, progress=False, modality="DX")


@pytest.fixture(scope="module")
def dx_spec() -> cfg.PreprocessSpec:
    return cfg.load(cfg.PreprocessSpec, DX_SPEC)


def _manifest(dst: Path) -> list[dict]:
    return [json.loads(line) for line in (dst / "manifest.jsonl").read_text().splitlines()]


def _fresh(ds: Dataset, accession: str, study: str | None = None, series: str | None = None) -> Dataset:
    """A copy that is its own study (or series), with its own accession number."""
    ds = copy.deepcopy(ds)
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = series or generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.AccessionNumber = accession
    return ds


def _save(ds: Dataset, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def test_dx_sites_end_to_end(dx_synth, dx_spec, tmp_path):
    truth = json.loads(dx_synth.ground_truth_path.read_text())
    assert truth["modality"] == "DX"
    p = Pseudonymizer(SiteSecret.generate(tmp_path / "site.secret"))
    photometrics = set()
    for site, profile in dx_synth.profiles.items():
        photometrics.add(profile.photometric_interpretation)
        src = dx_synth.out_dir / site
        dst = tmp_path / site
        res = preprocess(src, dst, dx_spec, site=site, progress=False, pseudonymizer=p, labels_csv=src / "labels.csv")
        cases = truth["sites"][site]["cases"]
        assert len(res.cases) == len(cases)
        rows = _manifest(dst)
        assert len(rows) == len(cases) + 1 == res.src_files  # one DX file per study, plus labels.csv
        assert sorted(r["status"] for r in rows) == ["converted"] * len(cases) + ["skipped"]
        dl = json.loads((dst / "datalist.json").read_text())
        assert (dl["task"], dl["spatial_dims"]) == ("classification", 2)
        assert dl["labels"] == {"0": "no_lesion", "1": "lesion"}
        expected = {p.case(c["study_instance_uid"], c["series_instance_uid"]): int(c["has_lesion"]) for c in cases}
        items = dl["training"] + dl["validation"]
        assert {it["case_id"]: it["label"] for it in items} == expected
        for it in items:
            img = nib.load(dst / it["image"])
            data = np.asarray(img.dataobj)
            assert data.shape == tuple(dx_spec.target_size) and data.dtype == np.float32
            assert data.min() >= 0.0 and data.max() <= 1.0 and data.max() > 0.9
            # Higher = brighter whatever the photometric interpretation: the body is bright, air dark.
            h, w = data.shape
            assert data[h // 2 - 8 : h // 2 + 8, w // 2 - 8 : w // 2 + 8].mean() > 0.7
            assert data[:4, :4].mean() < 0.05 and data[-4:, -4:].mean() < 0.05
            # Square output pixels: the image's extent fitted into 128 x 128.
            fov = max(profile.rows * profile.pixel_spacing_mm, profile.columns * profile.pixel_spacing_mm)
            np.testing.assert_allclose(img.header.get_zooms()[:2], fov / 128, rtol=0.02)
    assert photometrics == {"MONOCHROME1", "MONOCHROME2"}


def test_monochrome1_copy_gives_the_same_output(dx_synth, dx_spec, tmp_path):
    """An image stored as MONOCHROME1 (values mirrored) preprocesses exactly like its MONOCHROME2 original."""
    site = next(s for s, pr in dx_synth.profiles.items() if pr.photometric_interpretation == "MONOCHROME2")
    first = sorted(p for p in (dx_synth.out_dir / site).rglob("IM0001*"))[0]
    ds = pydicom.dcmread(first)
    src = tmp_path / "export"
    _save(_fresh(ds, "ACC2"), src / "m2" / "IM0001.dcm")
    inverted = _fresh(ds, "ACC1")
    top = (1 << int(ds.BitsStored)) - 1
    inverted.PixelData = (top - ds.pixel_array.astype(np.int64)).astype("<u2").tobytes()
    inverted.PhotometricInterpretation = "MONOCHROME1"
    _save(inverted, src / "m1" / "IM0001.dcm")
    sheet = tmp_path / "labels.csv"
    sheet.write_text("AccessionNumber,label\nACC1,lesion\nACC2,no_lesion\n")
    res = preprocess(src, tmp_path / "out", dx_spec, site="s", progress=False, labels_csv=sheet)
    assert len(res.cases) == 2 and sorted(c.label for c in res.cases) == [0, 1]
    a, b = (np.asarray(nib.load(tmp_path / "out" / c.image).dataobj) for c in res.cases)
    np.testing.assert_allclose(a, b, atol=1e-6)
    # The inversion itself: mirrored inside the Bits Stored range.
    hdr = Dataset()
    hdr.PhotometricInterpretation, hdr.BitsAllocated, hdr.BitsStored, hdr.PixelRepresentation = "MONOCHROME1", 16, 12, 0
    assert invert_monochrome1(np.array([0, 1000, 4095]), hdr).tolist() == [4095, 3095, 0]
    hdr.PhotometricInterpretation = "MONOCHROME2"
    assert invert_monochrome1(np.array([0, 7]), hdr).tolist() == [0, 7]


def test_2d_spec_refuses_what_is_not_one_image(dx_synth, small_synth, dx_spec, tmp_path):
    site = next(iter(dx_synth.profiles))
    ds = pydicom.dcmread(sorted((dx_synth.out_dir / site).rglob("IM0001*"))[0])
    src = tmp_path / "export"
    # A multi-frame object: two frames in one file.
    mf = _fresh(ds, "ACC-MF")
    mf.NumberOfFrames = 2
    mf.PixelData = ds.PixelData * 2
    _save(mf, src / "multiframe" / "IM0001.dcm")
    # One series holding two instances (e.g. two exposures).
    study, series = generate_uid(), generate_uid()
    for k in (1, 2):
        _save(_fresh(ds, "ACC-2I", study, series), src / "two_instances" / f"IM000{k}.dcm")
    # One study with two single-image series: which one is the image?
    study = generate_uid()
    for k in (1, 2):
        _save(_fresh(ds, "ACC-2S", study), src / "two_series" / f"s{k}" / "IM0001.dcm")
    # No pixel size at all.
    nosp = _fresh(ds, "ACC-NS")
    for kw in ("PixelSpacing", "ImagerPixelSpacing"):
        if kw in nosp:
            delattr(nosp, kw)
    _save(nosp, src / "no_spacing" / "IM0001.dcm")
    # The good one, labelled.
    _save(_fresh(ds, "ACC-OK"), src / "good" / "IM0001.dcm")
    sheet = tmp_path / "labels.csv"
    sheet.write_text(
        "AccessionNumber,label\n" + "".join(f"{a},lesion\n" for a in ("ACC-MF", "ACC-2I", "ACC-2S", "ACC-NS", "ACC-OK"))
    )
    res = preprocess(src, tmp_path / "out", dx_spec, site="s", progress=False, labels_csv=sheet)
    rows = {r["input"]: r for r in _manifest(tmp_path / "out")}
    assert len(rows) == 7 == res.src_files

    def reasons(prefix: str) -> set[tuple[str, str]]:
        return {(r["status"], r["reason"]) for k, r in rows.items() if k.startswith(prefix)}

    assert reasons("multiframe/") == {("refused", "NOT_SINGLE_IMAGE")}
    assert "Number of Frames is 2" in rows["multiframe/IM0001.dcm"]["detail"]
    assert reasons("two_instances/") == {("refused", "NOT_SINGLE_IMAGE")}
    assert "2 instances" in rows["two_instances/IM0001.dcm"]["detail"]
    assert reasons("two_series/") == {("refused", "AMBIGUOUS_IMAGE_SERIES")}
    assert reasons("no_spacing/") == {("refused", "NO_GEOMETRY")}
    assert "(0018,1164) Imager Pixel Spacing" in rows["no_spacing/IM0001.dcm"]["detail"]
    assert reasons("good/") == {("converted", "")} and len(res.cases) == 1 and res.cases[0].label == 1


def test_single_ct_slice_is_a_2d_image_and_a_stack_is_refused(small_synth, dx_spec, tmp_path):
    """A 2D spec selecting CT: one slice converts (affine through its IOP/IPP); a whole series does not."""
    spec = dataclasses.replace(dx_spec, series=dataclasses.replace(dx_spec.series, image_modality="CT"))
    series_dir = next(d for d in (small_synth.out_dir / "site-1").rglob("*") if d.is_dir() and "B30f" in d.name)
    src = tmp_path / "export"
    shutil.copytree(series_dir, src / "stack")
    files = sorted(series_dir.iterdir())
    ds = pydicom.dcmread(files[len(files) // 2])
    _save(_fresh(ds, "ACC-SLICE"), src / "slice" / "IM0001.dcm")
    sheet = tmp_path / "labels.csv"
    with sheet.open("w", newline="") as fh:
        csv.writer(fh).writerows(
            [["AccessionNumber", "label"], ["ACC-SLICE", "no_lesion"], [str(ds.AccessionNumber), "lesion"]]
        )
    res = preprocess(src, tmp_path / "out", spec, site="s", progress=False, labels_csv=sheet)
    rows = _manifest(tmp_path / "out")
    stack = [r for r in rows if r["input"].startswith("stack/")]
    assert len(stack) == len(files) and {r["reason"] for r in stack} == {"NOT_SINGLE_IMAGE"}
    assert f"{len(files)} instances" in stack[0]["detail"]
    (case,) = res.cases
    img = nib.load(tmp_path / "out" / case.image)
    assert img.shape == (128, 128) and case.label == 0
    # The output centre lands on the slice centre (IPP + half the extent along IOP), in RAS.
    iop = np.array(ds.ImageOrientationPatient, float)
    dr, dc = (float(v) for v in ds.PixelSpacing)
    centre_lps = (
        np.array(ds.ImagePositionPatient, float)
        + iop[:3] * dc * (ds.Columns - 1) / 2
        + iop[3:] * dr * (ds.Rows - 1) / 2
    )
    got = img.affine @ [63.5, 63.5, 0, 1]
    np.testing.assert_allclose(got[:3], centre_lps * [-1, -1, 1], atol=dr)
    np.testing.assert_allclose(img.header.get_zooms()[:2], dr * ds.Rows / 128, rtol=1e-3)
