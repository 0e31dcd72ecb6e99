"""The Beam graph of a planned job:

    read -> validate -> filters -> scorers -> selectors -> kept shards
    dead_letter.jsonl: rows reading or validation could not make examples, rows a scorer failed on
    rejected/:         rows a filter or a selector dropped, with reject_stage and reject_reason

Memory. Beam's local runner holds in memory every PCollection that crosses from one stage
to another, so rows never cross a stage here while they can be read again instead: the
job's leading *streamed* steps run in a keys pass and a write pass
(`curate.pipeline.streamed`); the other steps (scorers, and the filters and selectors
without a projection) run on the rows the streamed prefix kept, which then sit in memory.

`read_and_filter` is the front every pipeline shares (the job's own, and the pool a
model stage trains on); `build` adds scoring, selection and the writes.
"""

from __future__ import annotations

import collections
import json

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from curate.pipeline import saved_work
from curate.pipeline.output import remove_tree
from curate.pipeline.plan import Plan
from curate.pipeline.sink import WriteJsonl, WriteShards
from curate.pipeline.streamed import KEPT, Streamed, apply_fates, decide_streamed, read_and_route
from curate.progress import note_total
from curate.filters.base import REJECTED
from curate.filters.base import ApplyFilters
from curate.scorers.handlers import SCORE_ERROR

SCORE_FAILED = "score_failed"
READ_STAGE = "read"  # the dead-letter stage of rows that never became examples


def read_and_filter(p: beam.Pipeline, plan: Plan, progress_dir: str | None = None):
    """Read, validate and filter a plan without scorers or selectors (a graph of its own:
    the pool a model stage trains on): (the number of examples, the rows that never
    became examples, the examples that pass every filter, the filters' rejected
    PCollections)."""
    return _front(p, plan, progress_dir)[:4]


def _front(p: beam.Pipeline, plan: Plan, progress_dir: str | None, spill_to: str | None = None):
    """The streamed prefix (keys pass if it decides anything, then the write pass) and
    the filters that did not stream, run on the held rows: (the number of examples (one
    int), the rows that never became examples, rows for what follows, rejected
    PCollections, the streamed prefix, the prefix's fate counts or None). With
    `spill_to` (a staging folder), a job whose steps all stream has its write pass read
    the rows the keys pass spilled there, not the inputs again: the rows for what
    follows and the rejected rows are then Arrow tables, for the sinks."""
    streamed = Streamed(plan)
    held = streamed.rest > 0  # rows go on to steps that hold them: spread them over the workers
    if spill_to is not None and not held:
        counts, examples, invalid, decided = decide_streamed(p, plan, streamed, progress_dir, spill_to)
        recs, rejected = apply_fates(plan, streamed, decided)
        streamed.spilled = True
        return examples, invalid, recs, rejected, streamed, counts
    # a keys pass when a streamed step decides, or to count the rows for the sinks
    counts = decide_streamed(p, plan, streamed, progress_dir)[0] if streamed.deciding() or not held else None
    examples, invalid, recs, rejected = read_and_route(p, plan, streamed, None if counts else progress_dir,
                                                       spread=held)
    # the filters that did not stream, on the held rows: consecutive per-example ones
    # share one step, a whole-pool one is its own
    pending = []

    def flush(recs, i):
        if pending:
            out = recs | f"Filter{i}" >> beam.ParDo(ApplyFilters(list(pending))).with_outputs(REJECTED, main="kept")
            rejected.append(out[REJECTED])
            pending.clear()
            recs = out.kept
        return recs

    for i, step in enumerate(plan.filters[len(streamed.steps):], start=len(streamed.steps)):
        if step.per_example:
            pending.append(step)
            continue
        recs = apply_whole_pool(flush(recs, i), step, f"Filter{i}:{step.type}", f"filter:{step.type}", rejected)
    return examples, invalid, flush(recs, len(plan.filters)), rejected, streamed, counts


def apply_whole_pool(recs, step, label: str, stage: str, rejected: list):
    """A whole-pool step (a filter or selector PTransform returning kept and REJECTED rows
    with their reasons) on held rows: its kept rows; its rejected rows, tagged with their
    reject_stage here as every step's are, go to `rejected`."""
    out = recs | label >> step
    rejected.append(out[REJECTED] | f"{label}:stage" >> beam.Map(lambda r: {**r, "reject_stage": stage}))
    return out["kept"]


def build(p: beam.Pipeline, plan: Plan, staging: str, progress_dir: str | None = None, fresh: bool = False) -> None:
    """The job's graph. `progress_dir`: where workers write progress counts (local runs);
    `fresh`: remove the scorers' saved work instead of resuming from it."""
    examples_n, invalid, recs, rejected, streamed, counts = _front(p, plan, progress_dir, spill_to=staging)
    tables = streamed.spilled  # kept and rejected rows come as Arrow tables
    # selectors in the streamed prefix (scorers never stream: none when the job scores)
    streamed_selectors = len(streamed.steps) - len(plan.filters) - len(plan.scorers)

    # a row a scorer failed on (alone: see curate.scorers.handlers) leaves for the
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
        if i < streamed_selectors:
            continue  # streamed: routed by the write pass
        recs = apply_whole_pool(recs, selector, f"Select{i}:{selector.type}", plan.selector_stages[i], rejected)

    # when every step streamed, the keys pass counted the kept and rejected rows: the
    # sinks need not hold the rows to count them
    sizes = (None, None) if counts is None or streamed.rest else tuple(
        counts | f"{which}Rows" >> beam.Map(lambda c, w=which: c.get(w, 0)) for which in (KEPT, REJECTED))
    kept_info = recs | "WriteKept" >> WriteShards(staging, plan.schema, plan.job.shard_rows, rows=sizes[0],
                                                  tables=tables)
    all_rejected = (rejected | "AllRejected" >> beam.Flatten()) if rejected else (
        p | "NoRejected" >> beam.Create([]))
    rejected_info = all_rejected | "WriteRejected" >> WriteShards(
        FileSystems.join(staging, "rejected"), plan.rejected_schema, plan.job.shard_rows, rows=sizes[1],
        tables=tables)
    dead = ([invalid] + score_failed) | "AllDeadLetter" >> beam.Flatten()
    dead_n = dead | "WriteDeadLetter" >> WriteJsonl(FileSystems.join(staging, "dead_letter.jsonl"))
    by_stage = (all_rejected
                | "StageOf" >> (beam.FlatMap(lambda t: collections.Counter(t.column("reject_stage").to_pylist()).items())
                                if tables else beam.Map(lambda r: (r["reject_stage"], 1)))
                | "CountByStage" >> beam.CombinePerKey(sum)
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
