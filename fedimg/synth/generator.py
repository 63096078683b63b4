"""Generate a synthetic multi-site CT (or DX radiograph) data set with known ground truth.

Determinism: every random draw comes from a numpy Generator seeded with
``(seed, site_index, case_index, stream)``, and every UID from a hash of the
same parts, so one seed always gives byte-identical files regardless of the
order in which cases are produced. A DX data set draws its patients, studies
and phantoms from the same streams as the CT one of the same seed: the same
fake identifiers and the same lesion flags, imaged as radiographs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.uid import UID
from tqdm.auto import tqdm

from fedimg.synth.geometry import SeriesGeometry
from fedimg.synth.identity import (
    PatientIdentity,
    SiteIdentity,
    StudyIdentity,
    deterministic_uid,
    sample_patient,
    sample_site_identity,
    sample_study,
)
from fedimg.synth.layout import label_path, series_dir, study_dir
from fedimg.synth.phantom import Phantom
from fedimg.synth.profiles import DXProfile, SiteProfile, dx_site_profiles, site_profiles
from fedimg.synth.render import (
    DX_LESION_EXTRA_HU,
    hu_to_stored,
    integral_to_stored,
    render_projection,
    render_series,
)
from fedimg.synth.truth import (
    GROUND_TRUTH_FILE_NAME,
    LABELS_CSV_NAME,
    CaseTruth,
    write_ground_truth,
    write_labels_csv,
)
from fedimg.synth.writer import (
    MASK_SERIES_DESCRIPTION,
    SeriesSpec,
    StudyContext,
    write_ct_series,
    write_dx_image,
    write_label_nifti,
    write_mask_series,
)

logger = logging.getLogger(__name__)

# Independent random streams per case.
_STREAM_IDENTITY = 0
_STREAM_PHANTOM = 1
_STREAM_NOISE = 2
_STREAM_SITE = 3
# Every FOLLOW_UP_EVERY-th case of a site is a follow-up study of the patient
# of the case before it: same Patient ID in two studies, as in real archives.
FOLLOW_UP_EVERY = 4
MASK_SERIES_NUMBER = 1001
MODALITIES = ("CT", "DX")


@dataclass(frozen=True)
class SynthResult:
    """What :func:`generate` produced.

    Attributes:
        out_dir: the output folder.
        sites: per site name, the ground truth of its cases.
        ground_truth_path: ``out_dir / "ground_truth.json"``.
        profiles: per site name, its profile.
    """

    out_dir: Path
    sites: dict[str, list[CaseTruth]]
    ground_truth_path: Path
    profiles: dict[str, SiteProfile | DXProfile] = field(default_factory=dict)
    modality: str = "CT"

    @property
    def n_cases(self) -> int:
        """Total number of cases over all sites."""
        return sum(len(cases) for cases in self.sites.values())

    def summary_table(self) -> str:
        """A plain-text table, one row per site."""
        header = (
            f"{'site':<8} {'manufacturer':<19} {'plane':<9} {'pos':<4} {'spacing mm':<16} "
            f"{'shape (i,j,k)':<14} {'cases':>5} {'lesion':>6} {'label':<10}"
        )
        rows = [header, "-" * len(header)]
        for name, cases in self.sites.items():
            profile = self.profiles.get(name)
            first = cases[0]
            spacing = "x".join(f"{v:g}" for v in first.spacing)
            shape = "x".join(str(v) for v in first.shape)
            rows.append(
                f"{name:<8} {(profile.manufacturer if profile else '?'):<19} "
                f"{first.orientation:<9} {first.patient_position:<4} {spacing:<16} {shape:<14} "
                f"{len(cases):>5} {sum(c.has_lesion for c in cases):>6} {first.label_format:<10}"
            )
        return "\n".join(rows)


def generate(
    out_dir: str | Path,
    n_sites: int = 3,
    n_cases: int = 8,
    seed: int = 0,
    progress: bool = True,
    modality: str = "CT",
) -> SynthResult:
    """Write a synthetic multi-site CT (or DX) data set and its ground truth.

    Layout::

        OUT/ground_truth.json
        OUT/<site>/labels.csv                      (AccessionNumber, StudyInstanceUID, label)
        OUT/<site>/<PatientID>_<LASTNAME>/<StudyDate>_<AccessionNumber>/
            <SeriesNumber>_<Series Description>/IM0001[.dcm] ...
            label/segmentation.nii.gz              (CT sites with NIfTI labels)
            1001_Mask_Segmentation/IM0001[.dcm]    (CT sites with DICOM masks)

    ``modality="DX"`` writes, per study, one single-frame Digital X-Ray
    image instead: an anterior-posterior projection of the same phantom
    (:func:`fedimg.synth.render.render_projection`; the lesion is calcified
    in the radiograph, so it is visible), each site with its own detector
    (:func:`fedimg.synth.profiles.dx_site_profiles`: matrix, pixel size,
    MONOCHROME1 or MONOCHROME2, bit depth, spacing attributes). Its labels are
    only the label sheet ``labels.csv``.

    Args:
        out_dir: output folder; created if missing. Each ``out_dir/<site>``
            must be absent or empty.
        n_sites: number of sites (>= 1); see :func:`site_profiles`.
        n_cases: cases per site before the site's ``case_factor``
            (>= 1; every site gets at least 2).
        seed: non-negative integer; the same seed gives byte-identical files.
        progress: show a tqdm progress bar.
        modality: ``CT`` (volumes with segmentation labels) or ``DX``
            (projection radiographs).

    Returns:
        The per-site ground truth and where it was written.

    Raises:
        ValueError: for invalid arguments or a non-empty site folder.
    """
    _check_int("n_sites", n_sites, 1)
    _check_int("n_cases", n_cases, 1)
    _check_int("seed", seed, 0)
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    n_sites, n_cases, seed = int(n_sites), int(n_cases), int(seed)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir must be a folder, but {out} is a file; choose another path")
    profiles: list[Any] = site_profiles(n_sites) if modality == "CT" else dx_site_profiles(n_sites)
    for profile in profiles:
        site_folder = out / profile.name
        if site_folder.exists() and (not site_folder.is_dir() or any(site_folder.iterdir())):
            raise ValueError(
                f"{site_folder} already exists and is not empty; synthetic data is never "
                "written over existing files: choose a new out_dir or delete that folder"
            )
    out.mkdir(parents=True, exist_ok=True)

    sites: dict[str, list[CaseTruth]] = {}
    total = sum(profile.n_cases(n_cases) for profile in profiles)
    with tqdm(total=total, desc="fedimg synth", unit="case", disable=not progress) as bar:
        for site_index, profile in enumerate(profiles):
            bar.set_postfix_str(profile.name)
            sites[profile.name] = _generate_site(out, profile, site_index, n_cases, seed, bar)
            write_labels_csv(out / profile.name / LABELS_CSV_NAME, sites[profile.name])
            logger.info("%s: wrote %d cases", profile.name, len(sites[profile.name]))

    ground_truth_path = out / GROUND_TRUTH_FILE_NAME
    write_ground_truth(
        ground_truth_path,
        seed=seed,
        n_cases_requested=n_cases,
        profiles=profiles,
        sites=sites,
        modality=modality,
    )
    result = SynthResult(
        out_dir=out,
        sites=sites,
        ground_truth_path=ground_truth_path,
        profiles={profile.name: profile for profile in profiles},
        modality=modality,
    )
    logger.info("synthetic data set written:\n%s", result.summary_table())
    return result


def _generate_site(
    out: Path, profile: SiteProfile | DXProfile, site_index: int, n_cases: int, seed: int, bar: tqdm
) -> list[CaseTruth]:
    site_identity = sample_site_identity(np.random.default_rng([seed, site_index, 0, _STREAM_SITE]), site_index)
    cases: list[CaseTruth] = []
    used_patient_ids: set[str] = set()
    previous: tuple[PatientIdentity, StudyIdentity, str] | None = None
    for case_index in range(profile.n_cases(n_cases)):
        rng = np.random.default_rng([seed, site_index, case_index, _STREAM_IDENTITY])
        follow_up_of: str | None = None
        if previous is not None and case_index % FOLLOW_UP_EVERY == FOLLOW_UP_EVERY - 1:
            patient, earlier, follow_up_of = previous
            study = sample_study(rng, patient, after=earlier.study_date)
        else:
            patient = sample_patient(rng, site_index)
            # Distinct patients must not share an ID by chance.
            while patient.patient_id in used_patient_ids:
                patient = sample_patient(rng, site_index)
            study = sample_study(rng, patient)
        used_patient_ids.add(patient.patient_id)
        if isinstance(profile, DXProfile):
            truth = _generate_dx_case(out, profile, site_identity, study, site_index, case_index, seed, follow_up_of)
        else:
            truth = _generate_case(out, profile, site_identity, study, site_index, case_index, seed, follow_up_of)
        cases.append(truth)
        previous = (patient, study, truth.case_id)
        bar.update(1)
    return cases


def _generate_case(
    out: Path,
    profile: SiteProfile,
    site_identity: SiteIdentity,
    study: StudyIdentity,
    site_index: int,
    case_index: int,
    seed: int,
    follow_up_of: str | None,
) -> CaseTruth:
    case_id = f"{profile.name}-case-{case_index:03d}"
    geometry = SeriesGeometry.from_profile(profile)
    phantom = Phantom.random(np.random.default_rng([seed, site_index, case_index, _STREAM_PHANTOM]))
    stored, label = _render_ct(
        profile, geometry, phantom, np.random.default_rng([seed, site_index, case_index, _STREAM_NOISE])
    )

    def uid(*role: object) -> UID:
        return deterministic_uid(seed, site_index, case_index, *role)

    context = StudyContext(
        profile=profile,
        site=site_identity,
        study=study,
        study_instance_uid=uid("study"),
        frame_of_reference_uid=uid("frame-of-reference"),
        geometry=geometry,
    )
    image_spec = SeriesSpec(
        series_instance_uid=uid("ct-series"),
        sop_instance_uids=[uid("ct-instance", k) for k in range(geometry.n_slices)],
        series_number=profile.series_number,
        series_description=profile.series_description,
        minutes_after_study=2,
    )
    study_folder = study_dir(out, profile.name, study)
    image_folder = series_dir(study_folder, image_spec.series_number, image_spec.series_description)
    files = write_ct_series(image_folder, context, image_spec, stored)

    nifti_path, mask_uid, mask_dir = _write_ct_label(out, study_folder, context, image_spec, label, uid)

    counts = np.bincount(label.ravel(), minlength=3)
    return CaseTruth(
        case_id=case_id,
        site=profile.name,
        case_index=case_index,
        follow_up_of=follow_up_of,
        study_dir=_relative(study_folder, out),
        image_series_dir=_relative(image_folder, out),
        n_image_files=len(files),
        study_instance_uid=str(context.study_instance_uid),
        series_instance_uid=str(image_spec.series_instance_uid),
        frame_of_reference_uid=str(context.frame_of_reference_uid),
        label_format=profile.label_format,
        label_path=nifti_path,
        label_series_instance_uid=mask_uid,
        label_series_dir=mask_dir,
        orientation=profile.orientation,
        patient_position=profile.patient_position,
        image_orientation_patient=tuple(geometry.image_orientation_patient),
        shape=geometry.shape,
        spacing=geometry.spacing,
        affine_lps=_matrix(geometry.affine_lps),
        affine_ras=_matrix(geometry.affine_ras),
        has_lesion=phantom.has_lesion,
        organ_voxels=int(counts[1]),
        lesion_voxels=int(counts[2]),
        phantom=phantom.to_dict(),
        identifiers=study.to_dict(site_identity),
    )


def _render_ct(
    profile: SiteProfile, geometry: SeriesGeometry, phantom: Phantom, noise_rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Render a phantom on the series grid and store it as the site's scanner would.

    Args:
        profile: the site's profile (noise, rescale, stored range, signedness).
        geometry: the image grid.
        phantom: the case's phantom.
        noise_rng: the case's noise stream.

    Returns:
        The stored pixel values and the label volume (0 background, 1 organ, 2 lesion).
    """
    hu, label = render_series(phantom, geometry, noise_rng, profile.noise_sigma_hu)
    stored = hu_to_stored(
        hu,
        profile.rescale_slope,
        profile.rescale_intercept,
        profile.stored_range,
        signed=profile.pixel_representation == 1,
    )
    return stored, label


