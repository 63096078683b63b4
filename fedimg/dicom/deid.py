"""De-identification engine: PS3.15 Annex E basic profile with keyed pseudonyms.

Implements the de-identification contract of docs/deidentification.md:

* the Basic Application Level Confidentiality Profile (DCM 113100), applied
  from ONE pinned edition of Table E.1-1 (:data:`TABLE_EDITION`, 2024b), with
  the options Retain Longitudinal Temporal Information with Modified Dates
  (DCM 113107), Clean Descriptors through an allow-list (DCM 113105) and,
  only when covariates are named, Retain Patient Characteristics
  (DCM 113108);
* every pseudonym, remapped UID and date offset derived with HMAC-SHA256
  from a per-site secret (:class:`SiteSecret`, :class:`Pseudonymizer`);
  there is no default secret;
* private attributes removed unless allow-listed; overlays (60xx,xxxx) and
  curves (50xx,xxxx) removed;
* :func:`burned_in_risk` for objects that may carry burned-in text.

Source of the action table (see :mod:`fedimg.dicom.deid_table`)
----------------------------------------------------------------
Three well-kept libraries were evaluated (PyPI, 2026):

* ``dicom-anonymizer`` 2.1.0 (KitwareMedical) — CHOSEN as the source of
  the table. It ships Table E.1-1 as per-action tag lists, one module per
  edition (2023e, 2024b and a newer one), with every action class of the
  basic profile column (X, Z, D, U, Z/D, X/Z, X/D, X/Z/D, X/Z/U*, including
  masked repeating groups such as (50xx,xxxx) and (60xx,3000)), so an
  edition can be pinned by module name. Its own engine is not used: it
  replaces UIDs and dates with process-random values (no keyed, reproducible
  pseudonyms across runs, no per-patient date offset) and it does not
  carry the option columns; fedimg applies the actions itself.
* ``dicognito`` 0.19 — a complete anonymizer with salted, reproducible
  output, but it is a hand-curated set of element handlers (names,
  addresses, IDs, dates, UIDs), not a mapping of Table E.1-1 to actions, and
  it names no edition; its replacement values (fake names/addresses) and
  date shifting are its own, not keyed HMAC; it could not give the
  per-attribute conformance the contract asks for.
* pydicom's ``deid`` 0.4 — a recipe language (REMOVE/BLANK/REPLACE/JITTER)
  with a default recipe that is a curated list, not an edition of Table
  E.1-1, plus pixel "graylist" filters; pinning an edition would mean
  hand-writing the table as a recipe.

fedimg's keyed layer on top of the table
----------------------------------------
* U: UIDs -> ``2.25.<int>`` via :meth:`Pseudonymizer.uid`, at every nesting
  level and in the file meta (0002,0003) Media Storage SOP Instance UID, so
  references (Referenced SOP Instance UID (0008,1155), Series/Study Instance
  UID, Frame of Reference UID (0020,0052), ...) still resolve. SOP Class
  UIDs, Transfer Syntax UIDs and any UID under the DICOM root
  ``1.2.840.10008.`` are never changed (class UIDs are not in the table).
* (0010,0010) Patient's Name and (0010,0020) Patient ID -> the patient
  pseudonym :meth:`Pseudonymizer.patient` (a dummy value, allowed by Z and
  Z/D).
* Modified Dates option: every DA and DT value (listed in the table or not)
  is shifted by the per-patient offset :meth:`Pseudonymizer.date_offset_days`
  and every TM value by the per-patient offset
  :meth:`Pseudonymizer.time_offset_seconds` (modulo a day; DT values shift
  date and time together), except (0010,0032) Patient's Birth Time (X).
  (0010,0030) Patient's Birth Date stays emptied (Z) on purpose: age is a
  patient characteristic (0010,1010) and only kept as a named covariate.
* Clean Descriptors: a descriptor in :data:`DESCRIPTORS` is kept only if
  its value is on the allow-list; otherwise its basic action applies
  (X, X/D and X/Z remove it; Z/D empties it).
* Retain Patient Characteristics: an attribute of
  :data:`PATIENT_CHARACTERISTICS` is kept only if named in ``covariates``.
* Combined codes pick the strongest choice: X/Z, X/D, X/Z/D remove; Z/D
  empties; X/Z/U* sequences are kept with their UIDs remapped (so
  (0008,2112) Source Image Sequence still points at the de-identified
  source); D on a sequence de-identifies its items recursively; D on other
  VRs writes a dummy of the VR.
* Tags absent from the table are kept (basic profile), after recursion into
  sequences.
"""

