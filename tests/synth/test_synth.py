"""Tests of fedimg.synth: geometry, ground truth, heterogeneity, determinism, oracles."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from fedimg.synth import (
    CLASS_NAMES,
    Phantom,
    SynthResult,
    generate,
    load_ground_truth,
    site_profiles,
)
from fedimg.synth.geometry import SeriesGeometry

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> SynthResult:
    """3 sites x 2 requested cases: 2, 3 and 2 cases after each site's case_factor."""
    out = tmp_path_factory.mktemp("synth") / "out"
    return generate(out, n_sites=3, n_cases=2, seed=7, progress=False)


def _all_cases(result: SynthResult) -> list[dict]:
    truth = load_ground_truth(result.ground_truth_path)
    return [case for site in truth["sites"].values() for case in site["cases"]]


def _read_series(folder: Path) -> list[pydicom.Dataset]:
    files = [p for p in folder.iterdir() if p.is_file()]
    if not files:
        raise AssertionError(f"no files in {folder}")
    return [pydicom.dcmread(p) for p in files]


def _sorted_geometry(datasets: list[pydicom.Dataset]) -> tuple[np.ndarray, list[pydicom.Dataset]]:
    """RAS affine built independently from the headers, in Instance Number order.

    Slices are sorted by (0020,0032) projected on the normal of (0020,0037)
    (the DICOM.md rule); Instance Number must then be monotonic, and the
    affine's k axis follows increasing Instance Number, as the ground truth does.
    """
    iop = np.array(datasets[0].ImageOrientationPatient, dtype=float)
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    for ds in datasets:
        np.testing.assert_allclose(np.array(ds.ImageOrientationPatient, float), iop)
    by_position = sorted(datasets, key=lambda ds: float(np.dot(np.array(ds.ImagePositionPatient, float), normal)))
    instances = [int(ds.InstanceNumber) for ds in by_position]
    if instances == sorted(instances):
        ordered = by_position
    elif instances == sorted(instances, reverse=True):
        ordered = by_position[::-1]
    else:
        raise AssertionError(f"Instance Number not monotonic along the normal: {instances}")
    positions = np.array([np.array(ds.ImagePositionPatient, float) for ds in ordered])
    steps = np.diff(positions, axis=0)
    step = steps.mean(axis=0)
    np.testing.assert_allclose(steps, np.broadcast_to(step, steps.shape), atol=1e-4)
    row_spacing, col_spacing = (float(v) for v in ordered[0].PixelSpacing)
    affine = np.eye(4)
    affine[:3, 0] = row * col_spacing  # along a row, i.e. between columns
    affine[:3, 1] = col * row_spacing
    affine[:3, 2] = step
    affine[:3, 3] = positions[0]
    return LPS_TO_RAS @ affine, ordered


def _volume(ordered: list[pydicom.Dataset], rescale: bool) -> np.ndarray:
    """Stack slices into an (i, j, k) array, optionally converted to HU."""
    slices = []
    for ds in ordered:
        pixels = ds.pixel_array.astype(np.float64)
        if rescale:
            pixels = pixels * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        slices.append(pixels)
    return np.stack(slices, axis=0).transpose(2, 1, 0)


def _label_volume(result: SynthResult, case: dict) -> tuple[np.ndarray, np.ndarray]:
    """(label in (i, j, k), RAS affine) from the NIfTI or the DICOM mask series."""
    if case["label_format"] == "nifti":
        image = nib.load(result.out_dir / case["label_path"])
        return np.asarray(image.dataobj), image.affine
    affine, ordered = _sorted_geometry(_read_series(result.out_dir / case["label_series_dir"]))
    return _volume(ordered, rescale=False).astype(np.uint8), affine


def _interior(mask: np.ndarray) -> np.ndarray:
    """Voxels whose 6 neighbours are all in ``mask`` (one erosion step)."""
    padded = np.pad(mask, 1)
    inner = padded[1:-1, 1:-1, 1:-1].copy()
    for axis in range(3):
        for shift in (-1, 1):
            inner &= np.roll(padded, shift, axis=axis)[1:-1, 1:-1, 1:-1]
    return inner


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _dcm2niix() -> str | None:
    found = shutil.which("dcm2niix")
    if found:
        return found
    beside = Path(sys.executable).parent / "dcm2niix"
    return str(beside) if beside.is_file() else None


