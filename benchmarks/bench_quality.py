"""Model quality: federated vs centralized vs local-only, on the same loops, splits and epochs.

Two benchmarks, each over several training seeds (``train.seed``; the data
and its split stay fixed):

(a) ``synthetic_segmentation``: the demo's three heterogeneous synthetic CT
    sites (vendors, planes, spacing, noise, case counts), organ + lesion
    segmentation, ``configs/experiments/seg_demo.yaml``; metric: mean Dice.
(b) ``pneumoniamnist``: PneumoniaMNIST from ``../shared/data/medmnist`` split
    across three sites of different size and class balance (50/30/20% of
    the cases, 80/50/20% pneumonia), 2D classification,
    ``configs/experiments/cls_pneumonia.yaml``; metric: AUC.

Each run is ``fedimg compare``: the federated experiment in the NVFlare
simulator, local-only training at each site and centralized training on the
pooled cases, every model scored on every site's validation cases. Reported
per benchmark (mean over seeds of the mean over sites):
``federated`` (final global model), ``centralized``, ``local_mean`` (each
site's own model on its own cases), ``ratio = federated / centralized``
(goal >= 0.98) and whether federated beats local-only (goal: yes)::

    python benchmarks/bench_quality.py --out bench_out/quality.json [--seeds 0,1] [--only pneumoniamnist]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MEDMNIST = REPO.parent / "shared" / "data" / "medmnist" / "pneumoniamnist.npz"


def _site_yamls(site_dirs: dict[str, Path]) -> dict[str, str]:
    return {s: str(d / "site.yaml") for s, d in site_dirs.items()}


def prepare_segmentation(tmp: Path, cases: int) -> dict[str, str]:
    """The demo's synthetic sites, preprocessed with per-site secrets."""
    from fedimg import config as cfg
    from fedimg.dicom.deid import Pseudonymizer, SiteSecret
    from fedimg.preprocess.pipeline import preprocess
    from fedimg.runtime import default_threads
    from fedimg.synth import generate

    spec = cfg.load(cfg.PreprocessSpec, REPO / "configs" / "preprocessing" / "ct_phantom.yaml")
    synth = generate(tmp / "raw", n_sites=3, n_cases=cases, seed=0, progress=False)
    dirs = {}
    for site in synth.sites:
        d = tmp / "sites" / site
        d.mkdir(parents=True)
        secret = SiteSecret.generate(d / "site.secret")
        preprocess(
            tmp / "raw" / site, d / "preprocessed", spec, site=site, progress=False, pseudonymizer=Pseudonymizer(secret)
        )
        cfg.save(
            cfg.SiteConfig(
                name=site,
                datalist="preprocessed/datalist.json",
                device="auto",
                num_threads=default_threads(len(synth.sites)),
            ),
            d / "site.yaml",
        )
        dirs[site] = d
    return _site_yamls(dirs)


def prepare_pneumonia(tmp: Path) -> dict[str, str]:
    """PneumoniaMNIST split non-IID over three sites (preprocessing/medmnist.py)."""
    import subprocess

    out = tmp / "pneumonia"
    subprocess.run(
        [
            sys.executable,
            str(REPO / "preprocessing" / "medmnist.py"),
            str(MEDMNIST),
            str(out),
            "--sizes",
            "0.5,0.3,0.2",
            "--positive",
            "0.8,0.5,0.2",
            "--seed",
            "0",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return _site_yamls({s: out / s for s in ("site-1", "site-2", "site-3")})


def run_benchmark(
    name: str, config: Path, sites: dict[str, str], seeds: list[int], tmp: Path, overrides: list[str]
) -> dict:
    from fedimg import config as cfg
    from fedimg.compare import run_comparison

    per_seed = []
    for seed in seeds:
        exp = cfg.load(cfg.ExperimentConfig, config, [f"train.seed={seed}", *overrides])
        t0 = time.perf_counter()
        comp = run_comparison(exp, sites, tmp / f"{name}_seed{seed}", progress=False)
        per_seed.append(
            {
                "seed": seed,
                "seconds": time.perf_counter() - t0,
                "mean": comp["mean"],
                "per_site": comp["per_site"],
                "ratio": comp["federated_over_centralized"],
            }
        )
        print(
            f"  {name} seed {seed}: federated {comp['mean']['federated']:.4f}, centralized "
            f"{comp['mean']['centralized']:.4f}, local-only {comp['mean']['local']:.4f} "
            f"({per_seed[-1]['seconds']:.0f} s)",
            flush=True,
        )
    metric = comp["metric"]
    fed = statistics.mean(r["mean"]["federated"] for r in per_seed)
    cen = statistics.mean(r["mean"]["centralized"] for r in per_seed)
    loc = statistics.mean(r["mean"]["local"] for r in per_seed)
    best = statistics.mean(r["mean"]["federated_best"] for r in per_seed if r["mean"].get("federated_best") is not None)
    return {
        "metric": metric,
        "federated": fed,
        "centralized": cen,
        "local_mean": loc,
        "ratio": fed / cen,
        "federated_best": best,
        "federated_beats_local": fed > loc,
        "seeds": seeds,
        "config": str(config.relative_to(REPO)),
        "overrides": overrides,
        "per_seed": per_seed,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_out/quality.json")
    p.add_argument("--seeds", default="0,1", help="training seeds, comma-separated (at least 2 for the report)")
    p.add_argument("--only", choices=["synthetic_segmentation", "pneumoniamnist"], default=None)
    p.add_argument("--cases", type=int, default=8, help="synthetic studies per site (as the demo)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override an experiment key in both benchmarks (e.g. fed.algorithm=fedprox)",
    )
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]

    results = {}
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        if args.only in (None, "synthetic_segmentation"):
            print("(a) synthetic heterogeneous 3-site segmentation", flush=True)
            sites = prepare_segmentation(tmp / "seg", args.cases)
            results["synthetic_segmentation"] = run_benchmark(
                "synthetic_segmentation",
                REPO / "configs" / "experiments" / "seg_demo.yaml",
                sites,
                seeds,
                tmp,
                args.set,
            )
        if args.only in (None, "pneumoniamnist"):
            if not MEDMNIST.is_file():
                print(f"(b) skipped: {MEDMNIST} is absent (expected ../shared/data beside the repo)")
            else:
                print("(b) PneumoniaMNIST, 3 non-IID sites, 2D classification", flush=True)
                sites = prepare_pneumonia(tmp)
                results["pneumoniamnist"] = run_benchmark(
                    "pneumoniamnist",
                    REPO / "configs" / "experiments" / "cls_pneumonia.yaml",
                    sites,
                    seeds,
                    tmp,
                    args.set,
                )

    print()
    print(
        f"{'benchmark':<24} {'metric':<9} {'federated':>9} {'centralized':>11} {'local':>7} {'fed/cen':>8} "
        f"{'fed>local':>9}  seeds"
    )
    for name, r in results.items():
        print(
            f"{name:<24} {r['metric']:<9} {r['federated']:>9.4f} {r['centralized']:>11.4f} {r['local_mean']:>7.4f} "
            f"{r['ratio']:>8.3f} {str(r['federated_beats_local']):>9}  {r['seeds']}"
        )
    print("goals: fed/cen >= 0.98; federated better than the mean of local-only")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
