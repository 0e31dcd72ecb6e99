"""k-means for selectors: faiss centroids from a bounded sample, every row assigned in parallel.

Used by the diversity selector (kMQ) and meant for S2L's trajectory clustering too.

The math is plain functions, numpy in and numpy out:
    train_centroids(sample, k, seed, niter)    faiss.Kmeans on the sample (GPU when present)
    assign(vectors, centroids)                 nearest centroid and its distance (faiss flat index)
    choose_k_by_silhouette(sample, grid, seed) K with the best silhouette on the sample

The Beam side is three thin transforms; only the sample and the centroids ever sit in
one process, never the collection:
    SampleVectors(column, n, seed)   the n rows with the smallest hash(seed, id, origin),
                                     as one (n, d) float32 array. A bottom-n by hash is a
                                     uniform sample without replacement that is the same on
                                     every rerun and runner (Beam's Sample.FixedSizeGlobally
                                     draws from an unseeded RNG); Top.Smallest holds n small
                                     (key, vector) pairs per combiner, like Sample would.
    TrainKMeans(k | grid, ...)       the sample -> one KMeansModel (centroids, K, silhouettes)
    AssignClusters(model, column)    records + `cluster` (int64) and `cluster_distance`;
                                     the model arrives as a side input, each worker builds
                                     its faiss index once and searches batches of rows.
                                     Rows without a usable vector go to the `unassigned`
                                     output with the reason.

Distances: `l2` metric (default; what faiss.Kmeans and the diversity paper's code use)
reports the Euclidean distance to the centroid; `cosine` runs spherical k-means on
L2-normalised vectors with an inner-product index and reports 1 - cosine similarity.

Defaults: niter=20 (faiss' usual setting and S2L's code; the diversity code uses 300
iterations x 5 restarts on GPU: set niter / nredo), greedy k-means++ initialisation
(scikit-learn's, on the sample; faiss' default, `init: random`, picks K random rows and on
well-separated data often puts two centroids in one group and none in another). faiss would silently subsample to 256 points per centroid;
we lift that cap so `sample_size` is the one knob for how much data trains the centroids.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field
from typing import Sequence

import apache_beam as beam
import numpy as np

from curate.config import ConfigError
from curate.selectors.shared.keys import hash_unit

log = logging.getLogger(__name__)

METRICS = ("l2", "cosine")
INITS = ("random", "kmeans++")
UNASSIGNED = "unassigned"


# ---------------------------------------------------------------- the math


def faiss_module():
    """faiss, with a clear error when neither build is installed: faiss-cpu comes with the
    `cpu` extra, faiss-gpu-cu12 with the `gpu` one (not both: they share the `faiss`
    package folder, and the CPU build would win)."""
    try:
        import faiss
    except ImportError:
        raise ConfigError("faiss is not installed: pip install 'curate[cpu]' (faiss-cpu) or, on a "
                          "CUDA 12 machine, 'curate[gpu]' (faiss-gpu-cu12)") from None
    return faiss


def faiss_device(gpu: bool | str) -> str:
    """A faiss step's `gpu` option as a step's declared device (curate.steps.Step.resources)."""
    return "auto" if gpu == "auto" else "cuda" if gpu else "cpu"


def use_gpu(gpu: bool | str = "auto") -> bool:
    """Whether faiss should use the GPU: `auto` means when faiss sees one."""
    if gpu == "auto":
        faiss = faiss_module()
        return hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0
    return bool(gpu)


def as_matrix(vectors, metric: str = "l2") -> np.ndarray:
    """A C-contiguous float32 (n, d) array; rows L2-normalised for the cosine metric."""
    x = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
    if x.ndim != 2:
        raise ValueError(f"expected a 2-d array of vectors, got shape {x.shape}")
    if metric == "cosine":
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        x = np.ascontiguousarray(x / np.maximum(norms, 1e-12))
    return x


def train_centroids(sample, k: int, seed: int = 0, niter: int = 20, *, metric: str = "l2",
                    nredo: int = 1, init: str = "kmeans++", gpu: bool | str = "auto") -> np.ndarray:
    """(k, d) float32 centroids from faiss k-means on `sample` (n >= k rows)."""
    if metric not in METRICS:
        raise ValueError(f"metric {metric!r}: expected one of {METRICS}")
    if init not in INITS:
        raise ValueError(f"init {init!r}: expected one of {INITS}")
    x = as_matrix(sample, metric)
    n, d = x.shape
    if not 1 <= k <= n:
        raise ValueError(f"k-means with k={k} needs at least k training vectors; the sample has {n}")
    faiss = faiss_module()
    params = dict(niter=int(niter), seed=int(seed), verbose=False, spherical=metric == "cosine",
                  # every sample row trains (sample_size is the knob), and no warning spam
                  max_points_per_centroid=max(1, math.ceil(n / k)), min_points_per_centroid=1)
    if init == "random":
        km = faiss.Kmeans(d, int(k), gpu=use_gpu(gpu), nredo=int(nredo), **params)
        km.train(x)
        return np.ascontiguousarray(km.centroids, dtype=np.float32)
    best, best_obj = None, math.inf
    for redo in range(int(nredo)):
        init_c = kmeans_plusplus_init(x, int(k), seed + redo)
        km = faiss.Kmeans(d, int(k), gpu=use_gpu(gpu), **{**params, "seed": seed + redo})
        km.train(x, init_centroids=init_c)
        obj = float(km.obj[-1]) if len(km.obj) else 0.0
        # spherical k-means maximises similarity; L2 minimises the squared distance
        score = -obj if metric == "cosine" else obj
        if best is None or score < best_obj:
            best, best_obj = np.ascontiguousarray(km.centroids, dtype=np.float32), score
    return best


def kmeans_plusplus_init(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Greedy k-means++ seeds (Arthur & Vassilvitskii; the greedy variant scikit-learn
    uses): each step draws 2 + ln k candidates by D^2 weighting and keeps the one that
    lowers the potential most. faiss' own k-means++ draws one candidate a step and, in our
    tests, put two seeds in one of four well-separated blobs about one run in five;
    scikit-learn's is the same algorithm but ~5x slower here (float64, per-step overhead).
    Cost: k x (2 + ln k) x n x d multiply-adds in k sequential skinny products, which are
    bound by memory bandwidth, not compute: on 100k x 384 with k=1024 it took 42 CPU-s
    against 17 for faiss' 20 Lloyd iterations (benchmarks/RESULTS_kmeans.md). With large
    k on a CPU, `init: random` (faiss' own) skips it."""
    rng = np.random.default_rng(int(seed))
    n = len(x)
    sq = np.einsum("ij,ij->i", x, x)
    trials = 2 + int(math.log(k))
    centers = np.empty((k, x.shape[1]), np.float32)
    first = int(rng.integers(n))
    centers[0] = x[first]
    d2 = np.maximum(sq - 2.0 * (x @ x[first]) + sq[first], 0.0)
    potential = float(d2.sum(dtype=np.float64))
    for i in range(1, k):
        if potential <= 0:  # fewer distinct points than k: any row will do
            cand = rng.integers(n, size=trials)
        else:
            cand = np.searchsorted(np.cumsum(d2, dtype=np.float64), rng.random(trials) * potential)
            cand = np.minimum(cand, n - 1)
        dc = np.maximum(sq[None, :] - 2.0 * (x[cand] @ x.T) + sq[cand][:, None], 0.0)
        np.minimum(dc, d2[None, :], out=dc)
        pots = dc.sum(1, dtype=np.float64)
        best = int(np.argmin(pots))
        centers[i] = x[cand[best]]
        d2, potential = dc[best], float(pots[best])
    return centers


