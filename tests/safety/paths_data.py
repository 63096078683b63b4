"""Small synthetic CT sites for the path-safety tests (issue 12)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from fedimg import config as cfg

REPO = Path(__file__).resolve().parents[2]
CT_SPEC = REPO / "configs" / "preprocessing" / "ct_phantom.yaml"


def fast_spec() -> cfg.PreprocessSpec:
    """The CT spec at 6 mm: tiny outputs, same checks."""
    return dataclasses.replace(cfg.load(cfg.PreprocessSpec, CT_SPEC), target_spacing=(6.0, 6.0, 6.0))


def synth_site(out: Path, n_cases: int, seed: int) -> tuple[Path, list[Any]]:
    """One synthetic CT site with NIfTI labels; returns its folder and its cases' ground truth."""
    from fedimg.synth import generate

    res = generate(out, n_sites=1, n_cases=n_cases, seed=seed, progress=False)
    (site,) = res.sites
    return out / site, res.sites[site]


def rel_in_site(path_in_truth: str) -> str:
    """A ground-truth path (``site-1/...``) relative to the site folder."""
    return path_in_truth.split("/", 1)[1]


def manifest_rows(dst: Path) -> list[dict[str, Any]]:
    """Rows of DST/manifest.jsonl, decoded as strict UTF-8."""
    return [json.loads(line) for line in (dst / "manifest.jsonl").read_bytes().decode("utf-8").splitlines()]
