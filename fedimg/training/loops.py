"""Train and evaluate loops shared by local, centralized and federated training.

Pure PyTorch/MONAI: no NVFlare import. The federated client calls exactly
these functions, so a site's local epoch inside NVFlare is the same code as a
local-only baseline epoch. Federated algorithms change a step only through
:class:`StepHooks` (an extra loss term, a correction after the optimizer step).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from fedimg.runtime import Runtime

logger = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training diverged or could not run."""


@dataclass
class StepHooks:
    """What a federated algorithm adds to a local optimizer step.

    Attributes:
        extra_loss: called with the model after the task loss; its value is
            added to the loss before the backward pass (FedProx's proximal term).
        after_step: called with the model and the current learning rate after
            each optimizer step (SCAFFOLD's control-variate correction).
    """

    extra_loss: Callable[[torch.nn.Module], torch.Tensor] | None = None
    after_step: Callable[[torch.nn.Module, float], None] | None = None


def train_epoch(
    model: torch.nn.Module,
    loader: Iterable[dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    loss_fn: torch.nn.Module,
    rt: Runtime,
    scaler: torch.amp.GradScaler | None = None,
    on_step: Callable[[int, float], None] | None = None,
    hooks: StepHooks | None = None,
) -> dict[str, float]:
    """One pass over ``loader``.

    Args:
        on_step: called with (step index within the epoch, loss) after each step.
        hooks: algorithm-specific additions to each step.

    Returns:
        ``{"loss": mean task loss, "steps": n, "seconds": wall time}``.

    Raises:
        TrainingError: the loss became NaN or infinite.
    """
    model.train()
    scaler = scaler or rt.grad_scaler()
    hooks = hooks or StepHooks()
    total = torch.zeros((), dtype=torch.float32, device=rt.device)  # summed on the device: no sync per step
    steps, checked = 0, 0
    t0 = time.perf_counter()
    for batch in loader:
        image = batch["image"].to(rt.device, non_blocking=True)
        label = batch["label"].to(rt.device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with rt.autocast():
            loss = loss_fn(model(image), label)
        total += loss.detach().float()
        if hooks.extra_loss is not None:
            loss = loss + hooks.extra_loss(model)  # in fp32, outside autocast
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if hooks.after_step is not None:
            hooks.after_step(model, float(optimizer.param_groups[0]["lr"]))
        steps += 1
        if on_step is not None:
            on_step(steps - 1, float(loss.detach()))
        if steps - checked >= SYNC_EVERY:
            # A host sync (reading the loss) every SYNC_EVERY steps, not every step: on CUDA each read waits for
            # the device to finish, so the next batch could not overlap the current step.
            _check_finite(total, checked, steps)
            checked = steps
    if steps == 0:
        raise TrainingError("the training loader yielded no batch; the site has no training cases")
    _check_finite(total, checked, steps)
    return {"loss": float(total) / steps, "steps": float(steps), "seconds": time.perf_counter() - t0}


#: Steps between two reads of the running loss (each read is a host-device sync on CUDA).
SYNC_EVERY = 16


def _check_finite(total: torch.Tensor, after: int, steps: int) -> None:
    value = float(total)
    if not math.isfinite(value):
        raise TrainingError(
            f"loss became {value} between steps {after} and {steps}; lower optim.lr or check the inputs"
        )


def build_optimizer(
    model: torch.nn.Module, name: str, lr: float, weight_decay: float, momentum: float = 0.9
) -> torch.optim.Optimizer:
    """Optimizer by name (``adam``, ``adamw``, ``sgd``)."""
    params = model.parameters()
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"optim.name must be adam, adamw or sgd; got {name!r}")
