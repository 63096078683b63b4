"""``--write-dicom``: de-identified DICOM copies of every converted series (PS3.15 Basic Profile, keyed).

Files land in ``<--write-dicom>/<case_id>/<role>/<new SOP Instance UID>.dcm``:
no name carries an identifier. An object that may carry burned-in text is
refused (its case is withdrawn from the copies, never passed on). Every name
is checked before a case's first copy is written: the UID must be a UID and
the path must resolve inside the folder (:func:`fedimg.safepath.child_path`),
else the case is withdrawn from the copies with an UNSAFE_NAME note in its
manifest rows.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Any

from fedimg.atomic import TMP_PREFIX
from fedimg.config import PreprocessSpec
from fedimg.dicom.reasons import Reason
from fedimg.preprocess.manifest import CONVERTED, ManifestRow
from fedimg.preprocess.outdir import OutputDir
from fedimg.safepath import UnsafePathError, child_path, uid_component


def write_deidentified(
    ordered: list[ManifestRow], root: Path, copies: OutputDir, pseudonymizer: Any, spec: PreprocessSpec
) -> None:
    """Write a de-identified copy of every converted DICOM file, case by case (see the module docstring)."""
    import pydicom

    from fedimg.dicom.deid import burned_in_risk

    by_case: dict[str, list[ManifestRow]] = defaultdict(list)
    for r in ordered:
        if r.status == CONVERTED and r.case_id:
            by_case[r.case_id].append(r)
    for case_id, case_rows in sorted(by_case.items()):
        datasets = []
        risk = None
        for r in case_rows:
            try:
                ds = pydicom.dcmread(root / r.input)
            except Exception:  # noqa: BLE001 - e.g. a NIfTI label row: nothing to copy
                continue
            risk = risk or burned_in_risk(ds)
            datasets.append((r, ds))
        if risk:
            for r, _ in datasets:
                r.detail = f"{Reason.BURNED_IN_ANNOTATION.value}: not copied to --write-dicom ({risk})"
            continue
        _copy_case(case_id, case_rows, datasets, copies, pseudonymizer, spec)


def _copy_case(
    case_id: str,
    case_rows: list[ManifestRow],
    datasets: list[tuple[ManifestRow, Any]],
    copies: OutputDir,
    pseudonymizer: Any,
    spec: PreprocessSpec,
) -> None:
    from fedimg.dicom.deid import deidentify

    cleaned = []
    try:
        for r, ds in datasets:
            clean = deidentify(
                ds,
                pseudonymizer,
                covariates=spec.deid.covariates,
                descriptor_allowlist=spec.deid.keep_descriptors,
                private_allowlist=spec.deid.private_allowlist,
            )
            name = uid_component(str(clean.SOPInstanceUID), "(0008,0018) SOP Instance UID of a copy") + ".dcm"
            cleaned.append(
                (child_path(copies.path, case_id, r.role or "image", name, what="--write-dicom name"), clean)
            )
    except UnsafePathError as exc:
        for r in case_rows:
            r.detail = f"{Reason.UNSAFE_NAME.value}: not copied to --write-dicom ({exc})"
        return
    for target, clean in cleaned:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{TMP_PREFIX}{target.name}")
        clean.save_as(tmp, enforce_file_format=True)
        os.replace(tmp, target)


__all__ = ["write_deidentified"]
