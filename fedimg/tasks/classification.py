"""Classification task (2D or 3D): cross-entropy, softmax scores, per-class AUC, sensitivity, specificity.

Every class is scored one-vs-rest: AUC from the softmax score of the class,
sensitivity and specificity from the predicted class (the arg-max of the
scores). Balanced accuracy per class is (sensitivity + specificity) / 2; the
overall ``balanced_accuracy`` is the mean sensitivity (recall) over classes,
which does not reward a model for always predicting the majority class.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import numpy as np
import torch
from monai.metrics import compute_roc_auc

from fedimg.config import ExperimentConfig
from fedimg.runtime import Runtime


def classification_metrics(scores: np.ndarray, labels: np.ndarray, class_names: Sequence[str]) -> dict[str, float]:
    """Per-class and mean metrics from softmax scores (N, C) and integer labels (N,).

    An AUC is undefined when the cases hold only one class for it (one-vs-rest);
    it is then left out (and out of ``auc_mean``).

    Returns:
        ``auc/<c>``, ``sensitivity/<c>``, ``specificity/<c>``,
        ``balanced_accuracy/<c>`` per class; ``auc_mean``,
        ``balanced_accuracy``, ``accuracy`` and ``cases``.
    """
    n, c = scores.shape
    if n == 0:
        return {}
    pred = scores.argmax(axis=1)
    out: dict[str, float] = {}
    aucs = []
    recalls = []
    for i, name in enumerate(class_names):
        pos = labels == i
        n_pos, n_neg = int(pos.sum()), int((~pos).sum())
        if n_pos and n_neg:
            # One score column under the default macro average: a single number.
            roc = compute_roc_auc(torch.as_tensor(scores[:, i]), torch.as_tensor(pos.astype(np.float32)))
            auc = float(cast(float, roc))
            out[f"auc/{name}"] = auc
            aucs.append(auc)
        tp = int(((pred == i) & pos).sum())
        tn = int(((pred != i) & ~pos).sum())
        if n_pos:
            out[f"sensitivity/{name}"] = tp / n_pos
            recalls.append(tp / n_pos)
        if n_neg:
            out[f"specificity/{name}"] = tn / n_neg
        if n_pos and n_neg:
            out[f"balanced_accuracy/{name}"] = 0.5 * (tp / n_pos + tn / n_neg)
    if aucs:
        # With two classes both one-vs-rest AUCs are the same number.
        out["auc_mean"] = float(np.mean(aucs))
    if recalls:
        out["balanced_accuracy"] = float(np.mean(recalls))
    out["accuracy"] = float((pred == labels).mean())
    out["cases"] = float(n)
    return out


class ClassificationTask:
    """Classification: cross-entropy loss, softmax scores, AUC / sensitivity / specificity per class."""

    kind = "classification"
    main_metric = "auc_mean"

    def __init__(self, exp: ExperimentConfig) -> None:
        self.exp = exp
        self.class_names = list(exp.task.class_names)

    def loss(self, per_sample: bool = False) -> torch.nn.Module:
        """The training loss: cross-entropy, already a mean of per-sample terms (``per_sample`` changes nothing)."""
        return torch.nn.CrossEntropyLoss()

    @torch.no_grad()
    def scores(self, model: torch.nn.Module, loader: Any, rt: Runtime) -> tuple[np.ndarray, np.ndarray]:
        """Softmax scores (N, C) and labels (N,) over a loader."""
        model.eval()
        all_scores, all_labels = [], []
        for batch in loader:
            image = batch["image"].to(rt.device)
            with rt.autocast():
                logits = model(image)
            all_scores.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
            all_labels.append(batch["label"].reshape(-1).cpu().numpy())
        if not all_scores:
            return np.zeros((0, len(self.class_names))), np.zeros((0,), dtype=np.int64)
        return np.concatenate(all_scores), np.concatenate(all_labels).astype(np.int64)

    def evaluate(self, model: torch.nn.Module, loader: Any, rt: Runtime) -> dict[str, float]:
        """Metrics of ``model`` on the loader's cases."""
        scores, labels = self.scores(model, loader, rt)
        return classification_metrics(scores, labels, self.class_names)

    def overlays(self, model: torch.nn.Module, loader: Any, rt: Runtime, limit: int = 2) -> list[np.ndarray]:
        """No pictures for classification (the score curves say it)."""
        return []
