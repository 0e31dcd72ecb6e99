"""Capability clusters for PASER: diffusion-kernel spectral embedding + NMF clustering.

PASER (He et al., 2025; docs/methods.md "PASER") clusters the pool into capabilities:
sentence embeddings (all-MiniLM-L6-v2 in the paper) -> a diffusion-kernel manifold
embedding (Gaussian kernel, sigma = median distance, random-walk Laplacian, its
smallest eigenvectors) -> NMF-based spectral clustering, K by NMF reconstruction error
(paper) or fixed (the code's default, 10).

What is computed here (`fit_spectral_clusters`)
1. A *sparse* k-nearest-neighbour graph (faiss, exact L2 search, `k_neighbors` = 15
   default), not the code's dense N x N distance matrix, so memory is O(N k).
2. Gaussian weights w_ij = exp(-d_ij^2 / (2 sigma^2)) with sigma = the median kNN
   distance (the code takes the median over all pairs, which the sparse graph does not
   have; the kNN median is the local scale the kernel actually sees). Symmetrised as
   W = max(W, W^T) (an edge if either end lists the other).
3. The random-walk Laplacian L_rw = I - D^-1 W. Its eigenvectors are D^-1/2 u for the
   eigenvectors u of the symmetric L_sym = I - D^-1/2 W D^-1/2 (same eigenvalues), so
   `scipy.sparse.linalg.eigsh` runs on the symmetric form (the code calls eigsh on the
   non-symmetric L_rw, which eigsh does not support), asking for the *largest*
   eigenvalues mu of D^-1/2 W D^-1/2 (= 1 - the smallest of L), which converges far
   faster than which="SM". The embedding keeps `n_eigenvectors` of them (default: K,
   as the code; max of the K grid when K is chosen), each scaled by mu^t, t =
   `diffusion_time` (the diffusion-map coordinates; t = 0 gives the plain
   eigenvectors of the code).
4. NMF (sklearn, nndsvda init, seeded) on a non-negative version of the embedding,
   cluster = argmax of the row of W. The code factorises |Y Y^T|, an N x N matrix; we
   factorise an N x 2m matrix: each row of Y is scaled to unit length (as in Ng, Jordan
   & Weiss spectral clustering) and split into its positive and negative parts,
   [max(Y, 0), max(-Y, 0)] (`nonneg="split"`, default). The literal alternative,
   shifting each column by its minimum (`nonneg="shift"`), is offered but measured
   worse: on 1,200 MiniLM-embedded prompts from four sources (gsm8k, codealpaca,
   gpteacher roleplay and toolformer; k = 15) purity was 0.93 (split) vs 0.66 (shift)
   at K = 10, where shift also left 2 of 10 clusters empty and hit NMF's iteration cap;
   0.92 vs 0.79 at K = 4 with 10 eigenvectors.
5. K: given, or "auto": NMF reconstruction error over `k_grid` (default 2..20) and the
   elbow of that curve (the point farthest below the chord from the first to the last
   point after scaling both axes to [0, 1], the "kneedle" rule).

Scale: the fit runs on a bounded sample (`sample_size`, default 20,000, drawn by a
seeded hash of id and origin, so reruns agree); every other example takes the cluster
of its nearest fitted neighbour (faiss), in parallel (`SpectralClusters`, a Beam
transform: sample -> fit -> side input -> assign). The fitted state is the sample's
embeddings and labels: sample_size x dim float32 (30 MB at 20k x 384).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Sequence

import apache_beam as beam
import numpy as np

from curate.selectors.shared.keys import hash_bits
from curate.selectors.shared.kmeans import UNASSIGNED, AssignClusters, faiss_module

log = logging.getLogger(__name__)

DEFAULT_K_GRID = tuple(range(2, 21))


# ------------------------------------------------------------------ pure math
def knn(X: np.ndarray, k: int, queries: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(distances, indices) of the k nearest points of X (L2, exact, faiss).

    Without `queries` the points query themselves and each point's own entry is
    removed, so row i lists i's k nearest *other* points.
    """
    faiss = faiss_module()

    X = np.ascontiguousarray(X, dtype=np.float32)
    index = faiss.IndexFlatL2(X.shape[1])
    index.add(X)
    if queries is not None:
        d2, idx = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return np.sqrt(np.maximum(d2, 0.0)), idx
    d2, idx = index.search(X, min(k + 1, len(X)))
    n = len(X)
    # drop the self match (duplicates may put another point first: remove i wherever it is)
    out_d = np.empty((n, idx.shape[1] - 1), dtype=np.float32)
    out_i = np.empty((n, idx.shape[1] - 1), dtype=np.int64)
    for i in range(n):
        keep = idx[i] != i
        if keep.all():
            keep[-1] = False
        out_d[i], out_i[i] = d2[i][keep], idx[i][keep]
    return np.sqrt(np.maximum(out_d, 0.0)), out_i


