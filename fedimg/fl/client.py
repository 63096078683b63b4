"""fedimg's NVFlare Client API loop, run at every site.

Per task received from the server:

* ``train``: load the global weights (FedBN: all but the site's own
  normalization layers), validate them on the site's validation cases (this
  rates the global model after ``round`` aggregations), train
  ``train.local_epochs`` epochs with the algorithm's additions (FedProx,
  SCAFFOLD), and send the update (weights or differences, fp32 or fp16, as
  ``fed.exchange`` and ``fed.update_precision`` say) with
  ``NUM_STEPS_CURRENT_ROUND`` so the server weights sites by work done.
* ``validate`` (the final evaluation and cross-site evaluation): load the
  weights, send metrics only.
* ``submit_model``: send this site's own last locally trained weights.

With ``privacy.dp_sgd.enabled`` the local epochs are DP-SGD (Opacus, see
:mod:`fedimg.training.dp_sgd`); the privacy spent so far goes with every
update as ``{"dp_sgd": {...}}`` under the result meta key ``fedimg_dp``
(:data:`fedimg.fl.protocol.RESULT_META_DP`), which the server copies into
``rounds.jsonl`` under ``privacy``, and is streamed as
``<site>/privacy/epsilon``. A job-level ``privacy.update_filter: gaussian``
writes its own record into the same meta entry and keeps the ``dp_sgd`` one
(:class:`fedimg.fl.privacy.GaussianUpdateDP`).

Counts about the validation cases (``val_cases``, the per-class counts of
cases with an undefined HD95) and the 95% bootstrap intervals of the metrics
(``val_<metric>_ci_low``/``_ci_high``, computed here from the per-case
scores, which never leave the site) are sent only by a site with at least
``privacy.min_cohort`` validation cases (:func:`withhold_small_cohort`); the
server then weighs that site's validation as one case.

Every model received (global weights, another site's model in cross-site
evaluation, SCAFFOLD's controls) is checked before it is loaded: exactly the
network's entries and shapes, numbers only, every value finite
(:meth:`fedimg.training.trainer.SiteTrainer.load_weights`); a broken one
stops the task with an error naming the entry, and nothing is loaded.

Only scalar metrics are streamed to the server's TensorBoard, tagged
``<site>/val/<metric>`` with the round as the step, so curves of all sites
line up. Pictures of predictions go to the site's own ``local_logdir`` only,
as the TensorBoard run named after the site (``<local_logdir>/<site>``):
one picture per validation case, axial, coronal and sagittal through the
lesion in the radiological convention (:mod:`fedimg.tasks.pictures`), tagged
``overlay/case_<index>``. Nothing in a metric name or value, a picture or a
tag identifies a patient.

The site's local settings (datalist, device, threads) come from a site config
named by ``--site-config`` or the ``FEDIMG_SITE_CONFIG`` environment variable:
the job carries no site paths.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nvflare.client as flare
from nvflare.app_common.abstract.fl_model import ParamsType
from nvflare.client.tracking import SummaryWriter

from fedimg import config as cfgmod
from fedimg import runtime
from fedimg.fl.algorithms import client_algorithm
from fedimg.fl.exchange import DIFF, make_update, payload_bytes
from fedimg.fl.protocol import (
    RESULT_META_ALGO,
    RESULT_META_BYTES,
    RESULT_META_DP,
    RESULT_META_TEST,
    RESULT_META_TIMES,
    RESULT_META_VAL,
    TASK_META_FINAL,
)
from fedimg.tasks import curve_metrics, metric_names
from fedimg.tasks.intervals import is_interval_bound
from fedimg.training.tracking import local_writer, write_case_pictures
from fedimg.training.trainer import SiteTrainer

logger = logging.getLogger(__name__)
progress = logging.getLogger("fedimg.progress")  # the lines the simulator's console shows

SITE_CONFIG_ENV = "FEDIMG_SITE_CONFIG"


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fedimg-client")
    p.add_argument(
        "--config",
        default="experiment.yaml",
        help="experiment YAML shipped with the job (relative to this script's folder)",
    )
    p.add_argument("--site-config", default=None, help=f"site YAML; default: ${SITE_CONFIG_ENV}")
    p.add_argument(
        "--sites-sharing-cpu",
        type=int,
        default=1,
        help="training processes on this machine (simulator), for thread sizing",
    )
    return p.parse_args(list(argv))


def _resolve(path: str, script_dir: Path) -> Path:
    p = Path(path)
    if p.is_absolute():
        return p
    for base in (script_dir, Path.cwd()):
        if (base / p).is_file():
            return base / p
    return script_dir / p


def _scalars(val: dict[str, float]) -> dict[str, float]:
    # Measures only: no counts (cases, undefined HD95s), interval bounds or voxel size in the curves.
    return curve_metrics(val)


def _half_precision(extra: dict[str, Any]) -> dict[str, Any]:
    """The algorithm's extra payloads (e.g. SCAFFOLD's control differences) cast to float16 arrays.

    Args:
        extra: the algorithm's end-of-round entries; dict values are arrays by name, others pass unchanged.

    Returns:
        The same entries with every array of a dict value as float16.
    """
    return {k: ({n: a.astype("float16") for n, a in v.items()} if isinstance(v, dict) else v) for k, v in extra.items()}


def withhold_small_cohort(
    metrics: dict[str, float], cases: float, min_cohort: int, prefix: str = "val_"
) -> dict[str, float]:
    """The metrics a site sends: without counts and intervals about its cases when it has fewer than ``min_cohort``.

    With a handful of cases, a count (how many cases, how many with an
    undefined HD95: a lesion missed or invented) describes individual
    patients, and so do the bounds of a bootstrap interval (with two cases
    they are the two cases' own scores); the means still go out.
    """
    if cases >= min_cohort:
        return metrics
    return {
        k: v
        for k, v in metrics.items()
        if k != f"{prefix}cases"
        and not k.startswith(f"{prefix}hd95_undefined")
        and not (k.startswith(prefix) and is_interval_bound(k))
    }


#: How often the in-process Client API looks for the next task and for the trainer's result (NVFlare 2.9: 0.5 s
#: each way, about 1 s of dead time per round and site).
RESULT_POLL_S = 0.02


def fast_result_polling(ctx: Any, interval: float = RESULT_POLL_S) -> None:
    """Shorten the Client API's polling: the trainer's wait for a task, and the executor's wait for the result.

    NVFlare 2.9 fixes both at 0.5 s (``InProcessClientAPI.result_check_interval``
    and ``in_process_backend._RESULT_POLL_INTERVAL``, a module constant read at
    every wait). The trainer and the executor share this process, so both are set here, after ``flare.init()``.
    """
    api = getattr(ctx, "api", None)
    if api is not None and hasattr(api, "result_check_interval"):
        api.result_check_interval = interval
    try:
        from nvflare.app_common.executors.client_api import in_process_backend
    except ImportError:  # another NVFlare layout: keep its defaults
        return
    if hasattr(in_process_backend, "_RESULT_POLL_INTERVAL"):
        in_process_backend._RESULT_POLL_INTERVAL = interval
    _shorten_simulator_retry(interval)


SIMULATOR_WORKER = "nvflare.private.fed.app.simulator.simulator_worker"


class _ShortSleeps:
    """The ``time`` module as the simulator's worker sees it, with its sleeps capped (everything else unchanged)."""

    def __init__(self, cap: float) -> None:
        self._cap = cap

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self._cap))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def _shorten_simulator_retry(cap: float) -> None:
    """In NVFlare's simulator, retry a task fetch after ``cap`` seconds instead of a hard-coded 0.5 s.

    The simulator's site process (``simulator_worker``, run as ``__main__``)
    asks for the next task right after sending a result; while the server
    aggregates it answers "try again", and the worker then sleeps a fixed
    0.5 s (``time.sleep(0.5)`` in ``ClientTaskWorker.do_one_task``, no setting),
    about half a second of every round on one machine. The worker reads its
    module's ``time`` at each call, and this script runs in that process
    (in-process Client API), so its sleeps are capped here. Outside the
    simulator (POC, production) nothing changes.
    """
    # The worker runs as a script: multiprocessing registers it as __mp_main__ (or __main__).
    for name in (SIMULATOR_WORKER, "__mp_main__", "__main__"):
        module = sys.modules.get(name)
        attrs = vars(module) if module is not None else {}
        if "ClientTaskWorker" in attrs and "FETCH_TASK_RUN_RETRY" in attrs and attrs.get("time") is time:
            module.time = _ShortSleeps(cap)  # type: ignore[union-attr]
            logger.info("simulator: task-fetch retries every %.2f s (NVFlare's worker: 0.5 s)", cap)


