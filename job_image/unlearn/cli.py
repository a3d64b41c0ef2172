"""The ``unlearn`` command: ``run`` a request manifest, ``calibrate`` a model, the ``demo``, and ``prepare-demo``.

In a pod the operator runs
``unlearn run /etc/unlearning/request.yaml --volume-root /volumes --require-claims --model-version N``
with the allowed factory modules in ``UNLEARN_ALLOWED_FACTORY_MODULES``, and
reads the compact record from ``/dev/termination-log``;
``--calibration-bank/-sha256/-name`` name the model's reference bank when it has one. The exit code says
what happened (see ``unlearning_contracts.record``): 0 Passed, 3 gates Failed, 4 invalid
input (both never retried), anything else an unexpected, retryable error.

``run`` validates the manifest and runs the preflight checks (preflight.py)
before it imports torch: a wrong apiVersion, a missing file or a factory the
admin did not allow is answered in a fraction of a second, not after seconds
of importing torch and a gigabyte of memory.

With ``--nproc-per-node N`` (the operator adds it when the pod has N > 1
GPUs) the command becomes a launcher of N ranks (launch.py) that run the same
command data-parallel. The launcher validates the manifest and runs the
preflight once, before any rank starts (a refusal costs no torch and starts
no process); only rank 0 writes the outputs, the record, the termination
message and the table.
A calibration runs as ``unlearn calibrate-fold MANIFEST --fold K`` per index of
an Indexed Job and ``unlearn calibrate-merge MANIFEST`` after them (0 done, 4
invalid input, other retryable), or locally as ``unlearn calibrate MANIFEST``.
"""

# Torch, matplotlib and the job load lazily, so `unlearn --help` and refusals stay instant.
# ruff: noqa: PLC0415

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from unlearn import preflight
from unlearn.draft import (
    RecordDraft,
    default_termination_log,
    failed_calibration,
    failed_fold,
    now,
    write_json,
    write_refusal,
    write_termination_message,
)
from unlearn.errors import InvalidInputError
from unlearn.launch import (
    ENV_RANK_RECORD,
    EXIT_UNEXPECTED,
    WorkerPlace,
    failure_record,
    in_worker,
    launch,
    worker_place,
    write_rank_record,
)
from unlearning_contracts.calibration import (
    CalibrationManifest,
    CalibrationRecord,
    FoldRecord,
    compact_calibration,
    compact_fold,
    load_any_manifest,
)
from unlearning_contracts.factories import ENV_ALLOWED_FACTORY_MODULES, parse_allowed_modules
from unlearning_contracts.record import (
    EXIT_CODE_MEANINGS,
    EXIT_INVALID_INPUT,
    AuditMetrics,
    ResultRecord,
    numbers,
    show,
)
from unlearning_contracts.spec import DEFAULT_VOLUME_ROOT, Manifest, SpecError

log = logging.getLogger("unlearn")

