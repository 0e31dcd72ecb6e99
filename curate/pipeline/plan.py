"""The plan of a job: everything the driver decides before a pipeline runs (the input
files, the steps built from their configs, the columns each step writes and needs, the
reject-stage names and the output schemas)."""

from __future__ import annotations

import pyarrow as pa

from curate import records, steps
from curate.config import ConfigError, JobConfig
from curate.inputs.formats import arrow_dir_schema
from curate.inputs.files import plan_inputs
from curate.pipeline import saved_work
from curate.scorers import make_scorer
from curate.selectors.shared.strata import Stratified, build_selector
from curate.train.refine import RefineConfig, TrainGenerateScore

REJECT_COLUMNS = {"reject_stage": pa.string(), "reject_reason": pa.string()}


def output_schema(columns: dict[str, pa.DataType]) -> pa.Schema:
    schema = records.BASE_SCHEMA
    for name, dtype in columns.items():
        if name in schema.names:
            raise ConfigError(f"two steps write the column {name!r}; give one of them a prefix or name")
        schema = schema.append(pa.field(name, dtype))
    return schema


def attach_model_stage(step) -> None:
    """Build the "refine" model stage a step declares (curate.steps.ModelStage) and hand it
    over: the step calls it, but the model code lives in curate.train, never in the step.
    A "proxy" stage runs before the pipeline (curate.pipeline.model_stages)."""
    declared = step.model_stage()
    if declared is None or declared.kind != "refine":
        return
    try:
        step.use_model_stage(TrainGenerateScore(RefineConfig.from_dict(declared.settings)))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{step.kind} {step.type!r}: {exc}") from None


class Plan:
    """Everything the driver decides before the pipeline runs."""

    def __init__(self, job: JobConfig):
        self.job = job
        self.tasks = plan_inputs(job.inputs, job.validate.max_chars)
        self.filters = [steps.build("filter", spec, f"filters[{i}]") for i, spec in enumerate(job.filters)]
        self.scorers = [make_scorer(dict(s)) for s in job.scorers]
        self.selectors = [build_selector(spec, f"selectors[{i}]") for i, spec in enumerate(job.selectors)]
        for i, selector in enumerate(self.selectors):
            if isinstance(selector, Stratified):
                if i > 0:  # the rows an earlier selector keeps are counted only when it has run
                    raise ConfigError(f"selectors[{i}]: stratify_by works on a job's first selector; select "
                                      f"with the ones before it first, then `curate select` from that output")
                # the pool it shares among strata: the inputs, when no step comes before it
                selector.pool_tasks = None if self.filters or self.scorers else self.tasks
        steps_in_order = self.filters + self.scorers + self.selectors
        for step in steps_in_order:
            attach_model_stage(step)
        columns = self.input_columns()
        written = {n for step in steps_in_order for n in step.output_columns()}
        columns = {n: t for n, t in columns.items() if n not in written}  # a step re-writes them
        for step in steps_in_order:
            for need in step.requires:  # written by an earlier step, not by itself
                if need not in columns:
                    raise ConfigError(f"{step.kind} {step.type!r} needs the column {need!r}; add the scorer "
                                      f"that writes it before it (known so far: {', '.join(columns) or 'none'})")
            for name, dtype in step.output_columns().items():
                if name in columns or name in records.BASE_COLUMNS:
                    raise ConfigError(f"two steps write the column {name!r}; set a prefix on one")
                columns[name] = dtype
        # reject_stage names, in pipeline order
        self.filter_stages = list(dict.fromkeys(f"filter:{f.type}" for f in self.filters))
        types = [s.type for s in self.scorers]
        self.scorer_stages = [f"score:{t}" if types.count(t) == 1 else f"score{i}:{t}"
                              for i, t in enumerate(types)]
        self.selector_stages = [f"select:{s.type}" if len(self.selectors) == 1 else f"select{i}:{s.type}"
                                for i, s in enumerate(self.selectors)]
        self.saved_work = job.saved_work or saved_work.default_dir(job.output)
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

    def named_steps(self) -> list[tuple]:
        """(step, its stage name) of every step, in job order."""
        return ([(f, f"filter:{f.type}") for f in self.filters] + list(zip(self.scorers, self.scorer_stages))
                + list(zip(self.selectors, self.selector_stages)))

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
