"""Privacy filters a site applies to what it sends: update-level DP, NVFlare's sparsifiers, a scalar-only guard.

All are NVFlare task-result filters, usable two ways:

* **job-specified**: the experiment's ``privacy`` section adds them to the
  job (every site runs them because the job says so);
* **site-enforced**: a site lists them in a scope of its own
  ``local/privacy.json`` (``configs/federation/privacy.json``); a job that
  asks for that scope gets them whatever the job says, and a job asking for
  a scope the site does not define is refused by the site.

Every filter checks its parameters when it is built and raises a
``ValueError`` that names the parameter, the value and the allowed range:
NVFlare's own ``PercentilePrivacy`` silently does nothing on a bad value.

:class:`GaussianUpdateDP` is the Gaussian mechanism on a site's model update
(DP-FedAvg style, Abadi et al. 2016 / McMahan et al. 2018, applied at the
site): the update (local minus global weights) is clipped to L2 norm ``C``
and Gaussian noise of standard deviation ``noise_multiplier * C`` is added to
every entry. A site's whole update is the unit of privacy (site-level DP under
add/remove of one site's contribution); every round is one release, so the
guarantee composes over rounds. The privacy spent, ``epsilon`` at ``delta``,
is computed by Opacus' RDP accountant (sample rate 1: every round) and sent
with every update, so the server records it. If the site also trained with
DP-SGD, the client's ``{"dp_sgd": {...}}`` record in the same meta entry is
kept under ``dp_sgd`` beside the Gaussian mechanism's fields: the two
guarantees protect different units (a case vs a site's whole update) and are
reported separately, not composed.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import numpy as np
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.filters.percentile_privacy import PercentilePrivacy
from nvflare.app_common.filters.svt_privacy import SVTPrivacy

from fedimg.fl.protocol import RESULT_META_DP

DP_META = RESULT_META_DP
GUARD_META = "fedimg_guard"


def _positive(name: str, value: Any, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return float(value)


def _in_range(name: str, value: Any, low: float, high: float, low_open: bool = False, high_open: bool = False) -> float:
    v = _positive(name, value, allow_zero=True) if low >= 0 else float(value)
    ok = (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not ok:
        raise ValueError(f"{name} must be in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}, "
                         f"got {value!r}")
    return v


def gaussian_epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """Privacy spent by ``rounds`` releases of the Gaussian mechanism (Opacus' RDP accountant)."""
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    for _ in range(rounds):
        acc.step(noise_multiplier=noise_multiplier, sample_rate=1.0)
    return float(acc.get_epsilon(delta)) if rounds else 0.0


def _site_and_round(fl_ctx: FLContext, shareable: Shareable) -> tuple[str, int]:
    site = fl_ctx.get_identity_name() or "site"
    rnd = shareable.get_header("current_round")
    if rnd is None:
        rnd = fl_ctx.get_prop("current_round", 0)
    return site, int(rnd or 0)


class GaussianUpdateDP(DXOFilter):
    """Clip a site's update to L2 norm ``clip_norm`` and add Gaussian noise (std ``noise_multiplier * clip_norm``).

    Args:
        clip_norm: L2 bound ``C`` of the update, over every floating-point entry (> 0).
        noise_multiplier: ``sigma``; noise std is ``sigma * C`` (> 0).
        delta: the ``delta`` at which ``epsilon`` is reported (in (0, 1)).
        seed: noise seed for reproducible experiments (combined with the site
            and the round); None draws fresh OS entropy, which is what a real
            deployment should use.

    Raises:
        ValueError: a parameter out of range, named with the value received.
    """

    def __init__(self, clip_norm: float = 1.0, noise_multiplier: float = 1.0, delta: float = 1e-5,
                 seed: int | None = None) -> None:
        super().__init__(supported_data_kinds=[DataKind.WEIGHT_DIFF, DataKind.WEIGHTS],
                         data_kinds_to_filter=[DataKind.WEIGHT_DIFF, DataKind.WEIGHTS])
        self.clip_norm = _positive("GaussianUpdateDP clip_norm", clip_norm)
        self.noise_multiplier = _positive("GaussianUpdateDP noise_multiplier", noise_multiplier)
        self.delta = _in_range("GaussianUpdateDP delta", delta, 0.0, 1.0, low_open=True, high_open=True)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"GaussianUpdateDP seed must be a non-negative int or null, got {seed!r}")
        self.seed = seed
        self.releases = 0

    def _rng(self, site: str, rnd: int) -> np.random.Generator:
        if self.seed is None:
            return np.random.default_rng()
        digest = hashlib.sha256(f"{self.seed}|{site}|{rnd}".encode()).digest()
        return np.random.default_rng(int.from_bytes(digest[:8], "little"))

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO:
        """Clip and noise the update; record the mechanism and the privacy spent in the DXO meta."""
        if dxo.data_kind != DataKind.WEIGHT_DIFF:
            # Clipping full weights would destroy the model; the update is the difference.
            raise ValueError("GaussianUpdateDP needs model differences: set fed.exchange: diff in the experiment "
                             f"(this site received a {dxo.data_kind} result)")
        site, rnd = _site_and_round(fl_ctx, shareable)
        params = dxo.data
        floats = [k for k, v in params.items() if np.issubdtype(np.asarray(v).dtype, np.floating)]
        norm = math.sqrt(sum(float(np.sum(np.asarray(params[k], dtype=np.float64) ** 2)) for k in floats))
        scale = min(1.0, self.clip_norm / norm) if norm > 0 else 1.0
        rng = self._rng(site, rnd)
        std = self.noise_multiplier * self.clip_norm
        out = dict(params)
        for k in floats:
            a = np.asarray(params[k], dtype=np.float64)
            noisy = a * scale + rng.normal(0.0, std, size=a.shape)
            out[k] = noisy.astype(np.asarray(params[k]).dtype)
        self.releases += 1
        eps = gaussian_epsilon(self.noise_multiplier, self.releases, self.delta)
        dxo.data = out
        record = {"mechanism": "gaussian", "clip_norm": self.clip_norm, "noise_multiplier": self.noise_multiplier,
                  "noise_std": std, "releases": self.releases, "epsilon": eps, "delta": self.delta}
        # The raw update norm (or whether it was clipped) depends on the data and is not covered by the
        # guarantee: it is neither sent nor logged (site logs can be streamed to the server).
        prior = dxo.get_meta_prop(DP_META)
        if isinstance(prior, dict) and isinstance(prior.get("dp_sgd"), dict):
            # The site trained with DP-SGD too: keep its (sample-level) record beside this (site-level) one.
            record["dp_sgd"] = prior["dp_sgd"]
        dxo.set_meta_prop(DP_META, record)
        self.log_info(fl_ctx, f"DP: update clipped to norm <= {self.clip_norm:.4g}, noise std {std:.4g}; epsilon "
                              f"{eps:.3f} at delta {self.delta:g} after {self.releases} release(s)")
        return dxo


