"""Shared fixtures: real data location, small synthetic federations, GPU auto-skip."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
CT_SPEC = REPO / "configs" / "preprocessing" / "ct_phantom.yaml"
MR_SPEC = REPO / "configs" / "preprocessing" / "mr_brain_tcia.yaml"
DEMO_EXPERIMENT = REPO / "configs" / "experiments" / "seg_demo.yaml"

warnings.filterwarnings("ignore", message=".*NvImgCodecPydicomReader.*")


def shared(rel: str) -> Path:
    """A path under ../shared/data, or skip the test with the reason."""
    p = SHARED_DATA / rel
    if not p.exists():
        pytest.skip(f"real test data not available: {p} is absent (expected ../shared/data beside the repo)")
    return p


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible to PyTorch)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def small_synth(tmp_path_factory: pytest.TempPathFactory):
    """Two synthetic sites with a few studies each (site-1 NIfTI labels, site-2 DICOM masks)."""
    from fedimg.synth import generate

    out = tmp_path_factory.mktemp("synth") / "raw"
    return generate(out, n_sites=2, n_cases=3, seed=7, progress=False)


@pytest.fixture(scope="session")
def ct_spec():
    from fedimg import config as cfg

    return cfg.load(cfg.PreprocessSpec, CT_SPEC)


@pytest.fixture(scope="session")
def small_preprocessed(small_synth, ct_spec, tmp_path_factory: pytest.TempPathFactory):
    """Each small site preprocessed at 6 mm (tiny volumes for fast training tests)."""
    import dataclasses

    from fedimg.preprocess.pipeline import preprocess

    spec = dataclasses.replace(ct_spec, target_spacing=(6.0, 6.0, 6.0))
    base = tmp_path_factory.mktemp("pre")
    results = {}
    for site in small_synth.sites:
        results[site] = preprocess(small_synth.out_dir / site, base / site, spec, site=site, progress=False)
    return base, results


def tiny_experiment(**over):
    """A small, fast experiment config for tests (dotted overrides allowed)."""
    from fedimg import config as cfg

    overrides = [
        "name=tiny",
        "model.channels=[8, 16, 32]",
        "model.strides=[2, 2]",
        "model.num_res_units=1",
        "data.roi_size=[32, 32, 32]",
        "data.batch_size=2",
        "data.samples_per_volume=1",
        "train.local_epochs=1",
        "fed.num_rounds=2",
    ] + [f"{k}={v}" for k, v in over.items()]
    return cfg.load(cfg.ExperimentConfig, DEMO_EXPERIMENT, overrides)
