"""Datasets and loaders for training from a preprocessing datalist.

Deterministic transforms (loading, channel-first, padding or resizing) are
cached once by MONAI's ``CacheDataset``; random crops and augmentations run
per epoch on top. On CUDA the cache is moved to the GPU, so an epoch never
goes back to host memory for its inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import torch
from monai.data import CacheDataset, DataLoader
from monai.transforms import (
    ClassesToIndicesd,
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    RandAffined,
    RandCropByLabelClassesd,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    Resized,
    SpatialPadd,
)
from nibabel.spatialimages import SpatialImage

from fedimg.config import DataConfig, TaskConfig
from fedimg.datalist import Datalist, DatalistError, DatalistItem


@dataclass
class SiteData:
    """A site's datalist resolved for training: absolute paths, voxel spacing, the fold chosen.

    Attributes:
        training: training items (``image``, ``label``, ``case_id``, ``spacing``; 3D also ``axcodes``,
            the stored axes' orientation codes, e.g. ``RAS``, for pictures in the radiological convention).
        validation: validation items (with ``fold``: that fold).
        test: held-out test items (never trained on, never used to choose a model).
        task: ``segmentation`` or ``classification``.
        spatial_dims: 2 or 3.
        classes: class names as the task config lists them (segmentation:
            foreground classes; classification: every class).
        datalist: the datalist as read (:class:`fedimg.datalist.Datalist`).
    """

    training: list[dict[str, Any]]
    validation: list[dict[str, Any]]
    test: list[dict[str, Any]]
    task: str
    spatial_dims: int
    classes: list[str] | None
    datalist: Datalist


def _geometry(path: str, dims: int) -> dict[str, Any]:
    # Header only: nibabel reads the pixdims and affine without the voxel data. A tensor collates to (B, dims),
    # a string to a list.
    img = nib.load(path)
    if not isinstance(img, SpatialImage):
        raise ValueError(
            f"expected a NIfTI volume in the datalist, got a {type(img).__name__} file; re-run fedimg preprocess"
        )
    zooms = img.header.get_zooms()
    out: dict[str, Any] = {"spacing": torch.tensor([float(z) for z in zooms[:dims]], dtype=torch.float64)}
    if dims == 3:
        # The stored axes' orientation (e.g. RAS), so pictures can be shown in the radiological convention.
        out["axcodes"] = "".join(str(c) for c in nib.aff2axcodes(img.affine))
    return out


def _resolve(items: list[DatalistItem], root: Path, dl: Datalist) -> list[dict[str, Any]]:
    out = []
    for item in items:
        image = str(root / item.image)
        entry: dict[str, Any] = {
            "image": image,
            "case_id": item.case_id,
            "label": item.label,
            **_geometry(image, dl.spatial_dims),
        }
        if dl.task == "segmentation":
            entry["label"] = str(root / str(item.label))
        out.append(entry)
    return out


def read_datalist(path: str | Path, fold: int | None = None) -> SiteData:
    """Read ``datalist.json`` for training; paths are resolved against its folder.

    Args:
        path: the site's ``datalist.json``.
        fold: with a cross-validation datalist, the fold that validates (the others train).

    Raises:
        DatalistError: the file is missing, malformed, has no training case, or the fold does not exist.
    """
    p = Path(path)
    dl = Datalist.read(p)
    train, val = dl.for_fold(fold)
    if not train:
        raise DatalistError(f"datalist {p} has no training cases")
    return SiteData(
        training=_resolve(train, p.parent, dl),
        validation=_resolve(val, p.parent, dl),
        test=_resolve(dl.test, p.parent, dl),
        task=dl.task,
        spatial_dims=dl.spatial_dims,
        classes=dl.classes if dl.labels else None,
        datalist=dl,
    )


def check_matches_task(dl: SiteData, task: TaskConfig, where: str) -> None:
    """Refuse a datalist whose task, dimensions or classes differ from the experiment's.

    Raises:
        DatalistError: with what the experiment expects and what the datalist holds.
    """
    if dl.task != task.type:
        raise DatalistError(
            f"{where}: the experiment is a {task.type} task but the datalist holds {dl.task} "
            "cases; preprocess with a spec of the same task"
        )
    if dl.spatial_dims != task.spatial_dims:
        raise DatalistError(
            f"{where}: the experiment expects {task.spatial_dims}D images (task.spatial_dims), "
            f"the datalist holds {dl.spatial_dims}D images"
        )
    if dl.classes is not None and dl.classes != list(task.class_names):
        raise DatalistError(
            f"{where}: datalist classes {dl.classes} do not match task.class_names "
            f"{list(task.class_names)}; preprocess with a spec whose labels.classes match "
            "the experiment"
        )


def _loader(device: torch.device) -> type:
    """On CUDA, MONAI's ThreadDataLoader: the cache is on the GPU, so the random transforms of the next batch run
    in a thread beside the current step instead of in worker processes (which cannot share GPU tensors)."""
    if device.type == "cuda":
        from monai.data import ThreadDataLoader

        return ThreadDataLoader
    return DataLoader


def _to_device(device: torch.device, keys: list[str]) -> list[Any]:
    return [EnsureTyped(keys=keys, device=device, track_meta=False)] if device.type == "cuda" else []


_INDICES_POSTFIX = "_cls_indices"


def seg_train_transforms(cfg: DataConfig, device: torch.device, num_classes: int) -> Compose:
    """Cached loading plus class-balanced random crops and light augmentation.

    Crops are centred on each class (background included) equally often, so a
    small lesion is seen as often as the large organ around it.
    """
    keys = ["image", "label"]
    t: list[Any] = [
        LoadImaged(keys=keys, image_only=True),
        EnsureChannelFirstd(keys=keys),
        EnsureTyped(keys=keys, dtype=(torch.float32, torch.uint8), track_meta=False),
        SpatialPadd(keys=keys, spatial_size=cfg.roi_size),
        *_to_device(device, keys),
        # Where each class lies is computed once and cached with the volume, not at every crop.
        ClassesToIndicesd(keys="label", num_classes=num_classes, indices_postfix=_INDICES_POSTFIX),
        RandCropByLabelClassesd(
            keys=keys,
            label_key="label",
            spatial_size=cfg.roi_size,
            num_classes=num_classes,
            num_samples=cfg.samples_per_volume,
            indices_key="label" + _INDICES_POSTFIX,
            warn=False,
        ),
    ]
    if cfg.augment:
        t += [
            RandFlipd(keys=keys, prob=0.5, spatial_axis=0),
            RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
            RandShiftIntensityd(keys="image", offsets=0.05, prob=0.5),
        ]
    return Compose(t)


def seg_val_transforms(cfg: DataConfig, device: torch.device) -> Compose:
    """Cached loading only; validation runs on whole volumes."""
    keys = ["image", "label"]
    return Compose(
        [
            LoadImaged(keys=keys, image_only=True),
            EnsureChannelFirstd(keys=keys),
            EnsureTyped(keys=keys, dtype=(torch.float32, torch.uint8), track_meta=False),
            SpatialPadd(keys=keys, spatial_size=cfg.roi_size),
            *_to_device(device, keys),
        ]
    )


def cls_val_transforms(cfg: DataConfig, device: torch.device) -> Compose:
    """Load and resize every image to ``data.roi_size`` (cached)."""
    return Compose(
        [
            LoadImaged(keys="image", image_only=True),
            EnsureChannelFirstd(keys="image", channel_dim="no_channel"),
            EnsureTyped(keys="image", dtype=torch.float32, track_meta=False),
            Resized(keys="image", spatial_size=cfg.roi_size, mode="area"),
            *_to_device(device, ["image"]),
        ]
    )


def cls_train_transforms(cfg: DataConfig, device: torch.device) -> Compose:
    """The cached resize, then random flips, small affine changes and intensity jitter."""
    t: list[Any] = list(cls_val_transforms(cfg, device).transforms)
    if cfg.augment:
        dims = len(cfg.roi_size)
        t += [
            RandFlipd(keys="image", prob=0.5, spatial_axis=0),
            RandAffined(
                keys="image",
                prob=0.5,
                rotate_range=[0.1] * (1 if dims == 2 else 3),
                scale_range=[0.1] * dims,
                padding_mode="zeros",
            ),
            RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
            RandShiftIntensityd(keys="image", offsets=0.05, prob=0.5),
        ]
    return Compose(t)


def make_val_loader(
    items: list[dict[str, Any]], cfg: DataConfig, task: TaskConfig, device: torch.device, progress: bool = False
) -> DataLoader | None:
    """A cached loader over validation items (None when there are none)."""
    if not items:
        return None
    workers = 0 if device.type == "cuda" else cfg.num_workers
    if task.is_segmentation:
        tf, batch = seg_val_transforms(cfg, device), 1  # whole volumes of different sizes
    else:
        tf, batch = cls_val_transforms(cfg, device), max(1, cfg.batch_size)
    ds = CacheDataset(
        items, transform=tf, cache_rate=cfg.cache_rate, num_workers=None, progress=progress, copy_cache=False
    )
    return _loader(device)(ds, batch_size=batch, shuffle=False, num_workers=workers)


def make_loaders(
    train_items: list[dict[str, Any]],
    val_items: list[dict[str, Any]],
    cfg: DataConfig,
    task: TaskConfig,
    device: torch.device,
    progress: bool = False,
    seed: int = 0,
) -> tuple[DataLoader | None, DataLoader | None]:
    """Cached training and validation loaders for the task (None for a split without items).

    On CUDA the cache lives on the GPU and loading runs in the main process
    (workers cannot share GPU tensors).
    """
    workers = 0 if device.type == "cuda" else cfg.num_workers
    if not train_items:  # an evaluation-only trainer (scoring a saved model)
        return None, make_val_loader(val_items, cfg, task, device, progress)
    if task.is_segmentation:
        train_tf = seg_train_transforms(cfg, device, task.num_classes)
    else:
        train_tf = cls_train_transforms(cfg, device)
    train_ds = CacheDataset(
        train_items,
        transform=train_tf,
        cache_rate=cfg.cache_rate,
        num_workers=None,
        progress=progress,
        copy_cache=False,
    )
    train_ds.transform.set_random_state(seed)
    gen = torch.Generator()
    gen.manual_seed(seed)
    train_loader = _loader(device)(
        train_ds, batch_size=cfg.batch_size, shuffle=True, num_workers=workers, generator=gen
    )
    return train_loader, make_val_loader(val_items, cfg, task, device, progress)
