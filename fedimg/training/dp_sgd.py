"""DP-SGD at a site with Opacus (``privacy.dp_sgd.enabled: true``).

What is protected: each training case of the site (sample-level DP under
adding or removing one case). Every optimizer step clips each case's gradient
to L2 norm ``max_grad_norm`` and adds Gaussian noise of standard deviation
``noise_multiplier * max_grad_norm`` to their sum (Abadi et al. 2016). The
privacy spent, ``epsilon`` at ``delta``, is tracked by Opacus' RDP accountant
over every step of every round (or epoch) the trainer has run.

Sampling. The RDP analysis assumes Poisson sampling: every case joins a batch
independently with probability ``q`` (here ``1 / steps per epoch``, so batches
hold ``data.batch_size`` cases on average). Opacus' own ``DPDataLoader``
(``make_private(poisson_sampling=True)``) cannot run on the MONAI loaders of
:func:`fedimg.data.datasets.make_loaders`: it builds its template for an empty
batch from ``dataset[0]`` as a tuple of tensors, but MONAI items are dicts
holding strings (``case_id``), so the first empty batch raises a
``TypeError``. fedimg therefore draws Poisson batches itself with Opacus'
``UniformWithReplacementSampler`` (same sampler, same rate), marks an empty
batch as ``None`` and still takes the step on it (noise only: the analysis
counts that release), and hands this loader to ``make_private`` with
``poisson_sampling=False`` so Opacus leaves it as it is. The accounting
therefore holds as stated, not as an approximation.

The network. ``self.model`` of :class:`fedimg.training.trainer.SiteTrainer`
stays the plain module (state-dict keys unchanged, used for exchange and
evaluation); Opacus' ``GradSampleModule`` wraps it for training only and
shares its parameters. Opacus computes per-sample gradients with backward
hooks on every layer that holds parameters; autograd refuses in-place
changes of such a layer's output, which MONAI's networks make (``ReLU(inplace=True)``,
``x += identity`` in SegResNet's residual blocks). fedimg switches in-place
activations off and lets parameter-free containers return a copy of a hooked
output (same values, same gradients). Networks Opacus cannot handle are
refused with a :class:`fedimg.config.ConfigError` when the trainer is built,
before any case is read: BatchNorm (it mixes the cases of a batch; MONAI's
ResNet builds its residual blocks with BatchNorm whatever ``model.norm`` says)
and anything a trial backward pass on a synthetic batch shows to fail.

Not covered: the accountant lives in the site's process, so a resumed job
(``--resume``) restarts the count at zero; noise comes from PyTorch's
pseudo-random generator (Opacus' ``secure_mode`` needs ``torchcsprng``).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

from fedimg.config import ConfigError, ExperimentConfig
from fedimg.runtime import Runtime
from fedimg.training.loops import TrainingError

logger = logging.getLogger(__name__)

MECHANISM = "dp_sgd"
# PyTorch warns when a hooked layer's inputs need no gradient (the first layer: its input is the image).
# Opacus needs only the gradient of that layer's output, which it gets.
_INPUT_HOOK_WARNING = "Full backward hook is firing when gradients are computed with respect to module outputs"


def _has_own_params(module: torch.nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters(recurse=False))


def unsupported_layers(model: torch.nn.Module) -> list[tuple[str, str, str]]:
    """``(layer name, layer type, reason)`` of every layer Opacus' validators refuse.

    Runs ``opacus.validators.ModuleValidator.validate(model, strict=False)``
    on the network and on each of its layers, so the refusal can name them.
    """
    from opacus.validators import ModuleValidator

    was_training = model.training
    model.train()  # the validator also refuses a model in eval mode
    try:
        errors = ModuleValidator.validate(model, strict=False)
        if not errors:
            return []
        out = []
        for name, module in model.named_modules():
            check = ModuleValidator.VALIDATORS.get(type(module))
            if check is None or not _has_own_params(module):
                continue
            for err in check(module):
                out.append((name or "(root)", type(module).__name__, str(err).split(".")[0]))
        # An error no single layer explains still refuses the network, with Opacus' own words.
        return out or [("(model)", type(model).__name__, str(err).split(".")[0]) for err in errors]
    finally:
        model.train(was_training)


def check_network(model: torch.nn.Module, exp: ExperimentConfig) -> None:
    """Refuse a network DP-SGD cannot train, saying which layers and what to do.

    Raises:
        ConfigError: the network holds layers Opacus does not support.
    """
    bad = unsupported_layers(model)
    if not bad:
        return
    kinds = sorted({t for _, t, _ in bad})
    names = [n for n, _, _ in bad]
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    reasons = "; ".join(sorted({r for _, _, r in bad}))
    if exp.model.name == "resnet":
        hint = (
            "MONAI's ResNet builds its residual blocks with BatchNorm whatever model.norm says "
            f"(model.norm {exp.model.norm} only reaches its first layer): use model.name densenet121 "
            "with model.norm instance or group for DP-SGD, or set privacy.dp_sgd.enabled: false"
        )
    else:
        hint = "set model.norm: instance or group, or set privacy.dp_sgd.enabled: false"
    raise ConfigError(
        f"privacy.dp_sgd: Opacus cannot train this {exp.model.name}: {len(bad)} "
        f"{'/'.join(kinds)} layer(s) ({shown}) are not supported ({reasons}); {hint}"
    )


def _copy_hooked_output(module: torch.nn.Module, inputs: Any, output: Any) -> Any:
    # The output of a layer with Opacus' backward hook must not be changed in place (autograd raises);
    # a container that hands it on (MONAI's Convolution) returns a copy instead, which its caller may change.
    if (
        isinstance(output, torch.Tensor)
        and output.grad_fn is not None
        and type(output.grad_fn).__name__ == "BackwardHookFunctionBackward"
    ):
        return output.clone()
    return None


def make_hook_safe(model: torch.nn.Module) -> None:
    """Avoid in-place changes of hooked layer outputs; values and gradients stay the same."""
    for module in model.modules():
        if isinstance(getattr(module, "inplace", None), bool):
            module.inplace = False  # type: ignore[assignment]  # torch types Module.__setattr__ for tensors only
        if not _has_own_params(module):
            module.register_forward_hook(_copy_hooked_output)


class _EmptyAsNone:
    """Collate a batch as the wrapped function does; an empty Poisson batch becomes ``None``."""

    def __init__(self, collate: Callable[[list[Any]], Any]) -> None:
        self.collate = collate

    def __call__(self, batch: list[Any]) -> Any:
        return None if len(batch) == 0 else self.collate(batch)


def poisson_loader(loader: Any, seed: int) -> Any:
    """A loader over ``loader``'s dataset with Poisson batches of rate ``1 / len(loader)``."""
    from monai.data import DataLoader
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    steps = len(loader)
    gen = torch.Generator()
    gen.manual_seed(seed)
    # steps= fixes the epoch length: int(1 / (1 / steps)) is steps - 1 for some steps (93, 99, ...).
    sampler = UniformWithReplacementSampler(
        num_samples=len(loader.dataset), sample_rate=1.0 / steps, generator=gen, steps=steps
    )
    return DataLoader(
        loader.dataset,
        batch_sampler=sampler,
        collate_fn=_EmptyAsNone(loader.collate_fn),
        num_workers=loader.num_workers,
        generator=gen,
    )