class ValidatedPercentilePrivacy(PercentilePrivacy):
    """NVFlare's ``PercentilePrivacy`` (share only the largest ``100 - percentile``% of changes), checked at construction.

    Args:
        percentile: changes with magnitude below this percentile are zeroed (0..100).
        gamma: changes are clipped to [-gamma, gamma] (> 0).
    """

    def __init__(self, percentile: float = 10, gamma: float = 0.01) -> None:
        _in_range("PercentilePrivacy percentile", percentile, 0.0, 100.0)
        _positive("PercentilePrivacy gamma", gamma)
        super().__init__(percentile=percentile, gamma=gamma, data_kinds=[DataKind.WEIGHT_DIFF])


class ValidatedSVTPrivacy(SVTPrivacy):
    """NVFlare's ``SVTPrivacy`` (sparse vector technique), checked at construction.

    Args:
        fraction: share of entries released per round (0, 1].
        epsilon: privacy budget of the selection (> 0).
        noise_var: release-noise parameter (> 0).
        gamma: clipping bound of the released values (> 0).
        tau: threshold (>= 0).
    """

    def __init__(self, fraction: float = 0.1, epsilon: float = 0.1, noise_var: float = 0.1, gamma: float = 1e-5,
                 tau: float = 1e-6) -> None:
        _in_range("SVTPrivacy fraction", fraction, 0.0, 1.0, low_open=True)
        _positive("SVTPrivacy epsilon", epsilon)
        _positive("SVTPrivacy noise_var", noise_var)
        _positive("SVTPrivacy gamma", gamma)
        _positive("SVTPrivacy tau", tau, allow_zero=True)
        super().__init__(fraction=fraction, epsilon=epsilon, noise_var=noise_var, gamma=gamma, tau=tau,
                         data_kinds=[DataKind.WEIGHT_DIFF])


