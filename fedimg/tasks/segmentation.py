"""Segmentation task: loss, sliding-window inference, post-processing, per-class Dice and HD95."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric, compute_hausdorff_distance
from monai.networks.utils import one_hot

from fedimg.config import ExperimentConfig
from fedimg.runtime import Runtime
from fedimg.tasks.intervals import add_interval, mean_interval


def build_loss(per_sample: bool = False) -> torch.nn.Module:
    """Dice + cross-entropy on softmax outputs against integer labels.

    Args:
        per_sample: Dice of each sample, then the mean over the batch. The
            default pools the batch into one Dice (steadier for small
            lesions), which couples the samples: DP-SGD needs a loss that is
            a mean of per-sample terms, so each sample's gradient is its own.
    """
    return DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=not per_sample)


def predict(
    model: torch.nn.Module,
    image: torch.Tensor,
    roi_size: Sequence[int],
    sw_batch_size: int,
    autocast: AbstractContextManager[Any],
) -> torch.Tensor:
    """Class-index prediction (B, 1, ...) of a full volume by sliding-window inference."""
    with autocast:
        logits = sliding_window_inference(
            image, roi_size=tuple(roi_size), sw_batch_size=sw_batch_size, predictor=model, overlap=0.25, mode="gaussian"
        )
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"expected the model to return one tensor of logits, got {type(logits).__name__}")
    return torch.argmax(logits.float(), dim=1, keepdim=True)


def remove_small_components(pred: torch.Tensor, num_classes: int, min_voxels: int) -> torch.Tensor:
    """Set connected components (26-connected) smaller than ``min_voxels`` to background.

    Applied per foreground class; a standard segmentation post-processing step
    against isolated false-positive specks. A CUDA prediction stays on the GPU
    (:func:`label_components_torch`); on the CPU SciPy labels the components.

    Args:
        pred: class-index prediction (B, 1, X, Y, Z).
        num_classes: classes including background.
        min_voxels: size threshold; 0 returns ``pred`` unchanged.
    """
    if min_voxels <= 0:
        return pred
    if pred.device.type == "cuda":
        return _remove_small_torch(pred, num_classes, min_voxels)
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


def label_components_torch(mask: torch.Tensor) -> torch.Tensor:
    """26-connected components of a 3D boolean mask, on the mask's device: 0 background, else a component id.

    Every foreground voxel starts with its own id and repeatedly takes the
    largest id among its 26 neighbours (a 3x3x3 max pool) until nothing
    changes, so each component ends with one id. The number of passes is the
    longest path inside a component, cheap on a GPU for the small specks this
    removes and for organ-sized ones alike. Ids are float64, exact for any
    volume below 2^53 voxels.
    """
    fg = mask[None, None].to(torch.float64)
    ids = torch.arange(1, mask.numel() + 1, device=mask.device, dtype=torch.float64).reshape(fg.shape) * fg
    while True:
        grown = torch.nn.functional.max_pool3d(ids, kernel_size=3, stride=1, padding=1) * fg
        if torch.equal(grown, ids):
            return ids[0, 0]
        ids = grown


def _remove_small_torch(pred: torch.Tensor, num_classes: int, min_voxels: int) -> torch.Tensor:
    out = pred.clone()
    for b in range(out.shape[0]):
        vol = out[b, 0]
        for c in range(1, num_classes):
            comps = label_components_torch(vol == c)
            found = comps[comps > 0]
            if found.numel() == 0:
                continue
            ids, sizes = torch.unique(found, return_counts=True)
            small = ids[sizes < min_voxels]
            if small.numel():
                vol[torch.isin(comps, small)] = 0
    return out


class DiceAccumulator:
    """Per-class Dice and 95th-percentile Hausdorff distance over cases, foreground classes only.

    Dice: a class absent from a case's label counts as 1.0 if the prediction
    is also empty and 0.0 otherwise (MONAI ``ignore_empty=False``), so false
    positives on lesion-free cases are penalised rather than ignored.

    HD95 (in mm when the voxel spacing is known, else in voxels): 0 when label
    and prediction are both empty; undefined (left out of the mean, counted in
    ``hd95_undefined/<class>``) when exactly one of them is empty.

    Each mean (``dice_mean``, ``dice/<class>``, ``hd95/<class>``) also gets
    its 95% bootstrap interval over the cases (``<name>_ci_low``,
    ``<name>_ci_high``; :mod:`fedimg.tasks.intervals`), and ``voxel_mm`` is
    the smallest voxel spacing of the cases: the resolution of HD95, which
    cannot tell apart outlines closer than one voxel.
    """

    def __init__(self, class_names: Sequence[str]) -> None:
        self.class_names = list(class_names)
        self.metric = DiceMetric(include_background=False, reduction="none", ignore_empty=False)
        self._hd: list[list[float]] = [[] for _ in self.class_names]
        self._hd_undefined = [0 for _ in self.class_names]
        self._voxel_mm = math.inf

    def update(self, pred: torch.Tensor, label: torch.Tensor, spacing: Sequence[Sequence[float]] | None = None) -> None:
        """Add a batch of class-index predictions and labels (B, 1, ...), with each case's voxel spacing."""
        n = len(self.class_names) + 1
        p1, l1 = one_hot(pred.long(), n), one_hot(label.long(), n)
        self.metric(y_pred=p1, y=l1)
        for b in range(pred.shape[0]):
            sp = None if spacing is None else [float(s) for s in spacing[b]]
            if sp:
                self._voxel_mm = min(self._voxel_mm, *sp)
            for c in range(1, n):
                has_p, has_l = bool(p1[b, c].any()), bool(l1[b, c].any())
                if not has_p and not has_l:
                    self._hd[c - 1].append(0.0)
                    continue
                if has_p != has_l:
                    self._hd_undefined[c - 1] += 1
                    continue
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    hd = compute_hausdorff_distance(
                        p1[b : b + 1, c : c + 1].float(),
                        l1[b : b + 1, c : c + 1].float(),
                        include_background=True,
                        percentile=95,
                        spacing=sp,
                    )
                value = float(hd.reshape(-1)[0])
                if math.isfinite(value):
                    self._hd[c - 1].append(value)
                else:
                    self._hd_undefined[c - 1] += 1

    def result(self) -> dict[str, float]:
        """``dice_mean``, ``dice/<class>``, ``hd95_mean``, ``hd95/<class>``, ``hd95_undefined/<class>``,
        the intervals ``<mean>_ci_low``/``<mean>_ci_high`` and ``voxel_mm`` (when the spacing is known)."""
        values: torch.Tensor = self.metric.aggregate()  # type: ignore[assignment]  # (cases, classes) with "none"
        self.metric.reset()
        if not isinstance(values, torch.Tensor):  # a tuple only with get_not_nans=True, which is not set
            raise TypeError(f"expected DiceMetric to aggregate into one tensor, got {type(values).__name__}")
        if values.numel() == 0:
            return {}
        per_case = values.float().cpu().numpy()
        per_class = torch.nanmean(values.float(), dim=0)
        out = {f"dice/{name}": float(per_class[i]) for i, name in enumerate(self.class_names)}
        out["dice_mean"] = float(torch.nanmean(per_class))
        # Every class is defined in every case (ignore_empty=False), so the mean over classes of the class means
        # is the mean over cases of each case's class mean: the interval resamples the latter.
        add_interval(out, "dice_mean", mean_interval(np.nanmean(per_case, axis=1)))
        for i, name in enumerate(self.class_names):
            add_interval(out, f"dice/{name}", mean_interval(per_case[:, i]))
        hd_means = []
        for i, name in enumerate(self.class_names):
            if self._hd[i]:
                out[f"hd95/{name}"] = float(np.mean(self._hd[i]))
                hd_means.append(out[f"hd95/{name}"])
                add_interval(out, f"hd95/{name}", mean_interval(self._hd[i]))
            out[f"hd95_undefined/{name}"] = float(self._hd_undefined[i])
        if hd_means:
            out["hd95_mean"] = float(np.mean(hd_means))
        if math.isfinite(self._voxel_mm):
            out["voxel_mm"] = float(self._voxel_mm)
        self._hd = [[] for _ in self.class_names]
        self._hd_undefined = [0 for _ in self.class_names]
        self._voxel_mm = math.inf
        return out