# --------------------------------------------------------------------------- (1) geometry


def test_geometry_read_back_matches_ground_truth(synth: SynthResult) -> None:
    for case in _all_cases(synth):
        datasets = _read_series(synth.out_dir / case["image_series_dir"])
        assert len(datasets) == case["n_image_files"] == case["shape"][2]
        affine, ordered = _sorted_geometry(datasets)
        np.testing.assert_allclose(affine, np.array(case["affine_ras"]), atol=1e-4)
        assert [ordered[0].Columns, ordered[0].Rows, len(ordered)] == case["shape"]
        assert {ds.SeriesInstanceUID for ds in datasets} == {case["series_instance_uid"]}
        assert {ds.FrameOfReferenceUID for ds in datasets} == {case["frame_of_reference_uid"]}
        assert ordered[0].PatientPosition == case["patient_position"]

        label, label_affine = _label_volume(synth, case)
        np.testing.assert_allclose(label_affine, np.array(case["affine_ras"]), atol=1e-4)
        assert list(label.shape) == case["shape"]


def test_dicom_mask_series_is_a_proper_secondary_capture(synth: SynthResult) -> None:
    masks = [c for c in _all_cases(synth) if c["label_format"] == "dicom_mask"]
    assert masks, "the 3 base sites include one with DICOM mask labels"
    for case in masks:
        for ds in _read_series(synth.out_dir / case["label_series_dir"]):
            assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
            assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
            assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
            assert list(ds.ImageType) == ["DERIVED", "SECONDARY", "OTHER"]
            assert ds.SeriesDescription == "Mask_Segmentation"
            assert ds.Modality == "CT"
            assert ds.SeriesInstanceUID == case["label_series_instance_uid"]
            assert ds.SeriesInstanceUID != case["series_instance_uid"]
            assert ds.StudyInstanceUID == case["study_instance_uid"]
            assert ds.FrameOfReferenceUID == case["frame_of_reference_uid"]
            assert ds.BurnedInAnnotation == "NO"
            assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == case["series_instance_uid"]
            assert set(np.unique(ds.pixel_array)) <= {0, 1, 2}


def test_files_are_part10_with_expected_names(synth: SynthResult) -> None:
    truth = load_ground_truth(synth.ground_truth_path)
    for site_name, site in truth["sites"].items():
        extension = site["profile"]["file_extension"]
        for case in site["cases"]:
            folder = synth.out_dir / case["image_series_dir"]
            names = sorted(p.name for p in folder.iterdir())
            assert names == [f"IM{k + 1:04d}{extension}" for k in range(case["shape"][2])]
            raw = (folder / names[0]).read_bytes()
            assert raw[128:132] == b"DICM"
            ds = pydicom.dcmread(folder / names[0])
            assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
            ids = case["identifiers"]
            assert case["study_dir"] == (
                f"{site_name}/{ids['patient_id']}_{ids['last_name']}/{ids['study_date']}_{ids['accession_number']}"
            )
            assert ds.PatientName == ids["patient_name"]
            assert ds.PatientID == ids["patient_id"]
            assert ds.AccessionNumber == ids["accession_number"]
            block = ds.private_block(0x0011, "FEDIMG_SYNTH")
            assert ids["patient_id"] in block[0x01].value


# --------------------------------------------------------------------------- (2) ground truth


