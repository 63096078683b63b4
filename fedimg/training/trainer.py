"""``SiteTrainer``: one model, its data and its optimizer behind a small API.

Local-only training, centralized (pooled) training and the NVFlare client all
drive a ``SiteTrainer``; only who calls :meth:`fit` and where the weights come
from differ. With ``privacy.dp_sgd.enabled`` the trainer trains with DP-SGD
(:mod:`fedimg.training.dp_sgd`) in every one of them, and
:meth:`SiteTrainer.privacy_spent` says how much privacy its fits have spent.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from fedimg.config import ExperimentConfig
from fedimg.data.datasets import check_matches_task, make_loaders, make_val_loader, read_datalist
from fedimg.models.registry import build_model, normalization_keys
from fedimg.runtime import Runtime
from fedimg.tasks import build_task
from fedimg.training.checkpoint import state_problem
from fedimg.training.loops import StepHooks, build_optimizer, train_epoch

logger = logging.getLogger(__name__)


class SiteTrainer:
    """Train and evaluate one model on given training and validation items.

    With ``privacy.dp_sgd.enabled``, Opacus wraps the model for training
    (per-sample gradients), the optimizer (clipping and noise) and the
    training loader (Poisson batches); :attr:`model` stays the plain network,
    so its state-dict keys, loading, exchange and evaluation are those of a
    run without DP-SGD. AMP is off for training then (see
    :meth:`fedimg.training.dp_sgd.DPSGD.train_epoch`).

    Args:
        exp: the experiment config.
        train_items: training items (from :func:`fedimg.data.datasets.read_datalist`).
        val_items: validation items (may be empty).
        rt: the process runtime (device, AMP, threads).
        test_items: held-out test items (may be empty): scored by :meth:`test` only,
            never trained on and never used to choose a model.
        progress: show a progress bar while caching.

    Raises:
        fedimg.config.ConfigError: DP-SGD is on and the network has layers
            Opacus cannot train (named, with what to do).
    """

    def __init__(
        self,
        exp: ExperimentConfig,
        train_items: list[dict[str, Any]],
        val_items: list[dict[str, Any]],
        rt: Runtime,
        progress: bool = False,
        test_items: list[dict[str, Any]] | None = None,
    ) -> None:
        self.exp = exp
        self.rt = rt
        self.task = build_task(exp)
        self.n_train = len(train_items)
        self.n_val = len(val_items)
        self.test_items = list(test_items or [])
        self.n_test = len(self.test_items)
        self._test_loader: Any = None
        self.progress = progress
        self.train_loader, self.val_loader = make_loaders(
            train_items, val_items, exp.data, exp.task, rt.device, progress=progress, seed=exp.train.seed
        )
        self.model = build_model(exp.model, exp.task).to(rt.device)
        self.optimizer = build_optimizer(
            self.model, exp.optim.name, exp.optim.lr, exp.optim.weight_decay, exp.optim.momentum
        )
        self.steps_done = 0
        self.norm_keys = frozenset(normalization_keys(self.model))
        self.dp: Any = None
        if exp.privacy.dp_sgd.enabled and self.train_loader is not None:
            from fedimg.training.dp_sgd import DPSGD  # Opacus only when asked for

            self.loss_fn = self.task.loss(per_sample=True)  # a mean of per-sample terms: each case's own gradient
            self.dp = DPSGD(self.model, self.optimizer, self.train_loader, exp, rt)
            self.optimizer = self.dp.optimizer  # param_groups are the wrapped optimizer's (set_progress)
            self.train_loader = self.dp.loader
            self.scaler = None
            if rt.amp:
                logger.info(
                    "privacy.dp_sgd: training in fp32 (no AMP): a gradient scaler would scale the "
                    "per-sample gradients before they are clipped"
                )
        else:
            self.loss_fn = self.task.loss()
            self.scaler = rt.grad_scaler()

    @classmethod
    def from_datalist(
        cls, exp: ExperimentConfig, datalist: str | Path, rt: Runtime, progress: bool = False
    ) -> SiteTrainer:
        """A trainer on one site's ``datalist.json`` (checked against the experiment's task; ``data.fold`` applied)."""
        dl = read_datalist(datalist, fold=exp.data.fold)
        check_matches_task(dl, exp.task, f"datalist {datalist}")
        return cls(exp, dl.training, dl.validation, rt, progress=progress, test_items=dl.test)

    def load_weights(self, state: dict[str, Any], keep: Iterable[str] = ()) -> None:
        """Load (global) weights, except the keys in ``keep``, which stay as they are (FedBN).

        What arrives from another party is checked before anything is loaded
        (:func:`fedimg.training.checkpoint.state_problem`): exactly the
        network's entries (those in ``keep`` may be absent), each of the
        network's shape, numbers only, every value finite. Under homomorphic
        encryption an entry may arrive flat (CKKS decrypts every tensor as a
        vector) and is reshaped.

        Raises:
            ValueError: the weights do not fit the network or hold NaN or
                infinite values; the model is left unchanged.
        """
        keep = set(keep)
        current = self.model.state_dict()
        why = state_problem(state, current, optional=keep, flat_ok=self.exp.privacy.encryption == "he")
        if why:
            raise ValueError(
                f"received weights refused ({why}); they do not fit the configured "
                f"{self.exp.model.name} or are broken: server and site must use the same experiment "
                "config, and a model with NaN or infinite values is never loaded"
            )
        new = {}
        for k, v in current.items():
            if k in keep or k not in state:
                new[k] = v
                continue
            t = torch.as_tensor(state[k])
            new[k] = t.reshape(v.shape).to(dtype=v.dtype)
        self.model.load_state_dict(new, strict=True)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """CPU copy of the current weights."""
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    def fit(
        self, epochs: int, on_step: Callable[[int, float], None] | None = None, hooks: StepHooks | None = None
    ) -> dict[str, float]:
        """Train ``epochs`` epochs; returns the mean loss and the number of optimizer steps.

        Raises:
            ValueError: DP-SGD is on and ``hooks`` add to the step (FedProx,
                SCAFFOLD): their terms are outside DP-SGD's clipping.
        """
        if self.train_loader is None:
            raise ValueError(
                "this trainer has no training cases (it only evaluates); the datalist's training split is empty"
            )
        losses, steps = [], 0

        def hook(i: int, loss: float) -> None:
            self.steps_done += 1
            if on_step is not None:
                on_step(self.steps_done, loss)

        if self.dp is not None and hooks is not None and (hooks.extra_loss or hooks.after_step):
            raise ValueError(
                "privacy.dp_sgd clips per-sample gradients of the task loss only; the algorithm's "
                "step additions (FedProx, SCAFFOLD) are not allowed with it: use fedavg or fedopt"
            )
        for _ in range(epochs):
            if self.dp is not None:
                res = self.dp.train_epoch(self.loss_fn, self.rt, on_step=hook)
            else:
                res = train_epoch(
                    self.model,
                    self.train_loader,
                    self.optimizer,
                    self.loss_fn,
                    self.rt,
                    self.scaler,
                    on_step=hook,
                    hooks=hooks,
                )
            if math.isfinite(res["loss"]):  # NaN: a DP-SGD epoch of empty Poisson batches only
                losses.append(res["loss"])
            steps += int(res["steps"])
        return {"loss": sum(losses) / len(losses) if losses else float("nan"), "steps": float(steps)}

    def privacy_spent(self) -> dict[str, Any] | None:
        """DP-SGD's privacy spent by every fit so far (None without DP-SGD).

        Returns:
            ``{"mechanism": "dp_sgd", "epsilon", "delta", "noise_multiplier",
            "max_grad_norm", "steps", "sample_rate", "expected_batch_size",
            "poisson_sampling"}``: epsilon at ``delta`` by Opacus' RDP
            accountant over ``steps`` noised steps at ``sample_rate``.
        """
        return None if self.dp is None else self.dp.spent()

    def validate(self) -> dict[str, float]:
        """Metrics on the validation cases (empty dict if there are none)."""
        if self.val_loader is None:
            return {}
        return self.task.evaluate(self.model, self.val_loader, self.rt)

    def test(self) -> dict[str, float]:
        """Metrics on the held-out test cases (empty dict if there are none); for reports, never for choices."""
        if not self.test_items:
            return {}
        if self._test_loader is None:
            self._test_loader = self.eval_loader(self.test_items)
        return self.task.evaluate(self.model, self._test_loader, self.rt)

    def eval_loader(self, items: list[dict[str, Any]]) -> Any:
        """A cached loader over other validation items (e.g. another site's, in centralized training)."""
        return make_val_loader(items, self.exp.data, self.exp.task, self.rt.device)

    def evaluate(self, loader: Any) -> dict[str, float]:
        """Metrics of the current model on ``loader``."""
        return self.task.evaluate(self.model, loader, self.rt)

    def overlays(self, limit: int = 2) -> list[Any]:
        """Prediction-vs-reference pictures of validation cases; for the site's own logdir only."""
        if self.val_loader is None:
            return []
        return self.task.overlays(self.model, self.val_loader, self.rt, limit)

    def set_progress(self, progress: float) -> float:
        """Set the learning rate for ``progress`` in [0, 1] of the run (``optim.schedule``)."""
        lr = self.exp.optim.lr_at(progress)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr
