"""SemDeDup: semantic deduplication (Abbas, Tirumala, Simig, Ganguli, Morcos 2023,
"SemDeDup: Data-efficient learning at web-scale through semantic deduplication"; code
facebookresearch/SemDeDup).

  1. k-means on the L2-normalised example embeddings (the `embedding` column an
     embedding scorer writes; spherical k-means, `curate.selectors.shared.kmeans`, faiss,
     on the GPU when present), K given or `auto` = round(sqrt(rows in the sample)).
  2. Inside each cluster, order the rows by cosine distance to their centroid, farthest
     first (the paper's default, `keep_hard`; `keep: nearest` reverses it).
  3. Walk that order: a row whose cosine similarity to a row already kept is >= the
     threshold (default 0.95, the paper's eps = 0.05) is a semantic duplicate of the most
     similar such row and is rejected with that row's id and the similarity; otherwise
     it is kept.

Where we depart: the released code rejects a row when it is that similar to *any* row
before it in the order, kept or not (`max(triu(S), dim=0) > 1 - eps`), so in a chain
A ~ B ~ C where A and C are not similar, both B and C go and C's content survives only
through a row it is not a duplicate of. Comparing with the kept rows only means every
rejected row names a kept row it duplicates. On 4,000 rows of the shared sources the
released rule removes 488 rows, ours 452: 36 rows whose only near-duplicates were
themselves removed stay (benchmarks/RESULTS_semdedup.md). Duplicates that k-means puts
in different clusters are not found (as in the paper); the same check counts them
against every pair of the pool (2.5% of the pairs at 0.95 there).

Scale: the vectors of one cluster (id, origin, distance, d floats a row) are grouped on
one worker; the similarities are computed in blocks of `block_rows` rows against the
rows kept so far, never as the cluster's full n x n matrix. The decisions are joined
back to the records by (origin, id).

Output columns: `semdedup_cluster`, `semdedup_distance` (cosine distance to its
centroid), `semdedup_similarity` (the highest cosine similarity to a row kept before it
in its cluster; None for the first row of a cluster) and, on rejected rows,
`semdedup_duplicate_of` (the kept row's id).
"""

from __future__ import annotations

import math

import apache_beam as beam
import numpy as np
import pyarrow as pa

from curate.config import ConfigError
from curate.selectors.base import Selector, reject
from curate.selectors.shared.kmeans import (UNASSIGNED, AssignClusters, SampleVectors, as_matrix, faiss_device,
                                           fit_model)

KEEP = ("farthest", "nearest")


def dedup_order(items: list[tuple], keep: str = "farthest") -> list[tuple]:
    """Items (distance, id, origin, vector) in the order they are considered: by distance
    to the centroid (farthest first, or nearest first), ties by id and origin."""
    sign = -1.0 if keep == "farthest" else 1.0
    return sorted(items, key=lambda t: (sign * t[0], t[1], t[2]))


def dedup_cluster(vectors: np.ndarray, threshold: float, block_rows: int = 1024
                  ) -> tuple[np.ndarray, np.ndarray]:
    """For rows in consideration order: (index of the kept row each rejected row
    duplicates, -1 for kept rows; the highest similarity to an earlier kept row, -inf for
    the first). A row is rejected when that similarity is >= `threshold`."""
    x = as_matrix(vectors, "cosine")
    n = len(x)
    duplicate_of = np.full(n, -1, dtype=np.int64)
    best = np.full(n, -np.inf, dtype=np.float64)
    best_of = np.full(n, -1, dtype=np.int64)
    kept: list[int] = []
    for start in range(0, n, block_rows):
        stop = min(n, start + block_rows)
        if kept:  # against the rows kept in earlier blocks, at once
            sims = x[start:stop] @ x[kept].T
            arg = sims.argmax(axis=1)
            best[start:stop] = sims[np.arange(stop - start), arg]
            best_of[start:stop] = np.asarray(kept)[arg]
        for j in range(start, stop):  # inside the block, in order
            if best[j] >= threshold:
                duplicate_of[j] = best_of[j]
                continue
            kept.append(j)
            if j + 1 < stop:
                sims = x[j + 1:stop] @ x[j]
                better = sims > best[j + 1:stop]
                best[j + 1:stop][better] = sims[better]
                best_of[j + 1:stop][better] = j
    return duplicate_of, best


