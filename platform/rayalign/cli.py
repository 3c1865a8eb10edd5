"""``rayalign`` command line: parses arguments, loads the config, composes stages.

Configs are loaded, and the console set up, before anything imports Ray: whether a local cluster
keeps to 127.0.0.1 is decided when Ray is imported (see rayalign.runtime).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from rayalign.config import ConfigError, RunConfig, load_config
from rayalign.console import Console, log
from rayalign.errors import ClusterResourceError, DataQualityError, StorageError, TrainingDiverged, TrainingIncomplete
from rayalign.runtime import bind_local_cluster_to_loopback

USER_ERRORS = (ConfigError, DataQualityError, FileNotFoundError, ClusterResourceError, StorageError)
STOPPED_ON_ALARM = 3  # the exit status of `rayalign train` when a run stopped on an alarm (monitor.on_alarm: stop)


def _train(args: argparse.Namespace, configs: list[RunConfig], console: Console) -> int:
    from rayalign.diagnostics.report import format_runs_table
    from rayalign.evaluation.report import evaluation_line
    from rayalign.metrics import ACTION, STEP
    from rayalign.pipeline import run_train

    summaries = []
    for cfg in configs:
        console.capture(cfg.output.run_dir, claim_first=True)
        log.info("training %s (%s) -> %s", cfg.output.name, cfg.loss.type, cfg.output.run_dir)
        summaries.append(run_train(cfg, console))
    _shutdown_ray(args)  # flush worker logs first, so the table is the last thing printed
    console.print("\n" + format_runs_table([Path(s["files"]["run_dir"]) for s in summaries]))
    for s in summaries:
        for alarm in s["alarms"][:1]:
            console.print(f"PATHOLOGY ALARM in {s['run']} (first at step {alarm[STEP]}): {alarm['reason']}")
        for alarm in s["displacement_alarms"][:1]:
            console.print(f"LIKELIHOOD DISPLACEMENT in {s['run']} (first at step {alarm[STEP]}): {alarm['reason']}")
        for action in s["actions"]:
            console.print(f"{s['run']}: {action[ACTION]} at step {action[STEP]}")
        if "generation" in s:
            console.print(f"{s['run']}: {evaluation_line(s['generation'])}")
        exported = s["exported"]
        if exported["model"] == "best":
            console.print(
                f"{s['run']}: exported the best model by {exported['key']} "
                f"({exported['value']:.4f}, step {exported[STEP]})"
            )
    console.print("details: summary.json and report.png in each run directory")
    # A script tells a run stopped on an alarm (3) from a finished one (0) and a failed one (1, 2).
    return STOPPED_ON_ALARM if any(s["stopped_on_alarm"] for s in summaries) else 0


def _sweep(args: argparse.Namespace, configs: list[RunConfig], console: Console) -> int:
    from rayalign.tune.sweep import format_sweep_table, run_sweep

    (cfg,) = configs
    console.capture(cfg.output.run_dir, claim_first=True)
    summary = run_sweep(cfg, fresh=args.fresh, on_claimed=console.adopt_log)
    _shutdown_ray(args)
    files = summary["files"]
    console.print("\n" + format_sweep_table(summary))
    console.print(
        f"objective: {summary['objective']} ({summary['mode']}); trials: "
        + ", ".join(f"{n} {status.replace('_', ' ')}" for status, n in summary["counts"].items() if n)
    )
    console.print(f"results: {files['csv']}  plot: {files['plot']}")
    if files["best_config"]:
        console.print(f"best config: {files['best_config']}  (rayalign train --config {files['best_config']})")
    if summary["interrupted"]:
        console.print(f"sweep interrupted; resume with: rayalign sweep --config {args.config}")
        return 1
    return 0


def _reference(args: argparse.Namespace, configs: list[RunConfig], console: Console) -> int:
    from rayalign.pipeline import run_reference
    from rayalign.storage import publish

    (cfg,) = configs
    console.capture(cfg.output.run_dir / "reference")
    report = run_reference(cfg)
    _shutdown_ray(args)
    store = report["cache"]
    console.print(
        f"reference ({report['backend']}): {store['found']} pairs found in the store, {store['scored']} "
        f"scored; the store holds {store['store_rows']} rows ({store['store_bytes'] / 1e6:.1f} MB) "
        f"in {store['path']}"
    )
    console.print(f"details: {publish(cfg.output, cfg.output.run_dir / 'reference')}/reference.json")
    return 0


def _open_reference_check(cfg: RunConfig, console: Console, name: str):
    """Model, data and Ray for a command that only runs the reference: (OpenedRun, out dir)."""
    from rayalign.data.stage import open_run
    from rayalign.runtime import Workload

    out_dir = cfg.output.run_dir / name
    console.capture(out_dir)
    return open_run(cfg, out_dir, Workload(train=False)), out_dir


def _refcheck(args: argparse.Namespace, configs: list[RunConfig], console: Console) -> int:
    from rayalign.reference.check import format_report, run_refcheck
    from rayalign.storage import publish

    (cfg,) = configs
    opened, out_dir = _open_reference_check(cfg, console, "refcheck")
    report = run_refcheck(cfg, opened.model, opened.paths, args.num_pairs, out_dir)
    _shutdown_ray(args)
    console.print(format_report(report))
    console.print(f"details: {publish(cfg.output, out_dir)}/refcheck.json")
    return 0 if report["passed"] else 1


def _audit(args: argparse.Namespace, configs: list[RunConfig], console: Console) -> int:
    from rayalign.diagnostics.audit import format_audit, run_audit
    from rayalign.storage import publish

    (cfg,) = configs
    opened, out_dir = _open_reference_check(cfg, console, "audit")
    report = run_audit(cfg, opened.model, opened.paths, out_dir)
    _shutdown_ray(args)
    console.print(format_audit(report))
    stored = publish(cfg.output, out_dir)
    console.print(f"report: {stored}/audit.json  figure: {stored}/audit.png")
    return 0


def _evaluate(args: argparse.Namespace, configs: list[RunConfig], console: Console) -> int:
    from rayalign.evaluation.report import evaluation_line
    from rayalign.evaluation.stage import EVALUATE_DIR, run_evaluate
    from rayalign.metrics import gen_key

    (cfg,) = configs
    console.capture(cfg.output.run_dir / EVALUATE_DIR)
    report = run_evaluate(cfg, args.policy, name=args.name, replace=args.replace)
    _shutdown_ray(args)
    console.print(f"{evaluation_line(report)} ({report['files']['evaluation']})")
    # A scorer that could score nothing is a failed evaluation, whatever was generated.
    return 1 if report["scorer"] and report.get(gen_key("score")) is None else 0


def _validate(args: argparse.Namespace, configs: list[RunConfig], console: Console) -> int:
    """The data stage alone: read, validate, tokenize, truncate, quarantine; no reference, no training. Then the
    memory plan per training rank, from the model's config alone (rayalign.memory_plan)."""
    from rayalign.cpus import cpu_plan
    from rayalign.data.records import count_training_pairs
    from rayalign.data.stage import prepare_data
    from rayalign.memory_plan import memory_plan, model_size
    from rayalign.train.steps import step_plan

    (cfg,) = configs
    out_dir = cfg.output.run_dir / "validate"
    out_dir.mkdir(parents=True, exist_ok=True)
    console.capture(out_dir)
    problem = None
    try:
        data = prepare_data(cfg, out_dir, workload=None)  # logs the counts line
        report = data.report
        # The steps train will take: on the training split, the held-out pairs left out.
        steps = step_plan(cfg.train, cfg.scaling.num_workers, count_training_pairs(data.pairs, cfg, report.ok)).total
    except DataQualityError as err:
        if err.report is None or not args.json:
            raise
        problem, report, steps = str(err), err.report, 0
        log.info(report.summary_line())
        console.error(f"rayalign: error: {problem}")
    _shutdown_ray(args)
    plan = None
    if problem is None:
        size = model_size(data.model.driver_dir, cfg.model.lora)
        plan = memory_plan(cfg, size, _gpu_memory_gib(args.gpu_memory_gib))
        log.info(plan.line())
    if args.json:
        console.print(
            json.dumps(
                {
                    "records": report.total,
                    "usable": report.ok,
                    "truncated": report.truncated,
                    "quarantined": report.num_quarantined,
                    "quarantined_by_reason": dict(sorted(report.quarantined.items())),
                    "quarantine_path": report.quarantine_path,
                    "files": report.files,
                    "skipped_files": report.skipped_files.as_dict(),
                    "optimizer_steps": steps,
                    "cpus": cpu_plan(cfg),
                    "memory_plan": plan.as_dict() if plan is not None else None,
                    "ok": problem is None,
                }
            )
        )
    return 2 if problem else 0


