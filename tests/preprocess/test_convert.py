"""fedimg convert: raw volumes as acquired, manifest, incremental and interrupted re-runs."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from fedimg.preprocess.convert import STATE_FILE, convert
from fedimg.preprocess.manifest import read_manifest


def _hash_tree(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _same_grid(a: np.ndarray, b: np.ndarray, shape) -> bool:
    """Whether two affines describe the same voxel centres (axes may be flipped)."""
    b = b.copy()
    for ax in range(3):
        if np.dot(a[:3, ax], b[:3, ax]) < 0:  # flipped axis: index n-1-i
            b[:3, 3] += b[:3, ax] * (shape[ax] - 1)
            b[:3, ax] *= -1
    return bool(np.allclose(a, b, atol=1e-4))


def test_convert_raw_volumes_match_ground_truth(small_synth, tmp_path):
    src = small_synth.out_dir / "site-1"
    res = convert(src, tmp_path / "out", workers=2, progress=False)
    rows = read_manifest(tmp_path / "out")
    n_files = sum(1 for p in src.rglob("*") if p.is_file())
    assert len(rows) == n_files == res.src_files
    truth = {
        c["series_instance_uid"]: c
        for c in json.loads(small_synth.ground_truth_path.read_text())["sites"]["site-1"]["cases"]
    }
    converted = [r for r in rows if r["status"] == "converted"]
    assert {r["series_uid"] for r in converted} == set(truth)
    # NIfTI labels are not DICOM: convert refuses them as such (preprocess uses them).
    assert {r["reason"] for r in rows if r["status"] != "converted"} == {"NOT_DICOM"}
    for uid, case in truth.items():
        out = next(r["output"] for r in converted if r["series_uid"] == uid)
        img = nib.load(tmp_path / "out" / out)
        assert _same_grid(img.affine, np.array(case["affine_ras"]), img.shape)
        assert list(img.shape) == case["shape"]
        # Raw values: modality LUT only, so Hounsfield units of air and organ.
        data = np.asarray(img.dataobj)
        first = sorted((small_synth.out_dir / case["image_series_dir"]).iterdir())[0]
        ds = pydicom.dcmread(first)
        hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        # Find this file's slice through its position: voxel (0, 0, k) sits at its IPP.
        ipp_ras = np.array(ds.ImagePositionPatient, dtype=float) * [-1, -1, 1]
        ks = [k for k in range(img.shape[2]) if np.allclose((img.affine @ [0, 0, k, 1])[:3], ipp_ras, atol=1e-3)]
        assert len(ks) == 1
        np.testing.assert_array_equal(data[:, :, ks[0]], hu.T.astype(np.float32))


def test_incremental_and_interrupted_runs_match_a_clean_run(small_synth, tmp_path):
    full_src = small_synth.out_dir / "site-2"
    clean = tmp_path / "clean"
    convert(full_src, clean, workers=1, progress=False)

    # New studies arrive: start with one patient folder, then add the rest.
    src = tmp_path / "src"
    patients = sorted(p for p in full_src.iterdir() if p.is_dir())
    shutil.copytree(patients[0], src / patients[0].name)
    shutil.copy2(full_src / "labels.csv", src / "labels.csv")  # the site's label sheet is part of the export
    out = tmp_path / "out"
    first = convert(src, out, workers=1, progress=False)
    assert first.reused == 0
    for p in patients[1:]:
        shutil.copytree(p, src / p.name)
    second = convert(src, out, workers=2, progress=False)
    n_series_first = len(first.outputs)
    assert second.reused == n_series_first  # only the new studies were converted
    assert sorted(second.outputs) == sorted(json.loads((out / STATE_FILE).read_text()))

    # A run killed midway: some outputs missing, no state update. Re-running completes it.
    killed = tmp_path / "killed"
    convert(src, killed, workers=1, progress=False)
    victims = sorted((killed / "series").glob("*.nii.gz"))[::2]
    for v in victims:
        v.unlink()
    (killed / "series" / ".half-written.tmp").write_bytes(b"partial")  # left by a crash
    convert(src, killed, workers=1, progress=False)
    a = {k: v for k, v in _hash_tree(clean).items() if k.startswith("series/")}
    b = {k: v for k, v in _hash_tree(killed).items() if k.startswith("series/") and not k.endswith(".tmp")}
    assert a == b
    assert read_manifest(clean) == read_manifest(killed)


@pytest.mark.parametrize("workers", [1, 2])
def test_parallel_and_serial_give_identical_outputs(small_synth, tmp_path, workers):
    src = small_synth.out_dir / "site-1"
    convert(src, tmp_path / "w", workers=workers, progress=False)
    ref = tmp_path.parent / "ref_convert_site1"
    if not ref.exists():
        convert(src, ref, workers=1, progress=False)
    assert {k: v for k, v in _hash_tree(tmp_path / "w").items() if k.startswith("series/")} == {
        k: v for k, v in _hash_tree(ref).items() if k.startswith("series/")
    }
