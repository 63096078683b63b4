"""Scanner and export profiles of the synthetic sites.

A :class:`SiteProfile` holds everything that makes one hospital's CT export
look different from another's: vendor, in-plane and through-plane spacing,
the acquisition plane, patient position, how Hounsfield units are encoded
((0028,1053) Rescale Slope, (0028,1052) Rescale Intercept, (0028,0103) Pixel
Representation), noise, how many cases the site contributes and how the
reference segmentation is delivered. Heterogeneity between sites is the point:
a pipeline that only works for one of them is wrong.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

ORIENTATIONS = ("axial", "sagittal", "coronal")
PATIENT_POSITIONS = ("HFS", "FFS")
LABEL_FORMATS = ("nifti", "dicom_mask")
FILE_EXTENSIONS = (".dcm", "")


@dataclass(frozen=True)
class SiteProfile:
    """How one synthetic site acquires and exports its CT studies.

    Attributes:
        name: site name, ``site-1``, ``site-2``, ...
        manufacturer: (0008,0070) Manufacturer.
        model_name: (0008,1090) Manufacturer's Model Name.
        pixel_spacing_mm: (0028,0030) Pixel Spacing; square pixels.
        slice_spacing_mm: distance between slice centres; slices are
            contiguous, so this is also (0018,0050) Slice Thickness and
            (0018,0088) Spacing Between Slices.
        orientation: acquisition plane, ``axial``, ``sagittal`` or ``coronal``.
        patient_position: (0018,5100) Patient Position, ``HFS`` or ``FFS``.
        rescale_slope: (0028,1053) Rescale Slope.
        rescale_intercept: (0028,1052) Rescale Intercept.
        pixel_representation: (0028,0103) Pixel Representation, 0 unsigned,
            1 two's complement.
        window_center: (0028,1050) Window Center.
        window_width: (0028,1051) Window Width.
        noise_sigma_hu: standard deviation of the Gaussian image noise in HU.
        case_factor: multiplies the requested number of cases; the site gets
            ``max(2, round(n_cases * case_factor))`` cases.
        label_format: ``nifti`` (a ``label/segmentation.nii.gz`` per study) or
            ``dicom_mask`` (a Secondary Capture mask series per study).
        file_extension: ``.dcm`` or ``""``; real exports often have
            extension-less files.
        series_description: (0008,103E) Series Description of the CT series.
        protocol_name: (0018,1030) Protocol Name.
        convolution_kernel: (0018,1210) Convolution Kernel.
        kvp: (0018,0060) KVP.
        series_number: (0020,0011) Series Number of the CT series (vendors
            number differently, e.g. Philips 201).
    """

    name: str
    manufacturer: str
    model_name: str
    pixel_spacing_mm: float
    slice_spacing_mm: float
    orientation: str
    patient_position: str
    rescale_slope: float
    rescale_intercept: float
    pixel_representation: int
    window_center: float
    window_width: float
    noise_sigma_hu: float
    case_factor: float
    label_format: str
    file_extension: str
    series_description: str
    protocol_name: str
    convolution_kernel: str
    kvp: float
    series_number: int

    def __post_init__(self) -> None:
        _check_choice("orientation", self.orientation, ORIENTATIONS)
        _check_choice("patient_position", self.patient_position, PATIENT_POSITIONS)
        _check_choice("label_format", self.label_format, LABEL_FORMATS)
        _check_choice("file_extension", self.file_extension, FILE_EXTENSIONS)
        if self.pixel_representation not in (0, 1):
            raise ValueError(
                f"SiteProfile {self.name!r}: pixel_representation must be 0 (unsigned) or 1 "
                f"(signed), got {self.pixel_representation!r}"
            )
        for field_name in ("pixel_spacing_mm", "slice_spacing_mm", "rescale_slope", "case_factor"):
            value = getattr(self, field_name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(
                    f"SiteProfile {self.name!r}: {field_name} must be a positive finite number, got {value!r}"
                )
        if self.noise_sigma_hu < 0:
            raise ValueError(f"SiteProfile {self.name!r}: noise_sigma_hu must be >= 0, got {self.noise_sigma_hu!r}")

    @property
    def bits_stored(self) -> int:
        """(0028,0101) Bits Stored.

        Unsigned CT is conventionally 12-bit (0..4095 covers -1024..3071 HU
        with intercept -1024); signed CT without an offset needs 16 bits for
        -1000 HU and below.
        """
        return 12 if self.pixel_representation == 0 else 16

    @property
    def stored_range(self) -> tuple[int, int]:
        """Smallest and largest stored value allowed by Bits Stored and Pixel Representation."""
        if self.pixel_representation == 0:
            return 0, (1 << self.bits_stored) - 1
        half = 1 << (self.bits_stored - 1)
        return -half, half - 1

    def n_cases(self, requested: int) -> int:
        """Number of cases this site generates when ``requested`` are asked for."""
        return max(2, int(math.floor(requested * self.case_factor + 0.5)))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy of the profile, including derived Bits Stored."""
        out = asdict(self)
        out["bits_stored"] = self.bits_stored
        return out


