"""fedimg's federated training job (NVFlare 2.9 recipe): any task, any ``fed.algorithm``.

The experiment YAML chooses the task (segmentation, 2D/3D classification),
the network and the algorithm (FedAvg, FedProx, FedOpt, SCAFFOLD, FedBN).

Run in the simulator (every site on this machine)::

    python jobs/train/job.py --config configs/experiments/seg_demo.yaml --env sim \
        --site site-1=work/site-1/site.yaml --site site-2=work/site-2/site.yaml

Continue that run for more rounds (round numbers and TensorBoard curves continue)::

    python jobs/train/job.py --config ... --env sim --site ... \
        --resume-from workspace/train/seg_demo --workspace workspace/train_resumed

The same job in NVFlare's POC mode (a real server and real site processes on
this machine, mTLS, each site with fedimg's privacy scopes), downloaded and
checked, every process stopped afterwards::

    python jobs/train/job.py --config ... --env poc --site site-1=... --site site-2=... \
        --workspace workspace/poc

Submit to a provisioned federation through an admin's startup kit (sites run
their own clients with ``FEDIMG_SITE_CONFIG`` set; no site path enters the job)::

    python jobs/train/job.py --config ... --env prod --site site-1 --site site-2 \
        --startup-kit /secure/kits/researcher@org --admin researcher@org --workspace /data/fedimg_jobs

Export a job folder for ``nvflare job submit -j DIR`` (each real site points
``FEDIMG_SITE_CONFIG`` at its own site YAML; no site path enters the job)::

    python jobs/train/job.py --config configs/experiments/seg_demo.yaml \
        --site site-1 --site site-2 --export /tmp/jobs
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _normalize_export_flag(argv: list[str]) -> list[str]:
    """Accept ``--export DIR`` as well as NVFlare's own ``--export --export-dir DIR``.

    NVFlare consumes ``--export``/``--export-dir`` from ``sys.argv`` when
    ``nvflare.recipe`` is imported, so this must run before that import.
    """
    out = list(argv)
    if "--export" in out and "--export-dir" not in out:
        i = out.index("--export")
        if i + 1 < len(out) and not out[i + 1].startswith("-"):
            out[i + 1: i + 2] = ["--export-dir", out[i + 1]]
    return out


def main() -> int:
    sys.argv = [sys.argv[0], *_normalize_export_flag(sys.argv[1:])]
    exporting = "--export" in sys.argv
    export_dir = sys.argv[sys.argv.index("--export-dir") + 1] if "--export-dir" in sys.argv else "fl_job"
    # Strip the export flags ourselves, as NVFlare would, so our parser never sees them.
    rest = [a for i, a in enumerate(sys.argv[1:], start=1)
            if a not in ("--export", "--export-dir") and sys.argv[i - 1] != "--export-dir"]

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="experiment YAML (configs/experiments/)")
    p.add_argument("--env", choices=["sim", "poc", "prod"], default="sim",
                   help="sim: NVFlare simulator; poc: real processes on this machine (mTLS); prod: a provisioned "
                        "federation through --startup-kit")
    p.add_argument("--site", action="append", default=[], metavar="NAME[=SITE_YAML]",
                   help="a participating site, with its site YAML in simulation (repeatable)")
    p.add_argument("--workspace", default="workspace/train", help="simulator workspace root")
    p.add_argument("--resume-from", default=None, metavar="RUN_DIR",
                   help="continue a finished simulator run (its workspace/<name> folder) for fed.num_rounds more "
                        "rounds")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override an experiment key")
    p.add_argument("--timeout", type=int, default=0,
                   help="poc/prod: seconds until the job is aborted (0: first_round_timeout_s x (rounds + 2))")
    p.add_argument("--privacy-file", default=str(HERE.parents[1] / "configs" / "federation" / "privacy.json"),
                   help="poc: the sites' local/privacy.json")
    p.add_argument("--authorization-file",
                   default=str(HERE.parents[1] / "configs" / "federation" / "authorization.json"),
                   help="poc: the sites' local/authorization.json")
    p.add_argument("--startup-kit", default=None, help="prod: the admin's provisioned startup kit folder")
    p.add_argument("--admin", default=None, help="prod: the admin's name in the project (e.g. researcher@org)")
    args = p.parse_args(rest)

    from fedimg import config as cfgmod

    try:
        exp = cfgmod.load(cfgmod.ExperimentConfig, args.config, args.set)
    except cfgmod.ConfigError as exc:
        p.error(str(exc))
    sites: dict[str, str | None] = {}
    for item in args.site:
        name, _, path = item.partition("=")
        try:
            sites[cfgmod.validate_site_name(name, "--site NAME[=SITE_YAML]")] = path or None
        except cfgmod.ConfigError as exc:
            p.error(str(exc))
    if not sites:
        p.error("name the participating sites with --site NAME (and =SITE_YAML in simulation)")

    if exporting:
        import shutil

        from fedimg.fl.recipe import build_recipe, in_staging

        staging = Path(export_dir).resolve() / f".{exp.name}_staging"
        recipe = build_recipe(exp, HERE, {n: None for n in sites}, staging)
        with in_staging(staging):
            recipe.export(str(Path(export_dir).resolve()))
        shutil.rmtree(staging, ignore_errors=True)
        print(f"job exported to {Path(export_dir).resolve() / exp.name}; submit with "
              f"`nvflare job submit -j {Path(export_dir).resolve() / exp.name}`")
        return 0

    if args.env in ("poc", "prod"):
        return _deploy(args, exp, sites, p)

    missing = [n for n, pth in sites.items() if pth is None]
    if missing:
        p.error(f"simulation needs each site's YAML: --site {missing[0]}=PATH")
    from fedimg.fl.simulate import FederatedRunError, collect, run_simulation

    previous = None
    try:
        if args.resume_from:
            previous = collect(Path(args.resume_from).resolve(), list(sites), require_cross_site=False)
        res = run_simulation(exp, HERE, {n: str(pth) for n, pth in sites.items()}, args.workspace,
                             resume_from=previous)
    except FederatedRunError as exc:
        print(f"job.py: error: {exc}", file=sys.stderr)
        return 2
    metric = exp.key_metric
    for site in sites:
        d = res.final_metric(site, metric)
        print(f"{site}: final global model {metric} = {d if d is None else round(d, 4)}")
    print(f"best model: {res.best_model} ({metric} {res.summary.get('best', {}).get('value')})\n"
          f"cross-site: {res.cross_site}\n"
          f"tensorboard --logdir {res.tb_logdir}")
    return 0


def _deploy(args: argparse.Namespace, exp, sites: dict[str, str | None], p: argparse.ArgumentParser) -> int:
    """Run the job in POC or on a provisioned federation; download and check the results."""
    from fedimg.fl.deploy import DeploymentError, PocFederation, ProdFederation, export_job
    from fedimg.fl.recipe import build_recipe
    from fedimg.fl.simulate import FederatedRunError, collect

    ws = Path(args.workspace).resolve()
    he = exp.privacy.encryption == "he"  # POC must then provision HE keys (nvflare poc prepare -he)
    timeout = args.timeout or exp.fed.first_round_timeout_s * (exp.fed.num_rounds + 2)
    recipe = build_recipe(exp, HERE, {n: None for n in sites}, ws / "staging", fast_polling=args.env == "poc")
    job = export_job(recipe, ws / "staging", ws / "jobs")
    try:
        if args.env == "poc":
            missing = [n for n, pth in sites.items() if pth is None]
            if missing:
                p.error(f"POC runs every site here and needs each site's YAML: --site {missing[0]}=PATH")
            poc = PocFederation(ws / "poc", {n: str(pth) for n, pth in sites.items()}, privacy=args.privacy_file,
                                authorization=args.authorization_file, use_he=he)
            poc.prepare()
            try:
                poc.start()
                outcome = poc.run(job, timeout=timeout, download_to=ws / "results")
                res = poc.collect(outcome, require_cross_site=exp.fed.cross_site_eval, require_records=not he)
            finally:
                left = poc.stop()
                if left:
                    print(f"job.py: warning: {len(left)} NVFlare process(es) had to be killed", file=sys.stderr)
        else:
            if not args.startup_kit or not args.admin:
                p.error("--env prod needs --startup-kit (the admin's provisioned kit) and --admin (its name)")
            fed = ProdFederation(args.admin, args.startup_kit)
            outcome = fed.run(job, timeout=timeout, download_to=ws / "results")
            run_dir = outcome.result_dir / "workspace"
            res = collect(outcome.result_dir, list(sites), require_cross_site=exp.fed.cross_site_eval,
                          run_dir=run_dir, log_dirs={"server": run_dir}, require_records=not he)
    except (DeploymentError, FederatedRunError) as exc:
        print(f"job.py: error: {exc}", file=sys.stderr)
        return 2
    print(f"job {outcome.job_id}: {outcome.status} in {outcome.seconds:.0f} s; results in {outcome.result_dir}")
    metric = exp.key_metric
    if he:
        print("the server holds only the encrypted global model; each site validated every round's decrypted "
              "model: see TensorBoard")
    else:
        for site in sites:
            print(f"{site}: final global model {metric} = {res.final_metric(site, metric)}")
    print(f"tensorboard --logdir {res.tb_logdir}")
    return 0 if outcome.status == "FINISHED:COMPLETED" else 2


if __name__ == "__main__":
    sys.exit(main())
