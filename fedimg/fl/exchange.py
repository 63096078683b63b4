"""What a site sends back and how the server reads it: full weights or differences, fp32 or fp16.

One setting, ``fed.exchange``, is read by both sides: the job configures
NVFlare's transfer type from it and every site builds its update with
:func:`make_update`. ``fed.update_precision: fp16`` halves the bytes of the
update; the server casts back with :func:`to_float32` before aggregating, so
aggregation itself always runs in fp32. A difference survives fp16 better
than full weights do (its values are small, so relative rounding error costs
less), which is why ``diff`` is the better partner of ``fp16``.

Pure NumPy/PyTorch: no NVFlare import, so both sides and the tests share it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch

FULL = "FULL"
DIFF = "DIFF"


def _as_tensor(value: Any) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))


def make_update(
    local: Mapping[str, torch.Tensor],
    global_: Mapping[str, Any],
    exchange: str,
    precision: str,
    exclude: Iterable[str] = (),
) -> tuple[dict[str, torch.Tensor], str]:
    """The update a site sends.

    Args:
        local: the site's weights after local training (CPU tensors).
        global_: the global weights the round started from.
        exchange: ``weights`` (send ``local``) or ``diff`` (send ``local - global``).
        precision: ``fp32`` or ``fp16`` (floating-point entries only; integer
            buffers such as BatchNorm's ``num_batches_tracked`` stay exact).
        exclude: keys that stay at the site (FedBN's normalization layers).

    Returns:
        (tensors to send, NVFlare params type ``FULL`` or ``DIFF``).

    Raises:
        ValueError: an unknown exchange or precision, or a key missing from the global weights.
    """
    if exchange not in ("weights", "diff"):
        raise ValueError(f"fed.exchange must be 'weights' or 'diff', got {exchange!r}")
    if precision not in ("fp32", "fp16"):
        raise ValueError(f"fed.update_precision must be 'fp32' or 'fp16', got {precision!r}")
    skip = set(exclude)
    out: dict[str, torch.Tensor] = {}
    for key, value in local.items():
        if key in skip:
            continue
        t = value.detach().cpu()
        if exchange == "diff":
            if key not in global_:
                raise ValueError(f"cannot send a difference for {key}: the global model has no such entry")
            g = _as_tensor(global_[key]).to(dtype=t.dtype)
            t = t - g
        if precision == "fp16" and t.is_floating_point():
            fp16 = torch.finfo(torch.float16)
            t = t.clamp(fp16.min, fp16.max).to(torch.float16)
        out[key] = t.contiguous()
    return out, (DIFF if exchange == "diff" else FULL)


def to_float32(params: Mapping[str, Any], reference: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Server side: every floating entry as float32 NumPy (fp16 updates widened), others unchanged.

    Args:
        params: a checked update (:func:`fedimg.fl.aggregation.check_update`).
        reference: the global model; an entry that is an integer counter there
            is returned in the counter's dtype (rounded, when a privacy
            filter's arithmetic made it a float).
    """
    out = {}
    for key, value in params.items():
        arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        ref = None if reference is None else reference.get(key)
        if ref is not None and not np.issubdtype(ref.dtype, np.floating):
            out[key] = (np.rint(arr) if np.issubdtype(arr.dtype, np.floating) else arr).astype(ref.dtype)
        else:
            out[key] = arr.astype(np.float32) if np.issubdtype(arr.dtype, np.floating) else arr
    return out


def payload_bytes(params: Mapping[str, Any]) -> int:
    """Bytes of tensor data in an update (what dominates the message size)."""
    total = 0
    for value in params.values():
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
        else:
            total += int(np.asarray(value).nbytes)
    return total
