"""Launching a federated job: the simulator, NVFlare POC, a provisioned federation, or an exported job folder.

One code path behind ``fedimg fl run | export | evaluate`` and
``jobs/train/job.py``:

- :func:`run` trains the experiment (``--env sim``: every site on this
  machine; ``poc``: real server and site processes with mTLS on this machine;
  ``prod``: a provisioned federation through an admin's startup kit), then
  checks what it produced (models, round records, every error log);
- :func:`export` writes the job folder for ``nvflare job submit -j``;
- :func:`evaluate` sends a given model package to every site, which scores
  it on its validation (and held-out test) cases; nothing is trained, the
  server writes the table. The package may come from another federation.

Sites are named ``NAME=SITE_YAML`` where this machine runs them (sim, POC)
and ``NAME`` alone in production, where each site's own client sets
``FEDIMG_SITE_CONFIG``.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedimg import config as cfgmod
from fedimg.config import ExperimentConfig
from fedimg.errors import UserError
from fedimg.fl.simulate import SimulationResult, collect, run_simulation, stage_weights, write_packages
from fedimg.resources import config_path, job_dir

logger = logging.getLogger(__name__)

ENVS = ("sim", "poc", "prod")


class LaunchError(UserError, ValueError):
    """The job cannot be launched as asked (a missing site YAML, kit or name)."""


@dataclass
class Target:
    """Where a job runs.

    Attributes:
        env: ``sim``, ``poc`` or ``prod``.
        sites: site name -> its site YAML (sim, POC) or None (prod, export).
        workspace: the run's folder (simulator workspace; POC workspace, staging and downloads).
        timeout: POC/prod: seconds until the job is aborted (0: ``fed.first_round_timeout_s`` x (rounds + 2)).
        privacy_file: POC: every site's ``local/privacy.json``.
        authorization_file: POC: every site's ``local/authorization.json``.
        startup_kit: prod: the admin's provisioned startup kit folder.
        admin: prod: the admin's name in the project.
        spec_file: the preprocessing spec the sites used, for the run's model packages when no site's
            data is on this machine (prod); sim and POC read it beside the sites' datalists.
    """

    env: str
    sites: dict[str, str | None]
    workspace: Path
    timeout: int = 0
    privacy_file: str | None = None
    authorization_file: str | None = None
    startup_kit: str | None = None
    admin: str | None = None
    spec_file: str | None = None

    def __post_init__(self) -> None:
        if self.env not in ENVS:
            raise LaunchError(f"--env must be one of {', '.join(ENVS)}, got {self.env!r}")
        if not self.sites:
            raise LaunchError("name the participating sites: --site NAME=SITE_YAML (repeatable; NAME alone in prod)")
        missing = [n for n, p in self.sites.items() if p is None]
        if self.env in ("sim", "poc") and missing:
            raise LaunchError(
                f"--env {self.env} runs every site on this machine and needs each site's YAML: --site {missing[0]}=PATH"
            )
        if self.env == "prod" and (not self.startup_kit or not self.admin):
            raise LaunchError("--env prod needs --startup-kit (the admin's provisioned kit) and --admin (its name)")


def parse_sites(items: list[str] | None) -> dict[str, str | None]:
    """``NAME[=SITE_YAML]`` arguments as site -> YAML path (None without one); names are validated.

    Raises:
        fedimg.config.ConfigError: a name that is not one safe path component.
    """
    sites: dict[str, str | None] = {}
    for item in items or []:
        name, _, path = item.partition("=")
        sites[cfgmod.validate_site_name(name, "--site NAME[=SITE_YAML]")] = path or None
    return sites


def export(exp: ExperimentConfig, sites: list[str], out_dir: str | Path) -> Path:
    """The job folder for ``nvflare job submit -j`` (no site path enters it).

    Returns:
        ``out_dir/<experiment name>``.
    """
    from fedimg.fl.recipe import build_recipe, in_staging

    out = Path(out_dir).resolve()
    staging = out / f".{exp.name}_staging"
    recipe = build_recipe(exp, job_dir(), {n: None for n in sites}, staging)
    with in_staging(staging):
        recipe.export(str(out))
    shutil.rmtree(staging, ignore_errors=True)
    return out / exp.name


@dataclass
class Launched:
    """A finished job: its checked results, and NVFlare's outcome for POC and prod."""

    result: SimulationResult
    status: str = "FINISHED:COMPLETED"
    job_id: str = "simulate_job"
    seconds: float = 0.0
    result_dir: Path | None = None

    @property
    def ok(self) -> bool:
        """The job reached NVFlare's normal end."""
        return self.status == "FINISHED:COMPLETED"


def run(exp: ExperimentConfig, target: Target, resume_from: str | Path | None = None) -> Launched:
    """Train the experiment where ``target`` says, and check its results.

    Args:
        resume_from: sim only: a finished simulator run (its ``workspace/<name>`` folder) to continue for
            ``fed.num_rounds`` more rounds.

    Raises:
        FederatedRunError / DeploymentError: the job failed or produced incomplete results.
    """
    if target.env == "sim":
        previous = None
        if resume_from is not None:
            previous = collect(Path(resume_from).resolve(), list(target.sites), require_cross_site=False)
        res = run_simulation(
            exp, job_dir(), {n: str(p) for n, p in target.sites.items()}, target.workspace, resume_from=previous
        )
        return Launched(result=res, seconds=res.seconds)
    if resume_from is not None:
        raise LaunchError(
            "--resume-from continues a simulator run; in POC or production start from a checkpoint instead"
        )
    return _deploy(exp, target, mode="train")


