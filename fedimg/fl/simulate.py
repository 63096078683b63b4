"""Run a recipe in NVFlare's simulator and collect (and check) what it produced.

NVFlare can exit normally after a client failed in evaluation; so a run is
judged by its outputs: the global model exists, every site's error log is
empty, every round has a record, and every site evaluated the final global
model.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedimg import signals
from fedimg.config import ExperimentConfig, validate_site_name
from fedimg.errors import UserError
from fedimg.fl.recipe import build_recipe, in_staging, simulator_gpu_config, stage_weights

logger = logging.getLogger(__name__)

GLOBAL_MODEL = "FL_global_model.pt"
BEST_MODEL = "best_FL_global_model.pt"
SRV_GLOBAL = "SRV_" + GLOBAL_MODEL
SRV_BEST = "SRV_" + BEST_MODEL


class FederatedRunError(UserError, RuntimeError):
    """The federated run failed or produced incomplete results."""


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@dataclass
class SimulationResult:
    """Paths and results of a federated run (simulator workspace or a downloaded job).

    Attributes:
        job_dir: the run's workspace folder.
        run_dir: the server's run folder (``app_server/``, ``tb_events/``, ``fedimg/`` ...).
        global_model, best_model: checkpoints (``torch.load(p)["model"]``).
        cross_site: NVFlare's ``cross_val_results.json``.
        tb_logdir: TensorBoard folder: one run per site plus ``global``.
        cross_site_results: evaluating site -> model -> metrics.
        rounds: the controller's per-round records (``fedimg/rounds.jsonl``).
        global_metrics: the federation's validation per step (``fedimg/global_metrics.jsonl``).
        summary: the controller's ``fedimg/summary.json``.
        seconds: wall time of the run, start-up included.
        packages: ``best`` / ``final`` -> model package folder (``job_dir/packages/...``).
    """

    job_dir: Path
    run_dir: Path
    global_model: Path
    best_model: Path
    cross_site: Path
    tb_logdir: Path
    cross_site_results: dict
    rounds: list[dict[str, Any]] = field(default_factory=list)
    global_metrics: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)
    packages: dict[str, str] = field(default_factory=dict)

    def final_metric(self, site: str, metric: str) -> float | None:
        """``metric`` of the final global model on ``site``'s validation cases (cross-site evaluation)."""
        return self.cross_site_results.get(site, {}).get(SRV_GLOBAL, {}).get(metric)

    def final_dice(self, site: str) -> float | None:
        """Dice of the final global model on ``site``'s validation cases."""
        return self.final_metric(site, "val_dice")

    def final_eval(self) -> dict[str, Any] | None:
        """The final global model's validation record (every site, and their case-weighted mean)."""
        finals = [row for row in self.global_metrics if row.get("final_eval")]
        return finals[-1] if finals else None


