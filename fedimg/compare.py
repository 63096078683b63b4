"""``fedimg compare``: the federated experiment and both baselines on the same loops and splits.

1. the federated run in NVFlare's simulator (``fed.algorithm`` of the config);
2. local-only training at each site, as many epochs as a site trains in the federation;
3. centralized training on the pooled training cases, as many epochs.

Every model is scored on every site's own validation cases with the same
evaluation code; every cell says how many cases stand behind it. Sites with
a held-out ``test`` split (``split.test_fraction``) get a second table: every
model (the federated final and best models included) scored on those cases,
which no method trained on or chose a model by. With cross-validation
datalists, ``data.fold`` (``--fold``) picks the validating fold. The
comparison (JSON and Markdown, per site and the mean over sites) is written
to ``OUT/comparison.{json,md}`` and, as a table and a heatmap, into the
federation's TensorBoard run (``global``).

Pooling the data is a simulation-time baseline only: it needs every site's
data on one machine, which is exactly what a real federation avoids.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from fedimg import config as cfgmod
from fedimg.atomic import write_json
from fedimg.config import ExperimentConfig
from fedimg.resources import job_dir

logger = logging.getLogger(__name__)

JOB_DIR = job_dir()

METHOD_LABELS = {
    "federated": "federated, final global model",
    "federated_best": "federated, best global model",
    "local": "local only (each site's own model)",
    "centralized": "centralized (all sites' cases pooled)",
}


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def build_comparison(
    exp: ExperimentConfig,
    sites: list[str],
    federated: dict[str, dict[str, float]],
    federated_best: dict[str, dict[str, float]] | None,
    local: dict[str, dict[str, dict[str, float]]],
    centralized: dict[str, dict[str, float]],
    epochs: int,
    metric: str | None = None,
    cases: dict[str, int] | None = None,
    split: str = "validation",
) -> dict[str, Any]:
    """The comparison table's data.

    Besides each cell's value: its 95% bootstrap interval when the metrics
    carry one (``intervals``: method -> site -> ``[low, high]``; the
    federated model's come from the sites' cross-site evaluation, the
    baselines' from the same evaluation code) and each site's voxel size
    (``voxel_mm``), which tells an HD95 at the scan's resolution.

    Args:
        federated: site -> FL metrics (``val_*``) of the final global model on that site's cases.
        federated_best: the same for the best global model (None if not available).
        local: site whose model -> evaluated site -> FL metrics (local-only baselines).
        centralized: site -> FL metrics of the pooled model.
        epochs: local epochs per site in every method.
        metric: the metric to tabulate (default: the key metric).
        cases: site -> cases behind each of its numbers.
        split: the cases scored: ``validation`` or ``test``.
    """
    from fedimg.fl.report import describe_metric, metric_cell

    metric = metric or exp.key_metric
    sources: dict[str, dict[str, dict[str, float]]] = {
        "federated": {s: federated.get(s, {}) for s in sites},
        "local": {s: local.get(s, {}).get(s, {}) for s in sites},
        "centralized": {s: centralized.get(s, {}) for s in sites},
    }
    methods = ["federated", "local", "centralized"]
    if federated_best is not None:
        sources["federated_best"] = {s: federated_best.get(s, {}) for s in sites}
        methods.insert(1, "federated_best")
    cells = {m: {s: metric_cell(sources[m][s], metric) for s in sites} for m in methods}
    per_site: dict[str, dict[str, float | None]] = {m: {s: sources[m][s].get(metric) for s in sites} for m in methods}
    voxels = {s: [cells[m][s]["voxel_mm"] for m in methods if cells[m][s]["voxel_mm"] is not None] for s in sites}
    mean = {m: _mean(list(per_site[m].values())) for m in methods}
    ratio = (mean["federated"] / mean["centralized"]) if mean["federated"] is not None and mean["centralized"] else None
    return {
        "metric": metric,
        "description": describe_metric(metric),
        "sites": sites,
        "methods": methods,
        "labels": {m: METHOD_LABELS[m] for m in methods},
        "per_site": per_site,
        "intervals": {m: {s: cells[m][s]["ci"] for s in sites} for m in methods},
        "voxel_mm": {s: min(v) for s, v in voxels.items() if v},
        "mean": mean,
        "federated_over_centralized": ratio,
        "federated_minus_local_mean": (mean["federated"] - mean["local"])
        if mean["federated"] is not None and mean["local"] is not None
        else None,
        "epochs": epochs,
        "split": split,
        "fold": exp.data.fold,
        "cases": dict(cases or {}),
        "cases_total": sum((cases or {}).values()),
        "local_cross_site": local,
    }


def run_comparison(
    exp: ExperimentConfig,
    site_configs: dict[str, str],
    out: str | Path,
    progress: bool = True,
    device: str | None = None,
) -> dict[str, Any]:
    """Run the federated experiment, local-only and centralized training; write the comparison.

    Args:
        exp: the experiment (its ``fed`` section drives the federated run).
        site_configs: site name -> site YAML.
        out: output folder (``federated/``, ``baselines/``, ``comparison.{json,md}``).
        device: override the sites' device for the baselines (default: the first site's).

    Returns:
        the comparison (also in ``OUT/comparison.json``).
    """
    from fedimg import runtime
    from fedimg.fl.report import comparison_heatmap, comparison_table, write_report_to_tensorboard
    from fedimg.fl.simulate import run_simulation
    from fedimg.tasks import metric_names
    from fedimg.training.baselines import centralized, federated_epochs, local_only, read_site_data, score_model

    sites = [cfgmod.validate_site_name(s) for s in site_configs]  # each names folders under OUT
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfgmod.save(exp, out / "experiment.yaml")
    site_cfgs = {s: cfgmod.load_site_config(p) for s, p in site_configs.items()}
    datalists = {s: c.datalist for s, c in site_cfgs.items()}
    times: dict[str, float] = {}

    t0 = time.perf_counter()
    sim = run_simulation(exp, JOB_DIR, site_configs, out / "federated")
    times["federated"] = time.perf_counter() - t0
    if exp.fed.cross_site_eval:
        fed = {s: sim.cross_site_results[s]["SRV_FL_global_model.pt"] for s in sites}
        fed_best = {s: sim.cross_site_results[s]["SRV_best_FL_global_model.pt"] for s in sites}
    else:
        final = sim.final_eval() or {"sites": {}}
        fed, fed_best = final["sites"], None

    first = site_cfgs[sites[0]]
    rt = runtime.setup(device or first.device, exp.train.amp, 0, seed=exp.train.seed)
    site_data = read_site_data(exp, datalists)
    epochs = federated_epochs(exp)
    t0 = time.perf_counter()
    loc = local_only(exp, datalists, rt, out / "baselines", epochs=epochs, progress=progress)
    times["local_only"] = time.perf_counter() - t0
    runtime.set_seed(exp.train.seed)
    t0 = time.perf_counter()
    cen = centralized(exp, datalists, rt, out / "baselines", epochs=epochs, progress=progress)
    times["centralized"] = time.perf_counter() - t0

    local = {s: {e: metric_names(m) for e, m in r.per_site.items()} for s, r in loc.items()}
    comparison = build_comparison(
        exp,
        sites,
        fed,
        fed_best,
        local,
        {s: metric_names(m) for s, m in cen.per_site.items()},
        epochs,
        cases={s: len(site_data[s].validation) for s in sites},
    )
    test_sets = {s: site_data[s].test for s in sites if site_data[s].test}
    if test_sets:
        # Held-out cases: every model scored once with the same code, reported apart from validation.
        fed_test = score_model(exp, sim.global_model, test_sets, rt)
        best_test = score_model(exp, sim.best_model, test_sets, rt) if sim.best_model.is_file() else None
        comparison["test"] = build_comparison(
            exp,
            sites,
            {s: metric_names(m) for s, m in fed_test.items()},
            {s: metric_names(m) for s, m in best_test.items()} if best_test is not None else None,
            {s: {e: metric_names(m) for e, m in r.per_site_test.items()} for s, r in loc.items()},
            {s: metric_names(m) for s, m in cen.per_site_test.items()},
            epochs,
            cases={s: len(items) for s, items in test_sets.items()},
            split="test",
        )
    comparison["seconds"] = times
    comparison["federated_run"] = str(sim.job_dir)
    write_json(out / "comparison.json", comparison)
    table = comparison_table(comparison)
    if "test" in comparison:
        table += "\n\n" + comparison_table(comparison["test"])
    (out / "comparison.md").write_text(
        "# Federated vs. local-only vs. centralized\n\n" + table + "\n", encoding="utf-8"
    )
    write_report_to_tensorboard(str(sim.tb_logdir / "global"), "comparison", table, comparison_heatmap(comparison))
    logger.info("comparison written to %s", out / "comparison.md")
    return comparison


def print_comparison(comparison: dict[str, Any]) -> None:
    """The comparison table on the console."""
    from fedimg.fl.report import comparison_table

    print(comparison_table(comparison))
    if "test" in comparison:
        print()
        print(comparison_table(comparison["test"]))
    r = comparison.get("federated_over_centralized")
    if r is not None:
        print(f"\nfederated / centralized (mean over sites): {r:.3f}")
    d = comparison.get("federated_minus_local_mean")
    if d is not None:
        print(f"federated - local only (mean over sites): {d:+.3f}")


__all__ = ["build_comparison", "print_comparison", "run_comparison"]
