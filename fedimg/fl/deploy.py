"""Running fedimg jobs on a real NVFlare deployment: POC on this machine, or a provisioned federation.

* :class:`PocFederation` prepares NVFlare's POC (``nvflare poc prepare``: a
  real server and one real client process per site on loopback, with mTLS
  certificates), installs fedimg's site policies (``privacy.json``,
  ``authorization.json``) into every site's ``local/`` (the authorization
  policy into the server's too), can add admin users of other roles
  (:meth:`PocFederation.add_user`), starts each site with
  its own ``FEDIMG_SITE_CONFIG``, and on :meth:`stop` stops every process and
  checks that none is left.
* :class:`ProdFederation` talks to a provisioned federation through an admin
  startup kit (mTLS), as ``nvflare job submit`` does.

Both submit an exported job folder, monitor it to a terminal state within a
time limit, and download the server's workspace of the job (global and best
model, TensorBoard events, cross-site results, fedimg's round records).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedimg.config import validate_site_name
from fedimg.errors import UserError

logger = logging.getLogger(__name__)

POC_ADMIN = "admin@nvidia.com"
POC_PORT = 8002  # NVFlare's POC server port (also its admin port)


def poc_lock(port: int) -> Path:
    """The machine-wide lock file of the POC federations that listen on ``port``."""
    return Path(os.environ.get("TMPDIR", "/tmp")) / f"fedimg-nvflare-poc-{port}.lock"


TERMINAL = (
    "FINISHED:COMPLETED",
    "FINISHED:ABORTED",
    "FINISHED:EXECUTION_EXCEPTION",
    "FINISHED:ABNORMAL",
    "FAILED_TO_RUN",
    "FINISHED:CANT_SCHEDULE",
)


class DeploymentError(UserError, RuntimeError):
    """A federation could not be started, a job did not finish, or processes were left behind."""


@dataclass
class JobOutcome:
    """A finished job.

    Attributes:
        job_id: NVFlare's job id.
        status: the terminal status (``FINISHED:COMPLETED`` when it went well).
        seconds: from submission to the terminal state.
        result_dir: the downloaded server workspace of the job (None if not downloaded).
    """

    job_id: str
    status: str
    seconds: float
    result_dir: Path | None


class Federation:
    """Submit, monitor and download jobs through an admin startup kit (Flare API, mTLS).

    Args:
        admin_user: the admin's name in the project (``lead@...`` / ``admin@...``).
        admin_kit: the admin's startup kit folder (holding ``startup/``).
    """

    def __init__(self, admin_user: str, admin_kit: str | Path) -> None:
        self.admin_user = admin_user
        self.admin_kit = Path(admin_kit)

    def session(self, timeout: float = 30.0) -> Any:
        """A new secure Flare API session (close it after use)."""
        from nvflare.fuel.flare_api.flare_api import new_secure_session

        if not (self.admin_kit / "startup").is_dir():
            raise DeploymentError(
                f"admin startup kit {self.admin_kit} has no startup/ folder; pass the admin's "
                "provisioned kit (e.g. prod_00/lead@example.org)"
            )
        return new_secure_session(self.admin_user, str(self.admin_kit), timeout=timeout)

    def connected_sites(self) -> list[str]:
        """Names of the sites connected to the server now."""
        sess = self.session()
        try:
            info = sess.get_system_info()
            return sorted(c.name for c in info.client_info)
        finally:
            sess.close()

    def wait_for_sites(self, sites: list[str], timeout: float = 120.0) -> None:
        """Block until every site in ``sites`` is connected.

        Raises:
            DeploymentError: not all connected within ``timeout`` seconds (names the missing ones).
        """
        deadline = time.time() + timeout
        missing = list(sites)
        while time.time() < deadline:
            try:
                missing = [s for s in sites if s not in self.connected_sites()]
            except Exception as exc:  # noqa: BLE001 - the server may still be starting
                logger.debug("server not reachable yet: %s", exc)
            if not missing:
                return
            time.sleep(2.0)
        raise DeploymentError(
            f"sites {missing} did not connect to the server within {timeout:.0f} s; see their poc_console.log / log.txt"
        )

    def wait_for_server(self, timeout: float = 120.0) -> None:
        """Block until the server answers an admin login (a new session each try).

        Raises:
            DeploymentError: no answer within ``timeout`` seconds.
        """
        deadline = time.time() + timeout
        last = ""
        while time.time() < deadline:
            try:
                self.connected_sites()
                return
            except Exception as exc:  # noqa: BLE001 - the server may still be starting
                last = str(exc)[:200]
            time.sleep(2.0)
        raise DeploymentError(
            f"the server did not answer an admin login within {timeout:.0f} s ({last}); see the server's log.txt"
        )

    def submit(self, job_dir: str | Path) -> str:
        """Submit an exported job folder; returns its job id."""
        sess = self.session()
        try:
            return sess.submit_job(str(Path(job_dir).resolve()))
        finally:
            sess.close()

    def status(self, job_id: str) -> str:
        """The job's current status."""
        sess = self.session()
        try:
            return str(sess.get_job_meta(job_id).get("status", "UNKNOWN"))
        finally:
            sess.close()

    def wait(self, job_id: str, timeout: float) -> str:
        """Block until the job reaches a terminal state; abort it past ``timeout`` seconds.

        Returns:
            the terminal status.

        Raises:
            DeploymentError: the job was still running after ``timeout`` (it is aborted first).
        """
        deadline = time.time() + timeout
        while time.time() < deadline:
            status = self.status(job_id)
            if status in TERMINAL or status.startswith("FINISHED"):
                return status
            time.sleep(2.0)
        self.abort(job_id)
        raise DeploymentError(f"job {job_id} did not finish within {timeout:.0f} s; it was aborted")

    def abort(self, job_id: str) -> None:
        """Abort a job (no error if it already ended)."""
        sess = self.session()
        try:
            sess.abort_job(job_id)
        except Exception as exc:  # noqa: BLE001 - already finished
            logger.debug("abort %s: %s", job_id, exc)
        finally:
            sess.close()

    def download(self, job_id: str, dest: str | Path) -> Path:
        """Download the job's server workspace into ``dest``; returns the job's folder there."""
        sess = self.session()
        try:
            path = sess.download_job_result(job_id, destination=str(dest))
        finally:
            sess.close()
        if not path or not Path(path).is_dir():
            raise DeploymentError(f"job {job_id}: the server returned no result to download")
        return Path(path)

    def run(self, job_dir: str | Path, timeout: float, download_to: str | Path | None = None) -> JobOutcome:
        """Submit, wait for the end, download (when asked)."""
        t0 = time.time()
        job_id = self.submit(job_dir)
        logger.info("submitted job %s", job_id)
        status = self.wait(job_id, timeout)
        result = self.download(job_id, download_to) if download_to is not None else None
        return JobOutcome(job_id=job_id, status=status, seconds=time.time() - t0, result_dir=result)


