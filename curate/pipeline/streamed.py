"""The streamed prefix of a job's steps: its keys pass and its write pass, in Beam.

Memory. Beam's local runner holds in memory every PCollection that crosses from one stage
to another (a shuffle, or rows waiting for a side input): rows crossing one make the
peak grow with the pool (about 10 KB a row of 1 KB of text, measured). So rows never
cross a stage here while they can be read again instead:

- The *streamed* steps, a prefix of the job's steps, are the per-example filters and
  the steps that decide from a small projection of each row: `project(record)` -> a few
  fields, `decide(rows_again)` -> a PTransform from the projections to one state (the
  set of duplicates, a cut-off), `route(row, state)` -> (reject reason or None, the
  columns the step adds), where `row` is the record or its projection: route reads only
  the fields both carry (id, origin), so the write pass never projects again.
  `rows_again()` reads the rows once more, for a step that needs more of a few rows
  than their projections hold (near dedup: the candidates' signatures). Exact dedup,
  near dedup and the random selector are such steps.
- A *keys pass* reads the inputs and keeps per row only (id, origin), the first
  per-example filter that rejects it and each streamed step's projection (less the id
  and origin it repeats). Each step decides from the projections of the rows that
  reach it, in job order, and the keys pass counts the rows kept and rejected.
- The *write pass* routes each row by the states (side inputs) to the kept or rejected
  shards, whose sizes the keys pass counted; the sink streams them through runs
  (`curate.pipeline.sink`). When every step streams, the keys pass also spills the rows
  it read (Arrow files of SPILL_ROWS rows in the staging folder, with each row's first
  per-example rejection) and the write pass routes those a file at a time as Arrow
  tables: the inputs are read and adapted once, and no row becomes a dict again.
  Otherwise it reads the inputs again and routes each row. Either way no row is held.
- The other steps (scorers, and the filters and selectors without a projection) run as
  before on the rows the streamed prefix kept, which then sit in memory.
"""

from __future__ import annotations

from typing import Any, Iterator

import apache_beam as beam
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.window import GlobalWindows

from curate.filters.base import REJECTED
from curate.pipeline.plan import Plan
from curate.pipeline.readers import BATCH, DEAD, ReadInputs, Spread, Validate
from curate.pipeline.sink import attempt_name, read_table, to_batch, write_table

KEPT = "kept"
SPILL = "_spill"  # under the staging folder: the keys pass's rows, read by the write pass
SPILLED = "spilled"  # the keys pass's output of spill file paths
SPILL_ROWS = 5_000  # rows a spill file holds (and the keys pass, before it writes one)
REJECT_AT, REJECT_WHY = "_reject_at", "_reject_reason"  # a spilled row's first per-example rejection


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
        return [beam.pvalue.AsSingleton(self.states[i]) for i in self.deciding() if before is None or i < before]


class _Keys(beam.DoFn):
    """Rows -> batches of keys, by column (`_key_batch`): per row its (id, origin), the
    first per-example filter rejecting it as (index, reason) or None, and its projection
    for each deciding step it reaches. By column, a batch crosses a stage at a tenth of
    the cost of a list of per-row tuples and dicts (Beam's coder walks every object).

    With `spill` (a staging folder and the output schema) it also writes the rows, with
    that first rejection, to Arrow files of up to SPILL_ROWS rows under staging/SPILL
    (attempt names: only the files a committed bundle names are read) and yields each
    file's path, tagged SPILLED: the write pass reads those instead of the inputs."""

    def __init__(self, steps, spill: tuple[str, pa.Schema] | None = None):
        self.steps, self.spill = steps, spill

    def setup(self):
        for step, _ in self.steps:
            if step.per_example:
                step.setup()

    def start_bundle(self):
        self._held: list[tuple[dict, tuple[int, str] | None]] = []  # rows to spill
        self._keys: list[tuple] = []

    def process(self, record):
        rejected = _first_rejection(self.steps, record)
        projections = {i: _bare(step.project(record)) for i, (step, _) in enumerate(self.steps)
                       if not step.per_example and (rejected is None or i < rejected[0])}
        self._keys.append((record["id"], record["origin"], rejected, projections))
        if len(self._keys) >= BATCH:
            yield _key_batch(self._keys)
            self._keys = []
        if self.spill is not None:
            self._held.append((record, rejected))
            if len(self._held) >= SPILL_ROWS:
                yield beam.pvalue.TaggedOutput(SPILLED, self._write())

    def finish_bundle(self):
        if self._keys:
            yield GlobalWindows.windowed_value(_key_batch(self._keys))
        if self.spill is not None and self._held:
            yield beam.pvalue.TaggedOutput(SPILLED, GlobalWindows.windowed_value(self._write()))

    def _write(self) -> str:
        staging, schema = self.spill
        rows = [record for record, _ in self._held]
        table = pa.Table.from_batches([to_batch(rows, schema)]).append_column(
            REJECT_AT, pa.array([None if r is None else r[0] for _, r in self._held], pa.int32())).append_column(
            REJECT_WHY, pa.array([None if r is None else r[1] for _, r in self._held], pa.string()))
        self._held = []
        return write_table(FileSystems.join(staging, SPILL, attempt_name("spill.arrow")), table)


