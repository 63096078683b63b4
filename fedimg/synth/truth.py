"""Ground truth of a synthetic data set and its ``ground_truth.json``.

``ground_truth.json`` lives in ``OUT/`` next to (not inside) the site folders,
because sites must never see it: it holds every identifier that was put into
the files, which is what de-identification tests check against.

Schema (``format_version`` 1)::

    {
      "generator": "fedimg.synth", "format_version": 1,
      "seed": int, "n_sites": int, "n_cases_requested": int,
      "class_names": ["organ", "lesion"],
      "label_values": {"0": "background", "1": "organ", "2": "lesion"},
      "conventions": {...},                 # voxel axes and affine conventions
      "sites": {
        "<site>": {
          "profile": {SiteProfile fields..., "bits_stored": int},
          "cases": [CaseTruth.to_dict(), ...]
        }
      }
    }

All paths are relative to ``OUT`` with ``/`` separators, so the file is the
same wherever ``OUT`` lives. A radiograph data set (``modality="DX"``) adds
``"modality": "DX"`` and ``"classification_classes"``; a CT one has neither
key (its bytes stay as they were).

Each site folder also holds ``labels.csv`` (:func:`write_labels_csv`): the
classification label sheet a site would get from its PACS or registry, with
columns ``AccessionNumber``, ``StudyInstanceUID`` and ``label``
(``lesion`` / ``no_lesion`` from the ground truth). It holds identifiers, like
a real label sheet, and is read by ``fedimg preprocess --labels-csv``.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fedimg.synth.phantom import CLASS_NAMES

GROUND_TRUTH_FILE_NAME = "ground_truth.json"
FORMAT_VERSION = 1
LABELS_CSV_NAME = "labels.csv"
LABELS_CSV_COLUMNS = ("AccessionNumber", "StudyInstanceUID", "label")
CLASSIFICATION_CLASSES = ("no_lesion", "lesion")
"""Class names of the classification label sheet; index 1 is a case with a lesion."""

CONVENTIONS = {
    "voxel_axes": "(i, j, k) = (column index, row index, slice index in Instance Number order)",
    "affine_lps": "voxel (i, j, k) -> DICOM patient LPS mm, from (0020,0037), (0028,0030), "
    "(0020,0032) of instance 1 and the step between slices",
    "affine_ras": "diag(-1, -1, 1, 1) @ affine_lps; the affine of label NIfTI files",
    "shape": "(i, j, k) = (Columns, Rows, number of slices)",
    "spacing": "(column spacing, row spacing, slice spacing) in mm",
}


@dataclass(frozen=True)
class CaseTruth:
    """Everything known about one synthetic case.

    Attributes:
        case_id: ``<site>-case-<NNN>``.
        site: site name.
        case_index: 0-based index within the site.
        follow_up_of: ``case_id`` of the earlier study of the same patient,
            or None.
        study_dir: study folder, relative to ``OUT``.
        image_series_dir: CT series folder, relative to ``OUT``.
        n_image_files: number of CT files (one per slice).
        study_instance_uid: (0020,000D) Study Instance UID.
        series_instance_uid: (0020,000E) Series Instance UID of the CT series.
        frame_of_reference_uid: (0020,0052) Frame of Reference UID.
        label_format: ``nifti`` or ``dicom_mask``.
        label_path: NIfTI label relative to ``OUT`` (``nifti`` sites) or None.
        label_series_instance_uid: mask series UID (``dicom_mask``) or None.
        label_series_dir: mask series folder relative to ``OUT`` or None.
        orientation: ``axial``, ``sagittal`` or ``coronal``.
        patient_position: (0018,5100) Patient Position.
        image_orientation_patient: (0020,0037) as written.
        shape: ``(i, j, k)`` voxel counts.
        spacing: voxel size in mm along ``(i, j, k)``.
        affine_lps: 4x4 voxel-to-LPS affine.
        affine_ras: 4x4 voxel-to-RAS affine (the NIfTI affine).
        has_lesion: whether label 2 is present.
        organ_voxels: number of voxels labelled 1.
        lesion_voxels: number of voxels labelled 2.
        phantom: analytic phantom parameters, HU values and volumes.
        identifiers: every fake identifier written into this study.
    """

    case_id: str
    site: str
    case_index: int
    follow_up_of: str | None
    study_dir: str
    image_series_dir: str
    n_image_files: int
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    label_format: str
    label_path: str | None
    label_series_instance_uid: str | None
    label_series_dir: str | None
    orientation: str
    patient_position: str
    image_orientation_patient: tuple[float, ...]
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    affine_lps: tuple[tuple[float, ...], ...]
    affine_ras: tuple[tuple[float, ...], ...]
    has_lesion: bool
    organ_voxels: int
    lesion_voxels: int
    phantom: dict[str, Any]
    identifiers: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary (tuples become lists)."""
        return json.loads(json.dumps(asdict(self)))


def write_ground_truth(
    path: Path,
    *,
    seed: int,
    n_cases_requested: int,
    profiles: list[Any],
    sites: dict[str, list[CaseTruth]],
    modality: str = "CT",
) -> None:
    """Write ``ground_truth.json`` deterministically (fixed key order, no time stamps)."""
    document: dict[str, Any] = {
        "generator": "fedimg.synth",
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "n_sites": len(profiles),
        "n_cases_requested": n_cases_requested,
    }
    if modality != "CT":
        document["modality"] = modality
        document["classification_classes"] = list(CLASSIFICATION_CLASSES)
    document.update(
        {
            "class_names": list(CLASS_NAMES),
            "label_values": {"0": "background", **{str(i + 1): n for i, n in enumerate(CLASS_NAMES)}},
            "conventions": CONVENTIONS,
            "sites": {
                profile.name: {
                    "profile": profile.to_dict(),
                    "cases": [case.to_dict() for case in sites[profile.name]],
                }
                for profile in profiles
            },
        }
    )
    Path(path).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


def write_labels_csv(path: Path, cases: list[CaseTruth]) -> None:
    """Write a site's classification label sheet (see the module docstring), one row per study.

    Args:
        path: ``OUT/<site>/labels.csv``.
        cases: the site's cases, in case order.
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(LABELS_CSV_COLUMNS)
    for case in cases:
        writer.writerow(
            [
                case.identifiers["accession_number"],
                case.study_instance_uid,
                CLASSIFICATION_CLASSES[int(case.has_lesion)],
            ]
        )
    Path(path).write_text(buffer.getvalue(), encoding="utf-8")


def load_ground_truth(path: Path) -> dict[str, Any]:
    """Read a ``ground_truth.json`` written by :func:`fedimg.synth.generate`.

    Args:
        path: the file, or the ``OUT`` folder that contains it.

    Returns:
        The parsed document (see the module docstring for the schema).

    Raises:
        FileNotFoundError: if there is no ground truth at ``path``.
        ValueError: if the file is not a fedimg.synth ground truth of a
            supported version.
    """
    path = Path(path)
    if path.is_dir():
        path = path / GROUND_TRUTH_FILE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {GROUND_TRUTH_FILE_NAME} at {path}; generate one with `fedimg synth OUT`")
    document = json.loads(path.read_text(encoding="utf-8"))
    generator = document.get("generator")
    if generator != "fedimg.synth" or document.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} is not a fedimg.synth ground truth of format_version {FORMAT_VERSION} "
            f"(generator={generator!r}, "
            f"format_version={document.get('format_version')!r}); regenerate it"
        )
    return document
