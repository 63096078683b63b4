"""Issue 12: every entry of SRC is accounted for, and nothing outside SRC is read.

Symbolic links are never followed while walking SRC: a link out of SRC is
refused (SYMLINK_OUTSIDE_SOURCE), a link to an entry inside SRC is skipped
(SYMLINK_INSIDE_SOURCE: its target is read under its own path), broken links
and loops are refused, FIFOs, sockets and device files are NOT_REGULAR_FILE.
A file or folder the OS refuses is UNREADABLE, and an image whose label may
sit in it is held (LABEL_UNREADABLE), never told "NO_LABEL ... add it".

The tests run as root, where ``chmod 000`` stops nothing: unreadable entries
are simulated by making ``os.scandir`` / ``os.open`` (the calls fedimg's walk
makes) raise ``PermissionError`` for one path.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import stat
from pathlib import Path

import pytest

from fedimg.dicom import index as index_mod
from fedimg.dicom.deid import Pseudonymizer, SiteSecret
from fedimg.dicom.reasons import Reason
from fedimg.preprocess.convert import convert
from fedimg.preprocess.pipeline import preprocess
from fedimg.preprocess.scan import PreprocessInputError, check_source
from tests.safety.paths_data import fast_spec, manifest_rows, rel_in_site, synth_site


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    return synth_site(tmp_path_factory.mktemp("entries") / "raw", n_cases=4, seed=11)


def _entries_on_disk(src: Path, unlistable: tuple[Path, ...] = ()) -> set[str]:
    """Every entry a manifest must list: files, links, special files; an unlistable folder as itself."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(src):
        here = Path(dirpath)
        for name in filenames + [d for d in dirnames if (here / d).is_symlink() or here / d in unlistable]:
            out.add((here / name).relative_to(src).as_posix())
        dirnames[:] = [d for d in dirnames if here / d not in unlistable]
    return out


def test_every_new_reason_has_advice():
    new = {
        "UNREADABLE",
        "NOT_REGULAR_FILE",
        "BROKEN_LINK",
        "SYMLINK_LOOP",
        "SYMLINK_OUTSIDE_SOURCE",
        "SYMLINK_INSIDE_SOURCE",
        "LABEL_UNREADABLE",
        "UNSAFE_NAME",
    }
    assert new <= {r.value for r in Reason}
    assert all(Reason(r).advice and len(Reason(r).advice) <= 100 for r in new)


