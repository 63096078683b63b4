"""What each federated algorithm does at a site, around the shared local training loop.

* ``fedavg``, ``fedopt``: plain local training (FedOpt's difference is on the server).
* ``fedprox``: adds NVFlare's ``PTFedProxLoss`` (``mu/2 * ||w - w_global||^2``)
  to every step; ``mu`` arrives with every training task from the server.
* ``scaffold``: NVFlare's ``PTScaffoldHelper`` corrects every step with the
  control variates ``c - c_i`` and returns the change of ``c_i``.
* ``fedbn``: normalization layers (weights, biases, running statistics)
  never leave the site and are never overwritten by the global model.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from nvflare.app_common.app_constant import AlgorithmConstants
from nvflare.app_common.utils.fedprox_utils import get_fedprox_mu
from nvflare.app_opt.pt.fedproxloss import PTFedProxLoss
from nvflare.app_opt.pt.scaffold import PTScaffoldHelper

from fedimg.training.checkpoint import state_problem
from fedimg.training.loops import StepHooks
from fedimg.training.trainer import SiteTrainer


class ClientAlgorithm:
    """FedAvg at a site: no change to local training.

    Args:
        trainer: the site's trainer.
    """

    name = "fedavg"

    def __init__(self, trainer: SiteTrainer) -> None:
        self.trainer = trainer
        self.stats: dict[str, float] = {}  # numbers the server records per round (no data in them)

    @property
    def local_keys(self) -> frozenset[str]:
        """State-dict keys that stay at the site (never loaded from, nor sent to, the server)."""
        return frozenset()

    def keep_on_evaluate(self, params: dict[str, Any]) -> frozenset[str]:
        """Keys to keep from the site's own model when evaluating ``params`` (validate tasks)."""
        return frozenset()

    def start_round(self, model: Any) -> StepHooks:
        """Called after the global weights are loaded; returns the hooks of this round's steps."""
        return StepHooks()

    def end_round(self) -> dict[str, Any]:
        """Called after local training; returns extra meta for the server."""
        return {}


class FedProxClient(ClientAlgorithm):
    """FedProx: a proximal term keeps local weights near the round's global weights."""

    name = "fedprox"

    def start_round(self, model: Any) -> StepHooks:
        mu = get_fedprox_mu(model)  # validated: a missing or bad mu is an error, not a silent FedAvg
        prox = PTFedProxLoss(mu=mu)
        reference = copy.deepcopy(self.trainer.model)
        for p in reference.parameters():
            p.requires_grad_(False)
        self.stats = {"mu": mu, "prox_term": 0.0}

        def extra_loss(m: torch.nn.Module) -> torch.Tensor:
            term = prox(m, reference)
            self.stats["prox_term"] = max(self.stats["prox_term"], float(term.detach()))  # largest of the round
            return term

        return StepHooks(extra_loss=extra_loss)


class ScaffoldClient(ClientAlgorithm):
    """SCAFFOLD (Karimireddy et al. 2020) through NVFlare's ``PTScaffoldHelper``."""

    name = "scaffold"

    def __init__(self, trainer: SiteTrainer) -> None:
        super().__init__(trainer)
        self.helper = PTScaffoldHelper()
        self.helper.init(trainer.model)
        self._global_model: torch.nn.Module | None = None
        self._c_global: Any = None
        self._c_local: Any = None
        self._lr = 0.0

    def start_round(self, model: Any) -> StepHooks:
        controls = (model.meta or {}).get(AlgorithmConstants.SCAFFOLD_CTRL_GLOBAL)
        if not controls:
            raise ValueError("SCAFFOLD: the training task carries no global control variates "
                             f"(meta {AlgorithmConstants.SCAFFOLD_CTRL_GLOBAL!r}); the server must run fed.algorithm "
                             "scaffold as well")
        # The server's controls are checked like a model: the network's parameters (buffers may come too),
        # their shapes, finite values. NaN controls would silently corrupt every local step.
        state = self.trainer.model.state_dict()
        params = {name for name, _ in self.trainer.model.named_parameters()}
        reference = {k: v for k, v in state.items() if v.is_floating_point()}
        why = state_problem(controls, reference, optional=set(reference) - params)
        if why:
            raise ValueError(f"SCAFFOLD: the global control variates received are refused ({why}); server and site "
                             "must run the same experiment config")
        self.helper.load_global_controls(controls)
        self._c_global, self._c_local = self.helper.get_params()
        self._global_model = copy.deepcopy(self.trainer.model)

        def after_step(m: torch.nn.Module, lr: float) -> None:
            self._lr = lr
            self.helper.model_update(m, lr, self._c_global, self._c_local)

        return StepHooks(after_step=after_step)

    def end_round(self) -> dict[str, Any]:
        self.helper.terms_update(self.trainer.model, self._lr, self._c_global, self._c_local, self._global_model)
        delta = {k: np.asarray(v, dtype=np.float32) for k, v in self.helper.get_delta_controls().items()}
        self.stats = {"control_delta_norm": float(np.sqrt(sum(float((d.astype(np.float64) ** 2).sum())
                                                            for d in delta.values()))),
                      "corrected_steps": float(self.helper.cnt)}
        return {AlgorithmConstants.SCAFFOLD_CTRL_DIFF: delta}


class FedBNClient(ClientAlgorithm):
    """FedBN (Li et al. 2021): normalization layers are site-local."""

    name = "fedbn"

    @property
    def local_keys(self) -> frozenset[str]:
        return self.trainer.norm_keys

    def end_round(self) -> dict[str, Any]:
        self.stats = {"local_entries": float(len(self.local_keys))}
        return {}

    def keep_on_evaluate(self, params: dict[str, Any]) -> frozenset[str]:
        """The site's own normalization layers for a global model; none for another site's own model.

        No site sends its normalization layers, so the global model's are the
        network's untouched initialization (weights 1, biases and running means
        0, variances 1, counters 0). A model whose normalization layers differ
        from that is a site's own model (cross-site evaluation) and is
        evaluated as it is.
        """
        for key in self.local_keys:
            if key not in params:
                return self.local_keys
            value = torch.as_tensor(params[key]).float()
            leaf = key.rsplit(".", 1)[-1]
            expected = 1.0 if leaf in ("weight", "running_var") else 0.0
            if not torch.allclose(value, torch.full_like(value, expected)):
                return frozenset()
        return self.local_keys


_ALGORITHMS: dict[str, type[ClientAlgorithm]] = {
    "fedavg": ClientAlgorithm, "fedopt": ClientAlgorithm, "fedprox": FedProxClient,
    "scaffold": ScaffoldClient, "fedbn": FedBNClient,
}


def client_algorithm(name: str, trainer: SiteTrainer) -> ClientAlgorithm:
    """The site-side part of ``fed.algorithm``."""
    if name not in _ALGORITHMS:
        raise ValueError(f"fed.algorithm must be one of {', '.join(_ALGORITHMS)}, got {name!r}")
    algo = _ALGORITHMS[name](trainer)
    if name == "fedbn" and not algo.local_keys:
        raise ValueError("fed.algorithm fedbn: the model has no normalization layers with parameters or "
                         "statistics; set model.norm: batch")
    return algo
