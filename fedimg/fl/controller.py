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
import torch
from nvflare.apis.fl_constant import ReturnCode
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.abstract.model import make_model_learnable
from nvflare.app_common.app_constant import AlgorithmConstants, AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_common.utils.fedprox_utils import set_fedprox_metadata
from nvflare.app_common.workflows.base_fedavg import BaseFedAvg

from fedimg.fl.aggregation import (MAX_CASES_PER_SITE, Update, aggregate, check_metrics, check_update, check_weight,
                                   screen_updates, weighted_metrics)
from fedimg.fl.exchange import to_float32
from fedimg.models.registry import build_from_spec, normalization_keys
from fedimg.training.tracking import local_writer

from fedimg.fl.protocol import (
    META_KEY,
    RESULT_META_ALGO,
    RESULT_META_BYTES,
    RESULT_META_DP,
    RESULT_META_STEPS,
    RESULT_META_TIMES,
    RESULT_META_TEST,
    RESULT_META_VAL,
    TASK_META_ALGORITHM,
    TASK_META_FINAL,
    TASK_META_ROUND,
    scalar_tree_problem,
)

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
        return ("BLOCKED_AT_SITE: the site's result filters refused to send its result (TASK_RESULT_FILTER_ERROR, "
                "e.g. the scalar-only guard); see the site's log")
    code = rc if rc in _RETURN_CODES else "an unknown return code"
    return f"SITE_ERROR: the site answered with {code} instead of a result; see the site's log"


def _reported(value: Any) -> Any:
    """A value a site reported, as the server records it: small scalar trees only."""
    why = scalar_tree_problem(value)
    return value if why is None else f"INVALID: {why}"


