"""The trust boundary on a real deployment: NVFlare POC (real server and site processes, mTLS), fedimg's policies.

One POC federation (2 sites, ``configs/federation/privacy.json`` and
``authorization.json`` installed; the default scope ``public`` runs the
scalar-only guard at each site):

* users whose role has no submit right (``member``, ``org_admin``) are
  refused by the server, and nothing of their job is run;
* a job submitted by a ``lead`` whose client script makes site-2 try to send
  a string (round 0) and a tensor of case identifiers (round 1) is stopped
  at site-2 by its guard: the server records site-2 as ``BLOCKED_AT_SITE``
  each round and goes on with site-1; the text never reaches the server.
"""

from __future__ import annotations

import json

import pytest

from fedimg import config as cfg
from tests.conftest import POC_TEST_PORTS, REPO, tiny_classification

# Each POC test file has its own port (tests/conftest.py POC_TEST_PORTS): their federations run side by side.
pytestmark = [pytest.mark.nvflare, pytest.mark.slow, pytest.mark.integration, pytest.mark.poc]
FED = REPO / "configs" / "federation"
SECRET = "PATIENT^DOE^JOHN"

LEAKY_CLIENT = f'''"""A site job that tries to send what the scalar-only guard must stop (tests/safety)."""

from pathlib import Path

import torch

from fedimg.fl import client

_honest = client.SiteRunner.handle


def handle(self, model):
    out = _honest(self, model)
    if self.site_name == "site-2" and out.params:
        if int(model.current_round or 0) == 0:
            out.metrics["note"] = "{SECRET}"  # a string among the metrics
        else:
            out.params["case_ids"] = torch.arange(1000, 1010)  # identifiers as an integer tensor
    return out


client.SiteRunner.handle = handle

if __name__ == "__main__":
    client.run(script_dir=Path(__file__).resolve().parent)
'''


@pytest.fixture(scope="module")
def poc(cls_sites, tmp_path_factory):
    from fedimg.fl.deploy import PocFederation, _processes_under

    work = tmp_path_factory.mktemp("poc_boundary")
    sites = {}
    for site, dl in cls_sites[2].items():
        cfg.save(cfg.SiteConfig(name=site, datalist=str(dl), device="cpu", num_threads=1), work / f"{site}.yaml")
        sites[site] = str(work / f"{site}.yaml")
    fed = PocFederation(
        work / "poc",
        sites,
        privacy=FED / "privacy.json",
        authorization=FED / "authorization.json",
        port=POC_TEST_PORTS["boundary"],
    )
    fed.prepare()
    member = fed.add_user("member", "member@nvidia.com")
    fed.start()
    yield fed, member, work
    left = fed.stop()
    assert not left, f"NVFlare processes had to be killed: {left}"
    assert not _processes_under(fed.workspace)


def _job(exp, work, name, job_dir):
    from fedimg.fl.deploy import export_job
    from fedimg.fl.recipe import build_recipe

    recipe = build_recipe(exp, job_dir, {"site-1": None, "site-2": None}, work / f"staging_{name}", fast_polling=True)
    return export_job(recipe, work / f"staging_{name}", work / f"jobs_{name}")


def test_roles_without_submit_rights_are_refused(poc):
    from nvflare.fuel.flare_api.api_spec import AuthorizationError

    from fedimg.fl.deploy import Federation

    fed, member, work = poc
    policy = json.loads((FED / "authorization.json").read_text())["permissions"]
    assert "submit_job" not in policy["member"] and policy["org_admin"]["submit_job"] == "none"
    job = _job(tiny_classification(2, name="poc_denied"), work, "denied", REPO / "jobs" / "train")
    org_admin = Federation("org-admin@nvidia.com", fed.kit("org-admin@nvidia.com"))
    for user in (member, org_admin):
        with pytest.raises(AuthorizationError, match=f"user '{user.admin_user}' is not authorized for 'submit_job'"):
            user.submit(job)
    sess = fed.session()
    try:
        assert not sess.list_jobs(name_prefix="poc_denied")  # nothing was stored or run
    finally:
        sess.close()


def test_a_site_job_sending_a_string_or_identifiers_is_stopped_at_the_site(poc):
    from fedimg.fl.deploy import Federation

    fed, _, work = poc
    job_dir = work / "leaky_job"
    job_dir.mkdir()
    (job_dir / "client.py").write_text(LEAKY_CLIENT)
    exp = tiny_classification(2, name="poc_leak", **{"fed.min_clients": 1, "fed.cross_site_eval": "false"})
    lead = Federation("lead@nvidia.com", fed.kit("lead@nvidia.com"))  # a lead may submit (and bring its script)
    outcome = lead.run(_job(exp, work, "leak", job_dir), timeout=600, download_to=work / "results_leak")
    assert outcome.status == "FINISHED:COMPLETED"
    run_dir = outcome.result_dir / "workspace"
    rounds = [json.loads(line) for line in (run_dir / "fedimg" / "rounds.jsonl").read_text().splitlines()]
    train = [r for r in rounds if not r.get("final_eval")]
    assert [r["round"] for r in train] == [0, 1]
    for r in train:  # stopped at the site, visible on the server, the round went on with site-1
        assert r["contributed"] == ["site-1"] and list(r["rejected"]) == ["site-2"], r
        assert r["rejected"]["site-2"].startswith("BLOCKED_AT_SITE"), r
    server_log = (run_dir / "log.txt").read_text(errors="ignore")  # the job's server log, downloaded
    assert "round 0: update of site-2 rejected: BLOCKED_AT_SITE" in server_log
    metrics = [json.loads(line) for line in (run_dir / "fedimg" / "global_metrics.jsonl").read_text().splitlines()]
    assert all(m["rejected"]["site-2"].startswith("BLOCKED_AT_SITE") for m in metrics[:2])  # its validation too
    # The site said why (the kind of value, never the value); nothing of it reached the server.
    site_log = (fed.kit("site-2") / outcome.job_id / "log.txt").read_text(errors="ignore")
    assert "scalar-only guard blocked this result" in site_log and "a metric that is a str" in site_log
    assert "an entry of dtype int64 with 10 value(s)" in site_log
    assert SECRET not in site_log and SECRET not in server_log
    for path in outcome.result_dir.rglob("*"):
        if path.is_file() and path.suffix != ".py":  # the job's own script holds the text it tried to send
            assert SECRET.encode() not in path.read_bytes(), path
