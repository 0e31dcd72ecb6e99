"""S2L: balanced sampling against brute force, the Beam selector, trajectories against a
direct loss computation per checkpoint, checkpoint step order, determinism."""

from __future__ import annotations

import json
import random
import shutil

import apache_beam as beam
import numpy as np
import pytest

from curate.pipeline.run import pipeline_options
from curate.records import make_record
from curate.selectors.s2l import S2LSelector, sample_key
from curate.selectors.shared.quotas import balanced_quotas


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine
    OpenMP spin-waits make them ten times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------- balanced sampling


def reference_quotas(sizes: dict, budget: int) -> dict:
    """A plain loop, written from docs/methods.md: smallest cluster first; each gets
    remaining // clusters left; smaller than that: all of it, the rest rolls on."""
    clusters = list(sizes)
    # selection sort by (size, id): no sorted() with a key, to be independent of the code
    ordered = []
    while clusters:
        best = clusters[0]
        for c in clusters[1:]:
            if sizes[c] < sizes[best] or (sizes[c] == sizes[best] and c < best):
                best = c
        ordered.append(best)
        clusters.remove(best)
    remaining, left, out = budget, len(ordered), {}
    for c in ordered:
        quota = remaining // left
        if sizes[c] <= quota:
            out[c] = sizes[c]
        else:
            out[c] = quota
        remaining -= out[c]
        left -= 1
    return out


def test_balanced_quotas_by_hand():
    # visit 3(1) 0(3) 4(7) 1(10) 2(50): 20//5=4 -> 1 (3 roll on), 19//4=4 -> 3, 16//3=5 -> 5,
    # 11//2=5 -> 5, 6//1=6 -> 6
    sizes = {0: 3, 1: 10, 2: 50, 3: 1, 4: 7}
    assert balanced_quotas(sizes, 20) == {3: 1, 0: 3, 4: 5, 1: 5, 2: 6}
    assert balanced_quotas(sizes, 0) == {c: 0 for c in sizes}
    assert balanced_quotas(sizes, 1000) == sizes  # budget above the pool: everything
    assert balanced_quotas({5: 4, 2: 4, 9: 4}, 5) == {2: 1, 5: 2, 9: 2}  # ties by id
    assert balanced_quotas({}, 10) == {}


@pytest.mark.parametrize("seed", range(30))
def test_balanced_quotas_match_brute_force(seed):
    rng = random.Random(seed)
    sizes = {c: rng.choice([1, 2, 3, rng.randint(1, 40), rng.randint(1, 400)])
             for c in range(rng.randint(1, 25))}
    budget = rng.randint(0, sum(sizes.values()) + 5)
    got = balanced_quotas(sizes, budget)
    assert got == reference_quotas(sizes, budget)
    assert sum(got.values()) == min(budget, sum(sizes.values()))
    assert all(0 <= got[c] <= sizes[c] for c in sizes)


# ---------------------------------------------------------------- the Beam selector

CENTRES = {0: [0, 0, 0, 0], 1: [10, 0, 0, 0], 2: [0, 10, 0, 0], 3: [0, 0, 10, 0], 4: [0, 0, 0, 10]}


def trajectory_pool(sizes=(2, 5, 9, 30, 54), seed=0, sources=("a", "b")):
    """Rows whose trajectories sit in well-separated blobs (one per cluster)."""
    rng = np.random.default_rng(seed)
    rows = []
    for c, n in enumerate(sizes):
        for i in range(n):
            r = make_record([{"role": "user", "content": f"q{c}.{i}"},
                             {"role": "assistant", "content": f"a{c}.{i}"}], sources[(c + i) % len(sources)])
            r["origin"] = f"pool:{len(rows) + 1}"
            r["trajectory"] = (np.asarray(CENTRES[c], float) + rng.normal(0, 0.1, 4)).tolist()
            r["blob"] = c
            rows.append(r)
    return rows


def collect(pcoll, path, label):
    """Write a PCollection to a JSON file (the runner pickles DoFns: no shared lists)."""
    def write(rows):
        with open(path, "w") as fh:
            json.dump(rows, fh)

    return pcoll | f"{label}List" >> beam.combiners.ToList() | f"{label}Write" >> beam.Map(write)


def run_selector(rows, tmp_path, **opts):
    with beam.Pipeline(options=pipeline_options([])) as p:
        out = p | beam.Create(rows) | S2LSelector(**opts)
        collect(out["kept"], tmp_path / "kept.json", "Kept")
        collect(out["rejected"], tmp_path / "rejected.json", "Rejected")
    return (json.loads((tmp_path / "kept.json").read_text()),
            json.loads((tmp_path / "rejected.json").read_text()))


