"""Model stages: model work a step needs before the pipeline scores anything, run as a
stage of its own rather than hidden in graph construction. Today: the S2L proxy run of
the `trajectory` scorer.

A scorer declares one with `before_pipeline(read_pool) -> dict | None`. `read_pool(inputs)`
gives it the pool to train on: the job's inputs (or the inputs the step names), read by
the pipeline's own readers with the job's validation and filters, in a Beam pipeline of
its own (on Dataflow, on its workers), and returned in read order (file, then line), so
reruns see the same rows in the same order. The model work itself then runs on this
machine, before the main pipeline; the log says so, and what it returns (artifacts,
metrics) goes to the manifest under `model_stages`.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from curate.config import InputConfig
from curate.pipeline.graph import read_and_filter
from curate.pipeline.output import remove_tree
from curate.pipeline.plan import Plan
from curate.pipeline.sink import WriteJsonl

log = logging.getLogger(__name__)


def read_order(plan: Plan):
    """Sort key of a record: its file's place among the inputs, then its line (and item)."""
    names = sorted(((t.name, i) for i, t in enumerate(plan.tasks)), key=lambda x: -len(x[0]))

    def key(record: dict):
        origin = record["origin"]
        for name, i in names:  # longest name first: one name may prefix another
            if origin.startswith(name + ":"):
                rest = origin[len(name) + 1:].split(":")
                return (i, tuple(int(x) if x.isdigit() else 0 for x in rest), record["id"])
        return (len(names), (), record["id"])

    return key


def read_filtered_pool(plan: Plan, inputs, options, work_dir: str) -> list[dict]:
    """The examples of `inputs` (None: the job's) that pass the job's validation and
    filters, as the pipeline reads them, in read order."""
    job = plan.job
    if inputs is not None:
        items = inputs if isinstance(inputs, list) else [inputs]
        job = dataclasses.replace(job, inputs=[InputConfig(**({"path": i} if isinstance(i, str) else dict(i)))
                                               for i in items])
    pool_plan = Plan(dataclasses.replace(job, scorers=[], selectors=[]))
    path = FileSystems.join(work_dir, "pool.jsonl")
    p = beam.Pipeline(options=options)
    _, _, recs, _ = read_and_filter(p, pool_plan)
    _ = recs | "WritePool" >> WriteJsonl(path)
    p.run().wait_until_finish()
    with FileSystems.open(path) as fh:
        rows = [json.loads(line) for line in fh.read().decode("utf-8").splitlines() if line.strip()]
    remove_tree(work_dir)
    return sorted(rows, key=read_order(pool_plan))


def run_model_stages(plan: Plan, options, staging: str) -> dict:
    """Every step's model work before the pipeline; {stage name: what it reported}."""
    out = {}
    for i, (scorer, stage) in enumerate(zip(plan.scorers, plan.scorer_stages)):
        hook = getattr(scorer, "before_pipeline", None)
        if hook is None:
            continue
        work_dir = FileSystems.join(staging, "_model_stages", str(i))

        def read_pool(inputs=None, _dir=work_dir):
            rows = read_filtered_pool(plan, inputs, options, _dir)
            log.info("%s: model stage on %d examples (read and filtered as the job reads them), "
                     "running on this machine before the pipeline", stage, len(rows))
            return rows

        report = hook(read_pool)
        if report is not None:
            out[stage] = report
    return out
