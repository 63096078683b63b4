"""fedimg's server workflow: one controller for FedAvg, FedProx, FedOpt, SCAFFOLD and FedBN.

Built on NVFlare's ``BaseFedAvg`` (the ``ModelController`` API), with the
persistor, model locator, cross-site evaluation and TensorBoard receiver of
NVFlare's PyTorch recipes. Per round it:

1. sends the global model (and the algorithm's extras: FedProx's ``mu``,
   SCAFFOLD's global controls) to the sites;
2. reads each site's validation of that model (it rates the global model after
   ``round`` aggregations), writes the case-weighted federation mean to
   TensorBoard (run ``global``, tags ``val/...``) and keeps the best global model by the key
   metric — the model that was rated, not the one aggregated after it;
3. aggregates the updates (weights or differences, fp16 widened to fp32) with
   the configured rule and applies them (FedOpt: as a pseudo-gradient for a
   server optimizer; SCAFFOLD: also updates the global controls);
4. saves the global model and appends a line to ``fedimg/rounds.jsonl``: who
   was asked, who contributed with which weight and how many bytes, timings.

After the last round every site validates the final global model, so the
best-model choice includes it (``final_eval``). A resumed run (``start_round
= -1``) continues the round numbering stored in the initial checkpoint.

The server trusts no number, key or shape a site reports. Before screening,
each update is checked (:mod:`fedimg.fl.aggregation`): exactly the global
model's entries, shapes and number types, all finite (FedBN: its
normalization layers may be absent; SCAFFOLD: its control change is checked
the same way); its weight, the site's reported optimizer steps, finite and
in ``(0, bound]``. A failure rejects that site's update for the round, with
a reason code, in ``rounds.jsonl`` (``rejected``) and the log; the run goes
on. Validation metrics out of range drop that site's validation for the
step (``global_metrics.jsonl``: ``rejected``): they count neither in the
means nor for the best model. A site whose result its own filters blocked
(the scalar-only guard) is recorded as ``BLOCKED_AT_SITE``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
from nvflare.apis.fl_constant import ReturnCode
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.abstract.model import make_model_learnable
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_common.workflows.base_fedavg import BaseFedAvg

from fedimg import config as cfgmod
from fedimg.config import ExperimentConfig
from fedimg.fl.aggregation import (
    Update,
    check_metrics,
    check_update,
    check_weight,
    max_steps_per_round,
    screen_updates,
    weighted_metrics,
)
from fedimg.fl.algorithms import ServerStrategy, server_strategy
from fedimg.fl.exchange import to_float32
from fedimg.fl.protocol import (
    META_KEY,
    RESULT_META_ALGO,
    RESULT_META_BYTES,
    RESULT_META_DP,
    RESULT_META_STEPS,
    RESULT_META_TEST,
    RESULT_META_TIMES,
    RESULT_META_VAL,
    TASK_META_ALGORITHM,
    TASK_META_FINAL,
    TASK_META_ROUND,
    scalar_tree_problem,
)
from fedimg.fl.report import evaluation_table, report_metrics
from fedimg.fl.tracking import scalar_layout
from fedimg.training.tracking import local_writer

# The run's progress lines: the console of the simulator shows this logger only (see fedimg.fl.simulate).
progress = logging.getLogger("fedimg.progress")

# A site's optimizer steps per round are fixed by its training cases, data.batch_size and train.local_epochs
# (Opacus' Poisson loader keeps the number of batches too): a report above this multiple of the site's first
# accepted report of the run is not believed.
STEP_GROWTH = 4.0

_RETURN_CODES = frozenset(v for k, v in vars(ReturnCode).items() if k.isupper() and isinstance(v, str))


def _error_reason(rc: Any) -> str:
    """Why a site's answer was not a result, from its return code (quoted only when it is one of NVFlare's)."""
    if rc == ReturnCode.TASK_RESULT_FILTER_ERROR:
        return (
            "BLOCKED_AT_SITE: the site's result filters refused to send its result (TASK_RESULT_FILTER_ERROR, "
            "e.g. the scalar-only guard); see the site's log"
        )
    code = rc if rc in _RETURN_CODES else "an unknown return code"
    return f"SITE_ERROR: the site answered with {code} instead of a result; see the site's log"


def _site_of(result: FLModel) -> str:
    """The site that sent ``result``: NVFlare's controller stamps ``meta["client_name"]`` ("?" if absent).

    One name everywhere: an update, its metadata and its validation must be filed under the same key.
    """
    return str((result.meta or {}).get("client_name", "?"))


def _reported(value: Any) -> Any:
    """A value a site reported, as the server records it: small scalar trees only."""
    why = scalar_tree_problem(value)
    return value if why is None else f"INVALID: {why}"


class FedimgController(BaseFedAvg):
    """Round loop with best-model selection on the rated model, a final evaluation and round records.

    Everything else it needs comes from the experiment the job ships: the
    algorithm's server strategy (:mod:`fedimg.fl.algorithms`), the key metric,
    screening and robust aggregation (``fed.robust``), the update precision,
    the bound on a round's reported steps (``fed.max_steps_per_round``), the
    time limits and ``fed.min_clients``. There is no second copy of those
    settings here.

    Args:
        num_clients: sites of the federation (each round asks every connected site).
        num_rounds: rounds to run in this job.
        experiment: the resolved experiment as JSON (what the job ships as
            ``experiment.yaml``); a string, because NVFlare would turn a nested
            dict holding class paths into objects.
        start_round: first round number; ``-1`` continues from the initial
            checkpoint's ``meta["fedimg"]["rounds_done"]`` (0 without one).
        persistor_id: the job's model persistor.
        task_check_period: seconds between checks for results.
        mode: ``train``, or ``evaluate``: no training; every site scores the
            initial model (a model package given to ``fedimg fl evaluate``)
            on its validation and test cases once.
    """

    def __init__(
        self,
        *,
        num_clients: int,
        num_rounds: int,
        experiment: str,
        start_round: int = 0,
        persistor_id: str = "persistor",
        task_check_period: float = 0.02,
        mode: str = "train",
    ) -> None:
        # A site's error answer (a crash, or a result its own guard blocked) is recorded as that site's rejection;
        # whether the round still counts is fed.min_clients' decision below, not NVFlare's (which would stop the
        # run on the first error when every site is needed for the broadcast).
        super().__init__(
            num_clients=num_clients,
            num_rounds=num_rounds,
            start_round=max(0, start_round),
            persistor_id=persistor_id,
            task_check_period=task_check_period,
            ignore_result_error=True,
        )
        # NVFlare writes the job config from attributes named like the arguments: keep them as given.
        self.start_round = start_round
        self.experiment = experiment
        if mode not in ("train", "evaluate"):
            raise ValueError(f"mode must be 'train' or 'evaluate', got {mode!r}")
        self.mode = mode
        self._t_start = time.time()
        self.exp = cfgmod.from_dict(ExperimentConfig, json.loads(experiment))
        self.fed = self.exp.fed
        self.key_metric = self.exp.key_metric
        self.strategy: ServerStrategy = server_strategy(self.exp)
        self.max_steps_per_round = max_steps_per_round(self.exp)
        self._round_seconds: list[float] = []
        self._writer: Any = None
        self._global: dict[str, np.ndarray] = {}
        self._best: dict[str, Any] = {"value": -math.inf, "round": None}
        self._first_steps: dict[str, float] = {}
        self._site_errors: dict[str, Any] = {}  # site -> return code of its non-result answer (this broadcast)

    def set_communicator(self, communicator: Any) -> None:
        """NVFlare 2.9 sets ``task_check_period`` on the communicator, whose loops read ``_task_check_period``.

        Without this the controller's setting is silently ignored and every
        wait for results polls at 0.2 s.
        """
        super().set_communicator(communicator)
        if hasattr(communicator, "_task_check_period"):
            communicator._task_check_period = self._task_check_period

    # ------------------------------------------------------------------ files

    def _out_dir(self) -> Path:
        d = Path(self.get_run_dir()) / "fedimg"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def _tb(self) -> Any:
        if self._writer is None:
            self._writer = local_writer(Path(self.get_run_dir()) / "tb_events" / "global")
            self._writer.add_custom_scalars(scalar_layout(self.exp))
        return self._writer

    def _append(self, name: str, row: dict[str, Any]) -> None:
        with (self._out_dir() / name).open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row, default=float) + "\n")

    # ------------------------------------------------------------------ setup

    def _task_meta(self, rnd: int) -> dict[str, Any]:
        return {TASK_META_ALGORITHM: self.fed.algorithm, TASK_META_ROUND: rnd, **self.strategy.task_meta()}

    # ------------------------------------------------------------------ metrics and best model

    def _record_validation(
        self, step: int, results: list[FLModel], final: bool = False, rate: bool = True
    ) -> dict[str, float]:
        """Check the sites' validation of the rated model, write the weighted means, keep the best model.

        A site whose metrics fail :func:`fedimg.fl.aggregation.check_metrics`
        (flat or structured) is left out of this step, named in the log and in
        ``global_metrics.jsonl`` (``rejected``). Each site weighs by its
        ``val_cases``; a site that withholds it (fewer validation cases than
        its ``privacy.min_cohort``) weighs as one case.
        """
        per_site, structured, weights = {}, {}, {}
        test_sites, test_structured, test_weights = {}, {}, {}
        rejected = {site: _error_reason(rc) for site, rc in self._site_errors.items()}
        for res in results:
            site = _site_of(res)
            if not res.metrics:
                continue
            tree = (res.meta or {}).get(RESULT_META_VAL) or {}
            test_tree = (res.meta or {}).get(RESULT_META_TEST) or {}
            why = check_metrics(res.metrics) or check_metrics(tree) or check_metrics(test_tree)
            if why:
                rejected[site] = why
                self.warning(f"step {step}: validation of {site} rejected: {why}")
                progress.warning("server: step %s: validation of %s rejected: %s", step, site, why)
                continue
            # Held-out test results (evaluation tasks only) are weighted by their own case counts and kept
            # apart: they never rate a model.
            per_site[site] = {k: v for k, v in res.metrics.items() if not k.startswith("test_")}
            structured[site] = dict(tree)
            cases = float(res.metrics.get("val_cases", math.nan))
            weights[site] = cases if cases >= 1 else 1.0  # withheld (NaN) or none: one case
            if test_tree:
                test_sites[site] = {k: v for k, v in res.metrics.items() if k.startswith("test_")}
                test_structured[site] = dict(test_tree)
                n_test = float(res.metrics.get("test_cases", math.nan))
                test_weights[site] = n_test if n_test >= 1 else 1.0
        flat = weighted_metrics(per_site, weights)
        tree = weighted_metrics(structured, weights)
        writer = self._tb()
        for key, value in tree.items():
            if key != "cases":
                writer.add_scalar(f"val/{key}", value, step)  # the "global" run: the same tags as the sites'
        test_flat = weighted_metrics(test_sites, test_weights)
        for key, value in weighted_metrics(test_structured, test_weights).items():
            if key != "cases":
                writer.add_scalar(f"test/{key}", value, step)
        writer.flush()
        record = {
            "step": step,
            "final_eval": final,
            "global": flat,
            "sites": per_site,
            "weights": weights,
            "rejected": rejected,
        }
        if test_sites:
            record["test"] = {"global": test_flat, "sites": test_sites, "weights": test_weights}
        self._append("global_metrics.jsonl", record)
        self._last_record = record
        rated = flat.get(self.key_metric)
        what = "final global model" if final else f"global model after {step} round(s)"
        shown = "n/a" if rated is None else f"{rated:.4f}"
        progress.info(
            "server: %s: %s %s (case-weighted mean of %d site(s))", what, self.key_metric, shown, len(per_site)
        )
        if rate and rated is not None and rated > self._best["value"]:
            self._save_best(step, rated)
            progress.info("server: new best global model (%s %.4f, after %d round(s))", self.key_metric, rated, step)
        return flat

    def _meta(self, rounds_done: int) -> dict[str, Any]:
        return {
            META_KEY: {
                "rounds_done": rounds_done,
                "algorithm": self.fed.algorithm,
                "best_round": self._best["round"],
                "best_value": self._best["value"],
                "key_metric": self.key_metric,
            },
            "current_round": rounds_done - 1,
        }

    def _save_best(self, step: int, value: float) -> None:
        self._best = {"value": float(value), "round": step}
        ml = make_model_learnable(weights=self._global, meta_props=self._meta(step))
        # The persistor writes GLOBAL_MODEL as the best model on this event.
        self.fl_ctx.set_prop(AppConstants.GLOBAL_MODEL, ml, private=True, sticky=True)
        self.event(AppEventType.GLOBAL_BEST_MODEL_AVAILABLE)

    # ------------------------------------------------------------------ aggregation

    def _accept_train_result(self, client_name: str, result: Any, fl_ctx: Any, is_unknown_task: bool = False) -> bool:
        """NVFlare's check of a result's return code, noting which site answered with an error (and which code)."""
        rc = result.get_return_code()
        if rc and rc != ReturnCode.OK and not is_unknown_task:
            self._site_errors[client_name] = rc
        return super()._accept_train_result(client_name, result, fl_ctx, is_unknown_task=is_unknown_task)

    def _step_bound(self, site: str) -> float:
        first = self._first_steps.get(site)
        bound = float(self.max_steps_per_round)
        return bound if first is None else min(bound, STEP_GROWTH * first)

    def _updates(self, results: list[FLModel]) -> tuple[list[Update], dict[str, Any], str | None]:
        """The round's usable updates, every other site's with its reason (checked before screening)."""
        updates, ptype = [], None
        fp16 = self.fed.update_precision == "fp16"
        info: dict[str, Any] = {site: _error_reason(rc) for site, rc in self._site_errors.items()}
        for res in results:
            meta = res.meta or {}
            site = _site_of(res)
            if not res.params:
                info[site] = "EMPTY: the result holds no model entries"
                continue
            weight, why = check_weight(meta.get(RESULT_META_STEPS), self._step_bound(site))
            why = why or check_update(res.params, self._global, local_keys=self.strategy.local_keys, fp16=fp16)
            why = why or self.strategy.check_result(meta)
            if why is not None or weight is None:
                info[site] = why
                continue
            kind = "DIFF" if res.params_type == ParamsType.DIFF else "FULL"
            if ptype is None:
                ptype = kind
            elif kind != ptype:
                info[site] = f"sent {kind} while others sent {ptype}; fed.exchange must be the same everywhere"
                continue
            self._first_steps.setdefault(site, weight)
            updates.append(Update(site=site, params=to_float32(res.params, self._global), weight=weight))
        if ptype is not None:
            rb = self.fed.robust
            updates, screened = screen_updates(
                updates, self._global, ptype == "DIFF", rb.norm_outlier_factor, rb.max_update_norm, rb.min_cosine
            )
            info.update(screened)
        for site, reason in info.items():
            self.warning(f"round {self.current_round}: update of {site} rejected: {reason}")
            progress.warning("server: round %s: update of %s rejected: %s", self.current_round, site, reason)
        return updates, info, ptype

    # ------------------------------------------------------------------ time limits

    def round_limit(self) -> int:
        """Seconds the next round waits for updates: ``fed.round_timeout_s``, or (0) adaptive.

        Adaptive: ``fed.first_round_timeout_s`` for the first round, then 3x the
        slowest complete round so far, at least ``fed.min_round_timeout_s``.
        """
        if self.fed.round_timeout_s > 0:
            return int(self.fed.round_timeout_s)
        if not self._round_seconds:
            return int(self.fed.first_round_timeout_s)
        return int(max(float(self.fed.min_round_timeout_s), 3.0 * max(self._round_seconds)))

    # ------------------------------------------------------------------ the workflow

    def run(self) -> None:
        model = self.load_model()
        if model is None:
            return
        self._global = to_float32(model.params)
        if self.mode == "evaluate":
            self._evaluate_only()
            return
        prior = (model.meta or {}).get(META_KEY) or {}
        if self.start_round < 0:
            self.start_round = int(prior.get("rounds_done", 0) or 0)
        if prior.get("best_value") is not None and prior.get("key_metric") == self.key_metric:
            self._best = {"value": float(prior["best_value"]), "round": prior.get("best_round")}
        self.strategy.setup(self._global)
        end = self.start_round + self.num_rounds
        self.info(
            f"fedimg {self.fed.algorithm}: rounds {self.start_round}..{end - 1}, aggregation "
            f"{self.fed.robust.aggregation}"
        )
        self._t_start = time.time()
        live: list[Any] = []
        for rnd in range(self.start_round, end):
            self.current_round = rnd  # NVFlare's base class reads it (events, logs)
            outcome = self._train_round(rnd, end)
            if outcome is None:
                return  # aborted, or too few usable updates (the run was stopped)
            live = outcome
            self._maybe_cleanup_memory()
        final = self._final_evaluation(end, live) if self.fed.final_eval else {}
        self._finish(
            {
                "algorithm": self.fed.algorithm,
                "aggregation": self.fed.robust.aggregation,
                "workflow_started_at": self._t_start,  # Unix time: rounds.jsonl's "started" counts from it
                "start_round": self.start_round,
                "end_round": end,
                "key_metric": self.key_metric,
                "best": self._best,
                "final_global_val": final,
            }
        )

    def _train_round(self, rnd: int, end: int) -> list[Any] | None:
        """One round: send the global model, check and record the answers, aggregate, save.

        Returns:
            The sites that answered (for the final evaluation), or None when the run must stop.
        """
        t0 = time.time()
        data = FLModel(
            params=self._global,
            params_type=ParamsType.FULL,
            current_round=rnd,
            total_rounds=end,
            start_round=self.start_round,
            meta=self._task_meta(rnd),
        )
        clients = self.sample_clients(None)  # every connected site, every round: a returning site rejoins
        self.fl_ctx.set_prop(AppConstants.CURRENT_ROUND, rnd, private=True, sticky=False)
        self.event(AppEventType.ROUND_STARTED)
        limit = self.round_limit()
        self._site_errors = {}
        # Wait for every sampled site until the limit; a site that does not answer by then is left out.
        results = self.broadcast_model(
            task_name="train",
            data=data,
            targets=clients,
            min_responses=0,
            timeout=limit,
            wait_time_after_min_received=limit,
        )
        if self.abort_signal.triggered:
            self.info("abort signal: stopping")
            return None
        t_wait = time.time() - t0
        self._record_validation(rnd, results)
        updates, rejected, ptype = self._updates(results)
        contributed = [u.site for u in updates]
        missing = [c for c in clients if c not in contributed and c not in rejected]
        needed = self.fed.min_clients or len(clients)
        if missing:
            progress.warning(
                "server: round %d: no update from %s within %d s; the round goes on with %s",
                rnd,
                ", ".join(missing),
                limit,
                ", ".join(contributed) or "no site",
            )
        record: dict[str, Any] = {
            "round": rnd,
            "asked": clients,
            "contributed": contributed,
            "rejected": rejected,
            "missing": missing,
            "started": t0 - self._t_start,
        }
        if len(updates) < needed:
            self._append("rounds.jsonl", {**record, "failed": True, "seconds": {"round": time.time() - t0}})
            self.panic(
                f"round {rnd}: {len(updates)} usable update(s) ({', '.join(contributed) or 'none'}), "
                f"fewer than the {needed} needed (fed.min_clients); missing: {missing}, rejected: "
                f"{sorted(rejected)}. Stopping the run."
            )
            return None
        t1 = time.time()
        if updates and ptype is not None:
            metas = {_site_of(r): (r.meta or {}) for r in results}
            self._global = self.strategy.apply(self._global, updates, ptype == "DIFF", metas)
        t_agg = time.time() - t1
        self.save_model(FLModel(params=self._global, meta=self._meta(rnd + 1)))
        self._append(
            "rounds.jsonl",
            {
                **record,
                "weights": {u.site: u.weight for u in updates},
                **self._reported_by_sites(results),
                "seconds": {"round": time.time() - t0, "wait_for_sites": t_wait, "aggregation": t_agg},
                "limit_s": limit,
            },
        )
        if not missing:
            # Only complete rounds size the limit: a round cut by the limit says nothing of the sites' speed.
            self._round_seconds.append(time.time() - t0)
        return [c for c in clients if c not in missing]

    @staticmethod
    def _reported_by_sites(results: list[FLModel]) -> dict[str, Any]:
        """What the sites reported about themselves, as they reported it (small scalar trees only)."""

        def per_site(key: str, only_present: bool = False) -> dict[str, Any]:
            return {
                _site_of(r): _reported((r.meta or {}).get(key))
                for r in results
                if not only_present or (r.meta or {}).get(key)
            }

        # "privacy": what the sites' privacy filters did (mechanism, clipping, epsilon spent).
        return {
            "update_bytes": per_site(RESULT_META_BYTES),
            "site_seconds": per_site(RESULT_META_TIMES),
            "algorithm_stats": per_site(RESULT_META_ALGO),
            "privacy": per_site(RESULT_META_DP, True),
        }

    def _final_evaluation(self, end: int, live: list[Any]) -> dict[str, float]:
        """Every site that answered the last round scores the final global model (it may become the best)."""
        t0 = time.time()
        data = FLModel(
            params=self._global,
            params_type=ParamsType.FULL,
            current_round=end,
            total_rounds=end,
            meta={TASK_META_FINAL: True, TASK_META_ROUND: end},
        )
        # The sites that answered the last round: one that crashed would only hold the evaluation to its
        # limit (NVFlare 2.9 does not redeploy a running job to a restarted site).
        self._site_errors = {}
        results = self.broadcast_model(
            task_name="validate", data=data, targets=live or None, timeout=int(self.fed.eval_timeout_s)
        )
        final = self._record_validation(end, results, final=True)
        # Rewrite the final model with the best-model record that now includes its own score.
        self.save_model(FLModel(params=self._global, meta=self._meta(end)))
        self._append(
            "rounds.jsonl",
            {
                "round": end,
                "final_eval": True,
                "asked": live or "all",
                "seconds": {"evaluation": time.time() - t0},
                "started": t0 - self._t_start,
            },
        )
        return final

    def _evaluate_only(self) -> None:
        """Evaluation mode: every site scores the given model on its validation (and test) cases; no training."""
        self._t_start = time.time()
        self.info("fedimg: evaluating the given model at every site (no training)")
        data = FLModel(
            params=self._global,
            params_type=ParamsType.FULL,
            current_round=0,
            total_rounds=0,
            meta={TASK_META_FINAL: True, TASK_META_ROUND: 0},
        )
        self._site_errors = {}
        results = self.broadcast_model(
            task_name="validate", data=data, targets=None, timeout=int(self.fed.eval_timeout_s)
        )
        final = self._record_validation(0, results, final=True, rate=False)
        self.save_model(FLModel(params=self._global, meta=self._meta(0)))
        record = getattr(self, "_last_record", {})
        (self._out_dir() / "evaluation.json").write_text(json.dumps(record, indent=1, default=float))
        table = evaluation_table(record, report_metrics(self.exp))
        (self._out_dir() / "evaluation.md").write_text("# Evaluation of a given model\n\n" + table + "\n")
        writer = self._tb()
        writer.add_text("evaluation/table", table, 0)
        writer.flush()
        self._finish({"mode": "evaluate", "key_metric": self.key_metric, "final_global_val": final})

    def _finish(self, summary: dict[str, Any]) -> None:
        (self._out_dir() / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
        if self._writer is not None:
            self._writer.close()
        self.info("fedimg workflow finished")
