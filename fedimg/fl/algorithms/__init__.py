"""The federated algorithms: one module each (server strategy + site part), one registry.

=========  ==========================================  ====================================
name       server (:class:`base.ServerStrategy`)       site (:class:`base.ClientAlgorithm`)
=========  ==========================================  ====================================
fedavg     average of the updates                      plain local training
fedprox    average; ``mu`` sent with every task        proximal term on every step
fedopt     server optimizer step on the average        plain local training
scaffold   average; global control variates            control-variate correction
fedbn      average of all but normalization layers     normalization layers stay local
=========  ==========================================  ====================================

The names are the values of ``fed.algorithm`` (:class:`fedimg.config.FedConfig`);
a test keeps the two lists equal. Server strategies import no NVFlare, so
they are unit-tested on their own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedimg.config import ExperimentConfig
from fedimg.fl.algorithms.base import ClientAlgorithm, ServerStrategy
from fedimg.fl.algorithms.fedavg import FedAvgClient, FedAvgServer
from fedimg.fl.algorithms.fedbn import FedBNClient, FedBNServer
from fedimg.fl.algorithms.fedopt import FedOptClient, FedOptServer
from fedimg.fl.algorithms.fedprox import FedProxClient, FedProxServer
from fedimg.fl.algorithms.scaffold import ScaffoldClient, ScaffoldServer

if TYPE_CHECKING:
    from fedimg.training.trainer import SiteTrainer


@dataclass(frozen=True)
class Algorithm:
    """An algorithm's two parts."""

    name: str
    server: type[ServerStrategy]
    client: type[ClientAlgorithm]


REGISTRY: dict[str, Algorithm] = {
    a.name: a
    for a in (
        Algorithm("fedavg", FedAvgServer, FedAvgClient),
        Algorithm("fedprox", FedProxServer, FedProxClient),
        Algorithm("fedopt", FedOptServer, FedOptClient),
        Algorithm("scaffold", ScaffoldServer, ScaffoldClient),
        Algorithm("fedbn", FedBNServer, FedBNClient),
    )
}


def _get(name: str) -> Algorithm:
    if name not in REGISTRY:
        raise ValueError(f"fed.algorithm must be one of {', '.join(REGISTRY)}, got {name!r}")
    return REGISTRY[name]


def server_strategy(exp: ExperimentConfig) -> ServerStrategy:
    """The server part of ``exp.fed.algorithm`` (call :meth:`ServerStrategy.setup` with the initial model)."""
    return _get(exp.fed.algorithm).server(exp)


def client_algorithm(name: str, trainer: SiteTrainer) -> ClientAlgorithm:
    """The site part of ``fed.algorithm``.

    Raises:
        ValueError: an unknown name, or FedBN on a network without normalization layers.
    """
    algo = _get(name).client(trainer)
    if name == "fedbn" and not algo.local_keys:
        raise ValueError(
            "fed.algorithm fedbn: the model has no normalization layers with parameters or "
            "statistics; set model.norm: batch"
        )
    return algo


__all__ = ["REGISTRY", "Algorithm", "ClientAlgorithm", "ServerStrategy", "client_algorithm", "server_strategy"]
