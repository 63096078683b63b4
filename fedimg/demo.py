"""``fedimg demo``: the whole path on one machine, from synthetic DICOM to TensorBoard.

synth N sites -> preprocess each site into its own folder (own manifest) ->
FedAvg in the NVFlare simulator -> per-site table, ``summary.json``.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedimg import config as cfgmod
from fedimg.atomic import write_json
from fedimg.preprocess.outdir import claim
from fedimg.resources import config_path, job_dir

if TYPE_CHECKING:  # imported where used, when a demo runs: the simulator pulls in NVFlare
    from fedimg.fl.simulate import SimulationResult
    from fedimg.preprocess.pipeline import PreprocessResult

logger = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = config_path("experiments", "seg_demo.yaml")
DEFAULT_SPEC = config_path("preprocessing", "ct_phantom.yaml")
JOB_DIR = job_dir()
#: What a demo writes into its output folder; a re-run replaces exactly these.
DEMO_ENTRIES = ("raw", "sites", "nvflare", "experiment.yaml", "summary.json")


def _print(msg: str = "") -> None:
    print(msg, flush=True)


def run_demo(
    out: Path,
    sites: int = 3,
    cases: int = 8,
    seed: int = 0,
    rounds: int | None = None,
    device: cfgmod.DeviceName = "auto",
    config: str | None = None,
    progress: bool = True,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Run the demo end to end and return the summary (also written to ``out/summary.json``).

    ``out`` must be new, empty, or an earlier demo's output (it carries
    fedimg's ``demo`` marker, :mod:`fedimg.preprocess.outdir`). Re-running
    into it regenerates the demo: the entries a demo writes
    (:data:`DEMO_ENTRIES`, all synthetic) are replaced; anything else in the
    folder is left alone.
    """
    from fedimg.runtime import select_device

    select_device(device)  # fail fast on --device cuda without a GPU
    exp_path = Path(config) if config else DEFAULT_EXPERIMENT
    ov = list(overrides or [])
    if rounds is not None:
        ov.append(f"fed.num_rounds={rounds}")
    exp = cfgmod.load(cfgmod.ExperimentConfig, exp_path, ov)
    spec = cfgmod.load(cfgmod.PreprocessSpec, DEFAULT_SPEC)
    out = out.resolve()
    with claim(out, "demo", what="--out") as _lock:
        for name in DEMO_ENTRIES:  # an earlier demo's synthetic outputs; nothing else is touched
            entry = out / name
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            elif entry.exists() or entry.is_symlink():
                entry.unlink()
        return _run_demo(out, exp, spec, sites, cases, seed, device, progress)


def _run_demo(
    out: Path,
    exp: cfgmod.ExperimentConfig,
    spec: cfgmod.PreprocessSpec,
    sites: int,
    cases: int,
    seed: int,
    device: cfgmod.DeviceName,
    progress: bool,
) -> dict[str, Any]:
    from fedimg.fl.simulate import run_simulation
    from fedimg.synth import generate

    t0 = time.perf_counter()

    _print(f"[1/3] synthesizing {sites} sites x ~{cases} CT studies (seed {seed})")
    raw = out / "raw"
    synth = generate(raw, n_sites=sites, n_cases=cases, seed=seed, progress=progress)

    _print("[2/3] preprocessing each site on its own (DICOM -> normalized NIfTI)")
    site_cfgs, pre = _preprocess_sites(out, synth.sites, spec, device, progress)

    _print(
        f"[3/3] federated training: FedAvg, {exp.fed.num_rounds} rounds x {exp.train.local_epochs} local "
        f"epoch(s), {len(site_cfgs)} sites in the NVFlare simulator"
    )
    cfgmod.save(exp, out / "experiment.yaml")
    sim = run_simulation(exp, JOB_DIR, site_cfgs, out / "nvflare")

    rows = _site_rows(pre, sim)
    summary = {
        "sites": rows,
        "best_model": str(sim.best_model),
        "global_model": str(sim.global_model),
        "tensorboard_logdir": str(sim.tb_logdir),
        "cross_site": str(sim.cross_site),
        "rounds": exp.fed.num_rounds,
        "federated_seconds": round(sim.seconds, 1),
        "total_seconds": round(time.perf_counter() - t0, 1),
    }
    write_json(out / "summary.json", summary)
    _print_results(out, exp, sim, summary)
    return summary


