"""Privacy settings of a job, end to end in NVFlare's simulator: three tiny synthetic CT sites, 2 rounds.

Each run is checked on what the server recorded (``fedimg/rounds.jsonl``
under ``privacy``, one entry per site and round), on the final evaluation,
and on empty error logs (``run_simulation`` refuses a run whose
``error_log.txt`` files are not empty).

* ``update_filter: gaussian`` (update-level DP on ``fed.exchange: diff``):
  every site reports the clip norm, noise std and an epsilon that grows by
  round exactly as the RDP accountant says for that many releases;
* ``update_filter: percentile``: NVFlare's sparsifier runs, the final model
  is scored everywhere;
* ``dp_sgd``: every site trains with Opacus and reports the epsilon of its
  noised steps, growing by round; a job with DP-SGD and the Gaussian filter
  keeps both records.
"""

from __future__ import annotations

import math

import pytest

from tests.conftest import REPO, synthetic_ct_sites, tiny_experiment

pytestmark = [pytest.mark.nvflare, pytest.mark.slow, pytest.mark.integration]

SITES = ("site-1", "site-2", "site-3")
BASE = {"fed.exchange": "diff", "fed.cross_site_eval": "false", "fed.num_rounds": 2, "task.min_component_voxels": 1}


@pytest.fixture(scope="module")
def three_sites(tmp_path_factory) -> dict[str, str]:
    return synthetic_ct_sites(tmp_path_factory.mktemp("privacy_sites"), n_sites=3, n_cases=3, seed=5)


def _run(sites, work, name, **over):
    from fedimg.fl.simulate import run_simulation

    exp = tiny_experiment(name=name, **{**BASE, **over})
    res = run_simulation(exp, REPO / "jobs" / "train", sites, work / name)
    assert not res.errors
    train = [r for r in res.rounds if not r.get("final_eval")]
    assert [r["round"] for r in train] == [0, 1]
    for r in train:
        assert sorted(r["contributed"]) == sorted(sites) and not r["rejected"] and not r["missing"]
    final = res.final_eval()
    assert final is not None and set(final["sites"]) == set(sites)
    assert 0.0 <= final["global"]["val_dice"] <= 1.0
    return res, train


def test_gaussian_update_filter_reports_clipping_noise_and_growing_epsilon(three_sites, tmp_path):
    from fedimg.fl.privacy import gaussian_epsilon

    clip, sigma = 0.5, 0.05
    _, train = _run(
        three_sites,
        tmp_path,
        "gaussian",
        **{
            "privacy.update_filter": "gaussian",
            "privacy.gaussian.clip_norm": clip,
            "privacy.gaussian.noise_multiplier": sigma,
            "privacy.gaussian.seed": 1,
        },
    )
    for i, r in enumerate(train, start=1):
        assert set(r["privacy"]) == set(SITES)
        for rec in r["privacy"].values():
            assert rec["mechanism"] == "gaussian" and rec["releases"] == i
            assert rec["clip_norm"] == clip and rec["noise_std"] == pytest.approx(sigma * clip)
            assert "update_norm" not in rec and "clipped" not in rec  # data-dependent: never sent
            assert rec["epsilon"] == pytest.approx(gaussian_epsilon(sigma, i, 1e-5))
            assert "dp_sgd" not in rec
    for site in SITES:
        assert 0 < train[0]["privacy"][site]["epsilon"] < train[1]["privacy"][site]["epsilon"] < math.inf


def test_percentile_update_filter_runs_and_the_final_model_is_scored(three_sites, tmp_path):
    res, train = _run(
        three_sites,
        tmp_path,
        "percentile",
        **{
            "privacy.update_filter": "percentile",
            "privacy.percentile.percentile": 50,
            "privacy.percentile.gamma": 0.05,
        },
    )
    assert all(not r.get("privacy") for r in train)  # a sparsifier: no DP record, no epsilon
    final = res.final_eval()
    assert all(math.isfinite(final["sites"][s]["val_dice"]) for s in SITES)


def _dp_sgd_records(train) -> list[dict[str, dict]]:
    """Per round: site -> the site's DP-SGD record."""
    out = []
    for r in train:
        assert set(r["privacy"]) == set(SITES)
        out.append({s: rec["dp_sgd"] for s, rec in r["privacy"].items()})
    return out


def test_dp_sgd_sites_report_their_epsilon_by_round(three_sites, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sigma, clip = 1.5, 1.0
    res, train = _run(
        three_sites,
        tmp_path,
        "dpsgd",
        **{
            "privacy.dp_sgd.enabled": "true",
            "privacy.dp_sgd.noise_multiplier": sigma,
            "privacy.dp_sgd.max_grad_norm": clip,
        },
    )
    recs = _dp_sgd_records(train)
    for site in SITES:
        first, second = recs[0][site], recs[1][site]
        assert first["mechanism"] == "dp_sgd" and first["noise_multiplier"] == sigma
        assert first["max_grad_norm"] == clip and first["delta"] == 1e-5 and first["poisson_sampling"]
        assert 0 < first["sample_rate"] <= 1
        # The accountant counts every noised step: round 0's, then round 1's (the steps that weigh the site).
        assert first["steps"] == train[0]["weights"][site] >= 1
        assert second["steps"] == first["steps"] + train[1]["weights"][site]
        assert 0 < first["epsilon"] < second["epsilon"] < math.inf
    acc = EventAccumulator(str(res.tb_logdir / "site-1"))
    acc.Reload()
    eps = [(e.step, e.value) for e in acc.Scalars("privacy/epsilon")]
    assert [s for s, _ in eps] == [1, 2]
    assert [v for _, v in eps] == pytest.approx([recs[0]["site-1"]["epsilon"], recs[1]["site-1"]["epsilon"]])


def test_dp_sgd_with_the_gaussian_filter_keeps_both_records(three_sites, tmp_path):
    _, train = _run(
        three_sites,
        tmp_path,
        "dpsgd_gaussian",
        **{
            "privacy.dp_sgd.enabled": "true",
            "privacy.update_filter": "gaussian",
            "privacy.gaussian.clip_norm": 1.0,
            "privacy.gaussian.noise_multiplier": 0.05,
            "privacy.gaussian.seed": 2,
        },
    )
    for i, r in enumerate(train, start=1):
        for rec in r["privacy"].values():
            assert rec["mechanism"] == "gaussian" and rec["releases"] == i and rec["epsilon"] > 0
            assert rec["dp_sgd"]["mechanism"] == "dp_sgd" and rec["dp_sgd"]["epsilon"] > 0
    for site in SITES:
        assert train[1]["privacy"][site]["dp_sgd"]["epsilon"] > train[0]["privacy"][site]["dp_sgd"]["epsilon"]
