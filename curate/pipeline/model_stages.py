"""Model stages: model work a step needs besides its rows, declared by the step
(`model_stage()` -> curate.steps.ModelStage) and run here, as a stage of the plan of its
own rather than hidden in the step or in graph construction.

A "proxy" stage (the S2L proxy of the `trajectory` scorer) runs before the pipeline: the
pool to train on (the job's inputs, or the `data` the step names) is read by the
pipeline's own readers with the job's validation and filters, in a Beam pipeline of its
own (on Dataflow, on its workers), in read order (file, then line), so reruns see the
same rows in the same order; the proxy then trains on this machine (the log says so) and
its report goes to the step and to the manifest under `model_stages`. A "refine" stage
(the iterative diversity selector's train / generate / score rounds) is built when the
plan is made (`curate.pipeline.plan.attach_model_stage`) and runs on a worker, called by
its step.
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
from curate.train.proxy import train_proxy

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


PROXY_REPORT = ("n_train", "steps", "checkpoints", "train_time_s", "proxy_wall_s", "tokens_per_s",
                "train_loss_first", "train_loss_last", "device", "compute_dtype", "fingerprint")


def run_model_stages(plan: Plan, options, staging: str) -> dict:
    """Every step's "proxy" model stage, before the pipeline; {stage name: its report}."""
    out = {}
    for i, (step, stage) in enumerate(plan.named_steps()):
        declared = step.model_stage()
        if declared is None or declared.kind != "proxy":
            continue  # a "refine" stage was built with the plan
        settings = dict(declared.settings)
        data, output_dir = settings.pop("data", None), settings.pop("output_dir")
        rows = read_filtered_pool(plan, data, options, FileSystems.join(staging, "_model_stages", str(i)))
        log.info("%s: proxy run in %s on %d examples (read and filtered as the job reads them), running on "
                 "this machine before the pipeline", stage, output_dir, len(rows))
        metrics = train_proxy(rows, output_dir, **settings)
        out[stage] = {"proxy_run": output_dir, **{k: metrics.get(k) for k in PROXY_REPORT}}
        step.use_model_stage(out[stage])
    return out
