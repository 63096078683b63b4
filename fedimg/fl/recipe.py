"""Build NVFlare 2.9 recipes from an experiment config.

The job folder (``jobs/<name>/``) holds a two-line client script that calls
:func:`fedimg.fl.client.run`; the resolved experiment YAML travels with the
job (``custom/experiment.yaml``), so server and sites agree on the model.
Site-local facts (datalist paths) never enter the job, except in the
simulator, where every site lives on this machine.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

from fedimg import config as cfgmod
from fedimg.config import ExperimentConfig
from fedimg.models.registry import model_spec


@contextlib.contextmanager
def _chdir(path: Path) -> Iterator[None]:
    # NVFlare resolves a relative train_script against the working directory and
    # then references custom/<name> in the job; an absolute path would make the
    # job run the original file in place and break on another machine.
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _check_no_spaces(value: str, what: str) -> None:
    # NVFlare splits script args with shlex(posix=False): quotes are not removed.
    if any(c.isspace() for c in value):
        raise ValueError(f"{what} must not contain spaces (NVFlare splits script arguments on them): got a path "
                         "with a space; move the folder or use a symlink without spaces")


def build_fedavg_recipe(
    exp: ExperimentConfig,
    job_dir: str | Path,
    site_configs: dict[str, str | None],
    staging_dir: str | Path,
    sites_sharing_cpu: int = 1,
    initial_ckpt: str | None = None,
):
    """A FedAvg recipe with TensorBoard tracking and cross-site evaluation.

    Args:
        exp: the experiment.
        job_dir: folder holding ``client.py`` (the job's client script).
        site_configs: site name -> path of its site YAML (simulator), or None
            (real sites: the site sets ``FEDIMG_SITE_CONFIG``).
        sites_sharing_cpu: processes training on one machine (simulator), so
            each sizes its thread pool.
        staging_dir: empty folder where the job's files are assembled; export
            and execution must run with it as working directory (see
            :func:`in_staging`).
        initial_ckpt: absolute path of a checkpoint to start from.

    Returns:
        ``nvflare.app_opt.pt.recipes.FedAvgRecipe``.
    """
    from nvflare.app_opt.pt.recipes import FedAvgRecipe
    from nvflare.recipe import add_cross_site_evaluation, set_per_site_config

    from fedimg.fl.tracking import ScalarTBReceiver

    if exp.fed.algorithm != "fedavg":
        raise ValueError(f"fed.algorithm {exp.fed.algorithm!r} has no recipe here; use fedavg")
    job_dir = Path(job_dir).resolve()
    if not (job_dir / "client.py").is_file():
        raise FileNotFoundError(f"{job_dir}/client.py not found: expected the job's client script there")
    names = list(site_configs)
    if not names:
        raise ValueError("at least one site is needed")
    min_clients = exp.fed.min_clients or len(names)
    if min_clients > len(names):
        raise ValueError(f"fed.min_clients is {min_clients} but only {len(names)} site(s) are configured")

    staging = Path(staging_dir).resolve()
    staging.mkdir(parents=True, exist_ok=True)
    shutil.copy2(job_dir / "client.py", staging / "client.py")
    cfgmod.save(exp, staging / "experiment.yaml")
    base_args = f"--config experiment.yaml --sites-sharing-cpu {int(sites_sharing_cpu)}"
    with _chdir(staging):
        recipe = FedAvgRecipe(
            name=exp.name,
            model=model_spec(exp.model, exp.task),
            initial_ckpt=initial_ckpt,
            min_clients=min_clients,
            num_rounds=exp.fed.num_rounds,
            train_script="client.py",
            train_args=base_args,
            key_metric=exp.fed.key_metric,
            key_metric_mode="max",
        )
        if any(p is not None for p in site_configs.values()):
            per_site = {}
            for name, path in site_configs.items():
                args = base_args
                if path is not None:
                    resolved = str(Path(path).resolve())
                    _check_no_spaces(resolved, f"site config path for {name}")
                    args += f" --site-config {resolved}"
                per_site[name] = {"train_script": "client.py", "train_args": args}
            # Must precede anything that adds client-side components.
            set_per_site_config(recipe, per_site)
        recipe.add_client_file("experiment.yaml")
        # Server-side TensorBoard: scalars only, no host name in event file names.
        recipe._job.to_server(ScalarTBReceiver(), "receiver")  # noqa: SLF001 - as add_experiment_tracking does
        if exp.fed.cross_site_eval:
            add_cross_site_evaluation(recipe)
    return recipe


def in_staging(staging_dir: str | Path) -> contextlib.AbstractContextManager[None]:
    """Working-directory context for ``recipe.export`` / ``recipe.execute``."""
    return _chdir(Path(staging_dir).resolve())


def simulator_gpu_config(n_sites: int) -> str | None:
    """``SimEnv(gpu_config=...)`` giving each simulated site its own GPU when there are enough.

    With at least as many GPUs as sites, each site's process sees one GPU
    through ``CUDA_VISIBLE_DEVICES`` (as ``cuda:0``). With fewer, no pinning:
    NVFlare would otherwise force one thread per GPU group and restart
    clients every round; the sites then share ``cuda:0``.
    """
    from fedimg.runtime import visible_gpu_count

    n = visible_gpu_count()
    if n >= n_sites >= 2:
        return ",".join(str(i) for i in range(n_sites))
    return None
