"""`curate export`: a curate output's rows as plain JSONL or Parquet files.

    OUT/data-*.arrow          ->  DIR/data.jsonl     (or data.parquet)
    OUT/rejected/data-*.arrow ->  DIR/rejected.jsonl (with --rejected)

One file per part, rows in the order `datasets.load_from_disk(OUT)` gives them (shard by
shard, as state.json lists them). The shards are streamed record batch by record batch,
so memory stays bounded by a batch (JSONL) or a row group (Parquet), whatever the size
of the output. Nested columns stay nested: `messages` is a list of {role, content} in
both formats. JSON has no NaN or infinity: such floats are written as null.

Parquet files carry the `huggingface` features metadata of the columns written, so
`datasets.load_dataset("parquet", ...)` reads them with the same features as the shards.

Safety: DIR defaults to OUT-export. It may never be, contain or lie inside OUT, nor
contain the working, home or root directory (`curate.pipeline.output.check_output`). An
existing non-empty DIR (or a file at DIR) is refused unless `overwrite`; with it, only
the files named above are replaced, nothing else in DIR is touched. Each file is
written under a temporary name beside its final one and renamed into place when
complete, so a failed or interrupted export never leaves a truncated file that looks
complete (a killed one's temporaries are removed by the next export there). The files are
renamed into place only once all are written and OUT's manifest is still the one read
first: an output republished by another run while it was exported fails the export
(`curate.pipeline.output.OutputReplaced`) instead of mixing two runs' rows.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from typing import Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from curate.config import ConfigError
from curate.paths import canonical_path, is_remote, overlap
from curate.pipeline.output import check_output, pid_alive, read_manifest
from curate.published import check_unchanged, manifest_token
from curate.pipeline.sink import hf_schema

FORMATS = ("jsonl", "parquet")
PARTS = ("data", "rejected")  # kept rows (OUT) and rejected rows (OUT/rejected)
TMP_MARK = ".tmp-"  # .data.jsonl.tmp-<pid>-<random>: a file being written
# a Parquet row group is written once this many bytes of batches have gathered
ROW_GROUP_BYTES = 64 << 20


def _open(path: str):
    return FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)


def _exists(path: str) -> bool:
    return FileSystems.exists(path)


def part_dir(out: str, part: str) -> str:
    return out.rstrip("/") if part == "data" else FileSystems.join(out.rstrip("/"), "rejected")


def shard_paths(directory: str) -> list[str]:
    """The shard files of a saved dataset, in the order `load_from_disk` reads them."""
    state = FileSystems.join(directory, "state.json")
    if not _exists(state):
        raise ConfigError(f"{directory}: no state.json; not a dataset curate wrote")
    with _open(state) as fh:
        files = [f["filename"] for f in json.loads(fh.read())["_data_files"]]
    if not files:
        raise ConfigError(f"{directory}: state.json lists no shards; not a dataset curate wrote")
    return [FileSystems.join(directory, f) for f in files]


def shard_schema(path: str) -> pa.Schema:
    with _open(path) as fh:
        return pa.ipc.open_stream(fh).schema


def iter_batches(paths: Sequence[str]) -> Iterator[pa.RecordBatch]:
    """Every record batch of the shards, in order; one batch in memory at a time."""
    for path in paths:
        with _open(path) as fh:
            yield from pa.ipc.open_stream(fh)


def parse_columns(text: str | None) -> list[str] | None:
    """`a,b,c` -> ["a", "b", "c"]; None or blank -> None (every column)."""
    if text is None or not text.strip():
        return None
    names = [c.strip() for c in text.split(",") if c.strip()]
    seen = set()
    for name in names:
        if name in seen:
            raise ConfigError(f"--columns: {name!r} is named twice")
        seen.add(name)
    return names


def pick_columns(schema: pa.Schema, columns: Sequence[str] | None, where: str) -> pa.Schema:
    """The schema of the columns to write (all of them, or `columns` in that order)."""
    schema = schema.remove_metadata()
    if columns is None:
        return schema
    unknown = [c for c in columns if c not in schema.names]
    if unknown:
        raise ConfigError(f"unknown column(s) {', '.join(unknown)} in {where}; "
                          f"available: {', '.join(schema.names)}")
    return pa.schema([schema.field(c) for c in columns])


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _json_line(row: dict) -> str:
    try:
        return json.dumps(row, ensure_ascii=False, allow_nan=False, default=str)
    except ValueError:  # NaN or infinity somewhere: JSON has no such number
        return json.dumps(_json_safe(row), ensure_ascii=False, allow_nan=False, default=str)


def _select(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    batch = batch.select(schema.names)
    if not batch.schema.remove_metadata().equals(schema):
        batch = batch.cast(schema)  # shards of one dataset share a schema; this is a safety net
    return batch


def write_jsonl(path: str, batches: Iterator[pa.RecordBatch], schema: pa.Schema) -> int:
    rows = 0
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for batch in batches:
            batch = _select(batch, schema)
            for row in batch.to_pylist():
                fh.write(_json_line(row) + "\n")
            rows += batch.num_rows
    return rows


def write_parquet(path: str, batches: Iterator[pa.RecordBatch], schema: pa.Schema) -> int:
    rows, pending, size = 0, [], 0
    with pq.ParquetWriter(path, hf_schema(schema)) as writer:
        def flush():
            nonlocal pending, size
            if pending:
                writer.write_table(pa.Table.from_batches(pending, schema=schema))
            pending, size = [], 0

        for batch in batches:
            batch = _select(batch, schema)
            pending.append(batch)
            size += batch.nbytes
            rows += batch.num_rows
            if size >= ROW_GROUP_BYTES:
                flush()
        flush()
        if rows == 0:  # an empty dataset is still a file with the schema
            writer.write_table(schema.empty_table())
    return rows


WRITERS = {"jsonl": write_jsonl, "parquet": write_parquet}


def default_destination(out: str) -> str:
    return f"{out.rstrip('/')}-export"


def recorded_inputs(manifest: dict) -> list[str]:
    """The local paths a curate output was made from, as its manifest records them: the
    planned input files, the job's input paths (no globs, no hf://), and for a selection
    the scores directory with the inputs those scores were made from."""
    paths = [i.get("path") for key in ("plan", "scoring_plan")
             for i in (manifest.get(key) or {}).get("inputs", [])]
    paths += [i.get("path") for i in manifest.get("inputs") or []]
    paths.append(manifest.get("scores_from"))
    cwd = manifest.get("cwd") or os.getcwd()  # relative paths are the run's
    return sorted({os.path.join(cwd, os.path.expanduser(p)) for p in paths
                   if isinstance(p, str) and p and not is_remote(p) and not any(c in p for c in "*?[")})


def check_destination(to: str, out: str, overwrite: bool) -> None:
    """Refuse a destination the export could damage (see the module docstring)."""
    if is_remote(to):
        raise ConfigError(f"--to {to}: export writes to a local directory")
    how = overlap(canonical_path(to), canonical_path(out))
    if how:
        raise ConfigError(f"--to {to} {how} the curate output {out}; export to another directory "
                          f"(--overwrite never allows this)")
    # overwrite=True: only the rules no flag lifts (not into OUT or one of the inputs it was
    # made from, the cwd, home or /): what `curate run` refuses, the export refuses
    try:
        check_output(to, [out, *recorded_inputs(read_manifest(out) or {})], overwrite=True)
    except ConfigError as exc:
        raise ConfigError(f"export destination (--to): {exc}") from None
    if overwrite or not os.path.lexists(to):
        return
    if not os.path.isdir(to):
        raise ConfigError(f"--to {to} is an existing file; refusing to replace it (--overwrite replaces it)")
    found = sorted(os.listdir(to))
    if found:
        more = f" and {len(found) - 3} more" if len(found) > 3 else ""
        raise ConfigError(f"--to {to} exists and is not empty (it holds {', '.join(found[:3])}{more}); "
                          f"refusing to write into it (--overwrite replaces the export's files there)")


def export_output(out: str, fmt: str = "jsonl", to: str | None = None, columns: Sequence[str] | None = None,
                  rejected: bool = False, overwrite: bool = False) -> dict:
    """Write the kept rows of the curate output `out` (and the rejected ones with
    `rejected`) as one `fmt` file each under `to` (default OUT-export).

    Returns {"to": DIR, "format", "files": {file name: {"rows": n, "columns": [...]}}}.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if not is_remote(out) and not os.path.isdir(out):
        raise ConfigError(f"{out}: no such directory" if not os.path.lexists(out)
                          else f"{out} is not a directory, not a curate output")
    token = manifest_token(out)
    if read_manifest(out) is None:
        raise ConfigError(f"{out} is not a curate output (no readable manifest.json); "
                          f"export reads what `curate run`, `score` or `select` published")
    to = to or default_destination(out)
    check_destination(to, out, overwrite)

    parts = ["data", "rejected"] if rejected else ["data"]
    plan = []  # everything is checked before anything is written
    for part in parts:
        directory = part_dir(out, part)
        where = f"{out} ({'kept rows' if part == 'data' else 'rejected rows'})"
        if part == "rejected" and not _exists(FileSystems.join(directory, "state.json")):
            raise ConfigError(f"{out} has no rejected rows to export (no rejected/ dataset)")
        paths = shard_paths(directory)
        schema = pick_columns(shard_schema(paths[0]), columns, where)
        plan.append((part, paths, schema))

    if not is_remote(to) and os.path.lexists(to) and not os.path.isdir(to):
        os.remove(to)  # a file at DIR, and overwrite: it is replaced by the directory
    created = not os.path.isdir(to)
    os.makedirs(to, exist_ok=True)
    remove_stale_temporaries(to)
    files, written = {}, {}  # written: final path -> its temporary
    try:
        for part, paths, schema in plan:
            name = f"{part}.{fmt}"
            tmp = os.path.join(to, f".{name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:6]}")
            written[os.path.join(to, name)] = tmp
            try:
                rows = WRITERS[fmt](tmp, iter_batches(paths), schema)
            except Exception as exc:  # a shard the publish removed under us
                check_unchanged(out, token, exc)
                raise
            files[name] = {"rows": rows, "columns": schema.names}
        check_unchanged(out, token)  # every file from one published output, or none
        for final, tmp in written.items():
            os.replace(tmp, final)
    except BaseException:
        for tmp in written.values():
            if os.path.exists(tmp):
                os.remove(tmp)
        if created and not os.listdir(to):
            os.rmdir(to)
        raise
    return {"to": canonical_path(to), "format": fmt, "files": files}