def evaluate(package: str | Path, target: Target, overrides: list[str] | None = None) -> Launched:
    """Every site scores a model package on its validation (and test) cases; nothing is trained.

    The package's own experiment (network, task, classes) is used; its
    ``fed`` settings are kept, but no round runs and no cross-site
    evaluation of site models happens (the sites have none).

    Args:
        package: a model package folder (``RUN/packages/best``), from any federation.
        overrides: ``KEY=VALUE`` changes to the package's experiment (e.g. ``fed.eval_timeout_s=1200``).

    Raises:
        fedimg.models.package.PackageError: the package cannot be read or does not fit its configs.
        FederatedRunError / DeploymentError: the evaluation failed or a site did not answer.
    """
    from fedimg.models.package import load_package

    pkg = load_package(package)
    data = cfgmod.apply_overrides(cfgmod.to_dict(pkg.experiment), list(overrides or []))
    exp = cfgmod.from_dict(ExperimentConfig, data)
    exp = dataclasses.replace(exp, fed=dataclasses.replace(exp.fed, cross_site_eval=False))
    if target.env == "sim":
        res = run_simulation(
            exp, job_dir(), {n: str(p) for n, p in target.sites.items()}, target.workspace, evaluate=pkg.state_dict
        )
        return Launched(result=res, seconds=res.seconds)
    return _deploy(exp, target, mode="evaluate", weights=pkg.state_dict)


def _deploy(exp: ExperimentConfig, target: Target, mode: str, weights: Any | None = None) -> Launched:
    """Run the job in POC or on a provisioned federation; download and check the results."""
    from fedimg.fl.deploy import DeploymentError, PocFederation, ProdFederation, export_job
    from fedimg.fl.recipe import build_recipe

    ws = Path(target.workspace).resolve()
    # Read before the job runs: a wrong --spec must not surface after hours of training.
    spec = cfgmod.load(cfgmod.PreprocessSpec, target.spec_file) if target.spec_file else None
    he = exp.privacy.encryption == "he"  # POC must then provision HE keys (nvflare poc prepare -he)
    timeout = target.timeout or exp.fed.first_round_timeout_s * (exp.fed.num_rounds + 2)
    staging = ws / "staging"
    initial = stage_weights(weights, staging) if weights is not None else None
    recipe = build_recipe(
        exp,
        job_dir(),
        {n: None for n in target.sites},
        staging,
        fast_polling=target.env == "poc",
        initial_ckpt=initial,
        mode=mode,
    )
    job = export_job(recipe, staging, ws / "jobs")
    checks = {
        "require_cross_site": exp.fed.cross_site_eval and mode == "train",
        "require_records": not he and mode == "train",
        "require_evaluation": mode == "evaluate",
    }
    if target.env == "poc":
        poc = PocFederation(
            ws / "poc",
            {n: str(p) for n, p in target.sites.items()},
            privacy=target.privacy_file or config_path("federation", "privacy.json"),
            authorization=target.authorization_file or config_path("federation", "authorization.json"),
            use_he=he,
        )
        poc.prepare()
        try:
            poc.start()
            outcome = poc.run(job, timeout=timeout, download_to=ws / "results")
            res = poc.collect(outcome, **checks)
        finally:
            left = poc.stop()
            if left:
                logger.warning("%d NVFlare process(es) had to be killed at the end of the POC run", len(left))
    else:
        fed = ProdFederation(str(target.admin), str(target.startup_kit))
        outcome = fed.run(job, timeout=timeout, download_to=ws / "results")
        if outcome.result_dir is None:
            raise DeploymentError(f"job {outcome.job_id} was not downloaded")
        run_dir = outcome.result_dir / "workspace"
        res = collect(outcome.result_dir, list(target.sites), run_dir=run_dir, log_dirs={"server": run_dir}, **checks)
    if mode == "train" and not he:  # an HE run's server models are ciphertext: fedimg.fl.he decrypts them at a site
        res.packages = write_packages(res, exp, {n: str(p) for n, p in target.sites.items() if p}, spec=spec)
    return Launched(
        result=res, status=outcome.status, job_id=outcome.job_id, seconds=outcome.seconds, result_dir=outcome.result_dir
    )


def describe(exp: ExperimentConfig, launched: Launched, sites: list[str]) -> str:
    """What a user reads at the end of a run: the final score per site and where everything is."""
    res = launched.result
    metric = exp.key_metric
    lines = []
    if launched.result_dir is not None:
        lines.append(
            f"job {launched.job_id}: {launched.status} in {launched.seconds:.0f} s; results in {launched.result_dir}"
        )
    evaluation = res.run_dir / "fedimg" / "evaluation.md"
    if evaluation.is_file():
        lines += [evaluation.read_text(encoding="utf-8").strip(), f"evaluation: {evaluation}"]
    elif exp.privacy.encryption == "he":
        lines.append(
            "the server holds only the encrypted global model; each site validated every round's "
            "decrypted model: see TensorBoard"
        )
    else:
        for site in sites:
            value = res.final_metric(site, metric)
            if value is None and res.final_eval():
                value = (res.final_eval() or {}).get("sites", {}).get(site, {}).get(metric)
            lines.append(f"{site}: final global model {metric} = {value if value is None else round(value, 4)}")
        best = res.summary.get("best", {}).get("value")
        lines.append(f"best model: {res.best_model} ({metric} {best})")
        if res.cross_site.is_file():
            lines.append(f"cross-site: {res.cross_site}")
        packages = getattr(res, "packages", None) or {}
        if packages:
            lines.append("model packages: " + ", ".join(f"{k} {v}" for k, v in packages.items()))
    lines.append(f"tensorboard --logdir {res.tb_logdir}")
    return "\n".join(lines)


__all__ = ["ENVS", "LaunchError", "Launched", "Target", "describe", "evaluate", "export", "parse_sites", "run"]
