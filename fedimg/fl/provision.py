"""Provisioning: fedimg's site policies in every startup kit (an NVFlare ``Builder`` for ``project.yml``).

``nvflare provision -p configs/federation/project.yml`` runs NVFlare's
builders (workspace, static files, mTLS certificates, signatures) and then
:class:`SitePolicyBuilder`, which:

* writes each site's ``local/privacy.json`` (the ``public`` and ``strict``
  scopes of ``configs/federation/privacy.json``) and ``local/authorization.json``;
* adds ``fedimg`` to the component allow-list of every participant's
  ``local/resources.json.default``, so fedimg's controller, receiver and
  privacy filters may be built;
* moves the server's job store and snapshot storage from ``/tmp`` to
  ``server_storage_root`` (a reboot must not lose running or finished jobs).

A site may edit its ``local/`` files after receiving its kit: they are the
site's own policy, enforced by its client whatever a job says.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from nvflare.lighter.spec import Builder

ALLOW_PREFIX = "fedimg"


def _read_json(path: str, what: str) -> Any:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"SitePolicyBuilder: {what} {p.resolve()} does not exist; paths in project.yml are "
            "relative to the folder `nvflare provision` runs in"
        )
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"SitePolicyBuilder: {what} {p} is not valid JSON ({exc.msg} at line {exc.lineno})") from None


def check_privacy_policy(policy: Any) -> list[str]:
    """Scope names of a privacy policy, after checking its shape.

    Raises:
        ValueError: no scopes, a scope without a name, duplicate names, or a
            default scope that is not defined.
    """
    if not isinstance(policy, dict) or not isinstance(policy.get("scopes"), list) or not policy["scopes"]:
        raise ValueError('privacy policy: expected {"scopes": [...], "default_scope": ...} with at least one scope')
    names = [s.get("name") for s in policy["scopes"]]
    if any(not isinstance(n, str) or not n for n in names) or len(set(names)) != len(names):
        raise ValueError(f"privacy policy: every scope needs a unique name, got {names}")
    default = policy.get("default_scope")
    if default is not None and default not in names:
        raise ValueError(f"privacy policy: default_scope {default!r} is not one of the scopes {names}")
    return names


class SitePolicyBuilder(Builder):
    """Put fedimg's privacy and authorization policies into the kits; keep server storage out of ``/tmp``.

    Args:
        privacy_file: the sites' ``privacy.json``.
        authorization_file: the sites' ``authorization.json``.
        server_storage_root: folder for the server's job store and snapshots.
    """

    def __init__(
        self,
        privacy_file: str = "configs/federation/privacy.json",
        authorization_file: str = "configs/federation/authorization.json",
        server_storage_root: str = "/var/lib/nvflare",
    ) -> None:
        self.privacy_file = privacy_file
        self.authorization_file = authorization_file
        self.server_storage_root = server_storage_root

    def build(self, project: Any, ctx: Any) -> None:
        """Write the policy files and adjust the resources of every participant."""
        privacy = _read_json(self.privacy_file, "privacy_file")
        check_privacy_policy(privacy)
        authorization = _read_json(self.authorization_file, "authorization_file")
        if not os.path.isabs(self.server_storage_root) or self.server_storage_root.startswith("/tmp"):
            raise ValueError(
                f"SitePolicyBuilder: server_storage_root must be an absolute path outside /tmp, got "
                f"{self.server_storage_root!r}"
            )
        for client in project.get_clients():
            local = Path(ctx.get_local_dir(client))
            (local / "privacy.json").write_text(json.dumps(privacy, indent=2) + "\n")
            (local / "authorization.json").write_text(json.dumps(authorization, indent=2) + "\n")
            self._allow_fedimg(local / "resources.json.default")
        server = project.get_server()
        if server is not None:
            local = Path(ctx.get_local_dir(server))
            self._allow_fedimg(local / "resources.json.default")
            self._server_storage(local / "resources.json.default")

    @staticmethod
    def _allow_fedimg(path: Path) -> None:
        if not path.is_file():
            return
        res = json.loads(path.read_text())
        allow = list(res.get("class_allow_list") or [])
        if ALLOW_PREFIX not in allow:
            res["class_allow_list"] = [*allow, ALLOW_PREFIX]
        path.write_text(json.dumps(res, indent=2) + "\n")

    def _server_storage(self, path: Path) -> None:
        if not path.is_file():
            return
        res = json.loads(path.read_text())
        root = self.server_storage_root.rstrip("/")
        snap = res.get("snapshot_persistor", {}).get("args", {}).get("storage", {}).get("args", {})
        if "root_dir" in snap:
            snap["root_dir"] = f"{root}/snapshot-storage"
        for comp in res.get("components", []):
            args = comp.get("args", {})
            if comp.get("id") == "job_manager" and "uri_root" in args:
                args["uri_root"] = f"{root}/jobs-storage"
        path.write_text(json.dumps(res, indent=2) + "\n")


__all__ = ["SitePolicyBuilder", "check_privacy_policy"]
