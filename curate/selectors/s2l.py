"""S2L, SmallToLarge: "Scalable Data Selection for Fine-tuning Large Language Models by
Summarizing Training Trajectories of Small Models" (Yang et al., NeurIPS 2024),
code BigML-CS-UCLA/S2L.

A small proxy model is fine-tuned on the whole pool and saved T times; the loss of every
example at each checkpoint is its *trajectory* (the `trajectory` column, written by the
`trajectory` scorer, `curate.scorers.trajectory`). Examples with similar trajectories
affect training alike, so the selection clusters the trajectories and samples the
clusters evenly, favouring the small (rare-behaviour) clusters over the large ones:

1. k-means on the raw trajectories (no normalisation), K = 100 (paper), faiss with
   20 iterations (authors' code), l2 metric.
2. Balanced sampling for a budget B (`shared.quotas.balanced_quotas`): visit the clusters from the
   smallest to the largest; each gets quota = remaining budget // clusters remaining;
   a cluster smaller than its quota is taken whole and what it leaves rolls forward to
   the larger ones; a larger one gives a uniform random sample of its quota.
3. `stratify_by: source` is every selector's (curate.selectors.shared.strata): the budget
   is shared among the sources first (proportionally; `stratify_shares: equal` is the
   balanced rule above) and S2L runs in each source alone, its own k-means included.

Defaults: k=100, niter=20, seed=0, faiss' random initialisation (the authors' code;
`init: kmeans++` and `nredo` are offered: random init can merge small clusters). Ties between equally sized clusters are visited in
cluster-id order (the authors' code leaves this to numpy's sort).

As Beam transforms with small global state only: k-means trains on a bounded hash
sample (`curate.selectors.shared.kmeans.SampleVectors`), every row is assigned in parallel
(`AssignClusters`, centroids as a side input); rows per cluster are counted
(a combiner) and turned into quotas in one place (a dict of at most K numbers,
a side input); then each cluster's sample is its `quota` rows with the smallest
hash(seed, id, origin): a uniform sample without replacement, the same on every rerun
and runner. Only those (key, origin, id) tuples are grouped per cluster, never records.

Departures from the authors' code, and why:
- Checkpoints are ordered by training step (the released code globs them unsorted,
  so a trajectory's coordinates can come in any order; see the scorer).
- Uniform sampling inside a cluster draws by hash key rather than numpy's RNG: the
  same distribution, but independent of worker count and element order.
- K larger than the number of rows with a trajectory is lowered to that number (with
  a warning) instead of failing, so small pools run.

A budget is a count, or a fraction of the rows that have a trajectory (rows without a
usable one, missing or non-finite, are rejected with that reason before sampling).

Kept rows carry `cluster`, `cluster_size`, `cluster_quota` (rows the cluster gives) and
`cluster_distance` (to its centroid); a rejected row
says which cluster it was in, its quota and its sample key against the cut-off.
"""

from __future__ import annotations

import logging
from typing import Mapping

import apache_beam as beam
import numpy as np
import pyarrow as pa

from curate.config import ConfigError, parse_budget, resolve_budget
from curate.selectors.base import Selector
from curate.selectors.shared.keys import hash_unit
from curate.selectors.shared.kmeans import UNASSIGNED, AssignClusters, SampleVectors, fit_model
from curate.selectors.shared.quotas import balanced_plan

log = logging.getLogger(__name__)

KEPT, REJECTED = "kept", "rejected"


# ---------------------------------------------------------------- the math


def sample_key(seed: int, record: dict) -> float:
    """u in [0, 1) from (seed, id, origin): the in-cluster sampling order. Salted apart
    from the k-means training sample's hash so the two draws are independent."""
    return hash_unit(seed, record, "s2l")


def quota_table(sizes: Mapping[int, int], budget: int | float) -> dict:
    """The side input: {cluster: {size, take, offered}}."""
    b = resolve_budget(budget, sum(sizes.values()))
    return {c: {"size": n, "offered": offered, "take": take} for c, n, offered, take in balanced_plan(sizes, b)}


def cluster_cutoff(keys: list[tuple], take: int) -> tuple | None:
    """The largest sample key kept in a cluster (None: nothing kept)."""
    if take <= 0:
        return None
    return sorted(keys)[min(take, len(keys)) - 1]


# ---------------------------------------------------------------- Beam


def _fit(sample: np.ndarray, k: int, seed: int, niter: int, init: str, nredo: int):
    if sample.size == 0:
        return None
    if k > len(sample):
        log.warning("s2l: k=%d but only %d rows have trajectories in the k-means sample; "
                    "using k=%d", k, len(sample), len(sample))
        k = len(sample)
    return fit_model(sample, k, seed=seed, niter=niter, metric="l2", init=init, nredo=nredo)


