"""Sampling the phantom: a CT series grid (HU plus ground-truth label), or a projection radiograph."""

from __future__ import annotations

from typing import Any

import numpy as np

from fedimg.synth.geometry import SeriesGeometry
from fedimg.synth.phantom import Phantom

SUPERSAMPLING = 3
"""Sub-slices averaged per slice; thick CT slices integrate over their thickness."""


def render_series(
    phantom: Phantom,
    geometry: SeriesGeometry,
    rng: np.random.Generator,
    noise_sigma_hu: float,
    supersampling: int = SUPERSAMPLING,
) -> tuple[np.ndarray, np.ndarray]:
    """Image and label of one series.

    The image averages ``supersampling`` sub-slices evenly spread across each
    slice's thickness (partial-volume effect of thick slices) and adds white
    Gaussian noise. The label is the phantom's label at the voxel centre, so
    label counts estimate the analytic volumes without bias.

    Args:
        phantom: the object to image.
        geometry: the grid.
        rng: source of the noise.
        noise_sigma_hu: noise standard deviation in HU.
        supersampling: number of sub-slices, >= 1.

    Returns:
        ``(hu, label)``: float32 and uint8 arrays of shape
        ``(n_slices, n_rows, n_columns)``, slice ``k`` being Instance Number
        ``k + 1`` (the DICOM pixel-array layout, not the ``(i, j, k)`` layout).

    Raises:
        ValueError: if ``supersampling`` < 1 or ``noise_sigma_hu`` < 0.
    """
    if supersampling < 1:
        raise ValueError(f"supersampling must be >= 1, got {supersampling}")
    if noise_sigma_hu < 0:
        raise ValueError(f"noise_sigma_hu must be >= 0, got {noise_sigma_hu}")
    shape = (geometry.n_slices, geometry.n_rows, geometry.n_columns)
    hu = np.empty(shape, dtype=np.float32)
    label = np.empty(shape, dtype=np.uint8)
    inplane = geometry.inplane_offsets()
    slice_dir = np.asarray(geometry.slice_dir)
    fractions = (np.arange(supersampling) + 0.5) / supersampling - 0.5
    centre_index = supersampling // 2 if supersampling % 2 == 1 else None

    for k in range(geometry.n_slices):
        ipp = np.asarray(geometry.image_position_patient(k))
        accumulated = np.zeros(inplane.shape[1], dtype=np.float64)
        for m, fraction in enumerate(fractions):
            offset = ipp + fraction * geometry.slice_spacing_mm * slice_dir
            points = inplane + offset[:, None]
            sub_hu, sub_label = phantom.sample(points.T)
            accumulated += sub_hu
            if m == centre_index:
                label[k] = sub_label.reshape(shape[1:])
        if centre_index is None:
            _, centre_label = phantom.sample((inplane + ipp[:, None]).T)
            label[k] = centre_label.reshape(shape[1:])
        hu[k] = (accumulated / supersampling).reshape(shape[1:])

    if noise_sigma_hu > 0:
        hu += rng.standard_normal(shape, dtype=np.float32) * np.float32(noise_sigma_hu)
    return hu, label


def hu_to_stored(
    hu: np.ndarray, slope: float, intercept: float, stored_range: tuple[int, int], signed: bool
) -> np.ndarray:
    """Encode HU as stored pixel values, inverting the modality LUT.

    ``HU = stored * (0028,1053) Rescale Slope + (0028,1052) Rescale Intercept``,
    so ``stored = round((HU - intercept) / slope)``, clipped to what
    (0028,0101) Bits Stored and (0028,0103) Pixel Representation allow (real
    scanners clip too, e.g. air below the intercept).

    Args:
        hu: Hounsfield units.
        slope: rescale slope (> 0).
        intercept: rescale intercept.
        stored_range: inclusive ``(min, max)`` stored value.
        signed: True for int16 output, False for uint16.

    Returns:
        int16 or uint16 array of the same shape.
    """
    stored = np.rint((hu.astype(np.float64) - intercept) / slope)
    np.clip(stored, stored_range[0], stored_range[1], out=stored)
    return stored.astype(np.int16 if signed else np.uint16)


# --------------------------------------------------------------------------
# Projection radiographs
# --------------------------------------------------------------------------

MU_WATER_PER_MM = 0.02
"""Linear attenuation of water (about 70 keV), 1/mm; mu = MU_WATER * (1 + HU / 1000)."""

