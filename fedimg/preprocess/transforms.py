"""The MONAI transform chain that every site applies to its converted volumes.

Orientation to the spec's axis codes, resampling to the spec's spacing
(trilinear for images, nearest neighbour for labels, so label values stay
integers), then intensity normalization per modality:

* CT: clip to a Hounsfield window, scale to [0, 1].
* MR: clip to intensity percentiles, then z-score over the non-zero voxels;
  with ``intensity.mode: mr_zscore`` the percentiles are those of the
  non-zero voxels and zero voxels stay 0 (:class:`NonzeroZScored`).

:func:`build_transforms` is that chain in MONAI (``Orientationd``,
``Spacingd``, intensity transforms). :func:`apply_spec` gives its result
without its memory: MONAI computes the output grid (lazily, touching no
voxel), and one interpolation reads the stored volume where it lies (any
integer type, any axis order) straight onto that grid, instead of a float32
copy, a flipped copy and a resampled copy of the whole volume. The
intensity transforms then run on the (small) output.

2D images (:func:`apply_spec_2d`) have their own chain: percentile clip and
scale to [0, 1], resize to fit ``target_size`` keeping the physical aspect
ratio, pad to exactly ``target_size``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    ClipIntensityPercentilesd,
    Compose,
    MapTransform,
    NormalizeIntensityd,
    Orientation,
    Orientationd,
    ScaleIntensityRange,
    ScaleIntensityRanged,
    Spacing,
    Spacingd,
)
from scipy import ndimage

from fedimg.config import PreprocessSpec
from fedimg.dicom.geometry import LPS_TO_RAS
from fedimg.dicom.planar import PlanarGeometry

AXIS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


def _target_spacing(spec: PreprocessSpec) -> tuple[float, float, float]:
    """The voxel size a 3D spec resamples to."""
    if spec.target_spacing is None:
        raise ValueError("expected a 3D spec (target_spacing set) to resample a volume; this spec has none")
    return spec.target_spacing


def _target_size(spec: PreprocessSpec) -> tuple[int, int]:
    """The ``(H, W)`` a 2D spec resizes and pads to."""
    if spec.target_size is None:
        raise ValueError("expected a 2D spec (target_size set) to resize a radiograph; this spec has none")
    return int(spec.target_size[0]), int(spec.target_size[1])


class NonzeroZScored(MapTransform):
    """``intensity.mode: mr_zscore``: percentile clipping and z-score over the non-zero voxels only.

    The ``(lower, upper)`` percentiles are taken of the non-zero voxels; those
    voxels are clipped to them and z-scored with their own mean and (population)
    standard deviation. Zero voxels, the background of a skull-stripped or
    masked MR volume, are left out of every statistic and stay exactly 0, so
    they neither pull the percentiles down nor become a negative value. A
    volume whose non-zero voxels are constant becomes 0 there (nothing to scale).
    """

    def __init__(self, keys: str | list[str], lower: float, upper: float) -> None:
        super().__init__(keys)
        self.lower, self.upper = float(lower), float(upper)

    def __call__(self, data: dict) -> dict:
        out = dict(data)
        for key in self.key_iterator(out):
            out[key] = self.normalize(out[key])
        return out

    def normalize(self, image: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        """The normalized copy of ``image`` (tensor in, tensor out; MetaTensor metadata kept)."""
        arr = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
        values = arr.astype(np.float32, copy=True)
        mask = values != 0
        fg = values[mask].astype(np.float64)
        if fg.size:
            lo, hi = np.percentile(fg, [self.lower, self.upper])
            fg = np.clip(fg, lo, hi)
            std = fg.std()
            values[mask] = ((fg - fg.mean()) / std if std > 0 else np.zeros_like(fg)).astype(np.float32)
        if not isinstance(image, torch.Tensor):
            return values
        result = torch.as_tensor(values, device=image.device)
        if isinstance(image, MetaTensor):
            result = MetaTensor(result, meta=image.meta, applied_operations=image.applied_operations)
        return result


def build_transforms(spec: PreprocessSpec, with_label: bool, spatial: bool = True) -> Compose:
    """Spatial + intensity chain for one case.

    Args:
        spec: the shared preprocessing spec.
        with_label: whether the sample dict holds a ``label`` key.
        spatial: include ``Orientationd`` and ``Spacingd`` (False: the
            intensity transforms only, as :func:`apply_spec` uses them).
    """
    keys = ["image", "label"] if with_label else ["image"]
    modes = ["bilinear", "nearest"] if with_label else ["bilinear"]
    chain: list[Any] = (
        [
            Orientationd(keys=keys, axcodes=spec.orientation, labels=AXIS_LABELS),
            Spacingd(
                keys=keys,
                pixdim=_target_spacing(spec),
                mode=modes,
                padding_mode="border",
                dtype=[np.float32] * len(keys),
            ),
        ]
        if spatial
        else []
    )
    if spec.modality == "CT":
        lo, hi = spec.intensity.ct_window
        chain.append(ScaleIntensityRanged(keys="image", a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True))
    elif spec.intensity.mode == "mr_zscore":
        lo, hi = spec.intensity.mr_percentiles
        chain.append(NonzeroZScored(keys="image", lower=lo, upper=hi))
    else:
        lo, hi = spec.intensity.mr_percentiles
        chain.append(ClipIntensityPercentilesd(keys="image", lower=lo, upper=hi))
        chain.append(NormalizeIntensityd(keys="image", nonzero=True))
    return Compose(chain)


def output_grid(spec: PreprocessSpec, shape: tuple[int, ...], affine: np.ndarray) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape and 4x4 affine of the grid that ``Orientationd`` + ``Spacingd`` of the spec produce.

    MONAI's own transforms compute it, lazily: they only record what they
    would do, on a stand-in tensor of ``shape`` that holds one value.
    """
    stand_in = torch.zeros((1,) * (len(shape) + 1)).expand(1, *shape)
    mt = MetaTensor(stand_in, affine=torch.as_tensor(affine, dtype=torch.float64))
    oriented = Orientation(axcodes=spec.orientation, labels=AXIS_LABELS, lazy=True)(mt)
    spacing = Spacing(pixdim=_target_spacing(spec), mode="bilinear", padding_mode="border", dtype=np.float32, lazy=True)
    pending = spacing(oriented)
    if not isinstance(pending, MetaTensor):  # a lazy transform of a MetaTensor returns one, its operations pending
        raise TypeError(f"expected MONAI's lazy Spacing to return a MetaTensor, got {type(pending).__name__}")
    out_shape = tuple(int(v) for v in pending.peek_pending_shape())
    return out_shape, np.asarray(pending.peek_pending_affine(), dtype=np.float64)


