"""FedProx (Li et al. 2020): a proximal term keeps each site's weights near the round's global weights.

The server averages like FedAvg and sends ``mu`` (``fed.mu``) with every
training task; each site adds NVFlare's ``PTFedProxLoss``
(``mu/2 * ||w - w_global||^2``) to every step.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from fedimg.fl.algorithms.base import ClientAlgorithm, ServerStrategy
from fedimg.fl.protocol import FEDPROX_MU
from fedimg.training.loops import StepHooks


class FedProxServer(ServerStrategy):
    """FedAvg's aggregation; every training task carries ``mu``."""

    def task_meta(self) -> dict[str, Any]:
        return {FEDPROX_MU: float(self.exp.fed.mu)}


class FedProxClient(ClientAlgorithm):
    """The proximal term added to every local step."""

    def start_round(self, model: Any) -> StepHooks:
        from nvflare.app_common.utils.fedprox_utils import get_fedprox_mu
        from nvflare.app_opt.pt.fedproxloss import PTFedProxLoss

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


__all__ = ["FedProxClient", "FedProxServer"]
