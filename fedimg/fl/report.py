"""Readable results: the cross-site matrix and the federated-vs-baselines comparison.

Everything here works on aggregate numbers only (metrics per model and site);
no image, case or patient detail enters a table, a heatmap or a TensorBoard
event written from it. Pure Python plus matplotlib: no NVFlare import.

Every cell of a table reads ``0.912 (0.87–0.95), n=6``: the metric, its 95%
bootstrap interval over the site's cases (computed at the site from its
per-case scores, :mod:`fedimg.tasks.intervals`; absent when the site has
fewer than ``privacy.min_cohort`` cases) and the number of cases behind it
(``n withheld`` for such a small site). An HD95 at or below the voxel size
reads ``≤ voxel size (1.5 mm)``: HD95 cannot resolve outlines closer than one
voxel. Heatmaps of measures in [0, 1] (Dice, AUC, sensitivity, ...) colour
the whole range 0–1, and HD95 from 0 mm, so a small difference does not look
like a failure.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedimg.config import ExperimentConfig
from fedimg.tasks.intervals import interval_keys

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
        ``{"metric", "sites", "models", "labels", "values": {model: {site: value|None}},
        "cells": {model: {site: cell}}, "all": results}``; a cell is :func:`metric_cell`'s.
    """
    sites = sorted(results)
    names: set[str] = set()
    for per_model in results.values():
        names.update(per_model)
    models = [m for m in (FINAL_GLOBAL, BEST_GLOBAL) if m in names] + sorted(names - {FINAL_GLOBAL, BEST_GLOBAL})
    values = {m: {s: _num(results.get(s, {}).get(m, {}).get(metric)) for s in sites} for m in models}
    cells = {m: {s: metric_cell(results.get(s, {}).get(m, {}), metric) for s in sites} for m in models}
    return {
        "metric": metric,
        "description": describe_metric(metric),
        "sites": sites,
        "models": models,
        "labels": {m: model_label(m) for m in models},
        "values": values,
        "cells": cells,
        "all": results,
    }


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _split_prefix(metric: str) -> tuple[str, str]:
    """``("val_", "dice")`` for ``val_dice``; ``("", name)`` for a name without a split prefix."""
    for prefix in ("val_", "test_"):
        if metric.startswith(prefix):
            return prefix, metric[len(prefix) :]
    return "", metric


def is_unit_interval(metric: str) -> bool:
    """Whether the metric is a measure in [0, 1] (Dice, AUC, sensitivity, specificity, accuracies)."""
    core = _split_prefix(metric)[1]
    return core.startswith(("dice", "auc", "sensitivity", "specificity", "balanced_accuracy", "accuracy"))


def is_hd95(metric: str) -> bool:
    """Whether the metric is a 95% Hausdorff distance (in mm; lower is better)."""
    core = _split_prefix(metric)[1]
    return core.startswith("hd95") and not core.startswith("hd95_undefined")


def metric_cell(metrics: Mapping[str, Any] | None, metric: str, n: int | None = None) -> dict[str, Any]:
    """One table cell from one site's flat metrics: the value, its interval, the cases and the voxel size.

    Only names the table asks for are read, and every number is checked
    (finite; an interval only if low <= high): the metrics come from a site.

    Args:
        metrics: one site's metrics for one model (``val_*`` or ``test_*``).
        metric: the metric of the table, e.g. ``val_dice_lesion``.
        n: the cases scored when the caller knows them; otherwise the site's
            ``val_cases``/``test_cases`` (None: withheld by a small site). For a class's HD95,
            less the cases where it is undefined (``hd95_undefined_<class>``).

    Returns:
        ``{"value", "ci": [low, high] | None, "n", "voxel_mm"}``.
    """
    metrics = metrics or {}
    prefix = _split_prefix(metric)[0] or "val_"
    low_key, high_key = interval_keys(metric)
    low, high = _num(metrics.get(low_key)), _num(metrics.get(high_key))
    cases = _num(metrics.get(prefix + "cases")) if n is None else float(n)
    if cases is not None and is_hd95(metric):
        # A class's HD95 is a mean over the cases where it is defined: not those where only one side is empty.
        core = _split_prefix(metric)[1]
        undefined = _num(metrics.get(prefix + "hd95_undefined" + core[len("hd95") :])) if core != "hd95" else None
        cases = cases - undefined if undefined is not None and 0 <= undefined <= cases else cases
    voxel = _num(metrics.get(prefix + "voxel_mm"))
    return {
        "value": _num(metrics.get(metric)),
        "ci": [low, high] if low is not None and high is not None and low <= high else None,
        "n": int(cases) if cases is not None and cases >= 0 else None,
        "voxel_mm": voxel if voxel is not None and voxel > 0 else None,
    }