def collect(
    job_dir: Path,
    sites: list[str],
    require_cross_site: bool = True,
    run_dir: Path | None = None,
    log_dirs: dict[str, Path] | None = None,
    require_records: bool = True,
    require_evaluation: bool = False,
) -> SimulationResult:
    """Read a finished workspace and check it is complete.

    Args:
        job_dir: the simulator's ``workspace/<name>`` folder (or a downloaded job's folder).
        sites: the participating sites.
        require_cross_site: every site must have scored the final global model.
        run_dir: the server's run folder, when it is not ``job_dir/server/simulate_job``
            (a job downloaded from a POC or production server: ``<download>/<job_id>/workspace``).
        log_dirs: participant -> folder holding its ``error_log.txt`` (default
            ``job_dir/<participant>``, the simulator's layout).
        require_records: fedimg's controller wrote its round records and
            summary (False for the HE job, whose workflow is NVFlare's).
        require_evaluation: an evaluation-only job wrote ``fedimg/evaluation.json``
            with every site's scores.

    Raises:
        FederatedRunError: a missing model, a non-empty error log, no round
            record, or a site missing from the cross-site results. The message
            names the files to read.
    """
    for site in sites:
        validate_site_name(site)  # each names a folder under job_dir
    server = run_dir or job_dir / "server" / "simulate_job"
    errors = []
    folders = log_dirs or {p: job_dir / p for p in ["server", *sites]}
    for _participant, folder in folders.items():
        log = folder / "error_log.txt"
        if log.is_file() and log.stat().st_size > 0:
            errors.append(str(log))
    gm = server / "app_server" / GLOBAL_MODEL
    bm = server / "app_server" / BEST_MODEL
    cs = server / "cross_site_val" / "cross_val_results.json"
    results = json.loads(cs.read_text()) if cs.is_file() else {}
    rounds = _jsonl(server / "fedimg" / "rounds.jsonl")
    summary_path = server / "fedimg" / "summary.json"
    problems = []
    if not gm.is_file():
        problems.append(f"no global model at {gm}")
    if require_records and not rounds:
        problems.append(f"no round records at {server / 'fedimg' / 'rounds.jsonl'}")
    if require_records and not summary_path.is_file():
        problems.append(f"the workflow did not finish (no {summary_path})")
    if require_evaluation:
        ev = server / "fedimg" / "evaluation.json"
        scored = set((json.loads(ev.read_text()).get("sites") or {}) if ev.is_file() else ())
        if set(sites) - scored:
            problems.append(f"sites {sorted(set(sites) - scored)} did not score the model ({ev})")
    if require_cross_site:
        missing = [s for s in sites if SRV_GLOBAL not in results.get(s, {})]
        if missing:
            problems.append(f"sites {missing} did not evaluate the final global model ({cs})")
    if errors:
        problems.append("error logs are not empty: " + ", ".join(errors))
    if problems:
        raise FederatedRunError("federated run incomplete: " + "; ".join(problems))
    return SimulationResult(
        job_dir=job_dir,
        run_dir=server,
        global_model=gm,
        best_model=bm,
        cross_site=cs,
        tb_logdir=server / "tb_events",
        cross_site_results=results,
        rounds=rounds,
        global_metrics=_jsonl(server / "fedimg" / "global_metrics.jsonl"),
        summary=json.loads(summary_path.read_text()) if summary_path.is_file() else {},
        errors=errors,
    )


def quiet_log_config(path: Path) -> str:
    """NVFlare log config: full log files, a console that shows warnings and fedimg's progress only.

    The simulator otherwise prints every task hand-off; the files (``log.txt``,
    ``error_log.txt``) keep everything.
    """
    import copy

    from nvflare.fuel.utils.log_utils import default_log_dict

    cfg = copy.deepcopy(default_log_dict)
    cfg["handlers"]["consoleHandler"]["level"] = "WARNING"
    cfg["filters"]["RoutineNotices"] = {"()": "fedimg.fl.console.RoutineNotices"}
    console = cfg["handlers"]["consoleHandler"]
    console["filters"] = [*console.get("filters", []), "RoutineNotices"]
    cfg["filters"]["FedimgOnly"] = {"name": "fedimg.progress"}  # logging.Filter: fedimg's progress lines only
    cfg["formatters"]["fedimgFormatter"] = {"format": "%(asctime)s %(message)s", "datefmt": "%H:%M:%S"}
    cfg["handlers"]["fedimgConsole"] = {
        "class": "logging.StreamHandler",
        "level": "INFO",
        "formatter": "fedimgFormatter",
        "filters": ["FedimgOnly"],
        "stream": "ext://sys.stdout",
    }
    cfg["loggers"]["root"]["handlers"].append("fedimgConsole")
    # Passed as a file: the simulator forwards a JSON string through a command line.
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg, indent=1))
    return str(path)


