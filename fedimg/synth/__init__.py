"""Deterministic synthetic multi-site DICOM CT studies with known ground truth.

Behind ``fedimg synth OUT --sites 3 --cases N --seed S`` and ``fedimg demo``:
each site gets its own scanner profile (vendor, plane, patient position,
spacing, pixel encoding, noise, label delivery), fake but plausible patient
identifiers, and an analytic phantom (body, organ, optional lesion) whose HU
values and labels are known exactly. ``OUT/ground_truth.json`` records all of
it.

Example:
    >>> from fedimg.synth import generate
    >>> result = generate("/tmp/synth", n_sites=3, n_cases=8, seed=0)
    >>> print(result.summary_table())
"""

from __future__ import annotations

from fedimg.synth.generator import SynthResult, generate
from fedimg.synth.phantom import CLASS_NAMES, Phantom
from fedimg.synth.profiles import SiteProfile, site_profiles
from fedimg.synth.truth import CaseTruth, load_ground_truth

__all__ = [
    "CLASS_NAMES",
    "CaseTruth",
    "Phantom",
    "SiteProfile",
    "SynthResult",
    "generate",
    "load_ground_truth",
    "site_profiles",
]