class SemDedupSelector(Selector):
    type = "semdedup"
    title = "SemDeDup (semantic duplicates)"
    report_section = "curate.report.curation_sections:semdedup_section"

    def __init__(self, threshold: float = 0.95, embedding_column: str = "embedding",
                 k: int | str = "auto", keep: str = "farthest", sample_size: int = 100_000,
                 niter: int = 20, seed: int = 0, block_rows: int = 1024, gpu: bool | str = "auto"):
        super().__init__()
        where = "semdedup selector"
        if not 0.0 < threshold <= 1.0:
            raise ConfigError(f"{where}: threshold is a cosine similarity in (0, 1], got {threshold}")
        if not (k == "auto" or (isinstance(k, int) and not isinstance(k, bool) and k >= 1)):
            raise ConfigError(f"{where}: k must be a positive integer or 'auto', got {k!r}")
        if keep not in KEEP:
            raise ConfigError(f"{where}: keep {keep!r}, expected one of {KEEP}")
        for name, value in (("sample_size", sample_size), ("niter", niter), ("block_rows", block_rows)):
            if not (isinstance(value, int) and value >= 1):
                raise ConfigError(f"{where}: {name} must be a positive integer, got {value!r}")
        self.threshold, self.embedding_column, self.k, self.keep = float(threshold), embedding_column, k, keep
        self.sample_size, self.niter, self.seed = sample_size, niter, int(seed)
        self.block_rows, self.gpu = block_rows, gpu
        self.requires = (embedding_column,)

    def resources(self) -> dict:
        return {"device": faiss_device(self.gpu), "model": None}

    def output_columns(self):
        return {"semdedup_cluster": pa.int64(), "semdedup_distance": pa.float64(),
                "semdedup_similarity": pa.float64(), "semdedup_duplicate_of": pa.string()}

    def describe(self):
        return {"type": self.type, "threshold": self.threshold, "embedding_column": self.embedding_column,
                "k": self.k, "keep": self.keep, "sample_size": self.sample_size, "niter": self.niter,
                "seed": self.seed}

    def expand(self, pcoll):
        column, k, seed, niter, gpu = self.embedding_column, self.k, self.seed, self.niter, self.gpu
        threshold, keep, block_rows = self.threshold, self.keep, self.block_rows

        def fit(sample):
            n = len(sample) if sample is not None else 0
            kk = max(1, round(math.sqrt(n))) if k == "auto" else k
            return fit_model(sample, kk, seed=seed, niter=niter, metric="cosine", gpu=gpu)

        model = (pcoll | "Sample" >> SampleVectors(column, self.sample_size, seed)
                 | "Fit" >> beam.Map(fit))
        assigned = pcoll | "Assign" >> AssignClusters(model, column, "semdedup_distance", gpu=gpu,
                                                      out_column="semdedup_cluster")

        def cluster_item(r):
            return r["semdedup_cluster"], (r["semdedup_distance"], r["id"], r["origin"],
                                           np.asarray(r[column], dtype=np.float32))

        def decide(item):
            cluster, items = item
            ordered = dedup_order(list(items), keep)
            duplicate_of, best = dedup_cluster(np.stack([t[3] for t in ordered]), threshold, block_rows)
            for i, (_, rid, origin, _) in enumerate(ordered):
                sim = None if math.isinf(best[i]) else float(best[i])
                dup = ordered[duplicate_of[i]] if duplicate_of[i] >= 0 else None
                yield (origin, rid), (cluster, sim, dup[1] if dup else None, dup[2] if dup else None)

        decisions = (assigned["assigned"] | "ByCluster" >> beam.Map(cluster_item)
                     | "Group" >> beam.GroupByKey() | "Decide" >> beam.FlatMap(decide))
        records = assigned["assigned"] | "ByKey" >> beam.Map(lambda r: ((r["origin"], r["id"]), r))

        def split(item):
            _, group = item
            (cluster, sim, dup_id, dup_origin), = group["decision"]
            for r in group["record"]:
                out = {**r, "semdedup_similarity": sim}
                if dup_id is None:
                    yield out
                else:
                    out["semdedup_duplicate_of"] = dup_id
                    yield beam.pvalue.TaggedOutput("rejected", reject(out, (
                        f"semantic duplicate (cosine {sim:.4f} >= {threshold:g}) of {dup_id} ({dup_origin}), "
                        f"kept: {keep} from the centroid of cluster {cluster}")))

        out = ({"record": records, "decision": decisions} | "Join" >> beam.CoGroupByKey()
               | "Split" >> beam.FlatMap(split).with_outputs("rejected", main="kept"))
        no_vector = assigned[UNASSIGNED] | "NoVector" >> beam.MapTuple(
            lambda r, why: reject(r, f"semdedup: {why}"))
        rejected = (out.rejected, no_vector) | "AllRejected" >> beam.Flatten()
        return {"kept": out.kept, "rejected": rejected}
