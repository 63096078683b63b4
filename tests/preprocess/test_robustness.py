"""Robustness: ``convert`` and ``preprocess`` on a deliberately malformed DICOM corpus.

The corpus is built in a temporary folder from three sources:

* ``site/``: a valid synthetic site (two axial CT studies with NIfTI labels),
  which must still convert next to everything else;
* ``pydicom/``: every file pydicom ships for its own tests (odd transfer
  syntaxes, files without meta or preamble, truncated files, DICOMDIRs, SR,
  RT objects, JSON/text files...);
* ``d2n_failing/``: dicom2nifti's deliberately broken series, when
  ``../shared/data`` is present;
* ``mutants/``: series and files derived from 8 consecutive slices of a
  synthetic CT series, one defect each (see ``MUTANTS``).

Contract checked on every run (DICOM.md): no unhandled exception, one manifest
row per input file, ``inputs == converted + refused + skipped`` against the files
on disk, raw inputs byte-identical afterwards, no temporary files left in DST,
and the specific reason code wherever the defect has one obvious answer.

Defects fedimg used to mishandle (``k_*`` builders, ``_CRASHERS``) are kept as
regression tests; ``_REGRESSIONS`` and the third item of each ``_CRASHERS``
entry record what went wrong before the fix.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import json
import shutil
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from fedimg import config as cfgmod
from fedimg.preprocess.convert import convert
from fedimg.preprocess.manifest import STATUSES, read_manifest

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
D2N_FAILING = SHARED_DATA / "dicom" / "dicom2nifti" / "failing"
CT_SPEC = REPO / "configs" / "preprocessing" / "ct_phantom.yaml"

CONVERTED, REFUSED, SKIPPED = "converted", "refused", "skipped"
N_BASE = 8  # slices per mutant series (consecutive, uniform 3 mm spacing)
DS_SENTINEL = b"9.87654"  # a DS value written first, then overwritten byte-for-byte with garbage
IS_SENTINEL = b"987654"

# Statuses/reasons a file may legitimately get when it cannot be read as an image.
UNREADABLE = {"NOT_DICOM", "TRUNCATED"}
HEADER_CUT = {"NOT_DICOM", "TRUNCATED", "NO_PIXELS"}


# --------------------------------------------------------------------------- helpers


def _hash_tree(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _disk_files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def _leftover_tmp(dst: Path) -> list[str]:
    return [p.relative_to(dst).as_posix() for p in dst.rglob("*") if ".tmp" in p.name]


@dataclass
class Expect:
    """What one corpus file must become: allowed statuses and reason codes."""

    statuses: set[str]
    reasons: set[str]


@dataclass
class Corpus:
    root: Path
    expect: dict[str, dict[str, Expect]] = field(default_factory=dict)  # mutant name -> rel -> Expect
    series: dict[str, list[str]] = field(default_factory=dict)  # mutant name -> its files
    hashes: dict[str, str] = field(default_factory=dict)
    has_d2n: bool = False


def _base_slices(synth_site: Path) -> list[Dataset]:
    """N_BASE consecutive slices (sorted by position) of one synthetic CT series."""
    series_dirs = sorted({p.parent for p in synth_site.rglob("*.dcm")})
    files = sorted(series_dirs[-1].glob("*.dcm"))
    dss = [pydicom.dcmread(f) for f in files]
    dss.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    mid = len(dss) // 2 - N_BASE // 2
    return dss[mid : mid + N_BASE]


def _fresh(dss: Iterable[Dataset]) -> list[Dataset]:
    """Deep copies with a new study and series (so each mutant is its own case)."""
    study, series = generate_uid(), generate_uid()
    out = []
    for ds in dss:
        ds = copy.deepcopy(ds)
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        out.append(ds)
    return out


def _save(ds: Dataset, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(path, enforce_file_format=False)


def _patch_bytes(path: Path, old: bytes, new: bytes) -> None:
    """Overwrite a sentinel value in place (same length, so offsets stay valid)."""
    assert len(old) == len(new)
    data = path.read_bytes()
    assert data.count(old) == 1, f"sentinel {old!r} not unique in {path.name}"
    path.write_bytes(data.replace(old, new))


# --------------------------------------------------------------------------- mutants
# Each builder writes files under ``d`` (relative names returned) from the base slices
# and returns {file name relative to d: Expect}.

Builder = Callable[[Path, list[Dataset]], dict[str, Expect]]


def _series(
    d: Path,
    base: list[Dataset],
    mutate: Callable[[Dataset], None] | None = None,
    which: Iterable[int] | None = None,
    names: Callable[[int], str] = lambda i: f"IM{i + 1:04d}.dcm",
    patch: tuple[bytes, bytes] | None = None,
) -> list[str]:
    which = set(range(len(base)) if which is None else which)
    rels = []
    for i, ds in enumerate(_fresh(base)):
        if mutate is not None and i in which:
            mutate(ds)
        name = names(i)
        _save(ds, d / name)
        if patch is not None and i in which:
            _patch_bytes(d / name, *patch)
        rels.append(name)
    return rels


def _all(rels: Iterable[str], status: str, *reasons: str) -> dict[str, Expect]:
    return {r: Expect({status}, set(reasons)) for r in rels}


def _ok(rels: Iterable[str]) -> dict[str, Expect]:
    return _all(rels, CONVERTED, "")


def m_control(d, base):
    return _ok(_series(d, base))


def m_names_with_spaces(d, base):
    sub = "a folder with spaces"
    return _ok(f"{sub}/{r}" for r in _series(d / sub, base, names=lambda i: f"slice {i + 1} of CT.dcm"))


def m_no_extension(d, base):
    return _ok(_series(d, base, names=lambda i: f"{i + 1:08d}"))


def m_no_instance_number(d, base):
    return _ok(_series(d, base, mutate=lambda ds: delattr(ds, "InstanceNumber")))


def m_scrambled_instance_number(d, base):
    # Instance numbers say the opposite order: slices must still be sorted by position.
    def names(i):
        return f"IM{N_BASE - i:04d}.dcm"

    counter = iter(range(N_BASE, 0, -1))
    return _ok(_series(d, base, mutate=lambda ds: setattr(ds, "InstanceNumber", next(counter)), names=names))


def m_garbage_instance_number(d, base):
    return _ok(
        _series(
            d,
            base,
            mutate=lambda ds: setattr(ds, "InstanceNumber", int(IS_SENTINEL)),
            patch=(IS_SENTINEL, b"x1    "),
        )
    )


def m_first_slice_removed(d, base):
    # Losing an end slice makes a shorter but valid volume: nothing to detect.
    return _ok(_series(d, base[1:]))


def m_slice_removed(d, base):
    return _all(_series(d, base[:3] + base[4:]), REFUSED, "SLICE_GAP")


def m_duplicated_slice(d, base):
    rels = _series(d, base)
    dup = _fresh([base[3]])[0]
    dup.SeriesInstanceUID = pydicom.dcmread(d / rels[0], stop_before_pixels=True).SeriesInstanceUID
    dup.StudyInstanceUID = pydicom.dcmread(d / rels[0], stop_before_pixels=True).StudyInstanceUID
    _save(dup, d / "IM0004_again.dcm")
    return _all(rels + ["IM0004_again.dcm"], REFUSED, "DUPLICATE_POSITION")


def m_byte_identical_copy(d, base):
    rels = _series(d, base)
    shutil.copyfile(d / rels[3], d / "IM0004 (copy).dcm")
    return _all(rels + ["IM0004 (copy).dcm"], REFUSED, "DUPLICATE_POSITION")


def m_no_position(d, base):
    return _all(
        _series(d, base, mutate=lambda ds: delattr(ds, "ImagePositionPatient")),
        REFUSED,
        "NO_GEOMETRY",
    )


def m_no_position_one_slice(d, base):
    return _all(
        _series(d, base, mutate=lambda ds: delattr(ds, "ImagePositionPatient"), which=[3]),
        REFUSED,
        "NO_GEOMETRY",
    )


def m_no_orientation(d, base):
    return _all(
        _series(d, base, mutate=lambda ds: delattr(ds, "ImageOrientationPatient")),
        REFUSED,
        "NO_GEOMETRY",
    )


def m_no_orientation_one_slice(d, base):
    # The slice without IOP forms its own group (NO_GEOMETRY); the rest has a hole (SLICE_GAP).
    rels = _series(d, base, mutate=lambda ds: delattr(ds, "ImageOrientationPatient"), which=[3])
    exp = _all(rels, REFUSED, "SLICE_GAP")
    exp[rels[3]] = Expect({REFUSED}, {"NO_GEOMETRY"})
    return exp


def m_no_spacing(d, base):
    return _all(_series(d, base, mutate=lambda ds: delattr(ds, "PixelSpacing")), REFUSED, "NO_GEOMETRY")


def m_no_spacing_one_slice(d, base):
    return _all(
        _series(d, base, mutate=lambda ds: delattr(ds, "PixelSpacing"), which=[3]),
        REFUSED,
        "NO_GEOMETRY",
    )


def m_garbage_position(d, base):
    return _all(
        _series(
            d,
            base,
            mutate=lambda ds: setattr(ds, "ImagePositionPatient", [DS_SENTINEL.decode(), 0, 0]),
            patch=(DS_SENTINEL, b"abcdefg"),
        ),
        REFUSED,
        "NO_GEOMETRY",
    )


def m_zero_orientation(d, base):
    return _all(
        _series(d, base, mutate=lambda ds: setattr(ds, "ImageOrientationPatient", [0] * 6)),
        REFUSED,
        "NO_GEOMETRY",
    )


def m_rows_too_big(d, base):
    # Header promises more rows than the pixel data holds.
    return _all(
        _series(d, base, mutate=lambda ds: setattr(ds, "Rows", ds.Rows + 75)),
        REFUSED,
        "PIXEL_DECODE_ERROR",
        "TRUNCATED",
    )


def m_rows_one_slice(d, base):
    # One slice claims another matrix size: it is split off (too few slices), the rest has a hole.
    rels = _series(d, base, mutate=lambda ds: setattr(ds, "Rows", ds.Rows + 75), which=[3])
    exp = _all(rels, REFUSED, "SLICE_GAP")
    exp[rels[3]] = Expect({REFUSED}, {"TOO_FEW_SLICES", "PIXEL_DECODE_ERROR", "TRUNCATED"})
    return exp


def m_bits_allocated_13(d, base):
    return _all(
        _series(d, base, mutate=lambda ds: setattr(ds, "BitsAllocated", 13)),
        REFUSED,
        "PIXEL_DECODE_ERROR",
    )


def m_bits_allocated_0(d, base):
    return _all(
        _series(d, base, mutate=lambda ds: setattr(ds, "BitsAllocated", 0)),
        REFUSED,
        "PIXEL_DECODE_ERROR",
    )


def m_bits_stored_40(d, base):
    return _all(
        _series(d, base, mutate=lambda ds: setattr(ds, "BitsStored", 40)),
        REFUSED,
        "PIXEL_DECODE_ERROR",
    )


def m_samples_per_pixel_3(d, base):
    return _all(
        _series(d, base, mutate=lambda ds: setattr(ds, "SamplesPerPixel", 3)),
        REFUSED,
        "UNSUPPORTED_PIXELS",
        "PIXEL_DECODE_ERROR",
    )


def m_unknown_transfer_syntax(d, base):
    def mutate(ds):
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"  # 19 chars, patched below

    ts = b"1.2.840.10008.1.2.1\x00"
    return _all(
        _series(d, base, mutate=mutate, patch=(ts, b"1.2.3.4.5.6.7.8.9.0\x00")),
        REFUSED,
        "CODEC_MISSING",
        "PIXEL_DECODE_ERROR",
        "NOT_DICOM",
    )


def _cut(d: Path, ds: Dataset, name: str, where: Callable[[bytes, int], int]) -> str:
    """Write ``ds`` (its own series) and truncate it at ``where(data, pixel_value_offset)``."""
    _save(ds, d / name)
    data = (d / name).read_bytes()
    pix = pydicom.dcmread(d / name, defer_size=1).get_item(0x7FE00010, keep_deferred=True).value_tell
    (d / name).write_bytes(data[: where(data, pix)])
    return name


def m_truncated(d, base):
    """One slice copy per cut point, each in its own series (file-level reasons)."""
    cuts = {
        "cut_in_preamble.dcm": (lambda b, p: 64, UNREADABLE),
        "cut_after_prefix.dcm": (lambda b, p: 131, UNREADABLE),
        "cut_in_dataset_header.dcm": (lambda b, p: (p + 600) // 2, HEADER_CUT),
        "cut_before_pixel_tag.dcm": (lambda b, p: p - 12, HEADER_CUT),
        "cut_in_pixel_length.dcm": (lambda b, p: p - 2, HEADER_CUT),
        "cut_at_pixel_start.dcm": (lambda b, p: p, {"TRUNCATED"}),
        "cut_in_pixels.dcm": (lambda b, p: p + (len(b) - p) // 2, {"TRUNCATED"}),
        "cut_last_byte.dcm": (lambda b, p: len(b) - 1, {"TRUNCATED"}),
    }
    exp = {}
    for name, (where, reasons) in cuts.items():
        _cut(d, _fresh([base[0]])[0], name, where)
        exp[name] = Expect({REFUSED}, reasons)
    return exp


def m_truncated_slice_in_series(d, base):
    rels = _series(d, base)
    data = (d / rels[3]).read_bytes()
    (d / rels[3]).write_bytes(data[: len(data) - 1000])
    exp = _all(rels, REFUSED, "SLICE_GAP")
    exp[rels[3]] = Expect({REFUSED}, {"TRUNCATED"})
    return exp


def m_not_dicom(d, base):
    d.mkdir(parents=True, exist_ok=True)
    nifti = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4))
    files = {
        "empty.dcm": b"",
        "empty_no_ext": b"",
        "notes.dcm": b"patient list, do not share\n",
        "random.dcm": bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8)),
        "image.dcm": b"\x89PNG\r\n\x1a\n" + b"\x00" * 200,
        "volume.dcm": gzip.compress(nifti.to_bytes()),
        "report.dcm": json.dumps({"00100010": {"vr": "PN"}}).encode(),
        "preamble_only.dcm": b"\x00" * 128,
        ".DS_Store": b"\x00\x00\x00\x01Bud1" + b"\x00" * 100,
        "Thumbs.db": b"\xd0\xcf\x11\xe0" + b"\x00" * 100,
    }
    for name, data in files.items():
        (d / name).write_bytes(data)
    exp = {name: Expect({REFUSED}, UNREADABLE) for name in files}
    return exp


def m_junk_beside_good_series(d, base):
    # Stray files inside a good series folder do not stop the series.
    rels = _series(d, base)
    (d / "DICOMDIR.txt").write_text("index\n")
    (d / "IM9999.dcm").write_bytes(b"")
    exp = _ok(rels)
    exp["DICOMDIR.txt"] = Expect({REFUSED}, {"NOT_DICOM"})
    exp["IM9999.dcm"] = Expect({REFUSED}, UNREADABLE)
    return exp


MUTANTS: dict[str, Builder] = {name[2:]: fn for name, fn in globals().items() if name.startswith("m_")}


# Defects fedimg used to mishandle without crashing (see the regression tests at the end),
# in the shared corpus; their expected (correct) outcome:
def k_cut_in_file_meta(d, base):
    _cut(d, _fresh([base[0]])[0], "cut_in_file_meta.dcm", lambda b, p: 150)
    return {"cut_in_file_meta.dcm": Expect({REFUSED}, UNREADABLE)}


def k_cut_in_sop_class_uid(d, base):
    # Cut inside the (0008,0016) SOP Class UID value: pydicom returns a shorter UID.
    ds = _fresh([base[0]])[0]
    _save(ds, d / "tmp_probe.dcm")
    data = (d / "tmp_probe.dcm").read_bytes()
    (d / "tmp_probe.dcm").unlink()
    # The second occurrence of the SOP class UID (the first is in the file meta).
    uid = str(ds.SOPClassUID).encode()
    at = data.index(uid, data.index(uid) + 1) + 5
    _cut(d, ds, "cut_in_sop_class_uid.dcm", lambda b, p: at)
    return {"cut_in_sop_class_uid.dcm": Expect({REFUSED}, HEADER_CUT)}


def k_dicm_then_garbage(d, base):
    d.mkdir(parents=True, exist_ok=True)
    (d / "dicm_garbage.dcm").write_bytes(b"\x00" * 128 + b"DICM" + b"\xff" * 300)
    (d / "dicm_only.dcm").write_bytes(b"\x00" * 128 + b"DICM")
    return {n: Expect({REFUSED}, UNREADABLE) for n in ("dicm_garbage.dcm", "dicm_only.dcm")}


def k_negative_pixel_spacing(d, base):
    # Refused today, but as MIXED_SERIES ("slices disagree"), although all slices agree.
    return _all(
        _series(d, base, mutate=lambda ds: setattr(ds, "PixelSpacing", [-1.6, -1.6])),
        REFUSED,
        "NO_GEOMETRY",
    )


def k_columns_mismatch(d, base):
    # Columns changed: Rows*Columns*2 < len(Pixel Data); the pixels are re-strided (scrambled).
    return _all(
        _series(d, base, mutate=lambda ds: setattr(ds, "Columns", ds.Columns - 25)),
        REFUSED,
        "PIXEL_DECODE_ERROR",
        "TRUNCATED",
    )


def k_rows_mismatch(d, base):
    # Rows reduced: the pixel data holds more than the header says (silently cropped today).
    return _all(
        _series(d, base, mutate=lambda ds: setattr(ds, "Rows", ds.Rows - 25)),
        REFUSED,
        "PIXEL_DECODE_ERROR",
        "TRUNCATED",
    )


def k_inf_rescale_intercept(d, base):
    return _all(
        _series(
            d,
            base,
            mutate=lambda ds: setattr(ds, "RescaleIntercept", DS_SENTINEL.decode()),
            patch=(DS_SENTINEL + b" ", b"-inf    "),
        ),
        REFUSED,
        "PIXEL_DECODE_ERROR",
        "UNSUPPORTED_PIXELS",
    )


def k_nan_rescale_slope(d, base):
    return _all(
        _series(
            d,
            base,
            mutate=lambda ds: setattr(ds, "RescaleSlope", DS_SENTINEL.decode()),
            patch=(DS_SENTINEL + b" ", b"NaN     "),
        ),
        REFUSED,
        "PIXEL_DECODE_ERROR",
        "UNSUPPORTED_PIXELS",
    )


KNOWN_BUGS: dict[str, Builder] = {name[2:]: fn for name, fn in globals().items() if name.startswith("k_")}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def synth_site(tmp_path_factory) -> Path:
    from fedimg.synth import generate

    out = tmp_path_factory.mktemp("robust_synth")
    generate(out, n_sites=1, n_cases=2, seed=0, progress=False)
    return out / "site-1"


def _pydicom_test_files() -> list[tuple[Path, str]]:
    from pydicom.data import get_testdata_files

    files = [Path(f) for f in get_testdata_files() if Path(f).is_file()]
    root = next(p for p in files[0].parents if p.name == "test_files")
    return [(f, f.relative_to(root).as_posix()) for f in files]


@pytest.fixture(scope="module")
def corpus(synth_site, tmp_path_factory) -> Corpus:
    root = tmp_path_factory.mktemp("robust") / "src"
    c = Corpus(root=root)
    shutil.copytree(synth_site, root / "site")
    for f, rel in _pydicom_test_files():
        (root / "pydicom" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, root / "pydicom" / rel)
    if D2N_FAILING.is_dir():
        shutil.copytree(D2N_FAILING, root / "d2n_failing")
        c.has_d2n = True
    base = _base_slices(synth_site)
    for group, builders in (("mutants", MUTANTS), ("known_bugs", KNOWN_BUGS)):
        for name, build in builders.items():
            d = root / group / name
            d.mkdir(parents=True)
            exp = build(d, base)
            prefix = f"{group}/{name}/"
            c.expect[name] = {prefix + k: v for k, v in exp.items()}
            c.series[name] = sorted(prefix + k for k in exp)
            on_disk = {prefix + p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file()}
            assert on_disk == set(c.expect[name]), f"mutant {name}: files without an expectation"
    c.hashes = _hash_tree(root)
    return c


@dataclass
class Run:
    dst: Path
    result: object
    rows: dict[str, dict]
    raw_rows: list[dict]


@pytest.fixture(scope="module")
def converted(corpus, tmp_path_factory) -> Run:
    dst = tmp_path_factory.mktemp("robust_out") / "dst"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns a lot on this corpus; warnings are not failures here
        res = convert(corpus.root, dst, workers=2, progress=False)
    raw = read_manifest(dst)
    return Run(dst, res, {r["input"]: r for r in raw}, raw)


def _check_contract(src: Path, dst: Path, raw_rows: list[dict], before: dict[str, str], reported_inputs: int) -> None:
    """Accounting, one row per file, raw input unchanged, no temp files."""
    on_disk = _disk_files(src)
    inputs = [r["input"] for r in raw_rows]
    assert len(inputs) == len(set(inputs)), "a file has several manifest rows"
    assert set(inputs) == on_disk, (
        f"rows without file: {sorted(set(inputs) - on_disk)[:5]}, "
        f"files without row: {sorted(on_disk - set(inputs))[:5]}"
    )
    counts = {s: sum(r["status"] == s for r in raw_rows) for s in STATUSES}
    assert {r["status"] for r in raw_rows} <= set(STATUSES)
    assert len(on_disk) == reported_inputs == counts[CONVERTED] + counts[REFUSED] + counts[SKIPPED]
    for r in raw_rows:
        if r["status"] == CONVERTED:
            assert r["reason"] == "" and r.get("output"), r
        else:
            assert r["reason"], f"{r['status']} without a reason code: {r}"
    assert _hash_tree(src) == before, "raw input changed"
    assert _leftover_tmp(dst) == []


# --------------------------------------------------------------------------- convert


def test_convert_contract_holds_on_malformed_corpus(corpus, converted):
    res = converted.result
    _check_contract(corpus.root, converted.dst, converted.raw_rows, corpus.hashes, res.src_files)
    assert res.summary["inputs"] == res.src_files
    summary_json = json.loads((converted.dst / "summary.json").read_text())
    assert summary_json["counts"] == res.summary["counts"]
    # DST holds exactly the outputs the manifest names.
    named = {r["output"] for r in converted.raw_rows if r["status"] == CONVERTED}
    assert named == set(res.outputs)
    assert {f"series/{p.name}" for p in (converted.dst / "series").iterdir()} == named


@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_convert_reason_per_mutant(corpus, converted, name):
    wrong = []
    for rel, exp in corpus.expect[name].items():
        row = converted.rows[rel]
        if row["status"] not in exp.statuses or row["reason"] not in exp.reasons:
            wrong.append(
                f"{rel}: got {row['status']}/{row['reason']} ({row.get('detail', '')}), "
                f"expected {sorted(exp.statuses)}/{sorted(exp.reasons)}"
            )
    assert not wrong, "\n".join(wrong)


def test_series_level_refusals_cover_the_whole_series(corpus, converted):
    for name in (
        "slice_removed",
        "duplicated_slice",
        "no_position_one_slice",
        "no_spacing_one_slice",
    ):
        rows = [converted.rows[r] for r in corpus.series[name]]
        assert len({(r["status"], r["reason"]) for r in rows}) == 1, name
        assert len({r.get("series_uid") for r in rows}) == 1, name


def test_good_series_still_convert_beside_broken_ones(corpus, converted):
    site_rows = [r for k, r in converted.rows.items() if k.startswith("site/")]
    dicom_rows = [r for r in site_rows if r["input"].endswith(".dcm")]
    assert dicom_rows and all(r["status"] == CONVERTED for r in dicom_rows)
    outputs = {r["output"] for r in dicom_rows}
    assert len(outputs) == 2
    for out in outputs:
        assert nib.load(converted.dst / out).shape == (125, 125, 60)

    # Every mutant that should convert gives exactly the control volume (voxels and affine).
    def volume(name):
        outs = {converted.rows[r]["output"] for r in corpus.series[name] if converted.rows[r]["status"] == CONVERTED}
        assert len(outs) == 1, (name, outs)
        img = nib.load(converted.dst / outs.pop())
        return img.affine, np.asarray(img.dataobj)

    ref_affine, ref_data = volume("control")
    assert ref_data.shape == (125, 125, N_BASE)
    for name in (
        "names_with_spaces",
        "no_extension",
        "no_instance_number",
        "scrambled_instance_number",
        "garbage_instance_number",
        "junk_beside_good_series",
    ):
        affine, data = volume(name)
        np.testing.assert_allclose(affine, ref_affine, atol=1e-5, err_msg=name)
        np.testing.assert_array_equal(data, ref_data, err_msg=name)
    affine, data = volume("first_slice_removed")
    np.testing.assert_array_equal(data, ref_data[:, :, 1:])
    np.testing.assert_allclose(affine[:3, :3], ref_affine[:3, :3], atol=1e-5)


def test_pydicom_files_with_a_well_defined_outcome(corpus, converted):
    rows = {k[len("pydicom/") :]: r for k, r in converted.rows.items() if k.startswith("pydicom/")}
    assert len(rows) == len(_pydicom_test_files())
    for rel, r in rows.items():
        if rel.endswith((".txt", ".json", ".dump", ".icc", ".gz", "README")):
            assert (r["status"], r["reason"]) == (REFUSED, "NOT_DICOM"), rel
    assert (rows["MR_truncated.dcm"]["status"], rows["MR_truncated.dcm"]["reason"]) == (
        REFUSED,
        "TRUNCATED",
    )
    for sr in ("reportsi.dcm", "test-SR.dcm", "rtplan.dcm"):
        assert (rows[sr]["status"], rows[sr]["reason"]) == (SKIPPED, "NON_IMAGE_OBJECT"), sr
    for rel, r in rows.items():
        if rel.startswith("dicomdirtests/") and rel.split("/")[-1].startswith("DICOMDIR"):
            assert (r["status"], r["reason"]) == (SKIPPED, "NON_IMAGE_OBJECT"), rel
    # The eight MR_small* files are one slice in several transfer syntaxes under one series UID.
    mr = [r for k, r in rows.items() if k.startswith("MR_small") and "truncated" not in k]
    assert {(r["status"], r["reason"]) for r in mr} == {(REFUSED, "DUPLICATE_POSITION")}


def test_dicom2nifti_failing_series_are_not_converted(corpus, converted):
    if not corpus.has_d2n:
        pytest.skip(
            f"dicom2nifti failing/ series not available: {D2N_FAILING} is absent "
            "(expected ../shared/data beside the repo)"
        )
    rows = {k: r for k, r in converted.rows.items() if k.startswith("d2n_failing/")}
    assert rows
    conv = sorted(k for k, r in rows.items() if r["status"] == CONVERTED)
    assert not conv, f"deliberately broken dicom2nifti series converted: {conv}"
    by_case = {}
    for k, r in rows.items():
        if k.endswith(".dcm"):
            by_case.setdefault(k.split("/")[1], set()).add(r["reason"])
    assert by_case["gantrytilting"] == {"GANTRY_TILT"}
    assert by_case["slicecount"] == {"TOO_FEW_SLICES"}
    assert by_case["sliceincrement"] <= {"NONUNIFORM_SPACING", "SLICE_GAP"}
    assert by_case["sliceorientation"] <= {"MIXED_SERIES", "TOO_FEW_SLICES"}
    assert all(r["status"] == REFUSED for r in rows.values())


@pytest.mark.slow
def test_convert_rerun_and_serial_give_the_same_manifest(corpus, converted, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = convert(corpus.root, converted.dst, workers=2, progress=False)
        convert(corpus.root, tmp_path / "serial", workers=1, progress=False)
    assert again.reused == len(converted.result.outputs)
    assert read_manifest(converted.dst) == converted.raw_rows
    assert read_manifest(tmp_path / "serial") == converted.raw_rows
    assert _hash_tree(corpus.root) == corpus.hashes
    assert _leftover_tmp(converted.dst) == [] and _leftover_tmp(tmp_path / "serial") == []


# --------------------------------------------------------------------------- preprocess


@pytest.mark.slow
def test_preprocess_contract_holds_on_malformed_corpus(corpus, tmp_path):
    from fedimg.preprocess.pipeline import preprocess

    spec = cfgmod.load(cfgmod.PreprocessSpec, CT_SPEC)
    dst = tmp_path / "pre"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = preprocess(corpus.root, dst, spec, site="robust", progress=False)
    raw = read_manifest(dst)
    _check_contract(corpus.root, dst, raw, corpus.hashes, res.src_files)
    rows = {r["input"]: r for r in raw}
    # The two good synthetic studies (with their NIfTI labels) are the cases.
    # The synthetic site's label sheet is a CSV: skipped, never converted or refused.
    assert (rows["site/labels.csv"]["status"], rows["site/labels.csv"]["reason"]) == (SKIPPED, "LABEL_SHEET")
    site = {k: r for k, r in rows.items() if k.startswith("site/") and k != "site/labels.csv"}
    assert site and all(r["status"] == CONVERTED for r in site.values()), {
        k: (r["status"], r["reason"]) for k, r in site.items() if r["status"] != CONVERTED
    }
    site_cases = {r["case_id"] for r in site.values()}
    assert len(site_cases) == 2 and site_cases <= {c.case_id for c in res.cases}
    # Geometry defects get the same reasons as in convert.
    for name in ("slice_removed", "duplicated_slice", "no_position", "no_spacing"):
        reasons = {rows[r]["reason"] for r in corpus.series[name]}
        assert reasons == {r for e in corpus.expect[name].values() for r in e.reasons}, (
            name,
            reasons,
        )
    for name in ("truncated", "not_dicom"):
        for rel, exp in corpus.expect[name].items():
            assert rows[rel]["status"] == REFUSED and rows[rel]["reason"] in exp.reasons, (
                rel,
                rows[rel],
            )
    dl = json.loads((dst / "datalist.json").read_text())
    for item in dl["training"] + dl["validation"]:
        assert (dst / item["image"]).is_file()


# --------------------------------------------------------------------------- regressions

# What each ``k_*`` defect gave before it was fixed in the DICOM layer.
_REGRESSIONS = {
    "cut_in_file_meta": (
        "file truncated inside its file meta is SKIPPED as NON_IMAGE_OBJECT (empty SOP class,"
        " no pixels) instead of refused TRUNCATED/NOT_DICOM (index.read_header/is_non_image)"
    ),
    "cut_in_sop_class_uid": (
        "file truncated inside (0008,0016) reads as a shortened SOP Class UID and is SKIPPED "
        "as NON_IMAGE_OBJECT instead of refused"
    ),
    "dicm_then_garbage": (
        "128 zero bytes + 'DICM' (+ garbage) is SKIPPED as NON_IMAGE_OBJECT instead of refused NOT_DICOM"
    ),
    "negative_pixel_spacing": (
        "(0028,0030) -1.6\\-1.6 on every slice is refused as MIXED_SERIES ('slices disagree') instead of NO_GEOMETRY"
    ),
    "columns_mismatch": (
        "Columns reduced so Pixel Data is longer than Rows*Columns*2: pydicom only warns, "
        "fedimg CONVERTS a re-strided (scrambled) volume"
    ),
    "rows_mismatch": ("Rows reduced so Pixel Data is longer than expected: CONVERTED (silently cropped)"),
    "nan_rescale_slope": ("(0028,1053) 'NaN': CONVERTED to an all-NaN volume"),
    "inf_rescale_intercept": ("(0028,1052) '-inf': CONVERTED to an all-inf volume"),
}


@pytest.mark.parametrize("name", sorted(KNOWN_BUGS))
def test_known_bug_expected_outcome(corpus, converted, name):
    wrong = []
    for rel, exp in corpus.expect[name].items():
        row = converted.rows[rel]
        if row["status"] not in exp.statuses or row["reason"] not in exp.reasons:
            wrong.append(
                f"{rel}: got {row['status']}/{row['reason']}, expected {sorted(exp.statuses)}/{sorted(exp.reasons)}"
            )
    assert not wrong, f"regression ({_REGRESSIONS[name]}):\n" + "\n".join(wrong)


def test_deflated_file_is_not_reported_truncated(corpus, converted):
    """pydicom's image_dfl.dcm (Deflated Explicit VR LE) is a complete, valid file.

    Regression: index.read_header compared the Pixel Data offset inside the inflated
    stream of a Deflated Explicit VR LE file (1.2.840.10008.1.2.1.99) with the
    compressed file size and reported TRUNCATED.
    """
    ds = pydicom.dcmread(corpus.root / "pydicom" / "image_dfl.dcm")
    assert ds.pixel_array.size == ds.Rows * ds.Columns  # pydicom decodes it fine
    row = converted.rows["pydicom/image_dfl.dcm"]
    assert row["reason"] != "TRUNCATED", row


# Defects that used to crash the whole run (convert and preprocess); the third item says
# how. Each gets its own small corpus (a good control series + the defect, each with a
# NIfTI label so that preprocess reaches pixel decoding), so a crash fails only its test.
_CRASHERS: dict[str, tuple[Callable[[Path, list[Dataset]], list[str]], set[str], str]] = {
    "empty_rows": (
        lambda d, base: _series(d, base, mutate=lambda ds: ds.add_new(0x00280010, "US", None)),
        {"NO_GEOMETRY", "PIXEL_DECODE_ERROR", "NO_PIXELS"},
        (
            "zero-length (0028,0010) Rows: index.read_header does int(ds.Rows) on None -> "
            "TypeError (convert and preprocess)"
        ),
    ),
    "empty_columns": (
        lambda d, base: _series(d, base, mutate=lambda ds: ds.add_new(0x00280011, "US", None)),
        {"NO_GEOMETRY", "PIXEL_DECODE_ERROR", "NO_PIXELS"},
        "zero-length (0028,0011) Columns: int(ds.Columns) on None -> TypeError",
    ),
    "garbage_rescale_slope": (
        lambda d, base: _series(
            d,
            base,
            mutate=lambda ds: setattr(ds, "RescaleSlope", DS_SENTINEL.decode()),
            patch=(DS_SENTINEL + b" ", b"abc     "),
        ),
        {"PIXEL_DECODE_ERROR", "UNSUPPORTED_PIXELS"},
        (
            "(0028,1053) 'abc': pixels.decode_slice/rescale float(ds.get('RescaleSlope')) raises "
            "ValueError outside any RefusedError handling (convert and preprocess)"
        ),
    ),
    "inf_position_one_slice": (
        lambda d, base: _series(
            d,
            base,
            mutate=lambda ds: setattr(ds, "ImagePositionPatient", [DS_SENTINEL.decode(), 0, 0]),
            which=[3],
            patch=(DS_SENTINEL, b"inf    "),
        ),
        {"NO_GEOMETRY"},
        (
            "IPP 'inf' on one slice passes geometry.compute_geometry (inf/NaN comparisons are "
            "False); convert: io.write_nifti raises nibabel HeaderDataError 'Could not decompose "
            "affine'; preprocess: LinAlgError 'SVD did not converge' in the resampling"
        ),
    ),
    "nan_position": (
        lambda d, base: _series(
            d,
            base,
            mutate=lambda ds: setattr(ds, "ImagePositionPatient", [DS_SENTINEL.decode(), 0, 0]),
            patch=(DS_SENTINEL, b"NaN    "),
        ),
        {"NO_GEOMETRY"},
        (
            "IPP 'NaN' on every slice passes geometry.compute_geometry (NaN comparisons are "
            "False); convert: HeaderDataError in io.write_nifti; preprocess: LinAlgError 'SVD did"
            " not converge'"
        ),
    ),
    "zero_pixel_spacing": (
        lambda d, base: _series(d, base, mutate=lambda ds: setattr(ds, "PixelSpacing", [0, 0])),
        {"NO_GEOMETRY"},
        (
            "(0028,0030) 0\\0 is accepted by geometry.compute_geometry (no spacing > 0 check); "
            "convert: the singular affine makes io.write_nifti raise HeaderDataError; preprocess:"
            " nibabel ornt_transform ValueError 'Unable to find out axis nan'"
        ),
    ),
    "nan_orientation": (
        lambda d, base: _series(
            d,
            base,
            mutate=lambda ds: setattr(ds, "ImageOrientationPatient", [DS_SENTINEL.decode(), 0, 0, 0, 1, 0]),
            patch=(DS_SENTINEL, b"NaN    "),
        ),
        {"NO_GEOMETRY"},
        ("IOP 'NaN': index._round_iop does round(nan) -> ValueError in group_series (convert and preprocess)"),
    ),
}


def _label_beside(series_dir: Path, like: Path) -> str:
    """A NIfTI label on the grid of the control series (what preprocess pairs with the image)."""
    from fedimg.dicom.index import group_series, scan
    from fedimg.dicom.volume import series_geometry

    geo = series_geometry(group_series(scan(like).headers)[0])
    lab = np.zeros(geo.shape, np.uint8)
    lab[40:70, 40:70, 2:5] = 1
    nib.save(nib.Nifti1Image(lab, geo.affine_ras), str(series_dir / "segmentation.nii.gz"))
    return "segmentation.nii.gz"


@pytest.mark.parametrize("entry", ["convert", pytest.param("preprocess", marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", sorted(_CRASHERS))
def test_crashing_defect_is_refused(synth_site, tmp_path, name, entry):
    build, reasons, _ = _CRASHERS[name]
    base = _base_slices(synth_site)
    src = tmp_path / "src"
    good = _series(src / "good", base)
    bad = build(src / "bad", base)
    if entry == "preprocess":
        good.append(_label_beside(src / "good", src / "good"))
        bad.append(_label_beside(src / "bad", src / "good"))
    before = _hash_tree(src)
    dst = tmp_path / "dst"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if entry == "convert":
            n_inputs = convert(src, dst, workers=1, progress=False).src_files
        else:
            from fedimg.preprocess.pipeline import preprocess

            spec = cfgmod.load(cfgmod.PreprocessSpec, CT_SPEC)
            n_inputs = preprocess(src, dst, spec, site="crash", progress=False).src_files
    rows = {r["input"]: r for r in read_manifest(dst)}
    _check_contract(src, dst, list(rows.values()), before, n_inputs)
    good_dicom = [r for r in good if r.endswith(".dcm") or entry == "preprocess"]
    assert all(rows[f"good/{r}"]["status"] == CONVERTED for r in good_dicom)
    for r in bad:
        allowed = reasons | ({"IMAGE_REFUSED"} if r.endswith(".nii.gz") else set())
        assert rows[f"bad/{r}"]["status"] == REFUSED and rows[f"bad/{r}"]["reason"] in allowed, rows[f"bad/{r}"]
