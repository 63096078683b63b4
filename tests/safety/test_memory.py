"""Memory of convert and preprocess: stored integers plus one scale, no whole-volume float copies (issue 12).

A CT series of 16-bit stored values used to become a float32 volume (twice
its bytes) on load, then a flipped float32 copy, a resampled copy and a
float32 copy of its label (an int64 one while mapping label values):
preprocess peaked at 4.7x the series' pixel bytes, 10.9x with a label.
These tests pin the types that keep the peak low, check that the values are
the same as before (exactly in convert, to float32 rounding after
resampling), and measure the peak of a real preprocess run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from monai.data import MetaTensor

from fedimg import config as cfg
from fedimg.dicom.index import group_series
from fedimg.dicom.labels import load_nifti_on_grid, map_label_values
from fedimg.dicom.pixels import decode_stored, exactly_scalable
from fedimg.dicom.volume import load_volume, series_geometry
from fedimg.preprocess.convert import convert
from fedimg.preprocess.scan import index_source
from fedimg.preprocess.transforms import apply_spec, build_transforms
from fedimg.synth.bulk import write_bulk_ct
from tests.conftest import CT_SPEC, MR_SPEC, REPO


def _group(study: Path):
    (group,) = group_series(index_source(study, progress=False).image_headers)
    return group


def _reference(study: Path) -> np.ndarray:
    """Modality values as fedimg computed them before: float32(float64(stored) * slope + intercept), (i, j, k)."""
    files = sorted((study / "ct").glob("*.dcm"), key=lambda f: float(pydicom.dcmread(f).ImagePositionPatient[2]))
    slices = []
    for f in files:
        ds = pydicom.dcmread(f)
        stored = ds.pixel_array.astype(np.float64)
        slices.append((stored * float(ds.RescaleSlope) + float(ds.RescaleIntercept)).astype(np.float32).T)
    return np.stack(slices, axis=2)


def test_volume_keeps_the_stored_integers_and_one_lut(tmp_path):
    study = write_bulk_ct(tmp_path / "study", 9, 24, 32, label=False)
    # 12 of 16 bits stored: masking the high bits must not widen the values to int64 (4x the bytes).
    assert decode_stored(pydicom.dcmread(next((study / "ct").glob("*.dcm")))).dtype == np.uint16
    group = _group(study)
    vol = load_volume(group, series_geometry(group))
    assert vol.stored.dtype == np.uint16 and vol.is_scaled
    assert (vol.slope, vol.intercept) == (1.0, -1024.0)
    assert vol.stored.shape == (32, 24, 9) and vol.stored.flags.f_contiguous  # the NIfTI layout, no copy to write
    data = vol.data
    assert data.dtype == np.float32
    np.testing.assert_array_equal(data, _reference(study))


def test_volume_with_per_slice_luts_holds_float32_values(tmp_path):
    study = write_bulk_ct(tmp_path / "study", 6, 16, 20, slopes=[1.0, 0.5, 1.0, 0.5, 2.0, 1.0], label=False)
    group = _group(study)
    vol = load_volume(group, series_geometry(group))
    assert not vol.is_scaled and vol.stored.dtype == np.float32 and (vol.slope, vol.intercept) == (1.0, 0.0)
    np.testing.assert_array_equal(vol.data, _reference(study))


def test_exactly_scalable_is_what_float32_readers_reproduce():
    assert exactly_scalable(0, 4095, 1.0, -1024.0)
    assert exactly_scalable(-2000, 3000, 0.5, 0.0)
    assert not exactly_scalable(0, 4095, 0.1, 0.0)  # 0.1 is no float32 number
    assert not exactly_scalable(0, 65535, 1.0, 0.1)
    # Spans too wide to list value by value: only the identity on float32-exact integers.
    assert exactly_scalable(-(1 << 23), 1 << 23, 1.0, 0.0)
    assert not exactly_scalable(0, 1 << 22, 3.0, 0.0)
    assert not exactly_scalable(0, (1 << 24) + 1, 1.0, 0.0)


def test_convert_writes_stored_integers_with_scl_slope_where_exact(tmp_path):
    src = tmp_path / "src"
    write_bulk_ct(src / "a", 7, 20, 24, label=False)  # slope 1, intercept -1024: int16 + scaling (as dcm2niix)
    write_bulk_ct(src / "b", 7, 20, 24, slopes=[0.5] * 7, label=False)  # power-of-two slope: still exact
    write_bulk_ct(src / "c", 7, 20, 24, slopes=[0.1] * 7, label=False)  # not a float32 number: float32 values
    write_bulk_ct(src / "d", 7, 20, 24, slopes=[1.0, 2.0] * 3 + [1.0], label=False)  # per-slice LUT: float32
    convert(src, tmp_path / "out", workers=1, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    output = {r["input"].split("/")[0]: r["output"] for r in rows}
    expected = {
        "a": (np.int16, 1.0, -1024.0),
        "b": (np.int16, 0.5, -1024.0),
        "c": (np.float32, None, None),
        "d": (np.float32, None, None),
    }
    for name, (dtype, slope, inter) in expected.items():
        img = nib.load(tmp_path / "out" / output[name])
        assert img.get_data_dtype() == dtype, name
        # nibabel moves scl_slope / scl_inter of a loaded file to its data proxy.
        file_scale = (float(img.dataobj.slope), float(img.dataobj.inter))
        assert file_scale == ((1.0, 0.0) if slope is None else (slope, inter)), name
        ref = _reference(src / name)
        # The values readers see (nibabel applies scl_slope / scl_inter) are the float32 values of before.
        np.testing.assert_array_equal(np.asarray(img.dataobj), ref.astype(np.float64), err_msg=name)
        np.testing.assert_array_equal(img.get_fdata(dtype=np.float32), ref, err_msg=name)


def _volume_and_label(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A smooth int16 volume, a label with values 0/3/7, and an oblique LPS-style affine (no axis in RAS order)."""
    rng = np.random.default_rng(seed)
    shape = (50, 44, 36)
    i, j, k = np.meshgrid(*(np.linspace(0, 1, n) for n in shape), indexing="ij")
    stored = (1500 + 900 * np.sin(6 * i) * np.cos(5 * j) + 400 * k + rng.normal(0, 30, shape)).astype(np.int16)
    label = np.zeros(shape, dtype=np.uint8)
    label[(i - 0.5) ** 2 + (j - 0.4) ** 2 + (k - 0.5) ** 2 < 0.08] = 3
    label[(i - 0.6) ** 2 + (j - 0.5) ** 2 + (k - 0.4) ** 2 < 0.01] = 7
    theta = np.radians(8.0)
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ rot @ np.diag([0.8, 0.9, 1.7])
    affine[:3, 3] = [30.0, -12.0, 40.0]
    return stored, label, affine


