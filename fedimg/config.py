"""Typed configuration: dataclasses loaded from YAML and validated on construction.

Three kinds of config exist, each in its own folder under ``configs/``:

* :class:`PreprocessSpec` (``configs/preprocessing/``): the geometry and
  intensity spec every site applies to its DICOM studies.
* :class:`ExperimentConfig` (``configs/experiments/``): federation-wide
  choices (task, model, optimizer, rounds).
* :class:`SiteConfig` (``configs/sites/``): site-local facts (where the
  datalist is, which device to use). Never leaves the site.

Unknown keys and wrong types are rejected with the dotted key and the expected
type, e.g. ``optim.lr: expected float, got str ('fast')``.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import re
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from fedimg.errors import UserError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")


class ConfigError(UserError, ValueError):
    """A configuration file or override does not match its schema."""


# --------------------------------------------------------------------------
# Generic strict loader
# --------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        args = [a for a in get_args(tp) if a is not Ellipsis]
        inner = _type_name(args[0]) if args else "any"
        if origin is tuple and Ellipsis not in get_args(tp):
            return f"list of {len(args)} {inner}"
        return f"list of {inner}"
    if origin is dict:
        k, v = get_args(tp)
        return f"mapping of {_type_name(k)} to {_type_name(v)}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} ({text})"


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value to ``tp`` or raise ConfigError naming ``key``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping ({tp.__name__}), got {_describe(value)}")
        return _build(tp, value, key)
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_describe(value)}")
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        # The value had this alternative's shape but an item was wrong (e.g. target_spacing[1]: NaN): say which.
        nested = [e for e in errors if not e.startswith(f"{key}:")]
        if nested:
            raise ConfigError(nested[0])
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_describe(value)}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_describe(value)}")
        args = get_args(tp)
        if origin is tuple and args and Ellipsis not in args:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {_type_name(tp)}, got {len(value)} items ({value!r})")
            return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        items = [_convert(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_describe(value)}")
        kt, vt = get_args(tp)
        return {_convert(k, kt, f"{key}"): _convert(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected bool (true/false), got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected int, got {_describe(value)}")
        return value
    if tp is float:
        number: float | None = None
        if isinstance(value, str):
            # PyYAML (YAML 1.1) reads "3e-4" as a string; accept it for float fields.
            try:
                number = float(value)
            except ValueError:
                pass
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        if number is None:
            raise ConfigError(f"{key}: expected float, got {_describe(value)}")
        # NaN and infinity pass every "<" check below and poison later arithmetic: refuse them here, for all fields.
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite float, got {_describe(value)}")
        return number
    if tp is str:
        if isinstance(value, datetime.date):  # YAML reads 2026-12-01 as a date: keep it as written
            return value.isoformat()
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected str, got {_describe(value)}")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {key}")  # programming error


def _build(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown key {where}{unknown[0]!s}; {cls.__name__} accepts: {', '.join(sorted(names))}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        if f.name in data:
            kwargs[f.name] = _convert(data[f.name], hints[f.name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key {key} ({_type_name(hints[f.name])})")
    # __post_init__ checks raise ConfigError with the full dotted key already.
    return cls(**kwargs)


def from_dict(cls: type[T], data: dict[str, Any] | None) -> T:
    """Build a config dataclass from a plain mapping, strictly."""
    return _build(cls, data or {}, "")


def to_dict(obj: Any) -> Any:
    """Turn a config dataclass back into plain YAML-able data."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _parse_scalar(text: str) -> Any:
    return yaml.safe_load(text)


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to raw config data (values parsed as YAML).

    Unknown keys are caught later by the strict loader, which names them.
    """
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. optim.lr=3e-4")
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        node = data
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {dotted}: {part} is not a mapping")
            node = nxt
        node[parts[-1]] = _parse_scalar(raw)
    return data


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with errors that name the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist; pass an existing YAML file")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML ({exc})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a YAML mapping at the top level, got {type(data).__name__}")
    return data


def load(cls: type[T], path: str | Path, overrides: list[str] | None = None) -> T:
    """Load and validate a config file into ``cls``; errors are prefixed with the file."""
    data = apply_overrides(load_yaml(path), overrides)
    try:
        return from_dict(cls, data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def save(obj: Any, path: str | Path) -> None:
    """Write a resolved config as YAML (atomically)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text(yaml.safe_dump(to_dict(obj), sort_keys=False), encoding="utf-8")
    tmp.replace(p)


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _check_regex(pattern: str | None, key: str, *, match_all_ok: bool = True) -> None:
    """Refuse a pattern that :func:`re.compile` rejects (or, unless ``match_all_ok``, an empty one), naming ``key``."""
    if pattern is None:
        return
    _check(
        match_all_ok or bool(pattern),
        f"{key} is empty, which matches every name; expected a regular expression such as '(?i)mask|seg'",
    )
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ConfigError(
            f"{key} is not a valid regular expression ({exc}): got {pattern!r}; expected Python "
            "re syntax, e.g. '(?i)mask|seg'"
        ) from None


def _check_positive(obj: Any, prefix: str, *names: str) -> None:
    """Refuse any of ``obj``'s fields ``names`` that is not a finite number > 0, naming ``prefix.name``."""
    for name in names:
        v = getattr(obj, name)
        _check(v > 0 and math.isfinite(v), f"{prefix}.{name} must be a finite number > 0, got {v}")


# --------------------------------------------------------------------------
# Preprocessing spec
# --------------------------------------------------------------------------


#: Bounds of ``target_spacing`` (mm): finer is no CT/MR acquisition; coarser leaves no anatomy.
MIN_SPACING_MM = 0.01
MAX_SPACING_MM = 50.0
#: Largest 2D ``target_size`` side (pixels).
MAX_SIZE_2D = 8192

#: (0008,0060) Modality values a spec can select as its image series.
ImageModality = Literal["CT", "MR", "DX", "CR", "MG"]
TaskType = Literal["segmentation", "classification"]
#: ``fed.robust.aggregation``: the rules of :func:`fedimg.fl.aggregation.aggregate`.
AggregationMethod = Literal["mean", "median", "trimmed_mean"]
#: Where a site trains: ``auto`` (CUDA when available, else CPU), ``cpu`` or ``cuda``.
DeviceName = Literal["auto", "cpu", "cuda"]
#: Modalities of 3D volumes (the rest are projection radiographs: 2D only).
VOLUME_MODALITIES = ("CT", "MR")


@dataclass(frozen=True)
class SeriesSelection:
    """Which series of a study is the image and which is the label.

    Attributes:
        image_modality: required (0008,0060) Modality of the image series:
            one value (``CT``) or a list (``[DX, CR]``: a chest site may store
            both). ``DX``, ``CR`` and ``MG`` are projection radiographs and
            need a 2D spec (``spatial_dims: 2``).
        image_description_regex: if set, (0008,103E) Series Description of the
            image series must match (``re.search``); used where a study holds
            several sequences (e.g. T1post vs FLAIR).
        label_description_regex: (0008,103E) Series Description of a DICOM mask
            series (TCIA style) that holds the label.
        label_nifti_name_regex: file names of NIfTI label volumes stored with
            the study.
    """

    image_modality: ImageModality | list[ImageModality] = "CT"
    image_description_regex: str | None = None
    label_description_regex: str = r"(?i)mask|seg"
    label_nifti_name_regex: str = r"(?i)(seg|label|mask).*\.nii(\.gz)?$"

    def __post_init__(self) -> None:
        _check(bool(self.modalities), "series.image_modality must name at least one modality")
        # Compiled at load: a bad pattern would otherwise raise re.error after the source was scanned.
        _check_regex(self.image_description_regex, "series.image_description_regex")
        # An empty label pattern would claim every series (the image too) as a label.
        _check_regex(self.label_description_regex, "series.label_description_regex", match_all_ok=False)
        _check_regex(self.label_nifti_name_regex, "series.label_nifti_name_regex", match_all_ok=False)

    @property
    def modalities(self) -> tuple[str, ...]:
        """The selected (0008,0060) Modality values, upper case."""
        raw = [self.image_modality] if isinstance(self.image_modality, str) else list(self.image_modality)
        return tuple(dict.fromkeys(m.upper() for m in raw))


