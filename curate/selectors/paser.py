"""PASER: "PASER: Post-training Data Selection for Efficient Pruned Large Language Model
Recovery" (He et al., 2025), code BokwaiHo/PASER. docs/methods.md ("PASER") is the spec.

Recovery data for a pruned model: spend the budget on the capabilities pruning hurt most,
and inside each on the examples it hurt most per unit of training cost, without
admitting examples whose concepts contradict what was already selected.

1. Capability clusters: spectral clustering of the `embedding` column
   (`curate.selectors.shared.spectral`: sparse kNN diffusion kernel, NMF; K given, default 10
   as the code, or "auto" by the NMF reconstruction-error elbow as the paper).
2. Degradation: `jsd` per example from the `degradation` scorer (mean JSD in nats
   between the original and pruned models' next-token distributions over the response).
   Cluster degradation CDS_k = mean `jsd` over the cluster's examples (a NaN `jsd`,
   an example truncated to no response token, is left out of the mean).
3. Budget: n_k = floor(B * CDS_k / sum_j CDS_j), each capped at what the cluster can
   give; the leftover is shared again by the same rule among clusters with room, until
   the total is exactly B (`shared.quotas.cds_shares`; when a round's floors are all 0, single
   units go to the largest fractional shares, then higher CDS, then lower cluster id).
   The code floors once and drops the remainder, so it selects fewer than B.
4. Order inside a cluster: IES = jsd / log(cost), cost = the example's token count
   (`jsd_total_tokens`: prompt + response as scored; the code mixes prompt tokens with
   response characters, and squares the sum, which only halves every IES and keeps the
   order). Guard: cost is clamped to at least 2 tokens, so log(cost) >= ln 2 > 0 and
   IES is finite with the sign of jsd. Ties: id, then origin.
5. Concept Consistency Graph (`curate.selectors.shared.concept_graph`): in priority order, accept an
   example unless two of its key-phrase concepts are known but were never accepted
   together; on acceptance link all its concepts. Each cluster stops when its budget is
   met.

What a cluster "can give" is the number of examples its CCG accepts when run to the
end of the cluster (`capacity`); stopping at a budget n takes exactly the first n of
those (a decision never depends on later examples), so budgets are sized after the
CCG has run, and a cluster that runs out of acceptable examples hands its leftover to
the redistribution in step 3. If the CCG lets fewer than B examples through in total,
all of them are kept (fewer than B).

Departure from the paper and the code: one CCG per cluster, not one shared graph.
The code visits clusters in id order with a single graph, so a cluster's selection
depends on the arbitrary numbering of the clusters before it; per-cluster graphs
remove that and let clusters run in parallel. Concepts shared across clusters are
therefore not checked against each other.

Beam shape and memory: only small keys travel to the per-cluster step ((ies, jsd,
id, origin, concepts) per example, ~200 bytes), grouped by cluster; a worker holds one
cluster's keys (e.g. 1M examples, K = 10: ~20 MB). Decisions are joined back to the
records by (id, origin). Budgets are computed from per-cluster (size, CDS, capacity)
in one place and handed back as a side input.

Columns (kept and rejected rows): `cluster`, `cds`, `cluster_budget`, `ies`,
`cluster_rank` (1 = highest IES in the cluster), `concepts`. Rejected rows say why:
"CCG conflict: concepts 'x' and 'y' known but never accepted together" or
"over cluster budget: ...".
"""

from __future__ import annotations

import math

import apache_beam as beam
import pyarrow as pa

from curate.config import ConfigError, parse_budget, resolve_budget
from curate.selectors.base import Selector
from curate.selectors.shared.concept_graph import record_concepts, run_ccg
from curate.selectors.shared.quotas import cds_shares
from curate.selectors.shared.spectral import DEFAULT_K_GRID, NONNEG, SpectralClusters

MIN_COST_TOKENS = 2


# ------------------------------------------------------------------ pure functions
def ies(jsd: float | None, cost: float | None) -> float:
    """Information-efficiency score jsd / log(max(cost, 2)); -inf when jsd is missing."""
    if jsd is None or (isinstance(jsd, float) and math.isnan(jsd)):
        return -math.inf
    return float(jsd) / math.log(max(float(cost or 0), MIN_COST_TOKENS))