class SegmentationTask:
    """Segmentation: DiceCE loss, sliding-window inference, Dice and HD95 per class."""

    kind = "segmentation"
    main_metric = "dice_mean"

    def __init__(self, exp: ExperimentConfig) -> None:
        self.exp = exp
        self.class_names = list(exp.task.class_names)

    def loss(self, per_sample: bool = False) -> torch.nn.Module:
        """The training loss (``per_sample``: a mean of per-sample terms, for DP-SGD; see :func:`build_loss`)."""
        return build_loss(per_sample)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, loader: Any, rt: Runtime) -> dict[str, float]:
        """Per-class Dice/HD95 of ``model`` on whole volumes (after small-component removal)."""
        model.eval()
        acc = DiceAccumulator(self.class_names)
        n = 0
        for batch in loader:
            image = batch["image"].to(rt.device)
            label = batch["label"].to(rt.device)
            pred = predict(model, image, self.exp.data.roi_size, self.exp.train.sw_batch_size, rt.autocast())
            pred = remove_small_components(pred, len(self.class_names) + 1, self.exp.task.min_component_voxels)
            spacing = batch.get("spacing")
            acc.update(pred, label, None if spacing is None else spacing.tolist())
            n += image.shape[0]
        if n == 0:
            return {}
        out = acc.result()
        out["cases"] = float(n)
        return out

    @torch.no_grad()
    def overlays(self, model: torch.nn.Module, loader: Any, rt: Runtime, limit: int = 2) -> list[np.ndarray]:
        """Prediction-vs-reference pictures of the first ``limit`` validation cases (site-local only).

        One picture per case: axial, coronal and sagittal slices through the
        lesion, in the radiological convention, each class in its colour
        (:func:`fedimg.tasks.pictures.case_picture`).
        """
        from fedimg.tasks.pictures import case_picture

        model.eval()
        pictures = []
        for index, batch in enumerate(loader):
            image = batch["image"].to(rt.device)
            pred = predict(model, image, self.exp.data.roi_size, self.exp.train.sw_batch_size, rt.autocast())
            pred = remove_small_components(pred, len(self.class_names) + 1, self.exp.task.min_component_voxels)
            spacing = batch.get("spacing")
            axcodes = batch.get("axcodes")
            pictures.append(
                case_picture(
                    image[0, 0].float().cpu().numpy(),
                    batch["label"][0, 0].cpu().numpy(),
                    pred[0, 0].cpu().numpy(),
                    self.class_names,
                    index,
                    spacing=None if spacing is None else [float(v) for v in spacing[0]],
                    axcodes=axcodes[0] if axcodes else "RAS",
                )
            )
            if len(pictures) >= limit:
                break
        return pictures
