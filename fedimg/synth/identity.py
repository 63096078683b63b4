"""Plausible fake identifiers, so de-identification has something to remove.

Every value is drawn from a seeded numpy Generator, so the same seed always
gives the same "patients". Nothing here is real; the name lists are common
first and last names. Each site numbers its patients in its own style
((0010,0020) Patient ID formats differ between hospitals in real life too).
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from pydicom.uid import UID, generate_uid

_FIRST_NAMES = {
    "F": ("ANNA", "MARIA", "SOFIA", "ELENA", "LAURA", "CLAIRE", "HANNAH", "JULIA", "NORA", "EMMA"),
    "M": ("JOHN", "LUCAS", "DAVID", "MARCO", "PETER", "THOMAS", "AHMED", "PAUL", "JONAS", "KARL"),
}
_LAST_NAMES = (
    "MUELLER",
    "SMITH",
    "ROSSI",
    "GARCIA",
    "NGUYEN",
    "JANSSEN",
    "KOWALSKI",
    "DUBOIS",
    "SCHMIDT",
    "BROWN",
    "FISCHER",
    "MARTIN",
    "WAGNER",
    "LOPEZ",
    "BAKER",
    "SILVA",
)
_PHYSICIAN_LAST = ("WEBER", "HOFFMANN", "MOREAU", "TAYLOR", "BIANCHI", "NOVAK", "LEROY", "PATEL")
_PHYSICIAN_FIRST = ("SARAH", "MICHAEL", "CHEN", "ISABEL", "OMAR", "GRETA", "LEON", "PRIYA")
_INSTITUTIONS = (
    ("ST MARY GENERAL HOSPITAL", "12 Harbour Road, Springfield 4021, US"),
    ("UNIVERSITATSKLINIKUM NORDSTADT", "Klinikweg 7, 20251 Nordstadt, DE"),
    ("CENTRE HOSPITALIER DU LAC", "3 Rue des Tilleuls, 74940 Annecy-le-Vieux, FR"),
    ("RIVERSIDE MEDICAL CENTER", "400 River Street, Lakeside 55102, US"),
    ("OSPEDALE SAN CARLO", "Via Roma 18, 20100 Valverde, IT"),
)
# (format, exclusive upper bound of the number) per site style.
_PATIENT_ID_STYLES = (("SMH{:07d}", 10**7), ("{:08d}", 10**8), ("PHX-{:05d}", 10**5))


@dataclass(frozen=True)
class SiteIdentity:
    """Site-level identifying attributes shared by all studies of a site.

    Attributes:
        institution_name: (0008,0080) Institution Name.
        institution_address: (0008,0081) Institution Address.
        department: (0008,1040) Institutional Department Name.
        station_name: (0008,1010) Station Name.
        device_serial_number: (0018,1000) Device Serial Number.
    """

    institution_name: str
    institution_address: str
    department: str
    station_name: str
    device_serial_number: str


@dataclass(frozen=True)
class PatientIdentity:
    """One fake patient.

    Attributes:
        first_name: given name (upper case ASCII).
        last_name: family name (upper case ASCII); also used in folder names.
        patient_id: (0010,0020) Patient ID.
        birth_date: (0010,0030) Patient's Birth Date, ``YYYYMMDD``.
        sex: (0010,0040) Patient's Sex, ``F`` or ``M``.
        weight_kg: (0010,1030) Patient's Weight.
        size_m: (0010,1020) Patient's Size.
    """

    first_name: str
    last_name: str
    patient_id: str
    birth_date: str
    sex: str
    weight_kg: float
    size_m: float

    @property
    def dicom_name(self) -> str:
        """(0010,0010) Patient's Name as a DICOM PN, ``LAST^FIRST``."""
        return f"{self.last_name}^{self.first_name}"


@dataclass(frozen=True)
class StudyIdentity:
    """Identifying attributes of one study.

    Attributes:
        patient: the patient.
        accession_number: (0008,0050) Accession Number.
        study_id: (0020,0010) Study ID.
        study_date: (0008,0020) Study Date, ``YYYYMMDD``.
        study_time: (0008,0030) Study Time, ``HHMMSS.ffffff``-style string.
        patient_age: (0010,1010) Patient's Age, e.g. ``054Y``.
        referring_physician: (0008,0090) Referring Physician's Name (PN).
        performing_physician: (0008,1050) Performing Physician's Name (PN).
        operator: (0008,1070) Operators' Name (PN).
        study_description: (0008,1030) Study Description.
    """

    patient: PatientIdentity
    accession_number: str
    study_id: str
    study_date: str
    study_time: str
    patient_age: str
    referring_physician: str
    performing_physician: str
    operator: str
    study_description: str

    def to_dict(self, site: SiteIdentity) -> dict[str, Any]:
        """Every identifier of the study and its site, flat, for ground truth.

        Tests of de-identification use this to assert none of these values
        survives.
        """
        return {
            "patient_name": self.patient.dicom_name,
            **{k: v for k, v in asdict(self.patient).items()},
            "accession_number": self.accession_number,
            "study_id": self.study_id,
            "study_date": self.study_date,
            "study_time": self.study_time,
            "patient_age": self.patient_age,
            "referring_physician": self.referring_physician,
            "performing_physician": self.performing_physician,
            "operator": self.operator,
            "study_description": self.study_description,
            **asdict(site),
        }


