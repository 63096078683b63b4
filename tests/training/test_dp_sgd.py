"""DP-SGD in the site trainer (Opacus): refusals, per-sample clipping, accounting, plain state dicts.

Tiny data: the synthetic CT sites of ``small_preprocessed`` (3D segmentation)
and the 2D blob images of ``cls_sites`` (classification), trained on the CPU.
"""

from __future__ import annotations

import math

import pytest
import torch

from fedimg import config as cfg
from fedimg import runtime
from fedimg.models.registry import build_model
from fedimg.training.trainer import SiteTrainer
from tests.conftest import tiny_classification, tiny_experiment

DP = {"privacy.dp_sgd.enabled": "true"}


def _rt() -> runtime.Runtime:
    return runtime.setup("cpu", amp=False, num_threads=2, seed=0)


def _seg_trainer(small_preprocessed, site: str = "site-1", **over) -> SiteTrainer:
    base, _ = small_preprocessed
    return SiteTrainer.from_datalist(tiny_experiment(**{**DP, **over}), base / site / "datalist.json", _rt())


def _cls_trainer(cls_sites, **over) -> SiteTrainer:
    # DenseNet with group norm: MONAI's ResNet has BatchNorm in its blocks (refused below).
    exp = tiny_classification(2, **{**DP, "model.name": "densenet121", "model.norm": "group", **over})
    return SiteTrainer.from_datalist(exp, cls_sites[2]["site-1"], _rt())


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in a if a[k].is_floating_point()))


@pytest.mark.parametrize(
    "over,message",
    [
        ({"model.norm": "batch"}, "BatchNorm mixes across the batch: set model.norm: instance or group"),
        (
            {"fed.algorithm": "fedprox"},
            "fed.algorithm fedprox adds terms outside that accounting: use fedavg or fedopt",
        ),
        ({"fed.algorithm": "scaffold"}, "fed.algorithm scaffold adds terms"),
        ({"data.samples_per_volume": 2}, "set data.samples_per_volume: 1 so a sample is one case (got 2)"),
    ],
)
def test_config_refuses_what_dp_sgd_cannot_account_for(over, message):
    with pytest.raises(cfg.ConfigError) as exc:
        tiny_experiment(**{**DP, **over})
    assert message in str(exc.value)


def test_resnet_is_refused_naming_its_batchnorm_layers(cls_sites):
    from fedimg.training.dp_sgd import check_network, unsupported_layers

    exp = tiny_classification(2, **{**DP, "model.name": "resnet", "model.norm": "group"})
    net = build_model(exp.model, exp.task)
    bad = unsupported_layers(net)
    assert bad and {t for _, t, _ in bad} == {"BatchNorm2d"} and "layer1.0.bn1" in [n for n, _, _ in bad]
    with pytest.raises(cfg.ConfigError) as exc:
        check_network(net, exp)
    text = str(exc.value)
    assert f"{len(bad)} BatchNorm2d layer(s) (layer1.0.bn1" in text
    assert "MONAI's ResNet builds its residual blocks with BatchNorm" in text and "densenet121" in text
    # The trainer refuses it on construction, before any training step.
    with pytest.raises(cfg.ConfigError, match="Opacus cannot train this resnet"):
        SiteTrainer.from_datalist(exp, cls_sites[2]["site-1"], _rt())
    # Group-norm DenseNet, instance-norm UNet and SegResNet pass the validator.
    dense = tiny_classification(2, **{"model.name": "densenet121", "model.norm": "group"})
    assert unsupported_layers(build_model(dense.model, dense.task)) == []
    for over in ({}, {"model.name": "segresnet", "model.init_filters": 8, "model.blocks_down": "[1, 1, 1]"}):
        seg = tiny_experiment(**over)
        assert unsupported_layers(build_model(seg.model, seg.task)) == []


