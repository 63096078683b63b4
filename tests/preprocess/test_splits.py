"""Splits by patient: no patient on both sides, held-out test, folds, nothing moves across runs."""

from __future__ import annotations

import random

import pytest

from fedimg.preprocess.splits import TEST, TRAINING, VALIDATION, CaseKey, SplitConflictError, assign


def _cohort(n_patients: int, seed: int = 0, max_studies: int = 4) -> dict[str, CaseKey]:
    rng = random.Random(seed)
    cases = {}
    for p in range(n_patients):
        for s in range(rng.randint(1, max_studies)):
            cases[f"case-{p}-{s}"] = CaseKey(patient=f"pat-{p}", order=f"order-{p}-{s}")
    return cases


def _sides(cases: dict[str, CaseKey], splits: dict[str, str]) -> dict[str, set[str]]:
    sides: dict[str, set[str]] = {}
    for c, key in cases.items():
        sides.setdefault(key.patient, set()).add(splits[c])
    return sides


@pytest.mark.parametrize("seed", range(5))
def test_no_patient_is_on_two_sides_and_shares_are_near_the_targets(seed: int) -> None:
    cases = _cohort(40, seed)
    a = assign(cases, val_fraction=0.2, seed=seed, test_fraction=0.15)
    assert all(len(s) == 1 for s in _sides(cases, a.splits).values())
    n = len(cases)
    # Whole patients (up to 4 studies each) are dealt: a share may overshoot by one patient's studies.
    assert round(0.15 * n) <= a.count(TEST) < round(0.15 * n) + 4
    assert round(0.2 * n) <= a.count(VALIDATION) < round(0.2 * n) + 4
    assert a.count(TRAINING) == n - a.count(TEST) - a.count(VALIDATION) > 0


def test_several_studies_of_one_patient_follow_the_patient() -> None:
    # Two studies per patient (the TCIA case PGBM-001): per-study splitting put them on both sides.
    cases = {f"case-{p}-{s}": CaseKey(patient=f"p{p}", order=f"o{p}{s}") for p in range(6) for s in range(2)}
    a = assign(cases, val_fraction=0.5, seed=3)
    for p in range(6):
        assert a.splits[f"case-{p}-0"] == a.splits[f"case-{p}-1"]
    assert a.count(VALIDATION) == 6 and a.patients_in(VALIDATION) == 3


def test_nothing_moves_across_runs_and_a_new_study_follows_its_patient() -> None:
    cases = _cohort(20, 1)
    first = assign(cases, 0.25, 0, test_fraction=0.1)
    grown = dict(cases)
    val_patient = next(cases[c].patient for c, s in first.splits.items() if s == VALIDATION)
    grown["case-new-of-val-patient"] = CaseKey(patient=val_patient, order="zzz")
    for p in range(20, 30):
        grown[f"case-{p}-0"] = CaseKey(patient=f"pat-{p}", order=f"order-{p}")
    second = assign(
        grown, 0.25, 0, test_fraction=0.1, previous_cases=first.splits, previous_patients=first.patient_splits
    )
    assert {c: second.splits[c] for c in cases} == first.splits
    assert second.splits["case-new-of-val-patient"] == VALIDATION
    assert all(len(s) == 1 for s in _sides(grown, second.splits).values())


def test_a_state_that_puts_a_patient_on_both_sides_is_refused_without_naming_anyone() -> None:
    cases = {"a": CaseKey("pat-secret-name", "1"), "b": CaseKey("pat-secret-name", "2"), "c": CaseKey("q", "3")}
    with pytest.raises(SplitConflictError, match="1 patient") as err:
        assign(cases, 0.3, 0, previous_cases={"a": TRAINING, "b": VALIDATION})
    assert "secret" not in str(err.value)


def test_small_cohorts_always_keep_a_training_patient() -> None:
    one = assign({"a": CaseKey("p", "1")}, 0.25, 0, test_fraction=0.5)
    assert one.splits == {"a": TRAINING}
    two = assign({"a": CaseKey("p", "1"), "b": CaseKey("q", "2")}, 0.5, 0, test_fraction=0.5)
    assert sorted(two.splits.values()).count(TRAINING) == 1


def test_folds_deal_whole_patients_and_fold_zero_validates() -> None:
    cases = _cohort(30, 2)
    a = assign(cases, 0.25, 0, test_fraction=0.1, folds=5)
    non_test = [c for c in cases if a.splits[c] != TEST]
    assert set(a.folds) == set(non_test)
    for c in non_test:
        assert a.splits[c] == (VALIDATION if a.folds[c] == 0 else TRAINING)
    by_patient: dict[str, set[int]] = {}
    for c in non_test:
        by_patient.setdefault(cases[c].patient, set()).add(a.folds[c])
    assert all(len(f) == 1 for f in by_patient.values())
    sizes = [sum(1 for c in non_test if a.folds[c] == k) for k in range(5)]
    assert max(sizes) - min(sizes) <= 4  # balanced within one patient's studies
    again = assign(
        cases,
        0.25,
        0,
        test_fraction=0.1,
        folds=5,
        previous_cases=a.splits,
        previous_patients=a.patient_splits,
        previous_folds=a.patient_folds,
    )
    assert again.folds == a.folds and again.splits == a.splits


def test_a_patient_with_many_studies_is_not_held_out_when_a_single_one_fits_the_share() -> None:
    # 4 cases, target 1 validation case: the two-study patient would double it.
    cases = {"a1": CaseKey("A", "0"), "a2": CaseKey("A", "1"), "b": CaseKey("B", "2"), "c": CaseKey("C", "3")}
    for seed in range(10):
        a = assign(cases, 0.25, seed)
        assert a.count(VALIDATION) == 1 and a.splits["a1"] == a.splits["a2"] == TRAINING
    # Only multi-study patients: one is still held out (at least one validation patient).
    families = {f"{p}{i}": CaseKey(p, f"{p}{i}") for p in "ABC" for i in range(2)}
    b = assign(families, 0.1, 0)
    assert b.patients_in(VALIDATION) == 1 and b.patients_in(TRAINING) == 2
