"""The Arrow shard sink: records -> a directory `datasets.load_from_disk` opens as is.

Layout (the one `Dataset.save_to_disk` writes):
    data-00000-of-0000N.arrow   Arrow IPC *stream* files, schema metadata `huggingface`
    dataset_info.json           features
    state.json                  the shard list

Shards are deterministic: the row count fixes the number of shards N (about
`shard_rows` rows each), a row goes to shard hash(origin, id) mod N, and each shard is
written sorted by (origin, id), in record batches of SHARD_BATCH rows. The rows reach
the shards through runs, files of at most RUN_ROWS rows, and each shard is its runs
sorted together by Arrow (`WriteShards`), so memory grows with a shard, not with the
dataset. Two runs over the same rows write byte-identical shards
under the same names whatever the runner, the bundling or the worker timing. (origin, id)
is unique within a run (see curate.records), so the order is total.

As in Beam's own file sinks (`apache_beam.io.filebasedsink`), a worker never writes a
final name: each attempt of a bundle writes `_attempt-<uuid>.<final name>`, and one
finalize step, which sees only the outputs Beam committed (one attempt per shard), renames
those files to their final names and writes a commit record `_committed.<what>.json`
naming them (`commit_files`; safe to retry). Files of failed, retried or duplicate
attempts keep their attempt names and are orphans: `publish` deletes them, it publishes
only the committed files and the driver's manifest.json and report.html.

The staging directory, its publication as the output, and the checks that keep a user's
data safe are in `curate.pipeline.output`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import uuid
from typing import Iterable

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems


log = logging.getLogger(__name__)


def hf_schema(schema: pa.Schema) -> pa.Schema:
    """The schema with the `huggingface` features metadata `datasets` reads."""
    from datasets import Features

    features = Features.from_arrow_schema(schema)
    meta = {"huggingface": json.dumps({"info": {"features": features.to_dict()}})}
    return schema.with_metadata(meta)


SHARD_BATCH = 1000  # rows per record batch of a shard


def write_rows(path: str, rows: Iterable[dict], schema: pa.Schema) -> tuple[int, str]:
    """Write `rows` (in their order) as an Arrow IPC stream, SHARD_BATCH rows a record
    batch, holding one batch at a time; returns (rows written, sha256 of the bytes)."""
    return write_batches(path, (to_batch(chunk, schema) for chunk in _chunks(rows, SHARD_BATCH)), schema)


def write_batches(path: str, batches: Iterable[pa.RecordBatch], schema: pa.Schema) -> tuple[int, str]:
    """Write record batches (of SHARD_BATCH rows, the last one fewer) as an Arrow IPC
    stream; returns (rows written, sha256 of the bytes)."""
    count = 0
    with creating(path) as fh:
        out = _HashingWriter(fh)
        with pa.ipc.new_stream(pa.PythonFile(out, mode="w"), schema) as writer:
            for batch in batches:
                writer.write_batch(batch)
                count += batch.num_rows
    return count, out.digest.hexdigest()


@contextlib.contextmanager
def creating(path: str):
    """`FileSystems.create(path)`, whose OSError (disk full, file too large) names the file."""
    try:
        with FileSystems.create(path) as fh:
            yield fh
    except OSError as exc:
        if exc.filename is not None or exc.errno is None:
            raise
        raise OSError(exc.errno, exc.strerror, path) from exc


def _chunks(rows: Iterable[dict], size: int):
    chunk = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class _HashingWriter:
    """A file being written, hashing what goes through."""

    def __init__(self, fh):
        self.fh, self.digest, self.closed = fh, hashlib.sha256(), False

    def write(self, data) -> int:
        data = memoryview(data)  # Arrow hands over its buffers: hashed and written without a copy
        self.digest.update(data)
        self.fh.write(data)
        return len(data)

    def flush(self):
        pass

    def close(self):
        self.closed = True


def to_batch(rows: list[dict], schema: pa.Schema) -> pa.RecordBatch:
    """Rows (dicts) as one record batch in `schema`: its fields, None where a row lacks one."""
    return pa.RecordBatch.from_pydict({name: [r.get(name) for r in rows] for name in schema.names}, schema=schema)


def shard_count(rows: int, shard_rows: int) -> int:
    return max(1, -(-rows // shard_rows))


def shard_name(i: int, n: int) -> str:
    return f"data-{i:05d}-of-{n:05d}.arrow"


def shard_of(record: dict, n: int) -> int:
    return _shard_of_key(record["origin"], record["id"], n)


def _shard_of_key(origin: str, id_: str, n: int) -> int:
    digest = hashlib.blake2b(f"{origin}\x00{id_}".encode("utf-8", "backslashreplace"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % n


def _row_order(record: dict) -> tuple:
    return record["origin"], record["id"]


ATTEMPT = "_attempt-"  # a file name's prefix: written by one attempt, not (yet) committed
COMMITTED = "_committed."  # a commit record's prefix: the files a writer's committed attempt finished


def attempt_name(final: str) -> str:
    """A name of its own for one attempt's copy of the file `final` (a base name)."""
    return f"{ATTEMPT}{uuid.uuid4().hex[:16]}.{final}"