def _check_choice(field_name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"SiteProfile: {field_name} must be one of {choices}, got {value!r}")


# Three deliberately different vendors/exports; further sites are variations.
_BASE_PROFILES: tuple[SiteProfile, ...] = (
    SiteProfile(
        name="site-1",
        manufacturer="SIEMENS",
        model_name="SOMATOM Definition AS+",
        pixel_spacing_mm=1.6,
        slice_spacing_mm=3.0,
        orientation="axial",
        patient_position="HFS",
        rescale_slope=1.0,
        rescale_intercept=-1024.0,
        pixel_representation=0,
        window_center=40.0,
        window_width=400.0,
        noise_sigma_hu=10.0,
        case_factor=1.0,
        label_format="nifti",
        file_extension=".dcm",
        series_description="Abdomen 3.0 B30f",
        protocol_name="Abdomen_Routine",
        convolution_kernel="B30f",
        kvp=120.0,
        series_number=2,
    ),
    SiteProfile(
        name="site-2",
        manufacturer="GE MEDICAL SYSTEMS",
        model_name="LightSpeed VCT",
        pixel_spacing_mm=2.0,
        slice_spacing_mm=2.5,
        orientation="sagittal",
        patient_position="FFS",
        rescale_slope=1.0,
        rescale_intercept=0.0,
        pixel_representation=1,
        window_center=50.0,
        window_width=350.0,
        noise_sigma_hu=18.0,
        case_factor=1.25,
        label_format="dicom_mask",
        file_extension="",
        series_description="SAG ABD 2.5mm STND",
        protocol_name="5.1 ABDOMEN PELVIS",
        convolution_kernel="STANDARD",
        kvp=120.0,
        series_number=3,
    ),
    SiteProfile(
        name="site-3",
        manufacturer="Philips",
        model_name="Brilliance 64",
        pixel_spacing_mm=1.25,
        slice_spacing_mm=4.0,
        orientation="coronal",
        patient_position="HFS",
        rescale_slope=0.5,
        rescale_intercept=-1000.0,
        pixel_representation=0,
        window_center=60.0,
        window_width=360.0,
        noise_sigma_hu=6.0,
        case_factor=0.75,
        label_format="nifti",
        file_extension=".dcm",
        series_description="COR Abdomen 4mm B",
        protocol_name="Abdomen/Pelvis",
        convolution_kernel="B",
        kvp=140.0,
        series_number=201,
    ),
)

# Per-cycle variations for sites beyond the three base profiles.
_MODELS = {
    "SIEMENS": ("SOMATOM Definition AS+", "SOMATOM Force", "SOMATOM go.Up"),
    "GE MEDICAL SYSTEMS": ("LightSpeed VCT", "Revolution CT", "Optima CT660"),
    "Philips": ("Brilliance 64", "IQon - Spectral CT", "Ingenuity CT"),
}
_PIXEL_SPACING_FACTORS = (1.0, 1.1, 0.9, 1.2, 0.8)
_SLICE_SPACING_FACTORS = (1.0, 0.8, 1.2, 0.6, 1.4)


