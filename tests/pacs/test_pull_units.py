"""``fedimg pull`` without a PACS: key files, UID checks, write-once storage, source settings, hostile answers.

A PACS's answers are peer input. The last tests drive :func:`fedimg.pacs.pull.pull`
with a client that behaves like a hostile or broken PACS (crafted UIDs,
instances nobody asked for): the real Orthanc tests cannot make Orthanc lie.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fedimg.pacs.client import InstanceRef, StudyListing
from fedimg.pacs.errors import PacsError, PacsRequestError
from fedimg.pacs.keys import Key, read_keys
from fedimg.pacs.pull import pull
from fedimg.pacs.source import DicomWebSource, DimseSource, load_auth, parse_host_port
from fedimg.pacs.store import InstanceStore
from fedimg.preprocess.outdir import OutputDirError, claim

STUDY = "1.2.826.0.1.3680043.10.543.1"
SERIES = "1.2.826.0.1.3680043.10.543.1.1"


# ---------------------------------------------------------------------------------------------- UIDs and storage


@pytest.mark.parametrize(
    "sop",
    [
        "../../etc/passwd",
        "1.2/3",
        "1.2.3\x00",
        "1..2",
        ".1.2",
        "1.2.",
        "1.2.*",
        "",
        "1.2.3\\4",
        "1" * 65,
        "1.2.3 ",
        "１.２",
    ],
)
def test_a_crafted_sop_uid_never_becomes_a_file_name(sop, tmp_path):
    store = InstanceStore(tmp_path / "out")
    with pytest.raises(PacsRequestError) as info:
        store.write(STUDY, SERIES, sop, b"DICM")
    assert info.value.reason == "bad_uid"
    if sop:
        assert sop not in str(info.value)  # a crafted value is not echoed
    assert not (tmp_path / "out").exists()  # refused before any folder is made


def test_uid_grammar_accepts_real_uids(tmp_path):
    store = InstanceStore(tmp_path)
    for sop in ("1.2.840.10008.5.1.4.1.1.4", "2.25.329800735698586629295641978511506172918", "1.3.6.01.2", "1" * 64):
        assert store.write(STUDY, SERIES, sop, b"x") is True
    assert len(list(tmp_path.rglob("*.dcm"))) == 4


def test_store_writes_once_and_never_replaces_a_file(tmp_path):
    store = InstanceStore(tmp_path)
    sop = "1.2.3.4"
    assert store.state(STUDY, SERIES, sop) == "missing"
    assert store.write(STUDY, SERIES, sop, b"first") is True
    target = store.path_for(STUDY, SERIES, sop)
    assert store.write(STUDY, SERIES, sop, b"second") is False
    assert target.read_bytes() == b"first" and store.state(STUDY, SERIES, sop) == "present"
    assert [p.name for p in target.parent.iterdir()] == ["1.2.3.4.dcm"]  # no temporary file left
    # The folder names hold no UID.
    assert STUDY not in str(target.parent) and SERIES not in str(target.parent)


def test_store_refuses_a_planted_link(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "out"
    store = InstanceStore(root)
    folder = store.path_for(STUDY, SERIES, "1.2.3").parent
    folder.parent.mkdir(parents=True)
    folder.symlink_to(outside)  # a series folder that leads out of the output
    with pytest.raises(PacsRequestError) as info:
        store.write(STUDY, SERIES, "1.2.3", b"x")
    assert info.value.reason == "occupied" and not any(outside.iterdir())
    os.unlink(folder)
    folder.mkdir()
    (folder / "1.2.4.dcm").symlink_to(outside / "f")  # a link in place of an instance: occupied, never followed
    assert store.state(STUDY, SERIES, "1.2.4") == "occupied"
    assert store.write(STUDY, SERIES, "1.2.4", b"x") is False and not (outside / "f").exists()


# ---------------------------------------------------------------------------------------------- keys file


def _csv(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_keys_from_a_synth_label_sheet_need_a_choice_between_its_two_key_columns(tmp_path):
    sheet = _csv(
        tmp_path / "labels.csv",
        "AccessionNumber,StudyInstanceUID,label\nA1,1.2.3,lesion\nA2,1.2.4,no_lesion\n\nA1,1.2.3,lesion\n,1.2.5,x\n",
    )
    with pytest.raises(PacsError, match="several key columns .*--key-column"):
        read_keys(sheet)
    keys = read_keys(sheet, key_type="accession")
    assert [k.value for k in keys.keys] == ["A1", "A2"] and keys.column == "AccessionNumber"
    assert (keys.rows, keys.duplicates, keys.rows_without_key) == (4, 1, 1)
    uids = read_keys(sheet, key_type="study_uid")
    assert [(k.value, k.type, k.line) for k in uids.keys] == [
        ("1.2.3", "study_uid", 2),
        ("1.2.4", "study_uid", 3),
        ("1.2.5", "study_uid", 6),
    ]


def test_keys_column_errors_name_the_columns_found(tmp_path):
    f = _csv(tmp_path / "k.csv", "mrn,acc\n123,A1\n")
    with pytest.raises(PacsError, match=r"no key column.*found columns: 'mrn', 'acc'.*--key-column"):
        read_keys(f)
    with pytest.raises(PacsError, match="does not say what it holds"):
        read_keys(f, column="acc")
    keys = read_keys(f, key_type="accession", column="ACC")
    assert [k.value for k in keys.keys] == ["A1"]
    with pytest.raises(PacsError, match="lists no key"):
        read_keys(_csv(tmp_path / "empty.csv", "accession\n\n , \n"))
    with pytest.raises(PacsError, match="does not exist"):
        read_keys(tmp_path / "missing.csv")


@pytest.mark.parametrize(
    "value, problem",
    [
        ("A*", "wildcard"),
        ("A?1", "wildcard"),
        ("A\\B", "wildcard"),
        ("A" * 17, "more than 16"),
        ("ÄB", "printable ASCII"),
        ("A\tB", "printable ASCII"),
    ],
)
def test_accession_keys_that_would_widen_a_query_are_refused(value, problem):
    assert problem in (Key(value, "accession", 2).problem or "")


def test_study_uid_keys_follow_the_uid_grammar():
    assert Key("1.2.840.113619.2.55", "study_uid", 2).problem is None
    assert "characters other than digits" in Key("1.2.*", "study_uid", 2).problem
    assert "more than 64" in Key("1." * 40, "study_uid", 2).problem


# ---------------------------------------------------------------------------------------------- source settings


def test_credentials_never_come_from_the_command_line_or_travel_unencrypted(tmp_path, monkeypatch):
    with pytest.raises(PacsError, match="holds credentials"):
        DicomWebSource("https://u:p@pacs.example.org/dicom-web")
    monkeypatch.setenv("FEDIMG_PACS_CREDENTIALS", "tok-123")
    auth = load_auth("bearer", None)
    assert auth.header() == {"Authorization": "Bearer tok-123"} and "tok-123" not in repr(auth)
    with pytest.raises(PacsError, match="unencrypted"):
        DicomWebSource("http://pacs.example.org/dicom-web", auth=auth)
    DicomWebSource("http://127.0.0.1:8042/dicom-web", auth=auth)  # loopback: allowed
    DicomWebSource("https://pacs.example.org/dicom-web", auth=auth)
    cred = tmp_path / "cred"
    cred.write_text("user:secret\n")
    cred.chmod(0o644)
    with pytest.raises(PacsError, match="mode 0644.*chmod 600"):
        load_auth("basic", str(cred))
    cred.chmod(0o600)
    assert load_auth("basic", str(cred)).header()["Authorization"].startswith("Basic ")
    cred.write_text("no-colon\n")
    with pytest.raises(PacsError, match="holds no ':'"):
        load_auth("basic", str(cred))
    monkeypatch.delenv("FEDIMG_PACS_CREDENTIALS")
    with pytest.raises(PacsError, match="found neither"):
        load_auth("basic", None)


def test_dimse_settings_are_checked():
    assert parse_host_port("pacs.example.org:104") == ("pacs.example.org", 104)
    assert parse_host_port("[::1]:11112") == ("::1", 11112)
    for bad in ("pacs", "pacs:", "pacs:x"):
        with pytest.raises(PacsError, match="HOST:PORT"):
            parse_host_port(bad)
    with pytest.raises(PacsError, match="--called-aet"):
        DimseSource("h", 104, called_aet="A" * 17)
    with pytest.raises(PacsError, match="--calling-aet"):
        DimseSource("h", 104, called_aet="PACS", calling_aet="BAD\\AET")
    with pytest.raises(PacsError, match="port"):
        DimseSource("h", 70000, called_aet="PACS")


def test_pull_claims_its_folder_and_refuses_others(tmp_path, capsys):
    from fedimg.cli import main

    keys = _csv(tmp_path / "k.csv", "accession\nA1\n")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    # Checked before the PACS is contacted: port 1 on loopback is never dialled.
    rc = main(["pull", str(foreign), "--from", "dimse", "127.0.0.1:1", "--called-aet", "PACS", "--keys", str(keys)])
    assert rc == 2 and "not made by fedimg pull" in capsys.readouterr().err
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    with claim(tmp_path / "pre", "preprocess"):
        pass
    with pytest.raises(OutputDirError, match="outputs of fedimg preprocess, not of fedimg pull"):
        claim(tmp_path / "pre", "pull")


# ---------------------------------------------------------------------------------------------- hostile answers


class HostilePacs:
    """A PACS that lists a study faithfully but sends, besides the instances asked for, crafted ones."""

    def __init__(self, listing: StudyListing, extra: list[tuple[str, str, str]]) -> None:
        self.listing = listing
        self.extra = extra
        self.opened = self.closed = False

    def describe(self) -> str:
        return "hostile PACS"

    def open(self) -> None:
        self.opened = True

    def close(self) -> None:
        self.closed = True

    def ping(self) -> bool:
        return True

    def find_studies(self, key: Key) -> list[str]:
        return [STUDY] if key.value == "A1" else []

    def list_instances(self, study_uid: str) -> StudyListing:
        return self.listing

    def retrieve(self, study_uid, series_uid, wanted, whole_series, deliver) -> None:
        first = None
        for study, series, sop in self.extra + [(study_uid, series_uid, r.sop_uid) for r in wanted]:
            try:
                deliver(study, series, sop, b"DICM" + sop.encode())
            except PacsRequestError as exc:
                first = first or exc
        if first:
            raise first


def test_instances_nobody_asked_for_are_never_stored(tmp_path):
    listing = StudyListing(STUDY, [InstanceRef(SERIES, f"{SERIES}.{i}") for i in range(1, 4)])
    extra = [
        (STUDY, SERIES, "../../../evil"),
        (STUDY, SERIES, f"{SERIES}.99"),
        ("1.2.3", SERIES, f"{SERIES}.1"),
        (STUDY, "1.2.3", f"{SERIES}.2"),
    ]
    client = HostilePacs(listing, extra)
    keys = read_keys(_csv(tmp_path / "k.csv", "accession\nA1\nA2\n"))
    result = pull(client, keys, tmp_path / "raw", progress=False)
    assert client.opened and client.closed
    files = sorted(p.name for p in (tmp_path / "raw").rglob("*") if p.is_file())
    assert files == [
        ".fedimg-output.json",
        f"{SERIES}.1.dcm",
        f"{SERIES}.2.dcm",
        f"{SERIES}.3.dcm",
        "pull_manifest.jsonl",
    ]
    assert not (tmp_path / "evil").exists()
    rows = [json.loads(line) for line in (tmp_path / "raw" / "pull_manifest.jsonl").read_text().splitlines()]
    assert rows[0]["status"] == "retrieved" and rows[0]["fetched"] == 3 and rows[0]["unexpected"] == 4
    assert "4 instances the PACS sent unasked were not stored" in rows[0]["detail"]
    assert rows[1]["status"] == "not_found"
    assert result.retrieved == 1


def test_a_listing_with_malformed_uids_is_not_trusted(tmp_path):
    from fedimg.pacs.dicomweb import DicomWebClient

    def item(series: str, sop: str, study: str = STUDY) -> dict:
        return {
            "0020000D": {"vr": "UI", "Value": [study]},
            "0020000E": {"vr": "UI", "Value": [series]},
            "00080018": {"vr": "UI", "Value": [sop]},
        }

    answers = [
        item(SERIES, f"{SERIES}.1"),
        item(SERIES, "../../x"),
        item("1.2/3", f"{SERIES}.2"),
        item(SERIES, f"{SERIES}.3", study="1.2.3"),
        item(SERIES, f"{SERIES}.1"),
        {"bogus": 1},
        "text",
    ]
    listing = DicomWebClient._listing(STUDY, answers)
    assert [r.sop_uid for r in listing.instances] == [f"{SERIES}.1"]
    assert listing.refused == 5
    # The pull then reports the study incomplete rather than retrieved.
    keys = read_keys(_csv(tmp_path / "k.csv", "accession\nA1\n"))
    result = pull(HostilePacs(listing, []), keys, tmp_path / "raw", progress=False)
    row = result.outcomes[0]
    assert (row.status, row.reason, row.fetched, row.refused) == ("failed", "refused", 1, 5)
    assert "5 listed instances have malformed UIDs" in row.detail


class VanishingPacs(HostilePacs):
    """A PACS that answers the first query, then stops answering."""

    def __init__(self) -> None:
        super().__init__(StudyListing(STUDY), [])
        self.queries = 0
        self.pings = 0

    def find_studies(self, key: Key) -> list[str]:
        self.queries += 1
        raise PacsRequestError("connection", "study search (QIDO-RS): the connection failed (ConnectionError)")

    def ping(self) -> bool:
        self.pings += 1
        return False


def test_a_pacs_that_stops_answering_ends_the_pull_instead_of_timing_out_key_by_key(tmp_path):
    client = VanishingPacs()
    keys = read_keys(_csv(tmp_path / "k.csv", "accession\nA1\nA2\nA3\n"))
    result = pull(client, keys, tmp_path / "raw", progress=False)
    assert (client.queries, client.pings) == (1, 1)
    assert [(o.status, o.reason) for o in result.outcomes] == [
        ("failed", "connection"),
        ("failed", "unreachable"),
        ("failed", "unreachable"),
    ]
    assert "run the same command again" in result.outcomes[1].detail
    rows = (tmp_path / "raw" / "pull_manifest.jsonl").read_text().splitlines()
    assert len(rows) == 3
