"""Slice sorting, affine and refusal of broken stacks, on headers with known geometry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedimg.dicom.geometry import compute_geometry
from fedimg.dicom.index import DicomHeader
from fedimg.dicom.reasons import Reason, RefusedError


def _headers(positions, iop=(1, 0, 0, 0, 1, 0), spacing=(0.8, 0.7), shuffle=True, rows=4, cols=5):
    hs = []
    for n, pos in enumerate(positions):
        hs.append(
            DicomHeader(
                path=Path(f"/x/{n}"),
                rel=f"{n}",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                sop_instance_uid=str(n),
                study_uid="1",
                series_uid="2",
                modality="CT",
                series_description="",
                image_type=("ORIGINAL",),
                frame_of_reference_uid="3",
                rows=rows,
                columns=cols,
                iop=tuple(float(v) for v in iop),
                ipp=tuple(float(v) for v in pos),
                pixel_spacing=spacing,
                instance_number=len(positions) - n,
                echo_number=None,
                number_of_frames=1,
                has_pixels=True,
            )
        )
    if shuffle:
        rng = np.random.default_rng(0)
        hs = [hs[i] for i in rng.permutation(len(hs))]
    return hs


def test_axial_affine_is_lps_to_ras_and_sorted_by_position():
    hs = _headers([(-10, -20, z) for z in (5.0, 7.5, 10.0, 12.5)])
    geo = compute_geometry(hs)
    ordered_z = [hs[i].ipp[2] for i in geo.order]
    assert ordered_z == sorted(ordered_z)  # along the normal, not Instance Number
    expected = np.array([[-0.7, 0, 0, 10], [0, -0.8, 0, 20], [0, 0, 2.5, 5], [0, 0, 0, 1]])
    np.testing.assert_allclose(geo.affine_ras, expected, atol=1e-9)
    assert geo.shape == (5, 4, 4)
    assert geo.spacing == pytest.approx((0.7, 0.8, 2.5))


def test_sagittal_normal_and_voxel_to_world():
    iop = (0, 1, 0, 0, 0, -1)  # rows along +y (posterior), columns toward feet
    hs = _headers([(x, -100, 50) for x in (3.0, 1.0, -1.0)], iop=iop, spacing=(1.0, 2.0))
    geo = compute_geometry(hs)
    # voxel (i=1, j=2, k=0): first slice is the smallest position along the normal (-x in LPS)
    normal = np.cross(iop[:3], iop[3:])
    first = min((h.ipp for h in hs), key=lambda p: np.dot(p, normal))
    lps = np.array(first) + 1 * 2.0 * np.array(iop[:3]) + 2 * 1.0 * np.array(iop[3:])
    ras = geo.affine_ras @ np.array([1, 2, 0, 1])
    np.testing.assert_allclose(ras[:3], lps * [-1, -1, 1], atol=1e-9)


@pytest.mark.parametrize(
    ("zs", "reason"),
    [
        ((0, 2, 4, 8, 10), Reason.SLICE_GAP),
        ((0, 2, 2, 4), Reason.DUPLICATE_POSITION),
        ((0, 2, 4.5, 6, 8), Reason.NONUNIFORM_SPACING),
        ((0, 2), Reason.TOO_FEW_SLICES),
    ],
)
def test_broken_stacks_are_refused(zs, reason):
    with pytest.raises(RefusedError) as exc:
        compute_geometry(_headers([(0, 0, z) for z in zs]))
    assert exc.value.reason == reason


def test_gantry_tilt_is_refused():
    # positions advance in z but shift in y: a tilted gantry (about 11 degrees)
    pos = [(0, 0.4 * k, 2.0 * k) for k in range(5)]
    with pytest.raises(RefusedError) as exc:
        compute_geometry(_headers(pos))
    assert exc.value.reason == Reason.GANTRY_TILT
    assert "degrees" in exc.value.detail


def test_missing_geometry_is_refused():
    hs = _headers([(0, 0, z) for z in (0, 1, 2)])
    hs[1].ipp = None
    with pytest.raises(RefusedError) as exc:
        compute_geometry(hs)
    assert exc.value.reason == Reason.NO_GEOMETRY
    assert "(0020,0032)" in exc.value.detail


def test_mixed_orientation_is_refused():
    hs = _headers([(0, 0, z) for z in (0, 1, 2)])
    hs[0].iop = (0, 1, 0, 0, 0, -1)
    with pytest.raises(RefusedError) as exc:
        compute_geometry(hs)
    assert exc.value.reason == Reason.MIXED_SERIES


@pytest.mark.parametrize(
    ("field", "value", "which"),
    [
        ("ipp", (0.0, 0.0, float("nan")), "all"),
        ("ipp", (float("inf"), 0.0, 1.0), 1),
        ("iop", (float("nan"), 0.0, 0.0, 0.0, 1.0, 0.0), "all"),
        ("pixel_spacing", (float("nan"), 0.7), "all"),
        ("pixel_spacing", (0.0, 0.0), "all"),
        ("pixel_spacing", (-0.8, -0.7), "all"),
    ],
)
def test_non_finite_or_non_positive_geometry_is_no_geometry(field, value, which):
    # NaN/inf compare False with every tolerance: without an explicit check they
    # would reach the affine (singular or NaN) instead of being refused.
    hs = _headers([(0, 0, z) for z in (0, 1, 2, 3)], shuffle=False)
    for k, h in enumerate(hs):
        if which == "all" or k == which:
            setattr(h, field, value)
    with pytest.raises(RefusedError) as exc:
        compute_geometry(hs)
    assert exc.value.reason == Reason.NO_GEOMETRY


def test_nan_orientation_groups_without_crashing():
    from fedimg.dicom.index import group_series

    hs = _headers([(0, 0, z) for z in (0, 1, 2)])
    for h in hs:
        h.iop = (float("nan"), 0.0, 0.0, 0.0, 1.0, 0.0)
    groups = group_series(hs)
    assert len(groups) == 1
    with pytest.raises(RefusedError) as exc:
        compute_geometry(groups[0].headers)
    assert exc.value.reason == Reason.NO_GEOMETRY
