"""The `curate` command.

    curate run JOB.yaml [--input PATH ...] [--output DIR] [--overwrite] [-q] [-- BEAM OPTIONS]
    curate score JOB.yaml [--output DIR]
    curate select --scores DIR --method M [--budget B] [--set KEY=VALUE] [--output DIR]
    curate compare SPEC.yaml [-q] [-- BEAM OPTIONS]
    curate inspect OUT_DIR
    curate report OUT_DIR
    curate export OUT_DIR --format jsonl|parquet [--to DIR] [--columns a,b,c] [--rejected] [--overwrite]
    curate models prepare
    curate train --data OUT_DIR --model ID_OR_PATH --output RUN_DIR
    curate prune --method magnitude|wanda|layer_drop --output DIR [--model M] [--sparsity S]

Errors a user can fix (a bad job file, an unreadable input, a missing model, an output
that would replace someone's data) print one clear line and exit with status 2; a
system error while running (disk full, permission denied) prints one line and exits 1;
SIGINT and SIGTERM remove the run's staging directory (a Dataflow run's is kept while
its job is cancelled: curate.dataflow.cancel_on_interrupt) and exit 130 / 143. A
traceback means a bug in curate.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import signal
import sys

import yaml

from curate.config import ConfigError, InputConfig, JobConfig, TooManyFailures, load_job
from curate.models import prepare_default_models

# the commands' own modules load Beam and torch (seconds): each is imported by its command

EPILOG = """examples:
  curate run jobs/random.yaml                       select 1,000 gsm8k rows at random
  curate run jobs/grape.yaml --output runs/grape    GRAPE on 100 alpaca_eval instructions
  curate run jobs/random.yaml -- --direct_running_mode=multi_processing --direct_num_workers=2
  curate score jobs/grape.yaml --output runs/pool-scores      score once (loads the model)
  curate select --scores runs/pool-scores --method grape     select many (no model)
  curate compare jobs/compare/mixed.yaml            do the methods beat random on this pool?
  curate inspect runs/random                        counts, columns, scores, examples
  curate export runs/random --format parquet        kept rows as runs/random-export/data.parquet
Beam options after `--` go to the pipeline (e.g. --runner=DataflowRunner --project=...)."""


def _setup_logging(verbose: bool, quiet: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # faiss logs its SIMD-variant probes as INFO lines that read like import errors
    for noisy in ("apache_beam", "urllib3", "filelock", "httpx", "datasets", "absl", "faiss"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not verbose:
        # Beam logs a step's error with its traceback before re-raising it; `main` says it
        # in one line (or, for a bug, shows the traceback once)
        logging.getLogger("apache_beam.runners.common").setLevel(logging.CRITICAL)
        for handler in logging.getLogger().handlers:
            handler.addFilter(_not_beam_gcp_notice)


def _not_beam_gcp_notice(record: logging.LogRecord) -> bool:
    """Beam's GCP modules warn at import that apitools is missing: true, and harmless for
    every run that does not use BigQuery."""
    return not record.getMessage().startswith("apitools not found")


def cmd_run(args) -> int:
    job = load_job(args.job)
    if args.input:
        job.inputs = [InputConfig(path=p) for p in args.input]
    if args.output:
        job.output = args.output
    if job.train:  # a mistake in `train:` is found now, not after the selection has run
        from curate.train import TrainConfig, check_run_dir, run_train  # torch: loaded only to train

        opts = dict(job.train)
        out = opts.pop("output", f"{job.output.rstrip('/')}-sft")
        TrainConfig.from_dict(opts)
        check_run_dir(out, [job.output, *(i.path for i in job.inputs), *([job.scores] if job.scores else [])])
    from curate.pipeline.run import run_job

    print(f"curate run: {job.name} -> {job.output}", file=sys.stderr)
    manifest = run_job(job, args.beam_args, overwrite=args.overwrite, progress=not args.quiet, fresh=args.fresh)
    print_summary(manifest)
    if job.train:
        print(f"curate run: training on {job.output} -> {out}", file=sys.stderr)
        metrics = run_train(job.output, output_dir=out, **opts)
        _print_train(metrics)
    return 0


def _print_train(metrics: dict) -> None:
    print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}, indent=2))


def cmd_score(args) -> int:
    job = load_job(args.job)
    if not job.scorers:
        raise ConfigError(f"{args.job}: no scorers to run")
    from curate.pipeline.run import score_once

    out = args.output or job.scores or f"{job.output.rstrip('/')}-scores"
    manifest, reused = score_once(job, out, args.beam_args, overwrite=args.overwrite, progress=not args.quiet,
                                  fresh=args.fresh)
    if reused:
        print(f"{out} already holds these scores (same inputs, filters and scorers): nothing to do")
    print_summary(manifest)
    return 0


def _parse_value(text: str, where: str):
    """A command-line value read as YAML (a number, a list, ...); plain YAML only."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:  # a tag such as !!python/object, or broken syntax
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where} {text!r}: not a plain YAML value ({problem})") from None


