"""``SiteTrainer``: one site's model, data and optimizer behind a small API.

Local-only training, centralized training and the NVFlare client all drive a
``SiteTrainer``; only who calls :meth:`fit` and where the weights come from
differ.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch

from fedimg.config import ExperimentConfig
from fedimg.data.datasets import make_loaders, read_datalist
from fedimg.models.registry import build_model
from fedimg.runtime import Runtime
from fedimg.tasks.segmentation import build_loss
from fedimg.training.loops import build_optimizer, evaluate, train_epoch

logger = logging.getLogger(__name__)


class SiteTrainer:
    """Train and evaluate one model on one site's datalist.

    Args:
        exp: the experiment config.
        datalist: path to the site's ``datalist.json``.
        rt: the process runtime (device, AMP, threads).
        progress: show a progress bar while caching.
    """

    def __init__(self, exp: ExperimentConfig, datalist: str | Path, rt: Runtime, progress: bool = False) -> None:
        self.exp = exp
        self.rt = rt
        train_items, val_items, raw = read_datalist(datalist)
        self._check_classes(raw)
        self.n_train = len(train_items)
        self.n_val = len(val_items)
        self.train_loader, self.val_loader = make_loaders(train_items, val_items, exp.data, rt.device, exp.task.num_classes,
                                                          progress=progress, seed=exp.train.seed)
        self.model = build_model(exp.model, exp.task).to(rt.device)
        self.optimizer = build_optimizer(self.model, exp.optim.name, exp.optim.lr, exp.optim.weight_decay,
                                         exp.optim.momentum)
        self.loss_fn = build_loss()
        self.scaler = rt.grad_scaler()
        self.steps_done = 0

    def _check_classes(self, raw: dict) -> None:
        labels = raw.get("labels")
        if isinstance(labels, dict):
            names = [labels[k] for k in sorted(labels, key=int) if k != "0"]
            if names != list(self.exp.task.class_names):
                raise ValueError(
                    f"datalist classes {names} do not match task.class_names {list(self.exp.task.class_names)}; "
                    "preprocess with a spec whose labels.classes match the experiment")

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Load (global) weights; shapes must match exactly."""
        self.model.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()}, strict=True)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """CPU copy of the current weights."""
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    def fit(self, epochs: int, on_step: Callable[[int, float], None] | None = None) -> dict[str, float]:
        """Train ``epochs`` epochs; returns mean loss and the number of optimizer steps."""
        losses, steps = [], 0

        def hook(i: int, loss: float) -> None:
            self.steps_done += 1
            if on_step is not None:
                on_step(self.steps_done, loss)

        for _ in range(epochs):
            res = train_epoch(self.model, self.train_loader, self.optimizer, self.loss_fn, self.rt, self.scaler,
                              on_step=hook)
            losses.append(res["loss"])
            steps += int(res["steps"])
        return {"loss": sum(losses) / len(losses), "steps": float(steps)}

    def validate(self) -> dict[str, float]:
        """Dice on the site's validation cases (empty dict if it has none)."""
        if self.val_loader is None:
            return {}
        return evaluate(self.model, self.val_loader, self.rt, self.exp.task.class_names, self.exp.data.roi_size,
                        self.exp.train.sw_batch_size, self.exp.task.min_component_voxels)

    def set_progress(self, progress: float) -> float:
        """Set the learning rate for ``progress`` in [0, 1] of the run (``optim.schedule``)."""
        lr = self.exp.optim.lr_at(progress)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr
