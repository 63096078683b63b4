"""Peak memory of ``fedimg convert`` and ``fedimg preprocess`` on one large CT series.

Writes a synthetic axial CT series with :func:`fedimg.synth.bulk.write_bulk_ct`
(default 2000 slices of 512 x 512, uint16 stored values with 12 bits stored,
(0028,1053) Rescale Slope 1 and (0028,1052) Rescale Intercept -1024, as most
CT scanners export) and a uint8 NIfTI label on its grid into a temporary
folder, then runs each command as a
fresh process (``python -m fedimg.cli ...``) and records its peak resident
memory (``ru_maxrss`` of that child, from ``os.wait4``; this process imports
nothing large, since a child's figure starts from its parent's high-water mark). ``preprocess`` uses
the shipped CT spec (``configs/preprocessing/ct_phantom.yaml``: RAS, 3 mm,
soft-tissue window, organ/lesion label).

    python benchmarks/bench_memory.py --out bench_out/memory.json            # 2000 slices (1 GB pixels)
    python benchmarks/bench_memory.py --slices 300 --out bench_out/mem.json  # quick

The JSON holds, per command, ``peak_rss_bytes``, ``pixel_bytes`` (the
series' stored pixel bytes: slices x rows x columns x 2) and ``ratio``
(peak / pixel bytes), plus ``baseline_rss_bytes``: the peak of a process
that only imports the command's modules (Python, NumPy, PyTorch, MONAI), so
``net_ratio`` = (peak - baseline) / pixel bytes is what the data costs.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CT_SPEC = REPO / "configs" / "preprocessing" / "ct_phantom.yaml"
IMPORTS = "import fedimg.cli, fedimg.preprocess.convert, fedimg.preprocess.pipeline, fedimg.preprocess.transforms"


def peak_rss(cmd: list[str], env: dict[str, str]) -> tuple[int, float, str]:
    """Run ``cmd`` as a fresh child; return its peak RSS in bytes, the seconds it took and its stderr tail."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        tail = err.read().decode(errors="replace")[-2000:]
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[2:5])} failed (exit {proc.returncode}):\n{tail}")
    # Linux reports ru_maxrss in KiB (macOS in bytes).
    scale = 1 if platform.system() == "Darwin" else 1024
    return int(usage.ru_maxrss) * scale, seconds, tail


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_out/memory.json")
    p.add_argument("--slices", type=int, default=2000)
    p.add_argument("--size", type=int, default=512, help="rows = columns")
    p.add_argument("--spacing", type=float, nargs=3, default=[0.7, 0.7, 1.0], metavar=("ROW", "COL", "SLICE"))
    p.add_argument(
        "--no-label",
        action="store_true",
        help="no label NIfTI; preprocess with --set labels.required=false (the image alone)",
    )
    args = p.parse_args()

    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env = {**os.environ, "PYTHONPATH": path}
    py = sys.executable
    pixel_bytes = args.slices * args.size * args.size * 2
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        study = root / "raw" / "study"
        # Written by a fresh interpreter: a child's ru_maxrss starts from its parent's high-water mark (vfork
        # shares the memory map until exec), so this process must never hold the series itself.
        sys.path.insert(0, str(REPO))
        from fedimg.synth.bulk import write_bulk_ct

        writer = multiprocessing.get_context("spawn").Process(
            target=write_bulk_ct,
            args=(study, args.slices, args.size, args.size, tuple(args.spacing)),
            kwargs={"label": not args.no_label},
        )
        writer.start()
        writer.join()
        if writer.exitcode != 0:
            raise SystemExit(f"writing the series failed (exit {writer.exitcode})")
        what = "slices" if args.no_label else "slices + label"
        print(
            f"wrote {args.slices} x {args.size}^2 {what} in {time.perf_counter() - t0:.0f} s "
            f"({pixel_bytes / 2**30:.2f} GiB stored pixels)",
            flush=True,
        )
        baseline, _, _ = peak_rss([py, "-c", IMPORTS], env)
        commands = {
            "convert": [
                py,
                "-m",
                "fedimg.cli",
                "convert",
                str(study),
                str(root / "convert"),
                "--workers",
                "1",
                "--quiet",
            ],
            "preprocess": [
                py,
                "-m",
                "fedimg.cli",
                "preprocess",
                str(study),
                str(root / "pre"),
                "--spec",
                str(CT_SPEC),
                "--site",
                "bench",
                "--no-deid",
                "--workers",
                "1",
                "--quiet",
                *(["--set", "labels.required=false"] if args.no_label else []),
            ],
        }
        rows = {}
        for name, cmd in commands.items():
            peak, seconds, _ = peak_rss(cmd, env)
            rows[name] = {
                "peak_rss_bytes": peak,
                "pixel_bytes": pixel_bytes,
                "ratio": peak / pixel_bytes,
                "net_ratio": (peak - baseline) / pixel_bytes,
                "seconds": round(seconds, 1),
            }
            print(f"{name}: peak {peak / 2**30:.2f} GiB, {peak / pixel_bytes:.2f}x pixel bytes", flush=True)
        outputs = sorted(str(f.relative_to(root)) for f in (root / "convert" / "series").glob("*"))
        datalist = json.loads((root / "pre" / "datalist.json").read_text())
        cases = datalist["training"] + datalist["validation"]
        if len(outputs) != 1 or len(cases) != 1 or bool(cases[0].get("label")) == args.no_label:
            raise SystemExit(
                f"expected one converted series and one preprocessed case (label: {not args.no_label}), "
                f"got {outputs} and {cases}: the numbers above would not measure a conversion"
            )
    result = {
        "series": {
            "slices": args.slices,
            "rows": args.size,
            "columns": args.size,
            "dtype": "uint16",
            "bits_stored": 12,
            "rescale": [1.0, -1024.0],
            "spacing_mm": args.spacing,
        },
        "spec": str(CT_SPEC.relative_to(REPO)),
        "label": not args.no_label,
        "baseline_rss_bytes": baseline,
        "commands": rows,
        "convert_outputs": outputs,
    }
    print(f"\n{'command':<11} {'peak GiB':>9} {'pixel GiB':>10} {'ratio':>6} {'net ratio':>10} {'s':>6}")
    print(f"{'(imports)':<11} {baseline / 2**30:>9.2f}")
    for name, r in rows.items():
        print(
            f"{name:<11} {r['peak_rss_bytes'] / 2**30:>9.2f} {r['pixel_bytes'] / 2**30:>10.2f} {r['ratio']:>6.2f} "
            f"{r['net_ratio']:>10.2f} {r['seconds']:>6.1f}"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
