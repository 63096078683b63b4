"""Tasks: what is learned and how it is scored (segmentation, classification)."""

from __future__ import annotations

from fedimg.config import ExperimentConfig
from fedimg.tasks.classification import ClassificationTask
from fedimg.tasks.intervals import HIGH, LOW, is_interval_bound
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
    ``prefix="test_"``. An interval bound follows its metric:
    ``dice_mean_ci_low`` becomes ``val_dice_ci_low``.
    """
    out = {}
    for key, value in metrics.items():
        suffix = next((s for s in (LOW, HIGH) if key.endswith(s)), "")
        name = key[: len(key) - len(suffix)]
        name = name[: -len("_mean")] if name.endswith("_mean") else name
        out[prefix + name.replace("/", "_") + suffix] = float(value)
    return out


def curve_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The measures drawn as TensorBoard curves (and averaged over sites): no counts, intervals or voxel size.

    Counts (``cases``, ``hd95_undefined/<class>``) are not measures; the
    bounds of an interval and the voxel size are reported in the tables,
    since a mean of them over sites would be no interval and no voxel size.
    """
    return {
        k: v
        for k, v in metrics.items()
        if k not in ("cases", "voxel_mm") and not k.startswith("hd95_undefined") and not is_interval_bound(k)
    }


__all__ = ["ClassificationTask", "SegmentationTask", "Task", "build_task", "curve_metrics", "metric_names"]
