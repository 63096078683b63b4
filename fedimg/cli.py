"""The ``fedimg`` command: one entry point, one subcommand per stage.

Subcommands import their heavy modules lazily, so ``fedimg --help`` is fast.

Exit status:

- 0: the run produced what it was asked for;
- 2: expected problems (bad input, bad config, an output folder fedimg may
  not write, no GPU): one line saying what was expected, what arrived and
  what to do, nothing written;
- 3 (:data:`EXIT_NOTHING_USABLE`): the run finished and wrote its account
  (manifest, summary), but produced nothing usable: ``preprocess`` converted
  no case or no validation case, ``convert`` converted no series, ``pull``
  retrieved no key completely;
- 130 / 143: stopped by SIGINT (Ctrl-C) / SIGTERM; worker processes and
  simulators it started are stopped too, and every output already written is
  complete (temporary files are removed, now or at the next run).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EXIT_USAGE = 2
EXIT_NOTHING_USABLE = 3


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # Third-party INFO chatter hides our progress bars.
    for noisy in ("nvflare", "monai", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # PACS clients: pynetdicom logs whole datasets at DEBUG, chats at INFO and prints tracebacks of lost
    # connections at ERROR; dicomweb-client and urllib3 log URLs, which hold UIDs, at DEBUG. None of that may
    # reach the console, --verbose or not: `fedimg pull` reports each failure in its manifest and summary.
    for chatty in ("pynetdicom", "dicomweb_client", "urllib3"):
        logging.getLogger(chatty).setLevel(logging.WARNING if verbose else logging.CRITICAL)
    # MONAI announces, on every import, that the optional NVIDIA image codec is absent.
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*NvImgCodecPydicomReader.*")


def _cmd_synth(args: argparse.Namespace) -> int:
    from fedimg.synth import generate

    res = generate(
        Path(args.out),
        n_sites=args.sites,
        n_cases=args.cases,
        seed=args.seed,
        progress=not args.quiet,
        modality=args.modality,
    )
    for site, cases in res.sites.items():
        print(
            f"{site}: {len(cases)} {args.modality} studies ({sum(c.has_lesion for c in cases)} with a lesion) -> "
            f"{Path(args.out) / site} (labels: {Path(args.out) / site / 'labels.csv'})"
        )
    print(f"ground truth: {res.ground_truth_path}")
    return 0


def _cmd_preprocess(args: argparse.Namespace) -> int:
    from fedimg import config as cfg
    from fedimg.preprocess.pipeline import preprocess
    from fedimg.preprocess.scan import check_source

    # The checks of the arguments themselves live in preprocess(): one place, raised before anything is written.
    reviews: list = []
    if args.site_config:
        site_cfg = cfg.load(cfg.SiteConfig, args.site_config)
        if args.site and args.site != site_cfg.name:
            raise ValueError(f"--site {args.site!r} differs from the --site-config's name {site_cfg.name!r}; give one")
        args.site = site_cfg.name
        reviews = list(site_cfg.deid.burned_in_reviewed)
    if not args.site:
        raise ValueError("name this site: --site NAME (or --site-config SITE_YAML)")
    cfg.validate_site_name(args.site, "--site")  # named as the user typed it
    spec = cfg.load(cfg.PreprocessSpec, args.spec, args.set)
    if args.from_nifti:
        from fedimg.preprocess.nifti_source import WHAT

        check_source(Path(args.src), WHAT)  # a missing or empty source is reported before the secret is asked for
    else:
        check_source(Path(args.src))
    pseudonymizer = None
    if not args.no_deid:
        pseudonymizer = _site_pseudonymizer(
            args.secret_file, "de-identification", "--no-deid only for data that is already de-identified"
        )
    result = preprocess(
        args.src,
        args.out,
        spec,
        site=args.site,
        progress=not args.quiet,
        workers=args.workers,
        pseudonymizer=pseudonymizer,
        crosswalk=args.crosswalk,
        write_dicom=args.write_dicom,
        labels_csv=args.labels_csv,
        reviews=reviews,
        from_nifti=args.from_nifti,
        patient_regex=args.patient_regex,
    )
    print(result.table())
    if pseudonymizer is None:
        print(
            "fedimg preprocess: warning: --no-deid: case ids are unkeyed hashes and the manifest lists raw "
            "input paths; use only for data that is already de-identified",
            file=sys.stderr,
        )
    if result.problem:
        print(f"fedimg preprocess: nothing usable: {result.problem}", file=sys.stderr)
        return EXIT_NOTHING_USABLE
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from fedimg.preprocess.convert import convert

    result = convert(args.src, args.out, workers=args.workers, progress=not args.quiet, compress=not args.no_compress)
    print(result.table())
    if not result.outputs:
        print(
            f"fedimg convert: nothing usable: no series was converted ({result.src_files} input files); the "
            f"manifest says why for each file: fedimg manifest {args.out}",
            file=sys.stderr,
        )
        return EXIT_NOTHING_USABLE
    return 0


def _pull_client(args: argparse.Namespace):  # -> fedimg.pacs.client.PacsClient (imported lazily)
    from fedimg.pacs.errors import PacsError
    from fedimg.pacs.source import DEFAULT_TIMEOUT_S, DicomWebSource, DimseSource, load_auth, parse_host_port

    kind, address = args.source
    timeout = DEFAULT_TIMEOUT_S if args.timeout is None else args.timeout
    if kind == "dicomweb":
        stray = [o for o, v in (("--called-aet", args.called_aet), ("--calling-aet", args.calling_aet)) if v]
        if stray:
            raise PacsError(f"{' and '.join(stray)} apply to --from dimse only; drop them for --from dicomweb")
        if args.credentials_file and not args.auth:
            raise PacsError(
                "--credentials-file was given without --auth: expected --auth basic (the file holds "
                "user:password) or --auth bearer (the file holds a token)"
            )
        auth = load_auth(args.auth, args.credentials_file) if args.auth else None
        from fedimg.pacs.dicomweb import DicomWebClient

        return DicomWebClient(DicomWebSource(address, auth=auth, ca_bundle=args.ca_bundle, timeout_s=timeout))
    if kind == "dimse":
        stray = [
            o
            for o, v in (
                ("--auth", args.auth),
                ("--credentials-file", args.credentials_file),
                ("--ca-bundle", args.ca_bundle),
            )
            if v
        ]
        if stray:
            raise PacsError(f"{' and '.join(stray)} apply to --from dicomweb only; drop them for --from dimse")
        if not args.called_aet:
            raise PacsError("--from dimse needs --called-aet AET (the PACS's AE title)")
        host, port = parse_host_port(address)
        from fedimg.pacs.dimse import DimseClient

        return DimseClient(
            DimseSource(
                host, port, called_aet=args.called_aet, calling_aet=args.calling_aet or "FEDIMG", timeout_s=timeout
            )
        )
    raise PacsError(f"--from expects 'dicomweb URL' or 'dimse HOST:PORT', got {kind!r} as the kind")


def _cmd_pull(args: argparse.Namespace) -> int:
    from fedimg.pacs.keys import read_keys
    from fedimg.pacs.pull import pull

    keys = read_keys(args.keys, key_type=args.key, column=args.key_column)
    result = pull(_pull_client(args), keys, args.out, progress=not args.quiet)
    print(result.table())
    if not result.retrieved:
        print(
            f"fedimg pull: nothing retrieved: no key's studies are complete in {args.out}; the manifest says why "
            f"for each key: {result.manifest_path}",
            file=sys.stderr,
        )
        return EXIT_NOTHING_USABLE
    return 0


def _cmd_manifest(args: argparse.Namespace) -> int:
    from fedimg.preprocess.manifest import read_manifest, render_table, summarize

    try:
        rows = read_manifest(args.dst)
    except FileNotFoundError as exc:
        raise ValueError(str(exc)) from None
    print(render_table(summarize(rows), str(args.dst)))
    return 0


def _cmd_train_local(args: argparse.Namespace) -> int:
    from fedimg import config as cfg
    from fedimg.training.local import train_local

    exp = cfg.load(cfg.ExperimentConfig, args.config, args.set)
    site = cfg.load_site_config(args.site_config)
    if args.device:
        import dataclasses

        site = dataclasses.replace(site, device=args.device)
    from fedimg.runtime import select_device

    select_device(site.device)  # fail fast, before caching data
    res = train_local(exp, site, args.out, progress=not args.quiet)
    print(
        f"site {res.site}: best validation {res.metric} {res.best_score:.4f} at epoch {res.best_epoch}/{res.epochs} "
        f"({res.seconds:.0f} s)"
    )
    print(f"best model: {res.best_model}")
    print(f"tensorboard --logdir {res.logdir}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from fedimg.demo import run_demo

    run_demo(
        Path(args.out),
        sites=args.sites,
        cases=args.cases,
        seed=args.seed,
        rounds=args.rounds,
        device=args.device,
        config=args.config,
        progress=not args.quiet,
    )
    return 0


def _site_args(items: list[str]) -> dict[str, str]:
    from fedimg.config import validate_site_name

    sites = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not path:
            raise ValueError(f"--site expects NAME=SITE_YAML, got {item!r}")
        sites[validate_site_name(name, "--site NAME=SITE_YAML")] = path
    if not sites:
        raise ValueError("name at least one site: --site NAME=SITE_YAML (repeatable)")
    return sites


def _cmd_compare(args: argparse.Namespace) -> int:
    from fedimg import config as cfg
    from fedimg.compare import print_comparison, run_comparison

    overrides = list(args.set or []) + ([f"data.fold={args.fold}"] if args.fold is not None else [])
    exp = cfg.load(cfg.ExperimentConfig, args.config, overrides)
    comparison = run_comparison(exp, _site_args(args.site), args.out, progress=not args.quiet, device=args.device)
    print_comparison(comparison)
    print(
        f"\ncomparison: {Path(args.out) / 'comparison.md'} (and .json); "
        f"TensorBoard: tensorboard --logdir {comparison['federated_run']}/server/simulate_job/tb_events"
    )
    return 0


def _site_pseudonymizer(secret_file: str | None, what: str, alternative: str) -> object:
    """The site's Pseudonymizer from --secret-file or $FEDIMG_SECRET_FILE.

    Raises:
        DeidError: neither names a file (the message says how to make one, and ``alternative``).
    """
    from fedimg.dicom.deid import DeidError, Pseudonymizer, SiteSecret

    if not (secret_file or os.environ.get("FEDIMG_SECRET_FILE")):
        raise DeidError(
            f"{what} needs this site's secret: expected --secret-file PATH or the environment variable "
            "FEDIMG_SECRET_FILE naming an owner-only file, found neither; create one with "
            "`umask 077; head -c 32 /dev/urandom | base64 > site.secret` and keep it at the site "
            f"({alternative})"
        )
    return Pseudonymizer(SiteSecret.load(secret_file))


def _cmd_model_info(args: argparse.Namespace) -> int:
    from fedimg.models.package import describe, load_package

    pkg = load_package(args.package)
    if args.json:
        print(json.dumps({k: v for k, v in pkg.meta.items()}, indent=1))
    else:
        print(describe(pkg))
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from fedimg.predict import predict

    pseudonymizer = None
    if not args.keep_identifiers:
        pseudonymizer = _site_pseudonymizer(
            args.secret_file, "de-identified predictions (the default)", "--keep-identifiers for identified outputs"
        )
    result = predict(
        args.package,
        args.src,
        args.out,
        pseudonymizer=pseudonymizer,
        keep_identifiers=args.keep_identifiers,
        crosswalk=args.crosswalk,
        device=args.device,
        amp=not args.no_amp,
        seg=not args.no_seg,
        png=not args.no_png,
        progress=not args.quiet,
    )
    print(result.table())
    if args.keep_identifiers:
        print(
            "fedimg predict: warning: --keep-identifiers: the SEG objects and predictions.csv carry the source's "
            "identifiers (UIDs, patient and study modules, accession numbers); keep DST at the site",
            file=sys.stderr,
        )
    if not result.predicted:
        print(
            f"fedimg predict: nothing usable: no study could be predicted ({len(result.studies)} found); "
            f"summary.json in {args.out} says why for each",
            file=sys.stderr,
        )
        return EXIT_NOTHING_USABLE
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fedimg")
    except PackageNotFoundError:  # a source checkout on PYTHONPATH
        from fedimg import __version__

        return __version__


class _VersionAction(argparse.Action):
    """``--version``, looked up only when asked for (importlib.metadata costs every command's start-up)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest=dest, default=argparse.SUPPRESS, nargs=0, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        print(f"fedimg {_version()}")  # stdout, as argparse's "version" action prints it
        parser.exit()


def _target(args: argparse.Namespace) -> Any:
    from fedimg.fl.launch import Target, parse_sites

    return Target(
        env=args.env,
        sites=parse_sites(args.site),
        workspace=Path(args.out),
        timeout=args.timeout,
        privacy_file=args.privacy_file,
        authorization_file=args.authorization_file,
        startup_kit=args.startup_kit,
        admin=args.admin,
        spec_file=getattr(args, "spec", None),
    )


def _cmd_fl_run(args: argparse.Namespace) -> int:
    from fedimg import config as cfg
    from fedimg.fl.launch import describe, run

    exp = cfg.load(cfg.ExperimentConfig, args.config, args.set)
    target = _target(args)
    launched = run(exp, target, resume_from=args.resume_from)
    print(describe(exp, launched, list(target.sites)))
    return 0 if launched.ok else EXIT_USAGE


def _cmd_fl_export(args: argparse.Namespace) -> int:
    from fedimg import config as cfg
    from fedimg.fl.launch import export, parse_sites

    exp = cfg.load(cfg.ExperimentConfig, args.config, args.set)
    sites = parse_sites(args.site)
    if not sites:
        raise ValueError("name the participating sites: --site NAME (repeatable)")
    job = export(exp, list(sites), args.out)
    print(f"job exported to {job}; submit with `nvflare job submit -j {job}`")
    return 0


def _cmd_fl_evaluate(args: argparse.Namespace) -> int:
    from fedimg.fl.launch import describe, evaluate
    from fedimg.models.package import load_package

    target = _target(args)
    launched = evaluate(args.package, target, overrides=args.set)
    print(describe(load_package(args.package).experiment, launched, list(target.sites)))
    return 0 if launched.ok else EXIT_USAGE


def _cmd_env(args: argparse.Namespace) -> int:
    from fedimg.runtime import environment_report

    print(json.dumps(environment_report(), indent=2))
    if args.check_gpu:
        from fedimg.gpucheck import self_test
        from fedimg.runtime import DeviceError

        try:
            report = self_test("cuda", seconds=args.seconds)
        except DeviceError as exc:
            # The generic advice (--device auto) does not apply: the self-test exists to exercise a GPU.
            why = str(exc).split(";")[0]
            raise DeviceError(
                f"GPU self-test: {why}. Nothing to test on this machine: it trains on the CPU with the site "
                "config's `device: auto` (or cpu). On a GPU machine, check the NVIDIA driver (nvidia-smi), "
                "CUDA_VISIBLE_DEVICES and that torch is a CUDA build"
            ) from None
        print(json.dumps(report, indent=2))
        print(
            f"GPU self-test: {report['device_name']}: {report['train_steps_per_s']:.1f} AMP training steps/s "
            f"(2 x 64^3 patches), sliding window over 128^3 in {report['sliding_window_128_s']:.2f} s, peak "
            f"{report.get('peak_memory_gb', 0):.2f} GB of {report.get('total_memory_gb', 0):.0f} GB"
        )
    return 0


class _HelpFormatter(argparse.HelpFormatter):
    """Shows an option's default in its help when it has a meaningful one (not None, False or SUPPRESS)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "%(default)" not in text and default not in (None, False, argparse.SUPPRESS) and action.option_strings:
            text += " (default: %(default)s)"
        return text


def _common() -> argparse.ArgumentParser:
    """Options every subcommand takes, so ``fedimg CMD -v`` works as well as ``fedimg -v CMD``."""
    c = argparse.ArgumentParser(add_help=False)
    c.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    return c


def _add_out(s: argparse.ArgumentParser, what: str, default: str | None = None) -> None:
    """The output folder, taken the same way by every command that writes: ``OUT`` (last) or ``--out OUT``."""
    s.add_argument(
        "out", nargs="?", default=None, metavar="OUT", help=what + (f" (default: {default})" if default else "")
    )
    s.add_argument("--out", dest="out_option", default=None, metavar="OUT", help="the same as OUT")
    s.set_defaults(out_default=default)


def _resolve_out(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not hasattr(args, "out_default"):
        return
    given = [v for v in (args.out, args.out_option) if v is not None]
    if len(given) == 2 and given[0] != given[1]:
        p.error(f"fedimg {args.command}: give the output folder once: OUT {given[0]!r} and --out {given[1]!r} differ")
    args.out = given[0] if given else args.out_default
    if args.out is None:
        p.error(f"fedimg {args.command}: the output folder is required: OUT (or --out OUT)")


def _site_option(s: argparse.ArgumentParser, help_text: str) -> None:
    s.add_argument("--site", action="append", default=[], metavar="NAME[=SITE_YAML]", help=help_text)


def _data_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    """Commands that make and account for data: synth, preprocess, convert, pull, manifest."""
    s = sub.add_parser(
        "synth",
        parents=[common],
        formatter_class=_HelpFormatter,
        help="write synthetic multi-site DICOM studies (CT volumes or DX radiographs) with labels",
    )
    _add_out(s, "output folder (one sub-folder per site)")
    s.add_argument("--sites", type=int, default=3, help="number of sites")
    s.add_argument("--cases", type=int, default=8, help="base number of studies per site (sites vary around it)")
    s.add_argument("--seed", type=int, default=0, help="random seed (the data set is deterministic per seed)")
    s.add_argument(
        "--modality",
        choices=["CT", "DX"],
        default="CT",
        help="CT: volumes with segmentation labels; DX: single-frame projection radiographs. "
        "Both write SITE/labels.csv (lesion / no_lesion per study)",
    )
    s.set_defaults(func=_cmd_synth)

    s = sub.add_parser(
        "preprocess",
        parents=[common],
        formatter_class=_HelpFormatter,
        help="DICOM tree (or, with --from-nifti, a NIfTI data set) -> normalized NIfTI volumes, datalist.json, "
        "manifest.jsonl",
    )
    s.add_argument("src", help="the site's DICOM export, or with --from-nifti its NIfTI data set (read only)")
    _add_out(s, "output folder (new, empty, or an earlier preprocess output)")
    s.add_argument("--spec", required=True, help="configs/preprocessing/<name>.yaml")
    s.add_argument("--site", default=None, help="this site's name, e.g. site-1 (default: the --site-config's name)")
    s.add_argument(
        "--site-config",
        default=None,
        metavar="SITE_YAML",
        help="the site's config: its name and its reviewed exceptions (deid.burned_in_reviewed)",
    )
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a spec key (repeatable)")
    s.add_argument("--workers", type=int, default=None, help="parallel studies (default: CPU count)")
    s.add_argument(
        "--secret-file",
        default=None,
        help="site secret (owner-only file) for keyed pseudonyms; default: $FEDIMG_SECRET_FILE",
    )
    s.add_argument(
        "--no-deid", action="store_true", help="skip keyed pseudonyms (only for data that is already de-identified)"
    )
    s.add_argument(
        "--crosswalk",
        default=None,
        help="keep the input-path crosswalk here (owner-only; outside SRC and OUT, at the site)",
    )
    s.add_argument(
        "--write-dicom",
        default=None,
        metavar="DIR",
        help="also write de-identified DICOM copies (PS3.15 Basic Profile, keyed) into DIR",
    )
    s.add_argument(
        "--labels-csv",
        default=None,
        metavar="FILE",
        help="classification specs: the site's CSV of study key (labels.csv_key) and class; "
        "it holds identifiers: keep it at the site",
    )
    s.add_argument(
        "--from-nifti",
        action="store_true",
        help="SRC is a NIfTI segmentation data set: a Decathlon dataset.json, or imagesTr/ + labelsTr/ "
        "(images/ + labels/) paired by file name; same spec chain, case ids, manifest and split",
    )
    s.add_argument(
        "--patient-regex",
        default=None,
        metavar="REGEX",
        help="--from-nifti: the patient in each image's file name (group 1, or the whole match), so that one "
        "patient's cases share a split, e.g. '^(case_\\d+)_'; default: dataset.json's \"patient\", the BraTS "
        "naming rule, else each case is its own patient",
    )
    s.set_defaults(func=_cmd_preprocess)

    s = sub.add_parser(
        "convert",
        parents=[common],
        formatter_class=_HelpFormatter,
        help="raw conversion: one NIfTI per series as acquired, plus manifest.jsonl",
    )
    s.add_argument("src", help="a DICOM folder tree (read only)")
    _add_out(s, "output folder (new, empty, or an earlier convert output)")
    s.add_argument("--workers", type=int, default=None, help="parallel series (default: CPU count)")
    s.add_argument("--no-compress", action="store_true", help="write .nii instead of .nii.gz (faster)")
    s.set_defaults(func=_cmd_convert)

    _pull_parser(sub, common)

    s = sub.add_parser(
        "manifest",
        parents=[common],
        formatter_class=_HelpFormatter,
        help="print the account of a convert/preprocess output folder",
    )
    s.add_argument("dst", help="output folder (or its manifest.jsonl)")
    s.set_defaults(func=_cmd_manifest)


def _pull_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser(
        "pull",
        parents=[common],
        formatter_class=_HelpFormatter,
        help="retrieve studies from a PACS (DICOMweb or C-FIND/C-GET) into a raw folder",
        description="Retrieve the studies named in a keys CSV from a PACS into OUT (a new or empty "
        "folder, or an earlier pull's). Instances already in OUT are not fetched again. "
        "Writes OUT/pull_manifest.jsonl (one row per key) and prints a summary.",
    )
    _add_out(s, "output folder: OUT/study-<hash>/series-<hash>/<SOPInstanceUID>.dcm")
    s.add_argument(
        "--from",
        dest="source",
        nargs=2,
        metavar=("KIND", "ADDRESS"),
        required=True,
        help="'dicomweb URL' (the service root, e.g. https://pacs.example.org/dicom-web) or 'dimse HOST:PORT'",
    )
    s.add_argument(
        "--keys",
        required=True,
        metavar="CSV",
        help="CSV with a header row; the key column is AccessionNumber/accession/accession_number or "
        "StudyInstanceUID/study_uid/study_instance_uid, or the one --key-column names",
    )
    s.add_argument(
        "--key",
        choices=["accession", "study_uid"],
        default=None,
        help="what the keys are (default: from the column's name)",
    )
    s.add_argument("--key-column", default=None, metavar="NAME", help="the CSV column holding the keys")
    s.add_argument("--called-aet", default=None, metavar="AET", help="dimse: the PACS's AE title")
    s.add_argument(
        "--calling-aet",
        default=None,
        metavar="AET",
        help="dimse: our AE title, as registered at the PACS (default: FEDIMG)",
    )
    s.add_argument(
        "--auth",
        choices=["basic", "bearer"],
        default=None,
        help="dicomweb: HTTP authentication; the credential comes from --credentials-file or "
        "$FEDIMG_PACS_CREDENTIALS, never from the command line",
    )
    s.add_argument(
        "--credentials-file",
        default=None,
        metavar="FILE",
        help="dicomweb: owner-only file holding user:password (basic) or the token (bearer)",
    )
    s.add_argument(
        "--ca-bundle",
        default=None,
        metavar="FILE",
        help="dicomweb: PEM CA bundle to verify an https server (default: the system's)",
    )
    s.add_argument(
        "--timeout", type=float, default=None, metavar="SECONDS", help="network timeout per request (default: 60)"
    )
    s.set_defaults(func=_cmd_pull)


def _training_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    """Commands that train and compare: train-local, demo, compare."""
    s = sub.add_parser(
        "train-local", parents=[common], formatter_class=_HelpFormatter, help="train one site without NVFlare"
    )
    _add_out(s, "output folder for checkpoints, model packages, metrics and TensorBoard")
    s.add_argument("--config", required=True, help="configs/experiments/<name>.yaml")
    s.add_argument("--site-config", required=True, help="the site's config (configs/sites/site.yaml template)")
    s.add_argument("--device", choices=["auto", "cpu", "cuda"], help="override the site config's device")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override an experiment key")
    s.set_defaults(func=_cmd_train_local)

    s = sub.add_parser(
        "demo",
        parents=[common],
        formatter_class=_HelpFormatter,
        help="synth 3 sites -> preprocess -> federated training (simulator) -> summary",
    )
    _add_out(s, "output folder (new, empty, or an earlier demo's)", default="demo_out")
    s.add_argument("--sites", type=int, default=3, help="number of synthetic hospitals")
    s.add_argument("--cases", type=int, default=8, help="base number of studies per site")
    s.add_argument("--seed", type=int, default=0, help="random seed of the synthetic data")
    s.add_argument("--rounds", type=int, default=None, help="override fed.num_rounds")
    s.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where to train")
    s.add_argument("--config", default=None, help="experiment config (default: the packaged seg_demo)")
    s.set_defaults(func=_cmd_demo)

    s = sub.add_parser(
        "compare",
        parents=[common],
        formatter_class=_HelpFormatter,
        help="federated run + local-only + centralized baselines -> comparison table",
    )
    _add_out(s, "output folder")
    s.add_argument("--config", required=True, help="configs/experiments/<name>.yaml")
    _site_option(s, "a site and its site YAML, NAME=SITE_YAML (repeatable)")
    s.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default=None,
        help="device of the baselines (default: the first site's)",
    )
    s.add_argument(
        "--fold",
        type=int,
        default=None,
        help="cross-validation datalists (split.folds): the fold that validates at every site",
    )
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override an experiment key")
    s.set_defaults(func=_cmd_compare)


def _fl_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    """``fedimg fl run | export | evaluate``: federated jobs in the simulator, POC or production."""
    s = sub.add_parser(
        "fl",
        formatter_class=_HelpFormatter,
        help="federated jobs: run (train), export (a job folder), evaluate (a given model)",
    )
    fsub = s.add_subparsers(dest="fl_command", required=True)

    def env_options(f: argparse.ArgumentParser) -> None:
        f.add_argument(
            "--env",
            choices=["sim", "poc", "prod"],
            default="sim",
            help="sim: NVFlare simulator; poc: real processes on this machine (mTLS); prod: a "
            "provisioned federation through --startup-kit",
        )
        _site_option(f, "a participating site, NAME=SITE_YAML in sim and POC, NAME in prod (repeatable)")
        f.add_argument(
            "--timeout",
            type=int,
            default=0,
            help="poc/prod: seconds until the job is aborted (0: first_round_timeout_s x (rounds + 2))",
        )
        f.add_argument("--privacy-file", default=None, help="poc: the sites' local/privacy.json (default: shipped)")
        f.add_argument(
            "--authorization-file", default=None, help="poc: the sites' local/authorization.json (default: shipped)"
        )
        f.add_argument("--startup-kit", default=None, help="prod: the admin's provisioned startup kit folder")
        f.add_argument("--admin", default=None, help="prod: the admin's name in the project (e.g. lead@org)")
        f.add_argument("--set", action="append", metavar="KEY=VALUE", help="override an experiment key")

    f = fsub.add_parser("run", parents=[common], formatter_class=_HelpFormatter, help="train the experiment")
    _add_out(f, "workspace of the run (simulator runs, POC kits, downloaded results)", default="workspace/train")
    f.add_argument("--config", required=True, help="experiment YAML (configs/experiments/)")
    env_options(f)
    f.add_argument(
        "--resume-from",
        default=None,
        metavar="RUN_DIR",
        help="sim: continue a finished run (its workspace/<name> folder) for fed.num_rounds more rounds",
    )
    f.add_argument(
        "--spec",
        default=None,
        metavar="SPEC_YAML",
        help="prod: the preprocessing spec the sites used, recorded in the run's model packages so that "
        "fedimg predict can use them (sim and POC read it beside the sites' datalists)",
    )
    f.set_defaults(func=_cmd_fl_run)

    f = fsub.add_parser(
        "export",
        parents=[common],
        formatter_class=_HelpFormatter,
        help="write the job folder for `nvflare job submit -j`",
    )
    _add_out(f, "folder the job is written into (OUT/<experiment name>)")
    f.add_argument("--config", required=True, help="experiment YAML (configs/experiments/)")
    _site_option(f, "a participating site's name (repeatable)")
    f.add_argument("--set", action="append", metavar="KEY=VALUE", help="override an experiment key")
    f.set_defaults(func=_cmd_fl_export)

    f = fsub.add_parser(
        "evaluate",
        parents=[common],
        formatter_class=_HelpFormatter,
        help="every site scores a model package on its validation and test cases; no training",
    )
    f.add_argument("package", help="a model package folder (e.g. RUN/packages/best), from any federation")
    _add_out(f, "workspace of the evaluation", default="workspace/evaluate")
    env_options(f)
    f.set_defaults(func=_cmd_fl_evaluate)


def _model_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    """Using a trained model: model info, predict."""
    s = sub.add_parser("model", formatter_class=_HelpFormatter, help="model packages: fedimg model info PKG")
    msub = s.add_subparsers(dest="model_command", required=True)
    m = msub.add_parser(
        "info",
        parents=[common],
        formatter_class=_HelpFormatter,
        help="print a model package: task, classes, network, spec, metrics, version",
    )
    m.add_argument("package", help="a model package folder (e.g. RUN/packages/best)")
    m.add_argument("--json", action="store_true", help="print package.json as stored")
    m.set_defaults(func=_cmd_model_info)

    s = sub.add_parser(
        "predict",
        parents=[common],
        formatter_class=_HelpFormatter,
        help="apply a model package to DICOM studies or NIfTI images: label maps on the source grid, "
        "DICOM SEG, overlay PNG, predictions.csv",
    )
    s.add_argument("package", help="a model package folder (RUN/packages/best)")
    s.add_argument("src", help="a DICOM study folder, a PACS export with several studies, or NIfTI images (read only)")
    _add_out(s, "output folder (new, empty, or an earlier predict output)")
    s.add_argument(
        "--secret-file",
        default=None,
        help="site secret (owner-only file) for de-identified outputs; default: $FEDIMG_SECRET_FILE",
    )
    s.add_argument(
        "--keep-identifiers",
        action="store_true",
        help="write identified outputs: the SEG references the original series and copies its patient "
        "and study modules; predictions.csv lists UIDs, accession numbers and source folders",
    )
    s.add_argument(
        "--crosswalk",
        default=None,
        metavar="FILE",
        help="keep the study-id -> input crosswalk here (owner-only; outside SRC and OUT, at the site)",
    )
    s.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where to run the model")
    s.add_argument("--no-amp", action="store_true", help="full precision on CUDA")
    s.add_argument("--no-seg", action="store_true", help="do not write DICOM SEG objects")
    s.add_argument("--no-png", action="store_true", help="do not write overlay pictures")
    s.set_defaults(func=_cmd_predict)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation and tests)."""
    p = argparse.ArgumentParser(
        prog="fedimg", description="Federated medical-imaging training pipeline.", formatter_class=_HelpFormatter
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--version", action=_VersionAction, help="show the version and exit")
    common = _common()
    sub = p.add_subparsers(dest="command", required=True)
    _data_parsers(sub, common)
    _training_parsers(sub, common)
    _fl_parsers(sub, common)
    _model_parsers(sub, common)
    s = sub.add_parser(
        "env",
        parents=[common],
        formatter_class=_HelpFormatter,
        help="print versions, devices and threads; --check-gpu: a short GPU self-test",
    )
    s.add_argument(
        "--check-gpu",
        action="store_true",
        help="train steps with AMP, a cached dataset on the device, one sliding-window inference; prints "
        "throughput and peak memory (needs CUDA)",
    )
    s.add_argument("--seconds", type=float, default=20.0, help="length of the self-test")
    s.set_defaults(func=_cmd_env)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedimg`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _resolve_out(parser, args)
    _setup_logging(args.verbose)
    from fedimg import signals

    previous = signals.install()
    try:
        return _run(args)
    except signals.Interrupted as exc:
        stopped = signals.stop_descendants()
        print(
            f"fedimg {args.command}: stopped by {exc}"
            + (f"; {stopped} worker process(es) stopped" if stopped else "")
            + "; outputs already written are complete, "
            "run the same command again to finish",
            file=sys.stderr,
        )
        return exc.exit_status
    finally:
        signals.restore(previous)


def _run(args: argparse.Namespace) -> int:
    from fedimg.errors import UserError

    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"fedimg {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ValueError as exc:
        if args.verbose:
            raise
        print(f"fedimg {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def console() -> int:
    """The ``fedimg`` console script: :func:`main`, then a quicker exit.

    With torch and MONAI imported, Python's collection of millions of objects at exit takes about
    0.7 s on 2 cores (measured: ``python -c "import monai"`` median 4.6 s, 3.9 s with ``gc.freeze()``).
    Freezing them skips only that collection: exit handlers still run and files are still closed.
    """
    import gc

    status = main()
    gc.freeze()
    return status


if __name__ == "__main__":
    sys.exit(console())
