"""The MONAI transform chain that every site applies to its converted volumes.

Orientation to the spec's axis codes, resampling to the spec's spacing
(trilinear for images, nearest neighbour for labels, so label values stay
integers), then intensity normalization per modality:

* CT: clip to a Hounsfield window, scale to [0, 1].
* MR: clip to intensity percentiles, then z-score over the non-zero voxels.
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
    ScaleIntensityRanged,
    Spacingd,
)

from fedimg.config import PreprocessSpec


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
