"""Readable results: the cross-site matrix and the federated-vs-baselines comparison.

Everything here works on aggregate numbers only (metrics per model and site);
no image, case or patient detail enters a table, a heatmap or a TensorBoard
event written from it. Pure Python plus matplotlib: no NVFlare import.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedimg.config import ExperimentConfig

FINAL_GLOBAL = "SRV_FL_global_model.pt"
BEST_GLOBAL = "SRV_best_FL_global_model.pt"

_METRIC_WORDS = {
    "dice": "Dice overlap (0-1, higher is better)",
    "hd95": "95% Hausdorff distance (mm, lower is better)",
    "auc": "AUC (0.5 = chance, 1 = perfect)",
    "sensitivity": "sensitivity",
    "specificity": "specificity",
    "balanced_accuracy": "balanced accuracy",
    "accuracy": "accuracy",
}


def describe_metric(name: str) -> str:
    """Words for a metric name, e.g. ``val_dice_lesion`` -> ``Dice overlap (...) — lesion``."""
    core = name[4:] if name.startswith("val_") else name
    for key in sorted(_METRIC_WORDS, key=len, reverse=True):
        if core == key:
            return _METRIC_WORDS[key] + (", mean over classes" if key in ("dice", "auc", "hd95") else "")
        if core.startswith(key + "_"):
            return f"{_METRIC_WORDS[key]}, {core[len(key) + 1 :]}"
    return core


def model_label(name: str) -> str:
    """Readable model names of NVFlare's cross-site results."""
    if name == FINAL_GLOBAL:
        return "final global model"
    if name == BEST_GLOBAL:
        return "best global model"
    return f"{name}'s own model"


def cross_site_matrix(results: Mapping[str, Mapping[str, Mapping[str, float]]], metric: str) -> dict[str, Any]:
    """Rows: models (final global, best global, each site's own); columns: the site whose cases were used.

    Args:
        results: NVFlare's ``cross_val_results.json``: evaluating site -> model -> metrics.
        metric: the metric to tabulate (e.g. ``val_dice``).

    Returns:
        ``{"metric", "sites", "models", "labels", "values": {model: {site: value|None}}, "all": results}``.
    """
    sites = sorted(results)
    names: set[str] = set()
    for per_model in results.values():
        names.update(per_model)
    models = [m for m in (FINAL_GLOBAL, BEST_GLOBAL) if m in names] + sorted(names - {FINAL_GLOBAL, BEST_GLOBAL})
    values = {m: {s: _num(results.get(s, {}).get(m, {}).get(metric)) for s in sites} for m in models}
    return {
        "metric": metric,
        "description": describe_metric(metric),
        "sites": sites,
        "models": models,
        "labels": {m: model_label(m) for m in models},
        "values": values,
        "all": results,
    }


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def matrix_markdown(matrix: Mapping[str, Any]) -> str:
    """The cross-site matrix as a Markdown table (rows: models, columns: validation cases of each site)."""
    sites = matrix["sites"]
    lines = [
        f"**{matrix['description']}** (`{matrix['metric']}`), each model scored on each site's own validation cases",
        "",
        "| model | " + " | ".join(f"{s} cases" for s in sites) + " | mean |",
        "|---|" + "---|" * (len(sites) + 1),
    ]
    for m in matrix["models"]:
        row = [matrix["values"][m][s] for s in sites]
        present = [v for v in row if v is not None]
        mean = sum(present) / len(present) if present else None
        lines.append(f"| {matrix['labels'][m]} | " + " | ".join(_fmt(v) for v in row) + f" | {_fmt(mean)} |")
    return "\n".join(lines)


def evaluation_table(record: Mapping[str, Any], metrics: Sequence[str]) -> str:
    """One model scored at every site (``fedimg fl evaluate``): validation and held-out test, n per cell.

    Args:
        record: the server's final-evaluation record (``global_metrics.jsonl``):
            ``sites`` (site -> ``val_*`` metrics), ``global`` (case-weighted
            means), ``weights``, and ``test`` for sites with held-out cases.
        metrics: the ``val_`` metrics to tabulate, the key metric first.
    """
    sites = sorted(record.get("sites") or {})
    test = record.get("test") or {}
    cols = [(m, describe_metric(m)) for m in metrics]

    def cell(values: Mapping[str, Any], metric: str) -> str:
        v = _num(values.get(metric))
        return _fmt(v)

    def n(values: Mapping[str, Any], key: str) -> str:
        v = _num(values.get(key))
        return "n withheld" if v is None else f"n={int(v)}"

    lines = [
        "**The given model at every site** (no training; n = cases behind each number)",
        "",
        "| site | split | " + " | ".join(f"{words} (`{m}`)" for m, words in cols) + " | cases |",
        "|---|---|" + "---|" * (len(cols) + 1),
    ]
    for site in sites:
        vals = record["sites"][site]
        lines.append(
            f"| {site} | validation | " + " | ".join(cell(vals, m) for m, _ in cols) + f" | {n(vals, 'val_cases')} |"
        )
        tvals = (test.get("sites") or {}).get(site)
        if tvals:
            lines.append(
                f"| {site} | test | "
                + " | ".join(cell(tvals, "test_" + m[4:]) for m, _ in cols)
                + f" | {n(tvals, 'test_cases')} |"
            )

    def total(per_site: Mapping[str, Mapping[str, Any]], key: str) -> str:
        counts = [_num(v.get(key)) for v in per_site.values()]
        known = sum(int(c) for c in counts if c is not None)
        return f"n={known}" + (" + withheld" if any(c is None for c in counts) else "")

    lines.append(
        "| all sites (case-weighted) | validation | "
        + " | ".join(cell(record.get("global") or {}, m) for m, _ in cols)
        + f" | {total(record.get('sites') or {}, 'val_cases')} |"
    )
    if test:
        lines.append(
            "| all sites (case-weighted) | test | "
            + " | ".join(cell(test.get("global") or {}, "test_" + m[4:]) for m, _ in cols)
            + f" | {total(test.get('sites') or {}, 'test_cases')} |"
        )
    return "\n".join(lines)


