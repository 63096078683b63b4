"""Raw DICOM -> NIfTI conversion speed, whole processes: fedimg vs dcm2niix vs MONAI on the same real series.

Every tool runs as a command of its own, started and timed from outside, so its start-up (interpreter,
imports) counts as it does for a person who types it:

* ``fedimg``: ``python -m fedimg.cli convert SRC OUT`` with its defaults (workers = CPU count, progress on,
  ``.nii.gz`` at :data:`fedimg.atomic.GZIP_LEVEL`; ``--no-compress`` for ``.nii``), manifest included;
* ``dcm2niix``: ``dcm2niix -z y|n -b n -f %s_%p -o OUT SRC``; ``-z y`` is its gzip (pigz when installed, its
  internal zlib at its default level 6 otherwise; ``pigz_found`` in the JSON says which);
* ``monai``: a Python script that loads each series folder with ``LoadImage(reader="PydicomReader")`` and
  saves it with nibabel (float32, MONAI's affine), gzip or not like the others.

Each repeat runs the three tools one after another, in an order that rotates between repeats, so a
change in the machine's load falls on all of them; the figure per tool is the median of the repeats
(``--repeats``, default 5), with the spread (min, max). ``ratio_vs_dcm2niix_whole_process`` is fedimg's
median wall time over dcm2niix's, writing gzip (the headline) and without. CPU time (user + system of
the process and its children) is reported beside wall time: it moves less when other work shares the
machine.

Series (one combined source folder, copied from ``../shared/data/dicom``; fedimg does not follow links):

* ``ge_mprage``: ``dcm_qa/dcm_qa_deident/In``: GE Signa HDxt 3D sagittal T1 (IR-SPGR), 196 files 256x256;
* ``philips_ct``: ``dcm_qa/dcm_qa_ct/In/Philips``: Philips Ingenuity head CT, 28 slices 512x512 plus its
  DIRFILE (a non-image object, skipped);
* ``anatomical``: ``dicom2nifti/anatomical/001``: GE MR anatomical, 4 slices 256x256.

fedimg's own stages are timed in-process afterwards (``fedimg_breakdown_s``: start-up imports, header
index, geometry, pixel read, NIfTI write; ``gzip_levels``: the uncompressed outputs gzip-compressed at level 1
and at level 6 alone).

    python benchmarks/bench_dicom.py --out bench_out/dicom.json [--repeats 5] [--fedimg-repo PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "dicom"

SERIES: dict[str, tuple[str, str]] = {
    "ge_mprage": ("dcm_qa/dcm_qa_deident/In", "GE Signa HDxt 3D sagittal T1, 196 x 256x256"),
    "philips_ct": ("dcm_qa/dcm_qa_ct/In/Philips", "Philips Ingenuity head CT, 28 x 512x512 + DIRFILE"),
    "anatomical": ("dicom2nifti/anatomical/001", "GE MR anatomical, 4 x 256x256"),
}
TOOLS = ("fedimg", "dcm2niix", "monai")

# The MONAI baseline as a script of its own (whole process, like the other two).
MONAI_SCRIPT = """
import sys, warnings
from pathlib import Path
warnings.simplefilter("ignore")
import nibabel as nib
import numpy as np
from monai.transforms import LoadImage

src, out, ext = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
out.mkdir(parents=True)
loader = LoadImage(reader="PydicomReader", image_only=True)
folders = sorted({p.parent for p in src.rglob("*") if p.is_file()})
for i, d in enumerate(folders):
    img = loader(str(d))
    data = np.asarray(img, dtype=np.float32)
    nib.save(nib.Nifti1Image(data, np.asarray(img.affine, dtype=np.float64)), str(out / f"series-{i:03d}{ext}"))
"""

# In-process stage timings of fedimg (run with the fedimg checkout on PYTHONPATH).
BREAKDOWN_SCRIPT = """
import gzip, json, sys, tempfile, time
from pathlib import Path
t = {}
t0 = time.perf_counter()
from fedimg.preprocess.convert import write_volume
from fedimg.dicom.index import group_series
from fedimg.dicom.volume import load_volume, series_geometry
from fedimg.preprocess.scan import index_source
t["imports"] = time.perf_counter() - t0
t0 = time.perf_counter()
scanned = index_source(Path(sys.argv[1]), label="bench", progress=False)
t["header_index"] = time.perf_counter() - t0
t0 = time.perf_counter()
groups = group_series(scanned.image_headers)
geos = [series_geometry(g) for g in groups]
t["geometry"] = time.perf_counter() - t0
t0 = time.perf_counter()
vols = [load_volume(g, geo) for g, geo in zip(groups, geos)]
t["pixel_read"] = time.perf_counter() - t0
out = Path(tempfile.mkdtemp())
for ext, key in ((".nii", "write_raw"), (".nii.gz", "write_gzip")):
    t0 = time.perf_counter()
    for i, v in enumerate(vols):
        write_volume(out / f"v{i}{ext}", v)
    t[key] = time.perf_counter() - t0
