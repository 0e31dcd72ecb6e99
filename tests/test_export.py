"""A curate output read by the usual tools: `datasets.load_dataset("arrow")` on its
shards, and `curate export` to JSONL / Parquet read back with pandas, pyarrow and
`datasets` (polars is not installed: its runtime wheel is 54 MB)."""

import json
import math
import os

import apache_beam as beam
import datasets
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from curate import export
from curate.cli import main
from curate.config import parse_job
from curate.pipeline.run import run_job


def _rows():
    """Messages rows with system turns, several turns, unicode, quotes and newlines."""
    rows = []
    for i in range(24):
        messages = [{"role": "user", "content": f"Question {i}: what is {i} + {i}?\nShow \"work\"."},
                    {"role": "assistant", "content": f"{i} + {i} = {2 * i}. ✓ – naïve"}]
        if i % 3 == 0:
            messages.insert(0, {"role": "system", "content": "You are terse."})
        if i % 4 == 1:
            messages = messages + [{"role": "user", "content": "And doubled?"},
                                   {"role": "assistant", "content": f"{4 * i}"}]
        rows.append({"messages": messages, **({"generator": f"model-{i % 2}"} if i % 5 else {})})
    return rows


def _make_output(tmp_path, name, budget, shard_rows=2):
    src = tmp_path / f"{name}.jsonl"
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in _rows()), encoding="utf-8")
    out = tmp_path / name
    run_job(parse_job({"inputs": [str(src)], "output": str(out), "shard_rows": shard_rows,
                       "selectors": [{"type": "random", "budget": budget, "seed": 0}]}))
    return out


@pytest.fixture(scope="module")
def output(tmp_path_factory):
    """12 kept rows in 6 shards (at least one of them empty), 12 rejected."""
    return _make_output(tmp_path_factory.mktemp("export"), "out", budget=12)