from __future__ import annotations

import base64
import copy
import datetime as _dt
import hashlib
import hmac
import os
import secrets
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import Tag

from fedimg.dicom.deid_table import (
    DESCRIPTOR_TAGS,
    DESCRIPTORS,
    ENGINE,
    PATIENT_CHARACTERISTIC_TAGS,
    PATIENT_CHARACTERISTICS,
    TABLE,
    TABLE_EDITION,
)
from fedimg.errors import UserError
from fedimg.safepath import is_uid

__all__ = [
    "DESCRIPTORS",
    "ENGINE",
    "OPTION_CODES",
    "PATIENT_CHARACTERISTICS",
    "TABLE_EDITION",
    "DeidError",
    "Pseudonymizer",
    "SiteSecret",
    "burned_in_risk",
    "deidentify",
    "series_burned_in_risk",
]

#: Minimum secret length in bytes (after stripping whitespace).
MIN_SECRET_BYTES = 16
#: Date offsets are drawn from this closed range of days (negative: shifted
#: into the past), identical for every study of one patient.
DATE_OFFSET_RANGE = (-3650, -365)

_FIX_SECRET = (
    "create one with: umask 077; head -c 32 /dev/urandom | base64 > site.secret; "
    "chmod 600 site.secret; then pass it with --secret-file site.secret or set "
    "FEDIMG_SECRET_FILE=/path/to/site.secret"
)

#: (0012,0064) De-identification Method Code Sequence entries (CID 7050).
OPTION_CODES: dict[str, str] = {
    "113100": "Basic Application Confidentiality Profile",
    "113105": "Clean Descriptors Option",
    "113107": "Retain Longitudinal Temporal Information Modified Dates Option",
    "113108": "Retain Patient Characteristics Option",
}

_DICOM_ROOT = "1.2.840.10008."
_PATIENT_NAME = 0x00100010
_PATIENT_ID = 0x00100020
_BIRTH_DATE = 0x00100030
_BIRTH_TIME = 0x00100032
_SOP_INSTANCE_UID = 0x00080018
_DEID_TAGS = (0x00120062, 0x00120063, 0x00120064, 0x00280303)
#: File meta elements kept; the rest (e.g. (0002,0016) Source Application
#: Entity Title, (0002,0100) Private Information Creator UID) is dropped.
_META_KEEP = (0x00020001, 0x00020002, 0x00020003, 0x00020010, 0x00020012, 0x00020013)


class DeidError(UserError, ValueError):
    """De-identification cannot proceed; the message carries no PHI or secret."""


