"""What every federated algorithm is made of: a server strategy and a site part.

The **server strategy** (:class:`ServerStrategy`) is pure NumPy/PyTorch and
unit-testable without NVFlare: it is set up once with the initial global
model, gives the extra metadata every training task carries, checks what a
site sends beyond its update, and turns the round's accepted updates into
the next global model (``apply``). The controller
(:mod:`fedimg.fl.controller`) only runs rounds, checks and records; it has
no branch per algorithm.

The **site part** (:class:`ClientAlgorithm`) adds the algorithm's terms to
the shared local training loop. It may use NVFlare's helpers (FedProx's
loss, SCAFFOLD's helper), imported where it is built, so the server
strategies stay importable without NVFlare.

Each algorithm is one module of this package (``fedavg``, ``fedprox``,
``fedopt``, ``scaffold``, ``fedbn``) holding both parts; the registry is
:mod:`fedimg.fl.algorithms`. Its name and its config requirements (for
example FedOpt's ``fed.exchange: diff``) are checked when the experiment is
loaded (:class:`fedimg.config.FedConfig`), since the config cannot import
this package.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from fedimg.config import ExperimentConfig
from fedimg.fl.aggregation import Update, aggregate

if TYPE_CHECKING:
    from fedimg.training.loops import StepHooks
    from fedimg.training.trainer import SiteTrainer


class ServerStrategy:
    """FedAvg on the server: the configured aggregation of the updates, applied to the global model.

    Args:
        exp: the experiment (``fed.robust.aggregation`` and ``trim`` choose the rule).
    """

    def __init__(self, exp: ExperimentConfig) -> None:
        self.exp = exp
        self.aggregation = exp.fed.robust.aggregation
        self.trim = exp.fed.robust.trim

    def setup(self, global_params: Mapping[str, np.ndarray]) -> None:
        """Called once with the initial global model, before the first round."""

    @property
    def local_keys(self) -> frozenset[str]:
        """Global-model entries the sites keep to themselves and never send (FedBN)."""
        return frozenset()

    def task_meta(self) -> dict[str, Any]:
        """Extra metadata of every training task (FedProx's ``mu``, SCAFFOLD's global controls)."""
        return {}

    def check_result(self, meta: Mapping[str, Any]) -> str | None:
        """Why a site's result metadata is unusable for this algorithm (``CODE: text``), or None."""
        return None

    def combine(self, updates: Sequence[Update]) -> dict[str, np.ndarray]:
        """The round's aggregate of the updates' entries (weights or differences)."""
        return aggregate(updates, self.aggregation, self.trim)

    def apply(
        self,
        global_params: Mapping[str, np.ndarray],
        updates: Sequence[Update],
        is_diff: bool,
        results_meta: Mapping[str, Mapping[str, Any]],
    ) -> dict[str, np.ndarray]:
        """The next global model from the round's accepted, checked updates.

        Args:
            global_params: the current global model.
            updates: at least one accepted update.
            is_diff: the updates are differences from ``global_params`` (``fed.exchange: diff``).
            results_meta: site -> the metadata of its result (checked by :meth:`check_result`).

        Returns:
            The new global model; entries no site sent keep their value.
        """
        agg = self.combine(updates)
        new = dict(global_params)
        for key, value in agg.items():
            if is_diff:
                g = new[key]
                new[key] = (g + value).astype(g.dtype)
            else:
                new[key] = value
        return new


class ClientAlgorithm:
    """FedAvg at a site: no change to local training.

    Args:
        trainer: the site's trainer.
    """

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
        from fedimg.training.loops import StepHooks

        return StepHooks()

    def end_round(self) -> dict[str, Any]:
        """Called after local training; returns extra meta for the server."""
        return {}


__all__ = ["ClientAlgorithm", "ServerStrategy"]
