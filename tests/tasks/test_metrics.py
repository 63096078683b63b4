"""Task metrics on cases with known answers: HD95 in mm, AUC, sensitivity, specificity, balanced accuracy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedimg.tasks import metric_names
from fedimg.tasks.classification import classification_metrics
from fedimg.tasks.segmentation import DiceAccumulator


def test_hd95_is_in_millimetres_and_zero_for_a_perfect_match():
    label = torch.zeros(1, 1, 12, 12, 12, dtype=torch.long)
    label[..., 2:6, 2:6, 2:6] = 1
    pred = torch.zeros_like(label)
    pred[..., 4:8, 2:6, 2:6] = 1  # the organ shifted by 2 voxels along the first axis
    acc = DiceAccumulator(["organ", "lesion"])
    acc.update(pred, label, spacing=[[3.0, 1.0, 1.0]])
    res = acc.result()
    assert res["hd95/organ"] == pytest.approx(6.0)  # 2 voxels x 3 mm
    assert res["hd95/lesion"] == 0.0  # absent in both: a perfect match
    acc.update(label, label, spacing=[[3.0, 1.0, 1.0]])
    assert acc.result()["hd95/organ"] == 0.0


def test_hd95_undefined_when_only_one_side_is_empty():
    label = torch.zeros(1, 1, 8, 8, 8, dtype=torch.long)
    pred = label.clone()
    pred[..., 3, 3, 3] = 2  # a lesion predicted where there is none
    acc = DiceAccumulator(["organ", "lesion"])
    acc.update(pred, label)
    res = acc.result()
    assert "hd95/lesion" not in res and res["hd95_undefined/lesion"] == 1.0
    assert res["dice/lesion"] == 0.0


def test_classification_metrics_known_values():
    # 4 positives, 4 negatives; scores rank 3 positives above every negative.
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    p1 = np.array([0.9, 0.8, 0.7, 0.2, 0.6, 0.3, 0.1, 0.4])
    scores = np.stack([1 - p1, p1], axis=1)
    m = classification_metrics(scores, labels, ["normal", "pneumonia"])
    # AUC = fraction of (pos, neg) pairs ranked correctly: pos 0.2 beats only 0.1 -> 13/16.
    assert m["auc/pneumonia"] == pytest.approx(13 / 16)
    assert m["auc/normal"] == pytest.approx(13 / 16) and m["auc_mean"] == pytest.approx(13 / 16)
    # Arg-max predictions: positives 0.9, 0.8, 0.7 and the negative 0.6.
    assert m["sensitivity/pneumonia"] == pytest.approx(3 / 4)
    assert m["specificity/pneumonia"] == pytest.approx(3 / 4)
    assert m["balanced_accuracy/pneumonia"] == pytest.approx(3 / 4)
    assert m["accuracy"] == pytest.approx(6 / 8) and m["cases"] == 8


def test_balanced_accuracy_does_not_reward_the_majority_class():
    labels = np.array([0] * 9 + [1])
    scores = np.tile([0.9, 0.1], (10, 1))  # always "normal"
    m = classification_metrics(scores, labels, ["normal", "pneumonia"])
    assert m["accuracy"] == pytest.approx(0.9)
    assert m["balanced_accuracy"] == pytest.approx(0.5)
    assert m["sensitivity/pneumonia"] == 0.0


def test_auc_left_out_when_a_site_has_one_class_only():
    m = classification_metrics(np.array([[0.2, 0.8], [0.4, 0.6]]), np.array([1, 1]), ["a", "b"])
    assert "auc_mean" not in m and "auc/b" not in m and m["sensitivity/b"] == 1.0


def test_metric_names_are_flat_fl_names():
    assert metric_names({"dice_mean": 0.5, "dice/organ": 0.4, "cases": 2.0}) == {
        "val_dice": 0.5,
        "val_dice_organ": 0.4,
        "val_cases": 2.0,
    }


def test_gpu_component_labelling_matches_scipy_on_random_masks():
    # The CUDA path of small-component removal, run on the CPU: the same components as SciPy's 26-connectivity.
    import numpy as np
    import torch
    from scipy import ndimage

    from fedimg.tasks.segmentation import _remove_small_torch, label_components_torch, remove_small_components

    rng = np.random.default_rng(0)
    for density in (0.05, 0.2, 0.4):
        mask = rng.random((17, 13, 11)) < density
        ours = label_components_torch(torch.as_tensor(mask)).numpy()
        ref, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
        assert len(np.unique(ours[ours > 0])) == n
        for comp in range(1, n + 1):  # each SciPy component is exactly one of ours
            assert len(np.unique(ours[ref == comp])) == 1
        pred = torch.as_tensor(rng.integers(0, 3, size=(1, 1, 17, 13, 11)))
        assert torch.equal(_remove_small_torch(pred, 3, 4), remove_small_components(pred, 3, 4))