def install_site_policies(site_local: Path, privacy: Path | None, authorization: Path | None) -> None:
    """Copy a site's privacy and authorization policies into its ``local/`` folder (validated first)."""
    from fedimg.fl.provision import check_privacy_policy

    site_local.mkdir(parents=True, exist_ok=True)
    if privacy is not None:
        check_privacy_policy(json.loads(Path(privacy).read_text()))
        shutil.copy2(privacy, site_local / "privacy.json")
    if authorization is not None:
        json.loads(Path(authorization).read_text())
        shutil.copy2(authorization, site_local / "authorization.json")
    res = site_local / "resources.json.default"
    if res.is_file():
        from fedimg.fl.provision import SitePolicyBuilder

        SitePolicyBuilder._allow_fedimg(res)  # noqa: SLF001 - the same rule as provisioning


def _processes_under(path: Path) -> list[int]:
    """PIDs whose command line mentions ``path`` (the NVFlare processes of one workspace)."""
    needle = str(path)
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="ignore")
        except OSError:
            continue
        if needle in cmd:
            pids.append(int(proc.name))
    return pids


class PocFederation(Federation):
    """NVFlare POC on this machine: real server and site processes on loopback with mTLS.

    Args:
        workspace: POC workspace (``NVFLARE_POC_WORKSPACE``); recreated by :meth:`prepare`.
        site_configs: site name -> its site YAML (set as that site's ``FEDIMG_SITE_CONFIG``).
        privacy: ``privacy.json`` for every site's ``local/`` (None: no site privacy policy).
        authorization: ``authorization.json`` for every site's ``local/``.
        use_he: provision homomorphic-encryption contexts (needs ``nvflare[HE]``: tenseal).
        port: the server's port on loopback (NVFlare's 8002 by default). POC federations on the same
            port take turns; on different ports they run side by side.
    """

    def __init__(
        self,
        workspace: str | Path,
        site_configs: dict[str, str],
        privacy: str | Path | None = None,
        authorization: str | Path | None = None,
        use_he: bool = False,
        port: int = POC_PORT,
    ) -> None:
        if not 1024 <= int(port) <= 65535:
            raise DeploymentError(f"POC port must be 1024..65535, got {port}")
        self.port = int(port)
        self.workspace = Path(workspace).resolve()
        # Each site names a POC kit folder and an NVFlare client.
        self.site_configs = {validate_site_name(s): str(Path(p).resolve()) for s, p in site_configs.items()}
        self.privacy = Path(privacy) if privacy else None
        self.authorization = Path(authorization) if authorization else None
        self.use_he = use_he
        self._lock: Any = None
        super().__init__(POC_ADMIN, self.workspace / "example_project" / "prod_00" / POC_ADMIN)

    def _acquire_port(self, timeout: float) -> None:
        # POCs on one port take turns: other runs wait until the port is free.
        if self._lock is not None:
            return
        lock = poc_lock(self.port)
        f = open(lock, "a+")  # noqa: SIM115 - held until stop()
        deadline = time.time() + timeout
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.time() > deadline:
                    f.close()
                    raise DeploymentError(
                        f"another NVFlare POC on this machine held port {self.port} ({lock}) for "
                        f"more than {timeout:.0f} s; stop it (nvflare poc stop) and retry"
                    ) from None
                time.sleep(2.0)
        self._lock = f

    def _release_port(self) -> None:
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def _env(self, site: str | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env["NVFLARE_POC_WORKSPACE"] = str(self.workspace)
        # The POC start scripts run `python3`: make it this environment's interpreter.
        env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
        if site is not None:
            env["FEDIMG_SITE_CONFIG"] = self.site_configs[site]
        return env

    def _nvflare(self, *args: str, site: str | None = None, timeout: float = 180.0) -> str:
        exe = Path(sys.executable).with_name("nvflare")
        proc = subprocess.run(
            [str(exe), "poc", *args],
            env=self._env(site),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=str(self.workspace.parent),
            input="y\n",
        )
        if proc.returncode != 0:
            raise DeploymentError(
                f"`nvflare poc {' '.join(args)}` failed ({proc.returncode}): {(proc.stderr or proc.stdout)[-1500:]}"
            )
        return proc.stdout

    def kit(self, participant: str) -> Path:
        """A participant's POC startup kit folder."""
        return self.workspace / "example_project" / "prod_00" / participant

    def prepare(self) -> None:
        """Provision a fresh POC (mTLS kits) and install the site policies."""
        if self.workspace.exists():
            if any(self.workspace.iterdir()) and not (self.workspace / "example_project").is_dir():
                # Only an earlier POC (NVFlare's example_project/ layout) is replaced: never a folder of the user's.
                raise DeploymentError(
                    f"{self.workspace} is not empty and is not an NVFlare POC workspace (no "
                    "example_project/): expected a new folder or an earlier POC; choose another "
                    "--workspace"
                )
            if _processes_under(self.workspace):
                raise DeploymentError(f"POC processes of {self.workspace} are still running; stop them first")
            shutil.rmtree(self.workspace)
        self.workspace.parent.mkdir(parents=True, exist_ok=True)
        if self.port == POC_PORT:
            args = ["prepare", "-c", *self.site_configs]
            if self.use_he:
                args.append("-he")
        else:
            args = ["prepare", "-i", str(self._project_file())]
        self._nvflare(*args)
        for site in self.site_configs:
            install_site_policies(self.kit(site) / "local", self.privacy, self.authorization)
        if self.authorization is not None:
            # The server checks an admin's rights (submit_job, ...) before any site sees the job: same policy there.
            json.loads(self.authorization.read_text())
            shutil.copy2(self.authorization, self.kit("server") / "local" / "authorization.json")

    def _project_file(self) -> Path:
        """NVFlare's own POC project (server ``server``, these sites, HE if asked) on :attr:`port`.

        Built with the functions ``nvflare poc prepare`` applies to its default project, so the kits are
        those of a default POC but for the port.
        """
        from nvflare.tool.poc import poc_commands as pc

        scratch = self.workspace.parent / f".{self.workspace.name}-project"
        scratch.mkdir(parents=True, exist_ok=True)
        project = pc.load_yaml(pc.gen_project_config_file(str(scratch)))
        project = pc.update_server_name(project)
        project = pc.update_clients(list(self.site_configs), 0, project)
        project = pc.add_he_builder(self.use_he, project)
        servers = [p for p in project["participants"] if p["type"] == "server"]
        if len(servers) != 1:
            raise DeploymentError(f"NVFlare's default POC project has {len(servers)} servers, expected 1")
        servers[0]["fed_learn_port"] = self.port
        out = scratch / "project.yml"
        pc.save_project_config(project, str(out))
        return out

    def add_user(self, role: str, email: str, org: str = "nvidia") -> Federation:
        """Provision an admin user with a certificate role (``org_admin``, ``lead``, ``member``) after :meth:`prepare`.

        Returns:
            a :class:`Federation` that logs in as that user (what the role may
            do is the server's and sites' ``authorization.json``).

        Raises:
            DeploymentError: an unknown role, or NVFlare could not provision the user.
        """
        if role not in ("org_admin", "lead", "member"):
            raise DeploymentError(f"role must be org_admin, lead or member (NVFlare's POC user roles), got {role!r}")
        self._nvflare("add-user", role, email, "--org", org)
        kit = self.kit(email)
        if not (kit / "startup").is_dir():
            raise DeploymentError(f"nvflare poc add-user {role} {email} wrote no startup kit at {kit}")
        return Federation(email, kit)

    def start(self, connect_timeout: float = 180.0, port_wait: float = 3600.0) -> None:
        """Start the server, then every site with its own site config; wait until all are connected.

        Waits up to ``port_wait`` seconds for another POC on this machine to stop first (they share a port).
        """
        self._acquire_port(port_wait)
        try:
            self._start_part("server", connect_timeout)
            self.wait_for_server(timeout=connect_timeout)
            for site in self.site_configs:
                self.start_site(site, timeout=connect_timeout)
            self.wait_for_sites(list(self.site_configs), timeout=connect_timeout)
        except BaseException:
            self.stop()  # no half-started federation left holding the port
            raise

    def start_site(self, site: str, timeout: float = 180.0) -> None:
        """Start (or restart) one site's client process; returns once it is connected."""
        self._start_part(site, timeout)
        self.wait_for_sites([site], timeout=timeout)

    def _start_part(self, part: str, timeout: float) -> None:
        """``nvflare poc start -p PART --no-wait``: fedimg checks readiness itself, with fresh sessions.

        NVFlare's own wait logs in as the admin once; a login sent in the server's first second can go
        unanswered, and the command then prints "Connecting to FLARE ..." until killed while the server
        itself runs fine (seen on a loaded 2-core machine).
        """
        self._nvflare("start", "-p", part, "--no-wait", site=part if part != "server" else None, timeout=timeout)
        if not _processes_under(self.kit(part)):
            raise DeploymentError(f"nvflare poc start -p {part} left no process running; see {self.kit(part)}/log.txt")

    def kill_site(self, site: str) -> list[int]:
        """Kill one site's processes at once (SIGKILL: a crash, not a shutdown); returns their PIDs."""
        pids = _processes_under(self.kit(site))
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return pids

    def stop(self, timeout: float = 60.0) -> list[int]:
        """Stop every POC process; kill what is left after ``timeout``.

        Returns:
            PIDs that had to be killed (empty when everything shut down by itself).
        """
        try:
            self._nvflare("stop", timeout=timeout + 30)
        except (DeploymentError, subprocess.TimeoutExpired) as exc:
            logger.warning("nvflare poc stop: %s", exc)
        deadline = time.time() + timeout
        while time.time() < deadline and _processes_under(self.workspace):
            time.sleep(1.0)
        left = _processes_under(self.workspace)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._release_port()
        return left

    def collect(
        self,
        outcome: JobOutcome,
        require_cross_site: bool = True,
        require_records: bool = True,
        require_evaluation: bool = False,
    ) -> Any:
        """Check a downloaded POC job like a simulator run (models, round records, every error log empty)."""
        from fedimg.fl.simulate import collect

        if outcome.result_dir is None:
            raise DeploymentError(f"job {outcome.job_id} was not downloaded")
        run_dir = outcome.result_dir / "workspace"
        logs = {"server": run_dir, **{s: self.kit(s) / outcome.job_id for s in self.site_configs}}
        return collect(
            outcome.result_dir,
            list(self.site_configs),
            require_cross_site=require_cross_site,
            run_dir=run_dir,
            log_dirs=logs,
            require_records=require_records,
            require_evaluation=require_evaluation,
        )

    def __enter__(self) -> PocFederation:
        self.prepare()
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class ProdFederation(Federation):
    """A provisioned federation, reached through an admin's startup kit (``prod_00/<admin>``)."""


def export_job(recipe: Any, staging: Path, out_dir: Path, scope: str | None = None) -> Path:
    """Export a recipe to ``out_dir/<job name>`` (optionally asking the sites for a privacy scope)."""
    from nvflare.apis.job_def import JobMetaKey
    from nvflare.recipe.utils import set_recipe_meta

    from fedimg.fl.recipe import in_staging

    if scope:
        set_recipe_meta(recipe, JobMetaKey.SCOPE, scope)
    out_dir.mkdir(parents=True, exist_ok=True)
    with in_staging(staging):
        recipe.export(str(out_dir))
    return out_dir / recipe.name
