"""The federated job in NVFlare's simulator: 2 sites x 2 rounds of FedAvg segmentation, read back in full.

Checked on the outputs: models, error logs, the cross-site matrix and its
report, TensorBoard events (tags, steps and values against the round records),
the best-model choice including the final evaluation, site-local pictures,
and job export.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
import torch

from fedimg import config as cfg
from fedimg.models.registry import build_model
from tests.conftest import DEMO_EXPERIMENT, REPO, tiny_experiment

pytestmark = [pytest.mark.nvflare]
SITES = ("site-1", "site-2")


@pytest.fixture(scope="module")
def sim_run(small_preprocessed, tmp_path_factory):
    from fedimg.fl.simulate import run_simulation

    base, _ = small_preprocessed
    work = tmp_path_factory.mktemp("fl")
    site_cfgs = {}
    for site in SITES:
        sc = cfg.SiteConfig(
            name=site,
            datalist=str(base / site / "datalist.json"),
            device="cpu",
            num_threads=1,
            local_logdir=str(work / f"{site}_local_tb"),
        )
        cfg.save(sc, work / f"{site}.yaml")
        site_cfgs[site] = str(work / f"{site}.yaml")
    exp = tiny_experiment()
    res = run_simulation(exp, REPO / "jobs" / "train", site_cfgs, work / "ws")
    return exp, res, work


def _acc(path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    return acc


@pytest.mark.integration
@pytest.mark.slow
def test_models_are_saved_and_load_into_the_configured_network(sim_run):
    exp, res, _ = sim_run
    for path in (res.global_model, res.best_model):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        model = build_model(exp.model, exp.task)
        model.load_state_dict(ckpt["model"])  # strict: same architecture on server and sites
    meta = torch.load(res.global_model, map_location="cpu", weights_only=True)["meta_props"]
    assert meta["current_round"] == exp.fed.num_rounds - 1
    assert meta["fedimg"]["rounds_done"] == exp.fed.num_rounds
    # No fedimg source is bundled into the job: server and sites run the installed package.
    assert not list(res.job_dir.rglob("custom/fedimg"))


@pytest.mark.integration
@pytest.mark.slow
def test_error_logs_are_empty(sim_run):
    _, res, _ = sim_run
    logs = list(res.job_dir.glob("*/error_log.txt"))
    assert len(logs) >= 3  # server + 2 sites
    assert all(p.stat().st_size == 0 for p in logs), [p for p in logs if p.stat().st_size]


@pytest.mark.integration
@pytest.mark.slow
def test_best_model_is_chosen_with_the_final_evaluation(sim_run):
    exp, res, _ = sim_run
    rows = res.global_metrics
    assert [r["step"] for r in rows] == [0, 1, 2] and rows[-1]["final_eval"]
    # The federation's value is the validation-case-weighted mean of the sites' values.
    for row in rows:
        w = row["weights"]
        expected = sum(w[s] * row["sites"][s]["val_dice"] for s in SITES) / sum(w.values())
        assert row["global"]["val_dice"] == pytest.approx(expected)
    values = [r["global"]["val_dice"] for r in rows]
    best = res.summary["best"]
    assert best["value"] == pytest.approx(max(values)) and best["round"] == values.index(max(values))
    meta = torch.load(res.best_model, map_location="cpu", weights_only=True)["meta_props"]["fedimg"]
    assert meta["rounds_done"] == best["round"]  # the saved best is the model that was rated
    # The best model scores, in cross-site evaluation, what it scored when it was chosen.
    for site in SITES:
        cs = res.cross_site_results[site]["SRV_best_FL_global_model.pt"]["val_dice"]
        assert cs == pytest.approx(rows[best["round"]]["sites"][site]["val_dice"], abs=1e-6)


@pytest.mark.integration
@pytest.mark.slow
def test_cross_site_matrix_is_complete_and_reported(sim_run):
    _, res, _ = sim_run
    data = json.loads(res.cross_site.read_text())
    assert sorted(data) == list(SITES)
    for evaluator in SITES:
        models = data[evaluator]
        assert set(models) == {"SRV_FL_global_model.pt", "SRV_best_FL_global_model.pt", *SITES}
        for metrics in models.values():
            assert 0.0 <= metrics["val_dice"] <= 1.0
            assert {"val_dice_organ", "val_dice_lesion", "val_hd95_organ"} <= set(metrics)
        assert res.final_dice(evaluator) == models["SRV_FL_global_model.pt"]["val_dice"]
        # The final evaluation inside the run and the cross-site evaluation score the same model alike.
        assert res.final_eval()["sites"][evaluator]["val_dice"] == pytest.approx(res.final_dice(evaluator), abs=1e-6)
    matrix = json.loads((res.cross_site.parent / "cross_site_matrix.json").read_text())["matrices"][0]
    assert matrix["metric"] == "val_dice" and matrix["sites"] == list(SITES)
    assert matrix["values"]["SRV_FL_global_model.pt"]["site-1"] == pytest.approx(
        data["site-1"]["SRV_FL_global_model.pt"]["val_dice"]
    )
    md = (res.cross_site.parent / "cross_site_matrix.md").read_text()
    assert "| final global model |" in md and "| site-2's own model |" in md and "site-1 cases" in md


@pytest.mark.integration
@pytest.mark.slow
def test_tensorboard_tags_steps_and_values(sim_run):
    exp, res, _ = sim_run
    for site in SITES:
        d = res.tb_logdir / site
        acc = _acc(d)
        tags = set(acc.Tags()["scalars"])
        # Each site is its own run with the same tags as every other run: one chart per measure overlays them.
        assert {"val/dice_mean", "val/dice/organ", "val/dice/lesion", "val/hd95/organ", "train/loss"} <= tags
        assert not [t for t in tags if t.startswith(site)]
        # Step = rounds of aggregation the evaluated model has seen: 0, 1 and the final model (2).
        dice = acc.Scalars("val/dice_mean")
        assert [e.step for e in dice] == [0, 1, 2]
        for e, row in zip(dice, res.global_metrics):
            assert e.value == pytest.approx(row["sites"][site]["val_dice"], rel=1e-5)
        assert [e.step for e in acc.Scalars("train/loss")] == [1, 2]
        # Only scalars reach the server, in event files named without this machine's host name.
        assert not acc.Tags()["images"] and not acc.Tags()["histograms"]
        names = [p.name for p in d.glob("events.out.tfevents.*")]
        assert names and all(socket.gethostname() not in n.split(".")[3:5] for n in names)
        assert all(n.split(".")[4] == "fedimg" for n in names)
    glob = _acc(res.tb_logdir / "global")
    g = glob.Scalars("val/dice_mean")
    assert [e.step for e in g] == [0, 1, 2]
    assert [e.value for e in g] == pytest.approx([r["global"]["val_dice"] for r in res.global_metrics], rel=1e-5)
    assert "val/dice/lesion" in glob.Tags()["scalars"]
    # The server's own run holds the cross-site table (text) and heatmap (an image of aggregate numbers).
    assert "cross_site/heatmap" in glob.Tags()["images"]
    img = glob.Images("cross_site/heatmap")[0]
    assert img.width > 100 and img.height > 100
    text = glob.Tensors("cross_site/table/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "final global model" in text
    layout = glob.Tensors("custom_scalars__config__")
    assert layout, "no custom-scalar layout for the per-measure charts"


@pytest.mark.integration
@pytest.mark.slow
def test_site_pictures_stay_in_the_site_logdir(sim_run):
    _, res, work = sim_run
    for site in SITES:
        # The site's own run is named after the site (not "."): <local_logdir>/<site>.
        assert not list((work / f"{site}_local_tb").glob("events.out.tfevents.*"))
        local = _acc(work / f"{site}_local_tb" / site)
        images = [t for t in local.Tags()["images"] if t.startswith("overlay/")]
        assert images, "no prediction-vs-reference pictures in the site's own logdir"
        assert all(t.startswith("overlay/case_") for t in images)  # the case's index, never an identifier
        assert [e.step for e in local.Images(images[0])] == [0, 1, 2]
        picture = local.Images(images[0])[-1]
        assert picture.width > 2 * picture.height  # axial, coronal and sagittal side by side
        about = local.Tensors("overlay/how_to_read/text_summary")[-1].tensor_proto.string_val[0].decode()
        assert "patient's right is on the image's left" in about
    # Nothing under the server's TensorBoard folder came from a site's pictures.
    for d in res.tb_logdir.iterdir():
        assert not [t for t in _acc(d).Tags()["images"] if "overlay" in t]


@pytest.mark.slow
def test_job_export_has_no_site_paths(tmp_path):
    out = tmp_path / "jobs"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "jobs" / "train" / "job.py"),
            "--config",
            str(DEMO_EXPERIMENT),
            "--site",
            "site-1",
            "--site",
            "site-2",
            "--export",
            str(out),
            "--set",
            "fed.algorithm=fedprox",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    job = out / "seg_demo"
    meta = json.loads((job / "meta.json").read_text())
    assert meta["min_clients"] == 2
    custom = list(job.rglob("custom/client.py"))
    assert custom, "client script not bundled"
    # The first global model travels with the job: built with train.seed, the same in every run.
    seeded = list(job.rglob("app_server/custom/seeded_initial_model.pt")) or list(job.rglob("seeded_initial_model.pt"))
    assert seeded, "the seeded first global model is not in the job"
    exp = cfg.load(cfg.ExperimentConfig, DEMO_EXPERIMENT)
    torch.manual_seed(exp.train.seed)
    expected = build_model(exp.model, exp.task).state_dict()
    shipped = torch.load(seeded[0], map_location="cpu", weights_only=True)["model"]
    assert shipped.keys() == expected.keys() and all(torch.equal(shipped[k], expected[k]) for k in expected)
    exp_yaml = list(job.rglob("custom/experiment.yaml"))
    assert exp_yaml and cfg.load(cfg.ExperimentConfig, exp_yaml[0]).fed.algorithm == "fedprox"
    client_cfg = next(job.rglob("config_fed_client.json")).read_text()
    assert "--site-config" not in client_cfg and str(tmp_path) not in client_cfg
    assert str(REPO) not in client_cfg  # no absolute paths of this machine
    server_cfg = json.loads(next(job.rglob("config_fed_server.json")).read_text())
    ctl = [w for w in server_cfg["workflows"] if w["path"].endswith("FedimgController")]
    # The server reads the same experiment the sites read: one JSON argument, not copies of its settings.
    shipped = cfg.from_dict(cfg.ExperimentConfig, json.loads(ctl[0]["args"]["experiment"])) if ctl else None
    assert shipped is not None and shipped.fed.algorithm == "fedprox" and shipped.fed.mu == 0.01
    assert set(ctl[0]["args"]) <= {
        "num_clients",
        "num_rounds",
        "experiment",
        "start_round",
        "persistor_id",
        "task_check_period",
    }
    assert not list(job.rglob("custom/fedimg"))


PORT_RACE = """2026-12-02 18:11:25,419 - MPM - ERROR - Execute exception: OSError: [Errno 98] Address already in use
  File ".../nvflare/private/fed/app/simulator/simulator_worker.py", line 264, in main
    conn = _create_connection(args.port)
