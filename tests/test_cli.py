"""The fedimg command: exit codes and one-line errors for bad input, and the demo's summary."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedimg.cli import main
from tests.conftest import CT_SPEC, DEMO_EXPERIMENT


def _err_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("fedimg")]


def test_preprocess_missing_source(tmp_path, capsys):
    rc = main(
        ["preprocess", str(tmp_path / "nope"), str(tmp_path / "out"), "--spec", str(CT_SPEC), "--site", "s", "--quiet"]
    )
    assert rc == 2
    (line,) = _err_lines(capsys)
    assert "does not exist" in line and "expected a folder of DICOM files" in line


def test_preprocess_folder_without_dicom(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "notes.txt").write_text("hello")
    rc = main(
        [
            "preprocess",
            str(tmp_path / "src"),
            str(tmp_path / "out"),
            "--spec",
            str(CT_SPEC),
            "--site",
            "s",
            "--quiet",
            "--no-deid",
        ]
    )
    assert rc == 2
    (line,) = _err_lines(capsys)
    assert "no DICOM files" in line and "found 1 file" in line


def test_preprocess_bad_spec_override(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    rc = main(
        [
            "preprocess",
            str(tmp_path / "src"),
            str(tmp_path / "out"),
            "--spec",
            str(CT_SPEC),
            "--site",
            "s",
            "--set",
            "target_spacing=3",
        ]
    )
    assert rc == 2
    (line,) = _err_lines(capsys)
    # null is allowed too: 2D specs have no target_spacing.
    assert "target_spacing: expected list of 3 float" in line and "got int (3)" in line


def test_train_local_unknown_key(tmp_path, capsys):
    site = tmp_path / "site.yaml"
    site.write_text("name: s\ndatalist: d.json\n")
    rc = main(
        [
            "train-local",
            "--config",
            str(DEMO_EXPERIMENT),
            "--site-config",
            str(site),
            "--out",
            str(tmp_path / "o"),
            "--set",
            "optim.learning_rate=1",
        ]
    )
    assert rc == 2
    assert "unknown key optim.learning_rate" in _err_lines(capsys)[0]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu_suggests_auto(tmp_path, capsys):
    site = tmp_path / "site.yaml"
    site.write_text("name: s\ndatalist: d.json\n")
    rc = main(
        [
            "train-local",
            "--config",
            str(DEMO_EXPERIMENT),
            "--site-config",
            str(site),
            "--out",
            str(tmp_path / "o"),
            "--device",
            "cuda",
        ]
    )
    assert rc == 2
    line = _err_lines(capsys)[0]
    assert "no CUDA GPU" in line and "--device auto" in line


def test_train_local_missing_datalist(tmp_path, capsys):
    site = tmp_path / "site.yaml"
    site.write_text("name: s\ndatalist: missing/datalist.json\ndevice: cpu\n")
    rc = main(
        [
            "train-local",
            "--config",
            str(DEMO_EXPERIMENT),
            "--site-config",
            str(site),
            "--out",
            str(tmp_path / "o"),
            "--quiet",
        ]
    )
    assert rc == 2
    assert "run `fedimg preprocess`" in _err_lines(capsys)[0]


def test_preprocess_without_secret_is_refused_with_how_to(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("FEDIMG_SECRET_FILE", raising=False)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.dcm").write_bytes(b"x")
    rc = main(
        ["preprocess", str(tmp_path / "src"), str(tmp_path / "out"), "--spec", str(CT_SPEC), "--site", "s", "--quiet"]
    )
    assert rc == 2
    line = _err_lines(capsys)[0]
    assert "--secret-file" in line and "FEDIMG_SECRET_FILE" in line and "umask 077" in line
    assert not (tmp_path / "out").exists()


def test_synth_then_preprocess_via_cli(tmp_path, capsys):
    from fedimg.dicom.deid import SiteSecret

    SiteSecret.generate(tmp_path / "site.secret")
    assert main(["synth", str(tmp_path / "raw"), "--sites", "1", "--cases", "2", "--seed", "3", "--quiet"]) == 0
    assert (
        main(
            [
                "preprocess",
                str(tmp_path / "raw" / "site-1"),
                str(tmp_path / "pre"),
                "--spec",
                str(CT_SPEC),
                "--site",
                "site-1",
                "--quiet",
                "--set",
                "target_spacing=[6, 6, 6]",
                "--secret-file",
                str(tmp_path / "site.secret"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "0 refused" in out and "cases: 2" in out
    assert len(json.loads((tmp_path / "pre" / "datalist.json").read_text())["training"]) == 1


@pytest.mark.slow
@pytest.mark.nvflare
@pytest.mark.integration
def test_demo_smoke_writes_summary(tmp_path):
    """The demo path end to end at a small size (2 rounds); quality is checked by `make demo`."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedimg.cli",
            "demo",
            "--out",
            str(tmp_path / "demo"),
            "--sites",
            "2",
            "--cases",
            "3",
            "--rounds",
            "2",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert set(summary["sites"]) == {"site-1", "site-2"}
    for row in summary["sites"].values():
        assert row["cases"] >= 2 and 0.0 <= row["val_dice"] <= 1.0
    for key in ("best_model", "tensorboard_logdir", "cross_site"):
        assert (tmp_path / "demo").as_posix() in summary[key]
    assert json.loads(Path(summary["cross_site"]).read_text())
    assert "tensorboard --logdir" in proc.stdout and "Dice" in proc.stdout


