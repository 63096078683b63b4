"""Server-side aggregation rules over site updates (pure NumPy, no NVFlare import).

``mean`` is FedAvg's weighted average. ``median`` (coordinate-wise) and
``trimmed_mean`` (coordinate-wise, dropping the ``trim`` largest and smallest
values of every entry) are the robust rules of Yin et al. 2018: a single
poisoned update cannot move them arbitrarily far, at the price of ignoring
the sites' sample counts.

An entry a site does not send (FedBN's site-local normalization layers) is
aggregated over the sites that sent it; the global model keeps its value when
no site sent it.

Nothing a site reports is trusted. Before screening and aggregation the
server checks, with the pure functions here:

* :func:`check_update`: the update (and SCAFFOLD's control change) has
  exactly the global model's entries, shapes and number types, all finite;
* :func:`check_weight`: the aggregation weight (the site's reported optimizer
  steps) is a finite number in ``(0, cap]``;
* :func:`check_metrics`: validation metrics are numbers in their range
  (Dice, AUC, sensitivity, specificity, accuracy in [0, 1], the bounds of
  their intervals too; HD95 and the voxel size >= 0; case counts whole
  numbers up to :data:`MAX_CASES_PER_SITE`).

A failed check rejects the site's update (or its metrics) with a reason code
and the site named; it never stops the server.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, get_args

import numpy as np

from fedimg.config import AggregationMethod, ExperimentConfig
from fedimg.fl.protocol import MAX_ENTRIES, MAX_NAME, is_number
from fedimg.tasks.intervals import is_interval_bound
from fedimg.training.checkpoint import state_problem

METHODS: tuple[str, ...] = get_args(AggregationMethod)

# A generous bound on one site's cases (training or validation): case counts above it are not believed, and
# the default bound on a round's optimizer steps is derived from it (:func:`max_steps_per_round`).
MAX_CASES_PER_SITE = 100_000

# Metric families by name (after "val_", "/" read as "_"), most specific first: their valid ranges.
_UNIT_INTERVAL = ("balanced_accuracy", "accuracy", "sensitivity", "specificity", "dice", "auc")
_COUNTS = ("hd95_undefined", "cases")
_NON_NEGATIVE = ("hd95", "voxel_mm")
# Reported per site, never averaged: a mean of interval bounds is no interval, a mean of voxel sizes no voxel size.
_NOT_AVERAGED = ("voxel_mm",)


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
        if method == "mean" or len(arrays) == 1:
            value = _weighted_sum(arrays, [u.weight for u in present])
        else:
            stack = np.stack([a.astype(np.float64) for a in arrays])
            if method == "median" or len(arrays) <= 2 * trim:
                value = np.median(stack, axis=0)
            else:
                value = np.sort(stack, axis=0)[trim : len(arrays) - trim].mean(axis=0)
        if np.issubdtype(dtype, np.integer):
            value = np.rint(value)
        out[key] = value.astype(dtype if not np.issubdtype(dtype, np.floating) else np.float32, copy=False)
    return out


def _weighted_sum(arrays: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """FedAvg's weighted mean of one entry: float32 in place for floating entries (as fast as a plain sum)."""
    w = np.asarray([max(x, 0.0) for x in weights], dtype=np.float64)
    w = w / w.sum() if w.sum() > 0 else np.full(len(arrays), 1.0 / len(arrays))
    floating = all(np.issubdtype(a.dtype, np.floating) for a in arrays)
    work = np.float32 if floating else np.float64  # integer counters: exact before rounding
    acc = np.multiply(arrays[0], work(w[0]), dtype=work)
    for a, wi in zip(arrays[1:], w[1:]):
        acc += np.multiply(a, work(wi), dtype=work)
    return acc


def weighted_metrics(per_site: Mapping[str, Mapping[str, float]], weights: Mapping[str, float]) -> dict[str, float]:
    """Weighted mean of each metric over the sites that report it (finite values only).

    The bounds of a site's bootstrap interval (``*_ci_low``, ``*_ci_high``)
    and its voxel size are left out: they describe one site's cases.

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
            if is_interval_bound(k) or _family(k) in _NOT_AVERAGED:
                continue
            sums[k] = sums.get(k, 0.0) + w * float(v)
            norms[k] = norms.get(k, 0.0) + w
    return {k: sums[k] / norms[k] for k in sums if norms[k] > 0}


def _float_keys(params: Mapping[str, np.ndarray]) -> list[str]:
    return [k for k, v in params.items() if np.issubdtype(np.asarray(v).dtype, np.floating)]


def _change_vector(u: Update, global_params: Mapping[str, np.ndarray], is_diff: bool) -> np.ndarray:
    """A site's proposed change over its floating entries, as one float64 vector."""
    parts = []
    for k in _float_keys(u.params):
        a = np.asarray(u.params[k], dtype=np.float64).ravel()
        if not is_diff and k in global_params:
            a = a - np.asarray(global_params[k], dtype=np.float64).ravel()
        parts.append(a)
    return np.concatenate(parts) if parts else np.zeros(0)