def reference_selection(rows, budget, seed):
    """Brute force from the pipeline's cluster ids: quotas by the loop above, then the
    `take` smallest sample keys of each cluster."""
    groups = {}
    for r in rows:
        groups.setdefault(r["cluster"], []).append(r)
    takes = reference_quotas({k: len(v) for k, v in groups.items()}, budget)
    kept = set()
    for key, members in groups.items():
        members = sorted(members, key=lambda r: (sample_key(seed, r), r["origin"], r["id"]))
        kept |= {r["id"] for r in members[:takes[key]]}
    return kept, takes


def test_selector_recovers_blobs_and_matches_brute_force(tmp_path):
    rows = trajectory_pool()
    # kmeans++ seeding: random initialisation can miss the 2-row blob
    kept, rejected = run_selector(rows, tmp_path, budget=20, k=5, seed=3, init="kmeans++")
    everything = kept + rejected
    assert len(kept) == 20 and len(everything) == len(rows)
    # well-separated blobs: the clusters are the blobs
    by_cluster = {}
    for r in everything:
        by_cluster.setdefault(r["cluster"], set()).add(r["blob"])
    assert sorted(len(v) for v in by_cluster.values()) == [1] * 5
    expected, takes = reference_selection(everything, 20, seed=3)
    assert {r["id"] for r in kept} == expected
    # blob sizes 2, 5, 9, 30, 54: 20//5=4 -> 2 whole (2 roll on), 18//4=4, 14//3=4, 10//2=5, 5
    assert sorted(takes.values()) == [2, 4, 4, 5, 5]
    for r in kept:
        assert r["cluster_quota"] == takes[r["cluster"]]
        assert r["cluster_size"] == len([x for x in everything if x["cluster"] == r["cluster"]])
        assert len(r["trajectory"]) == 4 and r["cluster_distance"] >= 0
    assert all(r["reject_reason"].startswith("cluster ") for r in rejected)


def test_selector_rejects_rows_without_a_trajectory(tmp_path):
    rows = trajectory_pool()
    rows[0] = {**rows[0], "trajectory": None}
    rows[1] = {**rows[1], "trajectory": [float("nan")] * 4}
    kept, rejected = run_selector(rows, tmp_path, budget=0.25, k=5, seed=1)
    assigned = [r for r in kept + rejected if r["cluster"] is not None]
    budget = int(0.25 * len(assigned) + 0.5)  # of the rows with a trajectory, half up: 24.5 -> 25
    expected, _ = reference_selection(assigned, budget, seed=1)
    assert {r["id"] for r in kept} == expected and len(kept) == budget == 25
    no_traj = sorted(r["reject_reason"] for r in rejected if r["cluster"] is None)
    assert no_traj == ["no usable trajectory: 'trajectory' has NaN or infinite values",
                       "no usable trajectory: no 'trajectory' value"]


# ---------------------------------------------------------------- trajectories

TEXTS = [("What is two plus two?", "Two plus two is four."),
         ("Write a function that adds two numbers in Python.", "def add(a, b): return a + b"),
         ("Natalia sold clips to 48 of her friends in April.", "She sold half as many clips in May."),
         ("You are a pirate captain. Describe your ship!", "Arr, she be the fastest ship on the seas."),
         ("The quick brown fox?", "It jumps over the lazy dog. 0123456789"),
         ("What is 7 times 6?", "Seven times six is 42, the answer.")]


def text_records(n=6):
    rows = []
    for i in range(n):
        q, a = TEXTS[i % len(TEXTS)]
        r = make_record([{"role": "user", "content": f"{q} ({i})"}, {"role": "assistant", "content": a}], "toy")
        r["origin"] = f"toy:{i + 1}"
        rows.append(r)
    return rows


@pytest.fixture(scope="module")
def proxy_run(tmp_path_factory, tiny_lm_dir):
    """A tiny LoRA proxy trained by the trainer stage, 3 checkpoints (steps 4, 8, 12)."""
    from curate.train import TrainConfig, train

    out = tmp_path_factory.mktemp("proxy")
    cfg = TrainConfig(model=str(tiny_lm_dir), max_steps=12, num_checkpoints=3, save_every=None,
                      batch_size=2, lora_r=4, lr=2e-2, warmup_ratio=0.0, max_length=128)
    train(text_records(), cfg, out, progress=False)
    return out