REPO_EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "requests" / "digits-gdpr.yaml"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unlearn", description="Forget training samples from a model and audit it.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run one UnlearningRequest manifest", epilog=_exit_codes())
    run.formatter_class = argparse.RawDescriptionHelpFormatter
    run.add_argument("manifest", type=Path, help="an UnlearningRequest YAML file (the one you would kubectl apply)")
    _run_options(run)
    run.add_argument(
        "--model-version",
        type=int,
        default=None,
        help="version N of the output (default: next free); a published version is never replaced",
    )
    run.add_argument(
        "--run-id",
        default=None,
        metavar="ID",
        help="who this run is across retries (the operator passes the request's uid): a version that an earlier "
        "attempt of the same run published is reported again instead of refused",
    )
    run.add_argument(
        "--require-claims",
        action="store_true",
        help="refuse a location without claimName (the operator's Job passes it: a plain path in a pod "
        "would be the container's own file system)",
    )
    run.add_argument(
        "--nproc-per-node",
        type=int,
        default=1,
        metavar="N",
        help="run as N data-parallel processes, one per GPU (default 1: this process alone)",
    )
    run.add_argument(
        "--calibration-bank",
        default=None,
        metavar="URI",
        help="the model's reference bank (pvc://claim/path or a path)",
    )
    run.add_argument("--calibration-sha256", default=None, metavar="HEX", help="the bank's sha256 (verified)")
    run.add_argument("--calibration-name", default="", metavar="NS/NAME", help="the UnlearningCalibration it came from")

    calibrate = sub.add_parser(
        "calibrate", help="train a model's reference bank locally (every fold, then the merge)", epilog=_fold_codes()
    )
    calibrate.formatter_class = argparse.RawDescriptionHelpFormatter
    calibrate.add_argument("manifest", type=Path, help="an UnlearningCalibration YAML file")
    _calibration_options(calibrate)
    fold = sub.add_parser("calibrate-fold", help="train one reference model (one index of the Indexed Job)")
    fold.add_argument("manifest", type=Path, help="an UnlearningCalibration YAML file")
    fold.add_argument(
        "--fold",
        type=int,
        default=None,
        help="the fold K to hold out (default: $JOB_COMPLETION_INDEX, as an Indexed Job sets it)",
    )
    _calibration_options(fold)
    merge = sub.add_parser("calibrate-merge", help="check the fold files and write bank.npz and bank.json")
    merge.add_argument("manifest", type=Path, help="an UnlearningCalibration YAML file")
    _calibration_options(merge)

    demo = sub.add_parser("demo", help="train (or reuse) the digits model and run the example request locally")
    demo.add_argument("--workdir", type=Path, default=None, help="cache folder (default: the user cache)")
    demo.add_argument("--manifest", type=Path, default=REPO_EXAMPLE, help="request to run (default: the example)")
    _run_options(demo, volume_root=False)

    prep = sub.add_parser("prepare-demo", help="write the demo model to DIR/digits/digits-mlp.pt2")
    prep.add_argument("dir", type=Path)
    return parser


def _run_options(parser: argparse.ArgumentParser, volume_root: bool = True) -> None:
    parser.add_argument("--result", type=Path, default=None, help="also write the full record JSON here")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--json", action="store_true", help="print the full record as JSON instead of a table")
    if volume_root:
        parser.add_argument(
            "--volume-root",
            type=Path,
            default=Path(DEFAULT_VOLUME_ROOT),
            help="claims resolve to DIR/<claimName>/<path> (default /volumes, as in the Job)",
        )
    parser.add_argument(
        "--termination-log",
        type=Path,
        default=None,
        help="compact record path (default: /dev/termination-log in a pod)",
    )
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG of confidence histograms before/after")
    parser.add_argument(
        "--allow-factory",
        action="append",
        default=[],
        metavar="PREFIX",
        help="allow model.architecture.factory modules under PREFIX "
        f"(repeatable; added to those in {ENV_ALLOWED_FACTORY_MODULES})",
    )


def _calibration_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--volume-root",
        type=Path,
        default=Path(DEFAULT_VOLUME_ROOT),
        help="claims resolve to DIR/<claimName>/<path> (default /volumes, as in the Job)",
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--json", action="store_true", help="print the full record as JSON instead of a summary")
    parser.add_argument(
        "--termination-log",
        type=Path,
        default=None,
        help="compact record path (default: /dev/termination-log in a pod)",
    )
    parser.add_argument(
        "--require-claims",
        action="store_true",
        help="refuse a location without claimName (the operator's Jobs pass it)",
    )
    parser.add_argument(
        "--allow-factory",
        action="append",
        default=[],
        metavar="PREFIX",
        help="allow model.architecture.factory modules under PREFIX "
        f"(repeatable; added to those in {ENV_ALLOWED_FACTORY_MODULES})",
    )


def _fold_codes() -> str:
    return "exit codes:\n  0  the bank is written\n  4  invalid input\n  other  unexpected error (retryable)"


def _exit_codes() -> str:
    return (
        "exit codes:\n"
        + "\n".join(f"  {code}  {meaning}" for code, meaning in EXIT_CODE_MEANINGS.items())
        + ("\n  other  unexpected error (retryable)")
    )


