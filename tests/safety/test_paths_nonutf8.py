"""Issue 12: file and folder names that are not valid UTF-8 are processed, hashed and shown, never a crash.

Linux names are bytes. Python reads an undecodable byte as a lone surrogate
(``surrogateescape``), which ``str.encode()`` refuses: the keyed path hash
used to crash de-identified runs after all the conversion work. The hash now
covers the name's bytes on disk (``os.fsencode``); manifests and crosswalks
show such bytes as ``\\xNN`` so every line is valid UTF-8 JSON.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from fedimg.cli import main
from fedimg.dicom.deid import Pseudonymizer, SiteSecret
from fedimg.preprocess.convert import convert
from fedimg.preprocess.pipeline import preprocess
from tests.safety.paths_data import fast_spec, manifest_rows, rel_in_site, synth_site


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    return synth_site(tmp_path_factory.mktemp("nonutf8") / "raw", n_cases=2, seed=5)


def _latin1_source(folder: Path, truth, dst: Path) -> dict[str, str]:
    """Copy the site; give one study a Latin-1 folder name and its slices Latin-1 file names.

    Returns:
        The renamed files' relative paths (surrogate-escaped str) -> the text a manifest shows.
    """
    shutil.copytree(folder, dst)
    study = os.fsencode(dst / rel_in_site(truth[0].study_dir))
    renamed_study = study.rsplit(b"/", 1)[0] + b"/Caf\xe9_M\xfcller"  # Latin-1, invalid as UTF-8
    os.rename(study, renamed_study)
    series = renamed_study + b"/" + os.fsencode(Path(truth[0].image_series_dir).name)
    for name in os.listdir(series):
        os.rename(series + b"/" + name, series + b"/\xc9" + name)  # b"\xc9IM0001.dcm"
    out = {}
    for name in os.listdir(series):
        rel_bytes = os.path.relpath(series + b"/" + name, os.fsencode(dst))
        out[os.fsdecode(rel_bytes)] = rel_bytes.decode("utf-8", "backslashreplace")
    return out


def _strict_lines(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_bytes().decode("utf-8").splitlines()]
    for r in rows:
        json.dumps(r, ensure_ascii=False).encode("utf-8")  # no lone surrogate survived decoding
    return rows


def test_deidentified_run_hashes_the_name_bytes(site, tmp_path):
    folder, truth = site
    src = tmp_path / "src"
    renamed = _latin1_source(folder, truth, src)
    p = Pseudonymizer(SiteSecret.generate(tmp_path / "site.secret"))
    cw = tmp_path / "private" / "crosswalk.jsonl"
    cw.parent.mkdir()
    res = preprocess(src, tmp_path / "dst", fast_spec(), site="site-1", progress=False, pseudonymizer=p, crosswalk=cw)
    assert len(res.cases) == len(truth)  # the study with Latin-1 names converted too
    manifest = _strict_lines(tmp_path / "dst" / "manifest.jsonl")
    crosswalk = {r["input"]: r["input_hash"] for r in _strict_lines(cw)}
    for rel, shown in renamed.items():
        assert "/Caf\\xe9_M\\xfcller/" in shown and "/\\xc9IM" in shown
        # The crosswalk shows the name readably, next to the keyed hash of its bytes.
        assert crosswalk[shown] == p.path_hash(rel)
        row = next(r for r in manifest if r["input"] == p.path_hash(rel))
        assert row["status"] == "converted"
    assert all("Caf" not in r["input"] for r in manifest)  # inputs are keyed hashes under de-identification
    # A UTF-8 name hashes exactly as before (its bytes are its text's UTF-8).
    assert p.path_hash("caf\u00e9/IM1.dcm") == p.path_hash(os.fsdecode("caf\u00e9/IM1.dcm".encode("utf-8")))
    # The incremental re-run fingerprints the same bytes: every case reused.
    again = preprocess(src, tmp_path / "dst", fast_spec(), site="site-1", progress=False, pseudonymizer=p)
    assert again.cases_reused == len(truth) and again.cases_converted == 0


def test_plain_run_and_convert_write_valid_utf8_manifests(site, tmp_path, capsys):
    folder, truth = site
    src = tmp_path / "src"
    renamed = _latin1_source(folder, truth, src)
    res = preprocess(src, tmp_path / "dst", fast_spec(), site="site-1", progress=False)
    assert len(res.cases) == len(truth)
    rows = {r["input"]: r for r in _strict_lines(tmp_path / "dst" / "manifest.jsonl")}
    for shown in renamed.values():
        assert rows[shown]["status"] == "converted"
    assert set(rows) >= set(renamed.values())
    conv = convert(src, tmp_path / "conv", workers=1, progress=False)
    crows = {r["input"]: r for r in _strict_lines(tmp_path / "conv" / "manifest.jsonl")}
    assert all(crows[s]["status"] == "converted" for s in renamed.values()) and len(conv.outputs) == len(truth)
    capsys.readouterr()
    assert main(["manifest", str(tmp_path / "dst")]) == 0
    assert f"{len(rows)} input files" in capsys.readouterr().out
    assert manifest_rows(tmp_path / "dst") == list(rows.values())
