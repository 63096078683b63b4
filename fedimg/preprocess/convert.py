"""``fedimg convert``: raw conversion, one NIfTI per series as acquired.

No resampling and no intensity change beyond the modality LUT: the audit
mode, and the one compared with other converters (dcm2niix). Every input file
gets one manifest row with ``input``, ``status``, ``reason`` and, when
converted, ``output`` and ``series_uid``.

Series convert in parallel (``workers`` processes), each worker holding one
series in memory at a time. A re-run reuses outputs whose input files are
unchanged (same names, sizes and modification times), so new studies are
converted alone and an interrupted run finishes what it had not written.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.std import tqdm  # not tqdm.auto: it imports asyncio and notebook support at every start-up

from fedimg.atomic import write_json, write_jsonl, write_nifti
from fedimg.config import GeometrySpec
from fedimg.dicom.geometry import SeriesGeometry
from fedimg.dicom.index import SeriesGroup, group_series
from fedimg.dicom.pixels import exactly_scalable
from fedimg.dicom.quiet import quiet_dicom, quiet_dicom_call
from fedimg.dicom.reasons import Reason, RefusedError
from fedimg.dicom.resample import RESAMPLABLE, load_regularized
from fedimg.dicom.volume import Volume, load_volume, series_geometry
from fedimg.preprocess.manifest import CONVERTED, REFUSED, ManifestRow, finalize, mark, render_table, summarize
from fedimg.preprocess.outdir import OutputDir, announce, claim, precheck
from fedimg.preprocess.scan import index_source
from fedimg.preprocess.workers import LazyPool, default_workers, lazy_worker_pool

STATE_FILE = ".fedimg_convert_state.json"
#: Sources with fewer entries are indexed in the main process: starting workers would cost more.
PARALLEL_INDEX_MIN = 64


@dataclass
class ConvertResult:
    """What a conversion run did."""

    src_files: int
    summary: dict[str, Any]
    outputs: list[str]
    reused: int
    manifest: str

    def table(self) -> str:
        """Human-readable account."""
        text = render_table(self.summary, "convert")
        if self.reused:
            text += f"\n  {self.reused} series unchanged since the last run (outputs reused)"
        return text + f"\n  manifest: {self.manifest}"


def series_output_name(group: SeriesGroup, compress: bool = True) -> str:
    """A file name per series group that does not spell out the UID."""
    key = json.dumps([group.study_uid, group.series_uid, list(map(str, group.key[2:]))])
    ext = ".nii.gz" if compress else ".nii"
    return f"series-{hashlib.sha256(key.encode()).hexdigest()[:16]}{ext}"


def fingerprint(group: SeriesGroup) -> str:
    """Identity of a series' input files: names, sizes, modification times."""
    h = hashlib.sha256()
    for hd in sorted(group.headers, key=lambda x: x.rel):
        st = hd.path.stat()
        h.update(os.fsencode(f"{hd.rel}|{st.st_size}|{st.st_mtime_ns}\n"))  # bytes on disk: any file name
    return h.hexdigest()


def _convert_one(args: tuple[SeriesGroup, SeriesGeometry, str]) -> tuple[str, str, str]:
    """Worker: decode and write one series. Returns (status, reason, detail)."""
    group, geo, out_path = args
    try:
        with quiet_dicom():
            vol = load_volume(group, geo)
    except RefusedError as exc:
        return REFUSED, exc.reason.value, exc.detail
    _announce(Path(out_path))
    write_volume(Path(out_path), vol)
    return CONVERTED, "", ""


def _announce(path: Path) -> None:
    # Journaled before the write: a run killed mid-write still has a record that the file is fedimg's.
    dst = path.parent.parent
    announce(dst, [path.relative_to(dst).as_posix()])


