"""fedimg synth: the label sheet of every site, and the DX (projection radiograph) mode."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

from fedimg.cli import main
from fedimg.synth import CLASSIFICATION_CLASSES, Phantom, dx_site_profiles, generate
from fedimg.synth.render import render_projection


def _digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def dx(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("dx") / "out", n_sites=4, n_cases=3, seed=7, progress=False, modality="DX")


def _sheet(site_dir: Path) -> list[dict[str, str]]:
    with (site_dir / "labels.csv").open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_ct_sites_have_a_label_sheet_matching_the_ground_truth(small_synth):
    for site, cases in small_synth.sites.items():
        rows = _sheet(small_synth.out_dir / site)
        assert list(rows[0]) == ["AccessionNumber", "StudyInstanceUID", "label"]
        assert [(r["AccessionNumber"], r["StudyInstanceUID"], r["label"]) for r in rows] == [
            (c.identifiers["accession_number"], c.study_instance_uid, CLASSIFICATION_CLASSES[c.has_lesion])
            for c in cases
        ]


def test_dx_files_are_single_frame_radiographs_that_differ_by_site(dx):
    truth = json.loads(dx.ground_truth_path.read_text())
    assert truth["modality"] == "DX" and truth["classification_classes"] == ["no_lesion", "lesion"]
    seen = {}
    for site, cases in dx.sites.items():
        profile = dx.profiles[site]
        rows = _sheet(dx.out_dir / site)
        assert [r["label"] for r in rows] == [CLASSIFICATION_CLASSES[c.has_lesion] for c in cases]
        for case in cases:
            (f,) = list((dx.out_dir / case.image_series_dir).iterdir())
            ds = pydicom.dcmread(f)
            assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1.1" and ds.Modality == "DX"
            assert ds.StudyInstanceUID == case.study_instance_uid
            assert ds.AccessionNumber == case.identifiers["accession_number"]
            assert "NumberOfFrames" not in ds and ds.pixel_array.shape == (profile.rows, profile.columns)
            assert ds.BurnedInAnnotation == "NO"
            assert ds.PhotometricInterpretation == profile.photometric_interpretation
            assert ds.PresentationLUTShape == (
                "INVERSE" if ds.PhotometricInterpretation == "MONOCHROME1" else "IDENTITY"
            )
            assert [float(v) for v in ds.ImagerPixelSpacing] == [profile.pixel_spacing_mm] * 2
            assert ("PixelSpacing" in ds) == profile.write_pixel_spacing
            assert "ImagePositionPatient" not in ds and "ImageOrientationPatient" not in ds
            arr = ds.pixel_array.astype(float)
            assert arr.max() <= (1 << int(ds.BitsStored)) - 1
            # Air is dark on display: stored low for MONOCHROME2, high for MONOCHROME1.
            corner, centre = arr[:4, :4].mean(), arr[profile.rows // 2, profile.columns // 2]
            assert (centre > corner) == (profile.photometric_interpretation == "MONOCHROME2")
        seen[site] = (
            profile.rows,
            profile.columns,
            profile.pixel_spacing_mm,
            profile.photometric_interpretation,
            profile.manufacturer,
        )
    assert len(set(seen.values())) == len(seen)  # every site is its own detector
    assert {v[3] for v in seen.values()} == {"MONOCHROME1", "MONOCHROME2"}


def test_dx_is_the_same_patients_as_ct_and_deterministic(dx, tmp_path):
    # Every draw is seeded per (seed, site, case): one CT site is enough to compare with.
    ct = generate(tmp_path / "ct", n_sites=1, n_cases=3, seed=7, progress=False)
    for site in ct.sites:
        assert [(c.identifiers, c.has_lesion, c.study_instance_uid) for c in dx.sites[site]] == [
            (c.identifiers, c.has_lesion, c.study_instance_uid) for c in ct.sites[site]
        ]
    again = generate(tmp_path / "again", n_sites=4, n_cases=3, seed=7, progress=False, modality="DX")
    assert _digest(again.out_dir) == _digest(dx.out_dir)
    other = generate(tmp_path / "other", n_sites=4, n_cases=3, seed=8, progress=False, modality="DX")
    assert not set(_digest(other.out_dir).values()) & set(_digest(dx.out_dir).values())


def test_the_lesion_stands_out_of_the_noise_in_the_projection():
    for draw in range(40):
        phantom = Phantom.random(np.random.default_rng([draw, 1]))
        if phantom.lesion is None:
            continue
        rng = np.random.default_rng(0)
        with_lesion, counts = render_projection(phantom, 200, 200, 1.0, rng, 0.0)
        without, _ = render_projection(
            dataclasses.replace(phantom, lesion=None, lesion_hu=None), 200, 200, 1.0, rng, 0.0
        )
        contrast = with_lesion - without
        # At least ~8x the noisiest site's noise at the lesion's centre, over a disc of hundreds of pixels.
        assert contrast.max() > 8 * max(p.noise_sigma for p in dx_site_profiles(3))
        assert counts["lesion"] > 300 and (contrast > 0).sum() == counts["lesion"]


def test_synth_cli_dx_and_bad_modality(tmp_path, capsys):
    assert main(["synth", str(tmp_path / "raw"), "--sites", "1", "--cases", "2", "--modality", "DX", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "2 DX studies" in out and "labels.csv" in out
    assert len(_sheet(tmp_path / "raw" / "site-1")) == 2
    with pytest.raises(ValueError, match="modality must be one of"):
        generate(tmp_path / "x", n_sites=1, n_cases=1, modality="MR", progress=False)
