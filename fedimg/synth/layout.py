"""Folder and file names of a synthetic PACS export.

Real exports put identifiers into paths, which is exactly what
de-identification must not carry over::

    OUT/<site>/<PatientID>_<LASTNAME>/<StudyDate>_<AccessionNumber>/
        <SeriesNumber>_<Series Description>/IM0001[.dcm]
        label/segmentation.nii.gz          (sites with NIfTI labels)
"""

from __future__ import annotations

from pathlib import Path

from fedimg.synth.identity import StudyIdentity

LABEL_DIR_NAME = "label"
LABEL_FILE_NAME = "segmentation.nii.gz"


def study_dir(out_dir: Path, site_name: str, study: StudyIdentity) -> Path:
    """Folder of one study: ``OUT/<site>/<PatientID>_<LAST>/<StudyDate>_<Accession>``."""
    patient = study.patient
    return (
        Path(out_dir)
        / site_name
        / _safe(f"{patient.patient_id}_{patient.last_name}")
        / _safe(f"{study.study_date}_{study.accession_number}")
    )


def series_dir(study_folder: Path, series_number: int, series_description: str) -> Path:
    """Folder of one series, ``<SeriesNumber>_<Series Description>`` (spaces kept)."""
    return Path(study_folder) / _safe(f"{series_number}_{series_description}")


def instance_file_name(instance_number: int, extension: str) -> str:
    """``IM0001`` style file name; ``extension`` is ``.dcm`` or empty."""
    return f"IM{instance_number:04d}{extension}"


def label_path(study_folder: Path) -> Path:
    """Where a study's NIfTI label goes."""
    return Path(study_folder) / LABEL_DIR_NAME / LABEL_FILE_NAME


def _safe(name: str) -> str:
    # Spaces stay (real exports have them); path separators would nest folders.
    return name.replace("/", "-").replace("\\", "-").strip()
