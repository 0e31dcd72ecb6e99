"""Readers: input specs -> canonical records, or dead-letter rows naming file, line, reason.

Files are opened through Beam's `FileSystems`, so gs:// (with the `dataflow` extra)
works wherever a local path does, and `.gz` is decompressed by suffix.

The driver plans the inputs first (`plan_inputs`): it expands globs, picks each file's
format, and detects the adapter from the first row, so an input of an unknown shape
fails at once with a clear error instead of sending every row to the dead letter.
The pipeline then reads each planned file in a DoFn that keeps the line number of
every row; line numbers are what make a dead-letter row findable.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import zlib
from dataclasses import dataclass, field
from typing import Iterator

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from curate import records
from curate.config import ConfigError, InputConfig

log = logging.getLogger(__name__)

DEAD = "dead_letter"
HF_PREFIX = "hf://"
MAX_LINE_BYTES = 64 * 1024 * 1024  # a longer line is a dead-letter row, not a crash
_SUFFIX_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet",
                   ".arrow": "arrow"}


@dataclass(frozen=True)
class FileTask:
    path: str
    source: str
    format: str
    adapter: str
    fields: dict = field(default_factory=dict)
    limit: int | None = None
    max_chars: int = 32_000


def dead_letter(origin: str, reason: str, raw: object = None) -> dict:
    text = raw if isinstance(raw, str) else (None if raw is None else repr(raw))
    return {"origin": origin, "reason": reason, "raw": None if text is None else text[:2000]}


def _stem(path: str) -> str:
    name = path.rstrip("/").rsplit("/", 1)[-1]
    for suffix in (".gz", ".jsonl", ".ndjson", ".json", ".parquet", ".arrow"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name


def detect_format(path: str) -> str:
    if path.startswith(HF_PREFIX):
        return "hf"
    name = path[:-3] if path.endswith(".gz") else path
    for suffix, fmt in _SUFFIX_FORMATS.items():
        if name.endswith(suffix):
            return fmt
    if FileSystems.exists(path.rstrip("/") + "/state.json"):
        return "arrow"
    raise ConfigError(f"{path}: cannot tell the format from the name; set 'format:' "
                      f"(jsonl, json, parquet, arrow, hf)")


def _expand(spec: InputConfig) -> list[str]:
    if spec.path.startswith(HF_PREFIX):
        return [spec.path]
    if FileSystems.exists(spec.path.rstrip("/") + "/state.json"):
        return [spec.path.rstrip("/")]  # a save_to_disk directory
    try:
        matches = FileSystems.match([spec.path])[0].metadata_list
    except Exception as exc:  # Beam raises BeamIOError for an unmatched pattern
        raise ConfigError(f"input {spec.path}: {exc}") from None
    paths = sorted(m.path for m in matches)
    if not paths:
        raise ConfigError(f"input {spec.path}: no file matches")
    return paths


def plan_inputs(specs: list[InputConfig], max_chars: int) -> list[FileTask]:
    tasks = []
    for spec in specs:
        for path in _expand(spec):
            fmt = detect_format(path) if spec.format == "auto" else spec.format
            adapter = spec.adapter
            if adapter == "auto":
                adapter = _detect_adapter(path, fmt, spec.fields)
            elif adapter not in records.ADAPTERS:
                raise ConfigError(f"input {spec.path}: unknown adapter {adapter!r}; "
                                  f"known: {', '.join(records.ADAPTERS)}")
            tasks.append(FileTask(path=path, source=spec.source or _stem(path), format=fmt,
                                  adapter=adapter, fields=dict(spec.fields), limit=spec.limit,
                                  max_chars=max_chars))
    return tasks


def _detect_adapter(path: str, fmt: str, fields: dict) -> str:
    for origin, row, error in iter_rows(path, fmt, limit=50):
        if error is None and isinstance(row, dict):
            adapter = records.detect_adapter(row, fields)
            if adapter is None:
                raise ConfigError(
                    f"{origin}: unknown row shape; found fields {sorted(row)[:20]}, expected one of: "
                    f"{records.describe_shapes()}. Map fields with 'fields:' or set 'adapter:'.")
            return adapter.name
    raise ConfigError(f"{path}: no readable row in the first 50 to detect the shape from; "
                      f"set 'adapter:' in the job")


# ---------------------------------------------------------------- raw rows

def iter_rows(path: str, fmt: str, limit: int | None = None) -> Iterator[tuple[str, object, str | None]]:
    """(origin, row, error) for each row. With an error (the dead-letter reason), row is
    None or, for a line that is not JSON, its raw text."""
    readers = {"jsonl": _jsonl_rows, "json": _json_rows, "parquet": _parquet_rows,
               "arrow": _arrow_rows, "hf": _hf_rows}
    n = 0
    for item in readers[fmt](path):
        yield item
        n += 1
        if limit is not None and n >= limit:
            return


def _open(path: str):
    """A binary file object with readline(size); .gz decompressed by suffix."""
    raw = FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)
    return gzip.GzipFile(fileobj=raw) if path.endswith(".gz") else raw


def _jsonl_rows(path: str):
    name = path.rsplit("/", 1)[-1]
    line_no = 0
    try:
        with _open(path) as fh:
            while True:
                raw = fh.readline(MAX_LINE_BYTES + 1)
                if not raw:
                    return
                line_no += 1
                origin = f"{name}:{line_no}"
                if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                    # skip the rest of the over-long line
                    while raw and not raw.endswith(b"\n"):
                        raw = fh.readline(MAX_LINE_BYTES)
                    yield origin, None, f"line longer than {MAX_LINE_BYTES} bytes"
                    continue
                if not raw.strip():
                    continue  # blank lines are not rows
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    yield origin, None, f"invalid UTF-8 at byte {exc.start}"
                    continue
                text = text.rstrip("\r\n")  # so a cut-off line's error is at its own end
                try:
                    yield origin, json.loads(text), None
                except json.JSONDecodeError as exc:
                    # the unparsed text goes along as the dead-letter row's `raw`
                    yield origin, text, f"malformed JSON: {exc.msg} at column {exc.colno}"
    except (EOFError, zlib.error, gzip.BadGzipFile, OSError) as exc:
        yield f"{name}:{line_no + 1}", None, f"file unreadable after line {line_no}: {type(exc).__name__}: {exc}"


def _json_rows(path: str):
    name = path.rsplit("/", 1)[-1]
    try:
        with _open(path) as fh:
            data = json.loads(fh.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, EOFError, zlib.error, OSError) as exc:
        yield f"{name}:1", None, f"not a readable JSON document: {exc}"
        return
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            yield f"{name}:1", None, "JSON object without exactly one list of rows"
            return
        data = lists[0]
    if not isinstance(data, list):
        yield f"{name}:1", None, f"JSON document is {type(data).__name__}, expected a list of rows"
        return
    for i, row in enumerate(data, 1):
        yield f"{name}:item {i}", row, None


def _parquet_rows(path: str):
    import pyarrow.parquet as pq

    name = path.rsplit("/", 1)[-1]
    try:
        with _open(path) as fh:
            pf = pq.ParquetFile(io.BytesIO(fh.read()))
            i = 0
            for batch in pf.iter_batches(batch_size=4096):
                for row in batch.to_pylist():
                    i += 1
                    yield f"{name}:row {i}", row, None
    except Exception as exc:  # pyarrow raises several types for a bad file
        yield f"{name}:?", None, f"unreadable Parquet file: {exc}"


def arrow_dir_files(path: str) -> list[str]:
    """The shard files of a `save_to_disk` directory, in order (from its state.json)."""
    with FileSystems.open(FileSystems.join(path.rstrip("/"), "state.json"),
                          compression_type=CompressionTypes.UNCOMPRESSED) as fh:
        state = json.loads(fh.read())
    return [FileSystems.join(path.rstrip("/"), f["filename"]) for f in state["_data_files"]]


def arrow_dir_schema(path: str):
    """The Arrow schema of a `save_to_disk` directory (from its dataset_info.json)."""
    import datasets

    with FileSystems.open(FileSystems.join(path.rstrip("/"), "dataset_info.json"),
                          compression_type=CompressionTypes.UNCOMPRESSED) as fh:
        info = json.loads(fh.read())
    return datasets.Features.from_dict(info["features"]).arrow_schema


def _arrow_rows(path: str):
    import pyarrow as pa

    # shards are read through FileSystems (not datasets.load_from_disk), so a directory
    # on gs:// reads like a local one
    name = path.rstrip("/").rsplit("/", 1)[-1]
    shards = [path] if path.endswith(".arrow") else arrow_dir_files(path)
    i = 0
    for shard in shards:
        with _open(shard) as fh:
            for batch in pa.ipc.open_stream(fh):
                for row in batch.to_pylist():
                    i += 1
                    yield f"{name}:row {i}", row, None


def _hf_rows(path: str):
    name = path[len(HF_PREFIX):]
    repo, _, split = name.partition(":")
    try:
        import datasets

        ds = datasets.load_dataset(repo, split=split or "train", streaming=True)
        for i, row in enumerate(ds, 1):
            yield f"{path}:row {i}", row, None
    except Exception as exc:
        raise ConfigError(
            f"{path}: could not load '{repo}' from the Hugging Face hub ({type(exc).__name__}: "
            f"{str(exc)[:200]}). Without network access, download it elsewhere and point "
            f"'path:' at a local copy (jsonl, parquet or a save_to_disk directory).") from None


# ---------------------------------------------------------------- Beam

def validate_record(record: dict, max_chars: int) -> str | None:
    """The dead-letter reason for an adapted record, or None when it is fine."""
    total = sum(len(m["content"]) for m in record["messages"])
    if total > max_chars:
        return f"over-long example: {total} characters > max_chars {max_chars}"
    return None


class ReadFile(beam.DoFn):
    """FileTask -> records (main output) and dead-letter rows (tagged DEAD)."""

    def process(self, task: FileTask):
        adapter = records.ADAPTERS[task.adapter]
        for origin, row, error in iter_rows(task.path, task.format, task.limit):
            if error is not None:  # `row` is then None, or the raw text that failed to parse
                yield beam.pvalue.TaggedOutput(DEAD, dead_letter(origin, error, row))
                continue
            try:
                recs = records.adapt(row, adapter, task.fields, task.source)
            except records.RowError as exc:
                yield beam.pvalue.TaggedOutput(DEAD, dead_letter(origin, str(exc), _raw(row)))
                continue
            for k, rec in enumerate(recs):
                if task.adapter != "curate":  # a curate row keeps its first origin
                    rec["origin"] = origin if len(recs) == 1 else f"{origin}:{k}"
                reason = validate_record(rec, task.max_chars)
                if reason:
                    yield beam.pvalue.TaggedOutput(DEAD, dead_letter(rec["origin"], reason,
                                                                     rec["prompt"][:200]))
                else:
                    yield rec


def _raw(row) -> str:
    try:
        return json.dumps(row, ensure_ascii=False, default=str)[:2000]
    except (TypeError, ValueError):
        return repr(row)[:2000]


class ReadInputs(beam.PTransform):
    """Planned file tasks -> {'records': ..., 'dead_letter': ...}."""

    def __init__(self, tasks: list[FileTask]):
        super().__init__()
        self.tasks = tasks

    def expand(self, pbegin):
        out = (pbegin
               | "Files" >> beam.Create(self.tasks)
               | "Read" >> beam.ParDo(ReadFile()).with_outputs(DEAD, main="records"))
        # spread one file's rows over all workers
        recs = out.records | "Spread" >> beam.Reshuffle()
        return {"records": recs, DEAD: out[DEAD]}