@pytest.mark.parametrize("spec_path", [CT_SPEC, MR_SPEC], ids=["ct", "mr"])
def test_apply_spec_on_stored_integers_matches_the_monai_chain(spec_path):
    spec = cfg.load(cfg.PreprocessSpec, spec_path, ["target_spacing=[2.0, 2.5, 3.0]"])
    stored, raw_label, affine = _volume_and_label(0)
    slope, intercept = 0.5, -1024.0
    # The chain as it ran before: float32 modality values and a float32 0..N label through MONAI.
    hu = (stored.astype(np.float64) * slope + intercept).astype(np.float32)
    mapped = map_label_values(raw_label, [3, 7])
    aff = torch.as_tensor(affine, dtype=torch.float64)
    ref = build_transforms(spec, with_label=True)(
        {
            "image": MetaTensor(torch.as_tensor(hu[None]), affine=aff.clone()),
            "label": MetaTensor(torch.as_tensor(mapped[None].astype(np.float32)), affine=aff.clone()),
        }
    )
    ref_img = ref["image"].numpy()[0]
    ref_lbl = np.rint(ref["label"].numpy()[0]).astype(np.uint8)

    img, lbl, out_affine = apply_spec(spec, stored, affine, raw_label, scale=(slope, intercept))
    assert img.dtype == np.float32 and lbl.dtype == np.uint8  # the label keeps its stored values and type
    np.testing.assert_allclose(out_affine, ref["image"].affine.numpy(), atol=1e-6)
    assert img.shape == ref_img.shape == lbl.shape
    tol = 2e-4 if spec.modality == "CT" else 2e-3  # CT: [0, 1]; MR: z-scores
    np.testing.assert_allclose(img, ref_img, atol=tol)
    ours = map_label_values(lbl, [3, 7])
    assert set(np.unique(ours).tolist()) == {0, 1, 2}
    # Nearest neighbour: equal but where a sample falls within float32 rounding of a voxel border.
    assert (ours != ref_lbl).mean() < 1e-3


