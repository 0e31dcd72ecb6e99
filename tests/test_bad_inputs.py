"""Never destroy data, never die on one row: inputs that are damaged, odd or ambiguous.

A. origins identify the file uniquely (same basename in two folders, a file listed
   twice, a curate output read back alone or beside other inputs);
B. rows that used to crash the run (JSON nested thousands deep, lone surrogates) are
   dead letters, and a UTF-8 BOM is not;
C. damaged files: a one-line ConfigError naming the file, or a dead-letter row that says
   how much was lost, with the counts still adding up;
D. shape detection says what is wrong (empty, not gzip, a JSON array, unreadable, not
   UTF-8, all rows malformed); an empty file in a glob is skipped and listed.
"""

import codecs
import gzip
import json
import logging
import os

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate import cli
from curate.config import ConfigError, InputConfig, parse_job
from curate.inputs import files as readers
from curate.pipeline.run import run_job
from curate.inputs.files import iter_rows, plan_inputs, task_records


def qa(i, answer=None):
    return {"question": f"Question number {i}?", "answer": answer or f"Answer {i}."}


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def read_tasks(tasks):
    recs, dead = [], []
    for task in tasks:
        for rec, bad in task_records(task):  # reading, adapting and validation, as the pipeline
            (recs.append(rec) if bad is None else dead.append(bad))
    return recs, dead


def read_all(*paths, **kw):
    return read_tasks(plan_inputs([InputConfig(path=str(p), **kw) for p in paths], max_chars=100_000))


def run(tmp_path, inputs, budget=1000, out="out"):
    return run_job(parse_job({"inputs": [str(p) for p in inputs], "output": str(tmp_path / out),
                              "selectors": [{"type": "random", "budget": budget, "seed": 0}]}))


def dead_letters(out_dir):
    path = out_dir / "dead_letter.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def assert_counts_add_up(counts):
    assert counts["read"] == counts["invalid"] + counts["examples"]
    assert counts["dead_letter_rows_written"] == counts["invalid"]


# ---------------------------------------------------------------- A. origins


def test_same_basename_in_two_folders_gets_distinct_origins(tmp_path):
    for folder in ("a", "b"):
        write_jsonl(tmp_path / folder / "x.jsonl", [qa(i) for i in range(3)])
    tasks = plan_inputs([InputConfig(path=str(tmp_path / "*" / "x.jsonl"))], 1000)
    assert [t.name for t in tasks] == ["a/x.jsonl", "b/x.jsonl"]
    recs, _ = read_tasks(tasks)
    assert [r["origin"] for r in recs] == [f"{f}/x.jsonl:{i}" for f in "ab" for i in (1, 2, 3)]
    pairs = [(r["id"], r["origin"]) for r in recs]
    assert len(set(pairs)) == len(pairs) == 6


def test_same_rows_in_two_folders_keep_exactly_the_budget(tmp_path):
    # identical files: equal ids, so only the origin breaks the selector's ties
    paths = [write_jsonl(tmp_path / f / "x.jsonl", [qa(i) for i in range(10)]) for f in ("a", "b")]
    m = run(tmp_path, paths, budget=5)
    assert m["counts"]["kept"] == 5
    kept = datasets.load_from_disk(str(tmp_path / "out"))
    assert len(kept) == 5 and len(set(zip(kept["id"], kept["origin"]))) == 5


def test_inputs_in_one_folder_keep_the_basename(tmp_path):
    write_jsonl(tmp_path / "d" / "p1.jsonl", [qa(1)])
    write_jsonl(tmp_path / "d" / "p2.jsonl", [qa(2)])
    tasks = plan_inputs([InputConfig(path=str(tmp_path / "d" / "p*.jsonl"))], 1000)
    assert [t.name for t in tasks] == ["p1.jsonl", "p2.jsonl"]
    (single,) = plan_inputs([InputConfig(path=str(tmp_path / "d" / "p1.jsonl"))], 1000)
    assert single.name == "p1.jsonl"
    # a deeper tree: relative to the common parent, whatever the depth
    write_jsonl(tmp_path / "d" / "sub" / "deep" / "p1.jsonl", [qa(3)])
    tasks = plan_inputs([InputConfig(path=str(tmp_path / "d" / "p1.jsonl")),
                         InputConfig(path=str(tmp_path / "d" / "sub" / "deep" / "p1.jsonl"))], 1000)
    assert [t.name for t in tasks] == ["p1.jsonl", "sub/deep/p1.jsonl"]


