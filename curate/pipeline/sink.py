"""The Arrow shard sink: records -> a directory `datasets.load_from_disk` opens as is.

Layout (the one `Dataset.save_to_disk` writes):
    data-00000-of-0000N.arrow   Arrow IPC *stream* files, schema metadata `huggingface`
    dataset_info.json           features
    state.json                  the shard list

Each bundle writes `part-<uuid>.arrow` files of at most `shard_rows` rows into a
staging directory; one finalize step renames them to their final names and writes the
two JSON files. The staging directory only becomes the output when the whole run has
succeeded (`publish`), so a failed run never leaves an output that looks complete.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
import uuid

import apache_beam as beam
import pyarrow as pa
from apache_beam.io.filesystem import BeamIOError
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

log = logging.getLogger(__name__)


def hf_schema(schema: pa.Schema) -> pa.Schema:
    """The schema with the `huggingface` features metadata `datasets` reads."""
    from datasets import Features

    features = Features.from_arrow_schema(schema)
    meta = {"huggingface": json.dumps({"info": {"features": features.to_dict()}})}
    return schema.with_metadata(meta)


def write_table(path: str, table: pa.Table) -> int:
    with FileSystems.create(path) as fh:
        with pa.ipc.new_stream(fh, table.schema) as writer:
            writer.write_table(table, max_chunksize=1000)
    return table.num_rows


def _to_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    columns = {name: [r.get(name) for r in rows] for name in schema.names}
    return pa.Table.from_pydict(columns, schema=schema)


class _WriteParts(beam.DoFn):
    def __init__(self, staging: str, schema: pa.Schema, shard_rows: int):
        self.staging, self.schema, self.shard_rows = staging, schema, shard_rows

    def setup(self):
        self._schema = hf_schema(self.schema)

    def start_bundle(self):
        self.rows, self.written = [], []

    def _flush(self):
        if self.rows:
            path = FileSystems.join(self.staging, f"part-{uuid.uuid4().hex}.arrow")
            n = write_table(path, _to_table(self.rows, self._schema))
            self.written.append({"path": path, "rows": n})
            self.rows = []

    def process(self, record):
        self.rows.append(record)
        if len(self.rows) >= self.shard_rows:
            self._flush()

    def finish_bundle(self):
        self._flush()
        for info in self.written:
            yield WindowedValue(info, MIN_TIMESTAMP, [GlobalWindow()])


def finalize_shards(parts: list[dict], staging: str, schema: pa.Schema) -> dict:
    """Rename parts to data-XXXXX-of-YYYYY.arrow; write dataset_info.json and state.json."""
    from datasets import DatasetInfo, Features

    schema = hf_schema(schema)
    parts = sorted(parts, key=lambda p: p["path"])  # deterministic shard order
    if not parts:  # an empty dataset is still a dataset: one empty shard
        path = FileSystems.join(staging, "part-empty.arrow")
        write_table(path, schema.empty_table())
        parts = [{"path": path, "rows": 0}]
    n = len(parts)
    files = []
    for i, part in enumerate(parts):
        name = f"data-{i:05d}-of-{n:05d}.arrow"
        FileSystems.rename([part["path"]], [FileSystems.join(staging, name)])
        files.append({"filename": name})
    info = dataclasses.asdict(DatasetInfo(features=Features.from_arrow_schema(schema)))
    info = {k: v for k, v in info.items() if v not in (None, {}, [])} | {"features": info["features"]}
    state = {"_data_files": files, "_fingerprint": uuid.uuid4().hex[:16], "_format_columns": None,
             "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False, "_split": None}
    _write_json(FileSystems.join(staging, "dataset_info.json"), info)
    _write_json(FileSystems.join(staging, "state.json"), state)
    return {"shards": n, "rows": sum(p["rows"] for p in parts)}


def _write_json(path: str, obj) -> None:
    with FileSystems.create(path) as fh:
        fh.write(json.dumps(obj, indent=2, sort_keys=True, default=str).encode("utf-8"))


class WriteShards(beam.PTransform):
    """records -> one dict {shards, rows} once every shard is in place in `staging`."""

    def __init__(self, staging: str, schema: pa.Schema, shard_rows: int = 50_000):
        super().__init__()
        self.staging, self.schema, self.shard_rows = staging, schema, shard_rows

    def expand(self, pcoll):
        staging, schema = self.staging, self.schema
        return (pcoll
                | "WriteParts" >> beam.ParDo(_WriteParts(staging, schema, self.shard_rows))
                | "Collect" >> beam.combiners.ToList()
                | "Finalize" >> beam.Map(finalize_shards, staging, schema))


class WriteJsonl(beam.PTransform):
    """Small side outputs (dead letter) as one JSONL file, written by a single step."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def expand(self, pcoll):
        path = self.path

        def write(rows):
            rows = sorted(rows, key=lambda r: str(r.get("origin")))
            with FileSystems.create(path) as fh:
                for r in rows:
                    fh.write((json.dumps(r, ensure_ascii=False, default=str) + "\n").encode("utf-8"))
            return len(rows)

        return pcoll | "Collect" >> beam.combiners.ToList() | "Write" >> beam.Map(write)


# ---------------------------------------------------------------- publishing

def staging_dir(output: str) -> str:
    parent, name = FileSystems.split(output.rstrip("/"))
    return FileSystems.join(parent, f".{name}.tmp-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}")


def list_tree(path: str) -> list[str]:
    """Every file under `path` (a directory, or a prefix on an object store), sorted."""
    try:
        found = FileSystems.match([FileSystems.join(path.rstrip("/"), "**")])[0].metadata_list
    except BeamIOError:  # nothing there
        return []
    return sorted(m.path for m in found)


def remove_tree(path: str) -> None:
    if "://" not in path:
        shutil.rmtree(path, ignore_errors=True)
        return
    files = list_tree(path)
    if files:
        FileSystems.delete(files)


def publish(staging: str, output: str) -> None:
    """Make the finished staging directory the output, replacing an older one.

    Local paths: two renames (the old output is moved aside first, then removed).
    Remote (gs://): object stores cannot rename a directory, so the old output is
    deleted (its manifest.json first, so it stops looking complete) and the new files
    are moved one by one, `manifest.json` last: a reader that finds it knows the
    directory is complete.
    """
    if "://" in output:
        _publish_remote(staging, output)
        return
    old = None
    if os.path.exists(output):
        old = f"{output.rstrip('/')}.old-{uuid.uuid4().hex[:6]}"
        os.rename(output, old)
    os.rename(staging, output)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _publish_remote(staging: str, output: str) -> None:
    output = output.rstrip("/")
    manifest = FileSystems.join(output, "manifest.json")
    old = list_tree(output)
    if manifest in old:
        FileSystems.delete([manifest])
    rest = [f for f in old if f != manifest]
    if rest:
        FileSystems.delete(rest)
    prefix = staging.rstrip("/") + "/"
    files = list_tree(staging)
    staged_manifest = FileSystems.join(staging, "manifest.json")
    if staged_manifest not in files:
        raise RuntimeError(f"{staging}: no manifest.json; refusing to publish an incomplete run")
    files = [f for f in files if f != staged_manifest]
    FileSystems.rename(files, [FileSystems.join(output, f[len(prefix):]) for f in files])
    FileSystems.rename([staged_manifest], [manifest])  # alone, after the rest: a batch has no order
