"""End to end in NVFlare's simulator: a site lying about its weight, its update's entries and shapes, and its metrics.

site-2 reports a weight of 1e12 in round 0, sends its first weight tensor
with shape (1,) in round 1 and an extra entry in round 2, and claims an AUC
of 1e6 in every validation (:class:`fedimg.fl.faults.TamperResult`). The
server must reject each of these with site-2 named and go on with site-1
(``fed.min_clients: 1``): the run completes, the global model keeps exactly
the network's entries, finite, and the best model is chosen on believable
numbers only.
"""

from __future__ import annotations

import math

import pytest
import torch

from fedimg import config as cfg
from tests.conftest import REPO, tiny_classification

pytestmark = [pytest.mark.nvflare, pytest.mark.slow, pytest.mark.integration]


def test_a_lying_site_is_rejected_each_round_and_the_run_completes(cls_sites, tmp_path):
    from fedimg.fl.faults import TamperResult
    from fedimg.fl.simulate import run_simulation
    from fedimg.models.registry import build_model

    sites = {}
    for site, dl in cls_sites[2].items():
        cfg.save(cfg.SiteConfig(name=site, datalist=str(dl), device="cpu", num_threads=1), tmp_path / f"{site}.yaml")
        sites[site] = str(tmp_path / f"{site}.yaml")
    exp = tiny_classification(
        2,
        name="tamper",
        **{"fed.num_rounds": 3, "fed.min_clients": 1, "fed.cross_site_eval": "false", "fed.key_metric": "val_auc"},
    )

    def tamper(recipe):
        for flt in (
            TamperResult("steps", value=1e12, rounds=[0]),
            TamperResult("shape", rounds=[1]),
            TamperResult("extra_entry", rounds=[2]),
            TamperResult("metric", value=1e6, metric="val_auc"),
        ):
            recipe.add_client_output_filter(flt, tasks=["train", "validate"], clients=["site-2"])

    res = run_simulation(exp, REPO / "jobs" / "train", sites, tmp_path / "ws", customize=tamper)

    rounds = [r for r in res.rounds if not r.get("final_eval")]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    expected = ["WEIGHT_TOO_LARGE", "SHAPE_MISMATCH", "UNKNOWN_KEY"]
    for r, code in zip(rounds, expected):
        assert r["contributed"] == ["site-1"] and list(r["rejected"]) == ["site-2"], r
        assert r["rejected"]["site-2"].startswith(code), r["rejected"]
    server_log = "\n".join(p.read_text(errors="replace") for p in res.job_dir.rglob("log.txt") if "server" in str(p))
    assert "update of site-2 rejected: SHAPE_MISMATCH" in server_log

    assert len(res.global_metrics) == 4  # rounds 0..2 and the final evaluation
    for row in res.global_metrics:
        assert set(row["sites"]) == {"site-1"} and row["rejected"]["site-2"].startswith("OUT_OF_RANGE"), row
        assert 0.0 <= row["global"]["val_auc"] <= 1.0
    assert 0.0 <= res.summary["best"]["value"] <= 1.0

    net = build_model(exp.model, exp.task)
    state = torch.load(res.global_model, map_location="cpu", weights_only=True)["model"]
    assert set(state) == set(net.state_dict())  # no injected entry was forwarded
    net.load_state_dict(state)
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert not math.isnan(res.summary["final_global_val"]["val_auc"])
