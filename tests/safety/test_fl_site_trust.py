"""Sites do not trust the server: a received model is checked before it is loaded; small cohorts keep their counts.

A real site (``SiteRunner`` over a ``SiteTrainer`` on the classification
test sites) is handed tasks the way NVFlare's Client API hands them; only the
Client API's module functions are replaced by a stand-in that says which kind
of task it is.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from nvflare.app_common.abstract.fl_model import FLModel

from fedimg import config as cfg
from fedimg import runtime
from tests.conftest import tiny_classification


class _Writer:
    def __init__(self):
        self.scalars = []

    def add_scalar(self, tag, value, global_step=None):
        self.scalars.append((tag, value, global_step))


@pytest.fixture
def site(cls_sites, monkeypatch):
    """A site runner for site-1 whose Client API says: a validate task (not a submit_model one)."""
    from fedimg.fl import client
    from fedimg.fl.algorithms import client_algorithm
    from fedimg.training.trainer import SiteTrainer

    def make(algorithm="fedavg", **over):
        exp = tiny_classification(2, **{"fed.algorithm": algorithm, **over})
        runner = object.__new__(client.SiteRunner)
        runner.exp, runner.site_name = exp, "site-1"
        runner.rt = runtime.setup("cpu", amp=False, num_threads=1, seed=0)
        runner.trainer = SiteTrainer.from_datalist(exp, cls_sites[2]["site-1"], runner.rt)
        runner.algorithm = client_algorithm(algorithm, runner.trainer)
        runner.writer, runner.local, runner.local_weights = _Writer(), None, None
        return runner

    fake = types.SimpleNamespace(is_submit_model=lambda: False, is_evaluate=lambda: True, FLModel=FLModel)
    monkeypatch.setattr(client, "flare", fake)
    return make


def _global(runner, **change):
    state = {k: v.detach().cpu().numpy().copy() for k, v in runner.trainer.model.state_dict().items()}
    for k, v in change.items():
        state[k.replace("__", ".")] = v
    return state


def test_a_global_model_with_nan_is_refused_before_anything_is_loaded(site):
    runner = site()
    before = {k: v.clone() for k, v in runner.trainer.model.state_dict().items()}
    key = next(k for k, v in before.items() if v.is_floating_point() and v.ndim > 1)
    state = _global(runner)
    state[key] = np.full(state[key].shape, np.nan, np.float32)
    refused = rf"received weights refused \(NON_FINITE: \d+ NaN/infinite value\(s\) in {key}\)"
    with pytest.raises(ValueError, match=refused):
        runner.handle(FLModel(params=state, current_round=0))
    after = runner.trainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing loaded


@pytest.mark.parametrize(
    "how,message",
    [
        ("extra", r"UNKNOWN_KEY: 1 entr\(ies\) the model does not have"),
        ("shape", r"SHAPE_MISMATCH: .* has shape \(1,\)"),
        ("text", r"DTYPE: .* is str"),
        ("inf", r"NON_FINITE"),
    ],
)
def test_a_global_model_that_does_not_fit_the_network_is_refused(site, how, message):
    runner = site()
    state = _global(runner)
    key = next(k for k, v in state.items() if v.dtype == np.float32 and v.ndim > 1)
    if how == "extra":
        state["injected"] = np.zeros(3, np.float32)
    elif how == "shape":
        state[key] = np.zeros(1, np.float32)
    elif how == "text":
        state[key] = np.full(state[key].shape, "x")
    else:
        state[key] = np.full(state[key].shape, np.inf, np.float32)
    with pytest.raises(ValueError, match=message):
        runner.trainer.load_weights(state)


def test_a_flat_entry_is_accepted_only_under_homomorphic_encryption(site):
    runner = site()
    state = _global(runner)
    key = next(k for k, v in state.items() if v.dtype == np.float32 and v.ndim > 1)
    state[key] = state[key].reshape(-1)
    with pytest.raises(ValueError, match="SHAPE_MISMATCH"):
        runner.trainer.load_weights(state)
    runner.trainer.exp = tiny_classification(
        2, **{"privacy.encryption": "he", "fed.cross_site_eval": "false", "fed.final_eval": "false"}
    )
    runner.trainer.load_weights(state)  # CKKS decrypts every tensor flat


def test_fedbn_may_leave_out_its_own_layers_but_they_are_still_checked_when_sent(site):
    runner = site("fedbn")
    local = runner.algorithm.local_keys
    state = {k: v for k, v in _global(runner).items() if k not in local}
    runner.trainer.load_weights(state, keep=local)
    state = _global(runner)
    key = next(k for k in sorted(local) if k.endswith("running_mean"))
    state[key] = np.full(state[key].shape, np.nan, np.float32)
    with pytest.raises(ValueError, match="NON_FINITE"):
        runner.trainer.load_weights(state, keep=local)


def test_scaffold_global_controls_with_nan_are_refused(site):
    from nvflare.app_common.app_constant import AlgorithmConstants

    runner = site("scaffold")
    controls = {k: np.zeros_like(v) for k, v in _global(runner).items() if v.dtype == np.float32}
    key = next(iter(controls))
    controls[key] = np.full(controls[key].shape, np.nan, np.float32)
    with pytest.raises(ValueError, match=r"SCAFFOLD: the global control variates received are refused \(NON_FINITE"):
        runner.algorithm.start_round(FLModel(params={}, meta={AlgorithmConstants.SCAFFOLD_CTRL_GLOBAL: controls}))


@pytest.mark.parametrize("min_cohort,sent", [(10, False), (5, True)])
def test_a_site_below_the_minimum_cohort_keeps_its_case_counts(site, min_cohort, sent):
    runner = site(**{"privacy.min_cohort": min_cohort})  # the site has 6 validation cases
    out = runner.handle(FLModel(params=_global(runner), current_round=0, meta={}))
    assert "val_auc" in out.metrics and "val_accuracy" in out.metrics  # the means always go out
    assert ("val_cases" in out.metrics) is sent
    if sent:
        assert out.metrics["val_cases"] == 6.0
    assert not any("cases" in k or "undefined" in k for k in out.meta["fedimg_val"])


def test_min_cohort_is_validated():
    with pytest.raises(cfg.ConfigError, match=r"privacy.min_cohort must be >= 1 \(1: always report counts\), got 0"):
        tiny_classification(2, **{"privacy.min_cohort": 0})
    assert tiny_classification(2).privacy.min_cohort == 5


def test_withholding_drops_exactly_the_counts():
    from fedimg.fl.client import withhold_small_cohort

    metrics = {"val_dice": 0.8, "val_cases": 3.0, "val_hd95_undefined_lesion": 1.0, "val_hd95_lesion": 4.0}
    assert withhold_small_cohort(metrics, 3, 5) == {"val_dice": 0.8, "val_hd95_lesion": 4.0}
    assert withhold_small_cohort(metrics, 5, 5) == metrics
