"""Regularizing tilted and unevenly spaced stacks against analytically known volumes."""

from __future__ import annotations

import numpy as np
import pytest

from fedimg.dicom.resample import regularize


def _field(p: np.ndarray) -> np.ndarray:
    """A smooth linear field in LPS mm: linear interpolation reproduces it exactly."""
    return 2.0 * p[..., 0] - 0.5 * p[..., 1] + 3.0 * p[..., 2] + 7.0


def _stack(positions, row, col, dc, dr, ni=24, nj=20):
    data = np.empty((ni, nj, len(positions)), dtype=np.float32)
    i, j = np.meshgrid(np.arange(ni), np.arange(nj), indexing="ij")
    for k, p in enumerate(positions):
        pts = p + i[..., None] * dc * row + j[..., None] * dr * col
        data[:, :, k] = _field(pts)
    return data


def _check(reg, interior=slice(4, -4)):
    ni, nj, nk = reg.data.shape
    i, j, k = np.meshgrid(np.arange(ni), np.arange(nj), np.arange(nk), indexing="ij")
    lps = (np.diag([-1, -1, 1, 1]) @ reg.affine_ras @ np.stack([i, j, k, np.ones_like(i)]).reshape(4, -1))[:3].T
    expected = _field(lps).reshape(ni, nj, nk)
    np.testing.assert_allclose(reg.data[interior, interior], expected[interior, interior], atol=1e-3)


def test_uneven_spacing_is_made_uniform_exactly_for_a_linear_field():
    row, col = np.array([1.0, 0, 0]), np.array([0, 1.0, 0])
    z = np.array([0.0, 2.0, 4.0, 6.5, 8.5, 10.5])  # one step of 2.5 among steps of 2
    pos = np.stack([np.zeros_like(z), np.zeros_like(z), z], axis=1)
    reg = regularize(_stack(pos, row, col, 1.0, 1.0), pos, row, col, 1.0, 1.0)
    assert reg.data.shape[2] == int(round(10.5 / 2.0)) + 1
    assert "made uniform" in reg.correction
    _check(reg)


def test_gantry_tilt_is_removed_exactly_for_a_linear_field():
    row, col = np.array([1.0, 0, 0]), np.array([0, 1.0, 0])
    k = np.arange(8)
    pos = np.stack([np.zeros(8), 0.35 * k, 2.0 * k], axis=1)  # y shifts with z: about 10 degrees
    reg = regularize(_stack(pos, row, col, 1.0, 1.0), pos, row, col, 1.0, 1.0)
    assert "gantry tilt 9.93 degrees removed" in reg.correction
    # The regular grid is orthogonal: the slice axis is the normal.
    np.testing.assert_allclose(reg.affine_ras[:3, 2], [0, 0, 2.0], atol=1e-9)
    _check(reg, interior=slice(4, -4))


def test_labels_stay_labels_and_big_holes_are_refused():
    row, col = np.array([1.0, 0, 0]), np.array([0, 1.0, 0])
    z = np.array([0.0, 2.0, 4.0, 6.0, 8.0])
    pos = np.stack([np.zeros(5), np.zeros(5), z], axis=1)
    lab = np.zeros((6, 6, 5), dtype=np.uint8)
    lab[2:4, 2:4, 1:4] = 2
    reg = regularize(lab, pos, row, col, 1.0, 1.0, order=0)
    assert set(np.unique(reg.data).tolist()) == {0, 2}
    far = pos.copy()
    far[3:, 2] += 10.0  # a 12 mm hole among 2 mm steps
    with pytest.raises(ValueError, match="refusing to invent slices"):
        regularize(lab.astype(np.float32), far, row, col, 1.0, 1.0)


def test_tilted_ct_agrees_with_dcm2niix_correction(tmp_path):
    """The GE head CT of dcm_qa_ct (18.5 degree tilt, uneven spacing) against dcm2niix's _Tilt_Eq_ output."""
    import json
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import nibabel as nib
    from scipy import ndimage

    from fedimg.config import GeometrySpec
    from fedimg.preprocess.convert import convert
    from tests.conftest import shared

    src = shared("dicom/dcm_qa/dcm_qa_ct/In/GE")
    exe = shutil.which("dcm2niix") or str(Path(sys.executable).parent / "dcm2niix")
    if not Path(exe).exists():
        pytest.skip("dcm2niix not installed (pip install dcm2niix)")
    refused = convert(src, tmp_path / "refuse", progress=False)
    assert refused.summary["counts"]["converted"] == 0  # default: refuse, with the reason
    convert(src, tmp_path / "fix", GeometrySpec(irregular="resample"), progress=False)
    rows = [json.loads(x) for x in (tmp_path / "fix" / "manifest.jsonl").read_text().splitlines()]
    fixed = [r for r in rows if r["status"] == "converted"]
    assert fixed and all("gantry tilt 18.5 degrees removed" in r["correction"] for r in fixed)
    ours = nib.as_closest_canonical(nib.load(tmp_path / "fix" / fixed[0]["output"]))
    (tmp_path / "d2n").mkdir()
    subprocess.run(
        [exe, "-b", "n", "-z", "n", "-f", "%s", "-o", str(tmp_path / "d2n"), str(src)], check=True, capture_output=True
    )
    (ref_path,) = list((tmp_path / "d2n").glob("*Tilt_Eq*.nii"))
    ref = nib.as_closest_canonical(nib.load(ref_path))
    rd = ref.get_fdata()
    idx = np.indices(rd.shape).reshape(3, -1)
    world = ref.affine @ np.vstack([idx, np.ones(idx.shape[1])])
    vox = np.linalg.inv(ours.affine) @ world
    sampled = ndimage.map_coordinates(ours.get_fdata(), vox[:3], order=1, cval=np.nan)
    inside = np.isfinite(sampled) & (rd.ravel() > -500)
    assert inside.sum() > 1e6
    assert np.corrcoef(sampled[inside], rd.ravel()[inside])[0, 1] > 0.99
    assert np.median(np.abs(sampled[inside] - rd.ravel()[inside])) < 5.0  # HU