def write_volume(path: Path, vol: Volume) -> None:
    """Write a converted series as NIfTI: its stored integers plus scl_slope/scl_inter where that is exact.

    As dcm2niix does, a series with one modality LUT keeps its stored type
    (unsigned 16-bit values that all fit are written as int16, the type most
    tools expect) with the LUT as scl_slope / scl_inter, if every stored value
    scales exactly onto the float32 value the LUT gives
    (:func:`fedimg.dicom.pixels.exactly_scalable`): readers then see the same
    values as a float32 volume, at half the bytes for 16-bit data and without
    a float32 copy in memory. Other series are written as float32 modality values.
    """
    if vol.is_scaled and vol.stored.size:
        stored = vol.stored
        low, high = int(stored.min()), int(stored.max())
        if exactly_scalable(low, high, vol.slope, vol.intercept):
            if stored.dtype == np.uint16 and high <= np.iinfo(np.int16).max:
                stored = stored.view(np.int16)  # same bits for these values; no copy
            write_nifti(path, stored, vol.affine, scale=(vol.slope, vol.intercept))
            return
    write_nifti(path, vol.data, vol.affine)


def _run(
    tasks: list[tuple[SeriesGroup, SeriesGeometry, str]], workers: int, progress: bool, pool: LazyPool
) -> Iterator[tuple[str, str, str]]:
    if workers <= 1 or len(tasks) <= 1:
        for t in tqdm(tasks, desc="convert", unit="series", disable=not progress):
            yield _convert_one(t)
        return
    yield from tqdm(
        pool.get().map(_convert_one, tasks), total=len(tasks), desc="convert", unit="series", disable=not progress
    )


@quiet_dicom_call
def convert(
    src: str | Path,
    dst: str | Path,
    geometry: GeometrySpec | None = None,
    workers: int | None = None,
    progress: bool = True,
    compress: bool = True,
) -> ConvertResult:
    """Convert every series under ``src`` into ``dst/series/*.nii.gz`` (``*.nii`` without compression).

    ``dst`` must be new, empty, or an earlier ``convert`` output (see
    :mod:`fedimg.preprocess.outdir`); it must not overlap ``src``. A re-run
    removes only outputs fedimg recorded writing whose series are gone.

    Args:
        src: a DICOM folder tree (read only).
        dst: output folder (``series/``, ``manifest.jsonl``, ``summary.json``).
        geometry: geometry checks (defaults of :class:`GeometrySpec`).
        workers: processes converting series in parallel (default: CPU count).
        progress: show progress bars.
        compress: gzip the NIfTI files (half of conversion time goes to gzip;
            turn off for speed when disk is not a concern).
    """
    src, dst = Path(src), Path(dst)
    geometry = geometry or GeometrySpec()
    workers = default_workers() if workers is None else max(1, workers)
    precheck(dst, "convert", src=src)  # before the scan: a wrong DST is refused before any work
    # One set of worker processes reads the headers, then converts the series.
    with lazy_worker_pool(workers) as pool:

        def index_pool(n_entries: int) -> Executor | None:
            return pool.get() if workers > 1 and n_entries >= PARALLEL_INDEX_MIN else None

        scanned = index_source(src, label="convert", progress=progress, executor=index_pool)
        with claim(dst, "convert", src=src) as out:
            return _convert(scanned, out, geometry, workers, progress, compress, pool)


def _read_state(path: Path) -> dict[str, str]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in raw.items()} if isinstance(raw, dict) else {}


@dataclass
class _Plan:
    """What a run does with each series group.

    Attributes:
        tasks: the series to convert: group, geometry, output path.
        resample: the series refused for a resamplable reason, to regularize (``geometry.irregular: resample``).
        state: output name -> input fingerprint of every series converted or reused.
        reused: series whose output is unchanged since the last run.
    """

    tasks: list[tuple[SeriesGroup, SeriesGeometry, str]] = field(default_factory=list)
    resample: list[tuple[SeriesGroup, Reason]] = field(default_factory=list)
    state: dict[str, str] = field(default_factory=dict)
    reused: int = 0


