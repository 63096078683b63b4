"""Fault injection for robustness experiments: a site that sends a poisoned or broken update.

:class:`PoisonUpdate` is an NVFlare task-result filter. Added to one site's
``train`` results (``recipe.add_client_output_filter(..., clients=[site])``)
it turns that site into a faulty or malicious participant, so the server's
screening and robust aggregation (``fed.robust``) can be measured against
the clean run (``benchmarks/bench_robustness.py``, ``tests/fl/test_robustness.py``).
:class:`TamperResult` makes a site lie about everything else it reports: its
aggregation weight, the entries and shapes of its update, its metrics; the
server must reject what does not fit and go on (``tests/safety``).
It never belongs in a production job.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

POISON_MODES = ("scale", "sign_flip", "nan")
TAMPER_MODES = ("steps", "extra_entry", "shape", "metric")


class PoisonUpdate(DXOFilter):
    """Corrupt the floating-point entries of a site's update.

    Modes (on the update a site sends: its difference with ``fed.exchange:
    diff``, its full weights otherwise):

    * ``scale``: multiply by ``factor`` (a boosted update, e.g. x100);
    * ``sign_flip``: multiply by ``-factor`` (an update pushing away from the
      site's own descent direction);
    * ``nan``: set a ``fraction`` of the entries to NaN (a broken site).

    Args:
        mode: one of ``scale``, ``sign_flip``, ``nan``.
        factor: multiplier for ``scale`` / ``sign_flip`` (> 0).
        fraction: share of entries set to NaN for ``nan``, in (0, 1].
        from_round: first round that is poisoned (earlier rounds are honest).

    Raises:
        ValueError: a mode or parameter out of range.
    """

    def __init__(self, mode: str = "scale", factor: float = 100.0, fraction: float = 0.01, from_round: int = 0) -> None:
        super().__init__(
            supported_data_kinds=[DataKind.WEIGHT_DIFF, DataKind.WEIGHTS],
            data_kinds_to_filter=[DataKind.WEIGHT_DIFF, DataKind.WEIGHTS],
        )
        if mode not in POISON_MODES:
            raise ValueError(f"PoisonUpdate mode must be one of {', '.join(POISON_MODES)}, got {mode!r}")
        if not (isinstance(factor, (int, float)) and np.isfinite(factor) and factor > 0):
            raise ValueError(f"PoisonUpdate factor must be a finite number > 0, got {factor!r}")
        if not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
            raise ValueError(f"PoisonUpdate fraction must be in (0, 1], got {fraction!r}")
        if not (isinstance(from_round, int) and from_round >= 0):
            raise ValueError(f"PoisonUpdate from_round must be an int >= 0, got {from_round!r}")
        self.mode = mode
        self.factor = float(factor)
        self.fraction = float(fraction)
        self.from_round = from_round

    def _corrupt(self, a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self.mode == "scale":
            return (a * self.factor).astype(a.dtype)
        if self.mode == "sign_flip":
            return (a * -self.factor).astype(a.dtype)
        out = a.copy()
        flat = out.reshape(-1)
        n = max(1, int(round(self.fraction * flat.size)))
        flat[rng.choice(flat.size, size=min(n, flat.size), replace=False)] = np.nan
        return out

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO:
        """Corrupt the update from ``from_round`` on."""
        rnd = int(shareable.get_header("current_round") or fl_ctx.get_prop("current_round", 0) or 0)
        if rnd < self.from_round:
            return dxo
        rng = np.random.default_rng(rnd)
        out: dict[str, Any] = {}
        for k, v in dxo.data.items():
            a = np.asarray(v)
            out[k] = self._corrupt(a, rng) if np.issubdtype(a.dtype, np.floating) else v
        dxo.data = out
        self.log_warning(fl_ctx, f"fault injection: round {rnd} update poisoned ({self.mode})", fire_event=False)
        return dxo


class TamperResult(DXOFilter):
    """Falsify what a site reports besides its update's values.

    Modes:

    * ``steps``: report ``value`` as ``NUM_STEPS_CURRENT_ROUND`` (the aggregation weight);
    * ``extra_entry``: add an entry ``injected`` the model does not have;
    * ``shape``: send the first floating-point entry as one value (shape ``(1,)``);
    * ``metric``: report ``value`` for the metric ``metric`` (training and validation results).

    Args:
        mode: one of :data:`TAMPER_MODES`.
        value: the number reported (``steps``, ``metric``).
        metric: the metric's name (``metric``).
        rounds: the rounds tampered with (None: every round; validation tasks
            after the last round count as that round).

    Raises:
        ValueError: an unknown mode.
    """

    def __init__(self, mode: str, value: float = 0.0, metric: str = "val_auc", rounds: list[int] | None = None) -> None:
        super().__init__(
            supported_data_kinds=[DataKind.WEIGHT_DIFF, DataKind.WEIGHTS, DataKind.METRICS],
            data_kinds_to_filter=[DataKind.WEIGHT_DIFF, DataKind.WEIGHTS, DataKind.METRICS],
        )
        if mode not in TAMPER_MODES:
            raise ValueError(f"TamperResult mode must be one of {', '.join(TAMPER_MODES)}, got {mode!r}")
        self.mode = mode
        self.value = value
        self.metric = metric
        self.rounds = rounds

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO:
        """Falsify the result in the configured rounds."""
        rnd = int(shareable.get_header("current_round") or fl_ctx.get_prop("current_round", 0) or 0)
        if self.rounds is not None and rnd not in self.rounds:
            return dxo
        if self.mode == "metric":
            if dxo.data_kind == DataKind.METRICS:
                dxo.data[self.metric] = self.value
            elif isinstance(dxo.get_meta_prop("initial_metrics"), dict):
                dxo.meta["initial_metrics"][self.metric] = self.value
        elif dxo.data_kind == DataKind.METRICS:
            return dxo
        elif self.mode == "steps":
            dxo.set_meta_prop("NUM_STEPS_CURRENT_ROUND", self.value)
        elif self.mode == "extra_entry":
            dxo.data["injected"] = np.zeros(3, dtype=np.float32)
        else:
            key = next(k for k, v in dxo.data.items() if np.issubdtype(np.asarray(v).dtype, np.floating))
            dxo.data[key] = np.zeros(1, dtype=np.float32)
        self.log_warning(fl_ctx, f"fault injection: round {rnd} result falsified ({self.mode})", fire_event=False)
        return dxo


__all__ = ["POISON_MODES", "PoisonUpdate", "TAMPER_MODES", "TamperResult"]