def test_pixels_and_labels_match_the_phantom(synth: SynthResult) -> None:
    truth = load_ground_truth(synth.ground_truth_path)
    for site in truth["sites"].values():
        sigma = site["profile"]["noise_sigma_hu"]
        for case in site["cases"]:
            _, ordered = _sorted_geometry(_read_series(synth.out_dir / case["image_series_dir"]))
            hu = _volume(ordered, rescale=True)
            label, _ = _label_volume(synth, case)
            counts = np.bincount(label.ravel(), minlength=3)
            assert counts[1] == case["organ_voxels"]
            assert counts[2] == case["lesion_voxels"]
            assert (counts[2] > 0) == case["has_lesion"]

            organ = _interior(label == 1)
            assert organ.sum() > 100
            organ_hu = case["phantom"]["organ"]["hu"]
            assert abs(hu[organ].mean() - organ_hu) < 10.0, (case["case_id"], hu[organ].mean())
            # The organ is homogeneous, so its interior spread is the noise.
            assert 0.75 * sigma < hu[organ].std() < 1.25 * sigma + 1.0, case["case_id"]

            voxel_mm3 = float(np.prod(case["spacing"]))
            expected = case["phantom"]["organ"]["label_volume_mm3"]
            assert abs(counts[1] * voxel_mm3 / expected - 1.0) < 0.15, case["case_id"]
            if case["has_lesion"]:
                lesion = case["phantom"]["lesion"]
                assert abs(counts[2] * voxel_mm3 / lesion["label_volume_mm3"] - 1.0) < 0.15
                core = _interior(label == 2)
                if core.sum() >= 20:
                    assert abs(hu[core].mean() - lesion["hu"]) < 10.0, case["case_id"]
                assert lesion["hu"] < organ_hu  # hypodense
            # Air outside the body, far from it: the corners of the volume.
            corner = hu[:5, :5, :]
            assert abs(np.median(corner) - (-1000.0)) < 3 * sigma


def test_phantom_structure_and_sampling() -> None:
    lesions = 0
    for seed in range(50):
        phantom = Phantom.random(np.random.default_rng(seed))
        lesions += phantom.has_lesion
        # Organ inside body, lesion inside organ: test dense surface points.
        directions = np.random.default_rng(99).normal(size=(2000, 3))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        organ_surface = np.array(phantom.organ.centre) + directions * np.array(phantom.organ.semi_axes)
        assert phantom.body.contains(organ_surface).all()
        _, label = phantom.sample(np.array([phantom.organ.centre]))
        assert label[0] in (1, 2)
        if phantom.lesion is not None:
            lesion_surface = np.array(phantom.lesion.centre) + directions * np.array(phantom.lesion.semi_axes)
            assert phantom.organ.contains(lesion_surface).all()
            hu, label = phantom.sample(np.array([phantom.lesion.centre]))
            assert label[0] == 2 and hu[0] == np.float32(phantom.lesion_hu)
    assert 15 <= lesions <= 45  # ~60% of 50
    hu, label = phantom.sample(np.array([[0.0, 0.0, 500.0]]))
    assert hu[0] == -1000.0 and label[0] == 0
    assert hu.dtype == np.float32 and label.dtype == np.uint8
    assert CLASS_NAMES == ("organ", "lesion")


# --------------------------------------------------------------------------- (3) heterogeneity


def test_sites_are_heterogeneous(synth: SynthResult) -> None:
    headers = []
    for site_cases in synth.sites.values():
        case = site_cases[0]
        folder = synth.out_dir / case.image_series_dir
        headers.append(pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True))
    assert len({ds.Manufacturer for ds in headers}) == 3
    assert len({tuple(float(v) for v in ds.ImageOrientationPatient) for ds in headers}) == 3
    assert len({float(ds.PixelSpacing[0]) for ds in headers}) == 3
    assert len({float(ds.SliceThickness) for ds in headers}) == 3
    assert len({(float(ds.RescaleSlope), float(ds.RescaleIntercept)) for ds in headers}) == 3
    assert {ds.PixelRepresentation for ds in headers} == {0, 1}
    assert {ds.PatientPosition for ds in headers} == {"HFS", "FFS"}
    orientations = {cases[0].orientation for cases in synth.sites.values()}
    assert orientations == {"axial", "sagittal", "coronal"}
    assert {cases[0].label_format for cases in synth.sites.values()} == {"nifti", "dicom_mask"}


