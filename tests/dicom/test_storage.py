"""Synthetic checks of the storage cases: codecs, bit masking, copies of a series,
enhanced multi-frame objects and Siemens mosaics (no real data needed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

from fedimg.dicom.index import group_series, scan
from fedimg.dicom.mosaic import MosaicInfo, split_tiles, tile_positions
from fedimg.dicom.pixels import _mask_bits
from fedimg.dicom.reasons import Reason, RefusedError
from fedimg.dicom.volume import load_volume, series_geometry

CT = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"


def _base(sop_class: str, rows: int, cols: int, series_uid: str, sop_uid: str | None = None) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid or generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 1
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    return ds


def _ct_slice(
    z: float, pixels: np.ndarray, series_uid: str = "1.2.3.4", sop_uid: str | None = None, intercept: float = -1024.0
) -> Dataset:
    ds = _base(CT, *pixels.shape, series_uid=series_uid, sop_uid=sop_uid)
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [0, 0, z]
    ds.PixelSpacing = [0.5, 0.5]
    ds.RescaleSlope, ds.RescaleIntercept = 1, intercept
    ds.PixelData = pixels.astype(np.int16).tobytes()
    return ds


def _write(ds: Dataset, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _series(folder: Path, n: int = 3, uids: list[str] | None = None) -> np.ndarray:
    vol = np.arange(n * 4 * 5, dtype=np.int16).reshape(n, 4, 5)
    for k in range(n):
        _write(_ct_slice(2.0 * k, vol[k], sop_uid=uids[k] if uids else None), folder / f"{k}.dcm")
    return vol


def test_bits_stored_masks_high_bits_and_sign_extends() -> None:
    ds = Dataset()
    ds.BitsAllocated, ds.BitsStored, ds.PixelRepresentation = 16, 12, 1
    raw = np.array([0xF7FF, 0x0800, 0x1001], dtype=np.uint16)  # garbage above bit 11
    np.testing.assert_array_equal(_mask_bits(raw, ds), [2047, -2048, 1])
    ds.PixelRepresentation = 0
    np.testing.assert_array_equal(_mask_bits(raw, ds), [2047, 2048, 1])


def test_missing_codec_refuses_the_series(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pydicom.pixels import get_decoder

    vol = np.arange(3 * 4 * 5, dtype=np.int16).reshape(3, 4, 5)
    for k in range(3):
        ds = _ct_slice(2.0 * k, vol[k])
        ds.compress(RLELossless, encoding_plugin="pydicom")
        _write(ds, tmp_path / "src" / f"{k}.dcm")
    groups = group_series(scan(tmp_path / "src").headers)
    assert len(groups) == 1
    # With the plugin present the series decodes to the stored values plus the intercept.
    volume = load_volume(groups[0], series_geometry(groups[0]))
    np.testing.assert_array_equal(volume.data, np.transpose(vol, (2, 1, 0)).astype(np.float32) - 1024)
    # Simulate an environment without any RLE decoder plugin.
    monkeypatch.setattr(get_decoder(RLELossless), "_available", {})
    with pytest.raises(RefusedError) as exc:
        series_geometry(groups[0])
    assert exc.value.reason == Reason.CODEC_MISSING
    assert "1.2.840.10008.1.2.5" in exc.value.detail

    from fedimg.preprocess.convert import convert

    convert(tmp_path / "src", tmp_path / "out", workers=1, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert {(r["status"], r["reason"]) for r in rows} == {("refused", "CODEC_MISSING")}


def test_copies_of_one_series_in_two_folders_are_split(tmp_path: Path) -> None:
    uids = [generate_uid() for _ in range(3)]
    _series(tmp_path / "a", uids=uids)
    _series(tmp_path / "b", uids=uids)  # the same instances exported again
    groups = group_series(scan(tmp_path).headers)
    assert sorted(g.first.folder for g in groups) == ["a", "b"]
    for g in groups:
        assert series_geometry(g).shape == (5, 4, 3)


def test_one_series_spread_over_folders_stays_one_volume(tmp_path: Path) -> None:
    vol = np.zeros((4, 4, 5), dtype=np.int16)
    for k in range(4):
        _write(_ct_slice(2.0 * k, vol[k]), tmp_path / f"part{k % 2}" / f"{k}.dcm")
    groups = group_series(scan(tmp_path).headers)
    assert len(groups) == 1
    assert series_geometry(groups[0]).shape == (5, 4, 4)


def test_repeated_instance_in_one_folder_is_refused(tmp_path: Path) -> None:
    uids = [generate_uid() for _ in range(3)]
    _series(tmp_path / "a", uids=uids)
    ds = pydicom.dcmread(tmp_path / "a" / "0.dcm")
    _write(ds, tmp_path / "a" / "0-copy.dcm")
    groups = group_series(scan(tmp_path).headers)
    assert len(groups) == 1
    with pytest.raises(RefusedError) as exc:
        series_geometry(groups[0])
    assert exc.value.reason == Reason.DUPLICATE_POSITION
    assert "(0008,0018)" in exc.value.detail


def test_series_number_splits_a_reused_series_uid(tmp_path: Path) -> None:
    _series(tmp_path / "a")
    for k, p in enumerate(sorted((tmp_path / "a").iterdir())):
        ds = pydicom.dcmread(p)
        ds.SeriesNumber = 2
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        _write(ds, tmp_path / "a" / f"second-{k}.dcm")
    groups = group_series(scan(tmp_path).headers)
    assert sorted(g.first.series_number for g in groups) == [1, 2]


def _enhanced(path: Path, zs: list[float], slopes: list[float]) -> np.ndarray:
    n, rows, cols = len(zs), 4, 5
    frames = np.arange(n * rows * cols, dtype=np.int16).reshape(n, rows, cols)
    ds = _base(ENHANCED_CT, rows, cols, series_uid="1.2.3.9")
    ds.NumberOfFrames = n
    shared = Dataset()
    orient = Dataset()
    orient.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared.PlaneOrientationSequence = Sequence([orient])
    measures = Dataset()
    measures.PixelSpacing = [0.5, 0.25]
    measures.SliceThickness = 1
    shared.PixelMeasuresSequence = Sequence([measures])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per = []
    for z, slope in zip(zs, slopes):
        item = Dataset()
        pos = Dataset()
        pos.ImagePositionPatient = [10, 20, z]
        item.PlanePositionSequence = Sequence([pos])
        lut = Dataset()
        lut.RescaleSlope, lut.RescaleIntercept, lut.RescaleType = slope, -100, "HU"
        item.PixelValueTransformationSequence = Sequence([lut])
        per.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per)
    ds.PixelData = frames.tobytes()
    _write(ds, path)
    return frames


def test_enhanced_multiframe_sorted_by_position_with_per_frame_lut(tmp_path: Path) -> None:
    zs, slopes = [4.0, 0.0, 2.0], [1.0, 2.0, 3.0]  # frames stored out of spatial order
    frames = _enhanced(tmp_path / "mf.dcm", zs, slopes)
    groups = group_series(scan(tmp_path).headers)
    geo = series_geometry(groups[0])
    assert geo.shape == (5, 4, 3)
    np.testing.assert_allclose(geo.affine_ras[:3, 3], [-10, -20, 0])
    np.testing.assert_allclose(np.diag(geo.affine_ras)[:3], [-0.25, -0.5, 2.0])
    vol = load_volume(groups[0], geo)
    for k, f in enumerate([1, 2, 0]):  # z = 0, 2, 4
        np.testing.assert_array_equal(vol.data[:, :, k], frames[f].T * slopes[f] - 100)


def test_multiframe_without_per_frame_groups_is_refused(tmp_path: Path) -> None:
    ds = _base(CT, 4, 5, series_uid="1.2.3.10")
    ds.NumberOfFrames = 3
    ds.PixelData = np.zeros((3, 4, 5), dtype=np.int16).tobytes()
    _write(ds, tmp_path / "mf.dcm")
    groups = group_series(scan(tmp_path).headers)
    with pytest.raises(RefusedError) as exc:
        series_geometry(groups[0])
    assert exc.value.reason == Reason.UNSUPPORTED_MULTIFRAME


def test_mosaic_without_csa_header_is_refused(tmp_path: Path) -> None:
    ds = _ct_slice(0.0, np.zeros((8, 8)))
    ds.Modality = "MR"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND", "MOSAIC"]
    _write(ds, tmp_path / "m.dcm")
    groups = group_series(scan(tmp_path).headers)
    with pytest.raises(RefusedError) as exc:
        series_geometry(groups[0])
    assert exc.value.reason == Reason.NO_GEOMETRY
    assert "(0029,1010)" in exc.value.detail


def test_mosaic_tiles_and_centred_first_position() -> None:
    info = MosaicInfo(n_images=3, tiles_per_side=2, tile_rows=2, tile_columns=3, slice_normal=(0.0, 0.0, 1.0))
    grid = np.arange(4 * 6).reshape(4, 6)
    tiles = split_tiles(grid, info)
    np.testing.assert_array_equal(tiles[1], grid[0:2, 3:6])
    np.testing.assert_array_equal(tiles[2], grid[2:4, 0:3])
    pos = tile_positions(info, (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0), (2.0, 1.0), 4, 6, 5.0)
    # grid IPP is the grid's corner; the first tile sits half a grid-minus-tile further in.
    np.testing.assert_allclose(pos[0], [1.0 * 1.5, 2.0 * 1.0, 0.0])
    np.testing.assert_allclose(pos[2], [1.5, 2.0, 10.0])


@pytest.mark.parametrize(("slope", "intercept"), [(b"abc", b"-1024"), (b"NaN", b"0"), (b"1", b"-inf"), (b"inf", b"0")])
def test_unusable_rescale_refuses_the_series(tmp_path: Path, slope: bytes, intercept: bytes) -> None:
    # pydicom refuses to set 'abc' as DS: write sentinels, then overwrite their bytes.
    for k in range(3):
        ds = _ct_slice(2.0 * k, np.zeros((4, 5), np.int16))
        ds.RescaleSlope, ds.RescaleIntercept = "9.87654", "-8.76543"
        _write(ds, tmp_path / f"{k}.dcm")
        data = (tmp_path / f"{k}.dcm").read_bytes()
        data = data.replace(b"9.87654 ", slope.ljust(8)).replace(b"-8.76543", intercept.ljust(8))
        (tmp_path / f"{k}.dcm").write_bytes(data)
    groups = group_series(scan(tmp_path).headers)
    with pytest.raises(RefusedError) as exc:
        load_volume(groups[0], series_geometry(groups[0]))
    assert exc.value.reason == Reason.PIXEL_DECODE_ERROR
    assert "(0028,105" in exc.value.detail


def _write_unchecked(ds: Dataset, path: Path) -> None:
    import warnings

    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(path, enforce_file_format=True)


def test_multiframe_unparsable_slope_is_refused_at_decode(tmp_path: Path) -> None:
    _enhanced(tmp_path / "mf.dcm", [0.0, 2.0, 4.0], [1.0, 1.0, 1.0])
    ds = pydicom.dcmread(tmp_path / "mf.dcm")
    ds.PerFrameFunctionalGroupsSequence[1].PixelValueTransformationSequence[0].RescaleSlope = "NaN"
    _write_unchecked(ds, tmp_path / "mf.dcm")
    groups = group_series(scan(tmp_path).headers)
    with pytest.raises(RefusedError) as exc:
        load_volume(groups[0], series_geometry(groups[0]))
    assert exc.value.reason == Reason.PIXEL_DECODE_ERROR


@pytest.mark.parametrize(("rows", "cols"), [(3, 5), (4, 4), (5, 5)])
def test_native_pixel_data_of_the_wrong_length_is_refused(tmp_path: Path, rows: int, cols: int) -> None:
    # Pixel data written for 4 x 5; the header says otherwise. pydicom only warns when
    # there is more data than the header describes and would crop or re-stride it.
    for k in range(3):
        ds = _ct_slice(2.0 * k, np.arange(20, dtype=np.int16).reshape(4, 5))
        ds.Rows, ds.Columns = rows, cols
        _write_unchecked(ds, tmp_path / f"{k}.dcm")
    groups = group_series(scan(tmp_path).headers)
    with pytest.raises(RefusedError) as exc:
        load_volume(groups[0], series_geometry(groups[0]))
    assert exc.value.reason == Reason.PIXEL_DECODE_ERROR


def test_odd_length_pixel_data_padding_byte_is_accepted(tmp_path: Path) -> None:
    # 8-bit 3 x 5 = 15 bytes, stored padded to 16: a valid file.
    for k in range(3):
        ds = _ct_slice(2.0 * k, np.zeros((3, 5), np.int16))
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = np.arange(15, dtype=np.uint8).tobytes() + b"\x00"
        _write_unchecked(ds, tmp_path / f"{k}.dcm")
    groups = group_series(scan(tmp_path).headers)
    vol = load_volume(groups[0], series_geometry(groups[0]))
    np.testing.assert_array_equal(vol.data[:, :, 0], np.arange(15).reshape(3, 5).T - 1024)


def test_empty_rows_is_no_geometry(tmp_path: Path) -> None:
    for k in range(3):
        ds = _ct_slice(2.0 * k, np.zeros((4, 5), np.int16))
        ds.add_new(0x00280010, "US", None)
        _write_unchecked(ds, tmp_path / f"{k}.dcm")
    headers = scan(tmp_path).headers
    assert [h.rows for h in headers] == [None] * 3
    with pytest.raises(RefusedError) as exc:
        series_geometry(group_series(headers)[0])
    assert exc.value.reason == Reason.NO_GEOMETRY


@pytest.mark.parametrize(
    ("cut", "reason"),
    [
        (lambda data: data[:150], Reason.TRUNCATED),  # inside the file meta
        (lambda data: b"\x00" * 128 + b"DICM", Reason.TRUNCATED),
        (lambda data: b"\x00" * 128 + b"DICM" + b"\xff" * 300, Reason.NOT_DICOM),
        (lambda data: data[: data.index(b"1.2.840.10008.5.1.4.1.1.2", 200) + 5], Reason.TRUNCATED),
    ],
)
def test_header_cut_files_are_refused_not_skipped(tmp_path: Path, cut, reason: Reason) -> None:
    from fedimg.dicom.index import FileProblem, read_header

    _write(_ct_slice(0.0, np.zeros((4, 5), np.int16)), tmp_path / "full.dcm")
    (tmp_path / "cut.dcm").write_bytes(cut((tmp_path / "full.dcm").read_bytes()))
    result = read_header(tmp_path / "cut.dcm", "cut.dcm")
    assert isinstance(result, FileProblem), result
    assert result.reason == reason


def test_deflated_file_is_not_truncated(tmp_path: Path) -> None:
    from pydicom.data import get_testdata_file

    from fedimg.dicom.index import DicomHeader, read_header

    path = Path(get_testdata_file("image_dfl.dcm"))
    assert isinstance(read_header(path, "image_dfl.dcm"), DicomHeader)
    # A deflated file that really is cut is still refused when its pixels are read.
    (tmp_path / "cut.dcm").write_bytes(path.read_bytes()[:-500])
    result = read_header(tmp_path / "cut.dcm", "cut.dcm")
    if isinstance(result, DicomHeader):
        from fedimg.dicom.pixels import decode_stored

        with pytest.raises(RefusedError):
            decode_stored(pydicom.dcmread(tmp_path / "cut.dcm"))