def _write_ct_label(
    out: Path,
    study_folder: Path,
    context: StudyContext,
    image_spec: SeriesSpec,
    label: np.ndarray,
    uid: Callable[..., UID],
) -> tuple[str | None, str | None, str | None]:
    """Write a CT case's label in its site's format: a NIfTI file in the study folder, or a DICOM mask series.

    Args:
        out: the data set's root (the paths returned are relative to it).
        study_folder: the case's study folder.
        context: the study's shared context (profile, geometry, UIDs).
        image_spec: the image series the mask refers to.
        label: the label volume.
        uid: the case's deterministic UID maker, by role.

    Returns:
        The NIfTI label's path, the mask series' instance UID and the mask series' folder; the two that do not
        apply to the site's format are None.
    """
    geometry = context.geometry
    if context.profile.label_format == "nifti":
        target = label_path(study_folder)
        write_label_nifti(target, label, geometry)
        return _relative(target, out), None, None
    mask_spec = SeriesSpec(
        series_instance_uid=uid("mask-series"),
        sop_instance_uids=[uid("mask-instance", k) for k in range(geometry.n_slices)],
        series_number=MASK_SERIES_NUMBER,
        series_description=MASK_SERIES_DESCRIPTION,
        minutes_after_study=30,
    )
    mask_folder = series_dir(study_folder, MASK_SERIES_NUMBER, MASK_SERIES_DESCRIPTION)
    write_mask_series(mask_folder, context, mask_spec, label, image_spec)
    return None, str(mask_spec.series_instance_uid), _relative(mask_folder, out)


