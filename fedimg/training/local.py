"""Local-only training of one site, without NVFlare (``fedimg train-local``)."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from fedimg import config as cfgmod
from fedimg import runtime
from fedimg.config import ExperimentConfig, SiteConfig
from fedimg.tasks import curve_metrics
from fedimg.training.checkpoint import save_checkpoint
from fedimg.training.tracking import local_writer, write_case_pictures
from fedimg.training.trainer import SiteTrainer

logger = logging.getLogger(__name__)


@dataclass
class LocalResult:
    """Outcome of a local run."""

    site: str
    epochs: int
    best_score: float
    metric: str
    best_epoch: int
    final: dict[str, float]
    best_model: str
    last_model: str
    logdir: str
    seconds: float
    privacy: dict | None = None  # DP-SGD's privacy spent over the run (None without privacy.dp_sgd)
    packages: dict[str, str] = field(default_factory=dict)  # "best"/"final" -> model package folder


def train_local(exp: ExperimentConfig, site: SiteConfig, out_dir: str | Path, progress: bool = True) -> LocalResult:
    """Train ``exp.train.epochs`` epochs on one site and keep the best model by the task's main metric.

    With ``privacy.dp_sgd.enabled`` training is DP-SGD; the epsilon spent is
    in every ``metrics.jsonl`` row (``privacy_epsilon``), in TensorBoard
    (``privacy/epsilon``) and in the result.

    Writes ``out_dir/{best_model.pt,last_model.pt,metrics.jsonl,config.yaml,site.yaml}``,
    TensorBoard events under ``out_dir/tb/<site>`` (one run named after the
    site, tags ``train/loss``, ``val/<metric>``: the same tags as a federated
    run's, so the runs overlay) and the best and last models as model packages
    in ``out_dir/packages/{best,final}`` (:mod:`fedimg.models.package`).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfgmod.save(exp, out / "config.yaml")
    exp = cfgmod.at_site(exp, site)  # this machine's own resource settings
    rt = runtime.setup(site.device, exp.train.amp, site.num_threads, seed=exp.train.seed)
    t0 = time.perf_counter()
    trainer = SiteTrainer.from_datalist(exp, site.datalist, rt, progress=progress)
    writer = local_writer(out / "tb" / site.name)
    best, best_epoch, last_val, best_val = -math.inf, 0, {}, {}
    metrics_path = out / "metrics.jsonl"
    metrics_path.write_text("")
    bar = tqdm(range(1, exp.train.epochs + 1), desc=f"{site.name}: train", unit="epoch", disable=not progress)
    for epoch in bar:
        trainer.set_progress((epoch - 1) / exp.train.epochs)
        fit = trainer.fit(1)
        writer.add_scalar("train/loss", fit["loss"], epoch)
        val = trainer.validate()
        last_val = val
        row = {"epoch": epoch, "train_loss": fit["loss"], **{f"val_{k}": v for k, v in val.items()}}
        spent = trainer.privacy_spent()
        if spent is not None:
            row["privacy_epsilon"] = spent["epsilon"]
            writer.add_scalar("privacy/epsilon", spent["epsilon"], epoch)
        with metrics_path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        for k, v in curve_metrics(val).items():
            writer.add_scalar(f"val/{k}", v, epoch)
        score = val.get(trainer.task.main_metric, -fit["loss"])
        if score > best:
            best, best_epoch, best_val = score, epoch, val
            save_checkpoint(out / "best_model.pt", trainer.model, {"epoch": epoch, trainer.task.main_metric: score})
        bar.set_postfix(loss=f"{fit['loss']:.3f}", score=f"{val.get(trainer.task.main_metric, float('nan')):.3f}")
    save_checkpoint(out / "last_model.pt", trainer.model, {"epoch": exp.train.epochs})
    write_case_pictures(writer, trainer.overlays(), exp.train.epochs)
    writer.close()
    packages = _write_packages(exp, site, out, trainer, best_val, best_epoch, last_val)
    return LocalResult(
        site=site.name,
        epochs=exp.train.epochs,
        best_score=best,
        metric=trainer.task.main_metric,
        best_epoch=best_epoch,
        final=last_val,
        best_model=str(out / "best_model.pt"),
        last_model=str(out / "last_model.pt"),
        logdir=str(out / "tb"),
        seconds=time.perf_counter() - t0,
        privacy=trainer.privacy_spent(),
        packages=packages,
    )


def _write_packages(
    exp: ExperimentConfig,
    site: SiteConfig,
    out: Path,
    trainer: SiteTrainer,
    best_val: dict[str, float],
    best_epoch: int,
    last_val: dict[str, float],
) -> dict[str, str]:
    """The best and the last model as model packages, with the validation metrics each was chosen on."""
    from fedimg.models.package import package_run_model
    from fedimg.training.checkpoint import load_state_dict

    metric = trainer.task.main_metric
    written = {}
    models = {
        "best": (
            load_state_dict(out / "best_model.pt") if (out / "best_model.pt").is_file() else None,
            best_val,
            best_epoch,
        ),
        "final": (trainer.state_dict(), last_val, exp.train.epochs),
    }
    for name, (state, val, epoch) in models.items():
        if state is None:
            continue
        chosen = {
            "metric": metric,
            "value": val.get(metric),
            "cases": int(val.get("cases", 0)),
            "metrics": val,
            "on": f"validation cases of {site.name}",
        }
        path = package_run_model(
            out / "packages" / name,
            state,
            exp,
            {site.name: site.datalist},
            chosen,
            {"run": "local", "site": site.name, "model": name, "epoch": epoch},
        )
        if path is not None:
            written[name] = str(path)
    return written
