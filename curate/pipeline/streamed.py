"""The streamed prefix of a job's steps: its keys pass and its write pass, in Beam.

Memory. Beam's local runner holds in memory every PCollection that crosses from one stage
to another (a shuffle, or rows waiting for a side input): rows crossing one make the
peak grow with the pool (about 10 KB a row of 1 KB of text, measured). So rows never
cross a stage here while they can be read again instead:

- The *streamed* steps, a prefix of the job's steps, are the per-example filters and
  the steps that decide from a small projection of each row: `project(record)` -> a few
  fields, `decide(rows_again)` -> a PTransform from batches of projections, by column
  ({field: [values]}), to one state (the set of duplicates, a cut-off), `route(row, state)` -> (reject reason or None, the
  columns the step adds), where `row` is the record or its projection: route reads only
  the fields both carry (id, origin), so the write pass never projects again.
  `rows_again()` reads the rows once more, for a step that needs more of a few rows
  than their projections hold (near dedup: the candidates' signatures). Exact dedup,
  near dedup and the random selector are such steps.
- A *keys pass* reads the inputs and keeps per row only (id, origin), the first
  per-example filter that rejects it and each streamed step's projection (less the id
  and origin it repeats). Each step decides from the projections of the rows that
  reach it, in job order, and the keys pass counts the rows kept and rejected.
- Each key batch's *fates* (the step that rejects each row and why, the columns the
  steps add) are computed once the states are decided; the keys pass counts them.
- The *write pass* sends each row to the kept or rejected shards, whose sizes the keys
  pass counted; the sink streams them through runs (`curate.pipeline.sink`). When every
  step streams, the keys pass also spills the rows it read (Arrow files of SPILL_ROWS
  rows in the staging folder, one per key batch) and the fates of each file's rows go
  to a file beside it: the write pass applies those to the spill a file at a time, as
  Arrow tables. The inputs are read and adapted once, each row's fate is computed once,
  and no row becomes a dict again. Otherwise the write pass reads the inputs again and
  routes each row by the states (side inputs). Either way no row is held.
- The other steps (scorers, and the filters and selectors without a projection) run as
  before on the rows the streamed prefix kept, which then sit in memory.
"""

from __future__ import annotations

import pickle
from typing import Any, Iterator, NamedTuple

import apache_beam as beam
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.window import GlobalWindows

from curate.filters.base import REJECTED
from curate.pipeline.plan import Plan
from curate.pipeline.readers import BATCH, DEAD, ReadFile, ReadInputs
from curate.pipeline.sink import attempt_name, read_table, to_batch, write_table

KEPT = "kept"
SPILL = "_spill"  # under the staging folder: the keys pass's rows and their fates, read by the write pass
SPILL_ROWS = 5_000  # rows a spill file holds: a key batch's rows, when the keys pass spills
EXAMPLES = "examples"  # the keys pass's output of each file's count of examples
AT = "_at"  # a fates file's column: the index of the step that rejects the row (null: kept)


class KeyBatch(NamedTuple):
    """The keys pass's rows, by column: a batch crosses a stage at a tenth of the cost of
    a list of per-row tuples and dicts (Beam's coder walks every object)."""
    ids: list[str]
    origins: list[str]
    rejected: list  # the first per-example filter rejecting each row: (index, reason), or None
    projections: dict[int, dict[str, list]]  # deciding step -> field -> values (None: not reached)
    spill: str | None  # the file holding the batch's rows, in this order (when the keys pass spills)


class Streamed:
    """The streamed prefix of a plan's steps (module docstring): each step with its reject
    stage, and each deciding step's state once `decide_streamed` has added it."""

    def __init__(self, plan: Plan):
        steps = [(s, f"filter:{s.type}", f"Filter{i}:{s.type}") for i, s in enumerate(plan.filters)]
        steps += [(s, stage, f"Score{i}:{s.type}") for i, (s, stage) in enumerate(zip(plan.scorers, plan.scorer_stages))]
        steps += [(s, stage, f"Select{i}:{s.type}")
                  for i, (s, stage) in enumerate(zip(plan.selectors, plan.selector_stages))]
        self.steps, self.labels = [], []  # (step, reject stage); the step's Beam label
        for step, stage, label in steps:
            if not (step.per_example or step.project is not None):
                break
            self.steps.append((step, stage))
            self.labels.append(label)
        self.rest = len(steps) - len(self.steps)  # steps that run on held rows
        self.states: dict[int, beam.PCollection] = {}  # deciding step's index -> its state
        self.spilled = False  # the write pass read the keys pass's spill: rows are Arrow tables

    def deciding(self) -> list[int]:
        return [i for i, (s, _) in enumerate(self.steps) if not s.per_example]

    def side_inputs(self, before: int | None = None) -> list:
        """The states (pickled: `_Unpickled`) of the deciding steps before `before`."""
        return [beam.pvalue.AsSingleton(self.states[i]) for i in self.deciding() if before is None or i < before]