def _cell(metrics: AuditMetrics | None, name: str, fmt: str) -> str:
    """A number with its 95% interval, as the table prints it."""
    if metrics is None:
        return "-"
    value = getattr(metrics, name)
    interval = metrics.interval(name)
    if value is None or interval is None:
        return show(value, fmt)
    return f"{show(value, fmt)} [{show(interval.low, fmt.lstrip('+'))}, {show(interval.high, fmt.lstrip('+'))}]"


def format_table(record: ResultRecord) -> str:
    """Before/after table of the audit (each number with its 95% interval), then the verdict, reasons and notes."""
    lines = [f"{'':27}{'before':>24}{'after':>24}"]
    for name, _, shown, _ in numbers():
        pre, post = _cell(record.pre, name, shown.fmt), _cell(record.post, name, shown.fmt)
        if pre == post == "-":
            continue
        lines.append(f"{shown.label:27}{pre:>24}{post:>24}")
    lines.append("")
    samples = record.post.samples if record.post is not None else record.pre.samples if record.pre else {}
    counted = ", ".join(f"{count} {name}" for name, count in samples.items())
    lines.append(
        f"method {record.method}, {len(record.attempts)} attempt(s), {record.forget_samples} samples forgotten"
        + (f" (audited: {counted})" if counted else "")
    )
    lines.append(f"verdict {record.verdict}")
    lines.extend(f"  - {reason}" for reason in record.reasons)
    if record.notes:
        lines.append("notes")
        lines.extend(f"  - {note}" for note in record.notes)
    if record.output_model is not None:
        lines.append(f"new model {record.output_model.uri} (sha256 {record.output_model.sha256[:12]}...)")
    return "\n".join(lines)


def _setup_logging(verbose: bool, rank: int = 0, world: int = 1) -> None:
    """One log for every rank: the other ranks tag their lines and say only what goes wrong (or all, with -v)."""
    where = f" [rank {rank}]" if world > 1 else ""
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(
        level=logging.DEBUG if verbose else level,
        format=f"%(asctime)s %(levelname)s{where} %(message)s",
        stream=sys.stderr,
        force=True,
    )


def _termination_log(args: argparse.Namespace) -> Path | None:
    return args.termination_log if args.termination_log is not None else default_termination_log()


def _finish(outcome_record: ResultRecord, args: argparse.Namespace) -> int:
    termination = _termination_log(args)
    if termination is not None:
        write_termination_message(termination, outcome_record)
    if args.result is not None:
        write_json(args.result, outcome_record.dump())
    if args.json:
        print(json.dumps(outcome_record.dump(), indent=2, sort_keys=True))
    elif outcome_record.error:
        print(f"error: {outcome_record.error}", file=sys.stderr)
    else:
        print(format_table(outcome_record))
    return outcome_record.exit_code


def _refuse(args: argparse.Namespace, message: str) -> int:
    """A manifest that cannot be parsed: one line, and the exit code and message where the operator reads them."""
    print(f"error: {message}", file=sys.stderr)
    termination = _termination_log(args)
    if termination is not None:
        write_refusal(termination, EXIT_INVALID_INPUT, message)
    return EXIT_INVALID_INPUT


def _load(args: argparse.Namespace, path: Path, want: type[Any], *, report: bool = True) -> Any:
    """The manifest at ``path`` if it is of kind ``want``; else None, and the error is printed and
    written where the operator reads it if this process ``report``s (rank 0, or a single process)."""
    try:
        manifest = load_any_manifest(path, "UnlearningRequest" if want is Manifest else "UnlearningCalibration")
    except SpecError as error:
        message = str(error)
    else:
        if isinstance(manifest, want):
            return manifest
        command = "unlearn run" if isinstance(manifest, Manifest) else "unlearn calibrate"
        message = f"{path}: a {manifest.kind} manifest: run it with `{command}`"
    if report:
        _refuse(args, message)
    return None


