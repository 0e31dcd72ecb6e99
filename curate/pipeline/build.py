"""Job -> Beam pipeline -> published output directory with a manifest.

    read -> validate (dead letter) -> filters -> scorers -> selectors -> shards
                                           \\         \\__ rejected rows (with reasons)
                                            \\__ rows a scorer failed on: dead letter

Output directory:
    data-*.arrow, dataset_info.json, state.json   the kept examples (load_from_disk)
    rejected/                                     filtered and unselected examples, with
                                                  reject_stage and reject_reason
    dead_letter.jsonl                             rows that could not become examples,
                                                  and examples a scorer failed on
    manifest.json                                 config, versions, counts, timings
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import platform
import time
from importlib import metadata

import apache_beam as beam
import pyarrow as pa
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from curate import __version__, dataflow, records
from curate.config import ConfigError, InputConfig, JobConfig
from curate.pipeline.formats import arrow_dir_schema
from curate.pipeline.readers import DEAD, ReadInputs, plan_inputs
from curate.progress import PROGRESS_DIR, ProgressDisplay, note_total
from curate.pipeline.output import check_output, publish, read_manifest, remove_stale_staging, remove_tree, staging_dir
from curate.pipeline.sink import WriteJsonl, WriteShards
from curate.transforms.filters import REJECTED, ApplyFilters, ExactDedup, make_filter_steps
from curate.transforms.handlers import SCORE_ERROR

log = logging.getLogger(__name__)

# Beam's DirectRunner tries Prism first, which downloads a binary; the in-process
# FnApiRunner is the same local engine without that (and honours direct_running_mode).
LOCAL_RUNNER = "apache_beam.runners.portability.fn_api_runner.FnApiRunner"
REJECT_COLUMNS = {"reject_stage": pa.string(), "reject_reason": pa.string()}
SCORE_FAILED = "score_failed"
READ_STAGE = "read"  # the dead-letter stage of rows that never became examples
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


def output_schema(columns: dict[str, pa.DataType]) -> pa.Schema:
    schema = records.BASE_SCHEMA
    for name, dtype in columns.items():
        if name in schema.names:
            raise ConfigError(f"two steps write the column {name!r}; give one of them a prefix or name")
        schema = schema.append(pa.field(name, dtype))
    return schema


class Plan:
    """Everything the driver decides before the pipeline runs."""

    def __init__(self, job: JobConfig):
        from curate.selectors import make_selector

        self.job = job
        self.tasks = plan_inputs(job.inputs, job.validate.max_chars)
        self.filters = make_filter_steps(job.filters)
        self.scorers = []
        if job.scorers:
            from curate.transforms import make_scorer

            self.scorers = [make_scorer(dict(s)) for s in job.scorers]
        self.selectors = [make_selector(dict(s)) for s in job.selectors]
        columns = self.input_columns()
        written = {n for step in self.scorers + self.selectors for n in step.output_columns()}
        columns = {n: t for n, t in columns.items() if n not in written}  # a step re-writes them
        for step in self.scorers + self.selectors:
            for name, dtype in step.output_columns().items():
                if name in columns or name in records.BASE_COLUMNS:
                    raise ConfigError(f"two steps write the column {name!r}; set a prefix on one")
                columns[name] = dtype
            for need in getattr(step, "requires", ()):
                if need not in columns:
                    raise ConfigError(f"selector {step.type!r} needs the column {need!r}; add the scorer "
                                      f"that writes it before it (known so far: {', '.join(columns) or 'none'})")
        # reject_stage names, in pipeline order
        self.filter_stages = list(dict.fromkeys(f"filter:{f.type}" for f in self.filters))
        types = [s.type for s in self.scorers]
        self.scorer_stages = [f"score:{t}" if types.count(t) == 1 else f"score{i}:{t}"
                              for i, t in enumerate(types)]
        self.selector_stages = [f"select:{s.type}" if len(self.selectors) == 1 else f"select{i}:{s.type}"
                                for i, s in enumerate(self.selectors)]
        self.schema = output_schema(columns)
        self.rejected_schema = output_schema({**columns, **REJECT_COLUMNS})

    def input_columns(self) -> dict[str, pa.DataType]:
        """Score columns already present in inputs that are curate outputs (`curate select`)."""
        columns: dict[str, pa.DataType] = {}
        for task in self.tasks:
            if task.adapter == "curate" and task.format == "arrow" and not task.path.endswith(".arrow"):
                for f in arrow_dir_schema(task.path):
                    if f.name not in records.BASE_COLUMNS and f.name not in REJECT_COLUMNS:
                        columns.setdefault(f.name, f.type)
        return columns

    def describe(self) -> dict:
        return {
            "inputs": [{"path": t.path, "name": t.name, "source": t.source, "format": t.format,
                        "adapter": t.adapter} for t in self.tasks],
            "empty_inputs": list(self.tasks.empty_files),  # skipped: they hold no rows
            "filters": [{"type": f.type, **{k: v for k, v in vars(f).items() if not k.startswith("_") and
                                             k not in ("label", "side_inputs", "pipeline")
                                             and isinstance(v, (int, float, str, type(None)))}}
                        for f in self.filters],
            "scorers": [s.describe() for s in self.scorers],
            "selectors": [s.describe() for s in self.selectors],
        }


def build(p: beam.Pipeline, plan: Plan, staging: str, progress_dir: str | None = None) -> None:
    """The job's graph. `progress_dir`: where workers write progress counts (local runs)."""
    read = p | "ReadInputs" >> ReadInputs(plan.tasks, progress_dir)
    recs = read["records"]
    rejected = []

    # consecutive per-example filters share one step; dedup is its own global step
    pending = []

    def flush_filters(recs, i):
        if not pending:
            return recs
        out = recs | f"Filter{i}" >> beam.ParDo(ApplyFilters(list(pending))).with_outputs(REJECTED, main="kept")
        rejected.append(out[REJECTED])
        pending.clear()
        return out.kept

    for i, step in enumerate(plan.filters):
        if isinstance(step, ExactDedup):
            recs = flush_filters(recs, i)
            out = recs | f"Dedup{i}" >> step
            rejected.append(out[REJECTED])
            recs = out.kept
        else:
            pending.append(step)
    recs = flush_filters(recs, len(plan.filters))

    # a row a scorer failed on (alone: see curate.transforms.handlers) leaves for the
    # dead letter right after that scorer, so later steps only see complete rows
    score_failed = []
    if plan.scorers:
        from apache_beam.ml.inference.base import RunInference

        for i, scorer in enumerate(plan.scorers):
            scorer.stage, scorer.progress_dir = plan.scorer_stages[i], progress_dir
            if progress_dir:  # the rows a scorer will see, counted first: its progress has an ETA
                recs = note_total(recs, progress_dir, scorer.stage, f"Progress{i}")
            scored = recs | f"Score{i}:{scorer.type}" >> RunInference(scorer.model_handler())
            out = scored | f"ScoreFailures{i}" >> beam.FlatMap(
                route_score_failure, plan.scorer_stages[i]).with_outputs(SCORE_FAILED, main="scored")
            score_failed.append(out[SCORE_FAILED])
            recs = out.scored

    for i, selector in enumerate(plan.selectors):
        out = recs | f"Select{i}:{selector.type}" >> selector
        stage = plan.selector_stages[i]
        rejected.append(out["rejected"] | f"Stage{i}" >> beam.Map(lambda r, s=stage: {**r, "reject_stage": s}))
        recs = out["kept"]

    kept_info = recs | "WriteKept" >> WriteShards(staging, plan.schema, plan.job.shard_rows)
    all_rejected = (rejected | "AllRejected" >> beam.Flatten()) if rejected else (
        p | "NoRejected" >> beam.Create([]))
    rejected_info = all_rejected | "WriteRejected" >> WriteShards(
        FileSystems.join(staging, "rejected"), plan.rejected_schema, plan.job.shard_rows)
    dead = ([read[DEAD]] + score_failed) | "AllDeadLetter" >> beam.Flatten()
    dead_n = dead | "WriteDeadLetter" >> WriteJsonl(FileSystems.join(staging, "dead_letter.jsonl"))
    examples_n = read["records"] | "CountExamples" >> beam.combiners.Count.Globally()
    by_stage = (all_rejected
                | "StageOf" >> beam.Map(lambda r: r["reject_stage"])
                | "CountByStage" >> beam.combiners.Count.PerElement()
                | "StageCounts" >> beam.combiners.ToDict())
    dead_by_stage = (dead
                     | "DeadStageOf" >> beam.Map(lambda r: r.get("stage", READ_STAGE))
                     | "CountDeadByStage" >> beam.combiners.Count.PerElement()
                     | "DeadStageCounts" >> beam.combiners.ToDict())

    def write_counts(kept, rejected, dead, examples, stages, dead_stages):
        stages = {**{s: 0 for s in plan.filter_stages + plan.selector_stages}, **stages}
        invalid = dead_stages.get(READ_STAGE, 0)
        counts = {
            "read": examples + invalid,
            "invalid": invalid,
            "examples": examples,
            "filtered": {k: v for k, v in stages.items() if k.startswith("filter:")},
            "score_failed": {s: dead_stages.get(s, 0) for s in plan.scorer_stages},
            "not_selected": {k: v for k, v in stages.items() if k.startswith("select")},
            "kept": kept["rows"],
            "rejected_rows_written": rejected["rows"],
            "dead_letter_rows_written": dead,
            "shards": kept["shards"],
        }
        with FileSystems.create(FileSystems.join(staging, "_counts.json")) as fh:
            fh.write(json.dumps(counts).encode())

    (p | "Once" >> beam.Create([None])
       | "WriteCounts" >> beam.Map(
           lambda _, k, r, d, e, s, ds: write_counts(k, r, d, e, s, ds),
           beam.pvalue.AsSingleton(kept_info), beam.pvalue.AsSingleton(rejected_info),
           beam.pvalue.AsSingleton(dead_n), beam.pvalue.AsSingleton(examples_n),
           beam.pvalue.AsSingleton(by_stage), beam.pvalue.AsSingleton(dead_by_stage)))


