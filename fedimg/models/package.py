"""Self-describing model packages: weights plus everything needed to use them on new studies.

A package is a folder::

    PKG/
      package.json   format, fedimg version, created, task and class names, the
                     network description, the experiment config, the
                     preprocessing spec, the metrics the model was chosen on,
                     where it came from, and the weights' SHA-256
      weights.pt     the state dict alone: tensors only, loadable with
                     ``torch.load(p, weights_only=True)`` (never unpickles code)

Every run writes its models as packages: a federated run in the simulator
(``<run>/packages/{best,final}``), ``fedimg train-local``
(``OUT/packages/{best,final}``) and the baselines of ``fedimg compare``
(``.../<baseline>/package``). ``fedimg model info PKG`` prints one;
``fedimg predict PKG SRC DST`` applies it.

A package is self-contained: its spec is the one the training data was
preprocessed with (``spec.yaml`` beside each site's ``datalist.json``), so
``predict`` prepares a new study exactly like the training cases. A run
whose sites were preprocessed with different specs, or without a spec
(array data sets), writes a package without one, which says why; ``predict``
refuses it.

Loading validates everything before the weights are used: the format, the
configs (strictly, like config files), the weights' checksum, their keys and
shapes against the network the experiment builds, and that every floating
value is finite. Errors name the package file and what to do.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import logging
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedimg import config as cfgmod
from fedimg.config import ConfigError, ExperimentConfig, PreprocessSpec
from fedimg.errors import UserError

logger = logging.getLogger(__name__)

FORMAT = "fedimg-model-package"
FORMAT_VERSION = 1
META_FILE = "package.json"
WEIGHTS_FILE = "weights.pt"
SPEC_FILE = "spec.yaml"  # written by ``fedimg preprocess`` beside each datalist.json


class PackageError(UserError, ValueError):
    """A model package is missing, malformed, or does not fit its own configs."""


def fedimg_version() -> str:
    """The installed fedimg version (the package metadata, else the module's)."""
    try:
        from importlib.metadata import version

        return version("fedimg")
    except Exception:  # noqa: BLE001 - not installed as a distribution (a source checkout on PYTHONPATH)
        from fedimg import __version__

        return __version__


@dataclass
class ModelPackage:
    """A loaded, validated package.

    Attributes:
        path: the package folder.
        meta: ``package.json`` as read.
        experiment: the experiment config the model was trained with.
        spec: the preprocessing spec of its training data (None: see ``meta["spec_note"]``).
        state_dict: the weights (CPU tensors), checked against the network.
    """

    path: Path
    meta: dict[str, Any]
    experiment: ExperimentConfig
    spec: PreprocessSpec | None
    state_dict: dict[str, torch.Tensor]

    @property
    def class_names(self) -> list[str]:
        """Class names in label order (segmentation: foreground classes; background 0 is implicit)."""
        return list(self.experiment.task.class_names)

    @property
    def task(self) -> str:
        """``segmentation`` or ``classification``."""
        return self.experiment.task.type

    @property
    def chosen_on(self) -> dict[str, Any]:
        """The metrics the model was chosen on (``metric``, ``value``, ``cases``, ``metrics``, ``on``)."""
        return dict(self.meta.get("chosen_on") or {})

    def build_model(self) -> torch.nn.Module:
        """The network with the package's weights loaded (CPU, eval mode)."""
        from fedimg.models.registry import build_model

        model = build_model(self.experiment.model, self.experiment.task)
        model.load_state_dict(self.state_dict, strict=True)
        return model.eval()

    def require_spec(self) -> PreprocessSpec:
        """The spec, or a PackageError saying why the package has none and what to do."""
        if self.spec is None:
            note = self.meta.get("spec_note") or "it records no preprocessing spec"
            raise PackageError(
                f"model package {self.path} cannot prepare new studies: {note}; expected a package "
                "from a run whose sites were all preprocessed with one spec (spec.yaml beside each "
                "datalist.json)"
            )
        return self.spec


def _atomic_bytes(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".fedimg-tmp-{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _finite(value: Any) -> Any:
    """JSON-safe numbers: NaN and infinities become None (JSON has no such numbers)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_package(
    path: str | Path,
    state_dict: Mapping[str, torch.Tensor],
    exp: ExperimentConfig,
    spec: PreprocessSpec | None,
    metrics: Mapping[str, Any] | None,
    meta: Mapping[str, Any] | None = None,
    spec_note: str | None = None,
) -> Path:
    """Write a model package folder (``package.json`` and ``weights.pt``), each file atomically.

    Args:
        path: the package folder (created; an earlier package there is replaced).
        state_dict: the weights (moved to CPU; only tensors are stored).
        exp: the experiment config.
        spec: the preprocessing spec of the training data, or None (then give ``spec_note``).
        metrics: what the model was chosen on: ``{"metric", "value", "cases", "metrics", "on"}``
            (numbers and names only, no paths).
        meta: where it came from, e.g. ``{"run": "federated", "model": "best", "round": 7}``.
        spec_note: why there is no spec (shown by ``model info`` and ``predict``).

    Returns:
        The package folder.

    Raises:
        PackageError: the weights do not fit the experiment's network, hold a non-finite
            value, or the spec's classes differ from the experiment's.
    """
    from fedimg.models.registry import model_spec

    folder = Path(path)
    state = {str(k): v.detach().cpu().contiguous() for k, v in state_dict.items()}
    _check_weights(state, exp, f"weights for {folder}")
    if spec is not None:
        _check_spec(spec, exp, f"spec for {folder}")
    weights = folder / WEIGHTS_FILE
    buf = io.BytesIO()
    torch.save(state, buf)  # to memory: the archive's inner name is fixed, so equal weights give equal bytes
    _atomic_bytes(weights, lambda tmp: Path(tmp).write_bytes(buf.getvalue()))
    doc = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "fedimg_version": fedimg_version(),
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "task": {
            "type": exp.task.type,
            "spatial_dims": exp.task.spatial_dims,
            "class_names": list(exp.task.class_names),
        },
        "network": model_spec(exp.model, exp.task),
        "experiment": cfgmod.to_dict(exp),
        "spec": cfgmod.to_dict(spec) if spec is not None else None,
        "chosen_on": _finite(dict(metrics or {})),
        "origin": _finite(dict(meta or {})),
        "weights": {
            "file": WEIGHTS_FILE,
            "sha256": _sha256(weights),
            "tensors": len(state),
            "parameters": int(sum(v.numel() for v in state.values() if v.is_floating_point())),
        },
    }
    if spec is None:
        doc["spec_note"] = spec_note or "the run recorded no preprocessing spec"
    text = json.dumps(doc, indent=1, allow_nan=False) + "\n"
    _atomic_bytes(folder / META_FILE, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return folder


def _check_spec(spec: PreprocessSpec, exp: ExperimentConfig, where: str) -> None:
    if spec.task != exp.task.type or spec.spatial_dims != exp.task.spatial_dims:
        raise PackageError(
            f"{where}: the spec is a {spec.spatial_dims}D {spec.task} spec, the experiment a "
            f"{exp.task.spatial_dims}D {exp.task.type} task; expected the spec the training data "
            "was preprocessed with"
        )
    if list(spec.labels.classes) != list(exp.task.class_names):
        raise PackageError(
            f"{where}: spec classes {list(spec.labels.classes)} differ from the experiment's "
            f"task.class_names {list(exp.task.class_names)}; expected the same classes in order"
        )


def _check_weights(state: Mapping[str, Any], exp: ExperimentConfig, where: str) -> None:
    """Keys, shapes and finiteness of ``state`` against the network ``exp`` builds."""
    from fedimg.models.registry import build_model

    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise PackageError(f"{where}: expected a mapping of parameter names to tensors")
    expected = build_model(exp.model, exp.task).state_dict()
    missing = sorted(set(expected) - set(state))
    unknown = sorted(set(state) - set(expected))
    if missing or unknown:
        raise PackageError(
            f"{where}: the weights do not fit the {exp.model.name} the experiment builds: "
            f"{len(missing)} missing (e.g. {missing[:2]}), {len(unknown)} unexpected "
            f"(e.g. {unknown[:2]}); expected the weights of a run of this experiment"
        )
    for key, ref in expected.items():
        t = state[key]
        if tuple(t.shape) != tuple(ref.shape):
            raise PackageError(
                f"{where}: weight {key} has shape {list(t.shape)}, the network expects {list(ref.shape)}"
            )
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise PackageError(
                f"{where}: weight {key} holds NaN or infinite values; the model diverged or the "
                "file is damaged: use another checkpoint"
            )


def load_package(path: str | Path) -> ModelPackage:
    """Read and validate a package folder (or its ``package.json``).

    Raises:
        PackageError: missing files, another format or a newer format version,
            configs that do not validate, a checksum mismatch (damaged or
            altered weights), weights that do not fit the network or are not
            finite. The message names the file and what to do.
    """
    p = Path(path)
    folder = p.parent if p.name == META_FILE else p
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        found = "a file" if folder.is_file() else ("a folder without it" if folder.is_dir() else "nothing")
        raise PackageError(
            f"model package {folder}: expected a folder holding {META_FILE} and {WEIGHTS_FILE} "
            f"(written by a fedimg run under packages/), found {found}"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PackageError(
            f"{meta_path}: not readable JSON ({type(exc).__name__}); the package is damaged: copy it again from the run"
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise PackageError(
            f"{meta_path}: expected format {FORMAT!r}, found "
            f"{meta.get('format') if isinstance(meta, dict) else type(meta).__name__!r}"
        )
    version = meta.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise PackageError(
            f"{meta_path}: format_version {version!r}; this fedimg ({fedimg_version()}) reads "
            f"versions 1..{FORMAT_VERSION}: use the fedimg release that wrote it "
            f"({meta.get('fedimg_version')}) or newer"
        )
    try:
        exp = cfgmod.from_dict(ExperimentConfig, meta.get("experiment"))
        spec = cfgmod.from_dict(PreprocessSpec, meta["spec"]) if meta.get("spec") is not None else None
    except (ConfigError, TypeError) as exc:
        raise PackageError(
            f"{meta_path}: its configs do not validate ({exc}); the package is damaged or from "
            "an incompatible fedimg release"
        ) from None
    if list(exp.task.class_names) != list((meta.get("task") or {}).get("class_names") or []):
        raise PackageError(
            f"{meta_path}: task.class_names and the experiment's classes differ; the package is "
            "damaged or was edited: copy it again from the run"
        )
    if spec is not None:
        _check_spec(spec, exp, str(meta_path))
    winfo = meta.get("weights") or {}
    weights = folder / str(winfo.get("file") or WEIGHTS_FILE)
    if weights.name != WEIGHTS_FILE or not weights.is_file():
        raise PackageError(f"model package {folder}: expected its weights in {WEIGHTS_FILE}, found none")
    digest = _sha256(weights)
    if digest != winfo.get("sha256"):
        raise PackageError(
            f"{weights}: SHA-256 differs from the one in {META_FILE}; the weights are damaged or "
            "were replaced: copy the package again from the run"
        )
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types on damaged or non-tensor files
        raise PackageError(
            f"{weights}: not a tensor-only state dict ({type(exc).__name__}); fedimg loads "
            "weights with weights_only=True and never unpickles code"
        ) from None
    _check_weights(state, exp, str(weights))
    return ModelPackage(path=folder, meta=meta, experiment=exp, spec=spec, state_dict=dict(state))


# --------------------------------------------------------------------------
# The spec of a run's training data
# --------------------------------------------------------------------------


def spec_of_datalists(datalists: Mapping[str, str | Path]) -> tuple[PreprocessSpec | None, str | None]:
    """The one preprocessing spec the sites' training data was made with.

    ``fedimg preprocess`` writes ``spec.yaml`` beside each ``datalist.json``.

    Args:
        datalists: site -> its ``datalist.json``.

    Returns:
        ``(spec, None)``, or ``(None, why)`` when a site has no ``spec.yaml``
        (array data sets) or the sites' specs differ (named by site, never by path).
    """
    specs: dict[str, PreprocessSpec] = {}
    for site, dl in datalists.items():
        f = Path(dl).parent / SPEC_FILE
        if not f.is_file():
            return None, (
                f"site {site}'s training data has no {SPEC_FILE} beside its datalist (not made by fedimg preprocess)"
            )
        try:
            specs[site] = cfgmod.load(PreprocessSpec, f)
        except ConfigError as exc:
            return None, f"site {site}'s {SPEC_FILE} does not validate ({exc})"
    if not specs:
        return None, (
            "no site's data is on this machine (a production run): give fedimg fl run --spec SPEC_YAML, the spec "
            "the sites preprocessed with"
        )
    first_site, first = next(iter(specs.items()))
    differ = [s for s, sp in specs.items() if cfgmod.to_dict(sp) != cfgmod.to_dict(first)]
    if differ:
        return None, (
            f"sites were preprocessed with different specs ({', '.join(differ)} differ from "
            f"{first_site}): no single spec prepares new studies like all training cases"
        )
    return first, None


def package_run_model(
    path: str | Path,
    state_dict: Mapping[str, torch.Tensor],
    exp: ExperimentConfig,
    datalists: Mapping[str, str | Path],
    metrics: Mapping[str, Any] | None,
    meta: Mapping[str, Any],
    spec: PreprocessSpec | None = None,
) -> Path | None:
    """Write one model of a run as a package, with the sites' spec; log instead of failing the run.

    A finished run's models are worth keeping even when one cannot be
    packaged (e.g. a diverged model with NaN weights): the reason is logged
    as a warning and None is returned.

    Args:
        spec: the spec, when the caller knows it (a production lead's ``--spec``); else it is read
            beside the sites' datalists.
    """
    why: str | None = None
    if spec is None:
        spec, why = spec_of_datalists(datalists)
    if spec is None:
        logger.warning(
            "model package %s has no preprocessing spec: %s; `fedimg predict` will refuse it", Path(path).name, why
        )
    try:
        return write_package(path, state_dict, exp, spec, metrics, meta, spec_note=why)
    except PackageError as exc:
        logger.warning("no model package written: %s", exc)
        return None


# --------------------------------------------------------------------------
# fedimg model info
# --------------------------------------------------------------------------


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def describe(pkg: ModelPackage) -> str:
    """A human-readable account of a package (``fedimg model info``)."""
    m, exp = pkg.meta, pkg.experiment
    net = m.get("network") or {}
    w = m.get("weights") or {}
    lines = [
        f"model package: {pkg.path}",
        f"  experiment:   {exp.name}",
        f"  task:         {exp.task.type} ({exp.task.spatial_dims}D)",
        "  classes:      "
        + (
            ", ".join(["background (0)"] + [f"{c} ({i + 1})" for i, c in enumerate(pkg.class_names)])
            if exp.task.is_segmentation
            else ", ".join(f"{c} ({i})" for i, c in enumerate(pkg.class_names))
        ),
        f"  network:      {net.get('class_path', exp.model.name)} ({w.get('parameters', '?')} parameters, "
        f"{w.get('tensors', '?')} tensors)",
    ]
    if exp.task.is_segmentation:
        lines.append(
            f"  inference:    sliding window {list(exp.data.roi_size)}, sw_batch_size "
            f"{exp.train.sw_batch_size}, small components < {exp.task.min_component_voxels} voxels removed"
        )
    else:
        lines.append(f"  inference:    images resized to {list(exp.data.roi_size)}")
    sp = pkg.spec
    if sp is None:
        lines.append(f"  spec:         none ({m.get('spec_note', 'not recorded')}); predict refuses this package")
    else:
        geo = (
            f"{sp.orientation}, {list(sp.target_spacing or ())} mm"
            if sp.spatial_dims == 3
            else f"{list(sp.target_size or ())} px"
        )
        if sp.spatial_dims == 2:
            inten = f"percentiles {list(sp.intensity.percentiles_2d)} -> [0, 1]"
        elif sp.modality == "CT":
            inten = f"CT window {list(sp.intensity.ct_window)} HU -> [0, 1]"
        elif sp.intensity.mode == "mr_zscore":
            inten = f"MR percentiles {list(sp.intensity.mr_percentiles)} of non-zero voxels, z-score of them"
        else:
            inten = f"MR percentiles {list(sp.intensity.mr_percentiles)}, z-score"
        sel = f"modality {', '.join(sp.series.modalities)}"
        if sp.series.image_description_regex:
            sel += f", description ~ {sp.series.image_description_regex!r}"
        lines.append(f"  spec:         {sp.name} ({sp.modality}, {sp.spatial_dims}D): {geo}; {inten}; {sel}")
    chosen = pkg.chosen_on
    if chosen:
        value = chosen.get("value")
        lines.append(
            f"  chosen on:    {chosen.get('metric', '?')} = {_fmt(value)} over {chosen.get('cases', '?')} "
            f"validation case(s)" + (f" ({chosen['on']})" if chosen.get("on") else "")
        )
        for k, v in sorted((chosen.get("metrics") or {}).items()):
            if isinstance(v, (int, float)) and not k.startswith("hd95_undefined"):
                lines.append(f"    {k:<28} {_fmt(v)}")
    else:
        lines.append("  chosen on:    no validation metrics recorded")
    origin = m.get("origin") or {}
    if origin:
        lines.append("  origin:       " + ", ".join(f"{k} {v}" for k, v in origin.items()))
    lines += [
        f"  fedimg:       {m.get('fedimg_version')} (package format {m.get('format_version')})",
        f"  created:      {m.get('created')}",
        f"  weights:      {w.get('file')} sha256 {str(w.get('sha256'))[:16]}...",
    ]
    return "\n".join(lines)


__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "META_FILE",
    "WEIGHTS_FILE",
    "ModelPackage",
    "PackageError",
    "describe",
    "fedimg_version",
    "load_package",
    "package_run_model",
    "spec_of_datalists",
    "write_package",
]