@pytest.mark.slow
@pytest.mark.parametrize("model", ["unet", "segresnet"])
def test_segmentation_fit_with_dp_sgd(small_preprocessed, model):
    over = (
        {}
        if model == "unet"
        else {
            "model.name": "segresnet",
            "model.init_filters": 8,
            "model.blocks_down": "[1, 1, 1]",
            "model.norm": "instance",
        }
    )
    trainer = _seg_trainer(small_preprocessed, "site-2", **over)
    plain = build_model(trainer.exp.model, trainer.exp.task).state_dict()
    # The plain module is kept: the same keys (no "_module." prefix) and shapes as without DP-SGD.
    before = trainer.state_dict()
    assert list(before) == list(plain) and all(before[k].shape == plain[k].shape for k in plain)
    assert trainer.scaler is None and type(trainer.model).__name__ != "GradSampleModule"
    assert trainer.privacy_spent()["epsilon"] == 0.0 and trainer.privacy_spent()["steps"] == 0

    fit = trainer.fit(1)
    one = trainer.privacy_spent()
    assert fit["steps"] == one["steps"] == 2  # 3 cases, batch 2: 2 Poisson batches per epoch at rate 1/2
    assert one["mechanism"] == "dp_sgd" and one["sample_rate"] == pytest.approx(0.5)
    assert 0 < one["epsilon"] < math.inf
    after = trainer.state_dict()
    assert list(after) == list(plain) and _distance(after, before) > 1e-4
    trainer.fit(2)
    three = trainer.privacy_spent()
    assert three["steps"] == 6 and three["epsilon"] > one["epsilon"]
    # The trained weights load into a plain network and evaluate there.
    net = build_model(trainer.exp.model, trainer.exp.task)
    net.load_state_dict(trainer.state_dict())
    val = trainer.validate()
    assert 0.0 <= val["dice_mean"] <= 1.0


@pytest.mark.slow
def test_classification_fit_with_dp_sgd_and_noise_versus_epsilon(cls_sites):
    low = _cls_trainer(cls_sites, **{"privacy.dp_sgd.noise_multiplier": 0.8})
    high = _cls_trainer(cls_sites, **{"privacy.dp_sgd.noise_multiplier": 2.0})
    plain = build_model(low.exp.model, low.exp.task).state_dict()
    before = low.state_dict()
    for t in (low, high):
        t.fit(1)
    a, b = low.privacy_spent(), high.privacy_spent()
    assert a["steps"] == b["steps"] == 4  # 16 cases, batch 4
    assert a["sample_rate"] == pytest.approx(0.25) and a["expected_batch_size"] == 4
    assert 0 < b["epsilon"] < a["epsilon"] < math.inf  # more noise, less privacy spent
    assert list(low.state_dict()) == list(plain)
    assert _distance(low.state_dict(), before) > 1e-4
    assert 0.0 <= low.validate()["auc_mean"] <= 1.0
    # Without DP-SGD nothing is accounted.
    exp = tiny_classification(2, **{"model.name": "densenet121", "model.norm": "group"})
    assert SiteTrainer.from_datalist(exp, cls_sites[2]["site-1"], _rt()).privacy_spent() is None


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # the first layer's input is the image
def test_each_case_gradient_is_clipped_before_summing(small_preprocessed):
    trainer = _seg_trainer(small_preprocessed, "site-1", **{"privacy.dp_sgd.max_grad_norm": 1e-3})
    dp = trainer.dp
    clip = trainer.exp.privacy.dp_sgd.max_grad_norm
    batch = next(b for b in dp.loader if b is not None)
    dp.optimizer.zero_grad(set_to_none=True)
    trainer.loss_fn(dp.module(batch["image"]), batch["label"]).backward()
    params = dp.optimizer.params
    n = batch["image"].shape[0]
    assert all(p.grad_sample.shape == (n, *p.shape) for p in params)
    norms = torch.stack([p.grad_sample.reshape(n, -1).norm(dim=1) for p in params], dim=1).norm(dim=1)
    assert bool((norms > 100 * clip).all())  # every case's gradient is far above the bound
    expected = [torch.einsum("i,i...", (clip / (norms + 1e-6)).clamp(max=1.0), p.grad_sample) for p in params]
    dp.optimizer.clip_and_accumulate()
    summed = math.sqrt(sum(float((p.summed_grad**2).sum()) for p in params))
    assert summed <= n * clip * (1 + 1e-4)  # n clipped gradients, not one clipped batch gradient
    assert all(torch.allclose(p.summed_grad, e, rtol=1e-4, atol=1e-12) for p, e in zip(params, expected))
    dp.optimizer.zero_grad(set_to_none=True)


@pytest.mark.slow
def test_a_dp_sgd_epoch_moves_the_weights_no_further_than_the_clipped_bound(small_preprocessed):
    # Plain SGD at lr 1, almost no noise: a step moves the weights by at most |batch| * C / expected batch.
    over = {"optim.name": "sgd", "optim.lr": "1.0", "optim.momentum": "0.0", "optim.weight_decay": "0.0"}
    clip = 1e-3
    dp = _seg_trainer(
        small_preprocessed,
        "site-1",
        **over,
        **{"privacy.dp_sgd.max_grad_norm": clip, "privacy.dp_sgd.noise_multiplier": 1e-6},
    )
    base, _ = small_preprocessed
    plain = SiteTrainer.from_datalist(tiny_experiment(**over), base / "site-1" / "datalist.json", _rt())
    plain.load_weights(dp.state_dict())
    start = dp.state_dict()
    steps = dp.fit(1)["steps"]
    plain.fit(1)
    moved_dp, moved_plain = _distance(dp.state_dict(), start), _distance(plain.state_dict(), start)
    bound = steps * dp.n_train * clip / dp.dp.expected_batch_size
    assert 0 < moved_dp <= bound * 1.01
    assert moved_plain > 100 * bound  # without clipping the same step goes much further


