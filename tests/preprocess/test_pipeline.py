"""Preprocessing: geometry, label alignment and manifest accounting on synthetic and real studies."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from fedimg import config as cfg
from fedimg.preprocess.pipeline import PreprocessInputError, preprocess
from tests.conftest import MR_SPEC, shared, slice_gap_export


def _tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def _manifest(dst: Path) -> list[dict]:
    return [json.loads(line) for line in (dst / "manifest.jsonl").read_text().splitlines()]


def _world_centroid(label_img: nib.Nifti1Image, value: int) -> np.ndarray:
    idx = np.argwhere(np.asarray(label_img.dataobj) == value)
    return (label_img.affine @ np.c_[idx, np.ones(len(idx))].T)[:3].mean(axis=1)


def test_synthetic_sites_geometry_labels_and_manifest(small_synth, small_preprocessed):
    base, results = small_preprocessed
    truth = json.loads(small_synth.ground_truth_path.read_text())
    for site, res in results.items():
        dst = base / site
        n_files = sum(1 for p in (small_synth.out_dir / site).rglob("*") if p.is_file())
        rows = _manifest(dst)
        assert len(rows) == n_files == res.src_files
        # Every file converts, except the site's label sheet (labels.csv), which is skipped.
        assert {r["status"] for r in rows if r["input"] != "labels.csv"} == {"converted"}
        sheet = next(r for r in rows if r["input"] == "labels.csv")
        assert (sheet["status"], sheet["reason"]) == ("skipped", "LABEL_SHEET")
        assert sum(res.counts.values()) == n_files
        assert len({r["input"] for r in rows}) == n_files  # one row per file
        cases = {c["study_instance_uid"]: c for c in truth["sites"][site]["cases"]}
        assert len(res.cases) == len(cases)
        dl = json.loads((dst / "datalist.json").read_text())
        assert len(dl["training"]) + len(dl["validation"]) == len(cases)
        assert dl["labels"] == {"0": "background", "1": "organ", "2": "lesion"}
        for item in dl["training"] + dl["validation"]:
            img = nib.load(dst / item["image"])
            lbl = nib.load(dst / item["label"])
            assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
            np.testing.assert_allclose(img.header.get_zooms()[:3], (6.0, 6.0, 6.0), atol=1e-4)
            np.testing.assert_allclose(img.affine, lbl.affine)
            assert img.shape == lbl.shape
            data = np.asarray(img.dataobj)
            assert data.min() >= 0.0 and data.max() <= 1.0  # CT window scaled to [0, 1]
            assert set(np.unique(np.asarray(lbl.dataobj)).tolist()) <= {0, 1, 2}
        # Label alignment against the analytic phantom: organ centroid in world space.
        for c in res.cases:
            lbl = nib.load(dst / c.label)
            row = next(r for r in rows if r.get("case_id") == c.case_id and r.get("role") == "image")
            study = next(s for s in cases.values() if row["input"].startswith(s["image_series_dir"].split("/", 1)[1]))
            organ = study["phantom"]["organ"]
            centre_ras = np.array(organ["centre_lps_mm"]) * [-1, -1, 1]
            assert np.linalg.norm(_world_centroid(lbl, 1) - centre_ras) < 4.0  # < one 6 mm voxel
            # The image is bright where the label says organ (it is aligned, not just shaped alike).
            img = np.asarray(nib.load(dst / c.image).dataobj)
            lab = np.asarray(lbl.dataobj)
            assert img[lab == 1].mean() > img[(lab == 0) & (img > 0.2)].mean() + 0.1


def test_raw_input_unchanged_and_rerun_is_identical(small_synth, ct_spec, tmp_path):
    src = small_synth.out_dir / "site-1"
    before = _tree_hash(src)
    a = preprocess(src, tmp_path / "a", ct_spec, site="site-1", progress=False)
    b = preprocess(src, tmp_path / "a", ct_spec, site="site-1", progress=False)
    assert _tree_hash(src) == before
    assert [c.case_id for c in a.cases] == [c.case_id for c in b.cases]
    assert [c.split for c in a.cases] == [c.split for c in b.cases]  # deterministic split
    assert not list((tmp_path / "a").rglob("*.tmp"))  # no temp files left behind


def test_messy_export_every_file_accounted(small_synth, ct_spec, tmp_path):
    src = tmp_path / "export"
    shutil.copytree(small_synth.out_dir / "site-2", src)
    series_dirs = sorted({p.parent for p in src.rglob("IM*")})
    image_dir = next(d for d in series_dirs if "Mask" not in d.name)
    victim = sorted(image_dir.iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:300])  # truncated DICOM
    (src / "README.txt").write_text("export notes")
    (src / ".DS_Store").write_bytes(b"\x00\x01")
    res = preprocess(src, tmp_path / "out", ct_spec, site="site-2", progress=False)
    rows = {r["input"]: r for r in _manifest(tmp_path / "out")}
    n_files = sum(1 for p in src.rglob("*") if p.is_file())
    assert len(rows) == n_files
    assert res.counts["converted"] + res.counts["refused"] + res.counts["skipped"] == n_files
    assert rows["README.txt"]["status"] == "refused" and rows["README.txt"]["reason"] == "NOT_DICOM"
    victim_row = rows[victim.relative_to(src).as_posix()]
    assert victim_row["status"] == "refused"
    # The truncated slice leaves a gap or an unreadable file: its whole series is refused, not stacked.
    same_series = [r for k, r in rows.items() if k.startswith(image_dir.relative_to(src).as_posix() + "/")]
    assert all(r["status"] == "refused" for r in same_series)
    # The other studies still convert.
    assert len(res.cases) == len(small_synth.sites["site-2"]) - 1


def test_label_on_wrong_grid_is_refused(small_synth, ct_spec, tmp_path):
    src = tmp_path / "export"
    shutil.copytree(small_synth.out_dir / "site-1", src)
    label = sorted(src.rglob("segmentation.nii.gz"))[0]
    img = nib.load(label)
    shifted = img.affine.copy()
    shifted[:3, 3] += 5.0  # 5 mm off
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), shifted), label)
    res = preprocess(src, tmp_path / "out", ct_spec, site="site-1", progress=False)
    rows = {r["input"]: r for r in _manifest(tmp_path / "out")}
    row = rows[label.relative_to(src).as_posix()]
    assert row["status"] == "refused" and row["reason"] == "LABEL_GEOMETRY_MISMATCH"
    assert "mm" in row["detail"]
    assert len(res.cases) == len(small_synth.sites["site-1"]) - 1


def test_bad_sources_are_clear_errors(tmp_path, ct_spec):
    with pytest.raises(PreprocessInputError, match="does not exist"):
        preprocess(tmp_path / "missing", tmp_path / "o", ct_spec, site="s")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PreprocessInputError, match="found 0 files"):
        preprocess(tmp_path / "empty", tmp_path / "o", ct_spec, site="s")
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "a.txt").write_text("x")
    with pytest.raises(PreprocessInputError, match="found 1 file.*NOT_DICOM"):
        preprocess(tmp_path / "txt", tmp_path / "o", ct_spec, site="s")
    assert not (tmp_path / "o").exists()


def _mask_world_centroid(series_dir: Path) -> np.ndarray:
    """Centroid of a DICOM mask series in RAS mm, computed directly from its headers."""
    pts = []
    for f in series_dir.iterdir():
        ds = pydicom.dcmread(f)
        arr = ds.pixel_array
        if not arr.any():
            continue
        iop = np.array(ds.ImageOrientationPatient, dtype=float)
        ipp = np.array(ds.ImagePositionPatient, dtype=float)
        dr, dc = (float(v) for v in ds.PixelSpacing)
        rows, cols = np.nonzero(arr)
        lps = ipp + np.outer(cols * dc, iop[:3]) + np.outer(rows * dr, iop[3:])
        pts.append(lps)
    allpts = np.concatenate(pts)
    return allpts.mean(axis=0) * [-1, -1, 1]


@pytest.mark.slow
def test_tcia_brain_tumor_progression_mask_stays_aligned(tmp_path):
    src = shared("dicom/tcia_brain_tumor_progression")
    spec = cfg.load(cfg.PreprocessSpec, MR_SPEC)
    before = _tree_hash(src)
    res = preprocess(src, tmp_path / "out", spec, site="tcia", progress=False)
    assert _tree_hash(src) == before
    assert len(res.cases) == 3  # three studies, each T1post + MaskTumor
    rows = _manifest(tmp_path / "out")
    assert len(rows) == res.src_files
    flair = [r for r in rows if "FLAIR" in r["input"]]
    assert flair and all(r["status"] == "skipped" and r["reason"] == "SERIES_NOT_SELECTED" for r in flair)
    for c in res.cases:
        img = nib.load(tmp_path / "out" / c.image)
        lbl = nib.load(tmp_path / "out" / c.label)
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
        np.testing.assert_allclose(img.header.get_zooms()[:3], spec.target_spacing, atol=1e-3)
        data = np.asarray(img.dataobj)
        fg = data[data != 0]
        assert abs(fg.mean()) < 0.05 and abs(fg.std() - 1) < 0.05  # z-scored foreground
        mask_rows = [r for r in rows if r.get("case_id") == c.case_id and r.get("role") == "label"]
        series_dir = (src / mask_rows[0]["input"]).parent
        assert "Mask" in series_dir.name
        expected = _mask_world_centroid(series_dir)
        got = _world_centroid(lbl, 1)
        # Resampling to 1x1x5 mm moves the centroid by well under a voxel.
        assert np.linalg.norm(got - expected) < 1.5, (got, expected)


def test_parallel_preprocess_matches_serial(small_synth, ct_spec, tmp_path):
    src = small_synth.out_dir / "site-2"
    a = preprocess(src, tmp_path / "serial", ct_spec, site="site-2", progress=False, workers=1)
    b = preprocess(src, tmp_path / "parallel", ct_spec, site="site-2", progress=False, workers=2)
    assert _manifest(tmp_path / "serial") == _manifest(tmp_path / "parallel")
    assert [(c.case_id, c.split, c.label_counts) for c in a.cases] == [
        (c.case_id, c.split, c.label_counts) for c in b.cases
    ]
    for c in a.cases:
        x = np.asarray(nib.load(tmp_path / "serial" / c.image).dataobj)
        y = np.asarray(nib.load(tmp_path / "parallel" / c.image).dataobj)
        np.testing.assert_array_equal(x, y)


def test_slice_gap_is_refused_or_resampled_as_the_spec_says(small_synth, ct_spec, tmp_path):
    import dataclasses

    src = tmp_path / "export"
    image_dir, mask_dir = slice_gap_export(small_synth.out_dir / "site-2", src)  # DICOM mask labels
    refused = preprocess(src, tmp_path / "refuse", ct_spec, site="s", progress=False)
    rows = {r["input"]: r for r in _manifest(tmp_path / "refuse")}
    img_rows = [r for k, r in rows.items() if k.startswith(image_dir.relative_to(src).as_posix() + "/")]
    assert {r["reason"] for r in img_rows} == {"SLICE_GAP"}
    spec = dataclasses.replace(ct_spec, geometry=dataclasses.replace(ct_spec.geometry, irregular="resample"))
    fixed = preprocess(src, tmp_path / "fix", spec, site="s", progress=False)
    assert len(fixed.cases) == len(refused.cases) + 1
    rows = {r["input"]: r for r in _manifest(tmp_path / "fix")}
    img_rows = [r for k, r in rows.items() if k.startswith(image_dir.relative_to(src).as_posix() + "/")]
    mask_rows = [r for k, r in rows.items() if k.startswith(mask_dir.relative_to(src).as_posix() + "/")]
    assert all(r["status"] == "converted" and r["correction"].startswith("SLICE_GAP corrected") for r in img_rows)
    assert all(r["role"] == "label" and r["correction"] for r in mask_rows)
    case = next(c for c in fixed.cases if c.case_id == img_rows[0]["case_id"])
    lbl = np.asarray(nib.load(tmp_path / "fix" / case.label).dataobj)
    assert set(np.unique(lbl).tolist()) <= {0, 1, 2} and (lbl == 1).sum() > 0


def test_keyed_pseudonyms_replace_identifiers_in_names_and_manifest(small_synth, ct_spec, tmp_path):
    import os
    import stat

    from fedimg.dicom.deid import Pseudonymizer, SiteSecret

    src = small_synth.out_dir / "site-1"
    s1 = SiteSecret.generate(tmp_path / "a.secret")
    s2 = SiteSecret.generate(tmp_path / "b.secret")
    r1 = preprocess(
        src,
        tmp_path / "one",
        ct_spec,
        site="site-1",
        progress=False,
        pseudonymizer=Pseudonymizer(s1),
        crosswalk=tmp_path / "site_private" / "crosswalk.jsonl",
    )
    r1b = preprocess(
        src,
        tmp_path / "one_again",
        ct_spec,
        site="site-1",
        progress=False,
        pseudonymizer=Pseudonymizer(SiteSecret.load(tmp_path / "a.secret")),
    )
    r2 = preprocess(src, tmp_path / "two", ct_spec, site="site-1", progress=False, pseudonymizer=Pseudonymizer(s2))
    ids1, ids1b, ids2 = ([c.case_id for c in r.cases] for r in (r1, r1b, r2))
    assert ids1 == ids1b  # same secret, same pseudonyms
    assert not set(ids1) & set(ids2)  # another secret, none equal
    truth = json.loads(small_synth.ground_truth_path.read_text())
    identifiers = set()
    for case in truth["sites"]["site-1"]["cases"]:
        for v in case["identifiers"].values():
            if isinstance(v, str) and len(v) >= 4:
                identifiers.add(v)
    text = "".join(p.read_text(errors="ignore") for p in (tmp_path / "one").glob("*.json*"))
    names = " ".join(p.name for p in (tmp_path / "one").rglob("*"))
    import re

    def leaked(v: str) -> bool:
        if not v.isdigit():
            return v in text or v in names
        # Digit strings are only leaks as whole tokens: hex hashes contain digit runs by chance.
        pat = re.compile(rf"(?<![0-9A-Za-z]){v}(?![0-9A-Za-z])")
        return bool(pat.search(text) or pat.search(names))

    leaks = [v for v in identifiers if leaked(v)]
    assert not leaks, leaks
    rows = _manifest(tmp_path / "one")
    assert all(len(r["input"]) == 16 and "/" not in r["input"] for r in rows)
    crosswalk = tmp_path / "site_private" / "crosswalk.jsonl"
    assert stat.S_IMODE(os.stat(crosswalk).st_mode) == 0o600
    paths = {json.loads(x)["input"] for x in crosswalk.read_text().splitlines()}
    assert paths == {p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file()}


def test_split_does_not_depend_on_the_secret(small_synth, ct_spec, tmp_path):
    from fedimg.dicom.deid import Pseudonymizer, SiteSecret

    src = small_synth.out_dir / "site-2"
    plain = preprocess(src, tmp_path / "plain", ct_spec, site="s", progress=False)
    a = preprocess(
        src,
        tmp_path / "a",
        ct_spec,
        site="s",
        progress=False,
        pseudonymizer=Pseudonymizer(SiteSecret.generate(tmp_path / "a.secret")),
    )
    b = preprocess(
        src,
        tmp_path / "b",
        ct_spec,
        site="s",
        progress=False,
        pseudonymizer=Pseudonymizer(SiteSecret.generate(tmp_path / "b.secret")),
    )

    def by_counts(res):
        return sorted((json.dumps(c.label_counts, sort_keys=True), c.split) for c in res.cases)

    assert by_counts(a) == by_counts(b) == by_counts(plain)
    assert "_split_key" not in (tmp_path / "a" / "summary.json").read_text()
