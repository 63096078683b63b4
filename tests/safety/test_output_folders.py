"""Files the user owns are never deleted or overwritten; outputs never overlap inputs; exit codes a script can trust.

Each test is an attempt that today's guarantees must stop: writing into a
folder fedimg did not make, pruning a file fedimg did not write, converting
into another command's output, output and input folders that overlap, two
runs racing on one folder, and a run that produced nothing but exits 0.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fedimg.preprocess.outdir import JOURNAL, MARKER, OutputDirError, claim

REPO = Path(__file__).resolve().parents[2]
CT_SPEC = REPO / "configs" / "preprocessing" / "ct_phantom.yaml"


def _tree_digest(root: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file under ``root`` (what a user owns, byte for byte)."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedimg.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=600
    )


@pytest.fixture(scope="module")
def site(small_synth) -> Path:
    """One synthetic site (3 CT studies with NIfTI labels)."""
    return small_synth.out_dir / next(iter(small_synth.sites))


@pytest.fixture()
def spec6(ct_spec):
    return dataclasses.replace(ct_spec, target_spacing=(6.0, 6.0, 6.0))


def _user_folder(path: Path) -> dict[str, str]:
    """A folder a user keeps, shaped like fedimg's outputs (images/, labels/, series/ of NIfTI files)."""
    for sub in ("images", "labels", "series"):
        (path / sub).mkdir(parents=True)
        (path / sub / "scan_from_another_study.nii.gz").write_bytes(b"user data " + sub.encode())
    (path / "notes.txt").write_text("my notes")
    return _tree_digest(path)


def test_preprocess_refuses_a_folder_it_did_not_make(site: Path, spec6, tmp_path: Path) -> None:
    from fedimg.preprocess.pipeline import preprocess

    dst = tmp_path / "mine"
    before = _user_folder(dst)
    with pytest.raises(OutputDirError, match=r"not empty and was not made by fedimg preprocess.*notes\.txt"):
        preprocess(site, dst, spec6, site="site-1", progress=False)
    assert _tree_digest(dst) == before  # nothing deleted, nothing added


def test_convert_refuses_a_folder_it_did_not_make_from_the_cli(site: Path, tmp_path: Path) -> None:
    dst = tmp_path / "mine"
    before = _user_folder(dst)
    proc = _cli("convert", str(site), str(dst), "--quiet")
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "was not made by fedimg convert" in lines[0] and "Traceback" not in proc.stderr
    assert "series/" in lines[0]  # names what is there
    assert _tree_digest(dst) == before


def test_convert_refuses_a_preprocess_output_and_leaves_its_manifest(
    small_preprocessed, tmp_path: Path, small_synth
) -> None:
    base, _ = small_preprocessed
    dst = tmp_path / "pre"
    shutil.copytree(base / next(iter(small_synth.sites)), dst)
    before = _tree_digest(dst)
    proc = _cli("convert", str(small_synth.out_dir / next(iter(small_synth.sites))), str(dst), "--quiet")
    assert proc.returncode == 2
    assert "holds the outputs of fedimg preprocess, not of fedimg convert" in proc.stderr
    assert _tree_digest(dst) == before


def test_demo_refuses_a_folder_it_did_not_make_and_keeps_unrelated_files(tmp_path: Path, monkeypatch) -> None:
    from fedimg import demo

    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text('{"mine": true}')  # looked like a demo output to earlier releases
    (out / "raw").mkdir()
    (out / "raw" / "thesis.pdf").write_bytes(b"%PDF")
    before = _tree_digest(out)
    with pytest.raises(OutputDirError, match="was not made by fedimg demo"):
        demo.run_demo(out, sites=2, cases=2, device="cpu")
    assert _tree_digest(out) == before

    # A demo's own folder: its synthetic entries are replaced on a re-run, anything else stays.
    calls = []

    def fake_run(out_dir: Path, *args: object) -> dict:
        calls.append(out_dir)
        (out_dir / "raw").mkdir()
        (out_dir / "raw" / "synthetic.dcm").write_bytes(b"x")
        (out_dir / "summary.json").write_text("{}")
        return {}

    monkeypatch.setattr(demo, "_run_demo", fake_run)
    fresh = tmp_path / "fresh"
    demo.run_demo(fresh, sites=2, cases=2, device="cpu")
    assert json.loads((fresh / MARKER).read_text())["kind"] == "demo"
    (fresh / "my_analysis.ipynb").write_text("{}")
    demo.run_demo(fresh, sites=2, cases=2, device="cpu")
    assert (fresh / "my_analysis.ipynb").read_text() == "{}"
    assert len(calls) == 2 and (fresh / "raw" / "synthetic.dcm").is_file()