# --------------------------------------------------------------------------
# Site secret
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class SiteSecret:
    """The per-site key for all pseudonyms. Its value never appears in repr.

    Attributes:
        source: where it was read from (a path; not secret).
    """

    _key: bytes = field(repr=False)
    source: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self._key, bytes) or len(self._key.strip()) < MIN_SECRET_BYTES:
            raise DeidError(f"a site secret must be at least {MIN_SECRET_BYTES} bytes of random data; {_FIX_SECRET}")

    @property
    def key(self) -> bytes:
        """The raw key bytes (keep inside the site)."""
        return self._key

    @property
    def fingerprint(self) -> str:
        """A short, non-reversible identifier of the secret, safe for logs."""
        return hmac.new(self._key, b"fedimg-deid/fingerprint", hashlib.sha256).hexdigest()[:12]

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None, env: str = "FEDIMG_SECRET_FILE") -> SiteSecret:
        """Read the site secret from ``path``, else from the file named by ``env``.

        Args:
            path: the secret file; None to use the environment variable.
            env: name of the environment variable holding the file's path.

        Returns:
            The loaded secret.

        Raises:
            DeidError: no file given, or the file is missing, not a regular
                file, readable/writable by group or others, or shorter than
                :data:`MIN_SECRET_BYTES` after stripping whitespace.
        """
        if path is None or str(path) == "":
            env_value = os.environ.get(env, "")
            if not env_value:
                raise DeidError(
                    "no site secret: de-identification needs a per-site secret file and there is "
                    f"no default; expected --secret-file PATH or the environment variable {env}, "
                    f"found neither; {_FIX_SECRET}"
                )
            path = env_value
            origin = f"(from {env}) "
        else:
            origin = ""
        p = Path(path)
        try:
            st = os.stat(p)
        except FileNotFoundError:
            raise DeidError(
                f"site secret file {origin}{p} does not exist; expected an existing owner-only file; {_FIX_SECRET}"
            ) from None
        except OSError as exc:
            raise DeidError(
                f"site secret file {origin}{p} cannot be examined ({type(exc).__name__}); "
                f"expected a readable owner-only file; {_FIX_SECRET}"
            ) from None
        if not stat.S_ISREG(st.st_mode):
            raise DeidError(
                f"site secret file {origin}{p} is not a regular file; expected a regular file "
                f"with mode 0600; {_FIX_SECRET}"
            )
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise DeidError(
                f"site secret file {origin}{p} has mode {mode:04o}, readable or writable by group "
                f"or others; expected owner-only permissions (0600 or 0400); fix with: chmod 600 {p}"
            )
        try:
            key = p.read_bytes().strip()
        except OSError as exc:
            raise DeidError(
                f"site secret file {origin}{p} cannot be read ({type(exc).__name__}); "
                f"expected a file readable by this user; {_FIX_SECRET}"
            ) from None
        if len(key) < MIN_SECRET_BYTES:
            found = "is empty" if not key else f"holds {len(key)} bytes"
            raise DeidError(
                f"site secret file {origin}{p} {found}; expected at least {MIN_SECRET_BYTES} bytes "
                f"of random data; {_FIX_SECRET}"
            )
        return cls(key, str(p))

    @classmethod
    def generate(cls, path: str | os.PathLike[str]) -> SiteSecret:
        """Write a new random secret (32 bytes, base64) with mode 0600, atomically.

        The file is written under a temporary name in the same folder and
        hard-linked into place, so ``path`` is either absent or complete,
        and an existing file is never overwritten.

        Args:
            path: the file to create; its folder must exist.

        Returns:
            The new secret, loaded back from ``path``.

        Raises:
            DeidError: ``path`` already exists or cannot be written.
        """
        p = Path(path)
        if p.exists() or p.is_symlink():
            raise DeidError(
                f"site secret file {p} already exists; refusing to overwrite it (delete it deliberately first)"
            )
        tmp = p.with_name(f".{p.name}.{secrets.token_hex(8)}.tmp")
        data = base64.b64encode(secrets.token_bytes(32)) + b"\n"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.fchmod(fd, 0o600)
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(tmp, p)
            except FileExistsError:
                raise DeidError(f"site secret file {p} already exists; refusing to overwrite it") from None
        except OSError as exc:
            raise DeidError(
                f"cannot create site secret file {p} ({type(exc).__name__}); expected a writable folder"
            ) from None
        finally:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        return cls.load(p)


# --------------------------------------------------------------------------
# Keyed pseudonyms
# --------------------------------------------------------------------------


