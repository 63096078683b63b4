"""Split a MedMNIST ``.npz`` into hospital sites that differ in size and class balance (non-IID).

Each site gets a share of the official training split for training and the
same share of the official test split as its own validation cases, drawn with
that site's class balance (a hospital is scored on patients like its own).
The output per site has the layout of ``fedimg preprocess`` (``images/``,
``datalist.json``, ``summary.json``) plus a ``site.yaml``, so the federated
job, the baselines and the benchmarks read it like any site's data::

    python preprocessing/medmnist.py ../shared/data/medmnist/pneumoniamnist.npz work/pneumonia \
        --sizes 0.5,0.3,0.2 --positive 0.8,0.5,0.2 --seed 0

MedMNIST is public and already de-identified; case ids are positions in its arrays.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from fedimg import config as cfgmod
from fedimg.preprocess.arrays import SiteShare, non_iid_split, write_array_site

CLASS_NAMES = {"pneumoniamnist": ["normal", "pneumonia"], "adrenalmnist3d": ["normal", "adrenal_mass"]}


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise SystemExit(f"medmnist.py: error: --{what} expects comma-separated numbers, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("npz", help="a MedMNIST .npz (train/val/test images and labels)")
    p.add_argument("out", help="output folder: one sub-folder per site")
    p.add_argument("--sizes", default="0.5,0.3,0.2", help="share of the cases per site (sums to 1)")
    p.add_argument("--positive", default="0.8,0.5,0.2", help="share of class-1 cases per site")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-train", type=int, default=None, help="cap on training cases over all sites")
    p.add_argument("--max-val", type=int, default=None, help="cap on validation cases over all sites")
    p.add_argument("--classes", default=None, help="class names, comma-separated (default: by data set)")
    args = p.parse_args(argv)

    src = Path(args.npz)
    if not src.is_file():
        p.error(f"{src} does not exist; expected a MedMNIST .npz (see ../shared/data/SOURCES.md)")
    data = np.load(src)
    expected = {"train_images", "train_labels", "test_images", "test_labels"}
    if not expected <= set(data.files):
        p.error(f"{src}: expected arrays {sorted(expected)}, found {sorted(data.files)}")
    stem = src.stem.split("_")[0]
    classes = args.classes.split(",") if args.classes else CLASS_NAMES.get(stem, ["class_0", "class_1"])
    sizes, positive = _floats(args.sizes, "sizes"), _floats(args.positive, "positive")
    if len(sizes) != len(positive):
        p.error(f"--sizes has {len(sizes)} entries, --positive {len(positive)}: one of each per site")
    shares = [SiteShare(size=s, positive=q) for s, q in zip(sizes, positive)]
    rng = np.random.default_rng(args.seed)
    tr_lab, te_lab = data["train_labels"].reshape(-1), data["test_labels"].reshape(-1)
    try:
        train_split = non_iid_split(tr_lab, shares, rng, total=args.max_train)
        val_split = non_iid_split(te_lab, shares, rng, total=args.max_val)
    except ValueError as exc:
        p.error(str(exc))
    out = Path(args.out)
    summaries = {}
    for i, (tr, va) in enumerate(zip(train_split, val_split), start=1):
        site = f"site-{i}"
        site_dir = out / site
        summaries[site] = write_array_site(
            site_dir / "preprocessed",
            site,
            stem,
            classes,
            (data["train_images"][tr], tr_lab[tr]),
            (data["test_images"][va], te_lab[va]),
            prefix=stem,
        )
        cfgmod.save(cfgmod.SiteConfig(name=site, datalist="preprocessed/datalist.json"), site_dir / "site.yaml")
        s = summaries[site]
        print(f"{site}: training {s['training']}, validation {s['validation']}")
    (out / "split.json").write_text(
        json.dumps(
            {"source": str(src.name), "seed": args.seed, "sizes": sizes, "positive": positive, "sites": summaries},
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
