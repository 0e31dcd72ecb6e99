"""The Beam graph of a planned job:

    read -> validate -> filters -> scorers -> selectors -> kept shards
    dead_letter.jsonl: rows reading or validation could not make examples, rows a scorer failed on
    rejected/:         rows a filter or a selector dropped, with reject_stage and reject_reason

`read_and_filter` is the front every pipeline shares (the job's own, and the pool a
model stage trains on); `build` adds scoring, selection and the writes.
"""

from __future__ import annotations

import json

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from curate.pipeline import saved_work
from curate.pipeline.output import remove_tree
from curate.pipeline.plan import Plan
from curate.pipeline.readers import DEAD, ReadInputs, Validate
from curate.pipeline.sink import WriteJsonl, WriteShards
from curate.progress import note_total
from curate.transforms.base import REJECTED
from curate.transforms.filters import ApplyFilters
from curate.transforms.handlers import SCORE_ERROR

SCORE_FAILED = "score_failed"
READ_STAGE = "read"  # the dead-letter stage of rows that never became examples


def read_and_filter(p: beam.Pipeline, plan: Plan, progress_dir: str | None = None):
    """Read, validate and filter, each a step of its own: (the examples, i.e. the valid
    records; the rows that never became examples, with their reasons; the examples that
    pass every filter; the filters' rejected PCollections)."""
    read = p | "ReadInputs" >> ReadInputs(plan.tasks, progress_dir)
    valid = read["records"] | "Validate" >> beam.ParDo(Validate(plan.job.validate.max_chars)).with_outputs(
        DEAD, main="records")
    examples = recs = valid.records
    invalid = [read[DEAD], valid[DEAD]]
    rejected = []

    # consecutive per-example filters share one step; a whole-pool step (dedup) is its own
    pending = []

    def flush_filters(recs, i):
        if not pending:
            return recs
        out = recs | f"Filter{i}" >> beam.ParDo(ApplyFilters(list(pending))).with_outputs(REJECTED, main="kept")
        rejected.append(out[REJECTED])
        pending.clear()
        return out.kept

    for i, step in enumerate(plan.filters):
        if step.per_example:
            pending.append(step)
        else:
            recs = flush_filters(recs, i)
            out = recs | f"Filter{i}:{step.type}" >> step
            rejected.append(out[REJECTED])
            recs = out["kept"]
    return examples, invalid, flush_filters(recs, len(plan.filters)), rejected


def build(p: beam.Pipeline, plan: Plan, staging: str, progress_dir: str | None = None, fresh: bool = False) -> None:
    """The job's graph. `progress_dir`: where workers write progress counts (local runs);
    `fresh`: remove the scorers' saved work instead of resuming from it."""
    examples, invalid, recs, rejected = read_and_filter(p, plan, progress_dir)

    # a row a scorer failed on (alone: see curate.transforms.handlers) leaves for the
    # dead letter right after that scorer, so later steps only see complete rows
    # each scorer's results are saved as they come (curate.pipeline.saved_work); rows whose
    # scores a killed run saved skip the model
    score_failed, from_saved = [], []
    if plan.scorers:
        from apache_beam.ml.inference.base import RunInference

        for i, scorer in enumerate(plan.scorers):
            stage = plan.scorer_stages[i]
            scorer.stage, scorer.progress_dir = stage, progress_dir
            handler = scorer.model_handler()  # before the key: a scorer may find its files here
            store = saved_work.scorer_dir(plan.saved_work, scorer)
            if fresh:
                remove_tree(store)
            shards = saved_work.saved_shards(store, saved_work.saved_schema(scorer))
            saved = None
            if shards:
                split = recs | f"Saved{i}" >> saved_work.UseSavedScores(shards)
                recs, saved = split.missing, split[saved_work.FROM_SAVED]
                from_saved.append(saved | f"SavedStage{i}" >> beam.Map(lambda _, s=stage: s))
            if progress_dir:  # the rows a scorer will see, counted first: its progress has an ETA
                recs = note_total(recs, progress_dir, scorer.stage, f"Progress{i}")
            scored = recs | f"Score{i}:{scorer.type}" >> RunInference(handler)
            out = scored | f"ScoreFailures{i}" >> beam.FlatMap(
                route_score_failure, stage).with_outputs(SCORE_FAILED, main="scored")
            score_failed.append(out[SCORE_FAILED])
            recs = out.scored | f"SaveScores{i}" >> beam.ParDo(
                saved_work.SaveScores(store, saved_work.saved_schema(scorer)))
            if saved is not None:
                recs = (recs, saved) | f"WithSaved{i}" >> beam.Flatten()

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
    dead = (invalid + score_failed) | "AllDeadLetter" >> beam.Flatten()
    dead_n = dead | "WriteDeadLetter" >> WriteJsonl(FileSystems.join(staging, "dead_letter.jsonl"))
    examples_n = examples | "CountExamples" >> beam.combiners.Count.Globally()
    by_stage = (all_rejected
                | "StageOf" >> beam.Map(lambda r: r["reject_stage"])
                | "CountByStage" >> beam.combiners.Count.PerElement()
                | "StageCounts" >> beam.combiners.ToDict())
    saved_by_stage = ((from_saved | "AllFromSaved" >> beam.Flatten()) if from_saved
                      else (p | "NoneFromSaved" >> beam.Create([])))
    saved_by_stage = (saved_by_stage
                      | "CountSavedByStage" >> beam.combiners.Count.PerElement()
                      | "SavedStageCounts" >> beam.combiners.ToDict())
    dead_by_stage = (dead
                     | "DeadStageOf" >> beam.Map(lambda r: r.get("stage", READ_STAGE))
                     | "CountDeadByStage" >> beam.combiners.Count.PerElement()
                     | "DeadStageCounts" >> beam.combiners.ToDict())

    def write_counts(kept, rejected, dead, examples, stages, dead_stages, saved_stages):
        stages = {**{s: 0 for s in plan.filter_stages + plan.selector_stages}, **stages}
        invalid = dead_stages.get(READ_STAGE, 0)
        counts = {
            "read": examples + invalid,
            "invalid": invalid,
            "examples": examples,
            "filtered": {k: v for k, v in stages.items() if k.startswith("filter:")},
            "score_failed": {s: dead_stages.get(s, 0) for s in plan.scorer_stages},
            "from_saved": {s: saved_stages.get(s, 0) for s in plan.scorer_stages},
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
           lambda _, k, r, d, e, s, ds, ss: write_counts(k, r, d, e, s, ds, ss),
           beam.pvalue.AsSingleton(kept_info), beam.pvalue.AsSingleton(rejected_info),
           beam.pvalue.AsSingleton(dead_n), beam.pvalue.AsSingleton(examples_n),
           beam.pvalue.AsSingleton(by_stage), beam.pvalue.AsSingleton(dead_by_stage),
           beam.pvalue.AsSingleton(saved_by_stage)))


def route_score_failure(record: dict, stage: str):
    """A scored record onward; one its scorer failed on to the dead letter, with why."""
    error = record.get(SCORE_ERROR)
    if error is None:
        yield record
    else:
        yield beam.pvalue.TaggedOutput(SCORE_FAILED, {
            "origin": record["origin"], "id": record["id"], "stage": stage, "reason": error,
            "raw": record["prompt"][:200]})