def test_object_store_paths_are_named_relative_to_their_common_parent():
    names = readers._origin_names
    assert names(["gs://b/data/a/x.jsonl", "gs://b/data/b/x.jsonl"]) == ["a/x.jsonl", "b/x.jsonl"]
    assert names(["gs://b/data/x.jsonl"]) == ["x.jsonl"]
    assert names(["gs://b/one/x.jsonl", "gs://c/one/x.jsonl"]) == ["b/one/x.jsonl", "c/one/x.jsonl"]
    # nothing in common: the whole path, still unique
    assert names(["gs://b/x.jsonl", "/data/x.jsonl"]) == ["gs://b/x.jsonl", "/data/x.jsonl"]
    assert names(["hf://org/set:train", "/data/x.jsonl"]) == ["hf://org/set:train", "x.jsonl"]


def test_a_file_listed_twice_is_read_once(tmp_path, monkeypatch, caplog):
    path = write_jsonl(tmp_path / "x.jsonl", [qa(i) for i in range(4)])
    write_jsonl(tmp_path / "y.jsonl", [qa(9)])
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.WARNING):
        tasks = plan_inputs([InputConfig(path=path), InputConfig(path=str(tmp_path / "*.jsonl")),
                             InputConfig(path="x.jsonl"), InputConfig(path="./x.jsonl")], 1000)
    assert [t.name for t in tasks] == ["x.jsonl", "y.jsonl"]
    assert "listed more than once" in caplog.text
    recs, _ = read_tasks(tasks)
    assert len(recs) == 5


def test_curate_output_keeps_its_origins_alone_and_is_prefixed_beside_others(tmp_path):
    write_jsonl(tmp_path / "x.jsonl", [qa(i) for i in range(4)])
    run(tmp_path, [tmp_path / "x.jsonl"], out="first")
    alone, _ = read_all(tmp_path / "first")
    assert sorted(r["origin"] for r in alone) == [f"x.jsonl:{i}" for i in (1, 2, 3, 4)]
    # read back beside the file it came from: the rows are equal, the origins must not be
    recs, _ = read_all(tmp_path / "first", tmp_path / "x.jsonl")
    assert sorted(r["origin"] for r in recs) == sorted(
        [f"first:x.jsonl:{i}" for i in (1, 2, 3, 4)] + [f"x.jsonl:{i}" for i in (1, 2, 3, 4)])
    # two curate outputs of the same rows
    run(tmp_path, [tmp_path / "x.jsonl"], out="second")
    m = run(tmp_path, [tmp_path / "first", tmp_path / "second"], budget=3, out="both")
    assert m["counts"]["examples"] == 8 and m["counts"]["kept"] == 3
    kept = datasets.load_from_disk(str(tmp_path / "both"))
    assert all(o.startswith(("first:x.jsonl:", "second:x.jsonl:")) for o in kept["origin"])


# ---------------------------------------------------------------- B. rows that crashed


