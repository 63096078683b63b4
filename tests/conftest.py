"""Shared fixtures: real data location, small synthetic federations, GPU auto-skip."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

#: One port per POC test file, so their federations run side by side (POCs on one port take turns).
POC_TEST_PORTS = {"shared": 18102, "he": 18112, "boundary": 18122}

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


def slice_gap_export(site_dir: Path, dst: Path) -> tuple[Path, Path]:
    """Copy a synthetic site with DICOM masks to ``dst``; one study loses slice 10 of its image and mask.

    Returns:
        (image series folder, mask series folder) of that study, under ``dst``.
    """
    import shutil

    import pydicom

    shutil.copytree(site_dir, dst)
    image_dir = sorted(d for d in dst.rglob("*") if d.is_dir() and "STND" in d.name)[0]
    mask_dir = next(d for d in image_dir.parent.iterdir() if "Mask" in d.name)
    victim = sorted(image_dir.iterdir())[10]
    ipp = pydicom.dcmread(victim).ImagePositionPatient
    victim.unlink()
    for f in mask_dir.iterdir():  # the mask loses the same slice
        if pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient == ipp:
            f.unlink()
    return image_dir, mask_dir


def _longest_files_first(items: list[pytest.Item]) -> None:
    """POC files, then NVFlare files, then the rest; files stay whole and in their order within a rank.

    ``--dist loadfile`` hands out files in collection order: a long file collected last keeps one
    worker busy after the others have finished. Starting the long ones first shortens the run.
    """
    rank: dict[str, int] = {}
    for item in items:
        r = 0 if "poc" in item.keywords else 1 if "nvflare" in item.keywords else 2
        rank[item.nodeid.split("::")[0]] = min(r, rank.get(item.nodeid.split("::")[0], 2))
    order = {id(item): i for i, item in enumerate(items)}
    items.sort(key=lambda it: (rank[it.nodeid.split("::")[0]], order[id(it)]))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    _longest_files_first(items)
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


def synthetic_ct_sites(base: Path, *, n_sites: int, n_cases: int, seed: int) -> dict[str, str]:
    """Synthetic CT sites preprocessed at 6 mm under ``base``, each with a CPU site config.

    Returns:
        Site name to the path of its site config YAML.
    """
    import dataclasses

    from fedimg import config as cfg
    from fedimg.preprocess.pipeline import preprocess
    from fedimg.synth import generate

    synth = generate(base / "raw", n_sites=n_sites, n_cases=n_cases, seed=seed, progress=False)
    spec = dataclasses.replace(cfg.load(cfg.PreprocessSpec, CT_SPEC), target_spacing=(6.0, 6.0, 6.0))
    out = {}
    for site in synth.sites:
        preprocess(synth.out_dir / site, base / "pre" / site, spec, site=site, progress=False)
        sc = cfg.SiteConfig(name=site, datalist=str(base / "pre" / site / "datalist.json"), device="cpu", num_threads=1)
        cfg.save(sc, base / f"{site}.yaml")
        out[site] = str(base / f"{site}.yaml")
    return out


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


def _blob_images(rng, n: int, dims: int, size: int, positive: bool):
    """Noise images; positives hold a bright blob at a random place (known ground truth)."""
    import numpy as np

    grid = np.stack(np.meshgrid(*[np.arange(size)] * dims, indexing="ij"))
    out = []
    for _ in range(n):
        img = rng.normal(0.3, 0.08, size=(size,) * dims)
        if positive:
            c = rng.uniform(size * 0.3, size * 0.7, size=dims).reshape((dims,) + (1,) * dims)
            r = rng.uniform(size * 0.12, size * 0.2)
            img[((grid - c) ** 2).sum(axis=0) < r * r] += 0.5
        out.append(np.clip(img, 0, 1).astype("float32"))
    return out


@pytest.fixture(scope="session")
def cls_sites(tmp_path_factory: pytest.TempPathFactory):
    """Two classification sites per dimensionality with known labels: {2: {site: datalist}, 3: {...}}.

    Class ``blob`` images hold a bright disc (2D) or sphere (3D), class ``clear`` none; the sites
    differ in size and class balance.
    """
    import numpy as np

    from fedimg.preprocess.arrays import write_array_site

    base = tmp_path_factory.mktemp("cls")
    out = {}
    for dims, size in ((2, 32), (3, 20)):
        out[dims] = {}
        for s, (n_pos, n_neg) in enumerate(((10, 6), (4, 8)), start=1):
            rng = np.random.default_rng(100 * dims + s)
            tr = _blob_images(rng, n_pos, dims, size, True) + _blob_images(rng, n_neg, dims, size, False)
            va = _blob_images(rng, 3, dims, size, True) + _blob_images(rng, 3, dims, size, False)
            tr_lab = np.array([1] * n_pos + [0] * n_neg)
            va_lab = np.array([1] * 3 + [0] * 3)
            site_dir = base / f"d{dims}" / f"site-{s}"
            write_array_site(
                site_dir, f"site-{s}", "blobs", ["clear", "blob"], (np.stack(tr), tr_lab), (np.stack(va), va_lab)
            )
            out[dims][f"site-{s}"] = site_dir / "datalist.json"
    return out


def tiny_classification(dims: int, **over):
    """A small, fast classification experiment on the ``cls_sites`` data."""
    from fedimg import config as cfg

    base = {
        "name": "tiny_cls",
        "task": {"type": "classification", "spatial_dims": dims, "class_names": ["clear", "blob"]},
        "model": {
            "name": "resnet",
            "resnet_depth": 10,
            "width": 0.125,
            "norm": "batch",
            "growth_rate": 4,
            "init_features": 8,
        },
        "data": {"roi_size": [32] * dims, "batch_size": 4, "augment": False},
        "optim": {"name": "adam", "lr": 0.003},
        "train": {"local_epochs": 1, "epochs": 2, "seed": 0, "amp": False},
        "fed": {"num_rounds": 2},
    }
    data = cfg.apply_overrides(base, [f"{k}={v}" for k, v in over.items()])
    return cfg.from_dict(cfg.ExperimentConfig, data)


def controller_for(algorithm: str = "fedavg", net=None, num_clients: int = 3, overrides: dict | None = None, **fed):
    """A FedimgController on a tiny segmentation experiment, its global model set from ``net`` (default Linear(3, 2)).

    ``fed`` holds ``fed.*`` overrides (dotted below ``fed``), ``overrides`` any other experiment key. The
    strategy's own network (FedOpt's server model, SCAFFOLD's parameters, FedBN's normalization layers) is
    ``net`` too, so tests see small, known keys.
    """
    import copy
    import json
    from unittest import mock

    import torch

    from fedimg import config as cfg
    from fedimg.fl.controller import FedimgController
    from fedimg.fl.exchange import to_float32

    exp = tiny_experiment(
        **{"fed.algorithm": algorithm, **{f"fed.{k}": v for k, v in fed.items()}, **(overrides or {})}
    )
    ctl = FedimgController(num_clients=num_clients, num_rounds=1, experiment=json.dumps(cfg.to_dict(exp)))
    torch.manual_seed(0)
    net = net if net is not None else torch.nn.Linear(3, 2)
    ctl._global = to_float32(net.state_dict())
    with mock.patch(f"fedimg.fl.algorithms.{algorithm}.build_model", lambda *a, **k: copy.deepcopy(net), create=True):
        ctl.strategy.setup(ctl._global)
    return ctl


def apply_round(ctl, updates, ptype, results) -> None:
    """What the controller's round does with the accepted updates: the strategy's new global model."""
    metas = {(r.meta or {}).get("client_name"): (r.meta or {}) for r in results}
    ctl._global = ctl.strategy.apply(ctl._global, updates, ptype == "DIFF", metas)