def remove_stale_temporaries(to: str) -> None:
    """An export killed while it wrote left `.data.FORMAT.tmp-PID-*` files: removed once
    their process is gone."""
    for name in os.listdir(to):
        pid = name.partition(TMP_MARK)[2].partition("-")[0]
        if name.startswith(tuple(f".{part}." for part in PARTS)) and pid.isdigit() and not pid_alive(pid):
            os.remove(os.path.join(to, name))


def copy_kept(out: str, to: str) -> bool:
    """The kept rows of the curate output `out` (a selection on gs://, say) as a local
    dataset at `to` that `datasets.load_from_disk` and the trainer read: its shards,
    state.json, dataset_info.json and manifest.json, nothing of rejected/. Nothing is
    copied when `to` already holds the same manifest; returns whether it copied. The copy
    is made beside `to` and renamed into place, so `to` is never half a copy."""
    token = manifest_token(out)
    with _open(FileSystems.join(out, "manifest.json")) as fh:
        manifest = fh.read()
    final = os.path.abspath(to)
    if os.path.isfile(os.path.join(final, "manifest.json")):
        with open(os.path.join(final, "manifest.json"), "rb") as fh:
            if fh.read() == manifest:
                return False
    tmp = f"{final}{TMP_MARK}copy"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for src in [*shard_paths(out), FileSystems.join(out, "state.json"), FileSystems.join(out, "dataset_info.json")]:
        with _open(src) as fh, open(os.path.join(tmp, FileSystems.split(src)[1]), "wb") as dst:
            shutil.copyfileobj(fh, dst)
    check_unchanged(out, token)  # all from the one published output
    with open(os.path.join(tmp, "manifest.json"), "wb") as fh:
        fh.write(manifest)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return True