class Pseudonymizer:
    """Keyed (HMAC-SHA256) pseudonyms, UIDs and date offsets for one site.

    Every output is ``HMAC(secret, "fedimg-deid/v1" | purpose | inputs)``
    with length-prefixed inputs, so purposes are domain-separated and the
    same input under the same secret always gives the same output.

    Args:
        secret: the site secret (see :meth:`SiteSecret.load`).
    """

    def __init__(self, secret: SiteSecret) -> None:
        if not isinstance(secret, SiteSecret):
            raise DeidError("Pseudonymizer needs a SiteSecret (see SiteSecret.load); there is no default secret")
        self._key = secret.key
        self._offsets: dict[str, int] = {}

    def __repr__(self) -> str:
        return "Pseudonymizer(<secret hidden>)"

    def _digest(self, purpose: str, *parts: str | bytes) -> bytes:
        msg = bytearray(b"fedimg-deid/v1\x00")
        for item in (purpose, *parts):
            raw = item if isinstance(item, bytes) else item.encode("utf-8")
            msg += len(raw).to_bytes(4, "big") + raw
        return hmac.new(self._key, bytes(msg), hashlib.sha256).digest()

    def patient(self, patient_id: str) -> str:
        """Patient pseudonym: ``"P"`` + 16 hex characters.

        Args:
            patient_id: the original (0010,0020) Patient ID.
        """
        return "P" + self._digest("patient", str(patient_id).strip()).hex()[:16]

    def case(self, study_uid: str, series_uid: str) -> str:
        """Case identifier for one image series: ``"case-"`` + 16 hex.

        Args:
            study_uid: original (0020,000D) Study Instance UID.
            series_uid: original (0020,000E) Series Instance UID.
        """
        return "case-" + self._digest("case", str(study_uid).strip(), str(series_uid).strip()).hex()[:16]

    def uid(self, original_uid: str) -> str:
        """Remapped UID ``2.25.<int>`` from the first 16 bytes of the HMAC.

        At most 5 + 39 = 44 characters (PS3.5 9.1 limits UIDs to 64).

        Args:
            original_uid: the UID to remap (trailing NUL/space ignored).
        """
        value = str(original_uid).strip().rstrip("\x00")
        return "2.25." + str(int.from_bytes(self._digest("uid", value)[:16], "big"))

    def date_offset_days(self, patient_id: str) -> int:
        """Per-patient date shift in days, within :data:`DATE_OFFSET_RANGE`.

        Args:
            patient_id: the original (0010,0020) Patient ID.
        """
        key = str(patient_id).strip()
        cached = self._offsets.get(key)
        if cached is None:
            low, high = DATE_OFFSET_RANGE
            n = int.from_bytes(self._digest("date-offset", key)[:8], "big")
            cached = low + n % (high - low + 1)
            self._offsets[key] = cached
        return cached

    def shift_date(self, value: str, patient_id: str) -> str:
        """Shift a DA value (``YYYYMMDD``; ``YYYY``/``YYYYMM`` keep their precision).

        Args:
            value: the DA value.
            patient_id: the original Patient ID that selects the offset.

        Returns:
            The shifted value in the same format.

        Raises:
            DeidError: ``value`` is not a DICOM date (the value is not echoed).
        """
        text = str(value).strip()
        if len(text) not in (4, 6, 8) or not text.isdigit():
            raise DeidError("not a DICOM DA value (expected YYYYMMDD); the value was not shifted")
        padded = text + {4: "0101", 6: "01", 8: ""}[len(text)]
        try:
            day = _dt.date(int(padded[:4]), int(padded[4:6]), int(padded[6:8]))
            shifted = day + _dt.timedelta(days=self.date_offset_days(patient_id))
        except (ValueError, OverflowError):
            raise DeidError("not a valid calendar date in a DA value; the value was not shifted") from None
        return shifted.strftime("%Y%m%d")[: len(text)]

    def time_offset_seconds(self, patient_id: str) -> int:
        """Per-patient time-of-day shift in seconds, in [0, 86399] (keyed, like the date offset).

        Args:
            patient_id: the original (0010,0020) Patient ID.
        """
        n = int.from_bytes(self._digest("time-offset", str(patient_id).strip())[:8], "big")
        return n % 86400

    def shift_time(self, value: str, patient_id: str) -> str:
        """Shift a TM value (``HH[MM[SS[.F]]]``) by the per-patient seconds offset, modulo a day.

        Precision is kept (``HH`` stays two digits, fractions are kept). Times of one
        patient keep their differences within a day; a pair of separate DA and TM
        values may roll over midnight (a DT value shifts consistently).

        Raises:
            DeidError: ``value`` is not a DICOM TM value (not echoed).
        """
        text = str(value).strip()
        head, _, frac = text.partition(".")
        if len(head) not in (2, 4, 6) or not head.isdigit():
            raise DeidError("not a DICOM TM value (expected HHMMSS); the value was not shifted")
        hh, mm, ss = int(head[0:2]), int(head[2:4] or 0), int(head[4:6] or 0)
        if hh > 23 or mm > 59 or ss > 60:
            raise DeidError("not a valid time of day in a TM value; the value was not shifted")
        total = (hh * 3600 + mm * 60 + min(ss, 59) + self.time_offset_seconds(patient_id)) % 86400
        out = f"{total // 3600:02d}{total % 3600 // 60:02d}{total % 60:02d}"[: len(head)]
        return out + ("." + frac if frac else "")

    def shift_datetime(self, value: str, patient_id: str) -> str:
        """Shift a DT value: the date by the day offset and, when present, the time by the seconds offset.

        Date and time shift together (with carry), so intervals between DT values are kept.

        Args:
            value: the DT value ``YYYY[MM[DD[HH[MM[SS[.F]]]]]][&ZZXX]``.
            patient_id: the original Patient ID that selects the offset.

        Returns:
            The shifted DT value.

        Raises:
            DeidError: ``value`` does not start with a DICOM date.
        """
        text = str(value).strip()
        digits = 0
        while digits < len(text) and digits < 8 and text[digits].isdigit():
            digits += 1
        if digits not in (4, 6, 8):
            raise DeidError("not a DICOM DT value (expected YYYYMMDD...); the value was not shifted")
        rest = text[digits:]
        clock = ""
        while len(clock) < len(rest) and len(clock) < 6 and rest[len(clock)].isdigit():
            clock += rest[len(clock)]
        if digits < 8 or len(clock) not in (2, 4, 6):
            return self.shift_date(text[:digits], patient_id) + rest
        try:
            when = _dt.datetime(
                int(text[:4]),
                int(text[4:6]),
                int(text[6:8]),
                int(clock[0:2]),
                int(clock[2:4] or 0),
                min(int(clock[4:6] or 0), 59),
            )
            when += _dt.timedelta(days=self.date_offset_days(patient_id), seconds=self.time_offset_seconds(patient_id))
        except (ValueError, OverflowError):
            raise DeidError("not a valid DICOM DT value; the value was not shifted") from None
        return when.strftime("%Y%m%d%H%M%S")[: 8 + len(clock)] + rest[len(clock) :]

    def path_hash(self, rel_path: str) -> str:
        """A 16-hex name for a relative path (folders and files leave no identifier).

        The path's bytes on disk are hashed (``os.fsencode``): a name that is
        not valid UTF-8 (read by Python with surrogate escapes) hashes like
        any other, and a UTF-8 name gives the same hash as its text.

        Args:
            rel_path: a path relative to the site's raw root; ``\\`` is read as ``/``.
        """
        return self._digest("path", os.fsencode(str(rel_path).replace("\\", "/").strip("/"))).hex()[:16]


