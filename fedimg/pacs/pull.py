"""``fedimg pull``: fetch the studies named in a keys CSV from a PACS into a site's raw folder.

For each key (in file order):

1. find the studies whose Accession Number / Study Instance UID equals the key;
2. list every instance of each study (series by series);
3. fetch only the instances not already in the folder (a series with none
   present in one request, otherwise instance by instance);
4. record one manifest row: ``retrieved`` (every listed instance is now in
   the folder), ``not_found`` (no study matches) or ``failed`` (with a reason
   code and a detail), and the counts.

The output folder is claimed as kind ``pull`` (:mod:`fedimg.preprocess.outdir`):
a new or empty folder, or one an earlier pull wrote, locked for the run.
Instances are written once and never replaced (:mod:`fedimg.pacs.store`),
so a re-run, or a run after an interruption, fetches only what is missing.

The console shows counts and the keys as the user typed them; never a
patient name, patient ID, birth date, or a UID or accession number the PACS
sent. The manifest (``DST/pull_manifest.jsonl``) holds the same, plus the
hashed study folder names of each key.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from fedimg.atomic import write_jsonl
from fedimg.pacs.client import InstanceRef, PacsClient
from fedimg.pacs.errors import PacsRequestError
from fedimg.pacs.keys import Key, KeyList
from fedimg.pacs.store import MISSING, OCCUPIED, PRESENT, InstanceStore, study_folder
from fedimg.preprocess.outdir import PULL_MANIFEST, claim, precheck

__all__ = ["FAILED", "MANIFEST", "NOT_FOUND", "RETRIEVED", "KeyOutcome", "PullResult", "pull"]

log = logging.getLogger(__name__)

MANIFEST = PULL_MANIFEST
RETRIEVED, NOT_FOUND, FAILED = "retrieved", "not_found", "failed"
_TABLE_ROWS = 50
_KEY_WIDTH = 64
#: Reasons that mean the connection to the PACS was lost, not that one request was refused.
_LOST = ("connection", "timeout", "association")
_KIND_NAME = {"accession": "accession number", "study_uid": "Study Instance UID"}


@dataclass
class KeyOutcome:
    """What a pull did for one requested key (one manifest row).

    Attributes:
        key: the key as typed.
        key_type: ``accession`` or ``study_uid``.
        line: its line in the keys CSV.
        status: ``retrieved``, ``not_found`` or ``failed``.
        reason: a short code when not retrieved.
        detail: a sentence without identifiers when not retrieved.
        studies: studies matching the key.
        series: series in them.
        instances: instances the PACS listed.
        fetched: instances fetched by this run.
        already_present: instances found in the folder from an earlier run (not fetched again).
        failed: listed instances that are still not in the folder.
        refused: listing entries refused (malformed UIDs, outside the study): not fetched.
        unexpected: instances the PACS sent without being asked (not stored).
        folders: the study folders of this key, relative to the output folder.
    """

    key: str
    key_type: str
    line: int
    status: str = FAILED
    reason: str | None = "interrupted"
    detail: str | None = "the run was stopped before this key was done"
    studies: int = 0
    series: int = 0
    instances: int = 0
    fetched: int = 0
    already_present: int = 0
    failed: int = 0
    refused: int = 0
    unexpected: int = 0
    folders: list[str] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        """The manifest row."""
        return {
            "key": self.key,
            "key_type": self.key_type,
            "line": self.line,
            "status": self.status,
            "reason": self.reason,
            "detail": self.detail,
            "studies": self.studies,
            "series": self.series,
            "instances": self.instances,
            "fetched": self.fetched,
            "already_present": self.already_present,
            "failed": self.failed,
            "refused": self.refused,
            "unexpected": self.unexpected,
            "folders": self.folders,
        }

    def finish(self, errors: list[PacsRequestError]) -> None:
        """Set status, reason and detail from the counts and the errors met."""
        if not errors and self.failed == 0 and self.refused == 0 and self.instances > 0:
            self.status, self.reason, self.detail = RETRIEVED, None, None
            if self.unexpected:
                self.detail = f"{self.unexpected} instances the PACS sent unasked were not stored"
            return
        self.status = FAILED
        if self.instances == 0 and not errors:
            self.reason = "empty"
            self.detail = "the PACS lists no instance in the matching study" + ("ies" if self.studies > 1 else "")
            return
        first = errors[0] if errors else None
        self.reason = first.reason if first else ("incomplete" if self.failed else "refused")
        parts = []
        if self.failed:
            parts.append(f"{self.failed} of {self.instances} listed instances are not in the folder")
        if self.refused:
            parts.append(f"{self.refused} listed instances have malformed UIDs (not fetched)")
        if first:
            parts.append(first.detail)
        self.detail = "; ".join(parts)


@dataclass
class PullResult:
    """The account of one pull.

    Attributes:
        dst: the output folder.
        source: where the studies came from (no credential).
        keys: the keys file as read.
        outcomes: one per key, in file order.
    """

    dst: Path
    source: str
    keys: KeyList
    outcomes: list[KeyOutcome]

    @property
    def manifest_path(self) -> Path:
        return self.dst / MANIFEST

    def count(self, status: str) -> int:
        """Keys with ``status``."""
        return sum(o.status == status for o in self.outcomes)

    @property
    def retrieved(self) -> int:
        """Keys whose studies are complete in the folder."""
        return self.count(RETRIEVED)

    @property
    def fetched(self) -> int:
        """Instances fetched by this run."""
        return sum(o.fetched for o in self.outcomes)

    def table(self) -> str:
        """A summary for the console: counts, and one line per key (the keys as typed, nothing else)."""
        n = len(self.outcomes)
        lines = [
            f"pulled from {self.source} into {self.dst}: {n} key{'s' if n != 1 else ''} -> "
            f"{self.retrieved} retrieved, {self.count(NOT_FOUND)} not found, {self.count(FAILED)} failed"
        ]
        lines.append(
            f"  instances: {self.fetched} fetched, {sum(o.already_present for o in self.outcomes)} already "
            f"present (not fetched again), {sum(o.failed for o in self.outcomes)} missing"
        )
        notes = []
        if self.keys.rows_without_key:
            notes.append(f"{self.keys.rows_without_key} rows with an empty key cell skipped")
        if self.keys.duplicates:
            notes.append(f"{self.keys.duplicates} repeated keys pulled once")
        if notes:
            lines.append(f"  keys file: column {self.keys.column!r}; " + "; ".join(notes))
        width = min(_KEY_WIDTH, max([3] + [len(o.key) for o in self.outcomes]))
        lines.append(
            f"  {'key':<{width}}  {'status':<9}  {'studies':>7}  {'series':>6}  {'fetched':>7}  "
            f"{'present':>7}  {'failed':>6}  reason"
        )
        for o in self.outcomes[:_TABLE_ROWS]:
            lines.append(
                f"  {o.key[:width]:<{width}}  {o.status:<9}  {o.studies:>7}  {o.series:>6}  {o.fetched:>7}  "
                f"{o.already_present:>7}  {o.failed:>6}  {o.reason or ''}"
            )
        if n > _TABLE_ROWS:
            lines.append(f"  ... and {n - _TABLE_ROWS} more keys (see the manifest)")
        lines.append(f"  manifest: {self.manifest_path} (reasons in full, one row per key)")
        return "\n".join(lines)


def pull(client: PacsClient, keys: KeyList, dst: str | Path, progress: bool = True) -> PullResult:
    """Fetch the studies named by ``keys`` from a PACS into ``dst``.

    Args:
        client: a :class:`~fedimg.pacs.client.PacsClient` (not yet opened; closed on return).
        keys: the keys to pull (:func:`~fedimg.pacs.keys.read_keys`).
        dst: the output folder: new, empty, or written by an earlier pull.
        progress: show a progress bar of instances (stderr).

    Returns:
        The account, also written to ``dst/pull_manifest.jsonl``.

    Raises:
        OutputDirError: ``dst`` may not be written (checked before the PACS is contacted).
        PacsError: the PACS cannot be reached or refuses us (nothing written).
    """
    dst = Path(dst)
    precheck(dst, "pull")
    client.open()
    outcomes = [KeyOutcome(key=k.value, key_type=k.type, line=k.line) for k in keys.keys]
    try:
        with claim(dst, "pull") as out:
            store = InstanceStore(out.path)
            bar = tqdm(total=0, unit="instance", desc="pull", disable=not progress, dynamic_ncols=True)
            try:
                for i, (key, outcome) in enumerate(zip(keys.keys, outcomes), start=1):
                    bar.set_description(f"pull (key {i}/{len(outcomes)})", refresh=False)
                    _pull_key(client, store, key, outcome, bar)
                    if outcome.reason in _LOST and not client.ping():
                        # The PACS is gone: the other keys would each wait out their retries in vain.
                        for rest in outcomes[i:]:
                            rest.reason = "unreachable"
                            rest.detail = (
                                "not tried: the PACS stopped answering during the pull; run the same "
                                "command again (instances already fetched are kept)"
                            )
                        break
            finally:
                bar.close()
                # Written however the run ends: keys not done are rows "failed: interrupted".
                write_jsonl(out.path / MANIFEST, [o.row() for o in outcomes])
    finally:
        client.close()
    result = PullResult(dst=dst, source=client.describe(), keys=keys, outcomes=outcomes)
    log.debug("pull: %d keys, %d retrieved, %d instances fetched", len(outcomes), result.retrieved, result.fetched)
    return result


def _pull_key(client: PacsClient, store: InstanceStore, key: Key, outcome: KeyOutcome, bar: Any) -> None:
    problem = key.problem
    if problem is not None:
        outcome.status, outcome.reason = FAILED, "invalid_key"
        outcome.detail = f"the {_KIND_NAME[key.type]} {problem}; not queried"
        return
    try:
        studies = client.find_studies(key)
    except PacsRequestError as exc:
        outcome.status, outcome.reason, outcome.detail = FAILED, exc.reason, exc.detail
        return
    if not studies:
        outcome.status, outcome.reason = NOT_FOUND, "not_found"
        outcome.detail = f"no study with this {_KIND_NAME[key.type]} at the PACS"
        return
    outcome.studies = len(studies)
    outcome.folders = [study_folder(uid) for uid in studies]
    errors: list[PacsRequestError] = []
    for study_uid in studies:
        try:
            listing = client.list_instances(study_uid)
        except PacsRequestError as exc:
            errors.append(exc)
            continue
        outcome.refused += listing.refused
        for series_uid, refs in listing.series().items():
            outcome.series += 1
            outcome.instances += len(refs)
            _pull_series(client, store, study_uid, series_uid, refs, outcome, errors, bar)
    outcome.finish(errors)


def _pull_series(
    client: PacsClient,
    store: InstanceStore,
    study_uid: str,
    series_uid: str,
    refs: list[InstanceRef],
    outcome: KeyOutcome,
    errors: list[PacsRequestError],
    bar: Any,
) -> None:
    try:
        states = {ref.sop_uid: store.state(study_uid, series_uid, ref.sop_uid) for ref in refs}
    except PacsRequestError as exc:  # the series folder is unusable (a planted link): nothing is fetched into it
        outcome.failed += len(refs)
        errors.append(exc)
        return
    outcome.already_present += sum(s == PRESENT for s in states.values())
    occupied = sum(s == OCCUPIED for s in states.values())
    if occupied:
        outcome.failed += occupied
        errors.append(
            PacsRequestError(
                "occupied",
                f"{occupied} instance paths hold something fedimg did not write (a link or a folder); left as they are",
            )
        )
    missing = [ref for ref in refs if states[ref.sop_uid] == MISSING]
    if not missing:
        return
    expected = {ref.sop_uid for ref in missing}

    def deliver(study: str, series: str, sop: str, data: bytes) -> None:
        if study != study_uid or series != series_uid or sop not in expected:
            outcome.unexpected += 1
            raise PacsRequestError(
                "unexpected_instance",
                "the PACS sent an instance that was not asked for (another study or series, or a repeat); not stored",
            )
        expected.discard(sop)  # a second copy is refused
        if store.write(study, series, sop, data):
            outcome.fetched += 1
        bar.update(1)

    bar.total += len(missing)
    bar.refresh()
    try:
        client.retrieve(study_uid, series_uid, missing, whole_series=len(missing) == len(refs), deliver=deliver)
    except PacsRequestError as exc:
        if exc.reason != "unexpected_instance":  # counted in deliver; what was asked for is judged below
            errors.append(exc)
    still = sum(store.state(study_uid, series_uid, ref.sop_uid) != PRESENT for ref in missing)
    outcome.failed += still
    if still:
        bar.total -= still
        bar.refresh()