@pytest.mark.parametrize(
    ("orientation", "position", "expected_iop"),
    [
        ("axial", "HFS", [1, 0, 0, 0, 1, 0]),
        ("axial", "FFS", [-1, 0, 0, 0, 1, 0]),
        ("sagittal", "HFS", [0, 1, 0, 0, 0, -1]),
        ("sagittal", "FFS", [0, -1, 0, 0, 0, -1]),
        ("coronal", "HFS", [1, 0, 0, 0, 0, -1]),
        ("coronal", "FFS", [-1, 0, 0, 0, 0, -1]),
    ],
)
def test_orientation_table_and_slice_order(orientation: str, position: str, expected_iop: list[int]) -> None:
    base = site_profiles(1)[0]
    profile = dataclasses.replace(base, orientation=orientation, patient_position=position)
    geometry = SeriesGeometry.from_profile(profile)
    assert geometry.image_orientation_patient == [float(v) for v in expected_iop]
    # Head-first runs against the normal with Instance Number, feet-first along it.
    along = float(np.dot(geometry.slice_dir, geometry.normal))
    assert along == (-1.0 if position == "HFS" else 1.0)
    # The grid is centred on the origin.
    centre = geometry.affine_lps @ np.array([*(np.array(geometry.shape) - 1) / 2.0, 1.0])
    np.testing.assert_allclose(centre[:3], 0.0, atol=1e-6)


def test_profiles_cycle_with_variations() -> None:
    profiles = site_profiles(7)
    assert [p.name for p in profiles] == [f"site-{i}" for i in range(1, 8)]
    assert profiles[3].manufacturer == profiles[0].manufacturer
    assert profiles[3] != profiles[0]
    assert profiles[3].patient_position != profiles[0].patient_position
    assert all(p.n_cases(1) >= 2 for p in profiles)
    assert profiles[2].n_cases(8) == 6 and profiles[1].n_cases(8) == 10


def test_follow_up_study_shares_the_patient(tmp_path: Path) -> None:
    result = generate(tmp_path / "out", n_sites=1, n_cases=4, seed=3, progress=False)
    cases = result.sites["site-1"]
    follow_up = cases[3]
    assert follow_up.follow_up_of == cases[2].case_id
    assert follow_up.identifiers["patient_id"] == cases[2].identifiers["patient_id"]
    assert follow_up.identifiers["study_date"] > cases[2].identifiers["study_date"]
    assert follow_up.study_instance_uid != cases[2].study_instance_uid
    assert len({c.identifiers["patient_id"] for c in cases}) == 3


# --------------------------------------------------------------------------- (4) determinism


@pytest.mark.slow
def test_same_seed_same_bytes_different_seed_different(synth: SynthResult, tmp_path: Path) -> None:
    again = generate(tmp_path / "again", n_sites=3, n_cases=2, seed=7, progress=False)
    first = _tree_digest(synth.out_dir)
    assert len(first) > 100
    assert _tree_digest(again.out_dir) == first

    other = generate(tmp_path / "other", n_sites=3, n_cases=2, seed=8, progress=False)
    second = _tree_digest(other.out_dir)
    assert second != first
    assert not set(second.values()) & set(first.values())
    uids = {c.series_instance_uid for cases in synth.sites.values() for c in cases}
    other_uids = {c.series_instance_uid for cases in other.sites.values() for c in cases}
    assert not uids & other_uids


# --------------------------------------------------------------------------- (5) dcm2niix oracle


