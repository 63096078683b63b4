"""Config loading: strict keys and types, overrides, round trip."""

from __future__ import annotations

import pytest

from fedimg import config as cfg
from tests.conftest import CT_SPEC, DEMO_EXPERIMENT, MR_SPEC


def test_shipped_configs_load():
    exp = cfg.load(cfg.ExperimentConfig, DEMO_EXPERIMENT)
    assert exp.task.class_names == ["organ", "lesion"]
    assert exp.task.num_classes == 3
    assert cfg.load(cfg.PreprocessSpec, CT_SPEC).target_spacing == (3.0, 3.0, 3.0)
    assert cfg.load(cfg.PreprocessSpec, MR_SPEC).modality == "MR"


def test_unknown_key_is_named_with_alternatives(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("name: x\noptim:\n  learning_rate: 0.1\n")
    with pytest.raises(cfg.ConfigError) as exc:
        cfg.load(cfg.ExperimentConfig, p)
    msg = str(exc.value)
    assert "optim.learning_rate" in msg and "lr" in msg and str(p) in msg


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("optim.lr=fast", "optim.lr: expected float, got str"),
        ("fed.num_rounds=0", "fed.num_rounds must be >= 1, got 0"),
        ("data.roi_size=[64, 64]", "data.roi_size must have task.spatial_dims = 3 entries"),
        ("data.roi_size=[8, 64, 64]", "data.roi_size must be 2 or 3 sizes, each >= 16"),
        ("fed.exchange=delta", "fed.exchange: expected one of 'weights', 'diff'"),
        (
            "fed.algorithm=fedopt",
            "fed.algorithm fedopt treats the averaged update as a gradient: set fed.exchange: diff",
        ),
        ("fed.algorithm=fedbn", "fed.algorithm fedbn keeps normalization layers at each site"),
        ("fed.mu=0", "fed.mu must be a finite number > 0"),
        ("fed.min_round_timeout_s=5", "fed.min_round_timeout_s must be >= 10, got 5"),
        ("model.name=resnet", "model.name 'resnet' is a classifier"),
        ("task.positive_class=organ", "task.positive_class must be one of task.class_names"),
        ("task.class_names=[organ, 'bad name']", "task.class_names must be letters, digits"),
        ("task.spatial_dims=2", "task.spatial_dims must be 3 for segmentation"),
        ("train.amp=3", "train.amp: expected bool"),
        ("model.strides=[2]", "model.strides must have"),
        ("fed.algorithm=fedsgd", "fed.algorithm: expected one of 'fedavg', 'fedprox', 'fedopt', 'scaffold', 'fedbn'"),
    ],
)
def test_wrong_values_name_key_and_type(override, expected):
    with pytest.raises(cfg.ConfigError, match=None) as exc:
        cfg.load(cfg.ExperimentConfig, DEMO_EXPERIMENT, [override])
    assert expected in str(exc.value)


def test_overrides_apply_and_roundtrip(tmp_path):
    exp = cfg.load(cfg.ExperimentConfig, DEMO_EXPERIMENT, ["optim.lr=3e-4", "fed.num_rounds=7"])
    assert exp.optim.lr == pytest.approx(3e-4)
    assert exp.fed.num_rounds == 7
    cfg.save(exp, tmp_path / "resolved.yaml")
    assert cfg.load(cfg.ExperimentConfig, tmp_path / "resolved.yaml") == exp


def test_bad_override_syntax():
    with pytest.raises(cfg.ConfigError, match="expected KEY=VALUE"):
        cfg.apply_overrides({}, ["optim.lr"])


def test_missing_required_key(tmp_path):
    p = tmp_path / "spec.yaml"
    p.write_text("name: s\nmodality: CT\n")
    with pytest.raises(cfg.ConfigError, match="missing required key target_spacing"):
        cfg.load(cfg.PreprocessSpec, p)


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(cfg.ConfigError, match="does not exist"):
        cfg.load(cfg.ExperimentConfig, tmp_path / "nope.yaml")
    p = tmp_path / "list.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(cfg.ConfigError, match="expected a YAML mapping"):
        cfg.load(cfg.ExperimentConfig, p)


