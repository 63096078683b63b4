"""The server trusts no number, key or shape a site reports (unit level: the checks and the controller's use of them).

Each test feeds the controller what a broken or malicious site could send:
an aggregation weight of NaN, infinity or 1e12; an update with a wrong shape,
an extra entry, a one-value "difference" NumPy would broadcast, a wrong
dtype; a SCAFFOLD control change that does not fit; a validation Dice of
1e6. The update (or the validation) of that site is rejected with a reason
code and the site named; the server neither crashes nor lets it move the
global model or choose the best model.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import make_reply
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.app_constant import AlgorithmConstants

from tests.conftest import apply_round, controller_for


def _controller(algorithm="fedavg", net=None, **fed):
    return controller_for(algorithm, net=net, **fed)


def _result(ctl, site, steps=10, change=0.1, params=None, kind=ParamsType.DIFF, **meta):
    params = params if params is not None else {k: np.full_like(v, change) for k, v in ctl._global.items()}
    return FLModel(
        params=params, params_type=kind, meta={"client_name": site, "NUM_STEPS_CURRENT_ROUND": steps, **meta}
    )


@pytest.mark.parametrize(
    "steps,code",
    [
        (float("nan"), "BAD_WEIGHT"),
        (float("inf"), "BAD_WEIGHT"),
        (-5, "BAD_WEIGHT"),
        (0, "BAD_WEIGHT"),
        ("10", "BAD_WEIGHT"),
        (None, "BAD_WEIGHT"),
        (1e12, "WEIGHT_TOO_LARGE"),
    ],
)
def test_a_site_reporting_an_impossible_weight_is_rejected_and_does_not_move_the_model(steps, code):
    ctl = _controller()
    start = {k: v.copy() for k, v in ctl._global.items()}
    results = [_result(ctl, "site-1"), _result(ctl, "site-2"), _result(ctl, "site-3", steps=steps, change=50.0)]
    updates, rejected, ptype = ctl._updates(results)
    assert [u.site for u in updates] == ["site-1", "site-2"]
    assert list(rejected) == ["site-3"] and rejected["site-3"].startswith(code)
    apply_round(ctl, updates, ptype, results)
    assert all(np.allclose(ctl._global[k], start[k] + 0.1) for k in start)  # the honest mean, finite


def test_the_weight_bound_is_the_configured_cap_and_a_multiple_of_the_sites_first_report():
    from fedimg.fl.controller import STEP_GROWTH

    ctl = _controller(max_steps_per_round=1000)
    _, rejected, _ = ctl._updates([_result(ctl, "site-1", steps=1001)])
    assert rejected["site-1"].startswith("WEIGHT_TOO_LARGE") and "1000" in rejected["site-1"]
    ups, rejected, _ = ctl._updates([_result(ctl, "site-1", steps=10)])
    assert not rejected and ups[0].weight == 10.0
    ups, rejected, _ = ctl._updates([_result(ctl, "site-1", steps=10 * STEP_GROWTH)])
    assert not rejected  # up to STEP_GROWTH x its first report
    _, rejected, _ = ctl._updates([_result(ctl, "site-1", steps=10 * STEP_GROWTH + 1)])
    assert rejected["site-1"].startswith("WEIGHT_TOO_LARGE")
    with pytest.raises(ValueError, match="fed.max_steps_per_round"):
        _controller(max_steps_per_round="nan")


def test_the_default_weight_bound_is_derived_from_the_experiment():
    from fedimg import config as cfg
    from fedimg.fl.aggregation import MAX_CASES_PER_SITE, max_steps_per_round
    from tests.conftest import tiny_classification

    exp = tiny_classification(2, **{"train.local_epochs": 3})
    assert max_steps_per_round(exp) == 3 * math.ceil(MAX_CASES_PER_SITE / exp.data.batch_size)
    assert max_steps_per_round(tiny_classification(2, **{"fed.max_steps_per_round": 77})) == 77
    with pytest.raises(cfg.ConfigError, match="fed.max_steps_per_round must be >= 0"):
        tiny_classification(2, **{"fed.max_steps_per_round": -1})


def _tampered(ctl, how):
    params = {k: np.full_like(v, 0.1) for k, v in ctl._global.items()}
    if how == "shape":
        params["weight"] = np.zeros((3, 2), np.float32)
    elif how == "broadcast":
        params["weight"] = np.full((1,), 5.0, np.float32)  # (g + d) would broadcast over the whole matrix
    elif how == "extra":
        params["patient_ids"] = np.arange(6, dtype=np.float32)
    elif how == "missing":
        params.pop("bias")
    elif how == "dtype_int":
        params["weight"] = np.ones((2, 3), np.int64)
    elif how == "dtype_fp16":
        params["weight"] = params["weight"].astype(np.float16)
    elif how == "strings":
        params["weight"] = np.array([["a"] * 3] * 2)
    elif how == "nan":
        params["bias"] = np.array([np.nan, 0.0], np.float32)
    return params


@pytest.mark.parametrize(
    "how,code",
    [
        ("shape", "SHAPE_MISMATCH: weight has shape (3, 2), the model has (2, 3)"),
        ("broadcast", "SHAPE_MISMATCH: weight has shape (1,)"),
        ("extra", "UNKNOWN_KEY: 1 entr(ies) the model does not have"),
        ("missing", "MISSING_KEY: 1 model entr(ies) absent, e.g. bias"),
        ("dtype_int", "DTYPE: weight is int64"),
        ("dtype_fp16", "DTYPE: weight is float16"),
        ("strings", "DTYPE: weight is str"),
        ("nan", "NON_FINITE: 1 NaN/infinite value(s) in bias"),
    ],
)
@pytest.mark.parametrize("kind", [ParamsType.DIFF, ParamsType.FULL])
def test_an_update_that_does_not_fit_the_global_model_is_rejected_never_aggregated(how, code, kind):
    ctl = _controller()
    start = {k: v.copy() for k, v in ctl._global.items()}
    results = [
        _result(
            ctl,
            "site-1",
            kind=kind,
            params={k: v + 0.1 if kind == ParamsType.FULL else np.full_like(v, 0.1) for k, v in start.items()},
        ),
        _result(ctl, "site-2", kind=kind, params=_tampered(ctl, how)),
    ]
    updates, rejected, ptype = ctl._updates(results)  # never raises
    assert [u.site for u in updates] == ["site-1"]
    assert rejected["site-2"].startswith(code), rejected
    apply_round(ctl, updates, ptype, results)
    assert set(ctl._global) == set(start)  # nothing added, nothing forwarded to the sites
    assert all(ctl._global[k].shape == start[k].shape and np.allclose(ctl._global[k], start[k] + 0.1) for k in start)


def test_fp16_updates_pass_only_when_the_federation_sends_fp16():
    ctl = _controller(update_precision="fp16", exchange="diff")
    params = {k: np.full_like(v, 0.1).astype(np.float16) for k, v in ctl._global.items()}
    updates, rejected, _ = ctl._updates([_result(ctl, "site-1", params=params)])
    assert not rejected and updates[0].params["weight"].dtype == np.float32  # widened for aggregation


def test_fedbn_sites_may_omit_exactly_their_normalization_layers():
    from monai.networks.nets import DenseNet121

    net = DenseNet121(
        spatial_dims=2, in_channels=1, out_channels=2, init_features=4, growth_rate=4, block_config=(1, 1, 1, 1)
    )
    ctl = controller_for("fedbn", net=net, overrides={"model.norm": "batch"})
    local = ctl.strategy.local_keys
    assert local and all(("norm" in k) for k in local)
    shared = {k: np.zeros_like(v) for k, v in ctl._global.items() if k not in local}
    ok, rejected, _ = ctl._updates([_result(ctl, "site-1", params=shared)])
    assert not rejected and [u.site for u in ok] == ["site-1"]
    conv = next(k for k in shared if k.endswith("conv0.weight"))
    fewer = {k: v for k, v in shared.items() if k != conv}
    _, rejected, _ = ctl._updates([_result(ctl, "site-2", params=fewer)])
    assert rejected["site-2"] == f"MISSING_KEY: 1 model entr(ies) absent, e.g. {conv}"


def _scaffold_results(ctl, ctrl_2):
    good = {k: np.full_like(v, 1.0) for k, v in ctl._global.items()}
    return [
        _result(ctl, "site-1", **{AlgorithmConstants.SCAFFOLD_CTRL_DIFF: dict(good)}),
        _result(ctl, "site-2", **({} if ctrl_2 is None else {AlgorithmConstants.SCAFFOLD_CTRL_DIFF: ctrl_2})),
    ]


@pytest.mark.parametrize(
    "how,code",
    [
        ("missing", "MISSING_CONTROLS"),
        ("shape", "SHAPE_MISMATCH"),
        ("extra", "UNKNOWN_KEY"),
        ("nan", "NON_FINITE"),
        ("text", "NOT_A_STATE"),
    ],
)
def test_a_scaffold_control_change_is_checked_like_an_update(how, code):
    ctl = _controller("scaffold")
    ctrl = {k: np.full_like(v, 3.0) for k, v in ctl._global.items()}
    ctrl = {
        "missing": None,
        "shape": {**ctrl, "bias": np.ones(1, np.float32)},
        "extra": {**ctrl, "secret": np.ones(2, np.float32)},
        "nan": {**ctrl, "bias": np.array([np.nan, 0], np.float32)},
        "text": "a string",
    }[how]
    results = _scaffold_results(ctl, ctrl)
    updates, rejected, ptype = ctl._updates(results)
    assert [u.site for u in updates] == ["site-1"] and rejected["site-2"].startswith(code)
    assert "SCAFFOLD" in rejected["site-2"] or code == "MISSING_CONTROLS"
    apply_round(ctl, updates, ptype, results)
    assert all(np.allclose(v, 1.0) for v in ctl.strategy.controls.values())  # site-1's change only, finite


def test_an_error_answer_from_a_site_is_recorded_as_blocked_or_failed_with_the_site_named():
    ctl = _controller()
    ctl._accept_train_result("site-2", make_reply(ReturnCode.TASK_RESULT_FILTER_ERROR), FLContext())
    ctl._accept_train_result("site-3", make_reply("<script>patient 123</script>"), FLContext())
    updates, rejected, _ = ctl._updates([_result(ctl, "site-1")])
    assert [u.site for u in updates] == ["site-1"]
    assert rejected["site-2"].startswith("BLOCKED_AT_SITE")
    assert rejected["site-3"].startswith("SITE_ERROR") and "patient" not in rejected["site-3"]


def _validation_controller(tmp_path, monkeypatch):
    ctl = _controller()  # segmentation: key metric val_dice
    monkeypatch.setattr(ctl, "get_run_dir", lambda: str(tmp_path))
    saved = []
    monkeypatch.setattr(ctl, "_save_best", lambda step, value: saved.append((step, value)))
    return ctl, saved


def _val(site, **metrics):
    return FLModel(metrics=metrics, meta={"client_name": site, "fedimg_val": {"dice_mean": metrics.get("val_dice")}})


@pytest.mark.parametrize(
    "bad",
    [
        {"val_dice": 1e6},
        {"val_dice": -0.5},
        {"val_dice": float("inf")},
        {"val_dice": 0.7, "val_hd95": -3.0},
        {"val_dice": 0.7, "val_cases": 2.5},
        {"val_dice": 0.7, "val_cases": 1e9},
        {"val_dice": "0.9"},
        {"val_dice": 0.7, "val_sensitivity_blob": 1.5},
    ],
)
def test_impossible_metrics_are_dropped_and_never_choose_the_best_model(tmp_path, monkeypatch, bad):
    ctl, saved = _validation_controller(tmp_path, monkeypatch)
    flat = ctl._record_validation(1, [_val("site-1", val_dice=0.6, val_cases=10.0), _val("site-2", **bad)])
    assert flat["val_dice"] == pytest.approx(0.6)  # site-1 alone
    assert saved == [(1, pytest.approx(0.6))]
    row = json.loads((tmp_path / "fedimg" / "global_metrics.jsonl").read_text().splitlines()[-1])
    assert list(row["rejected"]) == ["site-2"] and set(row["sites"]) == {"site-1"}
    assert row["rejected"]["site-2"].split(":")[0] in ("OUT_OF_RANGE", "NON_FINITE", "NOT_A_NUMBER")


def test_a_withheld_case_count_weighs_as_one_case(tmp_path, monkeypatch):
    ctl, _ = _validation_controller(tmp_path, monkeypatch)
    flat = ctl._record_validation(0, [_val("site-1", val_dice=0.5, val_cases=3.0), _val("site-2", val_dice=0.9)])
    assert flat["val_dice"] == pytest.approx((3 * 0.5 + 1 * 0.9) / 4)
    row = json.loads((tmp_path / "fedimg" / "global_metrics.jsonl").read_text())
    assert row["weights"] == {"site-1": 3.0, "site-2": 1.0} and row["rejected"] == {}


def test_undefined_metrics_stay_allowed_and_unnamed_families_need_only_be_finite():
    from fedimg.fl.aggregation import check_metrics

    assert (
        check_metrics(
            {
                "val_dice": 0.8,
                "val_dice_lesion": float("nan"),
                "val_hd95_undefined_lesion": 2.0,
                "val_cases": 6.0,
                "val_loss_like": 12.5,
                "dice/organ": 1.0,
            }
        )
        is None
    )
    assert check_metrics({"val_loss_like": float("-inf")}).startswith("NON_FINITE: a metric is -inf")
    assert check_metrics({"val_hd95_undefined_lesion": 1.5}).startswith("OUT_OF_RANGE: a hd95_undefined metric")
    assert check_metrics(["val_dice"]).startswith("NOT_METRICS")
    # Names a site chose are never quoted back.
    assert "JohnDoe" not in check_metrics({"val_dice_JohnDoe": 7.0})


def test_what_sites_report_about_themselves_is_recorded_only_as_small_scalars():
    from fedimg.fl.controller import _reported

    assert _reported({"validate": 1.5, "train": 2}) == {"validate": 1.5, "train": 2}
    assert _reported({"train": np.arange(3)}).startswith("INVALID: a ndarray")
    assert _reported("x" * 500).startswith("INVALID: a string of 500 characters")