# Result meta that may leave a site: NVFlare's bookkeeping and fedimg's numbers (no data).
_ALLOWED_META = {
    "NUM_STEPS_CURRENT_ROUND", "current_round", "total_rounds", "start_round", "initial_metrics",
    "fedimg_val", "fedimg_seconds", "fedimg_update_bytes", "fedimg_algorithm_stats", DP_META, GUARD_META,
    "scaffold_c_diff", "processed_algorithm", "processed_keys", "model_name", "validate_type", "params_type",
}


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _scalars_only(value: Any) -> bool:
    if _is_number(value) or value is None or isinstance(value, (bool, str)):
        return not isinstance(value, str) or len(value) <= 64
    if isinstance(value, dict):
        return all(isinstance(k, str) and _scalars_only(v) for k, v in value.items())
    return False


class ScalarOnlyResultGuard(DXOFilter):
    """Let a result leave the site only as model entries plus scalar metrics and bookkeeping numbers.

    Metrics must be numbers (anything else is dropped); result meta must be on
    fedimg's allow-list and hold numbers, short strings or dicts of them, the
    one exception being SCAFFOLD's control-variate change (arrays shaped like
    the model). What was dropped is counted in the meta, never quoted.
    """

    def __init__(self) -> None:
        kinds = [DataKind.WEIGHT_DIFF, DataKind.WEIGHTS, DataKind.METRICS]
        super().__init__(supported_data_kinds=kinds, data_kinds_to_filter=kinds)

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO:
        """Drop non-scalar metrics and unknown or non-scalar meta."""
        dropped = 0
        if dxo.data_kind == DataKind.METRICS:
            clean = {k: v for k, v in dxo.data.items() if _is_number(v)}
            dropped += len(dxo.data) - len(clean)
            dxo.data = clean
        else:
            bad = [k for k, v in dxo.data.items() if not hasattr(v, "shape")]
            for k in bad:
                dxo.data.pop(k)
            dropped += len(bad)
        for key in list(dxo.meta):
            value = dxo.meta[key]
            if key == "initial_metrics" and isinstance(value, dict):
                clean = {k: v for k, v in value.items() if _is_number(v)}
                dropped += len(value) - len(clean)
                dxo.meta[key] = clean
                continue
            if key == "scaffold_c_diff" and isinstance(value, dict):
                continue
            if key not in _ALLOWED_META or not _scalars_only(value):
                dxo.meta.pop(key)
                dropped += 1
        dxo.set_meta_prop(GUARD_META, {"dropped": dropped})
        if dropped:
            self.log_warning(fl_ctx, f"scalar-only guard dropped {dropped} non-scalar or unknown entr(ies) "
                                     "from the result", fire_event=False)
        return dxo


def update_filter(pv: Any) -> DXOFilter | None:
    """The task-result filter a :class:`fedimg.config.PrivacyConfig` asks every site to apply (None: none)."""
    if pv.update_filter == "gaussian":
        g = pv.gaussian
        return GaussianUpdateDP(clip_norm=g.clip_norm, noise_multiplier=g.noise_multiplier, delta=g.delta,
                                seed=g.seed)
    if pv.update_filter == "percentile":
        return ValidatedPercentilePrivacy(percentile=pv.percentile.percentile, gamma=pv.percentile.gamma)
    if pv.update_filter == "svt":
        v = pv.svt
        return ValidatedSVTPrivacy(fraction=v.fraction, epsilon=v.epsilon, noise_var=v.noise_var, gamma=v.gamma,
                                   tau=v.tau)
    return None


__all__ = ["DP_META", "GaussianUpdateDP", "ScalarOnlyResultGuard", "ValidatedPercentilePrivacy",
           "ValidatedSVTPrivacy", "gaussian_epsilon", "update_filter"]