def cmd_select(args) -> int:
    from curate.pipeline.run import select_from_scores

    step = {"type": args.method}
    if args.budget is not None:
        step["budget"] = _parse_value(args.budget, "--budget")
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        step[key] = _parse_value(value, f"--set {key}=")
    output = args.output or f"{args.scores.rstrip('/')}-{args.method}"
    job = JobConfig(inputs=[], output=output, name=f"select-{args.method}", selectors=[step])
    manifest = select_from_scores(job, args.scores, args.beam_args, overwrite=args.overwrite,
                                  progress=not args.quiet)
    print_summary(manifest)
    return 0


def cmd_compare(args) -> int:
    from curate.compare import load_compare, run_compare

    spec = load_compare(args.spec)
    run_compare(spec, args.beam_args, progress=not args.quiet)
    with open(f"{spec.output}/compare.md", encoding="utf-8") as fh:
        print(fh.read(), end="")
    print(f"report: {spec.output}/report.html")
    return 0


def print_summary(manifest: dict) -> None:
    c = manifest["counts"]
    empty = manifest.get("plan", {}).get("empty_inputs") or []
    lines = [f"output        {manifest['output']}"]
    if empty:
        lines.append(f"skipped       {len(empty):>9,}   empty input file(s)")
    lines += [f"read          {c['read']:>9,}",
              f"  invalid     {c['invalid']:>9,}   (dead_letter.jsonl)",
              f"  examples    {c['examples']:>9,}"]
    for stage, n in c["filtered"].items():
        lines.append(f"  - {stage:<18}{n:>9,}")
    for stage, n in c.get("score_failed", {}).items():
        lines.append(f"  - {stage:<18}{n:>9,}   failed (dead_letter.jsonl)")
    for stage, n in c["not_selected"].items():
        lines.append(f"  - {stage:<18}{n:>9,}")
    lines.append(f"kept          {c['kept']:>9,}   in {c['shards']} shard(s)")
    for stage, n in c.get("from_saved", {}).items():
        if n:
            lines.append(f"resumed       {n:>9,}   rows' {stage} scores from a previous run's saved work")
    lines.append(f"time          {manifest['timings_s']['total']:.1f} s")
    print("\n".join(lines))


def cmd_inspect(args) -> int:
    from curate.report.inspect import inspect_output

    print(inspect_output(args.out_dir, n_examples=args.examples))
    return 0


def cmd_report(args) -> int:
    from curate.report.html import render_report

    print(render_report(args.out_dir))
    return 0


def cmd_export(args) -> int:
    from curate.export import export_output, parse_columns

    result = export_output(args.out_dir, args.format, to=args.to, columns=parse_columns(args.columns),
                           rejected=args.rejected, overwrite=args.overwrite)
    for name, f in result["files"].items():
        print(f"{result['to']}/{name}  {f['rows']:,} rows, {len(f['columns'])} columns")
    return 0


def cmd_models(args) -> int:
    for name, path in prepare_default_models().items():
        print(f"{name}: {path}")
    return 0


