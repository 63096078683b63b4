"""``intensity.mode: mr_zscore`` (issue 16): percentile clipping and z-score over the non-zero voxels of an MR volume.

Known arrays: a skull-stripped-like volume (zero background, a foreground
with outliers). The foreground ends with mean 0 and standard deviation 1,
the background stays exactly 0, the percentiles are those of the foreground
(the background does not pull them down) and the outliers are clipped. The
default MR chain is unchanged, and the option is validated.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import ClipIntensityPercentilesd, Compose, NormalizeIntensityd

from fedimg import config as cfg
from fedimg.preprocess.transforms import apply_spec, build_transforms

BASE = {"name": "mr", "modality": "MR", "target_spacing": [2.0, 2.0, 2.0], "series": {"image_modality": "MR"}}


def _spec(**intensity) -> cfg.PreprocessSpec:
    return cfg.from_dict(cfg.PreprocessSpec, {**BASE, "intensity": intensity})


def _volume() -> np.ndarray:
    """20^3: zero background, a 10^3 foreground of values 100..300 and two bright outliers."""
    rng = np.random.default_rng(3)
    vol = np.zeros((20, 20, 20), dtype=np.float32)
    vol[5:15, 5:15, 5:15] = rng.uniform(100.0, 300.0, size=(10, 10, 10))
    vol[6, 6, 6], vol[7, 7, 7] = 5000.0, 4000.0
    return vol


def _run(spec: cfg.PreprocessSpec, vol: np.ndarray) -> np.ndarray:
    out = build_transforms(spec, with_label=False, spatial=False)({"image": MetaTensor(torch.from_numpy(vol[None]))})
    return np.asarray(out["image"].detach().cpu().numpy()[0])


def test_nonzero_voxels_get_mean_0_std_1_background_stays_0_and_outliers_are_clipped():
    vol = _volume()
    out = _run(_spec(mode="mr_zscore", mr_percentiles=[1.0, 99.0]), vol)
    fg = vol != 0
    assert np.all(out[~fg] == 0.0)  # background: exactly 0, not a negative z-score
    assert abs(float(out[fg].mean())) < 1e-5
    assert abs(float(out[fg].std()) - 1.0) < 1e-5
    # Expected values computed by hand: percentiles of the foreground only, clip, z-score.
    values = vol[fg].astype(np.float64)
    lo, hi = np.percentile(values, [1.0, 99.0])
    assert lo >= 100.0 and hi < 4000.0  # the background (half the volume) did not drag the low percentile to 0
    clipped = np.clip(values, lo, hi)
    expected = (clipped - clipped.mean()) / clipped.std()
    np.testing.assert_allclose(out[fg], expected, rtol=1e-5, atol=1e-5)
    # Both outliers were clipped to the upper percentile: they end at one and the same value, the maximum.
    assert out[6, 6, 6] == out[7, 7, 7] == pytest.approx(float(out.max()))
    assert float(out.max()) == pytest.approx((hi - clipped.mean()) / clipped.std(), rel=1e-5)


def test_constant_foreground_becomes_zero_and_empty_volume_stays_zero():
    spec = _spec(mode="mr_zscore")
    vol = np.zeros((6, 6, 6), dtype=np.float32)
    assert np.all(_run(spec, vol) == 0.0)
    vol[2:4, 2:4, 2:4] = 7.0
    out = _run(spec, vol)
    assert np.all(np.isfinite(out)) and np.all(out == 0.0)


def test_the_default_mr_chain_is_unchanged():
    vol = _volume()
    default = _run(_spec(mr_percentiles=[1.0, 99.0]), vol)
    monai = Compose([ClipIntensityPercentilesd("image", 1.0, 99.0), NormalizeIntensityd("image", nonzero=True)])
    ref = monai({"image": MetaTensor(torch.from_numpy(vol[None].copy()))})["image"].numpy()[0]
    np.testing.assert_allclose(default, ref, rtol=1e-6, atol=1e-6)
    assert not np.allclose(default, _run(_spec(mode="mr_zscore", mr_percentiles=[1.0, 99.0]), vol), atol=1e-3)


def test_apply_spec_keeps_the_background_zero_on_the_output_grid():
    vol = _volume()
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    img, _, out_affine = apply_spec(_spec(mode="mr_zscore"), vol, affine)
    assert img.shape == (10, 10, 10) and np.allclose(np.diag(out_affine)[:3], 2.0)
    nonzero = img != 0
    assert abs(float(img[nonzero].mean())) < 1e-4 and abs(float(img[nonzero].std()) - 1.0) < 1e-4
    assert img[0, 0, 0] == 0.0 and img[-1, -1, -1] == 0.0  # far from the foreground: untouched background


def test_mode_is_validated():
    with pytest.raises(cfg.ConfigError, match=r"intensity.mode: expected one of 'default', 'mr_zscore'"):
        _spec(mode="zscore")
    with pytest.raises(
        cfg.ConfigError, match=r"intensity.mode: mr_zscore normalizes 3D MR volumes; this spec is 3D CT"
    ):
        cfg.from_dict(
            cfg.PreprocessSpec,
            {"name": "ct", "modality": "CT", "target_spacing": [2.0, 2.0, 2.0], "intensity": {"mode": "mr_zscore"}},
        )
    with pytest.raises(cfg.ConfigError, match=r"intensity.mr_percentiles must satisfy 0 <= low < high <= 100"):
        _spec(mode="mr_zscore", mr_percentiles=[99.0, 1.0])
    assert _spec().intensity.mode == "default"