def screen_updates(
    updates: Sequence[Update],
    global_params: Mapping[str, np.ndarray],
    is_diff: bool,
    norm_outlier_factor: float = 0.0,
    max_update_norm: float = 0.0,
    min_cosine: float | None = None,
) -> tuple[list[Update], dict[str, str]]:
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
    norms: dict[str, float] = {}
    ok: list[Update] = []
    for u in updates:
        bad, squares = 0, 0.0
        for k in _float_keys(u.params):
            a = np.asarray(u.params[k])
            if not np.isfinite(a).all():
                bad += int((~np.isfinite(a)).sum())
                continue
            change = a if is_diff or k not in global_params else a - np.asarray(global_params[k], dtype=a.dtype)
            flat = change.ravel()
            squares += float(np.dot(flat, flat))  # entry by entry: no copy of the whole update
        if bad:
            rejected[u.site] = f"NON_FINITE: {bad} NaN/infinite value(s) in the update"
            continue
        norms[u.site] = math.sqrt(squares)
        ok.append(u)
    if max_update_norm > 0:
        for s, n in norms.items():
            if n > max_update_norm:
                rejected[s] = f"NORM_TOO_LARGE: update norm {n:.4g} > fed.robust.max_update_norm {max_update_norm:.4g}"
    live = [s for s in norms if s not in rejected]
    if norm_outlier_factor > 0 and len(live) >= 3:
        med = float(np.median([norms[s] for s in live]))
        for s in live:
            if med > 0 and norms[s] > norm_outlier_factor * med:
                rejected[s] = (
                    f"NORM_OUTLIER: update norm {norms[s]:.4g} is {norms[s] / med:.1f} x the round's "
                    f"median {med:.4g} (limit {norm_outlier_factor:g} x)"
                )
    # The direction check needs whole vectors: built only when it is configured.
    changes = {u.site: _change_vector(u, global_params, is_diff) for u in ok} if min_cosine is not None else {}
    live = [s for s in norms if s not in rejected]
    if min_cosine is not None and len(live) >= 3 and len({changes[s].size for s in live}) == 1:
        center = np.median(np.stack([changes[s] for s in live]), axis=0)
        cn = float(np.linalg.norm(center))
        for s in live:
            denom = norms[s] * cn
            cos = float(changes[s] @ center / denom) if denom > 0 else 1.0
            if cos < min_cosine:
                rejected[s] = (
                    f"DIRECTION_OUTLIER: cosine {cos:.3f} with the round's median update is below "
                    f"fed.robust.min_cosine {min_cosine:g}"
                )
    return [u for u in ok if u.site not in rejected], rejected


def check_update(
    params: Any, global_params: Mapping[str, np.ndarray], *, local_keys: Iterable[str] = (), fp16: bool = False
) -> str | None:
    """Why a site's update cannot be aggregated (None: it can).

    The update must hold exactly the global model's entries (the algorithm's
    site-local entries, FedBN's normalization layers, may be absent; nothing
    else), each of the global entry's shape; floating entries as float32 or
    float64 (float16 too with ``fed.update_precision: fp16``), integer
    counters as numbers; every value finite. The same rule checks SCAFFOLD's
    control-variate change against the server's controls.

    Returns:
        ``"CODE: explanation"`` (``NOT_A_STATE``, ``UNKNOWN_KEY``,
        ``MISSING_KEY``, ``DTYPE``, ``SHAPE_MISMATCH``, ``NON_FINITE``), or None.
    """
    floats = ("float16", "float32", "float64") if fp16 else ("float32", "float64")
    return state_problem(params, global_params, optional=frozenset(local_keys), float_dtypes=floats)


