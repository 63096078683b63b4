"""Model registry: one function turns a :class:`ModelConfig` into a network.

The same description (a ``class_path`` plus constructor ``args``) is what
NVFlare's recipe needs to build the server-side model, so the server and the
clients construct exactly the same architecture from one config. Every
network is a MONAI network; variants are config values, never subclasses.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from fedimg.config import ModelConfig, TaskConfig

# ResNet layer counts and block types by depth (He et al. 2016), as MONAI's resnetXX helpers use them.
_RESNET_LAYOUT = {
    10: ("basic", [1, 1, 1, 1]),
    18: ("basic", [2, 2, 2, 2]),
    34: ("basic", [3, 4, 6, 3]),
    50: ("bottleneck", [3, 4, 6, 3]),
}
_RESNET_INPLANES = [64, 128, 256, 512]
_DENSENET121_BLOCKS = [6, 12, 24, 16]


def _norm(model: ModelConfig, channels: list[int] | None = None) -> Any:
    if model.norm == "group":
        # GroupNorm needs every normalized width divisible by the group count: 8 where it fits.
        groups = next(g for g in (8, 4, 2, 1) if all(c % g == 0 for c in (channels or [8])))
        return ("group", {"num_groups": groups})
    return model.norm


def _densenet_widths(init_features: int, growth_rate: int, blocks: list[int], bn_size: int = 4) -> list[int]:
    """Channel counts MONAI's DenseNet normalizes (dense layers, bottlenecks, transitions)."""
    widths, c = [init_features, bn_size * growth_rate], init_features
    for i, n in enumerate(blocks):
        widths += [c + j * growth_rate for j in range(n)]
        c += n * growth_rate
        widths.append(c)
        if i < len(blocks) - 1:
            c //= 2
    return widths


def model_spec(model: ModelConfig, task: TaskConfig) -> dict[str, Any]:
    """``{"class_path": ..., "args": {...}}`` describing the network.

    Raises:
        ValueError: an unknown model name.
    """
    dims = task.spatial_dims
    if model.name == "unet":
        return {
            "class_path": "monai.networks.nets.UNet",
            "args": {
                "spatial_dims": dims,
                "in_channels": task.in_channels,
                "out_channels": task.num_classes,
                "channels": list(model.channels),
                "strides": list(model.strides),
                "num_res_units": model.num_res_units,
                "norm": _norm(model),
                "dropout": model.dropout,
            },
        }
    if model.name == "segresnet":
        n_down = len(model.blocks_down)
        return {
            "class_path": "monai.networks.nets.SegResNet",
            "args": {
                "spatial_dims": dims,
                "in_channels": task.in_channels,
                "out_channels": task.num_classes,
                "init_filters": model.init_filters,
                "blocks_down": list(model.blocks_down),
                "blocks_up": [1] * (n_down - 1),
                "norm": _norm(model),
                "dropout_prob": model.dropout or None,
            },
        }
    if model.name == "densenet121":
        # The DenseNet-121 topology (blocks 6-12-24-16); growth_rate and init_features scale its width.
        return {
            "class_path": "monai.networks.nets.DenseNet",
            "args": {
                "spatial_dims": dims,
                "in_channels": task.in_channels,
                "out_channels": task.num_classes,
                "init_features": model.init_features,
                "growth_rate": model.growth_rate,
                "block_config": list(_DENSENET121_BLOCKS),
                "norm": _norm(model, _densenet_widths(model.init_features, model.growth_rate, _DENSENET121_BLOCKS)),
                "dropout_prob": model.dropout,
            },
        }
    if model.name == "resnet":
        block, layers = _RESNET_LAYOUT[model.resnet_depth]
        return {
            "class_path": "monai.networks.nets.ResNet",
            "args": {
                "block": block,
                "layers": layers,
                "block_inplanes": [max(4, int(round(c * model.width))) for c in _RESNET_INPLANES],
                "spatial_dims": dims,
                "n_input_channels": task.in_channels,
                "num_classes": task.num_classes,
                # MONAI's ResNet initializes every norm layer's weight: instance norm needs affine parameters.
                "norm": ("instance", {"affine": True}) if model.norm == "instance" else _norm(model),
            },
        }
    raise ValueError(f"model.name must be one of: unet, segresnet, densenet121, resnet; got {model.name!r}")


def build_from_spec(spec: dict[str, Any]) -> torch.nn.Module:
    """Instantiate a ``{"class_path", "args"}`` description."""
    module_name, _, cls_name = spec["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls(**spec["args"])


def build_model(model: ModelConfig, task: TaskConfig) -> torch.nn.Module:
    """Build the network for an experiment."""
    return build_from_spec(model_spec(model, task))


_NORM_TYPES = (
    torch.nn.modules.batchnorm._BatchNorm,
    torch.nn.GroupNorm,
    torch.nn.LayerNorm,  # noqa: SLF001
    torch.nn.modules.instancenorm._InstanceNorm,
)  # noqa: SLF001


def normalization_keys(model: torch.nn.Module) -> set[str]:
    """State-dict keys of the normalization layers (weights, biases, running statistics).

    FedBN keeps exactly these at each site.
    """
    keys: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, _NORM_TYPES):
            prefix = f"{name}." if name else ""
            keys.update(prefix + k for k in module.state_dict())
    return keys


def count_parameters(model: torch.nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = ["build_from_spec", "build_model", "count_parameters", "model_spec", "normalization_keys"]
