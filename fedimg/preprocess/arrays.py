"""Sites from a data set that already comes as arrays (MedMNIST ``.npz``), split non-IID.

Public benchmark sets are already de-identified and normalized in shape; what
a federated benchmark needs is a realistic split across hospitals that differ
in size and in class balance (label skew). :func:`non_iid_split` draws such a
split; :func:`write_array_site` writes one site in the same layout as
``fedimg preprocess`` (``images/``, ``datalist.json``, ``summary.json``), so
training reads it exactly like a site's own preprocessed data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedimg.atomic import write_json, write_nifti
from fedimg.datalist import Datalist, DatalistItem


@dataclass(frozen=True)
class SiteShare:
    """What one site gets.

    Attributes:
        size: share of the cases used (the shares of all sites sum to 1).
        positive: share of the site's cases in class 1 (binary label skew).
    """

    size: float
    positive: float


def non_iid_split(
    labels: np.ndarray, shares: Sequence[SiteShare], rng: np.random.Generator, total: int | None = None
) -> list[np.ndarray]:
    """Indices of the cases of each site, with the requested sizes and class balance.

    The largest total that the available cases of each class allow is used
    (or ``total``, if smaller). Sampling is without replacement: no case is at
    two sites.

    Args:
        labels: binary labels (N,).
        shares: one per site.
        rng: the random generator (seeded by the caller).
        total: cap on the number of cases used over all sites.

    Raises:
        ValueError: shares that do not sum to 1, or fractions outside [0, 1].
    """
    labels = np.asarray(labels).reshape(-1)
    sizes = np.array([s.size for s in shares], dtype=float)
    pos = np.array([s.positive for s in shares], dtype=float)
    if not np.isclose(sizes.sum(), 1.0) or (sizes <= 0).any():
        raise ValueError(f"site sizes must be positive and sum to 1, got {sizes.tolist()}")
    if ((pos < 0) | (pos > 1)).any():
        raise ValueError(f"positive fractions must be in [0, 1], got {pos.tolist()}")
    idx_pos = rng.permutation(np.flatnonzero(labels == 1))
    idx_neg = rng.permutation(np.flatnonzero(labels == 0))
    need_pos = float((sizes * pos).sum())
    need_neg = float((sizes * (1 - pos)).sum())
    n = min(len(idx_pos) / need_pos if need_pos else np.inf, len(idx_neg) / need_neg if need_neg else np.inf)
    n = int(min(n, total or n, len(labels)))
    out, ip, ineg = [], 0, 0
    for size, p in zip(sizes, pos):
        n_site = int(round(n * size))
        n_p = int(round(n_site * p))
        n_p = min(n_p, len(idx_pos) - ip)
        n_n = min(n_site - n_p, len(idx_neg) - ineg)
        site = np.concatenate([idx_pos[ip : ip + n_p], idx_neg[ineg : ineg + n_n]])
        ip, ineg = ip + n_p, ineg + n_n
        out.append(np.sort(site))
    return out


def write_array_site(
    out_dir: Path,
    site: str,
    name: str,
    class_names: Sequence[str],
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    spacing: float = 1.0,
    prefix: str = "case",
) -> dict:
    """Write one site: images as NIfTI in [0, 1], and a classification ``datalist.json``.

    Args:
        out_dir: the site's folder.
        site: the site's name.
        name: the data set's name (recorded in the datalist).
        class_names: class index -> name.
        train: (images (N, ...) uint8 or float, labels (N,)) for training.
        val: the same for validation.
        spacing: voxel size in mm written into the NIfTI affine.
        prefix: case id prefix (public data: ids are positions in the source arrays).

    Returns:
        the site's summary (also written as ``summary.json``).
    """
    out_dir = Path(out_dir)
    dims = train[0].ndim - 1
    affine = np.diag([spacing] * 3 + [1.0])
    datalist = Datalist(
        name=name,
        site=site,
        task="classification",
        spatial_dims=dims,
        labels={str(i): c for i, c in enumerate(class_names)},
    )
    for split, (images, labels) in (("training", train), ("validation", val)):
        for i, (img, lab) in enumerate(zip(images, np.asarray(labels).reshape(-1))):
            case = f"{prefix}-{split[:3]}-{i:05d}"
            arr = img.astype(np.float32)
            if img.dtype == np.uint8:
                arr /= 255.0
            rel = f"images/{case}.nii.gz"
            write_nifti(out_dir / rel, arr, affine)
            datalist.split_items(split).append(DatalistItem(image=rel, case_id=case, label=int(lab)))
    datalist.write(out_dir / "datalist.json")
    summary = {
        "site": site,
        "source": name,
        "training": {c: int((np.asarray(train[1]).reshape(-1) == i).sum()) for i, c in enumerate(class_names)},
        "validation": {c: int((np.asarray(val[1]).reshape(-1) == i).sum()) for i, c in enumerate(class_names)},
    }
    write_json(out_dir / "summary.json", summary)
    return summary
