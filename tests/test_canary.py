"""The canary test: no planted identifier survives anywhere past the de-identification boundary.

Unique canary strings are planted in every Table E.1-1 attribute the pipeline
meets, in a private tag, in date and time values, and in the folder and file
names of the raw export. The demo path then runs on it: preprocess with
de-identification (and de-identified DICOM copies), the federated simulation
and the cross-site evaluation. Every file under every output folder and the
NVFlare workspace (gzip and zip members decompressed, checkpoints and
TensorBoard event files included) is scanned for every canary: 0 hits.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import shutil
import zipfile
from pathlib import Path

import pydicom
import pytest

from fedimg import config as cfg
from fedimg.dicom.deid import Pseudonymizer, SiteSecret
from fedimg.preprocess.pipeline import preprocess
from tests.conftest import CT_SPEC, REPO, tiny_experiment

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.nvflare]

DATE, TIME = "19230405", "041523.987654"  # neither occurs by chance in UIDs (the dot) or hashes
TEXT_CANARIES = {
    "PatientName": "CNRYLAST^CNRYFIRST",
    "PatientAddress": "CNRY-ADDRESS 1 Lane",
    "OtherPatientIDs": "CNRY-OTHERID",
    "AccessionNumber": "CNRYACC01",
    "StudyID": "CNRYSTID",
    "InstitutionName": "CNRY-INSTITUTION",
    "InstitutionAddress": "CNRY-INSTADDR",
    "ReferringPhysicianName": "CNRYREF^DOC",
    "PerformingPhysicianName": "CNRYPERF^DOC",
    "NameOfPhysiciansReadingStudy": "CNRYREAD^DOC",
    "OperatorsName": "CNRYOPER^TECH",
    "StationName": "CNRYSTATION",
    "DeviceSerialNumber": "CNRYSERIAL",
    "StudyDescription": "CNRY-STUDYDESC",
    "ProtocolName": "CNRY-PROTOCOL",
    "ImageComments": "CNRY-IMGCOMMENT",
    "PatientComments": "CNRY-PATCOMMENT",
}
DATE_TAGS = ["StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate", "PatientBirthDate"]
TIME_TAGS = ["StudyTime", "SeriesTime", "AcquisitionTime", "ContentTime"]


def _plant(raw: Path) -> list[str]:
    """Plant canaries in every DICOM file and in folder/file names; return all canaries."""
    canaries = [*TEXT_CANARIES.values(), DATE, TIME, "CNRYPRIVATE", "CNRYDIR", "CNRYFILE", "CNRYPID", "CNRY-SD"]
    for f in sorted(p for p in raw.rglob("*") if p.is_file()):
        if f.name.endswith(".nii.gz") or f.suffix in (".json", ".csv"):  # .csv: the site's label sheet
            continue
        ds = pydicom.dcmread(f)
        for kw, value in TEXT_CANARIES.items():
            setattr(ds, kw, value)
        ds.PatientID = "CNRYPID" + hashlib.sha1(str(ds.PatientID).encode()).hexdigest()[:4]
        # Selection by description happens before de-identification: keep the mask marker.
        ds.SeriesDescription = "CNRY-SD " + ("Mask_Segmentation" if "Mask" in str(ds.SeriesDescription) else "CT")
        for kw in DATE_TAGS:
            setattr(ds, kw, DATE)
        for kw in TIME_TAGS:
            setattr(ds, kw, TIME)
        block = ds.private_block(0x0011, "CNRY CREATOR", create=True)
        block.add_new(0x01, "LO", "CNRYPRIVATE")
        ds.save_as(f, enforce_file_format=True)
    # Identifiers in folder and file names, as PACS exports do.
    for d in sorted((p for p in raw.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        if d.parent != raw.parent and d.parent.name != raw.name:
            d.rename(d.with_name(f"CNRYDIR {d.name}"))
    for f in [p for p in raw.rglob("*") if p.is_file()]:
        f.rename(f.with_name(f"CNRYFILE_{f.name}"))
    return canaries


def _blobs(path: Path):
    """The file's bytes, plus decompressed gzip and zip members (checkpoints are zip files)."""
    data = path.read_bytes()
    yield data
    if data[:2] == b"\x1f\x8b":
        yield gzip.decompress(data)
    if data[:4] == b"PK\x03\x04":
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            for name in z.namelist():
                yield name.encode()
                yield z.read(name)