def _allowed_factories(args: argparse.Namespace) -> tuple[str, ...]:
    try:
        from_env = parse_allowed_modules(os.environ.get(ENV_ALLOWED_FACTORY_MODULES, ""))
    except ValueError as error:
        raise InvalidInputError(f"{ENV_ALLOWED_FACTORY_MODULES}: {error}: the cluster admin sets it") from None
    try:
        from_flags = parse_allowed_modules(args.allow_factory)
    except ValueError as error:
        raise InvalidInputError(f"--allow-factory: {error}") from None
    return from_env + from_flags


def _bank_ref(args: argparse.Namespace) -> preflight.BankRef | None:
    """The reference bank named on the command line (the operator names the model's newest Ready one)."""
    if not getattr(args, "calibration_bank", None):
        return None
    return preflight.BankRef(args.calibration_bank, args.calibration_sha256, args.calibration_name)


def _check_run_id(run_id: str | None) -> None:
    if run_id is not None and not (0 < len(run_id.encode()) <= preflight.MAX_RUN_ID_BYTES and run_id.isprintable()):
        raise InvalidInputError(
            f"--run-id: give 1 to {preflight.MAX_RUN_ID_BYTES} bytes of printable text (the request's uid)"
        )


def _run_manifest(
    args: argparse.Namespace,
    manifest_path: Path,
    volume_root: Path,
    version: int | None,
    *,
    workdir: Path | None = None,
    place: WorkerPlace | None = None,
) -> int:
    """Run one request in this process: alone, or as one rank (``place``) of a data-parallel run.

    Rank 0 reports (the termination message, --result, the table) as a single process does; the
    other ranks only tell the launcher, by their exit code and rank record, whether they failed."""
    place = place or WorkerPlace()
    reports = place.rank == 0
    manifest: Manifest | None = _load(args, manifest_path, Manifest, report=reports)
    if manifest is None:
        return EXIT_INVALID_INPUT
    if workdir is not None:
        from unlearn.demo import clear_previous_output

        clear_previous_output(manifest, volume_root, workdir)
    options = preflight.RunOptions(
        volume_root=volume_root,
        device=args.device,
        model_version=version,
        progress=sys.stderr.isatty() and reports,
        require_claims=getattr(args, "require_claims", False),
        run_id=getattr(args, "run_id", None),
        calibration=_bank_ref(args),
    )
    draft = RecordDraft(manifest, options, place.world_size)
    plan: preflight.Plan | None = None
    try:
        options = dataclasses.replace(options, allowed_factories=_allowed_factories(args))
        _check_run_id(options.run_id)
        if not place.parallel:  # several ranks: rank 0 runs it in the run, once, and hands its plan to the others
            plan = preflight.check(manifest, options)
    except InvalidInputError as error:
        return _finish(draft.failed(EXIT_INVALID_INPUT, error), args) if reports else EXIT_INVALID_INPUT
    if plan is not None and plan.published is not None:  # reported again, torch never imported
        log.info("version %d was published by an earlier attempt of this run: reporting its record", plan.version)
        return _finish(plan.published, args)

    from unlearn.distributed import Ranks
    from unlearn.runner import run  # torch from here on

    ranks = Ranks(place.rank, place.world_size, place.local_rank, place.local_world_size)
    outcome = run(manifest, options, plan=plan, draft=draft, ranks=ranks)
    if place.parallel:
        if os.environ.get(ENV_RANK_RECORD):  # the launcher reads it if this rank fails
            write_rank_record(Path(os.environ[ENV_RANK_RECORD]), outcome.record, outcome.failed_at)
        if not reports:
            # Rank 0 reports the run. This rank's code tells the launcher only whether it failed on its own,
            # and how (a full /tmp is exit code 4 on whichever rank finds it).
            return outcome.exit_code if outcome.own_failure else 0
    if args.plot is not None and outcome.logits:
        from unlearn.plot import plot_confidence

        plot_confidence(outcome.logits, args.plot, title=f"{manifest.spec.model.name}: {outcome.record.method}")
    return _finish(outcome.record, args)


