"""`stratify_by` on any selector: the budget shared among a column's values in the pool's
proportions, and the method run inside each value as if it were the whole pool."""

import json

import datasets
import numpy as np
import pytest

from curate.config import ConfigError, JobConfig, parse_job
from curate.pipeline.run import run_job, run_pipeline, select_from_scores
from curate.selectors.shared.strata import stratum_shares

SOURCES = {"a": 40, "b": 25, "c": 10}


# ---------------------------------------------------------------- the shares, by hand


def test_proportional_shares_by_largest_remainder():
    rows = {"a": 40, "b": 25, "c": 10}
    # 16 x (40, 25, 10) / 75 = 8.533, 5.333, 2.133: floors 8, 5, 2 (15); the one left goes
    # to the largest remainder, a's .533
    assert stratum_shares(rows, rows, 16) == {"a": 9, "b": 5, "c": 2}
    # 15 divides exactly: 8, 5, 2
    assert stratum_shares(rows, rows, 15) == {"a": 8, "b": 5, "c": 2}
    # 3 x (40, 40, 20) / 100 = 1.2, 1.2, .6: floors 1, 1, 0, the one left to z's .6;
    # equal remainders (.5, .5) go to the larger stratum, then the first value
    assert stratum_shares({"x": 40, "y": 40, "z": 20}, {"x": 40, "y": 40, "z": 20}, 3) == {"x": 1, "y": 1, "z": 1}
    assert stratum_shares({"x": 50, "y": 50}, {"x": 50, "y": 50}, 1) == {"x": 1, "y": 0}
    assert stratum_shares(rows, rows, 0) == {"a": 0, "b": 0, "c": 0}
    assert stratum_shares(rows, rows, 75) == rows


def test_a_stratum_that_cannot_fill_its_share_rolls_the_rest_to_the_others():
    rows = {"a": 40, "b": 25, "c": 10}
    # 30 x (40, 25, 10) / 75 = 16, 10, 4; b can keep only 3 rows: it gives 3 and the other
    # 27 are shared between a and c in their pool proportions 40:10 -> 21.6, 5.4 -> 22, 5
    assert stratum_shares(rows, {"a": 40, "b": 3, "c": 10}, 30) == {"a": 22, "b": 3, "c": 5}
    # a budget above every row the method can keep: each stratum gives all it can
    assert stratum_shares(rows, {"a": 4, "b": 3, "c": 2}, 30) == {"a": 4, "b": 3, "c": 2}


def test_equal_shares_are_s2ls_balanced_rule():
    rows = {"a": 40, "b": 25, "c": 5}
    # smallest first: c offered 30 // 3 = 10, has 5; b offered 25 // 2 = 12; a gets 13
    assert stratum_shares(rows, rows, 30, "equal") == {"a": 13, "b": 12, "c": 5}
    with pytest.raises(ConfigError, match="stratify_shares"):
        stratum_shares(rows, rows, 30, "by_vibes")


# ---------------------------------------------------------------- the pipeline


def write_sources(tmp_path) -> list[dict]:
    """One JSONL file per source; responses of varied lengths."""
    inputs = []
    for s, n in SOURCES.items():
        path = tmp_path / f"{s}.jsonl"
        path.write_text("".join(json.dumps({"instruction": f"{s} question {i}",
                                            "output": f"{s} answer {i} " + "x" * ((i * 7919) % 53)}) + "\n"
                                for i in range(n)))
        inputs.append({"path": str(path), "source": s})
    return inputs


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """A written pool (a curate output) of three sources, with a trajectory and an
    embedding column as the trajectory and embedding scorers would write them."""
    tmp = tmp_path_factory.mktemp("strata")
    run_job(parse_job({"inputs": write_sources(tmp), "output": str(tmp / "raw"), "filters": []}))
    ds = datasets.load_from_disk(str(tmp / "raw"))
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 5, (4, 6))
    blob = rng.integers(0, 4, len(ds))
    traj = centres[blob] + rng.normal(0, 0.3, (len(ds), 6))
    emb = traj / np.linalg.norm(traj, axis=1, keepdims=True)
    ds = ds.add_column("trajectory", traj.tolist()).add_column("embedding", emb.astype(np.float32).tolist())
    ds.save_to_disk(str(tmp / "pool"))
    for s in SOURCES:  # each stratum alone, as a pool of its own
        ds.filter(lambda r, s=s: r["source"] == s).save_to_disk(str(tmp / f"pool-{s}"))
    return tmp


def select(pool_dir, out, selector) -> tuple[dict, set]:
    manifest = select_from_scores(JobConfig(inputs=[], output=str(out), selectors=[selector]), str(pool_dir))
    return manifest, set(datasets.load_from_disk(str(out))["id"])


