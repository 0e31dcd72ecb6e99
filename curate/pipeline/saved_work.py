"""Saved work: every scorer's results are persisted while it runs, so a rerun after a
crash (`kill -9`, a lost machine, Ctrl-C) scores only the rows that are missing.

Layout (beside the output, like its staging directory; the job's `saved_work:` moves it):

    .<output name>.saved/<scorer type>-<key>/part-<uuid>.arrow

`key` is a hash of what a scorer's numbers depend on (`scorer_key`): its type, its
options except the ones that only size batches, the curate version, and the resolved
path, size and modification time of every file of each model it names (an embedded
default, `~/...`, a hub id in the local cache: `curate.models.model_files`) and under
any other option that names a path (a proxy run's checkpoints), so a retrained or
replaced model is never mixed with the old one's scores. Inside, rows are addressed by
a hash of the conversation itself (`content_key`), not by the row's id: an edited row
that kept its id (a curate output exported, edited and read back) is scored again, and
a row's saved scores serve any later run that reads the same conversation, wherever it
sits in the input.

A shard holds the content key and the scorer's columns of rows it scored (never of rows
it failed on: those are retried). A shard that cannot be read (truncated, emptied by a
full disk) is skipped with a warning and its rows are scored again. Shards are written
whole to a temporary name and then renamed (`FileSystems.rename`, also on gs://), every
`SAVE_EVERY_ROWS` rows or `SAVE_EVERY_S` seconds and at the end of each bundle: a kill
loses at most that much.
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
import logging
import os
import time
import uuid

import apache_beam as beam
import pyarrow as pa
from apache_beam.io.filesystem import BeamIOError
from apache_beam.io.filesystems import FileSystems

from curate import __version__
from curate.config import ConfigError
from curate.inputs.formats import batch_rows
from curate.models.loading import model_files
from curate.paths import canonical_path, is_remote
from curate.pipeline.output import list_tree
from curate.records import content_hash

log = logging.getLogger(__name__)

SAVE_EVERY_ROWS = 256
SAVE_EVERY_S = 60.0
SHARD_PREFIX = "part-"
FROM_SAVED = "from_saved"  # the tag of the rows whose scores were found saved
KEY = "key"  # the column of a saved shard that addresses a row: `content_key`
FORMAT = 2  # of the saved shards; 1 addressed rows by their id
# options that change how rows are batched, never a row's numbers
BATCHING_OPTIONS = frozenset({"max_tokens_per_batch", "min_batch_size", "max_batch_size", "model_copies"})


def default_dir(output: str) -> str:
    """`.<name>.saved` beside the output."""
    path = output.rstrip("/") if is_remote(output) else canonical_path(output)
    parent, name = FileSystems.split(path)
    return FileSystems.join(parent, f".{name}.saved")


def content_key(record: dict) -> str:
    """What a saved score is addressed by: a hash of the conversation the scorer read."""
    return content_hash(record["messages"])


def _path_fingerprint(value: str, name: str) -> list | None:
    """[(file, size, mtime)] of the files under a path option (a model name resolved to its
    files when the option names a model), or None if it names none."""
    if not is_remote(value):
        local = model_files(value) if name.endswith("model") else None
        local = local or os.path.expanduser(value)
        if not os.path.exists(local):
            return None
        local = os.path.realpath(local)
        if os.path.isfile(local):
            files = [local]
        else:
            files = sorted(os.path.join(root, f) for root, _, names in os.walk(local) for f in names)
        # the resolved path too: two copies of a model are two models, as far as we know
        return [local] + [(os.path.relpath(f, local), os.path.getsize(f), os.stat(os.path.realpath(f)).st_mtime_ns)
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
    # a path the scorer's own model stage writes (S2L's proxy checkpoints) follows from its
    # other options, and may not exist yet when the key is first asked for
    own = set(getattr(scorer, "written_paths", lambda: ())())
    files = {name: fp for name, value in sorted(options.items()) if name not in own
             and isinstance(value, str) and value and (fp := _path_fingerprint(value, name)) is not None}
    # a path option stands for its files (the first entry: the resolved path), not its spelling
    options.update({name: None for name in files})
    blob = json.dumps({"type": scorer.type, "options": options, "files": files, "curate": __version__,
                       "format": FORMAT}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def check_writable(root: str) -> None:
    """Before any scoring: the saved-work location can be written (a scorer saves its
    first rows there within a minute, and would otherwise fail only then)."""
    probe = FileSystems.join(root, f".probe-{uuid.uuid4().hex[:8]}")
    try:
        if not is_remote(root):
            os.makedirs(root, exist_ok=True)
        with FileSystems.create(probe) as fh:
            fh.write(b"")
        FileSystems.delete([probe])
    except (OSError, BeamIOError) as exc:
        raise ConfigError(f"saved work {root}: cannot write there ({exc}); scorers save their results there as "
                          f"they go: set the job's saved_work: to a writable directory") from None


def scorer_dir(root: str, scorer) -> str:
    return FileSystems.join(root, f"{scorer.type}-{scorer_key(scorer)}")


def saved_shards(directory: str, schema: pa.Schema | None = None) -> list[str]:
    """The complete shards in a scorer's saved-work directory (temporary files excluded).
    With `schema` (the scorer's `saved_schema`), only the shards that read whole with
    those columns: a damaged one is named in a warning and its rows are scored again."""
    shards = [p for p in list_tree(directory) if p.rsplit("/", 1)[-1].startswith(SHARD_PREFIX)
              and p.endswith(".arrow")]
    if schema is None:
        return shards
    good = []
    for path in shards:
        try:
            table = _read_table(path)
            missing = [n for n in schema.names if n not in table.schema.names]
            if missing:
                raise ValueError(f"no column(s) {', '.join(missing)}")
        except (OSError, ValueError, pa.ArrowException) as exc:
            log.warning("skipping the damaged saved-work shard %s (%s); its rows are scored again",
                        path, str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
            continue
        good.append(path)
    return good


def _read_table(path: str) -> pa.Table:
    with FileSystems.open(path) as fh:
        return pa.ipc.open_file(pa.BufferReader(fh.read())).read_all()


def read_shard(path: str):
    """(content key, {column: value}) of every row of a saved shard; vectors as NumPy
    arrays, as the scorer emitted them."""
    for batch in _read_table(path).to_batches():
        for row in batch_rows(batch):
            yield row.pop(KEY), row


class UseSavedScores(beam.PTransform):
    """Records whose scores this scorer saved before come out tagged FROM_SAVED, with the
    saved columns; the rest, main output, still need scoring. A join on `content_key`."""

    def __init__(self, shards: list[str]):
        super().__init__()
        self.shards = shards

    def expand(self, recs):
        saved = (recs.pipeline | "SavedShards" >> beam.Create(self.shards)
                 | "ReadSaved" >> beam.FlatMap(read_shard))
        keyed = recs | "ByContent" >> beam.Map(lambda r: (content_key(r), r))

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
    """Writes the scored rows' content keys and score columns (`schema`: `saved_schema`) to
    `directory`, in shards renamed into place once complete. Rows pass through unchanged."""

    def __init__(self, directory: str, schema: pa.Schema, every_rows: int | None = None,
                 every_s: float | None = None):
        self.directory = directory
        self.schema = schema
        self.every_rows = every_rows or SAVE_EVERY_ROWS
        self.every_s = every_s or SAVE_EVERY_S

    def start_bundle(self):
        self.rows, self.since = [], time.monotonic()

    def process(self, record: dict):
        self.rows.append({KEY: content_key(record), **{name: record.get(name) for name in self.schema.names[1:]}})
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
    return pa.schema([(KEY, pa.string()), *scorer.output_columns().items()])