def commit_files(directory: str, files: dict[str, str], what: str, info: dict) -> None:
    """Commit one writer's output in `directory`: rename each finished attempt file to its
    final name ({final name: attempt name}), then write the record `_committed.<what>.json`
    ({"files": the final names, **info}) that `publish` reads; it publishes nothing else.

    Called from a step that sees only committed outputs, so `files` names exactly one
    attempt per file. Safe to retry, as Beam's `FileBasedSink.finalize_write`: a file whose
    attempt name is gone and whose final name is there was renamed by an earlier try.
    """
    srcs, dsts = [], []
    for final, attempt in sorted(files.items()):
        src, dst = FileSystems.join(directory, attempt), FileSystems.join(directory, final)
        if FileSystems.exists(src):
            srcs.append(src)
            dsts.append(dst)
        elif not FileSystems.exists(dst):
            raise RuntimeError(f"{src} is not there and was not renamed to {dst} either")
    if srcs:
        FileSystems.rename(srcs, dsts)
    record = f"{COMMITTED}{what}.json"
    tmp = FileSystems.join(directory, attempt_name(record))
    _write_json(tmp, {"files": sorted(files), **info})
    FileSystems.rename([tmp], [FileSystems.join(directory, record)])  # whole or not there


def write_shard(staging: str, i: int, n: int, rows: Iterable[dict], schema: pa.Schema) -> dict:
    """Shard i of n from `rows` in (origin, id) order, under this attempt's own name (a
    retried or duplicate attempt writes another file); what the finalize step commits."""
    return _shard_attempt(staging, i, n, lambda path: write_rows(path, rows, schema))


def _shard_attempt(staging: str, i: int, n: int, write) -> dict:
    name = attempt_name(shard_name(i, n))
    count, digest = write(FileSystems.join(staging, name))
    return {"index": i, "rows": count, "sha256": digest, "file": name}


RUNS = "_runs"  # under a dataset's staging folder: runs, sorted together into its shards
RUN_ROWS = 20_000  # rows a run writer holds (all shards together) before it writes them
RUN_BATCH = 256  # rows per record batch of a run written from dicts