class SiteRunner:
    """The state one site keeps across tasks: its trainer, algorithm, writers and own weights."""

    def __init__(
        self, exp: cfgmod.ExperimentConfig, site: cfgmod.SiteConfig, site_name: str, sites_sharing_cpu: int
    ) -> None:
        self.exp = exp
        self.site_name = site_name
        self.rt = runtime.setup(
            site.device, exp.train.amp, site.num_threads, seed=exp.train.seed, workers_sharing_cpu=sites_sharing_cpu
        )
        self.trainer = SiteTrainer.from_datalist(exp, site.datalist, self.rt)
        self.algorithm = client_algorithm(exp.fed.algorithm, self.trainer)
        self.writer = SummaryWriter()
        # One run named after the site (not "."), so several sites' or experiments' local logs sit side by side.
        self.local = (
            local_writer(Path(site.local_logdir) / cfgmod.validate_site_name(site_name)) if site.local_logdir else None
        )
        self.local_weights: dict[str, Any] | None = None
        progress.info(
            "site %s: %d training / %d validation cases on %s, %s",
            site_name,
            self.trainer.n_train,
            self.trainer.n_val,
            self.rt.device,
            exp.fed.algorithm,
        )

    def _log_validation(self, val: dict[str, float], step: int) -> None:
        for k, v in _scalars(val).items():
            # No site in the tag: the server writes each site as its own run, so one chart per measure
            # overlays every site (and the federation's "global" run), the run names as the legend.
            self.writer.add_scalar(f"val/{k}", float(v), global_step=step)

    def _local_pictures(self, step: int) -> None:
        if self.local is None:
            return
        # Patient pixels: this writer is the site's own logdir; nothing here is sent.
        write_case_pictures(self.local, self.trainer.overlays(), step)

    def handle(self, model: Any) -> Any:
        """One task: returns the FLModel to send."""
        self._t_task = time.perf_counter()
        if flare.is_submit_model():
            # Cross-site evaluation asks for this site's own model: its last local weights (FedBN: with its
            # own normalization layers).
            weights = self.local_weights if self.local_weights is not None else self.trainer.state_dict()
            return flare.FLModel(params=weights)

        keep = self.algorithm.keep_on_evaluate(model.params) if flare.is_evaluate() else self.algorithm.local_keys
        self.trainer.load_weights(model.params, keep=keep)
        val, t_val = self._validate_received(model)
        metrics = withhold_small_cohort(
            metric_names(val), val.get("cases", self.trainer.n_val), self.exp.privacy.min_cohort
        )
        meta: dict[str, Any] = {RESULT_META_VAL: _scalars(val)}
        if flare.is_evaluate():
            return self._evaluate(model, val, metrics, meta)
        return self._train(model, val, t_val, metrics, meta)

    def _validate_received(self, model: Any) -> tuple[dict[str, float], float]:
        """Validate the weights just loaded, unless ``fed.validate_every`` skips this training round.

        Args:
            model: the task's FLModel (its round decides the skip).

        Returns:
            The validation metrics (empty when skipped) and the seconds spent.
        """
        t_val = time.perf_counter()
        rnd_of_task = int(model.current_round or 0)
        # fed.validate_every: training rounds in between skip the validation (evaluation tasks never do).
        skip = not flare.is_evaluate() and rnd_of_task % self.exp.fed.validate_every != 0
        val = {} if skip else self.trainer.validate()
        return val, time.perf_counter() - t_val

    def _evaluate(self, model: Any, val: dict[str, float], metrics: dict[str, float], meta: dict[str, Any]) -> Any:
        """An evaluation task (final evaluation, cross-site evaluation): add the test cases' scores, send metrics.

        Args:
            model: the task's FLModel.
            val: the validation metrics of the loaded weights.
            metrics: the metrics to send (updated in place with ``test_*``).
            meta: the result meta (updated in place with the test scalars).

        Returns:
            The FLModel to send: metrics and meta, no weights.
        """
        if self.trainer.n_test:
            # Evaluation tasks (the final evaluation, cross-site evaluation) also score the held-out test
            # cases; they are reported as test_* and never rate a model during training.
            test = self.trainer.test()
            metrics.update(
                withhold_small_cohort(
                    metric_names(test, "test_"),
                    test.get("cases", self.trainer.n_test),
                    self.exp.privacy.min_cohort,
                    prefix="test_",
                )
            )
            meta[RESULT_META_TEST] = _scalars(test)
        if (model.meta or {}).get(TASK_META_FINAL):
            step = int(model.current_round or 0)
            self._log_validation(val, step)
            if self.trainer.n_test:
                for k, v in meta[RESULT_META_TEST].items():
                    self.writer.add_scalar(f"test/{k}", float(v), global_step=step)
            self._local_pictures(step)
        return flare.FLModel(metrics=metrics, meta=meta)

    def _train(
        self, model: Any, val: dict[str, float], t_val: float, metrics: dict[str, float], meta: dict[str, Any]
    ) -> Any:
        """A training task: train the local epochs from the loaded global weights and build the update.

        Args:
            model: the task's FLModel (the global weights, round and total rounds).
            val: the validation metrics of the global weights (empty when skipped).
            t_val: the seconds the validation took.
            metrics: the metrics to send.
            meta: the result meta (updated in place with steps, bytes, times, algorithm extras and privacy).

        Returns:
            The FLModel to send: the update (weights or differences), metrics and meta.
        """
        rnd = int(model.current_round or 0)
        total = int(model.total_rounds or self.exp.fed.num_rounds)
        self._log_validation(val, rnd)
        if val:
            self._local_pictures(rnd)
        global_state = {k: v.detach().clone() if hasattr(v, "detach") else v for k, v in model.params.items()}
        hooks = self.algorithm.start_round(model)
        self.trainer.set_progress(rnd / max(1, total))  # every site follows the same schedule by round
        t_fit = time.perf_counter()
        fit = self.trainer.fit(self.exp.train.local_epochs, hooks=hooks)
        t_fit = time.perf_counter() - t_fit
        extra = self.algorithm.end_round()
        self.writer.add_scalar("train/loss", float(fit["loss"]), global_step=rnd + 1)
        self.local_weights = self.trainer.state_dict()
        update, kind = make_update(
            self.local_weights,
            global_state,
            self.exp.fed.exchange,
            self.exp.fed.update_precision,
            exclude=self.algorithm.local_keys,
        )
        if self.exp.fed.update_precision == "fp16":
            extra = _half_precision(extra)
        nbytes = payload_bytes(update) + sum(payload_bytes(v) for v in extra.values() if isinstance(v, dict))
        progress.info(
            "site %s round %d: %s %.4f, train loss %.4f (validate %.2f s, train %.2f s, update %.2f MB)",
            self.site_name,
            rnd,
            self.trainer.task.main_metric,
            val.get(self.trainer.task.main_metric, float("nan")),
            fit["loss"],
            t_val,
            t_fit,
            nbytes / 1e6,
        )
        meta.update(
            {
                "NUM_STEPS_CURRENT_ROUND": int(fit["steps"]),
                RESULT_META_BYTES: nbytes,
                RESULT_META_ALGO: dict(self.algorithm.stats),
                # "task": the whole handling at the site (loading, validation, training, TensorBoard scalars,
                # building the update), so the server can tell site-side time from transfer and waiting.
                RESULT_META_TIMES: {"validate": t_val, "train": t_fit, "task": time.perf_counter() - self._t_task},
                **extra,
            }
        )
        self._report_privacy(meta, rnd)
        return flare.FLModel(
            params=update, params_type=ParamsType.DIFF if kind == DIFF else ParamsType.FULL, metrics=metrics, meta=meta
        )

    def _report_privacy(self, meta: dict[str, Any], rnd: int) -> None:
        """With DP-SGD, add the privacy spent so far to the result meta, the TensorBoard and the progress log.

        Args:
            meta: the result meta (updated in place under :data:`RESULT_META_DP`).
            rnd: the round just trained.
        """
        spent = self.trainer.privacy_spent()
        if spent is None:
            return
        # Nested under its mechanism, so an update filter's own DP record can sit beside it.
        meta[RESULT_META_DP] = {"dp_sgd": spent}
        self.writer.add_scalar("privacy/epsilon", float(spent["epsilon"]), global_step=rnd + 1)
        progress.info(
            "site %s round %d: DP-SGD epsilon %.3f at delta %g after %d noised steps",
            self.site_name,
            rnd,
            spent["epsilon"],
            spent["delta"],
            spent["steps"],
        )