@pytest.mark.parametrize("layout", ["same", "inside", "contains"])
def test_output_and_input_never_overlap(site: Path, tmp_path: Path, layout: str) -> None:
    src = tmp_path / "export"
    shutil.copytree(site, src)
    dst = {"same": src, "inside": src / "out", "contains": tmp_path}[layout]
    before = _tree_digest(src)
    for command in ("convert", "preprocess"):
        extra = ["--spec", str(CT_SPEC), "--site", "s", "--no-deid"] if command == "preprocess" else []
        proc = _cli(command, str(src), str(dst), "--quiet", *extra)
        assert proc.returncode == 2, proc.stderr
        assert {"same": "is the same folder as SRC", "inside": "lies inside SRC", "contains": "contains SRC"}[
            layout
        ] in proc.stderr
        assert _tree_digest(src) == before  # refused before any work: nothing written anywhere
        assert not (tmp_path / MARKER).exists() and not (src / "out").exists()


def test_pruning_removes_only_what_fedimg_recorded(site: Path, spec6, tmp_path: Path) -> None:
    from fedimg.preprocess.pipeline import preprocess

    src = tmp_path / "export"
    shutil.copytree(site, src)
    dst = tmp_path / "dst"
    first = preprocess(src, dst, spec6, site="s", progress=False)
    assert len(first.cases) == 3
    # A file the user put into fedimg's folder, named like fedimg's outputs, and one journaled by a killed run.
    (dst / "images" / "case-0123456789ab.nii.gz").write_bytes(b"user's file")
    (dst / "images" / "case-deadbeefdead.nii.gz").write_bytes(b"half a run")
    (dst / JOURNAL).write_text(json.dumps("images/case-deadbeefdead.nii.gz") + "\n")
    # One study leaves the export: its outputs are stale.
    studies = sorted({Path(c).parts[0] for c in os.listdir(src) if (src / c).is_dir()})
    shutil.rmtree(src / studies[0])
    second = preprocess(src, dst, spec6, site="s", progress=False)
    assert len(second.cases) == 2 and second.cases_removed == 1
    assert (dst / "images" / "case-0123456789ab.nii.gz").read_bytes() == b"user's file"
    assert not (dst / "images" / "case-deadbeefdead.nii.gz").exists()
    gone = {c.image for c in first.cases} - {c.image for c in second.cases}
    assert len(gone) == 1 and not (dst / gone.pop()).exists()
    assert not (dst / JOURNAL).exists()  # every output is in the state file again


def test_convert_pruning_keeps_user_files(site: Path, tmp_path: Path) -> None:
    from fedimg.preprocess.convert import convert

    src = tmp_path / "export"
    shutil.copytree(site, src)
    dst = tmp_path / "conv"
    first = convert(src, dst, workers=1, progress=False)
    (dst / "series" / "series-0000000000000000.nii.gz").write_bytes(b"user's")
    studies = sorted(p for p in src.iterdir() if p.is_dir())
    shutil.rmtree(studies[0])
    second = convert(src, dst, workers=1, progress=False)
    assert len(second.outputs) < len(first.outputs)
    assert (dst / "series" / "series-0000000000000000.nii.gz").read_bytes() == b"user's"
    for rel in set(first.outputs) - set(second.outputs):
        assert not (dst / rel).exists()


def test_a_second_run_on_a_busy_folder_is_refused_at_once(site: Path, tmp_path: Path) -> None:
    dst = tmp_path / "conv"
    with claim(dst, "convert"):
        with pytest.raises(OutputDirError, match="in use by another fedimg convert run"):
            claim(dst, "convert")
        proc = _cli("convert", str(site), str(dst), "--quiet")
        assert proc.returncode == 2 and "in use by another fedimg convert run" in proc.stderr
        assert not (dst / "series").exists()
    with claim(dst, "convert"):  # released: free again
        pass


