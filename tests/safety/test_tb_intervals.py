"""Tables a radiologist reads: 95% bootstrap intervals computed at the site, n per cell, HD95 at the voxel size.

Per-case scores never leave a site: the site sends the bounds of its
interval as two scalar metrics, which the server checks like the metric they
belong to, withholds below ``privacy.min_cohort`` like counts, and never
averages over sites. Heatmaps of measures in [0, 1] are coloured on 0-1.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedimg.tasks import curve_metrics, metric_names
from fedimg.tasks.classification import classification_metrics
from fedimg.tasks.intervals import RESAMPLES, mean_interval, rank_auc
from fedimg.tasks.segmentation import DiceAccumulator


def _cases(n: int, overlap: list[int]):
    """n cases of a 3-voxel-wide organ; case i's prediction covers overlap[i] of its 4 slabs."""
    labels, preds = [], []
    for i in range(n):
        label = torch.zeros(1, 1, 8, 8, 8, dtype=torch.long)
        label[..., 2:6, 2:6, 2:6] = 1
        pred = torch.zeros_like(label)
        pred[..., 2 : 2 + overlap[i], 2:6, 2:6] = 1
        labels.append(label)
        preds.append(pred)
    return labels, preds


def test_dice_and_hd95_carry_a_seeded_95_percent_bootstrap_interval_and_the_voxel_size():
    overlap = [4, 3, 2, 4, 1, 3]
    labels, preds = _cases(6, overlap)

    def run():
        acc = DiceAccumulator(["organ"])
        for label, pred in zip(labels, preds, strict=True):
            acc.update(pred, label, spacing=[[1.5, 2.0, 2.5]])
        return acc.result()

    res = run()
    per_case = np.array([2 * k / (k + 4) for k in overlap])  # Dice of k slabs against 4
    assert res["dice/organ"] == pytest.approx(per_case.mean())
    # The percentile bootstrap of the per-case Dice, 1000 seeded resamples: the same numbers every time.
    low, high = mean_interval(per_case)
    assert res["dice/organ_ci_low"] == pytest.approx(low) and res["dice/organ_ci_high"] == pytest.approx(high)
    assert res["dice_mean_ci_low"] == pytest.approx(low)  # one class: the mean over classes is that class
    assert low < res["dice/organ"] < high and low >= per_case.min() and high <= per_case.max()
    assert run() == res
    assert {"hd95/organ_ci_low", "hd95/organ_ci_high"} <= set(res)
    assert res["hd95/organ_ci_low"] <= res["hd95/organ"] <= res["hd95/organ_ci_high"]
    assert res["voxel_mm"] == 1.5  # the smallest spacing: HD95's resolution
    # Flat names follow their metric; none of these is a curve.
    flat = metric_names(res)
    assert {"val_dice_ci_low", "val_dice_ci_high", "val_dice_organ_ci_low", "val_hd95_organ_ci_high"} <= set(flat)
    assert flat["val_voxel_mm"] == 1.5
    assert not [k for k in curve_metrics(res) if "_ci_" in k or k == "voxel_mm"]


def test_a_single_case_gets_no_interval():
    labels, preds = _cases(1, [3])
    acc = DiceAccumulator(["organ"])
    acc.update(preds[0], labels[0])
    res = acc.result()
    assert "dice/organ" in res and not [k for k in res if "_ci_" in k]
    assert "voxel_mm" not in res  # no spacing known


