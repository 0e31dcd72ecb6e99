import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.config import ConfigError, InputConfig
from curate.inputs.files import iter_rows, plan_inputs, task_records


def read_all(path, **kw):
    (task,) = plan_inputs([InputConfig(path=str(path), **kw)], max_chars=1000)
    recs, dead = [], []
    for rec, bad in task_records(task):  # reading, adapting and validation, as the pipeline
        (recs.append(rec) if bad is None else dead.append(bad))
    return recs, dead


BROKEN = [
    '{"question": "Q1", "answer": "A1"}',
    '{"question": "Q2", "answer": ',           # malformed JSON
    '',                                         # blank: skipped, not a row
    '{"question": "Q3"}',                       # missing field
    '{"question": "Q4", "answer": ""}',         # empty
    '{"question": "Q5", "answer": 7}',          # non-text
    '[1, 2]',                                   # not an object
    '{"question": "Q6", "answer": "' + "x" * 2000 + '"}',  # over-long (max_chars 1000)
    '{"question": "Q7", "answer": "A7"}',
]


def test_jsonl_dead_letter_names_line_and_reason(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(BROKEN) + "\n")
    recs, dead = read_all(path)
    assert [r["prompt"] for r in recs] == ["Q1", "Q7"]
    assert [r["origin"] for r in recs] == ["bad.jsonl:1", "bad.jsonl:9"]
    reasons = {d["origin"]: d["reason"] for d in dead}
    # the line is cut after 29 characters: the error is at its end, and the text goes along
    assert reasons["bad.jsonl:2"] == "malformed JSON: Expecting value at column 30"
    assert {d["origin"]: d["raw"] for d in dead}["bad.jsonl:2"] == BROKEN[1]
    assert reasons["bad.jsonl:4"] == "missing field 'answer'"
    assert reasons["bad.jsonl:5"] == "empty field 'answer'"
    assert reasons["bad.jsonl:6"] == "field 'answer' is int, expected text"
    assert reasons["bad.jsonl:7"] == "row is list, expected a JSON object"
    assert reasons["bad.jsonl:8"].startswith("over-long example")
    assert len(dead) == 6


@pytest.mark.parametrize("line, reason", [
    ('{"a": "bc', "Unterminated string starting at column 7"),  # json's message ends in "at"
    ('{"a": "b\x01"}', "Invalid control character at column 9"),
    ('{"a": 1} x', "Extra data at column 10"),
    ('{"a" 1}', "Expecting ':' delimiter at column 6")])
def test_malformed_json_reason_reads_as_a_sentence(tmp_path, line, reason):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    assert [error for _, _, error in iter_rows(str(path), "jsonl")] == [f"malformed JSON: {reason}"]


def test_invalid_utf8_and_truncated_gzip(tmp_path):
    path = tmp_path / "x.jsonl.gz"
    good = b'{"question": "Q", "answer": "A"}\n'
    data = gzip.compress(good + b'{"question": "\xff\xfe", "answer": "A"}\n' + good * 200)
    path.write_bytes(data[: len(data) - 20])  # cut the gzip stream short
    recs, dead = read_all(path)
    assert dead[0]["origin"] == "x.jsonl.gz:2" and "invalid UTF-8" in dead[0]["reason"]
    assert "file unreadable after line" in dead[-1]["reason"]
    assert len(recs) >= 1 and len(recs) + len(dead) >= 3


def test_json_array_parquet_and_arrow_dir(tmp_path):
    rows = [{"instruction": f"I{i}", "input": "", "output": f"O{i}"} for i in range(5)]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "arrowdir"))
    for name in ("a.json", "a.parquet", "arrowdir"):
        recs, dead = read_all(tmp_path / name)
        assert [r["response"] for r in recs] == [f"O{i}" for i in range(5)], name
        assert not dead


