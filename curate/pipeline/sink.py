"""The Arrow shard sink: records -> a directory `datasets.load_from_disk` opens as is.

Layout (the one `Dataset.save_to_disk` writes):
    data-00000-of-0000N.arrow   Arrow IPC *stream* files, schema metadata `huggingface`
    dataset_info.json           features
    state.json                  the shard list

Shards are deterministic: the row count fixes the number of shards N (about
`shard_rows` rows each), a row goes to shard hash(origin, id) mod N, and each shard is
written sorted by (origin, id) under its final name. Two runs over the same rows write
byte-identical shards whatever the runner, the bundling or the worker timing, and a
retried bundle rewrites the same file instead of adding a stray part. (origin, id) is
unique within a run (see curate.records), so the order is total.

Everything is written into a staging directory beside the output, which becomes the
output only when the whole run has succeeded (`publish`): a failed run never leaves an
output that looks complete, and `check_output` refuses, before any work, to publish
over anything that is not a previous curate output or that holds the inputs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
import uuid

import apache_beam as beam
import pyarrow as pa
from apache_beam.io.filesystem import BeamIOError, CompressionTypes
from apache_beam.io.filesystems import FileSystems

from curate.config import ConfigError

log = logging.getLogger(__name__)


def hf_schema(schema: pa.Schema) -> pa.Schema:
    """The schema with the `huggingface` features metadata `datasets` reads."""
    from datasets import Features

    features = Features.from_arrow_schema(schema)
    meta = {"huggingface": json.dumps({"info": {"features": features.to_dict()}})}
    return schema.with_metadata(meta)


def write_table(path: str, table: pa.Table) -> str:
    """Write `table` as an Arrow IPC stream; returns the sha256 of the bytes written."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=1000)
    data = sink.getvalue().to_pybytes()
    with FileSystems.create(path) as fh:
        fh.write(data)
    return hashlib.sha256(data).hexdigest()


def _to_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    columns = {name: [r.get(name) for r in rows] for name in schema.names}
    return pa.Table.from_pydict(columns, schema=schema)


