"""``datalist.json``: the one contract between a site's preprocessing and its training.

Written by ``fedimg preprocess`` (:mod:`fedimg.preprocess.pipeline`) and by
array data sets (:mod:`fedimg.preprocess.arrays`); read by training
(:mod:`fedimg.data.datasets`). All go through :class:`Datalist`, so the
format lives here only. Schema (JSON object)::

    {
      "name": "ct_phantom",            # the preprocessing spec's name
      "site": "site-1",
      "task": "segmentation",          # or "classification"
      "spatial_dims": 3,               # 2 or 3
      "labels": {"0": "background", "1": "organ", "2": "lesion"},
                                       # label value -> class name (classification: class index -> name)
      "training":   [ITEM, ...],
      "validation": [ITEM, ...],       # chooses the best model
      "test":       [ITEM, ...],       # optional: held out, never trained on nor used for model selection
      "folds": 5                       # optional: items carry "fold"; fold 0 is "validation"
    }
    ITEM = {"image": "images/case-....nii.gz",   # relative to the datalist's folder
            "case_id": "case-...",               # a (keyed) pseudonym
            "label": "labels/case-....nii.gz",   # segmentation: a path; classification: the class index
            "fold": 2}                           # only with "folds"

Every split holds whole patients (:mod:`fedimg.preprocess.splits`). Paths
must stay inside the datalist's folder: an item that points elsewhere is
refused when the datalist is read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, get_args

from fedimg.config import TaskType
from fedimg.errors import UserError

SPLIT_KEYS = ("training", "validation", "test")
TASKS: tuple[str, ...] = get_args(TaskType)


class DatalistError(UserError, ValueError):
    """A datalist is missing or malformed."""


@dataclass
class DatalistItem:
    """One case of a datalist.

    Attributes:
        image: image path relative to the datalist's folder.
        case_id: the case's (keyed) id.
        label: segmentation: label path relative to the folder; classification: class index.
        fold: cross-validation fold, when the datalist has folds.
    """

    image: str
    case_id: str
    label: str | int | None = None
    fold: int | None = None

    def to_json(self) -> dict[str, Any]:
        """As written in ``datalist.json``."""
        out: dict[str, Any] = {"image": self.image, "case_id": self.case_id}
        if self.label is not None:
            out["label"] = self.label
        if self.fold is not None:
            out["fold"] = self.fold
        return out


@dataclass
class Datalist:
    """A site's datalist (see the module docstring for the file format)."""

    name: str
    site: str
    task: str
    spatial_dims: int
    labels: dict[str, str]
    training: list[DatalistItem] = field(default_factory=list)
    validation: list[DatalistItem] = field(default_factory=list)
    test: list[DatalistItem] = field(default_factory=list)
    folds: int = 0

    @property
    def classes(self) -> list[str]:
        """Class names as an experiment lists them (segmentation: without background)."""
        ordered = [self.labels[k] for k in sorted(self.labels, key=int)]
        return ordered[1:] if self.task == "segmentation" else ordered

    def split_items(self, name: str) -> list[DatalistItem]:
        """The (mutable) item list of ``training``, ``validation`` or ``test``."""
        if name not in SPLIT_KEYS:
            raise ValueError(f"split must be one of {', '.join(SPLIT_KEYS)}, got {name!r}")
        items: list[DatalistItem] = getattr(self, name)
        return items

    def for_fold(self, fold: int | None) -> tuple[list[DatalistItem], list[DatalistItem]]:
        """(training, validation) items: as written, or with fold ``fold`` validating and the others training.

        Raises:
            DatalistError: a fold is asked of a datalist without folds, or is out of range.
        """
        if fold is None:
            return list(self.training), list(self.validation)
        if not self.folds:
            raise DatalistError(
                f"data.fold {fold} was asked, but the datalist of site {self.site} has no folds; "
                "preprocess with split.folds set, or leave data.fold empty"
            )
        if not 0 <= fold < self.folds:
            raise DatalistError(f"data.fold must be in 0..{self.folds - 1} for site {self.site}, got {fold}")
        pool = self.training + self.validation
        return [i for i in pool if i.fold != fold], [i for i in pool if i.fold == fold]

    def to_json(self) -> dict[str, Any]:
        """As written to ``datalist.json``."""
        out: dict[str, Any] = {
            "name": self.name,
            "site": self.site,
            "task": self.task,
            "spatial_dims": self.spatial_dims,
            "labels": dict(self.labels),
        }
        for key in SPLIT_KEYS:
            out[key] = [i.to_json() for i in getattr(self, key)]
        if self.folds:
            out["folds"] = self.folds
        return out

    def write(self, path: str | Path) -> None:
        """Write atomically (the same contract every writer uses)."""
        from fedimg.atomic import write_json

        write_json(Path(path), self.to_json())

    @classmethod
    def from_json(cls, raw: Any, where: str = "datalist") -> Datalist:
        """Parse and check a datalist object.

        Raises:
            DatalistError: a field is missing or of the wrong kind, an item's path
                leaves the datalist's folder, or a label does not fit the task.
        """
        if not isinstance(raw, dict):
            raise DatalistError(f"{where}: expected a JSON object, got {type(raw).__name__}")
        task = raw.get("task", "segmentation")
        if task not in TASKS:
            raise DatalistError(f"{where}: expected task 'segmentation' or 'classification', got {task!r}")
        dims = raw.get("spatial_dims", 3)
        if dims not in (2, 3):
            raise DatalistError(f"{where}: expected spatial_dims 2 or 3, got {dims!r}")
        labels = raw.get("labels") or {}
        if not isinstance(labels, dict) or not all(str(k).isdigit() and isinstance(v, str) for k, v in labels.items()):
            raise DatalistError(f'{where}: expected labels as {{"0": "background", ...}}, got {labels!r}')
        folds = raw.get("folds", 0) or 0
        if not isinstance(folds, int) or isinstance(folds, bool) or folds < 0:
            raise DatalistError(f"{where}: expected folds as a non-negative integer, got {folds!r}")
        dl = cls(
            name=str(raw.get("name", "")),
            site=str(raw.get("site", "")),
            task=task,
            spatial_dims=int(dims),
            labels={str(k): v for k, v in labels.items()},
            folds=folds,
        )
        n_classes = len(dl.classes)
        for key in SPLIT_KEYS:
            items = raw.get(key, [] if key == "test" else None)
            if not isinstance(items, list):
                raise DatalistError(f"{where}: expected a list under {key!r}, got {type(items).__name__}")
            parsed = []
            for i, item in enumerate(items):
                # Held-out test cases belong to no fold.
                parsed.append(_item(item, f"{where}: {key}[{i}]", task, n_classes, folds if key != "test" else 0))
            setattr(dl, key, parsed)
        return dl

    @classmethod
    def read(cls, path: str | Path) -> Datalist:
        """Read ``datalist.json``.

        Raises:
            DatalistError: the file is missing, not JSON, or malformed (see :meth:`from_json`).
        """
        p = Path(path)
        if not p.is_file():
            raise DatalistError(f"datalist {p} does not exist; run `fedimg preprocess` for this site first")
        try:
            raw = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DatalistError(f"datalist {p} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
        return cls.from_json(raw, f"datalist {p}")


def _relative_inside(value: Any, where: str, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise DatalistError(f"{where}: expected {what} as a relative path, got {value!r}")
    pure = PurePosixPath(value)
    if pure.is_absolute() or ".." in pure.parts or "\\" in value:
        raise DatalistError(
            f"{where}: {what} must be a path inside the datalist's folder (relative, no '..'), got {value!r}"
        )
    return value


def _item(item: Any, where: str, task: str, n_classes: int, folds: int) -> DatalistItem:
    if not isinstance(item, dict) or "image" not in item or "label" not in item:
        raise DatalistError(f"{where} needs 'image' and 'label' keys")
    image = _relative_inside(item["image"], where, "image")
    label = item["label"]
    if task == "segmentation":
        label = _relative_inside(label, where, "label")
    elif isinstance(label, bool) or not isinstance(label, int) or (n_classes and not 0 <= label < n_classes):
        raise DatalistError(f"{where} label must be a class index 0...{n_classes - 1}, got {label!r}")
    fold = item.get("fold")
    if folds and (isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < folds):
        raise DatalistError(f"{where}: expected fold in 0..{folds - 1} (the datalist has {folds} folds), got {fold!r}")
    return DatalistItem(image=image, case_id=str(item.get("case_id", "")), label=label, fold=fold if folds else None)


__all__ = ["SPLIT_KEYS", "Datalist", "DatalistError", "DatalistItem"]
