"""Privacy vs quality: the federated segmentation job with each privacy setting, against no privacy.

Data: bench_quality's synthetic heterogeneous 3-site CT segmentation
(:func:`bench_quality.prepare_segmentation`: vendors, planes, spacing, noise
and case counts differ), ``configs/experiments/seg_demo.yaml`` (UNet, Adam,
FedAvg) with ``data.samples_per_volume: 1`` (DP-SGD's sample is one case;
the other settings use the same pipeline so only privacy differs) and
``fed.exchange: diff`` (the update filters act on differences). Every run
starts from the same seeded initial weights.

Settings:

* ``no privacy``;
* ``gaussian``: update-level DP (:class:`fedimg.fl.privacy.GaussianUpdateDP`)
  with the clip norm set to the median L2 norm of the sites' first-round
  updates, measured before the runs by training each site once from the
  initial weights (so clipping bites about half the time), at two noise
  multipliers; epsilon at delta 1e-5 after the last round (site-level, the
  same at every site);
* ``percentile``: NVFlare's ``PercentilePrivacy`` sharing the largest 10% of
  changes, clipped at the 99th percentile of the measured per-step changes;
* ``svt``: NVFlare's ``SVTPrivacy`` releasing 10% of the entries, clip
  ``gamma`` at the 90th percentile of the measured per-step changes, release
  noise of scale ``gamma`` (``noise_var: 2``);
* ``dp_sgd``: Opacus DP-SGD at every site (``noise_multiplier 1.0``,
  ``max_grad_norm 1.0``); epsilon at delta 1e-5 after the last round
  (sample-level; the largest over the sites).

The sparsifiers (percentile) and SVT report no epsilon in fedimg's records:
their column says ``n/a (no DP guarantee)``; SVT's nominal per-round budget
(NVFlare's ``epsilon + n_upload * noise_var``, per entry clipped to gamma)
is written to the JSON as a note. Reported: the final global model's
``val_dice``, the mean over the three sites' validation cases; its ratio to
the no-privacy run; epsilon; wall seconds::

    python benchmarks/bench_privacy.py --out bench_out/privacy.json [--seeds 0] [--rounds 12] [--local-epochs 2]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_quality import prepare_segmentation  # noqa: E402  (the same sites as the quality benchmark)

DELTA = 1e-5
GAUSSIAN_SIGMAS = (0.001, 0.01)
DP_SGD = {"noise_multiplier": 1.0, "max_grad_norm": 1.0}
NO_DP = "n/a (no DP guarantee)"


def experiment(name: str, seed: int, rounds: int, local_epochs: int, extra: list[str]):
    """The benchmark's experiment: the demo's, one case per sample, difference exchange, no cross-site step."""
    from fedimg import config as cfg

    over = [
        f"name={name}",
        f"train.seed={seed}",
        f"fed.num_rounds={rounds}",
        f"train.local_epochs={local_epochs}",
        "data.samples_per_volume=1",
        "fed.exchange=diff",
        "fed.cross_site_eval=false",
        *extra,
    ]
    return cfg.load(cfg.ExperimentConfig, REPO / "configs" / "experiments" / "seg_demo.yaml", over)


def measure_updates(exp, sites: dict[str, str], init: Path) -> dict[str, Any]:
    """Each site's first-round update from ``init`` (local training only, no NVFlare): norms and per-step changes."""
    import numpy as np
    import torch

    from fedimg import config as cfg
    from fedimg import runtime
    from fedimg.training.trainer import SiteTrainer

    start = torch.load(init, map_location="cpu", weights_only=True)["model"]
    per_site = {}
    for site, path in sites.items():
        sc = cfg.load_site_config(path)
        rt = runtime.setup("cpu", exp.train.amp, 0, seed=exp.train.seed)
        trainer = SiteTrainer.from_datalist(exp, sc.datalist, rt)
        trainer.load_weights(start)
        trainer.set_progress(0.0)
        steps = int(trainer.fit(exp.train.local_epochs)["steps"])
        after = trainer.state_dict()
        diff = np.concatenate(
            [(after[k].double() - start[k].double()).numpy().ravel() for k in after if after[k].is_floating_point()]
        )
        per_step = np.abs(diff) / steps
        per_site[site] = {
            "update_norm": float(np.linalg.norm(diff)),
            "steps": steps,
            "per_step_abs_p90": float(np.percentile(per_step, 90)),
            "per_step_abs_p99": float(np.percentile(per_step, 99)),
            "entries": int(diff.size),
        }
    agg = {
        k: statistics.median(v[k] for v in per_site.values())
        for k in ("update_norm", "per_step_abs_p90", "per_step_abs_p99")
    }
    return {"per_site": per_site, "median": agg}


