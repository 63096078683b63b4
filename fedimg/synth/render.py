"""Sampling the phantom on a series grid: image in HU plus ground-truth label."""

from __future__ import annotations

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