def run_simulation(
    exp: ExperimentConfig,
    job_dir: str | Path,
    site_configs: dict[str, str],
    workspace: str | Path,
    initial_ckpt: str | None = None,
    resume_from: SimulationResult | None = None,
    customize: Callable[[Any], None] | None = None,
    evaluate: Any | None = None,
) -> SimulationResult:
    """Build the experiment's recipe and run it in ``SimEnv``, one process per site.

    Args:
        exp: the experiment.
        job_dir: folder holding the job's ``client.py``.
        site_configs: site name -> site YAML path.
        workspace: simulator workspace root; the run lands in ``workspace/<exp.name>``.
            Reusing a workspace replaces the run in it.
        initial_ckpt: warm start from these weights (round numbering restarts at 0).
        resume_from: continue this earlier run: start from its final global
            model, continue its round numbering and its best-model record, and
            carry its TensorBoard events over so every curve continues.
            ``exp.fed.num_rounds`` more rounds are run.
        customize: called with the built recipe before it runs (e.g. to add
            a fault-injection filter to one site, :mod:`fedimg.fl.faults`).
        evaluate: a state dict to evaluate instead of training: every site
            scores it once on its validation (and test) cases; the server
            writes ``fedimg/evaluation.{json,md}`` (see :func:`fedimg.fl.launch.evaluate`).

    Raises:
        FederatedRunError: the run failed or its outputs are incomplete.
    """
    from fedimg.fl.simenv import InProcessSimEnv

    workspace = Path(workspace).resolve()
    if resume_from is not None:
        if initial_ckpt is not None:
            raise ValueError("pass either initial_ckpt or resume_from, not both")
        if resume_from.job_dir.resolve() == (workspace / exp.name).resolve():
            raise ValueError(f"resume into a new workspace: {workspace} holds the run being resumed")
        initial_ckpt = str(resume_from.global_model.resolve())
    staging = workspace / "job_staging"
    sites = list(site_configs)
    mode = "train"
    if evaluate is not None:
        initial_ckpt, mode = stage_weights(evaluate, staging), "evaluate"
    for attempt in (1, 2):
        recipe = build_recipe(
            exp,
            job_dir,
            site_configs,
            staging,
            sites_sharing_cpu=len(sites),
            initial_ckpt=initial_ckpt,
            start_round=-1 if resume_from is not None else 0,
            fast_polling=True,
            mode=mode,
        )
        if customize is not None:
            with in_staging(staging):
                customize(recipe)
        env = InProcessSimEnv(
            clients=sites,
            num_clients=len(sites),
            num_threads=len(sites),
            workspace_root=str(workspace),
            gpu_config=simulator_gpu_config(len(sites)),
            log_config=quiet_log_config(workspace / "log_config.json"),
        )
        t0 = time.perf_counter()
        try:
            try:
                with in_staging(staging):
                    run = recipe.execute(env)
            except RuntimeError as exc:
                # NVFlare's simulator handles Ctrl-C/SIGTERM itself (it kills its site processes and fails the
                # run): a run asked to stop is an interruption, not a failed run.
                signals.check()
                raise FederatedRunError(
                    f"NVFlare simulator failed ({exc}); see the error_log.txt files under {workspace / exp.name}"
                ) from None
            job = Path(run.get_result()) if run is not None else workspace / exp.name
            result = collect(
                job,
                sites,
                require_cross_site=exp.fed.cross_site_eval and mode == "train",
                require_records=mode == "train",
                require_evaluation=mode == "evaluate",
            )
            break
        except FederatedRunError:
            signals.check()
            site = lost_port_race(workspace / exp.name, sites)
            if site is None or attempt == 2:
                raise
            logger.warning(
                "NVFlare's simulator could not start %s's process: the local port it had chosen was "
                "taken by another process before it bound it (a race inside NVFlare, likely when "
                "several runs share the machine); running the job again from the start",
                site,
            )
    result.seconds = time.perf_counter() - t0
    if resume_from is not None:
        carry_tensorboard(resume_from.tb_logdir, result.tb_logdir)
    if mode == "train":
        result.packages = write_packages(result, exp, site_configs)
    return result


