"""The pipeline end to end on the local runner: counts, dead letter, shards, atomicity."""

import json
import os

import datasets
import pytest

from curate.config import parse_job
from curate.pipeline.run import run_job
from curate.selectors.shared.keys import hash_unit as random_key


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def job(tmp_path, inputs, selectors=(), filters=(), beam_args=(), out="out"):
    return parse_job({"inputs": inputs, "output": str(tmp_path / out), "filters": list(filters),
                      "selectors": list(selectors), "beam_args": list(beam_args)})


def qa(i, answer=None):
    return {"question": f"Question number {i}?", "answer": answer or f"Answer {i}."}


def test_broken_lines_dead_letter_and_counts_add_up(tmp_path):
    rows = [qa(i) for i in range(20)] + ['{"question": oops', {"question": "no answer"}, qa(3), qa(4)]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    m = run_job(job(tmp_path, [path], filters=[{"type": "dedup"}, {"type": "length", "min": 29}],
                    selectors=[{"type": "random", "budget": 5, "seed": 1}]))
    c = m["counts"]
    assert c["read"] == 24 and c["invalid"] == 2 and c["examples"] == 22
    assert c["filtered"] == {"filter:dedup": 2, "filter:length": 10}  # "Question number i?\nAnswer i." is 28 chars for i<10
    assert c["not_selected"] == {"select:random": 5}
    assert c["kept"] == 5
    out = tmp_path / "out"
    dead = [json.loads(l) for l in (out / "dead_letter.jsonl").read_text().splitlines()]
    assert [(d["origin"], d["reason"].split(":")[0]) for d in dead] == [
        ("in.jsonl:21", "malformed JSON"), ("in.jsonl:22", "missing field 'answer'")]
    kept = datasets.load_from_disk(str(out))
    rejected = datasets.load_from_disk(str(out / "rejected"))
    assert len(kept) == 5 and len(rejected) == 17
    assert sorted(set(rejected["reject_stage"])) == ["filter:dedup", "filter:length", "select:random"]
    assert all(rejected["reject_reason"])
    assert json.loads((out / "manifest.json").read_text())["counts"] == c
    report = (out / "report.html").read_text()
    assert report.count("data:image/png;base64,") >= 1 and "dropped by filter:dedup" in report  # the funnel
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_validation_is_its_own_step_and_sends_over_long_rows_to_the_dead_letter(tmp_path):
    rows = [qa(i) for i in range(6)] + [qa(6, answer="x" * 300)]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    spec = {"inputs": [path], "output": str(tmp_path / "out"), "validate": {"max_chars": 200}}
    m = run_job(parse_job(spec))
    c = m["counts"]
    assert c["read"] == 7 and c["invalid"] == 1 and c["examples"] == 6 and c["kept"] == 6
    (dead,) = [json.loads(l) for l in (tmp_path / "out" / "dead_letter.jsonl").read_text().splitlines()]
    assert dead["origin"] == "in.jsonl:7" and dead["reason"].startswith("over-long example: 3")


def test_random_budget_exact_seeded_and_nested(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [qa(i) for i in range(200)])

    def kept_ids(budget, seed=0, out="o"):
        run_job(job(tmp_path, [path], selectors=[{"type": "random", "budget": budget, "seed": seed}], out=out))
        return set(datasets.load_from_disk(str(tmp_path / out))["id"])

    small, large = kept_ids(30, out="a"), kept_ids(0.5, out="b")
    assert len(small) == 30 and len(large) == 100
    assert small <= large  # nested: a smaller budget keeps a subset
    assert kept_ids(30, out="c") == small  # deterministic
    assert kept_ids(30, seed=1, out="d") != small
    # brute force: the 30 smallest keys
    recs = [json.loads(l) for l in (tmp_path / "in.jsonl").read_text().splitlines()]
    full = datasets.load_from_disk(str(tmp_path / "b")).to_list() + \
        datasets.load_from_disk(str(tmp_path / "b" / "rejected")).to_list()
    assert len(full) == 200 == len(recs)
    expected = sorted(full, key=lambda r: random_key(0, r))[:30]
    assert {r["id"] for r in expected} == small
    assert len(kept_ids(500, out="e")) == 200 and len(kept_ids(0, out="f")) == 0


def test_failed_run_leaves_no_output(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [qa(i) for i in range(10)])
    j = job(tmp_path, [path], selectors=[{"type": "random", "budget": 3}])
    run_job(j)
    before = datasets.load_from_disk(str(tmp_path / "out"))["id"]
    bad = job(tmp_path, [path], filters=[{"type": "length", "unit": "tokens", "tokenizer": str(tmp_path / "missing")}])
    with pytest.raises(Exception):
        run_job(bad)
    # the earlier complete output is untouched, no staging left behind
    assert datasets.load_from_disk(str(tmp_path / "out"))["id"] == before
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "out"]


def test_empty_selection_is_a_valid_dataset(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [qa(i) for i in range(4)])
    m = run_job(job(tmp_path, [path], selectors=[{"type": "random", "budget": 0}]))
    assert m["counts"]["kept"] == 0
    assert len(datasets.load_from_disk(str(tmp_path / "out"))) == 0


def test_multi_processing_runner_pickles(tmp_path):
    """What Dataflow needs: every step pickles and runs in other processes."""
    path = write_jsonl(tmp_path / "in.jsonl", [qa(i) for i in range(40)] + ["not json"])
    m = run_job(job(tmp_path, [path], filters=[{"type": "dedup"}],
                    selectors=[{"type": "random", "budget": 0.25, "seed": 3}],
                    beam_args=["--direct_running_mode=multi_processing", "--direct_num_workers=2"]))
    assert m["counts"]["kept"] == 10 and m["counts"]["invalid"] == 1


@pytest.mark.integration
def test_real_data_gsm8k_and_codealpaca(tmp_path, shared_data):
    m = run_job(parse_job({
        "inputs": [{"path": str(shared_data / "gsm8k_train.jsonl.gz"), "source": "gsm8k", "limit": 1500},
                   {"path": str(shared_data / "codealpaca.jsonl.gz"), "source": "codealpaca", "limit": 1500}],
        "filters": [{"type": "dedup"}],
        "selectors": [{"type": "random", "budget": 0.1, "seed": 0}],
        "output": str(tmp_path / "out")}))
    c = m["counts"]
    assert c["read"] == 3000 and c["invalid"] == 0
    assert c["kept"] == round(0.1 * (3000 - c["filtered"]["filter:dedup"]))
    ds = datasets.load_from_disk(str(tmp_path / "out"))
    assert len(ds) == c["kept"] and set(ds["source"]) == {"gsm8k", "codealpaca"}
