"""The scalar-only guard: an explicit allow-list of what a result may hold; everything else blocks the whole result.

Each case is a way the guard used to be bypassed (an ``APP_DEFINED`` result,
anything with a ``.shape``, long strings under an allowed meta key, an
unchecked SCAFFOLD control change). A blocked result leaves the site as an
empty ``TASK_RESULT_FILTER_ERROR`` reply: none of its content goes on.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply

from fedimg.fl.privacy import ScalarOnlyResultGuard

SECRET = "PATIENT^JOHN 1.2.840.99999"


def _weights(**extra):
    return {"conv.weight": torch.ones(2, 3), "bn.num_batches_tracked": torch.tensor(7), **extra}


def _run(shareable: Shareable) -> Shareable:
    return ScalarOnlyResultGuard().process(shareable, FLContext())


def _assert_blocked(out: Shareable) -> None:
    assert out.get_return_code() == ReturnCode.TASK_RESULT_FILTER_ERROR
    assert "DXO" not in out and SECRET not in repr(out)


def test_model_entries_scalar_metrics_and_allowed_meta_pass():
    meta = {
        "NUM_STEPS_CURRENT_ROUND": 12,
        "initial_metrics": {"val_auc": 0.7, "val_cases": 6.0},
        "fedimg_val": {"auc_mean": 0.7},
        "fedimg_seconds": {"train": 1.5},
        "fedimg_update_bytes": 100,
        "fedimg_algorithm_stats": {"mu": 0.01},
        "fedimg_dp": {"mechanism": "gaussian", "epsilon": 2.0, "dp_sgd": {"epsilon": 1.0, "steps": 4}},
        "scaffold_c_diff": {"conv.weight": np.zeros((2, 3), np.float16)},
    }
    out = _run(DXO(DataKind.WEIGHT_DIFF, data=_weights(), meta=meta).to_shareable())
    assert out.get_return_code() == ReturnCode.OK
    dxo = from_shareable(out)
    assert set(dxo.data) == {"conv.weight", "bn.num_batches_tracked"}  # an int64 scalar counter is a model entry
    assert all(dxo.meta[k] is not None for k in meta) and dxo.meta["fedimg_guard"] == {"dropped": 0}
    metrics = _run(DXO(DataKind.METRICS, data={"val_auc": 0.7, "val_dice": float("nan")}).to_shareable())
    assert from_shareable(metrics).data["val_auc"] == 0.7


@pytest.mark.parametrize(
    "name,shareable",
    [
        ("app-defined result", DXO(DataKind.APP_DEFINED, data={"note": SECRET}).to_shareable()),
        (
            "collection",
            DXO(DataKind.COLLECTION, data={"a": DXO(DataKind.APP_DEFINED, data={"x": SECRET})}).to_shareable(),
        ),
        ("statistics", DXO(DataKind.STATISTICS, data={"ids": SECRET}).to_shareable()),
        ("not a DXO", Shareable({"payload": SECRET})),
        ("string array with a shape", DXO(DataKind.WEIGHTS, data=_weights(ids=np.array([SECRET]))).to_shareable()),
        (
            "bytes as uint8",
            DXO(DataKind.WEIGHTS, data=_weights(raw=np.frombuffer(SECRET.encode(), dtype=np.uint8))).to_shareable(),
        ),
        ("identifier tensor", DXO(DataKind.WEIGHT_DIFF, data=_weights(case_ids=torch.arange(40))).to_shareable()),
        (
            "boolean mask",
            DXO(DataKind.WEIGHT_DIFF, data=_weights(mask=torch.ones(4, 4, dtype=torch.bool))).to_shareable(),
        ),
        ("a string entry", DXO(DataKind.WEIGHTS, data=_weights(note=SECRET)).to_shareable()),
        ("an entry name with spaces", DXO(DataKind.WEIGHTS, data=_weights(**{SECRET: torch.zeros(1)})).to_shareable()),
        (
            "500 strings under an allowed meta key",
            DXO(
                DataKind.WEIGHT_DIFF, data=_weights(), meta={"fedimg_val": {f"k{i}": SECRET for i in range(500)}}
            ).to_shareable(),
        ),
        (
            "a long string under an allowed meta key",
            DXO(
                DataKind.WEIGHT_DIFF, data=_weights(), meta={"fedimg_algorithm_stats": {"note": SECRET * 10}}
            ).to_shareable(),
        ),
        (
            "deep nesting",
            DXO(DataKind.WEIGHT_DIFF, data=_weights(), meta={"fedimg_dp": {"a": {"b": {"c": 1}}}}).to_shareable(),
        ),
        (
            "a list in meta",
            DXO(DataKind.WEIGHT_DIFF, data=_weights(), meta={"fedimg_seconds": {"train": [SECRET]}}).to_shareable(),
        ),
        (
            "a string in the scaffold control change",
            DXO(
                DataKind.WEIGHT_DIFF, data=_weights(), meta={"scaffold_c_diff": {"conv.weight": SECRET}}
            ).to_shareable(),
        ),
        (
            "identifiers in the scaffold control change",
            DXO(
                DataKind.WEIGHT_DIFF,
                data=_weights(),
                meta={"scaffold_c_diff": {"conv.weight": np.arange(30, dtype=np.int64)}},
            ).to_shareable(),
        ),
        ("a string metric", DXO(DataKind.METRICS, data={"val_auc": 0.7, "note": SECRET}).to_shareable()),
        ("an image metric", DXO(DataKind.METRICS, data={"val_auc": 0.7, "overlay": np.zeros((8, 8))}).to_shareable()),
        (
            "a string in initial_metrics",
            DXO(DataKind.WEIGHTS, data=_weights(), meta={"initial_metrics": {"val_auc": SECRET}}).to_shareable(),
        ),
    ],
)
def test_anything_outside_the_allow_list_blocks_the_whole_result(name, shareable):
    _assert_blocked(_run(shareable))


def test_a_round_header_carrying_text_blocks_the_result():
    s = DXO(DataKind.WEIGHTS, data=_weights()).to_shareable()
    s.set_header("current_round", SECRET * 3)
    _assert_blocked(_run(s))


def test_unknown_meta_keys_and_extra_shareable_content_are_dropped_not_sent():
    s = DXO(DataKind.WEIGHTS, data=_weights(), meta={"my_notes": SECRET, "filter_history": ["X"]}).to_shareable()
    s["side_channel"] = SECRET
    out = _run(s)
    assert out.get_return_code() == ReturnCode.OK and SECRET not in repr(out)
    assert from_shareable(out).meta["fedimg_guard"] == {"dropped": 2}


def test_an_error_reply_leaves_as_a_bare_return_code():
    s = make_reply(ReturnCode.EXECUTION_EXCEPTION)
    s["DXO"] = DXO(DataKind.APP_DEFINED, data={"x": SECRET}).to_dict()
    out = _run(s)
    assert out.get_return_code() == ReturnCode.EXECUTION_EXCEPTION and SECRET not in repr(out)
    forged = make_reply(SECRET)  # a return code is no channel either
    assert _run(forged).get_return_code() == ReturnCode.EXECUTION_EXCEPTION