def test_nifti_label_is_read_in_its_stored_type(tmp_path):
    """A label NIfTI with scl_slope set used to come back as float64 (8 bytes per voxel)."""
    study = write_bulk_ct(tmp_path / "study", 8, 16, 20)
    stored_label = nib.load(study / "segmentation.nii")
    img = nib.Nifti1Image(np.asarray(stored_label.dataobj), stored_label.affine)
    img.header.set_slope_inter(1.0, 0.0)
    nib.save(img, tmp_path / "scaled_seg.nii")
    group = _group(study)
    data, scale = load_nifti_on_grid(tmp_path / "scaled_seg.nii", series_geometry(group))
    assert data.dtype == np.uint8 and scale == (1.0, 0.0)
    assert set(np.unique(data).tolist()) == {0, 1, 2}


_PEAK_SCRIPT = """
import gc, json, resource, sys
from pathlib import Path
from fedimg import config as cfg
from fedimg.preprocess.convert import convert
from fedimg.preprocess.pipeline import preprocess

spec = cfg.load(cfg.PreprocessSpec, sys.argv[1])
tmp = Path(sys.argv[2])
command = sys.argv[3]
def run(src, dst):
    if command == "convert":
        convert(src, dst, workers=1, progress=False)
    else:
        res = preprocess(src, dst, spec, site="s", progress=False, workers=1)
        assert len(res.cases) == 1 and res.cases[0].label, res.summary
# A small run first: every module and cache the command loads is in place before the baseline is read.
run(tmp / "small", tmp / f"small_{command}")
gc.collect()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
run(tmp / "large", tmp / f"large_{command}")
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"increase": (peak - base) * 1024}))
"""


@pytest.fixture(scope="module")
def large_series(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("memory")
    write_bulk_ct(tmp / "small" / "study", 12, 64, 64)
    write_bulk_ct(tmp / "large" / "study", 160, 512, 512)
    return tmp, 160 * 512 * 512 * 2


@pytest.mark.slow
@pytest.mark.parametrize(("command", "bound"), [("convert", 1.25), ("preprocess", 2.5)])
def test_peak_memory_is_bounded_by_the_pixel_bytes(large_series, command, bound):
    """Peak RSS growth of a whole run, over a warmed-up process, per byte of stored pixels (84 MB here).

    The growth of the high-water mark over the one the warm-up left, so the
    figures are net of imports (and somewhat below the full cost of the
    data). Measured after the change: convert 0.4x, preprocess 1.2x (with
    its uint8 label); before it: 2.1x and 10.5x.
    """
    tmp, pixel_bytes = large_series
    proc = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, str(CT_SPEC), str(tmp), command],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    increase = json.loads(proc.stdout.strip().splitlines()[-1])["increase"]
    assert increase <= bound * pixel_bytes, f"{command}: peak grew by {increase / pixel_bytes:.2f}x the pixel bytes"