def test_links_and_special_files_each_get_one_row_and_nothing_outside_is_read(site, tmp_path):
    folder, truth = site
    src = tmp_path / "src"
    shutil.copytree(folder, src)
    # One study lives outside SRC: links to it must not bring it in.
    outside = tmp_path / "elsewhere_q7" / "study"
    shutil.move(src / rel_in_site(truth[-1].study_dir), outside)
    kept = truth[:-1]
    linked = src / "linked_files"
    linked.mkdir()
    outside_files = sorted(p for p in outside.rglob("*") if p.is_file())
    for i, f in enumerate(outside_files):
        (linked / f"{i:03d}_{f.name}").symlink_to(f)  # the old walker read these: a case from outside SRC
    (src / "linked_dir").symlink_to(outside, target_is_directory=True)
    series = src / rel_in_site(kept[0].image_series_dir)
    (src / "alias_dir").symlink_to(series, target_is_directory=True)
    (src / "alias_file.dcm").symlink_to(sorted(series.iterdir())[0])
    (src / "broken.dcm").symlink_to(tmp_path / "nowhere.dcm")
    (src / "loop_a").symlink_to(src / "loop_b")
    (src / "loop_b").symlink_to(src / "loop_a")
    os.mkfifo(src / "pipe.dcm")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(src / "sock"))
    sock.close()
    expected = {
        "linked_dir": ("refused", "SYMLINK_OUTSIDE_SOURCE"),
        "alias_dir": ("skipped", "SYMLINK_INSIDE_SOURCE"),
        "alias_file.dcm": ("skipped", "SYMLINK_INSIDE_SOURCE"),
        "broken.dcm": ("refused", "BROKEN_LINK"),
        "loop_a": ("refused", "SYMLINK_LOOP"),
        "loop_b": ("refused", "SYMLINK_LOOP"),
        "pipe.dcm": ("refused", "NOT_REGULAR_FILE"),
        "sock": ("refused", "NOT_REGULAR_FILE"),
        **{f"linked_files/{p.name}": ("refused", "SYMLINK_OUTSIDE_SOURCE") for p in linked.iterdir()},
    }
    try:
        os.mknod(src / "null_dev", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        expected["null_dev"] = ("refused", "NOT_REGULAR_FILE")
    except PermissionError:
        pass  # no CAP_MKNOD here: FIFO and socket still cover special files
    on_disk = _entries_on_disk(src)
    assert set(expected) <= on_disk

    res = preprocess(src, tmp_path / "dst", fast_spec(), site="site-1", progress=False)
    rows = {r["input"]: r for r in manifest_rows(tmp_path / "dst")}
    assert set(rows) == on_disk  # one row per entry, links and special files included
    for rel, (status, reason) in expected.items():
        assert (rows[rel]["status"], rows[rel]["reason"]) == (status, reason), rel
        assert "elsewhere_q7" not in rows[rel]["detail"] and "nowhere" not in rows[rel]["detail"]  # no target named
    assert res.src_files == len(on_disk) == sum(res.counts.values())
    # Only the studies inside SRC became cases; the outside study was read through no link.
    assert len(res.cases) == len(kept)
    assert {r["case_id"] for r in rows.values() if r["status"] == "converted"} == {c.case_id for c in res.cases}
    assert all(not r["input"].startswith(("linked", "alias")) for r in rows.values() if r["status"] == "converted")
    assert "SYMLINK_OUTSIDE_SOURCE" in res.table() and Reason.SYMLINK_OUTSIDE_SOURCE.advice in res.table()
    assert (src / "linked_dir").is_symlink() and stat.S_ISFIFO(os.lstat(src / "pipe.dcm").st_mode)  # raw untouched

    # `fedimg convert` walks the same way.
    conv = convert(src, tmp_path / "conv", workers=1, progress=False)
    crows = {r["input"]: r for r in manifest_rows(tmp_path / "conv")}
    assert set(crows) == on_disk and conv.src_files == len(on_disk)
    assert {(crows[k]["status"], crows[k]["reason"]) for k in expected} == set(expected.values())
    assert len(conv.outputs) == len(kept)


def _deny(monkeypatch, folders: set[str], files: set[str]) -> None:
    """Make the OS calls of fedimg's walk refuse these paths, as permissions would for a non-root user."""
    real_scandir, real_open = os.scandir, os.open

    def scandir(path="."):
        if os.fspath(path) in folders:
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_scandir(path)

    def open_(path, flags, *args, **kwargs):
        if os.fspath(path) in files:
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(os, "open", open_)


def test_unreadable_entries_are_reported_and_hold_their_images(site, tmp_path, monkeypatch):
    folder, truth = site
    src = tmp_path / "src"
    shutil.copytree(folder, src)
    a, b, c, d = truth[:4]
    label_dir_a = src / Path(rel_in_site(a.label_path)).parent  # study a: its label folder cannot be listed
    label_file_b = src / rel_in_site(b.label_path)  # study b: its NIfTI label cannot be opened
    slice_c = sorted((src / rel_in_site(c.image_series_dir)).iterdir())[0]  # study c: one slice cannot be opened
    _deny(monkeypatch, {os.fspath(label_dir_a)}, {os.fspath(label_file_b), os.fspath(slice_c)})
    p = Pseudonymizer(SiteSecret.generate(tmp_path / "site.secret"))

    res = preprocess(src, tmp_path / "dst", fast_spec(), site="site-1", progress=False, pseudonymizer=p)
    rows = {r["input"]: r for r in manifest_rows(tmp_path / "dst")}
    rel = {
        k: v.relative_to(src).as_posix()
        for k, v in {"label_dir_a": label_dir_a, "label_file_b": label_file_b, "slice_c": slice_c}.items()
    }
    for name, r in rel.items():
        row = rows[p.path_hash(r)]
        assert (row["status"], row["reason"]) == ("refused", "UNREADABLE"), name
        assert "PermissionError, EACCES" in row["detail"]
    assert "folder could not be listed" in rows[p.path_hash(rel["label_dir_a"])]["detail"]
    assert all(r["reason"] not in ("NO_LABEL", "TRUNCATED") for r in rows.values())
    # Images of a and b are held, pointing at the UNREADABLE row (by its keyed hash: no raw path).
    for study, unreadable in ((a, rel["label_dir_a"]), (b, rel["label_file_b"])):
        image_rows = [
            rows[p.path_hash(f.relative_to(src).as_posix())]
            for f in (src / rel_in_site(study.image_series_dir)).iterdir()
        ]
        assert {(r["status"], r["reason"]) for r in image_rows} == {("refused", "LABEL_UNREADABLE")}
        detail = image_rows[0]["detail"]
        assert p.path_hash(unreadable) in detail and "make it readable" in detail
        assert study.identifiers["last_name"] not in detail and study.identifiers["accession_number"] not in detail
    # Study d is untouched by all this; the account covers the unlisted folder as one entry.
    assert [c.case_id for c in res.cases] == [p.case(d.study_instance_uid, d.series_instance_uid)]
    on_disk = _entries_on_disk(src, unlistable=(label_dir_a,))
    assert res.src_files == len(on_disk) == len(rows) == sum(res.counts.values())


def test_an_unreadable_label_folder_without_deid_names_the_folder_row(site, tmp_path, monkeypatch):
    folder, truth = site
    src = tmp_path / "src"
    shutil.copytree(folder, src)
    label_dir = src / Path(rel_in_site(truth[0].label_path)).parent
    _deny(monkeypatch, {os.fspath(label_dir)}, set())
    preprocess(src, tmp_path / "dst", fast_spec(), site="site-1", progress=False)
    rows = {r["input"]: r for r in manifest_rows(tmp_path / "dst")}
    folder_rel = label_dir.relative_to(src).as_posix()
    assert rows[folder_rel]["reason"] == "UNREADABLE"
    image = rows[next((src / rel_in_site(truth[0].image_series_dir)).iterdir()).relative_to(src).as_posix()]
    assert image["reason"] == "LABEL_UNREADABLE" and folder_rel in image["detail"]


def test_read_header_tells_an_os_refusal_from_a_truncated_file(site, monkeypatch):
    folder, truth = site
    f = next((folder / rel_in_site(truth[0].image_series_dir)).iterdir())
    calls = iter(
        [
            PermissionError(errno.EACCES, "Permission denied", str(f)),
            OSError(errno.EIO, "I/O error"),
            OSError("No tag to read at file position 84"),
        ]
    )

    def dcmread(*_a, **_k):
        raise next(calls)

    monkeypatch.setattr(index_mod.pydicom, "dcmread", dcmread)
    first, second, third = (index_mod.read_header(f, "x.dcm") for _ in range(3))
    assert (first.reason, second.reason, third.reason) == (Reason.UNREADABLE, Reason.UNREADABLE, Reason.TRUNCATED)
    assert "EACCES" in first.detail and str(f) not in first.detail


def test_an_unlistable_source_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.dcm").write_bytes(b"x")
    _deny(monkeypatch, {os.fspath(tmp_path / "src")}, set())
    with pytest.raises(PreprocessInputError, match=r"^source folder could not be listed \(PermissionError\)"):
        check_source(tmp_path / "src")