METHODS = {
    "random": {"type": "random", "budget": 16, "seed": 3},
    "top": {"type": "top", "column": "response_chars", "budget": 16},
    "s2l": {"type": "s2l", "budget": 16, "k": 3, "init": "kmeans++", "seed": 1},
    "diversity": {"type": "diversity", "budget": 16, "k": 3, "seed": 1, "gpu": False},
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_stratum_gets_its_share_and_the_methods_own_picks(pool, tmp_path, method):
    spec = METHODS[method]
    manifest, kept = select(pool / "pool", tmp_path / "stratified", {**spec, "stratify_by": "source"})
    strata = manifest["plan"]["selectors"][0]["strata"]
    # the table of test_proportional_shares_by_largest_remainder
    assert [(t["value"], t["rows"], t["share"]) for t in strata] == [("a", 40, 9), ("b", 25, 5), ("c", 10, 2)]
    out = datasets.load_from_disk(str(tmp_path / "stratified"))
    assert len(out) == 16 and manifest["counts"]["not_selected"] == {f"select:{spec['type']}": 75 - 16}
    assert {s: out["source"].count(s) for s in SOURCES} == {"a": 9, "b": 5, "c": 2}
    assert set(out["stratum_quota"]) <= {9, 5, 2}
    report = (tmp_path / "stratified" / "report.html").read_text()
    assert "Stratified by <code>source</code>" in report and "<td>a</td><td>40</td>" in report
    # inside each stratum, the method's own pick on that stratum alone with its share
    for t in strata:
        _, alone = select(pool / f"pool-{t['value']}", tmp_path / f"alone-{t['value']}",
                          {**spec, "budget": t["share"]})
        assert {i for i, s in zip(out["id"], out["source"]) if s == t["value"]} == alone
    assert len(kept) == 16


def test_a_selector_without_a_budget_runs_in_each_stratum(pool, tmp_path):
    # semdedup keeps one row of each near-identical group, judged only inside a source
    manifest, kept = select(pool / "pool", tmp_path / "sd", {"type": "semdedup", "threshold": 0.99,
                                                              "stratify_by": "source", "gpu": False})
    alone = set()
    for s in SOURCES:
        alone |= select(pool / f"pool-{s}", tmp_path / f"sd-{s}", {"type": "semdedup", "threshold": 0.99,
                                                                    "gpu": False})[1]
    assert kept == alone
    assert all(t["share"] is None for t in manifest["plan"]["selectors"][0]["strata"])


def test_a_cap_rolls_the_share_to_other_strata(pool, tmp_path):
    # top's range leaves source c 3 rows it can keep (responses of 50+ characters)
    lengths = {s: sorted(len(r) for r in datasets.load_from_disk(str(pool / f"pool-{s}"))["response"])
               for s in SOURCES}
    at_least = float(lengths["c"][-3])
    spec = {"type": "top", "column": "response_chars", "budget": 30, "at_least": at_least, "stratify_by": "source"}
    manifest, kept = select(pool / "pool", tmp_path / "capped", spec)
    strata = {t["value"]: t for t in manifest["plan"]["selectors"][0]["strata"]}
    can_keep = {s: sum(n >= at_least for n in lengths[s]) for s in SOURCES}
    assert {s: t["can_keep"] for s, t in strata.items()} == can_keep
    assert {s: t["share"] for s, t in strata.items()} == stratum_shares(SOURCES, can_keep, 30)
    assert len(kept) == min(30, sum(can_keep.values()))


def test_curate_run_writes_the_pool_first(tmp_path):
    job = parse_job({"inputs": write_sources(tmp_path), "output": str(tmp_path / "out"),
                     "selectors": [{"type": "random", "budget": 16, "stratify_by": "source"}]})
    manifest = run_job(job)
    out = datasets.load_from_disk(str(tmp_path / "out"))
    assert {s: out["source"].count(s) for s in SOURCES} == {"a": 9, "b": 5, "c": 2}
    assert manifest["scores_from"] == str(tmp_path / "out-scores")
    assert len(datasets.load_from_disk(str(tmp_path / "out-scores"))) == 75
    # the pool is read again, not rewritten, by the next run
    again = run_job(parse_job({**job.to_dict(), "output": str(tmp_path / "out2")}))
    assert again["scores_key"] == manifest["scores_key"]


def test_where_stratify_by_cannot_work_it_says_so(pool, tmp_path):
    with pytest.raises(ConfigError, match="first selector"):
        select_from_scores(JobConfig(
            inputs=[], output=str(tmp_path / "x"),
            selectors=[{"type": "random", "budget": 20}, {"type": "random", "budget": 10, "stratify_by": "source"}]),
            str(pool / "pool"))
    # the pool a stratified selector shares must be written before it runs
    job = parse_job({"inputs": write_sources(tmp_path), "output": str(tmp_path / "y"),
                     "selectors": [{"type": "random", "budget": 16, "stratify_by": "source"}]})
    with pytest.raises(ConfigError, match="written pool"):
        run_pipeline(job)
    with pytest.raises(ConfigError, match="'id' has 75 values in the pool"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr("curate.selectors.shared.strata.MAX_STRATA", 50)
            select(pool / "pool", tmp_path / "w", {"type": "random", "budget": 5, "stratify_by": "id"})
    with pytest.raises(ConfigError, match="stratify_shares"):
        select(pool / "pool", tmp_path / "z", {"type": "random", "budget": 5, "stratify_by": "source",
                                               "stratify_shares": "by_vibes"})


def test_the_report_says_when_a_selection_left_the_pools_mix():
    from collections import Counter

    import pyarrow as pa

    from curate.report.html import _sources, mix_shift

    before = Counter({"code": 500, "chat": 500, "math": 480, "tiny": 20})
    after = Counter({"code": 170, "chat": 20, "math": 10})
    # code 85% kept vs 33% of the pool (over twice), chat 10% vs 33% and math 5% vs 32% (under
    # half); tiny is under 5% of the pool: not judged
    assert [n for n, _, _ in mix_shift(before, after)] == ["code", "math", "chat"]
    assert mix_shift(before, Counter({"code": 70, "chat": 70, "math": 60})) == []
    kept = pa.table({"source": ["code"] * 170 + ["chat"] * 20 + ["math"] * 10})
    rejected = pa.table({"source": ["code"] * 330 + ["chat"] * 480 + ["math"] * 470 + ["tiny"] * 20})
    assert "stratify_by: source</code> on the selector" in _sources(kept, rejected, [{"type": "top"}])
    assert "not the pool's" not in _sources(kept, rejected, [{"type": "top", "stratify_by": "source"}])
    assert "not the pool's" not in _sources(kept, rejected, [])  # filters only: no selector to blame
