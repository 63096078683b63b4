"""Checkpoints: ``{"model": state_dict, "meta": {...}}``, written atomically, read without unpickling code.

The same layout NVFlare's PyTorch persistor uses (``torch.load(p)["model"]``),
so a local checkpoint and a federated global model load the same way. Meta
holds only numbers and config names: no paths, no patient data.

A checkpoint may come from another party (a server's global model, a site's
own model in cross-site evaluation): :func:`load_checkpoint` reads it with
PyTorch's restricted unpickler (``weights_only=True``: tensors, containers,
numbers, strings and bytes only), so a crafted file cannot run code here; it
is refused with a :class:`ValueError` instead. :func:`state_problem` checks a
received state dict against the network's own before anything is loaded.
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

FLOAT_DTYPES = ("float16", "float32", "float64")


def save_checkpoint(path: str | Path, model: torch.nn.Module, meta: dict[str, Any] | None = None) -> None:
    """Save CPU weights and metadata atomically."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    os.close(fd)
    try:
        torch.save({"model": state, "meta": dict(meta or {})}, tmp)
        os.replace(tmp, p)
    finally:
        Path(tmp).unlink(missing_ok=True)


def load_checkpoint(path: str | Path) -> Any:
    """Read a PyTorch checkpoint with the restricted unpickler (``weights_only=True``), never running its code.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file holds anything but tensors, containers, numbers,
            strings and bytes (e.g. a pickled object whose loading would run
            code), or is not a PyTorch file at all.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # PyTorch names the offending global (a class or function path), never data of the file.
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f"it references {found.group(1)[:120]}" if found else "it is not a plain weights file"
        raise ValueError(
            f"checkpoint {p} refused: {what}; a checkpoint may hold only tensors, containers, numbers, "
            "strings and bytes (anything else could run code when loaded). Load only checkpoints "
            "written by fedimg or NVFlare's PyTorch persistor"
        ) from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise ValueError(
            f"checkpoint {p} is not a readable PyTorch file ({type(exc).__name__}); expected a "
            "checkpoint written by torch.save"
        ) from None


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from a fedimg or NVFlare checkpoint (``{"model": state_dict}``) or a bare state dict.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a checkpoint, or one that would run code (see :func:`load_checkpoint`).
    """
    obj = load_checkpoint(path)
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        return obj["model"]
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    raise ValueError(f"checkpoint {path}: expected {{'model': state_dict}} or a state dict")


def _array(value: Any) -> np.ndarray | None:
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bfloat16:
            return None  # not a dtype fedimg sends or keeps
        return value.detach().cpu().numpy()
    if isinstance(value, (np.ndarray, np.generic)):
        return np.asarray(value)
    return None


def state_problem(
    state: Any,
    reference: Mapping[str, Any],
    *,
    optional: Collection[str] = (),
    float_dtypes: Collection[str] = FLOAT_DTYPES,
    flat_ok: bool = False,
) -> str | None:
    """Why ``state`` does not fit ``reference`` exactly (None: it fits).

    Checked: a mapping of names to arrays (torch tensors or NumPy arrays);
    no name the reference lacks; every reference name present except those in
    ``optional`` (FedBN's site-local layers); each entry of the reference's
    shape; floating entries of a dtype in ``float_dtypes``; integer entries
    (counters such as BatchNorm's ``num_batches_tracked``) integer or floating
    (a privacy filter's arithmetic may turn a counter's change into a float);
    every floating value finite. Booleans, complex numbers, strings, bytes and
    objects are never model entries.

    Args:
        state: what arrived (a model, an update, control variates).
        reference: the entries expected (arrays or tensors).
        optional: reference names that may be absent.
        float_dtypes: dtype names accepted for floating entries.
        flat_ok: a 1-D entry with the reference's number of values is accepted
            (homomorphic encryption decrypts every tensor flat).

    Returns:
        ``"CODE: explanation"`` with CODE one of ``NOT_A_STATE``,
        ``UNKNOWN_KEY``, ``MISSING_KEY``, ``DTYPE``, ``SHAPE_MISMATCH``,
        ``NON_FINITE``. Names that arrived but the reference lacks are counted,
        never quoted (a peer chose them); reference names are quoted.
    """
    if not isinstance(state, Mapping):
        return f"NOT_A_STATE: expected a mapping of entry name -> array, got a {type(state).__name__}"
    unknown = sum(1 for k in state if not isinstance(k, str) or k not in reference)
    if unknown:
        return f"UNKNOWN_KEY: {unknown} entr(ies) the model does not have"
    skip = set(optional)
    missing = sorted(k for k in reference if k not in state and k not in skip)
    if missing:
        return f"MISSING_KEY: {len(missing)} model entr(ies) absent, e.g. {missing[0]}"
    for key, value in state.items():
        arr = _array(value)
        ref = _array(reference[key])
        if ref is None:
            raise TypeError(f"reference entry {key} is a {type(reference[key]).__name__}, not an array")
        if arr is None:
            return f"DTYPE: {key} arrived as a {type(value).__name__}, expected a tensor or array"
        if ref.dtype.kind == "f":
            if arr.dtype.name not in float_dtypes:
                return f"DTYPE: {key} is {arr.dtype.name}, expected one of {', '.join(sorted(float_dtypes))}"
        elif arr.dtype.kind not in "iuf":
            return f"DTYPE: {key} is {arr.dtype.name}, expected a number type like the model's {ref.dtype.name}"
        if arr.shape != ref.shape and not (flat_ok and arr.ndim == 1 and arr.size == ref.size):
            return f"SHAPE_MISMATCH: {key} has shape {tuple(arr.shape)}, the model has {tuple(ref.shape)}"
        if arr.dtype.kind == "f":
            bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
            if bad:
                return f"NON_FINITE: {bad} NaN/infinite value(s) in {key}"
    return None
