"""``fedimg compare``: the federated run, local-only and centralized baselines, one comparison table."""

from __future__ import annotations

import json
import shutil

import pytest

from fedimg import config as cfg
from fedimg import runtime
from fedimg.datalist import Datalist
from tests.conftest import tiny_classification

pytestmark = [pytest.mark.nvflare, pytest.mark.slow, pytest.mark.integration]


def test_comparison_of_federated_local_and_centralized(cls_sites, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fedimg.compare import run_comparison
    from fedimg.data.datasets import read_datalist
    from fedimg.tasks import metric_names
    from fedimg.training.checkpoint import load_state_dict
    from fedimg.training.trainer import SiteTrainer

    exp = tiny_classification(2, name="cmp", **{"fed.num_rounds": 2, "train.local_epochs": 2})
    site_cfgs = {}
    for site, dl in cls_sites[2].items():
        # site-1 holds out two cases as a test split (split.test_fraction): reported apart, never trained on.
        if site == "site-1":
            copy = tmp_path / "site-1-data"
            shutil.copytree(dl.parent, copy)
            held = Datalist.read(copy / "datalist.json")
            # One case of each class (AUC needs both): validation items are 3 'blob' then 3 'clear'.
            held.test = held.validation[2:4]
            held.validation = held.validation[:2] + held.validation[4:]
            held.write(copy / "datalist.json")
            dl = copy / "datalist.json"
        cfg.save(cfg.SiteConfig(name=site, datalist=str(dl), device="cpu", num_threads=1), tmp_path / f"{site}.yaml")
        site_cfgs[site] = str(tmp_path / f"{site}.yaml")
    comp = run_comparison(exp, site_cfgs, tmp_path / "out", progress=False)

    # Every cell says how many cases stand behind it; the held-out cases get a table of their own.
    assert comp["cases"] == {"site-1": 4, "site-2": 6} and comp["cases_total"] == 10
    test = comp["test"]
    assert test["split"] == "test" and test["cases"] == {"site-1": 2}
    assert test["methods"] == comp["methods"]
    for m in test["methods"]:
        assert test["per_site"][m]["site-2"] is None  # site-2 has no test split
        assert 0.0 <= test["per_site"][m]["site-1"] <= 1.0

    assert comp["metric"] == "val_auc" and comp["epochs"] == 4  # 2 rounds x 2 local epochs
    assert comp["methods"] == ["federated", "federated_best", "local", "centralized"]
    saved = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert saved["mean"] == comp["mean"]
    md = (tmp_path / "out" / "comparison.md").read_text()
    assert "| centralized (all sites' cases pooled) |" in md and "mean over sites (n=10)" in md
    assert "site-1 (n=4)" in md and "held-out test cases" in md and "site-1 (n=2)" in md
    for m in comp["methods"]:
        vals = [v for v in comp["per_site"][m].values() if v is not None]
        assert vals and all(0.0 <= v <= 1.0 for v in vals)
        assert comp["mean"][m] == pytest.approx(sum(vals) / len(vals))
    assert comp["federated_over_centralized"] == pytest.approx(comp["mean"]["federated"] / comp["mean"]["centralized"])

    # The federated numbers are the cross-site evaluation's; a local baseline's are its own model's, re-scored.
    cs = json.loads((next((tmp_path / "out" / "federated").rglob("cross_val_results.json"))).read_text())
    for site in site_cfgs:
        assert comp["per_site"]["federated"][site] == cs[site]["SRV_FL_global_model.pt"]["val_auc"]
    rt = runtime.setup("cpu", False, 1, seed=0)
    dl = read_datalist(tmp_path / "site-1-data" / "datalist.json")
    tr = SiteTrainer(exp, dl.training, dl.validation, rt)
    tr.load_weights(load_state_dict(tmp_path / "out" / "baselines" / "local-site-1" / "final_model.pt"))
    assert metric_names(tr.validate())["val_auc"] == pytest.approx(comp["per_site"]["local"]["site-1"], abs=1e-6)

    # The server's TensorBoard run holds the comparison too.
    glob = next((tmp_path / "out" / "federated").rglob("tb_events/global"))
    acc = EventAccumulator(str(glob), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    assert "comparison/heatmap" in acc.Tags()["images"]
    assert "comparison/table/text_summary" in acc.Tags()["tensors"]