def site_profiles(n_sites: int) -> list[SiteProfile]:
    """Profiles of the first ``n_sites`` synthetic sites.

    Sites 1-3 are the base profiles (Siemens axial HFS, GE sagittal FFS,
    Philips coronal HFS). Site ``n > 3`` reuses base profile ``(n-1) % 3``
    with a deterministic variation for cycle ``(n-1) // 3``: another model of
    the same vendor, scaled pixel and slice spacing, patient position flipped
    on odd cycles and more noise.

    Args:
        n_sites: number of sites, >= 1.

    Returns:
        One profile per site, named ``site-1`` ... ``site-<n_sites>``.

    Raises:
        ValueError: if ``n_sites`` is not an integer >= 1.
    """
    if isinstance(n_sites, bool) or not isinstance(n_sites, int) or n_sites < 1:
        raise ValueError(f"n_sites must be an integer >= 1, got {n_sites!r}")
    profiles = []
    for index in range(n_sites):
        base = _BASE_PROFILES[index % len(_BASE_PROFILES)]
        cycle = index // len(_BASE_PROFILES)
        if cycle == 0:
            profiles.append(base)
            continue
        flip = {"HFS": "FFS", "FFS": "HFS"}
        profiles.append(
            replace(
                base,
                name=f"site-{index + 1}",
                model_name=_MODELS[base.manufacturer][cycle % 3],
                pixel_spacing_mm=round(base.pixel_spacing_mm * _PIXEL_SPACING_FACTORS[cycle % 5], 3),
                slice_spacing_mm=round(base.slice_spacing_mm * _SLICE_SPACING_FACTORS[cycle % 5], 3),
                patient_position=(flip[base.patient_position] if cycle % 2 else base.patient_position),
                noise_sigma_hu=base.noise_sigma_hu + 3.0 * (cycle % 4),
            )
        )
    return profiles


# --------------------------------------------------------------------------
# Projection radiographs (``fedimg synth --modality DX``)
# --------------------------------------------------------------------------

PHOTOMETRIC_INTERPRETATIONS = ("MONOCHROME1", "MONOCHROME2")


