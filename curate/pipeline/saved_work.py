"""Saved work: every scorer's results are persisted while it runs, so a rerun after a
crash (`kill -9`, a lost machine, Ctrl-C) scores only the rows that are missing.

Layout (beside the output, like its staging directory; the job's `saved_work:` moves it):

    .<output name>.saved/<scorer type>-<key>/part-<uuid>.arrow

`key` is a hash of what a scorer's numbers depend on (`scorer_key`): its type, its
options except the ones that only size batches, the curate version, and the size and
modification time of every file under an option that names a local or remote path (a
model directory, a proxy run's checkpoints), so a retrained model is never mixed with
the old one's scores. Inside, rows are addressed by the example id, itself a hash of
the conversation (`curate.records`): a row's saved scores serve any later run that
reads the same conversation, wherever it sits in the input.

A shard holds the id and the scorer's columns of rows it scored (never of rows it
failed on: those are retried). Shards are written whole to a temporary name and then
renamed (`FileSystems.rename`, also on gs://), every `SAVE_EVERY_ROWS` rows or
`SAVE_EVERY_S` seconds and at the end of each bundle: a kill loses at most that much.
The published output does not depend on which rows came from saved work: the sink
orders rows by (origin, id), and the language-model scorers on CPU forward one row at a
time, so a resumed run writes the same rows, byte for byte, as an uninterrupted one
(tests/test_resume.py). Where rows share a padded batch (the embedding scorer; GPUs) a
score can differ in its last bits between any two runs, resumed or not.

After a run is published its default saved-work directory is removed (the output now
holds the scores); a run that fails keeps it and says where. `curate run --fresh`
removes it first.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import uuid

import apache_beam as beam
import pyarrow as pa
from apache_beam.io.filesystems import FileSystems

from curate import __version__
from curate.pipeline.output import canonical_path, is_remote, list_tree

SAVE_EVERY_ROWS = 256
SAVE_EVERY_S = 60.0
SHARD_PREFIX = "part-"
FROM_SAVED = "from_saved"  # the tag of the rows whose scores were found saved
# options that change how rows are batched, never a row's numbers
BATCHING_OPTIONS = frozenset({"max_tokens_per_batch", "min_batch_size", "max_batch_size", "model_copies"})


def default_dir(output: str) -> str:
    """`.<name>.saved` beside the output."""
    path = output.rstrip("/") if is_remote(output) else canonical_path(output)
    parent, name = FileSystems.split(path)
    return FileSystems.join(parent, f".{name}.saved")


def _path_fingerprint(value: str) -> list | None:
    """[(file, size, mtime)] of the files under a path option, or None if it names none."""
    if not is_remote(value):
        if not os.path.exists(value):
            return None
        if os.path.isfile(value):
            files = [value]
        else:
            files = sorted(os.path.join(root, f) for root, _, names in os.walk(value) for f in names)
        base = os.path.realpath(value)
        return [(os.path.relpath(os.path.realpath(f), base), os.path.getsize(f), os.stat(f).st_mtime_ns)
                for f in files]
    try:
        found = FileSystems.match([value.rstrip("/") + "/**", value])
    except Exception:
        return None
    meta = [m for result in found for m in result.metadata_list]
    return sorted((m.path, m.size_in_bytes, m.last_updated_in_seconds) for m in meta) or None


def scorer_key(scorer) -> str:
    """What `scorer`'s numbers depend on, hashed (see the module docstring)."""
    names = ([f.name for f in dataclasses.fields(scorer)] if dataclasses.is_dataclass(scorer)
             else [n for n in vars(scorer) if not n.startswith("_")])
    options = {n: getattr(scorer, n) for n in names if n not in BATCHING_OPTIONS and n not in ("stage", "progress_dir")}
    files = {name: fp for name, value in sorted(options.items())
             if isinstance(value, str) and value and (fp := _path_fingerprint(value)) is not None}
    blob = json.dumps({"type": scorer.type, "options": options, "files": files, "curate": __version__},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def scorer_dir(root: str, scorer) -> str:
    return FileSystems.join(root, f"{scorer.type}-{scorer_key(scorer)}")


def saved_shards(directory: str) -> list[str]:
    """The complete shards in a scorer's saved-work directory (temporary files excluded)."""
    return [p for p in list_tree(directory) if p.rsplit("/", 1)[-1].startswith(SHARD_PREFIX)
            and p.endswith(".arrow")]


def read_shard(path: str):
    """(id, {column: value}) of every row of a saved shard; vectors as NumPy arrays, as
    the scorer emitted them."""
    from curate.inputs.formats import batch_rows

    with FileSystems.open(path) as fh:
        table = pa.ipc.open_file(pa.BufferReader(fh.read())).read_all()
    for batch in table.to_batches():
        for row in batch_rows(batch):
            yield row.pop("id"), row


class UseSavedScores(beam.PTransform):
    """Records whose scores this scorer saved before come out tagged FROM_SAVED, with the
    saved columns; the rest, main output, still need scoring. A join on the example id."""

    def __init__(self, shards: list[str]):
        super().__init__()
        self.shards = shards

    def expand(self, recs):
        saved = (recs.pipeline | "SavedShards" >> beam.Create(self.shards)
                 | "ReadSaved" >> beam.FlatMap(read_shard))
        keyed = recs | "ById" >> beam.Map(lambda r: (r["id"], r))

        def split(item):
            _, group = item
            columns = next(iter(group["saved"]), None)  # one row may sit in two shards: same values
            for record in group["records"]:
                if columns is None:
                    yield record
                else:
                    yield beam.pvalue.TaggedOutput(FROM_SAVED, {**record, **columns})

        return ({"records": keyed, "saved": saved} | "JoinSaved" >> beam.CoGroupByKey()
                | "Split" >> beam.FlatMap(split).with_outputs(FROM_SAVED, main="missing"))


class SaveScores(beam.DoFn):
    """Writes the scored rows' ids and `columns` to `directory`, in shards renamed into
    place once complete. Rows pass through unchanged."""

    def __init__(self, directory: str, schema: pa.Schema, every_rows: int | None = None,
                 every_s: float | None = None):
        self.directory = directory
        self.schema = schema
        self.every_rows = every_rows or SAVE_EVERY_ROWS
        self.every_s = every_s or SAVE_EVERY_S

    def start_bundle(self):
        self.rows, self.since = [], time.monotonic()

    def process(self, record: dict):
        self.rows.append({name: record.get(name) for name in self.schema.names})
        if len(self.rows) >= self.every_rows or time.monotonic() - self.since >= self.every_s:
            self.flush()
        yield record

    def finish_bundle(self):
        self.flush()

    def flush(self) -> None:
        if self.rows:
            write_shard(self.directory, pa.Table.from_pylist(self.rows, schema=self.schema))
        self.rows, self.since = [], time.monotonic()


def write_shard(directory: str, table: pa.Table) -> str:
    """Write `table` as one complete shard: whole under a temporary name, then renamed."""
    name = uuid.uuid4().hex
    tmp = FileSystems.join(directory, f".tmp-{name}.arrow")
    final = FileSystems.join(directory, f"{SHARD_PREFIX}{name}.arrow")
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    if not is_remote(directory):
        os.makedirs(directory, exist_ok=True)
    with FileSystems.create(tmp) as fh:
        fh.write(sink.getvalue().to_pybytes())
    FileSystems.rename([tmp], [final])
    return final


def saved_schema(scorer) -> pa.Schema:
    return pa.schema([("id", pa.string()), *scorer.output_columns().items()])
