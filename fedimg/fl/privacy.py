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

:class:`ScalarOnlyResultGuard` (the ``public`` scope of
``configs/federation/privacy.json``) blocks any result that holds more than
model entries, scalar metrics and small bookkeeping numbers. NVFlare 2.9
runs a site's scope filters before the job's own result filters: the guard
checks what the job's code sent, and a filter the job adds runs after it
(such filters come from the site's installed packages unless the site's
authorization policy lets the submitter bring code, ``byoc``).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import ReservedHeaderKey, Shareable, make_reply
from nvflare.app_common.app_constant import AlgorithmConstants, AppConstants
from nvflare.app_common.filters.percentile_privacy import PercentilePrivacy
from nvflare.app_common.filters.svt_privacy import SVTPrivacy

from fedimg.fl.protocol import (
    MAX_ENTRIES,
    MAX_NAME,
    RESULT_META_ALGO,
    RESULT_META_BYTES,
    RESULT_META_DP,
    RESULT_META_TEST,
    RESULT_META_TIMES,
    RESULT_META_VAL,
    is_number,
    scalar_tree_problem,
)

DP_META = RESULT_META_DP
GUARD_META = "fedimg_guard"


def _positive(name: str, value: Any, allow_zero: bool = False) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
        or (value == 0 and not allow_zero)
    ):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return float(value)


