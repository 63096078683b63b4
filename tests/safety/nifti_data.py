"""Decathlon-style NIfTI data sets for the ``--from-nifti`` tests (issue 16), made from real shared data.

The TotalSegmentator CT (``example_ct_sm.nii.gz``, 122 x 101 x 30 at 3 mm,
RAS) and its pixel-aligned multi-label segmentation (``example_seg.nii.gz``)
are cut into overlapping crops along the first axis: each crop is one case
(image and label with the crop's own affine), as a Decathlon ``imagesTr/`` +
``labelsTr/`` + ``dataset.json`` would hold them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from fedimg import config as cfg
from tests.conftest import shared

TS = "dicom/totalsegmentator/tests/reference_files"
CROP = 80
#: Two of TotalSegmentator's (v2) classes, by their label values.
CLASSES = {"spleen": 1, "liver": 5}
DATASET_LABELS = {
    "0": "background",
    "1": "spleen",
    "2": "kidney_right",
    "3": "kidney_left",
    "4": "gallbladder",
    "5": "liver",
    "6": "stomach",
    "7": "pancreas",
}


def source() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(CT in HU, segmentation, affine) of the TotalSegmentator example; skips when the data is absent."""
    ref = shared(TS)
    ct, seg = nib.load(str(ref / "example_ct_sm.nii.gz")), nib.load(str(ref / "example_seg.nii.gz"))
    if not np.allclose(ct.affine, seg.affine) or ct.shape != seg.shape:
        raise AssertionError("the shared example CT and segmentation are expected on one grid")
    return np.asarray(ct.dataobj), np.asarray(seg.dataobj), ct.affine


def crop(x0: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, label, affine) of the crop starting at voxel ``x0`` along the first axis."""
    ct, seg, affine = source()
    shifted = affine.copy()
    shifted[:3, 3] = affine[:3, :3] @ [x0, 0, 0] + affine[:3, 3]
    return ct[x0 : x0 + CROP], seg[x0 : x0 + CROP], shifted


def make_decathlon(
    out: Path, offsets: tuple[int, ...], prefix: str = "tseg", labels: dict[str, str] | None = None
) -> dict[str, Any]:
    """``out/imagesTr``, ``out/labelsTr`` and ``out/dataset.json`` with one case per crop offset.

    Returns:
        The dataset.json written.
    """
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(exist_ok=True)
    training = []
    for i, x0 in enumerate(offsets):
        image, label, affine = crop(x0)
        name = f"{prefix}_{i:03d}.nii.gz"
        nib.save(nib.Nifti1Image(image, affine), str(out / "imagesTr" / name))
        nib.save(nib.Nifti1Image(label, affine), str(out / "labelsTr" / name))
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    dataset = {
        "name": "TotalSegmentator crops",
        "modality": {"0": "CT"},
        "labels": labels if labels is not None else dict(DATASET_LABELS),
        "numTraining": len(training),
        "training": training,
        "test": [],
    }
    write_dataset(out, dataset)
    return dataset


def write_dataset(out: Path, dataset: dict[str, Any]) -> None:
    (out / "dataset.json").write_text(json.dumps(dataset, indent=1), encoding="utf-8")


def spec(spacing: float = 3.0, **labels: Any) -> cfg.PreprocessSpec:
    """A CT spec of the two classes; at 3 mm (the source's spacing, RAS) nothing is resampled."""
    return cfg.from_dict(
        cfg.PreprocessSpec,
        {
            "name": "two_classes",
            "modality": "CT",
            "orientation": "RAS",
            "target_spacing": [spacing] * 3,
            "labels": {"classes": list(CLASSES), "values": dict(CLASSES), "others": "background", **labels},
            "split": {"val_fraction": 0.34, "seed": 0},
        },
    )


def rows(dst: Path) -> dict[str, dict[str, Any]]:
    """DST's manifest rows by input."""
    out = {}
    for line in (dst / "manifest.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        out[row["input"]] = row
    return out
