"""FedBN (Li et al. 2021): normalization layers stay at each site.

Sites never send their normalization layers (weights, biases, running
statistics) and never overwrite them with the global model's; the server
averages everything else like FedAvg, and its copies of those layers keep
the network's initialization.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from fedimg.fl.algorithms.base import ClientAlgorithm, ServerStrategy
from fedimg.models.registry import build_model, normalization_keys


class FedBNServer(ServerStrategy):
    """FedAvg over every entry but the normalization layers, which the sites keep."""

    def setup(self, global_params: Mapping[str, np.ndarray]) -> None:
        self._local = frozenset(normalization_keys(build_model(self.exp.model, self.exp.task)))

    @property
    def local_keys(self) -> frozenset[str]:
        return self._local


class FedBNClient(ClientAlgorithm):
    """The site's own normalization layers, kept through every round."""

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


__all__ = ["FedBNClient", "FedBNServer"]