def at_voxel_size(cell: Mapping[str, Any], metric: str) -> bool:
    """Whether an HD95 cell is at or below the voxel size (the smallest distance HD95 can tell from 0)."""
    value, voxel = cell.get("value"), cell.get("voxel_mm")
    return is_hd95(metric) and value is not None and voxel is not None and value <= voxel * (1 + 1e-6)


def format_cell(cell: Mapping[str, Any], metric: str, with_n: bool = True) -> str:
    """``0.912 (0.87–0.95), n=6``; ``≤ voxel size (1.5 mm), n=6`` for an HD95 within one voxel; ``–`` for none.

    Args:
        cell: from :func:`metric_cell`.
        metric: the cell's metric name (HD95 cells are compared with the voxel size).
        with_n: append the number of cases (``n withheld`` when the site kept it).
    """
    value = cell.get("value")
    if value is None:
        return "–"
    if at_voxel_size(cell, metric):
        text = f"≤ voxel size ({cell['voxel_mm']:g} mm)"
    else:
        text = _fmt(value)
        if cell.get("ci"):
            low, high = cell["ci"]
            text += f" ({low:.2f}–{high:.2f})"
    if with_n:
        text += ", n withheld" if cell.get("n") is None else f", n={cell['n']}"
    return text


def _mean_cell(cells: Sequence[Mapping[str, Any]], metric: str) -> str:
    """The unweighted mean over sites, with the cases behind it (no interval: per-case values stay at the sites)."""
    present = [c for c in cells if c.get("value") is not None]
    if not present:
        return "–"
    mean = sum(c["value"] for c in present) / len(present)
    known = sum(c["n"] for c in present if c.get("n") is not None)
    withheld = any(c.get("n") is None for c in present)
    text = f"{mean:.3f}"
    if all(at_voxel_size(c, metric) for c in present):
        text = f"≤ voxel size ({max(c['voxel_mm'] for c in present):g} mm)"
    if withheld and not known:
        return f"{text}, n withheld"
    return f"{text}, n={known}" + (" + withheld" if withheld else "")


