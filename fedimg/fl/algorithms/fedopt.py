"""FedOpt (Reddi et al. 2021): the averaged update is a pseudo-gradient for a server optimizer.

Sites train like FedAvg and send differences (``fed.exchange: diff``); the
server averages them and takes one step of its own optimizer (``fed.server_optimizer``:
SGD with momentum, or Adam) on the global model. Buffers that are not
parameters (BatchNorm statistics) are averaged plainly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from fedimg.fl.aggregation import Update
from fedimg.fl.algorithms.base import ClientAlgorithm, ServerStrategy
from fedimg.models.registry import build_model


class FedOptServer(ServerStrategy):
    """A server-side optimizer step per round on the averaged difference."""

    def setup(self, global_params: Mapping[str, np.ndarray]) -> None:
        exp = self.exp
        self.model = build_model(exp.model, exp.task)
        self.model.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in global_params.items()}, strict=True)
        so = exp.fed.server_optimizer
        params = self.model.parameters()
        if so.name == "adam":
            self.optimizer: torch.optim.Optimizer = torch.optim.Adam(
                params, lr=so.lr, betas=(so.betas[0], so.betas[1]), eps=so.eps
            )
        else:
            self.optimizer = torch.optim.SGD(params, lr=so.lr, momentum=so.momentum)

    def apply(
        self,
        global_params: Mapping[str, np.ndarray],
        updates: Sequence[Update],
        is_diff: bool,
        results_meta: Mapping[str, Mapping[str, Any]],
    ) -> dict[str, np.ndarray]:
        if not is_diff:
            raise ValueError("fedopt needs differences: set fed.exchange: diff")
        diff = self.combine(updates)
        self.optimizer.zero_grad()
        named = dict(self.model.named_parameters())
        for name, p in named.items():
            if name in diff:
                # The averaged update is a descent direction: its negative is the pseudo-gradient.
                p.grad = torch.as_tensor(-diff[name], dtype=p.dtype)
        self.optimizer.step()
        new = dict(global_params)
        for key, value in self.model.state_dict().items():
            if key in named:
                new[key] = value.detach().cpu().numpy().astype(np.float32)
            elif key in diff:  # buffers (BatchNorm statistics): plain averaging
                g = new[key]
                new[key] = (g + diff[key]).astype(g.dtype)
                value.copy_(torch.as_tensor(new[key]))
        return new


class FedOptClient(ClientAlgorithm):
    """Plain local training (FedOpt's difference is on the server)."""


__all__ = ["FedOptClient", "FedOptServer"]