def test_an_empty_poisson_batch_still_takes_a_noised_and_accounted_step(small_preprocessed):
    trainer = _seg_trainer(small_preprocessed, "site-1")
    before = trainer.state_dict()
    trainer.dp._noise_only_step()  # what an empty batch does (the loader yields None for it)
    spent = trainer.privacy_spent()
    assert spent["steps"] == 1 and spent["epsilon"] > 0
    assert _distance(trainer.state_dict(), before) > 0  # noise alone moved the weights
    from fedimg.training.dp_sgd import _EmptyAsNone

    collate = _EmptyAsNone(lambda b: {"n": len(b)})
    assert collate([]) is None and collate([1, 2]) == {"n": 2}


@pytest.mark.slow
def test_local_only_and_centralized_baselines_run_with_dp_sgd(small_preprocessed, tmp_path):
    from fedimg.training.baselines import centralized, local_only

    base, _ = small_preprocessed
    exp = tiny_experiment(**DP)
    datalists = {s: str(base / s / "datalist.json") for s in ("site-1", "site-2")}
    local = local_only(exp, datalists, _rt(), tmp_path / "local", epochs=2)
    for _site, res in local.items():
        eps = [row["privacy_epsilon"] for row in res.history]
        assert len(eps) == 2 and 0 < eps[0] < eps[1] == res.privacy["epsilon"]
        assert all(0.0 <= m["dice_mean"] <= 1.0 for m in res.per_site.values())
    pooled = centralized(exp, datalists, _rt(), tmp_path / "central", epochs=1)
    # 5 pooled cases at batch 2: 3 Poisson batches at rate 1/3, a smaller rate than either site alone.
    assert pooled.privacy["steps"] == 3 and pooled.privacy["sample_rate"] == pytest.approx(1 / 3)
    assert 0 < pooled.privacy["epsilon"] < math.inf


class _InPlaceResidual(torch.nn.Module):
    """Changes its own conv's output in place: Opacus' backward hook on that conv cannot allow it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        out += x
        return out


def test_a_network_opacus_cannot_differentiate_is_refused_before_training():
    from fedimg.training.dp_sgd import DPSGD

    exp = tiny_experiment(**DP)
    net = _InPlaceResidual()
    data = torch.utils.data.TensorDataset(torch.zeros(4, 1, 32, 32, 32), torch.zeros(4, 1, 32, 32, 32))
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    with pytest.raises(cfg.ConfigError) as exc:
        DPSGD(net, torch.optim.SGD(net.parameters(), lr=0.1), loader, exp, _rt())
    text = str(exc.value)
    assert "Opacus could not compute per-sample gradients of model.name unet" in text
    assert "modified inplace" in text and "set privacy.dp_sgd.enabled: false" in text


def test_algorithm_step_additions_are_refused_under_dp_sgd(small_preprocessed):
    from fedimg.training.loops import StepHooks

    trainer = _seg_trainer(small_preprocessed, "site-1")
    with pytest.raises(ValueError, match="step additions .FedProx, SCAFFOLD. are not allowed"):
        trainer.fit(1, hooks=StepHooks(extra_loss=lambda m: torch.zeros(())))
    assert trainer.privacy_spent()["steps"] == 0  # refused before any step


@pytest.mark.slow
def test_train_local_records_epsilon_per_epoch(small_preprocessed, tmp_path):
    import json

    from fedimg.training.local import train_local

    base, _ = small_preprocessed
    exp = tiny_experiment(**DP, **{"train.epochs": 2, "train.amp": "false"})
    site = cfg.SiteConfig(name="site-2", datalist=str(base / "site-2" / "datalist.json"), device="cpu", num_threads=2)
    res = train_local(exp, site, tmp_path / "local", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "local" / "metrics.jsonl").read_text().splitlines()]
    eps = [r["privacy_epsilon"] for r in rows]
    assert len(eps) == 2 and 0 < eps[0] < eps[1] == res.privacy["epsilon"] < math.inf
    assert res.privacy["steps"] == 4  # 3 cases, batch 2: 2 Poisson batches per epoch
