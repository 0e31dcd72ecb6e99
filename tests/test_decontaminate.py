"""The decontaminate filter: normalisation by hand, and a pipeline run on hand-built rows
where which rows share a 13-word n-gram with the evaluation set is known by construction."""

from __future__ import annotations

import json

import datasets
import pytest

from curate import records
from curate.config import ConfigError, parse_job
from curate.pipeline.build import run_job
from curate.transforms.decontaminate import first_hit, ngram_hash, words

QUESTION = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many "
            "clips in May. How many clips did Natalia sell altogether in April and May?")
ANSWER = ("Natalia sold 48/2 = 24 clips in May. Natalia sold 48+24 = 72 clips altogether in April "
          "and May. #### 72")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_words_normalise_case_punctuation_and_space():
    assert words("  Natalia SOLD\n48 clips,  in April!") == ["natalia", "sold", "48", "clips", "in", "april"]
    assert words("48/2=24 clips--in May.") == ["48", "2", "24", "clips", "in", "may"]
    assert words("") == [] and words("...") == []
    assert ngram_hash(["a", "b"]) == ngram_hash(("a", "b")) != ngram_hash(["a b"][0].split()[::-1])


def test_first_hit_names_the_ngram_and_the_row():
    table = {ngram_hash(words("one two three")): "test.jsonl:7"}
    record = {"messages": [{"role": "user", "content": "Zero, ONE two; three four"}]}
    assert first_hit(record, table, 3) == 'shares the 3-gram "one two three" with evaluation row test.jsonl:7'
    assert first_hit(record, table, 4) is None


def test_pipeline_rejects_exactly_the_rows_sharing_13_words(tmp_path):
    eval_path = write_jsonl(tmp_path / "test.jsonl", [
        {"question": "What is two plus two?", "answer": "Four. #### 4"},  # under 13 words: no n-gram
        {"question": QUESTION, "answer": ANSWER}])
    q_words = QUESTION.split()
    rows = [
        {"question": QUESTION, "answer": "24 and 48. #### 72"},                              # verbatim
        {"question": QUESTION.upper().replace(",", " ;"), "answer": "..."},                   # re-cased
        {"question": "Here is a problem. " + QUESTION + " Think step by step.", "answer": "x"},  # wrapped
        {"question": "Solve it.", "answer": "We know that " + ANSWER.split(" #### ")[0]},      # the answer
        {"question": " ".join(q_words[:12]) + " and nothing else", "answer": "y"},            # 12 words only
        {"question": "What is two plus two?", "answer": "Four. #### 4"},                      # short eval row
        {"question": "Write a haiku about the sea.", "answer": "Waves fold into foam."},       # unrelated
    ]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    job = parse_job({"inputs": [train], "output": str(tmp_path / "out"),
                     "filters": [{"type": "decontaminate", "eval": [eval_path]}]})
    m = run_job(job)
    assert m["counts"]["filtered"] == {"filter:decontaminate": 4} and m["counts"]["kept"] == 3
    rejected = datasets.load_from_disk(str(tmp_path / "out" / "rejected")).to_list()
    reasons = {r["origin"]: r["reject_reason"] for r in rejected}
    assert sorted(reasons) == ["train.jsonl:1", "train.jsonl:2", "train.jsonl:3", "train.jsonl:4"]
    assert all(r.startswith('shares the 13-gram "') and r.endswith("with evaluation row test.jsonl:2")
               for r in reasons.values())
    assert 'shares the 13-gram "natalia sold clips to 48 of her friends in april and then she"' \
        in reasons["train.jsonl:1"]
    kept = datasets.load_from_disk(str(tmp_path / "out"))["origin"]
    assert sorted(kept) == ["train.jsonl:5", "train.jsonl:6", "train.jsonl:7"]


@pytest.mark.parametrize("options, match", [({"eval": []}, "'eval' needs"), ({"n": 0}, "n must be"),
                                            ({"eval": [{"path": "x", "colour": 1}]}, "eval.0.*colour"),
                                            ({"eval": ["missing.jsonl"]}, "missing.jsonl")])
def test_config_errors_before_any_work(tmp_path, options, match):
    path = write_jsonl(tmp_path / "a.jsonl", [{"question": "q", "answer": "a"}])
    spec = {"type": "decontaminate", "eval": [path], **options}
    with pytest.raises(ConfigError, match=match):
        run_job(parse_job({"inputs": [path], "output": str(tmp_path / "o"), "filters": [spec]}))
    assert not (tmp_path / "o").exists()


def test_lenient_adapt_reads_scalars_as_text():
    qa, messages = records.ADAPTERS["qa"], records.ADAPTERS["messages"]
    (rec,) = records.adapt({"question": "What is pi to two places?", "answer": 3.14}, qa, {}, "s", lenient=True)
    assert rec["response"] == "3.14"
    row = {"messages": [{"role": "user", "content": "Is 7 prime?"}, {"role": "assistant", "content": True}]}
    assert records.adapt(row, messages, {}, "s", lenient=True)[0]["response"] == "True"
    with pytest.raises(records.RowError, match=r"field 'answer' is float, expected text"):
        records.adapt({"question": "What is pi?", "answer": 3.14}, qa, {}, "s")  # strict by default
