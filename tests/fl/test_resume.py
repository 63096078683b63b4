"""Resume a federation from its saved global model: round numbers, best model and TensorBoard curves continue."""

from __future__ import annotations

import pytest
import torch

from fedimg import config as cfg
from tests.conftest import REPO, tiny_classification

pytestmark = [pytest.mark.nvflare, pytest.mark.slow, pytest.mark.integration]


def _sites(datalists, work):
    out = {}
    for site, dl in datalists.items():
        cfg.save(cfg.SiteConfig(name=site, datalist=str(dl), device="cpu", num_threads=1), work / f"{site}.yaml")
        out[site] = str(work / f"{site}.yaml")
    return out


def test_resumed_run_continues_rounds_best_model_and_curves(cls_sites, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fedimg.fl.simulate import run_simulation

    exp = tiny_classification(2, name="resume", **{"fed.cross_site_eval": "false"})
    sites = _sites(cls_sites[2], tmp_path)
    first = run_simulation(exp, REPO / "jobs" / "train", sites, tmp_path / "ws1")
    second = run_simulation(exp, REPO / "jobs" / "train", sites, tmp_path / "ws2", resume_from=first)

    assert [r["round"] for r in second.rounds if not r.get("final_eval")] == [2, 3]
    assert second.summary["start_round"] == 2 and second.summary["end_round"] == 4
    meta = torch.load(second.global_model, map_location="cpu", weights_only=True)["meta_props"]["fedimg"]
    assert meta["rounds_done"] == 4
    # Round 2 of the resumed run validates the very model the first run's final evaluation scored.
    before = first.final_eval()["global"]["val_auc"]
    assert second.global_metrics[0]["step"] == 2
    assert second.global_metrics[0]["global"]["val_auc"] == pytest.approx(before, abs=1e-6)
    # The best-model record carries over: the resumed best is never worse than the first run's.
    assert second.summary["best"]["value"] >= first.summary["best"]["value"]
    # One curve per site over both runs: steps 0..4, no restart at 0.
    for site in sites:
        acc = EventAccumulator(str(second.tb_logdir / site))
        acc.Reload()
        steps = [e.step for e in acc.Scalars("val/auc_mean")]
        assert sorted(set(steps)) == [0, 1, 2, 3, 4]
        loss_steps = [e.step for e in acc.Scalars("train/loss")]
        assert sorted(loss_steps) == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="resume into a new workspace"):
        run_simulation(exp, REPO / "jobs" / "train", sites, tmp_path / "ws1", resume_from=first)
