"""Every task x algorithm combination in NVFlare's simulator, at tiny size: 2 sites x 2 rounds.

Tasks: 3D segmentation (synthetic CT sites), 2D and 3D classification
(synthetic images with a known label). Algorithms: FedAvg, FedProx, FedOpt,
SCAFFOLD, FedBN. Every run is checked on what it produced: the models load
into the configured network, every round has both sites' updates, the
federation's and every site's validation curves are there with aligned steps,
and each algorithm left its own trace (FedProx's proximal term, SCAFFOLD's
control variates, FedBN's untouched global normalization layers, FedOpt's
difference exchange).
"""

from __future__ import annotations

import math

import pytest
import torch

from fedimg import config as cfg
from fedimg.models.registry import build_model, normalization_keys
from tests.conftest import REPO, tiny_classification, tiny_experiment

pytestmark = [pytest.mark.nvflare, pytest.mark.slow, pytest.mark.integration]

ALGORITHMS = ["fedavg", "fedprox", "fedopt", "scaffold", "fedbn"]
# Each network appears with several algorithms; FedBN needs normalization layers with statistics.
MODELS = {
    "seg3d": ["unet", "segresnet", "unet", "segresnet", "unet"],
    "cls2d": ["densenet121", "resnet", "densenet121", "resnet", "densenet121"],
    "cls3d": ["resnet", "densenet121", "resnet", "densenet121", "resnet"],
}
CASES = [(task, algo, MODELS[task][i]) for task in MODELS for i, algo in enumerate(ALGORITHMS)]
# These runs send fp16 differences; the others fp32 (weights, or differences for FedOpt).
FP16 = {("cls2d", "fedavg"), ("seg3d", "fedprox"), ("cls3d", "scaffold")}


def _expected_update_bytes(net, exp, local_keys=()) -> int:
    """Tensor bytes of one site's update, from the network's own state dict."""
    total = 0
    for k, v in net.state_dict().items():
        if k in local_keys:
            continue
        size = 2 if exp.fed.update_precision == "fp16" and v.is_floating_point() else v.element_size()
        total += v.numel() * size
    if exp.fed.algorithm == "scaffold":  # control-variate changes of the trainable parameters
        size = 2 if exp.fed.update_precision == "fp16" else 4
        total += sum(p.numel() for p in net.parameters()) * size
    return total


def _experiment(task: str, algorithm: str, model: str) -> cfg.ExperimentConfig:
    over = {"fed.algorithm": algorithm, "model.name": model, "fed.cross_site_eval": "false"}
    if algorithm == "fedopt":
        over["fed.exchange"] = "diff"
    if (task, algorithm) in FP16:
        over.update({"fed.exchange": "diff", "fed.update_precision": "fp16"})
    if algorithm == "fedbn":
        over["model.norm"] = "batch"
    if task == "seg3d":
        if model == "segresnet":
            over.update(
                {
                    "model.init_filters": 8,
                    "model.blocks_down": "[1, 1, 1]",
                    "model.norm": "group" if algorithm != "fedbn" else "batch",
                }
            )
        return tiny_experiment(name=f"{task}_{algorithm}", **over)
    return tiny_classification(int(task[-2]), name=f"{task}_{algorithm}", **over)


def _site_configs(task: str, small_preprocessed, cls_sites, work) -> dict[str, str]:
    if task == "seg3d":
        base, _ = small_preprocessed
        datalists = {s: base / s / "datalist.json" for s in ("site-1", "site-2")}
    else:
        datalists = cls_sites[int(task[-2])]
    out = {}
    for site, dl in datalists.items():
        sc = cfg.SiteConfig(name=site, datalist=str(dl), device="cpu", num_threads=1)
        cfg.save(sc, work / f"{site}.yaml")
        out[site] = str(work / f"{site}.yaml")
    return out


@pytest.mark.parametrize("task,algorithm,model", CASES, ids=[f"{t}-{a}-{m}" for t, a, m in CASES])
def test_task_algorithm_combination(task, algorithm, model, small_preprocessed, cls_sites, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fedimg.fl.simulate import run_simulation

    exp = _experiment(task, algorithm, model)
    sites = _site_configs(task, small_preprocessed, cls_sites, tmp_path)
    res = run_simulation(exp, REPO / "jobs" / "train", sites, tmp_path / "ws")
    rounds = exp.fed.num_rounds

    # The final model is the configured network, and the summary is this algorithm's.
    net = build_model(exp.model, exp.task)
    state = torch.load(res.global_model, map_location="cpu", weights_only=True)["model"]
    net.load_state_dict(state)
    assert res.summary["algorithm"] == algorithm
    assert res.summary["end_round"] == rounds

    # Every training round aggregated both sites' updates, of the size the exchange settings give.
    train_rounds = [r for r in res.rounds if not r.get("final_eval")]
    assert [r["round"] for r in train_rounds] == list(range(rounds))
    local_keys = normalization_keys(net) if algorithm == "fedbn" else ()
    expected_bytes = _expected_update_bytes(net, exp, local_keys)
    for r in train_rounds:
        assert sorted(r["contributed"]) == sorted(sites) and not r["rejected"] and not r["missing"]
        assert all(w > 0 for w in r["weights"].values())
        assert all(b == expected_bytes for b in r["update_bytes"].values())

    # Validation after 0..rounds aggregations, the last one the final evaluation; finite key metric in [0, 1].
    key = exp.key_metric
    steps = [row["step"] for row in res.global_metrics]
    assert steps == list(range(rounds + 1)) and res.global_metrics[-1]["final_eval"]
    for row in res.global_metrics:
        assert set(row["sites"]) == set(sites)
        assert 0.0 <= row["global"][key] <= 1.0
    best = res.summary["best"]
    assert best["value"] == max(row["global"][key] for row in res.global_metrics)

    # TensorBoard: per-site and federation curves on the same steps.
    metric = "dice_mean" if task == "seg3d" else "auc_mean"
    for run in [*sites, "global"]:
        acc = EventAccumulator(str(res.tb_logdir / run))
        acc.Reload()
        assert [e.step for e in acc.Scalars(f"val/{metric}")] == list(range(rounds + 1))
        assert all(math.isfinite(e.value) for e in acc.Scalars(f"val/{metric}"))
        if run != "global":
            assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, rounds + 1))

    stats = [r["algorithm_stats"] for r in train_rounds]
    if algorithm == "fedprox":
        # The term is 0 at a round's first step (weights = global) and grows after it.
        assert all(s[site]["mu"] == exp.fed.mu for s in stats for site in sites)
        assert all(
            s[site]["prox_term"] > 0 for r, s in zip(train_rounds, stats) for site in sites if r["weights"][site] >= 2
        )
    if algorithm == "scaffold":
        assert all(
            s[site]["control_delta_norm"] > 0 and s[site]["corrected_steps"] >= 1 for s in stats for site in sites
        )
    if algorithm == "fedbn":
        # The sites never sent their normalization layers: the global copies are the initialization.
        init = build_model(exp.model, exp.task).state_dict()
        norm = normalization_keys(net)
        assert norm and all(s[site]["local_entries"] == len(norm) for s in stats for site in sites)
        assert all(torch.equal(state[k].float(), init[k].float()) for k in norm)
        others = [k for k in state if k not in norm and state[k].is_floating_point()]
        assert any(not torch.equal(state[k], init[k]) for k in others)
    if algorithm == "fedopt":
        assert exp.fed.exchange == "diff"
