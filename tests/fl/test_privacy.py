"""Privacy filters: parameters checked at construction, the Gaussian mechanism's clipping, noise and accounting."""

from __future__ import annotations

import numpy as np
import pytest
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

from fedimg.fl.privacy import (
    DP_META,
    GaussianUpdateDP,
    ScalarOnlyResultGuard,
    ValidatedPercentilePrivacy,
    ValidatedSVTPrivacy,
    gaussian_epsilon,
)


def _diff(scale=1.0, n=20000):
    rng = np.random.default_rng(0)
    return {"w": (scale * rng.normal(0, 1, n)).astype(np.float32), "n": np.array(3)}


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"clip_norm": 0}, "clip_norm must be a finite number > 0, got 0"),
        ({"clip_norm": float("nan")}, "clip_norm must be a finite number > 0"),
        ({"noise_multiplier": -1}, "noise_multiplier must be a finite number > 0, got -1"),
        ({"delta": 1.5}, "delta must be in (0.0, 1.0), got 1.5"),
        ({"seed": -3}, "seed must be a non-negative int or null"),
    ],
)
def test_gaussian_parameters_are_validated(kwargs, message):
    with pytest.raises(ValueError) as exc:
        GaussianUpdateDP(**kwargs)
    assert message in str(exc.value)


def test_nvflare_sparsifiers_are_validated():
    with pytest.raises(ValueError, match=r"PercentilePrivacy percentile must be in \[0.0, 100.0\], got 150"):
        ValidatedPercentilePrivacy(percentile=150)
    with pytest.raises(ValueError, match="PercentilePrivacy gamma must be a finite number > 0"):
        ValidatedPercentilePrivacy(gamma=0)
    with pytest.raises(ValueError, match=r"SVTPrivacy fraction must be in \(0.0, 1.0\]"):
        ValidatedSVTPrivacy(fraction=0)
    ValidatedPercentilePrivacy(percentile=90, gamma=0.1)
    ValidatedSVTPrivacy(fraction=0.5)


def test_update_is_clipped_and_noised_with_the_stated_std():
    f = GaussianUpdateDP(clip_norm=2.0, noise_multiplier=0.5, delta=1e-5, seed=7)
    update = _diff(scale=1.0)
    norm = float(np.linalg.norm(update["w"]))
    dxo = f.process_dxo(DXO(DataKind.WEIGHT_DIFF, data=dict(update)), Shareable(), FLContext())
    out = dxo.data["w"].astype(np.float64)
    expected = update["w"].astype(np.float64) * (2.0 / norm)
    noise = out - expected
    assert abs(noise.std() - 1.0) < 0.02  # sigma * C = 0.5 * 2
    assert abs(noise.mean()) < 0.02
    assert int(dxo.data["n"]) == 3  # integer buffers are not noised
    meta = dxo.get_meta_prop(DP_META)
    assert "update_norm" not in meta and "clipped" not in meta  # data-dependent, outside the guarantee
    assert meta["epsilon"] == pytest.approx(gaussian_epsilon(0.5, 1, 1e-5))
    # Same seed, site and round: the same noise; the next release spends more privacy.
    again = GaussianUpdateDP(clip_norm=2.0, noise_multiplier=0.5, seed=7)
    d2 = again.process_dxo(DXO(DataKind.WEIGHT_DIFF, data=dict(update)), Shareable(), FLContext())
    assert np.array_equal(d2.data["w"], dxo.data["w"])
    d3 = f.process_dxo(DXO(DataKind.WEIGHT_DIFF, data=dict(update)), Shareable(), FLContext())
    assert d3.get_meta_prop(DP_META)["epsilon"] > meta["epsilon"]


def test_small_update_is_not_scaled_and_weights_are_refused():
    f = GaussianUpdateDP(clip_norm=1e6, noise_multiplier=1e-9, seed=1)
    update = _diff(scale=1e-3)
    dxo = f.process_dxo(DXO(DataKind.WEIGHT_DIFF, data=dict(update)), Shareable(), FLContext())
    assert np.allclose(dxo.data["w"], update["w"], atol=1e-2)
    with pytest.raises(ValueError, match="needs model differences: set fed.exchange: diff"):
        f.process_dxo(DXO(DataKind.WEIGHTS, data=dict(update)), Shareable(), FLContext())


def test_epsilon_grows_with_rounds_and_falls_with_noise():
    assert gaussian_epsilon(1.0, 10, 1e-5) > gaussian_epsilon(1.0, 1, 1e-5)
    assert gaussian_epsilon(2.0, 10, 1e-5) < gaussian_epsilon(1.0, 10, 1e-5)


def test_scalar_only_guard_drops_unknown_meta_and_blocks_non_scalars():
    g = ScalarOnlyResultGuard()
    meta = {
        "NUM_STEPS_CURRENT_ROUND": 4,
        "initial_metrics": {"val_dice": 0.5},
        "fedimg_val": {"dice_mean": 0.5},
        "leak": "a" * 10,
    }
    out = g.process(
        DXO(DataKind.WEIGHT_DIFF, data={"w": np.ones(3, np.float32)}, meta=meta).to_shareable(), FLContext()
    )
    dxo = from_shareable(out)
    assert set(dxo.data) == {"w"} and dxo.meta["initial_metrics"] == {"val_dice": 0.5} and dxo.meta["fedimg_val"]
    assert "leak" not in dxo.meta and dxo.get_meta_prop("fedimg_guard")["dropped"] == 1
    # Non-scalar data, a non-scalar metric, a non-scalar meta value: the whole result is blocked.
    for bad in (
        DXO(DataKind.WEIGHT_DIFF, data={"w": np.ones(3, np.float32), "note": "text"}),
        DXO(DataKind.METRICS, data={"val_auc": 0.9, "image": np.zeros((4, 4))}),
        DXO(DataKind.WEIGHTS, data={"w": np.ones(3, np.float32)}, meta={"fedimg_seconds": {"t": np.arange(3)}}),
    ):
        blocked = g.process(bad.to_shareable(), FLContext())
        assert blocked.get_return_code() == ReturnCode.TASK_RESULT_FILTER_ERROR and "DXO" not in blocked


def test_gaussian_filter_keeps_a_dp_sgd_record_beside_its_own():
    f = GaussianUpdateDP(clip_norm=1.0, noise_multiplier=1.0, seed=3)
    dp_sgd = {"mechanism": "dp_sgd", "epsilon": 2.5, "delta": 1e-5, "steps": 8}
    dxo = DXO(DataKind.WEIGHT_DIFF, data=dict(_diff()), meta={DP_META: {"dp_sgd": dict(dp_sgd)}})
    meta = f.process_dxo(dxo, Shareable(), FLContext()).get_meta_prop(DP_META)
    assert meta["mechanism"] == "gaussian" and meta["epsilon"] == pytest.approx(gaussian_epsilon(1.0, 1, 1e-5))
    assert meta["dp_sgd"] == dp_sgd
    # Without DP-SGD the record is the Gaussian mechanism's alone.
    alone = f.process_dxo(DXO(DataKind.WEIGHT_DIFF, data=dict(_diff())), Shareable(), FLContext())
    assert "dp_sgd" not in alone.get_meta_prop(DP_META)
