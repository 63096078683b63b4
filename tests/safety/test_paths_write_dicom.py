"""Issue 12: ``--write-dicom`` never writes outside its folder.

Copies are named ``<case_id>/<role>/<SOP Instance UID>.dcm``. UIDs under the
DICOM root ``1.2.840.10008.`` used to be kept verbatim, so a crafted
(0008,0018) such as ``1.2.840.10008.1/../../x`` wrote wherever it pointed.
Now a study whose SOP Instance UIDs are not UIDs is refused whole
(UNSAFE_NAME), malformed root UIDs are remapped by de-identification, and
every copy's path is resolved and checked inside the folder (a planted link
withdraws the case from the copies).
"""

from __future__ import annotations

import shutil
import warnings

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset

from fedimg.dicom.deid import Pseudonymizer, SiteSecret, deidentify
from fedimg.preprocess.outdir import claim
from fedimg.preprocess.pipeline import preprocess
from tests.safety.paths_data import fast_spec, manifest_rows, rel_in_site, synth_site

CRAFTED = "1.2.840.10008.1/../../../../escaped_q9"  # from DIR/<case>/image/ up to the test's tmp folder


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    return synth_site(tmp_path_factory.mktemp("wdicom") / "raw", n_cases=3, seed=13)


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_crafted_uid_and_planted_link_never_write_outside(site, tmp_path):
    folder, truth = site
    src = tmp_path / "src"
    shutil.copytree(folder, src)
    a, b, c = truth[:3]
    crafted = sorted((src / rel_in_site(a.image_series_dir)).iterdir())[7]
    ds = pydicom.dcmread(crafted)
    ds.SOPInstanceUID = CRAFTED
    ds.file_meta.MediaStorageSOPInstanceUID = CRAFTED
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns that the value is not a UID: that is the point
        ds.save_as(crafted)
    p = Pseudonymizer(SiteSecret.generate(tmp_path / "site.secret"))
    out = tmp_path / "dicom"
    claim(out, "dicom-copies").release()  # an earlier run's copies folder: fedimg's own, so it is written into
    planted = tmp_path / "planted_target"
    planted.mkdir()
    case_b = p.case(b.study_instance_uid, b.series_instance_uid)
    (out / case_b).symlink_to(planted, target_is_directory=True)  # e.g. left by someone else in a shared folder

    res = preprocess(
        src, tmp_path / "dst", fast_spec(), site="site-1", progress=False, pseudonymizer=p, write_dicom=out
    )

    assert not list(tmp_path.rglob("escaped_q9*")) and not list(planted.iterdir())
    assert all(f.resolve().is_relative_to(out.resolve()) for f in out.rglob("*.dcm"))
    rows = manifest_rows(tmp_path / "dst")
    text = (tmp_path / "dst" / "manifest.jsonl").read_text(encoding="utf-8")
    assert "escaped_q9" not in text and "10008.1/" not in text  # the crafted value is never quoted
    # Study a: refused whole, with the reason, and not converted.
    image_a = [
        r
        for r in rows
        if r["input"]
        in {p.path_hash(f.relative_to(src).as_posix()) for f in (src / rel_in_site(a.image_series_dir)).iterdir()}
    ]
    assert len(image_a) == a.n_image_files
    assert {(r["status"], r["reason"]) for r in image_a} == {("refused", "UNSAFE_NAME")}
    assert "1 of 60 file(s) have a (0008,0018) SOP Instance UID that is not a UID" in image_a[0]["detail"]
    case_a = p.case(a.study_instance_uid, a.series_instance_uid)
    assert case_a not in {x.case_id for x in res.cases} and not (out / case_a).exists()
    # Study b: converted, but its copies are withdrawn (its folder in DIR is a link out of DIR).
    rows_b = [r for r in rows if r.get("case_id") == case_b]
    assert rows_b and all(r["status"] == "converted" for r in rows_b)
    assert all(r["detail"].startswith("UNSAFE_NAME: not copied to --write-dicom") for r in rows_b)
    # Study c: copied as before.
    case_c = p.case(c.study_instance_uid, c.series_instance_uid)
    assert {x.case_id for x in res.cases} == {case_b, case_c}
    assert len(list((out / case_c / "image").glob("2.25.*.dcm"))) == c.n_image_files


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_deidentify_remaps_a_malformed_uid_under_the_dicom_root():
    p = Pseudonymizer(SiteSecret(b"k" * 32))
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.SOPInstanceUID = CRAFTED
        ds.file_meta.MediaStorageSOPInstanceUID = CRAFTED
    ds.PatientID = "X1"
    clean = deidentify(ds, p)
    assert clean.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"  # a real class UID stays
    assert clean.SOPInstanceUID == p.uid(CRAFTED) and clean.SOPInstanceUID.startswith("2.25.")
    assert clean.file_meta.MediaStorageSOPInstanceUID == clean.SOPInstanceUID
