"""Robustness to a poisoned or broken site: final global Dice per attack x server defence.

Three synthetic CT sites (organ + lesion, known masks), FedAvg in NVFlare's
simulator from the same seeded initial weights; from round 1 on, site-3
sends a corrupted update (:class:`fedimg.fl.faults.PoisonUpdate`):

* ``scale x100``: a boosted update;
* ``sign flip x10``: an update pushing the other way;
* ``NaN``: 0.1% of the entries NaN (a broken site).

Each attack meets the plain weighted mean (FedAvg, only the always-on NaN
check), norm screening (``fed.robust.norm_outlier_factor``), direction
screening (``min_cosine``) and the coordinate-wise median / trimmed mean.
Baseline in the same run: the clean run with the plain mean; every row
reports its mean Dice over the three sites' validation cases and the
difference to that baseline in Dice points (goal for a defence: within 1)::

    python benchmarks/bench_robustness.py --out bench_out/robustness.json [--cases 6] [--rounds 8]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ATTACKS = {
    "none": None,
    "scale x100": {"mode": "scale", "factor": 100.0, "from_round": 1},
    "sign flip x10": {"mode": "sign_flip", "factor": 10.0, "from_round": 1},
    "NaN": {"mode": "nan", "fraction": 0.001, "from_round": 1},
}
DEFENCES = {
    "mean (FedAvg)": {},
    "norm screening 5x": {"norm_outlier_factor": 5.0},
    "direction screening cos<0": {"min_cosine": 0.0},
    "median": {"aggregation": "median"},
    "trimmed mean": {"aggregation": "trimmed_mean", "trim": 1},
}
PLAN = (
    [("none", d) for d in ("mean (FedAvg)", "median", "trimmed mean")]
    + [("scale x100", d) for d in ("mean (FedAvg)", "norm screening 5x", "median")]
    + [("sign flip x10", d) for d in ("mean (FedAvg)", "direction screening cos<0", "median")]
    + [("NaN", "mean (FedAvg)")]
)
BAD_SITE = "site-3"


def prepare(tmp: Path, cases: int, spacing: float) -> dict[str, str]:
    """Three synthetic sites preprocessed at ``spacing`` mm."""
    from fedimg import config as cfg
    from fedimg.preprocess.pipeline import preprocess
    from fedimg.synth import generate

    synth = generate(tmp / "raw", n_sites=3, n_cases=cases, seed=3, progress=False)
    spec = dataclasses.replace(
        cfg.load(cfg.PreprocessSpec, REPO / "configs" / "preprocessing" / "ct_phantom.yaml"),
        target_spacing=(spacing,) * 3,
    )
    out = {}
    for site in synth.sites:
        preprocess(synth.out_dir / site, tmp / "pre" / site, spec, site=site, progress=False)
        cfg.save(
            cfg.SiteConfig(name=site, datalist=str(tmp / "pre" / site / "datalist.json"), device="cpu", num_threads=1),
            tmp / f"{site}.yaml",
        )
        out[site] = str(tmp / f"{site}.yaml")
    return out


def experiment(rounds: int, robust: dict, name: str):
    """The benchmark's experiment: the demo's UNet at a small size, a decaying learning rate."""
    from fedimg import config as cfg

    over = [
        "model.channels=[8, 16, 32]",
        "model.strides=[2, 2]",
        "model.num_res_units=1",
        "data.roi_size=[32, 32, 32]",
        "data.batch_size=2",
        "data.samples_per_volume=1",
        "train.local_epochs=4",
        "optim.lr=0.01",
        "optim.schedule=cosine",
        "task.min_component_voxels=1",
        f"fed.num_rounds={rounds}",
        "fed.exchange=diff",
        "fed.cross_site_eval=false",
        "fed.min_clients=2",
        f"name={name}",
    ]
    exp = cfg.load(cfg.ExperimentConfig, REPO / "configs" / "experiments" / "seg_demo.yaml", over)
    return dataclasses.replace(exp, fed=dataclasses.replace(exp.fed, robust=cfg.RobustConfig(**robust)))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--cases", type=int, default=6, help="studies per synthetic site")
    p.add_argument("--spacing", type=float, default=6.0, help="preprocessing voxel size in mm")
    p.add_argument("--rounds", type=int, default=8)
    args = p.parse_args()

    import torch

    from fedimg.fl.faults import PoisonUpdate
    from fedimg.fl.simulate import run_simulation
    from fedimg.models.registry import build_model

    rows = []
    with tempfile.TemporaryDirectory(prefix="fedimg_robust_") as tmp_s:
        tmp = Path(tmp_s)
        sites = prepare(tmp, args.cases, args.spacing)
        exp0 = experiment(args.rounds, {}, "init")
        torch.manual_seed(0)
        init = tmp / "initial.pt"
        torch.save({"model": build_model(exp0.model, exp0.task).state_dict()}, init)
        for i, (attack, defence) in enumerate(PLAN):
            exp = experiment(args.rounds, DEFENCES[defence], f"run{i}")
            poison = ATTACKS[attack]

            def add_fault(recipe, poison=poison):
                if poison is not None:
                    recipe.add_client_output_filter(PoisonUpdate(**poison), tasks=["train"], clients=[BAD_SITE])

            t0 = time.perf_counter()
            res = run_simulation(
                exp, REPO / "jobs" / "train", sites, tmp / f"ws{i}", initial_ckpt=str(init), customize=add_fault
            )
            dice = float(res.global_metrics[-1]["global"]["val_dice"])
            train = [r for r in res.rounds if not r.get("final_eval")]
            rejected = sum(1 for r in train if BAD_SITE in r["rejected"])
            rows.append(
                {
                    "attack": attack,
                    "defence": defence,
                    "val_dice": dice,
                    "rounds_site3_rejected": rejected,
                    "seconds": round(time.perf_counter() - t0, 1),
                }
            )
            print(
                f"[{i + 1}/{len(PLAN)}] {attack:14s} {defence:28s} Dice {dice:.4f} "
                f"(site-3 rejected in {rejected}/{len(train)} rounds)",
                flush=True,
            )
    base = rows[0]["val_dice"]
    for r in rows:
        r["dice_points_vs_clean"] = round(100 * (r["val_dice"] - base), 2)
    print(f"\nbaseline: clean run, plain mean (FedAvg): Dice {base:.4f}\n")
    print("| attack (site-3) | server defence | final Dice | vs clean (points) | site-3 rejected |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['attack']} | {r['defence']} | {r['val_dice']:.4f} | {r['dice_points_vs_clean']:+.2f} | "
            f"{r['rounds_site3_rejected']}/{args.rounds} |"
        )
    out = {
        "benchmark": "synthetic 3-site segmentation, one poisoned site",
        "baseline": "clean, mean (FedAvg)",
        "settings": {
            "cases_per_site": args.cases,
            "spacing_mm": args.spacing,
            "rounds": args.rounds,
            "local_epochs": 4,
            "poisoned_site": BAD_SITE,
            "from_round": 1,
        },
        "results": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp_out = Path(args.out).with_suffix(".tmp")
    tmp_out.write_text(json.dumps(out, indent=2))
    tmp_out.replace(args.out)
    print(f"\nwritten {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