def direct_losses(base_dir, ckpt_dir, records):
    """Each checkpoint loaded on its own; HF logits, cross-entropy over response tokens."""
    import torch
    import torch.nn.functional as F

    from curate.formatting import encode
    from curate.train import load_checkpoint_model

    model, tok = load_checkpoint_model(str(base_dir), ckpt_dir, device="cpu", dtype="float32")
    out = []
    with torch.no_grad():
        for r in records:
            e = encode(r, tok, "plain", 512)
            ids = torch.tensor([e.input_ids])
            logits = model(input_ids=ids).logits[0].float()
            n, p = len(e.input_ids), e.prompt_len
            out.append(float(F.cross_entropy(logits[p - 1:n - 1], ids[0, p:n])))
    return out


def test_trajectories_equal_direct_loss_per_checkpoint_in_step_order(proxy_run, tiny_lm_dir, tmp_path):
    from curate.scorers.trajectory import TrajectoryScorer, discover_checkpoints

    records = text_records()
    found = discover_checkpoints(proxy_run)
    assert [c.step for c in found] == [4, 8, 12] and {c.kind for c in found} == {"lora"}
    scorer = TrajectoryScorer(checkpoints=str(proxy_run), model=str(tiny_lm_dir), device="cpu",
                              dtype="float32")
    scored = scorer.load_runner().score(records)
    got = np.array([r["trajectory"] for r in scored])
    expected = np.array([direct_losses(tiny_lm_dir, c.path.parent, records) for c in found]).T
    assert got.shape == (6, 3)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert (np.abs(np.diff(expected, axis=1)).max(axis=0) > 1e-3).all()  # the checkpoints differ

    # HF Trainer layout whose names sort differently as strings: checkpoint-12 < checkpoint-4
    hf = tmp_path / "hf"
    for c in found:
        shutil.copytree(c.path, hf / f"checkpoint-{c.step}")
    assert sorted(p.name for p in hf.iterdir()) == ["checkpoint-12", "checkpoint-4", "checkpoint-8"]
    assert [c.step for c in discover_checkpoints(hf)] == [4, 8, 12]
    hf_scorer = TrajectoryScorer(checkpoints=str(hf), model=str(tiny_lm_dir), device="cpu", dtype="float32")
    again = hf_scorer.load_runner().score(records)
    np.testing.assert_allclose([r["trajectory"] for r in again], expected, rtol=1e-5, atol=1e-5)
    # a subset of steps keeps step order
    sub = TrajectoryScorer(checkpoints=str(hf), model=str(tiny_lm_dir), steps=[12, 4], device="cpu")
    assert [c.step for c in sub.prepare()] == [4, 12]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_job_trains_proxy_scores_once_selects_deterministically(tmp_path, tiny_lm_dir, monkeypatch):
    from curate.config import parse_job
    from curate.pipeline.run import read_manifest, run_job
    # report.html is tested with the pipeline; its plots cost seconds per output here
    monkeypatch.setattr("curate.report.html.render_report", lambda *a, **k: None)

    import datasets

    pool = write_jsonl(tmp_path / "pool.jsonl", [
        {"question": f"{q} ({i})", "answer": a} for i, (q, a) in
        enumerate(TEXTS[i % len(TEXTS)] for i in range(24))])
    spec = {
        "inputs": [{"path": pool, "source": "toy"}],
        "scorers": [{"type": "trajectory", "model": str(tiny_lm_dir), "checkpoints": str(tmp_path / "proxy"),
                     "device": "cpu", "max_length": 128,
                     "proxy": {"data": [{"path": pool, "source": "toy"}], "max_steps": 6, "num_checkpoints": 3,
                               "batch_size": 4, "grad_accum": 1, "lora_r": 4, "lr": 2e-2}}],
        "scores": str(tmp_path / "scores"),
        "selectors": [{"type": "s2l", "budget": 10, "k": 100, "seed": 0}],  # k above the rows: lowered
        "output": str(tmp_path / "out"),
    }
    m1 = run_job(parse_job(spec))
    assert m1["counts"]["kept"] == 10 and m1["counts"]["not_selected"] == {"select:s2l": 14}
    scoring = read_manifest(str(tmp_path / "scores"))
    run = scoring["plan"]["scorers"][0]
    assert run["checkpoint_steps"] == [2, 4, 6] and run["proxy_run"]["n_train"] == 24
    kept = datasets.load_from_disk(str(tmp_path / "out")).to_list()
    rejected = datasets.load_from_disk(str(tmp_path / "out" / "rejected")).to_list()
    assert all(len(r["trajectory"]) == 3 and r["cluster_size"] >= 1 for r in kept)
    expected, _ = reference_selection(kept + rejected, 10, seed=0)
    assert {r["id"] for r in kept} == expected

    # the same job again: trajectories re-used (no training, no scoring), same selection
    proxy_metrics = (tmp_path / "proxy" / "metrics.json").read_text()
    m2 = run_job(parse_job({**spec, "output": str(tmp_path / "out2")}))
    assert m2["scores_from"] == str(tmp_path / "scores")
    assert read_manifest(str(tmp_path / "scores"))["created"] == scoring["created"]
    assert (tmp_path / "proxy" / "metrics.json").read_text() == proxy_metrics
    assert sorted(datasets.load_from_disk(str(tmp_path / "out2"))["id"]) == sorted(r["id"] for r in kept)