def _plain(value):
    """pandas' cells back to plain Python: arrays -> lists, NaN -> None."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, np.generic):
        return value.item()
    return value


def _records(df: pd.DataFrame) -> list[dict]:
    return [{k: _plain(v) for k, v in row.items()} for row in df.to_dict("records")]


def _export(out, *args):
    return main(["export", str(out), *args])


# ------------------------------------------------------------ the shards themselves

def test_load_dataset_arrow_reads_the_shards(output, tmp_path):
    kept = datasets.load_from_disk(str(output))
    shards = sorted(output.glob("data-*.arrow"))
    sizes = [datasets.Dataset.from_file(str(p)).num_rows for p in shards]
    assert len(shards) == 6 and 0 in sizes and sum(sizes) == len(kept) == 12  # an empty shard too
    for data_files in (str(output / "data-*.arrow"), [str(p) for p in shards]):
        ds = datasets.load_dataset("arrow", data_files=data_files, split="train", cache_dir=str(tmp_path / "cache"))
        assert ds.features == kept.features and ds.column_names == kept.column_names
        assert ds.to_list() == kept.to_list()
    rejected = datasets.load_from_disk(str(output / "rejected"))
    ds = datasets.load_dataset("arrow", data_files=str(output / "rejected" / "data-*.arrow"), split="train",
                               cache_dir=str(tmp_path / "cache"))
    assert ds.features == rejected.features and ds.to_list() == rejected.to_list()
    assert {"reject_stage", "reject_reason"} <= set(ds.column_names)


# ------------------------------------------------------------ export

def test_jsonl_export_reads_back_with_pandas_and_datasets(output, tmp_path, capsys):
    to = tmp_path / "x"
    assert _export(output, "--format", "jsonl", "--to", str(to)) == 0
    assert "data.jsonl  12 rows, 9 columns" in capsys.readouterr().out
    assert sorted(os.listdir(to)) == ["data.jsonl"]
    kept = datasets.load_from_disk(str(output)).to_list()
    df = pd.read_json(to / "data.jsonl", lines=True, dtype=False, precise_float=True)
    assert list(df.columns) == datasets.load_from_disk(str(output)).column_names
    assert _records(df) == kept
    assert any(r["messages"][0]["role"] == "system" for r in kept) and any(len(r["messages"]) == 4 for r in kept)
    assert all(set(m) == {"role", "content"} for r in kept for m in r["messages"])
    lines = (to / "data.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == kept and "✓" in lines[0]  # UTF-8, not \u escapes
    ds = datasets.load_dataset("json", data_files=str(to / "data.jsonl"), split="train",
                               cache_dir=str(tmp_path / "cache"))
    assert ds.to_list() == kept


def test_parquet_export_reads_back_with_pandas_pyarrow_and_datasets(output, tmp_path, monkeypatch):
    monkeypatch.setattr(export, "ROW_GROUP_BYTES", 1)  # a row group per record batch: streamed
    to = tmp_path / "x"
    assert _export(output, "--format", "parquet", "--to", str(to)) == 0
    kept_ds = datasets.load_from_disk(str(output))
    kept = kept_ds.to_list()
    path = to / "data.parquet"
    assert pq.ParquetFile(path).metadata.num_row_groups > 1
    assert pq.read_table(path).to_pylist() == kept
    assert _records(pd.read_parquet(path)) == kept
    ds = datasets.load_dataset("parquet", data_files=str(path), split="train", cache_dir=str(tmp_path / "cache"))
    assert ds.features == kept_ds.features and ds.to_list() == kept


def test_columns_and_rejected(output, tmp_path):
    to = tmp_path / "x"
    assert _export(output, "--format", "parquet", "--to", str(to), "--columns", "messages, id",
                   "--rejected") == 0
    assert sorted(os.listdir(to)) == ["data.parquet", "rejected.parquet"]
    kept = datasets.load_from_disk(str(output))
    df = pd.read_parquet(to / "data.parquet")
    assert list(df.columns) == ["messages", "id"]
    assert _records(df) == [{"messages": r["messages"], "id": r["id"]} for r in kept.to_list()]
    ds = datasets.load_dataset("parquet", data_files=str(to / "data.parquet"), split="train",
                               cache_dir=str(tmp_path / "cache"))
    assert ds.features == datasets.Features({"messages": kept.features["messages"], "id": kept.features["id"]})
    rejected = datasets.load_from_disk(str(output / "rejected"))
    rdf = pd.read_parquet(to / "rejected.parquet")
    assert _records(rdf) == [{"messages": r["messages"], "id": r["id"]} for r in rejected.to_list()]

    to = tmp_path / "y"
    assert _export(output, "--format", "jsonl", "--to", str(to), "--rejected") == 0
    df = pd.read_json(to / "rejected.jsonl", lines=True, dtype=False, precise_float=True)
    assert _records(df) == rejected.to_list() and set(df["reject_stage"]) == {"select:random"}


def test_default_destination_and_overwrite(tmp_path, capsys):
    out = _make_output(tmp_path, "run", budget=4, shard_rows=50)
    dest = tmp_path / "run-export"
    assert _export(out, "--format", "jsonl") == 0
    assert sorted(os.listdir(dest)) == ["data.jsonl"]
    # an existing non-empty destination: refused, untouched; --overwrite replaces only our file
    (dest / "notes.txt").write_text("mine")
    before = (dest / "data.jsonl").read_bytes()
    assert _export(out, "--format", "jsonl", "--columns", "id") == 2
    assert "not empty" in capsys.readouterr().err and (dest / "data.jsonl").read_bytes() == before
    assert _export(out, "--format", "jsonl", "--columns", "id", "--overwrite") == 0
    assert sorted(os.listdir(dest)) == ["data.jsonl", "notes.txt"] and (dest / "notes.txt").read_text() == "mine"
    assert [set(json.loads(l)) for l in (dest / "data.jsonl").read_text().splitlines()] == [{"id"}] * 4
    # a file where the directory would go
    (tmp_path / "afile").write_text("x")
    assert _export(out, "--format", "jsonl", "--to", str(tmp_path / "afile")) == 2
    assert "existing file" in capsys.readouterr().err and (tmp_path / "afile").read_text() == "x"
    # an empty directory is fine without --overwrite
    (tmp_path / "empty").mkdir()
    assert _export(out, "--format", "parquet", "--to", str(tmp_path / "empty")) == 0


def test_empty_selection_exports_empty_files(tmp_path):
    out = _make_output(tmp_path, "none", budget=0)
    assert _export(out, "--format", "parquet", "--to", str(tmp_path / "p")) == 0
    table = pq.read_table(tmp_path / "p" / "data.parquet")
    assert table.num_rows == 0 and table.column_names == datasets.load_from_disk(str(out)).column_names
    assert _export(out, "--format", "jsonl", "--to", str(tmp_path / "j")) == 0
    assert (tmp_path / "j" / "data.jsonl").read_bytes() == b""


def test_errors_are_one_clear_line(output, tmp_path, capsys):
    def error(*args):
        assert _export(*args) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("curate: error: ") and "\n" not in err
        return err

    err = error(output, "--format", "jsonl", "--to", str(tmp_path / "a"), "--columns", "id,nope,also_not")
    assert "unknown column(s) nope, also_not" in err
    assert "available: id, prompt_id, source, origin, prompt, response, messages, generator" in err
    err = error(output, "--format", "jsonl", "--to", str(tmp_path / "a"), "--columns", "reject_reason",
                "--rejected")
    assert "unknown column(s) reject_reason" in err and "kept rows" in err  # only the rejected rows have it
    assert not (tmp_path / "a").exists()  # nothing written on a refusal

    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "data.arrow").write_text("x")
    assert "is not a curate output (no readable manifest.json)" in error(tmp_path / "plain", "--format", "jsonl")
    assert "no such directory" in error(tmp_path / "missing", "--format", "jsonl")
    assert "lies inside the curate output" in error(output, "--format", "jsonl", "--to", str(output / "x"))
    assert "is the curate output" in error(output, "--format", "jsonl", "--to", str(output))
    assert "contains the curate output" in error(output, "--format", "jsonl", "--to", str(output.parent),
                                                 "--overwrite")
    assert "named twice" in error(output, "--format", "jsonl", "--to", str(tmp_path / "a"), "--columns", "id,id")
    assert not (tmp_path / "a").exists()


def test_json_has_no_nan():
    assert export._json_line({"a": float("nan"), "b": [{"c": float("inf")}], "d": 1.5}) == \
        '{"a": null, "b": [{"c": null}], "d": 1.5}'


def test_an_export_never_replaces_one_of_the_outputs_inputs(tmp_path, capsys, monkeypatch):
    """What `curate run` refuses, export refuses, whatever the flags: the input file, its
    folder, a scores directory, also through a relative path recorded from another cwd."""
    out = _make_output(tmp_path, "run", budget=4)
    src = tmp_path / "run.jsonl"
    before = src.read_bytes()
    for to in (src, src / "sub"):
        assert _export(out, "--format", "jsonl", "--to", str(to), "--overwrite") == 2
        err = capsys.readouterr().err
        assert "input" in err and "\n" not in err.strip()
    assert src.is_file() and src.read_bytes() == before

    # a relative input path is the run's: the export from another directory still finds it
    monkeypatch.chdir(tmp_path)
    run_job(parse_job({"inputs": ["run.jsonl"], "output": "rel",
                       "selectors": [{"type": "random", "budget": 2, "seed": 0}]}))
    monkeypatch.chdir(tmp_path / "rel")
    assert _export(tmp_path / "rel", "--format", "jsonl", "--to", "../run.jsonl", "--overwrite") == 2
    assert "the input" in capsys.readouterr().err and src.read_bytes() == before

    # a selection from scores: the scores directory is an input of it
    assert main(["select", "--scores", str(out), "--method", "random", "--budget", "2",
                 "--output", str(tmp_path / "sel")]) == 0
    assert _export(tmp_path / "sel", "--format", "jsonl", "--to", str(out / "sub"), "--overwrite") == 2
    assert (out / "manifest.json").is_file() and not (out / "sub").exists()


def test_an_output_republished_while_it_is_read_fails_the_reader(tmp_path, monkeypatch, capsys):
    """Export, `curate select` and inspect see one published output's files or fail; they
    never return rows of the old and the new output together."""
    from curate.report import inspect

    out = _make_output(tmp_path, "run", budget=12, shard_rows=2)
    src = str(tmp_path / "run.jsonl")

    def republish():
        run_job(parse_job({"inputs": [src], "output": str(out), "shard_rows": 3,
                           "selectors": [{"type": "random", "budget": 5, "seed": 1}]}), progress=False)

    real_batches = export.iter_batches

    def batches_then_republish(paths):
        for i, batch in enumerate(real_batches(paths)):
            if i == 1:
                republish()
            yield batch

    monkeypatch.setattr(export, "iter_batches", batches_then_republish)
    assert _export(out, "--format", "jsonl", "--to", str(tmp_path / "x")) == 2
    err = capsys.readouterr().err.strip()
    assert "was replaced by another run while it was being read" in err and "\n" not in err
    assert not (tmp_path / "x").exists()  # nothing written, no temporary left
    monkeypatch.undo()

    # `curate select` from scores a run republishes while the selection reads them
    real_run = beam.Pipeline.run

    def run_after_republishing(self, *a, **k):
        monkeypatch.setattr(beam.Pipeline, "run", real_run)
        republish()
        return real_run(self, *a, **k)

    monkeypatch.setattr(beam.Pipeline, "run", run_after_republishing)
    assert main(["select", "--scores", str(out), "--method", "random", "--budget", "2",
                 "--output", str(tmp_path / "sel")]) == 2
    assert "was replaced" in capsys.readouterr().err and not (tmp_path / "sel").exists()

    real_load = inspect._load
    monkeypatch.setattr(inspect, "_load", lambda path: (republish(), real_load(path))[1])
    assert main(["inspect", str(out)]) == 2 and "was replaced" in capsys.readouterr().err


def test_a_killed_exports_temporaries_are_removed_by_the_next(output, tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    dest = tmp_path / "d"
    dest.mkdir()
    (dest / f".data.jsonl.tmp-{dead}-abcdef").write_text("half")
    (dest / f".data.jsonl.tmp-{os.getpid()}-abcdef").write_text("a live export's")
    assert _export(output, "--format", "jsonl", "--to", str(dest), "--overwrite") == 0
    assert sorted(os.listdir(dest)) == [f".data.jsonl.tmp-{os.getpid()}-abcdef", "data.jsonl"]
