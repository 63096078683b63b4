"""Training speed: fedimg's site epoch vs a plain MONAI loop; federated vs centralized wall time.

Two comparisons, each against a named baseline in the same run:

1. ``client_epoch_overhead``: one local epoch as timed inside the NVFlare
   client (a one-site federation in the simulator, the site alone on the CPU
   with 2 threads) divided by the same epoch in a plain MONAI loop written out
   below (same cached data, transforms, network, loss, optimizer, batch size
   and threads). Goal: <= 1.05.
2. ``federated_over_centralized_wall``: federated training as a user runs
   it, ``python jobs/train/job.py --env sim`` on 3 sites for R rounds x E
   local epochs, divided by centralized training of the pooled training
   cases for R x E epochs (fedimg's centralized baseline, the same loops) in
   its own Python process. Both are whole processes timed from the shell,
   start-up, data caching and the final scoring included. Two federated
   runs: the demo's settings (every site validates every round) and
   ``fed.validate_every=R`` (the sites score the model in round 0 and after
   the last round; the centralized run scores once, at the end). Where the
   federated time goes is read from the controller's round records: start-up
   (process start to the first round), rounds (site work, aggregation,
   transfer and waiting), the final evaluation, shut-down.

    python benchmarks/bench_training.py --out bench_out/training.json [--rounds 10] [--cases 6]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fedimg.resources import job_dir  # noqa: E402 - after the checkout is on the path


def plain_monai_epoch(exp, datalist: Path, threads: int) -> float:
    """The baseline: a hand-written MONAI epoch (no fedimg code in the timed loop)."""
    import torch
    from monai.data import CacheDataset, DataLoader, load_decathlon_datalist
    from monai.losses import DiceCELoss
    from monai.networks.nets import UNet
    from monai.transforms import (
        Compose,
        EnsureChannelFirstd,
        EnsureTyped,
        LoadImaged,
        RandCropByLabelClassesd,
        RandFlipd,
        RandScaleIntensityd,
        RandShiftIntensityd,
        SpatialPadd,
    )

    torch.set_num_threads(threads)
    items = load_decathlon_datalist(str(datalist), data_list_key="training", base_dir=str(datalist.parent))
    roi = exp.data.roi_size
    tf = Compose(
        [
            LoadImaged(keys=["image", "label"], image_only=True),
            EnsureChannelFirstd(keys=["image", "label"]),
            EnsureTyped(keys=["image", "label"], dtype=(torch.float32, torch.uint8), track_meta=False),
            SpatialPadd(keys=["image", "label"], spatial_size=roi),
            RandCropByLabelClassesd(
                keys=["image", "label"],
                label_key="label",
                spatial_size=roi,
                num_classes=exp.task.num_classes,
                num_samples=exp.data.samples_per_volume,
                warn=False,
            ),
            RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=0),
            RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
            RandShiftIntensityd(keys="image", offsets=0.05, prob=0.5),
        ]
    )
    ds = CacheDataset(items, transform=tf, cache_rate=1.0, progress=False)
    loader = DataLoader(ds, batch_size=exp.data.batch_size, shuffle=True, num_workers=0)
    net = UNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=exp.task.num_classes,
        channels=exp.model.channels,
        strides=exp.model.strides,
        num_res_units=exp.model.num_res_units,
        norm=exp.model.norm,
    )
    opt = torch.optim.Adam(net.parameters(), lr=exp.optim.lr, weight_decay=exp.optim.weight_decay)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)
    net.train()
    t0 = time.perf_counter()
    for batch in loader:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(batch["image"]), batch["label"])
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def fedimg_epoch(exp, datalist: Path, threads: int) -> float:
    """One epoch through ``SiteTrainer.fit`` outside NVFlare (same data, same thread count)."""
    from fedimg import runtime
    from fedimg.training.trainer import SiteTrainer

    rt = runtime.setup("cpu", amp=False, num_threads=threads, seed=0)
    trainer = SiteTrainer.from_datalist(exp, datalist, rt)
    t0 = time.perf_counter()
    trainer.fit(1)
    return time.perf_counter() - t0


def client_epochs(exp, site_cfg: str, tmp: Path, rounds: int) -> list[float]:
    """Epoch times measured inside the NVFlare client: a one-site federation, the site alone on the CPU."""
    from fedimg.fl.simulate import run_simulation

    one = dataclasses.replace(
        exp,
        name="bench_one_site",
        fed=dataclasses.replace(exp.fed, num_rounds=rounds, cross_site_eval=False, final_eval=False),
    )
    sim = run_simulation(one, job_dir(), {"site-1": site_cfg}, tmp / "one_site")
    return [r["site_seconds"]["site-1"]["train"] / exp.train.local_epochs for r in sim.rounds]


def breakdown(sim, wall: float, launched_at: float) -> dict:
    """Where a whole federated process's wall time went, from the controller's round records.

    Round 0 carries the sites' start-up (data caching, first model load) and is reported on its own;
    the steady rounds' overhead is a round's wall time minus its slowest site's own work (validation +
    training): transfer, polling, checking and aggregation, what fedimg and NVFlare add per round.
    """
    rounds = [r for r in sim.rounds if not r.get("final_eval")]
    final = [r for r in sim.rounds if r.get("final_eval")]
    started_at = sim.summary["workflow_started_at"]
    last_end_at = started_at + max(r["started"] + max(r["seconds"].values()) for r in sim.rounds)

    def site_work(r: dict) -> float:
        return max(s["validate"] + s["train"] for s in r["site_seconds"].values())

    steady = rounds[1:]
    overhead = [r["seconds"]["round"] - site_work(r) for r in steady]
    rounds_s = sum(r["seconds"]["round"] for r in rounds)
    agg = sum(r["seconds"]["aggregation"] for r in rounds)
    return {
        "start_up_s (process start to the first round)": started_at + rounds[0]["started"] - launched_at,
        "round_0_s": rounds[0]["seconds"]["round"],
        "round_0_overhead_s": rounds[0]["seconds"]["round"] - site_work(rounds[0]),
        "steady_round_s_mean": sum(r["seconds"]["round"] for r in steady) / len(steady) if steady else None,
        "steady_round_overhead_s_mean": sum(overhead) / len(overhead) if overhead else None,
        "steady_round_overhead_s_max": max(overhead) if overhead else None,
        "rounds_s": rounds_s,
        "of_which_site_work_s (slowest site per round: validation + training)": sum(site_work(r) for r in rounds),
        "of_which_aggregation_s": agg,
        "of_which_transfer_and_waiting_s": rounds_s - sum(site_work(r) for r in rounds) - agg,
        "final_evaluation_s": sum(r["seconds"]["evaluation"] for r in final),
        "shut_down_s (end of the final evaluation to process exit)": launched_at + wall - last_end_at,
    }


def run_federated(site_cfgs: dict[str, str], workspace: Path, rounds: int, extra: list[str]) -> dict:
    """``python jobs/train/job.py --env sim``, timed as a whole process: its wall time, breakdown, final Dice."""
    from fedimg.fl.simulate import collect

    cmd = [sys.executable, str(REPO / "jobs/train/job.py"), "--config", str(REPO / "configs/experiments/seg_demo.yaml")]
    cmd += ["--env", "sim", "--workspace", str(workspace)]
    for site, path in site_cfgs.items():
        cmd += ["--site", f"{site}={path}"]
    for override in [f"fed.num_rounds={rounds}", "fed.cross_site_eval=false", "fed.final_eval=true", *extra]:
        cmd += ["--set", override]
    launched_at, t0 = time.time(), time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    wall = time.perf_counter() - t0
    sim = collect(workspace / "seg_demo", list(site_cfgs), require_cross_site=False)
    return {
        "wall_s": wall,
        "breakdown": breakdown(sim, wall, launched_at),
        "final_val_dice": (sim.final_eval() or {}).get("global", {}).get("val_dice"),
    }


def run_centralized(datalists: dict[str, str], out: Path, rounds: int) -> tuple[float, dict]:
    """This script's ``--centralized`` mode in a new Python process, timed as a whole; returns (wall s, Dice)."""
    out.mkdir(parents=True, exist_ok=True)
    spec = out / "datalists.json"
    spec.write_text(json.dumps(datalists))
    cmd = [sys.executable, __file__, "--centralized", str(spec), "--rounds", str(rounds)]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return time.perf_counter() - t0, json.loads(done.stdout.strip().splitlines()[-1])


