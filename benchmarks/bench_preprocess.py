"""Preprocessing speed: fedimg vs dcm2niix on the same synthetic site.

Baseline: dcm2niix (the neuroimaging world's reference converter) converting
every series of the site to NIfTI, nothing more. fedimg does more work per
case (header index, geometry checks, label matching, reorientation,
resampling, intensity normalization, manifest), so the ratio says what that
costs, not who is "faster".

    python benchmarks/bench_preprocess.py --out bench_out/preprocess.json

Prints a table and writes JSON with ``fedimg_over_dcm2niix``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _dcm2niix() -> str:
    exe = shutil.which("dcm2niix") or str(Path(sys.executable).parent / "dcm2niix")
    if not Path(exe).exists():
        raise SystemExit("dcm2niix not found: pip install dcm2niix (it is in the dev extra)")
    return exe


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_out/preprocess.json")
    p.add_argument("--cases", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    from fedimg import config as cfg
    from fedimg.preprocess.pipeline import preprocess
    from fedimg.synth import generate

    spec = cfg.load(cfg.PreprocessSpec, REPO / "configs" / "preprocessing" / "ct_phantom.yaml")
    exe = _dcm2niix()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw"
        generate(raw, n_sites=3, n_cases=args.cases, seed=0, progress=False)
        for site in sorted(d.name for d in raw.iterdir() if d.is_dir()):
            n_files = sum(1 for f in (raw / site).rglob("*") if f.is_file())
            t_fed, t_ref = [], []
            for r in range(args.repeats):
                out = Path(tmp) / f"fed_{site}_{r}"
                t0 = time.perf_counter()
                res = preprocess(raw / site, out, spec, site=site, progress=False)
                t_fed.append(time.perf_counter() - t0)
                ref = Path(tmp) / f"ref_{site}_{r}"
                ref.mkdir()
                t0 = time.perf_counter()
                subprocess.run(
                    [exe, "-b", "n", "-z", "y", "-f", "%s_%j", "-o", str(ref), str(raw / site)],
                    check=True,
                    capture_output=True,
                )
                t_ref.append(time.perf_counter() - t0)
            rows.append(
                {
                    "site": site,
                    "files": n_files,
                    "cases": len(res.cases),
                    "fedimg_s": min(t_fed),
                    "dcm2niix_s": min(t_ref),
                    "fedimg_over_dcm2niix": min(t_fed) / min(t_ref),
                }
            )
    total_fed = sum(r["fedimg_s"] for r in rows)
    total_ref = sum(r["dcm2niix_s"] for r in rows)
    result = {
        "baseline": "dcm2niix -z y (conversion only)",
        "repeats": args.repeats,
        "sites": rows,
        "fedimg_over_dcm2niix": total_fed / total_ref,
    }
    print(f"{'site':<8} {'files':>6} {'cases':>6} {'fedimg s':>9} {'dcm2niix s':>11} {'ratio':>6}")
    for r in rows:
        print(
            f"{r['site']:<8} {r['files']:>6} {r['cases']:>6} {r['fedimg_s']:>9.2f} {r['dcm2niix_s']:>11.2f} "
            f"{r['fedimg_over_dcm2niix']:>6.2f}"
        )
    print(
        f"total: fedimg {total_fed:.2f} s, dcm2niix {total_ref:.2f} s, ratio {result['fedimg_over_dcm2niix']:.2f} "
        "(best of repeats; fedimg also resamples, normalizes and writes labels + manifest)"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
