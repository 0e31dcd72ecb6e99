"""File formats: one generator per format yields (origin, row, error) for each row of a
file, read through Beam's FileSystems (gs:// like a local path; .gz by suffix).

Damage that loses the rest of a file raises `FileDamaged` after the rows before it;
`curate.pipeline.readers` turns it into one dead-letter row saying how much was lost.
"""

from __future__ import annotations

import codecs
import gzip
import io
import json
import zlib

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from curate.config import ConfigError

HF_PREFIX = "hf://"
MAX_LINE_BYTES = 64 * 1024 * 1024  # a longer line is a dead-letter row, not a crash


class FileDamaged(Exception):
    """Raised by a format reader when the rest of a file cannot be read; the message is
    the dead-letter reason, `origin` where the damage starts."""

    def __init__(self, origin: str, reason: str):
        super().__init__(reason)
        self.origin = origin


def basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def describe_error(exc: BaseException) -> str:
    """The exception on one line (pyarrow's messages span several)."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def format_rows(path: str, fmt: str, name: str):
    readers = {"jsonl": _jsonl_rows, "json": _json_rows, "parquet": _parquet_rows,
               "arrow": _arrow_rows, "hf": _hf_rows}
    return readers[fmt](path, name)


def _open(path: str):
    """A binary file object with readline(size); .gz decompressed by suffix."""
    raw = FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)
    return io.BufferedReader(_Gunzipped(gzip.GzipFile(fileobj=raw)), 1 << 16) if path.endswith(".gz") else raw


class _Gunzipped(io.RawIOBase):
    """A gzip file's bytes as they come (`read1`), for a BufferedReader: its readline
    takes 3.9 us a line of 1 KB where GzipFile's own takes 5.3. One chunk a read, so
    the lines before a damaged part are read before its error is raised."""

    def __init__(self, gz: gzip.GzipFile):
        self.gz = gz

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.gz.read1(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def close(self):
        self.gz.close()
        super().close()


def _jsonl_rows(path: str, name: str):
    line_no = 0
    try:
        with _open(path) as fh:
            while True:
                raw = fh.readline(MAX_LINE_BYTES + 1)
                if not raw:
                    return
                line_no += 1
                origin = f"{name}:{line_no}"
                if raw.startswith(codecs.BOM_UTF8):
                    # a BOM is not part of the row; past line 1 it comes from concatenated files
                    raw = raw[len(codecs.BOM_UTF8):]
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
                    # the unparsed text goes along as the dead-letter row's `raw`; some of
                    # json's messages end in "at" already ("Unterminated string starting at")
                    yield origin, text, f"malformed JSON: {exc.msg.removesuffix(' at')} at column {exc.colno}"
                except RecursionError:
                    yield origin, text, "JSON nested too deeply"
    except gzip.BadGzipFile as exc:
        if line_no:
            raise FileDamaged(f"{name}:{line_no + 1}", f"file unreadable after line {line_no}: "
                                                        f"{describe_error(exc)}") from None
        raise FileDamaged(f"{name}:1", f"not a gzip file, though its name ends in .gz ({exc})") from None
    except (EOFError, zlib.error, OSError) as exc:
        where = f" after line {line_no}" if line_no else ""
        raise FileDamaged(f"{name}:{line_no + 1}", f"file unreadable{where}: {describe_error(exc)}") from None


def _json_rows(path: str, name: str):
    try:
        with _open(path) as fh:
            text = fh.read().decode("utf-8-sig")  # -sig: a leading BOM is dropped
        if not text.strip():
            return  # an empty file holds no rows
        data = json.loads(text)
    except RecursionError:
        raise FileDamaged(f"{name}:1", "JSON nested too deeply") from None
    except (UnicodeDecodeError, json.JSONDecodeError, EOFError, zlib.error, OSError) as exc:
        raise FileDamaged(f"{name}:1", f"not a readable JSON document: {exc}") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise FileDamaged(f"{name}:1", "JSON object without exactly one list of rows")
        data = lists[0]
    if not isinstance(data, list):
        raise FileDamaged(f"{name}:1", f"JSON document is {type(data).__name__}, expected a list of rows")
    for i, row in enumerate(data, 1):
        yield f"{name}:item {i}", row, None


def batch_rows(batch):
    """A record batch's rows as dicts; list<float> columns (embeddings, trajectories) as
    NumPy arrays of their float type: vectors travel between steps as arrays, never as
    lists of Python floats (pickling a list costs a Python object per number)."""
    import numpy as np
    import pyarrow as pa

    vectors = {f.name: np.float32 if pa.types.is_float32(f.type.value_type) else np.float64
               for f in batch.schema
               if pa.types.is_list(f.type) and pa.types.is_floating(f.type.value_type)}
    for row in batch.to_pylist():
        for name, dtype in vectors.items():
            if row.get(name) is not None:
                row[name] = np.asarray(row[name], dtype=dtype)
        yield row


def _parquet_rows(path: str, name: str):
    import pyarrow.parquet as pq

    # pyarrow raises several types for a bad file, so any exception is damage here
    try:
        with _open(path) as fh:
            data = fh.read()
        if not data:
            return  # an empty file holds no rows
        pf = pq.ParquetFile(io.BytesIO(data))
    except Exception as exc:
        raise FileDamaged(f"{name}:?", f"unreadable Parquet file: {describe_error(exc)}") from None
    total = pf.metadata.num_rows  # from the footer, so what damage loses can be counted
    i = 0
    try:
        # group by group: reading several at once reads ahead, and damage in a later
        # group would then lose the earlier ones too
        for group in range(pf.num_row_groups):
            for batch in pf.iter_batches(batch_size=4096, row_groups=[group]):
                for row in batch_rows(batch):
                    i += 1
                    yield f"{name}:row {i}", row, None
    except Exception as exc:
        raise FileDamaged(f"{name}:row {i + 1}", f"file damaged after row {i}: {total - i} of {total} "
                                                 f"rows lost ({describe_error(exc)})") from None


def _read_json(path: str):
    """A small JSON file (save_to_disk metadata); a ConfigError naming it when unreadable."""
    try:
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as fh:
            return json.loads(fh.read())
    except Exception as exc:
        raise ConfigError(f"{path}: unreadable ({describe_error(exc)})") from None


def arrow_dir_files(path: str) -> list[str]:
    """The shard files of a `save_to_disk` directory, in order (from its state.json)."""
    state_path = FileSystems.join(path.rstrip("/"), "state.json")
    state = _read_json(state_path)
    try:
        return [FileSystems.join(path.rstrip("/"), f["filename"]) for f in state["_data_files"]]
    except (KeyError, TypeError) as exc:
        raise ConfigError(f"{state_path}: no list of data files ({describe_error(exc)})") from None


def arrow_dir_schema(path: str):
    """The Arrow schema of a `save_to_disk` directory (from its dataset_info.json)."""
    import datasets

    info_path = FileSystems.join(path.rstrip("/"), "dataset_info.json")
    try:
        return datasets.Features.from_dict(_read_json(info_path)["features"]).arrow_schema
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{info_path}: no readable features ({describe_error(exc)})") from None


def arrow_batches(path: str, columns: list[str]):
    """The record batches of an Arrow input (one shard, or a save_to_disk directory's
    shards in order), with only the named columns it has: what the driver reads of a
    written pool (a stratified selector's stratum sizes) without reading rows as dicts."""
    import pyarrow as pa

    for shard in [path] if path.endswith(".arrow") else arrow_dir_files(path):
        with _open(shard) as fh:
            for batch in pa.ipc.open_stream(fh):
                yield batch.select([c for c in dict.fromkeys(columns) if c in batch.schema.names])


def _arrow_dir_rows_expected(path: str) -> int | None:
    """The row count a save_to_disk directory's dataset_info.json records, if any."""
    try:
        splits = _read_json(FileSystems.join(path, "dataset_info.json")).get("splits") or {}
        return sum(s["num_examples"] for s in splits.values()) if splits else None
    except (ConfigError, AttributeError, KeyError, TypeError):
        return None


def _arrow_rows(path: str, name: str):
    import pyarrow as pa

    # shards are read through FileSystems (not datasets.load_from_disk), so a directory
    # on gs:// reads like a local one
    if path.endswith(".arrow"):
        shards, expected = [path], None
    else:
        shards, expected = arrow_dir_files(path), _arrow_dir_rows_expected(path)
    i = 0
    damaged = []  # (origin, reason) of each damaged shard; later shards are still read
    for shard in shards:
        k = 0  # rows read from this shard
        try:
            with _open(shard) as fh:
                for batch in pa.ipc.open_stream(fh):
                    for row in batch_rows(batch):
                        i += 1
                        k += 1
                        yield f"{name}:row {i}", row, None
        except Exception as exc:  # pyarrow raises ArrowInvalid or OSError for a damaged stream
            shard_name = basename(shard)
            damaged.append((f"{name}/{shard_name}:row {k + 1}" if shard != path else f"{name}:row {i + 1}",
                            f"shard {shard_name} damaged after {k} of its rows: the rest is lost "
                            f"({describe_error(exc)})"))
    # reported at the end, when the rows read from the whole directory are known
    missing = f"; {expected - i} of the {expected} rows in dataset_info.json are missing" if expected else ""
    for origin, reason in damaged:
        yield origin, None, reason + missing


def _hf_rows(path: str, name: str):
    repo, _, split = path[len(HF_PREFIX):].partition(":")
    try:
        import datasets

        ds = datasets.load_dataset(repo, split=split or "train", streaming=True)
        for i, row in enumerate(ds, 1):
            yield f"{name}:row {i}", row, None
    except Exception as exc:
        raise ConfigError(
            f"{path}: could not load '{repo}' from the Hugging Face hub ({type(exc).__name__}: "
            f"{str(exc)[:200]}). Without network access, download it elsewhere and point "
            f"'path:' at a local copy (jsonl, parquet or a save_to_disk directory).") from None