@pytest.mark.slow
def test_dcm2niix_agrees_on_affine_shape_and_values(synth: SynthResult, tmp_path: Path) -> None:
    exe = _dcm2niix()
    if exe is None:
        pytest.skip("dcm2niix not found on PATH or next to sys.executable (pip install dcm2niix)")
    # Every image series of every site: together they cover all three planes,
    # both patient positions and all three pixel encodings.
    for case in _all_cases(synth):
        series = synth.out_dir / case["image_series_dir"]
        out = tmp_path / case["case_id"]
        out.mkdir()
        run = subprocess.run(
            [exe, "-b", "n", "-z", "y", "-f", "%s", "-o", str(out), str(series)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        produced = sorted(out.glob("*.nii.gz"))
        assert len(produced) == 1, (case["case_id"], [p.name for p in produced], run.stdout)
        theirs = nib.as_closest_canonical(nib.load(produced[0]))

        _, ordered = _sorted_geometry(_read_series(series))
        ours = nib.as_closest_canonical(nib.Nifti1Image(_volume(ordered, rescale=True), np.array(case["affine_ras"])))
        assert theirs.shape == ours.shape, case["case_id"]
        np.testing.assert_allclose(theirs.affine, ours.affine, atol=1e-3, err_msg=case["case_id"])
        np.testing.assert_allclose(theirs.get_fdata(), ours.get_fdata(), atol=1e-3)

        if case["label_format"] == "dicom_mask":
            # dcm2niix must also read the mask series onto the same grid.
            mask_out = tmp_path / f"{case['case_id']}-mask"
            mask_out.mkdir()
            args = ["-b", "n", "-z", "y", "-f", "%s", "-o", str(mask_out)]
            mask_dir = str(synth.out_dir / case["label_series_dir"])
            run = subprocess.run([exe, *args, mask_dir], capture_output=True, text=True)
            assert run.returncode == 0, run.stdout + run.stderr
            (mask_file,) = mask_out.glob("*.nii.gz")
            mask = nib.as_closest_canonical(nib.load(mask_file))
            label, label_affine = _label_volume(synth, case)
            reference = nib.as_closest_canonical(nib.Nifti1Image(label, label_affine))
            np.testing.assert_allclose(mask.affine, reference.affine, atol=1e-3)
            np.testing.assert_array_equal(np.asarray(mask.dataobj), np.asarray(reference.dataobj))


# --------------------------------------------------------------------------- (6) bad arguments


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_sites": 0}, r"n_sites must be an integer >= 1, got 0"),
        ({"n_cases": 0}, r"n_cases must be an integer >= 1, got 0"),
        ({"seed": -1}, r"seed must be an integer >= 0, got -1"),
        ({"n_sites": "3"}, r"n_sites must be an integer >= 1, got '3'"),
        ({"n_cases": 2.5}, r"n_cases must be an integer >= 1, got 2.5"),
    ],
)
def test_bad_arguments_raise(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        generate(tmp_path / "out", progress=False, **kwargs)
    assert not (tmp_path / "out").exists()


def test_refuses_non_empty_site_folder(tmp_path: Path) -> None:
    (tmp_path / "site-2").mkdir()
    (tmp_path / "site-2" / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match=r"site-2 already exists and is not empty"):
        generate(tmp_path, n_sites=3, n_cases=1, progress=False)
    assert not (tmp_path / "site-1").exists()
    assert (tmp_path / "site-2" / "keep.txt").read_text() == "x"


def test_other_argument_errors() -> None:
    with pytest.raises(ValueError, match=r"n_sites must be an integer >= 1"):
        site_profiles(0)
    with pytest.raises(ValueError, match=r"shape \(N, 3\)"):
        Phantom.random(np.random.default_rng(0)).sample(np.zeros((4, 2)))
    with pytest.raises(FileNotFoundError, match="ground_truth.json"):
        load_ground_truth(Path("/nonexistent-fedimg-synth"))


# --------------------------------------------------------------------------- hygiene


def test_import_prints_nothing() -> None:
    run = subprocess.run([sys.executable, "-c", "import fedimg.synth"], capture_output=True, text=True, check=True)
    assert run.stdout == "" and run.stderr == ""


def test_ground_truth_schema(synth: SynthResult) -> None:
    truth = json.loads(synth.ground_truth_path.read_text())
    assert truth["class_names"] == ["organ", "lesion"]
    assert truth["label_values"] == {"0": "background", "1": "organ", "2": "lesion"}
    assert list(truth["sites"]) == ["site-1", "site-2", "site-3"]
    for site in truth["sites"].values():
        assert {"profile", "cases"} <= set(site)
        for case in site["cases"]:
            assert (case["label_path"] is None) != (case["label_series_instance_uid"] is None)
            if case["label_path"]:
                assert (synth.out_dir / case["label_path"]).is_file()
            assert len(case["affine_ras"]) == 4
    # Sites never see the ground truth: it is outside every site folder.
    assert synth.ground_truth_path.parent == synth.out_dir
