"""`curate compare`: score once, select with each method and random seeds, train and
evaluate each subset, and judge each method against random's seed spread."""

import json
import statistics

import datasets
import pytest
import yaml

from curate.cli import main
from curate import dataflow
from curate.compare import check_store, load_compare, parse_compare, run_compare, verdict
from curate.config import ConfigError
from curate.pipeline.run import pipeline_options
from curate.scorers import make_scorer
from memfs import store  # noqa: F401 (a fixture: the in-memory object store, memgs://)


def test_verdict_is_outside_randoms_seed_spread_or_a_tie():
    # random 1.1, 1.2, 1.3: mean 1.2, sample sd 0.1
    diff, word = verdict(1.0, [1.1, 1.2, 1.3])
    assert diff == pytest.approx(-0.2) and word == "better"
    assert verdict(1.35, [1.1, 1.2, 1.3])[1] == "worse"
    assert verdict(1.15, [1.1, 1.2, 1.3])[1] == "tie"  # 0.05 inside the 0.1 spread
    assert verdict(1.29, [1.1, 1.2, 1.3])[1] == "tie"


def write_rows(path, source, n, offset=0):
    path.write_text("".join(json.dumps({"instruction": f"{source} question {i}: what is {i} plus {i}?",
                                        "output": f"It is {2 * i}." + " Because" * ((i * 5) % 7)}) + "\n"
                            for i in range(offset, offset + n)))
    return str(path)


def spec_dict(tmp_path, model_dir):
    return {
        "name": "tiny-compare",
        "output": str(tmp_path / "compare"),
        "pool": {"inputs": [{"path": write_rows(tmp_path / "a.jsonl", "a", 12), "source": "a"},
                            {"path": write_rows(tmp_path / "b.jsonl", "b", 12), "source": "b"}],
                 "filters": [{"type": "dedup"}]},
        "budgets": [6],
        "methods": {"longest": {"type": "top", "column": "response_chars"},
                    "longest_by_source": {"type": "top", "column": "response_chars", "stratify_by": "source"}},
        "random_seeds": [0, 1, 2],
        "eval": {"a": {"path": write_rows(tmp_path / "a_test.jsonl", "a", 8, offset=100), "skip": 2, "limit": 4},
                 "b": str(write_rows(tmp_path / "b_test.jsonl", "b", 4, offset=100))},
        "validation": {"sets": {"a": {"path": str(tmp_path / "a_test.jsonl"), "limit": 2}},
                       "grid": [[1, 1.0e-3], [2, 1.0e-3]]},
        "train": {"model": str(model_dir), "max_length": 64, "batch_size": 2, "dtype": "fp32", "save_every": None},
    }