def settings(calib: dict[str, Any]) -> list[tuple[str, list[str], dict[str, Any]]]:
    """(label, config overrides, stated parameters) of every run; the first is the baseline."""
    med = calib["median"]
    clip = float(f"{med['update_norm']:.3g}")
    p99 = float(f"{med['per_step_abs_p99']:.3g}")
    p90 = float(f"{med['per_step_abs_p90']:.3g}")
    out: list[tuple[str, list[str], dict[str, Any]]] = [("no privacy", [], {})]
    for sigma in GAUSSIAN_SIGMAS:
        out.append(
            (
                f"gaussian C={clip:g} sigma={sigma:g}",
                [
                    "privacy.update_filter=gaussian",
                    f"privacy.gaussian.clip_norm={clip}",
                    f"privacy.gaussian.noise_multiplier={sigma}",
                    f"privacy.gaussian.delta={DELTA}",
                    "privacy.gaussian.seed=0",
                ],
                {"clip_norm": clip, "noise_multiplier": sigma, "delta": DELTA},
            )
        )
    out.append(
        (
            f"percentile 90 gamma={p99:g}",
            ["privacy.update_filter=percentile", "privacy.percentile.percentile=90", f"privacy.percentile.gamma={p99}"],
            {"percentile": 90, "gamma": p99},
        )
    )
    svt = {"fraction": 0.1, "epsilon": 0.1, "noise_var": 2.0, "gamma": p90, "tau": p90 / 10}
    out.append(
        (
            f"svt 10% gamma={p90:g}",
            ["privacy.update_filter=svt"] + [f"privacy.svt.{k}={v}" for k, v in svt.items()],
            svt,
        )
    )
    out.append(
        (
            f"dp_sgd sigma={DP_SGD['noise_multiplier']:g} C={DP_SGD['max_grad_norm']:g}",
            ["privacy.dp_sgd.enabled=true", f"privacy.dp_sgd.delta={DELTA}"]
            + [f"privacy.dp_sgd.{k}={v}" for k, v in DP_SGD.items()],
            {**DP_SGD, "delta": DELTA},
        )
    )
    return out


def _epsilon(train_rounds: list[dict[str, Any]]) -> tuple[float | None, dict[str, Any]]:
    """Epsilon after the last round (largest over the sites) and what the sites recorded."""
    last = train_rounds[-1].get("privacy") or {}
    eps = []
    for rec in last.values():
        if rec.get("mechanism") == "gaussian":
            eps.append(float(rec["epsilon"]))
        elif "dp_sgd" in rec:
            eps.append(float(rec["dp_sgd"]["epsilon"]))
    return (max(eps) if eps else None), last


