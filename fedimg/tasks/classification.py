"""Classification task (2D or 3D): cross-entropy, softmax scores, per-class AUC, sensitivity, specificity.

Every class is scored one-vs-rest: AUC from the softmax score of the class,
sensitivity and specificity from the predicted class (the arg-max of the
scores). Balanced accuracy per class is (sensitivity + specificity) / 2; the
overall ``balanced_accuracy`` is the mean sensitivity (recall) over classes,
which does not reward a model for always predicting the majority class.

``auc_mean``, ``balanced_accuracy`` (and ``auc/<class>`` with more than two
classes) come with their 95% bootstrap interval over the cases
(``<name>_ci_low``, ``<name>_ci_high``; :mod:`fedimg.tasks.intervals`): each
resample draws (score, label) pairs of whole cases.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, cast

import numpy as np
import torch
from monai.metrics import compute_roc_auc

from fedimg.config import ExperimentConfig
from fedimg.runtime import Runtime
from fedimg.tasks.intervals import add_interval, case_interval, rank_auc


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
    _add_intervals(out, scores, labels, class_names)
    return out


def _add_intervals(out: dict[str, float], scores: np.ndarray, labels: np.ndarray, class_names: Sequence[str]) -> None:
    """95% bootstrap intervals of the AUCs and the balanced accuracy, resampling whole cases.

    A resample that lacks a class the cases hold (no positive or no
    negative for an AUC, no case of a class for a recall) leaves that
    statistic undefined for the resample rather than changing its meaning.
    """
    pred = scores.argmax(axis=1)
    defined = [i for i in range(len(class_names)) if 0 < int((labels == i).sum()) < labels.size]
    present = [i for i in range(len(class_names)) if (labels == i).any()]

    def auc(i: int, rows: np.ndarray) -> float:
        return rank_auc(scores[rows, i], labels[rows] == i)

    def balanced(rows: np.ndarray) -> float:
        lab, prd = labels[rows], pred[rows]
        recalls = []
        for i in present:
            pos = lab == i
            if not pos.any():
                return float("nan")
            recalls.append(float((prd[pos] == i).mean()))
        return float(np.mean(recalls))

    n = labels.size
    if "auc_mean" in out:

        def auc_mean(rows: np.ndarray) -> float:
            return float(np.mean([auc(i, rows) for i in defined]))

        add_interval(out, "auc_mean", case_interval(n, auc_mean))
        if len(class_names) > 2:
            for i in defined:
                add_interval(out, f"auc/{class_names[i]}", case_interval(n, functools.partial(auc, i)))
    if "balanced_accuracy" in out:
        add_interval(out, "balanced_accuracy", case_interval(n, balanced))


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
