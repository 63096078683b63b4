"""Run a package's model on one image, prepared by the package's own spec, and map the result back.

Segmentation (3D): the image on its acquisition grid (voxels and RAS affine,
as :func:`fedimg.dicom.volume.load_volume` or a NIfTI file gives them) goes
through the spec's chain (:func:`fedimg.preprocess.transforms.apply_spec`:
orientation, spacing, intensity) exactly as the training cases did; MONAI's
sliding-window inference (the experiment's ``data.roi_size``,
``train.sw_batch_size``, overlap 0.25, Gaussian weights; AMP on CUDA)
gives class indices on the spec grid; components smaller than
``task.min_component_voxels`` are removed as in validation; and the label map
is resampled with nearest neighbour onto the acquisition grid: each source
voxel takes the class of the spec voxel its centre falls in
(``inv(A_spec) @ A_src``), which inverts the reorientation and the spacing.

Classification: the spec's chain (2D: :func:`apply_spec_2d`; 3D:
:func:`apply_spec`), then the resize to ``data.roi_size`` the training loader
applies (``area``), then the softmax over classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedimg.config import ExperimentConfig, PreprocessSpec
from fedimg.runtime import Runtime


@dataclass
class Segmentation:
    """A segmentation on the source grid and on the spec grid.

    Attributes:
        labels: uint8 class indices (0 background, 1..N the classes) on the source grid.
        affine: the source grid's voxel-to-RAS affine.
        image: the source image (for pictures).
        spec_labels: the class indices on the spec grid (what validation scored).
        spec_affine: the spec grid's affine.
    """

    labels: np.ndarray
    affine: np.ndarray
    image: np.ndarray
    spec_labels: np.ndarray
    spec_affine: np.ndarray

    def volumes_ml(self, n_classes: int) -> list[float]:
        """Volume of each class 1..N in millilitres (source voxels times the voxel volume)."""
        voxel_ml = abs(float(np.linalg.det(self.affine[:3, :3]))) / 1000.0
        counts = np.bincount(self.labels.ravel(), minlength=n_classes + 1)
        return [float(counts[c]) * voxel_ml for c in range(1, n_classes + 1)]


def resample_labels(
    labels: np.ndarray, from_affine: np.ndarray, shape: tuple[int, ...], to_affine: np.ndarray
) -> np.ndarray:
    """Nearest-neighbour resampling of a label map from one grid to another (same world space).

    Each output voxel takes the value of the input voxel its centre falls
    in; outside the input grid it is 0 (background).

    Args:
        labels: class indices on the grid of ``from_affine``.
        from_affine: 4x4 voxel-to-world affine of ``labels``.
        shape: the output grid's shape.
        to_affine: 4x4 voxel-to-world affine of the output grid.
    """
    from scipy import ndimage

    m = np.linalg.inv(from_affine) @ to_affine  # output voxel -> input voxel
    out = ndimage.affine_transform(
        labels.astype(np.uint8),
        m[:3, :3],
        offset=m[:3, 3],
        output_shape=tuple(shape),
        order=0,
        mode="constant",
        cval=0,
        prefilter=False,
    )
    return out.astype(np.uint8)


@torch.no_grad()
def segment(
    model: torch.nn.Module,
    exp: ExperimentConfig,
    spec: PreprocessSpec,
    image: np.ndarray,
    affine: np.ndarray,
    rt: Runtime,
) -> Segmentation:
    """Segment one volume given on its acquisition grid; the result lies on the same grid.

    Args:
        model: the network (eval mode, on ``rt.device``).
        exp: the package's experiment (roi size, sliding-window batch, post-processing).
        spec: the package's spec.
        image: (i, j, k) voxels in modality units (HU for CT).
        affine: its voxel-to-RAS affine.
        rt: device and AMP.
    """
    from fedimg.preprocess.transforms import apply_spec
    from fedimg.tasks.segmentation import predict, remove_small_components

    img_spec, _, spec_affine = apply_spec(spec, image, affine)
    x = torch.as_tensor(img_spec[None, None], dtype=torch.float32, device=rt.device)
    pred = predict(model, x, exp.data.roi_size, exp.train.sw_batch_size, rt.autocast())
    pred = remove_small_components(pred, exp.task.num_classes, exp.task.min_component_voxels)
    spec_labels = pred[0, 0].detach().cpu().numpy().astype(np.uint8)
    labels = resample_labels(spec_labels, spec_affine, image.shape, affine)
    return Segmentation(
        labels=labels,
        affine=np.asarray(affine, dtype=np.float64),
        image=image,
        spec_labels=spec_labels,
        spec_affine=spec_affine,
    )


@torch.no_grad()
def classify(model: torch.nn.Module, exp: ExperimentConfig, prepared: np.ndarray, rt: Runtime) -> np.ndarray:
    """Class probabilities (softmax) of one image already through the spec's chain.

    Args:
        prepared: the spec chain's output ((H, W) or (i, j, k)), as preprocessing writes it.
    """
    from monai.transforms import Resize

    x = torch.as_tensor(prepared[None], dtype=torch.float32)
    x = Resize(spatial_size=list(exp.data.roi_size), mode="area")(x)  # the training loader's resize
    x = torch.as_tensor(x, dtype=torch.float32)[None].to(rt.device)
    with rt.autocast():
        logits = model(x)
    return torch.softmax(logits.float(), dim=1)[0].detach().cpu().numpy().astype(np.float64)


__all__ = ["Segmentation", "classify", "resample_labels", "segment"]
