"""Pull over DIMSE: C-FIND to find studies and list instances, C-GET to retrieve them.

Built on ``pynetdicom``, Study Root information model. C-GET brings the
instances back on the same association (no C-MOVE: the PACS never has to
reach back into the site's network). For each study, fedimg offers storage
contexts for exactly the SOP classes the PACS listed, each with every
transfer syntax pynetdicom knows, so the archive can send what it stores
without transcoding.

Every answer is peer input: a study is taken only if its Accession Number or
Study Instance UID equals the key; a UID only if it is one
(:func:`~fedimg.safepath.is_uid`); a C-STORE whose instance was not asked
for, or whose UIDs disagree with its command, is refused. Error details
carry status codes, never a dataset's content.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

from fedimg.pacs.client import Deliver, InstanceRef, StudyListing
from fedimg.pacs.errors import PacsError, PacsRequestError
from fedimg.pacs.keys import Key
from fedimg.pacs.source import DimseSource
from fedimg.safepath import is_uid

__all__ = ["DimseClient"]

log = logging.getLogger(__name__)

#: UIDs per IMAGE-level C-GET (a list of UIDs is one attribute value; keep it well under any PDU limit).
GET_BATCH = 200
#: PS3.8: at most 128 presentation contexts per association; one is C-GET's.
MAX_STORAGE_CONTEXTS = 127
_PENDING = (0xFF00, 0xFF01)
_STORE_REFUSED = 0xC000  # "Cannot understand": the instance was not one we asked for
_STORE_OUT_OF_RESOURCES = 0xA700
# Study Root Query/Retrieve Information Model FIND and GET (PS3.4 C.6.2). pynetdicom creates its named SOP class
# objects with globals() at import time, out of a type checker's sight; uid_to_sop_class returns the same objects.
_STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
_STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"


def _uid_of(ds: Any, keyword: str) -> str | None:
    value = ds.get(keyword) if ds is not None else None
    return str(value) if value is not None and is_uid(str(value)) else None


class DimseClient:
    """A :class:`~fedimg.pacs.client.PacsClient` for a DICOM node (C-FIND and C-GET SCP)."""

    def __init__(self, source: DimseSource) -> None:
        self.source = source
        self._query: Any = None

    def describe(self) -> str:
        return f"DICOM node {self.source.describe()}"

    # ------------------------------------------------------------------ associations

    def _ae(self) -> Any:
        from pynetdicom import AE

        ae = AE(ae_title=self.source.calling_aet)
        t = self.source.timeout_s
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = t
        return ae

    def _associate(self, ae: Any, **kwargs: Any) -> Any:
        s = self.source
        return ae.associate(s.host, s.port, ae_title=s.called_aet, **kwargs)

    def _association_error(self, assoc: Any) -> str:
        s = self.source
        if assoc.is_rejected:
            return (
                f"{self.describe()} rejected the association: expected it to accept called AET {s.called_aet} "
                f"from calling AET {s.calling_aet}; check --called-aet and register --calling-aet at the PACS "
                "(with C-FIND and C-GET rights)"
            )
        return (
            f"{self.describe()} accepted the connection but no association was established (aborted or timed "
            "out): expected a DICOM node at that port; check --called-aet and the PACS's log"
        )

    def open(self) -> None:
        from pynetdicom.sop_class import uid_to_sop_class

        find_model, get_model = uid_to_sop_class(_STUDY_ROOT_FIND), uid_to_sop_class(_STUDY_ROOT_GET)

        s = self.source
        try:
            with socket.create_connection((s.host, s.port), timeout=s.timeout_s):
                pass
        except OSError as exc:
            raise PacsError(
                f"cannot reach {self.describe()} ({type(exc).__name__}): expected a DICOM node "
                "listening there; check the host, the port and the network"
            ) from None
        ae = self._ae()
        ae.add_requested_context(find_model)
        ae.add_requested_context(get_model)
        assoc = self._associate(ae)
        if not assoc.is_established:
            raise PacsError(self._association_error(assoc))
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        missing = [name for name, uid in (("C-FIND", find_model), ("C-GET", get_model)) if str(uid) not in accepted]
        if missing:
            assoc.release()
            raise PacsError(
                f"{self.describe()} does not accept Study Root {' and '.join(missing)} from calling AET "
                f"{s.calling_aet}: expected both (fedimg pulls with C-GET, not C-MOVE); allow them for "
                "this AE title at the PACS"
            )
        self._query = assoc

    def ping(self) -> bool:
        if self._query is not None:
            self._query.abort()
            self._query = None
        try:
            self._query_assoc()
        except PacsRequestError:
            return False
        return True

    def close(self) -> None:
        if self._query is not None:
            try:
                if self._query.is_established:
                    self._query.release()
            except Exception:  # noqa: BLE001
                self._query.abort()
            self._query = None

    def _query_assoc(self) -> Any:
        """The query association, opened again if the PACS dropped it."""
        if self._query is None or not self._query.is_established:
            from pynetdicom.sop_class import uid_to_sop_class

            ae = self._ae()
            ae.add_requested_context(uid_to_sop_class(_STUDY_ROOT_FIND))
            assoc = self._associate(ae)
            if not assoc.is_established:
                raise PacsRequestError("association", self._association_error(assoc))
            self._query = assoc
        return self._query

    # ------------------------------------------------------------------ queries

    def _find(self, identifier: Any, what: str) -> list[Any]:
        from pynetdicom.sop_class import uid_to_sop_class

        assoc = self._query_assoc()
        out = []
        try:
            for status, answer in assoc.send_c_find(identifier, uid_to_sop_class(_STUDY_ROOT_FIND)):
                code = getattr(status, "Status", None)
                if code is None:
                    self._query = None
                    raise PacsRequestError(
                        "connection", f"{what} (C-FIND): no answer (the association was aborted or timed out)"
                    )
                if code in _PENDING:
                    if answer is not None:
                        out.append(answer)
                elif code == 0x0000:
                    break
                else:
                    raise PacsRequestError("dimse_status", f"{what} (C-FIND) ended with status 0x{code:04X}")
        except (RuntimeError, OSError, ValueError) as exc:  # pynetdicom: the association went away mid-request
            self._query = None
            raise PacsRequestError("connection", f"{what} (C-FIND) failed ({type(exc).__name__})") from None
        return out

    def find_studies(self, key: Key) -> list[str]:
        from pydicom.dataset import Dataset

        ident = Dataset()
        ident.QueryRetrieveLevel = "STUDY"
        if key.type == "accession":
            ident.AccessionNumber = key.value
            ident.StudyInstanceUID = ""
            match = "AccessionNumber"
        else:
            ident.StudyInstanceUID = key.value
            match = "StudyInstanceUID"
        found: list[str] = []
        for answer in self._find(ident, "study search"):
            uid = _uid_of(answer, "StudyInstanceUID")
            got = answer.get(match)
            if uid and got is not None and str(got).strip() == key.value and uid not in found:
                found.append(uid)
        return found

    def list_instances(self, study_uid: str) -> StudyListing:
        from pydicom.dataset import Dataset

        listing = StudyListing(study_uid=study_uid)
        ident = Dataset()
        ident.QueryRetrieveLevel = "SERIES"
        ident.StudyInstanceUID = study_uid
        ident.SeriesInstanceUID = ""
        series_uids: list[str] = []
        for answer in self._find(ident, "series search"):
            uid = _uid_of(answer, "SeriesInstanceUID")
            if uid is None or answer.get("StudyInstanceUID", study_uid) != study_uid:
                listing.refused += 1
            elif uid not in series_uids:
                series_uids.append(uid)
        seen: set[str] = set()
        for series_uid in series_uids:
            ident = Dataset()
            ident.QueryRetrieveLevel = "IMAGE"
            ident.StudyInstanceUID = study_uid
            ident.SeriesInstanceUID = series_uid
            ident.SOPInstanceUID = ""
            ident.SOPClassUID = ""
            for answer in self._find(ident, "instance search"):
                sop = _uid_of(answer, "SOPInstanceUID")
                if sop is None or answer.get("SeriesInstanceUID", series_uid) != series_uid:
                    listing.refused += 1
                    continue
                if sop not in seen:
                    seen.add(sop)
                    listing.instances.append(InstanceRef(series_uid, sop, _uid_of(answer, "SOPClassUID")))
        return listing

    # ------------------------------------------------------------------ retrieval

    def retrieve(
        self, study_uid: str, series_uid: str, wanted: list[InstanceRef], whole_series: bool, deliver: Deliver
    ) -> None:
        from pydicom.dataset import Dataset
        from pynetdicom import ALL_TRANSFER_SYNTAXES, StoragePresentationContexts, build_role, evt
        from pynetdicom.sop_class import uid_to_sop_class

        classes = sorted({str(ref.sop_class_uid) for ref in wanted if ref.sop_class_uid})
        if any(ref.sop_class_uid is None for ref in wanted):
            # The PACS did not say every SOP class: offer the common storage classes as well.
            classes += [
                str(cx.abstract_syntax) for cx in StoragePresentationContexts if str(cx.abstract_syntax) not in classes
            ]
        classes = classes[:MAX_STORAGE_CONTEXTS]
        refused: list[PacsRequestError] = []

        def on_store(event: Any) -> int:
            try:
                ds = event.dataset
                study, series, sop = (
                    str(ds.get(k, "")) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
                )
                if sop != str(event.request.AffectedSOPInstanceUID):
                    raise PacsRequestError(
                        "bad_response",
                        "a C-STORE named another SOP Instance UID than its instance holds (refused, not stored)",
                    )
                deliver(study, series, sop, event.encoded_dataset())
                return 0x0000
            except PacsRequestError as exc:
                refused.append(exc)
                return _STORE_OUT_OF_RESOURCES if exc.reason == "write_failed" else _STORE_REFUSED
            except Exception as exc:  # noqa: BLE001 - a handler must answer, whatever happened
                refused.append(
                    PacsRequestError("bad_response", f"an instance could not be read ({type(exc).__name__})")
                )
                return _STORE_REFUSED

        ae = self._ae()
        get_model = uid_to_sop_class(_STUDY_ROOT_GET)
        ae.add_requested_context(get_model)
        for uid in classes:
            ae.add_requested_context(uid, ALL_TRANSFER_SYNTAXES)
        roles = [build_role(uid, scp_role=True) for uid in classes]
        assoc = self._associate(ae, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, on_store)])
        if not assoc.is_established:
            raise PacsRequestError("association", self._association_error(assoc))
        try:
            if whole_series:
                batches: list[list[str] | None] = [None]
            else:
                uids = [ref.sop_uid for ref in wanted]
                batches = [uids[i : i + GET_BATCH] for i in range(0, len(uids), GET_BATCH)]
            for batch in batches:
                ident = Dataset()
                ident.QueryRetrieveLevel = "SERIES" if batch is None else "IMAGE"
                ident.StudyInstanceUID = study_uid
                ident.SeriesInstanceUID = series_uid
                if batch is not None:
                    ident.SOPInstanceUID = batch
                self._get(assoc, ident, get_model)
        finally:
            if assoc.is_established:
                assoc.release()
            else:
                assoc.abort()
        if refused:
            raise refused[0]

    @staticmethod
    def _get(assoc: Any, identifier: Any, model: Any) -> None:
        final = None
        try:
            for status, _ in assoc.send_c_get(identifier, model):
                code = getattr(status, "Status", None)
                if code is None:
                    raise PacsRequestError(
                        "connection", "retrieval (C-GET): no answer (the association was aborted or timed out)"
                    )
                if code not in _PENDING:
                    final = code
        except (RuntimeError, OSError, ValueError) as exc:  # pynetdicom: the association went away mid-request
            raise PacsRequestError("connection", f"retrieval (C-GET) failed ({type(exc).__name__})") from None
        if final not in (0x0000, 0xB000):  # 0xB000: some sub-operations failed; the caller counts what arrived
            raise PacsRequestError("dimse_status", f"retrieval (C-GET) ended with status 0x{final or 0:04X}")