DX_LESION_EXTRA_HU = 550.0
"""In radiographs the lesion is calcified: its HU is raised by this much over the CT value.

A hypodense CT lesion would change the line integral by only ~2%; raised by
this amount, the lesion adds ~8-10% at its centre, a nodule a small CNN can
learn to see.
"""

ATTENUATION_REFERENCE = 4.0
"""Line integral mapped to 85% of the stored range (thicker than any phantom)."""


def chord_lengths(ellipsoid: Any, x: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Length (mm) of the line along y (anterior-posterior) through an axis-aligned ellipsoid at each (x, z)."""
    (cx, _, cz), (a, b, c) = ellipsoid.centre, ellipsoid.semi_axes
    inside = 1.0 - ((x - cx) / a) ** 2 - ((z - cz) / c) ** 2
    return 2.0 * b * np.sqrt(np.clip(inside, 0.0, None))


def render_projection(
    phantom: Phantom,
    rows: int,
    columns: int,
    pixel_spacing_mm: float,
    rng: np.random.Generator,
    noise_sigma: float,
) -> tuple[np.ndarray, dict[str, int]]:
    """Anterior-posterior projection of the phantom: line integrals of attenuation.

    Rays run along LPS +y through every detector pixel; pixel ``(r, c)``
    sits at ``x = (c - (columns - 1) / 2) * spacing`` (patient's left to the
    right of the image) and ``z = ((rows - 1) / 2 - r) * spacing`` (head at
    the top). The integral is analytic: chord lengths through the body,
    organ and lesion ellipsoids times their attenuation differences (the
    body's small HU variation is left out). The lesion is rendered with
    :data:`DX_LESION_EXTRA_HU` added.

    Args:
        phantom: the object.
        rows: detector rows.
        columns: detector columns.
        pixel_spacing_mm: detector pixel size.
        rng: source of the noise.
        noise_sigma: standard deviation of Gaussian noise added to the integral.

    Returns:
        ``(integral, counts)``: float64 ``(rows, columns)`` line integrals
        (dimensionless, 0 in air) and the number of pixels whose ray crosses
        the organ / the lesion.
    """
    x = (np.arange(columns, dtype=np.float64) - (columns - 1) / 2.0) * pixel_spacing_mm
    z = ((rows - 1) / 2.0 - np.arange(rows, dtype=np.float64)) * pixel_spacing_mm
    xx, zz = np.meshgrid(x, z)

    def mu(hu: float) -> float:
        return MU_WATER_PER_MM * (1.0 + hu / 1000.0)

    body = chord_lengths(phantom.body, xx, zz)
    organ = chord_lengths(phantom.organ, xx, zz)
    integral = mu(phantom.body_hu) * body + (mu(phantom.organ_hu) - mu(phantom.body_hu)) * organ
    lesion_pixels = 0
    if phantom.lesion is not None and phantom.lesion_hu is not None:
        lesion = chord_lengths(phantom.lesion, xx, zz)
        integral += (mu(phantom.lesion_hu + DX_LESION_EXTRA_HU) - mu(phantom.organ_hu)) * lesion
        lesion_pixels = int((lesion > 0).sum())
    if noise_sigma > 0:
        integral = integral + rng.standard_normal(integral.shape) * noise_sigma
    return integral, {"organ": int((organ > 0).sum()), "lesion": lesion_pixels}


def integral_to_stored(integral: np.ndarray, bits_stored: int, photometric: str) -> np.ndarray:
    """Encode line integrals as unsigned stored values.

    MONOCHROME2 stores ``offset + gain * integral`` (dense is high, displayed
    bright); MONOCHROME1 stores the mirror ``max - (offset + gain *
    integral)`` (air is high, displayed black: low values are white), so
    both display the same picture.

    Args:
        integral: line integrals, 0 in air.
        bits_stored: (0028,0101) Bits Stored.
        photometric: ``MONOCHROME1`` or ``MONOCHROME2``.

    Returns:
        uint16 array of the same shape.
    """
    top = (1 << bits_stored) - 1
    offset = 0.05 * top
    gain = (0.85 * top - offset) / ATTENUATION_REFERENCE
    values = np.clip(np.rint(offset + gain * integral), 0, top)
    if photometric == "MONOCHROME1":
        values = top - values
    return values.astype(np.uint16)
