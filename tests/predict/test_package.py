"""Model packages: what a run writes, what loading refuses, what ``fedimg model info`` prints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from fedimg import config as cfg
from fedimg.cli import main
from fedimg.models.package import (
    META_FILE,
    WEIGHTS_FILE,
    PackageError,
    load_package,
    spec_of_datalists,
    write_package,
)
from fedimg.models.registry import build_model
from tests.conftest import tiny_experiment


class _Payload:
    """An arbitrary class: unpickling it would run code of the sender's choosing."""


def _model_and_spec(ct_spec):
    import dataclasses

    exp = tiny_experiment()
    torch.manual_seed(0)
    return (
        exp,
        build_model(exp.model, exp.task).state_dict(),
        dataclasses.replace(ct_spec, target_spacing=(6.0, 6.0, 6.0)),
    )


def test_package_round_trip_and_model_info(ct_spec, tmp_path, capsys):
    exp, state, spec = _model_and_spec(ct_spec)
    chosen = {
        "metric": "dice_mean",
        "value": 0.8125,
        "cases": 3,
        "metrics": {"dice/organ": 0.9, "dice/lesion": 0.725},
        "on": "validation cases of site-1",
    }
    write_package(tmp_path / "pkg", state, exp, spec, chosen, {"run": "local", "model": "best", "epoch": 4})

    # The weights are a plain tensor dict: loadable without unpickling any code.
    raw = torch.load(tmp_path / "pkg" / WEIGHTS_FILE, weights_only=True)
    assert set(raw) == set(state) and all(torch.equal(raw[k], state[k]) for k in state)
    pkg = load_package(tmp_path / "pkg")
    assert pkg.class_names == ["organ", "lesion"] and pkg.task == "segmentation"
    assert pkg.spec == spec and pkg.experiment == exp
    assert pkg.chosen_on["value"] == 0.8125 and pkg.chosen_on["cases"] == 3
    assert pkg.meta["fedimg_version"] and pkg.meta["created"].endswith("Z")
    model = pkg.build_model()
    assert all(torch.equal(model.state_dict()[k], state[k]) for k in state)

    assert main(["model", "info", str(tmp_path / "pkg")]) == 0
    out = capsys.readouterr().out
    for text in (
        "segmentation (3D)",
        "organ (1)",
        "lesion (2)",
        "monai.networks.nets.UNet",
        "ct_phantom",
        "[6.0, 6.0, 6.0] mm",
        "dice_mean = 0.8125 over 3 validation case(s)",
        "dice/lesion",
        "fedimg:       " + pkg.meta["fedimg_version"],
        "epoch 4",
    ):
        assert text in out, text
    assert main(["model", "info", str(tmp_path / "pkg"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["spec"]["name"] == "ct_phantom"


def test_loading_refuses_damaged_or_foreign_packages(ct_spec, tmp_path, capsys):
    exp, state, spec = _model_and_spec(ct_spec)
    good = write_package(tmp_path / "good", state, exp, spec, {}, {})

    with pytest.raises(PackageError, match="expected a folder holding package.json"):
        load_package(tmp_path / "absent")
    assert main(["model", "info", str(tmp_path / "absent")]) == 2
    assert "expected a folder holding package.json" in capsys.readouterr().err

    # Weights replaced after writing: the checksum says so.
    bad = tmp_path / "swapped"
    write_package(bad, state, exp, spec, {}, {})
    other = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    torch.save(other, bad / WEIGHTS_FILE)
    with pytest.raises(PackageError, match="SHA-256 differs"):
        load_package(bad)

    # The configs say another network than the weights hold (checksum intact): keys/shapes are checked.
    meta = json.loads((good / META_FILE).read_text())
    meta["experiment"]["model"]["channels"] = [8, 16, 64]
    (good / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(PackageError, match=r"has shape .* the network expects"):
        load_package(good)

    # A newer format, and a pickled object instead of tensors.
    meta["experiment"]["model"]["channels"] = [8, 16, 32]
    meta["format_version"] = 99
    (good / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(PackageError, match="format_version 99"):
        load_package(good)
    meta["format_version"] = 1
    torch.save({**state, "note": _Payload()}, good / WEIGHTS_FILE)
    import hashlib

    meta["weights"]["sha256"] = hashlib.sha256((good / WEIGHTS_FILE).read_bytes()).hexdigest()
    (good / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(PackageError, match="never unpickles code"):
        load_package(good)

    # Non-finite weights are never packaged.
    nan = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in state.items()}
    with pytest.raises(PackageError, match="NaN or infinite"):
        write_package(tmp_path / "nan", nan, exp, spec, {}, {})
    assert not (tmp_path / "nan" / META_FILE).exists()


def test_spec_of_datalists(small_preprocessed, tmp_path):
    base, _ = small_preprocessed
    dls = {s: base / s / "datalist.json" for s in ("site-1", "site-2")}
    spec, why = spec_of_datalists(dls)
    assert why is None and spec.target_spacing == (6.0, 6.0, 6.0) and spec.name == "ct_phantom"

    other = tmp_path / "other"
    other.mkdir()
    (other / "datalist.json").write_text("{}")
    data = cfg.load_yaml(base / "site-2" / "spec.yaml")
    data["target_spacing"] = [3.0, 3.0, 3.0]
    (other / "spec.yaml").write_text(json.dumps(data))
    spec, why = spec_of_datalists({"site-1": dls["site-1"], "site-9": other / "datalist.json"})
    assert spec is None and "different specs" in why and "site-9" in why
    (other / "spec.yaml").unlink()
    spec, why = spec_of_datalists({"site-9": other / "datalist.json"})
    assert spec is None and "site-9" in why and "no spec.yaml" in why


def test_package_without_spec_is_refused_by_predict(ct_spec, tmp_path):
    from fedimg.predict import predict

    exp, state, _ = _model_and_spec(ct_spec)
    write_package(tmp_path / "pkg", state, exp, None, {}, {}, spec_note="site site-1's training data has no spec.yaml")
    assert "site-1's training data has no spec.yaml" in load_package(tmp_path / "pkg").meta["spec_note"]
    with pytest.raises(PackageError, match="cannot prepare new studies: site site-1's training data has no spec"):
        predict(tmp_path / "pkg", tmp_path, tmp_path / "out", keep_identifiers=True)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_train_local_writes_best_and_final_packages(small_preprocessed, tmp_path):
    from fedimg.training.checkpoint import load_state_dict
    from fedimg.training.local import train_local

    base, _ = small_preprocessed
    site = cfg.SiteConfig(name="site-1", datalist=str(base / "site-1" / "datalist.json"), device="cpu", num_threads=1)
    res = train_local(tiny_experiment(**{"train.epochs": 2}), site, tmp_path / "run", progress=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    best = load_package(res.packages["best"])
    final = load_package(res.packages["final"])
    assert Path(res.packages["best"]) == tmp_path / "run" / "packages" / "best"
    assert best.spec == cfg.load(cfg.PreprocessSpec, base / "site-1" / "spec.yaml")
    best_row = rows[res.best_epoch - 1]
    assert best.chosen_on["metric"] == "dice_mean" and best.chosen_on["value"] == pytest.approx(res.best_score)
    assert best.chosen_on["metrics"]["dice/organ"] == pytest.approx(best_row["val_dice/organ"])
    assert best.chosen_on["cases"] == int(best_row["val_cases"]) >= 1
    assert best.meta["origin"] == {"run": "local", "site": "site-1", "model": "best", "epoch": res.best_epoch}
    on_disk = load_state_dict(tmp_path / "run" / "best_model.pt")
    assert all(torch.equal(best.state_dict[k], on_disk[k]) for k in on_disk)
    assert final.meta["origin"]["epoch"] == 2
    assert final.chosen_on["value"] == pytest.approx(rows[-1]["val_dice_mean"])


@pytest.mark.slow
def test_baselines_and_federated_runs_write_packages(small_preprocessed, tmp_path):
    from fedimg import runtime
    from fedimg.fl.simulate import SimulationResult, write_packages
    from fedimg.training.baselines import centralized

    base, _ = small_preprocessed
    exp = tiny_experiment()
    datalists = {s: str(base / s / "datalist.json") for s in ("site-1", "site-2")}
    rt = runtime.setup("cpu", False, 1, seed=0)
    res = centralized(exp, datalists, rt, tmp_path / "baselines", epochs=1)
    pkg = load_package(res.package)
    cases = {s: m["cases"] for s, m in res.per_site.items()}
    assert pkg.chosen_on["cases"] == int(sum(cases.values()))
    assert pkg.chosen_on["value"] == pytest.approx(
        sum(res.per_site[s]["dice_mean"] * n for s, n in cases.items()) / sum(cases.values())
    )
    assert pkg.meta["origin"]["run"] == "centralized" and pkg.spec is not None
    assert json.loads((tmp_path / "baselines" / "centralized" / "result.json").read_text())["package"] == res.package

    # A federated run's server models (NVFlare's {"model": state_dict} files) and its records.
    job = tmp_path / "job"
    (job / "server").mkdir(parents=True)
    torch.save({"model": pkg.state_dict}, job / "final.pt")
    torch.save({"model": pkg.state_dict}, job / "best.pt")
    site_cfgs = {}
    for s, dl in datalists.items():
        cfg.save(cfg.SiteConfig(name=s, datalist=dl), tmp_path / f"{s}.yaml")
        site_cfgs[s] = str(tmp_path / f"{s}.yaml")
    rows = [
        {"step": 1, "final_eval": False, "global": {"val_dice": 0.5}, "sites": {}, "weights": {"site-1": 1.0}},
        {
            "step": 2,
            "final_eval": False,
            "global": {"val_dice": 0.7, "val_dice_organ": 0.8},
            "sites": {"site-1": {"val_dice": 0.6}, "site-2": {"val_dice": 0.8}},
            "weights": {"site-1": 1.0, "site-2": 1.0},
        },
        {
            "step": 3,
            "final_eval": True,
            "global": {"val_dice": 0.65},
            "sites": {},
            "weights": {"site-1": 1.0, "site-2": 2.0},
        },
    ]
    sim = SimulationResult(
        job_dir=job,
        run_dir=job / "server",
        global_model=job / "final.pt",
        best_model=job / "best.pt",
        cross_site=job / "x.json",
        tb_logdir=job / "tb",
        cross_site_results={},
        global_metrics=rows,
        summary={"best": {"value": 0.7, "round": 2}, "end_round": 3},
    )
    written = write_packages(sim, exp, site_cfgs)
    best, final = load_package(written["best"]), load_package(written["final"])
    assert Path(written["best"]) == job / "packages" / "best"
    assert best.chosen_on["metric"] == "val_dice" and best.chosen_on["value"] == 0.7 and best.chosen_on["cases"] == 2
    assert best.chosen_on["per_site"]["site-2"]["val_dice"] == 0.8 and best.meta["origin"]["round"] == 2
    assert final.chosen_on["value"] == 0.65 and final.chosen_on["cases"] == 3 and final.meta["origin"]["round"] == 3
    assert best.spec is not None and best.spec.target_spacing == (6.0, 6.0, 6.0)
    # Equal weights, equal bytes: the checksum identifies the model, whichever run wrote it.
    assert best.meta["weights"]["sha256"] == final.meta["weights"]["sha256"] == pkg.meta["weights"]["sha256"]

    # A production run: no site's data on the lead's machine. Without the spec the packages say what to do;
    # with the lead's --spec they carry it and predict can use them.
    shutil.rmtree(job / "packages")
    bare = load_package(write_packages(sim, exp, {})["best"])
    assert bare.spec is None and "--spec" in bare.meta["spec_note"]
    shutil.rmtree(job / "packages")
    lead = cfg.load(cfg.PreprocessSpec, base / "site-1" / "spec.yaml")
    given = load_package(write_packages(sim, exp, {}, spec=lead)["best"])
    assert given.spec is not None and cfg.to_dict(given.spec) == cfg.to_dict(lead)