@dataclass(frozen=True)
class IntensitySpec:
    """Intensity normalization.

    CT (3D): clip to ``ct_window`` (Hounsfield units) and scale to [0, 1].
    MR (3D), ``mode: default``: clip to the ``mr_percentiles`` of the whole
    volume, then z-score over the non-zero voxels.
    MR (3D), ``mode: mr_zscore``: take the ``mr_percentiles`` of the non-zero
    voxels only, clip those voxels to them, then z-score them (mean 0, standard
    deviation 1 over the non-zero voxels); zero voxels (background, e.g.
    outside a skull-stripped brain) stay exactly 0.
    2D images (any modality): clip to the ``percentiles_2d`` of the image
    (MONOCHROME1 already inverted, so higher is brighter), then scale that
    range to [0, 1].

    Attributes:
        mode: ``default`` (the chain of the modality, as above) or
            ``mr_zscore`` (3D MR specs only).
    """

    ct_window: tuple[float, float] = (-160.0, 240.0)
    mr_percentiles: tuple[float, float] = (0.5, 99.5)
    percentiles_2d: tuple[float, float] = (0.5, 99.5)
    mode: Literal["default", "mr_zscore"] = "default"

    def __post_init__(self) -> None:
        _check(
            self.ct_window[0] < self.ct_window[1],
            f"intensity.ct_window must be [low, high] with low < high, got {list(self.ct_window)}",
        )
        for key, (lo, hi) in (("mr_percentiles", self.mr_percentiles), ("percentiles_2d", self.percentiles_2d)):
            _check(0.0 <= lo < hi <= 100.0, f"intensity.{key} must satisfy 0 <= low < high <= 100, got {[lo, hi]}")


@dataclass(frozen=True)
class LabelSpec:
    """Label classes: the class names and where each case's label comes from.

    Segmentation: ``values`` maps a class name to the voxel value it has in
    the source label (NIfTI or DICOM mask). Output labels are 0 (background)
    and 1..N in the order of ``classes``.

    Classification: one class per study, read from a site-local CSV (passed
    as ``--labels-csv``, never part of the spec). ``csv_key`` says which
    header value identifies a study in the CSV: ``accession`` for
    (0008,0050) Accession Number, ``study_uid`` for (0020,000D) Study
    Instance UID. The key column is ``csv_key_column`` (default
    ``AccessionNumber`` or ``StudyInstanceUID``), the class column
    ``csv_label_column``; a class cell holds a name from ``classes`` or its
    0-based index. Output labels are the 0-based class index (no background).

    Attributes:
        classes: class names (segmentation: foreground classes; classification:
            every class, at least two).
        values: segmentation only: class name -> stored voxel value.
        others: segmentation only: what a label value that is neither 0 nor a
            class value gets: ``refuse`` (the default: the case is refused,
            LABEL_VALUES_UNEXPECTED) or ``background`` (it becomes 0: a
            multi-label segmentation, e.g. TotalSegmentator's 100+ classes,
            narrowed to the spec's classes; the voxels so mapped are counted
            in the manifest and summary).
        required: segmentation only: refuse an image without a label.
        csv_key: classification: ``accession`` or ``study_uid``.
        csv_key_column: classification: CSV column holding the key.
        csv_label_column: classification: CSV column holding the class.
    """

    classes: list[str] = field(default_factory=lambda: ["foreground"])
    values: dict[str, int] = field(default_factory=dict)
    others: Literal["refuse", "background"] = "refuse"
    required: bool = True
    csv_key: Literal["accession", "study_uid"] = "accession"
    csv_key_column: str | None = None
    csv_label_column: str = "label"

    def __post_init__(self) -> None:
        _check(len(self.classes) >= 1, "labels.classes must name at least one class")
        _check(all(c.strip() for c in self.classes), f"labels.classes must be non-empty names, got {self.classes}")
        _check(len(set(self.classes)) == len(self.classes), f"labels.classes has duplicates: {self.classes}")
        for name, value in self.values.items():
            _check(name in self.classes, f"labels.values names {name!r}, which is not in labels.classes {self.classes}")
            _check(value >= 1, f"labels.values.{name} must be a stored voxel value >= 1 (0 is background), got {value}")
        stored = [self.source_value(c) for c in self.classes]
        repeated = sorted({v for v in stored if stored.count(v) > 1})
        # Two classes on one stored value would silently merge them (the later class wins).
        _check(
            not repeated,
            f"labels.values gives classes {self.classes} the stored values {stored}: "
            f"{repeated} repeat; each class needs its own value",
        )
        _check(
            self.csv_key_column is None or bool(self.csv_key_column.strip()),
            "labels.csv_key_column must be a column name or null (default for labels.csv_key)",
        )
        _check(bool(self.csv_label_column.strip()), "labels.csv_label_column must be a column name")

    @property
    def key_column(self) -> str:
        """The CSV column that identifies a study (``csv_key_column`` or the default for ``csv_key``)."""
        if self.csv_key_column:
            return self.csv_key_column.strip()
        return "AccessionNumber" if self.csv_key == "accession" else "StudyInstanceUID"

    @property
    def key_tag(self) -> str:
        """The DICOM attribute the CSV key is compared with, as ``(gggg,eeee) Name``."""
        return "(0008,0050) Accession Number" if self.csv_key == "accession" else "(0020,000D) Study Instance UID"

    def source_value(self, name: str) -> int:
        """Stored value of class ``name`` in the source label (default: its 1-based index)."""
        return self.values.get(name, self.classes.index(name) + 1)


@dataclass(frozen=True)
class SplitSpec:
    """How a site's cases are split, always by patient (:mod:`fedimg.preprocess.splits`).

    Attributes:
        val_fraction: share of cases for validation (whole patients).
        seed: orders new patients (the split is deterministic).
        test_fraction: share of cases held out as ``test`` (0: none); training
            and model selection never see them.
        folds: cross-validation folds of the non-test patients (0: none, else
            2..20); fold 0 is the ``validation`` split, ``data.fold`` picks another.
    """

    val_fraction: float = 0.25
    seed: int = 0
    test_fraction: float = 0.0
    folds: int = 0

    def __post_init__(self) -> None:
        _check(
            0.0 < self.val_fraction < 1.0,
            f"split.val_fraction must be between 0 and 1 (exclusive), got {self.val_fraction}",
        )
        _check(0.0 <= self.test_fraction < 1.0, f"split.test_fraction must be >= 0 and < 1, got {self.test_fraction}")
        _check(
            self.val_fraction + self.test_fraction < 1.0,
            f"split.val_fraction + split.test_fraction must leave cases for training (< 1), got "
            f"{self.val_fraction} + {self.test_fraction}",
        )
        _check(
            self.folds == 0 or 2 <= self.folds <= 20,
            f"split.folds must be 0 (no cross-validation) or 2..20, got {self.folds}",
        )


