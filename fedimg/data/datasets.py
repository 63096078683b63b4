"""Datasets and loaders for training from a preprocessing datalist.

Deterministic transforms (loading, channel-first, padding) are cached once by
MONAI's ``CacheDataset``; random crops and intensity augmentations run per
epoch on top. On CUDA the cache is moved to the GPU, so an epoch never goes
back to host memory for its inputs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from monai.data import CacheDataset, DataLoader, Dataset
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    RandCropByLabelClassesd,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    SpatialPadd,
)

from fedimg.config import DataConfig


class DatalistError(ValueError):
    """A datalist is missing or malformed."""


def read_datalist(path: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """Read ``datalist.json``; paths are resolved against its folder.

    Returns:
        (training items, validation items, the raw datalist).
    """
    p = Path(path)
    if not p.is_file():
        raise DatalistError(f"datalist {p} does not exist; run `fedimg preprocess` for this site first")
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DatalistError(f"datalist {p} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    out = []
    for key in ("training", "validation"):
        items = raw.get(key)
        if not isinstance(items, list):
            raise DatalistError(f"datalist {p}: expected a list under {key!r}, got {type(items).__name__}")
        resolved = []
        for item in items:
            if "image" not in item or "label" not in item:
                raise DatalistError(f"datalist {p}: every {key} item needs 'image' and 'label' keys")
            resolved.append({**item, "image": str(p.parent / item["image"]), "label": str(p.parent / item["label"])})
        out.append(resolved)
    if not out[0]:
        raise DatalistError(f"datalist {p} has no training cases")
    return out[0], out[1], raw


def _base_transforms(cfg: DataConfig, device: torch.device) -> list[Any]:
    t: list[Any] = [
        LoadImaged(keys=["image", "label"], image_only=True),
        EnsureChannelFirstd(keys=["image", "label"]),
        EnsureTyped(keys=["image", "label"], dtype=(torch.float32, torch.uint8), track_meta=False),
        SpatialPadd(keys=["image", "label"], spatial_size=cfg.roi_size),
    ]
    if device.type == "cuda":
        t.append(EnsureTyped(keys=["image", "label"], device=device, track_meta=False))
    return t


def train_transforms(cfg: DataConfig, device: torch.device, num_classes: int) -> Compose:
    """Cached loading plus class-balanced random crops and light augmentation.

    Crops are centred on each class (background included) equally often, so a
    small lesion is seen as often as the large organ around it.
    """
    return Compose(_base_transforms(cfg, device) + [
        RandCropByLabelClassesd(keys=["image", "label"], label_key="label", spatial_size=cfg.roi_size,
                                num_classes=num_classes, num_samples=cfg.samples_per_volume,
                                warn=False),
        RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=0),
        RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
        RandShiftIntensityd(keys="image", offsets=0.05, prob=0.5),
    ])


def val_transforms(cfg: DataConfig, device: torch.device) -> Compose:
    """Cached loading only; validation runs on whole volumes."""
    return Compose(_base_transforms(cfg, device))


def make_loaders(train_items: list[dict[str, Any]], val_items: list[dict[str, Any]], cfg: DataConfig,
                 device: torch.device, num_classes: int, progress: bool = False, seed: int = 0) -> tuple[DataLoader, DataLoader | None]:
    """Cached training and validation loaders.

    On CUDA the cache lives on the GPU and loading runs in the main process
    (workers cannot share GPU tensors).
    """
    workers = 0 if device.type == "cuda" else cfg.num_workers
    train_ds = CacheDataset(train_items, transform=train_transforms(cfg, device, num_classes), cache_rate=cfg.cache_rate,
                            num_workers=None, progress=progress, copy_cache=False)
    train_ds.transform.set_random_state(seed)  # type: ignore[union-attr]
    gen = torch.Generator()
    gen.manual_seed(seed)
    train_loader = DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=True, num_workers=workers,
                              generator=gen)
    val_loader = None
    if val_items:
        val_ds: Dataset = CacheDataset(val_items, transform=val_transforms(cfg, device), cache_rate=cfg.cache_rate,
                                       num_workers=None, progress=progress, copy_cache=False)
        val_loader = DataLoader(val_ds, batch_size=1, shuffle=False, num_workers=workers)
    return train_loader, val_loader