# The keys pass holds every row's element until the last state is decided, so its
# projections leave out the id and origin the element already carries (a third of it).
def _bare(projection: dict) -> dict:
    return {k: v for k, v in projection.items() if k not in ("id", "origin")}


def _key_batch(rows: list[tuple]) -> tuple:
    """(id, origin, rejected, {step: bare projection}) per row -> (ids, origins, rejected,
    {step: {field: values}}): a row that does not reach a step has None in its fields."""
    projections: dict[int, dict[str, list]] = {}
    for n, (_, _, _, bare) in enumerate(rows):
        for i, fields in bare.items():
            columns = projections.setdefault(i, {})
            for name, value in fields.items():
                columns.setdefault(name, [None] * len(rows))[n] = value
    return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], projections


def _unbatch(columns: dict[str, list]) -> Iterator[dict]:
    """{field: values} -> one dict per row."""
    names = list(columns)
    for values in zip(*columns.values()):
        yield dict(zip(names, values))


def _first_rejection(steps, record) -> tuple[int, str] | None:
    """(index, reason) of the first per-example filter that rejects the row, or None."""
    for i, (step, _) in enumerate(steps):
        if step.per_example and (reason := step.reason_to_drop(record)) is not None:
            return i, reason
    return None


def _fate(steps, rejected, rows: dict, states: dict, until: int | None = None):
    """(index of the first step before `until` that rejects the row, or None; its reason;
    the columns the steps the row reached added). `rows`: what each deciding step routes,
    the row's projection or the record itself."""
    columns = {}
    for i, (step, _) in enumerate(steps[:until]):
        if step.per_example:
            if rejected is not None and rejected[0] == i:
                return i, rejected[1], columns
            continue
        reason, cols = step.route(rows[i], states[i])
        columns.update(cols)
        if reason is not None:
            return i, reason, columns
    return None, None, columns


class _RouteSpilled(beam.DoFn):
    """The write pass over the keys pass's spill files (`_Keys`): each file's rows routed
    as `_Route` routes them, a file at a time, as Arrow tables: its kept rows (main output)
    and its rejected rows with reject_stage and reject_reason (tagged REJECTED), in the
    kept and rejected schemas. Only (id, origin) become Python objects: the states route
    by them (`route`'s contract), and each step's added columns are set on the table."""

    def __init__(self, steps, deciding: list[int], schema: pa.Schema, rejected_schema: pa.Schema):
        self.steps, self.deciding = steps, deciding
        self.schema, self.rejected_schema = schema, rejected_schema

    def process(self, path: str, *states) -> Iterator[Any]:
        table = read_table(path)
        states = dict(zip(self.deciding, states))
        n = table.num_rows
        kept, rejected, stages, reasons = [], [], [], []
        added: dict[str, list] = {}
        for j, (id_, origin, at, why) in enumerate(zip(*(table.column(c).to_pylist()
                                                         for c in ("id", "origin", REJECT_AT, REJECT_WHY)))):
            row = {"id": id_, "origin": origin}
            i, reason, columns = _fate(self.steps, None if at is None else (at, why),
                                       dict.fromkeys(self.deciding, row), states)
            for name, value in columns.items():
                added.setdefault(name, [None] * n)[j] = value
            if i is None:
                kept.append(j)
            else:
                rejected.append(j)
                stages.append(self.steps[i][1])
                reasons.append(reason)
        for name, values in added.items():
            if name in self.schema.names:  # what the sink would write of a row's columns
                where = table.schema.get_field_index(name)
                table = table.set_column(where, name, pa.array(values, self.schema.field(name).type))
        if kept:
            yield table.take(kept).select(self.schema.names)
        if rejected:
            out = table.take(rejected).select(self.schema.names)
            out = out.append_column("reject_stage", pa.array(stages, pa.string())).append_column(
                "reject_reason", pa.array(reasons, pa.string()))
            yield beam.pvalue.TaggedOutput(REJECTED, out.select(self.rejected_schema.names))


class _Route(beam.DoFn):
    """The write pass: each row to the kept output, or REJECTED with its reject stage and
    reason, by the per-example filters (run again) and the states (side inputs)."""

    def __init__(self, steps, deciding: list[int]):
        self.steps, self.deciding = steps, deciding

    def setup(self):
        for step, _ in self.steps:
            if step.per_example:
                step.setup()

    def process(self, record, *states) -> Iterator[Any]:  # rows or TaggedOutputs: not a type Beam can check
        rows = dict.fromkeys(self.deciding, record)
        i, reason, columns = _fate(self.steps, _first_rejection(self.steps, record), rows,
                                   dict(zip(self.deciding, states)))
        record = {**record, **columns}
        if i is None:
            yield record
        else:
            yield beam.pvalue.TaggedOutput(REJECTED, {**record, "reject_stage": self.steps[i][1],
                                                      "reject_reason": reason})