def _convert(
    scanned: Any, out: OutputDir, geometry: GeometrySpec, workers: int, progress: bool, compress: bool, pool: LazyPool
) -> ConvertResult:
    dst = out.path
    rows = scanned.rows
    state_path = dst / STATE_FILE
    old_state = _read_state(state_path)
    groups = group_series(scanned.image_headers, geometry.orientation_tolerance)
    plan = _plan(groups, rows, dst, old_state, geometry, compress)
    new_state = plan.state

    (dst / "series").mkdir(parents=True, exist_ok=True)
    tasks = plan.tasks
    for (g, _, out_path), (status, reason, detail) in zip(tasks, _run(tasks, workers, progress, pool)):
        name = Path(out_path).relative_to(dst).as_posix()
        if status == CONVERTED:
            mark(rows, g.rels, CONVERTED, "", "", output=name, series_uid=g.series_uid)
        else:
            mark(rows, g.rels, REFUSED, reason, detail, series_uid=g.series_uid)
            new_state.pop(name, None)
    _write_resampled(plan.resample, rows, dst, compress, new_state)

    ordered = finalize(rows, scanned.files)
    valid = {r.output for r in ordered if r.status == CONVERTED and r.output}
    write_jsonl(dst / "manifest.jsonl", (r.to_json() for r in ordered))
    summary = summarize(ordered)
    write_json(dst / "summary.json", summary)
    write_json(state_path, {k: v for k, v in new_state.items() if k in valid})
    # Outputs of series that are gone or now refused are stale: removed so DST matches the manifest, but
    # only files fedimg's records (the previous state, the journal) say it wrote.
    out.prune(set(old_state) | out.journaled(), keep=valid)
    out.clear_journal()
    return ConvertResult(
        src_files=len(scanned.files),
        summary=summary,
        outputs=sorted(valid),
        reused=plan.reused,
        manifest=str(dst / "manifest.jsonl"),
    )


def _plan(
    groups: list[SeriesGroup],
    rows: dict[str, ManifestRow],
    dst: Path,
    old_state: dict[str, str],
    geometry: GeometrySpec,
    compress: bool,
) -> _Plan:
    """Check each group's geometry and decide: convert, reuse the last run's output, resample, or refuse.

    Refused and reused series are recorded in ``rows`` here; the others when they are written.

    Args:
        groups: the series groups of the source.
        rows: the manifest rows by file (updated in place).
        dst: the output folder.
        old_state: output name -> input fingerprint of the last run.
        geometry: the geometry checks.
        compress: outputs are gzipped NIfTI.

    Returns:
        The plan.
    """
    plan = _Plan()
    per_series = Counter(g.series_uid for g in groups)
    for g in groups:
        try:
            geo = series_geometry(
                g,
                min_slices=geometry.min_slices,
                spacing_tolerance=geometry.spacing_tolerance,
                orientation_tolerance=geometry.orientation_tolerance,
            )
        except RefusedError as exc:
            if geometry.irregular == "resample" and exc.reason in RESAMPLABLE:
                plan.resample.append((g, exc.reason))
                continue
            extra = (
                f" (series split into {per_series[g.series_uid]} groups by orientation/matrix/echo)"
                if per_series[g.series_uid] > 1
                else ""
            )
            mark(rows, g.rels, REFUSED, exc.reason, exc.detail + extra, series_uid=g.series_uid)
            continue
        name = f"series/{series_output_name(g, compress)}"
        fp = fingerprint(g)
        if old_state.get(name) == fp and (dst / name).is_file():
            mark(rows, g.rels, CONVERTED, "", "", output=name, series_uid=g.series_uid)
            plan.state[name] = fp
            plan.reused += 1
            continue
        plan.tasks.append((g, geo, str(dst / name)))
        plan.state[name] = fp
    return plan


def _write_resampled(
    resample: list[tuple[SeriesGroup, Reason]],
    rows: dict[str, ManifestRow],
    dst: Path,
    compress: bool,
    new_state: dict[str, str],
) -> None:
    """Regularize and write the irregular series (``geometry.irregular: resample``), each correction in the manifest.

    Args:
        resample: the series to regularize, with the reason their geometry was refused.
        rows: the manifest rows by file (updated in place).
        dst: the output folder.
        compress: outputs are gzipped NIfTI.
        new_state: output name -> input fingerprint; resampled outputs are left out of it.
    """
    for g, reason in resample:
        name = f"series/{series_output_name(g, compress)}"
        try:
            reg = load_regularized(g, reason)
        except RefusedError as exc:
            mark(rows, g.rels, REFUSED, exc.reason, exc.detail, series_uid=g.series_uid)
            continue
        _announce(dst / name)
        write_nifti(dst / name, reg.data, reg.affine_ras)
        mark(rows, g.rels, CONVERTED, "", "", output=name, series_uid=g.series_uid, correction=reg.correction)
        new_state.pop(name, None)  # always recomputed: cheap, and keeps the correction text current
