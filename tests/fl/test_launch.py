"""``fedimg fl run | export | evaluate``: the federated commands, and evaluating a model trained elsewhere."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from fedimg import config as cfg
from fedimg.cli import main
from tests.conftest import REPO, tiny_classification

pytestmark = [pytest.mark.nvflare, pytest.mark.slow, pytest.mark.integration]


def _sites(datalists, work):
    out = []
    for site, dl in datalists.items():
        cfg.save(cfg.SiteConfig(name=site, datalist=str(dl), device="cpu", num_threads=1), work / f"{site}.yaml")
        out += ["--site", f"{site}={work / f'{site}.yaml'}"]
    return out


def test_a_model_trained_at_one_site_is_evaluated_at_every_site_without_training(cls_sites, tmp_path, capsys):
    from fedimg.models.package import load_package

    exp = tiny_classification(2, name="elsewhere", **{"train.epochs": 2, "privacy.min_cohort": 1})
    cfg.save(exp, tmp_path / "exp.yaml")
    sites = _sites(cls_sites[2], tmp_path)
    # Trained elsewhere: site-1 alone, outside any federation.
    assert (
        main(
            [
                "train-local",
                str(tmp_path / "local"),
                "--config",
                str(tmp_path / "exp.yaml"),
                "--site-config",
                str(tmp_path / "site-1.yaml"),
                "--quiet",
            ]
        )
        == 0
    )
    package = tmp_path / "local" / "packages" / "best"
    weights = load_package(package).state_dict

    rc = main(["fl", "evaluate", str(package), str(tmp_path / "ws"), "--env", "sim", *sites, "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0, out
    ev = json.loads(next((tmp_path / "ws").rglob("fedimg/evaluation.json")).read_text())
    assert set(ev["sites"]) == {"site-1", "site-2"}
    for _site, metrics in ev["sites"].items():
        assert 0.0 <= metrics["val_auc"] <= 1.0 and metrics["val_cases"] == 6
    md = next((tmp_path / "ws").rglob("fedimg/evaluation.md")).read_text()
    assert "| site-2 | validation |" in md and "n=6" in md and "n=12" in md  # cases behind every number
    assert "The given model at every site" in out
    # Nothing was trained: no round, and the server's model is the package's, unchanged.
    assert not list((tmp_path / "ws").rglob("fedimg/rounds.jsonl"))
    served = torch.load(
        next((tmp_path / "ws").rglob("app_server/FL_global_model.pt")), map_location="cpu", weights_only=True
    )["model"]
    assert all(torch.equal(torch.as_tensor(served[k]).to(v.dtype), v) for k, v in weights.items())

    # The job script, as NVFlare users run jobs, evaluates the same package to the same numbers.
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "jobs" / "train" / "job.py"),
            "--evaluate",
            str(package),
            "--env",
            "sim",
            "--workspace",
            str(tmp_path / "ws_job"),
            *sites,
        ],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    ev_job = json.loads(next((tmp_path / "ws_job").rglob("fedimg/evaluation.json")).read_text())
    for site, metrics in ev["sites"].items():
        assert ev_job["sites"][site]["val_auc"] == pytest.approx(metrics["val_auc"], abs=1e-6)
        assert ev_job["sites"][site]["val_cases"] == metrics["val_cases"]


def test_job_py_evaluate_refuses_a_folder_that_is_no_package(tmp_path):
    (tmp_path / "notapkg").mkdir()
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "jobs" / "train" / "job.py"),
            "--evaluate",
            str(tmp_path / "notapkg"),
            "--site",
            "site-1=x.yaml",
        ],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and "job.py: error:" in proc.stderr and "Traceback" not in proc.stderr


def test_fl_run_and_export_from_the_fedimg_command(cls_sites, tmp_path, capsys):
    exp = tiny_classification(2, name="flrun", **{"fed.num_rounds": 1, "fed.cross_site_eval": "false"})
    cfg.save(exp, tmp_path / "exp.yaml")
    sites = _sites(cls_sites[2], tmp_path)
    assert (
        main(["fl", "run", "--out", str(tmp_path / "ws"), "--config", str(tmp_path / "exp.yaml"), *sites, "--quiet"])
        == 0
    )
    out = capsys.readouterr().out
    assert "site-1: final global model val_auc" in out and "model packages: best" in out
    assert (
        main(
            [
                "fl",
                "export",
                str(tmp_path / "jobs"),
                "--config",
                str(tmp_path / "exp.yaml"),
                "--site",
                "site-1",
                "--site",
                "site-2",
            ]
        )
        == 0
    )
    job = tmp_path / "jobs" / "flrun"
    assert (job / "meta.json").is_file() and str(tmp_path) not in next(job.rglob("config_fed_client.json")).read_text()