class _Unpickled:
    """The deciding steps' states from their side inputs, {step index: state}. A state
    travels pickled, as one bytes object: Beam's cache of side inputs weighs a value
    object by object (about 1 us each, on every bundle that loads it: 0.5 s for the
    100k duplicates of 1M rows), a bytes object at once. Unpickled once a bundle."""

    def __init__(self, deciding: list[int]):
        self.deciding = deciding
        self._pickled: dict[int, bytes] = {}
        self._states: dict[int, Any] = {}

    def __call__(self, pickled: tuple) -> dict[int, Any]:
        for i, data in zip(self.deciding, pickled):
            if self._pickled.get(i) is not data:
                self._pickled[i], self._states[i] = data, pickle.loads(data)
        return self._states


class _Keys(ReadFile):
    """FileTasks -> KeyBatches (main output): per row its (id, origin), the first
    per-example filter rejecting it and its projection for each deciding step it
    reaches; the read's dead letters (tagged DEAD) and each file's count of examples
    (tagged EXAMPLES). It reads the files itself, so no row crosses from one step to the
    next as an element of its own (Beam's cost per element and step is a microsecond or
    more).

    With `spill` (a staging folder and the output schema) it also writes each batch's
    rows to an Arrow file under staging/SPILL (attempt names: only the files a committed
    bundle names are read), named by the batch: the write pass reads those instead of
    the inputs."""

    def __init__(self, steps, progress_dir: str | None, spill: tuple[str, pa.Schema] | None = None):
        super().__init__(progress_dir)
        self.steps, self.spill = steps, spill
        self.batch_rows = BATCH if spill is None else SPILL_ROWS

    def setup(self):
        for step, _ in self.steps:
            if step.per_example:
                step.setup()

    def start_bundle(self):
        self._new_batch()

    def _new_batch(self):
        self._ids, self._origins, self._rejected = [], [], []
        # deciding step -> field -> values; the projection leaves out the id and origin the
        # batch already carries (the keys pass holds every batch until the last state)
        self._columns: dict[int, dict[str, list]] = {i: {} for i, (step, _) in enumerate(self.steps)
                                                     if not step.per_example}
        self._rows: list[dict] = []  # to spill

    def process(self, task):
        examples = 0
        for record, dead in self.rows(task):
            if dead is not None:
                yield beam.pvalue.TaggedOutput(DEAD, dead)
                continue
            examples += 1
            rejected = _first_rejection(self.steps, record)
            n = len(self._ids)
            self._ids.append(record["id"])
            self._origins.append(record["origin"])
            self._rejected.append(rejected)
            for i, columns in self._columns.items():
                if rejected is not None and rejected[0] < i:  # the row does not reach step i
                    for values in columns.values():
                        values.append(None)
                    continue
                for name, value in self.steps[i][0].project(record).items():
                    if name != "id" and name != "origin":
                        values = columns.get(name)
                        if values is None:
                            values = columns[name] = [None] * n
                        values.append(value)
            if self.spill is not None:
                self._rows.append(record)
            if len(self._ids) >= self.batch_rows:
                yield self._batch()
        yield beam.pvalue.TaggedOutput(EXAMPLES, examples)

    def finish_bundle(self):
        if self._ids:
            yield GlobalWindows.windowed_value(self._batch())

    def _batch(self) -> KeyBatch:
        spill = None
        if self.spill is not None:
            staging, schema = self.spill
            spill = write_table(FileSystems.join(staging, SPILL, attempt_name("spill.arrow")),
                                pa.Table.from_batches([to_batch(self._rows, schema)]))
        batch = KeyBatch(self._ids, self._origins, self._rejected, self._columns, spill)
        self._new_batch()
        return batch


def _first_rejection(steps, record) -> tuple[int, str] | None:
    """(index, reason) of the first per-example filter that rejects the row, or None."""
    for i, (step, _) in enumerate(steps):
        if step.per_example and (reason := step.reason_to_drop(record)) is not None:
            return i, reason
    return None


