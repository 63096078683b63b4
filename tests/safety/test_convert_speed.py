"""`fedimg convert` speed without a change of output (issue 14).

Each file is parsed once: the header pass notes where uncompressed little-endian
pixels lie, and the pixels are read by that offset (compressed, big-endian and
deflated files keep pydicom's decoders). These tests check that the offset read
gives exactly pydicom's values on real and synthetic data, that a file changed
after indexing is read again in full, that the NIfTI bytes are unchanged, and
that conversion imports neither scipy.ndimage nor nibabel's DICOM reader. No timing is
asserted here: benchmarks/bench_dicom.py measures speed.
"""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from fedimg.atomic import write_nifti
from fedimg.dicom.index import group_series
from fedimg.dicom.pixels import decode_stored, mask_stored_bits, read_native, rescale
from fedimg.dicom.volume import load_volume, series_geometry
from fedimg.preprocess.convert import convert
from fedimg.preprocess.scan import index_source

REPO = Path(__file__).resolve().parents[2]
DICOM = REPO.parent / "shared" / "data" / "dicom"
CT = "1.2.840.10008.5.1.4.1.1.2"


def _ct_file(path: Path, z: float, stored: np.ndarray, *, bits_stored: int = 12, signed: bool = True, ts=None) -> None:
    """One CT slice whose stored values carry garbage above (0028,0101) Bits Stored."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ts or ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CT, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SeriesNumber = "1.2.3", "1.2.3.4", 1
    ds.Modality, ds.ImageType = "CT", ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = int(signed)
    ds.ImageOrientationPatient, ds.ImagePositionPatient, ds.PixelSpacing = [1, 0, 0, 0, 1, 0], [0, 0, z], [0.5, 0.5]
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.PixelData = stored.astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _noisy(rng: np.random.Generator, n: int, rows: int = 70, cols: int = 90) -> np.ndarray:
    """Raw 16-bit words: 12-bit values with random bits above them (as some scanners leave overlays)."""
    return rng.integers(0, 1 << 16, size=(n, rows, cols), dtype=np.uint16)


def _expected(raw: np.ndarray, bits: int, signed: bool) -> np.ndarray:
    low = raw.astype(np.int64) & ((1 << bits) - 1)
    if signed:
        low = np.where(low >= 1 << (bits - 1), low - (1 << bits), low)
    return low


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
@pytest.mark.parametrize("signed", [True, False])
def test_convert_parses_each_file_once_and_keeps_the_values(tmp_path, monkeypatch, ts, signed):
    rng = np.random.default_rng(0)
    raw = _noisy(rng, 5)
    for k in range(5):
        _ct_file(tmp_path / "src" / f"{k}.dcm", 1.5 * k, raw[k], signed=signed, ts=ts)
    reads: list[str] = []
    real = pydicom.dcmread

    def counting(fp, *args, **kwargs):
        reads.append(str(fp))
        return real(fp, *args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", counting)
    res = convert(tmp_path / "src", tmp_path / "out", workers=1, progress=False, compress=False)
    # One parse per file (the header pass); before, every file was parsed a second time for its pixels.
    assert sorted(reads) == sorted(str(tmp_path / "src" / f"{k}.dcm") for k in range(5))
    (out,) = res.outputs
    img = nib.load(tmp_path / "out" / out)
    got = np.asarray(img.dataobj)
    # (i, j, k) = (column, row, slice); the values are the masked, sign-extended stored values plus the LUT.
    want = _expected(raw, 12, signed).transpose(2, 1, 0) - 1024
    np.testing.assert_array_equal(got, want)


def test_offset_read_equals_pydicom_decode_on_real_files():
    folders = [
        DICOM / "dcm_qa" / "dcm_qa_12bit",
        DICOM / "dcm_qa" / "dcm_qa_ts",
        DICOM / "dcm_qa" / "dcm_qa_deident",
        DICOM / "dcm_qa" / "dcm_qa_ct",
        DICOM / "dicom2nifti" / "anatomical",
    ]
    present = [f for f in folders if f.is_dir()]
    if not present:
        pytest.skip(f"real test data not available under {DICOM}")
    native = other = 0
    for folder in present:
        for h in index_source(folder, progress=False).image_headers:
            ds = pydicom.dcmread(h.path)
            if h.native is None:
                other += 1
                continue
            native += 1
            fast, slow = read_native(h.path, h.native), decode_stored(ds)
            assert fast is not None and fast.dtype == slow.dtype and fast.shape == slow.shape, h.rel
            np.testing.assert_array_equal(fast, slow, err_msg=h.rel)
            assert (h.native.slope, h.native.intercept) == rescale(ds), h.rel
    # Most of these are uncompressed little endian; dcm_qa_ts also holds compressed and big-endian copies.
    assert native >= 250 and other >= 1, (native, other)


def test_compressed_and_big_endian_files_keep_pydicoms_decoders():
    folder = DICOM / "dcm_qa" / "dcm_qa_ts"
    if not folder.is_dir():
        pytest.skip(f"real test data not available: {folder}")
    headers = index_source(folder, progress=False).image_headers
    by_ts = {h.transfer_syntax: h.native is not None for h in headers}
    assert by_ts["1.2.840.10008.1.2"] and by_ts["1.2.840.10008.1.2.1"]  # implicit / explicit VR little endian
    assert not any(v for ts, v in by_ts.items() if ts not in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1"))
    assert len(by_ts) >= 5


def test_a_file_changed_after_indexing_is_read_again(tmp_path):
    rng = np.random.default_rng(1)
    raw = _noisy(rng, 3)
    for k in range(3):
        _ct_file(tmp_path / f"{k}.dcm", 2.0 * k, raw[k])
    (group,) = group_series(index_source(tmp_path, progress=False).image_headers)
    geo = series_geometry(group)
    changed = next(h for h in group.headers if h.path.name == "1.dcm")
    assert changed.native is not None
    new = raw.copy()
    new[1] = rng.integers(0, 1 << 16, size=raw[1].shape, dtype=np.uint16)
    _ct_file(changed.path, 2.0, new[1])  # same size, other pixels
    st = changed.path.stat()
    os.utime(changed.path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assert read_native(changed.path, changed.native) is None  # not the file that was indexed
    vol = load_volume(group, geo)
    np.testing.assert_array_equal(vol.stored, _expected(new, 12, True).transpose(2, 1, 0).astype(np.int16))


@pytest.mark.parametrize("dtype", ["u1", "i1", "u2", "i2", ">u2", ">i2", "u4", "i4", ">i4", "u8", "i8"])
def test_mask_in_the_stored_width_equals_the_int64_reference(dtype):
    rng = np.random.default_rng(2)
    native = np.dtype(dtype).newbyteorder("=")
    width = native.itemsize * 8
    arr = rng.integers(np.iinfo(native).min, np.iinfo(native).max, size=4000, dtype=native, endpoint=True)
    arr = arr.astype(dtype)  # big-endian where asked: pydicom decodes big-endian pixel data that way
    for bits in sorted({1, 2, width // 2, width - 1, width}):
        for signed in (False, True):
            got = mask_stored_bits(arr, width, bits, signed)
            if bits >= width:
                assert got is arr
                continue
            # Reference in Python integers: the low bits of the two's-complement value, sign-extended.
            low = [int(v) & ((1 << bits) - 1) for v in arr.tolist()]
            want = [v - (1 << bits) if signed and v >= 1 << (bits - 1) else v for v in low]
            assert got.tolist() == want, f"{dtype} {bits} {signed}"
            expected_type = np.int64 if width == 64 else np.dtype(f"{'i' if signed else 'u'}{width // 8}")
            assert got.dtype == expected_type


def test_nifti_bytes_are_nibabels_and_gzip_holds_no_name_or_time(tmp_path):
    data = np.asfortranarray(np.arange(6 * 7 * 5, dtype=np.int16).reshape(6, 7, 5) - 100)
    affine = np.diag([0.5, 0.6, 2.0, 1.0])
    affine[:3, 3] = [-10, 20, 30]
    write_nifti(tmp_path / "a.nii", data, affine, scale=(1.0, -1024.0))
    write_nifti(tmp_path / "a.nii.gz", data, affine, scale=(1.0, -1024.0))
    # The same header and voxels nibabel's own save writes for this image.
    img = nib.Nifti1Image(data, affine)
    img.header.set_slope_inter(1.0, -1024.0)
    for key, value in (("descrip", b"fedimg"), ("aux_file", b""), ("intent_name", b""), ("db_name", b"")):
        img.header[key] = value
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, tmp_path / "ref.nii")
    assert (tmp_path / "a.nii").read_bytes() == (tmp_path / "ref.nii").read_bytes()
    blob = (tmp_path / "a.nii.gz").read_bytes()
    assert gzip.decompress(blob) == (tmp_path / "a.nii").read_bytes()
    assert blob[3] & 0x08 == 0 and blob[4:8] == b"\0\0\0\0"  # no FNAME field (temporary name), mtime 0
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "a.nii.gz").stat().st_mode & 0o777 == 0o666 & ~umask
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".fedimg-tmp-")]


def test_convert_does_not_import_scipy_ndimage_or_nibabels_dicom_reader(tmp_path):
    rng = np.random.default_rng(3)
    raw = _noisy(rng, 3, 8, 8)
    for k in range(3):
        _ct_file(tmp_path / "src" / f"{k}.dcm", 2.0 * k, raw[k])
    code = (
        "import sys; from fedimg.cli import main; rc = main(['convert', sys.argv[1], sys.argv[2], '--quiet']); "
        "print('LOADED', sorted(m for m in ('scipy.ndimage', 'nibabel.nicom', 'asyncio', 'torch') "
        "if m in sys.modules)); "
        "sys.exit(rc)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "src"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "LOADED []" in proc.stdout
    assert len(list((tmp_path / "out" / "series").glob("*.nii.gz"))) == 1


def test_headers_read_by_workers_equal_those_read_here(tmp_path):
    from concurrent.futures import ProcessPoolExecutor

    rng = np.random.default_rng(4)
    raw = _noisy(rng, 40, 48, 48)  # over 4 KiB of pixels: deferred, so read by offset
    for k in range(40):
        _ct_file(tmp_path / "src" / f"{k:02d}.dcm", 1.0 * k, raw[k])
    (tmp_path / "src" / "notes.txt").write_text("not dicom")
    here = index_source(tmp_path / "src", progress=False)
    with ProcessPoolExecutor(2) as pool:
        there = index_source(tmp_path / "src", progress=False, executor=lambda n: pool)
    assert there.image_headers == here.image_headers and len(here.image_headers) == 40
    assert there.rows == here.rows and there.files == here.files
    assert all(h.native is not None for h in there.image_headers)


def test_convert_with_workers_writes_what_one_process_writes(tmp_path):
    rng = np.random.default_rng(5)
    raw = _noisy(rng, 70, 48, 48)  # more files than PARALLEL_INDEX_MIN: the headers are read by the workers
    for k in range(70):
        _ct_file(tmp_path / "src" / "a" / f"{k:02d}.dcm", 1.0 * k, raw[k])
    for k in range(4):
        _ct_file(tmp_path / "src" / "b" / f"{k}.dcm", 1.0 * k, raw[k], signed=False)
    one = convert(tmp_path / "src", tmp_path / "one", workers=1, progress=False)
    two = convert(tmp_path / "src", tmp_path / "two", workers=2, progress=False)
    assert one.outputs == two.outputs and len(one.outputs) == 2  # b repeats positions of a: a copy, its own volume
    assert (tmp_path / "one" / "manifest.jsonl").read_text() == (tmp_path / "two" / "manifest.jsonl").read_text()
    for name in one.outputs:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
