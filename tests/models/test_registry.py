"""Every configured network builds from its spec, runs on the task's input, and names its normalization layers."""

from __future__ import annotations

import pytest
import torch

from fedimg import config as cfg
from fedimg.models.registry import build_from_spec, build_model, model_spec, normalization_keys


@pytest.mark.parametrize(
    "name,dims,task",
    [
        ("unet", 3, "segmentation"),
        ("segresnet", 3, "segmentation"),
        ("densenet121", 2, "classification"),
        ("densenet121", 3, "classification"),
        ("resnet", 2, "classification"),
        ("resnet", 3, "classification"),
    ],
)
def test_networks_build_and_run(name, dims, task):
    classes = ["organ", "lesion"] if task == "segmentation" else ["normal", "pneumonia", "other"]
    t = cfg.TaskConfig(type=task, spatial_dims=dims, class_names=classes)
    m = cfg.ModelConfig(
        name=name,
        norm="batch",
        channels=[8, 16, 32],
        strides=[2, 2],
        init_filters=8,
        blocks_down=[1, 1, 1],
        growth_rate=4,
        init_features=8,
        width=0.125,
        resnet_depth=10,
    )
    net = build_model(m, t)
    out = net(torch.zeros(2, 1, *([32] * dims)))
    expected = (2, 3, *([32] * dims)) if task == "segmentation" else (2, 3)
    assert tuple(out.shape) == expected
    # The spec is what the server builds: the same architecture, key for key.
    assert build_from_spec(model_spec(m, t)).state_dict().keys() == net.state_dict().keys()
    keys = normalization_keys(net)
    assert keys and all(k in net.state_dict() for k in keys)
    assert any(k.endswith("running_mean") for k in keys)


def test_instance_norm_has_no_site_local_state():
    t = cfg.TaskConfig(class_names=["organ"])
    net = build_model(cfg.ModelConfig(channels=[8, 16], strides=[2], norm="instance"), t)
    assert normalization_keys(net) == set()


def test_unknown_model_name_is_refused():
    with pytest.raises(
        cfg.ConfigError, match="model.name: expected one of 'unet', 'segresnet', 'densenet121', 'resnet'"
    ):
        cfg.from_dict(cfg.ExperimentConfig, {"name": "x", "model": {"name": "vit"}})


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("name", ["resnet", "densenet121"])
@pytest.mark.parametrize("norm", ["instance", "group", "batch"])
def test_every_classifier_builds_with_every_norm_and_classifies(dims, name, norm):
    from tests.conftest import tiny_classification

    if name == "densenet121" and norm == "instance":  # its last norm would see one pixel at this size
        with pytest.raises(cfg.ConfigError, match="at least 64 per axis"):
            tiny_classification(dims, **{"model.name": name, "model.norm": norm})
        return
    exp = tiny_classification(dims, **{"model.name": name, "model.norm": norm})
    net = build_model(exp.model, exp.task).eval()
    size = exp.data.roi_size
    with torch.no_grad():
        out = net(torch.zeros(2, 1, *size))
    assert out.shape == (2, exp.task.num_classes)
    if norm == "instance" and name == "resnet":  # MONAI's ResNet needs affine instance norm to initialize
        assert any(k.endswith("bn1.weight") for k in net.state_dict())
