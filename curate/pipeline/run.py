"""Running a job: plan (curate.pipeline.plan), model stages before the pipeline
(curate.pipeline.model_stages), the graph (curate.pipeline.graph), then publish the output
directory with a manifest; and score once / select many (`run_job`, `score_once`).

Output directory:
    data-*.arrow, dataset_info.json, state.json   the kept examples (load_from_disk)
    rejected/                                     filtered and unselected examples, with
                                                  reject_stage and reject_reason
    dead_letter.jsonl                             rows that could not become examples,
                                                  and examples a scorer failed on
    manifest.json                                 config, versions, counts, timings
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import json
import logging
import os
import platform
import time
from importlib import metadata

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from curate import __version__, dataflow
from curate.config import InputConfig, JobConfig, TooManyFailures
from curate.pipeline import saved_work
from curate.pipeline.graph import build
from curate.pipeline.output import (check_output, list_tree, publish, read_manifest, remove_stale_staging,
                                    remove_tree, staging_dir)
from curate.pipeline.plan import Plan
from curate.inputs.files import plan_inputs
from curate.paths import check_client
from curate.pipeline.model_stages import run_model_stages
from curate.progress import PROGRESS_DIR, ProgressDisplay
from curate.published import check_unchanged, manifest_token
from curate.report.html import render_report
from curate.scorers import make_scorer

log = logging.getLogger(__name__)

# Beam's DirectRunner tries Prism first, which downloads a binary; the in-process
# FnApiRunner is the same local engine without that (and honours direct_running_mode).
LOCAL_RUNNER = "apache_beam.runners.portability.fn_api_runner.FnApiRunner"
VERSIONED = ("apache-beam", "torch", "transformers", "datasets", "pyarrow", "faiss-cpu", "faiss-gpu-cu12",
             "scikit-learn", "peft", "numpy")


def pipeline_options(beam_args: list[str]) -> PipelineOptions:
    """Options from `--flag=value` strings; a later flag wins (the job's come first, then
    the command line's)."""
    args = list(beam_args)
    runners = [a.split("=", 1)[1] for a in args if a.startswith("--runner=")]
    runner = runners[-1] if runners else None
    if runner is None:
        args.append(f"--runner={LOCAL_RUNNER}")
    elif runner.lower() in ("directrunner", "direct", "local"):
        args = [a for a in args if not a.startswith("--runner=")] + [f"--runner={LOCAL_RUNNER}"]
    return PipelineOptions(args)


def _versions() -> dict:
    out = {"curate": __version__, "python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def check_counts(counts: dict) -> None:
    """The manifest's promise: nothing is lost silently."""
    dropped = sum(counts["filtered"].values()) + sum(counts["not_selected"].values())
    failed = sum(counts["score_failed"].values())
    if counts["read"] != counts["invalid"] + counts["examples"]:
        raise RuntimeError(f"counts do not add up (read != invalid + examples): {counts}")
    if counts["examples"] != dropped + failed + counts["kept"]:
        raise RuntimeError("counts do not add up (examples != filtered + score_failed + not_selected "
                           f"+ kept): {counts}")
    if counts["rejected_rows_written"] != dropped:
        raise RuntimeError(f"rejected rows written differ from the rows dropped: {counts}")
    if counts["dead_letter_rows_written"] != counts["invalid"] + failed:
        raise RuntimeError(f"dead-letter rows written differ from invalid + score_failed: {counts}")


def check_failures(counts: dict, max_fraction: float, staging: str, saved: str) -> None:
    """Fail the run when a scorer failed on more than `max_fraction` of the rows it saw,
    naming the count and the first reasons (from the staged dead letter)."""
    seen = counts["examples"] - sum(counts["filtered"].values())
    for stage, failed in counts["score_failed"].items():
        if failed and failed > max_fraction * seen:
            reasons = []
            with FileSystems.open(FileSystems.join(staging, "dead_letter.jsonl")) as fh:
                for line in fh.read().decode("utf-8").splitlines():
                    row = json.loads(line)
                    if row.get("stage") == stage and len(reasons) < 3:
                        reasons.append(f"{row['id']} ({row['origin']}): {row['reason'][:300]}")
            raise TooManyFailures(
                f"{stage} failed on {failed:,} of {seen:,} rows ({failed / seen:.1%}), more than "
                f"max_failed_fraction {max_fraction:g} allows; nothing was published. First reasons: "
                + "; ".join(reasons) + f". The other rows' scores are saved in {saved}: fix the cause and "
                "rerun, or raise max_failed_fraction to send such rows to the dead letter")
        seen -= failed


def _beam_metrics(result) -> dict:
    out = {}
    try:
        res = result.metrics().query()
    except Exception:  # some runners do not report metrics
        return out
    for c in res.get("counters", []):
        out[f"{c.key.metric.namespace}/{c.key.metric.name}"] = c.committed if c.committed is not None else c.attempted
    for d in res.get("distributions", []):
        v = d.committed or d.attempted
        if v is not None and v.count:
            out[f"{d.key.metric.namespace}/{d.key.metric.name}"] = {"count": v.count, "sum": v.sum,
                                                                     "mean": v.sum / v.count, "max": v.max}
    return out


def scores_key(job: JobConfig, tasks) -> str:
    """What the scored rows depend on: every input setting that changes which rows exist
    or what they hold (path, source, format, adapter, fields, limit), the input contents,
    validation, filters, scorers with the files of their models (`saved_work.scorer_key`)
    and the curate version."""
    h = hashlib.sha256()
    for task in tasks:
        h.update(json.dumps(dataclasses.asdict(task), sort_keys=True, default=str).encode())
        if task.format != "hf":
            paths = ([m.path for m in FileSystems.match([task.path.rstrip("/") + "/**"])[0].metadata_list]
                     if task.format == "arrow" and not task.path.endswith(".arrow") else [task.path])
            for path in sorted(paths):
                with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as fh:
                    for chunk in iter(lambda: fh.read(1 << 20), b""):
                        h.update(chunk)
    scorers = [saved_work.scorer_key(make_scorer(dict(spec))) for spec in job.scorers]
    h.update(json.dumps([dataclasses.asdict(job.validate), job.filters, job.scorers, scorers, __version__],
                        sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


def run_job(job: JobConfig, beam_args: list[str] | None = None, overwrite: bool = False,
            progress: bool = True, fresh: bool = False) -> dict:
    """Run a job and publish its output; returns the manifest.

    With `scores:` set and scorers in the job, the scored rows are written there once
    and re-used by later runs whose inputs, filters and scorers are unchanged; the
    selection then runs from them without loading a model. A stratified selector
    (`stratify_by`) needs that written pool too (default `<output>-scores`). Both outputs
    are checked before any work (`check_output`).
    """
    if any(isinstance(s, dict) and s.get("stratify_by") for s in job.selectors):
        # the strata's shares need their sizes before selecting: the pool is written first
        if not job.scores:
            job = dataclasses.replace(job, scores=f"{job.output.rstrip('/')}-scores")
            log.info("stratify_by: the job's filtered and scored pool goes to %s first (set scores: "
                     "to choose where); later runs of the same pool re-use it", job.scores)
    elif not (job.scores and job.scorers):
        return run_pipeline(job, beam_args, overwrite=overwrite, progress=progress, fresh=fresh)
    plan = Plan(job)  # every step built and checked (selectors' model stages too) before the scoring
    inputs = [t.path for t in plan.tasks]
    for output in (job.scores, job.output):
        remove_stale_staging(output)
    check_output(job.scores, inputs, overwrite)
    check_output(job.output, inputs + [job.scores], overwrite)
    scoring, _ = score_once(job, job.scores, beam_args, overwrite=overwrite, progress=progress, fresh=fresh)
    return select_from_scores(job, job.scores, beam_args, scoring=scoring, overwrite=overwrite,
                              progress=progress)


def score_once(job: JobConfig, scores: str, beam_args: list[str] | None = None, overwrite: bool = False,
               progress: bool = True, fresh: bool = False) -> tuple[dict, bool]:
    """Score `job`'s pool into `scores` unless that directory already holds the scores of
    the same inputs, validation, filters and scorers (`scores_key`); returns (its
    manifest, whether it was re-used). The one score-once path of `curate run` with
    `scores:`, `curate score` and the benchmarks."""
    key = scores_key(job, plan_inputs(job.inputs, job.validate.max_chars))
    previous = read_manifest(scores)
    if previous and previous.get("scores_key") == key and not fresh:
        log.info("re-using scores in %s (key %s)", scores, key)
        return previous, True
    log.info("scoring into %s (key %s)", scores, key)
    return run_pipeline(dataclasses.replace(job, selectors=[], output=scores), beam_args,
                        extra={"scores_key": key}, overwrite=overwrite, progress=progress, fresh=fresh), False


def select_from_scores(job: JobConfig, scores: str, beam_args=None, scoring: dict | None = None,
                       overwrite: bool = False, progress: bool = True) -> dict:
    """Run `job`'s selectors over a scored curate output, no model loaded. The manifest
    names the inputs the scores were made from, not only the scores directory."""
    select_job = dataclasses.replace(
        job, inputs=[InputConfig(path=scores, format="arrow", adapter="curate")],
        filters=[], scorers=[], scores=None,
        beam_args=job.beam_args if job.select_beam_args is None else job.select_beam_args)
    scoring = scoring or read_manifest(scores) or {}
    return run_pipeline(select_job, beam_args, overwrite=overwrite, progress=progress, extra={
        **({"inputs": scoring["inputs"]} if scoring.get("inputs") else {}),
        "scores_from": scores, "scores_key": scoring.get("scores_key"),
        "scoring_counts": scoring.get("counts"), "scoring_plan": scoring.get("plan")})


GC_THRESHOLD = (50_000, 20, 20)


@contextlib.contextmanager
def fewer_gc_passes():
    """Python's cyclic collector less often while a local run streams rows: its default
    (a pass every 700 new objects, each row makes dozens of dicts and strings) cost a tenth
    of the exact-dedup job's CPU (48.0 vs 43.3 CPU-s at 250k rows, sequential runs). The
    rows hold no cycles, so little waits for a pass; reference counting frees them."""
    before = gc.get_threshold()
    gc.set_threshold(*GC_THRESHOLD)
    try:
        yield
    finally:
        gc.set_threshold(*before)


def run_pipeline(job: JobConfig, beam_args: list[str] | None = None, extra: dict | None = None,
                 overwrite: bool = False, progress: bool = True, fresh: bool = False) -> dict:
    """Plan, run and publish one pipeline; returns the manifest. `progress`: show progress
    lines while a local run works (see curate.progress); Dataflow gets Beam counters.
    Scorers resume from the work a failed run saved (curate.pipeline.saved_work) unless
    `fresh`."""
    t0 = time.time()
    check_client(job.output, "output")  # the inputs': plan_inputs
    plan = Plan(job)
    inputs = [t.path for t in plan.tasks]
    remove_stale_staging(job.output)  # first: a killed publish's old output may be put back
    check_output(job.output, inputs, overwrite)
    if plan.scorers:
        saved_work.check_writable(plan.saved_work)
    # inputs that are curate outputs (`curate select`): a run republishing one while this
    # one reads it fails this run instead of mixing its two versions' rows
    pinned = {t.path: manifest_token(t.path) for t in plan.tasks if t.adapter == "curate"}
    staging = staging_dir(job.output)
    t_plan = time.time()
    options = pipeline_options(list(job.beam_args) + list(beam_args or []))
    all_options = options.get_all_options()
    on_dataflow = dataflow.is_dataflow(all_options)
    if on_dataflow:
        dataflow.check_launcher(all_options)
        dataflow.check_worker_resources(plan.filters + plan.scorers + plan.selectors, all_options)
        all_options = dataflow.name_job(options, job.name)
    log.info("planned %d input file(s); staging in %s", len(plan.tasks), staging)
    progress_dir = None if "://" in staging else FileSystems.join(staging, PROGRESS_DIR)
    display, keep_staging = None, False
    try:
        if progress_dir:
            FileSystems.mkdirs(progress_dir)
        model_stages = run_model_stages(plan, options, staging)
        p = beam.Pipeline(options=options)
        build(p, plan, staging, progress_dir, fresh=fresh)
        display = ProgressDisplay(progress_dir).start() if progress and progress_dir else None
        finished, result = False, None
        try:
            try:
                with fewer_gc_passes():
                    result = p.run()
                    if on_dataflow:
                        dataflow.announce(result, all_options)
                    result.wait_until_finish()
            except BaseException as exc:
                if on_dataflow and not isinstance(exc, Exception):  # Ctrl-C or SIGTERM, not a job failure
                    keep_staging = True  # a job may exist (result None: still being submitted); workers write there
                    dataflow.cancel_on_interrupt(result, options, staging)
                raise
            finished = True
        finally:
            if display:
                display.stop(succeeded=finished)
        for path, token in pinned.items():
            check_unchanged(path, token)
        if progress_dir:
            remove_tree(progress_dir)
        t_run = time.time()
        with FileSystems.open(FileSystems.join(staging, "_counts.json")) as fh:
            counts = json.loads(fh.read())
        FileSystems.delete([FileSystems.join(staging, "_counts.json")])
        check_counts(counts)
        check_failures(counts, job.max_failed_fraction, staging, plan.saved_work)
        for stage, n in counts["from_saved"].items():
            if n:
                log.info("%s: %d row(s) from saved work (%s)", stage, n, plan.saved_work)
        manifest = {
            "name": job.name,
            "job_file": job.source_file,
            "job": job.to_dict(),
            "inputs": [dataclasses.asdict(i) for i in job.inputs],
            "output": job.output,
            "cwd": os.getcwd(),  # what relative input and output paths are relative to
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "versions": _versions(),
            "runner": all_options["runner"],
            "plan": plan.describe(),
            "counts": counts,
            "timings_s": {"plan": round(t_plan - t0, 3), "pipeline": round(t_run - t_plan, 3),
                          "total": round(time.time() - t0, 3)},
            "metrics": _beam_metrics(result),
            **({"model_stages": model_stages} if model_stages else {}),
            **(extra or {}),
        }
        if "://" not in staging:
            try:
                render_report(staging, manifest)
            except Exception as exc:  # a report problem must not lose a finished run
                log.warning("report.html not written: %s", exc)
        # manifest.json is written last: its presence marks a complete output
        with FileSystems.create(FileSystems.join(staging, "manifest.json")) as fh:
            fh.write(json.dumps(manifest, indent=2, default=str).encode())
        publish(staging, job.output, overwrite, inputs)
        if plan.scorers and not job.saved_work:  # the output holds the scores now
            remove_tree(plan.saved_work)
        return manifest
    except BaseException as exc:
        if plan.scorers and list_tree(plan.saved_work):
            log.warning("the scores computed so far are saved in %s: rerunning the same job scores only "
                        "the rest (--fresh starts over)", plan.saved_work)
        if not keep_staging:
            try:
                remove_tree(staging)
            except Exception as cleanup:  # never hide the run's own error behind a cleanup one
                log.warning("could not remove the staging directory %s: %s", staging, cleanup)
        if isinstance(exc, Exception):  # a read that broke on a file a publish removed
            for path, token in pinned.items():
                check_unchanged(path, token, exc)
        raise
