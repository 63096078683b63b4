"""fedimg's federated training job for NVFlare 2.9, shaped like NVFlare's examples (``client.py`` + ``job.py``).

The experiment YAML chooses the task, the network and the algorithm; the
same job runs in the simulator, in POC and on a provisioned federation::

    python jobs/train/job.py --config configs/experiments/seg_demo.yaml --env sim \\
        --site site-1=work/site-1/site.yaml --site site-2=work/site-2/site.yaml
    python jobs/train/job.py --config ... --env poc --site site-1=... --site site-2=... --workspace workspace/poc
    python jobs/train/job.py --config ... --env prod --site site-1 --site site-2 \\
        --startup-kit /secure/kits/lead@org --admin lead@org --workspace /data/fedimg_jobs
    python jobs/train/job.py --config ... --site site-1 --site site-2 --export /tmp/jobs   # nvflare job submit -j
    python jobs/train/job.py --evaluate RUN/packages/best --env sim --site site-1=... --site site-2=...

``--evaluate PKG`` scores a model package (from this federation or another) on every site's validation
and test cases: nothing is trained, the server writes the cross-site table. It takes the package's own
experiment, so ``--config`` is not needed.

``fedimg fl run | export | evaluate`` is the same, as part of the ``fedimg``
command; both call :mod:`fedimg.fl.launch`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    # NVFlare reads --export/--export-dir from sys.argv when nvflare.recipe is imported: take them out first.
    export_dir = None
    if "--export-dir" in argv:  # NVFlare's own spelling: --export --export-dir DIR
        i = argv.index("--export-dir")
        export_dir, argv = argv[i + 1], argv[:i] + argv[i + 2 :]
    if "--export" in argv:
        i = argv.index("--export")
        has_dir = i + 1 < len(argv) and not argv[i + 1].startswith("-")
        export_dir = argv[i + 1] if has_dir else (export_dir or "fl_job")
        argv = argv[:i] + argv[i + (2 if has_dir else 1) :]
    sys.argv = sys.argv[:1]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="experiment YAML (configs/experiments/); needed unless --evaluate")
    p.add_argument(
        "--evaluate", default=None, metavar="PKG", help="score this model package at every site, no training"
    )
    p.add_argument("--env", choices=["sim", "poc", "prod"], default="sim")
    p.add_argument("--site", action="append", default=[], metavar="NAME[=SITE_YAML]")
    p.add_argument("--workspace", default="workspace/train")
    p.add_argument("--resume-from", default=None, metavar="RUN_DIR")
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.add_argument("--timeout", type=int, default=0)
    p.add_argument("--startup-kit", default=None)
    p.add_argument("--admin", default=None)
    args = p.parse_args(argv)

    from fedimg import config as cfgmod
    from fedimg.errors import UserError
    from fedimg.fl import launch

    if args.evaluate is None and args.config is None:
        p.error("--config is required (or --evaluate PKG to score a model package)")
    if args.evaluate is not None and (export_dir is not None or args.resume_from):
        p.error("--evaluate scores a given model: it takes neither --export nor --resume-from")
    try:
        sites = launch.parse_sites(args.site)
        if args.evaluate is not None:
            from fedimg.models.package import load_package

            pkg_exp = load_package(args.evaluate).experiment
            launched = launch.evaluate(args.evaluate, _target(args, sites), overrides=args.set)
            print(launch.describe(pkg_exp, launched, list(sites)))
            return 0 if launched.ok else 2
        exp = cfgmod.load(cfgmod.ExperimentConfig, args.config, args.set)
        if export_dir is not None:
            job = launch.export(exp, list(sites), export_dir)
            print(f"job exported to {job}; submit with `nvflare job submit -j {job}`")
            return 0
        launched = launch.run(exp, _target(args, sites), resume_from=args.resume_from)
    except (UserError, ValueError) as exc:
        print(f"job.py: error: {exc}", file=sys.stderr)
        return 2
    print(launch.describe(exp, launched, list(sites)))
    return 0 if launched.ok else 2


def _target(args: argparse.Namespace, sites: dict[str, str | None]):  # -> fedimg.fl.launch.Target
    from fedimg.fl import launch

    return launch.Target(
        env=args.env,
        sites=sites,
        workspace=Path(args.workspace),
        timeout=args.timeout,
        startup_kit=args.startup_kit,
        admin=args.admin,
    )


if __name__ == "__main__":
    status = main(sys.argv[1:])
    import gc

    gc.freeze()  # skips the collection of torch's and MONAI's objects at exit (~0.7 s): see fedimg.cli.console
    sys.exit(status)