class S2LSelector(Selector):
    type = "s2l"
    title = "S2L (SmallToLarge)"
    report_section = "curate.report.sections:s2l_section"
    draws_clusters = True

    def __init__(self, budget: int | float, k: int = 100, seed: int = 0, niter: int = 20,
                 sample_size: int = 100_000, column: str = "trajectory", init: str = "random",
                 nredo: int = 1):
        super().__init__()
        self.budget = parse_budget(budget, "s2l selector")
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ConfigError(f"s2l: k must be a positive integer, got {k!r}")
        if int(niter) < 1 or int(sample_size) < 1:
            raise ConfigError("s2l: niter and sample_size must be >= 1")
        self.k, self.seed, self.niter, self.sample_size = k, int(seed), int(niter), int(sample_size)
        self.column = column
        if init not in ("random", "kmeans++"):
            raise ConfigError(f"s2l: init must be 'random' (faiss' default, the authors' code) "
                              f"or 'kmeans++', got {init!r}")
        self.init, self.nredo = init, int(nredo)
        self.requires = (column,)

    def output_columns(self):
        return {"cluster": pa.int64(), "cluster_distance": pa.float64(),
                "cluster_size": pa.int64(), "cluster_quota": pa.int64()}

    def describe(self):
        return {"type": self.type, "budget": self.budget, "k": self.k, "seed": self.seed,
                "niter": self.niter, "sample_size": self.sample_size,
                "column": self.column, "init": self.init,
                "nredo": self.nredo}

    def expand(self, pcoll):
        k, seed, niter, budget = self.k, self.seed, self.niter, self.budget
        columns = self.output_columns()

        def cluster(r):
            return int(r["cluster"])

        model = (pcoll
                 | "Sample" >> SampleVectors(self.column, self.sample_size, seed)
                 | "KMeans" >> beam.Map(_fit, k, seed, niter, self.init, self.nredo))
        assigned = pcoll | "Assign" >> AssignClusters(model, self.column, "cluster_distance")

        table = (assigned["assigned"]
                 | "One" >> beam.Map(lambda r: (cluster(r), 1))
                 | "Sizes" >> beam.CombinePerKey(sum)
                 | "SizeDict" >> beam.combiners.ToDict()
                 | "Quotas" >> beam.Map(quota_table, budget))

        def keyed(r):
            return cluster(r), (sample_key(seed, r), r["origin"], r["id"])

        def cutoff(group, table):
            key, keys = group
            return key, cluster_cutoff(list(keys), table[key]["take"])

        cutoffs = (assigned["assigned"]
                   | "Keys" >> beam.Map(keyed)
                   | "ByCluster" >> beam.GroupByKey()
                   | "Cutoff" >> beam.Map(cutoff, table=beam.pvalue.AsSingleton(table))
                   | "CutoffDict" >> beam.combiners.ToDict())

        def split(r, table, cutoffs):
            key = cluster(r)
            q = table[key]
            r = {**r, "cluster_size": q["size"], "cluster_quota": q["take"]}
            skey = (sample_key(seed, r), r["origin"], r["id"])
            cut = cutoffs[key]
            where = f"cluster {key}"
            if cut is not None and skey <= cut:
                yield r
            elif q["take"] == 0:
                yield beam.pvalue.TaggedOutput(REJECTED, {**r, "reject_reason": (
                    f"{where} ({q['size']} rows) gets no quota: budget spent on smaller clusters")})
            else:
                yield beam.pvalue.TaggedOutput(REJECTED, {**r, "reject_reason": (
                    f"{where} ({q['size']} rows) gives a random {q['take']} (quota "
                    f"{q['offered']}); sample key {skey[0]:.6f} above its cut-off {cut[0]:.6f} "
                    f"(seed {seed})")})

        out = (assigned["assigned"]
               | "Split" >> beam.FlatMap(split, table=beam.pvalue.AsSingleton(table),
                                         cutoffs=beam.pvalue.AsSingleton(cutoffs))
               .with_outputs(REJECTED, main=KEPT))

        def unassigned(item):
            r, why = item
            return {**{c: None for c in columns}, **r, "reject_reason": f"no usable trajectory: {why}"}

        no_traj = assigned[UNASSIGNED] | "NoTrajectory" >> beam.Map(unassigned)
        rejected = (out[REJECTED], no_traj) | "Rejected" >> beam.Flatten()
        return {KEPT: out[KEPT], REJECTED: rejected}