def run_setting(
    index: int, label: str, extra: list[str], seed: int, args, sites: dict[str, str], init: Path, work: Path
) -> dict[str, Any]:
    """One federated run; the final global model's Dice, epsilon and what the sites recorded."""
    from fedimg.fl.simulate import run_simulation

    exp = experiment(f"privacy_s{seed}_{index}", seed, args.rounds, args.local_epochs, extra)
    t0 = time.perf_counter()
    res = run_simulation(exp, REPO / "jobs" / "train", sites, work / exp.name, initial_ckpt=str(init))
    seconds = time.perf_counter() - t0
    final = res.final_eval()
    if final is None or set(final["sites"]) != set(sites):
        raise RuntimeError(f"{label}: the final evaluation is missing or incomplete in {res.job_dir}")
    per_site = {s: float(m["val_dice"]) for s, m in final["sites"].items()}
    dice = statistics.mean(per_site.values())  # mean over sites, each site counted once
    train = [r for r in res.rounds if not r.get("final_eval")]
    eps, last = _epsilon(train)
    return {
        "seed": seed,
        "val_dice": dice,
        "per_site": per_site,
        "epsilon": eps,
        "seconds": seconds,
        "last_round_privacy": last,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--seeds", default="0", help="training seeds, comma-separated (results: mean over seeds)")
    p.add_argument("--rounds", type=int, default=12, help="rounds (12 x 2 local epochs: ~15 min on 2 CPU cores)")
    p.add_argument("--local-epochs", type=int, default=2)
    p.add_argument("--cases", type=int, default=8, help="synthetic studies per site (as the demo)")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]

    import torch

    from fedimg.models.registry import build_model

    t_start = time.perf_counter()
    per_seed: dict[str, list[dict[str, Any]]] = {}
    stated: dict[str, dict[str, Any]] = {}
    calibrations = {}
    with tempfile.TemporaryDirectory(prefix="fedimg_privacy_") as tmp_s:
        tmp = Path(tmp_s)
        print("synthetic heterogeneous 3-site segmentation (bench_quality's sites)", flush=True)
        sites = prepare_segmentation(tmp / "seg", args.cases)
        for seed in seeds:
            exp0 = experiment("calibrate", seed, args.rounds, args.local_epochs, [])
            torch.manual_seed(seed)
            init = tmp / f"initial_{seed}.pt"
            torch.save({"model": build_model(exp0.model, exp0.task).state_dict()}, init)
            calib = measure_updates(exp0, sites, init)
            calibrations[seed] = calib
            print(
                f"seed {seed}: first-round updates from the initial weights: "
                + ", ".join(
                    f"{s} norm {v['update_norm']:.3f} ({v['steps']} steps, per-step |change| p90 "
                    f"{v['per_step_abs_p90']:.2e}, p99 {v['per_step_abs_p99']:.2e})"
                    for s, v in calib["per_site"].items()
                ),
                flush=True,
            )
            for i, (label, extra, params) in enumerate(settings(calib)):
                print(f"  [{i + 1}] {label} ...", flush=True)
                row = run_setting(i, label, extra, seed, args, sites, init, tmp / f"ws_{seed}")
                # Labels carry the calibrated numbers; rows are matched across seeds by position.
                key = f"{i}:{label.split(' ')[0]}"
                per_seed.setdefault(key, []).append({**row, "label": label, "params": params})
                stated.setdefault(key, params)
                eps = "n/a" if row["epsilon"] is None else f"{row['epsilon']:.4g}"
                print(f"      val_dice {row['val_dice']:.4f}, epsilon {eps} ({row['seconds']:.0f} s)", flush=True)

    results = []
    base_key = next(iter(per_seed))
    base = statistics.mean(r["val_dice"] for r in per_seed[base_key])
    for key, rows in per_seed.items():
        dice = statistics.mean(r["val_dice"] for r in rows)
        eps_values = [r["epsilon"] for r in rows if r["epsilon"] is not None]
        label = rows[-1]["label"] if len(rows) == 1 else key.split(":", 1)[1]
        results.append(
            {
                "setting": label,
                "val_dice": dice,
                "ratio_to_baseline": dice / base if base else math.nan,
                "epsilon": max(eps_values) if eps_values else NO_DP,
                "delta": DELTA if eps_values else None,
                "seconds": statistics.mean(r["seconds"] for r in rows),
                "params": rows[-1]["params"],
                "per_seed": rows,
            }
        )
    svt = next((r for r in results if r["setting"].startswith("svt")), None)
    notes = {}
    if svt is not None:
        entries = next(iter(calibrations.values()))["per_site"]["site-1"]["entries"]
        n_upload = math.ceil(entries * svt["params"]["fraction"])
        notes["svt_nominal_epsilon_per_round"] = svt["params"]["epsilon"] + n_upload * svt["params"]["noise_var"]
        notes["svt"] = (
            "NVFlare's SVTPrivacy budget per round (selection epsilon + n_upload * noise_var, each "
            "released entry clipped to gamma); fedimg does not account it over rounds"
        )

    print()
    print(
        f"baseline: no privacy; {args.rounds} rounds x {args.local_epochs} local epochs, seeds {seeds}; "
        f"val_dice = final global model, mean over the 3 sites' validation cases"
    )
    print(f"{'setting':<34} {'val_dice':>8} {'ratio':>6} {'seconds':>7}  epsilon (delta {DELTA:g})")
    for r in results:
        eps = r["epsilon"] if isinstance(r["epsilon"], str) else f"{r['epsilon']:.4g}"
        print(f"{r['setting']:<34} {r['val_dice']:>8.4f} {r['ratio_to_baseline']:>6.3f} {r['seconds']:>7.0f}  {eps}")
    out = {
        "benchmark": "synthetic heterogeneous 3-site segmentation (bench_quality), privacy settings",
        "baseline": "no privacy",
        "settings": {
            "config": "configs/experiments/seg_demo.yaml",
            "overrides": ["data.samples_per_volume=1", "fed.exchange=diff", "fed.cross_site_eval=false"],
            "rounds": args.rounds,
            "local_epochs": args.local_epochs,
            "cases_per_site": args.cases,
            "seeds": seeds,
            "delta": DELTA,
            "epsilon": "after the last round; gaussian: site-level (every site the same); dp_sgd: "
            "sample-level, the largest over the sites",
            "val_dice": "final global model, mean over the three sites' validation Dice",
        },
        "calibration": {str(s): c for s, c in calibrations.items()},
        "results": results,
        "notes": notes,
        "total_seconds": time.perf_counter() - t_start,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {args.out} ({out['total_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