def check_weight(value: Any, cap: float) -> tuple[float | None, str | None]:
    """The aggregation weight a site reported (its optimizer steps of the round), checked.

    Args:
        value: the reported ``NUM_STEPS_CURRENT_ROUND``.
        cap: the largest weight believed (see ``fed.max_steps_per_round``).

    Returns:
        ``(weight, None)`` for a finite number in ``(0, cap]``, else
        ``(None, "BAD_WEIGHT: ...")`` or ``(None, "WEIGHT_TOO_LARGE: ...")``.
    """
    if not is_number(value):
        return None, (
            f"BAD_WEIGHT: NUM_STEPS_CURRENT_ROUND must be a number of optimizer steps, got "
            f"{'nothing' if value is None else 'a ' + type(value).__name__}"
        )
    weight = float(value)
    if not math.isfinite(weight) or weight <= 0:
        return None, f"BAD_WEIGHT: NUM_STEPS_CURRENT_ROUND must be finite and > 0, got {weight!r}"
    if weight > cap:
        return None, f"WEIGHT_TOO_LARGE: NUM_STEPS_CURRENT_ROUND {weight:.6g} > the bound {cap:.6g}"
    return weight, None


def _family(name: str) -> str | None:
    stem = name.split("_", 1)[1] if name.startswith(("val_", "test_")) else name
    stem = stem.replace("/", "_")
    for family in (*_COUNTS, *_UNIT_INTERVAL, *_NON_NEGATIVE):
        if stem.startswith(family):
            return family
    return None


def check_metrics(metrics: Any, max_cases: int = MAX_CASES_PER_SITE) -> str | None:
    """Why a site's validation metrics cannot be used (None: they can).

    Every value must be a number; ``NaN`` means undefined (e.g. the Dice of
    a class absent from every case) and is skipped by the means, an infinite
    value is invalid. By name (``val_`` prefix optional, ``/`` read as ``_``):
    ``dice*``, ``auc*``, ``sensitivity*``, ``specificity*``,
    ``*accuracy*`` in [0, 1] (their interval bounds ``*_ci_low``/``*_ci_high``
    too); ``hd95*`` and ``voxel_mm`` >= 0; ``cases`` and
    ``hd95_undefined*`` whole numbers in [0, ``max_cases``]. Other names need
    only be finite. At most :data:`fedimg.fl.protocol.MAX_ENTRIES` metrics.

    Returns:
        ``"CODE: explanation"`` (``NOT_METRICS``, ``NOT_A_NUMBER``,
        ``NON_FINITE``, ``OUT_OF_RANGE``), naming the metric family, never a
        name the site chose; or None.
    """
    if not isinstance(metrics, Mapping) or len(metrics) > MAX_ENTRIES:
        return f"NOT_METRICS: expected a mapping of at most {MAX_ENTRIES} metrics"
    for name, value in metrics.items():
        if not isinstance(name, str) or len(name) > MAX_NAME:
            return f"NOT_METRICS: a metric name that is not a string of at most {MAX_NAME} characters"
        family = _family(name)
        what = f"a {family} metric" if family else "a metric"
        if not is_number(value):
            return f"NOT_A_NUMBER: {what} is a {type(value).__name__}"
        v = float(value)
        if math.isnan(v):
            continue
        if not math.isfinite(v):
            return f"NON_FINITE: {what} is {v}"
        if family in _UNIT_INTERVAL and not 0.0 <= v <= 1.0:
            return f"OUT_OF_RANGE: {what} is {v:.6g}, outside [0, 1]"
        if family in _NON_NEGATIVE and v < 0:
            return f"OUT_OF_RANGE: {what} is {v:.6g}, below 0"
        if family in _COUNTS and not (v.is_integer() and 0 <= v <= max_cases):
            return f"OUT_OF_RANGE: {what} is {v:.6g}, not a whole number in [0, {max_cases}]"
    return None


def max_steps_per_round(exp: ExperimentConfig) -> int:
    """The largest number of optimizer steps per round the server believes a site did (its aggregation weight).

    ``fed.max_steps_per_round`` when set; otherwise derived: ``train.local_epochs
    x ceil(MAX_CASES_PER_SITE / data.batch_size)``, the steps of a site with
    :data:`MAX_CASES_PER_SITE` training cases (one step
    per batch of cases, as the training loader and Opacus' Poisson loader
    both take).
    """
    if exp.fed.max_steps_per_round:
        return int(exp.fed.max_steps_per_round)
    return int(exp.train.local_epochs * math.ceil(MAX_CASES_PER_SITE / exp.data.batch_size))
