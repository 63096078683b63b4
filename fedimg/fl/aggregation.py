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


def _float_keys(params: Mapping[str, np.ndarray]) -> list[str]:
    return [k for k, v in params.items() if np.issubdtype(np.asarray(v).dtype, np.floating)]


def screen_updates(updates: Sequence[Update], global_params: Mapping[str, np.ndarray], is_diff: bool,
                   norm_outlier_factor: float = 0.0, max_update_norm: float = 0.0,
                   min_cosine: float | None = None) -> tuple[list[Update], dict[str, str]]:
    """Reject updates that are broken or far from the majority, before aggregation.

    Every check works on the change a site proposes (its difference, or its
    weights minus the global weights), over the floating-point entries:

    * any NaN or infinite value: always rejected;
    * L2 norm above ``max_update_norm`` (when > 0);
    * L2 norm above ``norm_outlier_factor`` x the round's median norm (when > 0, >= 3 updates);
    * cosine similarity with the coordinate-wise median change below
      ``min_cosine`` (when set, >= 3 updates).

    Returns:
        (accepted updates, site -> reason of each rejection). Reasons carry
        numbers only, never values of the model.
    """
    rejected: dict[str, str] = {}
    changes: dict[str, np.ndarray] = {}
    ok: list[Update] = []
    for u in updates:
        keys = _float_keys(u.params)
        parts = []
        for k in keys:
            a = np.asarray(u.params[k], dtype=np.float64).ravel()
            if not is_diff and k in global_params:
                a = a - np.asarray(global_params[k], dtype=np.float64).ravel()
            parts.append(a)
        vec = np.concatenate(parts) if parts else np.zeros(0)
        bad = int((~np.isfinite(vec)).sum())
        if bad:
            rejected[u.site] = f"NON_FINITE: {bad} NaN/infinite value(s) in the update"
            continue
        changes[u.site] = vec
        ok.append(u)
    norms = {s: float(np.linalg.norm(v)) for s, v in changes.items()}
    if max_update_norm > 0:
        for s, n in norms.items():
            if n > max_update_norm:
                rejected[s] = f"NORM_TOO_LARGE: update norm {n:.4g} > fed.robust.max_update_norm {max_update_norm:.4g}"
    live = [s for s in norms if s not in rejected]
    if norm_outlier_factor > 0 and len(live) >= 3:
        med = float(np.median([norms[s] for s in live]))
        for s in live:
            if med > 0 and norms[s] > norm_outlier_factor * med:
                rejected[s] = (f"NORM_OUTLIER: update norm {norms[s]:.4g} is {norms[s] / med:.1f} x the round's "
                               f"median {med:.4g} (limit {norm_outlier_factor:g} x)")
    live = [s for s in norms if s not in rejected]
    if min_cosine is not None and len(live) >= 3 and len({changes[s].size for s in live}) == 1:
        center = np.median(np.stack([changes[s] for s in live]), axis=0)
        cn = float(np.linalg.norm(center))
        for s in live:
            denom = norms[s] * cn
            cos = float(changes[s] @ center / denom) if denom > 0 else 1.0
            if cos < min_cosine:
                rejected[s] = (f"DIRECTION_OUTLIER: cosine {cos:.3f} with the round's median update is below "
                               f"fed.robust.min_cosine {min_cosine:g}")
    return [u for u in ok if u.site not in rejected], rejected
