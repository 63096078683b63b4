"""Bad configs fail at load with one line naming the key, the value and what is allowed (issue 12).

Every case below used to be accepted by :mod:`fedimg.config` and crashed later
(``re.error`` tracebacks, MONAI errors mid-run, a best model never selected).
Each is checked twice: through ``cfg.load`` of a YAML file, and through the
CLI, which must exit 2 with exactly one ``fedimg ...: error:`` line.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedimg import config as cfg
from fedimg.cli import main
from tests.conftest import CT_SPEC, DEMO_EXPERIMENT, REPO


def _set(data: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(data)
    node = out
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def _write(tmp_path: Path, base: Path, dotted: str, value: Any) -> Path:
    data = _set(yaml.safe_load(base.read_text()), dotted, value)
    p = tmp_path / "bad.yaml"
    # Raw text for non-finite floats: yaml.safe_dump writes them as .nan / .inf, which YAML reads back as floats.
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


SPEC_CASES = [
    (
        "series.label_description_regex",
        "(unclosed",
        ["series.label_description_regex", "not a valid regular", "'(unclosed'"],
    ),
    ("series.image_description_regex", "[a-", ["series.image_description_regex", "not a valid regular", "'[a-'"]),
    ("series.label_nifti_name_regex", "*.nii", ["series.label_nifti_name_regex", "not a valid regular", "'*.nii'"]),
    ("series.label_description_regex", "", ["series.label_description_regex is empty", "matches every"]),
    ("orientation", "XYZ", ["orientation must be three axis codes", "L/R, A/P and S/I", "'XYZ'"]),
    ("orientation", "RRS", ["orientation must be three axis codes, one of L/R", "'RRS'"]),
    ("orientation", "RASL", ["orientation must be three axis codes, one of L/R", "'RASL'"]),
    (
        "target_spacing",
        [0.01, 1.0, 1.0],
        ["target_spacing must be three mm values in (0.01, 50.0]", "[0.01, 1.0, 1.0]"],
    ),
    ("target_spacing", [3.0, 3.0, 51.0], ["target_spacing must be three mm values in (0.01, 50.0]", "51.0"]),
    ("target_spacing", [3.0, float("nan"), 3.0], ["target_spacing[1]: expected a finite float", "nan"]),
    ("intensity.ct_window", [float("-inf"), 240.0], ["intensity.ct_window[0]: expected a finite float", "-inf"]),
    ("labels.values", {"organ": -1, "lesion": 2}, ["labels.values.organ must be a stored voxel value >= 1", "got -1"]),
    ("labels.values", {"organ": 0, "lesion": 2}, ["labels.values.organ", "0 is background", "got 0"]),
    ("labels.values", {"organ": 2, "lesion": 2}, ["labels.values", "[2, 2]", "each class needs its own value"]),
    ("labels.values", {"lesion": 1}, ["labels.values", "[1, 1]", "each class needs its own value"]),
    ("geometry.orientation_tolerance", 0.5, ["geometry.orientation_tolerance must be in (0, 0.1)", "0.5"]),
    ("deid.covariates", ["PatientName"], ["deid.covariates[0] 'PatientName'", "PatientAge"]),
    (
        "deid.keep_descriptors",
        {"PatientName": ["x"]},
        ["deid.keep_descriptors names 'PatientName'", "SeriesDescription"],
    ),
    ("deid.private_allowlist", [["ACME 1.0", -1]], ["deid.private_allowlist[0]", "-1"]),
]

EXPERIMENT_CASES = [
    (
        "fed.key_metric",
        "val_dsc",
        [
            "fed.key_metric 'val_dsc' is not a metric the segmentation task reports",
            "val_dice, val_dice_organ, val_dice_lesion",
        ],
    ),
    ("fed.key_metric", "val_hd95", ["fed.key_metric 'val_hd95'", "higher is better"]),
    ("fed.key_metric", "val_auc", ["fed.key_metric 'val_auc'", "auto or one of val_dice"]),
    (
        "model.channels",
        [16, -32, 64, 128],
        ["model.channels must list >= 2 positive feature counts", "[16, -32, 64, 128]"],
    ),
    ("model.strides", [2, 0, 2], ["model.strides must be positive", "[2, 0, 2]"]),
    ("model.num_res_units", -1, ["model.num_res_units must be >= 0", "-1"]),
    ("optim.lr", float("inf"), ["optim.lr: expected a finite float", "inf"]),
    ("optim.momentum", -0.5, ["optim.momentum must be in [0, 1)", "-0.5"]),
    ("train.sw_batch_size", 0, ["train.sw_batch_size must be >= 1", "got 0"]),
    ("train.seed", -1, ["train.seed must be >= 0", "got -1"]),
    ("fed.robust.max_update_norm", float("nan"), ["fed.robust.max_update_norm: expected a finite float"]),
]


def _ids(cases: list) -> list[str]:
    return [f"{key}={value!r}" for key, value, _ in cases]


@pytest.mark.parametrize(("key", "value", "expected"), SPEC_CASES, ids=_ids(SPEC_CASES))
def test_bad_spec_is_refused_at_load(tmp_path, key, value, expected):
    path = _write(tmp_path, CT_SPEC, key, value)
    with pytest.raises(cfg.ConfigError) as exc:
        cfg.load(cfg.PreprocessSpec, path)
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(str(path))
    for part in expected:
        assert part in msg, (part, msg)


@pytest.mark.parametrize(("key", "value", "expected"), SPEC_CASES, ids=_ids(SPEC_CASES))
def test_bad_spec_via_cli_exits_2_with_one_line(tmp_path, capsys, key, value, expected):
    path = _write(tmp_path, CT_SPEC, key, value)
    src = tmp_path / "src"
    src.mkdir()
    (src / "notes.txt").write_text("not DICOM")  # the source check passes: only the spec can stop the run
    rc = main(
        ["preprocess", str(src), str(tmp_path / "out"), "--spec", str(path), "--site", "s", "--no-deid", "--quiet"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("fedimg preprocess: error: "), err
    for part in expected:
        assert part in err[0], (part, err[0])
    assert not (tmp_path / "out").exists()  # refused before anything was written


@pytest.mark.parametrize(("key", "value", "expected"), EXPERIMENT_CASES, ids=_ids(EXPERIMENT_CASES))
def test_bad_experiment_is_refused_at_load(tmp_path, key, value, expected):
    path = _write(tmp_path, DEMO_EXPERIMENT, key, value)
    with pytest.raises(cfg.ConfigError) as exc:
        cfg.load(cfg.ExperimentConfig, path)
    msg = str(exc.value)
    assert "\n" not in msg
    for part in expected:
        assert part in msg, (part, msg)


@pytest.mark.parametrize(("key", "value", "expected"), EXPERIMENT_CASES, ids=_ids(EXPERIMENT_CASES))
def test_bad_experiment_via_cli_exits_2_with_one_line(tmp_path, capsys, key, value, expected):
    path = _write(tmp_path, DEMO_EXPERIMENT, key, value)
    site = tmp_path / "site.yaml"
    site.write_text("name: s\ndatalist: d.json\n")
    rc = main(["train-local", "--config", str(path), "--site-config", str(site), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("fedimg train-local: error: "), err
    for part in expected:
        assert part in err[0], (part, err[0])


def test_classification_key_metrics_are_the_task_metrics(tmp_path):
    """Every rankable name is one the classification task really reports (and only those are accepted)."""
    import numpy as np

    from fedimg.tasks import metric_names
    from fedimg.tasks.classification import classification_metrics

    exp = cfg.load(cfg.ExperimentConfig, REPO / "configs" / "experiments" / "cls_pneumonia.yaml")
    scores = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    reported = metric_names(classification_metrics(scores, np.array([0, 1, 1, 0]), exp.task.class_names))
    assert set(exp.task.rankable_metrics) <= set(reported)
    assert "val_cases" in reported and "val_cases" not in exp.task.rankable_metrics
    for name in exp.task.rankable_metrics:
        p = _write(tmp_path, REPO / "configs" / "experiments" / "cls_pneumonia.yaml", "fed.key_metric", name)
        assert cfg.load(cfg.ExperimentConfig, p).key_metric == name
    with pytest.raises(cfg.ConfigError, match="fed.key_metric 'val_dice' is not a metric the classification task"):
        cfg.load(
            cfg.ExperimentConfig, REPO / "configs" / "experiments" / "cls_pneumonia.yaml", ["fed.key_metric=val_dice"]
        )


def test_segmentation_key_metrics_are_the_task_metrics():
    import torch

    from fedimg.tasks import metric_names
    from fedimg.tasks.segmentation import DiceAccumulator

    exp = cfg.load(cfg.ExperimentConfig, DEMO_EXPERIMENT)
    acc = DiceAccumulator(exp.task.class_names)
    label = torch.zeros(1, 1, 8, 8, 8, dtype=torch.long)
    label[0, 0, 2:5, 2:5, 2:5] = 1
    label[0, 0, 5:7, 5:7, 5:7] = 2
    acc.update(label.clone(), label, [[1.0, 1.0, 1.0]])
    reported = metric_names(acc.result())
    assert set(exp.task.rankable_metrics) <= set(reported)
    assert not any(n.startswith("val_hd95") for n in exp.task.rankable_metrics)
    assert (
        cfg.load(cfg.ExperimentConfig, DEMO_EXPERIMENT, ["fed.key_metric=val_dice_lesion"]).key_metric
        == "val_dice_lesion"
    )


def test_valid_variants_still_load():
    spec = cfg.load(
        cfg.PreprocessSpec,
        CT_SPEC,
        [
            "orientation=lps",
            "target_spacing=[0.5, 0.5, 50]",
            "deid.covariates=[PatientAge]",
            "deid.keep_descriptors={SeriesDescription: [Abdomen]}",
        ],
    )
    assert spec.orientation == "LPS"  # normalized: MONAI reads upper-case codes only
    assert spec.target_spacing == (0.5, 0.5, 50.0)
    for p in sorted((REPO / "configs" / "preprocessing").glob("*.yaml")):
        cfg.load(cfg.PreprocessSpec, p)
    for p in sorted((REPO / "configs" / "experiments").glob("*.yaml")):
        cfg.load(cfg.ExperimentConfig, p)


def test_bad_regex_via_console_script_has_no_traceback(tmp_path):
    """The whole process: one stderr line and exit 2 (the old code raised re.error with a traceback)."""
    path = _write(tmp_path, CT_SPEC, "series.label_description_regex", "(unclosed")
    src = tmp_path / "src"
    src.mkdir()
    (src / "notes.txt").write_text("not DICOM")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedimg.cli",
            "preprocess",
            str(src),
            str(tmp_path / "out"),
            "--spec",
            str(path),
            "--site",
            "s",
            "--no-deid",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "series.label_description_regex is not a valid regular expression" in lines[0]
