"""The manifest: one row per input file, and the accounting that proves it.

``inputs == converted + refused + skipped`` is checked before any run reports
success; a file that no stage claimed is refused, never dropped.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fedimg.dicom.reasons import Reason
from fedimg.safepath import printable_path

CONVERTED, REFUSED, SKIPPED = "converted", "refused", "skipped"
STATUSES = (CONVERTED, REFUSED, SKIPPED)


@dataclass
class ManifestRow:
    """One input file's fate."""

    input: str
    status: str
    reason: str = ""
    detail: str = ""
    output: str | None = None
    case_id: str | None = None
    role: str | None = None  # "image" or "label" for files that were used
    series_uid: str | None = None
    correction: str | None = None  # an explicit geometric correction applied (e.g. gantry tilt removed)
    review: str | None = None  # a person's recorded decision that overrode a refusal (deid.burned_in_reviewed)
    others_to_background: int | None = None  # label voxels of values outside the classes set to 0 (labels.others)

    def to_json(self) -> dict[str, Any]:
        """Row as written to manifest.jsonl (empty optional fields left out).

        An input name that is not valid UTF-8 is written with its undecodable
        bytes as ``\\xNN`` (:func:`fedimg.safepath.printable_path`).
        """
        row = {k: v for k, v in asdict(self).items() if v not in (None, "") or k in ("input", "status", "reason")}
        row["input"] = printable_path(self.input)
        return row


def mark(
    rows: dict[str, ManifestRow], rels: Iterable[str], status: str, reason: Reason | str, detail: str, **extra: Any
) -> None:
    """Record the same fate for several files."""
    for rel in rels:
        rows[rel] = ManifestRow(rel, status, str(reason), detail, **extra)


def finalize(rows: dict[str, ManifestRow], all_inputs: list[str]) -> list[ManifestRow]:
    """Order rows, refuse unclaimed files, and check the accounting.

    Raises:
        RuntimeError: rows and inputs disagree (a bug: never silently passed).
    """
    for rel in all_inputs:
        if rel not in rows:
            rows[rel] = ManifestRow(rel, REFUSED, Reason.NOT_DICOM.value, "not claimed by any stage")
    extra = set(rows) - set(all_inputs)
    if extra:
        raise RuntimeError(f"manifest accounting failed: {len(extra)} row(s) for files that are not inputs")
    ordered = [rows[k] for k in sorted(rows)]
    counts = Counter(r.status for r in ordered)
    if sum(counts[s] for s in STATUSES) != len(all_inputs):
        raise RuntimeError(f"manifest accounting failed: {len(all_inputs)} inputs vs {sum(counts.values())} rows")
    return ordered


def summarize(rows: Iterable[dict[str, Any] | ManifestRow]) -> dict[str, Any]:
    """Counts by status and by (status, reason), plus converted series/cases."""
    dicts = [r.to_json() if isinstance(r, ManifestRow) else r for r in rows]
    by_status = Counter(r["status"] for r in dicts)
    by_reason = Counter((r["status"], r.get("reason", "")) for r in dicts if r.get("reason"))
    outputs = {r["output"] for r in dicts if r["status"] == CONVERTED and r.get("output")}
    return {
        "inputs": len(dicts),
        "counts": {s: by_status.get(s, 0) for s in STATUSES},
        "reasons": {f"{s}:{reason}": n for (s, reason), n in sorted(by_reason.items())},
        "outputs": len(outputs),
    }


def render_table(summary: dict[str, Any], title: str) -> str:
    """A human-readable account of a manifest."""
    c = summary["counts"]
    lines = [
        f"{title}: {summary['inputs']} input files -> {c[CONVERTED]} converted, {c[REFUSED]} refused, "
        f"{c[SKIPPED]} skipped ({summary['outputs']} output volume(s))"
    ]
    if summary["reasons"]:
        lines.append(f"  {'status':<9} {'reason':<26} {'files':>6}  what to do")
        for key, n in summary["reasons"].items():
            status, reason = key.split(":", 1)
            lines.append(f"  {status:<9} {reason:<26} {n:>6}  {_advice(reason)}")
    return "\n".join(lines)


def _advice(code: str) -> str:
    try:
        return Reason(code).advice
    except ValueError:  # a manifest of another fedimg version
        return ""


def read_manifest(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a ``manifest.jsonl`` (a folder holding one is accepted too)."""
    p = Path(path)
    if p.is_dir():
        p = p / "manifest.jsonl"
    if not p.is_file():
        raise FileNotFoundError(f"no manifest at {p}: expected the DST folder of `fedimg convert` or `preprocess`")
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
