"""The MONAI transform chain that every site applies to its converted volumes.

Orientation to the spec's axis codes, resampling to the spec's spacing
(trilinear for images, nearest neighbour for labels, so label values stay
integers), then intensity normalization per modality:

* CT: clip to a Hounsfield window, scale to [0, 1].
* MR: clip to intensity percentiles, then z-score over the non-zero voxels.

2D images (:func:`apply_spec_2d`) have their own chain: percentile clip and
scale to [0, 1], resize to fit ``target_size`` keeping the physical aspect
ratio, pad to exactly ``target_size``.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    ClipIntensityPercentilesd,
    Compose,
    NormalizeIntensityd,
    Orientationd,
    ScaleIntensityRange,
    ScaleIntensityRanged,
    Spacingd,
)

from fedimg.config import PreprocessSpec
from fedimg.dicom.geometry import LPS_TO_RAS
from fedimg.dicom.planar import PlanarGeometry


def build_transforms(spec: PreprocessSpec, with_label: bool) -> Compose:
    """Spatial + intensity chain for one case.

    Args:
        spec: the shared preprocessing spec.
        with_label: whether the sample dict holds a ``label`` key.
    """
    keys = ["image", "label"] if with_label else ["image"]
    modes = ["bilinear", "nearest"] if with_label else ["bilinear"]
    chain = [
        Orientationd(keys=keys, axcodes=spec.orientation, labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        Spacingd(keys=keys, pixdim=spec.target_spacing, mode=modes, padding_mode="border",
                 dtype=[np.float32] * len(keys)),
    ]
    if spec.modality == "CT":
        lo, hi = spec.intensity.ct_window
        chain.append(ScaleIntensityRanged(keys="image", a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True))
    else:
        lo, hi = spec.intensity.mr_percentiles
        chain.append(ClipIntensityPercentilesd(keys="image", lower=lo, upper=hi))
        chain.append(NormalizeIntensityd(keys="image", nonzero=True))
    return Compose(chain)


def apply_spec(spec: PreprocessSpec, image: np.ndarray, affine: np.ndarray,
               label: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Run the chain on one volume (and its label on the same grid).

    Args:
        image: (i, j, k) voxels in modality units.
        affine: 4x4 voxel-to-RAS affine shared by image and label.
        label: (i, j, k) integer label on the same grid, or None.

    Returns:
        (image, label, affine) after the chain; arrays without channel axis.
    """
    aff = torch.as_tensor(affine, dtype=torch.float64)
    sample = {"image": MetaTensor(torch.as_tensor(image[None], dtype=torch.float32), affine=aff.clone())}
    if label is not None:
        sample["label"] = MetaTensor(torch.as_tensor(label[None].astype(np.float32)), affine=aff.clone())
    out = build_transforms(spec, label is not None)(sample)
    img = out["image"]
    out_affine = img.affine.detach().cpu().numpy().astype(np.float64)
    img_arr = img.detach().cpu().numpy()[0].astype(np.float32)
    lbl_arr = None
    if label is not None:
        lbl_arr = np.rint(out["label"].detach().cpu().numpy()[0]).astype(np.uint8)
    return img_arr, lbl_arr, out_affine


def fit_size(geometry: PlanarGeometry, target: tuple[int, int]) -> tuple[tuple[int, int], float]:
    """Size ``(h, w)`` that fits inside ``target`` with the image's physical aspect ratio, and its pixel size.

    The output pixels are square: ``spacing = max(height_mm / H, width_mm / W)``.
    """
    height_mm = geometry.rows * geometry.row_spacing
    width_mm = geometry.columns * geometry.column_spacing
    spacing = max(height_mm / target[0], width_mm / target[1])
    h = min(target[0], max(1, int(round(height_mm / spacing))))
    w = min(target[1], max(1, int(round(width_mm / spacing))))
    return (h, w), spacing