class FedimgController(BaseFedAvg):
    """Round loop with best-model selection on the rated model, a final evaluation and round records.

    Args:
        num_clients: sites of the federation (each round asks every connected site).
        num_rounds: rounds to run in this job.
        start_round: first round number; ``-1`` continues from the initial
            checkpoint's ``meta["fedimg"]["rounds_done"]`` (0 without one).
        algorithm: ``fedavg``, ``fedprox``, ``fedopt``, ``scaffold`` or ``fedbn``.
        key_metric: FLModel metric ranking global models (higher is better).
        fedprox_mu: FedProx's proximal coefficient (sent with every training task).
        model_spec: ``{"class_path", "args"}`` of the network as JSON (FedOpt's server model). A
            string, because NVFlare would build a dict holding a class path into an object.
        server_optimizer: FedOpt: ``{"name": sgd|adam, "lr", "momentum", "betas", "eps"}``.
        aggregation: ``mean``, ``median`` or ``trimmed_mean``.
        trim: values dropped per end for ``trimmed_mean``.
        norm_outlier_factor, max_update_norm, min_cosine: update screening
            (see :func:`fedimg.fl.aggregation.screen_updates`); NaN/Inf updates are always rejected.
        update_precision: ``fp32`` or ``fp16`` (``fed.update_precision``): fp16
            entries are accepted only with ``fp16``.
        max_steps_per_round: the largest aggregation weight (a site's reported
            optimizer steps of a round) believed; a site's later reports are
            also bounded by :data:`STEP_GROWTH` x its first accepted one. A
            report that is missing, not finite, <= 0 or above the bound
            rejects the update (the recipe derives the bound from
            ``fed.max_steps_per_round``).
        final_eval: validate the final global model at every site after the last round.
        min_responses: updates a round needs to count (0: every sampled site).
        train_timeout: seconds a round waits for updates; 0 is adaptive:
            ``first_round_timeout`` for the first round, then 3x the slowest
            round so far (at least ``min_round_timeout``).
        first_round_timeout: the first round's limit when adaptive.
        min_round_timeout: the floor of the adaptive limit.
        eval_timeout: limit of the final evaluation.
        tb_layout: TensorBoard custom-scalar layout written with the global curves.
        task_check_period: seconds between checks for results.
    """

    def __init__(
        self,
        *,
        num_clients: int,
        num_rounds: int,
        start_round: int = 0,
        persistor_id: str = "persistor",
        algorithm: str = "fedavg",
        key_metric: str = "val_dice",
        fedprox_mu: float | None = None,
        model_spec: str | None = None,
        server_optimizer: dict | None = None,
        aggregation: str = "mean",
        trim: int = 1,
        norm_outlier_factor: float = 0.0,
        max_update_norm: float = 0.0,
        min_cosine: float | None = None,
        update_precision: str = "fp32",
        max_steps_per_round: int = MAX_CASES_PER_SITE,
        final_eval: bool = True,
        min_responses: int = 0,
        train_timeout: int = 0,
        first_round_timeout: int = 1800,
        min_round_timeout: int = 60,
        eval_timeout: int = 600,
        tb_layout: dict | None = None,
        task_check_period: float = 0.2,
    ) -> None:
        # A site's error answer (a crash, or a result its own guard blocked) is recorded as that site's rejection;
        # whether the round still counts is fed.min_clients' decision below, not NVFlare's (which would stop the
        # run on the first error when every site is needed for the broadcast).
        super().__init__(num_clients=num_clients, num_rounds=num_rounds, start_round=max(0, start_round),
                         persistor_id=persistor_id, task_check_period=task_check_period, ignore_result_error=True)
        # NVFlare writes the job config from attributes named like the arguments: keep the -1 as given.
        self.start_round = start_round
        self.algorithm = algorithm
        self.key_metric = key_metric
        self.fedprox_mu = fedprox_mu
        self.model_spec = model_spec
        self.server_optimizer = server_optimizer or {}
        self.aggregation = aggregation
        self.trim = trim
        self.norm_outlier_factor = norm_outlier_factor
        self.max_update_norm = max_update_norm
        self.min_cosine = min_cosine
        if update_precision not in ("fp32", "fp16"):
            raise ValueError(f"update_precision must be 'fp32' or 'fp16', got {update_precision!r}")
        self.update_precision = update_precision
        if isinstance(max_steps_per_round, bool) or not isinstance(max_steps_per_round, (int, float)) \
                or not math.isfinite(max_steps_per_round) or max_steps_per_round <= 0:
            raise ValueError(f"max_steps_per_round must be a finite number > 0, got {max_steps_per_round!r}")
        self.max_steps_per_round = max_steps_per_round
        self.final_eval = final_eval
        self.min_responses = min_responses
        self.train_timeout = train_timeout
        self.first_round_timeout = first_round_timeout
        self.min_round_timeout = min_round_timeout
        self.eval_timeout = eval_timeout
        self._round_seconds: list[float] = []
        self.tb_layout = tb_layout
        self._writer: Any = None
        self._global: dict[str, np.ndarray] = {}
        self._controls: dict[str, np.ndarray] = {}
        self._torch_model: torch.nn.Module | None = None
        self._server_opt: torch.optim.Optimizer | None = None
        self._best: dict[str, Any] = {"value": -math.inf, "round": None}
        self._history: list[dict[str, Any]] = []
        self._local_keys: frozenset[str] = frozenset()  # FedBN: entries that stay at the sites
        self._param_keys: frozenset[str] | None = None  # SCAFFOLD: the entries a control change covers
        self._first_steps: dict[str, float] = {}
        self._site_errors: dict[str, Any] = {}  # site -> return code of its non-result answer (this broadcast)

    # ------------------------------------------------------------------ files

    def _out_dir(self) -> Path:
        d = Path(self.get_run_dir()) / "fedimg"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def _tb(self) -> Any:
        if self._writer is None:
            self._writer = local_writer(Path(self.get_run_dir()) / "tb_events" / "global")
            if self.tb_layout:
                self._writer.add_custom_scalars(self.tb_layout)
        return self._writer

    def _append(self, name: str, row: dict[str, Any]) -> None:
        with (self._out_dir() / name).open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row, default=float) + "\n")

    # ------------------------------------------------------------------ setup

    def _setup_algorithm(self) -> None:
        if self.algorithm in ("fedbn", "scaffold"):
            if not self.model_spec:
                raise ValueError(f"{self.algorithm} needs model_spec to know the network's site-local entries "
                                 "and parameters")
            net = build_from_spec(json.loads(self.model_spec))
            if self.algorithm == "fedbn":
                self._local_keys = frozenset(normalization_keys(net))
            else:
                self._param_keys = frozenset(name for name, _ in net.named_parameters())
        if self.algorithm == "fedopt":
            if not self.model_spec:
                raise ValueError("fedopt needs model_spec to build the server-side model")
            self._torch_model = build_from_spec(json.loads(self.model_spec))
            self._torch_model.load_state_dict({k: torch.as_tensor(v) for k, v in self._global.items()}, strict=True)
            opt = self.server_optimizer
            params = self._torch_model.parameters()
            if opt.get("name", "sgd") == "adam":
                self._server_opt = torch.optim.Adam(params, lr=float(opt.get("lr", 1e-2)),
                                                    betas=tuple(opt.get("betas", (0.9, 0.99))),
                                                    eps=float(opt.get("eps", 1e-3)))
            else:
                self._server_opt = torch.optim.SGD(params, lr=float(opt.get("lr", 1.0)),
                                                   momentum=float(opt.get("momentum", 0.0)))
        if self.algorithm == "scaffold":
            self._controls = {k: np.zeros_like(v, dtype=np.float32) for k, v in self._global.items()
                              if np.issubdtype(v.dtype, np.floating)}

    def _task_meta(self, rnd: int) -> dict[str, Any]:
        meta: dict[str, Any] = {TASK_META_ALGORITHM: self.algorithm, TASK_META_ROUND: rnd}
        if self.algorithm == "scaffold":
            meta[AlgorithmConstants.SCAFFOLD_CTRL_GLOBAL] = self._controls
        return meta

    # ------------------------------------------------------------------ metrics and best model

    def _record_validation(self, step: int, results: list[FLModel], final: bool = False) -> dict[str, float]:
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
            site = (res.meta or {}).get("client_name", "?")
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
        record = {"step": step, "final_eval": final, "global": flat, "sites": per_site, "weights": weights,
                  "rejected": rejected}
        if test_sites:
            record["test"] = {"global": test_flat, "sites": test_sites, "weights": test_weights}
        self._append("global_metrics.jsonl", record)
        value = flat.get(self.key_metric)
        what = "final global model" if final else f"global model after {step} round(s)"
        shown = "n/a" if value is None else f"{value:.4f}"
        progress.info("server: %s: %s %s (case-weighted mean of %d site(s))", what, self.key_metric, shown,
                      len(per_site))
        if value is not None and value > self._best["value"]:
            self._save_best(step, value)
            progress.info("server: new best global model (%s %.4f, after %d round(s))", self.key_metric, value, step)
        return flat

    def _meta(self, rounds_done: int) -> dict[str, Any]:
        return {META_KEY: {"rounds_done": rounds_done, "algorithm": self.algorithm,
                           "best_round": self._best["round"], "best_value": self._best["value"],
                           "key_metric": self.key_metric},
                "current_round": rounds_done - 1}

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

    def _check_controls(self, ctrl: Any) -> str | None:
        """Why a site's SCAFFOLD control change cannot be used (None: it can)."""
        if ctrl is None:
            return (f"MISSING_CONTROLS: no control-variate change (meta {AlgorithmConstants.SCAFFOLD_CTRL_DIFF!r}); "
                    "every site must run scaffold")
        if self._param_keys is None:  # no network known: any subset of the controls, nothing else
            reference, optional = self._controls, set(self._controls)
        else:
            reference, optional = {k: v for k, v in self._controls.items() if k in self._param_keys}, set()
        why = check_update(ctrl, reference, local_keys=optional, fp16=self.update_precision == "fp16")
        if why is None:
            return None
        code, _, rest = why.partition(": ")
        return f"{code}: in the SCAFFOLD control change, {rest}"

    def _updates(self, results: list[FLModel]) -> tuple[list[Update], dict[str, Any], str | None]:
        """The round's usable updates, every other site's with its reason (checked before screening)."""
        updates, ptype = [], None
        info: dict[str, Any] = {site: _error_reason(rc) for site, rc in self._site_errors.items()}
        for res in results:
            meta = res.meta or {}
            site = meta.get("client_name", "?")
            if not res.params:
                info[site] = "EMPTY: the result holds no model entries"
                continue
            weight, why = check_weight(meta.get(RESULT_META_STEPS), self._step_bound(site))
            why = why or check_update(res.params, self._global, local_keys=self._local_keys,
                                      fp16=self.update_precision == "fp16")
            if why is None and self.algorithm == "scaffold":
                why = self._check_controls(meta.get(AlgorithmConstants.SCAFFOLD_CTRL_DIFF))
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
            updates, screened = screen_updates(updates, self._global, ptype == "DIFF", self.norm_outlier_factor,
                                               self.max_update_norm, self.min_cosine)
            info.update(screened)
        for site, reason in info.items():
            self.warning(f"round {self.current_round}: update of {site} rejected: {reason}")
            progress.warning("server: round %s: update of %s rejected: %s", self.current_round, site, reason)
        return updates, info, ptype

    def _apply(self, updates: list[Update], ptype: str, results: list[FLModel]) -> None:
        agg = aggregate(updates, self.aggregation, self.trim)
        if ptype == "FULL" and self.algorithm == "fedopt":
            raise ValueError("fedopt needs differences: set fed.exchange: diff")
        if self.algorithm == "fedopt":
            self._server_step(agg)
        elif ptype == "FULL":
            self._global.update(agg)  # entries no site sent (FedBN) keep their value
        else:
            for k, d in agg.items():
                g = self._global[k]
                self._global[k] = (g + d).astype(g.dtype)
        if self.algorithm == "scaffold":
            ctrl = [Update(site=u.site, params=to_float32(r.meta[AlgorithmConstants.SCAFFOLD_CTRL_DIFF]), weight=u.weight)
                    for u, r in zip(updates, self._matching(results, updates))
                    if AlgorithmConstants.SCAFFOLD_CTRL_DIFF in (r.meta or {})]
            if len(ctrl) != len(updates):
                raise ValueError("SCAFFOLD: a site did not return its control-variate change "
                                 f"(meta {AlgorithmConstants.SCAFFOLD_CTRL_DIFF!r}); every site must run scaffold")
            for k, d in aggregate(ctrl, "mean").items():
                if k in self._controls:
                    self._controls[k] = (self._controls[k] + d).astype(np.float32)

    @staticmethod
    def _matching(results: list[FLModel], updates: list[Update]) -> list[FLModel]:
        by_site = {(r.meta or {}).get("client_name"): r for r in results}
        return [by_site[u.site] for u in updates]

    def _server_step(self, diff: dict[str, np.ndarray]) -> None:
        if self._torch_model is None or self._server_opt is None:
            raise RuntimeError("FedOpt's server model was not set up before the first aggregation")
        self._server_opt.zero_grad()
        named = dict(self._torch_model.named_parameters())
        for name, p in named.items():
            if name in diff:
                # The averaged update is a descent direction: its negative is the pseudo-gradient.
                p.grad = torch.as_tensor(-diff[name], dtype=p.dtype)
        self._server_opt.step()
        state = self._torch_model.state_dict()
        for k, v in state.items():
            if k in named:
                self._global[k] = v.detach().cpu().numpy().astype(np.float32)
            elif k in diff:  # buffers (BatchNorm statistics): plain averaging
                g = self._global[k]
                self._global[k] = (g + diff[k]).astype(g.dtype)
                v.copy_(torch.as_tensor(self._global[k]))

    # ------------------------------------------------------------------ time limits

    def round_limit(self) -> int:
        """Seconds the next round waits for updates (see ``train_timeout``)."""
        if self.train_timeout > 0:
            return int(self.train_timeout)
        if not self._round_seconds:
            return int(self.first_round_timeout)
        return int(max(float(self.min_round_timeout), 3.0 * max(self._round_seconds)))

    # ------------------------------------------------------------------ the workflow

    def run(self) -> None:
        model = self.load_model()
        if model is None:
            return
        self._global = to_float32(model.params)
        prior = (model.meta or {}).get(META_KEY) or {}
        if self.start_round < 0:
            self.start_round = int(prior.get("rounds_done", 0) or 0)
        if prior.get("best_value") is not None and prior.get("key_metric") == self.key_metric:
            self._best = {"value": float(prior["best_value"]), "round": prior.get("best_round")}
        self._setup_algorithm()
        end = self.start_round + self.num_rounds
        self.info(f"fedimg {self.algorithm}: rounds {self.start_round}..{end - 1}, aggregation {self.aggregation}")
        t_start = time.time()
        live: list[Any] = []
        for self.current_round in range(self.start_round, end):
            rnd = self.current_round
            t0 = time.time()
            data = FLModel(params=self._global, params_type=ParamsType.FULL, current_round=rnd, total_rounds=end,
                           start_round=self.start_round, meta=self._task_meta(rnd))
            set_fedprox_metadata(data, self.fedprox_mu if self.algorithm == "fedprox" else None)
            clients = self.sample_clients(None)  # every connected site, every round: a returning site rejoins
            self.fl_ctx.set_prop(AppConstants.CURRENT_ROUND, rnd, private=True, sticky=False)
            self.event(AppEventType.ROUND_STARTED)
            limit = self.round_limit()
            self._site_errors = {}
            # Wait for every sampled site until the limit; a site that does not answer by then is left out.
            results = self.broadcast_model(task_name="train", data=data, targets=clients, min_responses=0,
                                           timeout=limit, wait_time_after_min_received=limit)
            if self.abort_signal.triggered:
                self.info("abort signal: stopping")
                return
            t_wait = time.time() - t0
            self._record_validation(rnd, results)
            updates, rejected, ptype = self._updates(results)
            contributed = [u.site for u in updates]
            missing = [c for c in clients if c not in contributed and c not in rejected]
            live = [c for c in clients if c not in missing]
            needed = self.min_responses or len(clients)
            if missing:
                progress.warning("server: round %d: no update from %s within %d s; the round goes on with %s",
                                 rnd, ", ".join(missing), limit, ", ".join(contributed) or "no site")
            if len(updates) < needed:
                self._append("rounds.jsonl", {"round": rnd, "asked": clients, "contributed": contributed,
                                              "rejected": rejected, "missing": missing, "failed": True,
                                              "seconds": {"round": time.time() - t0}, "started": t0 - t_start})
                self.panic(f"round {rnd}: {len(updates)} usable update(s) ({', '.join(contributed) or 'none'}), "
                           f"fewer than the {needed} needed (fed.min_clients); missing: {missing}, rejected: "
                           f"{sorted(rejected)}. Stopping the run.")
                return
            t1 = time.time()
            if updates and ptype is not None:
                self._apply(updates, ptype, results)
            t_agg = time.time() - t1
            self.save_model(FLModel(params=self._global, meta=self._meta(rnd + 1)))
            self._append("rounds.jsonl", {
                "round": rnd, "asked": clients, "contributed": contributed, "rejected": rejected,
                "missing": missing,
                "weights": {u.site: u.weight for u in updates},
                # What the sites reported about themselves, as they reported it (small scalar trees only).
                "update_bytes": {(r.meta or {}).get("client_name"): _reported((r.meta or {}).get(RESULT_META_BYTES))
                                 for r in results},
                "site_seconds": {(r.meta or {}).get("client_name"): _reported((r.meta or {}).get(RESULT_META_TIMES))
                                 for r in results},
                "algorithm_stats": {(r.meta or {}).get("client_name"): _reported((r.meta or {}).get(RESULT_META_ALGO))
                                    for r in results},
                # What the sites' privacy filters did (mechanism, clipping, epsilon spent), as they reported it.
                "privacy": {(r.meta or {}).get("client_name"): _reported((r.meta or {}).get(RESULT_META_DP))
                            for r in results if (r.meta or {}).get(RESULT_META_DP)},
                "seconds": {"round": time.time() - t0, "wait_for_sites": t_wait, "aggregation": t_agg},
                "started": t0 - t_start, "limit_s": limit,
            })
            if not missing:
                # Only complete rounds size the limit: a round cut by the limit says nothing of the sites' speed.
                self._round_seconds.append(time.time() - t0)
            self._maybe_cleanup_memory()
        if self.final_eval:
            t0 = time.time()
            data = FLModel(params=self._global, params_type=ParamsType.FULL, current_round=end, total_rounds=end,
                           meta={TASK_META_FINAL: True, TASK_META_ROUND: end})
            # The sites that answered the last round: one that crashed would only hold the evaluation to its
            # limit (NVFlare 2.9 does not redeploy a running job to a restarted site).
            self._site_errors = {}
            results = self.broadcast_model(task_name="validate", data=data, targets=live or None,
                                           timeout=int(self.eval_timeout))
            final = self._record_validation(end, results, final=True)
            # Rewrite the final model with the best-model record that now includes its own score.
            self.save_model(FLModel(params=self._global, meta=self._meta(end)))
            self._append("rounds.jsonl", {"round": end, "final_eval": True, "asked": live or "all",
                                          "seconds": {"evaluation": time.time() - t0}, "started": t0 - t_start})
        else:
            final = {}
        summary = {"algorithm": self.algorithm, "aggregation": self.aggregation, "start_round": self.start_round,
                   "end_round": end, "key_metric": self.key_metric, "best": self._best, "final_global_val": final}
        (self._out_dir() / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
        if self._writer is not None:
            self._writer.close()
        self.info("fedimg workflow finished")
