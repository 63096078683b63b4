"""Train and evaluate loops shared by local, centralized and federated training.

Pure PyTorch/MONAI: no NVFlare import. The federated client calls exactly
these functions, so a site's local epoch inside NVFlare is the same code as a
local-only baseline epoch.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Callable, Iterable, Sequence

import torch

from fedimg.runtime import Runtime
from fedimg.tasks.segmentation import DiceAccumulator, predict, remove_small_components

logger = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training diverged or could not run."""


def train_epoch(
    model: torch.nn.Module,
    loader: Iterable[dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    loss_fn: torch.nn.Module,
    rt: Runtime,
    scaler: torch.amp.GradScaler | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> dict[str, float]:
    """One pass over ``loader``.

    Args:
        on_step: called with (step index within the epoch, loss) after each step.

    Returns:
        ``{"loss": mean loss, "steps": n, "seconds": wall time}``.

    Raises:
        TrainingError: the loss became NaN or infinite.
    """
    model.train()
    scaler = scaler or rt.grad_scaler()
    total, steps = 0.0, 0
    t0 = time.perf_counter()
    for batch in loader:
        image = batch["image"].to(rt.device, non_blocking=True)
        label = batch["label"].to(rt.device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with rt.autocast():
            loss = loss_fn(model(image), label)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise TrainingError(f"loss is {value} at step {steps}; lower optim.lr or check the inputs")
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        total += value
        steps += 1
        if on_step is not None:
            on_step(steps - 1, value)
    if steps == 0:
        raise TrainingError("the training loader yielded no batch; the site has no training cases")
    return {"loss": total / steps, "steps": float(steps), "seconds": time.perf_counter() - t0}


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader: Iterable[dict[str, torch.Tensor]],
    rt: Runtime,
    class_names: Sequence[str],
    roi_size: Sequence[int],
    sw_batch_size: int = 2,
    min_component_voxels: int = 0,
) -> dict[str, float]:
    """Per-class Dice of ``model`` on whole volumes (after small-component removal).

    Returns:
        ``{"dice_mean": x, "dice/<class>": y, "cases": n}``; empty if the loader is empty.
    """
    model.eval()
    acc = DiceAccumulator(class_names)
    n = 0
    for batch in loader:
        image = batch["image"].to(rt.device)
        label = batch["label"].to(rt.device)
        pred = predict(model, image, roi_size, sw_batch_size, rt.autocast())
        pred = remove_small_components(pred, len(class_names) + 1, min_component_voxels)
        acc.update(pred, label)
        n += image.shape[0]
    if n == 0:
        return {}
    out = acc.result()
    out["cases"] = float(n)
    return out


def build_optimizer(model: torch.nn.Module, name: str, lr: float, weight_decay: float,
                    momentum: float = 0.9) -> torch.optim.Optimizer:
    """Optimizer by name (``adam``, ``adamw``, ``sgd``)."""
    params = model.parameters()
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"optim.name must be adam, adamw or sgd; got {name!r}")