# --------------------------------------------------------------------------
# Engine
# --------------------------------------------------------------------------


@dataclass
class _Ctx:
    p: Pseudonymizer
    patient_id: str
    covariates: frozenset[int]
    descriptors: dict[int, frozenset[str]]
    private: frozenset[tuple[str, int]]


def _normalize_covariates(covariates: Iterable[str]) -> frozenset[int]:
    if isinstance(covariates, str):
        covariates = [covariates]
    names = [str(c).strip() for c in covariates]
    unknown = sorted(n for n in names if n not in PATIENT_CHARACTERISTICS)
    if unknown:
        raise DeidError(
            f"covariates {unknown} are not patient characteristics that the Retain Patient "
            f"Characteristics Option keeps; expected DICOM keywords among {sorted(PATIENT_CHARACTERISTICS)}"
        )
    return frozenset(PATIENT_CHARACTERISTIC_TAGS[n] for n in names)


def _normalize_descriptors(allow: Mapping[str, Iterable[str]] | None) -> dict[int, frozenset[str]]:
    if not allow:
        return {}
    unknown = sorted(k for k in allow if k not in DESCRIPTORS)
    if unknown:
        raise DeidError(
            f"descriptor allow-list names {unknown}, which are not descriptors of the Clean "
            f"Descriptors Option; expected DICOM keywords among {sorted(DESCRIPTORS)}"
        )
    out: dict[int, frozenset[str]] = {}
    for kw, values in allow.items():
        if isinstance(values, str):
            values = [values]
        out[DESCRIPTOR_TAGS[kw]] = frozenset(str(v).strip() for v in values)
    return out


def _normalize_private(allow: Iterable[tuple[str, int]]) -> frozenset[tuple[str, int]]:
    out: set[tuple[str, int]] = set()
    for item in allow:
        try:
            creator, element = item
            out.add((str(creator).strip(), int(element) & 0xFF))
        except (TypeError, ValueError):
            raise DeidError(
                "private allow-list entries must be (private creator, element) pairs, "
                "e.g. ('SIEMENS CT VA0  COAD', 0x10) for (0019,xx10)"
            ) from None
    return frozenset(out)


def _empty(elem: DataElement) -> DataElement:
    if elem.VR == "SQ":
        return DataElement(elem.tag, "SQ", Sequence([]))
    return DataElement(elem.tag, elem.VR, None)