def centralized_process(spec: Path, rounds: int) -> int:
    """The centralized baseline as its own process: imports, caching, R x E epochs, scoring every site."""
    from fedimg import config as cfg
    from fedimg import runtime
    from fedimg.training.baselines import centralized, federated_epochs

    exp = cfg.load(cfg.ExperimentConfig, REPO / "configs/experiments/seg_demo.yaml", [f"fed.num_rounds={rounds}"])
    rt = runtime.setup("cpu", amp=False, num_threads=0, seed=0)
    cen = centralized(exp, json.loads(spec.read_text()), rt, spec.parent / "central", epochs=federated_epochs(exp))
    print(json.dumps({s: m.get("dice_mean") for s, m in cen.per_site.items()}))
    return 0


def median_run(runs: list, wall: Callable[[Any], float]) -> Any:
    """The run with the median wall time (the lower middle one of an even number)."""
    return sorted(runs, key=wall)[(len(runs) - 1) // 2]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_out/training.json")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--cases", type=int, default=6)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--centralized", type=Path, default=None, help=argparse.SUPPRESS)  # the baseline's own process
    args = p.parse_args()
    if args.centralized is not None:
        return centralized_process(args.centralized, args.rounds)

    from fedimg import config as cfg
    from fedimg.dicom.deid import Pseudonymizer, SiteSecret
    from fedimg.preprocess.pipeline import preprocess
    from fedimg.synth import generate

    exp = cfg.load(
        cfg.ExperimentConfig,
        REPO / "configs/experiments/seg_demo.yaml",
        [f"fed.num_rounds={args.rounds}", "fed.cross_site_eval=false", "fed.final_eval=true"],
    )
    spec = cfg.load(cfg.PreprocessSpec, REPO / "configs/preprocessing/ct_phantom.yaml")
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        synth = generate(tmp / "raw", n_sites=3, n_cases=args.cases, seed=0, progress=False)
        site_dirs, site_cfgs = [], {}
        for site in synth.sites:
            secret = SiteSecret.generate(tmp / f"{site}.secret")
            preprocess(
                tmp / "raw" / site,
                tmp / site / "pre",
                spec,
                site=site,
                progress=False,
                pseudonymizer=Pseudonymizer(secret),
            )
            site_dirs.append(tmp / site / "pre")
            cfg.save(
                cfg.SiteConfig(name=site, datalist="pre/datalist.json", device="cpu", num_threads=1),
                tmp / site / "site.yaml",
            )
            site_cfgs[site] = str(tmp / site / "site.yaml")

        # 1. one site's epoch: inside the NVFlare client vs a plain MONAI loop (2 threads each, best of repeats)
        dl1 = site_dirs[0] / "datalist.json"
        cfg.save(cfg.SiteConfig(name="site-1", datalist=str(dl1), device="cpu", num_threads=2), tmp / "alone.yaml")
        inside = client_epochs(exp, str(tmp / "alone.yaml"), tmp, args.repeats)
        direct_t = min(fedimg_epoch(exp, dl1, 2) for _ in range(args.repeats))
        plain_t = min(plain_monai_epoch(exp, dl1, 2) for _ in range(args.repeats))
        client_t = min(inside)

        # 2. federated (job.py in the simulator, 3 sites) vs centralized on the pooled cases: whole processes
        datalists = {s: str(d / "datalist.json") for s, d in zip(synth.sites, site_dirs)}
        cases = {
            s: {k: len(v) for k, v in json.loads(Path(p).read_text()).items() if isinstance(v, list)}
            for s, p in datalists.items()
        }
        runs: dict[str, list] = {"central": [], "fed": [], "lean": []}
        for i in range(args.repeats):  # interleaved, so a slow spell of the machine hits all three
            runs["central"].append(run_centralized(datalists, tmp / f"central{i}", args.rounds))
            runs["fed"].append(run_federated(site_cfgs, tmp / f"fed{i}", args.rounds, []))
            lean_set = [f"fed.validate_every={args.rounds}"]
            runs["lean"].append(run_federated(site_cfgs, tmp / f"fed_lean{i}", args.rounds, lean_set))
            print(
                f"repeat {i + 1}/{args.repeats}: centralized {runs['central'][-1][0]:.1f} s, federated "
                f"{runs['fed'][-1]['wall_s']:.1f} s, validate_every={args.rounds} {runs['lean'][-1]['wall_s']:.1f} s",
                flush=True,
            )
        central_wall, central_dice = median_run(runs["central"], lambda r: r[0])
        fed = median_run(runs["fed"], lambda r: r["wall_s"])
        lean = median_run(runs["lean"], lambda r: r["wall_s"])

    where = fed["breakdown"]
    result = {
        "client_epoch_overhead": client_t / plain_t,
        "federated_over_centralized_wall": fed["wall_s"] / central_wall,
        "federated_over_centralized_wall_validate_every_R": lean["wall_s"] / central_wall,
        "steady_round_overhead_s": where["steady_round_overhead_s_mean"],
        "client_epoch_s": client_t,
        "site_trainer_epoch_s": direct_t,
        "plain_monai_epoch_s": plain_t,
        "site_trainer_over_plain": direct_t / plain_t,
        "federated_wall_s": fed["wall_s"],
        "federated_validate_every_R_wall_s": lean["wall_s"],
        "centralized_wall_s": central_wall,
        "rounds": args.rounds,
        "repeats (whole processes: the median run is reported)": args.repeats,
        "all_walls_s": {
            "centralized": [r[0] for r in runs["central"]],
            "federated": [r["wall_s"] for r in runs["fed"]],
            "federated_validate_every_R": [r["wall_s"] for r in runs["lean"]],
        },
        "local_epochs": exp.train.local_epochs,
        "sites": len(site_cfgs),
        "cases_per_site": cases,
        "federated_breakdown": where,
        "federated_validate_every_R_breakdown": lean["breakdown"],
        "centralized_val_dice": central_dice,
        "federated_final_val_dice": fed["final_val_dice"],
        "federated_validate_every_R_final_val_dice": lean["final_val_dice"],
        "note": "whole processes timed from the shell; 3 simulated sites share 2 CPU cores (1 thread each); "
        "the centralized process uses both cores; the centralized time includes scoring every site's "
        "validation cases once",
    }
    print(
        f"site epoch: inside the NVFlare client {client_t:.2f} s vs plain MONAI loop {plain_t:.2f} s "
        f"-> overhead ratio {result['client_epoch_overhead']:.3f} (goal <= 1.05); "
        f"SiteTrainer alone {direct_t:.2f} s ({result['site_trainer_over_plain']:.3f})"
    )
    print(
        f"federated ({args.rounds} rounds x {exp.train.local_epochs} epochs, {len(site_cfgs)} sites, job.py in the "
        f"simulator) {fed['wall_s']:.1f} s; with fed.validate_every={args.rounds} {lean['wall_s']:.1f} s; "
        f"centralized ({args.rounds * exp.train.local_epochs} epochs, pooled, own process) {central_wall:.1f} s"
    )
    for k, v in where.items():
        print(f"  {k}: {v:.3f}" if v is not None else f"  {k}: n/a")
    print(
        f"steady-round overhead {where['steady_round_overhead_s_mean']:.3f} s per round (goal <= 0.3); "
        f"federated / centralized at {args.rounds} rounds {result['federated_over_centralized_wall']:.2f}, "
        f"{result['federated_over_centralized_wall_validate_every_R']:.2f} with fed.validate_every={args.rounds} "
        "(goal <= 1.3)"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