def priority_key(item: dict) -> tuple:
    """Sort key inside a cluster: highest IES first, then id, then origin."""
    return (-item["ies"], item["id"], item["origin"])


def cluster_decisions(items: list[dict]) -> tuple[list[dict], dict]:
    """Run one cluster's CCG in priority order; returns (per-item decisions, cluster stats)."""
    items = sorted(items, key=priority_key)
    results = run_ccg([it["concepts"] for it in items])
    decisions = []
    for rank, (it, (accept_rank, pair, before)) in enumerate(zip(items, results), 1):
        decisions.append({"id": it["id"], "origin": it["origin"], "ies": it["ies"],
                          "concepts": it["concepts"], "cluster_rank": rank,
                          "accept_rank": accept_rank, "conflict": pair, "accepted_before": before})
    finite = [it["jsd"] for it in items if it["jsd"] is not None and not math.isnan(it["jsd"])]
    stats = {"size": len(items), "capacity": sum(r[0] is not None for r in results),
             "cds": sum(finite) / len(finite) if finite else 0.0}
    return decisions, stats


def verdict(decision: dict, budget: int, capacity: int) -> str | None:
    """None when kept, else the reason (see the module docstring)."""
    accept_rank = decision["accept_rank"]
    if accept_rank is not None and accept_rank < budget:
        return None
    # the sequential loop reaches a candidate while fewer than `budget` were accepted
    # before it; a cluster whose budget is its capacity was read to the end
    reached = decision["accepted_before"] < budget or budget >= capacity
    if decision["conflict"] is not None and reached:
        a, b = decision["conflict"]
        return f"CCG conflict: concepts {a!r} and {b!r} known but never accepted together"
    return (f"over cluster budget: cluster rank {decision['cluster_rank']}, budget {budget} already "
            f"filled by higher-IES examples")