OSError: [Errno 98] Address already in use
"""


def _fake_simulator(monkeypatch, tmp_path, logs_per_attempt):
    """run_simulation with NVFlare's execute and collect replaced: each attempt writes the given site error logs."""
    import types

    import nvflare.recipe

    from fedimg.fl import simulate

    attempts = []

    class Recipe:
        def execute(self, env):
            job = tmp_path / "ws" / "tiny"
            if job.exists():
                import shutil

                shutil.rmtree(job)  # as the simulator does with an earlier run
            for site, text in logs_per_attempt[len(attempts)].items():
                (job / site).mkdir(parents=True, exist_ok=True)
                (job / site / "error_log.txt").write_text(text)
            attempts.append(1)

    def collect(job, sites, require_cross_site=True, **_checks):
        bad = [s for s in sites if (job / s / "error_log.txt").is_file()]
        if bad:
            raise simulate.FederatedRunError(f"error logs are not empty: {bad}")
        return types.SimpleNamespace(seconds=0.0)

    def build_recipe(exp, job_dir, site_configs, staging, **kwargs):
        staging.mkdir(parents=True, exist_ok=True)
        return Recipe()

    monkeypatch.setattr(simulate, "build_recipe", build_recipe)
    monkeypatch.setattr(simulate, "collect", collect)
    monkeypatch.setattr(nvflare.recipe, "SimEnv", lambda **k: None)
    return attempts