@dataclass(frozen=True)
class DXProfile:
    """How one synthetic site acquires and exports its projection radiographs.

    The site name, vendor, number of cases and file naming follow the site's
    CT profile, so a DX data set has the same sites, patients and studies as
    the CT one of the same seed.

    Attributes:
        name: site name.
        manufacturer: (0008,0070) Manufacturer.
        model_name: (0008,1090) Manufacturer's Model Name.
        pixel_spacing_mm: detector pixel size (square), written as (0018,1164)
            Imager Pixel Spacing and, where ``write_pixel_spacing``, also as
            (0028,0030) Pixel Spacing.
        rows: (0028,0010) Rows.
        columns: (0028,0011) Columns.
        photometric_interpretation: (0028,0004) ``MONOCHROME1`` (low values
            white: air is stored high) or ``MONOCHROME2``.
        bits_stored: (0028,0101) Bits Stored (unsigned pixels).
        write_pixel_spacing: whether (0028,0030) is present (many detectors
            export only (0018,1164)).
        write_rescale: whether (0028,1052)/(0028,1053) are present (identity).
        noise_sigma: Gaussian noise on the line integral (attenuation units).
        case_factor: as :attr:`SiteProfile.case_factor`.
        file_extension: ``.dcm`` or ``""``.
        series_description: (0008,103E) Series Description.
        series_number: (0020,0011) Series Number.
        kvp: (0018,0060) KVP.
    """

    name: str
    manufacturer: str
    model_name: str
    pixel_spacing_mm: float
    rows: int
    columns: int
    photometric_interpretation: str
    bits_stored: int
    write_pixel_spacing: bool
    write_rescale: bool
    noise_sigma: float
    case_factor: float
    file_extension: str
    series_description: str
    series_number: int
    kvp: float

    def __post_init__(self) -> None:
        _check_choice("photometric_interpretation", self.photometric_interpretation, PHOTOMETRIC_INTERPRETATIONS)
        _check_choice("file_extension", self.file_extension, FILE_EXTENSIONS)
        if not (8 <= self.bits_stored <= 16):
            raise ValueError(f"DXProfile {self.name!r}: bits_stored must be 8..16, got {self.bits_stored!r}")
        if not (math.isfinite(self.pixel_spacing_mm) and self.pixel_spacing_mm > 0):
            raise ValueError(
                f"DXProfile {self.name!r}: pixel_spacing_mm must be positive, got {self.pixel_spacing_mm!r}"
            )
        if self.rows < 16 or self.columns < 16:
            raise ValueError(
                f"DXProfile {self.name!r}: rows and columns must be >= 16, got {self.rows} x {self.columns}"
            )

    @property
    def stored_max(self) -> int:
        """Largest stored value allowed by Bits Stored."""
        return (1 << self.bits_stored) - 1

    def n_cases(self, requested: int) -> int:
        """Number of cases this site generates when ``requested`` are asked for."""
        return max(2, int(math.floor(requested * self.case_factor + 0.5)))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy of the profile."""
        return asdict(self)


_DX_BASE: tuple[dict[str, Any], ...] = (
    # Siemens: MONOCHROME2, calibrated Pixel Spacing, landscape matrix.
    {
        "model_name": "YSIO Max",
        "pixel_spacing_mm": 1.0,
        "rows": 240,
        "columns": 256,
        "photometric_interpretation": "MONOCHROME2",
        "bits_stored": 12,
        "write_pixel_spacing": True,
        "write_rescale": False,
        "noise_sigma": 0.012,
        "series_description": "Thorax ap",
        "series_number": 1,
        "kvp": 110.0,
    },
    # GE: MONOCHROME1, only Imager Pixel Spacing, portrait matrix.
    {
        "model_name": "Discovery XR656",
        "pixel_spacing_mm": 1.2,
        "rows": 200,
        "columns": 180,
        "photometric_interpretation": "MONOCHROME1",
        "bits_stored": 14,
        "write_pixel_spacing": False,
        "write_rescale": True,
        "noise_sigma": 0.018,
        "series_description": "CHEST AP",
        "series_number": 2,
        "kvp": 120.0,
    },
    # Philips: MONOCHROME1, both spacings, finer pixels.
    {
        "model_name": "DigitalDiagnost C90",
        "pixel_spacing_mm": 0.8,
        "rows": 300,
        "columns": 280,
        "photometric_interpretation": "MONOCHROME1",
        "bits_stored": 12,
        "write_pixel_spacing": True,
        "write_rescale": False,
        "noise_sigma": 0.008,
        "series_description": "Chest AP",
        "series_number": 101,
        "kvp": 125.0,
    },
)
_DX_SPACING_FACTORS = (1.0, 1.15, 0.9, 1.3, 0.85)


def dx_site_profiles(n_sites: int) -> list[DXProfile]:
    """Radiography profiles of the first ``n_sites`` synthetic sites.

    Sites 1-3 differ in vendor, matrix, pixel size, photometric
    interpretation, bit depth and which spacing attributes they write. Site
    ``n > 3`` reuses base ``(n-1) % 3`` with a coarser or finer detector and,
    on odd cycles, the other photometric interpretation. Names, vendors,
    case counts and file naming follow :func:`site_profiles`.

    Raises:
        ValueError: if ``n_sites`` is not an integer >= 1.
    """
    out = []
    for index, ct in enumerate(site_profiles(n_sites)):
        base = dict(_DX_BASE[index % len(_DX_BASE)])
        cycle = index // len(_DX_BASE)
        if cycle:
            factor = _DX_SPACING_FACTORS[cycle % len(_DX_SPACING_FACTORS)]
            fov_rows, fov_cols = base["rows"] * base["pixel_spacing_mm"], base["columns"] * base["pixel_spacing_mm"]
            base["pixel_spacing_mm"] = round(base["pixel_spacing_mm"] * factor, 3)
            base["rows"] = int(round(fov_rows / base["pixel_spacing_mm"]))
            base["columns"] = int(round(fov_cols / base["pixel_spacing_mm"]))
            if cycle % 2:
                base["photometric_interpretation"] = (
                    "MONOCHROME1" if base["photometric_interpretation"] == "MONOCHROME2" else "MONOCHROME2"
                )
            base["noise_sigma"] = round(base["noise_sigma"] + 0.003 * (cycle % 3), 4)
        out.append(
            DXProfile(
                name=ct.name,
                manufacturer=ct.manufacturer,
                case_factor=ct.case_factor,
                file_extension=ct.file_extension,
                **base,
            )
        )
    return out
