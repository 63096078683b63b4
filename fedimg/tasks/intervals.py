"""95% bootstrap intervals of a site's metrics, computed where the per-case values are: at the site.

Per-case scores never leave a site; only the two bounds of each interval do,
as ordinary scalar metrics named ``<metric>_ci_low`` and ``<metric>_ci_high``
(``dice_mean_ci_low`` in a site's results, ``val_dice_ci_low`` once flattened
by :func:`fedimg.tasks.metric_names`). The interval is the percentile
bootstrap: :data:`RESAMPLES` resamples of the cases with replacement, the
metric of each, the 2.5th and 97.5th percentiles. The generator is seeded, so
the same cases and scores give the same interval on every run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

RESAMPLES = 1000
SEED = 0
LEVEL = 0.95
LOW, HIGH = "_ci_low", "_ci_high"


def interval_keys(name: str) -> tuple[str, str]:
    """The names of the lower and upper bound of ``name``'s interval (``val_dice`` -> ``val_dice_ci_low``, ...)."""
    return name + LOW, name + HIGH


def is_interval_bound(name: str) -> bool:
    """Whether ``name`` is the bound of an interval (these are never averaged over sites: no mean of them is one)."""
    return name.endswith((LOW, HIGH))


def resample_indices(n: int, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """``(resamples, n)`` case indices drawn with replacement by a seeded generator."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def percentile_interval(stats: np.ndarray, level: float = LEVEL) -> tuple[float, float] | None:
    """The central ``level`` percentile interval of the finite bootstrap statistics.

    None when fewer than half the resamples gave a defined statistic (e.g. an
    AUC when most resamples hold one class only): such an interval would
    describe the few lucky resamples, not the site.
    """
    finite = stats[np.isfinite(stats)]
    if finite.size == 0 or finite.size < stats.size / 2:
        return None
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(finite, [tail, 1.0 - tail])
    return float(low), float(high)


def mean_interval(values: Sequence[float] | np.ndarray, seed: int = SEED) -> tuple[float, float] | None:
    """The 95% bootstrap interval of the mean of per-case values (None for fewer than 2 cases)."""
    arr = np.asarray(values, dtype=float).reshape(-1)
    arr = arr[np.isfinite(arr)]
    if arr.size < 2:
        return None
    return percentile_interval(arr[resample_indices(arr.size, seed=seed)].mean(axis=1))


def case_interval(n: int, statistic: Callable[[np.ndarray], float], seed: int = SEED) -> tuple[float, float] | None:
    """The 95% bootstrap interval of ``statistic(indices)`` over resamples of ``n`` cases (None below 2 cases).

    Args:
        n: the number of cases.
        statistic: the metric of the cases at the given indices (NaN where undefined).
    """
    if n < 2:
        return None
    idx = resample_indices(n, seed=seed)
    return percentile_interval(np.array([statistic(row) for row in idx], dtype=float))


def add_interval(out: dict[str, float], name: str, interval: tuple[float, float] | None) -> None:
    """Store ``interval`` as ``<name>_ci_low`` and ``<name>_ci_high`` in ``out`` (nothing when it is None)."""
    if interval is None:
        return
    low, high = interval_keys(name)
    out[low], out[high] = interval


def rank_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC from ranks (the Mann-Whitney statistic, ties counted half); NaN when one class is absent.

    The same number as :func:`monai.metrics.compute_roc_auc`, fast enough for a thousand resamples.
    """
    pos = np.asarray(positive, dtype=bool)
    n_pos = int(pos.sum())
    n_neg = pos.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(scores.size, dtype=float)
    sorted_scores = scores[order]
    # Average ranks over ties.
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))
