"""Provisioning with configs/federation/project.yml: mTLS kits with fedimg's site policies in every local/."""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.nvflare]
FED = REPO / "configs" / "federation"


def _provision(tmp_path: Path, project: Path) -> subprocess.CompletedProcess:
    nvflare = Path(sys.executable).with_name("nvflare")
    return subprocess.run(
        [str(nvflare), "provision", "-p", str(project), "-w", str(tmp_path / "ws")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def kits(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prov")
    proc = _provision(tmp, FED / "project.yml")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return next((tmp / "ws").glob("*/prod_00"))


def test_every_kit_has_mtls_material(kits):
    server = kits / "server.example.org"
    assert {"rootCA.pem", "server.crt", "server.key"} <= {p.name for p in (server / "startup").iterdir()}
    for site in ("site-1", "site-2", "site-3"):
        names = {p.name for p in (kits / site / "startup").iterdir()}
        assert {"rootCA.pem", "client.crt", "client.key", "fed_client.json", "start.sh"} <= names
        cfg = json.loads((kits / site / "startup" / "fed_client.json").read_text())
        client = cfg["client"]
        assert client["connection_security"] == "mtls" and client["fqsn"] == site
        assert (client["ssl_cert"], client["ssl_private_key"], client["ssl_root_cert"]) == (
            "client.crt",
            "client.key",
            "rootCA.pem",
        )
        assert "BEGIN CERTIFICATE" in (kits / site / "startup" / "client.crt").read_text()
        assert "PRIVATE KEY" in (kits / site / "startup" / "client.key").read_text()
    assert (kits / "researcher@coordinating.example.org" / "startup" / "client.crt").is_file()


def test_sites_hold_fedimg_privacy_and_authorization_policies(kits):
    from fedimg.fl.provision import check_privacy_policy

    for site in ("site-1", "site-2", "site-3"):
        local = kits / site / "local"
        privacy = json.loads((local / "privacy.json").read_text())
        assert check_privacy_policy(privacy) == ["public", "strict"] and privacy["default_scope"] == "public"
        strict = next(s for s in privacy["scopes"] if s["name"] == "strict")
        paths = [f["path"] for f in strict["task_result_filters"]]
        assert paths == ["fedimg.fl.privacy.GaussianUpdateDP", "fedimg.fl.privacy.ScalarOnlyResultGuard"]
        for f in strict["task_result_filters"]:  # every filter of the policy builds, with its arguments
            module, _, cls = f["path"].rpartition(".")
            getattr(importlib.import_module(module), cls)(**f["args"])
        authz = json.loads((local / "authorization.json").read_text())
        assert authz["permissions"]["lead"]["byoc"] == "any" and authz["permissions"]["org_admin"]["byoc"] == "none"
        res = json.loads((local / "resources.json.default").read_text())
        assert "fedimg" in res["class_allow_list"]


def test_server_storage_is_outside_tmp(kits):
    text = (kits / "server.example.org" / "local" / "resources.json.default").read_text()
    assert (
        "/tmp" not in text and "/var/lib/nvflare/jobs-storage" in text and "/var/lib/nvflare/snapshot-storage" in text
    )


def test_a_policy_with_an_undefined_default_scope_is_refused(tmp_path):
    bad = tmp_path / "privacy.json"
    bad.write_text(json.dumps({"scopes": [{"name": "public"}], "default_scope": "strict"}))
    project = (FED / "project.yml").read_text().replace("configs/federation/privacy.json", str(bad))
    (tmp_path / "project.yml").write_text(project)
    proc = _provision(tmp_path, tmp_path / "project.yml")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 or "default_scope 'strict' is not one of the scopes" in out
    assert "default_scope 'strict' is not one of the scopes" in out
    shutil.rmtree(tmp_path / "ws", ignore_errors=True)
