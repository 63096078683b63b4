"""Bytes per round and model quality for each update exchange: full weights or differences, fp32 or fp16.

One federated run (NVFlare simulator) per setting on the same synthetic
sites and seed; the baseline is ``weights`` + ``fp32`` (NVFlare's default
exchange). Reported per setting: tensor bytes each site sent per round
(from the controller's round records), the ratio to the baseline, and the
final global model's mean Dice (case-weighted over the sites)::

    python benchmarks/bench_exchange.py --out bench_out/exchange.json [--rounds 10] [--cases 6]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SETTINGS = [("weights", "fp32"), ("diff", "fp32"), ("diff", "fp16"), ("weights", "fp16")]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_out/exchange.json")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--cases", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    from benchmarks.bench_quality import prepare_segmentation
    from fedimg import config as cfg
    from fedimg.fl.simulate import run_simulation

    results = {}
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        sites = prepare_segmentation(tmp / "seg", args.cases)
        for exchange, precision in SETTINGS:
            exp = cfg.load(
                cfg.ExperimentConfig,
                REPO / "configs" / "experiments" / "seg_demo.yaml",
                [
                    f"fed.num_rounds={args.rounds}",
                    "fed.cross_site_eval=false",
                    f"train.seed={args.seed}",
                    f"fed.exchange={exchange}",
                    f"fed.update_precision={precision}",
                ],
            )
            sim = run_simulation(exp, REPO / "jobs" / "train", sites, tmp / f"{exchange}_{precision}")
            rounds = [r for r in sim.rounds if not r.get("final_eval")]
            per_round = [sum(r["update_bytes"].values()) for r in rounds]
            results[f"{exchange}+{precision}"] = {
                "exchange": exchange,
                "precision": precision,
                "bytes_per_round_all_sites": sum(per_round) / len(per_round),
                "bytes_per_site_update": per_round[0] / len(rounds[0]["update_bytes"]),
                "final_val_dice": sim.final_eval()["global"]["val_dice"],
                "best_val_dice": sim.summary["best"]["value"],
                "seconds": sim.seconds,
            }
    base = results["weights+fp32"]
    print(f"\n{'exchange':<16} {'MB/round (all sites)':>20} {'vs weights+fp32':>16} {'final Dice':>11}")
    for name, r in results.items():
        r["bytes_ratio_to_weights_fp32"] = r["bytes_per_round_all_sites"] / base["bytes_per_round_all_sites"]
        print(
            f"{name:<16} {r['bytes_per_round_all_sites'] / 1e6:>20.2f} {r['bytes_ratio_to_weights_fp32']:>16.3f} "
            f"{r['final_val_dice']:>11.4f}"
        )
    out = {
        "rounds": args.rounds,
        "seed": args.seed,
        "sites": len(sites),
        "settings": results,
        "note": "bytes are the tensor payload of the sites' updates (what dominates each message); "
        "the server-to-site direction always sends fp32 weights",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
