"""Train/evaluate loops, the site trainer, checkpoints and local training."""

from __future__ import annotations

import json

import pytest
import torch

from fedimg import config as cfg
from fedimg import runtime
from fedimg.tasks.segmentation import DiceAccumulator
from fedimg.training.checkpoint import load_state_dict, save_checkpoint
from fedimg.training.local import train_local
from fedimg.training.loops import TrainingError, train_epoch
from fedimg.training.trainer import SiteTrainer
from tests.conftest import tiny_experiment


def test_dice_known_values():
    acc = DiceAccumulator(["organ", "lesion"])
    label = torch.zeros(1, 1, 4, 4, 4, dtype=torch.long)
    label[..., :2, :, :] = 1  # 32 organ voxels, no lesion
    pred = label.clone()
    pred[..., 0, 0, :] = 0  # 4 organ voxels missed
    acc.update(pred, label)
    res = acc.result()
    assert res["dice/organ"] == pytest.approx(2 * 28 / (28 + 32))
    assert res["dice/lesion"] == 1.0  # absent and not predicted
    pred2 = pred.clone()
    pred2[..., 3, 3, 3] = 2  # a false-positive lesion on a lesion-free case scores 0
    acc.update(pred2, label)
    assert acc.result()["dice/lesion"] == 0.0


def test_site_trainer_learns_and_round_trips_weights(small_preprocessed, tmp_path):
    base, _ = small_preprocessed
    exp = tiny_experiment(**{"optim.lr": "0.005"})
    rt = runtime.setup("cpu", amp=False, num_threads=2, seed=0)
    trainer = SiteTrainer.from_datalist(exp, base / "site-1" / "datalist.json", rt)
    assert trainer.n_train >= 1 and trainer.n_val >= 1
    first = trainer.fit(1)["loss"]
    for _ in range(6):
        last = trainer.fit(1)["loss"]
    assert last < first  # it learns on real preprocessed volumes
    val = trainer.validate()
    assert set(val) >= {"dice_mean", "dice/organ", "dice/lesion", "hd95/organ", "cases"}
    assert val["hd95/organ"] > 0
    assert 0.0 <= val["dice_mean"] <= 1.0
    state = trainer.state_dict()
    save_checkpoint(tmp_path / "m.pt", trainer.model, {"val_dice": val["dice_mean"]})
    loaded = load_state_dict(tmp_path / "m.pt")
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    other = SiteTrainer.from_datalist(exp, base / "site-1" / "datalist.json", rt)
    other.load_weights(loaded)
    assert other.validate()["dice_mean"] == pytest.approx(val["dice_mean"], abs=1e-6)


def test_divergence_is_reported():
    rt = runtime.setup("cpu", amp=False, num_threads=1)
    model = torch.nn.Conv3d(1, 2, 1)
    batch = {"image": torch.full((1, 1, 2, 2, 2), float("nan")), "label": torch.zeros(1, 1, 2, 2, 2)}
    loss = torch.nn.MSELoss()
    with pytest.raises(TrainingError, match="lower optim.lr"):
        train_epoch(
            model,
            [batch],
            torch.optim.SGD(model.parameters(), lr=0.1),
            lambda out, lab: loss(out, out.detach() * 0),
            rt,
        )


def test_class_names_must_match_datalist(small_preprocessed):
    base, _ = small_preprocessed
    exp = tiny_experiment(**{"task.class_names": "[liver, tumour]"})
    rt = runtime.setup("cpu", amp=False, num_threads=1)
    with pytest.raises(ValueError, match=r"datalist classes \['organ', 'lesion'\] do not match task.class_names"):
        SiteTrainer.from_datalist(exp, base / "site-1" / "datalist.json", rt)


@pytest.mark.slow
def test_train_local_writes_checkpoints_metrics_and_tensorboard(small_preprocessed, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    base, _ = small_preprocessed
    exp = tiny_experiment(**{"train.epochs": 3})
    site = cfg.SiteConfig(name="site-1", datalist=str(base / "site-1" / "datalist.json"), device="cpu", num_threads=2)
    res = train_local(exp, site, tmp_path / "run", progress=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert res.metric == "dice_mean"
    assert res.best_score == pytest.approx(max(r["val_dice_mean"] for r in rows))
    assert (tmp_path / "run" / "best_model.pt").is_file() and (tmp_path / "run" / "last_model.pt").is_file()
    events = list((tmp_path / "run" / "tb" / "site-1").glob("events.out.tfevents.*"))  # one run per site
    assert len(events) == 1
    import socket

    assert socket.gethostname() not in events[0].name
    acc = EventAccumulator(str(events[0].parent), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "train/loss" in tags and "val/dice_mean" in tags  # the same tags as a federated run's
    assert len(acc.Scalars("val/dice_mean")) == 3
    assert not [t for t in tags if "_ci_" in t or "voxel" in t or "hd95_undefined" in t]  # measures only
    # The last model's pictures of the validation cases: one per case, three planes each, at the last epoch.
    pictures = [t for t in acc.Tags()["images"] if t.startswith("overlay/case_")]
    assert pictures and [e.step for e in acc.Images(pictures[0])] == [3]
    assert acc.Images(pictures[0])[0].width > 2 * acc.Images(pictures[0])[0].height


def test_small_components_are_removed_per_class():
    from fedimg.tasks.segmentation import remove_small_components

    pred = torch.zeros(1, 1, 10, 10, 10, dtype=torch.long)
    pred[0, 0, 1:5, 1:5, 1:5] = 1  # 64-voxel organ
    pred[0, 0, 8, 8, 8] = 1  # 1-voxel organ speck
    pred[0, 0, 2:4, 2:4, 2:4] = 2  # 8-voxel lesion inside the organ
    pred[0, 0, 0, 9, 0] = 2  # 1-voxel lesion speck
    out = remove_small_components(pred, num_classes=3, min_voxels=5)
    assert int((out == 1).sum()) == 64 - 8 and int((out == 2).sum()) == 8
    assert out[0, 0, 8, 8, 8] == 0 and out[0, 0, 0, 9, 0] == 0
    assert torch.equal(remove_small_components(pred, 3, 0), pred)
