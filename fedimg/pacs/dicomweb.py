"""Pull over DICOMweb: QIDO-RS to find studies and list instances, WADO-RS to retrieve them.

Built on ``dicomweb-client``. Instances are requested in the transfer syntax
the archive stores (``transfer-syntax=*``), so compressed data arrive as
stored rather than decompressed by the server.

Every answer is peer input: a study is taken only if its Accession Number or
Study Instance UID equals the key, a UID only if it is one
(:func:`~fedimg.safepath.is_uid`), and error details carry HTTP status
codes and exception class names, never the peer's text or a URL (URLs hold
UIDs).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable
from typing import Any

from fedimg.pacs.client import Deliver, InstanceRef, StudyListing
from fedimg.pacs.errors import PacsError, PacsRequestError
from fedimg.pacs.keys import Key
from fedimg.pacs.source import DicomWebSource
from fedimg.safepath import is_uid

__all__ = ["DicomWebClient"]

log = logging.getLogger(__name__)

STUDY_UID, SERIES_UID, SOP_UID, SOP_CLASS_UID, ACCESSION = "0020000D", "0020000E", "00080018", "00080016", "00080050"
#: Whatever transfer syntax the archive holds (PS3.18 8.7.3.5.2).
ANY_TRANSFER_SYNTAX = (("application/dicom", "*"),)
#: Attempts per request during a pull (the probe tries once).
RETRY_ATTEMPTS = 3
#: A syntactically valid UID that no archive holds: the probe's query matches nothing.
_PROBE_UID = "1.2.826.0.1.3680043.10.543.0.404"


def _first(item: Any, tag: str) -> str | None:
    """The first value of ``tag`` in a DICOM JSON object, if it is a string."""
    if not isinstance(item, dict):
        return None
    element = item.get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    if isinstance(values, list) and values and isinstance(values[0], str):
        return values[0]
    return None


def _request_error(exc: BaseException, what: str) -> PacsRequestError:
    """A manifest-ready error for a failed HTTP exchange (no URL, no server text)."""
    import requests

    if isinstance(exc, requests.exceptions.HTTPError) and exc.response is not None:
        code = exc.response.status_code
        return PacsRequestError(f"http_{code}", f"{what}: the DICOMweb service answered HTTP {code}")
    if isinstance(exc, requests.exceptions.SSLError):
        return PacsRequestError("tls", f"{what}: the server's TLS certificate could not be verified (SSLError)")
    if isinstance(exc, requests.exceptions.Timeout):
        return PacsRequestError("timeout", f"{what}: no answer within the timeout ({type(exc).__name__})")
    if isinstance(exc, requests.exceptions.ConnectionError):
        return PacsRequestError("connection", f"{what}: the connection failed ({type(exc).__name__})")
    return PacsRequestError("bad_response", f"{what}: the answer could not be read ({type(exc).__name__})")


def _session(ca_bundle: str | None) -> Any:
    """A ``requests`` session that verifies TLS with ``ca_bundle`` when one is given.

    ``requests`` lets the environment (``REQUESTS_CA_BUNDLE``, ``CURL_CA_BUNDLE``) override a session's
    ``verify``; an explicit ``--ca-bundle`` must win over it, so the merge is corrected here.
    """
    import requests

    class _Session(requests.Session):
        def merge_environment_settings(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
            settings = super().merge_environment_settings(*args, **kwargs)
            if ca_bundle:
                settings["verify"] = ca_bundle
            return settings

    session = _Session()
    session.verify = ca_bundle or True
    return session


class DicomWebClient:
    """A :class:`~fedimg.pacs.client.PacsClient` for a DICOMweb service."""

    def __init__(self, source: DicomWebSource) -> None:
        self.source = source
        self._client: Any = None
        self._session: Any = None

    def describe(self) -> str:
        return f"DICOMweb {self.source.describe()}"

    # ------------------------------------------------------------------ connection

    def open(self) -> None:
        from dicomweb_client.api import DICOMwebClient

        session = _session(self.source.ca_bundle)
        if self.source.auth is not None:
            if self.source.auth.scheme == "basic":
                user, _, password = self.source.auth.secret.partition(":")
                session.auth = (user, password)
            else:
                session.headers.update(self.source.auth.header())
        self._session = session
        self._client = DICOMwebClient(self.source.url.rstrip("/"), session=session, timeout=self.source.timeout_s)
        try:
            self._probe()
        except Exception as exc:  # noqa: BLE001 - every failure becomes one line
            err = _request_error(exc, "probe")
            self.close()
            raise PacsError(self._probe_message(err)) from None

    def _probe(self) -> None:
        """One QIDO-RS search that matches nothing, tried once (no back-off)."""
        api = self._api()
        api.set_http_retry_params(retry=False)
        try:
            api.search_for_studies(search_filters={"StudyInstanceUID": _PROBE_UID}, fields=["StudyInstanceUID"])
        finally:
            # The pull itself retries a failed request (connection errors, HTTP 408/429/503/504) after 1 s and 2 s.
            api.set_http_retry_params(retry=True, max_attempts=RETRY_ATTEMPTS, wait_exponential_multiplier=500)

    def ping(self) -> bool:
        try:
            self._probe()
        except Exception:  # noqa: BLE001
            return False
        return True

    def _probe_message(self, err: PacsRequestError) -> str:
        where = self.describe()
        if err.reason in ("http_401", "http_403"):
            have = (
                f"--auth {self.source.auth.scheme} from {self.source.auth.origin}"
                if self.source.auth
                else "no credentials"
            )
            return (
                f"{where} refused the query ({err.reason.replace('_', ' ').upper()}) with {have}: expected "
                "credentials it accepts; pass --auth basic|bearer with --credentials-file FILE"
            )
        if err.reason == "http_404":
            return (
                f"{where} answered HTTP 404 to a QIDO-RS study search: expected the DICOMweb service root "
                "(the URL before /studies, e.g. https://pacs.example.org/dicom-web)"
            )
        if err.reason == "tls":
            return (
                f"{where}: the server's TLS certificate could not be verified: pass --ca-bundle FILE with the "
                "CA that issued it"
            )
        if err.reason in ("connection", "timeout"):
            return (
                f"cannot reach {where} ({err.detail.split(': ', 1)[-1]}): expected a running DICOMweb "
                "service at that URL; check the address, the port and the network"
            )
        return f"{where} did not answer a QIDO-RS study search as expected ({err.detail}): check the URL"

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
        self._client = self._session = None

    def _api(self) -> Any:
        if self._client is None:
            raise RuntimeError("DicomWebClient.open() was not called")
        return self._client

    # ------------------------------------------------------------------ queries

    def find_studies(self, key: Key) -> list[str]:
        if key.type == "accession":
            filters, fields, match_tag = (
                {"AccessionNumber": key.value},
                ["StudyInstanceUID", "AccessionNumber"],
                ACCESSION,
            )
        else:
            filters, fields, match_tag = {"StudyInstanceUID": key.value}, ["StudyInstanceUID"], STUDY_UID
        try:
            answers = self._api().search_for_studies(search_filters=filters, fields=fields, get_remaining=True)
        except Exception as exc:  # noqa: BLE001
            raise _request_error(exc, "study search (QIDO-RS)") from None
        found: list[str] = []
        for item in answers if isinstance(answers, list) else []:
            uid = _first(item, STUDY_UID)
            matched = _first(item, match_tag)
            # An answer whose key differs (a server that matches loosely) or lacks it is not taken.
            if is_uid(uid) and matched is not None and matched.strip() == key.value and uid not in found:
                found.append(str(uid))
        return found

    def list_instances(self, study_uid: str) -> StudyListing:
        try:
            answers = self._api().search_for_instances(
                study_instance_uid=study_uid,
                fields=["SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"],
                get_remaining=True,
            )
        except Exception as exc:  # noqa: BLE001
            raise _request_error(exc, "instance search (QIDO-RS)") from None
        return self._listing(study_uid, answers if isinstance(answers, list) else [])

    @staticmethod
    def _listing(study_uid: str, answers: Iterable[Any]) -> StudyListing:
        listing = StudyListing(study_uid=study_uid)
        seen: set[str] = set()
        for item in answers:
            series, sop, cls = _first(item, SERIES_UID), _first(item, SOP_UID), _first(item, SOP_CLASS_UID)
            in_study = _first(item, STUDY_UID) in (None, study_uid)
            if not (in_study and is_uid(series) and is_uid(sop)):
                listing.refused += 1
                continue
            if sop in seen:
                continue
            seen.add(str(sop))
            listing.instances.append(InstanceRef(str(series), str(sop), cls if is_uid(cls) else None))
        return listing

    # ------------------------------------------------------------------ retrieval

    def retrieve(
        self, study_uid: str, series_uid: str, wanted: list[InstanceRef], whole_series: bool, deliver: Deliver
    ) -> None:
        api = self._api()
        if whole_series:
            try:
                self._deliver_all(api.iter_series(study_uid, series_uid, media_types=ANY_TRANSFER_SYNTAX), deliver)
            except PacsRequestError:
                raise
            except Exception as exc:  # noqa: BLE001
                raise _request_error(exc, "series retrieval (WADO-RS)") from None
            return
        first: PacsRequestError | None = None
        for ref in wanted:
            try:
                ds = api.retrieve_instance(study_uid, series_uid, ref.sop_uid, media_types=ANY_TRANSFER_SYNTAX)
                self._deliver_all([ds], deliver)
            except PacsRequestError as exc:
                if exc.reason == "write_failed":
                    raise
                first = first or exc
            except Exception as exc:  # noqa: BLE001
                err = _request_error(exc, "instance retrieval (WADO-RS)")
                if err.reason in ("connection", "timeout", "tls"):
                    raise err from None  # the service is gone: the next instances would fail alike
                first = first or err
        if first is not None:
            raise first

    @staticmethod
    def _deliver_all(datasets: Iterable[Any], deliver: Deliver) -> None:
        """Encode each received dataset as a DICOM file and deliver it; raise the first refusal at the end."""
        import pydicom

        refused: PacsRequestError | None = None
        for ds in datasets:
            study, series, sop = (
                str(ds.get(k, "")) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
            )
            buf = io.BytesIO()
            try:
                pydicom.dcmwrite(buf, ds, enforce_file_format=True)
            except Exception as exc:  # noqa: BLE001 - a part we cannot encode is not stored
                refused = refused or PacsRequestError(
                    "bad_response", f"an instance could not be encoded as a DICOM file ({type(exc).__name__})"
                )
                continue
            try:
                deliver(study, series, sop, buf.getvalue())
            except PacsRequestError as exc:
                if exc.reason == "write_failed":
                    raise
                refused = refused or exc  # one bad part does not stop the others
        if refused is not None:
            raise refused
