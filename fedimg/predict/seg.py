"""The prediction as a DICOM Segmentation object (highdicom) that references its source series.

One BINARY segment per class, numbered like the label map (segment ``i`` is
class ``i``), labelled with the class name. Segmented property codes are
generic SNOMED CT codes, since a class name alone does not say which
structure it is: a class whose name says lesion, tumour, neoplasm, nodule,
mass or metastasis gets category *Morphologically abnormal structure*
(49755003) and type *Lesion* (52988006); any other class gets *Tissue*
(85756007) for both. The algorithm is identified as fedimg's experiment
(family *Artificial Intelligence*, DCM 123110) with the fedimg version.

Frames follow the source: one per source slice that holds a segment, each
referencing its source instance (single-frame series) or frame (an enhanced
multi-frame object), so a reader places the SEG on exactly the source grid.
Mosaics (several slices per file) cannot be referenced slice by slice; no
SEG is written for them.

De-identification: highdicom copies the patient and study modules of the
source into the SEG. Without ``--keep-identifiers`` the SEG is built from
de-identified copies of the source files (:func:`fedimg.dicom.deid.deidentify`
with the site secret and the spec's ``deid`` settings): exactly the
attributes and keyed UIDs that ``fedimg preprocess --write-dicom`` copies
carry, so the SEG references those copies, not the identified originals.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from fedimg.dicom.index import SeriesGroup

_LESION_NAME = re.compile(r"(?i)lesion|tumou?r|neoplas|nodul|mass|metasta")


def can_reference(group: SeriesGroup, geometry: Any) -> str | None:
    """None when a SEG can reference every source slice; else why not (PHI-free)."""
    headers = group.headers
    if any(h.mosaic is not None for h in headers):
        return "a mosaic stores several slices in one frame: SEG frames cannot reference them one by one"
    multi = [h for h in headers if h.frames or h.number_of_frames > 1]
    if multi and len(headers) > 1:
        return "the series mixes several multi-frame objects: not referenced frame by frame"
    return None


def _codes(name: str) -> tuple[Any, Any]:
    from pydicom.sr.codedict import codes

    if _LESION_NAME.search(name):
        return codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Lesion
    return codes.SCT.Tissue, codes.SCT.Tissue


def build_seg(
    datasets: list[Any],
    group: SeriesGroup,
    geometry: Any,
    labels: np.ndarray,
    class_names: list[str],
    series_uid: str,
    sop_uid: str,
    algorithm: str,
    version: str,
    serial: str,
) -> Any:
    """A highdicom Segmentation of ``labels`` referencing ``datasets``.

    Args:
        datasets: the source files' datasets, in ``group.headers`` order (de-identified or not).
        group: the source series.
        geometry: its :class:`fedimg.dicom.geometry.SeriesGeometry`.
        labels: class indices on the source grid, (i, j, k) = (column, row, slice in ``geometry`` order).
        class_names: classes 1..N.
        series_uid, sop_uid: the SEG's own UIDs.
        algorithm: the algorithm name (the experiment's name).
        version: fedimg's version.
        serial: a package fingerprint (device serial number).
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    descriptions = []
    for i, name in enumerate(class_names, start=1):
        category, kind = _codes(name)
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=i,
                segment_label=name[:64],
                segmented_property_category=category,
                segmented_property_type=kind,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=hd.AlgorithmIdentificationSequence(
                    name=f"fedimg {algorithm}"[:64], version=version[:64], family=codes.DCM.ArtificialIntelligence
                ),
            )
        )
    frames = np.transpose(labels, (2, 1, 0)).astype(np.uint8)  # (k, row, column)
    multi = len(group.headers) == 1 and (group.first.frames or group.first.number_of_frames > 1)
    if multi:
        # One enhanced object: frame f of the SEG source holds slice k where sources[k] == (0, f).
        n_frames = max(f for _, f in geometry.sources) + 1
        pixel = np.zeros((n_frames,) + frames.shape[1:], dtype=np.uint8)
        for k, (_, f) in enumerate(geometry.sources):
            pixel[f] = frames[k]
        sources = [datasets[0]]
    else:
        pixel = frames
        sources = [datasets[i] for i in geometry.order]
    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixel,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=series_uid,
        series_number=9901,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer="fedimg",
        manufacturer_model_name=f"fedimg predict {algorithm}"[:64],
        software_versions=version[:64],
        device_serial_number=serial[:64],
        series_description=f"fedimg {algorithm}"[:64],
        content_label="FEDIMG",
        content_description="fedimg predict"[:64],
    )


def write_seg(path: Path, seg: Any, deidentified: bool) -> None:
    """Save the SEG atomically; a de-identified one says so ((0012,0062), (0012,0063))."""
    import os

    from fedimg.atomic import TMP_PREFIX

    if deidentified:
        seg.PatientIdentityRemoved = "YES"
        seg.DeidentificationMethod = [
            "fedimg predict: from de-identified source copies",
            "fedimg keyed HMAC-SHA256 pseudonyms",
        ]  # LO: 64 characters each
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    try:
        seg.save_as(tmp, enforce_file_format=True)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


__all__ = ["build_seg", "can_reference", "write_seg"]