def _read_valid(p: beam.Pipeline, plan: Plan, read_label: str, valid_label: str,
                progress_dir: str | None = None, spread: bool = True):
    """Read the plan's inputs and validate them: (the read's outputs, the validation's:
    `.records` and `[DEAD]`)."""
    read = p | read_label >> ReadInputs(plan.tasks, progress_dir, spread=spread)
    return read, read["records"] | valid_label >> beam.ParDo(
        Validate(plan.job.validate.max_chars)).with_outputs(DEAD, main="records")


def decide_streamed(p: beam.Pipeline, plan: Plan, streamed: Streamed, progress_dir: str | None,
                    spill_to: str | None = None):
    """The keys pass and the deciding steps' states (`streamed.states`); returns the counts
    of the rows the prefix keeps and rejects, a PCollection of one dict, and the keys
    pass's read: its examples, its dead letters and (with `spill_to`, a staging folder)
    the paths of the files it spilled the rows to."""
    read, valid = _read_valid(p, plan, "KeysRead", "KeysValidate", progress_dir, spread=False)
    spill = None if spill_to is None else (spill_to, plan.schema)
    # the keys cross to a stage for each deciding step and for the counts, in batches
    out = valid.records | "Keys" >> beam.ParDo(_Keys(streamed.steps, spill)).with_outputs(SPILLED, main="keys")
    keys = out.keys
    steps, deciding = streamed.steps, streamed.deciding()
    for i in deciding:
        step, _ = steps[i]

        def reaches(batch, *states, i=i):
            """The projections, by column, of the batch's rows that reach step i: the
            earlier steps route by (id, origin) alone."""
            states = dict(zip(deciding, states))
            ids, origins, rejected, projections = batch
            fields = projections.get(i, {})
            reaching = {"id": [], "origin": [], **{name: [] for name in fields}}
            for n, (id_, origin, rejected_by) in enumerate(zip(ids, origins, rejected)):
                row = {"id": id_, "origin": origin}
                if _fate(steps, rejected_by, dict.fromkeys(deciding, row), states, until=i)[0] is None:
                    for name, values in reaching.items():
                        values.append(row[name] if name in row else fields[name][n])
            if reaching["id"]:
                yield reaching

        def rows_again(i=i):
            return _read_valid(p, plan, f"ReadAgain{i}", f"ValidAgain{i}", spread=False)[1].records

        # a stage boundary (a reshuffle of the projections) before the step: Beam's local
        # runner never runs a step fused with the one that made its side input's input
        # (`A total of N watermark-pending bundles did not execute`)
        streamed.states[i] = (keys
                              | f"Reach{i}" >> beam.FlatMap(reaches, *streamed.side_inputs(before=i))
                              | f"Reaching{i}" >> Spread(unbatch=_unbatch)
                              | streamed.labels[i] >> step.decide(rows_again))

    def fates(batch, *states):
        states = dict(zip(deciding, states))
        ids, origins, rejected, _ = batch
        kept = sum(_fate(steps, rejected_by, dict.fromkeys(deciding, {"id": id_, "origin": origin}), states)[0]
                   is None for id_, origin, rejected_by in zip(ids, origins, rejected))
        return [(KEPT, kept), (REJECTED, len(ids) - kept)]

    counts = (keys
              | "Fates" >> beam.FlatMap(fates, *streamed.side_inputs())
              | "CountFates" >> beam.CombinePerKey(sum)
              | "FateCounts" >> beam.combiners.ToDict())
    return counts, valid.records, [read[DEAD], valid[DEAD]], out[SPILLED]


def route_spilled(plan: Plan, streamed: Streamed, spilled):
    """The write pass of a job whose steps all streamed: the spill files routed (in
    tables, `_RouteSpilled`), spread over the workers: (kept tables, [rejected tables])."""
    routed = (spilled
              | "SpillFiles" >> beam.Reshuffle()
              | "RouteSpilled" >> beam.ParDo(
                  _RouteSpilled(streamed.steps, streamed.deciding(), plan.schema, plan.rejected_schema),
                  *streamed.side_inputs()).with_outputs(REJECTED, main="kept"))
    return routed.kept, [routed[REJECTED]]


def read_and_route(p: beam.Pipeline, plan: Plan, streamed: Streamed, progress_dir: str | None = None,
                   spread: bool = True):
    """Read, validate and route every row through the streamed steps: (the examples, i.e.
    the valid records; the rows that never became examples; the rows every streamed step
    kept; the rejected rows)."""
    read, valid = _read_valid(p, plan, "ReadInputs", "Validate", progress_dir, spread)
    routed = valid.records | "Route" >> beam.ParDo(
        _Route(streamed.steps, streamed.deciding()), *streamed.side_inputs()).with_outputs(REJECTED, main="kept")
    return valid.records, [read[DEAD], valid[DEAD]], routed.kept, [routed[REJECTED]]