def flat_index(centroids: np.ndarray, metric: str = "l2", gpu: bool | str = "auto"):
    """An exact faiss index over the centroids (on the GPU when there is one)."""
    faiss = faiss_module()
    c = as_matrix(centroids, metric)
    index = faiss.IndexFlatIP(c.shape[1]) if metric == "cosine" else faiss.IndexFlatL2(c.shape[1])
    if use_gpu(gpu):
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(c)
    return index


def search(index, vectors, metric: str = "l2") -> tuple[np.ndarray, np.ndarray]:
    """(cluster int64, distance float32) of each row's nearest centroid in `index`."""
    x = as_matrix(vectors, metric)
    if x.shape[0] == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    sims, ids = index.search(x, 1)
    if metric == "cosine":
        dist = 1.0 - sims[:, 0]
    else:  # faiss reports squared L2
        dist = np.sqrt(np.maximum(sims[:, 0], 0.0))
    return ids[:, 0].astype(np.int64), dist.astype(np.float32)


def assign(vectors, centroids, metric: str = "l2", gpu: bool | str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of every row: (cluster int64, distance float32)."""
    return search(flat_index(centroids, metric, gpu), vectors, metric)


def silhouette(sample, labels, metric: str = "l2", seed: int = 0, max_rows: int = 5000) -> float:
    """sklearn's silhouette score on at most `max_rows` rows (it is O(n^2)); -1 for one cluster."""
    from sklearn.metrics import silhouette_score

    if len(np.unique(labels)) < 2:
        return -1.0
    x = as_matrix(sample, metric)
    return float(silhouette_score(x, labels, metric="cosine" if metric == "cosine" else "euclidean",
                                  sample_size=min(len(x), max_rows), random_state=seed))


def choose_k_by_silhouette(sample, grid: Sequence[int], seed: int = 0, niter: int = 20, *,
                           metric: str = "l2", nredo: int = 1, init: str = "kmeans++",
                           max_rows: int = 5000, gpu: bool | str = "auto") -> tuple[int, dict[int, float]]:
    """(best K, {K: silhouette}) over the grid values that fit the sample (2 <= K < n).
    Ties go to the smaller K."""
    x = as_matrix(sample, metric)
    ks = sorted({int(k) for k in grid if 2 <= int(k) < len(x)})
    if not ks:
        raise ValueError(f"no K in the grid {list(grid)} fits a sample of {len(x)} vectors (need 2 <= K < n)")
    scores = {}
    for k in ks:
        c = train_centroids(x, k, seed, niter, metric=metric, nredo=nredo, init=init, gpu=gpu)
        labels, _ = assign(x, c, metric, gpu)
        scores[k] = silhouette(x, labels, metric, seed, max_rows)
        log.info("silhouette K=%d: %.4f", k, scores[k])
    best = max(ks, key=lambda k: (scores[k], -k))
    return best, scores


# ---------------------------------------------------------------- the model


@dataclass
class KMeansModel:
    """What the driver broadcasts: small (K x d floats), picklable."""

    centroids: np.ndarray
    metric: str = "l2"
    seed: int = 0
    niter: int = 20
    sample_rows: int = 0
    silhouette: dict[int, float] = field(default_factory=dict)  # K -> score, when K was searched

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def dim(self) -> int:
        return int(self.centroids.shape[1])

    @property
    def fingerprint(self) -> str:
        h = hashlib.blake2b(digest_size=8)
        h.update(self.metric.encode())
        h.update(np.ascontiguousarray(self.centroids, np.float32).tobytes())
        return h.hexdigest()

    def reference(self) -> tuple[np.ndarray, None]:
        """The points rows are assigned to, and their labels (None: a centroid's index)."""
        return self.centroids, None

    def describe(self) -> dict:
        return {"k": self.k, "dim": self.dim, "metric": self.metric, "seed": self.seed,
                "niter": self.niter, "sample_rows": self.sample_rows,
                "silhouette": {str(k): round(v, 6) for k, v in self.silhouette.items()}}


def fit_model(sample, k: int | None, grid: Sequence[int] = (), seed: int = 0, niter: int = 20, *,
              metric: str = "l2", nredo: int = 1, init: str = "kmeans++", silhouette_rows: int = 5000,
              search_rows: int | None = None, gpu: bool | str = "auto") -> KMeansModel | None:
    """K given, or chosen by silhouette over `grid` (on the first `search_rows` rows of the
    sample, which is in random order); the centroids are then trained on the whole sample.
    None for an empty sample."""
    x = np.asarray(sample, dtype=np.float32)
    if x.size == 0:
        return None
    scores: dict[int, float] = {}
    if k is None:
        k, scores = choose_k_by_silhouette(x[:search_rows], grid, seed, niter, metric=metric, nredo=nredo,
                                           init=init, max_rows=silhouette_rows, gpu=gpu)
    elif k > len(x):
        raise ValueError(f"k-means with k={k} clusters but only {len(x)} rows have vectors; "
                         f"lower k (or raise sample_size)")
    centroids = train_centroids(x, k, seed, niter, metric=metric, nredo=nredo, init=init, gpu=gpu)
    return KMeansModel(centroids, metric, seed, niter, len(x), scores)


# ---------------------------------------------------------------- Beam wrappers


def vector_of(record: dict, column: str, dim: int | None = None) -> tuple[np.ndarray | None, str | None]:
    """(float32 vector, None), or (None, why it is not usable)."""
    value = record.get(column)
    if value is None:
        return None, f"no {column!r} value"
    v = np.asarray(value, dtype=np.float32).reshape(-1)
    if v.size == 0:
        return None, f"empty {column!r} vector"
    if dim is not None and v.size != dim:
        return None, f"{column!r} has {v.size} dimensions, the centroids {dim}"
    if not np.all(np.isfinite(v)):
        return None, f"{column!r} has NaN or infinite values"
    return v, None


def _sample_sort_key(item):
    return item[:3]


class SampleVectors(beam.PTransform):
    """-> one (n, d) float32 array: the vectors of the n rows with the smallest hash keys,
    in key order (so faiss sees the same rows in the same order on every run)."""

    def __init__(self, column: str, n: int, seed: int = 0):
        super().__init__()
        if n < 1:
            raise ValueError("sample_size must be >= 1")
        self.column, self.n, self.seed = column, int(n), int(seed)

    def expand(self, pcoll):
        column, seed = self.column, self.seed

        def keyed(record):
            v, _ = vector_of(record, column)
            if v is not None:
                yield (hash_unit(seed, record), record["origin"], record["id"], v)

        def stack(items):
            if not items:
                return np.zeros((0, 0), np.float32)
            return np.stack([it[3] for it in sorted(items, key=_sample_sort_key)])

        return (pcoll
                | "HashKey" >> beam.FlatMap(keyed)
                | "BottomN" >> beam.combiners.Top.Smallest(self.n, key=_sample_sort_key)
                | "Stack" >> beam.Map(stack))


class TrainKMeans(beam.PTransform):
    """Records -> one KMeansModel (or None when no row has a vector), trained on a sample."""

    def __init__(self, column: str = "embedding", k: int | None = None, grid: Sequence[int] = (),
                 sample_size: int = 100_000, seed: int = 0, niter: int = 20, metric: str = "l2",
                 nredo: int = 1, init: str = "kmeans++", silhouette_rows: int = 5000,
                 search_rows: int | None = None, gpu: bool | str = "auto"):
        super().__init__()
        if k is None and not grid:
            raise ValueError("give k, or a grid of K values to choose from by silhouette")
        if metric not in METRICS:
            raise ValueError(f"metric {metric!r}: expected one of {METRICS}")
        self.column, self.k, self.grid = column, k, tuple(int(g) for g in grid)
        self.sample_size, self.seed, self.niter = int(sample_size), int(seed), int(niter)
        self.metric, self.nredo, self.init = metric, int(nredo), init
        self.silhouette_rows, self.search_rows, self.gpu = int(silhouette_rows), search_rows, gpu

    def expand(self, pcoll):
        opts = dict(metric=self.metric, nredo=self.nredo, init=self.init,
                    silhouette_rows=self.silhouette_rows, search_rows=self.search_rows, gpu=self.gpu)
        k, grid, seed, niter = self.k, self.grid, self.seed, self.niter
        return (pcoll
                | "Sample" >> SampleVectors(self.column, self.sample_size, self.seed)
                | "Fit" >> beam.Map(lambda s: fit_model(s, k, grid, seed, niter, **opts)))


class _AssignBatch(beam.DoFn):
    """The label of each record's nearest reference point (k-means: the centroids, the
    label is the centroid's index; spectral clustering: the fitted sample points and their
    clusters), with the distance. The index is built once per worker (and again only if a
    different fitted state arrives)."""

    def __init__(self, column: str, out_column: str, distance_column: str | None, gpu: bool | str):
        self.column, self.out_column, self.distance_column, self.gpu = column, out_column, distance_column, gpu
        self._index = None
        self._fingerprint = None

    def setup(self):
        self._index, self._fingerprint = None, None

    def process(self, batch: list[dict], fitted):
        if fitted is None:
            for r in batch:
                yield beam.pvalue.TaggedOutput(UNASSIGNED, (r, f"no row has a {self.column!r} vector"))
            return
        points, labels = fitted.reference()
        if self._fingerprint != fitted.fingerprint:
            self._index = flat_index(points, fitted.metric, self.gpu)
            self._fingerprint = fitted.fingerprint
        rows, vectors = [], []
        for r in batch:
            v, why = vector_of(r, self.column, fitted.dim)
            if v is None:
                yield beam.pvalue.TaggedOutput(UNASSIGNED, (r, why))
            else:
                rows.append(r)
                vectors.append(v)
        if not rows:
            return
        nearest, dists = search(self._index, np.stack(vectors), fitted.metric)
        clusters = nearest if labels is None else labels[nearest]
        for r, c, d in zip(rows, clusters.tolist(), dists.tolist()):
            out = {**r, self.out_column: int(c)}
            if self.distance_column:
                out[self.distance_column] = float(d)
            yield out


class AssignClusters(beam.PTransform):
    """Records -> {"assigned": records + cluster (+ distance), "unassigned": (record, reason)}.

    `model` is a PCollection holding one fitted state with `reference()` (points, labels or
    None), `metric`, `dim` and `fingerprint`: a KMeansModel (TrainKMeans' output) or a
    SpectralFit. The one cluster-assignment step of every method."""

    def __init__(self, model, column: str = "embedding", distance_column: str | None = "cluster_distance",
                 batch_size: int = 1024, gpu: bool | str = "auto", out_column: str = "cluster"):
        super().__init__()
        self.model, self.column, self.distance_column = model, column, distance_column
        self.batch_size, self.gpu, self.out_column = int(batch_size), gpu, out_column

    def expand(self, pcoll):
        out = (pcoll
               | "Batch" >> beam.BatchElements(min_batch_size=1, max_batch_size=self.batch_size)
               | "Nearest" >> beam.ParDo(_AssignBatch(self.column, self.out_column, self.distance_column, self.gpu),
                                         fitted=beam.pvalue.AsSingleton(self.model))
               .with_outputs(UNASSIGNED, main="assigned"))
        return {"assigned": out.assigned, UNASSIGNED: out[UNASSIGNED]}