def shard_count(rows: int, shard_rows: int) -> int:
    return max(1, -(-rows // shard_rows))


def shard_name(i: int, n: int) -> str:
    return f"data-{i:05d}-of-{n:05d}.arrow"


def shard_of(record: dict, n: int) -> int:
    digest = hashlib.blake2b(f"{record['origin']}\x00{record['id']}".encode("utf-8", "backslashreplace"),
                             digest_size=8).digest()
    return int.from_bytes(digest, "big") % n


def _row_order(record: dict) -> tuple:
    return record["origin"], record["id"]


class _WriteShard(beam.DoFn):
    """(shard index, rows) -> that shard's file, rows in (origin, id) order."""

    def __init__(self, staging: str, schema: pa.Schema):
        self.staging, self.schema = staging, schema

    def setup(self):
        self._schema = hf_schema(self.schema)

    def process(self, item, n):
        i, rows = item
        rows = sorted(rows, key=_row_order)
        digest = write_table(FileSystems.join(self.staging, shard_name(i, n)), _to_table(rows, self._schema))
        yield {"index": i, "rows": len(rows), "sha256": digest}


def finalize_shards(written: list[dict], n: int, staging: str, schema: pa.Schema) -> dict:
    """Write the shards no row went to (empty), then dataset_info.json and state.json."""
    from datasets import DatasetInfo, Features

    schema = hf_schema(schema)
    done = {w["index"]: w for w in written}
    for i in range(n):
        if i not in done:  # a shard no row hashed to is still a shard: write it empty
            done[i] = {"index": i, "rows": 0,
                       "sha256": write_table(FileSystems.join(staging, shard_name(i, n)), schema.empty_table())}
    files = [{"filename": shard_name(i, n)} for i in range(n)]
    info = dataclasses.asdict(DatasetInfo(features=Features.from_arrow_schema(schema)))
    info = {k: v for k, v in info.items() if v not in (None, {}, [])} | {"features": info["features"]}
    # a content fingerprint, not a random one: identical runs write identical files
    fingerprint = hashlib.sha256("".join(done[i]["sha256"] for i in range(n)).encode()).hexdigest()[:16]
    state = {"_data_files": files, "_fingerprint": fingerprint, "_format_columns": None,
             "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False, "_split": None}
    _write_json(FileSystems.join(staging, "dataset_info.json"), info)
    _write_json(FileSystems.join(staging, "state.json"), state)
    return {"shards": n, "rows": sum(done[i]["rows"] for i in range(n))}


def _write_json(path: str, obj) -> None:
    with FileSystems.create(path) as fh:
        fh.write(json.dumps(obj, indent=2, sort_keys=True, default=str).encode("utf-8"))


class WriteShards(beam.PTransform):
    """records -> one dict {shards, rows} once every shard is in place in `staging`.

    Only the row count reaches one place; each shard's rows are grouped on one worker
    (about `shard_rows` rows), which is what writing that shard takes anyway.
    """

    def __init__(self, staging: str, schema: pa.Schema, shard_rows: int = 50_000):
        super().__init__()
        self.staging, self.schema, self.shard_rows = staging, schema, shard_rows

    def expand(self, pcoll):
        staging, schema, shard_rows = self.staging, self.schema, self.shard_rows
        n = (pcoll
             | "Count" >> beam.combiners.Count.Globally()
             | "Shards" >> beam.Map(shard_count, shard_rows))
        n_side = beam.pvalue.AsSingleton(n)
        written = (pcoll
                   | "ToShard" >> beam.Map(lambda r, n: (shard_of(r, n), r), n=n_side)
                   | "ByShard" >> beam.GroupByKey()
                   | "WriteShard" >> beam.ParDo(_WriteShard(staging, schema), n=n_side)
                   | "Collect" >> beam.combiners.ToList())
        return n | "Finalize" >> beam.Map(lambda n, written: finalize_shards(written, n, staging, schema),
                                          written=beam.pvalue.AsSingleton(written))


class WriteJsonl(beam.PTransform):
    """Small side outputs (dead letter) as one JSONL file, written by a single step,
    in a fixed order (by the text of each line)."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def expand(self, pcoll):
        path = self.path

        def write(rows):
            lines = sorted(json.dumps(r, ensure_ascii=False, default=str, sort_keys=True) for r in rows)
            with FileSystems.create(path) as fh:
                for line in lines:
                    fh.write((line + "\n").encode("utf-8", "backslashreplace"))
            return len(lines)

        return pcoll | "Collect" >> beam.combiners.ToList() | "Write" >> beam.Map(write)


# ---------------------------------------------------------------- publishing

# what a curate output holds; anything else in the output path is someone's data
_CURATE_FILE = re.compile(r"(data-\d{5}-of-\d{5}\.arrow|dataset_info\.json|state\.json|manifest\.json"
                          r"|report\.html|dead_letter\.jsonl|rejected/.+)")
_OWNER = "_curate_staging.json"  # in a staging directory: which process writes it


def _is_remote(path: str) -> bool:
    return "://" in path


def _canonical(path: str) -> str:
    """An absolute, symlink-free local path; a remote one without its trailing slash."""
    return path.rstrip("/") if _is_remote(path) else os.path.realpath(os.path.abspath(path))


def _inside(path: str, parent: str) -> bool:
    """path is parent or lies inside it (both canonical)."""
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def check_output(output: str, inputs: list[str], overwrite: bool = False) -> None:
    """Refuse, before any work, an output whose publishing could destroy data.

    Always refused: an output that is, contains or lies inside an input, or that contains
    the working directory or the home directory. Without `overwrite`: an existing output
    path that is not a previous curate output (a file; a directory without manifest.json,
    or with files curate does not write). An empty directory is fine.
    """
    if not output or not output.strip():
        raise ConfigError("output: empty path")
    out = _canonical(output)
    for path in inputs:
        inp = _canonical(path)
        if _inside(out, inp) or _inside(inp, out):
            how = "is" if out == inp else ("lies inside" if _inside(out, inp) else "contains")
            raise ConfigError(f"output {output} {how} the input {path}: publishing would replace the "
                              f"input; choose another output (--overwrite never allows this)")
    if not _is_remote(output):
        for name, guarded in (("the working directory", os.getcwd()), ("your home directory", "~"),
                              ("the root directory", "/")):
            if _inside(os.path.realpath(os.path.expanduser(guarded)), out):
                raise ConfigError(f"output {output} contains {name}: publishing replaces the output "
                                  f"directory as a whole; name a new directory (e.g. runs/NAME)")
        if os.path.exists(out) and not os.path.isdir(out):
            if not overwrite:
                raise ConfigError(f"output {output} is an existing file, not a curate output; "
                                  f"refusing to replace it (--overwrite replaces it)")
            return
    found = [f[len(out) + 1:] for f in list_tree(out)]
    if not found or overwrite:
        return
    if "manifest.json" not in found:
        raise ConfigError(f"output {output} exists and is not a curate output (no manifest.json; it holds "
                          f"{_some(found)}); refusing to replace it (--overwrite replaces it)")
    foreign = [f for f in found if not _CURATE_FILE.fullmatch(f)]
    if foreign:
        raise ConfigError(f"output {output} is a curate output that also holds files curate did not write "
                          f"({_some(foreign)}); refusing to replace them (--overwrite replaces them)")


def _some(names: list[str], k: int = 3) -> str:
    return ", ".join(names[:k]) + (f" and {len(names) - k} more" if len(names) > k else "")


def _staging_prefix(output: str) -> tuple[str, str]:
    parent, name = FileSystems.split(_canonical(output) if not _is_remote(output) else output.rstrip("/"))
    return parent, f".{name}.tmp-"


def staging_dir(output: str) -> str:
    """A fresh staging directory beside the output, created now (so an unwritable
    output fails before any work) and marked with the process that owns it."""
    parent, prefix = _staging_prefix(output)
    staging = FileSystems.join(parent, f"{prefix}{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}")
    if not _is_remote(output):
        os.makedirs(parent, exist_ok=True)
        os.mkdir(staging)
    _write_json(FileSystems.join(staging, _OWNER), {"host": socket.gethostname(), "pid": os.getpid()})
    return staging


def remove_stale_staging(output: str) -> list[str]:
    """Remove staging directories of this output left by killed runs on this machine
    (their process is gone). Another live run's staging directory is left alone."""
    parent, prefix = _staging_prefix(output)
    if _is_remote(output) or not os.path.isdir(parent):
        return []
    removed = []
    for name in sorted(os.listdir(parent)):
        path = os.path.join(parent, name)
        if not (name.startswith(prefix) or name.startswith(prefix.replace(".tmp-", ".old-"))):
            continue
        try:
            with open(os.path.join(path, _OWNER)) as fh:
                owner = json.load(fh)
        except (OSError, ValueError):
            owner = None
        if owner is None and ".tmp-" in name:
            continue  # not ours to judge: no owner file
        if owner is not None and (owner.get("host") != socket.gethostname() or _alive(owner.get("pid"))):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    if removed:
        log.info("removed %d leftover(s) of killed runs: %s", len(removed), ", ".join(removed))
    return removed


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, TypeError, ValueError):
        return False
    return True


def list_tree(path: str) -> list[str]:
    """Every file under `path` (a directory, or a prefix on an object store), sorted."""
    if not _is_remote(path):
        if not os.path.isdir(path):
            return []
        return sorted(os.path.join(root, f) for root, _, files in os.walk(path) for f in files)
    try:
        found = FileSystems.match([FileSystems.join(path.rstrip("/"), "**")])[0].metadata_list
    except BeamIOError:  # nothing there
        return []
    return sorted(m.path for m in found)


def remove_tree(path: str) -> None:
    if not _is_remote(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    files = list_tree(path)
    if files:
        FileSystems.delete(files)


def publish(staging: str, output: str, overwrite: bool = False, inputs: list[str] = ()) -> None:
    """Make the finished staging directory the output, replacing a previous curate output.

    The output is checked again first (something may have appeared there while the
    job ran). Local paths: the old output is renamed aside, the new one renamed in,
    then the old one removed. Remote (gs://): object stores cannot rename a directory,
    so the old output is deleted (manifest.json first, so it stops looking complete) and
    the new files are moved one by one, `manifest.json` last: a reader that finds it
    knows the directory is complete.
    """
    check_output(output, list(inputs), overwrite)
    FileSystems.delete([FileSystems.join(staging, _OWNER)])
    if _is_remote(output):
        _publish_remote(staging, output)
        return
    output = _canonical(output)
    old = None
    if os.path.lexists(output):
        parent, prefix = _staging_prefix(output)
        old = os.path.join(parent, f"{prefix.replace('.tmp-', '.old-')}{uuid.uuid4().hex[:6]}")
        os.rename(output, old)
    os.rename(staging, output)
    if old:
        if os.path.isdir(old) and not os.path.islink(old):
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.remove(old)


def _publish_remote(staging: str, output: str) -> None:
    output = output.rstrip("/")
    prefix = staging.rstrip("/") + "/"
    files = list_tree(staging)
    staged_manifest = FileSystems.join(staging, "manifest.json")
    if staged_manifest not in files:  # checked before the old output is touched
        raise RuntimeError(f"{staging}: no manifest.json; refusing to publish an incomplete run")
    manifest = FileSystems.join(output, "manifest.json")
    old = list_tree(output)
    if manifest in old:
        FileSystems.delete([manifest])
    rest = [f for f in old if f != manifest]
    if rest:
        FileSystems.delete(rest)
    files = [f for f in files if f != staged_manifest]
    FileSystems.rename(files, [FileSystems.join(output, f[len(prefix):]) for f in files])
    FileSystems.rename([staged_manifest], [manifest])  # alone, after the rest: a batch has no order


def read_manifest(path: str) -> dict | None:
    """The manifest of a published curate output, or None (absent or unreadable)."""
    try:
        with FileSystems.open(FileSystems.join(path, "manifest.json"),
                              compression_type=CompressionTypes.UNCOMPRESSED) as fh:
            return json.loads(fh.read())
    except Exception:
        return None
