"""Raw DICOM -> NIfTI conversion speed: fedimg vs dcm2niix vs MONAI, on the same real series.

Every tool converts the same series (one NIfTI volume per series), in one run:

* ``fedimg``: ``fedimg.preprocess.convert.convert`` (python API, progress off,
  a fresh DST each repeat so nothing is reused); writes uncompressed ``.nii``
  (``compress=False``, like dcm2niix ``-z n``; ``--gzip`` for ``.nii.gz``) plus
  the manifest; ``--workers`` processes.
* ``dcm2niix``: ``dcm2niix -z n -b n`` (uncompressed NIfTI, no BIDS sidecar).
* ``monai``: ``LoadImage(reader="PydicomReader")`` per series folder, then the
  volume saved with nibabel (float32, RAS affine from MONAI), compressed or not
  like fedimg's.

All three write uncompressed NIfTI by default (like for like); ``--gzip`` makes
fedimg and MONAI gzip theirs, and the breakdown reports the gzip share.

Series (from ``../shared/data/dicom``; absent datasets are skipped and said so):

* ``deident_t1``: dcm_qa_deident, GE 3D sagittal T1, 196 slices 256x256;
* ``philips_ct``: dcm_qa_ct Philips Ingenuity head CT, 28 slices 512x512
  (its DIRFILE is a non-image object, skipped by fedimg);
* ``totalseg_ct``: TotalSegmentator Siemens CT, 20 slices 512x512, JPEG 2000 lossless;
* ``tcia_btp``: TCIA Brain-Tumor-Progression, 9 series (T1post, FLAIRreg,
  tumour mask for 3 studies), 213 slices.

The time breakdown runs fedimg's stages one by one with timers: header index
(``index_source``), geometry (``group_series`` + ``series_geometry``), pixel
read (``pydicom.dcmread`` of each slice), pixel decode (``load_volume`` minus
the read), NIfTI write with gzip (``write_volume``, as convert writes), and the rest of
``convert`` (manifest, state, process pool). ``--profile`` adds a cProfile
listing of one fedimg pass.

    python benchmarks/bench_dicom.py --out bench_out/dicom.json [--workers N] [--repeats R]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

COMPRESS = False  # set from --gzip in main()
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "data" / "dicom"

DATASETS: dict[str, tuple[str, str]] = {
    "deident_t1": ("dcm_qa/dcm_qa_deident/In", "GE Signa HDxt 3D sagittal T1, 196 x 256x256"),
    "philips_ct": ("dcm_qa/dcm_qa_ct/In/Philips", "Philips Ingenuity head CT, 28 x 512x512"),
    "totalseg_ct": (
        "totalsegmentator/tests/reference_files/example_ct_dicom",
        "Siemens CT, 20 x 512x512, JPEG 2000 lossless",
    ),
    "tcia_btp": (
        "tcia_brain_tumor_progression",
        "TCIA Brain-Tumor-Progression, 9 MR series, 213 slices",
    ),
}


def _dcm2niix() -> str:
    exe = shutil.which("dcm2niix") or str(Path(sys.executable).parent / "dcm2niix")
    if not Path(exe).exists():
        raise SystemExit("dcm2niix not found: pip install dcm2niix (it is in the dev extra)")
    return exe


def _best(fn: Callable[[int], object], repeats: int) -> tuple[float, list[float], object]:
    times, last = [], None
    for r in range(repeats):
        t0 = time.perf_counter()
        last = fn(r)
        times.append(time.perf_counter() - t0)
    return min(times), times, last


def _series_dirs(src: Path) -> list[Path]:
    """Folders that directly hold files (one series each in these datasets)."""
    return sorted({p.parent for p in src.rglob("*") if p.is_file()})


def run_fedimg(src: Path, out: Path, workers: int) -> int:
    from fedimg.preprocess.convert import convert

    res = convert(src, out, workers=workers, progress=False, compress=COMPRESS)
    return len(res.outputs)


def run_dcm2niix(exe: str, src: Path, out: Path) -> int:
    out.mkdir(parents=True)
    proc = subprocess.run(
        [exe, "-z", "n", "-b", "n", "-f", "%s_%p", "-o", str(out), str(src)],
        check=False,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"dcm2niix failed ({proc.returncode}): {proc.stderr[-500:]}")
    return len(list(out.glob("*.nii")))


def run_monai(src: Path, out: Path, loader) -> int:
    import nibabel as nib
    import numpy as np

    out.mkdir(parents=True)
    n = 0
    for i, d in enumerate(_series_dirs(src)):
        img = loader(str(d))
        data = np.asarray(img, dtype=np.float32)
        nib.save(
            nib.Nifti1Image(data, np.asarray(img.affine, dtype=np.float64)),
            str(out / f"series-{i:03d}.nii{'.gz' if COMPRESS else ''}"),
        )
        n += 1
    return n


def breakdown(src: Path, out: Path) -> dict[str, float]:
    """fedimg's convert, stage by stage (one pass, single process)."""
    import pydicom

    from fedimg.dicom.index import group_series
    from fedimg.dicom.reasons import RefusedError
    from fedimg.dicom.volume import load_volume, series_geometry
    from fedimg.preprocess.convert import write_volume
    from fedimg.preprocess.scan import index_source

    t: dict[str, float] = {}
    t0 = time.perf_counter()
    scanned = index_source(src, label="bench", progress=False)
    t["header_index"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    groups = group_series(scanned.image_headers)
    ok = []
    for g in groups:
        try:
            ok.append((g, series_geometry(g)))
        except RefusedError:
            pass
    t["geometry"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    for g, _ in ok:
        for h in g.headers:
            pydicom.dcmread(h.path)
    t["pixel_read"] = time.perf_counter() - t0

    vols = []
    t0 = time.perf_counter()
    for g, geo in ok:
        vols.append(load_volume(g, geo))
    t["pixel_decode"] = max(0.0, time.perf_counter() - t0 - t["pixel_read"])

    out.mkdir(parents=True)
    t0 = time.perf_counter()
    for i, v in enumerate(vols):
        write_volume(out / f"v{i}.nii.gz", v)
    t["nifti_write_gzip"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    for i, v in enumerate(vols):
        write_volume(out / f"v{i}.nii", v)
    t["nifti_write_raw_for_reference"] = time.perf_counter() - t0
    t["voxels"] = float(sum(v.stored.size for v in vols))
    return t


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_out/dicom.json")
    p.add_argument("--workers", type=int, default=1, help="fedimg convert worker processes (default 1)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--gzip", action="store_true", help="fedimg and MONAI write .nii.gz (dcm2niix stays -z n)")
    p.add_argument("--profile", action="store_true", help="also print a cProfile listing of one fedimg pass")
    args = p.parse_args()
    global COMPRESS
    COMPRESS = bool(args.gzip)
    warnings.simplefilter("ignore")

    import pydicom
    from monai.transforms import LoadImage

    exe = _dcm2niix()
    loader = LoadImage(reader="PydicomReader", image_only=True)
    present = {k: v for k, v in DATASETS.items() if (SHARED / v[0]).is_dir()}
    for k in DATASETS.keys() - present.keys():
        print(f"skipping {k}: {SHARED / DATASETS[k][0]} is absent")
    if not present:
        raise SystemExit(f"no benchmark data under {SHARED}")

    rows = []
    stages_total: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # Warm the page cache and imports once so the first tool is not penalised.
        for rel, _ in present.values():
            for f in (SHARED / rel).rglob("*"):
                if f.is_file():
                    f.read_bytes()
        loader(str(_series_dirs(SHARED / present[next(iter(present))][0])[0]))

        for name, (rel, desc) in present.items():
            src = SHARED / rel
            n_files = sum(1 for f in src.rglob("*") if f.is_file())
            t_fed, fed_all, n_fed = _best(
                lambda r, src=src, name=name: run_fedimg(src, tmp / f"fed_{name}_{r}", args.workers),
                args.repeats,
            )
            t_d2n, d2n_all, n_d2n = _best(
                lambda r, src=src, name=name: run_dcm2niix(exe, src, tmp / f"d2n_{name}_{r}"),
                args.repeats,
            )
            t_mon, mon_all, n_mon = _best(
                lambda r, src=src, name=name: run_monai(src, tmp / f"mon_{name}_{r}", loader),
                args.repeats,
            )
            stages = breakdown(src, tmp / f"stages_{name}")
            stages["convert_rest"] = max(
                0.0,
                t_fed - sum(v for k, v in stages.items() if k not in ("voxels", "nifti_write_raw_for_reference")),
            )
            for k, v in stages.items():
                stages_total[k] = stages_total.get(k, 0.0) + v
            rows.append(
                {
                    "dataset": name,
                    "path": rel,
                    "description": desc,
                    "files": n_files,
                    "series": {"fedimg": n_fed, "dcm2niix": n_d2n, "monai": n_mon},
                    "fedimg_s": t_fed,
                    "dcm2niix_s": t_d2n,
                    "monai_s": t_mon,
                    "ratio_vs_dcm2niix": t_fed / t_d2n,
                    "ratio_vs_monai": t_fed / t_mon,
                    "times": {"fedimg": fed_all, "dcm2niix": d2n_all, "monai": mon_all},
                    "fedimg_breakdown_s": stages,
                }
            )
            for d in tmp.iterdir():
                shutil.rmtree(d, ignore_errors=True)

        profile_text = ""
        if args.profile:
            prof = cProfile.Profile()
            prof.enable()
            for name, (rel, _) in present.items():
                run_fedimg(SHARED / rel, tmp / f"prof_{name}", 1)
            prof.disable()
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(15)
            profile_text = buf.getvalue()

    tot = {k: sum(r[k] for r in rows) for k in ("fedimg_s", "dcm2niix_s", "monai_s")}
    n_series = sum(r["series"]["fedimg"] for r in rows)
    result = {
        **tot,
        "ratio_vs_dcm2niix": tot["fedimg_s"] / tot["dcm2niix_s"],
        "ratio_vs_monai": tot["fedimg_s"] / tot["monai_s"],
        "series": n_series,
        "files": sum(r["files"] for r in rows),
        "workers": args.workers,
        "gzip": COMPRESS,
        "repeats": args.repeats,
        "timing": "best of repeats, wall clock, per dataset; totals sum the per-dataset bests",
        "outputs": {
            "fedimg": ".nii.gz (gzip) + manifest",
            "dcm2niix": ".nii (-z n -b n)",
            "monai": ".nii.gz via nibabel",
        },
        "fedimg_breakdown_s": stages_total,
        "datasets": rows,
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "pydicom": pydicom.__version__,
            "dcm2niix": subprocess.run([exe, "--version"], check=False, capture_output=True, text=True)
            .stdout.strip()
            .splitlines()[-1],
        },
    }

    print(f"\nDICOM -> NIfTI, best of {args.repeats} (fedimg workers={args.workers})")
    hdr = (
        f"{'dataset':<12} {'files':>5} {'series':>6} {'fedimg s':>9} {'dcm2niix s':>10} "
        f"{'monai s':>8} {'fed/d2n':>8} {'fed/monai':>9}"
    )
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(
            f"{r['dataset']:<12} {r['files']:>5} {r['series']['fedimg']:>6} {r['fedimg_s']:>9.3f} "
            f"{r['dcm2niix_s']:>10.3f} {r['monai_s']:>8.3f} {r['ratio_vs_dcm2niix']:>8.1f} "
            f"{r['ratio_vs_monai']:>9.2f}"
        )
    print("-" * len(hdr))
    print(
        f"{'total':<12} {result['files']:>5} {n_series:>6} {tot['fedimg_s']:>9.3f} "
        f"{tot['dcm2niix_s']:>10.3f} {tot['monai_s']:>8.3f} {result['ratio_vs_dcm2niix']:>8.1f} "
        f"{result['ratio_vs_monai']:>9.2f}"
    )
    mismatch = [r["dataset"] for r in rows if len(set(r["series"].values())) != 1]
    if mismatch:
        print(f"series counts differ between tools for: {', '.join(mismatch)} (see JSON 'series')")

    print("\nwhere fedimg's time goes (single process, summed over datasets)")
    parts = [
        "header_index",
        "geometry",
        "pixel_read",
        "pixel_decode",
        "nifti_write_gzip",
        "convert_rest",
    ]
    total_parts = sum(stages_total[k] for k in parts)
    for k in parts:
        print(f"  {k:<18} {stages_total[k]:>8.3f} s  {100 * stages_total[k] / total_parts:>5.1f} %")
    print(
        f"  {'(write, no gzip)':<18} {stages_total['nifti_write_raw_for_reference']:>8.3f} s  "
        f"(reference: the same volumes written uncompressed)"
    )
    print(
        "  per dataset: "
        + "; ".join(f"{r['dataset']} " + "/".join(f"{r['fedimg_breakdown_s'][k]:.2f}" for k in parts) for r in rows)
        + "  (index/geometry/read/decode/gzip-write/rest, s)"
    )
    if profile_text:
        print("\ncProfile of one fedimg pass over all datasets (top 15 by own time)")
        print(profile_text)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