def matrix_markdown(matrix: Mapping[str, Any]) -> str:
    """The cross-site matrix as a Markdown table (rows: models, columns: validation cases of each site)."""
    sites = matrix["sites"]
    metric = matrix["metric"]
    cells = matrix.get("cells") or {
        m: {s: {"value": matrix["values"][m][s], "ci": None, "n": None} for s in sites} for m in matrix["models"]
    }
    lines = [
        f"**{matrix['description']}** (`{metric}`), each model scored on each site's own validation cases; "
        "each cell: the value, its 95% bootstrap interval over the site's cases (computed at the site) "
        "and n = the cases behind it; *n withheld*: the site has fewer than `privacy.min_cohort` validation "
        "cases and keeps their number and the interval to itself",
        "",
        "| model | " + " | ".join(f"{s} cases" for s in sites) + " | mean over sites |",
        "|---|" + "---|" * (len(sites) + 1),
    ]
    for m in matrix["models"]:
        row = [cells[m][s] for s in sites]
        lines.append(
            f"| {matrix['labels'][m]} | "
            + " | ".join(format_cell(c, metric) for c in row)
            + f" | {_mean_cell(row, metric)} |"
        )
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
        return format_cell(metric_cell(values, metric), metric, with_n=False)

    def n(values: Mapping[str, Any], key: str) -> str:
        v = _num(values.get(key))
        return "n withheld" if v is None else f"n={int(v)}"

    lines = [
        "**The given model at every site** (no training; n = cases behind each number; in brackets the 95% "
        "bootstrap interval over the site's cases)",
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


def colour_range(metric: str, values: Sequence[Sequence[float | None]]) -> tuple[float, float]:
    """The heatmap's colour range: 0–1 for measures in [0, 1], 0 to the largest value for HD95, else the data's.

    A fixed 0–1 scale keeps 0.88 looking like the good score it is; a range
    stretched over the values (0.88–0.98) would paint it as a failure.
    """
    finite = [float(v) for row in values for v in row if v is not None and math.isfinite(v)]
    if is_unit_interval(metric):
        return 0.0, 1.0
    if is_hd95(metric):
        return 0.0, max([*finite, 1.0])
    vmin, vmax = (min(finite), max(finite)) if finite else (0.0, 1.0)
    if vmax - vmin < 1e-6:
        vmin, vmax = vmin - 0.05, vmax + 0.05
    return vmin, vmax


def heatmap(
    rows: Sequence[str],
    cols: Sequence[str],
    values: Sequence[Sequence[float | None]],
    title: str,
    higher_is_better: bool = True,
    vrange: tuple[float, float] | None = None,
    notes: Sequence[Sequence[str]] | None = None,
) -> np.ndarray:
    """A labelled heatmap of aggregate numbers as an RGB array (H, W, 3, uint8).

    Args:
        vrange: the colour range (default: the values' own range); see :func:`colour_range`.
        notes: a second, smaller line per cell (e.g. the interval and n).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arr = np.array([[np.nan if v is None else v for v in row] for row in values], dtype=float)
    fig, ax = plt.subplots(
        figsize=(1.6 + (2.0 if notes else 1.5) * len(cols), 1.2 + (0.75 if notes else 0.55) * len(rows)), dpi=110
    )
    cmap = "viridis" if higher_is_better else "viridis_r"
    vmin, vmax = vrange if vrange is not None else colour_range("", values)
    im = ax.imshow(np.ma.masked_invalid(arr), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(cols)), labels=list(cols))
    ax.set_yticks(range(len(rows)), labels=list(rows))
    for i in range(arr.shape[0]):
        for j in range(arr.shape[1]):
            text = "–" if not np.isfinite(arr[i, j]) else f"{arr[i, j]:.3f}"
            shade = (arr[i, j] - vmin) / (vmax - vmin) if np.isfinite(arr[i, j]) else 0.0
            dark = shade > 0.55 if higher_is_better else shade < 0.45
            colour = "black" if dark else "white"
            note = notes[i][j] if notes else ""
            ax.text(j, i - (0.12 if note else 0.0), text, ha="center", va="center", color=colour, fontsize=9)
            if note:
                ax.text(j, i + 0.2, note, ha="center", va="center", color=colour, fontsize=6.5)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    buf.seek(0)
    from PIL import Image

    return np.asarray(Image.open(buf).convert("RGB"))


def _note(cell: Mapping[str, Any], metric: str, with_n: bool = True) -> str:
    """The heatmap's second line of a cell: the interval and n (or the voxel-size remark)."""
    if cell.get("value") is None:
        return ""
    parts = []
    if at_voxel_size(cell, metric):
        parts.append(f"≤ voxel ({cell['voxel_mm']:g} mm)")
    elif cell.get("ci"):
        parts.append(f"({cell['ci'][0]:.2f}–{cell['ci'][1]:.2f})")
    if with_n:
        parts.append("n withheld" if cell.get("n") is None else f"n={cell['n']}")
    return " ".join(parts)


def matrix_heatmap(matrix: Mapping[str, Any]) -> np.ndarray:
    """The cross-site matrix as a heatmap picture (colours 0–1 for measures in [0, 1], from 0 for HD95)."""
    rows = [matrix["labels"][m] for m in matrix["models"]]
    cols = [f"{s} cases" for s in matrix["sites"]]
    values = [[matrix["values"][m][s] for s in matrix["sites"]] for m in matrix["models"]]
    metric = matrix["metric"]
    cells = matrix.get("cells")
    notes = [[_note(cells[m][s], metric) for s in matrix["sites"]] for m in matrix["models"]] if cells else None
    return heatmap(
        rows,
        cols,
        values,
        matrix["description"],
        higher_is_better=not is_hd95(metric),
        vrange=colour_range(metric, values),
        notes=notes,
    )


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
    metric = comparison["metric"]
    for method in comparison["methods"]:
        row = [comparison_cell(comparison, method, s) for s in sites]
        mean = comparison["mean"][method]
        total = comparison.get("cases_total")
        mean_text = _fmt(mean) + (f", n={total}" if mean is not None and cases else "")
        lines.append(
            f"| {comparison['labels'][method]} | "
            + " | ".join(format_cell(c, metric, with_n=bool(cases)) for c in row)
            + f" | {mean_text} |"
        )
    lines += [
        "",
        "In brackets: the 95% bootstrap interval over the site's cases; the mean over sites has none "
        "(per-case scores stay at the sites).",
    ]
    return "\n".join(lines)


def comparison_cell(comparison: Mapping[str, Any], method: str, site: str) -> dict[str, Any]:
    """One cell of the comparison, as :func:`metric_cell` returns it."""
    intervals = (comparison.get("intervals") or {}).get(method) or {}
    ci = intervals.get(site)
    return {
        "value": _num(comparison["per_site"][method].get(site)),
        "ci": list(ci) if ci else None,
        "n": (comparison.get("cases") or {}).get(site),
        "voxel_mm": (comparison.get("voxel_mm") or {}).get(site),
    }


def comparison_heatmap(comparison: Mapping[str, Any]) -> np.ndarray:
    """The comparison as a heatmap picture (methods x sites, plus the mean)."""
    sites = comparison["sites"]
    metric = comparison["metric"]
    rows = [comparison["labels"][m] for m in comparison["methods"]]
    values = [
        [comparison["per_site"][m].get(s) for s in sites] + [comparison["mean"][m]] for m in comparison["methods"]
    ]
    with_n = bool(comparison.get("cases"))
    notes = [
        [_note(comparison_cell(comparison, m, s), metric, with_n) for s in sites] + [""] for m in comparison["methods"]
    ]
    return heatmap(
        rows,
        [*sites, "mean"],
        values,
        comparison["description"],
        higher_is_better=not is_hd95(metric),
        vrange=colour_range(metric, values),
        notes=notes,
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
