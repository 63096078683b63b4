"""fedimg's raw conversion against external oracles, on real public data.

Oracles (see ../shared/data/SOURCES.md):

- dcm2niix, run live on every dataset of ``dicom/dcm_qa`` and every series of
  ``dicom/dicom2nifti/{anatomical,generic,hyperfine}``;
- dicom2nifti's ground-truth NIfTIs stored beside its series;
- the TotalSegmentator segmentation ``example_seg_dicom.nii.gz``, made on the
  grid of its CT series.

A match means: after reorienting both images to the closest canonical (RAS)
orientation, same shape, affines within 1e-3 mm and equal voxel values.

Series are matched to dcm2niix outputs by (0020,000E) Series Instance UID and
(0020,0011) Series Number, which dcm2niix writes into the file name
(``-f %s_%j``). dcm2niix writes a 4D file for a Siemens mosaic time series;
fedimg writes one 3D volume per mosaic file (each file is one complete
volume), compared with the matching time point. When dcm2niix corrects a
series (an extra ``_Tilt_`` / ``_Eq_`` file), its raw file is not a valid
uniform grid: fedimg must refuse that series with the matching reason, since
it does not resample.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fedimg.dicom.index import SeriesGroup, group_series
from fedimg.dicom.pixels import check_codec
from fedimg.dicom.reasons import Reason, RefusedError
from fedimg.dicom.volume import Volume, load_volume, series_geometry
from fedimg.preprocess.scan import index_source

DATA = Path(__file__).parents[2].parent / "shared" / "data"
DICOM = DATA / "dicom"
AFFINE_TOL_MM = 1e-3

pytestmark = pytest.mark.slow


def _dcm2niix() -> str | None:
    local = Path(sys.executable).parent / "dcm2niix"
    return str(local) if local.is_file() else shutil.which("dcm2niix")


def _require(rel: str) -> Path:
    p = DICOM / rel
    if not p.exists():
        pytest.skip(f"real test data not available: {p} is absent (expected ../shared/data beside the repo)")
    return p


def _require_dcm2niix() -> str:
    exe = _dcm2niix()
    if exe is None:
        pytest.skip("dcm2niix not installed (pip install dcm2niix): the live oracle cannot run")
    return exe


# --------------------------------------------------------------------------- fedimg side


@dataclass
class Outcome:
    """What fedimg did with one series group."""

    group: SeriesGroup
    volume: Volume | None = None
    reason: Reason | None = None
    detail: str = ""

    @property
    def series(self) -> tuple[str, int | None]:
        return self.group.series_uid, self.group.first.series_number

    @property
    def folder(self) -> str:
        return self.group.first.folder


def fedimg_convert(src: Path) -> list[Outcome]:
    """Index, group and convert every image series under ``src`` (as ``fedimg convert`` does)."""
    scanned = index_source(src, progress=False)
    out = []
    for g in group_series(scanned.image_headers):
        try:
            geo = series_geometry(g)
            out.append(Outcome(g, volume=load_volume(g, geo)))
        except RefusedError as exc:
            out.append(Outcome(g, reason=exc.reason, detail=exc.detail))
    return out


# --------------------------------------------------------------------------- dcm2niix side

_NAME = re.compile(r"^(?P<sn>\d+)_(?P<uid>[0-9.]*)(?P<suffix>.*)\.nii$")


@dataclass
class OracleFile:
    """One dcm2niix output."""

    path: Path
    series: tuple[str, int]
    suffix: str

    @property
    def corrected(self) -> bool:
        """dcm2niix's resampled copy of a tilted or unevenly spaced series."""
        return "_Tilt" in self.suffix or "_Eq" in self.suffix