def test_full_model_checkpoints_swap_weights(tmp_path, tiny_lm_dir):
    """Full fine-tuning checkpoints: one model, its weights replaced per checkpoint."""
    from curate.train import TrainConfig, train
    from curate.scorers.trajectory import TrajectoryScorer

    records = text_records(4)
    cfg = TrainConfig(model=str(tiny_lm_dir), method="full", max_steps=4, checkpoint_steps=[2, 4],
                      save_every=None, batch_size=2, lr=1e-2, warmup_ratio=0.0, max_length=128)
    train(records, cfg, tmp_path, progress=False)
    scorer = TrajectoryScorer(checkpoints=str(tmp_path), model=str(tiny_lm_dir), device="cpu", dtype="float32")
    found = scorer.prepare()
    assert [(c.step, c.kind) for c in found] == [(2, "full"), (4, "full")]
    got = [r["trajectory"] for r in scorer.load_runner().score(records)]
    expected = np.array([direct_losses(c.path, c.path.parent, records) for c in found]).T
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_proxy_model_stage_trains_on_the_pool_after_the_jobs_filters(tmp_path, tiny_lm_dir, monkeypatch):
    """Without `proxy.data` the proxy trains on the job's own pool, read by the pipeline's
    readers and passed through its filters (here: a length filter drops 8 of 24 rows and
    a duplicate), in read order; the manifest records the model stage."""
    from curate.config import parse_job
    from curate.pipeline.run import run_job
    from curate.pipeline.model_stages import read_order
    monkeypatch.setattr("curate.report.html.render_report", lambda *a, **k: None)
    rows = [{"question": f"Question number {i}" + (" padded" * 40 if i % 3 == 0 else ""), "answer": f"Answer {i}."}
            for i in range(24)]
    pool = write_jsonl(tmp_path / "pool.jsonl", rows + [rows[1]])  # line 25 repeats line 2
    trained = []
    from curate.train import proxy

    real_train = proxy.train

    def spy_train(records, cfg, out, **kw):
        trained.append([r["origin"] for r in records])
        return real_train(records, cfg, out, **kw)

    monkeypatch.setattr(proxy, "train", spy_train)
    spec = {
        "inputs": [{"path": pool, "source": "toy"}],
        "filters": [{"type": "length", "unit": "chars", "max": 100}, {"type": "dedup"}],
        "scorers": [{"type": "trajectory", "model": str(tiny_lm_dir), "checkpoints": str(tmp_path / "proxy"),
                     "device": "cpu", "max_length": 64,
                     "proxy": {"max_steps": 2, "num_checkpoints": 2, "batch_size": 4, "lora_r": 4}}],
        "selectors": [{"type": "s2l", "budget": 4, "k": 2, "seed": 0}],
        "output": str(tmp_path / "out"),
    }
    m = run_job(parse_job(spec))
    assert m["counts"]["filtered"] == {"filter:length": 8, "filter:dedup": 1}
    expected = [f"pool.jsonl:{i + 1}" for i in range(24) if i % 3]
    assert trained == [expected]  # the 16 rows the scorer sees, in file order
    stage = m["model_stages"]["score:trajectory"]
    assert stage["n_train"] == 16 and stage["proxy_run"] == str(tmp_path / "proxy")
    # read order: file, then line as a number (line 10 after line 9)
    key = read_order(type("P", (), {"tasks": [type("T", (), {"name": "a"})(), type("T", (), {"name": "ab"})()]})())
    recs = [{"origin": o, "id": o} for o in ("ab:1", "a:10", "a:9", "a:9:2", "a:9:1")]
    assert [r["origin"] for r in sorted(recs, key=key)] == ["a:9", "a:9:1", "a:9:2", "a:10", "ab:1"]