def diffusion_affinity(dist: np.ndarray, idx: np.ndarray) -> tuple["object", float]:
    """Symmetric sparse Gaussian affinity from a kNN list; returns (W csr, sigma)."""
    import scipy.sparse as sp

    n, k = idx.shape
    sigma = float(np.median(dist)) if dist.size else 1.0
    if not sigma > 0:
        sigma = float(dist[dist > 0].min()) if (dist > 0).any() else 1.0
    w = np.exp(-(dist.astype(np.float64) ** 2) / (2.0 * sigma * sigma))
    rows = np.repeat(np.arange(n), k)
    W = sp.csr_matrix((w.ravel(), (rows, idx.ravel())), shape=(n, n))
    W = W.maximum(W.T).tocsr()
    W.setdiag(0.0)
    W.eliminate_zeros()
    return W, sigma


def spectral_embedding(W, n_components: int, diffusion_time: float = 0.0,
                       seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The `n_components` smallest eigenvectors of L_rw = I - D^-1 W (columns), scaled by
    mu^t where mu = 1 - eigenvalue; returns (Y [n, m], eigenvalues of L_rw ascending)."""
    import scipy.sparse as sp
    from scipy.sparse.linalg import eigsh

    n = W.shape[0]
    m = max(1, min(n_components, n))
    deg = np.asarray(W.sum(axis=1)).ravel()
    deg[deg <= 0] = 1.0  # an isolated point (only possible with k = 0) keeps a unit degree
    d_isqrt = 1.0 / np.sqrt(deg)
    M = sp.diags(d_isqrt) @ W @ sp.diags(d_isqrt)
    if n <= max(4 * m, 500):
        mu, U = np.linalg.eigh(M.toarray())
        mu, U = mu[::-1][:m], U[:, ::-1][:, :m]
    else:
        v0 = np.random.default_rng(seed).standard_normal(n)
        mu, U = eigsh(M.tocsc(), k=m, which="LA", v0=v0, tol=1e-8, maxiter=max(5000, 20 * n))
        order = np.argsort(-mu)
        mu, U = mu[order], U[:, order]
    V = U * d_isqrt[:, None]  # eigenvectors of the random-walk form
    # fix each vector's sign (eigensolvers return either): largest-magnitude entry positive
    signs = np.sign(V[np.abs(V).argmax(axis=0), np.arange(V.shape[1])])
    V = V * np.where(signs == 0, 1.0, signs)[None, :]
    if diffusion_time:
        V = V * np.clip(mu, 0.0, None)[None, :] ** diffusion_time
    return V, 1.0 - mu


NONNEG = ("split", "shift")


def nonnegative(Y: np.ndarray, mode: str = "split") -> np.ndarray:
    """The non-negative matrix NMF factorises (see the module docstring, step 4)."""
    if mode == "split":
        Z = Y / np.maximum(np.linalg.norm(Y, axis=1, keepdims=True), 1e-12)
        return np.hstack([np.maximum(Z, 0.0), np.maximum(-Z, 0.0)])
    if mode == "shift":
        return Y - Y.min(axis=0, keepdims=True)
    raise ValueError(f"nonneg must be one of {NONNEG}, got {mode!r}")


def nmf_clusters(A: np.ndarray, k: int, seed: int = 0, max_iter: int = 400) -> tuple[np.ndarray, float]:
    """argmax-of-W NMF clusters of a non-negative matrix A; (labels, reconstruction error)."""
    import warnings

    from sklearn.decomposition import NMF
    from sklearn.exceptions import ConvergenceWarning

    k = max(1, min(k, A.shape[0], A.shape[1]))
    nmf = NMF(n_components=k, init="nndsvda", random_state=seed, max_iter=max_iter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        H = nmf.fit_transform(A)
    return H.argmax(axis=1).astype(np.int64), float(nmf.reconstruction_err_)


def elbow(ks: Sequence[int], errors: Sequence[float]) -> int:
    """The K farthest below the chord of the (K, error) curve, both axes scaled to [0, 1]."""
    ks_a, err = np.asarray(ks, dtype=float), np.asarray(errors, dtype=float)
    if len(ks_a) <= 2:
        return int(ks_a[0])
    x = (ks_a - ks_a[0]) / (ks_a[-1] - ks_a[0])
    span = err[0] - err[-1]
    y = (err - err[-1]) / span if span > 0 else np.zeros_like(err)
    # the chord runs from (0, 1) to (1, 0): distance below it is 1 - x - y
    return int(ks_a[int(np.argmax(1.0 - x - y))])


@dataclass
class SpectralFit:
    """The fitted state: sample points and their clusters (assignment = nearest of these,
    by kmeans.AssignClusters)."""
    points: np.ndarray          # [n, dim] float32
    labels: np.ndarray          # [n] int64, 0..n_clusters-1
    n_clusters: int
    info: dict = field(default_factory=dict)
    metric = "l2"

    @property
    def dim(self) -> int:
        return int(self.points.shape[1])

    @property
    def fingerprint(self) -> str:
        h = hashlib.blake2b(digest_size=8)
        h.update(np.ascontiguousarray(self.points, np.float32).tobytes())
        h.update(np.ascontiguousarray(self.labels, np.int64).tobytes())
        return h.hexdigest()

    def reference(self) -> tuple[np.ndarray, np.ndarray]:
        return self.points, self.labels


def fit_spectral_clusters(X: np.ndarray, n_clusters: int | str = 10, k_neighbors: int = 15,
                          n_eigenvectors: int | None = None, diffusion_time: float = 0.0,
                          k_grid: Sequence[int] = DEFAULT_K_GRID, nonneg: str = "split",
                          seed: int = 0) -> SpectralFit:
    """Cluster the rows of X (embeddings) as described in the module docstring."""
    X = np.ascontiguousarray(X, dtype=np.float32)
    n = len(X)
    if n == 0:
        raise ValueError("no points to cluster")
    if n == 1:
        return SpectralFit(X, np.zeros(1, dtype=np.int64), 1, {"n_fit": 1})
    auto = n_clusters == "auto"
    if not auto and (not isinstance(n_clusters, int) or n_clusters < 1):
        raise ValueError(f"n_clusters must be a positive integer or 'auto', got {n_clusters!r}")
    grid = sorted({int(k) for k in k_grid if 1 <= int(k) <= n}) if auto else []
    if auto and not grid:
        raise ValueError(f"k_grid {list(k_grid)} has no K in 1..{n}")
    m = n_eigenvectors or (max(grid) if auto else n_clusters)
    dist, idx = knn(X, max(1, min(k_neighbors, n - 1)))
    W, sigma = diffusion_affinity(dist, idx)
    Y, eigenvalues = spectral_embedding(W, m, diffusion_time, seed)
    A = nonnegative(Y, nonneg)
    info = {"n_fit": n, "k_neighbors": idx.shape[1], "sigma": sigma, "n_eigenvectors": Y.shape[1],
            "eigenvalues": [round(float(e), 6) for e in eigenvalues]}
    if auto:
        errors = [nmf_clusters(A, k, seed)[1] for k in grid]
        k = elbow(grid, errors)
        info["k_grid"], info["nmf_errors"] = grid, [round(e, 6) for e in errors]
    else:
        k = min(n_clusters, n)
    labels, err = nmf_clusters(A, k, seed)
    # renumber by first appearance so cluster ids do not depend on NMF's component order
    _, first = np.unique(labels, return_index=True)
    order = np.argsort(first)
    remap = np.empty(labels.max() + 1, dtype=np.int64)
    remap[np.unique(labels)[order]] = np.arange(len(order))
    labels = remap[labels]
    info.update({"n_clusters": int(k), "non_empty_clusters": int(len(order)), "nmf_error": err,
                 "nonneg": nonneg, "diffusion_time": diffusion_time})
    return SpectralFit(X, labels, int(k), info)


def sample_key(seed: int, record: dict) -> tuple[str, str, str]:
    """A seeded pseudo-random key; the smallest keys form the fitting sample."""
    return f"{hash_bits(seed, record):016x}", record.get("origin", ""), record["id"]


# ------------------------------------------------------------------ Beam
def _embedding(record: dict, column: str) -> np.ndarray:
    value = record.get(column)
    if value is None:
        raise ValueError(f"record {record.get('origin') or record.get('id')}: no {column!r} embedding")
    return np.asarray(value, dtype=np.float32)


def _no_embedding(item: tuple, column: str):
    record, why = item
    raise ValueError(f"record {record.get('origin') or record.get('id')}: {why} (spectral clusters need "
                     f"a {column!r} embedding on every row)")


def _fit_sample(sample: list, options: dict) -> SpectralFit | None:
    if not sample:
        return None
    X = np.stack([emb for _, emb in sample])
    fit = fit_spectral_clusters(X, **options)
    log.info("spectral clusters: fitted on %d points, K=%d (%s)", len(X), fit.n_clusters,
             {k: v for k, v in fit.info.items() if k not in ("eigenvalues", "nmf_errors", "k_grid")})
    beam.metrics.Metrics.distribution("curate_spectral", "n_clusters").update(fit.n_clusters)
    beam.metrics.Metrics.distribution("curate_spectral", "n_fit").update(len(X))
    return fit


class SpectralClusters(beam.PTransform):
    """Records -> records with a `cluster` column (see the module docstring).

    sample (the `sample_size` smallest seeded hash keys, a Top combiner) -> fit in one
    worker -> side input -> nearest-fitted-neighbour assignment in parallel batches.
    `expand` returns (records with clusters, the singleton PCollection of the SpectralFit).
    """

    def __init__(self, embedding_column: str = "embedding", n_clusters: int | str = 10,
                 k_neighbors: int = 15, n_eigenvectors: int | None = None, diffusion_time: float = 0.0,
                 k_grid: Sequence[int] = DEFAULT_K_GRID, nonneg: str = "split",
                 sample_size: int = 20_000, seed: int = 0, out_column: str = "cluster",
                 batch_size: int = 1024):
        super().__init__()
        self.column, self.out_column = embedding_column, out_column
        self.sample_size, self.seed, self.batch_size = int(sample_size), int(seed), int(batch_size)
        self.options = dict(n_clusters=n_clusters, k_neighbors=int(k_neighbors),
                            n_eigenvectors=n_eigenvectors, diffusion_time=float(diffusion_time),
                            k_grid=tuple(k_grid), nonneg=nonneg, seed=int(seed))

    def expand(self, pcoll):
        column, seed = self.column, self.seed
        fit = (pcoll
               | "SampleKeys" >> beam.Map(lambda r: (sample_key(seed, r), _embedding(r, column)))
               | "Sample" >> beam.combiners.Top.Smallest(self.sample_size, key=lambda kv: kv[0])
               | "Fit" >> beam.Map(_fit_sample, self.options))
        out = pcoll | "Assign" >> AssignClusters(fit, column, distance_column=None, batch_size=self.batch_size,
                                                 gpu=False, out_column=self.out_column)
        # every row has an embedding (the plan requires the column): one without fails the run
        _ = out[UNASSIGNED] | "NoEmbedding" >> beam.Map(_no_embedding, column)
        return out["assigned"], fit