def _launch(args: argparse.Namespace, argv: list[str]) -> int:
    """``run --nproc-per-node N`` outside torchrun: check the request once, then start the N ranks.

    The manifest and the preflight are checked here, before any rank starts: a refusal costs no
    torch import and starts no process, and its record is written once. The version the check
    settled is passed to the ranks, so that all of them (and a failure record) name the same one."""
    world = args.nproc_per_node
    manifest: Manifest | None = _load(args, args.manifest, Manifest)
    if manifest is None:
        return EXIT_INVALID_INPUT
    options = preflight.RunOptions(
        volume_root=args.volume_root,
        device=args.device,
        model_version=args.model_version,
        require_claims=args.require_claims,
        run_id=args.run_id,
        calibration=_bank_ref(args),
    )
    draft = RecordDraft(manifest, options, world)
    try:
        options = dataclasses.replace(options, allowed_factories=_allowed_factories(args))
        _check_run_id(options.run_id)
        plan = preflight.check(manifest, options)
    except InvalidInputError as error:
        return _finish(draft.failed(EXIT_INVALID_INPUT, error), args)
    if plan.published is not None:  # an earlier attempt of this run published it: report it, start no rank
        log.info("version %d was published by an earlier attempt of this run: reporting its record", plan.version)
        return _finish(plan.published, args)
    if args.model_version is None:
        argv = [*argv, "--model-version", str(plan.version)]
    draft.fields["model_version"] = plan.version
    log.info("starting %d data-parallel processes", world)
    return launch(argv, world, _termination_log(args), lambda *failure: failure_record(draft, *failure))


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    if args.nproc_per_node < 1:
        print("error: --nproc-per-node must be at least 1", file=sys.stderr)
        return EXIT_INVALID_INPUT
    if args.nproc_per_node > 1 and not in_worker(os.environ):
        _setup_logging(args.verbose)
        return _launch(args, argv)  # the launcher imports no torch
    try:
        place = worker_place(os.environ)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_UNEXPECTED
    _setup_logging(args.verbose, place.rank, place.world_size)
    return _run_manifest(args, args.manifest, args.volume_root, args.model_version, place=place)


def format_calibration(record: CalibrationRecord) -> str:
    """The references' likeness to the original, the cost, and where the bank is."""
    lines = [f"{'reference':>10}{'rows':>8}{'held out':>10}{'test acc %':>12}{'fold acc %':>12}{'agreement %':>13}"]
    for r in record.references:
        lines.append(
            f"{r.fold:>10}{r.train_rows:>8}{r.held_out_rows:>10}{r.test_accuracy:>12.2f}"
            f"{r.fold_accuracy:>12.2f}{r.agreement:>13.2f}"
        )
    if record.original_test_accuracy is not None:
        lines.append(f"{'original':>10}{'':>8}{'':>10}{record.original_test_accuracy:>12.2f}")
    cost = record.cost
    lines.append("")
    lines.append(
        f"cost {cost.get('retrainEquivalents', 0):.2f} retrain-equivalents, {cost.get('deviceSeconds', 0):.1f} "
        f"device-seconds, {cost.get('wallSeconds', 0):.1f} s wall"
    )
    if record.bank is not None:
        lines.append(f"bank {record.bank.uri} (sha256 {record.bank.sha256[:12]}...)")
    return "\n".join(lines)