def test_compare_end_to_end_then_a_rerun_from_the_cache(tmp_path, tiny_lm_dir, monkeypatch, capsys):
    spec_path = tmp_path / "compare.yaml"
    spec_path.write_text(yaml.safe_dump(spec_dict(tmp_path, tiny_lm_dir)))
    assert main(["compare", str(spec_path), "-q"]) == 0
    out = tmp_path / "compare"
    results = json.loads((out / "compare.json").read_text())
    printed = capsys.readouterr().out
    assert "| 6 | longest |" in printed and (out / "report.html").is_file() and (out / "compare.png").is_file()

    # settings: the grid point with the lowest validation loss
    best = min(results["settings_tried"], key=lambda t: (t["val_loss"], t["epochs"]))
    assert results["settings"] == {"epochs": best["epochs"], "lr": best["lr"]}
    # every subset has the budget's rows; random's seeds differ; longest is a hand sort
    rows = {(r["method"], r["seed"]): r for r in results["rows"]}
    assert sorted(rows) == [("longest", None), ("longest_by_source", None),
                            ("random", 0), ("random", 1), ("random", 2)]
    assert all(r["rows"] == 6 for r in rows.values())
    pool = datasets.load_from_disk(str(out / "scores"))
    by_length = sorted(zip(pool["response"], pool["origin"], pool["id"]), key=lambda t: (-len(t[0]), t[1], t[2]))
    assert set(datasets.load_from_disk(str(out / "b6" / "longest" / "selection"))["id"]) == \
        {t[2] for t in by_length[:6]}
    assert rows[("longest_by_source", None)]["source_mix"] == {"a": 3, "b": 3}
    # the eval set a skipped its first 2 rows and kept 4
    assert results["base_eval"]["a"]["n_examples"] == 4 and results["base_eval"]["b"]["n_examples"] == 4
    # each verdict by the rule, from the losses themselves
    for v in results["verdicts"]:
        for s in ("a", "b", "mean"):
            ref = [rows[("random", k)]["mean" if s == "mean" else "eval"] for k in (0, 1, 2)]
            ref = ref if s == "mean" else [x[s] for x in ref]
            mine = rows[(v["method"], None)]["mean"] if s == "mean" else rows[(v["method"], None)]["eval"][s]
            sd, mean = statistics.stdev(ref), statistics.fmean(ref)
            assert v[s]["verdict"] == ("tie" if abs(mine - mean) <= sd else "better" if mine < mean else "worse")

    # a rerun trains nothing: every stage comes from the cache
    def no_training(*a, **k):
        raise AssertionError("trained again although the run is cached")

    monkeypatch.setattr("curate.compare.train", no_training)  # where compare calls it
    again = run_compare(load_compare(str(spec_path)), progress=False)
    assert [r["mean"] for r in again["rows"]] == [r["mean"] for r in results["rows"]]
    assert all(s["cached"] for s in again["stages"])
    monkeypatch.undo()

    # a method changed under the same name: its selection and training are done again
    changed = spec_dict(tmp_path, tiny_lm_dir)
    changed["methods"]["longest"] = {"type": "top", "column": "response_chars", "order": "lowest"}
    spec_path.write_text(yaml.safe_dump(changed))
    third = run_compare(load_compare(str(spec_path)), progress=False)
    redone = [s["stage"] for s in third["stages"] if not s["cached"]]
    assert redone == ["budget 6: select [longest]", "budget 6: train + evaluate [longest] on 6 rows"]
    picked = datasets.load_from_disk(str(out / "b6" / "longest" / "selection"))["response"]
    assert sorted(map(len, picked)) == sorted(len(r) for r in pool["response"])[:6]


def test_scores_and_selections_in_a_store_on_an_object_store(tmp_path, tiny_lm_dir, store, monkeypatch):
    """`store:` (gs:// on Dataflow; memgs://, Beam's FileSystems, here): the scores and
    selections are written there, each selection's kept rows are copied under `output:`
    byte for byte for the trainer, and a rerun copies and trains nothing."""
    spec = {**spec_dict(tmp_path, tiny_lm_dir), "store": "memgs://bucket/compare/"}
    spec.pop("validation")
    results = run_compare(parse_compare(spec), progress=False)
    out = tmp_path / "compare"
    assert not (out / "scores").exists() and "memgs://bucket/compare/scores/manifest.json" in store
    labels = ["longest", "longest_by_source", "random-s0", "random-s1", "random-s2"]
    for label in labels:
        local, remote = out / "b6" / label / "selection", f"memgs://bucket/compare/b6/{label}/selection/"
        assert sorted(f.name for f in local.iterdir()) == [
            "data-00000-of-00001.arrow", "dataset_info.json", "manifest.json", "state.json"]
        assert all(f.read_bytes() == store[remote + f.name] for f in local.iterdir())
        assert f"{remote}rejected/state.json" in store  # the rejected rows stay in the store
    # longest: the pool's 6 longest responses, sorted by hand from the stored scores
    pool = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    pool += [json.loads(line) for line in (tmp_path / "b.jsonl").read_text().splitlines()]
    longest = sorted((len(r["output"]) for r in pool), reverse=True)[:6]
    picked = datasets.load_from_disk(str(out / "b6" / "longest" / "selection"))["response"]
    assert sorted(map(len, picked), reverse=True) == longest
    assert results["rows"][-1]["source_mix"] == {"a": 3, "b": 3}

    copies = {label: (out / "b6" / label / "selection").stat().st_ino for label in labels}

    def no_training(*a, **k):
        raise AssertionError("trained again although the run is cached")

    monkeypatch.setattr("curate.compare.train", no_training)
    again = run_compare(parse_compare(spec), progress=False)
    assert all(s["cached"] for s in again["stages"])
    assert copies == {label: (out / "b6" / label / "selection").stat().st_ino for label in labels}