class DPSGD:
    """Opacus' ``PrivacyEngine`` around one site's model, optimizer and training loader.

    Args:
        model: the plain network (left unwrapped; its parameters are shared).
        optimizer: its optimizer.
        loader: the training loader of :func:`fedimg.data.datasets.make_loaders`.
        exp: the experiment (``privacy.dp_sgd``, ``data``, ``task``).
        rt: the runtime (device).

    Raises:
        ConfigError: a network DP-SGD cannot train (named layers, what to do).
    """

    def __init__(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, loader: Any, exp: ExperimentConfig, rt: Runtime
    ) -> None:
        from opacus import PrivacyEngine

        self.cfg = exp.privacy.dp_sgd
        self.model = model
        check_network(model, exp)
        make_hook_safe(model)
        # Two warnings that say nothing here, silenced by their exact text (process-wide, as catch_warnings is not
        # thread-safe): Opacus' secure_mode is off (this module's docstring says so), and PyTorch's note on the
        # first layer, whose input (the image) needs no gradient.
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        warnings.filterwarnings("ignore", message=_INPUT_HOOK_WARNING)
        self.engine = PrivacyEngine(accountant="rdp")
        self.module, self.optimizer, self.loader = self.engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=poisson_loader(loader, exp.train.seed),
            noise_multiplier=self.cfg.noise_multiplier,
            max_grad_norm=self.cfg.max_grad_norm,
            poisson_sampling=False,  # the loader already draws Poisson batches (module docstring)
        )
        self.sample_rate = 1.0 / len(self.loader)
        self.expected_batch_size = int(self.optimizer.expected_batch_size)
        self.empty_batches = 0
        self._trial_step(exp, rt)

    def _trial_step(self, exp: ExperimentConfig, rt: Runtime) -> None:
        """Forward and backward a synthetic batch, so a layer Opacus cannot handle fails here, not mid-round.

        No case is read and no optimizer step is taken, so nothing is released or accounted.
        """
        gen = torch.Generator().manual_seed(0)
        shape = (2, exp.task.in_channels, *exp.data.roi_size)
        x = torch.rand(shape, generator=gen).to(rt.device)
        self.module.train()
        try:
            self.module(x).float().mean().backward()
            missing = [
                n
                for n, p in self.model.named_parameters()
                if p.requires_grad and getattr(p, "grad_sample", None) is None
            ]
        except (RuntimeError, NotImplementedError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(
                f"privacy.dp_sgd: Opacus could not compute per-sample gradients of model.name "
                f"{exp.model.name} (model.norm {exp.model.norm}, data.roi_size "
                f"{list(exp.data.roi_size)}): {first}. Use another network (unet or segresnet for "
                "segmentation, densenet121 for classification) or set privacy.dp_sgd.enabled: "
                "false"
            ) from exc
        finally:
            self.optimizer.zero_grad(set_to_none=True)
        if missing:
            raise ConfigError(
                f"privacy.dp_sgd: no per-sample gradient for {len(missing)} parameter(s) of "
                f"model.name {exp.model.name} ({', '.join(missing[:3])}); their updates could not be "
                "clipped. Use another network or set privacy.dp_sgd.enabled: false"
            )

    @property
    def steps(self) -> int:
        """Noised optimizer steps taken so far (all fits)."""
        return int(sum(h[2] for h in self.engine.accountant.history))

    def epsilon(self) -> float:
        """Epsilon spent so far at ``privacy.dp_sgd.delta`` (0 before the first step)."""
        if not self.engine.accountant.history:
            return 0.0
        return float(self.engine.get_epsilon(self.cfg.delta))

    def spent(self) -> dict[str, Any]:
        """What DP-SGD released so far: the mechanism, its parameters and epsilon at delta."""
        return {
            "mechanism": MECHANISM,
            "epsilon": self.epsilon(),
            "delta": self.cfg.delta,
            "noise_multiplier": self.cfg.noise_multiplier,
            "max_grad_norm": self.cfg.max_grad_norm,
            "steps": self.steps,
            "sample_rate": self.sample_rate,
            "expected_batch_size": self.expected_batch_size,
            "poisson_sampling": True,
        }

    def _noise_only_step(self) -> None:
        # An empty Poisson batch is a step like any other: the noise alone is released and accounted.
        for p in self.optimizer.params:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        self.optimizer.step()

    def train_epoch(
        self, loss_fn: torch.nn.Module, rt: Runtime, on_step: Callable[[int, float], None] | None = None
    ) -> dict[str, float]:
        """One pass of Poisson batches with per-sample clipping and noise.

        In fp32 without a gradient scaler: a scaled loss would scale every
        per-sample gradient before clipping, so the bound ``max_grad_norm``
        would no longer hold in the units it is stated in, and the scaler's
        skipped steps would take steps the accountant does not see.

        Args:
            on_step: called with (step index within the epoch, loss) after each
                step on a non-empty batch.

        Returns:
            ``{"loss": mean task loss over non-empty batches (NaN if all were
            empty), "steps": optimizer steps, "empty": empty batches, "seconds"}``.

        Raises:
            TrainingError: the loss became NaN or infinite.
        """
        self.module.train()
        total, losses, steps, empty = 0.0, 0, 0, 0
        t0 = time.perf_counter()
        for batch in self.loader:
            self.optimizer.zero_grad(set_to_none=True)
            if batch is None:
                self._noise_only_step()
                steps += 1
                empty += 1
                continue
            image = batch["image"].to(rt.device, non_blocking=True)
            label = batch["label"].to(rt.device, non_blocking=True)
            loss = loss_fn(self.module(image), label)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise TrainingError(f"loss is {value} at step {steps}; lower optim.lr or check the inputs")
            loss.backward()
            self.optimizer.step()
            total += value
            losses += 1
            steps += 1
            if on_step is not None:
                on_step(steps - 1, value)
        self.optimizer.zero_grad(set_to_none=True)  # drop per-sample gradients between epochs (memory)
        self.empty_batches += empty
        return {
            "loss": total / losses if losses else float("nan"),
            "steps": float(steps),
            "empty": float(empty),
            "seconds": time.perf_counter() - t0,
        }


__all__ = ["DPSGD", "MECHANISM", "check_network", "make_hook_safe", "poisson_loader", "unsupported_layers"]
