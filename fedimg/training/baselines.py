"""Baselines on the same loops and splits as the federation: local-only and centralized (pooled).

A federated run trains ``fed.num_rounds x train.local_epochs`` epochs at each
site. The baselines train the same number of epochs:

* **local-only**: each site alone on its own training cases;
* **centralized**: one model on the pooled training cases of every site (what
  a single hospital holding all the data would do; the upper reference).

Each final model is scored on every site's own validation cases, the same
cases the federated model is scored on. Pooling here is a simulation-time
baseline on one machine: in a real federation the data never moves.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from fedimg.config import ExperimentConfig
from fedimg.data.datasets import check_matches_task, read_datalist
from fedimg.runtime import Runtime
from fedimg.training.checkpoint import save_checkpoint
from fedimg.training.tracking import local_writer
from fedimg.training.trainer import SiteTrainer

logger = logging.getLogger(__name__)


@dataclass
class BaselineResult:
    """One baseline model's scores.

    Attributes:
        name: ``local:<site>`` or ``centralized``.
        trained_on: sites whose training cases were used.
        epochs: epochs trained.
        per_site: site -> validation metrics of the final model on that site's cases.
        per_site_test: site -> metrics on that site's held-out test cases (sites with a test split).
        model_path: the final model's checkpoint.
        package: the final model as a model package folder (None if it could not be written).
        seconds: wall time of training and evaluation.
        history: per-epoch training loss (and ``privacy_epsilon`` with DP-SGD).
        privacy: DP-SGD's privacy spent over the run (None without ``privacy.dp_sgd``).
    """

    name: str
    trained_on: list[str]
    epochs: int
    per_site: dict[str, dict[str, float]]
    model_path: str
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)
    privacy: dict[str, Any] | None = None
    per_site_test: dict[str, dict[str, float]] = field(default_factory=dict)
    package: str | None = None


def federated_epochs(exp: ExperimentConfig) -> int:
    """Epochs a site trains in the federated run: the baselines train as many."""
    return exp.fed.num_rounds * exp.train.local_epochs


def _train(
    exp: ExperimentConfig,
    name: str,
    train_items: list[dict[str, Any]],
    eval_sets: dict[str, list[dict[str, Any]]],
    trained_on: list[str],
    rt: Runtime,
    out_dir: Path,
    epochs: int,
    progress: bool,
    test_sets: dict[str, list[dict[str, Any]]] | None = None,
    datalists: dict[str, str] | None = None,
) -> BaselineResult:
    t0 = time.perf_counter()
    # Scored once at the end, on every site's cases: no per-epoch validation loader is needed.
    trainer = SiteTrainer(exp, train_items, [], rt)
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = local_writer(out_dir / "tb" / name)  # a run named after the baseline, tags shared with the others
    history = []
    metric = trainer.task.main_metric
    for epoch in tqdm(range(1, epochs + 1), desc=f"{name}: train", unit="epoch", disable=not progress):
        trainer.set_progress((epoch - 1) / epochs)
        fit = trainer.fit(1)
        row = {"epoch": float(epoch), "train_loss": fit["loss"]}
        writer.add_scalar("train/loss", fit["loss"], epoch)
        spent = trainer.privacy_spent()
        if spent is not None:  # DP-SGD: the same mechanism as the federated sites, accounted the same way
            row["privacy_epsilon"] = spent["epsilon"]
            writer.add_scalar("privacy/epsilon", spent["epsilon"], epoch)
        history.append(row)
    # Final model on every site's validation cases.
    per_site = {}
    for site, items in eval_sets.items():
        if not items:
            continue
        per_site[site] = trainer.evaluate(trainer.eval_loader(items))
        if metric in per_site[site]:
            writer.add_scalar(f"val_on/{site}/{metric}", per_site[site][metric], epochs)
    # Held-out test cases: scored once, reported apart, never used to choose anything.
    per_site_test = {
        site: trainer.evaluate(trainer.eval_loader(items)) for site, items in (test_sets or {}).items() if items
    }
    writer.close()
    model_path = out_dir / "final_model.pt"
    save_checkpoint(model_path, trainer.model, {"baseline": name, "epochs": epochs})
    package = _package(
        exp, name, trainer, per_site, out_dir, epochs, {s: datalists[s] for s in trained_on} if datalists else {}
    )
    res = BaselineResult(
        name=name,
        trained_on=trained_on,
        epochs=epochs,
        per_site=per_site,
        model_path=str(model_path),
        seconds=time.perf_counter() - t0,
        history=history,
        privacy=trainer.privacy_spent(),
        per_site_test=per_site_test,
        package=package,
    )
    (out_dir / "result.json").write_text(json.dumps(res.__dict__, indent=1))
    return res


def _package(
    exp: ExperimentConfig,
    name: str,
    trainer: SiteTrainer,
    per_site: dict[str, dict[str, float]],
    out_dir: Path,
    epochs: int,
    datalists: dict[str, str],
) -> str | None:
    """The final model as a model package; chosen on its case-weighted validation metrics over every site."""
    from fedimg.models.package import package_run_model

    metric = trainer.task.main_metric
    cases = {s: float(m.get("cases", 0)) for s, m in per_site.items() if metric in m}
    total = sum(cases.values())
    value = sum(per_site[s][metric] * n for s, n in cases.items()) / total if total else None
    chosen = {
        "metric": metric,
        "value": value,
        "cases": int(total),
        "metrics": per_site,
        "on": "the final model on every site's validation cases (case-weighted mean)",
    }
    path = package_run_model(
        out_dir / "package",
        trainer.state_dict(),
        exp,
        datalists,
        chosen,
        {"run": name, "model": "final", "epochs": epochs, "trained_on": sorted(datalists)},
    )
    return None if path is None else str(path)


def score_model(
    exp: ExperimentConfig, checkpoint: str | Path, eval_sets: dict[str, list[dict[str, Any]]], rt: Runtime
) -> dict[str, dict[str, float]]:
    """Score a saved model (``{"model": state_dict}``, loaded with ``weights_only``) on each site's items.

    Used for the held-out test cases of a federated run in ``fedimg compare``: the same evaluation code as the
    baselines, on the same machine (a simulation-time report).
    """
    import torch

    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    trainer = SiteTrainer(exp, [], [], rt)
    trainer.load_weights(saved["model"] if isinstance(saved, dict) and "model" in saved else saved)
    return {site: trainer.evaluate(trainer.eval_loader(items)) for site, items in eval_sets.items() if items}


def read_site_data(exp: ExperimentConfig, datalists: dict[str, str]) -> dict[str, Any]:
    """Every site's datalist, resolved (``data.fold`` applied) and checked against the experiment's task."""
    return _read(exp, datalists)


def _read(exp: ExperimentConfig, datalists: dict[str, str]) -> dict[str, Any]:
    out = {}
    for site, path in datalists.items():
        dl = read_datalist(path, fold=exp.data.fold)
        check_matches_task(dl, exp.task, f"{site}: datalist {path}")
        out[site] = dl
    return out


def local_only(
    exp: ExperimentConfig,
    datalists: dict[str, str],
    rt: Runtime,
    out_dir: str | Path,
    epochs: int | None = None,
    progress: bool = False,
) -> dict[str, BaselineResult]:
    """Train one model per site on that site alone; score each on every site's validation cases.

    Args:
        datalists: site -> ``datalist.json``.
        epochs: default :func:`federated_epochs`.
    """
    epochs = epochs or federated_epochs(exp)
    dls = _read(exp, datalists)
    eval_sets = {s: dl.validation for s, dl in dls.items()}
    test_sets = {s: dl.test for s, dl in dls.items()}
    results = {}
    for site, dl in dls.items():
        results[site] = _train(
            exp,
            f"local-{site}",
            dl.training,
            eval_sets,
            [site],
            rt,
            Path(out_dir) / f"local-{site}",
            epochs,
            progress,
            test_sets=test_sets,
            datalists=datalists,
        )
        logger.info("local-only %s: trained %d epochs in %.0f s", site, epochs, results[site].seconds)
    return results


def centralized(
    exp: ExperimentConfig,
    datalists: dict[str, str],
    rt: Runtime,
    out_dir: str | Path,
    epochs: int | None = None,
    progress: bool = False,
) -> BaselineResult:
    """Train one model on the pooled training cases of every site; score it on each site's validation cases."""
    epochs = epochs or federated_epochs(exp)
    dls = _read(exp, datalists)
    pooled = [item for dl in dls.values() for item in dl.training]
    eval_sets = {s: dl.validation for s, dl in dls.items()}
    return _train(
        exp,
        "centralized",
        pooled,
        eval_sets,
        list(dls),
        rt,
        Path(out_dir) / "centralized",
        epochs,
        progress,
        test_sets={s: dl.test for s, dl in dls.items()},
        datalists=datalists,
    )
