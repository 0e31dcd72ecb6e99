"""Streamed steps and the streaming sink (curate.pipeline.streamed, curate.pipeline.sink):
the rows of a job whose steps all stream are read twice and never held, and what it
keeps is what an independent computation keeps; shards written through runs are the
same bytes however many runs there were."""

import hashlib
import json
import random
import re
import sys

import datasets
import pyarrow as pa
import pytest

from curate.config import parse_job
from curate.pipeline import graph, sink, streamed
from curate.pipeline.run import run_job
from curate.pipeline.plan import Plan, output_schema
from curate.records import ADAPTERS, adapt
from curate.selectors.shared.keys import hash_unit
from curate.filters.dedup import normalise


def pool(n=300, seed=0):
    """qa rows with exact copies (some re-cased or re-spaced), and some too short."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        u = rng.random()
        if rows and u < 0.2:
            src = rng.choice(rows)
            rows.append({"question": src["question"].upper() if u < 0.1 else "  " + src["question"],
                         "answer": src["answer"]})
        else:
            rows.append({"question": f"Question {i}: how much is {rng.randrange(10**6)}?",
                         "answer": "x" * rng.randrange(1, 40)})
    return rows


def _normalised(text):  # the dedup key's normalisation, written independently
    return re.sub(r"\s+", " ", text.strip().lower())


def test_normalise_is_the_regex_for_every_whitespace_character():
    spaces = [chr(c) for c in range(sys.maxunicode + 1) if re.fullmatch(r"\s", chr(c))]
    assert "\u00a0" in spaces and "\x1c" in spaces  # Unicode whitespace, not only ASCII
    rng = random.Random(0)
    for _ in range(2000):
        text = "".join(rng.choice(spaces + list("aBcÉ İ\u0130ß")) for _ in range(rng.randrange(20)))
        assert normalise(text) == _normalised(text), repr(text)


def reference(rows, min_chars, budget, seed):
    """The job [dedup, length >= min_chars, random budget] by hand: (kept ids, {stage: count})."""
    recs = [dict(adapt(r, ADAPTERS["qa"], {}, "pool")[0], origin=f"pool.jsonl:{i + 1}") for i, r in enumerate(rows)]
    groups = {}
    for r in recs:
        groups.setdefault("\x00".join(_normalised(m["content"]) for m in r["messages"]), []).append(r)
    firsts = [min(g, key=lambda r: (r["id"], r["origin"])) for g in groups.values()]
    long_enough = [r for r in firsts if len("\n".join(m["content"] for m in r["messages"])) >= min_chars]
    order = sorted(long_enough, key=lambda r: (hash_unit(seed, r), r["origin"], r["id"]))
    kept = order[:budget]
    return ({(r["id"], r["origin"]) for r in kept},
            {"filter:dedup": len(recs) - len(firsts), "filter:length": len(firsts) - len(long_enough),
             "select:random": len(long_enough) - len(kept)})


def test_a_streamed_job_keeps_what_an_independent_computation_keeps(tmp_path, monkeypatch):
    rows = pool()
    path = tmp_path / "pool.jsonl"
    # two lines that never become examples: the keys pass's read sends them to the dead letter
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{not json\n" + json.dumps({"question": "q"}) + "\n")
    monkeypatch.setattr(sink, "RUN_ROWS", 17)  # many runs per shard
    monkeypatch.setattr(streamed, "SPILL_ROWS", 23)  # many spill files
    spec = {"inputs": [str(path)], "output": str(tmp_path / "out"), "shard_rows": 40,
            "filters": [{"type": "dedup"}, {"type": "length", "min": 50}],
            "selectors": [{"type": "random", "budget": 50, "seed": 3}]}
    job = parse_job(spec)
    prefix = streamed.Streamed(Plan(job))
    assert len(prefix.steps) == 3 and prefix.rest == 0  # every step streams
    counts = run_job(job, progress=False)["counts"]
    assert (counts["read"], counts["invalid"], counts["dead_letter_rows_written"]) == (len(rows) + 2, 2, 2)
    dead = [json.loads(line) for line in (tmp_path / "out" / "dead_letter.jsonl").read_text().splitlines()]
    assert sorted(d["origin"] for d in dead) == [f"pool.jsonl:{len(rows) + 1}", f"pool.jsonl:{len(rows) + 2}"]
    assert not (tmp_path / "out" / streamed.SPILL).exists()  # working files are not published
    want_kept, want_counts = reference(rows, 50, 50, 3)
    assert all(want_counts.values())  # every step rejects some
    kept = datasets.load_from_disk(str(tmp_path / "out"))
    assert {(r["id"], r["origin"]) for r in kept} == want_kept
    assert {**counts["filtered"], **counts["not_selected"]} == want_counts
    rejected = datasets.load_from_disk(str(tmp_path / "out" / "rejected"))
    by_stage = {}
    for r in rejected:
        by_stage[r["reject_stage"]] = by_stage.get(r["reject_stage"], 0) + 1
    assert by_stage == want_counts
    # the random key on every row random saw, kept or not; none on rows rejected before it
    assert all(r["random_key"] is not None for r in kept)
    assert all((r["random_key"] is None) == (r["reject_stage"] != "select:random") for r in rejected)
    dup = next(r for r in rejected if r["reject_stage"] == "filter:dedup")
    assert dup["reject_reason"].startswith("duplicate of ")

    # the write pass reads the keys pass's spill; reading the inputs again instead writes
    # the same bytes
    front = graph._front
    monkeypatch.setattr(graph, "_front", lambda p, plan, progress_dir, spill_to=None: front(p, plan, progress_dir))
    again = run_job(parse_job({**spec, "output": str(tmp_path / "again")}), progress=False)["counts"]
    assert again == counts

    def shard_bytes(out):
        return {str(f.relative_to(out)): f.read_bytes() for f in sorted(out.rglob("*.arrow"))}

    assert shard_bytes(tmp_path / "again") == shard_bytes(tmp_path / "out")
    monkeypatch.setattr(graph, "_front", front)

    # the same steps on held rows (nothing streams): the same rows and reasons
    init = streamed.Streamed.__init__

    def nothing_streams(self, plan):
        init(self, plan)
        self.rest, self.steps = self.rest + len(self.steps), []

    monkeypatch.setattr(streamed.Streamed, "__init__", nothing_streams)
    run_job(parse_job({**spec, "output": str(tmp_path / "held")}), progress=False)
    held = datasets.load_from_disk(str(tmp_path / "held"))
    held_rejected = datasets.load_from_disk(str(tmp_path / "held" / "rejected"))
    assert sorted(held["id"]) == sorted(kept["id"]) and held.to_list() == kept.to_list()
    assert sorted(map(str, held_rejected.to_list())) == sorted(map(str, rejected.to_list()))


@pytest.mark.parametrize("run_rows", [5, 64, 100_000])
def test_shards_through_runs_are_the_same_bytes_however_many_runs(tmp_path, monkeypatch, run_rows):
    schema = output_schema({"score": pa.float64(), "vec": pa.list_(pa.float32())})
    rng = random.Random(0)
    rows = [{"id": f"{rng.getrandbits(64):016x}", "prompt_id": "p", "source": "s", "origin": f"f.jsonl:{i}",
             "prompt": "q" * rng.randrange(50), "response": "r" * rng.randrange(300),
             "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
             "generator": None if i % 3 else "g", "score": None if i % 7 == 0 else rng.random(),
             "vec": [rng.random() for _ in range(4)]} for i in range(2345)]
    # file names beyond ASCII (two-, three- and four-byte UTF-8): Arrow sorts the UTF-8
    # bytes, which must give Python's order of the strings
    for i, name in enumerate(["données", "日本語", "\U0001f600x", "z\u00e9", "\uffff", "A"] * 5):
        rows.append({**rows[i], "origin": f"{name}.jsonl:{i}"})
    monkeypatch.setattr(sink, "RUN_ROWS", run_rows)
    writer = sink._WriteRuns(str(tmp_path), schema)
    writer.start_bundle()
    runs = [item for r in rows for item in writer.process(r, 3)]
    runs += [wv.value for wv in writer.finish_bundle()]
    by_shard = {}
    for i, path in runs:
        by_shard.setdefault(i, []).append(path)
    merge = sink._MergeRuns(str(tmp_path), schema)
    merge.setup()
    for i in range(3):
        (merged,) = merge.process((i, by_shard[i]), 3)
        direct = sink.write_shard(str(tmp_path), i, 3, sorted((r for r in rows if sink.shard_of(r, 3) == i),
                                                               key=sink._row_order), sink.hf_schema(schema))
        assert merged["sha256"] == direct["sha256"] and merged["rows"] == direct["rows"]
        data = (tmp_path / merged["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == merged["sha256"]
        table = pa.ipc.open_stream(data).read_all()
        assert [b.num_rows for b in table.to_batches()][:-1] == [sink.SHARD_BATCH] * (len(table.to_batches()) - 1)
        want = sorted((r for r in rows if sink.shard_of(r, 3) == i), key=sink._row_order)
        assert table.column("origin").to_pylist() == [r["origin"] for r in want]
        assert table.column("response").to_pylist() == [r["response"] for r in want]