def _generate_dx_case(
    out: Path,
    profile: DXProfile,
    site_identity: SiteIdentity,
    study: StudyIdentity,
    site_index: int,
    case_index: int,
    seed: int,
    follow_up_of: str | None,
) -> CaseTruth:
    case_id = f"{profile.name}-case-{case_index:03d}"
    phantom = Phantom.random(np.random.default_rng([seed, site_index, case_index, _STREAM_PHANTOM]))
    integral, crossed = render_projection(
        phantom,
        profile.rows,
        profile.columns,
        profile.pixel_spacing_mm,
        np.random.default_rng([seed, site_index, case_index, _STREAM_NOISE]),
        profile.noise_sigma,
    )
    stored = integral_to_stored(integral, profile.bits_stored, profile.photometric_interpretation)

    def uid(*role: object) -> UID:
        return deterministic_uid(seed, site_index, case_index, *role)

    study_uid, series_uid = uid("study"), uid("dx-series")
    study_folder = study_dir(out, profile.name, study)
    image_folder = series_dir(study_folder, profile.series_number, profile.series_description)
    write_dx_image(
        image_folder, profile, site_identity, study, UID(study_uid), UID(series_uid), UID(uid("dx-instance", 0)), stored
    )
    ps = profile.pixel_spacing_mm
    # Detector plane through the isocentre: i = column (towards L), j = row (towards F), k = ray direction.
    lps = np.eye(4)
    lps[:3, 0] = (ps, 0.0, 0.0)
    lps[:3, 1] = (0.0, 0.0, -ps)
    lps[:3, 2] = (0.0, 1.0, 0.0)
    lps[:3, 3] = (-(profile.columns - 1) / 2.0 * ps, 0.0, (profile.rows - 1) / 2.0 * ps)
    phantom_info = phantom.to_dict()
    if phantom_info["lesion"] is not None:
        phantom_info["lesion"]["dx_hu"] = round(float(phantom.lesion_hu or 0.0) + DX_LESION_EXTRA_HU, 3)
    return CaseTruth(
        case_id=case_id,
        site=profile.name,
        case_index=case_index,
        follow_up_of=follow_up_of,
        study_dir=_relative(study_folder, out),
        image_series_dir=_relative(image_folder, out),
        n_image_files=1,
        study_instance_uid=str(study_uid),
        series_instance_uid=str(series_uid),
        frame_of_reference_uid="",
        label_format="csv",
        label_path=f"{profile.name}/{LABELS_CSV_NAME}",
        label_series_instance_uid=None,
        label_series_dir=None,
        orientation="projection",
        patient_position="AP",
        image_orientation_patient=(),
        shape=(profile.columns, profile.rows, 1),
        spacing=(ps, ps, 1.0),
        affine_lps=_matrix(lps),
        affine_ras=_matrix(np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps),
        has_lesion=phantom.has_lesion,
        organ_voxels=crossed["organ"],
        lesion_voxels=crossed["lesion"],
        phantom=phantom_info,
        identifiers=study.to_dict(site_identity),
    )


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _relative(path: Path, root: Path) -> str:
    return Path(path).relative_to(root).as_posix()


def _matrix(array: np.ndarray) -> tuple[tuple[float, ...], ...]:
    return tuple(tuple(round(float(v), 6) + 0.0 for v in row) for row in array)