def _rated(rows: list[dict[str, Any]], key: str, how: str) -> dict[str, Any]:
    """What a model was chosen on, from one ``global_metrics.jsonl`` record (case-weighted over the sites)."""
    weights = rows[0].get("weights") or {}
    return {
        "metric": key,
        "value": (rows[0].get("global") or {}).get(key),
        "cases": int(sum(weights.values())),
        "metrics": rows[0].get("global") or {},
        "per_site": rows[0].get("sites") or {},
        "on": f"{how}; every site's validation cases, case-weighted mean",
    }


def write_packages(
    result: SimulationResult, exp: ExperimentConfig, site_configs: dict[str, str], spec: Any | None = None
) -> dict[str, str]:
    """The run's best and final global models as model packages in ``job_dir/packages/{best,final}``.

    The best model is described by the validation record that chose it, the
    final one by its final evaluation (``fed.final_eval``). The spec is the
    one the sites' training data was preprocessed with (``spec``, a
    :class:`fedimg.config.PreprocessSpec`, when given: a production run has no
    site data here). A run without server models writes none; a problem with
    one package is logged, never fails the run.
    """
    import torch

    from fedimg import config as cfgmod
    from fedimg.models.package import package_run_model

    found = {
        name: Path(path)
        for name, path in (
            ("best", getattr(result, "best_model", None)),
            ("final", getattr(result, "global_model", None)),
        )
        if path is not None and Path(path).is_file()
    }
    if not found:
        return {}
    try:
        datalists = {s: cfgmod.load_site_config(p).datalist for s, p in site_configs.items()}
    except cfgmod.ConfigError as exc:
        logger.warning("no model packages written: a site config cannot be read (%s)", exc)
        return {}
    key = exp.key_metric
    best = result.summary.get("best") or {}
    chose_best = [
        r
        for r in result.global_metrics
        if r.get("step") == best.get("round") and (r.get("global") or {}).get(key) == best.get("value")
    ]
    final = result.final_eval()
    chosen = {
        "best": _rated(chose_best[-1:], key, f"the best {key} of the run, at step {best.get('round')}")
        if chose_best
        else {},
        "final": _rated([final], key, "the final evaluation after the last round") if final else {},
    }
    where = {"best": best.get("round"), "final": result.summary.get("end_round")}
    written = {}
    for name, path in found.items():
        state = torch.load(path, map_location="cpu", weights_only=True)["model"]
        out = package_run_model(
            result.job_dir / "packages" / name,
            state,
            exp,
            datalists,
            chosen[name],
            {"run": "federated", "algorithm": exp.fed.algorithm, "model": name, "round": where[name]},
            spec=spec,
        )
        if out is not None:
            written[name] = str(out)
    return written


def lost_port_race(job: Path, sites: list[str]) -> str | None:
    """The site whose simulator process failed to bind the port NVFlare had chosen for it, if any.

    NVFlare's simulator picks a free local port for each site's process and
    releases it; the process binds it seconds later, after its imports. Another
    process can take the port meanwhile: that run fails through no fault of
    the job, and running it again is safe (the workspace is replaced).
    """
    for site in sites:
        log = job / site / "error_log.txt"
        text = log.read_text(encoding="utf-8", errors="replace") if log.is_file() else ""
        if "Address already in use" in text and "simulator_worker" in text:
            return site
    return None


def carry_tensorboard(previous: Path, current: Path) -> None:
    """Copy an earlier run's event files into the resumed run's folders (one curve per site continues)."""
    for src in previous.glob("*/events.out.tfevents.*"):
        dst = current / src.parent.name / f"{src.name}.before_resume"
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.exists():
            # Named as TensorBoard event files still (prefix kept), read before the newer ones.
            shutil.copy2(src, dst)
