"""FedAvg (McMahan et al. 2017): sites train locally, the server averages their updates.

The average is weighted by each site's optimizer steps of the round; with
``fed.robust.aggregation`` ``median`` or ``trimmed_mean`` it is the robust
coordinate-wise rule instead (:func:`fedimg.fl.aggregation.aggregate`).
"""

from __future__ import annotations

from fedimg.fl.algorithms.base import ClientAlgorithm, ServerStrategy


class FedAvgServer(ServerStrategy):
    """The plain (or robust) average of the updates."""


class FedAvgClient(ClientAlgorithm):
    """Plain local training."""


__all__ = ["FedAvgClient", "FedAvgServer"]
