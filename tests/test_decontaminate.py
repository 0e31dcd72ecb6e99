"""The decontaminate filter: normalisation by hand, and a pipeline run on hand-built rows
where which rows share a 13-word n-gram with the evaluation set is known by construction;
evaluation sets read leniently (numeric answers), and loudly when rows cannot be read."""

from __future__ import annotations

import json
import logging

import datasets
import pytest

from curate import records
from curate.cli import main
from curate.config import ConfigError, parse_job
from curate.pipeline.run import run_job
from curate.pipeline.plan import Plan
from curate.filters.decontaminate import first_hit, ngram_hash
from curate.filters.text import words

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


def test_numeric_eval_answers_are_read_and_their_rows_catch_a_planted_row(tmp_path):
    eval_path = write_jsonl(tmp_path / "test.jsonl", [
        {"question": QUESTION, "answer": 72},  # today's gsm8k-style sets often store the number only
        {"question": "What is pi to two places?", "answer": 3.14},
        {"question": "Is 7 a prime number?", "answer": True}])
    train = write_jsonl(tmp_path / "train.jsonl", [
        {"question": "Here is one. " + QUESTION, "answer": "72"},                      # planted
        {"question": "Write a haiku about the sea.", "answer": "Waves fold into foam."},
        {"question": "What is 2+2?", "answer": 4}])  # a training input stays strict: a dead letter
    job = parse_job({"inputs": [train], "output": str(tmp_path / "out"),
                     "filters": [{"type": "decontaminate", "eval": [eval_path]}]})
    m = run_job(job)
    assert m["counts"]["filtered"] == {"filter:decontaminate": 1}
    assert m["counts"]["kept"] == 1 and m["counts"]["invalid"] == 1
    (rejected,) = datasets.load_from_disk(str(tmp_path / "out" / "rejected")).to_list()
    assert rejected["origin"] == "train.jsonl:1"
    assert rejected["reject_reason"].endswith("with evaluation row test.jsonl:1")
    (dead,) = [json.loads(line) for line in (tmp_path / "out" / "dead_letter.jsonl").read_text().splitlines()]
    assert (dead["origin"], dead["reason"]) == ("train.jsonl:3", "field 'answer' is int, expected text")
    # the manifest says what the evaluation set gave; the side input agrees
    grams = len(words(QUESTION)) - 12
    assert m["plan"]["filters"] == [{"type": "decontaminate", "n": 13, "eval_rows": 3,
                                     "eval_rows_unreadable": 0, "eval_ngrams": grams}]
    assert m["metrics"]["filters/decontaminate_eval_ngrams"]["max"] == grams


@pytest.mark.parametrize("rows, error", [
    ([{"question": QUESTION, "answer": ["72", "seventy-two"]}] * 3,
     "0 of 3 rows readable (first: test.jsonl:1: field 'answer' is list, expected text)"),
    ([{"question": "What is two plus two?", "answer": 4}] * 3,
     "no 13-word n-gram: every text is shorter than 13 words (the longest has 5); lower n")])
def test_an_eval_set_without_ngrams_is_a_one_line_error(tmp_path, capsys, rows, error):
    eval_path = write_jsonl(tmp_path / "test.jsonl", rows)
    train = write_jsonl(tmp_path / "train.jsonl", [{"question": QUESTION, "answer": "72"}])
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps({"inputs": [train], "output": str(tmp_path / "out"),
                               "filters": [{"type": "decontaminate", "eval": [eval_path]}]}))
    assert main(["run", str(job)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("curate: error:")]
    assert errors == [f"curate: error: decontaminate: eval {eval_path}: {error}"]
    assert not (tmp_path / "out").exists()


def test_unreadable_eval_rows_are_counted_and_the_first_named(tmp_path, caplog):
    good = json.dumps({"question": QUESTION, "answer": 72})
    (tmp_path / "test.jsonl").write_text("\n".join([
        good, json.dumps({"question": "Q2"}), '{"question": "Q3", "answer": ',
        json.dumps({"question": "Q4", "answer": ["a"]}), json.dumps({"question": "Q5", "answer": {}}), good]) + "\n")
    job = parse_job({"inputs": [str(tmp_path / "test.jsonl")], "output": str(tmp_path / "out"),
                     "filters": [{"type": "decontaminate", "eval": [str(tmp_path / "test.jsonl")]}]})
    with caplog.at_level(logging.WARNING, logger="curate.filters.decontaminate"):
        plan = Plan(job)  # the evaluation set is read while planning, before any pipeline
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
                  and r.name == "curate.filters.decontaminate"]
    assert warning.startswith("decontaminate: 4 of 6 evaluation rows cannot be read")
    assert warning.endswith("(first: test.jsonl:2: missing field 'answer'; test.jsonl:3: malformed JSON: "
                            "Expecting value at column 30; test.jsonl:4: field 'answer' is list, expected text)")
    (step,) = plan.describe()["filters"]
    assert (step["eval_rows"], step["eval_rows_unreadable"]) == (2, 4)


def test_an_empty_eval_file_beside_others_is_an_error(tmp_path):
    good = write_jsonl(tmp_path / "test.jsonl", [{"question": QUESTION, "answer": ANSWER}])
    (tmp_path / "empty.jsonl").write_text("")
    spec = {"type": "decontaminate", "eval": [good, str(tmp_path / "empty.jsonl")]}
    with pytest.raises(ConfigError, match=r"^decontaminate: eval .*empty.jsonl: the file holds no rows$"):
        Plan(parse_job({"inputs": [good], "output": str(tmp_path / "o"), "filters": [spec]}))