def test_a_lost_port_race_inside_the_simulator_is_run_again_once(monkeypatch, tmp_path, caplog):
    from fedimg.fl.simulate import run_simulation

    attempts = _fake_simulator(monkeypatch, tmp_path, [{"site-2": PORT_RACE}, {}])
    res = run_simulation(tiny_experiment(), REPO / "jobs" / "train", {"site-1": "a", "site-2": "b"}, tmp_path / "ws")
    assert len(attempts) == 2 and res.seconds >= 0
    assert "could not start site-2's process" in caplog.text


def test_other_failures_and_a_second_port_race_are_not_retried(monkeypatch, tmp_path):
    from fedimg.fl.simulate import FederatedRunError, lost_port_race, run_simulation

    attempts = _fake_simulator(monkeypatch, tmp_path, [{"site-1": "ValueError: received weight w has shape"}])
    with pytest.raises(FederatedRunError, match="site-1"):
        run_simulation(tiny_experiment(), REPO / "jobs" / "train", {"site-1": "a", "site-2": "b"}, tmp_path / "ws")
    assert len(attempts) == 1

    attempts = _fake_simulator(monkeypatch, tmp_path, [{"site-1": PORT_RACE}, {"site-1": PORT_RACE}])
    with pytest.raises(FederatedRunError, match="site-1"):
        run_simulation(tiny_experiment(), REPO / "jobs" / "train", {"site-1": "a", "site-2": "b"}, tmp_path / "ws")
    assert len(attempts) == 2
    assert lost_port_race(tmp_path / "ws" / "tiny", ["site-2", "site-1"]) == "site-1"
    assert lost_port_race(tmp_path / "ws" / "absent", ["site-1"]) is None