# ------------------------------------------------------------------ Beam
class PaserSelector(Selector):
    """PASER selection (see the module docstring). Options:

    budget (count or fraction), embedding_column ("embedding"), jsd_column ("jsd"),
    cost_column ("jsd_total_tokens"; "jsd_tokens" counts the response only),
    n_clusters (10, or "auto"), k_neighbors (15), n_eigenvectors (K, or the largest K of
    k_grid when auto), diffusion_time (0: plain eigenvectors), k_grid (2..20), nonneg
    ("split" | "shift"), sample_size (20,000 fitted; the rest by nearest neighbour),
    n_concepts (5 key phrases), concept_text ("prompt_response" | "prompt"), seed.
    """

    type = "paser"
    title = "PASER"
    report_section = "curate.report.sections:paser_section"
    draws_clusters = True

    def __init__(self, budget: int | float, embedding_column: str = "embedding", jsd_column: str = "jsd",
                 cost_column: str = "jsd_total_tokens", n_clusters: int | str = 10, k_neighbors: int = 15,
                 n_eigenvectors: int | None = None, diffusion_time: float = 0.0,
                 k_grid: list[int] | tuple[int, ...] = DEFAULT_K_GRID, nonneg: str = "split",
                 sample_size: int = 20_000, n_concepts: int = 5, concept_text: str = "prompt_response",
                 seed: int = 0):
        super().__init__()
        self.budget = parse_budget(budget, "paser selector")
        if n_clusters != "auto" and (not isinstance(n_clusters, int) or isinstance(n_clusters, bool)
                                     or n_clusters < 1):
            raise ConfigError(f"paser: n_clusters must be a positive integer or 'auto', got {n_clusters!r}")
        if nonneg not in NONNEG:
            raise ConfigError(f"paser: nonneg must be one of {NONNEG}, got {nonneg!r}")
        if concept_text not in ("prompt_response", "prompt"):
            raise ConfigError(f"paser: concept_text must be 'prompt_response' or 'prompt', got {concept_text!r}")
        if int(k_neighbors) < 1 or int(sample_size) < 2 or int(n_concepts) < 1:
            raise ConfigError("paser: k_neighbors and n_concepts must be >= 1, sample_size >= 2")
        self.embedding_column, self.jsd_column, self.cost_column = embedding_column, jsd_column, cost_column
        self.cluster_options = dict(n_clusters=n_clusters, k_neighbors=int(k_neighbors),
                                    n_eigenvectors=n_eigenvectors, diffusion_time=float(diffusion_time),
                                    k_grid=tuple(int(k) for k in k_grid), nonneg=nonneg,
                                    sample_size=int(sample_size), seed=int(seed))
        self.n_concepts, self.concept_text = int(n_concepts), concept_text
        self.requires = (jsd_column, embedding_column, cost_column)

    def output_columns(self):
        return {"cluster": pa.int64(), "cds": pa.float64(), "cluster_budget": pa.int64(), "ies": pa.float64(),
                "cluster_rank": pa.int64(), "concepts": pa.list_(pa.string())}

    def describe(self):
        return {"type": self.type, "budget": self.budget, "embedding_column": self.embedding_column,
                "jsd_column": self.jsd_column, "cost_column": self.cost_column,
                **{k: (list(v) if isinstance(v, tuple) else v) for k, v in self.cluster_options.items()},
                "n_concepts": self.n_concepts, "concept_text": self.concept_text,
                "ccg": "one graph per cluster"}

    def expand(self, pcoll):
        jsd_col, cost_col = self.jsd_column, self.cost_column
        n_concepts, concept_text, budget = self.n_concepts, self.concept_text, self.budget

        clustered, _ = pcoll | "Cluster" >> SpectralClusters(self.embedding_column, **self.cluster_options)

        def key_item(r):
            jsd = r.get(jsd_col)
            jsd = None if jsd is None else float(jsd)
            return r["cluster"], {"id": r["id"], "origin": r.get("origin", ""), "jsd": jsd,
                                  "ies": ies(jsd, r.get(cost_col)),
                                  "concepts": record_concepts(r, n_concepts, concept_text)}

        def decide(group):
            cluster, items = group
            decisions, stats = cluster_decisions(list(items))
            for d in decisions:
                yield (d["id"], d["origin"]), {**d, "cluster": cluster}
            yield beam.pvalue.TaggedOutput("stats", (cluster, stats))

        decided = (clustered
                   | "KeyItems" >> beam.Map(key_item)
                   | "ByCluster" >> beam.GroupByKey()
                   | "CCG" >> beam.FlatMap(decide).with_outputs("stats", main="decisions"))

        def budgets(stats):
            stats = dict(stats)
            n = sum(s["size"] for s in stats.values())
            alloc = cds_shares(resolve_budget(budget, n), {c: s["cds"] for c, s in stats.items()},
                                    {c: s["capacity"] for c, s in stats.items()})
            return {c: {**s, "budget": alloc[c]} for c, s in stats.items()}

        plan = decided.stats | "AllStats" >> beam.combiners.ToList() | "Budgets" >> beam.Map(budgets)

        def finish(joined, plan):
            _, groups = joined
            recs, decs = list(groups["records"]), list(groups["decisions"])
            if len(recs) != len(decs):
                raise RuntimeError(f"paser: {len(recs)} record(s) but {len(decs)} decision(s) for "
                                   f"(id, origin) {joined[0]}")
            # identical (id, origin) rows are identical content: pair them in order
            for r, d in zip(recs, decs):
                c = plan[d["cluster"]]
                r = {**r, "cluster": d["cluster"], "cds": float(c["cds"]), "cluster_budget": int(c["budget"]),
                     "ies": d["ies"] if math.isfinite(d["ies"]) else None, "cluster_rank": d["cluster_rank"],
                     "concepts": list(d["concepts"])}
                reason = verdict(d, c["budget"], c["capacity"])
                if reason is None:
                    yield r
                else:
                    kind = "ccg_conflict" if reason.startswith("CCG") else "over_budget"
                    beam.metrics.Metrics.counter("curate_paser", kind).inc()
                    yield beam.pvalue.TaggedOutput("rejected", {**r, "reject_reason": reason})

        keyed = clustered | "KeyRecords" >> beam.Map(lambda r: ((r["id"], r.get("origin", "")), r))
        out = ({"records": keyed, "decisions": decided.decisions}
               | "Join" >> beam.CoGroupByKey()
               | "Decide" >> beam.FlatMap(finish, plan=beam.pvalue.AsSingleton(plan))
               .with_outputs("rejected", main="kept"))
        return {"kept": out.kept, "rejected": out.rejected}
