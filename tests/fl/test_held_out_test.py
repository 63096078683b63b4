"""A site's held-out test split in a federated run: scored by every evaluation task, reported apart, never rating."""

from __future__ import annotations

import json
import shutil

import pytest

from fedimg import config as cfg
from fedimg.datalist import Datalist
from tests.conftest import REPO, tiny_classification

pytestmark = [pytest.mark.nvflare, pytest.mark.slow, pytest.mark.integration]


def test_test_cases_are_scored_apart_in_the_final_and_cross_site_evaluation(cls_sites, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fedimg.fl.simulate import run_simulation

    sites = {}
    for site, dl in cls_sites[2].items():
        copy = tmp_path / f"{site}-data"
        shutil.copytree(dl.parent, copy)
        held = Datalist.read(copy / "datalist.json")
        # Two cases of each class move from validation to a held-out test split (validation: 3 blob, 3 clear).
        held.test = held.validation[1:5]
        held.validation = held.validation[:1] + held.validation[5:]
        held.write(copy / "datalist.json")
        cfg.save(
            cfg.SiteConfig(name=site, datalist=str(copy / "datalist.json"), device="cpu", num_threads=1),
            tmp_path / f"{site}.yaml",
        )
        sites[site] = str(tmp_path / f"{site}.yaml")
    exp = tiny_classification(2, name="heldout", **{"fed.num_rounds": 1, "privacy.min_cohort": 1})
    res = run_simulation(exp, REPO / "jobs" / "train", sites, tmp_path / "ws")

    # Training rounds rate models on validation only; the final evaluation also reports the test cases.
    train_rows = [r for r in res.global_metrics if not r["final_eval"]]
    assert train_rows and all("test" not in r for r in train_rows)
    assert all(not any(k.startswith("test_") for k in m) for r in train_rows for m in r["sites"].values())
    final = res.final_eval()
    assert final["test"]["weights"] == {"site-1": 4.0, "site-2": 4.0}
    for site in sites:
        assert final["test"]["sites"][site]["test_cases"] == 4
        assert 0.0 <= final["test"]["sites"][site]["test_auc"] <= 1.0
        assert final["sites"][site]["val_cases"] == 2
    # The best model was chosen on validation: its value is a validation score.
    assert res.summary["best"]["value"] == max(r["global"]["val_auc"] for r in res.global_metrics)
    # Cross-site evaluation: every model scored on every site's test cases too.
    cs = json.loads(res.cross_site.read_text())
    for site in sites:
        for model, metrics in cs[site].items():
            assert metrics["test_cases"] == 4 and "val_auc" in metrics, (site, model)
    acc = EventAccumulator(str(res.tb_logdir / "global"))
    acc.Reload()
    assert "test/auc_mean" in acc.Tags()["scalars"] and "val/auc_mean" in acc.Tags()["scalars"]
