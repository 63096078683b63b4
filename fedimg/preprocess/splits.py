"""Which cases train, which validate, which are held out: by patient, stable across runs.

A patient's studies are correlated (same anatomy, same scanner, often the
same lesion): a patient with one study in training and another in
validation makes every validation number optimistic. So every split here
moves whole patients:

- ``test`` (``split.test_fraction``, default 0): held out; training and
  model selection never see it; reports show it separately;
- ``validation`` (``split.val_fraction``): chooses the best model;
- ``training``: the rest;
- with ``split.folds = k`` (k >= 2) the non-test patients are also dealt
  into k folds for cross-validation at the site: fold ``i`` validates, the
  other folds train (``data.fold``); the ``validation`` split is then fold 0.

Across runs (incremental preprocessing) nothing moves: a case keeps its
split and fold, and a patient seen before keeps theirs, so a new study of a
validation patient goes to validation. New patients are ordered by a seeded
hash of their key and dealt to the held-out splits (test first) whenever a
patient brings the split's case count closer to its share of all current
cases (``round(n * fraction)``; at least one validation patient when there
are two patients or more), the rest to training; at least one patient
always trains.

The patient key is a keyed pseudonym under de-identification (an unkeyed
hash without it): it is written to the site-private state file, never the
patient ID itself. The order of new patients uses a separate unkeyed hash of
the data (``order``), so the same export gets the same split whatever the
site secret.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

from fedimg.errors import UserError

TRAINING, VALIDATION, TEST = "training", "validation", "test"
SPLITS = (TRAINING, VALIDATION, TEST)


class SplitConflictError(UserError, ValueError):
    """Earlier runs put one patient's cases on both sides of a split; carrying that on would leak."""


@dataclass(frozen=True)
class CaseKey:
    """What the split needs to know of a case.

    Attributes:
        patient: the patient's key (a keyed pseudonym, or an unkeyed hash without de-identification).
        order: an unkeyed, data-derived hash that orders new patients (never written).
    """

    patient: str
    order: str


@dataclass
class Assignment:
    """The outcome: per case its split (and fold), per patient their split (and fold)."""

    splits: dict[str, str] = field(default_factory=dict)
    folds: dict[str, int] = field(default_factory=dict)
    patient_splits: dict[str, str] = field(default_factory=dict)
    patient_folds: dict[str, int] = field(default_factory=dict)

    def count(self, split: str) -> int:
        """Cases in ``split``."""
        return sum(1 for s in self.splits.values() if s == split)

    def patients_in(self, split: str) -> int:
        """Patients (among the current cases) in ``split``."""
        return sum(1 for s in self.patient_splits.values() if s == split)