def _fate(steps, rejected, row: dict, states: dict, until: int | None = None):
    """(index of the first step before `until` that rejects the row, or None; its reason;
    the columns the steps the row reached added). `rejected`: the first per-example
    filter rejecting the row, as (index, reason), or None; `row`: what the deciding steps
    route, the record or just its (id, origin)."""
    columns = {}
    for i, (step, _) in enumerate(steps[:until]):
        if step.per_example:
            if rejected is not None and rejected[0] == i:
                return i, rejected[1], columns
            continue
        reason, cols = step.route(row, states[i])
        columns.update(cols)
        if reason is not None:
            return i, reason, columns
    return None, None, columns


class _Fates(beam.DoFn):
    """KeyBatch -> (rows kept, rows rejected, its spill file, its fates file), by the
    states (side inputs). With a spill file, the fates go to a file beside it for the
    write pass (`_ApplyFates`): per row the index of the step that rejects it (AT, null
    when kept) and why, and the columns the steps it reached add (those the output
    schema has). Written, not carried: the fates never sit in memory between stages."""

    def __init__(self, steps, deciding: list[int], schema: pa.Schema):
        self.steps, self.schema = steps, schema
        self.states = _Unpickled(deciding)

    def process(self, batch: KeyBatch, *pickled):
        states = self.states(pickled)
        n = len(batch.ids)
        at, reasons, added = [], [], {}
        for j, (id_, origin, rejected_by) in enumerate(zip(batch.ids, batch.origins, batch.rejected)):
            row = {"id": id_, "origin": origin}  # what route reads (its contract)
            i, reason, columns = _fate(self.steps, rejected_by, row, states)
            at.append(i)
            reasons.append(reason)
            for name, value in columns.items():
                values = added.get(name)
                if values is None:  # not setdefault: its default would be a new list every row
                    values = added[name] = [None] * n
                values[j] = value
        kept = at.count(None)
        fates = None
        if batch.spill is not None:
            table = pa.table({AT: pa.array(at, pa.int32()), "reject_reason": pa.array(reasons, pa.string()),
                              **{name: pa.array(values, self.schema.field(name).type)
                                 for name, values in added.items() if name in self.schema.names}})
            fates = write_table(FileSystems.join(FileSystems.split(batch.spill)[0], attempt_name("fates.arrow")), table)
        yield kept, n - kept, batch.spill, fates


class _ApplyFates(beam.DoFn):
    """(kept, rejected, spill file, fates file) -> the spill's rows as Arrow tables, by
    their fates (`_Fates`): the kept rows (main output) and the rejected ones with
    reject_stage and reject_reason (tagged REJECTED), in the kept and rejected schemas,
    the steps' added columns set. No row becomes a Python object."""

    def __init__(self, stages: list[str], schema: pa.Schema, rejected_schema: pa.Schema):
        self.stages, self.schema, self.rejected_schema = stages, schema, rejected_schema

    def process(self, decided) -> Iterator[Any]:
        kept_n, rejected_n, spill, fates = decided
        table, fates = read_table(spill), read_table(fates)
        for name in fates.column_names[2:]:
            table = table.set_column(table.schema.get_field_index(name), name, fates.column(name))
        kept = pc.is_null(fates.column(AT))
        if kept_n:
            yield table.filter(kept).select(self.schema.names)
        if rejected_n:
            rejected = pc.invert(kept)
            at = fates.column(AT).filter(rejected)
            out = table.filter(rejected).select(self.schema.names).append_column(
                "reject_stage", pa.array(self.stages).take(at)).append_column(
                "reject_reason", fates.column("reject_reason").filter(rejected))
            yield beam.pvalue.TaggedOutput(REJECTED, out.select(self.rejected_schema.names))


class _Route(beam.DoFn):
    """The write pass: each row to the kept output, or REJECTED with its reject stage and
    reason, by the per-example filters (run again) and the states (side inputs)."""

    def __init__(self, steps, deciding: list[int]):
        self.steps = steps
        self.states = _Unpickled(deciding)

    def setup(self):
        for step, _ in self.steps:
            if step.per_example:
                step.setup()

    def process(self, record, *pickled) -> Iterator[Any]:  # rows or TaggedOutputs: not a type Beam can check
        i, reason, columns = _fate(self.steps, _first_rejection(self.steps, record), record, self.states(pickled))
        record = {**record, **columns}
        if i is None:
            yield record
        else:
            yield beam.pvalue.TaggedOutput(REJECTED, {**record, "reject_stage": self.steps[i][1],
                                                      "reject_reason": reason})