def _scan(roots: list[Path], canaries: list[str]) -> list[str]:
    hits = []
    for root in roots:
        for p in root.rglob("*"):
            rel = p.relative_to(root).as_posix()
            hits += [f"name {rel}: {c}" for c in canaries if c.lower() in rel.lower()]
            if p.is_file():
                for blob in _blobs(p):
                    low = blob.lower()
                    hits += [f"{rel}: {c}" for c in canaries if c.lower().encode() in low]
    return hits


def _tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


def test_no_canary_survives_the_demo_path(tmp_path):
    from fedimg.fl.simulate import run_simulation
    from fedimg.synth import generate

    synth = generate(tmp_path / "raw", n_sites=2, n_cases=3, seed=11, progress=False)
    raws = {site: tmp_path / "raw" / site for site in synth.sites}
    canaries: list[str] = []
    for raw in raws.values():
        canaries = sorted({*canaries, *_plant(raw)})
    before = {site: _tree_hash(raw) for site, raw in raws.items()}
    # Positive control: the scanner finds every planted canary in the raw export (names, values, private tag).
    raw_hits = "\n".join(_scan(list(raws.values()), canaries))
    assert all(c in raw_hits for c in canaries), [c for c in canaries if c not in raw_hits]

    spec = cfg.load(cfg.PreprocessSpec, CT_SPEC, ["target_spacing=[6, 6, 6]"])
    out = tmp_path / "out"
    secrets_dir = tmp_path / "secrets"  # site-private, outside every output folder
    secrets_dir.mkdir(mode=0o700)
    site_cfgs, case_ids = {}, {}
    for site, raw in raws.items():
        secret = SiteSecret.generate(secrets_dir / f"{site}.secret")
        res = preprocess(
            raw,
            out / site / "preprocessed",
            spec,
            site=site,
            progress=False,
            pseudonymizer=Pseudonymizer(secret),
            write_dicom=out / site / "deid_dicom",
        )
        assert len(res.cases) >= 2
        case_ids[site] = [c.case_id for c in res.cases]
        sc = cfg.SiteConfig(name=site, datalist="preprocessed/datalist.json", device="cpu", num_threads=1)
        cfg.save(sc, out / site / "site.yaml")
        site_cfgs[site] = str(out / site / "site.yaml")
    assert any((out / s / "deid_dicom").rglob("*.dcm") for s in raws)

    sim = run_simulation(tiny_experiment(), REPO / "jobs" / "train", site_cfgs, out / "nvflare")
    assert sim.cross_site_results and all(sim.final_dice(s) is not None for s in raws)

    hits = _scan([out], canaries)
    assert not hits, hits[:20]
    # Negative control: without de-identification the same scan does find identifiers (in the manifest).
    preprocess(raws["site-1"], tmp_path / "plain", spec, site="site-1", progress=False)
    assert _scan([tmp_path / "plain"], canaries)

    # Raw input bytes unchanged.
    assert {site: _tree_hash(raw) for site, raw in raws.items()} == before
    # Same secret -> same pseudonyms; another secret -> none equal.
    site = "site-1"
    again = preprocess(
        raws[site],
        tmp_path / "again",
        spec,
        site=site,
        progress=False,
        pseudonymizer=Pseudonymizer(SiteSecret.load(secrets_dir / f"{site}.secret")),
    )
    assert [c.case_id for c in again.cases] == case_ids[site]
    other = preprocess(
        raws[site],
        tmp_path / "other",
        spec,
        site=site,
        progress=False,
        pseudonymizer=Pseudonymizer(SiteSecret.generate(tmp_path / "other.secret")),
    )
    assert not set(c.case_id for c in other.cases) & set(case_ids[site])
    shutil.rmtree(tmp_path / "again")