def cmd_prune(args) -> int:
    from curate.prune import make_pruned_copy, summarise

    layers = None
    if args.layers:
        parts = [int(x) for x in args.layers.split(",") if x.strip()]
        layers = parts[0] if len(parts) == 1 and "," not in args.layers else parts
    report = make_pruned_copy(args.model, args.method, args.output, sparsity=args.sparsity, layers=layers,
                              calibration=args.calibration or [], calibration_rows=args.calibration_rows,
                              max_length=args.max_length, dtype=args.dtype)
    print(f"{summarise(report)}\nsaved to {report['output']}")
    return 0


def cmd_train(args) -> int:
    from curate.train import run_train

    overrides = {k: v for k, v in vars(args).items()
                 if k in ("epochs", "max_steps", "lr", "method", "max_length", "template", "lora_r")
                 and v is not None}
    metrics = run_train(args.data, model=args.model, output_dir=args.output, eval_path=args.eval,
                        limit=args.limit, eval_limit=args.eval_limit, **overrides)
    _print_train(metrics)
    return 0


def _output_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output path even if it is not a curate output "
                        "(never an input, and never the working or home directory)")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress lines; warnings and errors only")
    p.set_defaults(beam_args=[])


def _fresh_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fresh", action="store_true",
                   help="score every row again: ignore the scores a failed or killed run saved "
                        "(and, for `score`, scores already complete in the output)")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="curate", description="Select and curate instruction-tuning data with Beam pipelines.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run a job: read, validate, filter, score, select, write shards")
    p.add_argument("job", help="job YAML (see jobs/)")
    p.add_argument("--input", action="append", help="replace the job's inputs (repeatable; globs ok)")
    p.add_argument("--output", help="replace the job's output directory")
    _output_options(p)
    _fresh_option(p)
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("score", help="run a job's readers, filters and scorers; write the scored rows")
    p.add_argument("job")
    p.add_argument("--output", help="where to write scores (default: the job's `scores:`, or OUTPUT-scores)")
    _output_options(p)
    _fresh_option(p)
    p.set_defaults(fn=cmd_score)

    p = sub.add_parser("select", help="select from scores written by `curate score`, without models")
    p.add_argument("--scores", required=True, help="a `curate score` output directory")
    p.add_argument("--method", required=True, help="selector type: random, grape, donod, ...")
    p.add_argument("--budget", help="a count (1000) or a fraction (0.1)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="other selector options (repeatable)")
    p.add_argument("--output", help="output directory (default: SCORES-METHOD)")
    _output_options(p)
    p.set_defaults(fn=cmd_select)

    p = sub.add_parser("compare", help="do selections beat random on a pool? score once, select with each "
                                       "method and random seeds, train and evaluate each subset")
    p.add_argument("spec", help="compare spec YAML (see jobs/compare/mixed.yaml)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    p.set_defaults(fn=cmd_compare, beam_args=[])

    p = sub.add_parser("inspect", help="counts, columns, score summaries and examples of an output")
    p.add_argument("out_dir")
    p.add_argument("--examples", type=int, default=3, help="how many kept examples to show")
    p.set_defaults(fn=cmd_inspect)

    p = sub.add_parser("report", help="(re)write OUT_DIR/report.html with plots")
    p.add_argument("out_dir")
    p.set_defaults(fn=cmd_report)

    p = sub.add_parser("export", help="write an output's kept rows as one JSONL or Parquet file")
    p.add_argument("out_dir", help="a curate output directory (has manifest.json)")
    p.add_argument("--format", required=True, choices=["jsonl", "parquet"])
    p.add_argument("--to", help="directory to write data.FORMAT into (default: OUT_DIR-export)")
    p.add_argument("--columns", help="comma-separated columns to write, in that order (default: all)")
    p.add_argument("--rejected", action="store_true", help="also write the rejected rows as rejected.FORMAT")
    p.add_argument("--overwrite", action="store_true",
                   help="write into an existing non-empty --to, replacing data.FORMAT / rejected.FORMAT there "
                        "(never into OUT_DIR, the working or home directory)")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("prune", help="make a pruned copy of a model (magnitude, wanda, layer_drop)")
    p.add_argument("--model", default="default", help="HF id or local path (default: embedded SmolLM2)")
    p.add_argument("--method", required=True, choices=["magnitude", "wanda", "layer_drop"])
    p.add_argument("--sparsity", type=float, default=0.5, help="fraction of decoder linear weights to zero")
    p.add_argument("--layers", help="layer_drop: N (drop the last N) or i,j,... (drop those; '3,' is one index)")
    p.add_argument("--calibration", action="append", help="wanda: pool file(s) to draw calibration rows from")
    p.add_argument("--calibration-rows", dest="calibration_rows", type=int, default=64)
    p.add_argument("--max-length", dest="max_length", type=int, default=512, help="calibration tokens per row")
    p.add_argument("--dtype", default="float32", help="dtype to prune and save in (default float32)")
    p.add_argument("--output", required=True, help="directory for the pruned model (HF layout)")
    p.set_defaults(fn=cmd_prune)

    p = sub.add_parser("models", help="prepare the embedded default models (convert and cache)")
    p.add_argument("action", choices=["prepare"])
    p.set_defaults(fn=cmd_models)

    p = sub.add_parser("train", help="fine-tune a model (LoRA by default) on curated shards")
    p.add_argument("--data", required=True, help="a curate output directory or a JSONL file")
    p.add_argument("--model", default="default", help="HF id or local path (default: embedded SmolLM2)")
    p.add_argument("--output", required=True, help="run directory: checkpoints, adapter, metrics.json "
                                                    "(never --data or --eval, nor inside or around them)")
    p.add_argument("--eval", help="held-out data for loss before/after (directory or JSONL)")
    p.add_argument("--limit", type=int, help="train on the first N examples")
    p.add_argument("--eval-limit", dest="eval_limit", type=int, help="evaluate on the first N held-out examples")
    p.add_argument("--method", choices=["lora", "full"])
    p.add_argument("--epochs", type=int)
    p.add_argument("--max-steps", dest="max_steps", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--max-length", dest="max_length", type=int)
    p.add_argument("--template", choices=["plain", "chat"])
    p.add_argument("--lora-r", dest="lora_r", type=int)
    p.set_defaults(fn=cmd_train)
    return parser


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so the run cleans up as on Ctrl-C."""


def _raise_terminated(signum, frame):
    raise Terminated()


def split_beam_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """(curate's own arguments, Beam options): everything after the first `--` goes to
    Beam, so curate's options may stand before or after the job file."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def main(argv: list[str] | None = None) -> int:
    own, beam_args = split_beam_args(list(sys.argv[1:] if argv is None else argv))
    args = make_parser().parse_args(own)
    if beam_args:
        if not hasattr(args, "beam_args"):
            print(f"curate: error: {args.command} takes no Beam options (after --)", file=sys.stderr)
            return 2
        args.beam_args = beam_args
    _setup_logging(args.verbose, getattr(args, "quiet", False))
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return args.fn(args)
    except BaseException as exc:
        return _exit_status(exc)
    finally:
        signal.signal(signal.SIGTERM, previous)


def raised_in_step(exc: BaseException) -> BaseException:
    """The error a Beam step raised. Beam re-raises it with the step's name added, as a
    copy of its type or, when the type cannot take the text (OSError, a BaseException), as
    a RuntimeError; either way the original is the copy's context."""
    while getattr(exc, "_tagged_with_step", False) and exc.__context__ is not None:
        exc = exc.__context__
    return exc


def _exit_status(exc: BaseException) -> int:
    """One line and the exit status for an error the user can act on, wherever it was
    raised (here or inside a Beam step); anything else is a bug in curate and raises."""
    cause = raised_in_step(exc)
    if isinstance(cause, KeyboardInterrupt):
        print("curate: interrupted; no output was published", file=sys.stderr)
        return 130
    if isinstance(cause, Terminated):
        print("curate: terminated; no output was published", file=sys.stderr)
        return 143
    if isinstance(cause, (ConfigError, FileNotFoundError)):
        status = 2
    elif isinstance(cause, (TooManyFailures, OSError)):  # OSError: disk full, file too large, read-only
        status = 1
    else:
        raise exc
    step = re.search(r"\[while running '([^']+)'\]", str(exc)) if cause is not exc else None
    print(f"curate: error: {cause}" + (f" (in the step {step[1]})" if step else ""), file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