_TEXT_DUMMY = "DEIDENTIFIED"
_DUMMY_BY_VR: dict[str, object] = {
    "AE": _TEXT_DUMMY, "CS": _TEXT_DUMMY, "SH": _TEXT_DUMMY, "LO": _TEXT_DUMMY, "LT": _TEXT_DUMMY,
    "ST": _TEXT_DUMMY, "UT": _TEXT_DUMMY, "UC": _TEXT_DUMMY, "PN": _TEXT_DUMMY,
    "UR": "urn:fedimg:deidentified", "AS": "000D", "DS": "0", "IS": "0", "TM": "000000",
    "DA": "19000101", "DT": "19000101000000",
    "US": 0, "SS": 0, "UL": 0, "SL": 0, "UV": 0, "SV": 0, "AT": 0, "FL": 0.0, "FD": 0.0,
}  # fmt: skip


def _values(elem: DataElement) -> list[str]:
    v = elem.value
    if v is None or v == "":
        return []
    if isinstance(v, (MultiValue, list, tuple)):
        return [str(x) for x in v]
    return [str(v)]


def _set_values(elem: DataElement, values: list[str]) -> DataElement:
    if not values:
        return DataElement(elem.tag, elem.VR, None)
    return DataElement(elem.tag, elem.VR, values[0] if len(values) == 1 else values)


def _remap_uids(elem: DataElement, p: Pseudonymizer) -> DataElement:
    # Only a well-formed UID under the DICOM root is kept: "1.2.840.10008." followed by text (a path,
    # a name) is not a class UID and is remapped like any other value.
    return _set_values(
        elem, [v if v.startswith(_DICOM_ROOT) and is_uid(v.strip().rstrip("\x00")) else p.uid(v) for v in _values(elem)]
    )


def _shift(elem: DataElement, ctx: _Ctx) -> DataElement | None:
    """Shift every DA/DT value; None if a value cannot be parsed (then removed)."""
    out: list[str] = []
    try:
        for v in _values(elem):
            if elem.VR == "DA":
                # a DA range "A-B" (query syntax) is shifted end by end
                out.append("-".join(ctx.p.shift_date(x, ctx.patient_id) if x else "" for x in v.split("-")))
            else:
                out.append(ctx.p.shift_datetime(v, ctx.patient_id))
    except DeidError:
        return None
    return _set_values(elem, out)


def _dummy(elem: DataElement, ctx: _Ctx) -> DataElement:
    if elem.VR == "UI":
        return _remap_uids(elem, ctx.p) if _values(elem) else DataElement(elem.tag, "UI", ctx.p.uid("dummy"))
    if elem.VR in _DUMMY_BY_VR:
        return DataElement(elem.tag, elem.VR, _DUMMY_BY_VR[elem.VR])
    return DataElement(elem.tag, elem.VR, b"\x00\x00")  # OB, OW, UN, ...


def _clean_private(ds: Dataset, ctx: _Ctx) -> None:
    keep_creators: set[int] = set()
    for tag in [t for t in list(ds.keys()) if Tag(t).is_private]:
        t = Tag(tag)
        if t.element < 0x0010 or t.element > 0xFFFF:
            del ds[tag]  # group length or invalid
            continue
        if t.element <= 0x00FF:
            continue  # private creator; decided below
        creator_tag = Tag(t.group, t.element >> 8)
        creator = ds.get(creator_tag)
        name = str(creator.value).strip() if creator is not None and creator.value is not None else None
        if name is not None and (name, t.element & 0xFF) in ctx.private:
            keep_creators.add(int(creator_tag))
            elem = ds[tag]
            if elem.VR == "SQ":
                for item in elem.value:
                    _clean(item, ctx)
        else:
            del ds[tag]
    for tag in [t for t in list(ds.keys()) if Tag(t).is_private]:
        if Tag(tag).element <= 0x00FF and int(tag) not in keep_creators:
            del ds[tag]


def _clean(ds: Dataset, ctx: _Ctx) -> None:
    """De-identify ``ds`` in place (it is already a private copy)."""
    _clean_private(ds, ctx)
    for tag in list(ds.keys()):
        t = int(tag)
        if Tag(t).is_private:
            continue
        group = t >> 16
        if 0x5000 <= group <= 0x50FF or 0x6000 <= group <= 0x60FF:
            del ds[t]  # curves (50xx) and overlays (60xx,3000) with their attributes
            continue
        if (t & 0xFFFF) == 0 and group != 0x0002:
            del ds[t]  # group length (retired)
            continue
        elem = ds[t]
        new = _apply(elem, TABLE.action(t), ctx)
        if new is None:
            del ds[t]
        elif new is not elem:
            ds[t] = new


