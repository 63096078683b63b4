"""What a preprocessing run leaves for the next one: reusable cases and fixed splits.

``DST/.fedimg_preprocess_state.json`` is site-private bookkeeping and holds
no identifier: cases are named by their (keyed) case ids, and each case's
input files by one fingerprint, a keyed hash (HMAC with the site secret;
plain SHA-256 under ``--no-deid``) of their relative paths, sizes and
modification times. It records:

- ``spec_sha256``: the spec the outputs were made with;
- ``deid_key``: a keyed token of the site secret (``none`` without one);
- ``cases``: per current case, the fingerprint and what its outputs are
  (paths under DST, shape, spacing, label counts, correction text), so an
  unchanged case is reused without decoding a pixel;
- ``splits``: the training/validation/test assignment of every case ever
  seen, so a case keeps its split across runs, even one that was missing for
  a while (a validation case must never move into training);
- ``patients`` and ``folds``: the split and cross-validation fold of every
  patient ever seen, under their patient key (a keyed pseudonym; an unkeyed
  hash under ``--no-deid``), so a new study of a known patient joins the
  patient's side (:mod:`fedimg.preprocess.splits`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedimg import config as cfgmod
from fedimg.atomic import write_json
from fedimg.config import PreprocessSpec
from fedimg.datalist import Datalist, DatalistError
from fedimg.preprocess.scan import PreprocessInputError

STATE_FILE = ".fedimg_preprocess_state.json"
STATE_VERSION = 1
SPLITS = ("training", "validation", "test")


class IncompatibleOutputError(PreprocessInputError):
    """DST holds outputs of another spec or another site secret: they must not be mixed."""


def spec_digest(spec: PreprocessSpec) -> str:
    """SHA-256 of the resolved spec (canonical JSON)."""
    return hashlib.sha256(json.dumps(cfgmod.to_dict(spec), sort_keys=True).encode()).hexdigest()


def deid_key(pseudonymizer: Any | None) -> str:
    """A keyed token of the site secret (reveals nothing about it), or ``none``."""
    return "none" if pseudonymizer is None else pseudonymizer.path_hash("fedimg-preprocess-state-key")


def inputs_fingerprint(files: Iterable[tuple[str, Path]], pseudonymizer: Any | None) -> str:
    """Identity of a case's input files: relative paths, sizes and modification times.

    Args:
        files: ``(relative path, absolute path)`` of every input file of the case.
        pseudonymizer: keys the hash when given (paths spell out identifiers).
    """
    lines = []
    for rel, path in sorted(set(files)):
        st = path.stat()
        lines.append(f"{rel}|{st.st_size}|{st.st_mtime_ns}")
    payload = "\n".join(lines)
    if pseudonymizer is not None:
        return pseudonymizer.path_hash(payload)
    return hashlib.sha256(os.fsencode(payload)).hexdigest()[:32]  # the names' bytes: any file name hashes


@dataclass
class PreprocessState:
    """The bookkeeping of one DST (see the module docstring)."""

    spec_sha256: str
    deid_key: str
    cases: dict[str, dict[str, Any]] = field(default_factory=dict)
    splits: dict[str, str] = field(default_factory=dict)
    patients: dict[str, str] = field(default_factory=dict)
    folds: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """As written to the state file."""
        return {
            "version": STATE_VERSION,
            "spec_sha256": self.spec_sha256,
            "deid_key": self.deid_key,
            "cases": self.cases,
            "splits": self.splits,
            "patients": self.patients,
            "folds": self.folds,
        }


def _differing_keys(dst: Path, spec: PreprocessSpec) -> list[str]:
    """Top-level spec keys whose values differ from ``DST/spec.yaml`` (names only)."""
    try:
        old = cfgmod.to_dict(cfgmod.load(PreprocessSpec, dst / "spec.yaml"))
    except (cfgmod.ConfigError, OSError):
        return ["(spec.yaml unreadable)"]
    new = cfgmod.to_dict(spec)
    return [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def load_previous(dst: Path, spec: PreprocessSpec, pseudonymizer: Any | None) -> PreprocessState:
    """The previous run's state of ``dst`` (empty for a new DST), after checking it may be reused.

    A DST written before state files existed (``datalist.json`` but no state)
    gives its splits from the datalist and reuses no output.

    Raises:
        IncompatibleOutputError: ``dst`` was written with another spec or
            another site secret (or with/without de-identification). Mixing
            would put cases of two specs in one datalist, or (other secret:
            other case ids) draw a new split, moving validation cases into
            training. The message says to use a new DST or empty this one.
    """
    fresh = PreprocessState(spec_sha256=spec_digest(spec), deid_key=deid_key(pseudonymizer))
    state_path = dst / STATE_FILE
    fix = (
        "choose a new DST folder, or empty this one to start over (its training/validation split is "
        "then drawn again: do not resume a federated model trained on the old split)"
    )
    if (dst / "spec.yaml").is_file():
        differing = _differing_keys(dst, spec)
        if differing:
            raise IncompatibleOutputError(
                f"DST already holds the outputs of another preprocessing spec (spec.yaml differs in: "
                f"{', '.join(differing)}); expected the same spec as its earlier runs, so that outputs of two "
                f"specs are never mixed; {fix}"
            )
    if not state_path.is_file():
        datalist = dst / "datalist.json"
        if datalist.is_file():
            try:
                dl = Datalist.read(datalist)
            except DatalistError:
                dl = None  # unreadable: nothing to keep
            if dl is not None:
                for split in SPLITS:
                    for item in dl.split_items(split):
                        fresh.splits[item.case_id] = split
        return fresh
    try:
        raw = json.loads(state_path.read_text(encoding="utf-8"))
        if raw.get("version") != STATE_VERSION:
            raise ValueError("version")
        old = PreprocessState(
            spec_sha256=str(raw["spec_sha256"]),
            deid_key=str(raw["deid_key"]),
            cases=dict(raw.get("cases", {})),
            splits=dict(raw.get("splits", {})),
            patients=dict(raw.get("patients", {})),
            folds={str(k): int(v) for k, v in dict(raw.get("folds", {})).items()},
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        raise IncompatibleOutputError(
            f"DST holds an unreadable {STATE_FILE} (expected version {STATE_VERSION} written by fedimg "
            f"preprocess); {fix}"
        ) from None
    # spec.yaml, compared above key by key (with today's defaults for keys added since), is the judge when it
    # exists; the digest only when it does not.
    if old.spec_sha256 != fresh.spec_sha256 and not (dst / "spec.yaml").is_file():
        raise IncompatibleOutputError(
            f"DST already holds the outputs of another preprocessing spec; expected the same spec as its "
            f"earlier runs; {fix}"
        )
    if old.deid_key != fresh.deid_key:
        raise IncompatibleOutputError(
            "DST was preprocessed with another site secret (or with/without --no-deid): its case ids are "
            f"different pseudonyms, so outputs and splits cannot be carried over; expected the same "
            f"--secret-file as its earlier runs; {fix}"
        )
    fresh.cases = old.cases
    fresh.splits = {k: v for k, v in old.splits.items() if v in SPLITS}
    fresh.patients = {k: v for k, v in old.patients.items() if v in SPLITS}
    fresh.folds = old.folds
    return fresh


def save_state(dst: Path, state: PreprocessState) -> None:
    """Write the state file atomically."""
    write_json(dst / STATE_FILE, state.to_json())