def _resample(
    data: np.ndarray, to_source: np.ndarray, shape: tuple[int, ...], order: int, out_dtype: np.dtype
) -> np.ndarray:
    """Sample ``data`` at ``to_source @ (i, j, k, 1)`` for every output voxel; beyond the edges, the edge value.

    Order 1 is MONAI's ``bilinear`` with ``padding_mode="border"`` (the sample
    position is clamped into the volume), order 0 its ``nearest``. The input is
    read in place, whatever its type and strides: no copy of it is made.
    """
    return ndimage.affine_transform(
        data,
        to_source[:3, :3],
        offset=to_source[:3, 3],
        output_shape=shape,
        output=out_dtype,
        order=order,
        mode="nearest",
        prefilter=False,
    )


def apply_spec(
    spec: PreprocessSpec,
    image: np.ndarray,
    affine: np.ndarray,
    label: np.ndarray | None = None,
    scale: tuple[float, float] = (1.0, 0.0),
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Run the chain on one volume (and its label on the same grid).

    The result is :func:`build_transforms`' (up to float32 rounding) at a
    fraction of its memory: besides ``image`` and ``label`` themselves, only
    the output grid is allocated.

    Args:
        image: (i, j, k) voxels: modality values, or stored integers that
            ``scale`` turns into modality values.
        affine: 4x4 voxel-to-RAS affine shared by image and label.
        label: (i, j, k) label on the same grid, or None. It is resampled by
            nearest neighbour, so the output holds the input's values (and type).
        scale: ``(slope, intercept)``: modality value = stored * slope +
            intercept. Linear interpolation commutes with it, so it is applied
            to the resampled output.

    Returns:
        (float32 image, label, affine) after the chain; arrays without channel axis.
    """
    shape, out_affine = output_grid(spec, image.shape, affine)
    to_source = np.linalg.inv(np.asarray(affine, dtype=np.float64)) @ out_affine
    img = _resample(image, to_source, shape, 1, np.dtype(np.float32))
    slope, intercept = scale
    if (slope, intercept) != (1.0, 0.0):
        img *= np.float32(slope)
        img += np.float32(intercept)
    lbl_arr = None if label is None else _resample(label, to_source, shape, 0, label.dtype)
    aff = torch.as_tensor(out_affine, dtype=torch.float64)
    out = build_transforms(spec, with_label=False, spatial=False)(
        {"image": MetaTensor(torch.from_numpy(img[None]), affine=aff)}
    )
    img_arr = np.asarray(out["image"].detach().cpu().numpy()[0], dtype=np.float32)
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


def apply_spec_2d(spec: PreprocessSpec, image: np.ndarray, geometry: PlanarGeometry) -> tuple[np.ndarray, np.ndarray]:
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
    target = _target_size(spec)
    lo, hi = spec.intensity.percentiles_2d
    # numpy's percentile: torch.quantile (MONAI's percentile transforms) is ~30x slower on one image.
    p_lo, p_hi = (float(v) for v in np.percentile(image, [lo, hi]))
    arr = torch.as_tensor(image[None, None], dtype=torch.float32)
    if p_hi > p_lo:
        arr = torch.as_tensor(ScaleIntensityRange(a_min=p_lo, a_max=p_hi, b_min=0.0, b_max=1.0, clip=True)(arr))
    else:
        arr = torch.zeros_like(arr)  # a constant image carries nothing: all 0
    (h, w), _ = fit_size(geometry, target)
    resized = torch.nn.functional.interpolate(
        torch.as_tensor(arr), size=(h, w), mode="bilinear", align_corners=False, antialias=True
    )
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
        lps[:3, 3] = (
            np.asarray(geometry.ipp, dtype=float)
            + col_dir * geometry.row_spacing * first[0]
            + row_dir * geometry.column_spacing * first[1]
        )
        affine = LPS_TO_RAS @ lps
    else:
        affine[0, 0], affine[1, 1] = step_mm
        affine[0, 3] = geometry.row_spacing * first[0]
        affine[1, 3] = geometry.column_spacing * first[1]
    return out.astype(np.float32), affine