def test_json_nested_thousands_deep_is_a_dead_letter(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    lines = [json.dumps(qa(0)),
             '{"question": "Q", "answer": ' + deep + "}",
             deep,
             '{"question": ' + "[" * 990 + "]" * 990 + ', "answer": "A"}',  # near the limit
             '{"question": "Q", "answer": "A", "meta": ' + '{"a": ' * 5000 + "1" + "}" * 5000 + "}",
             json.dumps(qa(5))]
    path = tmp_path / "deep.jsonl"
    path.write_text("\n".join(lines) + "\n")
    recs, dead = read_all(path)
    assert [r["origin"] for r in recs] == ["deep.jsonl:1", "deep.jsonl:6"]
    reasons = {d["origin"]: d["reason"] for d in dead}
    assert reasons["deep.jsonl:2"] == reasons["deep.jsonl:3"] == reasons["deep.jsonl:5"] == \
        "JSON nested too deeply"
    assert "deep.jsonl:4" in reasons  # a dead letter, whatever the reason, not a crash
    assert len(recs) + len(dead) == len(lines)


def test_deep_json_document_is_a_clear_error(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ConfigError, match=r"deep.json: JSON nested too deeply"):
        plan_inputs([InputConfig(path=str(path))], 1000)


@pytest.mark.parametrize("row, field", [
    ('{"instruction": "I", "output": "bad \\ud800 text"}', "output"),
    ('{"instruction": "I \\udfff", "output": "O"}', "instruction"),
    ('{"question": "Q", "answer": "\\udc80"}', "answer"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x\\ud83d"}]}',
     "messages[1].content"),
    ('{"instruction": "I", "outputs": ["fine", "lone \\ud800"]}', "outputs[1]"),
    ('{"instruction": "I", "outputs": ["a", "b"], "generators": ["m", "\\ud800"]}', "generators[1]"),
])
def test_lone_surrogate_is_a_dead_letter_naming_the_field(tmp_path, row, field):
    path = tmp_path / "s.jsonl"
    path.write_text(row + "\n")
    adapter = records_adapter(row)
    recs, dead = read_all(path, adapter=adapter)
    assert recs == []
    (d,) = dead
    assert d["origin"] == "s.jsonl:1"
    assert d["reason"].startswith(f"field '{field}' contains a lone surrogate (\\u")
    assert d["reason"].endswith("), not valid Unicode")


def records_adapter(row: str) -> str:
    from curate import records

    return records.detect_adapter(json.loads(row), {}).name


def test_lone_surrogate_in_a_whole_run_and_a_pair_is_fine(tmp_path):
    rows = [qa(0), '{"question": "Q1", "answer": "\\ud800"}',
            '{"question": "Q2", "answer": "smile \\ud83d\\ude00"}',  # an escaped pair: one emoji
            qa(3)]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    m = run(tmp_path, [path])
    assert_counts_add_up(m["counts"])
    assert (m["counts"]["invalid"], m["counts"]["kept"]) == (1, 3)
    (d,) = dead_letters(tmp_path / "out")
    assert d["origin"] == "in.jsonl:2"
    assert d["reason"] == "field 'answer' contains a lone surrogate (\\ud800), not valid Unicode"
    kept = datasets.load_from_disk(str(tmp_path / "out"))
    assert "smile \U0001F600" in kept["response"]


def test_utf8_bom_does_not_cost_the_first_row(tmp_path):
    bom = codecs.BOM_UTF8
    body = "".join(json.dumps(qa(i)) + "\n" for i in range(3)).encode()
    (tmp_path / "b.jsonl").write_bytes(bom + body)
    (tmp_path / "b2.jsonl.gz").write_bytes(gzip.compress(bom + body))
    (tmp_path / "b3.json").write_bytes(bom + json.dumps([qa(i) for i in range(3)]).encode())
    for name in ("b.jsonl", "b2.jsonl.gz", "b3.json"):
        (task,) = plan_inputs([InputConfig(path=str(tmp_path / name))], 1000)
        assert task.adapter == "qa", name  # detected from the first row, BOM and all
        recs, dead = read_tasks([task])
        assert [r["prompt"] for r in recs] == [f"Question number {i}?" for i in range(3)], name
        assert not dead, name
    # two such files concatenated: the second BOM starts line 4
    (tmp_path / "cat.jsonl").write_bytes(bom + body + bom + body)
    recs, dead = read_all(tmp_path / "cat.jsonl")
    assert len(recs) == 6 and not dead


# ---------------------------------------------------------------- C. damaged files


def write_parquet(path, n=680, row_group_size=128):
    rows = [{"question": f"Question {i}", "answer": f"answer number {i} " * 3} for i in range(n)]
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
    return path


def damage_row_group(path, group):
    md = pq.ParquetFile(path).metadata
    offset = md.row_group(group).column(0).data_page_offset
    data = bytearray(path.read_bytes())
    data[offset:offset + 40] = b"\xff" * 40
    path.write_bytes(bytes(data))


def test_parquet_damaged_midway_says_how_many_rows_are_lost(tmp_path):
    path = write_parquet(tmp_path / "p.parquet")
    damage_row_group(path, 4)  # rows 513..640
    recs, dead = read_all(path)
    assert len(recs) == 512
    (d,) = dead
    assert d["origin"] == "p.parquet:row 513"
    assert d["reason"].startswith("file damaged after row 512: 168 of 680 rows lost (")
    # a later group: only its rows and the ones after it are lost
    path2 = write_parquet(tmp_path / "q.parquet", n=300, row_group_size=100)
    damage_row_group(path2, 2)
    recs, dead = read_all(path2)
    assert len(recs) == 200 and dead[0]["reason"].startswith("file damaged after row 200: 100 of 300")


def test_parquet_damaged_midway_in_a_whole_run_counts_add_up(tmp_path):
    path = write_parquet(tmp_path / "p.parquet", n=300, row_group_size=100)
    damage_row_group(path, 1)
    m = run(tmp_path, [path], budget=50)
    c = m["counts"]
    assert_counts_add_up(c)
    assert (c["read"], c["invalid"], c["examples"], c["kept"]) == (101, 1, 100, 50)
    (d,) = dead_letters(tmp_path / "out")
    assert "200 of 300 rows lost" in d["reason"]


@pytest.mark.parametrize("adapter", ["auto", "qa"])
def test_truncated_or_bogus_parquet_is_a_one_line_error(tmp_path, adapter):
    path = write_parquet(tmp_path / "t.parquet")
    path.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(ConfigError, match=r"t.parquet: unreadable Parquet file: .*magic bytes") as err:
        plan_inputs([InputConfig(path=str(path), adapter=adapter)], 1000)
    assert "\n" not in str(err.value)
    (tmp_path / "text.parquet").write_text("not parquet at all\n")
    with pytest.raises(ConfigError, match=r"text.parquet: unreadable Parquet file"):
        plan_inputs([InputConfig(path=str(tmp_path / "text.parquet"), adapter=adapter)], 1000)
    # a damaged first row group: nothing is readable
    first = write_parquet(tmp_path / "first.parquet")
    damage_row_group(first, 0)
    with pytest.raises(ConfigError, match=r"first.parquet: file damaged after row 0: 680 of 680 rows lost"):
        plan_inputs([InputConfig(path=str(first), adapter=adapter)], 1000)


def test_cli_prints_one_line_and_exits_2_for_an_unreadable_input(tmp_path, capsys):
    path = write_parquet(tmp_path / "t.parquet")
    path.write_bytes(path.read_bytes()[:3000])
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps({"inputs": [str(path)], "output": str(tmp_path / "out"),
                               "selectors": [{"type": "random", "budget": 5}]}))
    assert cli.main(["run", str(job)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("curate: error")]
    assert len(err) == 1 and "t.parquet" in err[0] and "unreadable Parquet file" in err[0]
    assert not (tmp_path / "out").exists()


def save_dir(path, n=300, shards=3):
    datasets.Dataset.from_list([qa(i) for i in range(n)]).save_to_disk(str(path), num_shards=shards)
    return path


def test_corrupt_arrow_shard_is_a_dead_letter_and_later_shards_are_read(tmp_path):
    d = save_dir(tmp_path / "ds")
    shard = d / "data-00001-of-00003.arrow"
    shard.write_bytes(shard.read_bytes()[:-200])  # cut inside the shard's last batch
    recs, dead = read_all(d)
    assert len(recs) == 200  # shards 0 and 2 whole; shard 1's single batch is lost
    (x,) = dead
    assert x["origin"] == "ds/data-00001-of-00003.arrow:row 1"
    assert x["reason"].startswith("shard data-00001-of-00003.arrow damaged after 0 of its rows")
    assert "dataset_info" not in x["reason"]  # no row count recorded: none claimed
    # with the row count in dataset_info.json, the reason says how many are missing
    info = json.loads((d / "dataset_info.json").read_text())
    info["splits"] = {"train": {"name": "train", "num_examples": 300}}
    (d / "dataset_info.json").write_text(json.dumps(info))
    _, dead = read_all(d)
    assert dead[0]["reason"].endswith("; 100 of the 300 rows in dataset_info.json are missing")


def test_corrupt_arrow_shards_of_several_kinds(tmp_path):
    d = save_dir(tmp_path / "ds", n=400, shards=4)
    (d / "data-00000-of-00004.arrow").write_bytes(b"garbage" * 20)  # not Arrow at all
    (d / "data-00002-of-00004.arrow").unlink()  # listed in state.json, gone
    recs, dead = read_all(d, adapter="qa")
    assert len(recs) == 200
    reasons = {x["origin"]: x["reason"] for x in dead}
    assert set(reasons) == {"ds/data-00000-of-00004.arrow:row 1", "ds/data-00002-of-00004.arrow:row 1"}
    assert all("damaged after 0 of its rows" in r for r in reasons.values())
    m = run(tmp_path, [d], budget=10)
    assert_counts_add_up(m["counts"])
    assert (m["counts"]["invalid"], m["counts"]["examples"]) == (2, 200)


def test_unreadable_save_to_disk_directory_is_a_one_line_error(tmp_path):
    d = save_dir(tmp_path / "ds", n=10, shards=1)
    (d / "data-00000-of-00001.arrow").write_bytes(b"\x00" * 10)
    with pytest.raises(ConfigError, match=r"ds: none of the first 1 rows can be read.*damaged after 0"):
        plan_inputs([InputConfig(path=str(d))], 1000)
    (d / "state.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"ds/state.json: unreadable \(JSONDecodeError"):
        plan_inputs([InputConfig(path=str(d))], 1000)
    (d / "state.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"ds/state.json: no list of data files"):
        plan_inputs([InputConfig(path=str(d), adapter="curate")], 1000)


def test_truncated_gzip_after_rows_is_a_dead_letter_with_counts(tmp_path):
    data = gzip.compress("".join(json.dumps(qa(i)) + "\n" for i in range(2000)).encode())
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    m = run(tmp_path, [path], budget=5)
    assert_counts_add_up(m["counts"])
    (d,) = dead_letters(tmp_path / "out")
    assert d["reason"].startswith("file unreadable after line ")
    assert m["counts"]["examples"] > 0 and m["counts"]["invalid"] == 1


# ---------------------------------------------------------------- D. what detection says


@pytest.mark.parametrize("name, data", [
    ("zero.jsonl", b""),
    ("blank.jsonl", b"\n\n   \n\r\n"),
    ("zero.jsonl.gz", b""),
    ("blank.jsonl.gz", gzip.compress(b"\n\n")),
    ("zero.json", b""),
    ("list.json", b"[]"),
    ("zero.parquet", b""),
])
def test_an_empty_file_alone_is_a_clear_error(tmp_path, name, data):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(ConfigError, match=rf"every input file is empty: .*{name}"):
        plan_inputs([InputConfig(path=str(tmp_path / name))], 1000)


def test_an_empty_file_in_a_glob_is_skipped_and_listed(tmp_path, caplog):
    write_jsonl(tmp_path / "part0.jsonl", [qa(0), qa(1)])
    (tmp_path / "part1.jsonl").write_bytes(b"")
    (tmp_path / "part2.jsonl").write_text("\n\n")
    write_jsonl(tmp_path / "part3.jsonl", [qa(3)])
    with caplog.at_level(logging.WARNING):
        plan = plan_inputs([InputConfig(path=str(tmp_path / "part*.jsonl"))], 1000)
    assert [t.name for t in plan] == ["part0.jsonl", "part3.jsonl"]
    assert plan.empty_files == [str(tmp_path / "part1.jsonl"), str(tmp_path / "part2.jsonl")]
    assert "part1.jsonl" in caplog.text and "part2.jsonl" in caplog.text
    m = run(tmp_path, [tmp_path / "part*.jsonl"], budget=2)
    assert (m["counts"]["examples"], m["counts"]["kept"]) == (3, 2)
    assert [os.path.basename(p) for p in m["plan"]["empty_inputs"]] == ["part1.jsonl", "part2.jsonl"]
    # with an explicit adapter the file is not read for its shape, but still skipped
    plan = plan_inputs([InputConfig(path=str(tmp_path / "part*.jsonl"), adapter="qa")], 1000)
    assert len(plan) == 2 and len(plan.empty_files) == 2
    # every matched file empty: nothing to do
    with pytest.raises(ConfigError, match="every input file is empty"):
        plan_inputs([InputConfig(path=str(tmp_path / "part[12].jsonl"))], 1000)


def test_gz_that_is_not_gzip(tmp_path):
    path = write_jsonl(tmp_path / "plain.jsonl.gz", [qa(0)])
    with pytest.raises(ConfigError, match=r"plain.jsonl.gz: not a gzip file, though its name ends in .gz"):
        plan_inputs([InputConfig(path=path)], 1000)
    with pytest.raises(ConfigError, match=r"not a gzip file"):
        plan_inputs([InputConfig(path=path, adapter="qa")], 1000)


@pytest.mark.parametrize("text", [
    json.dumps([qa(0), qa(1)]),                   # on one line
    json.dumps([qa(0), qa(1)], indent=2),         # pretty-printed
    "\n" + json.dumps([qa(0)], indent=1),         # after a blank line
])
def test_json_array_in_a_jsonl_file_suggests_format_json(tmp_path, text):
    path = tmp_path / "arr.jsonl"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError, match=r"arr.jsonl: holds a JSON array, not JSON Lines.*format: json"):
        plan_inputs([InputConfig(path=str(path))], 1000)
    (task,) = plan_inputs([InputConfig(path=str(path), format="json")], 1000)
    assert task.adapter == "qa"


def test_permission_error_names_the_file(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "locked.jsonl", [qa(0)])
    real_open = readers.FileSystems.open

    def deny(p, *a, **kw):
        if p.endswith("locked.jsonl"):
            raise PermissionError(13, "Permission denied", p)
        return real_open(p, *a, **kw)

    monkeypatch.setattr(readers.FileSystems, "open", deny)
    with pytest.raises(ConfigError, match=r"locked.jsonl: file unreadable: PermissionError"):
        plan_inputs([InputConfig(path=path)], 1000)
    with pytest.raises(ConfigError, match=r"locked.jsonl: file unreadable: PermissionError"):
        plan_inputs([InputConfig(path=path, adapter="qa")], 1000)


def test_invalid_utf8_file_says_so(tmp_path):
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes("".join(json.dumps(qa(i, "réponse"), ensure_ascii=False) + "\n"
                               for i in range(60)).encode("latin-1"))
    utf16 = tmp_path / "utf16.jsonl"
    utf16.write_bytes("".join(json.dumps(qa(i)) + "\n" for i in range(3)).encode("utf-16"))
    for path in (latin1, utf16):
        with pytest.raises(ConfigError, match=rf"{path.name}: none of the first \d+ rows can be read.*"
                                              rf"{path.name}:1: invalid UTF-8 at byte \d+ \(is the file UTF-8 text\?\)"):
            plan_inputs([InputConfig(path=str(path))], 1000)


def test_all_malformed_first_rows_show_the_first_reason(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", ['{"question": "Q", '] + ["{oops"] * 60 + [qa(0)])
    with pytest.raises(ConfigError, match=r"bad.jsonl: none of the first 50 rows can be read, so the shape "
                                          r"cannot be detected; the first, bad.jsonl:1: malformed JSON"):
        plan_inputs([InputConfig(path=path)], 1000)
    scalars = write_jsonl(tmp_path / "scalars.jsonl", ["1", '"text"', "null"])
    with pytest.raises(ConfigError, match=r"the first, scalars.jsonl:1: row is int, expected a JSON object"):
        plan_inputs([InputConfig(path=scalars)], 1000)
    # fewer than 50 bad rows before a good one: detected, the bad ones are dead letters
    path = write_jsonl(tmp_path / "some.jsonl", ["{oops"] * 10 + [qa(0)])
    recs, dead = read_all(path)
    assert len(recs) == 1 and len(dead) == 10


def test_iter_rows_still_works_without_a_plan(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [qa(0), "{bad"])
    assert [(o, e is None) for o, _, e in iter_rows(str(path), "jsonl")] == [("x.jsonl:1", True),
                                                                             ("x.jsonl:2", False)]
    assert [o for o, _, _ in iter_rows(str(path), "jsonl", name="a/x.jsonl")] == ["a/x.jsonl:1", "a/x.jsonl:2"]