def _apply(elem: DataElement, action: str | None, ctx: _Ctx) -> DataElement | None:
    t = int(elem.tag)
    if t == _PATIENT_ID:
        return DataElement(t, elem.VR, ctx.p.patient(str(elem.value or "")) if _values(elem) else None)
    if t == _PATIENT_NAME:
        return DataElement(t, elem.VR, ctx.p.patient(ctx.patient_id) if ctx.patient_id else None)
    if t in ctx.covariates:
        return elem  # K: Retain Patient Characteristics Option
    if t in ctx.descriptors:
        value = str(elem.value).strip() if elem.value is not None else ""
        if value in ctx.descriptors[t]:
            return elem  # C through the allow-list: Clean Descriptors Option
    if elem.VR in ("DA", "DT") and t != _BIRTH_DATE and _values(elem):
        shifted = _shift(elem, ctx)  # C: Modified Dates option
        if shifted is not None:
            return shifted
        if action is None:
            return None  # an unparsable date outside the table cannot be shifted: removed
        # an unparsable listed date falls through to its basic action
    if elem.VR == "TM" and t != _BIRTH_TIME and _values(elem):
        try:  # Modified Dates option: times shift with a per-patient offset too
            return _set_values(elem, [ctx.p.shift_time(v, ctx.patient_id) for v in _values(elem)])
        except DeidError:
            if action is None:
                return None
    if action is None:
        if elem.VR == "SQ":
            for item in elem.value:
                _clean(item, ctx)
        return elem
    if action in ("X", "X/Z", "X/D", "X/Z/D"):
        return None
    if action in ("Z", "Z/D"):
        return _empty(elem)
    if action == "U":
        if elem.VR == "SQ":
            for item in elem.value:
                _clean(item, ctx)
            return elem
        return _remap_uids(elem, ctx.p)
    if action in ("D", "X/Z/U*"):
        if elem.VR == "SQ":
            for item in elem.value:
                _clean(item, ctx)
            return elem
        if action == "X/Z/U*":
            return _remap_uids(elem, ctx.p) if elem.VR == "UI" else None
        return _dummy(elem, ctx)
    raise DeidError(f"unknown Table E.1-1 action {action!r} for ({t >> 16:04X},{t & 0xFFFF:04X})")


def _method_items(covariates: frozenset[int]) -> list[Dataset]:
    codes = ["113100", "113107", "113105"] + (["113108"] if covariates else [])
    items = []
    for code in codes:
        item = Dataset()
        item.CodeValue = code
        item.CodingSchemeDesignator = "DCM"
        item.CodeMeaning = OPTION_CODES[code]
        items.append(item)
    return items


def deidentify(
    ds: Dataset,
    p: Pseudonymizer,
    covariates: Iterable[str] = (),
    descriptor_allowlist: Mapping[str, Iterable[str]] | None = None,
    private_allowlist: Iterable[tuple[str, int]] = (),
) -> Dataset:
    """Return a de-identified copy of ``ds``; ``ds`` itself is not changed.

    Applies the basic profile of :data:`TABLE_EDITION` with fedimg's keyed
    layer (see the module docstring), then records (0012,0062) Patient
    Identity Removed = YES, (0012,0063) De-identification Method,
    (0012,0064) De-identification Method Code Sequence and (0028,0303)
    Longitudinal Temporal Information Modified = MODIFIED. The file meta
    (0002,0003) Media Storage SOP Instance UID is set to the new (0008,0018).
    Burned-in text is not detected here: check :func:`burned_in_risk` first.

    Args:
        ds: the dataset (with or without file meta).
        p: the site's pseudonymizer.
        covariates: patient characteristics to keep, as DICOM keywords from
            :data:`PATIENT_CHARACTERISTICS` (e.g. ``["PatientAge",
            "PatientSex"]``); empty keeps none.
        descriptor_allowlist: keyword from :data:`DESCRIPTORS` -> values
            that may be kept verbatim (e.g. ``{"SeriesDescription":
            ["Abdomen 3.0 B30f"]}``); any other value is removed.
        private_allowlist: ``(private creator, element)`` pairs to keep;
            ``element`` is the offset in the block (``0x10`` for
            (gggg,xx10)); larger values are reduced to their low byte.

    Returns:
        A new dataset.

    Raises:
        DeidError: a covariate, descriptor or private allow-list entry is
            invalid.
    """
    if not isinstance(p, Pseudonymizer):
        raise DeidError("deidentify needs a Pseudonymizer built from the site secret; there is no default")
    covs = _normalize_covariates(covariates)
    ctx = _Ctx(
        p=p,
        patient_id=str(ds.get(_PATIENT_ID).value or "").strip() if _PATIENT_ID in ds else "",
        covariates=covs,
        descriptors=_normalize_descriptors(descriptor_allowlist),
        private=_normalize_private(private_allowlist),
    )
    out = copy.deepcopy(ds)
    for tag in _DEID_TAGS:
        if tag in out:
            del out[tag]
    _clean(out, ctx)

    out.PatientIdentityRemoved = "YES"  # (0012,0062)
    out.DeidentificationMethod = [
        TABLE_EDITION,
        "fedimg keyed HMAC-SHA256 pseudonyms",
    ]  # (0012,0063)
    out.DeidentificationMethodCodeSequence = Sequence(_method_items(covs))  # (0012,0064)
    out.LongitudinalTemporalInformationModified = "MODIFIED"  # (0028,0303)

    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        new_meta = FileMetaDataset()
        for tag in _META_KEEP:
            if tag in meta:
                new_meta[tag] = copy.deepcopy(meta[tag])
        if _SOP_INSTANCE_UID in out:
            new_meta.MediaStorageSOPInstanceUID = out[_SOP_INSTANCE_UID].value
        elif 0x00020003 in new_meta:
            new_meta[0x00020003] = _remap_uids(new_meta[0x00020003], p)
        out.file_meta = new_meta
    if getattr(out, "preamble", None) is not None:
        out.preamble = b"\x00" * 128  # a preamble may hold application data
    if hasattr(out, "filename"):
        out.filename = None  # source paths carry names
    return out