def _preprocess_sites(
    out: Path, sites: Collection[str], spec: cfgmod.PreprocessSpec, device: cfgmod.DeviceName, progress: bool
) -> tuple[dict[str, str], dict[str, PreprocessResult]]:
    """Preprocess each synthetic site on its own, with its own secret, and write its site config.

    Args:
        out: the demo's output folder (raw DICOM under ``raw/<site>``, results under ``sites/<site>``).
        sites: the synthetic sites' names.
        spec: the preprocessing spec.
        device: the device each site trains on.
        progress: show progress bars.

    Returns:
        The path of each site's ``site.yaml`` and each site's preprocessing result, by site.
    """
    from fedimg.dicom.deid import Pseudonymizer, SiteSecret
    from fedimg.preprocess.pipeline import preprocess
    from fedimg.runtime import default_threads

    site_cfgs: dict[str, str] = {}
    pre: dict[str, PreprocessResult] = {}
    threads = default_threads(len(sites))
    for site in sites:
        site_dir = out / "sites" / cfgmod.validate_site_name(site)  # a folder name
        # Each site has its own secret: case ids and manifest entries are keyed pseudonyms.
        site_dir.mkdir(parents=True, exist_ok=True)
        secret = SiteSecret.generate(site_dir / "site.secret")
        res = preprocess(
            out / "raw" / site,
            site_dir / "preprocessed",
            spec,
            site=site,
            progress=progress,
            pseudonymizer=Pseudonymizer(secret),
        )
        _print(res.table())
        pre[site] = res
        site_cfg = cfgmod.SiteConfig(
            name=site,
            datalist="preprocessed/datalist.json",
            device=device,
            num_threads=threads,
            local_logdir="tb_local",
        )
        cfgmod.save(site_cfg, site_dir / "site.yaml")
        site_cfgs[site] = str(site_dir / "site.yaml")
    return site_cfgs, pre


def _site_rows(pre: dict[str, PreprocessResult], sim: SimulationResult) -> dict[str, dict[str, Any]]:
    """The summary's row per site: its case counts, the final global model's Dice on it, its manifest.

    Args:
        pre: each site's preprocessing result.
        sim: the federated run's result.

    Returns:
        The rows by site.
    """
    rows = {}
    for site, res in pre.items():
        dice = sim.final_dice(site)
        rows[site] = {
            "cases": len(res.cases),
            "train_cases": sum(c.split == "training" for c in res.cases),
            "val_cases": sum(c.split == "validation" for c in res.cases),
            "val_dice": dice,
            "val_dice_per_class": {
                k[len("val_dice_") :]: v
                for k, v in sim.cross_site_results.get(site, {}).get("SRV_FL_global_model.pt", {}).items()
                if k.startswith("val_dice_")
            },
            "manifest": res.manifest,
        }
    return rows


def _print_results(out: Path, exp: cfgmod.ExperimentConfig, sim: SimulationResult, summary: dict[str, Any]) -> None:
    """Print the per-site Dice table and where the models, results and TensorBoard logs are.

    Args:
        out: the demo's output folder.
        exp: the experiment (its class names head the table).
        sim: the federated run's result.
        summary: the summary written to ``summary.json`` (its ``sites`` rows and ``total_seconds``).
    """
    _print()
    _print(
        "Final global model, Dice on each site's validation cases (mean over " + ", ".join(exp.task.class_names) + "):"
    )
    _print(f"{'site':<10} {'cases':>5} {'val':>4} {'Dice':>7}  " + "  ".join(f"{c:>7}" for c in exp.task.class_names))
    for site, row in summary["sites"].items():
        per = row["val_dice_per_class"]
        d = row["val_dice"]
        _print(
            f"{site:<10} {row['cases']:>5} {row['val_cases']:>4} {d if d is None else f'{d:.3f}':>7}  "
            + "  ".join(f"{per.get(c, float('nan')):>7.3f}" for c in exp.task.class_names)
        )
    _print()
    _print(f"best model:        {sim.best_model}")
    _print(f"final model:       {sim.global_model}")
    _print(f"cross-site result: {sim.cross_site}")
    _print(f"TensorBoard:       tensorboard --logdir {sim.tb_logdir}")
    _print(f"summary:           {out / 'summary.json'}  ({summary['total_seconds']:.0f} s in all)")
