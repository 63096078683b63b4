"""preprocess --write-dicom: de-identified DICOM copies with keyed UIDs; burned-in risks withheld."""

from __future__ import annotations

import json
import shutil

import pydicom
import pytest

from fedimg.dicom.deid import Pseudonymizer, SiteSecret
from fedimg.preprocess.pipeline import preprocess


@pytest.mark.slow
def test_copies_are_deidentified_and_references_resolve(small_synth, ct_spec, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(small_synth.out_dir / "site-2", src)  # CT + Secondary Capture mask series
    # One study's mask loses (0028,0301): a Secondary Capture that may carry burned-in text.
    masks = sorted(d for d in src.rglob("*Mask*") if d.is_dir())
    for f in masks[0].iterdir():
        ds = pydicom.dcmread(f)
        del ds.BurnedInAnnotation
        ds.save_as(f)
    p = Pseudonymizer(SiteSecret.generate(tmp_path / "site.secret"))
    res = preprocess(
        src, tmp_path / "out", ct_spec, site="site-2", progress=False, pseudonymizer=p, write_dicom=tmp_path / "dicom"
    )
    truth = json.loads(small_synth.ground_truth_path.read_text())
    identifiers = {
        v
        for c in truth["sites"]["site-2"]["cases"]
        for v in c["identifiers"].values()
        if isinstance(v, str) and len(v) >= 5
    }
    written = sorted((tmp_path / "dicom").rglob("*.dcm"))
    assert written
    sop_uids, refs = set(), set()
    words = {v for v in identifiers if not v.isdigit()}
    numbers = identifiers - words  # short digit strings also occur inside 2.25 UIDs by chance
    for f in written:
        blob = f.read_bytes()
        assert not [v for v in words if v.encode() in blob], f
        ds = pydicom.dcmread(f)
        texts: list[str] = []

        def collect(_d, e, texts=texts):
            if e.VR not in ("UI", "OB", "OW", "SQ"):
                texts.append(str(e.value))

        ds.walk(collect)
        assert not [v for v in numbers if any(v in t for t in texts)], f
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.SOPInstanceUID.startswith("2.25.") and ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert "2024b" in " ".join(ds.DeidentificationMethod)
        sop_uids.add(ds.SOPInstanceUID)
        for item in ds.get("SourceImageSequence", []):
            refs.add(item.ReferencedSOPInstanceUID)
    assert refs and refs <= sop_uids  # mask slices still point at their (de-identified) CT slices
    # The study whose mask may carry burned-in text is refused (not converted, not copied), with the reason.
    rows = [json.loads(x) for x in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    withheld = [r for r in rows if r["reason"] == "BURNED_IN_ANNOTATION"]
    assert withheld and all(r["status"] == "refused" for r in withheld)
    assert {r["case_id"] for r in withheld}.isdisjoint({f.parts[-3] for f in written})
    assert {f.parts[-3] for f in written} == {c.case_id for c in res.cases}
    assert len(res.cases) == len(small_synth.sites["site-2"]) - 1


@pytest.mark.slow
def test_conformance_counts_over_written_copies(small_synth, ct_spec, tmp_path, capsys):
    """The pinned Table E.1-1 checks of tests/dicom/test_deid.py, over the files --write-dicom wrote."""
    from tests.dicom.test_deid import Tally, _check

    p = Pseudonymizer(SiteSecret.generate(tmp_path / "site.secret"))
    originals = {}
    for site in ("site-1", "site-2"):
        src = small_synth.out_dir / site
        preprocess(
            src, tmp_path / site, ct_spec, site=site, progress=False, pseudonymizer=p, write_dicom=tmp_path / "dicom"
        )
        for f in src.rglob("IM*"):
            ds = pydicom.dcmread(f)
            originals[p.uid(ds.SOPInstanceUID)] = ds
    tally = Tally()
    written = sorted((tmp_path / "dicom").rglob("*.dcm"))
    assert len(written) > 100
    for f in written:
        new = pydicom.dcmread(f)
        orig = originals[new.SOPInstanceUID]
        _check(orig, new, p, str(orig.PatientID), tally, frozenset(), {}, f.name)
    with capsys.disabled():
        print("\n" + tally.table())
    assert not tally.failures, tally.failures[:10]
    assert tally.seen["X"] > 0 and tally.seen["U"] > 0 and tally.seen["C date shifted"] > 0
    assert all(tally.ok[row] == n for row, n in tally.seen.items())  # every check at 100%


def test_spec_covariates_and_descriptor_allowlist_are_kept(small_synth, ct_spec, tmp_path):
    import dataclasses

    from fedimg.config import DeidSpec

    src = small_synth.out_dir / "site-1"
    first = pydicom.dcmread(next(src.rglob("IM*")))
    spec = dataclasses.replace(
        ct_spec,
        deid=DeidSpec(
            covariates=["PatientAge", "PatientSex"], keep_descriptors={"SeriesDescription": [first.SeriesDescription]}
        ),
    )
    p = Pseudonymizer(SiteSecret.generate(tmp_path / "site.secret"))
    preprocess(
        src, tmp_path / "out", spec, site="site-1", progress=False, pseudonymizer=p, write_dicom=tmp_path / "dicom"
    )
    copy = pydicom.dcmread(next((tmp_path / "dicom").rglob("*.dcm")))
    assert copy.PatientAge and copy.PatientSex in ("M", "F", "O")
    assert copy.SeriesDescription == first.SeriesDescription
    assert "PatientWeight" not in copy and "InstitutionName" not in copy
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert "2024b" in summary["pseudonyms"]["profile"] and summary["pseudonyms"]["covariates"] == [
        "PatientAge",
        "PatientSex",
    ]
