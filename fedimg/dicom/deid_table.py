"""The pinned action table of DICOM PS3.15 Annex E, Table E.1-1 (edition 2024b).

fedimg does not hand-type Table E.1-1. The per-action tag lists are taken
from the ``dicom-anonymizer`` package (KitwareMedical, BSD licence), which
generates them from the published standard and ships one module per edition
(``dicomfields_2023`` = 2023e, ``dicomfields_2024b`` = 2024b,
``dicomfields_2026c`` = the then-current edition in 2.1.0). fedimg pins the
2024b module: the edition is a constant of this file, recorded in every
de-identified object's (0012,0063) De-identification Method, and moving to
a newer edition is a deliberate, reviewed change of :data:`TABLE_MODULE`.

Only the data module is loaded (straight from its file, without importing
``dicomanonymizer`` itself, whose package ``__init__`` pulls in its
anonymizer and tqdm); fedimg's own engine in :mod:`fedimg.dicom.deid` applies
the actions with its keyed (HMAC-SHA256) layer on top.

The option columns of Table E.1-1 (Retain Patient Characteristics, Clean
Descriptors, Retain Longitudinal Temporal Information with Modified Dates)
are not shipped by the library; the attributes fedimg applies them to are
listed here (:data:`PATIENT_CHARACTERISTICS`, :data:`DESCRIPTORS`) and the
date rule is described in :mod:`fedimg.dicom.deid`.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from pydicom.datadict import tag_for_keyword

__all__ = [
    "ACTIONS",
    "DESCRIPTORS",
    "ENGINE",
    "PATIENT_CHARACTERISTICS",
    "TABLE",
    "TABLE_EDITION",
    "TABLE_MODULE",
    "ActionTable",
    "TableUnavailableError",
    "load_table",
]

#: The edition of Table E.1-1 that fedimg applies; written to (0012,0063).
TABLE_EDITION = "DICOM PS3.15 2024b Table E.1-1"
#: Distribution and module that provide the table.
ENGINE_DISTRIBUTION = "dicom-anonymizer"
TABLE_MODULE = "dicomfields_2024b"
#: Dependency range fedimg is tested with.
ENGINE_REQUIREMENT = "dicom-anonymizer>=2.1,<3"

#: Table E.1-1 action codes, keyed by the list name in the library module.
ACTIONS: dict[str, str] = {
    "X_TAGS": "X",
    "Z_TAGS": "Z",
    "D_TAGS": "D",
    "U_TAGS": "U",
    "Z_D_TAGS": "Z/D",
    "X_Z_TAGS": "X/Z",
    "X_D_TAGS": "X/D",
    "X_Z_D_TAGS": "X/Z/D",
    "X_Z_U_STAR_TAGS": "X/Z/U*",
}

#: Attributes that the Retain Patient Characteristics Option (DCM 113108)
#: marks K in Table E.1-1; fedimg keeps one only when a config names it as a
#: covariate. The option's C (clean) entries, free text such as (0010,21B0)
#: Additional Patient History or (0010,2000) Medical Alerts, are never kept.
PATIENT_CHARACTERISTICS: frozenset[str] = frozenset(
    {
        "PatientAge",  # (0010,1010)
        "PatientSex",  # (0010,0040)
        "PatientSize",  # (0010,1020)
        "PatientWeight",  # (0010,1030)
        "EthnicGroup",  # (0010,2160)
        "PatientSexNeutered",  # (0010,2203)
        "PregnancyStatus",  # (0010,21C0)
        "SmokingStatus",  # (0010,21A0)
    }
)

#: Descriptors that the Clean Descriptors Option (DCM 113105) marks C in
#: Table E.1-1. fedimg "cleans" them only through an allow-list of values
#: known to be free of identifiers; any other value gets the basic action.
DESCRIPTORS: frozenset[str] = frozenset(
    {
        "SeriesDescription",  # (0008,103E)
        "StudyDescription",  # (0008,1030)
        "ProtocolName",  # (0018,1030)
        "ImageComments",  # (0020,4000)
        "DerivationDescription",  # (0008,2111)
        "PerformedProcedureStepDescription",  # (0040,0254)
        "RequestedProcedureDescription",  # (0032,1060)
        "ScheduledProcedureStepDescription",  # (0040,0007)
        "AcquisitionComments",  # (0018,4000)
        "AcquisitionProtocolDescription",  # (0018,9424)
        "AcquisitionDeviceProcessingDescription",  # (0018,1400)
        "ContrastBolusAgent",  # (0018,0010)
    }
)


class TableUnavailableError(ImportError):
    """The pinned table module cannot be loaded (dependency missing)."""


@dataclass(frozen=True)
class ActionTable:
    """Table E.1-1 as a lookup: exact tags and masked (repeating group) tags.

    Attributes:
        edition: the edition string (see :data:`TABLE_EDITION`).
        engine: distribution, version and module that supplied the lists.
        exact: tag (as ``0xGGGGEEEE``) -> action code.
        masked: ``(tag, mask, action)``; a tag ``t`` matches when
            ``t & mask == tag``, e.g. (50xx,xxxx) curves, (60xx,3000) overlay
            data.
    """

    edition: str
    engine: str
    exact: dict[int, str]
    masked: tuple[tuple[int, int, str], ...]

    def action(self, tag: int) -> str | None:
        """The Table E.1-1 action for ``tag``, or None if it is not listed.

        Args:
            tag: a public tag as an int ``0xGGGGEEEE``.

        Returns:
            One of the codes in :data:`ACTIONS` values, or None.
        """
        code = self.exact.get(int(tag))
        if code is not None:
            return code
        for value, mask, masked_code in self.masked:
            if int(tag) & mask == value:
                return masked_code
        return None

    def __len__(self) -> int:
        return len(self.exact) + len(self.masked)

    def counts(self) -> dict[str, int]:
        """Number of table entries per action code."""
        out: dict[str, int] = {}
        for code in list(self.exact.values()) + [m[2] for m in self.masked]:
            out[code] = out.get(code, 0) + 1
        return out


def _load_module() -> tuple[ModuleType, str]:
    spec = importlib.util.find_spec("dicomanonymizer")
    if spec is None or not spec.submodule_search_locations:
        raise TableUnavailableError(
            f"the de-identification table ({TABLE_EDITION}) comes from the package "
            f"{ENGINE_DISTRIBUTION!r}, which is not installed; install it with "
            f"pip install '{ENGINE_REQUIREMENT}'"
        )
    base = Path(next(iter(spec.submodule_search_locations)))
    path = base / "dicom_anonymization_databases" / f"{TABLE_MODULE}.py"
    if not path.is_file():
        raise TableUnavailableError(
            f"the installed {ENGINE_DISTRIBUTION} has no table module {TABLE_MODULE} "
            f"({TABLE_EDITION}); expected {path}; install {ENGINE_REQUIREMENT!r}"
        )
    mod_spec = importlib.util.spec_from_file_location(f"_fedimg_deid_{TABLE_MODULE}", path)
    if mod_spec is None or mod_spec.loader is None:
        raise TableUnavailableError(f"cannot load {path}")
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    try:
        version = importlib.metadata.version(ENGINE_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return module, f"{ENGINE_DISTRIBUTION} {version} ({TABLE_MODULE})"


def load_table() -> ActionTable:
    """Build the :class:`ActionTable` from the pinned library module.

    Returns:
        The table for :data:`TABLE_EDITION`.

    Raises:
        TableUnavailableError: the library or its 2024b module is missing,
            or a tag appears under two different actions.
    """
    module, engine = _load_module()
    exact: dict[int, str] = {}
    masked: list[tuple[int, int, str]] = []
    for list_name, code in ACTIONS.items():
        for entry in getattr(module, list_name, ()):
            if len(entry) == 2:
                tag = (int(entry[0]) << 16) | int(entry[1])
                previous = exact.setdefault(tag, code)
                if previous != code:
                    raise TableUnavailableError(
                        f"{engine}: tag ({entry[0]:04X},{entry[1]:04X}) listed as both {previous} and {code}"
                    )
            elif len(entry) == 4:
                value = (int(entry[0]) << 16) | int(entry[1])
                mask = (int(entry[2]) << 16) | int(entry[3])
                masked.append((value & mask, mask, code))
            else:
                raise TableUnavailableError(f"{engine}: unexpected table entry {entry!r} in {list_name}")
    return ActionTable(edition=TABLE_EDITION, engine=engine, exact=exact, masked=tuple(masked))


#: The pinned table, loaded once at import.
TABLE: ActionTable = load_table()
#: Which library (and version, module) supplied :data:`TABLE`.
ENGINE: str = TABLE.engine


def _tag(keyword: str) -> int:
    """The tag of a keyword of the tables above (pydicom's dictionary names every one of them)."""
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise TableUnavailableError(f"pydicom's data dictionary has no {keyword}; install the pydicom fedimg pins")
    return tag


PATIENT_CHARACTERISTIC_TAGS: dict[str, int] = {kw: _tag(kw) for kw in sorted(PATIENT_CHARACTERISTICS)}
DESCRIPTOR_TAGS: dict[str, int] = {kw: _tag(kw) for kw in sorted(DESCRIPTORS)}