class _WriteRuns(beam.DoFn):
    """Rows (dicts, or Arrow tables of rows in `schema` with `tables`) -> runs: the rows
    of each shard this worker saw since its last write, as an Arrow IPC file under RUNS;
    yields (shard, run file). Holds at most RUN_ROWS rows (and one table), however many
    rows the dataset has."""

    def __init__(self, staging: str, schema: pa.Schema, tables: bool = False):
        self.staging, self.schema, self.tables = staging, schema, tables

    def start_bundle(self):
        self._held: dict[int, list] = {}  # shard -> rows, or tables of its rows
        self._count = 0

    def process(self, item, n):
        if self.tables:
            # the rows gathered by shard in one take, each shard's a slice of it
            shards = np.fromiter((_shard_of_key(origin, id_, n) for origin, id_ in
                                  zip(item.column("origin").to_pylist(), item.column("id").to_pylist())),
                                 dtype=np.int64, count=item.num_rows)
            order = np.argsort(shards, kind="stable")
            by_shard = item.take(order)
            present, starts, counts = np.unique(shards[order], return_index=True, return_counts=True)
            for i, start, count in zip(present.tolist(), starts.tolist(), counts.tolist()):
                self._held.setdefault(i, []).append(by_shard.slice(start, count))
            self._count += item.num_rows
        else:
            self._held.setdefault(shard_of(item, n), []).append(item)
            self._count += 1
        if self._count >= RUN_ROWS:
            yield from self._write()

    def finish_bundle(self):
        for item in self._write():
            yield beam.transforms.window.GlobalWindows.windowed_value(item)

    def _write(self):
        for i, rows in sorted(self._held.items()):
            table = pa.concat_tables(rows) if self.tables else pa.Table.from_batches(
                [to_batch(chunk, self.schema) for chunk in _chunks(rows, RUN_BATCH)], self.schema)
            yield i, write_table(FileSystems.join(self.staging, RUNS, attempt_name(f"run-{i:05d}.arrow")), table)
        self._held, self._count = {}, 0


def write_table(path: str, table: pa.Table) -> str:
    """`table` as an Arrow IPC file at `path` (a working file: a run, a spill); returns the path."""
    with creating(path) as fh, pa.ipc.new_file(pa.PythonFile(fh, mode="w"), table.schema) as writer:
        writer.write_table(table)
    return path


def read_table(path: str) -> pa.Table:
    """A working file `write_table` wrote."""
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as fh:
        return pa.ipc.open_file(pa.BufferReader(fh.read())).read_all()


def merged_batches(runs: list[pa.Table], schema: pa.Schema):
    """The rows of a shard's runs in (origin, id) order, as record batches of SHARD_BATCH
    rows, gathered by Arrow: the order is Arrow's sort of the two key columns (UTF-8
    bytes sort as Python sorts the strings), no row becomes a Python object. Taking
    each batch from one contiguous table writes the same bytes as a merge would."""
    rows = pa.concat_tables(runs).combine_chunks()
    if not rows.num_rows:
        return
    order = pc.sort_indices(rows, sort_keys=[("origin", "ascending"), ("id", "ascending")])
    for start in range(0, len(order), SHARD_BATCH):
        (batch,) = rows.take(order[start:start + SHARD_BATCH]).to_batches()
        yield pa.RecordBatch.from_arrays(batch.columns, schema=schema)


class _MergeRuns(beam.DoFn):
    """(shard index, its run files) -> that shard: the runs' rows in (origin, id) order."""

    def __init__(self, staging: str, schema: pa.Schema):
        self.staging, self.schema = staging, schema

    def setup(self):
        self._schema = hf_schema(self.schema)

    def process(self, item, n):
        i, runs = item
        batches = merged_batches([read_table(r) for r in sorted(runs)], self._schema)
        yield _shard_attempt(self.staging, i, n, lambda path: write_batches(path, batches, self._schema))


