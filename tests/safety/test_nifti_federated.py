"""A Decathlon-style NIfTI data set goes through ``--from-nifti`` into a federated run (issue 16).

Two sites, each a Decathlon folder of TotalSegmentator crops (real CT and
its segmentation narrowed to two classes), preprocessed with their own site
secret, then one FedAvg round of a tiny UNet in NVFlare's simulator: both
sites train and report validation Dice for the two classes of the data set.
"""

from __future__ import annotations

import pytest
import torch

from fedimg import config as cfg
from fedimg.datalist import Datalist
from fedimg.dicom.deid import Pseudonymizer, SiteSecret
from fedimg.preprocess.pipeline import preprocess
from tests.conftest import REPO, tiny_experiment
from tests.safety.nifti_data import CLASSES, make_decathlon, spec

pytestmark = [pytest.mark.nvflare, pytest.mark.slow, pytest.mark.integration]
SITES = {"site-1": (0, 21, 42), "site-2": (10, 32)}


def test_decathlon_sites_train_a_federated_model(tmp_path):
    from fedimg.fl.simulate import run_simulation

    site_cfgs = {}
    for site, offsets in SITES.items():
        src = tmp_path / "raw" / site
        make_decathlon(src, offsets, prefix=site.replace("-", ""))
        secret = Pseudonymizer(SiteSecret.generate(tmp_path / f"{site}.secret"))
        res = preprocess(
            src, tmp_path / "pre" / site, spec(6.0), site=site, progress=False, workers=1, from_nifti=True,
            pseudonymizer=secret,
        )  # fmt: skip
        assert res.problem is None and len(res.cases) == len(offsets)
        dl = Datalist.read(tmp_path / "pre" / site / "datalist.json")
        assert dl.classes == list(CLASSES) and dl.validation
        dl_path = str(tmp_path / "pre" / site / "datalist.json")
        cfg.save(cfg.SiteConfig(name=site, datalist=dl_path, device="cpu", num_threads=1), tmp_path / f"{site}.yaml")
        site_cfgs[site] = str(tmp_path / f"{site}.yaml")

    exp = tiny_experiment(
        **{
            "name": "nifti_fed",
            "task.class_names": "[spleen, liver]",
            "task.min_component_voxels": 0,
            "fed.num_rounds": 1,
            "fed.cross_site_eval": "false",
            "train.amp": "false",
        }
    )
    run = run_simulation(exp, REPO / "jobs" / "train", site_cfgs, tmp_path / "ws")
    assert run.errors == []
    state = torch.load(run.global_model, map_location="cpu", weights_only=True)["model"]
    assert state and all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert len(run.rounds) >= 1
    final = run.global_metrics[-1]
    assert final["final_eval"] and set(final["sites"]) == set(SITES)
    assert final["weights"] == {"site-1": 1.0, "site-2": 1.0}  # one validation case each, by the split
    for site in SITES:
        metrics = final["sites"][site]
        assert {"val_dice", "val_dice_spleen", "val_dice_liver"} <= set(metrics)
        assert all(0.0 <= metrics[k] <= 1.0 for k in ("val_dice", "val_dice_spleen", "val_dice_liver"))
