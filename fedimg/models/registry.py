"""Model registry: one function turns a :class:`ModelConfig` into a network.

The same description (a ``class_path`` plus constructor ``args``) is what
NVFlare's recipe needs to build the server-side model, so the server and the
clients construct exactly the same architecture from one config.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from fedimg.config import ModelConfig, TaskConfig


def model_spec(model: ModelConfig, task: TaskConfig) -> dict[str, Any]:
    """``{"class_path": ..., "args": {...}}`` describing the network."""
    if model.name == "unet":
        return {
            "class_path": "monai.networks.nets.UNet",
            "args": {
                "spatial_dims": 3,
                "in_channels": task.in_channels,
                "out_channels": task.num_classes,
                "channels": list(model.channels),
                "strides": list(model.strides),
                "num_res_units": model.num_res_units,
                "norm": model.norm,
                "dropout": model.dropout,
            },
        }
    raise ValueError(f"model.name must be one of: unet; got {model.name!r}")


def build_from_spec(spec: dict[str, Any]) -> torch.nn.Module:
    """Instantiate a ``{"class_path", "args"}`` description."""
    module_name, _, cls_name = spec["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls(**spec["args"])


def build_model(model: ModelConfig, task: TaskConfig) -> torch.nn.Module:
    """Build the network for an experiment."""
    return build_from_spec(model_spec(model, task))