def run(argv: Sequence[str] | None = None, script_dir: str | Path | None = None) -> None:
    """Run the client loop until the server ends the job.

    Args:
        argv: script arguments (default ``sys.argv[1:]``).
        script_dir: folder of the job's client script (where the experiment
            YAML is shipped).
    """
    args = _parse(sys.argv[1:] if argv is None else argv)
    here = Path(script_dir) if script_dir else Path(__file__).parent
    exp = cfgmod.load(cfgmod.ExperimentConfig, _resolve(args.config, here))
    site_cfg_path = args.site_config or os.environ.get(SITE_CONFIG_ENV)
    if not site_cfg_path:
        raise cfgmod.ConfigError(
            f"no site config: expected --site-config PATH in the job's script args or the environment "
            f"variable {SITE_CONFIG_ENV} naming this site's YAML (see configs/sites/site.yaml)"
        )
    site = cfgmod.load_site_config(site_cfg_path)
    exp = cfgmod.at_site(exp, site)  # this machine's cache, workers, AMP and sliding-window batch

    ctx = flare.init()
    fast_result_polling(ctx)
    runner = SiteRunner(exp, site, flare.get_site_name(), args.sites_sharing_cpu)
    while flare.is_running():
        model = flare.receive()
        if model is None:
            break
        flare.send(runner.handle(model))
    if runner.local is not None:
        runner.local.close()
