"""Deterministic synthetic multi-site DICOM studies (CT volumes or DX radiographs) with known ground truth.

Behind ``fedimg synth OUT --sites 3 --cases N --seed S [--modality DX]`` and ``fedimg demo``:
each site gets its own scanner profile (vendor, plane, patient position,
spacing, pixel encoding, noise, label delivery), fake but plausible patient
identifiers, and an analytic phantom (body, organ, optional lesion) whose HU
values and labels are known exactly. ``OUT/ground_truth.json`` records all of
it; ``OUT/<site>/labels.csv`` is each site's classification label sheet
(lesion / no_lesion per study, keyed by accession number and Study Instance
UID). ``modality="DX"`` images the same patients as single-frame projection
radiographs.

Example:
    >>> from fedimg.synth import generate
    >>> result = generate("/tmp/synth", n_sites=3, n_cases=8, seed=0)
    >>> print(result.summary_table())
"""

from __future__ import annotations

from fedimg.synth.generator import SynthResult, generate
from fedimg.synth.phantom import CLASS_NAMES, Phantom
from fedimg.synth.profiles import DXProfile, SiteProfile, dx_site_profiles, site_profiles
from fedimg.synth.truth import CLASSIFICATION_CLASSES, LABELS_CSV_NAME, CaseTruth, load_ground_truth

__all__ = [
    "CLASSIFICATION_CLASSES",
    "CLASS_NAMES",
    "CaseTruth",
    "DXProfile",
    "LABELS_CSV_NAME",
    "Phantom",
    "SiteProfile",
    "SynthResult",
    "dx_site_profiles",
    "generate",
    "load_ground_truth",
    "site_profiles",
]