def apply_spec_2d(spec: PreprocessSpec, image: np.ndarray,
                  geometry: PlanarGeometry) -> tuple[np.ndarray, np.ndarray]:
    """The 2D chain for one image: normalize, resize to fit, pad.

    1. Clip to the ``intensity.percentiles_2d`` of the image and scale that
       range to [0, 1] (MONOCHROME1 is already inverted, so 1 is brightest).
    2. Resize (bilinear, antialiased when shrinking: a triangle filter as wide
       as the scale factor) to the largest size that fits inside
       ``target_size`` with the physical aspect ratio kept (non-square input
       pixels become square output pixels, up to rounding of the size).
    3. Pad symmetrically with 0 to exactly ``target_size``.

    The affine maps (i, j) = (row, column) indices of the output to RAS mm:
    through (0020,0037) / (0020,0032) when the image has them (a CT or MR
    slice); otherwise (radiographs) to the detector plane, with the image's
    first pixel at the origin and i, j along RAS x, y. Either way its column
    norms are the output pixel size.

    Args:
        spec: a 2D spec (``target_size`` set).
        image: ``(rows, columns)`` modality values, higher = brighter.
        geometry: the image's validated geometry.

    Returns:
        (float32 ``(H, W)`` image in [0, 1], 4x4 affine).
    """
    target = tuple(int(v) for v in spec.target_size)  # type: ignore[union-attr]
    lo, hi = spec.intensity.percentiles_2d
    # numpy's percentile: torch.quantile (MONAI's percentile transforms) is ~30x slower on one image.
    p_lo, p_hi = (float(v) for v in np.percentile(image, [lo, hi]))
    arr = torch.as_tensor(image[None, None], dtype=torch.float32)
    if p_hi > p_lo:
        arr = ScaleIntensityRange(a_min=p_lo, a_max=p_hi, b_min=0.0, b_max=1.0, clip=True)(arr)
    else:
        arr = torch.zeros_like(arr)  # a constant image carries nothing: all 0
    (h, w), _ = fit_size(geometry, target)  # type: ignore[arg-type]
    resized = torch.nn.functional.interpolate(torch.as_tensor(arr), size=(h, w), mode="bilinear",
                                              align_corners=False, antialias=True)
    small = np.clip(resized.detach().cpu().numpy()[0, 0], 0.0, 1.0)
    before = ((target[0] - h) // 2, (target[1] - w) // 2)
    out = np.pad(small, ((before[0], target[0] - h - before[0]), (before[1], target[1] - w - before[1])))
    # Output pixel (i, j) centre in input pixel coordinates (align_corners=False resize, then the padding).
    scale = (geometry.rows / h, geometry.columns / w)
    step_mm = (geometry.row_spacing * scale[0], geometry.column_spacing * scale[1])
    first = (0.5 * scale[0] - 0.5 - before[0] * scale[0], 0.5 * scale[1] - 0.5 - before[1] * scale[1])
    affine = np.eye(4)
    if geometry.iop is not None and geometry.ipp is not None:
        row_dir = np.asarray(geometry.iop[:3], dtype=float)  # along a row: increasing column index
        col_dir = np.asarray(geometry.iop[3:], dtype=float)  # down a column: increasing row index
        lps = np.eye(4)
        lps[:3, 0] = col_dir * step_mm[0]
        lps[:3, 1] = row_dir * step_mm[1]
        lps[:3, 2] = np.cross(row_dir, col_dir)
        lps[:3, 3] = (np.asarray(geometry.ipp, dtype=float) + col_dir * geometry.row_spacing * first[0]
                      + row_dir * geometry.column_spacing * first[1])
        affine = LPS_TO_RAS @ lps
    else:
        affine[0, 0], affine[1, 1] = step_mm
        affine[0, 3] = geometry.row_spacing * first[0]
        affine[1, 3] = geometry.column_spacing * first[1]
    return out.astype(np.float32), affine