def finalize_shards(written: list[dict], n: int, staging: str, schema: pa.Schema) -> dict:
    """Write the shards no row went to (empty), dataset_info.json and state.json, then
    commit them with the shards in `written` (the committed attempts' files)."""
    from datasets import DatasetInfo, Features

    schema = hf_schema(schema)
    done = {w["index"]: w for w in written}
    files = {shard_name(i, n): w["file"] for i, w in done.items()}
    for i in range(n):
        if i not in done:  # a shard no row hashed to is still a shard: write it empty
            files[shard_name(i, n)] = name = attempt_name(shard_name(i, n))
            done[i] = {"index": i, "rows": 0, "sha256": write_rows(FileSystems.join(staging, name), [], schema)[1]}
    data_files = [{"filename": shard_name(i, n)} for i in range(n)]
    info = dataclasses.asdict(DatasetInfo(features=Features.from_arrow_schema(schema)))
    info = {k: v for k, v in info.items() if v not in (None, {}, [])} | {"features": info["features"]}
    # a content fingerprint, not a random one: identical runs write identical files
    fingerprint = hashlib.sha256("".join(done[i]["sha256"] for i in range(n)).encode()).hexdigest()[:16]
    state = {"_data_files": data_files, "_fingerprint": fingerprint, "_format_columns": None,
             "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False, "_split": None}
    for final, obj in (("dataset_info.json", info), ("state.json", state)):
        files[final] = name = attempt_name(final)
        _write_json(FileSystems.join(staging, name), obj)
    rows = sum(done[i]["rows"] for i in range(n))
    commit_files(staging, files, "shards", {"rows": rows, "shards": n})
    return {"shards": n, "rows": rows}


def _write_json(path: str, obj) -> None:
    with FileSystems.create(path) as fh:
        fh.write(json.dumps(obj, indent=2, sort_keys=True, default=str).encode("utf-8"))


def _read_json(path: str):
    """The JSON document at `path`, or None (absent or unreadable)."""
    try:
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as fh:
            return json.loads(fh.read())
    except Exception:
        return None


class WriteShards(beam.PTransform):
    """records -> one dict {shards, rows} once every shard is in place in `staging`.

    The rows stream into runs (`_WriteRuns`, RUN_ROWS rows held per worker), and each
    shard is its runs sorted together (`_MergeRuns`): a step holds at most one shard
    (about `shard_rows` rows), never the dataset. The shard count comes from `rows`, the number of rows the dataset will have
    when the graph knows it before they arrive (a PCollection of one int); without it the
    rows are counted first, which holds them until the count is done.
    """

    def __init__(self, staging: str, schema: pa.Schema, shard_rows: int = 50_000, rows=None, tables: bool = False):
        super().__init__()
        self.staging, self.schema, self.shard_rows, self.rows = staging, schema, shard_rows, rows
        self.tables = tables  # elements are Arrow tables of rows in `schema`, not dicts

    def expand(self, pcoll):
        staging, schema = self.staging, self.schema
        rows = self.rows if self.rows is not None else (
            pcoll | "Count" >> (beam.Map(lambda t: t.num_rows) | beam.CombineGlobally(sum)) if self.tables
            else pcoll | "Count" >> beam.combiners.Count.Globally())
        n = rows | "Shards" >> beam.Map(shard_count, self.shard_rows)
        n_side = beam.pvalue.AsSingleton(n)
        written = (pcoll
                   | "WriteRuns" >> beam.ParDo(_WriteRuns(staging, schema, self.tables), n=n_side)
                   | "RunsByShard" >> beam.GroupByKey()
                   | "MergeRuns" >> beam.ParDo(_MergeRuns(staging, schema), n=n_side)
                   | "Collect" >> beam.combiners.ToList())
        return n | "Finalize" >> beam.Map(lambda n, written: finalize_shards(written, n, staging, schema),
                                          written=beam.pvalue.AsSingleton(written))


def write_jsonl(path: str, rows) -> tuple[int, str]:
    """`rows` as JSONL, one line each sorted by its text, under this attempt's own name
    beside `path`; returns (lines, that name) for `commit_jsonl`."""
    directory, final = FileSystems.split(path)
    lines = sorted(json.dumps(r, ensure_ascii=False, default=str, sort_keys=True) for r in rows)
    name = attempt_name(final)
    # the final name's compression, not the attempt name's
    with FileSystems.create(FileSystems.join(directory, name),
                            compression_type=CompressionTypes.detect_compression_type(final)) as fh:
        for line in lines:
            fh.write((line + "\n").encode("utf-8", "backslashreplace"))
    return len(lines), name


def commit_jsonl(path: str, written: tuple[int, str]) -> int:
    directory, final = FileSystems.split(path)
    n, name = written
    commit_files(directory, {final: name}, final, {"rows": n})
    return n


class WriteJsonl(beam.PTransform):
    """Small side outputs (dead letter) as one JSONL file, written by a single step,
    in a fixed order (by the text of each line), then committed (`commit_files`)."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def expand(self, pcoll):
        return (pcoll | "Collect" >> beam.combiners.ToList()
                | "Write" >> beam.Map(lambda rows, path: write_jsonl(path, rows), self.path)
                | "Commit" >> beam.Map(lambda written, path: commit_jsonl(path, written), self.path))