def _rank(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def assign(
    cases: Mapping[str, CaseKey],
    val_fraction: float,
    seed: int,
    test_fraction: float = 0.0,
    folds: int = 0,
    previous_cases: Mapping[str, str] | None = None,
    previous_patients: Mapping[str, str] | None = None,
    previous_folds: Mapping[str, int] | None = None,
) -> Assignment:
    """Split ``cases`` by patient, keeping every earlier decision.

    Args:
        cases: case id -> its :class:`CaseKey`.
        val_fraction: share of cases for validation (by whole patients).
        seed: the spec's ``split.seed``.
        test_fraction: share of cases held out as ``test`` (0: none).
        folds: number of cross-validation folds of the non-test patients (0: none).
        previous_cases: case id -> split of earlier runs (also of cases gone meanwhile).
        previous_patients: patient key -> split of earlier runs.
        previous_folds: patient key -> fold of earlier runs.

    Raises:
        SplitConflictError: earlier runs put one patient's cases in different splits (a DST made before
            splits were by patient); the message counts patients, never names them.
    """
    by_patient: dict[str, list[str]] = defaultdict(list)
    for case_id, key in cases.items():
        by_patient[key.patient].append(case_id)
    patient_split = _earlier_splits(by_patient, previous_cases or {}, previous_patients or {})

    out = Assignment()
    n = len(cases)
    n_patients = len(by_patient)
    target = {
        TEST: int(round(n * test_fraction)) if test_fraction > 0 else 0,
        # With folds, validation is fold 0 (dealt below), not a share of its own.
        VALIDATION: max(1, int(round(n * val_fraction))) if n_patients >= 2 and folds < 2 else 0,
    }
    first = {p: min(cases[c].order for c in ids) for p, ids in by_patient.items()}
    new = sorted((p for p in by_patient if p not in patient_split), key=lambda p: _rank(seed, first[p]))
    _hold_out(new, patient_split, by_patient, target)
    for p in new:
        patient_split.setdefault(p, TRAINING)
    for p, ids in by_patient.items():
        out.patient_splits[p] = patient_split[p]
        for c in ids:
            out.splits[c] = patient_split[p]

    if folds >= 2:
        _deal_folds(out, by_patient, first, seed, folds, previous_folds or {})
    return out


def _earlier_splits(
    by_patient: Mapping[str, list[str]], previous_cases: Mapping[str, str], previous_patients: Mapping[str, str]
) -> dict[str, str]:
    """The split earlier runs gave each patient: their own record, or else the one split of their cases.

    Args:
        by_patient: patient key -> the current case ids.
        previous_cases: case id -> split of earlier runs.
        previous_patients: patient key -> split of earlier runs.

    Returns:
        Patient key -> split, for every patient earlier runs decided (also ones without current cases).

    Raises:
        SplitConflictError: earlier runs put one patient's cases in different splits.
    """
    patient_split = {p: s for p, s in previous_patients.items() if s in SPLITS}
    # A patient of earlier runs whose state predates patient records: derive it from their cases.
    straddling = 0
    for patient, ids in by_patient.items():
        seen = {previous_cases[c] for c in ids if previous_cases.get(c) in SPLITS}
        if patient in patient_split:
            seen.add(patient_split[patient])
        if len(seen) > 1:
            straddling += 1
        elif seen:
            patient_split[patient] = seen.pop()
    if straddling:
        raise SplitConflictError(
            f"earlier runs put the studies of {straddling} patient(s) into different splits (a DST made before "
            "fedimg split by patient): carrying that split on would leave patients on both sides of the "
            "evaluation; preprocess into a new DST (its split is drawn by patient), and do not resume a model "
            "trained on the old split"
        )
    return patient_split


def _hold_out(
    new: list[str], patient_split: dict[str, str], by_patient: Mapping[str, list[str]], target: Mapping[str, int]
) -> None:
    """Deal new patients, in seeded order, to the held-out splits (test first) towards each split's target.

    Args:
        new: the patients no earlier run decided, in seeded order.
        patient_split: patient key -> split so far; the held-out new patients are added.
        by_patient: patient key -> the current case ids.
        target: held-out split -> the number of cases it should reach (0: none).
    """
    size = {p: len(ids) for p, ids in by_patient.items()}
    have: defaultdict[str, int] = defaultdict(int)
    for p, s in patient_split.items():
        if p in size:
            have[s] += size[p]
    trains = sum(1 for p in by_patient if patient_split.get(p) == TRAINING)
    for split in (TEST, VALIDATION):
        if target[split] <= 0:
            continue
        for p in new:
            if p in patient_split:
                continue
            free = sum(1 for q in new if q not in patient_split)
            # A patient is held out when that brings the share closer to its target (whole patients: a large
            # family of studies may not fit), never the last patient who could still train.
            closer = abs(have[split] + size[p] - target[split]) < abs(have[split] - target[split])
            if closer and trains + free - 1 >= 1:
                patient_split[p] = split
                have[split] += size[p]
        if split == VALIDATION and have[split] == 0:
            # Every remaining patient has many studies: still hold one out, the first in seeded order.
            first = next((p for p in new if p not in patient_split), None)
            free = sum(1 for q in new if q not in patient_split)
            if first is not None and trains + free - 1 >= 1:
                patient_split[first] = split
                have[split] += size[first]


def _deal_folds(
    out: Assignment,
    by_patient: Mapping[str, list[str]],
    first: Mapping[str, str],
    seed: int,
    folds: int,
    previous_folds: Mapping[str, int],
) -> None:
    """Deal the non-test patients to ``folds`` cross-validation folds; fold 0 is the validation split.

    Earlier folds are kept; new patients, in seeded order, go to the fold with the fewest cases.

    Args:
        out: the assignment so far; its folds are set and its splits follow them.
        by_patient: patient key -> the current case ids.
        first: patient key -> the lowest order key of their cases.
        seed: the spec's ``split.seed``.
        folds: the number of folds (2 or more).
        previous_folds: patient key -> fold of earlier runs.
    """
    fold_of = {p: f for p, f in previous_folds.items() if isinstance(f, int) and 0 <= f < folds}
    load = [0] * folds
    for p, f in fold_of.items():
        if p in by_patient and out.patient_splits.get(p) != TEST:
            load[f] += len(by_patient[p])
    pool = [p for p in by_patient if out.patient_splits[p] != TEST]
    for p in sorted((p for p in pool if p not in fold_of), key=lambda p: _rank(seed + 1, first[p])):
        f = min(range(folds), key=lambda k: (load[k], k))
        fold_of[p] = f
        load[f] += len(by_patient[p])
    for p in pool:
        out.patient_folds[p] = fold_of[p]
        out.patient_splits[p] = VALIDATION if fold_of[p] == 0 else TRAINING
        for c in by_patient[p]:
            out.folds[c] = fold_of[p]
            out.splits[c] = out.patient_splits[p]


__all__ = ["SPLITS", "TEST", "TRAINING", "VALIDATION", "Assignment", "CaseKey", "SplitConflictError", "assign"]