def test_auc_interval_resamples_whole_cases():
    rng = np.random.default_rng(3)
    labels = np.array([0, 1] * 15)
    p1 = np.clip(0.5 + 0.25 * (labels - 0.5) + rng.normal(0, 0.2, labels.size), 0, 1).round(1)  # ties included
    scores = np.stack([1 - p1, p1], axis=1)
    m = classification_metrics(scores, labels, ["normal", "pneumonia"])
    assert m["auc_mean_ci_low"] <= m["auc_mean"] <= m["auc_mean_ci_high"]
    assert 0.0 <= m["auc_mean_ci_low"] < m["auc_mean_ci_high"] <= 1.0
    assert m["balanced_accuracy_ci_low"] <= m["balanced_accuracy"] <= m["balanced_accuracy_ci_high"]
    # The rank AUC used for the resamples is the AUC.
    assert rank_auc(p1, labels == 1) == pytest.approx(m["auc/pneumonia"])
    # By hand: resample case indices with the same seeded generator, AUC of each, percentiles.
    idx = np.random.default_rng(0).integers(0, labels.size, size=(RESAMPLES, labels.size))
    stats = np.array([rank_auc(p1[r], labels[r] == 1) for r in idx])
    stats = stats[np.isfinite(stats)]
    assert m["auc_mean_ci_low"] == pytest.approx(np.quantile(stats, 0.025))
    assert metric_names(m)["val_auc_ci_high"] == m["auc_mean_ci_high"]


def test_with_three_classes_every_auc_gets_its_interval():
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1, 2], 8)
    scores = rng.dirichlet([1, 1, 1], size=labels.size) + np.eye(3)[labels] * 0.5
    scores /= scores.sum(axis=1, keepdims=True)
    m = classification_metrics(scores, labels, ["a", "b", "c"])
    for c in "abc":
        assert m[f"auc/{c}_ci_low"] <= m[f"auc/{c}"] <= m[f"auc/{c}_ci_high"]
    assert metric_names(m)["val_auc_b_ci_low"] == m["auc/b_ci_low"]


def test_the_server_checks_interval_bounds_like_their_metric():
    from fedimg.fl.aggregation import check_metrics

    good = {"val_dice": 0.8, "val_dice_ci_low": 0.7, "val_dice_ci_high": 0.9, "val_hd95_lesion_ci_high": 12.0}
    assert check_metrics({**good, "val_voxel_mm": 1.5, "val_auc_ci_low": 0.6}) is None
    assert check_metrics({"val_dice_ci_high": 1.2}).startswith("OUT_OF_RANGE: a dice metric is 1.2")
    assert check_metrics({"test_auc_ci_low": -0.1}).startswith("OUT_OF_RANGE: a auc metric")
    assert check_metrics({"val_hd95_organ_ci_low": -1.0}).startswith("OUT_OF_RANGE: a hd95 metric")
    assert check_metrics({"val_voxel_mm": -3.0}).startswith("OUT_OF_RANGE: a voxel_mm metric")


def test_a_small_site_withholds_its_intervals_and_the_server_never_averages_them():
    from fedimg.fl.aggregation import weighted_metrics
    from fedimg.fl.client import withhold_small_cohort

    metrics = {"val_dice": 0.8, "val_dice_ci_low": 0.7, "val_dice_ci_high": 0.9, "val_cases": 3.0}
    assert withhold_small_cohort(metrics, 3, 5) == {"val_dice": 0.8}
    assert withhold_small_cohort(metrics, 6, 5) == metrics
    test = {"test_dice": 0.8, "test_dice_ci_low": 0.7, "test_cases": 2.0}
    assert withhold_small_cohort(test, 2, 5, prefix="test_") == {"test_dice": 0.8}
    sites = {
        "a": {**metrics, "val_voxel_mm": 1.5},
        "b": {"val_dice": 0.6, "val_dice_ci_low": 0.5, "val_dice_ci_high": 0.7, "val_voxel_mm": 3.0},
    }
    mean = weighted_metrics(sites, {"a": 3, "b": 1})
    assert mean["val_dice"] == pytest.approx(0.75)
    assert not [k for k in mean if "_ci_" in k or "voxel" in k]  # a mean of interval bounds is no interval


