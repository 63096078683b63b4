"""Server-side aggregation rules over site updates (pure NumPy, no NVFlare import).

``mean`` is FedAvg's weighted average. ``median`` (coordinate-wise) and
``trimmed_mean`` (coordinate-wise, dropping the ``trim`` largest and smallest
values of every entry) are the robust rules of Yin et al. 2018: a single
poisoned update cannot move them arbitrarily far, at the price of ignoring
the sites' sample counts.

An entry a site does not send (FedBN's site-local normalization layers) is
aggregated over the sites that sent it; the global model keeps its value when
no site sent it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

METHODS = ("mean", "median", "trimmed_mean")


@dataclass(frozen=True)
class Update:
    """One site's contribution to a round.

    Attributes:
        site: the site's name.
        params: entry name -> array (fp32 for floating entries).
        weight: aggregation weight (FedAvg: optimizer steps of the round).
    """

    site: str
    params: Mapping[str, np.ndarray]
    weight: float


def aggregate(updates: Sequence[Update], method: str = "mean", trim: int = 1) -> dict[str, np.ndarray]:
    """Combine updates entry by entry.

    Args:
        updates: at least one update.
        method: ``mean`` (weighted), ``median`` or ``trimmed_mean``.
        trim: values dropped at each end per entry for ``trimmed_mean``; with
            too few updates to drop ``2 * trim``, the median is used.

    Raises:
        ValueError: no updates, an unknown method, or entries whose shapes disagree.
    """
    if not updates:
        raise ValueError("no updates to aggregate")
    if method not in METHODS:
        raise ValueError(f"aggregation must be one of {', '.join(METHODS)}, got {method!r}")
    keys: list[str] = []
    for u in updates:
        keys.extend(k for k in u.params if k not in keys)
    out: dict[str, np.ndarray] = {}
    for key in keys:
        present = [u for u in updates if key in u.params]
        arrays = [np.asarray(u.params[key]) for u in present]
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1:
            raise ValueError(f"entry {key}: sites sent different shapes {sorted(shapes)}")
        dtype = arrays[0].dtype
        stack = np.stack([a.astype(np.float64) for a in arrays])
        if method == "mean" or len(arrays) == 1:
            w = np.asarray([max(u.weight, 0.0) for u in present], dtype=np.float64)
            if w.sum() <= 0:
                w = np.ones_like(w)
            value = np.tensordot(w / w.sum(), stack, axes=1)
        elif method == "median" or len(arrays) <= 2 * trim:
            value = np.median(stack, axis=0)
        else:
            s = np.sort(stack, axis=0)
            value = s[trim:len(arrays) - trim].mean(axis=0)
        if np.issubdtype(dtype, np.integer):
            value = np.rint(value)
        out[key] = value.astype(dtype if not np.issubdtype(dtype, np.floating) else np.float32)
    return out


def weighted_metrics(per_site: Mapping[str, Mapping[str, float]], weights: Mapping[str, float]) -> dict[str, float]:
    """Weighted mean of each metric over the sites that report it (finite values only).

    Args:
        per_site: site -> metrics.
        weights: site -> weight (e.g. validation cases).
    """
    sums: dict[str, float] = {}
    norms: dict[str, float] = {}
    for site, metrics in per_site.items():
        w = float(weights.get(site, 1.0))
        for k, v in metrics.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                continue
            sums[k] = sums.get(k, 0.0) + w * float(v)
            norms[k] = norms.get(k, 0.0) + w
    return {k: sums[k] / norms[k] for k in sums if norms[k] > 0}
