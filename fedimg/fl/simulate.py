"""Run a recipe in NVFlare's simulator and collect (and check) what it produced.

NVFlare can exit normally after a client failed in evaluation; so a run is
judged by its outputs: the global model exists, every site's error log is
empty, and every site evaluated the final global model.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedimg.config import ExperimentConfig
from fedimg.fl.recipe import build_fedavg_recipe, in_staging, simulator_gpu_config

logger = logging.getLogger(__name__)

GLOBAL_MODEL = "FL_global_model.pt"
BEST_MODEL = "best_FL_global_model.pt"
SRV_GLOBAL = "SRV_" + GLOBAL_MODEL
SRV_BEST = "SRV_" + BEST_MODEL


class FederatedRunError(RuntimeError):
    """The federated run failed or produced incomplete results."""


@dataclass
class SimulationResult:
    """Paths and results of a simulator run."""

    job_dir: Path
    global_model: Path
    best_model: Path
    cross_site: Path
    tb_logdir: Path
    cross_site_results: dict
    seconds: float
    errors: list[str] = field(default_factory=list)

    def final_dice(self, site: str) -> float | None:
        """Dice of the final global model on ``site``'s validation cases."""
        return self.cross_site_results.get(site, {}).get(SRV_GLOBAL, {}).get("val_dice")


def collect(job_dir: Path, sites: list[str], require_cross_site: bool = True) -> SimulationResult:
    """Read a finished simulator workspace and check it is complete.

    Raises:
        FederatedRunError: a missing model, a non-empty error log, or a site
            missing from the cross-site results. The message names the files to read.
    """
    server = job_dir / "server" / "simulate_job"
    errors = []
    for participant in ["server", *sites]:
        log = job_dir / participant / "error_log.txt"
        if log.is_file() and log.stat().st_size > 0:
            errors.append(str(log))
    gm = server / "app_server" / GLOBAL_MODEL
    bm = server / "app_server" / BEST_MODEL
    cs = server / "cross_site_val" / "cross_val_results.json"
    results = json.loads(cs.read_text()) if cs.is_file() else {}
    problems = []
    if not gm.is_file():
        problems.append(f"no global model at {gm}")
    if require_cross_site:
        missing = [s for s in sites if SRV_GLOBAL not in results.get(s, {})]
        if missing:
            problems.append(f"sites {missing} did not evaluate the final global model ({cs})")
    if errors:
        problems.append("error logs are not empty: " + ", ".join(errors))
    if problems:
        raise FederatedRunError("federated run incomplete: " + "; ".join(problems))
    return SimulationResult(job_dir=job_dir, global_model=gm, best_model=bm, cross_site=cs,
                            tb_logdir=server / "tb_events", cross_site_results=results, seconds=0.0,
                            errors=errors)


def quiet_log_config(path: Path) -> str:
    """NVFlare log config: full log files, a console that shows warnings and fedimg's progress only.

    The simulator otherwise prints every task hand-off; the files (``log.txt``,
    ``error_log.txt``) keep everything.
    """
    import copy

    from nvflare.fuel.utils.log_utils import default_log_dict

    cfg = copy.deepcopy(default_log_dict)
    cfg["handlers"]["consoleHandler"]["level"] = "WARNING"
    cfg["filters"]["FedimgOnly"] = {"name": "fedimg"}  # logging.Filter("fedimg"): fedimg.* loggers only
    cfg["formatters"]["fedimgFormatter"] = {"format": "%(asctime)s %(message)s", "datefmt": "%H:%M:%S"}
    cfg["handlers"]["fedimgConsole"] = {"class": "logging.StreamHandler", "level": "INFO",
                                        "formatter": "fedimgFormatter", "filters": ["FedimgOnly"],
                                        "stream": "ext://sys.stdout"}
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
) -> SimulationResult:
    """Build the FedAvg recipe and run it in ``SimEnv``, one process per site.

    Args:
        exp: the experiment.
        job_dir: folder holding the job's ``client.py``.
        site_configs: site name -> site YAML path.
        workspace: simulator workspace root; the run lands in ``workspace/<exp.name>``.
        initial_ckpt: optional warm start.
    """
    from nvflare.recipe import SimEnv

    workspace = Path(workspace).resolve()
    staging = workspace / "job_staging"
    sites = list(site_configs)
    recipe = build_fedavg_recipe(exp, job_dir, site_configs, staging, sites_sharing_cpu=len(sites),
                                 initial_ckpt=initial_ckpt)
    env = SimEnv(clients=sites, num_clients=len(sites), num_threads=len(sites), workspace_root=str(workspace),
                 gpu_config=simulator_gpu_config(len(sites)), log_config=quiet_log_config(workspace / "log_config.json"))
    t0 = time.perf_counter()
    try:
        with in_staging(staging):
            run = recipe.execute(env)
    except RuntimeError as exc:
        raise FederatedRunError(f"NVFlare simulator failed ({exc}); see the error_log.txt files under "
                                f"{workspace / exp.name}") from None
    job = Path(run.get_result()) if run is not None else workspace / exp.name
    result = collect(job, sites, require_cross_site=exp.fed.cross_site_eval)
    result.seconds = time.perf_counter() - t0
    return result