@dataclass(frozen=True)
class GeometrySpec:
    """Geometry checks applied to every series before conversion.

    Attributes:
        irregular: what to do with a gantry tilt, uneven slice spacing or a
            small slice gap: ``refuse`` (the default: the series is refused with
            its reason code) or ``resample`` onto a regular orthogonal grid, with
            the correction recorded in the manifest.
    """

    min_slices: int = 3
    spacing_tolerance: float = 1e-3
    orientation_tolerance: float = 1e-4
    irregular: Literal["refuse", "resample"] = "refuse"

    def __post_init__(self) -> None:
        _check(self.min_slices >= 2, f"geometry.min_slices must be >= 2, got {self.min_slices}")
        _check(
            0 < self.spacing_tolerance < 0.1,
            f"geometry.spacing_tolerance must be in (0, 0.1), got {self.spacing_tolerance}",
        )
        _check(
            0 < self.orientation_tolerance < 0.1,
            f"geometry.orientation_tolerance must be in (0, 0.1), got {self.orientation_tolerance}",
        )


@dataclass(frozen=True)
class DeidSpec:
    """What de-identification keeps (everything else follows PS3.15 Table E.1-1).

    Attributes:
        covariates: patient characteristics to keep (Retain Patient Characteristics
            Option), by DICOM keyword, e.g. ``[PatientAge, PatientSex]``.
        keep_descriptors: descriptor keyword -> values that may be kept as they
            are (Clean Descriptors Option through an allow-list), e.g.
            ``{SeriesDescription: [Abdomen 3.0 B30f]}``.
        private_allowlist: ``[creator, element]`` pairs of private tags to keep
            (element is the offset within the block, e.g. ``0x10``).
    """

    covariates: list[str] = field(default_factory=list)
    keep_descriptors: dict[str, list[str]] = field(default_factory=dict)
    private_allowlist: list[tuple[str, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        # The de-identification engine checks these only when --write-dicom runs, after the conversion:
        # check them here against the same lists (imported late: they live with the PS3.15 table).
        if self.covariates or self.keep_descriptors:
            from fedimg.dicom.deid_table import DESCRIPTORS, PATIENT_CHARACTERISTICS

            for i, name in enumerate(self.covariates):
                _check(
                    name in PATIENT_CHARACTERISTICS,
                    f"deid.covariates[{i}] {name!r} is not a patient characteristic of the Retain Patient "
                    f"Characteristics Option; expected one of {', '.join(sorted(PATIENT_CHARACTERISTICS))}",
                )
            for name, values in self.keep_descriptors.items():
                _check(
                    name in DESCRIPTORS,
                    f"deid.keep_descriptors names {name!r}, which is not a descriptor of the Clean Descriptors "
                    f"Option; expected one of {', '.join(sorted(DESCRIPTORS))}",
                )
                _check(
                    all(v.strip() for v in values),
                    f"deid.keep_descriptors.{name} must list non-empty values (kept verbatim, not patterns), "
                    f"got {values}",
                )
        for i, (creator, element) in enumerate(self.private_allowlist):
            _check(
                bool(creator.strip()) and 0 <= element <= 0xFFFF,
                f"deid.private_allowlist[{i}] must be [private creator, element 0x00-0xFF (or 0xXXYY)], "
                f"got {[creator, element]}",
            )


@dataclass(frozen=True)
class PreprocessSpec:
    """The shared preprocessing spec every site applies (``configs/preprocessing``).

    Attributes:
        name: the spec's name (recorded in the datalist).
        modality: ``CT`` or ``MR`` for 3D specs (selects the intensity chain);
            for 2D specs informative only (every 2D image gets the percentile
            normalization of ``intensity.percentiles_2d``).
        task: ``segmentation`` (a label volume per case, from a DICOM mask,
            SEG or NIfTI) or ``classification`` (one class per study from the
            site's labels CSV, see :class:`LabelSpec`).
        spatial_dims: 3 for volumes; 2 for single images (classification only):
            a single-frame image series (DX, CR, MG, or one CT/MR slice) with
            (0028,0030) Pixel Spacing or (0018,1164) Imager Pixel Spacing.
        target_spacing: 3D only (required there): output voxel size in mm.
        target_size: 2D only (required there): output ``[H, W]`` in pixels.
            The image is resized to fit inside H x W keeping its physical
            aspect ratio (square output pixels; antialiased bilinear), then
            padded symmetrically with 0 (the darkest value) to exactly H x W.
        orientation: 3D only: output axis codes.
    """

    name: str
    modality: ImageModality
    target_spacing: tuple[float, float, float] | None = None
    orientation: str = "RAS"
    task: TaskType = "segmentation"
    spatial_dims: Literal[2, 3] = 3
    target_size: tuple[int, int] | None = None
    intensity: IntensitySpec = field(default_factory=IntensitySpec)
    series: SeriesSelection = field(default_factory=SeriesSelection)
    labels: LabelSpec = field(default_factory=LabelSpec)
    split: SplitSpec = field(default_factory=SplitSpec)
    geometry: GeometrySpec = field(default_factory=GeometrySpec)
    deid: DeidSpec = field(default_factory=DeidSpec)

    def __post_init__(self) -> None:
        if self.spatial_dims == 3:
            _check(
                self.target_spacing is not None,
                "missing required key target_spacing (list of 3 float, mm): a 3D spec (spatial_dims: 3) "
                "resamples every volume to it",
            )
            _check(
                all(MIN_SPACING_MM < s <= MAX_SPACING_MM for s in self.target_spacing or ()),
                f"target_spacing must be three mm values in ({MIN_SPACING_MM}, {MAX_SPACING_MM}], "
                f"got {list(self.target_spacing or ())}",
            )
            _check(
                self.modality in VOLUME_MODALITIES,
                f"modality must be CT or MR for a 3D spec, got {self.modality!r}; projection radiographs "
                "(DX, CR, MG) need spatial_dims: 2 and target_size",
            )
            _check(
                self.target_size is None, "target_size is for 2D specs (spatial_dims: 2); a 3D spec uses target_spacing"
            )
        else:
            _check(
                self.target_size is not None,
                "missing required key target_size ([H, W] pixels): a 2D spec (spatial_dims: 2) resizes "
                "and pads every image to it",
            )
            _check(
                all(8 <= s <= MAX_SIZE_2D for s in self.target_size or ()),
                f"target_size must be two pixel counts in [8, {MAX_SIZE_2D}], got {list(self.target_size or ())}",
            )
            _check(
                self.task == "classification",
                "spatial_dims: 2 supports task: classification only (2D segmentation is not built); "
                "set task: classification, or spatial_dims: 3 for volumes",
            )
            _check(
                self.target_spacing is None,
                "target_spacing is for 3D specs; a 2D spec uses target_size (output spacing follows "
                "from the image's extent)",
            )
        _check(bool(self.name.strip()), "name must be a non-empty spec name")
        codes = self.orientation.upper()
        _check(
            len(codes) == 3 and all(sum(c in pair for c in codes) == 1 for pair in ("LR", "AP", "SI")),
            f"orientation must be three axis codes, one of L/R, A/P and S/I each (e.g. 'RAS', 'LPS'), "
            f"got {self.orientation!r}",
        )
        # MONAI's Orientationd reads upper-case codes only.
        object.__setattr__(self, "orientation", codes)
        if self.task == "classification":
            _check(
                len(self.labels.classes) >= 2,
                f"labels.classes must name at least 2 classes for classification, got {self.labels.classes}",
            )
            _check(
                not self.labels.values,
                "labels.values maps voxel values of segmentation labels; a classification spec reads "
                "class names (or 0-based indices) from the labels CSV: remove labels.values",
            )
            _check(
                self.labels.required,
                "labels.required: false has no meaning for classification: a study without a row in "
                "the labels CSV has no class and is refused (NO_LABEL)",
            )
            _check(
                self.labels.others == "refuse",
                "labels.others maps voxel values of segmentation labels; a classification spec reads one "
                "class per study from the labels CSV: remove labels.others",
            )
        if self.intensity.mode == "mr_zscore":
            _check(
                self.modality == "MR" and self.spatial_dims == 3,
                f"intensity.mode: mr_zscore normalizes 3D MR volumes; this spec is {self.spatial_dims}D "
                f"{self.modality}: set intensity.mode: default (CT uses intensity.ct_window, 2D images "
                "intensity.percentiles_2d)",
            )

    @property
    def is_classification(self) -> bool:
        """True for one class per case (labels from the site's CSV)."""
        return self.task == "classification"


# --------------------------------------------------------------------------
# Experiment and site configs
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskConfig:
    """What is learned.

    Attributes:
        type: ``segmentation`` (3D, voxel labels) or ``classification``
            (one class per case, 2D or 3D).
        spatial_dims: 3 for volumes, 2 for single images (classification only).
        class_names: segmentation: foreground classes in label order
            (background, value 0, is implicit); classification: every class,
            index ``i`` is label value ``i`` (e.g. ``[normal, pneumonia]``).
        in_channels: image channels.
        min_component_voxels: segmentation post-processing at evaluation:
            connected components of a class smaller than this are set to
            background (0 disables). Evaluation reports Dice after this step.
        positive_class: classification with two classes: which class counts
            as "positive" for sensitivity / specificity in summaries
            (default: the last class).
    """

    type: TaskType = "segmentation"
    spatial_dims: int = 3
    class_names: list[str] = field(default_factory=lambda: ["foreground"])
    in_channels: int = 1
    min_component_voxels: int = 0
    positive_class: str | None = None

    def __post_init__(self) -> None:
        _check(self.spatial_dims in (2, 3), f"task.spatial_dims must be 2 or 3, got {self.spatial_dims}")
        _check(len(self.class_names) >= 1, "task.class_names must name at least one class")
        _check(
            len(set(self.class_names)) == len(self.class_names), f"task.class_names has duplicates: {self.class_names}"
        )
        bad = [c for c in self.class_names if not c or not all(ch.isalnum() or ch in "_-" for ch in c)]
        _check(
            not bad,
            f"task.class_names must be letters, digits, '_' or '-' (they name metrics and TensorBoard tags), got {bad}",
        )
        _check(
            self.min_component_voxels >= 0, f"task.min_component_voxels must be >= 0, got {self.min_component_voxels}"
        )
        _check(self.in_channels >= 1, f"task.in_channels must be >= 1, got {self.in_channels}")
        if self.type == "segmentation":
            _check(
                self.spatial_dims == 3,
                f"task.spatial_dims must be 3 for segmentation (volumes), got {self.spatial_dims}",
            )
        else:
            _check(
                len(self.class_names) >= 2,
                f"task.class_names must name at least 2 classes for classification, got {self.class_names}",
            )
        if self.positive_class is not None:
            _check(
                self.type == "classification" and self.positive_class in self.class_names,
                f"task.positive_class must be one of task.class_names {self.class_names} (classification), "
                f"got {self.positive_class!r}",
            )

    @property
    def num_classes(self) -> int:
        """Network output channels (segmentation: background included)."""
        return len(self.class_names) + 1 if self.type == "segmentation" else len(self.class_names)

    @property
    def is_segmentation(self) -> bool:
        """True for voxel-wise segmentation."""
        return self.type == "segmentation"

    @property
    def main_metric(self) -> str:
        """The metric that ranks models: mean Dice or mean one-vs-rest AUC."""
        return "dice_mean" if self.is_segmentation else "auc_mean"

    @property
    def rankable_metrics(self) -> tuple[str, ...]:
        """FLModel metric names (``val_*``) the task's evaluation reports and that rank models (higher is better).

        The names :func:`fedimg.tasks.metric_names` makes of
        :class:`fedimg.tasks.segmentation.DiceAccumulator` and
        :func:`fedimg.tasks.classification.classification_metrics` results; HD95
        (lower is better) and ``val_cases`` cannot rank models.
        """
        if self.is_segmentation:
            return ("val_dice", *(f"val_dice_{c}" for c in self.class_names))
        per_class = [
            f"val_{m}_{c}" for m in ("auc", "sensitivity", "specificity", "balanced_accuracy") for c in self.class_names
        ]
        return ("val_auc", "val_balanced_accuracy", "val_accuracy", *per_class)


ModelName = Literal["unet", "segresnet", "densenet121", "resnet"]
SEGMENTATION_MODELS = ("unet", "segresnet")


@dataclass(frozen=True)
class ModelConfig:
    """Network architecture (see :func:`fedimg.models.build_model`).

    Attributes:
        name: ``unet`` or ``segresnet`` (segmentation), ``densenet121`` or
            ``resnet`` (classification); all MONAI networks.
        channels, strides, num_res_units: UNet: features per level, the
            down-sampling factors, residual units per block.
        init_filters: SegResNet: features of the first level.
        init_features: DenseNet121: features of the stem (64 in the published network).
        blocks_down: SegResNet: residual blocks per down level.
        growth_rate: DenseNet121 growth rate (32 in the published network;
            smaller values give the same topology with fewer features).
        resnet_depth: ResNet 10, 18, 34 or 50.
        width: ResNet: scale of ``block_inplanes`` (1.0 is the published width).
        norm: normalization layers: ``instance``, ``batch`` or ``group``.
            FedBN keeps the normalization layers site-local; it needs layers
            with learned or tracked statistics (``batch``, or ``group``).
        dropout: dropout probability.
    """

    name: ModelName = "unet"
    channels: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    strides: list[int] = field(default_factory=lambda: [2, 2, 2])
    num_res_units: int = 2
    init_filters: int = 16
    init_features: int = 64
    blocks_down: list[int] = field(default_factory=lambda: [1, 2, 2, 4])
    growth_rate: int = 32
    resnet_depth: int = 18
    width: float = 1.0
    norm: Literal["instance", "batch", "group"] = "instance"
    dropout: float = 0.0

    def __post_init__(self) -> None:
        _check(
            len(self.channels) >= 2 and all(c >= 1 for c in self.channels),
            f"model.channels must list >= 2 positive feature counts, got {self.channels}",
        )
        _check(all(s >= 1 for s in self.strides), f"model.strides must be positive, got {self.strides}")
        _check(self.num_res_units >= 0, f"model.num_res_units must be >= 0, got {self.num_res_units}")
        _check(
            len(self.strides) == len(self.channels) - 1,
            f"model.strides must have len(model.channels) - 1 = {len(self.channels) - 1} "
            f"entries, got {len(self.strides)}",
        )
        _check(0.0 <= self.dropout < 1.0, f"model.dropout must be in [0, 1), got {self.dropout}")
        _check(
            self.resnet_depth in (10, 18, 34, 50),
            f"model.resnet_depth must be 10, 18, 34 or 50, got {self.resnet_depth}",
        )
        _check(self.init_filters >= 4, f"model.init_filters must be >= 4, got {self.init_filters}")
        _check(self.init_features >= 4, f"model.init_features must be >= 4, got {self.init_features}")
        _check(self.growth_rate >= 4, f"model.growth_rate must be >= 4, got {self.growth_rate}")
        _check(0.0 < self.width <= 4.0, f"model.width must be in (0, 4], got {self.width}")
        _check(
            len(self.blocks_down) >= 2 and all(b >= 1 for b in self.blocks_down),
            f"model.blocks_down must list >= 2 positive block counts, got {self.blocks_down}",
        )


@dataclass(frozen=True)
class DataConfig:
    """How images become training batches.

    Attributes:
        roi_size: segmentation: the training patch (and sliding-window) size;
            classification: every image is resized to this size. One entry
            per spatial dimension of the task.
        batch_size: images (segmentation: patches) per step.
        cache_rate: share of the deterministic transform results kept in
            memory (on CUDA: in GPU memory).
        num_workers: DataLoader worker processes on the CPU (0: main process).
        samples_per_volume: segmentation: patches drawn per cached volume.
        augment: random flips and intensity changes during training.
        fold: with cross-validation datalists (``split.folds``), the fold that
            validates at every site; the other folds train. None: the
            datalist's own training/validation split.
    """

    roi_size: list[int] = field(default_factory=lambda: [64, 64, 64])
    batch_size: int = 2
    cache_rate: float = 1.0
    num_workers: int = 0
    samples_per_volume: int = 1
    augment: bool = True
    fold: int | None = None

    def __post_init__(self) -> None:
        _check(
            len(self.roi_size) in (2, 3) and all(r >= 16 for r in self.roi_size),
            f"data.roi_size must be 2 or 3 sizes, each >= 16, got {list(self.roi_size)}",
        )
        _check(self.batch_size >= 1, f"data.batch_size must be >= 1, got {self.batch_size}")
        _check(0.0 <= self.cache_rate <= 1.0, f"data.cache_rate must be in [0, 1], got {self.cache_rate}")
        _check(self.num_workers >= 0, f"data.num_workers must be >= 0, got {self.num_workers}")
        _check(self.samples_per_volume >= 1, f"data.samples_per_volume must be >= 1, got {self.samples_per_volume}")
        _check(self.fold is None or self.fold >= 0, f"data.fold must be >= 0 or empty, got {self.fold}")


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer settings (site-local optimizer state is not shared).

    ``schedule: cosine`` decays the learning rate from ``lr`` to
    ``lr * min_lr_factor`` over the run: over epochs in local training, over
    rounds in federated training (every site follows the same curve).
    """

    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = 1e-3
    weight_decay: float = 1e-5
    momentum: float = 0.9
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr_factor: float = 0.05

    def __post_init__(self) -> None:
        _check(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        _check(0.0 <= self.momentum < 1.0, f"optim.momentum must be in [0, 1), got {self.momentum}")
        _check(0.0 <= self.min_lr_factor <= 1.0, f"optim.min_lr_factor must be in [0, 1], got {self.min_lr_factor}")

    def lr_at(self, progress: float) -> float:
        """Learning rate at ``progress`` in [0, 1] of the run."""
        if self.schedule == "constant":
            return self.lr
        p = min(max(progress, 0.0), 1.0)
        return self.lr * (self.min_lr_factor + (1 - self.min_lr_factor) * 0.5 * (1 + math.cos(math.pi * p)))


@dataclass(frozen=True)
class TrainConfig:
    """Local training per round (or per run for ``train-local``)."""

    local_epochs: int = 1
    epochs: int = 20
    amp: bool = True
    seed: int = 0
    sw_batch_size: int = 2

    def __post_init__(self) -> None:
        _check(self.local_epochs >= 1, f"train.local_epochs must be >= 1, got {self.local_epochs}")
        _check(self.epochs >= 1, f"train.epochs must be >= 1, got {self.epochs}")
        _check(self.sw_batch_size >= 1, f"train.sw_batch_size must be >= 1, got {self.sw_batch_size}")
        _check(self.seed >= 0, f"train.seed must be >= 0, got {self.seed}")


@dataclass(frozen=True)
class ServerOptimConfig:
    """FedOpt's server-side optimizer, applied to the averaged update as a pseudo-gradient.

    ``sgd`` with ``lr: 1.0`` and ``momentum: 0`` is FedAvg; momentum gives
    FedAvgM, ``adam`` gives FedAdam (Reddi et al. 2021).
    """

    name: Literal["sgd", "adam"] = "sgd"
    lr: float = 1.0
    momentum: float = 0.6
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-3

    def __post_init__(self) -> None:
        _check(self.lr > 0, f"fed.server_optimizer.lr must be > 0, got {self.lr}")
        _check(0.0 <= self.momentum < 1.0, f"fed.server_optimizer.momentum must be in [0, 1), got {self.momentum}")
        _check(
            all(0.0 <= b < 1.0 for b in self.betas),
            f"fed.server_optimizer.betas must be in [0, 1), got {list(self.betas)}",
        )
        _check(self.eps > 0, f"fed.server_optimizer.eps must be > 0, got {self.eps}")


@dataclass(frozen=True)
class RobustConfig:
    """Server-side screening of site updates and the aggregation rule.

    An update with a NaN or infinite value is always rejected. The checks
    below are off at 0 / null.

    Attributes:
        aggregation: ``mean`` (FedAvg's weighted mean), ``median`` or
            ``trimmed_mean`` (coordinate-wise; robust to a poisoned minority).
        trim: updates dropped at each end per coordinate for ``trimmed_mean``.
        norm_outlier_factor: reject an update whose L2 norm exceeds this many
            times the median norm of the round's updates (needs >= 3 updates).
        max_update_norm: reject an update whose L2 norm exceeds this value.
        min_cosine: reject an update whose cosine similarity with the
            coordinate-wise median update of the round is below this (e.g. 0:
            an update pointing away from the majority; needs >= 3 updates).
    """

    aggregation: AggregationMethod = "mean"
    trim: int = 1
    norm_outlier_factor: float = 0.0
    max_update_norm: float = 0.0
    min_cosine: float | None = None

    def __post_init__(self) -> None:
        _check(self.trim >= 1, f"fed.robust.trim must be >= 1, got {self.trim}")
        _check(
            self.norm_outlier_factor == 0 or self.norm_outlier_factor > 1,
            f"fed.robust.norm_outlier_factor must be 0 (off) or > 1, got {self.norm_outlier_factor}",
        )
        _check(self.max_update_norm >= 0, f"fed.robust.max_update_norm must be >= 0, got {self.max_update_norm}")
        _check(
            self.min_cosine is None or -1.0 <= self.min_cosine < 1.0,
            f"fed.robust.min_cosine must be null or in [-1, 1), got {self.min_cosine}",
        )


AlgorithmName = Literal["fedavg", "fedprox", "fedopt", "scaffold", "fedbn"]
#: The names of ``fed.algorithm`` (the registry :mod:`fedimg.fl.algorithms` has exactly these).
ALGORITHMS: tuple[str, ...] = get_args(AlgorithmName)


@dataclass(frozen=True)
class FedConfig:
    """Federation-wide settings, read by the job builder and by every site.

    Attributes:
        algorithm: ``fedavg``; ``fedprox`` (proximal term ``mu``); ``fedopt``
            (server optimizer, ``server_optimizer``); ``scaffold`` (control
            variates); ``fedbn`` (normalization layers stay at each site).
        num_rounds: aggregation rounds.
        min_clients: sites needed per round (0: all configured sites).
        key_metric: metric that selects the best global model (a name the
            sites send, e.g. ``val_dice`` or ``val_auc``); ``auto`` picks the
            task's main metric.
        cross_site_eval: after training, evaluate the final, the best and every
            site's own model on every site's validation cases.
        exchange: ``weights`` (sites send their full weights) or ``diff``
            (sites send local minus global). Read by the job and the sites.
        update_precision: ``fp32``, or ``fp16``: sites send their update in
            half precision (half the bytes); the server aggregates in fp32.
        mu: FedProx proximal coefficient.
        server_optimizer: FedOpt's optimizer.
        final_eval: after the last round, every site validates the final
            global model, so the best-model choice includes it.
        validate_every: sites validate the received global model every N
            rounds (1: every round; the best model is chosen among the rated
            ones). Validation is about a fifth of a round: a larger N trades
            curve resolution for speed. The final evaluation always runs.
        robust: screening of updates and the aggregation rule.
        round_timeout_s: seconds a round waits for the sites' updates; 0 is
            adaptive: ``first_round_timeout_s`` for the first round, then 3x
            the slowest round so far (at least ``min_round_timeout_s``). A site that misses it is
            left out of that round (recorded), and the round counts if at
            least ``min_clients`` sites contributed.
        first_round_timeout_s: the first round's limit when adaptive (it
            includes caching the data and the first transfer of the model).
        min_round_timeout_s: the floor of the adaptive limit of later rounds:
            how long a round waits at least for a site that went silent.
        eval_timeout_s: limit of the final evaluation and of each step of
            cross-site evaluation.
        scope: the site privacy scope the job asks for (``privacy.json`` at
            each site); null uses each site's default scope.
        max_steps_per_round: the most optimizer steps per round the server
            believes a site did; a site's reported steps are its weight in
            the mean, so a report that is missing, not finite, <= 0, above this
            bound, or above 4x the site's first report of the run rejects its
            update. 0 (default) derives a generous bound: the steps of a site
            with 100,000 training cases (``train.local_epochs x
            ceil(100000 / data.batch_size)``).
    """

    algorithm: AlgorithmName = "fedavg"
    num_rounds: int = 5
    min_clients: int = 0
    key_metric: str = "auto"
    cross_site_eval: bool = True
    exchange: Literal["weights", "diff"] = "weights"
    update_precision: Literal["fp32", "fp16"] = "fp32"
    mu: float = 0.01
    server_optimizer: ServerOptimConfig = field(default_factory=ServerOptimConfig)
    final_eval: bool = True
    validate_every: int = 1
    robust: RobustConfig = field(default_factory=RobustConfig)
    round_timeout_s: int = 0
    first_round_timeout_s: int = 1800
    min_round_timeout_s: int = 60
    eval_timeout_s: int = 600
    scope: str | None = None
    max_steps_per_round: int = 0

    def __post_init__(self) -> None:
        _check(self.validate_every >= 1, f"fed.validate_every must be >= 1, got {self.validate_every}")
        _check(
            self.max_steps_per_round >= 0,
            f"fed.max_steps_per_round must be >= 0 (0: derived), got {self.max_steps_per_round}",
        )
        _check(self.num_rounds >= 1, f"fed.num_rounds must be >= 1, got {self.num_rounds}")
        _check(self.min_clients >= 0, f"fed.min_clients must be >= 0, got {self.min_clients}")
        _check_positive(self, "fed", "mu")
        _check(self.round_timeout_s >= 0, f"fed.round_timeout_s must be >= 0 (0: adaptive), got {self.round_timeout_s}")
        _check(
            self.first_round_timeout_s >= 10,
            f"fed.first_round_timeout_s must be >= 10, got {self.first_round_timeout_s}",
        )
        _check(self.min_round_timeout_s >= 10, f"fed.min_round_timeout_s must be >= 10, got {self.min_round_timeout_s}")
        _check(self.eval_timeout_s >= 10, f"fed.eval_timeout_s must be >= 10, got {self.eval_timeout_s}")
        _check(
            self.scope is None or (bool(self.scope) and all(c.isalnum() or c in "-_" for c in self.scope)),
            f"fed.scope must be null or a scope name (letters, digits, '-', '_'), got {self.scope!r}",
        )
        if self.algorithm == "fedopt":
            _check(
                self.exchange == "diff",
                "fed.algorithm fedopt treats the averaged update as a gradient: set fed.exchange: diff "
                f"(got {self.exchange!r})",
            )


@dataclass(frozen=True)
class GaussianDPConfig:
    """Update-level DP at each site: clip the update to L2 norm ``clip_norm``, add N(0, (sigma*C)^2) noise.

    Site-level DP per round, composed over rounds by an RDP accountant
    (:class:`fedimg.fl.privacy.GaussianUpdateDP`). ``seed`` makes runs
    reproducible; leave it null in a real deployment.
    """

    clip_norm: float = 1.0
    noise_multiplier: float = 1.0
    delta: float = 1e-5
    seed: int | None = None

    def __post_init__(self) -> None:
        _check_positive(self, "privacy.gaussian", "clip_norm", "noise_multiplier")
        _check(0 < self.delta < 1, f"privacy.gaussian.delta must be in (0, 1), got {self.delta}")
        _check(self.seed is None or self.seed >= 0, f"privacy.gaussian.seed must be >= 0 or null, got {self.seed}")


@dataclass(frozen=True)
class PercentileConfig:
    """NVFlare's ``PercentilePrivacy`` (Shokri & Shmatikov 2015): share only the largest changes, clipped.

    A sparsifier: it has no epsilon.
    """

    percentile: float = 10.0
    gamma: float = 0.01

    def __post_init__(self) -> None:
        _check(0 <= self.percentile <= 100, f"privacy.percentile.percentile must be in [0, 100], got {self.percentile}")
        _check(self.gamma > 0, f"privacy.percentile.gamma must be > 0, got {self.gamma}")


@dataclass(frozen=True)
class SVTConfig:
    """NVFlare's ``SVTPrivacy`` (sparse vector technique, Lyu et al.): release a noisy ``fraction`` of entries."""

    fraction: float = 0.1
    epsilon: float = 0.1
    noise_var: float = 0.1
    gamma: float = 1e-5
    tau: float = 1e-6

    def __post_init__(self) -> None:
        _check(0 < self.fraction <= 1, f"privacy.svt.fraction must be in (0, 1], got {self.fraction}")
        _check_positive(self, "privacy.svt", "epsilon", "noise_var", "gamma")
        _check(self.tau >= 0, f"privacy.svt.tau must be >= 0, got {self.tau}")


@dataclass(frozen=True)
class DPSGDConfig:
    """DP-SGD at each site with Opacus: per-sample gradients clipped to ``max_grad_norm``, Gaussian noise.

    Sample-level DP of each site's training cases; epsilon at ``delta`` is
    accounted over all local steps of all rounds. Needs a network without
    BatchNorm (``model.norm: instance`` or ``group``).
    """

    enabled: bool = False
    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    delta: float = 1e-5

    def __post_init__(self) -> None:
        _check_positive(self, "privacy.dp_sgd", "noise_multiplier", "max_grad_norm")
        _check(0 < self.delta < 1, f"privacy.dp_sgd.delta must be in (0, 1), got {self.delta}")


@dataclass(frozen=True)
class PrivacyConfig:
    """Privacy the job itself asks of every site (a site's own ``privacy.json`` scope may add more).

    Attributes:
        update_filter: a filter on every update a site sends: ``gaussian``
            (update-level DP), ``percentile`` or ``svt`` (NVFlare's
            sparsifiers); ``none``. All act on model differences, so they
            need ``fed.exchange: diff``.
        gaussian: settings of ``update_filter: gaussian``.
        percentile: settings of ``update_filter: percentile``.
        svt: settings of ``update_filter: svt``.
        dp_sgd: DP-SGD in each site's local training (Opacus).
        encryption: ``he``: sites encrypt their weights with CKKS (TenSEAL)
            and the server sums ciphertexts without seeing any site's update
            (NVFlare's ``FedAvgRecipeWithHE``; keys come from provisioning,
            so POC or production only, not the simulator).
        min_cohort: the fewest validation cases a site must have before it
            sends counts about them (``val_cases`` and the per-class counts of
            cases with an undefined HD95); a smaller site keeps them (its
            metrics are still sent) and the server weighs its validation as
            one case. At least 1 (1: always send).
    """

    update_filter: Literal["none", "gaussian", "percentile", "svt"] = "none"
    gaussian: GaussianDPConfig = field(default_factory=GaussianDPConfig)
    percentile: PercentileConfig = field(default_factory=PercentileConfig)
    svt: SVTConfig = field(default_factory=SVTConfig)
    dp_sgd: DPSGDConfig = field(default_factory=DPSGDConfig)
    encryption: Literal["none", "he"] = "none"
    min_cohort: int = 5

    def __post_init__(self) -> None:
        _check(
            self.min_cohort >= 1, f"privacy.min_cohort must be >= 1 (1: always report counts), got {self.min_cohort}"
        )


@dataclass(frozen=True)
class ExperimentConfig:
    """A federation-wide experiment (``configs/experiments``)."""

    name: str
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fed: FedConfig = field(default_factory=FedConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)

    def __post_init__(self) -> None:
        _check(
            bool(self.name) and all(c.isalnum() or c in "-_" for c in self.name),
            f"name must be letters, digits, '-' or '_', got {self.name!r}",
        )
        _check(
            self.fed.key_metric in ("auto", *self.task.rankable_metrics),
            f"fed.key_metric {self.fed.key_metric!r} is not a metric the {self.task.type} task reports that "
            f"ranks models (higher is better); expected auto or one of {', '.join(self.task.rankable_metrics)}",
        )
        _check(
            len(self.data.roi_size) == self.task.spatial_dims,
            f"data.roi_size must have task.spatial_dims = {self.task.spatial_dims} entries, "
            f"got {list(self.data.roi_size)}",
        )
        if self.task.is_segmentation:
            _check(
                self.model.name in SEGMENTATION_MODELS,
                f"model.name {self.model.name!r} is a classifier; segmentation uses one of "
                f"{', '.join(SEGMENTATION_MODELS)}",
            )
        else:
            _check(
                self.model.name not in SEGMENTATION_MODELS,
                f"model.name {self.model.name!r} is a segmentation network; classification uses densenet121 or resnet",
            )
        if self.model.name == "densenet121":
            # The stem and three transitions halve the image five times.
            _check(
                all(r >= 32 for r in self.data.roi_size),
                f"model.name densenet121 needs images of at least 32 per axis (data.roi_size), "
                f"got {list(self.data.roi_size)}",
            )
            # Instance norm needs more than one value per channel: the last one sees roi / 32 per axis.
            _check(
                self.model.norm != "instance" or all(r >= 64 for r in self.data.roi_size),
                "model.name densenet121 with model.norm instance needs images of at least 64 per axis "
                f"(data.roi_size; got {list(self.data.roi_size)}): its last norm layer would see a single "
                "pixel. Use model.norm batch or group, or larger images",
            )
        if self.fed.algorithm == "fedbn":
            _check(
                self.model.norm != "instance",
                "fed.algorithm fedbn keeps normalization layers at each site, but model.norm instance "
                "has no learned or tracked statistics in MONAI's networks: set model.norm: batch (or group)",
            )
        self._check_privacy()

    def _check_privacy(self) -> None:
        pv, fed = self.privacy, self.fed
        if pv.update_filter != "none":
            _check(
                fed.exchange == "diff",
                f"privacy.update_filter {pv.update_filter} acts on model differences (clipping or sparsifying "
                f"full weights would destroy the model): set fed.exchange: diff (got {fed.exchange!r})",
            )
        if pv.dp_sgd.enabled:
            _check(
                self.model.norm != "batch",
                "privacy.dp_sgd needs per-sample gradients, which BatchNorm mixes across the batch: set "
                "model.norm: instance or group (got batch)",
            )
            _check(
                fed.algorithm in ("fedavg", "fedopt"),
                f"privacy.dp_sgd clips per-sample gradients of the task loss; fed.algorithm {fed.algorithm} adds "
                "terms outside that accounting: use fedavg or fedopt",
            )
            _check(
                self.data.samples_per_volume == 1,
                "privacy.dp_sgd protects each training sample: set data.samples_per_volume: 1 so a sample is "
                f"one case (got {self.data.samples_per_volume})",
            )
        if pv.encryption == "he":
            problems = []
            if fed.algorithm != "fedavg":
                problems.append(f"fed.algorithm: fedavg (got {fed.algorithm})")
            if fed.exchange != "weights":
                problems.append(f"fed.exchange: weights (got {fed.exchange})")
            if fed.update_precision != "fp32":
                problems.append(f"fed.update_precision: fp32 (got {fed.update_precision})")
            if (
                fed.robust.aggregation != "mean"
                or fed.robust.norm_outlier_factor
                or fed.robust.max_update_norm
                or fed.robust.min_cosine is not None
            ):
                problems.append("fed.robust at its defaults (mean, no screening)")
            if fed.cross_site_eval or fed.final_eval:
                problems.append("fed.cross_site_eval: false and fed.final_eval: false")
            if pv.update_filter != "none":
                problems.append(f"privacy.update_filter: none (got {pv.update_filter})")
            _check(
                not problems,
                "privacy.encryption he: the server only sums ciphertexts, so it cannot screen, weigh, rate or "
                "select models; set " + "; ".join(problems),
            )

    @property
    def key_metric(self) -> str:
        """The FLModel metric name that ranks global models (``val_dice`` / ``val_auc``)."""
        if self.fed.key_metric != "auto":
            return self.fed.key_metric
        return "val_dice" if self.task.is_segmentation else "val_auc"


_SITE_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")


def validate_site_name(name: Any, what: str = "site name") -> str:
    """Return ``name`` if it may name a site; raise otherwise.

    A site name becomes a folder (simulator workspace, POC kit, demo output)
    and an NVFlare client name, so it must be one safe path component:
    1 to 64 letters, digits, ``.``, ``_`` or ``-``, not starting with ``.``
    or ``-`` and without ``..``.

    Args:
        name: the name as given (CLI argument, site YAML, ``NAME=YAML``).
        what: where it came from, for the message (e.g. ``--site``).

    Raises:
        ConfigError: the name is not allowed (one line: what was expected, what arrived).
    """
    text = name if isinstance(name, str) else str(name)
    if not isinstance(name, str) or not _SITE_NAME_RE.fullmatch(text) or ".." in text:
        shown = repr(text) if len(text) <= 70 else repr(text[:67]) + "..."
        raise ConfigError(
            f"{what}: expected a site name of 1-64 letters, digits, '.', '_' or '-' that does not "
            f"start with '.' or '-' and has no '..' (it names folders and the NVFlare client), "
            f"got {shown}; rename the site, e.g. site-1"
        )
    return text


@dataclass(frozen=True)
class BurnedInReview:
    """A person's review: objects of this kind carry no burned-in text at this site, so they may be converted.

    Objects that may carry burned-in text ((0028,0301) absent on DX/US/SC...)
    are refused under de-identification. A site whose export holds such
    objects that a person has looked at (e.g. TCIA's binary tumour masks,
    stored as Secondary Capture) lists them here; every use is recorded in
    the manifest row and the summary as that person's decision.

    Attributes:
        series_description: regular expression on (0008,103E) Series Description (matched at the site only).
        sop_class_uid: (0008,0016) SOP Class UID. When both are given, both must match.
        reviewed_by: who looked at the pixels (required).
        date: when (required, e.g. 2026-12-01).
        note: what was checked.
    """

    reviewed_by: str
    date: str
    series_description: str | None = None
    sop_class_uid: str | None = None
    note: str = ""

    def __post_init__(self) -> None:
        where = "deid.burned_in_reviewed"
        _check(
            bool(self.reviewed_by.strip()) and bool(str(self.date).strip()),
            f"{where}: every entry needs reviewed_by and date (the person's decision is recorded), got "
            f"reviewed_by {self.reviewed_by!r}, date {self.date!r}",
        )
        _check(
            self.series_description is not None or self.sop_class_uid is not None,
            f"{where}: an entry needs series_description (a regular expression) or sop_class_uid, got neither",
        )
        if self.series_description is not None:
            _check_regex(self.series_description, f"{where}[].series_description")

    def matches(self, description: str, sop_class_uid: str) -> bool:
        """Whether a series is covered by this review."""
        if self.series_description is not None and not re.search(self.series_description, description):
            return False
        return self.sop_class_uid is None or self.sop_class_uid == sop_class_uid

    def record(self, index: int) -> str:
        """How a use of the review is written into the manifest (no header value is quoted)."""
        return f"burned-in text risk accepted by review {index} (reviewed by {self.reviewed_by}, {self.date})"


@dataclass(frozen=True)
class SiteDeidConfig:
    """A site's own de-identification decisions (see :class:`BurnedInReview`)."""

    burned_in_reviewed: list[BurnedInReview] = field(default_factory=list)


@dataclass(frozen=True)
class SiteResources:
    """This machine's resources, set by the site alone (the experiment's values otherwise).

    The experiment is federation-wide; memory and speed are not. A site with a
    small GPU lowers them here without changing the shared experiment.

    Attributes:
        cache_rate: share of the training data cached (on CUDA: in GPU memory); ``data.cache_rate``.
        num_workers: DataLoader worker processes on the CPU; ``data.num_workers``.
        amp: mixed precision on CUDA; ``train.amp``.
        sw_batch_size: sliding-window patches per forward pass in validation and predict;
            ``train.sw_batch_size``.
    """

    cache_rate: float | None = None
    num_workers: int | None = None
    amp: bool | None = None
    sw_batch_size: int | None = None

    def __post_init__(self) -> None:
        _check(
            self.cache_rate is None or 0.0 <= self.cache_rate <= 1.0,
            f"resources.cache_rate must be in [0, 1], got {self.cache_rate}",
        )
        _check(
            self.num_workers is None or self.num_workers >= 0,
            f"resources.num_workers must be >= 0, got {self.num_workers}",
        )
        _check(
            self.sw_batch_size is None or self.sw_batch_size >= 1,
            f"resources.sw_batch_size must be >= 1, got {self.sw_batch_size}",
        )


@dataclass(frozen=True)
class SiteConfig:
    """Site-local settings; stays at the site.

    Attributes:
        name: the site's name in the federation (e.g. ``site-1``).
        datalist: path to the ``datalist.json`` written by ``fedimg preprocess``;
            relative paths are resolved against the site config's folder.
        device: ``auto`` (CUDA if available, else CPU), ``cpu`` or ``cuda``.
        num_threads: CPU threads for PyTorch; 0 means let fedimg decide.
        local_logdir: where site-local TensorBoard logs (never sent) go.
        deid: the site's reviewed exceptions to de-identification refusals
            (``fedimg preprocess --site-config``).
        resources: this machine's cache, workers, AMP and sliding-window batch
            (:class:`SiteResources`), overriding the experiment's at this site only.
    """

    name: str
    datalist: str
    device: DeviceName = "auto"
    num_threads: int = 0
    local_logdir: str | None = None
    deid: SiteDeidConfig = field(default_factory=SiteDeidConfig)
    resources: SiteResources = field(default_factory=SiteResources)

    def __post_init__(self) -> None:
        validate_site_name(self.name, "name")
        _check(bool(self.datalist.strip()), "datalist must be the path of a datalist.json")
        _check(self.num_threads >= 0, f"num_threads must be >= 0, got {self.num_threads}")


def at_site(exp: ExperimentConfig, site: SiteConfig) -> ExperimentConfig:
    """The experiment as this site runs it: the site's own resource settings replace the experiment's.

    Only machine settings change (cache, workers, AMP, sliding-window batch); nothing that changes what is learned.
    """
    r = site.resources
    data = dataclasses.replace(
        exp.data,
        cache_rate=exp.data.cache_rate if r.cache_rate is None else r.cache_rate,
        num_workers=exp.data.num_workers if r.num_workers is None else r.num_workers,
    )
    train = dataclasses.replace(
        exp.train,
        amp=exp.train.amp if r.amp is None else r.amp,
        sw_batch_size=exp.train.sw_batch_size if r.sw_batch_size is None else r.sw_batch_size,
    )
    return dataclasses.replace(exp, data=data, train=train)


def load_site_config(path: str | Path, overrides: list[str] | None = None) -> SiteConfig:
    """Load a site config and resolve its relative paths against the file's folder."""
    cfg = load(SiteConfig, path, overrides)
    base = Path(path).resolve().parent
    datalist = Path(cfg.datalist)
    if not datalist.is_absolute():
        datalist = base / datalist
    logdir = cfg.local_logdir
    if logdir is not None and not Path(logdir).is_absolute():
        logdir = str(base / logdir)
    return dataclasses.replace(cfg, datalist=str(datalist), local_logdir=logdir)


__all__ = [
    "BurnedInReview",
    "SiteResources",
    "at_site",
    "ConfigError",
    "DataConfig",
    "DeidSpec",
    "ExperimentConfig",
    "FedConfig",
    "GeometrySpec",
    "IntensitySpec",
    "LabelSpec",
    "ModelConfig",
    "OptimConfig",
    "PreprocessSpec",
    "RobustConfig",
    "SeriesSelection",
    "ServerOptimConfig",
    "SiteConfig",
    "SplitSpec",
    "TaskConfig",
    "TrainConfig",
    "apply_overrides",
    "from_dict",
    "load",
    "load_site_config",
    "load_yaml",
    "save",
    "to_dict",
    "validate_site_name",
]
