"""Training speed: fedimg's site epoch vs a plain MONAI loop; federated vs centralized wall time.

Two comparisons, each against a named baseline in the same run:

1. ``client_epoch_overhead``: one local epoch through ``SiteTrainer.fit`` (the
   code the NVFlare client runs each round) divided by the same epoch in a
   plain MONAI loop written out below (same cached data, transforms, network,
   loss, optimizer and batch size). Goal: <= 1.05.
2. ``federated_over_centralized_wall``: the NVFlare simulator running R rounds
   x E local epochs on the sites, divided by centralized training of the
   pooled training cases for R x E epochs (the same ``SiteTrainer``). Where the
   federated time goes is read from the client logs: validation, training,
   and the rest (start-up, transfer, aggregation, cross-site evaluation).

    python benchmarks/bench_training.py --out bench_out/training.json [--rounds 4] [--cases 6]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def plain_monai_epoch(exp, datalist: Path, threads: int) -> float:
    """The baseline: a hand-written MONAI epoch (no fedimg code in the timed loop)."""
    import torch
    from monai.data import CacheDataset, DataLoader, load_decathlon_datalist
    from monai.losses import DiceCELoss
    from monai.networks.nets import UNet
    from monai.transforms import (Compose, EnsureChannelFirstd, EnsureTyped, LoadImaged, RandCropByLabelClassesd,
                                  RandFlipd, RandScaleIntensityd, RandShiftIntensityd, SpatialPadd)

    torch.set_num_threads(threads)
    items = load_decathlon_datalist(str(datalist), data_list_key="training", base_dir=str(datalist.parent))
    roi = exp.data.roi_size
    tf = Compose([
        LoadImaged(keys=["image", "label"], image_only=True), EnsureChannelFirstd(keys=["image", "label"]),
        EnsureTyped(keys=["image", "label"], dtype=(torch.float32, torch.uint8), track_meta=False),
        SpatialPadd(keys=["image", "label"], spatial_size=roi),
        RandCropByLabelClassesd(keys=["image", "label"], label_key="label", spatial_size=roi,
                                num_classes=exp.task.num_classes, num_samples=exp.data.samples_per_volume, warn=False),
        RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=0),
        RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
        RandShiftIntensityd(keys="image", offsets=0.05, prob=0.5),
    ])
    ds = CacheDataset(items, transform=tf, cache_rate=1.0, progress=False)
    loader = DataLoader(ds, batch_size=exp.data.batch_size, shuffle=True, num_workers=0)
    net = UNet(spatial_dims=3, in_channels=1, out_channels=exp.task.num_classes, channels=exp.model.channels,
               strides=exp.model.strides, num_res_units=exp.model.num_res_units, norm=exp.model.norm)
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
    from fedimg import runtime
    from fedimg.training.trainer import SiteTrainer

    rt = runtime.setup("cpu", amp=False, num_threads=threads, seed=0)
    trainer = SiteTrainer(exp, datalist, rt)
    t0 = time.perf_counter()
    trainer.fit(1)
    return time.perf_counter() - t0


def pooled_datalist(site_dirs: list[Path], out: Path) -> Path:
    """Centralized baseline data: every site's training cases in one datalist (absolute paths)."""
    train, val = [], []
    for d in site_dirs:
        dl = json.loads((d / "datalist.json").read_text())
        for key, dest in (("training", train), ("validation", val)):
            for it in dl[key]:
                dest.append({**it, "image": str(d / it["image"]), "label": str(d / it["label"])})
        labels = dl["labels"]
    out.write_text(json.dumps({"labels": labels, "training": train, "validation": val}))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_out/training.json")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--cases", type=int, default=6)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    from fedimg import config as cfg
    from fedimg import runtime
    from fedimg.dicom.deid import Pseudonymizer, SiteSecret
    from fedimg.fl.simulate import run_simulation
    from fedimg.preprocess.pipeline import preprocess
    from fedimg.synth import generate
    from fedimg.training.trainer import SiteTrainer

    exp = cfg.load(cfg.ExperimentConfig, REPO / "configs/experiments/seg_demo.yaml",
                   [f"fed.num_rounds={args.rounds}", "fed.cross_site_eval=false"])
    spec = cfg.load(cfg.PreprocessSpec, REPO / "configs/preprocessing/ct_phantom.yaml")
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        synth = generate(tmp / "raw", n_sites=3, n_cases=args.cases, seed=0, progress=False)
        site_dirs, site_cfgs = [], {}
        for site in synth.sites:
            secret = SiteSecret.generate(tmp / f"{site}.secret")
            preprocess(tmp / "raw" / site, tmp / site / "pre", spec, site=site, progress=False,
                       pseudonymizer=Pseudonymizer(secret))
            site_dirs.append(tmp / site / "pre")
            cfg.save(cfg.SiteConfig(name=site, datalist="pre/datalist.json", device="cpu", num_threads=1),
                     tmp / site / "site.yaml")
            site_cfgs[site] = str(tmp / site / "site.yaml")

        # 1. one site's epoch: fedimg SiteTrainer vs plain MONAI (same thread count, best of repeats)
        dl1 = site_dirs[0] / "datalist.json"
        fed_t = min(fedimg_epoch(exp, dl1, 2) for _ in range(args.repeats))
        plain_t = min(plain_monai_epoch(exp, dl1, 2) for _ in range(args.repeats))

        # 2. federated (simulator) vs centralized on the pooled cases, same number of epochs
        t0 = time.perf_counter()
        sim = run_simulation(exp, REPO / "jobs" / "train", site_cfgs, tmp / "nvflare")
        fed_wall = time.perf_counter() - t0
        pooled = pooled_datalist(site_dirs, tmp / "pooled.json")
        t0 = time.perf_counter()
        rt = runtime.setup("cpu", amp=False, num_threads=0, seed=0)
        central = SiteTrainer(exp, pooled, rt)
        for _ in range(args.rounds):
            central.fit(exp.train.local_epochs)
        central_val = central.validate()
        central_wall = time.perf_counter() - t0

        pat = re.compile(r"round (\d+): .*\(validate ([\d.]+) s, train ([\d.]+) s\)")
        per_site = {}
        for site in synth.sites:
            text = (sim.job_dir / site / "log.txt").read_text(errors="ignore")
            rows = [(float(v), float(t)) for _, v, t in pat.findall(text)]
            per_site[site] = {"validate_s": sum(v for v, _ in rows), "train_s": sum(t for _, t in rows),
                              "rounds_logged": len(rows)}
        busiest = max(s["validate_s"] + s["train_s"] for s in per_site.values())

    result = {
        "client_epoch_overhead": fed_t / plain_t,
        "federated_over_centralized_wall": fed_wall / central_wall,
        "fedimg_epoch_s": fed_t, "plain_monai_epoch_s": plain_t,
        "federated_wall_s": fed_wall, "centralized_wall_s": central_wall,
        "rounds": args.rounds, "local_epochs": exp.train.local_epochs, "sites": len(site_cfgs),
        "federated_breakdown": {"per_site": per_site, "busiest_site_work_s": busiest,
                                "other_s (start-up, transfer, aggregation, waiting)": fed_wall - busiest},
        "centralized_val_dice": central_val.get("dice_mean"),
        "note": "3 simulated sites share 2 CPU cores; the centralized run uses both cores for one process",
    }
    print(f"site epoch: fedimg SiteTrainer {fed_t:.2f} s vs plain MONAI loop {plain_t:.2f} s "
          f"-> overhead ratio {result['client_epoch_overhead']:.3f} (goal <= 1.05)")
    print(f"federated ({args.rounds} rounds x {exp.train.local_epochs} epochs, {len(site_cfgs)} sites, simulator) "
          f"{fed_wall:.1f} s vs centralized ({args.rounds * exp.train.local_epochs} epochs, pooled) "
          f"{central_wall:.1f} s -> ratio {result['federated_over_centralized_wall']:.2f}")
    for site, row in per_site.items():
        print(f"  {site}: validate {row['validate_s']:.1f} s, train {row['train_s']:.1f} s "
              f"over {row['rounds_logged']} rounds")
    print(f"  rest (start-up, transfer, aggregation, waiting): {fed_wall - busiest:.1f} s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
