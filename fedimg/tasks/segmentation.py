"""Segmentation task: loss, inference and per-class Dice."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot


def build_loss() -> torch.nn.Module:
    """Dice + cross-entropy on softmax outputs against integer labels."""
    return DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)


def predict(model: torch.nn.Module, image: torch.Tensor, roi_size: Sequence[int], sw_batch_size: int,
            autocast: object) -> torch.Tensor:
    """Class-index prediction (B, 1, ...) of a full volume by sliding-window inference."""
    with autocast:  # type: ignore[attr-defined]
        logits = sliding_window_inference(image, roi_size=tuple(roi_size), sw_batch_size=sw_batch_size,
                                          predictor=model, overlap=0.25, mode="gaussian")
    return torch.argmax(logits.float(), dim=1, keepdim=True)


def remove_small_components(pred: torch.Tensor, num_classes: int, min_voxels: int) -> torch.Tensor:
    """Set connected components (26-connected) smaller than ``min_voxels`` to background.

    Applied per foreground class; a standard segmentation post-processing step
    against isolated false-positive specks.

    Args:
        pred: class-index prediction (B, 1, X, Y, Z).
        num_classes: classes including background.
        min_voxels: size threshold; 0 returns ``pred`` unchanged.
    """
    if min_voxels <= 0:
        return pred
    from scipy import ndimage

    out = pred.detach().cpu().numpy().copy()
    structure = np.ones((3, 3, 3), dtype=bool)
    for b in range(out.shape[0]):
        vol = out[b, 0]
        for c in range(1, num_classes):
            comps, n = ndimage.label(vol == c, structure=structure)
            if n == 0:
                continue
            sizes = np.bincount(comps.ravel())
            small = np.flatnonzero(sizes < min_voxels)
            small = small[small != 0]
            if small.size:
                vol[np.isin(comps, small)] = 0
    return torch.as_tensor(out, device=pred.device)


class DiceAccumulator:
    """Per-class Dice over cases, foreground classes only.

    A class absent from a case's label counts as 1.0 if the prediction is also
    empty and 0.0 otherwise (MONAI ``ignore_empty=False``), so false positives
    on lesion-free cases are penalised rather than ignored.
    """

    def __init__(self, class_names: Sequence[str]) -> None:
        self.class_names = list(class_names)
        self.metric = DiceMetric(include_background=False, reduction="none", ignore_empty=False)

    def update(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        """Add a batch of class-index predictions and labels (B, 1, ...)."""
        n = len(self.class_names) + 1
        self.metric(y_pred=one_hot(pred.long(), n), y=one_hot(label.long(), n))

    def result(self) -> dict[str, float]:
        """``{"dice_mean": x, "dice/<class>": y, ...}`` averaged over cases."""
        values = self.metric.aggregate()  # (cases, classes)
        self.metric.reset()
        if values.numel() == 0:
            return {}
        per_class = torch.nanmean(values.float(), dim=0)
        out = {f"dice/{name}": float(per_class[i]) for i, name in enumerate(self.class_names)}
        out["dice_mean"] = float(torch.nanmean(per_class))
        return out
