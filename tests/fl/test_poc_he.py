"""Homomorphic encryption in POC: the server aggregates ciphertexts it cannot read.

A POC federation provisioned with HE keys (``nvflare poc prepare -he``) runs
the experiment with ``privacy.encryption: he`` (NVFlare's
``FedAvgRecipeWithHE``): 2 sites x 2 rounds. Checked: the job completes with
every error log empty; the server's global model holds only CKKS ciphertexts
(no tensor a server operator could load); a site's secret key decrypts it
into the configured network; each site validated the decrypted aggregate of
round 1 (the curve continues in the server's TensorBoard); and no NVFlare
process is left.
"""

from __future__ import annotations

import math

import pytest
import torch

from fedimg import config as cfg
from fedimg.models.registry import build_model
from tests.conftest import POC_TEST_PORTS, REPO, tiny_classification

# Each POC test file has its own port (tests/conftest.py POC_TEST_PORTS): their federations run side by side.
pytestmark = [pytest.mark.nvflare, pytest.mark.slow, pytest.mark.integration, pytest.mark.poc]
FED = REPO / "configs" / "federation"


def test_he_training_in_poc_keeps_updates_and_global_model_encrypted(cls_sites, tmp_path):
    pytest.importorskip("tenseal", reason="HE needs TenSEAL: pip install 'nvflare[HE]' (a dev dependency)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fedimg.fl.deploy import PocFederation, _processes_under, export_job
    from fedimg.fl.he import decrypt_global_model
    from fedimg.fl.recipe import build_recipe

    sites = {}
    for site, dl in cls_sites[2].items():
        cfg.save(cfg.SiteConfig(name=site, datalist=str(dl), device="cpu", num_threads=1), tmp_path / f"{site}.yaml")
        sites[site] = str(tmp_path / f"{site}.yaml")
    exp = tiny_classification(
        2,
        name="poc_he",
        **{
            "privacy.encryption": "he",
            "fed.cross_site_eval": "false",
            "fed.final_eval": "false",
            "model.norm": "instance",
        },
    )
    recipe = build_recipe(
        exp, REPO / "jobs" / "train", {s: None for s in sites}, tmp_path / "staging", fast_polling=True
    )
    job = export_job(recipe, tmp_path / "staging", tmp_path / "jobs")

    fed = PocFederation(
        tmp_path / "poc",
        sites,
        privacy=FED / "privacy.json",
        authorization=FED / "authorization.json",
        use_he=True,
        port=POC_TEST_PORTS["he"],
    )
    fed.prepare()
    assert (fed.kit("server") / "local" / "server_context.tenseal").is_file() or (
        fed.kit("server") / "startup" / "server_context.tenseal"
    ).is_file()
    try:
        fed.start()
        outcome = fed.run(job, timeout=600, download_to=tmp_path / "results")
        assert outcome.status == "FINISHED:COMPLETED"
        res = fed.collect(outcome, require_cross_site=False, require_records=False)  # every error log empty
    finally:
        left = fed.stop()
    assert not left and not _processes_under(fed.workspace)

    # The server's model: ciphertexts only, nothing a server operator could load as weights.
    saved = torch.load(res.global_model, map_location="cpu", weights_only=True)["model"]  # bytes load restricted
    assert saved and all(isinstance(v, bytes) for v in saved.values())
    # A site's secret key decrypts it into the configured network.
    net = build_model(exp.model, exp.task)
    state = decrypt_global_model(res.global_model, fed.kit("site-1"), net)
    net.load_state_dict(state)
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())

    # The sites validated the decrypted global model of each round: the aggregate is a real model.
    site_log = (fed.kit("site-1") / outcome.job_id / "log.txt").read_text(errors="ignore")
    assert "Decryption time" in site_log
    for site in sites:
        acc = EventAccumulator(str(res.tb_logdir / site))
        acc.Reload()
        auc = acc.Scalars("val/auc_mean")
        assert [e.step for e in auc] == [0, 1]
        assert all(math.isfinite(e.value) and 0.0 <= e.value <= 1.0 for e in auc)
