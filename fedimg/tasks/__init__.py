"""Tasks: what is learned and how it is scored (segmentation, classification)."""

from __future__ import annotations

from fedimg.config import ExperimentConfig
from fedimg.tasks.classification import ClassificationTask
from fedimg.tasks.segmentation import SegmentationTask

Task = SegmentationTask | ClassificationTask


def build_task(exp: ExperimentConfig) -> Task:
    """The task object for an experiment (loss, evaluation, pictures)."""
    if exp.task.is_segmentation:
        return SegmentationTask(exp)
    return ClassificationTask(exp)


def metric_names(metrics: dict[str, float], prefix: str = "val_") -> dict[str, float]:
    """Evaluation results as flat FLModel metric names.

    ``dice_mean`` becomes ``val_dice``, ``auc_mean`` ``val_auc``, and
    ``dice/organ`` ``val_dice_organ``: names without slashes, as NVFlare's
    metric aggregation and model selection expect. Held-out test results use
    ``prefix="test_"``.
    """
    out = {}
    for key, value in metrics.items():
        name = key[: -len("_mean")] if key.endswith("_mean") else key
        out[prefix + name.replace("/", "_")] = float(value)
    return out


__all__ = ["ClassificationTask", "SegmentationTask", "Task", "build_task", "metric_names"]