def test_site_config_resolves_relative_paths(tmp_path):
    (tmp_path / "site.yaml").write_text("name: site-9\ndatalist: pre/datalist.json\nlocal_logdir: tb\n")
    site = cfg.load_site_config(tmp_path / "site.yaml")
    assert site.datalist == str(tmp_path / "pre" / "datalist.json")
    assert site.local_logdir == str(tmp_path / "tb")


def test_label_values_must_name_classes():
    with pytest.raises(cfg.ConfigError, match="labels.values names 'tumour'"):
        cfg.from_dict(
            cfg.PreprocessSpec,
            {
                "name": "s",
                "modality": "MR",
                "target_spacing": [1, 1, 1],
                "labels": {"classes": ["tumor"], "values": {"tumour": 1}},
            },
        )


def test_cosine_schedule_endpoints():
    opt = cfg.OptimConfig(lr=1e-3, schedule="cosine", min_lr_factor=0.1)
    assert opt.lr_at(0.0) == pytest.approx(1e-3)
    assert opt.lr_at(0.5) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))
    assert opt.lr_at(1.0) == pytest.approx(1e-4)
    assert cfg.OptimConfig(lr=2e-3).lr_at(0.7) == 2e-3  # constant


def test_classification_config_checks():
    from tests.conftest import tiny_classification

    exp = tiny_classification(2)
    assert exp.task.num_classes == 2 and exp.key_metric == "val_auc" and exp.task.main_metric == "auc_mean"
    with pytest.raises(cfg.ConfigError, match="is a segmentation network"):
        tiny_classification(2, **{"model.name": "unet"})
    with pytest.raises(cfg.ConfigError, match="densenet121 needs images of at least 32"):
        tiny_classification(2, **{"model.name": "densenet121", "data.roi_size": "[28, 28]"})
    with pytest.raises(cfg.ConfigError, match="task.positive_class must be one of"):
        tiny_classification(2, **{"task.positive_class": "tumour"})
    assert cfg.load(cfg.ExperimentConfig, DEMO_EXPERIMENT).key_metric == "val_dice"


def test_privacy_settings_are_checked_against_the_exchange_and_the_workflow():
    from tests.conftest import tiny_classification

    with pytest.raises(cfg.ConfigError, match="acts on model differences.*fed.exchange: diff"):
        tiny_classification(2, **{"privacy.update_filter": "percentile"})
    with pytest.raises(cfg.ConfigError, match="privacy.gaussian.noise_multiplier must be"):
        tiny_classification(
            2, **{"fed.exchange": "diff", "privacy.update_filter": "gaussian", "privacy.gaussian.noise_multiplier": 0}
        )
    with pytest.raises(cfg.ConfigError, match="encryption he.*fed.exchange: weights.*cross_site_eval: false"):
        tiny_classification(2, **{"privacy.encryption": "he", "fed.exchange": "diff"})
    ok = tiny_classification(
        2, **{"privacy.encryption": "he", "fed.cross_site_eval": "false", "fed.final_eval": "false"}
    )
    assert ok.privacy.encryption == "he"


def test_he_job_is_refused_in_the_simulator_with_what_to_do(tmp_path):
    pytest.importorskip("tenseal")
    from fedimg.fl.recipe import build_recipe
    from tests.conftest import REPO, tiny_classification

    exp = tiny_classification(
        2, **{"privacy.encryption": "he", "fed.cross_site_eval": "false", "fed.final_eval": "false"}
    )
    with pytest.raises(ValueError, match="--env poc or --env prod"):
        build_recipe(exp, REPO / "jobs" / "train", {"site-1": str(tmp_path / "s.yaml")}, tmp_path / "staging")