def _in_range(name: str, value: Any, low: float, high: float, low_open: bool = False, high_open: bool = False) -> float:
    v = _positive(name, value, allow_zero=True) if low >= 0 else float(value)
    ok = (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not ok:
        raise ValueError(
            f"{name} must be in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}, got {value!r}"
        )
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

    def __init__(
        self, clip_norm: float = 1.0, noise_multiplier: float = 1.0, delta: float = 1e-5, seed: int | None = None
    ) -> None:
        super().__init__(
            supported_data_kinds=[DataKind.WEIGHT_DIFF, DataKind.WEIGHTS],
            data_kinds_to_filter=[DataKind.WEIGHT_DIFF, DataKind.WEIGHTS],
        )
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
            raise ValueError(
                "GaussianUpdateDP needs model differences: set fed.exchange: diff in the experiment "
                f"(this site received a {dxo.data_kind} result)"
            )
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
        record = {
            "mechanism": "gaussian",
            "clip_norm": self.clip_norm,
            "noise_multiplier": self.noise_multiplier,
            "noise_std": std,
            "releases": self.releases,
            "epsilon": eps,
            "delta": self.delta,
        }
        # The raw update norm (or whether it was clipped) depends on the data and is not covered by the
        # guarantee: it is neither sent nor logged (site logs can be streamed to the server).
        prior = dxo.get_meta_prop(DP_META)
        if isinstance(prior, dict) and isinstance(prior.get("dp_sgd"), dict):
            # The site trained with DP-SGD too: keep its (sample-level) record beside this (site-level) one.
            record["dp_sgd"] = prior["dp_sgd"]
        dxo.set_meta_prop(DP_META, record)
        self.log_info(
            fl_ctx,
            f"DP: update clipped to norm <= {self.clip_norm:.4g}, noise std {std:.4g}; epsilon "
            f"{eps:.3f} at delta {self.delta:g} after {self.releases} release(s)",
        )
        return dxo


class ValidatedPercentilePrivacy(PercentilePrivacy):
    """NVFlare's ``PercentilePrivacy`` (share only the largest ``100 - percentile``% of changes), checked.

    The parameters are validated on construction, before NVFlare sees them.

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

    def __init__(
        self,
        fraction: float = 0.1,
        epsilon: float = 0.1,
        noise_var: float = 0.1,
        gamma: float = 1e-5,
        tau: float = 1e-6,
    ) -> None:
        _in_range("SVTPrivacy fraction", fraction, 0.0, 1.0, low_open=True)
        _positive("SVTPrivacy epsilon", epsilon)
        _positive("SVTPrivacy noise_var", noise_var)
        _positive("SVTPrivacy gamma", gamma)
        _positive("SVTPrivacy tau", tau, allow_zero=True)
        super().__init__(
            fraction=fraction,
            epsilon=epsilon,
            noise_var=noise_var,
            gamma=gamma,
            tau=tau,
            data_kinds=[DataKind.WEIGHT_DIFF],
        )


# Result kinds a site may send: model entries (weights or their change) and metrics. Anything else is blocked.
RESULT_KINDS = (DataKind.WEIGHTS, DataKind.WEIGHT_DIFF, DataKind.METRICS)
# Result meta that may leave a site: NVFlare's bookkeeping and fedimg's numbers (no data); other keys are dropped.
_ALLOWED_META = {
    MetaKey.NUM_STEPS_CURRENT_ROUND,
    MetaKey.CURRENT_ROUND,
    MetaKey.TOTAL_ROUNDS,
    MetaKey.START_ROUND,
    MetaKey.INITIAL_METRICS,
    MetaKey.PROCESSED_ALGORITHM,
    MetaKey.PROCESSED_KEYS,
    MetaKey.VALIDATE_TYPE,
    MetaKey.SUBMIT_MODEL_NAME,
    "model_name",
    "params_type",
    RESULT_META_VAL,
    RESULT_META_TIMES,
    RESULT_META_BYTES,
    RESULT_META_ALGO,
    DP_META,
    AlgorithmConstants.SCAFFOLD_CTRL_DIFF,
    RESULT_META_TEST,
}
_ARRAY_META = {AlgorithmConstants.SCAFFOLD_CTRL_DIFF}  # model-shaped arrays, checked like model entries
_METRIC_META = {MetaKey.INITIAL_METRICS}
# Headers the job's FLModel sets (round numbers, validation type): numbers or short strings only.
_JOB_HEADERS = (
    AppConstants.CURRENT_ROUND,
    AppConstants.START_ROUND,
    AppConstants.NUM_ROUNDS,
    AppConstants.VALIDATE_TYPE,
)
_FLOAT_DTYPES = {"float16", "float32", "float64"}
_INT_DTYPES = {"int8", "int16", "int32", "int64", "uint8"}
_ENTRY_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,256}")  # state-dict names: module paths
_RETURN_CODES = frozenset(v for k, v in vars(ReturnCode).items() if k.isupper() and isinstance(v, str))


def _entries_problem(entries: Any) -> str | None:
    """Why ``entries`` are not model entries (None: they are): floating tensors/arrays, integers as one counter."""
    if not isinstance(entries, Mapping):
        return f"model entries that are a {type(entries).__name__}, not a mapping"
    for name, value in entries.items():
        if not isinstance(name, str) or not _ENTRY_NAME.fullmatch(name):
            return "an entry name that is not a module path (letters, digits, '_', '.', '-'; at most 256)"
        if isinstance(value, torch.Tensor):
            dtype, size = str(value.dtype).removeprefix("torch."), value.numel()
        elif isinstance(value, np.ndarray):
            dtype, size = value.dtype.name, value.size
        else:
            return f"an entry that is a {type(value).__name__}, not a tensor or array"
        if dtype in _FLOAT_DTYPES or (dtype in _INT_DTYPES and size <= 1):
            continue
        return (
            f"an entry of dtype {dtype} with {size} value(s): model entries are floating point, integers "
            "only as one counter value"
        )
    return None


def _metrics_problem(metrics: Any) -> str | None:
    """Why ``metrics`` are not scalar metrics (None: they are): at most MAX_ENTRIES named numbers."""
    if not isinstance(metrics, Mapping) or len(metrics) > MAX_ENTRIES:
        return f"metrics that are not a mapping of at most {MAX_ENTRIES} entries"
    for name, value in metrics.items():
        if not isinstance(name, str) or len(name) > MAX_NAME:
            return f"a metric name that is not a string of at most {MAX_NAME} characters"
        if not is_number(value):
            return f"a metric that is a {type(value).__name__}, not a number"
    return None


class ScalarOnlyResultGuard(Filter):
    """Let a result leave the site only as model entries plus scalar metrics and bookkeeping numbers; block the rest.

    A task result passes only if all of it fits:

    * its kind is ``WEIGHTS``, ``WEIGHT_DIFF`` (model entries) or ``METRICS``;
      any other kind (``APP_DEFINED``, collections, statistics) or a result
      that is not a DXO at all is blocked;
    * model entries (and SCAFFOLD's control change) are float16/32/64 torch
      tensors or NumPy arrays under module-path names. An integer entry is
      allowed only as a single value: BatchNorm's ``num_batches_tracked``
      counts the batches a layer has seen, which every site's model has and
      which says no more than the step count the server is told anyway; an
      integer array of more values would be identifiers or pixels, not
      weights. Strings, bytes, booleans and objects are never model entries;
    * metrics (and the ``initial_metrics`` meta) are numbers only, at most
      :data:`fedimg.fl.protocol.MAX_ENTRIES` of them;
    * meta values under fedimg's allow-list are small scalar trees
      (:func:`fedimg.fl.protocol.scalar_tree_problem`: numbers, booleans,
      strings of at most 64 characters, mappings of at most 256 entries nested
      at most 2 deep); meta keys not on the list are dropped (NVFlare may add
      its own bookkeeping), and counted in the meta ``fedimg_guard``;
    * round headers set by the job are numbers or short strings.

    A blocked result is replaced by an empty ``TASK_RESULT_FILTER_ERROR``
    reply: nothing of it leaves the site, the site's log says why (the kind
    of the offending value, never its content), and the server records the
    site as ``BLOCKED_AT_SITE``. An error reply leaves as a bare return code.

    What the guard cannot see: a floating-point tensor under a model-like name
    is indistinguishable from a weight (the server rejects names and shapes
    its model lacks, but only after they left the site), and the values of
    real weights can carry anything the training code puts into them. It
    stops accidental and obvious leaks through the result channel; code that
    runs at a site is trusted by the site's own authorization policy.
    """

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        """Check the whole result; return it (unknown meta dropped) or an empty error reply."""
        rc = shareable.get_return_code()
        if rc != ReturnCode.OK:
            # An error answer carries no data: whatever rode on it stays here.
            return make_reply(rc if rc in _RETURN_CODES else ReturnCode.EXECUTION_EXCEPTION)
        try:
            dxo = from_shareable(shareable)
        except Exception:  # noqa: BLE001 - NVFlare raises ValueError or KeyError for a non-DXO shareable
            return self._block(fl_ctx, "the result is not a DXO")
        why = self._problem(dxo, shareable)
        if why:
            return self._block(fl_ctx, why)
        unknown = [k for k in dxo.meta if k not in _ALLOWED_META]
        for key in unknown:
            dxo.meta.pop(key)
        dxo.set_meta_prop(GUARD_META, {"dropped": len(unknown)})
        # Only the DXO and the headers go on: nothing else the shareable may have carried.
        for key in [k for k in shareable if k != ReservedHeaderKey.HEADERS]:
            shareable.pop(key)
        return dxo.update_shareable(shareable)

    @staticmethod
    def _problem(dxo: DXO, shareable: Shareable) -> str | None:
        if dxo.data_kind not in RESULT_KINDS:
            return f"a result of a kind other than {', '.join(RESULT_KINDS)}"
        data = dxo.data if dxo.data is not None else {}
        why = _metrics_problem(data) if dxo.data_kind == DataKind.METRICS else _entries_problem(data)
        if why:
            return why
        for key in [k for k in dxo.meta if k in _ALLOWED_META]:
            value = dxo.meta[key]
            if key in _ARRAY_META:
                why = _entries_problem(value)
            elif key in _METRIC_META:
                why = _metrics_problem(value)
            else:
                why = scalar_tree_problem(value)
            if why:
                return f"meta {key}: {why}"
        for header in _JOB_HEADERS:
            value = shareable.get_header(header)
            if value is not None and (scalar_tree_problem(value, depth=0) or isinstance(value, bool)):
                return f"header {header}: not a number or short string"
        return None

    def _block(self, fl_ctx: FLContext, why: str) -> Shareable:
        self.log_error(
            fl_ctx, f"scalar-only guard blocked this result, nothing of it was sent: {why}", fire_event=False
        )
        return make_reply(ReturnCode.TASK_RESULT_FILTER_ERROR)


def update_filter(pv: Any) -> DXOFilter | None:
    """The task-result filter a :class:`fedimg.config.PrivacyConfig` asks every site to apply (None: none)."""
    if pv.update_filter == "gaussian":
        g = pv.gaussian
        return GaussianUpdateDP(clip_norm=g.clip_norm, noise_multiplier=g.noise_multiplier, delta=g.delta, seed=g.seed)
    if pv.update_filter == "percentile":
        return ValidatedPercentilePrivacy(percentile=pv.percentile.percentile, gamma=pv.percentile.gamma)
    if pv.update_filter == "svt":
        v = pv.svt
        return ValidatedSVTPrivacy(
            fraction=v.fraction, epsilon=v.epsilon, noise_var=v.noise_var, gamma=v.gamma, tau=v.tau
        )
    return None


__all__ = [
    "DP_META",
    "GaussianUpdateDP",
    "ScalarOnlyResultGuard",
    "ValidatedPercentilePrivacy",
    "ValidatedSVTPrivacy",
    "gaussian_epsilon",
    "update_filter",
]