def test_globs_and_sources(tmp_path):
    for i in range(3):
        (tmp_path / f"part{i}.jsonl").write_text(json.dumps({"question": f"Q{i}", "answer": "A"}) + "\n")
    tasks = plan_inputs([InputConfig(path=str(tmp_path / "part*.jsonl"))], 1000)
    assert [t.source for t in tasks] == ["part0", "part1", "part2"]
    assert {t.adapter for t in tasks} == {"qa"}


def test_unknown_shape_is_a_clear_error(tmp_path):
    path = tmp_path / "odd.jsonl"
    path.write_text('{"text": "hello"}\n')
    with pytest.raises(ConfigError, match=r"odd.jsonl:1: unknown row shape; found fields \['text'\]"):
        plan_inputs([InputConfig(path=str(path))], 1000)


def test_missing_input_and_hub_offline(tmp_path):
    with pytest.raises(ConfigError, match="no file matches"):
        plan_inputs([InputConfig(path=str(tmp_path / "nope*.jsonl"))], 1000)
    with pytest.raises(ConfigError, match="could not load 'nobody/nothing' from the Hugging Face hub"):
        list(iter_rows("hf://nobody/nothing", "hf"))


def test_limit(tmp_path):
    path = tmp_path / "many.jsonl"
    path.write_text("".join(json.dumps({"question": f"Q{i}", "answer": "A"}) + "\n" for i in range(50)))
    recs, _ = read_all(path, limit=7)
    assert len(recs) == 7


def test_limit_prompts_keeps_every_response_to_the_first_prompts(tmp_path):
    # a pool sorted by generator, as alpaca_eval's is: the first prompts' other candidates
    # lie far down the file
    path = tmp_path / "pool.jsonl"
    rows = [{"instruction": f"P{p}", "output": f"{g} answers P{p}", "generator": g}
            for g in ("g1", "g2", "g3") for p in range(10)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    recs, dead = read_all(path, limit_prompts=4)
    assert sorted((r["prompt"], r["generator"]) for r in recs) == sorted(
        (f"P{p}", g) for p in range(4) for g in ("g1", "g2", "g3"))
    assert [d["origin"] for d in dead] == ["pool.jsonl:31"]  # read to the end: damage is reported
    # `limit` caps the rows read first: rows 1-12 answer P0-P9 (g1) and P0, P1 (g2)
    assert len(read_all(path, limit_prompts=4, limit=12)[0]) == 6


def test_limit_prompts_on_the_alpaca_eval_pool(shared_data):
    (task,) = plan_inputs([InputConfig(path=str(shared_data / "alpaca_eval_pool.jsonl.gz"), adapter="alpaca",
                                       limit_prompts=100)], max_chars=32_000)
    recs = [r for r, bad in task_records(task) if bad is None]
    with gzip.open(shared_data / "alpaca_eval_pool.jsonl.gz", "rt") as fh:
        raw = [json.loads(line) for line in fh]
    first = list(dict.fromkeys(r["instruction"] for r in raw))[:100]
    expected = {(r["instruction"], r["generator"]) for r in raw
                if r["instruction"] in set(first) and r["output"].strip()}  # an empty answer is a dead letter
    assert len(expected) >= 990
    assert sorted((r["prompt"], r["generator"]) for r in recs) == sorted(expected)


def test_vectors_read_back_as_arrays():
    """list<float> columns of a curate output (embeddings, trajectories) come back as NumPy
    arrays of their own float type; other columns as Python values."""
    import numpy as np
    import pyarrow as pa

    from curate.inputs.formats import batch_rows

    batch = pa.record_batch({"e": pa.array([[1.0, 2.0], None], type=pa.list_(pa.float32())),
                             "t": pa.array([[0.5], [1.5, 2.5]], type=pa.list_(pa.float64())),
                             "tags": pa.array([["a"], []], type=pa.list_(pa.string())), "s": ["x", "y"]})
    first, second = batch_rows(batch)
    assert first["e"].dtype == np.float32 and first["e"].tolist() == [1.0, 2.0] and second["e"] is None
    assert second["t"].dtype == np.float64 and second["t"].tolist() == [1.5, 2.5]
    assert first["tags"] == ["a"] and first["s"] == "x"
