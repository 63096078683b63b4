"""What ``fedimg pull`` asks of a PACS, whatever the protocol.

:mod:`fedimg.pacs.dicomweb` (QIDO-RS, WADO-RS) and :mod:`fedimg.pacs.dimse`
(C-FIND, C-GET) implement :class:`PacsClient`; :mod:`fedimg.pacs.pull`
drives either. A client hands over what it retrieved through a
:data:`Deliver` callback and keeps nothing: validating and storing is the
caller's job, in one place for both protocols.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from fedimg.pacs.keys import Key

__all__ = ["Deliver", "InstanceRef", "PacsClient", "StudyListing"]

#: ``deliver(study_uid, series_uid, sop_uid, part10_bytes)``, with the UIDs read from the received
#: instance itself; raises :class:`~fedimg.pacs.errors.PacsRequestError` when it refuses the instance.
Deliver = Callable[[str, str, str, bytes], None]


@dataclass(frozen=True)
class InstanceRef:
    """One instance the PACS listed (UIDs already checked with :func:`~fedimg.safepath.is_uid`).

    Attributes:
        series_uid: its Series Instance UID.
        sop_uid: its SOP Instance UID.
        sop_class_uid: its SOP Class UID, when the PACS said (DIMSE needs it to offer storage contexts).
    """

    series_uid: str
    sop_uid: str
    sop_class_uid: str | None = None


@dataclass
class StudyListing:
    """The instances of one study, as the PACS listed them.

    Attributes:
        study_uid: the study.
        instances: unique instances with valid UIDs.
        refused: entries dropped because a UID was malformed or outside the study.
    """

    study_uid: str
    instances: list[InstanceRef] = field(default_factory=list)
    refused: int = 0

    def series(self) -> dict[str, list[InstanceRef]]:
        """Instances grouped by series, in listing order."""
        out: dict[str, list[InstanceRef]] = {}
        for ref in self.instances:
            out.setdefault(ref.series_uid, []).append(ref)
        return out


class PacsClient(Protocol):
    """A connection to a PACS that can search and retrieve studies."""

    def describe(self) -> str:
        """Where the PACS is, for messages (never a credential)."""
        ...

    def open(self) -> None:
        """Connect and check that the PACS answers queries.

        Raises:
            PacsError: the PACS cannot be reached, refuses us, or does not support what a pull needs.
        """
        ...

    def close(self) -> None:
        """Release connections (safe to call twice)."""
        ...

    def ping(self) -> bool:
        """Whether the PACS answers now (one try, no back-off): asked after a request failed to connect."""
        ...

    def find_studies(self, key: Key) -> list[str]:
        """Study Instance UIDs matching ``key`` exactly (answers that do not match are dropped).

        Raises:
            PacsRequestError: the query failed.
        """
        ...

    def list_instances(self, study_uid: str) -> StudyListing:
        """Every instance of a study.

        Raises:
            PacsRequestError: the query failed.
        """
        ...

    def retrieve(
        self, study_uid: str, series_uid: str, wanted: list[InstanceRef], whole_series: bool, deliver: Deliver
    ) -> None:
        """Fetch instances of one series and hand each to ``deliver``.

        Args:
            study_uid: the study.
            series_uid: the series.
            wanted: the instances to fetch.
            whole_series: ``wanted`` is the whole series: fetch it in one request.
            deliver: called once per instance received.

        Raises:
            PacsRequestError: the retrieval failed (instances delivered before stay stored).
        """
        ...
