"""Atomic file writing: a crash never leaves a half-written output under its final name.

Every temporary file is named ``.fedimg-tmp-<name>.<random>``: the prefix is
fedimg's alone, so the temporary files a killed run left behind are found and
removed at the next claim of the folder (:mod:`fedimg.preprocess.outdir`).
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

TMP_PREFIX = ".fedimg-tmp-"

#: gzip level of ``.nii.gz`` outputs. Level 1 (nibabel's default too) is the fastest zlib level:
#: on the series of benchmarks/bench_dicom.py, level 6 (dcm2niix's default) takes about three times
#: as long for files about 10 % smaller.
GZIP_LEVEL = 1


def _tmp_beside(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(name)


def write_nifti(
    path: Path,
    data: np.ndarray,
    affine: np.ndarray,
    scale: tuple[float, float] | None = None,
    compresslevel: int = GZIP_LEVEL,
) -> None:
    """Write a NIfTI volume atomically, with PHI-free header text fields.

    ``descrip``, ``aux_file``, ``intent_name`` and ``db_name`` are cleared: nibabel
    and other tools may otherwise carry free text there.

    Args:
        path: target ``.nii`` or ``.nii.gz`` file.
        data: the voxels; a Fortran-ordered array is written without a copy.
        affine: 4x4 voxel-to-RAS affine (qform and sform, code 1).
        scale: ``(scl_slope, scl_inter)`` for integer ``data`` whose values are
            ``data * slope + inter``; written as given (nibabel computes no
            scaling of its own then). None: the values are ``data`` itself.
        compresslevel: gzip level for a ``.gz`` path (1 fastest .. 9 smallest).
    """
    img = nib.Nifti1Image(data, affine)
    hdr = img.header
    if scale is not None:
        if not np.issubdtype(data.dtype, np.integer):
            raise TypeError(f"scl_slope/scl_inter are for integer voxels, got {data.dtype}")
        hdr.set_slope_inter(*scale)
    hdr["descrip"] = b"fedimg"
    hdr["aux_file"] = b""
    hdr["intent_name"] = b""
    hdr["db_name"] = b""
    hdr.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    tmp = _tmp_beside(path)
    # Written beside the reserved temporary name, opened the ordinary way: the output gets the permissions
    # the umask gives (mkstemp's file would be private to the user).
    tmp_nii = tmp.with_name(tmp.name + "".join(path.suffixes))
    try:
        with tmp_nii.open("xb") as fh:
            if path.name.endswith(".gz"):
                # No name and mtime 0 in the gzip header, as nibabel writes it: no temporary name is recorded,
                # and the same volume gives the same bytes.
                with gzip.GzipFile(filename="", fileobj=fh, mode="wb", compresslevel=compresslevel, mtime=0) as gz:
                    img.to_stream(gz)
            else:
                img.to_stream(fh)
        os.replace(tmp_nii, path)
    finally:
        tmp_nii.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically."""
    tmp = _tmp_beside(path)
    try:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Write JSON lines atomically."""
    tmp = _tmp_beside(path)
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, sort_keys=False) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
