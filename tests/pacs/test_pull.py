"""``fedimg pull`` against a real PACS: Orthanc with its DICOMweb plugin, over DICOMweb and DIMSE.

The module starts one Orthanc (free loopback ports, temporary storage, basic
auth) and uploads the real TCIA Brain-Tumor-Progression studies to it. The
tests pull them back by accession number and by Study Instance UID, and show
that the pulled folder preprocesses exactly like the folder export (same
NIfTI volumes, byte for byte), that a second pull fetches nothing, that a
partial folder is completed instance by instance, that refusals are one line
and write nothing, and that the console never shows a patient attribute or
a UID the user did not type.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from tests.conftest import MR_SPEC, REPO, shared
from tests.pacs.orthanc_server import AET, CALLING_AET, USER, Orthanc, TlsProxy, start_orthanc

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TCIA = "dicom/tcia_brain_tumor_progression"


# ---------------------------------------------------------------------------------------------- fixtures


class Study:
    """Ground truth of one uploaded study, read from the files."""

    def __init__(self, uid: str, accession: str) -> None:
        self.uid = uid
        self.accession = accession
        self.sops: dict[str, Path] = {}
        self.series: set[str] = set()
        self.phi: set[str] = set()


@pytest.fixture(scope="module")
def tcia() -> tuple[Path, dict[str, Study]]:
    root = shared(TCIA)
    studies: dict[str, Study] = {}
    for f in sorted(root.rglob("*.dcm")):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        st = studies.setdefault(ds.StudyInstanceUID, Study(ds.StudyInstanceUID, str(ds.AccessionNumber)))
        st.sops[ds.SOPInstanceUID] = f
        st.series.add(ds.SeriesInstanceUID)
        for kw in ("PatientName", "PatientID", "PatientBirthDate"):
            value = str(ds.get(kw, "") or "").strip()
            if value:
                st.phi.add(value)
    assert len(studies) == 3 and all(s.accession for s in studies.values())
    return root, studies


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory, tcia) -> Orthanc:
    root, studies = tcia
    server = start_orthanc(tmp_path_factory.mktemp("orthanc"))
    try:
        files = [f for st in studies.values() for f in st.sops.values()]
        assert server.upload(files) == len(files)
        with server.session() as s:
            stats = s.get(f"{server.url}/statistics", timeout=10).json()
        assert stats["CountStudies"] == 3 and stats["CountInstances"] == len(files)
        yield server
    finally:
        server.stop()
    assert server.process.poll() is not None  # no Orthanc left behind


@pytest.fixture(scope="module")
def credentials(tmp_path_factory: pytest.TempPathFactory, pacs: Orthanc) -> Path:
    p = tmp_path_factory.mktemp("cred") / "pacs.cred"
    p.write_text(f"{USER}:{pacs.password}\n")
    p.chmod(0o600)
    return p


def _volumes(out: Path) -> dict[str, bytes]:
    files = {}
    for sub in ("images", "labels"):
        for f in sorted((out / sub).glob("*")):
            files[f"{sub}/{f.name}"] = f.read_bytes()
    return files


def _preprocess(src: Path, dst: Path) -> dict[str, bytes]:
    from fedimg import config as cfg
    from fedimg.preprocess.pipeline import preprocess

    spec = cfg.load(cfg.PreprocessSpec, MR_SPEC)
    preprocess(src, dst, spec, site="site-1", progress=False, workers=1)
    return _volumes(dst)


#: The patient whose two studies are pulled and preprocessed (the third study serves the smaller tests).
EXPORT_PATIENT = "PGBM-001"


@pytest.fixture(scope="module")
def folder_export_volumes(tcia, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The folder export of EXPORT_PATIENT preprocessed (no de-identification: public, de-identified data)."""
    root, _ = tcia
    vols = _preprocess(root / EXPORT_PATIENT, tmp_path_factory.mktemp("pre") / "folder")
    assert len([k for k in vols if k.startswith("images/")]) == 2 and len(vols) == 4
    return vols


def _export_studies(root: Path, studies: dict[str, Study]) -> list[Study]:
    return [st for st in studies.values() if (root / EXPORT_PATIENT) in next(iter(st.sops.values())).parents]


def _keys_csv(path: Path, column: str, values: list[str]) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow([column, "note"])
        for v in values:
            w.writerow([v, "x"])
    return path