def run_dcm2niix(src: Path, out: Path, *extra: str) -> list[OracleFile]:
    exe = _require_dcm2niix()
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [exe, "-b", "n", "-z", "n", *extra, "-f", "%s_%j", "-o", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode not in (0, 2):  # 2: no DICOM found in a sub-folder
        raise RuntimeError(f"dcm2niix failed ({proc.returncode}): {proc.stderr[-500:]}")
    files = []
    for p in sorted(out.glob("*.nii")):
        m = _NAME.match(p.name)
        if m is None:
            raise RuntimeError(f"unexpected dcm2niix output name {p.name}")
        files.append(OracleFile(p, (m["uid"], int(m["sn"])), m["suffix"]))
    return files


# --------------------------------------------------------------------------- comparison


def canonical(data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    return nib.as_closest_canonical(nib.Nifti1Image(np.asarray(data), affine))


def assert_same_image(ours: Volume, data: np.ndarray, affine: np.ndarray, what: str) -> None:
    a = canonical(ours.data, ours.affine)
    b = canonical(data, affine)
    assert a.shape == b.shape, f"{what}: shape {a.shape} vs oracle {b.shape}"
    dev = float(np.abs(a.affine - b.affine).max())
    assert dev <= AFFINE_TOL_MM, f"{what}: affine differs by {dev:.4g} mm\n{a.affine}\nvs oracle\n{b.affine}"
    va = np.asarray(a.dataobj, dtype=np.float64)
    vb = np.asarray(b.dataobj, dtype=np.float64)
    # Both sides compute stored * slope + intercept; NIfTI keeps slope/intercept as
    # float32, so allow float32 rounding of the product, nothing more.
    scale = max(1.0, float(np.abs(vb).max()))
    bad = np.abs(va - vb) > 1e-6 * scale
    assert not bad.any(), f"{what}: {int(bad.sum())} voxel(s) differ (max {float(np.abs(va - vb).max()):.4g})"


def oracle_arrays(f: OracleFile) -> list[tuple[np.ndarray, np.ndarray]]:
    """(data, affine) per 3D volume of a dcm2niix output (4D files give several)."""
    img = nib.load(str(f.path))
    data = img.get_fdata(dtype=np.float64)
    if data.ndim == 3:
        return [(data, img.affine)]
    return [(data[..., t], img.affine) for t in range(data.shape[3])]


# Series fedimg refuses although dcm2niix writes a file, and why (per dataset, Series Number).
EXPECTED_REFUSALS: dict[tuple[str, int], tuple[Reason, str]] = {
    ("dicom2nifti/generic/rgb/001", 747197466): (
        Reason.UNSUPPORTED_PIXELS,
        "RGB secondary capture ((0028,0002) Samples per Pixel 3); fedimg converts greyscale volumes only",
    ),
}
# Reasons that must stand for a series dcm2niix had to correct (_Tilt_ / _Eq_ output).
CORRECTION_REASONS = {Reason.GANTRY_TILT, Reason.NONUNIFORM_SPACING, Reason.SLICE_GAP}


@dataclass
class Report:
    matched: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)


def compare_with_dcm2niix(name: str, src: Path, tmp: Path, *extra: str) -> Report:
    """Every dcm2niix output of ``src`` has its fedimg counterpart, and vice versa."""
    oracle = run_dcm2niix(src, tmp / "dcm2niix", *extra)
    ours = fedimg_convert(src)
    report = Report()
    assert oracle, f"{name}: dcm2niix wrote nothing"
    by_series: dict[tuple[str, int | None], list[Outcome]] = {}
    for o in ours:
        by_series.setdefault(o.series, []).append(o)
    corrected = {f.series for f in oracle if f.corrected}
    used: set[int] = set()
    for f in oracle:
        if f.corrected:
            continue
        # totalsegmentator's series has no UID/number in dcm2niix's name: match it alone.
        cands = by_series.get(f.series) or (list(ours) if len(ours) == 1 and not f.series[0] else [])
        assert cands, f"{name}: no fedimg series for dcm2niix output {f.series}"
        for o in cands:
            used.add(id(o))
        if f.series in corrected:
            for o in cands:
                assert o.reason in CORRECTION_REASONS, (
                    f"{name} {f.series}: dcm2niix corrected this series; fedimg must refuse it "
                    f"(got {o.reason}: {o.detail})"
                )
                report.refused.append(
                    f"{name} #{f.series[1]}: {o.reason.value} (dcm2niix wrote {f.suffix or 'raw'} + corrected)"
                )
            continue
        converted = [o for o in cands if o.volume is not None]
        refused = [o for o in cands if o.volume is None]
        for o in refused:
            key = (name, f.series[1])
            if o.reason == Reason.CODEC_MISSING:
                # Only acceptable when the codec really is absent here.
                with pytest.raises(RefusedError):
                    check_codec(o.group.first.transfer_syntax)
                report.refused.append(f"{name} #{f.series[1]}: CODEC_MISSING ({o.group.first.transfer_syntax})")
                continue
            assert key in EXPECTED_REFUSALS, f"{name} {f.series}: fedimg refused {o.reason}: {o.detail}"
            assert o.reason == EXPECTED_REFUSALS[key][0], f"{name}: {o.reason} vs expected {EXPECTED_REFUSALS[key]}"
            report.refused.append(f"{name} #{f.series[1]}: {o.reason.value} (expected: {EXPECTED_REFUSALS[key][1]})")
        if not converted:
            continue
        vols = oracle_arrays(f)
        # A 4D oracle (mosaic time series) holds one time point per fedimg volume, in acquisition order.
        converted.sort(
            key=lambda o: (o.group.first.acquisition_number or 0, o.group.first.instance_number or 0, o.group.first.rel)
        )
        if refused:
            continue  # a time point fedimg could not decode: the remaining ones cannot be aligned safely
        assert len(vols) == len(converted), (
            f"{name} {f.series}: dcm2niix holds {len(vols)} volume(s), fedimg converted {len(converted)}"
        )
        for t, (o, (data, affine)) in enumerate(zip(converted, vols)):
            assert_same_image(o.volume, data, affine, f"{name} #{f.series[1]} t={t}")  # type: ignore[arg-type]
            report.matched.append(f"{name} #{f.series[1]} t={t}")
    stray = [o for o in ours if o.volume is not None and id(o) not in used]
    assert not stray, f"{name}: fedimg converted {len(stray)} series dcm2niix did not write"
    return report


# --------------------------------------------------------------------------- tests

DCM_QA = ["dcm_qa", "dcm_qa_ts", "dcm_qa_12bit", "dcm_qa_decubitus", "dcm_qa_deident", "dcm_qa_ct"]
# dcm2niix flags from SOURCES.md that change which series it writes (-i y: ignore derived/localizers).
DCM_QA_FLAGS = {"dcm_qa_ct": ("-i", "y")}


@pytest.mark.parametrize("dataset", DCM_QA)
def test_dcm_qa_matches_dcm2niix(dataset: str, tmp_path: Path) -> None:
    src = _require(f"dcm_qa/{dataset}/In")
    report = compare_with_dcm2niix(dataset, src, tmp_path, *DCM_QA_FLAGS.get(dataset, ()))
    print("\n".join(["matched: " + m for m in report.matched] + ["refused: " + r for r in report.refused]))
    assert report.matched or report.refused


def _dicom2nifti_series() -> list[str]:
    root = DICOM / "dicom2nifti"
    if not root.is_dir():
        return ["<absent>"]
    out = []
    for part in ("anatomical", "generic", "hyperfine"):
        for p in sorted((root / part).rglob("*")):
            if p.is_dir() and any(c.is_file() and not c.name.endswith(".nii.gz") for c in p.iterdir()):
                out.append(p.relative_to(root).as_posix())
    return out


@pytest.mark.parametrize("series", _dicom2nifti_series())
def test_dicom2nifti_matches_dcm2niix_and_ground_truth(series: str, tmp_path: Path) -> None:
    src = _require(f"dicom2nifti/{series}")
    name = f"dicom2nifti/{series}"
    report = compare_with_dcm2niix(name, src, tmp_path)
    print("\n".join(["matched: " + m for m in report.matched] + ["refused: " + r for r in report.refused]))
    # Second oracle: dicom2nifti's own NIfTI beside the series folder.
    truth = src.parent / f"{src.name}_ground_truth.nii.gz"
    if truth.is_file():
        ours = [o for o in fedimg_convert(src) if o.volume is not None]
        if not ours:
            assert report.refused, f"{name}: nothing converted and nothing refused"
            return
        assert len(ours) == 1
        img = nib.load(str(truth))
        assert_same_image(
            ours[0].volume,
            img.get_fdata(dtype=np.float64),
            img.affine,  # type: ignore[arg-type]
            f"{name} vs dicom2nifti ground truth",
        )


# dicom2nifti's deliberately broken series: what fedimg must do with each (manifest reason).
FAILING = {
    "gantrytilting/001": ("refused", Reason.GANTRY_TILT, "slices advance 14 degrees off the normal; no resampling"),
    "notavolume/001": ("refused", Reason.DUPLICATE_POSITION, "four acquisitions at one single position"),
    "slicecount/001": ("refused", Reason.TOO_FEW_SLICES, "two slices only"),
    "sliceincrement/001": ("refused", Reason.SLICE_GAP, "one slice missing from a 5 mm stack"),
    "sliceincrement/002": ("refused", Reason.SLICE_GAP, "one slice missing from a 0.75 mm stack"),
    "sliceorientation/001": (
        "refused",
        Reason.TOO_FEW_SLICES,
        "two series (202, 501) share a Series Instance UID; two slices each",
    ),
}


def test_dicom2nifti_failing_series_are_refused(tmp_path: Path) -> None:
    from fedimg.preprocess.convert import convert

    src = _require("dicom2nifti/failing")
    convert(src, tmp_path / "out", workers=1, progress=False)
    rows = [r for r in _manifest(tmp_path / "out") if r["input"].endswith(".dcm")]
    folders = {r["input"].rsplit("/", 1)[0] for r in rows}
    assert folders == set(FAILING), f"failing/ holds {sorted(folders)}; update the table"
    for folder, (status, reason, why) in FAILING.items():
        got = {(r["status"], r["reason"]) for r in rows if r["input"].startswith(folder + "/")}
        assert got == {(status, reason.value)}, f"{folder} ({why}): got {got}"


def _manifest(dst: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (dst / "manifest.jsonl").read_text().splitlines() if line.strip()]


def test_totalsegmentator_ct_lands_on_the_segmentation_grid() -> None:
    src = _require("totalsegmentator/tests/reference_files/example_ct_dicom")
    seg = nib.load(str(src.parent / "example_seg_dicom.nii.gz"))
    ours = [o for o in fedimg_convert(src)]
    assert len(ours) == 1 and ours[0].volume is not None, [(o.reason, o.detail) for o in ours]
    a = canonical(ours[0].volume.data, ours[0].volume.affine)
    b = nib.as_closest_canonical(seg)
    assert a.shape == b.shape[:3]
    assert float(np.abs(a.affine - b.affine).max()) <= AFFINE_TOL_MM, f"\n{a.affine}\nvs\n{b.affine}"
    # HU after (0028,1052)/(0028,1053): air well below 0, a 32-label segmentation in range.
    assert float(a.get_fdata().min()) <= -1000 < float(a.get_fdata().max())
