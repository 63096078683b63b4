"""fedimg's NVFlare Client API loop, run at every site.

Per task received from the server:

* ``train``: load the global weights, validate them on the site's validation
  cases (this rates the global model of the previous round), train
  ``train.local_epochs`` epochs, send the weights with
  ``NUM_STEPS_CURRENT_ROUND`` so FedAvg weights sites by work done.
* ``validate`` (cross-site evaluation): load the weights, send Dice only.
* ``submit_model``: send this site's own last locally-trained weights.

Only scalar metrics are streamed to the server's TensorBoard, with the round
number as the step, so curves of all sites line up. Nothing in a metric name or
value identifies a patient.

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
from pathlib import Path
from typing import Sequence

import nvflare.client as flare
from nvflare.client.tracking import SummaryWriter

from fedimg import config as cfgmod
from fedimg import runtime
from fedimg.training.trainer import SiteTrainer

logger = logging.getLogger(__name__)

SITE_CONFIG_ENV = "FEDIMG_SITE_CONFIG"


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fedimg-client")
    p.add_argument("--config", default="experiment.yaml",
                   help="experiment YAML shipped with the job (relative to this script's folder)")
    p.add_argument("--site-config", default=None, help=f"site YAML; default: ${SITE_CONFIG_ENV}")
    p.add_argument("--sites-sharing-cpu", type=int, default=1,
                   help="training processes on this machine (simulator), for thread sizing")
    return p.parse_args(list(argv))


def _resolve(path: str, script_dir: Path) -> Path:
    p = Path(path)
    if p.is_absolute():
        return p
    for base in (script_dir, Path.cwd()):
        if (base / p).is_file():
            return base / p
    return script_dir / p


def _metric_dict(val: dict[str, float]) -> dict[str, float]:
    """Validation results as flat FLModel metrics (``val_dice``, ``val_dice_<class>``)."""
    out = {}
    if "dice_mean" in val:
        out["val_dice"] = float(val["dice_mean"])
    for k, v in val.items():
        if k.startswith("dice/"):
            out["val_dice_" + k.split("/", 1)[1]] = float(v)
    return out


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
            f"variable {SITE_CONFIG_ENV} naming this site's YAML (see configs/sites/site.yaml)")
    site = cfgmod.load_site_config(site_cfg_path)

    flare.init()
    site_name = flare.get_site_name()
    rt = runtime.setup(site.device, exp.train.amp, site.num_threads, seed=exp.train.seed,
                       workers_sharing_cpu=args.sites_sharing_cpu)
    trainer = SiteTrainer(exp, site.datalist, rt)
    logger.info("site %s: %d training / %d validation cases on %s", site_name, trainer.n_train, trainer.n_val,
                rt.device)
    writer = SummaryWriter()
    local_weights = None

    while flare.is_running():
        model = flare.receive()
        if model is None:
            break
        if flare.is_submit_model():
            # Cross-site evaluation asks for this site's own model: its last local weights.
            weights = local_weights if local_weights is not None else trainer.state_dict()
            flare.send(flare.FLModel(params=weights))
            continue

        trainer.load_weights(model.params)
        t_val = time.perf_counter()
        val = trainer.validate()
        t_val = time.perf_counter() - t_val
        metrics = _metric_dict(val)

        if flare.is_evaluate():
            flare.send(flare.FLModel(metrics=metrics))
            continue

        rnd = int(model.current_round or 0)
        # Step = rounds of aggregation the evaluated model has seen: identical across sites.
        for k, v in val.items():
            if k.startswith("dice"):
                writer.add_scalar(f"val/{k}", float(v), global_step=rnd)
        total = int(model.total_rounds or exp.fed.num_rounds)
        trainer.set_progress(rnd / max(1, total))  # every site follows the same schedule by round
        t_fit = time.perf_counter()
        fit = trainer.fit(exp.train.local_epochs)
        t_fit = time.perf_counter() - t_fit
        writer.add_scalar("train/loss", float(fit["loss"]), global_step=rnd + 1)
        local_weights = trainer.state_dict()
        logger.info("site %s round %d: val dice %.4f, train loss %.4f (validate %.2f s, train %.2f s)", site_name,
                    rnd, metrics.get("val_dice", float("nan")), fit["loss"], t_val, t_fit)
        flare.send(flare.FLModel(params=local_weights, metrics=metrics,
                                 meta={"NUM_STEPS_CURRENT_ROUND": int(fit["steps"])}))