def test_temp_files_of_a_killed_run_are_removed_at_the_next_run(site: Path, tmp_path: Path) -> None:
    from fedimg.preprocess.convert import convert

    dst = tmp_path / "conv"
    convert(site, dst, workers=1, progress=False)
    leftover = dst / "series" / ".fedimg-tmp-series-abc.nii.gz.x1y2.tmp.nii.gz"
    leftover.write_bytes(b"half written")
    mine = dst / "series" / ".hidden_note"
    mine.write_text("not fedimg's")
    convert(site, dst, workers=1, progress=False)
    assert not leftover.exists() and mine.read_text() == "not fedimg's"


def test_crosswalk_never_overwrites_a_foreign_file_nor_lands_in_dst(site: Path, tmp_path: Path) -> None:
    secret = tmp_path / "site.secret"
    from fedimg.dicom.deid import SiteSecret

    SiteSecret.generate(secret)
    foreign = tmp_path / "ledger.csv"
    foreign.write_text("patient,id\n")
    base = [
        "preprocess",
        str(site),
        str(tmp_path / "dst"),
        "--spec",
        str(CT_SPEC),
        "--site",
        "s",
        "--secret-file",
        str(secret),
        "--quiet",
    ]
    proc = _cli(*base, "--crosswalk", str(foreign))
    assert proc.returncode == 2 and "not a fedimg crosswalk" in proc.stderr
    assert foreign.read_text() == "patient,id\n"
    proc = _cli(*base, "--crosswalk", str(tmp_path / "dst" / "crosswalk.jsonl"))
    assert proc.returncode == 2 and "--crosswalk lies inside DST" in proc.stderr


def test_no_case_exits_3_with_the_summary_written(tmp_path: Path) -> None:
    from fedimg.synth import generate

    dx = generate(tmp_path / "dx", n_sites=1, n_cases=2, seed=1, progress=False, modality="DX")
    dst = tmp_path / "dst"
    proc = _cli(
        "preprocess",
        str(dx.out_dir / next(iter(dx.sites))),
        str(dst),
        "--spec",
        str(CT_SPEC),
        "--site",
        "s",
        "--no-deid",
        "--quiet",
    )
    assert proc.returncode == 3, proc.stderr
    assert "nothing usable" in proc.stderr and "no case was converted" in proc.stderr
    summary = json.loads((dst / "summary.json").read_text())
    assert summary["cases"] == [] and summary["counts"]["skipped"] > 0
    proc = _cli("convert", str(tmp_path / "dx" / "labels_nowhere"), str(tmp_path / "c"), "--quiet")
    assert proc.returncode == 2  # a missing source is a usage error, not "nothing usable"


def test_no_validation_case_exits_3(site: Path, tmp_path: Path) -> None:
    src = tmp_path / "one"
    studies = sorted(p for p in site.iterdir() if p.is_dir())
    shutil.copytree(studies[0], src / studies[0].name)
    for f in site.iterdir():  # NIfTI labels sit beside the study folders at some sites
        if f.is_file():
            shutil.copy2(f, src / f.name)
    dst = tmp_path / "dst"
    proc = _cli("preprocess", str(src), str(dst), "--spec", str(CT_SPEC), "--site", "s", "--no-deid", "--quiet")
    summary = json.loads((dst / "summary.json").read_text())
    assert len(summary["cases"]) == 1, summary["reasons"]
    assert proc.returncode == 3 and "none of them for validation" in proc.stderr


def test_poc_prepare_never_removes_a_folder_of_the_users(tmp_path: Path) -> None:
    from fedimg.fl.deploy import DeploymentError, PocFederation

    ws = tmp_path / "poc"
    ws.mkdir()
    (ws / "results.csv").write_text("keep me")
    with pytest.raises(DeploymentError, match="not an NVFlare POC workspace"):
        PocFederation(ws, {"site-1": str(tmp_path / "site.yaml")}).prepare()
    assert (ws / "results.csv").read_text() == "keep me"