def heatmap(
    rows: Sequence[str],
    cols: Sequence[str],
    values: Sequence[Sequence[float | None]],
    title: str,
    higher_is_better: bool = True,
) -> np.ndarray:
    """A labelled heatmap of aggregate numbers as an RGB array (H, W, 3, uint8)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arr = np.array([[np.nan if v is None else v for v in row] for row in values], dtype=float)
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(cols), 1.2 + 0.55 * len(rows)), dpi=110)
    cmap = "viridis" if higher_is_better else "viridis_r"
    finite = arr[np.isfinite(arr)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if vmax - vmin < 1e-6:
        vmin, vmax = vmin - 0.05, vmax + 0.05
    im = ax.imshow(np.ma.masked_invalid(arr), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(cols)), labels=list(cols))
    ax.set_yticks(range(len(rows)), labels=list(rows))
    for i in range(arr.shape[0]):
        for j in range(arr.shape[1]):
            text = "–" if not np.isfinite(arr[i, j]) else f"{arr[i, j]:.3f}"
            shade = (arr[i, j] - vmin) / (vmax - vmin) if np.isfinite(arr[i, j]) else 0.0
            dark = shade > 0.55 if higher_is_better else shade < 0.45
            ax.text(j, i, text, ha="center", va="center", color="black" if dark else "white", fontsize=9)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    buf.seek(0)
    from PIL import Image

    return np.asarray(Image.open(buf).convert("RGB"))


def matrix_heatmap(matrix: Mapping[str, Any]) -> np.ndarray:
    """The cross-site matrix as a heatmap picture."""
    rows = [matrix["labels"][m] for m in matrix["models"]]
    cols = [f"{s} cases" for s in matrix["sites"]]
    values = [[matrix["values"][m][s] for s in matrix["sites"]] for m in matrix["models"]]
    lower = matrix["metric"].startswith("val_hd95")
    return heatmap(rows, cols, values, matrix["description"], higher_is_better=not lower)


def comparison_table(comparison: Mapping[str, Any]) -> str:
    """The federated-vs-baselines comparison as Markdown (rows: methods, columns: sites and their mean)."""
    sites = comparison["sites"]
    split = comparison.get("split", "validation")
    cases = comparison.get("cases") or {}
    what = (
        "held-out test cases (never trained on, never used to choose a model)"
        if split == "test"
        else "validation cases"
    )
    fold = comparison.get("fold")
    lines = [
        f"**{comparison['description']}** (`{comparison['metric']}`) on each site's {what}"
        + (f", fold {fold} validating" if fold is not None and split != "test" else "")
        + f", {comparison['epochs']} epochs of local training per site in every method; n = cases behind "
        "each number",
        "",
        "| method | "
        + " | ".join(f"{s} (n={cases[s]})" if s in cases else s for s in sites)
        + (f" | mean over sites (n={comparison.get('cases_total')}) |" if cases else " | mean over sites |"),
        "|---|" + "---|" * (len(sites) + 1),
    ]
    for method in comparison["methods"]:
        row = comparison["per_site"][method]
        lines.append(
            f"| {comparison['labels'][method]} | "
            + " | ".join(_fmt(row.get(s)) for s in sites)
            + f" | {_fmt(comparison['mean'][method])} |"
        )
    return "\n".join(lines)


def comparison_heatmap(comparison: Mapping[str, Any]) -> np.ndarray:
    """The comparison as a heatmap picture (methods x sites, plus the mean)."""
    sites = comparison["sites"]
    rows = [comparison["labels"][m] for m in comparison["methods"]]
    values = [
        [comparison["per_site"][m].get(s) for s in sites] + [comparison["mean"][m]] for m in comparison["methods"]
    ]
    return heatmap(
        rows,
        [*sites, "mean"],
        values,
        comparison["description"],
        higher_is_better=not comparison["metric"].startswith("val_hd95"),
    )


def write_report_to_tensorboard(logdir: str, name: str, markdown: str, picture: np.ndarray, step: int = 0) -> None:
    """Write a table (as text) and its heatmap (as an image) into a TensorBoard run.

    Args:
        logdir: the run's folder, e.g. ``<server>/tb_events/global``.
        name: tag prefix, e.g. ``cross_site`` or ``comparison``.
        markdown: the table; TensorBoard's Text tab renders Markdown.
        picture: RGB array (H, W, 3) of aggregate numbers only.
    """
    from fedimg.training.tracking import local_writer

    writer = local_writer(logdir)
    try:
        writer.add_text(f"{name}/table", markdown, step)
        writer.add_image(f"{name}/heatmap", picture, step, dataformats="HWC")
    finally:
        writer.close()


def report_metrics(exp: ExperimentConfig) -> list[str]:
    """Metrics tabulated in the cross-site and evaluation reports: the key metric, then one per class."""
    key = exp.key_metric
    base = "val_dice" if exp.task.is_segmentation else "val_auc"
    per_class = [f"{base}_{c}" for c in exp.task.class_names]
    if not exp.task.is_segmentation and len(exp.task.class_names) == 2:
        per_class = []  # both one-vs-rest AUCs equal the AUC
    extra = [f"val_hd95_{c}" for c in exp.task.class_names] if exp.task.is_segmentation else ["val_balanced_accuracy"]
    return list(dict.fromkeys([key, base, *per_class, *extra]))