# The gzip level on its own: the same uncompressed files compressed at level 1 and 6 (zlib, one thread).
raw = [(out / f"v{i}.nii").read_bytes() for i in range(len(vols))]
levels = {"raw": {"seconds": 0.0, "bytes": sum(len(b) for b in raw)}}
for level in (1, 6):
    t0 = time.perf_counter()
    size = sum(len(gzip.compress(b, compresslevel=level, mtime=0)) for b in raw)
    levels[f"gzip{level}"] = {"seconds": time.perf_counter() - t0, "bytes": size}
print(json.dumps({"stages": t, "levels": levels, "voxels": sum(int(v.stored.size) for v in vols),
                  "dtypes": sorted({str(v.stored.dtype) for v in vols})}))
"""


def _dcm2niix() -> str:
    exe = shutil.which("dcm2niix") or str(Path(sys.executable).parent / "dcm2niix")
    if not Path(exe).exists():
        raise SystemExit("dcm2niix not found: pip install dcm2niix (it is in the dev extra)")
    return exe


def _timed(cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> tuple[float, float]:
    """Wall and CPU seconds (user + system, the process and its children) of one command.

    Run in ``cwd`` (default: the system's temporary folder), never in a checkout: ``python -m`` puts the
    working folder first on ``sys.path``, so a run from this repository would import this fedimg whatever
    PYTHONPATH says.
    """
    before = os.times()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd or tempfile.gettempdir(), capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    after = os.times()
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}): {proc.stderr[-800:]}")
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    return wall, cpu


def _stats(values: list[float]) -> dict[str, object]:
    return {
        "median_s": statistics.median(values),
        "min_s": min(values),
        "max_s": max(values),
        "runs_s": values,
    }


def _outputs(folder: Path) -> dict[str, int]:
    files = [p for p in folder.rglob("*.nii*") if p.is_file()]
    return {"nifti_files": len(files), "bytes": sum(p.stat().st_size for p in files)}


def build_source(dst: Path) -> dict[str, dict[str, object]]:
    """Copy the series into one source folder; what each holds."""
    info = {}
    for name, (rel, desc) in SERIES.items():
        src = SHARED / rel
        if not src.is_dir():
            raise SystemExit(f"benchmark data absent: {src} (expected ../shared/data beside the repo)")
        shutil.copytree(src, dst / name)
        info[name] = {"path": rel, "description": desc, "files": sum(1 for p in src.rglob("*") if p.is_file())}
    return info


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_out/dicom.json")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--fedimg-repo", default=str(REPO), help="fedimg checkout to time (default: this one)")
    p.add_argument(
        "--baseline-repo",
        default=None,
        help="another fedimg checkout (e.g. `git archive` of an earlier commit), timed as tool 'fedimg_before' "
        "in the same interleaved rounds",
    )
    p.add_argument("--modes", default="gzip,raw", help="gzip, raw or both (default: gzip,raw)")
    p.add_argument("--tools", default=",".join(TOOLS), help=f"subset of {','.join(TOOLS)}")
    p.add_argument("--no-breakdown", action="store_true", help="skip fedimg's in-process stage timings")
    args = p.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    tools = [t for t in args.tools.split(",") if t]
    if not set(modes) <= {"gzip", "raw"} or not set(tools) <= set(TOOLS) or not tools:
        raise SystemExit(f"--modes takes gzip,raw and --tools a subset of {','.join(TOOLS)}")
    fed_repo = Path(args.fedimg_repo).resolve()
    exe = _dcm2niix()
    env = {**os.environ, "PYTHONPATH": str(fed_repo), "PYTHONWARNINGS": "ignore"}
    envs = {t: env for t in TOOLS}
    if args.baseline_repo:
        tools.append("fedimg_before")
        envs["fedimg_before"] = {**env, "PYTHONPATH": str(Path(args.baseline_repo).resolve())}
    load_before = os.getloadavg()
    imported = {}  # which fedimg each fedimg tool really runs (a wrong sys.path would time the wrong code)
    for t in ("fedimg", "fedimg_before"):
        if t in tools:
            code = "import fedimg, os; print(os.path.dirname(os.path.dirname(fedimg.__file__)))"
            where = subprocess.run(
                [sys.executable, "-c", code], env=envs[t], cwd=tempfile.gettempdir(), capture_output=True, text=True
            ).stdout.strip()
            want = envs[t]["PYTHONPATH"]
            if Path(where).resolve() != Path(want).resolve():
                raise SystemExit(f"{t} would import fedimg from {where}, not {want}")
            imported[t] = where

    result: dict[str, object] = {"modes": {}}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        src = tmp / "src"
        series = build_source(src)
        n_files = sum(int(s["files"]) for s in series.values())  # type: ignore[call-overload]
        for f in src.rglob("*"):  # page cache warm for everyone
            if f.is_file():
                f.read_bytes()

        def command(tool: str, mode: str, out: Path) -> list[str]:
            if tool in ("fedimg", "fedimg_before"):
                return [sys.executable, "-m", "fedimg.cli", "convert", str(src), str(out)] + (
                    [] if mode == "gzip" else ["--no-compress"]
                )
            if tool == "dcm2niix":
                out.mkdir()
                z = "y" if mode == "gzip" else "n"
                return [exe, "-z", z, "-b", "n", "-f", "%s_%p", "-o", str(out), str(src)]
            return [sys.executable, "-c", MONAI_SCRIPT, str(src), str(out), ".nii.gz" if mode == "gzip" else ".nii"]

        # One untimed run of each: first imports compile bytecode, and the disk cache fills.
        for tool in tools:
            _timed(command(tool, "gzip", tmp / f"warm_{tool}"), envs[tool])
            shutil.rmtree(tmp / f"warm_{tool}")

        for mode in modes:
            walls: dict[str, list[float]] = {t: [] for t in tools}
            cpus: dict[str, list[float]] = {t: [] for t in tools}
            outputs: dict[str, dict[str, int]] = {}
            for r in range(args.repeats):
                order = tools[r % len(tools) :] + tools[: r % len(tools)]
                for tool in order:
                    out = tmp / f"{mode}_{tool}_{r}"
                    wall, cpu = _timed(command(tool, mode, out), envs[tool])
                    walls[tool].append(wall)
                    cpus[tool].append(cpu)
                    outputs[tool] = _outputs(out)
                    shutil.rmtree(out)
                print(
                    f"  {mode} repeat {r + 1}/{args.repeats}: " + ", ".join(f"{t} {walls[t][-1]:.2f}s" for t in tools)
                )
            entry: dict[str, object] = {
                "tools": {t: {"wall": _stats(walls[t]), "cpu": _stats(cpus[t]), "outputs": outputs[t]} for t in tools}
            }
            med = {t: statistics.median(walls[t]) for t in tools}
            cpu_med = {t: statistics.median(cpus[t]) for t in tools}
            if "fedimg" in tools and "dcm2niix" in tools:
                entry["ratio_vs_dcm2niix_whole_process"] = med["fedimg"] / med["dcm2niix"]
                entry["ratio_vs_dcm2niix_cpu"] = cpu_med["fedimg"] / cpu_med["dcm2niix"]
            if "fedimg" in tools and "monai" in tools:
                entry["ratio_vs_monai_whole_process"] = med["fedimg"] / med["monai"]
            if "fedimg_before" in tools and "dcm2niix" in tools:
                entry["before_ratio_vs_dcm2niix_whole_process"] = med["fedimg_before"] / med["dcm2niix"]
                entry["before_ratio_vs_dcm2niix_cpu"] = cpu_med["fedimg_before"] / cpu_med["dcm2niix"]
            result["modes"][mode] = entry  # type: ignore[index]

        if not args.no_breakdown:
            runs = []
            for _ in range(3):
                proc = subprocess.run(
                    [sys.executable, "-c", BREAKDOWN_SCRIPT, str(src)], env=env, cwd=tmp, capture_output=True, text=True
                )
                if proc.returncode != 0:
                    raise RuntimeError(f"breakdown failed: {proc.stderr[-800:]}")
                runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            startup = {
                "python_bare_s": statistics.median(_timed([sys.executable, "-c", "pass"], env)[0] for _ in range(5)),
                "fedimg_convert_imports_s": statistics.median(
                    _timed([sys.executable, "-c", "import fedimg.cli, fedimg.preprocess.convert"], env)[0]
                    for _ in range(5)
                ),
            }
            result["startup"] = startup
            result["fedimg_breakdown_s"] = {
                k: statistics.median(r["stages"][k] for r in runs) for k in runs[0]["stages"]
            }
            result["gzip_levels"] = {
                k: {
                    "seconds": statistics.median(r["levels"][k]["seconds"] for r in runs),
                    "bytes": runs[0]["levels"][k]["bytes"],
                }
                for k in runs[0]["levels"]
            }
            result["volumes"] = {"voxels": runs[0]["voxels"], "stored_dtypes": runs[0]["dtypes"]}

    version = subprocess.run([exe, "--version"], check=False, capture_output=True, text=True).stdout.strip()
    headline = result["modes"].get("gzip", {}).get("ratio_vs_dcm2niix_whole_process")  # type: ignore[attr-defined]
    result.update(
        {
            "ratio_vs_dcm2niix_whole_process": headline,
            "series": series,
            "files": n_files,
            "repeats": args.repeats,
            "fedimg_repo": str(fed_repo),
            "fedimg_imported_from": imported,
            "baseline_repo": str(Path(args.baseline_repo).resolve()) if args.baseline_repo else None,
            "timing": "whole processes, wall clock (perf_counter around subprocess.run) and CPU (children "
            "user+system); median of repeats, spread = min..max; tools interleaved, order rotating per repeat",
            "commands": {
                "fedimg": "python -m fedimg.cli convert SRC OUT [--no-compress]",
                "dcm2niix": "dcm2niix -z y|n -b n -f %s_%p -o OUT SRC",
                "monai": "python -c <LoadImage(PydicomReader) per series folder + nibabel save>",
            },
            "machine": {
                "cpu": platform.processor() or platform.machine(),
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "dcm2niix": version.splitlines()[-1] if version else "?",
                "pigz_found": shutil.which("pigz") is not None,
                "loadavg_before": load_before,
                "loadavg_after": os.getloadavg(),
            },
        }
    )

    print(f"\nDICOM -> NIfTI, whole processes, {n_files} files in {len(SERIES)} series, median of {args.repeats}")
    print("  series: " + "; ".join(f"{k} = {v['path']} ({v['files']} files)" for k, v in series.items()))
    hdr = f"{'mode':<5} {'tool':<13} {'wall s':>7} {'(min..max)':>14} {'cpu s':>7} {'files':>5} {'MB':>7}"
    print(hdr)
    print("-" * len(hdr))
    for mode, entry in result["modes"].items():  # type: ignore[attr-defined]
        for t, d in entry["tools"].items():
            w, c = d["wall"], d["cpu"]
            print(
                f"{mode:<5} {t:<13} {w['median_s']:>7.2f} {w['min_s']:>6.2f}..{w['max_s']:<6.2f} "
                f"{c['median_s']:>7.2f} {d['outputs']['nifti_files']:>5} {d['outputs']['bytes'] / 1e6:>7.1f}"
            )
        ratios = [
            f"{label} {entry[k]:.2f}x"
            for k, label in (
                ("ratio_vs_dcm2niix_whole_process", "fedimg/dcm2niix wall"),
                ("ratio_vs_dcm2niix_cpu", "cpu"),
                ("ratio_vs_monai_whole_process", "fedimg/monai wall"),
                ("before_ratio_vs_dcm2niix_whole_process", "before: fedimg/dcm2niix wall"),
                ("before_ratio_vs_dcm2niix_cpu", "cpu"),
            )
            if k in entry
        ]
        print(f"{'':<5} " + ", ".join(ratios))
    if "fedimg_breakdown_s" in result:
        b = result["fedimg_breakdown_s"]
        s = result["startup"]
        print(
            f"\nfedimg in-process (median of 3): python start {s['python_bare_s']:.2f}s, start + imports "  # type: ignore[index]
            f"{s['fedimg_convert_imports_s']:.2f}s; " + ", ".join(f"{k} {v:.2f}s" for k, v in b.items())  # type: ignore[index]  # type: ignore[attr-defined]
        )
        print(
            "gzip levels (same volumes): "
            + ", ".join(
                f"{k} {v['seconds']:.2f}s {v['bytes'] / 1e6:.1f} MB"
                for k, v in result["gzip_levels"].items()  # type: ignore[attr-defined]
            )
        )
    m = result["machine"]
    print(f"load average before {m['loadavg_before'][0]:.1f}, after {m['loadavg_after'][0]:.1f}")  # type: ignore[index]

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
