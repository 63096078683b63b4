"""Local-only training of one site, without NVFlare (``fedimg train-local``)."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from fedimg import config as cfgmod
from fedimg import runtime
from fedimg.config import ExperimentConfig, SiteConfig
from fedimg.training.checkpoint import save_checkpoint
from fedimg.training.tracking import local_writer
from fedimg.training.trainer import SiteTrainer

logger = logging.getLogger(__name__)


@dataclass
class LocalResult:
    """Outcome of a local run."""

    site: str
    epochs: int
    best_dice: float
    best_epoch: int
    final: dict[str, float]
    best_model: str
    last_model: str
    logdir: str
    seconds: float


def train_local(exp: ExperimentConfig, site: SiteConfig, out_dir: str | Path, progress: bool = True) -> LocalResult:
    """Train ``exp.train.epochs`` epochs on one site and keep the best model by validation Dice.

    Writes ``out_dir/{best_model.pt,last_model.pt,metrics.jsonl,config.yaml,site.yaml}``
    and TensorBoard events under ``out_dir/tb``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfgmod.save(exp, out / "config.yaml")
    rt = runtime.setup(site.device, exp.train.amp, site.num_threads, seed=exp.train.seed)
    t0 = time.perf_counter()
    trainer = SiteTrainer(exp, site.datalist, rt, progress=progress)
    writer = local_writer(out / "tb")
    best, best_epoch, last_val = -1.0, 0, {}
    metrics_path = out / "metrics.jsonl"
    metrics_path.write_text("")
    bar = tqdm(range(1, exp.train.epochs + 1), desc=f"{site.name}: train", unit="epoch", disable=not progress)
    for epoch in bar:
        trainer.set_progress((epoch - 1) / exp.train.epochs)
        fit = trainer.fit(1, on_step=lambda s, loss: writer.add_scalar(f"{site.name}/train/loss", loss, s))
        val = trainer.validate()
        last_val = val
        row = {"epoch": epoch, "train_loss": fit["loss"], **{f"val_{k}": v for k, v in val.items()}}
        with metrics_path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        for k, v in val.items():
            if k.startswith("dice"):
                writer.add_scalar(f"{site.name}/val/{k}", v, trainer.steps_done)
        score = val.get("dice_mean", -fit["loss"])
        if score > best:
            best, best_epoch = score, epoch
            save_checkpoint(out / "best_model.pt", trainer.model, {"epoch": epoch, "val_dice": score})
        bar.set_postfix(loss=f"{fit['loss']:.3f}", dice=f"{val.get('dice_mean', float('nan')):.3f}")
    save_checkpoint(out / "last_model.pt", trainer.model, {"epoch": exp.train.epochs})
    writer.close()
    return LocalResult(site=site.name, epochs=exp.train.epochs, best_dice=best, best_epoch=best_epoch,
                       final=last_val, best_model=str(out / "best_model.pt"), last_model=str(out / "last_model.pt"),
                       logdir=str(out / "tb"), seconds=time.perf_counter() - t0)
