"""Issue 15: behaviour fixed where mypy pointed at a value that could reach a call it breaks.

A DICOM mask series for a resampled (irregular) image is matched slice by slice on
(0020,0032) Image Position (Patient). A mask slice without that attribute made the
comparison sort ``None`` against tuples (``TypeError``) and stop the whole run; it
is now refused as LABEL_GEOMETRY_MISMATCH like any mask off the image's positions.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pydicom

from fedimg.preprocess.pipeline import preprocess
from tests.conftest import slice_gap_export


def _manifest(dst: Path) -> dict[str, dict]:
    rows = [json.loads(line) for line in (dst / "manifest.jsonl").read_text().splitlines() if line.strip()]
    return {r["input"]: r for r in rows}


def test_mask_slice_without_position_is_refused_not_a_crash(small_synth, ct_spec, tmp_path):
    src = tmp_path / "export"
    # A slice gap makes the image irregular: with irregular="resample" the mask must follow its positions.
    _, mask_dir = slice_gap_export(small_synth.out_dir / "site-2", src)
    damaged = sorted(mask_dir.iterdir())[0]
    ds = pydicom.dcmread(damaged)
    del ds.ImagePositionPatient
    ds.save_as(damaged)

    spec = dataclasses.replace(ct_spec, geometry=dataclasses.replace(ct_spec.geometry, irregular="resample"))
    preprocess(src, tmp_path / "out", spec, site="s", progress=False)

    rows = _manifest(tmp_path / "out")
    mask_prefix = mask_dir.relative_to(src).as_posix() + "/"
    mask_rows = [r for k, r in rows.items() if k.startswith(mask_prefix)]
    assert mask_rows and {(r["status"], r["reason"]) for r in mask_rows} == {("refused", "LABEL_GEOMETRY_MISMATCH")}
    assert all("not at the image's slice positions" in r["detail"] for r in mask_rows)