def route_score_failure(record: dict, stage: str):
    """A scored record onward; one its scorer failed on to the dead letter, with why."""
    error = record.get(SCORE_ERROR)
    if error is None:
        yield record
    else:
        yield beam.pvalue.TaggedOutput(SCORE_FAILED, {
            "origin": record["origin"], "id": record["id"], "stage": stage, "reason": error,
            "raw": record["prompt"][:200]})


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
    validation, filters, scorers and the curate version."""
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
    h.update(json.dumps([dataclasses.asdict(job.validate), job.filters, job.scorers, __version__],
                        sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


def run_job(job: JobConfig, beam_args: list[str] | None = None, overwrite: bool = False,
            progress: bool = True) -> dict:
    """Run a job and publish its output; returns the manifest.

    With `scores:` set and scorers in the job, the scored rows are written there once
    and re-used by later runs whose inputs, filters and scorers are unchanged; the
    selection then runs from them without loading a model. Both outputs are checked
    before any work (`check_output`).
    """
    if not (job.scores and job.scorers):
        return run_pipeline(job, beam_args, overwrite=overwrite, progress=progress)
    tasks = plan_inputs(job.inputs, job.validate.max_chars)
    inputs = [t.path for t in tasks]
    check_output(job.scores, inputs, overwrite)
    check_output(job.output, inputs + [job.scores], overwrite)
    key = scores_key(job, tasks)
    previous = read_manifest(job.scores)
    if previous and previous.get("scores_key") == key:
        log.info("re-using scores in %s (key %s)", job.scores, key)
        scoring = previous
    else:
        log.info("scoring into %s (key %s)", job.scores, key)
        scoring = run_pipeline(dataclasses.replace(job, selectors=[], output=job.scores), beam_args,
                               extra={"scores_key": key}, overwrite=overwrite, progress=progress)
    return select_from_scores(job, job.scores, beam_args, scoring=scoring, overwrite=overwrite,
                              progress=progress)


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


def run_pipeline(job: JobConfig, beam_args: list[str] | None = None, extra: dict | None = None,
                 overwrite: bool = False, progress: bool = True) -> dict:
    """Plan, run and publish one pipeline; returns the manifest. `progress`: show progress
    lines while a local run works (see curate.progress); Dataflow gets Beam counters."""
    t0 = time.time()
    plan = Plan(job)
    inputs = [t.path for t in plan.tasks]
    check_output(job.output, inputs, overwrite)
    remove_stale_staging(job.output)
    staging = staging_dir(job.output)
    t_plan = time.time()
    options = pipeline_options(list(job.beam_args) + list(beam_args or []))
    all_options = options.get_all_options()
    on_dataflow = dataflow.is_dataflow(all_options)
    if on_dataflow:
        dataflow.check_launcher()
    log.info("planned %d input file(s); staging in %s", len(plan.tasks), staging)
    progress_dir = None if "://" in staging else FileSystems.join(staging, PROGRESS_DIR)
    display, keep_staging = None, False
    try:
        if progress_dir:
            FileSystems.mkdirs(progress_dir)
        p = beam.Pipeline(options=options)
        build(p, plan, staging, progress_dir)
        display = ProgressDisplay(progress_dir).start() if progress and progress_dir else None
        finished = False
        try:
            result = p.run()
            if on_dataflow:
                dataflow.announce(result, all_options)
            try:
                result.wait_until_finish()
            except BaseException as exc:
                if on_dataflow and not isinstance(exc, Exception):  # Ctrl-C or SIGTERM, not a job failure
                    dataflow.cancel_on_interrupt(result, all_options, staging)
                    keep_staging = True  # workers may still be writing there
                raise
            finished = True
        finally:
            if display:
                display.stop(succeeded=finished)
        if progress_dir:
            remove_tree(progress_dir)
        t_run = time.time()
        with FileSystems.open(FileSystems.join(staging, "_counts.json")) as fh:
            counts = json.loads(fh.read())
        FileSystems.delete([FileSystems.join(staging, "_counts.json")])
        check_counts(counts)
        manifest = {
            "name": job.name,
            "job_file": job.source_file,
            "job": job.to_dict(),
            "inputs": [dataclasses.asdict(i) for i in job.inputs],
            "output": job.output,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "versions": _versions(),
            "runner": all_options["runner"],
            "plan": plan.describe(),
            "counts": counts,
            "timings_s": {"plan": round(t_plan - t0, 3), "pipeline": round(t_run - t_plan, 3),
                          "total": round(time.time() - t0, 3)},
            "metrics": _beam_metrics(result),
            **(extra or {}),
        }
        if "://" not in staging:
            try:
                from curate.report.html import render_report

                render_report(staging, manifest)
            except Exception as exc:  # a report problem must not lose a finished run
                log.warning("report.html not written: %s", exc)
        # manifest.json is written last: its presence marks a complete output
        with FileSystems.create(FileSystems.join(staging, "manifest.json")) as fh:
            fh.write(json.dumps(manifest, indent=2, default=str).encode())
        publish(staging, job.output, overwrite, inputs)
        return manifest
    except BaseException:
        if keep_staging:
            raise
        try:
            remove_tree(staging)
        except Exception as exc:  # never hide the run's own error behind a cleanup one
            log.warning("could not remove the staging directory %s: %s", staging, exc)
        raise