def _gpu_memory_gib(given: float | None) -> float | None:
    """One GPU's memory in GiB: ``given``, else the driver's GPU 0 when it has one, else None (unknown)."""
    if given is not None:
        return given
    import torch

    return torch.cuda.get_device_properties(0).total_memory / 1024**3 if torch.cuda.is_available() else None


def _report(args: argparse.Namespace, configs: list[RunConfig], console: Console) -> int:
    import tempfile

    from rayalign.config import S3Config
    from rayalign.diagnostics.report import fetch_run, format_runs_table, plot_runs

    try:
        s3 = S3Config(endpoint=args.s3_endpoint, scheme=args.s3_scheme)
    except ValueError as err:  # pydantic's ValidationError
        raise ConfigError(f"--s3-endpoint: {err.errors()[0]['msg'].removeprefix('Value error, ')}") from None
    with tempfile.TemporaryDirectory(prefix="rayalign-report-") as tmp:
        # A run kept in storage (s3://..., gs://...) is read from there: its metrics, summary and config.
        run_dirs = [
            fetch_run(d, Path(tmp) / str(i), s3) if "://" in d else Path(d) for i, d in enumerate(args.run_dirs)
        ]
        out = Path(args.out) if args.out else (None if "://" not in args.run_dirs[0] else Path.cwd() / "report.png")
        png = plot_runs(run_dirs, out)
        console.print(format_runs_table(run_dirs))
    console.print(f"figure: {png}")
    return 0


