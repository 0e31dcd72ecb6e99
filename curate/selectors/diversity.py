"""Diversity: "Diversify and Conquer: Diversity-Centric Data Selection with Iterative
Refinement" (Yu, Chen, Ahmadian, Fadaee, 2024; code for-ai/iterative-data-selection).

kMQ (k-means-quality), the one-shot method:
  1. k-means on the example embeddings (the `embedding` column an embedding scorer
     writes); K given, or chosen by silhouette over `k_grid` on the training sample.
     faiss, trained on a bounded sample, every row assigned in parallel
     (`curate.selectors.shared.kmeans`).
  2. A budget per cluster: proportional to the cluster's size (the paper; default), or
     equal shares (`allocation: equal`, what the released code does).
  3. Inside each cluster, sample its budget without replacement with probability
     proportional to softmax(quality / temperature) of `quality_column` (the code's
     softmax, temperature 1), or uniformly when no quality column is set.

Iterative refinement (paper Algorithm 1), `rounds: N` (N > 1; the paper uses 3):
  round 1 draws B/N by the initial cluster weights (2.); after each round but the last,
  a model is fine-tuned on everything drawn so far (the trainer stage, LoRA by default),
  generates a response for each of those prompts, and each example gets
      S = -log(PPL(x + y_gen) / PPL(x + y_gold)) = mean logp(y_gen | x) - mean logp(y_gold | x)
  (response tokens only, under the fine-tuned model; `gap: reward` uses a reward model
  instead: S = r(x, y_gold) - r(x, y_gen)). Both read "how far the model still is from
  the gold answers": large S, more to learn. A cluster's score s_j is the mean S of its
  drawn examples, and its weight is updated multiplicatively, the paper's Eq. 6:
      w_j <- w_j * s_j / sum_c s_c
  (the released code replaces this with a plain softmax of the scores, dropping the
  previous weights: upstream issue #10; we follow the paper). The next round's B/N is
  allocated by the new weights.

Where we depart, and why:
  - Exact budgets. The code floors every cluster's share (int(B/K), or int(size/N * B)),
    so it selects fewer than B rows; we allocate by largest remainder and roll the share
    a cluster cannot fill (it is smaller than its share) over to the others, so exactly
    B rows are kept. Later rounds draw their B/N the same way from the cluster weights
    instead of the code's multinomial draw (np.random.choice with replacement): the
    expected counts, without the sampling noise, and exact.
  - Non-positive cluster scores. Eq. 6 needs s_j > 0 (gold better than the model's own
    answer). A cluster whose score is <= `score_floor` x (the best cluster's score) uses
    that floor (default 0.05): it keeps a small positive weight and can still be drawn,
    instead of a zero or negative weight. A cluster none of whose rows were scored (none
    drawn yet) uses the mean score, which leaves its weight where it was relative to
    the others. When no cluster scores above 0, the weights stay as they were.
  - Sampling is the Efraimidis-Spirakis / Gumbel-top-k form of weighted sampling without
    replacement: each row gets key = quality / temperature + Gumbel(u), u a hash of
    (seed, id, origin); a cluster keeps its n_c largest keys. That is exactly sequential
    sampling with softmax probabilities (np.random.choice(replace=False, p=softmax) in
    the code), but parallel and the same on every rerun. Later rounds continue down the
    same key order, which is sampling the next rows without replacement from what is
    left. Rows with a missing or NaN quality score rank after every scored row.
  - Embedding text: the paper embeds prompt and response, the code only user turns; that
    choice is the embedding scorer's (this selector reads whichever vectors it is given).
  - k-means defaults: see `curate.selectors.shared.kmeans` (niter 20, 1 run; the code uses
    300 x 5 on GPU).

Scale. The records are never collected: k-means trains on a sample of at most
`sample_size` vectors; cluster sizes are a Combine; each cluster's *sampling keys* (a
float and the row's origin and id, ~100 bytes a row) are grouped to find its cut-off, so
the keys of the largest cluster must fit in one worker (10M rows in 100 clusters: ~10 MB
a cluster); the cut-offs (K values) go back as a side input and every row is kept or
rejected in parallel. Iterative refinement additionally gathers the rows drawn so far
(at most the budget: the training set) on one worker, which trains, generates and
scores there: a model inside the selector, the one exception to "selectors never load
a model", because the method needs one between rounds. Each refinement is a step of the
same Beam pipeline (no driver loop), so the job stays one run with one manifest.

Output columns (kept and not-kept rows alike, where known): `cluster`,
`cluster_distance`, `cluster_size`, `cluster_budget` (rows the cluster gave, all rounds),
`diversity_key` (the sampling key), `diversity_round` (the round a kept row was drawn
in), `cluster_weight` (its cluster's normalised weight in that round), `diversity_gap`
(the row's latest S, when it was scored in a refinement step). The rejected reason names
the cluster's budget and its weight and quota in every round. With `work_dir`, each
round's trainer output and `diversity_rounds.json` (weights, quotas, cluster scores and
the ids drawn per round) are written there.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Callable, Sequence

import apache_beam as beam
import numpy as np
import pyarrow as pa

from curate.config import ConfigError, parse_budget
from curate.selectors.base import Selector
from curate.selectors.diversity_plan import (ALLOCATIONS, jsonable, cut_offs, first_plan, next_plan, normalised,
                                             round_of, row_key, sampling_key)
from curate.selectors.shared.kmeans import METRICS, UNASSIGNED, AssignClusters, TrainKMeans, faiss_device
from curate.steps import ModelStage

log = logging.getLogger(__name__)

GAPS = ("perplexity", "reward")
DEFAULT_K_GRID = (8, 16, 32, 64, 128)


# ---------------------------------------------------------------- the selector


def _key_desc(keys):
    return sorted(keys, reverse=True)


class DiversitySelector(Selector):
    type = "diversity"
    title = "kMQ diversity"
    report_section = "curate.report.sections:kmq_section"
    draws_clusters = True

    def __init__(self, budget: int | float, embedding_column: str = "embedding",
                 k: int | str = "auto", k_grid: Sequence[int] = DEFAULT_K_GRID,
                 sample_size: int = 100_000, search_rows: int = 20_000, silhouette_rows: int = 5000,
                 metric: str = "l2", niter: int = 20, nredo: int = 1, init: str = "kmeans++",
                 allocation: str = "proportional", quality_column: str | None = None,
                 temperature: float = 1.0, seed: int = 0, rounds: int = 1,
                 score_floor: float = 0.05, gap: str = "perplexity", model: str = "default",
                 reward_model: str | None = None, template: str = "plain", max_length: int = 512,
                 max_new_tokens: int = 64, batch_size: int = 8, train: dict | None = None,
                 device: str = "auto", dtype: str = "auto", work_dir: str | None = None,
                 gpu: bool | str = "auto", gap_fn: Callable | None = None):
        super().__init__()
        where = "diversity selector"
        self.budget = parse_budget(budget, where)
        if k == "auto":
            self.k = None
            self.k_grid = tuple(int(g) for g in k_grid)
            if not self.k_grid or min(self.k_grid) < 2:
                raise ConfigError(f"{where}: k_grid needs K values >= 2, got {list(k_grid)!r}")
        elif isinstance(k, int) and not isinstance(k, bool) and k >= 1:
            self.k, self.k_grid = k, ()
        else:
            raise ConfigError(f"{where}: k must be a positive integer or 'auto', got {k!r}")
        if allocation not in ALLOCATIONS:
            raise ConfigError(f"{where}: allocation {allocation!r}, expected one of {ALLOCATIONS}")
        if metric not in METRICS:
            raise ConfigError(f"{where}: metric {metric!r}, expected one of {METRICS}")
        if gap not in GAPS:
            raise ConfigError(f"{where}: gap {gap!r}, expected one of {GAPS}")
        if gap == "reward" and not reward_model and gap_fn is None:
            raise ConfigError(f"{where}: gap: reward needs reward_model (an HF id or path)")
        if not (isinstance(rounds, int) and rounds >= 1):
            raise ConfigError(f"{where}: rounds must be a positive integer, got {rounds!r}")
        if not temperature > 0:
            raise ConfigError(f"{where}: temperature must be > 0")
        if not 0 < score_floor <= 1:
            raise ConfigError(f"{where}: score_floor must be in (0, 1]")
        for name, value in (("sample_size", sample_size), ("search_rows", search_rows),
                            ("silhouette_rows", silhouette_rows), ("niter", niter), ("nredo", nredo)):
            if not (isinstance(value, int) and value >= 1):
                raise ConfigError(f"{where}: {name} must be a positive integer, got {value!r}")
        self.embedding_column, self.sample_size = embedding_column, sample_size
        self.search_rows, self.silhouette_rows = search_rows, silhouette_rows
        self.metric, self.niter, self.nredo, self.init = metric, niter, nredo, init
        self.allocation, self.quality_column = allocation, quality_column
        self.temperature, self.seed, self.rounds = float(temperature), int(seed), rounds
        self.score_floor, self.gap, self.work_dir, self.gpu = float(score_floor), gap, work_dir, gpu
        self.refine = {"model": model, "gap": gap, "reward_model": reward_model, "template": template,
                       "max_length": max_length, "max_new_tokens": max_new_tokens,
                       "batch_size": batch_size, "train": dict(train or {}), "device": device,
                       "dtype": dtype}
        self.gap_fn = gap_fn  # the refinement's model stage: given here (tests) or by the plan
        self.requires = (embedding_column,) + ((quality_column,) if quality_column else ())

    def resources(self) -> dict:
        if self.rounds > 1:  # the refinement trains, generates and scores with its model
            return {"device": self.refine["device"], "model": self.refine["model"]}
        return {"device": faiss_device(self.gpu), "model": None}

    def model_stage(self) -> ModelStage | None:
        """Iterative refinement trains, generates and scores between rounds: the plan builds
        that from `refine` (curate.train.refine) unless a gap function was given."""
        return ModelStage("refine", self.refine) if self.rounds > 1 and self.gap_fn is None else None

    def use_model_stage(self, stage) -> None:
        self.gap_fn = stage

    def output_columns(self):
        return {"cluster": pa.int64(), "cluster_distance": pa.float64(), "cluster_size": pa.int64(),
                "cluster_budget": pa.int64(), "diversity_key": pa.float64(),
                "diversity_round": pa.int64(), "cluster_weight": pa.float64(),
                "diversity_gap": pa.float64()}

    def describe(self):
        d = {"type": self.type, "budget": self.budget, "embedding_column": self.embedding_column,
             "k": self.k if self.k is not None else "auto", "k_grid": list(self.k_grid),
             "sample_size": self.sample_size, "metric": self.metric, "niter": self.niter,
             "nredo": self.nredo, "init": self.init, "allocation": self.allocation,
             "quality_column": self.quality_column, "temperature": self.temperature,
             "seed": self.seed, "rounds": self.rounds}
        if self.rounds > 1:
            d.update({"score_floor": self.score_floor, "refine": self.refine, "work_dir": self.work_dir})
        return d

    # -------------------------------------------------------------- the graph

    def expand(self, pcoll):
        column, seed, qcol, temp = self.embedding_column, self.seed, self.quality_column, self.temperature
        budget, rounds, allocation = self.budget, self.rounds, self.allocation
        score_floor = self.score_floor

        n_input = pcoll | "CountInput" >> beam.combiners.Count.Globally()
        # silhouette searches a prefix of the (hash-ordered, so uniform) sample
        model = pcoll | "KMeans" >> TrainKMeans(
            column, k=self.k, grid=self.k_grid, sample_size=self.sample_size, seed=seed,
            niter=self.niter, metric=self.metric, nredo=self.nredo, init=self.init,
            silhouette_rows=self.silhouette_rows, gpu=self.gpu, search_rows=self.search_rows)
        assigned = pcoll | "Assign" >> AssignClusters(model, column, "cluster_distance", gpu=self.gpu)
        clustered = assigned["assigned"]

        def keyed(r):
            return r["cluster"], sampling_key(r, seed, qcol, temp)

        keys = clustered | "SamplingKey" >> beam.Map(keyed)
        sizes = (keys | "ClusterOf" >> beam.Map(lambda kv: kv[0])
                 | "CountPerCluster" >> beam.combiners.Count.PerElement()
                 | "Sizes" >> beam.combiners.ToDict())
        # per cluster: its rows' keys only, best first (the one per-cluster gather)
        orders = keys | "KeysByCluster" >> beam.GroupByKey() | "Order" >> beam.MapTuple(
            lambda c, ks: (c, _key_desc(ks)))

        def plan_one(_, sizes, n, model):
            return first_plan(sizes, n, budget, rounds, allocation,
                              model.describe() if model is not None else None)

        plan = (pcoll.pipeline | "Start" >> beam.Create([None])
                | "Plan1" >> beam.Map(plan_one, sizes=beam.pvalue.AsSingleton(sizes),
                                      n=beam.pvalue.AsSingleton(n_input),
                                      model=beam.pvalue.AsSingleton(model)))
        cuts = []
        for r in range(1, rounds + 1):
            cut = (orders | f"Cuts{r}" >> beam.Map(
                lambda kv, plan: cut_offs(kv[0], kv[1], plan), plan=beam.pvalue.AsSingleton(plan))
                   | f"CutDict{r}" >> beam.combiners.ToDict())
            cuts.append(cut | f"Tag{r}" >> beam.Map(lambda d, r=r: (r, d)))
            if r == rounds:
                break

            def drawn_so_far(rec, cut):
                c = cut.get(rec["cluster"])
                return c is not None and tuple(sampling_key(rec, seed, qcol, temp)) >= tuple(c)

            so_far = (clustered | f"Drawn{r}" >> beam.Filter(drawn_so_far, cut=beam.pvalue.AsSingleton(cut))
                      | f"Gather{r}" >> beam.combiners.ToList())
            plan = plan | f"Refine{r}" >> beam.Map(
                _RefineStep(self.refine, self.gap_fn, score_floor, seed, self.work_dir),
                selected=beam.pvalue.AsSingleton(so_far))
        cuts_by_round = cuts | "AllCuts" >> beam.Flatten() | "CutsByRound" >> beam.combiners.ToDict()
        if self.work_dir:
            drawn = clustered | "RoundOf" >> beam.FlatMap(
                _drawn_in, cuts=beam.pvalue.AsSingleton(cuts_by_round), seed=seed, qcol=qcol, temp=temp)
            ids_by_round = drawn | "IdsByRound" >> beam.GroupByKey()
            _ = (plan | "WriteRounds" >> beam.Map(
                _write_history, work_dir=self.work_dir, ids=beam.pvalue.AsDict(ids_by_round)))

        def split(rec, plan, cuts):
            key = sampling_key(rec, seed, qcol, temp)
            c = rec["cluster"]
            rnd = round_of(key, c, cuts)
            given = sum(h["quotas"].get(c, 0) for h in plan["history"])
            out = {**rec, "cluster_size": plan["sizes"].get(c, 0), "cluster_budget": given,
                   "diversity_key": float(key[1]) if key[0] else None,
                   "diversity_gap": plan["gaps"].get(row_key(rec))}
            if rnd is not None:
                weights = normalised(plan["history"][rnd - 1]["weights"])
                yield {**out, "diversity_round": rnd, "cluster_weight": weights.get(c)}
                return
            yield beam.pvalue.TaggedOutput("rejected", {**out, "reject_reason": _why_not(
                key, c, plan, cuts[max(cuts)].get(c))})

        out = clustered | "Split" >> beam.FlatMap(
            split, plan=beam.pvalue.AsSingleton(plan),
            cuts=beam.pvalue.AsSingleton(cuts_by_round)).with_outputs("rejected", main="kept")
        no_vector = assigned[UNASSIGNED] | "NoVector" >> beam.MapTuple(
            lambda rec, why: {**rec, "reject_reason": f"{why}: cannot be clustered"})
        rejected = (out.rejected, no_vector) | "Rejected" >> beam.Flatten()
        return {"kept": out.kept, "rejected": rejected}


def _why_not(key: tuple, cluster: int, plan: dict, last_cut) -> str:
    size = plan["sizes"].get(cluster, 0)
    given = sum(h["quotas"].get(cluster, 0) for h in plan["history"])
    if plan["rounds"] == 1:
        how = f"{plan['allocation']} allocation of {plan['budget']}"
    else:
        per_round = "; ".join(f"round {h['round']} weight {normalised(h['weights']).get(cluster, 0.0):.4g} "
                              f"quota {h['quotas'].get(cluster, 0)}" for h in plan["history"])
        how = f"{plan['rounds']} rounds of {plan['round_budgets']}: {per_round}"
    head = f"cluster {cluster} ({size} rows) gave {given} ({how})"
    if given == 0 or last_cut is None:
        return f"{head}; none drawn from it"
    mine = f"{key[1]:.4f}" if key[0] else "unscored"
    cut = f"{last_cut[1]:.4f}" if last_cut[0] else "unscored"
    return f"{head}; sampling key {mine} below its last drawn {cut}"


def _drawn_in(rec: dict, cuts, seed, qcol, temp):
    rnd = round_of(sampling_key(rec, seed, qcol, temp), rec["cluster"], cuts)
    if rnd is not None:
        yield rnd, rec["id"]


def _write_history(plan: dict, work_dir: str, ids: dict) -> None:
    from apache_beam.io.filesystems import FileSystems

    doc = {k: v for k, v in plan.items() if k != "gaps"}
    doc["selected_ids"] = {str(r): sorted(v) for r, v in sorted(ids.items())}
    if "://" not in work_dir:
        os.makedirs(work_dir, exist_ok=True)
    path = FileSystems.join(work_dir, "diversity_rounds.json")
    with FileSystems.create(path) as fh:
        fh.write(json.dumps(doc, indent=2, default=jsonable).encode())


class _RefineStep:
    """One refinement step: the rows drawn so far -> S per row -> the next plan.

    Runs once per round on one worker (a Map over the one-element plan collection); the
    model is loaded there (lazily, once per worker) by `gap_fn`: the model stage the plan
    attached (curate.train.refine's perplexity/reward gap) or one given directly."""

    def __init__(self, refine: dict, gap_fn: Callable | None, score_floor: float, seed: int,
                 work_dir: str | None):
        self.refine, self.gap_fn, self.score_floor = refine, gap_fn, score_floor
        self.seed, self.work_dir = seed, work_dir

    def _gap_fn(self):
        if self.gap_fn is None:
            raise RuntimeError("diversity: rounds > 1 needs its model stage; build the selector through "
                               "the pipeline's plan (curate.pipeline.plan.Plan), which attaches it")
        return self.gap_fn

    def __call__(self, plan: dict, selected: list[dict]) -> dict:
        round_index = len(plan["history"])
        rows = sorted(selected, key=row_key)  # a fixed order: training is deterministic
        if not rows:
            return next_plan(plan, [], [], [], self.score_floor, {"note": "nothing drawn"})
        result = self._gap_fn()(rows, round_index=round_index, seed=self.seed + round_index,
                                work_dir=self.work_dir)
        gaps, info = (result if isinstance(result, tuple) else (result, {}))
        gaps = [float(g) for g in gaps]
        if len(gaps) != len(rows):
            raise RuntimeError(f"refinement returned {len(gaps)} scores for {len(rows)} rows")
        log.info("diversity round %d: %d rows scored, mean S %.4f", round_index, len(rows),
                 float(np.nanmean(gaps)) if gaps else float("nan"))
        return next_plan(plan, [r["cluster"] for r in rows], [row_key(r) for r in rows], gaps,
                         self.score_floor, info)