def test_preprocess_refuses_a_group_readable_secret(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "x.dcm").write_bytes(b"not dicom")
    secret = tmp_path / "site.secret"
    secret.write_text("a" * 40)
    secret.chmod(0o644)
    rc = main(
        [
            "preprocess",
            str(tmp_path / "src"),
            str(tmp_path / "out"),
            "--spec",
            str(CT_SPEC),
            "--site",
            "s",
            "--secret-file",
            str(secret),
            "--quiet",
        ]
    )
    assert rc == 2
    line = _err_lines(capsys)[0]
    assert "chmod 600" in line and "a" * 40 not in line


def test_convert_does_not_import_torch_monai_or_nvflare(tmp_path: Path) -> None:
    # The audit command must start fast: conversion never uses torch, MONAI or NVFlare (issue 14).
    code = (
        "import sys; from fedimg.cli import main; rc = main(['convert', sys.argv[1], sys.argv[2], '--quiet']); "
        "heavy = sorted(m for m in ('torch', 'monai', 'nvflare') if m in sys.modules); "
        "print('HEAVY', heavy); sys.exit(rc)"
    )
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("not dicom")
    proc = subprocess.run(
        [sys.executable, "-c", code, str(src), str(tmp_path / "out")], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "no DICOM files in source" in proc.stderr  # the usage error path, too
    assert "HEAVY []" in proc.stdout


def test_version_verbose_anywhere_and_one_way_to_name_the_output(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("fedimg ")
    # Every writing command takes its output the same way: OUT last, or --out OUT.
    from fedimg.cli import build_parser

    parser = build_parser()
    for argv in (
        ["synth", "X"],
        ["preprocess", "S", "X", "--spec", "s", "--site", "a"],
        ["convert", "S", "X"],
        ["pull", "X", "--from", "dicomweb", "u", "--keys", "k"],
        ["predict", "P", "S", "X"],
        ["train-local", "X", "--config", "c", "--site-config", "s"],
        ["demo", "X"],
        ["compare", "X", "--config", "c"],
        ["fl", "run", "X", "--config", "c"],
        ["fl", "export", "X", "--config", "c"],
        ["fl", "evaluate", "P", "X"],
    ):
        positional = parser.parse_args(argv)
        option = parser.parse_args([a if a != "X" else "--out=X" for a in argv])
        assert positional.out == "X" and option.out_option == "X", argv
    # -v after the subcommand works as before it.
    assert parser.parse_args(["convert", "S", "X", "-v"]).verbose is True
    assert parser.parse_args(["-v", "convert", "S", "X"]).verbose is True
    assert parser.parse_args(["convert", "S", "X"]).verbose is False
    # Two different outputs are a usage error, in one line.
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", str(tmp_path), "a", "--out", "b"])
    assert exit_info.value.code == 2 and "give the output folder once" in capsys.readouterr().err
    # Defaults are shown in --help.
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert "(default: 3)" in capsys.readouterr().out
