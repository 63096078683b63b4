"""Build the NVFlare 2.9 recipe of an experiment: any task, any ``fed.algorithm``.

The recipe is NVFlare's PyTorch ``FedAvgRecipe`` (persistor, model locator,
script runner, per-site configuration, export) with fedimg's controller
(:class:`fedimg.fl.controller.FedimgController`) as its workflow, fedimg's
scalar-only TensorBoard receiver, and optionally cross-site evaluation with
a readable report.

The job folder (``jobs/<name>/``) holds a two-line client script that calls
:func:`fedimg.fl.client.run`; the resolved experiment YAML travels with the
job (``custom/experiment.yaml``), so server and sites agree on the model and
on the algorithm. Site-local facts (datalist paths) never enter the job,
except in the simulator, where every site lives on this machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from nvflare.app_opt.pt.recipes import FedAvgRecipe
from nvflare.client.config import TransferType

from fedimg import config as cfgmod
from fedimg.config import ExperimentConfig
from fedimg.fl.controller import FedimgController
from fedimg.fl.privacy import update_filter
from fedimg.fl.report import report_metrics
from fedimg.fl.tracking import GLOBAL_RUN, CrossSiteReport, ScalarTBReceiver
from fedimg.models.registry import model_spec

#: Task polling of the simulator and POC (every site on this machine), in seconds.
FAST_POLL_S = 0.05


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
        raise ValueError(
            f"{what} must not contain spaces (NVFlare splits script arguments on them): got a path "
            "with a space; move the folder or use a symlink without spaces"
        )


class FedimgRecipe(FedAvgRecipe):
    """NVFlare's PyTorch FedAvg recipe with :class:`FedimgController` as the workflow.

    Args:
        exp: the experiment.
        start_round: first round; -1 continues from the initial checkpoint's round count.
        **kwargs: passed to ``FedAvgRecipe``.
    """

    def __init__(self, exp: ExperimentConfig, start_round: int = 0, mode: str = "train", **kwargs: Any) -> None:
        # FedAvgRecipe builds the controller inside __init__: the settings must exist before.
        self._exp = exp
        self._start_round = start_round
        self._mode = mode
        super().__init__(**kwargs)

    def _create_controller(self, persistor_id: str, model_params: Any, model_aggregator: Any) -> FedimgController:
        # The controller reads every setting from the experiment itself: one source, no copied arguments.
        return FedimgController(
            num_clients=self.min_clients,
            num_rounds=self.num_rounds,
            experiment=json.dumps(cfgmod.to_dict(self._exp)),
            start_round=self._start_round,
            persistor_id=persistor_id or "persistor",
            mode=self._mode,
        )


def build_recipe(
    exp: ExperimentConfig,
    job_dir: str | Path,
    site_configs: Mapping[str, str | None],
    staging_dir: str | Path,
    sites_sharing_cpu: int = 1,
    initial_ckpt: str | None = None,
    start_round: int = 0,
    fast_polling: bool = False,
    mode: str = "train",
) -> Any:
    """The experiment's recipe: a :class:`FedimgRecipe`, or NVFlare's HE recipe for ``privacy.encryption: he``.

    With TensorBoard tracking and (if configured) cross-site evaluation.

    Args:
        exp: the experiment.
        job_dir: folder holding ``client.py`` (the job's client script).
        site_configs: site name -> path of its site YAML (simulator), or None
            (real sites: the site sets ``FEDIMG_SITE_CONFIG``).
        staging_dir: empty folder where the job's files are assembled; export
            and execution must run with it as working directory (see
            :func:`in_staging`).
        sites_sharing_cpu: processes training on one machine (simulator), so
            each sizes its thread pool.
        initial_ckpt: absolute path of a checkpoint to start from (resume). Without
            one, training starts from the network built with ``train.seed``
            (:func:`stage_seeded_model`): the same first global model in every run.
        start_round: first round number; -1 continues the checkpoint's rounds.
        fast_polling: sites ask for their next task every :data:`FAST_POLL_S`
            instead of NVFlare's 2 s (for the simulator and POC on one machine).
        mode: ``train``, or ``evaluate``: the sites score ``initial_ckpt`` once,
            nothing is trained (no cross-site evaluation: sites have no models of their own).

    Raises:
        ValueError: no sites, too few sites for ``fed.min_clients``, a site named
            ``global``, or a path NVFlare cannot pass on.
    """
    if exp.privacy.encryption == "he":
        return build_he_recipe(exp, job_dir, site_configs, staging_dir, sites_sharing_cpu, initial_ckpt, fast_polling)
    staging, min_clients = _stage(exp, job_dir, list(site_configs), staging_dir)
    if initial_ckpt is None and mode == "train":
        initial_ckpt = stage_seeded_model(exp, staging)
    base_args = f"--config experiment.yaml --sites-sharing-cpu {int(sites_sharing_cpu)}"
    transfer = TransferType.DIFF if exp.fed.exchange == "diff" else TransferType.FULL
    with _chdir(staging):
        recipe = FedimgRecipe(
            exp,
            start_round=start_round,
            mode=mode,
            name=exp.name,
            model=model_spec(exp.model, exp.task),
            initial_ckpt=initial_ckpt,
            min_clients=min_clients,
            num_rounds=exp.fed.num_rounds,
            train_script="client.py",
            train_args=base_args,
            params_transfer_type=transfer,
            key_metric="",  # fedimg's controller selects the best model itself (on the rated model)
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
            from nvflare.recipe import set_per_site_config

            set_per_site_config(recipe, per_site)
        flt = update_filter(exp.privacy)
        if flt is not None:
            # Job-specified: every site filters its training result (a site's own scope may add more).
            recipe.add_client_output_filter(flt, tasks=["train"])
        _add_common(recipe, exp, fast_polling)
        if exp.fed.cross_site_eval and mode == "train":
            from nvflare.recipe import add_cross_site_evaluation

            add_cross_site_evaluation(
                recipe, submit_model_timeout=exp.fed.eval_timeout_s, validation_timeout=exp.fed.eval_timeout_s
            )
            recipe._job.to_server(CrossSiteReport(report_metrics(exp)), "cross_site_report")  # noqa: SLF001
    return recipe


def build_he_recipe(
    exp: ExperimentConfig,
    job_dir: str | Path,
    site_configs: Mapping[str, str | None],
    staging_dir: str | Path,
    sites_sharing_cpu: int = 1,
    initial_ckpt: str | None = None,
    fast_polling: bool = False,
) -> Any:
    """The experiment as NVFlare's ``FedAvgRecipeWithHE`` (``privacy.encryption: he``).

    Each site encrypts its weights (CKKS, TenSEAL), pre-multiplied by its
    number of local steps; the server adds ciphertexts and never holds a
    readable update or global model (its checkpoints are ciphertexts too);
    each site decrypts the next round's global model with the secret key
    from its startup kit. The keys come from provisioning (``nvflare poc
    prepare -he``, or the HE builder in ``project.yml``), so this runs in POC
    or production, not in the simulator. NVFlare's ``ScatterAndGather``
    is the workflow: fedimg's screening, robust aggregation, best-model
    choice and final evaluation need plaintext and are refused by the config
    check. Sites still validate every global model they receive and stream
    those scalars to the server's TensorBoard.

    Raises:
        ValueError: a site config path given (the simulator), a site named
            ``global``, too few sites, or the ``tenseal`` package missing.
    """
    try:
        import tenseal  # noqa: F401
    except ImportError:
        raise ValueError(
            "privacy.encryption he needs TenSEAL on the server and every site: "
            "pip install 'nvflare[HE]' (see docs/federation.md, Homomorphic encryption)"
        ) from None
    from nvflare.app_opt.pt.recipes.fedavg_he import FedAvgRecipeWithHE

    if any(p is not None for p in site_configs.values()):
        raise ValueError(
            "privacy.encryption he needs the HE keys of a provisioned federation: run it with "
            "--env poc or --env prod (the simulator has no keys)"
        )
    staging, min_clients = _stage(exp, job_dir, list(site_configs), staging_dir)
    initial_ckpt = initial_ckpt or stage_seeded_model(exp, staging)
    with _chdir(staging):
        recipe = FedAvgRecipeWithHE(
            name=exp.name,
            model=model_spec(exp.model, exp.task),
            initial_ckpt=initial_ckpt,
            min_clients=min_clients,
            num_rounds=exp.fed.num_rounds,
            train_script="client.py",
            train_args=f"--config experiment.yaml --sites-sharing-cpu {int(sites_sharing_cpu)}",
        )
        _add_common(recipe, exp, fast_polling)
    return recipe


def _stage(exp: ExperimentConfig, job_dir: str | Path, names: list[str], staging_dir: str | Path) -> tuple[Path, int]:
    """Check the sites, copy the client script and the experiment into ``staging_dir``.

    Returns:
        The resolved staging folder and the number of sites a round needs.
    """
    job_dir = Path(job_dir).resolve()
    if not (job_dir / "client.py").is_file():
        raise FileNotFoundError(f"{job_dir}/client.py not found: expected the job's client script there")
    if not names:
        raise ValueError("at least one site is needed")
    for name in names:
        cfgmod.validate_site_name(name)  # names NVFlare clients and their workspace folders
    if GLOBAL_RUN in names:
        raise ValueError(f"a site may not be named {GLOBAL_RUN!r}: TensorBoard shows the federation under that name")
    min_clients = exp.fed.min_clients or len(names)
    if min_clients > len(names):
        raise ValueError(f"fed.min_clients is {min_clients} but only {len(names)} site(s) are configured")
    staging = Path(staging_dir).resolve()
    staging.mkdir(parents=True, exist_ok=True)
    shutil.copy2(job_dir / "client.py", staging / "client.py")
    cfgmod.save(exp, staging / "experiment.yaml")
    return staging, min_clients


SEEDED_MODEL = "seeded_initial_model.pt"


def stage_seeded_model(exp: ExperimentConfig, staging: Path) -> str:
    """Write the network built with ``train.seed`` into the job's staging folder as its first global model.

    Without it the server builds the network with whatever state its random
    generator has, and two runs of one experiment start from different
    weights. The caller's random state is left as it was.

    Returns:
        The checkpoint's name relative to the staging folder (NVFlare bundles it with the server app).
    """
    import torch

    from fedimg.models.registry import build_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(exp.train.seed)
        state = build_model(exp.model, exp.task).state_dict()
    return stage_weights(state, staging, SEEDED_MODEL)


EVALUATED_MODEL = "evaluated_model.pt"


def stage_weights(state: Any, staging: Path, name: str = EVALUATED_MODEL) -> str:
    """Write weights into the job's staging folder (atomically); NVFlare bundles them with the server app.

    Returns:
        The checkpoint name relative to the staging folder (what the recipe's ``initial_ckpt`` takes).
    """
    import torch

    staging.mkdir(parents=True, exist_ok=True)
    tmp = staging / f".{name}.tmp"
    torch.save({"model": {k: v.detach().cpu() for k, v in state.items()}}, tmp)
    tmp.replace(staging / name)
    return name


def _add_common(recipe: Any, exp: ExperimentConfig, fast_polling: bool) -> None:
    """What every fedimg job has, with or without HE: installed package, config, scalar TensorBoard, scope."""
    # Server and sites run the installed fedimg: NVFlare must not bundle its source into custom/.
    recipe._job.set_app_packages(["fedimg"])  # noqa: SLF001
    recipe.add_client_file("experiment.yaml")
    # Server-side TensorBoard: scalars only, no host name in event file names.
    recipe._job.to_server(ScalarTBReceiver(), "receiver")  # noqa: SLF001 - as add_experiment_tracking does
    if exp.fed.scope:
        from nvflare.apis.job_def import JobMetaKey
        from nvflare.recipe.utils import set_recipe_meta

        set_recipe_meta(recipe, JobMetaKey.SCOPE, exp.fed.scope)
    if fast_polling:
        # On one machine a poll costs nothing: sites ask for their next task every 50 ms (NVFlare: the server's
        # 2 s), and retry as often when none is ready (NVFlare: 0.5 s).
        recipe.add_server_config({"server": {"task_request_interval": FAST_POLL_S}})
        recipe.add_client_config({"default_task_fetch_interval": FAST_POLL_S})


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
