"""The last stage of preprocessing: what a run leaves in DST (and beside it).

- ``datalist.json`` (:class:`fedimg.datalist.Datalist`): the cases by split;
- ``manifest.jsonl``: one row per input file; under de-identification its
  ``input`` fields are keyed path hashes, and the crosswalk back to the paths
  is written only where the site asks (owner-only, outside SRC and DST);
- ``spec.yaml`` and ``summary.json``: what was run and what it gave;
- the state file for the next run, and the pruning of outputs of cases that
  are gone (only files fedimg's records say it wrote).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fedimg import config as cfgmod
from fedimg.atomic import write_json, write_jsonl
from fedimg.config import PreprocessSpec
from fedimg.datalist import Datalist, DatalistItem
from fedimg.preprocess.cases import CaseRecord
from fedimg.preprocess.manifest import ManifestRow
from fedimg.preprocess.outdir import OutputDir, OutputDirError
from fedimg.preprocess.splits import Assignment
from fedimg.preprocess.state import PreprocessState, save_state
from fedimg.safepath import printable_path

CROSSWALK_KEYS = frozenset({"input_hash", "input"})


def check_crosswalk(path: Path, src: Path, dst: Path, keys: frozenset[str] = CROSSWALK_KEYS) -> None:
    """The crosswalk links pseudonyms to input paths: it stays outside SRC and DST, and replaces only a crosswalk.

    Args:
        keys: the keys of a crosswalk line of this command (an existing file must start with one).

    Raises:
        OutputDirError: the path lies inside SRC or DST, or names a file that is not such a crosswalk.
    """
    for folder, name in ((src, "SRC"), (dst, "DST")):
        try:
            Path(os.path.realpath(path)).relative_to(os.path.realpath(folder))
        except ValueError:
            continue
        raise OutputDirError(
            f"--crosswalk lies inside {name}: expected a site-private file outside SRC and DST "
            "(DST is what is shared or read next); choose a path elsewhere, e.g. beside the site "
            "secret"
        )
    if path.exists():
        first = b""
        if path.is_file():
            with path.open("rb") as fh:
                first = fh.readline()
        try:
            ok = set(json.loads(first)) == set(keys)
        except (ValueError, TypeError):
            ok = False
        if not ok:
            raise OutputDirError(
                "--crosswalk names an existing file that is not a fedimg crosswalk: expected a new "
                "path (or the crosswalk of an earlier run, which is replaced); fedimg never "
                "overwrites a file it did not write: choose another path"
            )


def class_map(spec: PreprocessSpec) -> dict[str, str]:
    """Label value -> class name as the datalist records it (classification: class index -> name)."""
    if spec.is_classification:
        return {str(i): n for i, n in enumerate(spec.labels.classes)}
    return {"0": "background", **{str(i + 1): n for i, n in enumerate(spec.labels.classes)}}


def write_datalist(dst: Path, spec: PreprocessSpec, site: str, cases: Iterable[CaseRecord]) -> Path:
    """``datalist.json``: every case under its split (with its fold when the spec has folds)."""
    datalist = Datalist(
        name=spec.name,
        site=site,
        task=spec.task,
        spatial_dims=spec.spatial_dims,
        labels=class_map(spec),
        folds=spec.split.folds,
    )
    for c in cases:
        datalist.split_items(c.split).append(DatalistItem(image=c.image, case_id=c.case_id, label=c.label, fold=c.fold))
    path = dst / "datalist.json"
    datalist.write(path)
    return path


def write_manifest(dst: Path, rows: list[ManifestRow], pseudonymizer: Any | None, crosswalk: str | Path | None) -> Path:
    """``manifest.jsonl``; under de-identification with keyed path hashes (and the crosswalk, if asked)."""
    if pseudonymizer is not None:
        # Paths of a PACS export spell out names and accession numbers: the manifest gets keyed
        # hashes; a crosswalk back to the paths is kept only where the site asks, owner-only.
        if crosswalk is not None:
            cw = Path(crosswalk)
            write_jsonl(
                cw, ({"input_hash": pseudonymizer.path_hash(r.input), "input": printable_path(r.input)} for r in rows)
            )
            os.chmod(cw, 0o600)
        for r in rows:
            r.input = pseudonymizer.path_hash(r.input)
    path = dst / "manifest.jsonl"
    write_jsonl(path, (r.to_json() for r in rows))
    return path


def deid_account(spec: PreprocessSpec, pseudonymizer: Any | None, crosswalk: str | Path | None) -> dict[str, Any]:
    """How the run's ids and paths were made (the summary's ``pseudonyms``)."""
    if pseudonymizer is None:
        return {"case_ids": "unkeyed hashes (no site secret given)", "manifest_inputs": "relative paths"}
    from fedimg.dicom.deid import ENGINE, TABLE_EDITION

    return {
        "profile": f"{TABLE_EDITION} Basic Profile, Retain Longitudinal Temporal Information with Modified "
        "Dates, Clean Descriptors (allow-list)",
        "engine": ENGINE,
        "covariates": list(spec.deid.covariates),
        "case_ids": "HMAC-SHA256 pseudonyms (site secret)",
        "manifest_inputs": "HMAC-SHA256 path hashes",
        "crosswalk": "kept at the site (owner-only)" if crosswalk is not None else "not kept",
    }


def write_summary(dst: Path, result: Any, cases: list[CaseRecord], deid: dict[str, Any]) -> None:
    """``summary.json``: the result, every case (no keys or fingerprints) and the de-identification account."""
    write_json(dst / "summary.json", {**asdict(result), "cases": [c.summary() for c in cases], "pseudonyms": deid})


def save_spec(dst: Path, spec: PreprocessSpec) -> None:
    """``spec.yaml``: the spec the outputs were made with (a later run must use the same)."""
    cfgmod.save(spec, dst / "spec.yaml")


def save_state_and_prune(
    out: OutputDir, previous: PreprocessState, cases: list[CaseRecord], assignment: Assignment
) -> int:
    """Record the current cases for the next run, and remove outputs no current case refers to.

    Only files fedimg's records say it wrote are removed: the outputs of the
    previous state's cases and those announced in DST's journal (a killed
    run's). A file someone else put into DST is never touched.

    Returns:
        The number of cases of the previous run that are no longer cases.
    """
    state = PreprocessState(
        spec_sha256=previous.spec_sha256,
        deid_key=previous.deid_key,
        cases={c.case_id: c.state_entry() for c in cases},
        splits={**previous.splits, **{c.case_id: c.split for c in cases}},
        patients={**previous.patients, **assignment.patient_splits},
        folds={**previous.folds, **assignment.patient_folds},
    )
    save_state(out.path, state)
    keep = {c.image for c in cases} | {c.label for c in cases if isinstance(c.label, str)}
    written = {
        str(v)
        for entry in previous.cases.values()
        for k, v in entry.items()
        if k in ("image", "label") and isinstance(v, str)
    }
    out.prune(written | out.journaled(), keep=keep)
    out.clear_journal()
    return len(set(previous.cases) - {c.case_id for c in cases})


__all__ = [
    "CROSSWALK_KEYS",
    "check_crosswalk",
    "class_map",
    "deid_account",
    "save_spec",
    "save_state_and_prune",
    "write_datalist",
    "write_manifest",
    "write_summary",
]
