"""Saved and stored scores are re-used only for the same model files and the same
conversation: a model replaced in place, named through `~` or an embedded alias, or a row
edited under its old id is scored again; a damaged saved shard is skipped, not fatal."""

import json
import os
import shutil
import time

import datasets

from curate.scorers import make_scorer
from curate.cli import main
from curate.config import parse_job
from curate.models import loading
from curate.pipeline import saved_work
from curate.pipeline.run import run_job

from test_faults import FakeScorer, write_pool
from test_resume import likelihood_job


def touch(model_dir):
    """The model retrained in place: same names, new contents time."""
    weights = next(model_dir.glob("*.safetensors"))
    os.utime(weights, ns=(time.time_ns(), time.time_ns() + 10**9))


def likelihood_key(model: str) -> str:
    return saved_work.scorer_key(make_scorer({"type": "likelihood", "model": model}))


def test_the_key_follows_the_files_behind_a_home_path_and_an_embedded_alias(tmp_path, tiny_lm_dir, monkeypatch):
    home = tmp_path / "home"
    shutil.copytree(tiny_lm_dir, home / "model")
    monkeypatch.setenv("HOME", str(home))
    base = likelihood_key("~/model")
    assert base == likelihood_key(str(home / "model"))  # the same files, however named
    touch(home / "model")
    assert likelihood_key("~/model") != base

    monkeypatch.setattr(loading, "embedded_path", lambda name: str(home / "model") if name == "default" else None)
    base = likelihood_key("default")
    touch(home / "model")
    assert likelihood_key("default") != base


def test_stored_scores_are_not_reused_after_the_model_changed(tmp_path, tiny_lm_dir):
    model = tmp_path / "model"
    shutil.copytree(tiny_lm_dir, model)
    spec = {**likelihood_job(tmp_path, model, "out", n=12), "scores": str(tmp_path / "scores")}
    first = run_job(parse_job(spec), progress=False)
    again = run_job(parse_job({**spec, "output": str(tmp_path / "out2")}), progress=False)
    assert again["scores_key"] == first["scores_key"]  # unchanged: re-used
    touch(model)
    third = run_job(parse_job({**spec, "output": str(tmp_path / "out3")}), progress=False)
    assert third["scores_key"] != first["scores_key"]
    assert third["scoring_counts"]["from_saved"] == {"score:likelihood": 0}


def test_an_edited_row_that_kept_its_id_is_scored_again(tmp_path, monkeypatch):
    """An exported output, edited and read back (the curate adapter keeps its ids)."""
    run_job(parse_job({"inputs": [write_pool(tmp_path)], "output": str(tmp_path / "pool")}), progress=False)
    assert main(["export", str(tmp_path / "pool"), "--format", "jsonl", "--to", str(tmp_path / "export")]) == 0
    edited = tmp_path / "export" / "data.jsonl"
    store = str(tmp_path / "store")

    def scored(out):
        manifest = run_job(parse_job({"inputs": [str(edited)], "output": str(tmp_path / out), "saved_work": store,
                                      "scorers": [{"type": "fake"}]}), progress=False)
        return manifest["counts"]["from_saved"]["score:fake"], {
            r["id"]: r["fake_score"] for r in datasets.load_from_disk(str(tmp_path / out))}

    assert scored("a")[0] == 0
    rows = [json.loads(line) for line in edited.read_text().splitlines()]
    rows[0]["response"] = rows[0]["messages"][-1]["content"] = "a much longer answer than before, edited by hand"
    edited.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from_saved, scores = scored("b")
    assert from_saved == len(rows) - 1
    assert scores[rows[0]["id"]] == len(rows[0]["response"])  # the new text's score, not the old row's


def test_a_damaged_saved_shard_is_skipped_and_its_rows_scored_again(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(saved_work, "SAVE_EVERY_ROWS", 4)
    store = str(tmp_path / "store")
    spec = {"inputs": [write_pool(tmp_path)], "saved_work": store, "scorers": [{"type": "fake"}]}
    run_job(parse_job({**spec, "output": str(tmp_path / "a")}), progress=False)
    directory = saved_work.scorer_dir(store, FakeScorer())
    shards = sorted(saved_work.saved_shards(directory))
    assert len(shards) == 3
    with open(shards[0], "r+b") as fh:  # truncated mid-write by a full disk
        fh.truncate(os.path.getsize(shards[0]) // 2)
    open(shards[1], "wb").close()  # emptied
    manifest = run_job(parse_job({**spec, "output": str(tmp_path / "b")}), progress=False)
    assert manifest["counts"]["from_saved"] == {"score:fake": 4} and manifest["counts"]["kept"] == 12
    damaged = [r.getMessage() for r in caplog.records if "damaged saved-work shard" in r.getMessage()]
    assert len(damaged) == 2 and all("scored again" in m for m in damaged)
    a = {r["id"]: r["fake_score"] for r in datasets.load_from_disk(str(tmp_path / "a"))}
    assert a == {r["id"]: r["fake_score"] for r in datasets.load_from_disk(str(tmp_path / "b"))}