# --------------------------------------------------------------------------
# Burned-in annotation
# --------------------------------------------------------------------------

#: Modalities whose images often carry burned-in text.
RISK_MODALITIES: frozenset[str] = frozenset(
    {"US", "SC", "XA", "RF", "DX", "CR", "MG", "OT", "ES", "XC", "IO", "PX", "GM", "SM"}
)
#: Secondary Capture SOP classes (PS3.4 B.5): captured screens.
SECONDARY_CAPTURE_CLASSES: frozenset[str] = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
        "1.2.840.10008.5.1.4.1.1.7.1",  # Multi-frame Single Bit SC
        "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte SC
        "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word SC
        "1.2.840.10008.5.1.4.1.1.7.4",  # Multi-frame True Color SC
    }
)


def burned_in_risk(ds: Dataset) -> str | None:
    """Why ``ds`` may carry burned-in text, or None if it is not at risk.

    At risk: (0028,0301) Burned In Annotation is YES; or it is absent (or
    neither YES nor NO) on a modality in :data:`RISK_MODALITIES` or a
    Secondary Capture SOP class. CT/MR without the attribute are not at risk.
    The reason names only tags, the modality and the SOP class (no PHI).

    Args:
        ds: the dataset (only its header is read).

    Returns:
        A reason, or None.
    """
    elem = ds.get(0x00280301)
    value = str(elem.value).strip().upper() if elem is not None and elem.value is not None else ""
    if value == "YES":
        return "(0028,0301) Burned In Annotation is YES"
    if value == "NO":
        return None
    found = "absent" if elem is None else "empty" if not value else "neither YES nor NO"
    modality = str(ds.get("Modality", "") or "").strip().upper()
    if modality in RISK_MODALITIES:
        return f"(0028,0301) Burned In Annotation is {found} on modality {modality}, which may carry burned-in text"
    sop_class = str(ds.get("SOPClassUID", "") or "").strip()
    if sop_class in SECONDARY_CAPTURE_CLASSES:
        return (
            f"(0028,0301) Burned In Annotation is {found} on a Secondary Capture object "
            f"(SOP Class {sop_class}), which may carry burned-in text"
        )
    return None


def series_burned_in_risk(headers: Iterable[Any]) -> str | None:
    """PHI-free reason if any object of a series may carry burned-in text (see :func:`burned_in_risk`).

    Decided from indexed headers ((0028,0301), (0008,0060) Modality, (0008,0016)
    SOP Class; :class:`fedimg.dicom.index.DicomHeader`): no file is read again.
    """
    for h in headers:
        ds = Dataset()
        ds.Modality = h.modality
        ds.SOPClassUID = h.sop_class_uid
        if h.burned_in_annotation is not None:
            ds.BurnedInAnnotation = h.burned_in_annotation
        risk = burned_in_risk(ds)
        if risk:
            return risk
    return None
