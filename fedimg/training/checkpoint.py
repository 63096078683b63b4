"""Checkpoints: ``{"model": state_dict, "meta": {...}}``, written atomically.

The same layout NVFlare's PyTorch persistor uses (``torch.load(p)["model"]``),
so a local checkpoint and a federated global model load the same way. Meta
holds only numbers and config names: no paths, no patient data.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch


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


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from a fedimg or NVFlare checkpoint (``{"model": state_dict}``) or a bare state dict."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    obj = torch.load(p, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        return obj["model"]
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    raise ValueError(f"checkpoint {p}: expected {{'model': state_dict}} or a state dict")