def _pull(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    from fedimg.cli import main

    rc = main(["pull", *args, "--quiet"])
    cap = capsys.readouterr()
    return rc, cap.out + cap.err


def _dicomweb(pacs: Orthanc, credentials: Path) -> list[str]:
    return ["--from", "dicomweb", pacs.dicomweb, "--auth", "basic", "--credentials-file", str(credentials)]


def _dimse(pacs: Orthanc, calling: str = CALLING_AET, called: str = AET) -> list[str]:
    return ["--from", "dimse", pacs.dimse, "--called-aet", called, "--calling-aet", calling]


def _manifest(dst: Path) -> dict[str, dict]:
    rows = [json.loads(line) for line in (dst / "pull_manifest.jsonl").read_text().splitlines()]
    return {r["key"]: r for r in rows}


def _pulled(dst: Path) -> dict[str, Path]:
    return {p.stem: p for p in dst.glob("study-*/series-*/*.dcm")}


def _assert_no_phi(text: str, studies: dict[str, Study], typed: set[str]) -> None:
    """No patient attribute, and no UID or accession number the user did not type, in console output."""
    for st in studies.values():
        for value in st.phi:
            assert value not in text, "a patient attribute reached the console"
        for uid in {st.uid, *st.series, *st.sops} - typed:
            assert uid not in text, "a UID the user did not type reached the console"
        if st.accession not in typed:
            assert st.accession not in text


# ---------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("protocol", ["dicomweb", "dimse"])
def test_pull_by_accession_preprocesses_exactly_like_the_folder_export(
    protocol, pacs, credentials, tcia, folder_export_volumes, tmp_path, capsys
):
    root, studies = tcia
    export = _export_studies(root, studies)
    assert len(export) == 2
    accessions = [st.accession for st in export]
    keys = _keys_csv(tmp_path / "keys.csv", "AccessionNumber", accessions + ["NOSUCH-0001"])
    dst = tmp_path / "raw"
    source = _dicomweb(pacs, credentials) if protocol == "dicomweb" else _dimse(pacs)
    rc, text = _pull([str(dst), *source, "--keys", str(keys)], capsys)
    assert rc == 0, text

    rows = _manifest(dst)
    assert rows["NOSUCH-0001"]["status"] == "not_found" and rows["NOSUCH-0001"]["fetched"] == 0
    for st in export:
        row = rows[st.accession]
        assert row["status"] == "retrieved", row
        assert (
            row["studies"],
            row["series"],
            row["instances"],
            row["fetched"],
            row["already_present"],
            row["failed"],
        ) == (1, len(st.series), len(st.sops), len(st.sops), 0, 0)
        assert "PatientName" not in json.dumps(row) and not (st.phi & set(map(str, row.values())))

    pulled = _pulled(dst)
    assert set(pulled) == {sop for st in export for sop in st.sops}
    # Folder names carry no identifier: hashed study and series folders.
    names = {p.parent.name for p in pulled.values()} | {p.parent.parent.name for p in pulled.values()}
    assert all(n.startswith(("study-", "series-")) and len(n.split("-", 1)[1]) == 16 for n in names)
    assert not any(st.uid in str(p) or st.accession in str(p) for p in pulled.values() for st in studies.values())
    for st in export:  # the pulled datasets are the uploaded ones
        for sop in list(st.sops)[:5]:
            assert pydicom.dcmread(pulled[sop]) == pydicom.dcmread(st.sops[sop])

    assert "2 retrieved, 1 not found, 0 failed" in text
    _assert_no_phi(text, studies, typed=set(accessions) | {"NOSUCH-0001"})

    vols = _preprocess(dst, tmp_path / "pre")
    assert vols.keys() == folder_export_volumes.keys()
    # The pull's own records are accounted as fedimg's, not refused as NOT_DICOM.
    pre_rows = [json.loads(line) for line in (tmp_path / "pre" / "manifest.jsonl").read_text().splitlines()]
    own = {r["input"]: (r["status"], r["reason"]) for r in pre_rows if not r["input"].startswith("study-")}
    assert own == {
        ".fedimg-output.json": ("skipped", "FEDIMG_RECORD"),
        "pull_manifest.jsonl": ("skipped", "FEDIMG_RECORD"),
    }
    for name, data in folder_export_volumes.items():
        assert vols[name] == data, f"{name} differs from the folder export's"


def test_pull_by_study_uid_over_both_protocols_gives_the_same_files(pacs, credentials, tcia, tmp_path, capsys):
    _, studies = tcia
    st = min(studies.values(), key=lambda s: len(s.sops))
    unknown = "1.2.826.0.1.3680043.10.543.999.1"
    keys = _keys_csv(tmp_path / "uids.csv", "StudyInstanceUID", [st.uid, unknown])
    got = {}
    for protocol, source in (("dicomweb", _dicomweb(pacs, credentials)), ("dimse", _dimse(pacs))):
        dst = tmp_path / protocol
        rc, text = _pull([str(dst), *source, "--keys", str(keys)], capsys)
        assert rc == 0, text
        rows = _manifest(dst)
        assert rows[st.uid]["status"] == "retrieved" and rows[st.uid]["fetched"] == len(st.sops)
        assert rows[unknown]["status"] == "not_found"
        got[protocol] = {str(p.relative_to(dst)): p for p in _pulled(dst).values()}
        _assert_no_phi(text, studies, typed={st.uid, unknown})
    assert got["dicomweb"].keys() == got["dimse"].keys()
    assert {Path(k).stem for k in got["dicomweb"]} == set(st.sops)
    for rel, p in got["dicomweb"].items():
        original = st.sops[Path(rel).stem]
        # DICOMweb returns the stored file as uploaded; C-GET carries the dataset (its file meta is rebuilt).
        assert p.read_bytes() == original.read_bytes()
        assert pydicom.dcmread(got["dimse"][rel]) == pydicom.dcmread(original)


# ---------------------------------------------------------------------------------------------- resume


def _snapshot(dst: Path) -> dict[str, tuple[int, int, str]]:
    return {
        str(p.relative_to(dst)): (p.stat().st_ino, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in dst.glob("study-*/series-*/*.dcm")
    }


@pytest.mark.parametrize("protocol", ["dicomweb", "dimse"])
def test_resume_fetches_only_missing_instances_and_never_rewrites(protocol, pacs, credentials, tcia, tmp_path, capsys):
    _, studies = tcia
    st = min(studies.values(), key=lambda s: len(s.sops))
    keys = _keys_csv(tmp_path / "keys.csv", "accession", [st.accession])
    dst = tmp_path / "raw"
    source = _dicomweb(pacs, credentials) if protocol == "dicomweb" else _dimse(pacs)
    args = [str(dst), *source, "--keys", str(keys)]
    assert _pull(args, capsys)[0] == 0
    assert _manifest(dst)[st.accession]["fetched"] == len(st.sops)
    first = _snapshot(dst)

    rc, text = _pull(args, capsys)  # a second pull: nothing fetched, nothing rewritten
    assert rc == 0, text
    row = _manifest(dst)[st.accession]
    assert (row["status"], row["fetched"], row["already_present"]) == ("retrieved", 0, len(st.sops))
    assert _snapshot(dst) == first

    # A partial folder: three instances of one series gone (fetched one by one), one series folder gone
    # (fetched as a series). Everything else stays untouched.
    series_dirs = sorted(dst.glob("study-*/series-*"))
    removed = sorted(series_dirs[0].glob("*.dcm"))[:3]
    for p in removed:
        p.unlink()
    gone = sorted(series_dirs[1].glob("*.dcm"))
    for p in gone:
        p.unlink()
    series_dirs[1].rmdir()
    rc, text = _pull(args, capsys)
    assert rc == 0, text
    row = _manifest(dst)[st.accession]
    assert row["status"] == "retrieved"
    assert row["fetched"] == len(removed) + len(gone)
    assert row["already_present"] == len(st.sops) - len(removed) - len(gone)
    after = _snapshot(dst)
    assert after.keys() == first.keys()
    refetched = {str(p.relative_to(dst)) for p in removed + gone}
    for rel, (ino, mtime, digest) in first.items():
        assert after[rel][2] == digest
        if rel not in refetched:
            assert after[rel][:2] == (ino, mtime), "an instance already present was written again"


# ---------------------------------------------------------------------------------------------- refusals


def test_wrong_or_missing_credentials_are_refused_before_anything_is_written(pacs, tcia, tmp_path, capsys):
    _, studies = tcia
    keys = _keys_csv(tmp_path / "keys.csv", "AccessionNumber", [next(iter(studies.values())).accession])
    bad = tmp_path / "bad.cred"
    bad.write_text(f"{USER}:not-the-password\n")
    bad.chmod(0o600)
    dst = tmp_path / "raw"
    for auth in (["--auth", "basic", "--credentials-file", str(bad)], []):
        rc, text = _pull([str(dst), "--from", "dicomweb", pacs.dicomweb, *auth, "--keys", str(keys)], capsys)
        assert rc == 2
        assert "refused the query (HTTP 401)" in text and "--credentials-file" in text
        assert len(text.strip().splitlines()) == 1
        assert pacs.password not in text and "not-the-password" not in text
        assert not dst.exists()


@pytest.mark.parametrize(
    "calling, called, expected",
    [
        ("STRANGER", AET, "calling AET STRANGER"),
        (CALLING_AET, "NOT-ORTHANC", "called AET NOT-ORTHANC"),
    ],
)
def test_dimse_association_refusals_are_one_line_and_write_nothing(
    calling, called, expected, pacs, tcia, tmp_path, capsys
):
    _, studies = tcia
    keys = _keys_csv(tmp_path / "keys.csv", "AccessionNumber", [next(iter(studies.values())).accession])
    dst = tmp_path / "raw"
    rc, text = _pull([str(dst), *_dimse(pacs, calling=calling, called=called), "--keys", str(keys)], capsys)
    assert rc == 2, text
    assert expected in text and len(text.strip().splitlines()) == 1
    assert not dst.exists()


def test_nothing_retrieved_exits_3_with_a_row_per_key(pacs, tmp_path, capsys):
    keys = _keys_csv(tmp_path / "keys.csv", "AccessionNumber", ["NOSUCH-0002", "A*", "NOSUCH-0002"])
    dst = tmp_path / "raw"
    rc, text = _pull([str(dst), *_dimse(pacs), "--keys", str(keys)], capsys)
    assert rc == 3
    rows = _manifest(dst)
    assert list(rows) == ["NOSUCH-0002", "A*"]  # one row per requested key, the repeat pulled once
    assert rows["NOSUCH-0002"]["status"] == "not_found"
    assert (rows["A*"]["status"], rows["A*"]["reason"]) == ("failed", "invalid_key")
    assert "wildcard" in rows["A*"]["detail"]
    assert "nothing retrieved" in text and "1 repeated keys pulled once" in text
    assert not list(dst.glob("study-*"))


def test_pull_imports_no_torch_and_verbose_logs_show_no_uid(pacs, credentials, tcia, tmp_path):
    """A PACS gateway may run pull without torch; -v must not leak URLs (they hold UIDs) or datasets."""
    _, studies = tcia
    st = min(studies.values(), key=lambda s: len(s.sops))
    keys = _keys_csv(tmp_path / "keys.csv", "AccessionNumber", [st.accession])
    runs = [
        ["-v", "pull", str(tmp_path / protocol), *source, "--keys", str(keys), "--quiet"]
        for protocol, source in (("dicomweb", _dicomweb(pacs, credentials)), ("dimse", _dimse(pacs)))
    ]
    script = (
        "import json, sys\nfrom fedimg.cli import main\n"
        "for argv in json.loads(sys.argv[1]):\n"
        "    rc = main(argv)\n"
        "    print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', rc, flush=True)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, json.dumps(runs)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=120,
    )
    text = proc.stdout + proc.stderr
    assert proc.stdout.count("NO-TORCH 0") == 2, text
    assert "DEBUG" in text  # -v was in effect
    _assert_no_phi(text, studies, typed={st.accession})


def test_dicomweb_over_https_verifies_the_server_with_the_given_ca(pacs, tcia, tmp_path, capsys):
    """TLS: the certificate is checked (a private CA needs --ca-bundle), and basic auth travels inside TLS."""
    _, studies = tcia
    st = min(studies.values(), key=lambda s: len(s.sops))
    proxy = TlsProxy(tmp_path / "tls", pacs.http_port)
    try:
        cred = tmp_path / "cred"
        cred.write_text(f"{USER}:{pacs.password}")
        cred.chmod(0o600)
        keys = _keys_csv(tmp_path / "keys.csv", "AccessionNumber", [st.accession])
        base = [
            "--from",
            "dicomweb",
            f"https://127.0.0.1:{proxy.port}/dicom-web",
            "--auth",
            "basic",
            "--credentials-file",
            str(cred),
            "--keys",
            str(keys),
        ]
        rc, text = _pull([str(tmp_path / "untrusted"), *base], capsys)
        assert rc == 2 and "TLS certificate could not be verified" in text and "--ca-bundle" in text
        assert not (tmp_path / "untrusted").exists()
        rc, text = _pull([str(tmp_path / "raw"), *base, "--ca-bundle", str(proxy.ca_bundle)], capsys)
        assert rc == 0, text
        row = _manifest(tmp_path / "raw")[st.accession]
        assert (row["status"], row["fetched"]) == ("retrieved", len(st.sops))
    finally:
        proxy.stop()
