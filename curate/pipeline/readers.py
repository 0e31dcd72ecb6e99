"""The pipeline's read step: planned files (`curate.inputs.files.plan_inputs`) -> records
and dead-letter rows, in Beam. What a row becomes (formats, adapters, validation) is
`curate.inputs`, shared with every reader outside Beam (`read_records`)."""

from __future__ import annotations

import apache_beam as beam
from apache_beam.metrics import Metrics

from curate.inputs.files import FileTask, task_records
from curate.progress import StageProgress

DEAD = "dead_letter"
PROGRESS_EVERY = 100  # rows a reader counts before it adds them to its progress


class ReadFile(beam.DoFn):
    """FileTask -> valid records (main output) and dead-letter rows (tagged DEAD): rows
    that cannot be read or adapted, and examples that fail validation; see `task_records`."""

    def __init__(self, progress_dir: str | None = None):
        self.progress_dir = progress_dir

    def process(self, task: FileTask):
        for rec, dead in self.rows(task):
            yield rec if dead is None else beam.pvalue.TaggedOutput(DEAD, dead)

    def rows(self, task: FileTask):
        """`task_records(task)`, counted in the read's progress."""
        progress = StageProgress("read", self.progress_dir)  # rows as the manifest counts them
        outside = Metrics.counter("read", "outside_limit_prompts")
        pending = 0  # rows not yet added: a count per row costs a clock read and a metric
        for rec, dead in task_records(task, outside):
            pending += 1
            if pending == PROGRESS_EVERY:
                progress.add(pending)
                pending = 0
            yield rec, dead
        progress.add(pending)
        progress.flush()


BATCH = 1000  # rows an element carries where many cross a stage boundary together


def in_batches():
    """Rows -> lists of up to BATCH rows: one element crossing a stage boundary instead
    of BATCH (Beam's cost per element crossing is several microseconds)."""
    return beam.BatchElements(min_batch_size=BATCH, max_batch_size=BATCH)


class Spread(beam.PTransform):
    """`beam.Reshuffle` in batches: the same fusion break and spread over workers, at a
    quarter of its CPU (it wraps each element's timestamp and window on its own: 23
    against 6 microseconds an element, measured on the local runner). Order is not kept;
    no step depends on it."""

    def expand(self, pcoll):
        return (pcoll
                | "Batch" >> in_batches()
                | "Reshuffle" >> beam.Reshuffle()
                | "Unbatch" >> beam.FlatMap(lambda batch: batch))


class ReadInputs(beam.PTransform):
    """Planned file tasks -> {'records': ..., 'dead_letter': ...}; `spread`: reshuffle
    the records so one file's rows are worked on by every worker."""

    def __init__(self, tasks: list[FileTask], progress_dir: str | None = None, spread: bool = True):
        super().__init__()
        self.tasks = tasks
        self.progress_dir = progress_dir
        self.spread = spread

    def expand(self, pbegin):
        out = (pbegin
               | "Files" >> beam.Create(self.tasks)
               | "Read" >> beam.ParDo(ReadFile(self.progress_dir)).with_outputs(DEAD, main="records"))
        # spread one file's rows over all workers; not when the rows stream straight to a
        # file (curate.pipeline.streamed): a shuffle holds them all on the local runner
        recs = out.records | "Spread" >> Spread() if self.spread else out.records
        return {"records": recs, DEAD: out[DEAD]}