def _shutdown_ray(args: argparse.Namespace) -> None:
    """Disconnect from Ray, unless this process was connected before the command ran: a command called from
    Python (a notebook, a test session) leaves its caller's connection, and a cluster the caller started, as
    it found them."""
    if args.caller_holds_ray:
        return
    import ray

    ray.shutdown()


def add_overrides(parser: argparse.ArgumentParser, of: str = "a config key") -> None:
    """``--set KEY=VALUE`` (repeatable) into ``args.overrides``, as every command and job script takes it."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override {of}, e.g. --set loss.beta=0.2 (value parsed as YAML)",
    )


def _config_arguments(parser: argparse.ArgumentParser, help: str = "YAML config", repeat: bool = False) -> None:
    """``--config FILE`` and ``--set KEY=VALUE``, the same for every command that reads a config."""
    parser.add_argument("--config", action="append" if repeat else "store", required=True, metavar="FILE", help=help)
    add_overrides(parser)
    parser.add_argument(
        "--verbose",
        "-v",
        action="store_true",
        help="show Ray's and the libraries' output here too (by default: <run dir>/logs/rayalign.log)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rayalign", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a policy with DPO/CPO on Ray (Data → reference → Train)")
    _config_arguments(
        train, help="YAML config; repeat to run several configs one after another (e.g. DPO then CPO)", repeat=True
    )
    earlier = train.add_mutually_exclusive_group()
    earlier.add_argument(
        "--replace",
        dest="if_exists",
        action="store_const",
        const="replace",
        help="replace an earlier training run of the same output.name (output.if_exists: replace)",
    )
    earlier.add_argument(
        "--resume",
        dest="if_exists",
        action="store_const",
        const="resume",
        help="continue an unfinished run of the same output.name from its last checkpoint (output.if_exists: resume)",
    )
    train.set_defaults(func=_train)

    sweep = sub.add_parser(
        "sweep", help="Ray Tune search over the config's `sweep.space` (reference scored once, shared)"
    )
    _config_arguments(sweep, help="YAML config with a `sweep` section")
    sweep.add_argument(
        "--fresh",
        action="store_true",
        help="discard an unfinished sweep in the same output directory instead of resuming it",
    )
    sweep.set_defaults(func=_sweep)

    reference = sub.add_parser(
        "reference", help="the reference pass alone: score the pairs missing from the reference store into it"
    )
    _config_arguments(reference)
    reference.set_defaults(func=_reference)

    refcheck = sub.add_parser(
        "refcheck", help="compare vLLM reference log-probs with the training forward pass on a sample"
    )
    _config_arguments(refcheck)
    refcheck.add_argument("--num-pairs", type=int, default=64, help="pairs to score both ways (default 64)")
    refcheck.set_defaults(func=_refcheck)

    audit = sub.add_parser("audit", help="audit the reference (δ_ref) and the data before training")
    _config_arguments(audit)
    audit.set_defaults(func=_audit)

    validate = sub.add_parser(
        "validate", help="the data stage alone: counts, truncation and quarantine, no reference or training"
    )
    _config_arguments(validate)
    validate.add_argument("--json", action="store_true", help="end with one JSON line of the counts")
    validate.add_argument(
        "--gpu-memory-gib",
        type=float,
        default=None,
        help="one GPU's memory: the memory plan says whether a rank fits it (default: the driver's GPU 0, if any)",
    )
    validate.set_defaults(func=_validate)

    evaluate = sub.add_parser(
        "evaluate", help="generate with the policy and the reference on the same prompts, score, compare"
    )
    _config_arguments(evaluate)
    evaluate.add_argument(
        "--policy", metavar="DIR", help="a model or run directory, a path or a storage URI (default: the run's model/)"
    )
    evaluate.add_argument(
        "--name",
        type=_folder_name,
        help="keep this evaluation in <run>/evaluate/NAME/ (default: <run>/evaluate/, after training's)",
    )
    evaluate.add_argument("--replace", action="store_true", help="replace an evaluation already there")
    evaluate.set_defaults(func=_evaluate)

    report = sub.add_parser("report", help="PNG plots of one run or several side by side")
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    report.add_argument(
        "--out", metavar="PNG", help="output file (default: in the (first) run directory; ./report.png for a URI)"
    )
    report.add_argument(
        "--s3-endpoint",
        metavar="HOST:PORT",
        help="an S3-compatible server for s3:// run directories (as output.s3.endpoint)",
    )
    report.add_argument("--s3-scheme", choices=["https", "http"], default="https")
    report.set_defaults(func=_report)
    return parser


def _folder_name(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", value):
        raise argparse.ArgumentTypeError(f"{value!r}: letters, digits, '_', '-' and '.', not starting with '.'")
    return value


def _load_configs(args: argparse.Namespace) -> list[RunConfig]:
    """Every config the command names, validated before Ray starts: a typo fails in a second."""
    paths = getattr(args, "config", None) or []
    overrides = getattr(args, "overrides", [])  # `report` takes no config
    overrides = overrides + ([f"output.if_exists={args.if_exists}"] if getattr(args, "if_exists", None) else [])
    return [load_config(path, overrides) for path in ([paths] if isinstance(paths, str) else paths)]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    ray = sys.modules.get("ray")  # not imported here: a command that needs no cluster never loads Ray
    args.caller_holds_ray = ray is not None and ray.is_initialized()
    console, configs = None, []
    try:
        configs = _load_configs(args)
        if configs:
            bind_local_cluster_to_loopback(configs[0].ray)
        console = Console(verbose=getattr(args, "verbose", False))
        return args.func(args, configs, console)
    except USER_ERRORS as err:
        return _fail(console, f"rayalign: error: {err}", 2)
    except (TrainingDiverged, TrainingIncomplete) as err:
        return _fail(console, f"rayalign: run failed: {err}", 1)
    except BaseException:
        if console is not None:
            console.close()
            if console.log_path is not None:
                print(f"rayalign: failed; Ray's and the libraries' output is in {console.log_path}", file=sys.stderr)
        raise
    finally:
        if console is not None:
            console.close()
            _keep_log(console, configs)


def _keep_log(console: Console, configs: list[RunConfig]) -> None:
    """The command's log goes to the run's storage too, whatever the ending: on a cluster the driver's
    disk may be gone with its node."""
    if console.log_path is None or console.log_pending or not configs or configs[0].output.storage is None:
        return
    from rayalign.storage import publish

    try:
        publish(configs[0].output, console.log_path)
    except Exception as exc:  # the log is kept locally anyway; the command's own result stands
        print(f"rayalign: the log could not be copied to storage: {exc}", file=sys.stderr)


def _fail(console: Console | None, message: str, code: int) -> int:
    """The one line a user error ends with, on the real stderr (and in the log)."""
    if console is None:
        print(message, file=sys.stderr)
    else:
        console.error(message)
    return code


if __name__ == "__main__":
    sys.exit(main())
