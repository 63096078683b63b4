"""Issue 12, "nothing escapes its folder": names that become paths (site names, UIDs) are one safe component."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedimg import config as cfg
from fedimg.cli import main
from fedimg.safepath import UnsafePathError, child_path, is_uid, printable_path, safe_component, uid_component

REPO = Path(__file__).resolve().parents[2]
CT_SPEC = REPO / "configs" / "preprocessing" / "ct_phantom.yaml"
DEMO_EXPERIMENT = REPO / "configs" / "experiments" / "seg_demo.yaml"
BAD_SITES = [
    "../evil",
    "a/b",
    "..",
    ".hidden",
    "-rf",
    "a..b",
    "x" * 65,
    "",
    "two words",
    "tab\tname",
    "caf\u00e9",
    "back\\slash",
    "new\nline",
]
GOOD_SITES = ["site-1", "Site_A.2", "_x", "h" * 64]


@pytest.mark.parametrize("name", BAD_SITES)
def test_bad_site_names_are_refused_everywhere_a_site_enters(name, tmp_path):
    with pytest.raises(cfg.ConfigError, match="expected a site name of 1-64 letters"):
        cfg.validate_site_name(name, "--site")
    with pytest.raises(cfg.ConfigError, match="expected a site name"):
        cfg.SiteConfig(name=name, datalist="datalist.json")
    (tmp_path / "site.yaml").write_text(f"name: {name!r}\ndatalist: datalist.json\n", encoding="utf-8")
    with pytest.raises(cfg.ConfigError, match=r"site\.yaml: name: expected a site name"):
        cfg.load_site_config(tmp_path / "site.yaml")


@pytest.mark.parametrize("name", GOOD_SITES)
def test_good_site_names_pass(name):
    assert cfg.validate_site_name(name) == name
    assert cfg.SiteConfig(name=name, datalist="d.json").name == name


def test_preprocess_refuses_a_bad_site_before_writing(tmp_path):
    from fedimg.preprocess.pipeline import preprocess

    spec = cfg.load(cfg.PreprocessSpec, CT_SPEC)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("not dicom")
    with pytest.raises(cfg.ConfigError, match=r"^site: expected a site name.*got '\.\./x'"):
        preprocess(tmp_path / "src", tmp_path / "dst", spec, site="../x", progress=False)
    assert not (tmp_path / "dst").exists()


def test_cli_preprocess_bad_site_is_one_line_and_exit_2(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("not dicom")
    code = main(
        [
            "preprocess",
            str(src),
            str(tmp_path / "dst"),
            "--spec",
            str(CT_SPEC),
            "--site",
            "../../evil",
            "--no-deid",
            "--quiet",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0
    assert err.startswith("fedimg preprocess: error: --site: expected a site name") and "'../../evil'" in err
    assert not (tmp_path / "dst").exists()


def test_cli_compare_bad_site_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "s.yaml").write_text("name: site-1\ndatalist: d.json\n")
    code = main(
        [
            "compare",
            "--config",
            str(DEMO_EXPERIMENT),
            "--site",
            f"a/../b={tmp_path / 's.yaml'}",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert err.startswith("fedimg compare: error: --site NAME=SITE_YAML: expected a site name") and "a/../b" in err
    assert not (tmp_path / "out").exists()


def test_job_py_refuses_a_bad_site_name(tmp_path):
    """Even exporting (no site YAML read) refuses: the name becomes an NVFlare client and folders."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "jobs" / "train" / "job.py"),
            "--config",
            str(DEMO_EXPERIMENT),
            "--site",
            "site-1",
            "--site",
            "../evil",
            "--export",
            str(tmp_path / "jobs"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "--site NAME[=SITE_YAML]: expected a site name" in proc.stderr and "'../evil'" in proc.stderr
    assert not (tmp_path / "jobs").exists()


def test_federation_entry_points_refuse_bad_site_names(tmp_path):
    from fedimg.fl.deploy import PocFederation
    from fedimg.fl.recipe import build_recipe
    from fedimg.fl.simulate import collect

    exp = cfg.load(cfg.ExperimentConfig, DEMO_EXPERIMENT)
    with pytest.raises(cfg.ConfigError, match="expected a site name"):
        build_recipe(exp, REPO / "jobs" / "train", {"site-1": None, "../../x": None}, tmp_path / "staging")
    with pytest.raises(cfg.ConfigError, match="expected a site name"):
        collect(tmp_path, ["site-1", "../server"])
    with pytest.raises(cfg.ConfigError, match="expected a site name"):
        PocFederation(tmp_path / "poc", {"a/b": str(tmp_path / "s.yaml")})
    from fedimg.compare import run_comparison

    with pytest.raises(cfg.ConfigError, match="expected a site name"):
        run_comparison(exp, {"site-1": "a.yaml", "../x": "b.yaml"}, tmp_path / "cmp", progress=False)
    assert not (tmp_path / "cmp").exists()


def test_safe_component_and_uid_grammar():
    assert safe_component("case-0123", "case id") == "case-0123"
    for bad in ["", ".", "..", "a/b", "a\\b", "a\x00b", "x" * 256]:
        with pytest.raises(UnsafePathError, match="case id"):
            safe_component(bad, "case id")
    assert is_uid("1.2.840.10008.5.1.4.1.1.2") and is_uid("2.25." + "9" * 39)
    for bad in ["", "1.2.840.10008.1/../../x", "1..2", ".1", "1.", "1.2a", "1." + "2" * 63, "1.2 "]:
        assert not is_uid(bad)
    with pytest.raises(UnsafePathError, match=r"is not a UID \(expected digits and dots, at most 64"):
        uid_component("1.2.840.10008.1/../../x", "(0008,0018)")


def test_child_path_stays_inside_its_root(tmp_path):
    root = tmp_path / "out"
    (root / "case").mkdir(parents=True)
    assert child_path(root, "case", "image", "1.2.3.dcm") == (root / "case" / "image" / "1.2.3.dcm").resolve()
    with pytest.raises(UnsafePathError):
        child_path(root, "case", "..", "..", "x.dcm")
    with pytest.raises(UnsafePathError):
        child_path(root, "case/../../x.dcm")
    # A link planted inside the root that points elsewhere is refused after resolving.
    (tmp_path / "elsewhere").mkdir()
    (root / "planted").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(UnsafePathError, match="would leave its folder"):
        child_path(root, "planted", "x.dcm")


def test_printable_path_shows_undecodable_bytes():
    name = os.fsdecode(b"caf\xe9/IM\xff1.dcm")
    shown = printable_path(name)
    assert shown == "caf\\xe9/IM\\xff1.dcm"
    shown.encode("utf-8")  # valid UTF-8 text
    assert printable_path("caf\u00e9/IM1.dcm") == "caf\u00e9/IM1.dcm"  # a valid name is unchanged