def test_spec_mistakes_are_one_clear_error(tmp_path, tiny_lm_dir):
    good = spec_dict(tmp_path, tiny_lm_dir)
    with pytest.raises(ConfigError, match="random_seeds: at least 3"):
        parse_compare({**good, "random_seeds": [0, 1]})
    with pytest.raises(ConfigError, match="methods.longest: the budget comes from 'budgets'"):
        parse_compare({**good, "methods": {"longest": {"type": "top", "column": "response_chars", "budget": 3}}})
    with pytest.raises(ConfigError, match="'random' is the baseline"):
        parse_compare({**good, "methods": {"random": {"type": "random"}}})
    with pytest.raises(ConfigError, match="unknown key"):
        parse_compare({**good, "evals": good["eval"]})
    with pytest.raises(ConfigError, match="pool: selectors not allowed"):
        parse_compare({**good, "pool": {**good["pool"], "selectors": [{"type": "random", "budget": 2}]}})
    # on Dataflow the workers cannot write to this machine's disk: a store on gs:// first
    on_dataflow = {**good, "pool": {**good["pool"], "select_beam_args": ["--runner=DataflowRunner"]}}
    with pytest.raises(ConfigError, match=r"cannot write to .*compare on this machine: set store: to a gs://"):
        run_compare(parse_compare(on_dataflow), progress=False)
    # a method reading a column no scorer writes: found before any scoring
    spec = parse_compare({**good, "methods": {"ifd": {"type": "top", "column": "ifd"}}})
    with pytest.raises(ConfigError, match="methods.ifd: .*needs the column 'ifd'"):
        run_compare(spec, progress=False)
    assert not (tmp_path / "compare" / "scores").exists()


@pytest.mark.parametrize("name", ["mixed", "dataflow"])
def test_the_shipped_specs_hold_their_evaluation_rows_out_of_the_pool(name, monkeypatch):
    import pathlib

    for var in ("CURATE_BUCKET", "CURATE_DATA"):
        monkeypatch.delenv(var, raising=False)
    spec = load_compare(str(pathlib.Path(__file__).resolve().parents[1] / "jobs" / "compare" / f"{name}.yaml"))
    limits = {i.path: i.limit for i in spec.pool.inputs}
    assert len(spec.random_seeds) >= 3 and spec.methods
    for set_name, item in spec.eval_sets.items():
        if item["path"] in limits:  # rows of a pool file: only past the ones the pool reads
            assert item.get("skip", 0) >= limits[item["path"]], set_name
    check_store(spec, [])  # Dataflow writes to a gs:// store; locally the store is `output:`
    if name == "dataflow":  # the scorer on GPU workers, the selections on CPU workers
        assert spec.store.startswith("gs://YOUR_BUCKET/") and spec.pool.output == spec.store + "/scores"
        scoring = pipeline_options(spec.pool.beam_args).get_all_options()
        dataflow.check_worker_resources([make_scorer(dict(s)) for s in spec.pool.scorers], scoring)
        selecting = pipeline_options(spec.pool.select_beam_args).get_all_options()
        assert dataflow.is_dataflow(selecting) and not selecting["dataflow_service_options"]
        assert selecting["sdk_container_image"].endswith("/curate/worker-cpu:0.2")


def test_a_bad_spec_is_one_line_and_status_2(tmp_path, capsys):
    assert main(["compare", str(tmp_path / "missing.yaml")]) == 2
    spec = tmp_path / "bad.yaml"
    spec.write_text("pool: {inputs: [a.jsonl]}\nbudgets: [5]\nmethods: {x: {type: top}}\n")
    assert main(["compare", str(spec)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "missing.yaml" in err[0] and "'eval' is required" in err[1]