def _results():
    site1 = {"val_dice": 0.912, "val_dice_ci_low": 0.871, "val_dice_ci_high": 0.948, "val_cases": 6.0}
    site1 |= {"val_hd95_lesion": 1.5, "val_hd95_lesion_ci_low": 1.5, "val_hd95_lesion_ci_high": 1.5}
    site1 |= {"val_voxel_mm": 1.5, "val_hd95_undefined_lesion": 1.0}  # one case: a lesion missed or invented
    site2 = {"val_dice": 0.7, "val_hd95_lesion": 7.25, "val_voxel_mm": 1.5}  # a small site: no n, no interval
    models = ("SRV_FL_global_model.pt", "site-1")
    return {"site-1": dict.fromkeys(models, site1), "site-2": dict.fromkeys(models, site2)}


def test_cross_site_cells_state_interval_and_n_and_hd95_at_the_voxel_size():
    from fedimg.fl.report import cross_site_matrix, matrix_markdown

    md = matrix_markdown(cross_site_matrix(_results(), "val_dice"))
    assert "| final global model | 0.912 (0.87–0.95), n=6 | 0.700, n withheld | 0.806, n=6 + withheld |" in md
    assert "95% bootstrap interval" in md
    hd = matrix_markdown(cross_site_matrix(_results(), "val_hd95_lesion"))
    assert "| final global model | ≤ voxel size (1.5 mm), n=5 | 7.250, n withheld |" in hd  # 6 cases, 1 undefined
    # A site's numbers are checked before they are shown: a reversed interval is not drawn.
    bad = _results()
    bad["site-1"]["SRV_FL_global_model.pt"] = {"val_dice": 0.9, "val_dice_ci_low": 0.95, "val_dice_ci_high": 0.5}
    assert "| final global model | 0.900, n withheld |" in matrix_markdown(cross_site_matrix(bad, "val_dice"))


def test_evaluation_and_comparison_tables_show_intervals():
    from fedimg.compare import build_comparison
    from fedimg.fl.report import comparison_table, evaluation_table
    from tests.conftest import tiny_experiment

    site1 = _results()["site-1"]["site-1"]
    site2 = _results()["site-2"]["site-1"]
    record = {"sites": {"site-1": site1, "site-2": site2}, "global": {"val_dice": 0.85}}
    table = evaluation_table(record, ["val_dice", "val_hd95_lesion"])
    assert "| site-1 | validation | 0.912 (0.87–0.95) | ≤ voxel size (1.5 mm) | n=6 |" in table
    assert "| site-2 | validation | 0.700 | 7.250 | n withheld |" in table

    exp = tiny_experiment()
    sites = ["site-1", "site-2"]
    per_site = {"site-1": site1, "site-2": site2}
    comp = build_comparison(
        exp,
        sites,
        per_site,
        None,
        {s: {s: m} for s, m in per_site.items()},
        per_site,
        4,
        "val_dice",
        {"site-1": 6, "site-2": 4},
    )
    assert comp["intervals"]["local"]["site-1"] == [0.871, 0.948] and comp["intervals"]["local"]["site-2"] is None
    md = comparison_table(comp)
    assert "| local only (each site's own model) | 0.912 (0.87–0.95), n=6 | 0.700, n=4 | 0.806, n=10 |" in md


def test_heatmaps_of_unit_measures_are_coloured_on_0_to_1(monkeypatch):
    import matplotlib.axes

    from fedimg.fl.report import colour_range, cross_site_matrix, matrix_heatmap

    assert colour_range("val_dice", [[0.883, 0.98]]) == (0.0, 1.0)
    assert colour_range("val_auc_lesion", [[0.6, None]]) == (0.0, 1.0)
    assert colour_range("val_hd95_organ", [[4.5, 12.0]]) == (0.0, 12.0)
    seen = []
    original = matplotlib.axes.Axes.imshow

    def spy(self, *args, **kwargs):
        seen.append((kwargs.get("vmin"), kwargs.get("vmax")))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "imshow", spy)
    results = _results()
    results["site-2"]["SRV_FL_global_model.pt"] = {"val_dice": 0.98}
    picture = matrix_heatmap(cross_site_matrix(results, "val_dice"))
    assert seen == [(0.0, 1.0)] and picture.ndim == 3 and picture.shape[2] == 3