def sample_site_identity(rng: np.random.Generator, site_index: int) -> SiteIdentity:
    """Institution, station and scanner serial of site ``site_index`` (0-based)."""
    name, address = _INSTITUTIONS[site_index % len(_INSTITUTIONS)]
    return SiteIdentity(
        institution_name=name,
        institution_address=address,
        department=str(rng.choice(("RADIOLOGY", "DIAGNOSTIC IMAGING", "RADIOLOGIE"))),
        station_name=f"CT{int(rng.integers(1, 9))}-{_letters(rng, 4)}",
        device_serial_number=f"{int(rng.integers(10_000, 99_999))}",
    )


def sample_patient(rng: np.random.Generator, site_index: int) -> PatientIdentity:
    """A fake patient of site ``site_index`` (0-based)."""
    sex = "F" if rng.uniform() < 0.5 else "M"
    style, upper = _PATIENT_ID_STYLES[site_index % len(_PATIENT_ID_STYLES)]
    birth = _dt.date(1940, 1, 1) + _dt.timedelta(days=int(rng.integers(0, 365 * 60)))
    return PatientIdentity(
        first_name=str(rng.choice(_FIRST_NAMES[sex])),
        last_name=str(rng.choice(_LAST_NAMES)),
        patient_id=style.format(int(rng.integers(1, upper))),
        birth_date=birth.strftime("%Y%m%d"),
        sex=sex,
        weight_kg=float(rng.integers(50, 110)),
        size_m=round(float(rng.uniform(1.52, 1.95)), 2),
    )


def sample_study(
    rng: np.random.Generator,
    patient: PatientIdentity,
    after: str | None = None,
) -> StudyIdentity:
    """A fake study of ``patient``.

    Args:
        rng: the generator to draw from.
        patient: whose study it is.
        after: for a follow-up, the date (``YYYYMMDD``) of the previous study;
            the new study is 60-400 days later.

    Returns:
        The study identity.
    """
    if after is None:
        study_day = _dt.date(2016, 1, 1) + _dt.timedelta(days=int(rng.integers(0, 365 * 7)))
    else:
        previous = _dt.datetime.strptime(after, "%Y%m%d").date()
        study_day = previous + _dt.timedelta(days=int(rng.integers(60, 400)))
    seconds = int(rng.integers(7 * 3600, 19 * 3600))
    birth = _dt.datetime.strptime(patient.birth_date, "%Y%m%d").date()
    had_birthday = (study_day.month, study_day.day) >= (birth.month, birth.day)
    age = study_day.year - birth.year - (0 if had_birthday else 1)
    return StudyIdentity(
        patient=patient,
        accession_number=f"A{int(rng.integers(10**8, 10**9))}",
        study_id=f"{int(rng.integers(1000, 99999))}",
        study_date=study_day.strftime("%Y%m%d"),
        study_time=f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}",
        patient_age=f"{age:03d}Y",
        referring_physician=_physician(rng, prefix="Dr"),
        performing_physician=_physician(rng),
        operator=_physician(rng),
        study_description=str(rng.choice(("CT ABDOMEN W CONTRAST", "CT ABD/PELVIS", "CT Abdomen"))),
    )


def deterministic_uid(*parts: object) -> UID:
    """A UID derived only from ``parts`` (seed, site, case, role...).

    pydicom hashes the entropy sources into its ``1.2.826.0.1.3680043.8.498.``
    root, so the same parts always give the same UID and different parts
    give unrelated ones.
    """
    return generate_uid(entropy_srcs=["fedimg.synth", *(str(p) for p in parts)])


def _physician(rng: np.random.Generator, prefix: str = "") -> str:
    last = str(rng.choice(_PHYSICIAN_LAST))
    first = str(rng.choice(_PHYSICIAN_FIRST))
    return f"{last}^{first}^^{prefix}" if prefix else f"{last}^{first}"


def _letters(rng: np.random.Generator, n: int) -> str:
    return "".join(chr(ord("A") + int(v)) for v in rng.integers(0, 26, size=n))