def decide_streamed(p: beam.Pipeline, plan: Plan, streamed: Streamed, progress_dir: str | None,
                    spill_to: str | None = None):
    """The keys pass, the deciding steps' states (`streamed.states`) and each key batch's
    fates; returns the counts of the rows the prefix keeps and rejects, a PCollection of
    one dict; the number of examples (one int); the read's dead letters; and each batch's
    fates (`_Fates`: with `spill_to`, a staging folder, the spill and fates files the
    write pass reads)."""
    spill = None if spill_to is None else (spill_to, plan.schema)
    # the keys cross to a stage for each deciding step and for the counts, in batches
    read = (p
            | "KeysFiles" >> beam.Create(plan.tasks)
            | "KeysRead" >> beam.ParDo(_Keys(streamed.steps, progress_dir, spill)).with_outputs(
                DEAD, EXAMPLES, main="keys"))
    keys = read.keys
    steps, deciding = streamed.steps, streamed.deciding()
    for i in deciding:
        step, _ = steps[i]

        def reaches(batch, *pickled, i=i, unpickled=_Unpickled(deciding[:deciding.index(i)])):
            """The projections, by column, of the batch's rows that reach step i: the
            earlier steps route by (id, origin) alone."""
            states = unpickled(pickled)
            ids, origins = batch.ids, batch.origins
            reach = [n for n, (id_, origin, rejected_by) in enumerate(zip(ids, origins, batch.rejected))
                     if _fate(steps, rejected_by, {"id": id_, "origin": origin}, states, until=i)[0] is None]
            if reach:
                columns = {"id": ids, "origin": origins, **batch.projections.get(i, {})}
                yield {name: [values[n] for n in reach] for name, values in columns.items()}

        def rows_again(i=i):
            return (p | f"ReadAgain{i}" >> ReadInputs(plan.tasks, spread=False))["records"]

        # a stage boundary (a reshuffle of the projections) before the step: Beam's local
        # runner never runs a step fused with the one that made its side input's input
        # (`A total of N watermark-pending bundles did not execute`)
        streamed.states[i] = (keys
                              | f"Reach{i}" >> beam.FlatMap(reaches, *streamed.side_inputs(before=i))
                              | f"Reaching{i}" >> beam.Reshuffle()
                              | streamed.labels[i] >> step.decide(rows_again)
                              | f"Pickled{i}" >> beam.Map(pickle.dumps))

    decided = keys | "Fates" >> beam.ParDo(_Fates(steps, deciding, plan.schema), *streamed.side_inputs())
    counts = (decided
              | "KeptAndRejected" >> beam.FlatMap(lambda fates: [(KEPT, fates[0]), (REJECTED, fates[1])])
              | "CountFates" >> beam.CombinePerKey(sum)
              | "FateCounts" >> beam.combiners.ToDict())
    examples = read[EXAMPLES] | "KeysExamples" >> beam.CombineGlobally(sum)
    return counts, examples, read[DEAD], decided


def apply_fates(plan: Plan, streamed: Streamed, decided):
    """The write pass of a job whose steps all streamed: each spill file's fates applied
    (`_ApplyFates`), spread over the workers: (kept tables, [rejected tables])."""
    stages = [stage for _, stage in streamed.steps]
    # a stage boundary: the sinks' side input (the counts) comes from the fates
    routed = (decided
              | "FatesFiles" >> beam.Reshuffle()
              | "ApplyFates" >> beam.ParDo(_ApplyFates(stages, plan.schema, plan.rejected_schema)).with_outputs(
                  REJECTED, main="kept"))
    return routed.kept, [routed[REJECTED]]


def read_and_route(p: beam.Pipeline, plan: Plan, streamed: Streamed, progress_dir: str | None = None,
                   spread: bool = True):
    """Read, validate and route every row through the streamed steps: (the number of
    examples, i.e. valid records, a PCollection of one int; the rows that never became
    examples; the rows every streamed step kept; the rejected rows)."""
    read = p | "ReadInputs" >> ReadInputs(plan.tasks, progress_dir, spread)
    routed = read["records"] | "Route" >> beam.ParDo(
        _Route(streamed.steps, streamed.deciding()), *streamed.side_inputs()).with_outputs(REJECTED, main="kept")
    examples = read["records"] | "CountExamples" >> beam.combiners.Count.Globally()
    return examples, read[DEAD], routed.kept, [routed[REJECTED]]
