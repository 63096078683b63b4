"""Update exchange (weights/differences, fp16) and the server's aggregation and update rules, on known values."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedimg.fl.aggregation import Update, aggregate, weighted_metrics
from fedimg.fl.exchange import DIFF, FULL, make_update, payload_bytes, to_float32
from tests.conftest import apply_round, controller_for


def _state():
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(64, 32, generator=g), "bn.num_batches_tracked": torch.tensor(5)}


def test_diff_fp16_halves_the_float_bytes_and_round_trips():
    glob = _state()
    local = {
        "w": glob["w"] + 0.01 * torch.randn(64, 32, generator=torch.Generator().manual_seed(1)),
        "bn.num_batches_tracked": torch.tensor(9),
    }
    full32, kind = make_update(local, glob, "weights", "fp32")
    assert kind == FULL and torch.equal(full32["w"], local["w"])
    diff16, kind = make_update(local, glob, "diff", "fp16")
    assert kind == DIFF and diff16["w"].dtype == torch.float16
    assert diff16["bn.num_batches_tracked"].dtype == torch.int64 and int(diff16["bn.num_batches_tracked"]) == 4
    float_bytes32 = full32["w"].numel() * 4
    assert payload_bytes({"w": diff16["w"]}) * 2 == float_bytes32
    back = to_float32(diff16)
    assert back["w"].dtype == np.float32
    # fp16 keeps 11 significant bits: the error is relative to the small difference, not to the weights.
    diff = (local["w"] - glob["w"]).numpy()
    err = np.abs(glob["w"].numpy() + back["w"] - local["w"].numpy())
    assert (err <= np.abs(diff) * 2.0**-10 + 1e-7).all()
    weights16, _ = make_update(local, glob, "weights", "fp16")
    err_w = np.abs(to_float32(weights16)["w"] - local["w"].numpy()).max()
    assert err_w > 10 * err.max()  # full weights in fp16 lose far more


def test_excluded_keys_stay_at_the_site():
    glob = _state()
    out, _ = make_update(glob, glob, "diff", "fp32", exclude={"bn.num_batches_tracked"})
    assert set(out) == {"w"}
    with pytest.raises(ValueError, match="fed.exchange must be"):
        make_update(glob, glob, "delta", "fp32")


def test_weighted_mean_median_and_trimmed_mean():
    ups = [
        Update("a", {"x": np.array([1.0, 10.0], dtype=np.float32)}, 1.0),
        Update("b", {"x": np.array([3.0, 20.0], dtype=np.float32)}, 3.0),
        Update("c", {"x": np.array([1000.0, -500.0], dtype=np.float32)}, 0.0),
    ]
    mean = aggregate(ups[:2], "mean")["x"]
    assert np.allclose(mean, [2.5, 17.5])  # weights 1:3
    med = aggregate(ups, "median")["x"]
    assert np.allclose(med, [3.0, 10.0])  # the outlier site cannot move it
    four = [*ups, Update("d", {"x": np.array([2.0, 15.0], dtype=np.float32)}, 1.0)]
    trimmed = aggregate(four, "trimmed_mean", trim=1)["x"]
    assert np.allclose(trimmed, [2.5, 12.5])
    with pytest.raises(ValueError, match="aggregation must be one of"):
        aggregate(ups, "mode")


def test_entries_sent_by_some_sites_only_and_integer_buffers():
    ups = [
        Update("a", {"conv": np.ones(2, np.float32), "n": np.array(4)}, 1.0),
        Update("b", {"conv": 3 * np.ones(2, np.float32)}, 1.0),
    ]
    out = aggregate(ups)
    assert np.allclose(out["conv"], 2.0) and out["n"] == 4 and out["n"].dtype == np.array(4).dtype
    with pytest.raises(ValueError, match="different shapes"):
        aggregate([Update("a", {"x": np.ones(2)}, 1), Update("b", {"x": np.ones(3)}, 1)])


def test_weighted_metrics_skip_missing_and_non_finite():
    res = weighted_metrics({"a": {"auc": 0.8, "dice": float("nan")}, "b": {"auc": 0.5}}, {"a": 3, "b": 1})
    assert res == {"auc": pytest.approx(0.725)}


def _controller(algorithm: str, server_optimizer: dict | None = None):
    so = {
        f"server_optimizer.{k}": (json.dumps(v) if isinstance(v, list) else v)
        for k, v in (server_optimizer or {}).items()
    }
    return controller_for(algorithm, num_clients=2, exchange="diff", **so)


def _diff_updates(ctl, scale=1.0):
    d = {k: np.full_like(v, 0.1 * scale) for k, v in ctl._global.items()}
    e = {k: np.full_like(v, 0.3 * scale) for k, v in ctl._global.items()}
    return [Update("a", d, 1.0), Update("b", e, 1.0)]


def test_adaptive_round_limit_is_three_times_the_slowest_round_above_its_floor():
    ctl = controller_for(first_round_timeout_s=120, min_round_timeout_s=20)
    assert ctl.round_limit() == 120  # nothing measured yet: the first round's limit
    ctl._round_seconds += [4.0, 5.0]
    assert ctl.round_limit() == 20  # 3 x 5 s is below the floor
    ctl._round_seconds.append(9.5)
    assert ctl.round_limit() == 28  # 3 x the slowest round
    assert controller_for(round_timeout_s=45).round_limit() == 45  # fixed limit


def test_fedopt_sgd_without_momentum_at_lr_1_is_fedavg():
    avg, opt = _controller("fedavg"), _controller("fedopt", {"name": "sgd", "lr": 1.0, "momentum": 0.0})
    start = {k: v.copy() for k, v in avg._global.items()}
    apply_round(avg, _diff_updates(avg), "DIFF", [])
    apply_round(opt, _diff_updates(opt), "DIFF", [])
    for k in start:
        assert np.allclose(avg._global[k], start[k] + 0.2, atol=1e-6)
        assert np.allclose(opt._global[k], avg._global[k], atol=1e-6)


def test_fedopt_server_momentum_and_learning_rate():
    opt = _controller("fedopt", {"name": "sgd", "lr": 0.5, "momentum": 0.6})
    start = {k: v.copy() for k, v in opt._global.items()}
    apply_round(opt, _diff_updates(opt), "DIFF", [])
    apply_round(opt, _diff_updates(opt), "DIFF", [])
    # SGD with momentum on pseudo-gradient -0.2: steps 0.5*0.2, then 0.5*(0.2 + 0.6*0.2).
    for k in start:
        assert np.allclose(opt._global[k], start[k] + 0.1 + 0.16, atol=1e-6)
    adam = _controller("fedopt", {"name": "adam", "lr": 0.01, "betas": [0.9, 0.99], "eps": 1e-3})
    before = {k: v.copy() for k, v in adam._global.items()}
    apply_round(adam, _diff_updates(adam), "DIFF", [])
    assert all(np.all(adam._global[k] > before[k]) for k in before)  # moved along the average update


def test_scaffold_updates_its_global_controls():
    from nvflare.app_common.abstract.fl_model import FLModel
    from nvflare.app_common.app_constant import AlgorithmConstants

    ctl = _controller("scaffold")
    ups = _diff_updates(ctl)
    results = [
        FLModel(
            params=u.params,
            meta={
                "client_name": u.site,
                AlgorithmConstants.SCAFFOLD_CTRL_DIFF: {k: np.full_like(v, c) for k, v in ctl._global.items()},
            },
        )
        for u, c in zip(ups, (1.0, 3.0))
    ]
    apply_round(ctl, ups, "DIFF", results)
    assert all(np.allclose(v, 2.0) for v in ctl.strategy.controls.values())
    assert ctl.strategy.check_result({"client_name": "a"}).startswith("MISSING_CONTROLS")


def _honest(rng, n=3):
    base = rng.normal(0, 1, 50).astype(np.float32)
    return [Update(f"site-{i + 1}", {"w": base + 0.1 * rng.normal(0, 1, 50).astype(np.float32)}, 1.0) for i in range(n)]


@pytest.mark.parametrize(
    "attack,reason", [("nan", "NON_FINITE"), ("scale", "NORM_OUTLIER"), ("flip", "DIRECTION_OUTLIER")]
)
def test_screening_names_the_poisoned_site(attack, reason):
    from fedimg.fl.aggregation import screen_updates

    ups = _honest(np.random.default_rng(1))
    w = ups[2].params["w"].copy()
    w = {"nan": np.where(np.arange(50) == 7, np.nan, w), "scale": 100 * w, "flip": -w}[attack].astype(np.float32)
    ups[2] = Update("site-3", {"w": w}, 1.0)
    kept, rejected = screen_updates(
        ups, {"w": np.zeros(50, np.float32)}, is_diff=True, norm_outlier_factor=5.0, min_cosine=0.0
    )
    assert [u.site for u in kept] == ["site-1", "site-2"]
    assert list(rejected) == ["site-3"] and rejected["site-3"].startswith(reason)


def test_screening_keeps_honest_updates_and_checks_full_weights_as_changes():
    from fedimg.fl.aggregation import screen_updates

    ups = _honest(np.random.default_rng(2))
    glob = {"w": np.full(50, 10.0, np.float32)}
    full = [Update(u.site, {"w": u.params["w"] + glob["w"]}, 1.0) for u in ups]
    kept, rejected = screen_updates(full, glob, is_diff=False, norm_outlier_factor=3.0, min_cosine=0.0)
    assert len(kept) == 3 and not rejected
    kept, rejected = screen_updates(ups, glob, is_diff=True, max_update_norm=1e-3)
    assert not kept and all(r.startswith("NORM_TOO_LARGE") for r in rejected.values())
