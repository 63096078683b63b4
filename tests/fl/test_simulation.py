"""The federated job in NVFlare's simulator: 2 sites x 2 rounds on tiny data, and job export."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedimg import config as cfg
from fedimg.models.registry import build_model
from tests.conftest import DEMO_EXPERIMENT, REPO, tiny_experiment

pytestmark = [pytest.mark.nvflare]


@pytest.fixture(scope="module")
def sim_run(small_preprocessed, tmp_path_factory):
    from fedimg.fl.simulate import run_simulation

    base, _ = small_preprocessed
    work = tmp_path_factory.mktemp("fl")
    site_cfgs = {}
    for site in ("site-1", "site-2"):
        sc = cfg.SiteConfig(name=site, datalist=str(base / site / "datalist.json"), device="cpu", num_threads=1)
        cfg.save(sc, work / f"{site}.yaml")
        site_cfgs[site] = str(work / f"{site}.yaml")
    exp = tiny_experiment()
    res = run_simulation(exp, REPO / "jobs" / "seg_fedavg", site_cfgs, work / "ws")
    return exp, res


@pytest.mark.integration
@pytest.mark.slow
def test_models_are_saved_and_load_into_the_configured_network(sim_run):
    exp, res = sim_run
    for path in (res.global_model, res.best_model):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        model = build_model(exp.model, exp.task)
        model.load_state_dict(ckpt["model"])  # strict: same architecture on server and sites
    meta = torch.load(res.global_model, map_location="cpu", weights_only=True)["meta_props"]
    assert meta["current_round"] == exp.fed.num_rounds - 1


@pytest.mark.integration
@pytest.mark.slow
def test_error_logs_are_empty(sim_run):
    _, res = sim_run
    logs = list(res.job_dir.glob("*/error_log.txt"))
    assert len(logs) >= 3  # server + 2 sites
    assert all(p.stat().st_size == 0 for p in logs), [p for p in logs if p.stat().st_size]


@pytest.mark.integration
@pytest.mark.slow
def test_cross_site_matrix_is_complete(sim_run):
    _, res = sim_run
    data = json.loads(res.cross_site.read_text())
    sites = ["site-1", "site-2"]
    assert sorted(data) == sites
    for evaluator in sites:
        models = data[evaluator]
        assert set(models) == {"SRV_FL_global_model.pt", "SRV_best_FL_global_model.pt", *sites}
        for metrics in models.values():
            assert 0.0 <= metrics["val_dice"] <= 1.0
            assert {"val_dice_organ", "val_dice_lesion"} <= set(metrics)
        assert res.final_dice(evaluator) == models["SRV_FL_global_model.pt"]["val_dice"]


@pytest.mark.integration
@pytest.mark.slow
def test_tensorboard_tags_per_site_with_aligned_steps(sim_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    exp, res = sim_run
    for site in ("site-1", "site-2"):
        d = res.tb_logdir / site
        assert d.is_dir(), f"no TensorBoard events for {site}"
        acc = EventAccumulator(str(d))
        acc.Reload()
        tags = set(acc.Tags()["scalars"])
        assert {"val/dice_mean", "val/dice/organ", "val/dice/lesion", "train/loss"} <= tags
        assert [e.step for e in acc.Scalars("val/dice_mean")] == list(range(exp.fed.num_rounds))
        assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, exp.fed.num_rounds + 1))
        assert all(0.0 <= e.value <= 1.0 for e in acc.Scalars("val/dice_mean"))
        # Only scalars reach the server, in event files named without this machine's host name.
        assert not acc.Tags()["images"] and not acc.Tags()["histograms"]
        import socket

        names = [p.name for p in d.glob("events.out.tfevents.*")]
        assert names and all(socket.gethostname() not in n.split(".")[3:5] for n in names)
        assert all(n.split(".")[4] == "fedimg" for n in names)


@pytest.mark.slow
def test_job_export_has_no_site_paths(tmp_path):
    out = tmp_path / "jobs"
    proc = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "seg_fedavg" / "job.py"), "--config", str(DEMO_EXPERIMENT),
         "--site", "site-1", "--site", "site-2", "--export", str(out)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    job = out / "seg_demo"
    meta = json.loads((job / "meta.json").read_text())
    assert meta["min_clients"] == 2
    custom = list(job.rglob("custom/client.py"))
    assert custom, "client script not bundled"
    exp_yaml = list(job.rglob("custom/experiment.yaml"))
    assert exp_yaml and cfg.load(cfg.ExperimentConfig, exp_yaml[0]).name == "seg_demo"
    client_cfg = next(job.rglob("config_fed_client.json")).read_text()
    assert "--site-config" not in client_cfg and str(tmp_path) not in client_cfg
    assert str(REPO) not in client_cfg  # no absolute paths of this machine