def _calibration(args: argparse.Namespace) -> int:
    """calibrate, calibrate-fold and calibrate-merge: the manifest and the checks before torch (as ``run``
    does), then the run; the compact record goes where the operator reads it."""
    manifest: CalibrationManifest | None = _load(args, args.manifest, CalibrationManifest)
    if manifest is None:
        return EXIT_INVALID_INPUT
    termination = _termination_log(args)
    started_at = now()
    fold = args.fold if args.command == "calibrate-fold" else None
    try:
        if args.command == "calibrate-fold" and fold is None:
            index = os.environ.get("JOB_COMPLETION_INDEX", "")
            if not index.isdigit():
                raise InvalidInputError("--fold: give the fold, or run as an Indexed Job ($JOB_COMPLETION_INDEX)")
            fold = int(index)
        if fold is not None and not 0 <= fold < manifest.spec.folds:
            raise InvalidInputError(f"--fold {fold}: the calibration has folds 0..{manifest.spec.folds - 1}")
        allowed = _allowed_factories(args)
        # The merge reads only the output folder; the folds (and a local run) read the model and the data too.
        preflight.check_calibration(
            manifest, allowed, args.require_claims, args.volume_root, inputs=args.command != "calibrate-merge"
        )
    except InvalidInputError as error:
        print(f"error: {error}", file=sys.stderr)
        refusal: FoldRecord | CalibrationRecord = (
            failed_fold(manifest, fold if fold is not None else -1, EXIT_INVALID_INPUT, str(error), started_at)
            if args.command == "calibrate-fold"
            else failed_calibration(
                manifest, EXIT_INVALID_INPUT, str(error), started_at, os.environ.get("UNLEARN_JOB_IMAGE", "")
            )
        )
        if termination is not None:
            compacted = compact_fold(refusal) if isinstance(refusal, FoldRecord) else compact_calibration(refusal)
            termination.write_text(compacted, encoding="utf-8")
        return EXIT_INVALID_INPUT

    from unlearn.calibrate import CalibrateOptions, run_calibration, run_fold, run_merge  # torch from here on

    options = CalibrateOptions(
        volume_root=args.volume_root,
        device=args.device,
        progress=sys.stderr.isatty(),
        allowed_factories=allowed,
        require_claims=args.require_claims,
    )
    if fold is not None:
        fold_record = run_fold(manifest, options, fold)
        if termination is not None:
            termination.write_text(compact_fold(fold_record), encoding="utf-8")
        if args.json:
            print(json.dumps(fold_record.dump(), indent=2, sort_keys=True))
        elif fold_record.error:
            print(f"error: {fold_record.error}", file=sys.stderr)
        elif fold_record.reference is not None:
            r = fold_record.reference
            print(
                f"fold {fold}: test accuracy {r.test_accuracy:.2f}%, fold accuracy {r.fold_accuracy:.2f}%, "
                f"agreement {r.agreement:.2f}%"
            )
        return fold_record.exit_code
    run = run_calibration if args.command == "calibrate" else run_merge
    record = run(manifest, options)
    if termination is not None:
        termination.write_text(compact_calibration(record), encoding="utf-8")
    if args.json:
        print(json.dumps(record.dump(), indent=2, sort_keys=True))
    elif record.error:
        print(f"error: {record.error}", file=sys.stderr)
    else:
        print(format_calibration(record))
    return record.exit_code


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.command == "run":
        return _run(args, argv)
    _setup_logging(args.verbose)
    if args.command in ("calibrate", "calibrate-fold", "calibrate-merge"):
        return _calibration(args)
    if args.command == "prepare-demo":
        import torch

        from unlearn.demo import prepare_demo
        from unlearn.runner import cpu_threads

        torch.set_num_threads(cpu_threads(0))  # the demo MLP is small: see cpu_threads
        print(prepare_demo(args.dir))
        return 0
    # demo
    from unlearn.demo import cache_dir, ensure_demo_model

    workdir = args.workdir or cache_dir()
    if not args.manifest.is_file():
        print(f"error: --manifest {args.manifest}: not found: run from a clone or pass --manifest", file=sys.stderr)
        return EXIT_INVALID_INPUT
    import torch

    from unlearn.runner import cpu_threads

    torch.set_num_threads(cpu_threads(0))  # the demo MLP is small: see cpu_threads
    model = ensure_demo_model(workdir)
    log.info("demo model %s", model)
    # Version 1 every time: the demo replaces its own previous output (in its cache folder only), so it is
    # idempotent and its output folder does not grow; everywhere else a published version is never replaced.
    return _run_manifest(args, args.manifest, workdir / "volumes", 1, workdir=workdir)


if __name__ == "__main__":
    sys.exit(main())
