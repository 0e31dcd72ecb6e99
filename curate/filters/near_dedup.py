"""Near-duplicate removal with MinHash LSH (Broder 1997; as DataTrove and NeMo Curator).

    filters:
      - {type: near_dedup, threshold: 0.8, shingle: 5, num_perm: 128, bands: 16, keep: longest}

1. Shingles: the row's text (every message, joined by a newline) normalised as the
   decontaminate filter does (lower case, anything but letters and digits a separator),
   cut into word n-grams of `shingle` words (`unit: char`: character n-grams of the
   normalised text, spaces included). Each shingle is hashed to 64 bits (blake2b) and
   reduced modulo the Mersenne prime p = 2^31 - 1.
2. MinHash signature: num_perm values min_s (a_i * s + b_i) mod p, with a_i in [1, p) and
   b_i in [0, p) drawn from NumPy's PCG64 seeded with `seed` (documented and exact: every
   product fits in 64 bits). Two rows agree on a position with probability equal to the
   Jaccard similarity of their shingle sets.
3. LSH: the signature cut into `bands` bands of num_perm / bands values; rows sharing a
   band's values land in one bucket, and each pair in a bucket is a candidate.
4. Verification: a candidate pair is a duplicate when its Jaccard is >= `threshold`:
   `verify: exact` (the default) computes it from the two rows' shingle sets (their
   31-bit values); `verify: estimate` takes the share of equal signature positions. The
   estimate from 128 positions has a standard deviation of ~0.035 near 0.8, so it misses
   about a third of the pairs just above the threshold and lets some just below it
   through. Exact verification costs a set intersection per candidate pair and each
   candidate's shingle values (4 bytes a shingle) on the worker that verifies, and
   measured less CPU in all than the estimate (whose candidates need their signatures
   again): benchmarks/RESULTS_scale.md, 1M rows: 485 against 512 CPU-s, recall at
   Jaccard >= 0.8 99.39% against 93.51%, no families of distinct rows emptied against 7.
5. Components: the verified pairs are joined by union-find. Each component keeps one
   row: the longest response (`keep: longest`, ties by id) or the smallest id
   (`keep: first`); every other member is rejected with the reason naming the kept row
   and their (estimated or exact) Jaccard.

Streamed (curate.pipeline.streamed): rows never travel, only their projections (id, origin
and the 16 64-bit hashes of the signature's bands, 128 bytes). Per batch of projections,
each band becomes one array of hashes beside the rows' 64-bit refs (a hash of id
and origin); the arrays are grouped by band, sorted, and every run of equal hashes gives
its pairs (a hash collision only adds a candidate, which verification removes). The rows
are then read again (`rows_again`): only the candidates, the rows in a pair, are shingled
again for their shingle sets (or signatures) and lengths, reach one worker as an iterable
side input of blocks, and the pairs are verified and joined there: memory there grows
with the rows that have near-duplicates, not with the pool (about 4 bytes a shingle, or
512 bytes a signature at num_perm 128, and the row's id and origin).
A row with fewer words than `shingle` is one shingle (its whole text). Rows with no text
left after normalisation are never duplicates.
"""

from __future__ import annotations

import hashlib

import apache_beam as beam
import numpy as np

from curate.config import ConfigError
from curate.steps import Step
from curate.filters.text import words
from curate.filters.base import ApplyDecisions

PRIME = (1 << 31) - 1


def shingles(text: str, n: int, unit: str = "word") -> set[str]:
    ws = words(text)
    if unit == "char":
        s = " ".join(ws)
        return {s[i:i + n] for i in range(max(len(s) - n + 1, 1))} if s else set()
    if not ws:
        return set()
    return {" ".join(ws[i:i + n]) for i in range(max(len(ws) - n + 1, 1))}


def shingle_values(shingle_set: set[str]) -> np.ndarray:
    return np.fromiter((int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little") % PRIME
                        for s in shingle_set), dtype=np.uint64, count=len(shingle_set))


def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.Generator(np.random.PCG64(seed))
    a = rng.integers(1, PRIME, size=num_perm, dtype=np.uint64)
    b = rng.integers(0, PRIME, size=num_perm, dtype=np.uint64)
    return a, b


def signature(values: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """MinHash signature (num_perm uint32) of a row's shingle values."""
    if values.size == 0:
        return np.full(a.shape[0], PRIME, dtype=np.uint32)
    return ((a[:, None] * values[None, :] + b[:, None]) % PRIME).min(axis=1).astype(np.uint32)


def estimated_jaccard(s1: np.ndarray, s2: np.ndarray) -> float:
    return float(np.mean(s1 == s2))


def record_text(record: dict) -> str:
    return "\n".join(m["content"] for m in record["messages"])


def row_ref(rid: str, origin: str) -> int:
    """A row's 64-bit reference in the band arrays ((id, origin) is unique)."""
    text = f"{origin}\x00{rid}".encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


_MIX = np.uint64(0x9E3779B97F4A7C15)


def band_hashes(sigs: np.ndarray, bands: int) -> np.ndarray:
    """(rows, num_perm) uint32 signatures -> (rows, bands) uint64: equal bands hash equal;
    unequal ones collide with probability ~2^-64 (each step a bijection of 64 bits)."""
    values = sigs.reshape(sigs.shape[0], bands, -1).astype(np.uint64)
    h = np.zeros(values.shape[:2], dtype=np.uint64)
    for k in range(values.shape[2]):
        h = (h ^ values[:, :, k]) * _MIX  # wraps modulo 2^64
        h ^= h >> np.uint64(29)
    return h


def bucket_pairs(hashes: np.ndarray, refs: np.ndarray) -> np.ndarray:
    """Every pair of rows sharing a hash: (pairs, 2) uint64 refs, the smaller first."""
    order = np.argsort(hashes, kind="stable")
    h, r = hashes[order], refs[order]
    starts = np.flatnonzero(np.r_[True, h[1:] != h[:-1]])
    sizes = np.diff(np.r_[starts, len(h)])
    out = [np.empty((0, 2), dtype=np.uint64)]
    for k in np.unique(sizes[sizes >= 2]):
        first = starts[sizes == k][:, None]
        i, j = np.triu_indices(k, 1)
        a, b = r[first + i].ravel(), r[first + j].ravel()
        out.append(np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1))
    return np.concatenate(out)


def components(edges, members) -> dict:
    """Union-find over verified pairs: {member: component root} (roots arbitrary)."""
    parent = {m: m for m in members}

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in edges:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return {m: find(m) for m in members}


def signature_similarity(sigs: np.ndarray, chunk: int = 65536):
    """Pairs of row indices -> their estimated Jaccard (share of equal signature positions)."""
    def similarity(ia: np.ndarray, ib: np.ndarray) -> np.ndarray:
        return np.concatenate([np.empty(0)] + [(sigs[ia[s:s + chunk]] == sigs[ib[s:s + chunk]]).sum(axis=1)
                                               / sigs.shape[1] for s in range(0, len(ia), chunk)])
    return similarity


def packed_sets(sets: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Shingle sets as one array and the offsets of each set in it (set k is
    values[offsets[k]:offsets[k + 1]]): one object per block of rows instead of one per
    row, which is what the candidates cost in memory when they are gathered."""
    offsets = np.zeros(len(sets) + 1, dtype=np.int64)
    np.cumsum([len(s) for s in sets], out=offsets[1:])
    values = np.concatenate(sets) if sets else np.empty(0, dtype=np.uint32)
    return values, offsets


def shingle_similarity(values: np.ndarray, offsets: np.ndarray, rows: np.ndarray):
    """Pairs of row indices -> the Jaccard of their shingle sets (sorted unique values);
    row i's set is packed set rows[i] of (values, offsets)."""
    starts, ends = offsets[:-1][rows], offsets[1:][rows]

    def similarity(ia: np.ndarray, ib: np.ndarray) -> np.ndarray:
        out = np.empty(len(ia))
        for k, (a, b) in enumerate(zip(ia.tolist(), ib.tolist())):
            sa, sb = values[starts[a]:ends[a]], values[starts[b]:ends[b]]
            both = len(np.intersect1d(sa, sb, assume_unique=True))
            union = len(sa) + len(sb) - both
            out[k] = both / union if union else 0.0
        return out
    return similarity


def verified_pairs(pairs: np.ndarray, refs: np.ndarray, similarity, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """The candidate pairs (refs) whose similarity is >= threshold, as (row indices into
    `refs` (sorted), their similarity)."""
    ia, ib = np.searchsorted(refs, pairs[:, 0]), np.searchsorted(refs, pairs[:, 1])
    sims = similarity(ia, ib)
    hit = sims >= threshold
    return np.stack([ia[hit], ib[hit]], axis=1), sims[hit]


def resolve(pairs: np.ndarray, blocks, threshold: float, keep: str) -> dict:
    """Candidate pairs and the candidates' (refs, keys, lengths, signatures or packed
    shingle sets) blocks, an iterable read once -> {rejected (id, origin): (kept (id,
    origin), Jaccard)}: exact when the blocks carry shingle sets, else estimated."""
    refs, keys, lengths, measures = [], [], [], []
    for block in blocks:
        refs.append(block[0])
        keys.extend(block[1])
        lengths.append(block[2])
        measures.append(block[3])
    if not refs:
        return {}
    refs, lengths = np.concatenate(refs), np.concatenate(lengths)
    order = np.argsort(refs, kind="stable")
    refs, lengths, keys = refs[order], lengths[order], [keys[i] for i in order]
    same = np.flatnonzero(refs[1:] == refs[:-1])
    if same.size:  # two rows with one 64-bit ref: p ~ rows^2 / 2^65
        raise RuntimeError(f"near_dedup: rows {keys[same[0]]} and {keys[same[0] + 1]} share a 64-bit reference; "
                           "rerun with another seed")
    if isinstance(measures[0], tuple):  # packed shingle sets: one packing of all the blocks'
        sizes = np.concatenate([np.diff(offsets) for _, offsets in measures])
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        similarity = shingle_similarity(np.concatenate([values for values, _ in measures]), offsets, order)
    else:
        similarity = signature_similarity(np.concatenate(measures)[order])
    edges, _ = verified_pairs(pairs, refs, similarity, threshold)
    root = components(edges.tolist(), np.unique(edges).tolist())
    groups: dict = {}
    for m, r in root.items():
        groups.setdefault(r, []).append(m)
    rank = (lambda m: (-int(lengths[m]), keys[m])) if keep == "longest" else (lambda m: keys[m])
    drop = {}
    for group in groups.values():
        winner = min(group, key=rank)
        losers = [m for m in group if m != winner]
        sims = similarity(np.array(losers), np.full(len(losers), winner))
        for m, sim in zip(losers, sims.tolist()):
            drop[keys[m]] = (keys[winner], sim)
    return drop


ROW_BLOCK = 4096  # rows read again per block of candidates


class NearDedup(Step, beam.PTransform):
    """A whole-pool filter step (see the module docstring), streamed: `project`, `decide`
    (the state: {rejected (id, origin): (kept (id, origin), Jaccard)}), `route`."""

    kind = "filter"
    type = "near_dedup"

    def __init__(self, threshold: float = 0.8, shingle: int = 5, unit: str = "word", num_perm: int = 128,
                 bands: int = 16, keep: str = "longest", seed: int = 0, verify: str = "exact"):
        super().__init__()
        if not 0 < threshold <= 1:
            raise ConfigError(f"near_dedup: threshold must be in (0, 1], got {threshold!r}")
        if unit not in ("word", "char"):
            raise ConfigError(f"near_dedup: unit must be word or char, got {unit!r}")
        if not (isinstance(shingle, int) and shingle >= 1):
            raise ConfigError(f"near_dedup: shingle must be a positive number of {unit}s, got {shingle!r}")
        if not (isinstance(num_perm, int) and isinstance(bands, int) and bands >= 1 and num_perm % bands == 0):
            raise ConfigError(f"near_dedup: num_perm ({num_perm!r}) must be a multiple of bands ({bands!r})")
        if keep not in ("longest", "first"):
            raise ConfigError(f"near_dedup: keep must be longest or first, got {keep!r}")
        if verify not in ("estimate", "exact"):
            raise ConfigError(f"near_dedup: verify must be estimate or exact, got {verify!r}")
        self.threshold, self.shingle, self.unit = float(threshold), shingle, unit
        self.num_perm, self.bands, self.keep, self.seed, self.verify = num_perm, bands, keep, int(seed), verify
        self._perms = permutations(num_perm, self.seed)

    def values(self, record: dict) -> np.ndarray:
        """The row's shingle values (step 1)."""
        return shingle_values(shingles(record_text(record), self.shingle, self.unit))

    def project(self, record: dict) -> dict:
        """{id, origin, bands: the band hashes of its signature (b"" for a row with no text)}."""
        values = self.values(record)
        bands = band_hashes(signature(values, *self._perms)[None, :], self.bands)[0].tobytes() if values.size else b""
        return {"id": record["id"], "origin": record["origin"], "bands": bands}

    def candidate_block(self, records: list[dict], members: np.ndarray):
        """A batch of rows read again -> the candidates' (refs, keys, lengths, signatures
        or packed shingle sets) among them, `members` the candidates' sorted refs; or None."""
        refs = np.fromiter((row_ref(r["id"], r["origin"]) for r in records), dtype=np.uint64, count=len(records))
        pos = np.minimum(np.searchsorted(members, refs), max(len(members) - 1, 0))
        hit = np.flatnonzero(members[pos] == refs) if len(members) else np.empty(0, dtype=np.int64)
        if not hit.size:
            return None
        rows = [records[k] for k in hit.tolist()]
        values = [self.values(r) for r in rows]
        if self.verify == "exact":  # values are < 2^31
            verify = packed_sets([np.unique(v).astype(np.uint32) for v in values])
        else:
            verify = np.stack([signature(v, *self._perms) for v in values])
        lengths = np.fromiter((len(r["response"]) for r in rows), dtype=np.int64, count=len(rows))
        return refs[hit], [(r["id"], r["origin"]) for r in rows], lengths, verify

    def decide(self, rows_again) -> beam.PTransform:
        """Projections -> the state; `rows_again()` gives the rows once more, of which the
        candidates are shingled again to verify their pairs."""
        step = self

        def bands(batch):
            live = [k for k, b in enumerate(batch["bands"]) if b]
            ids, origins = batch["id"], batch["origin"]
            refs = np.fromiter((row_ref(ids[k], origins[k]) for k in live), dtype=np.uint64, count=len(live))
            hashes = np.frombuffer(b"".join(batch["bands"][k] for k in live),
                                   dtype=np.uint64).reshape(len(live), step.bands)
            for j in range(step.bands):
                yield j, (np.ascontiguousarray(hashes[:, j]), refs)

        def pairs_of(group):
            _, arrays = group
            arrays = list(arrays)
            return bucket_pairs(np.concatenate([a[0] for a in arrays]), np.concatenate([a[1] for a in arrays]))

        def unique(pairs):
            pairs = np.unique(np.concatenate([np.empty((0, 2), dtype=np.uint64)] + pairs), axis=0)
            return pairs, np.unique(pairs)

        def candidates(batch, pairs):
            block = step.candidate_block(batch, pairs[1])
            if block is not None:
                yield block

        class Decide(beam.PTransform):
            def expand(self, projections):
                pairs = (projections
                         | "Bands" >> beam.FlatMap(bands)
                         | "Buckets" >> beam.GroupByKey()
                         | "Pairs" >> beam.Map(pairs_of)
                         | "AllPairs" >> beam.combiners.ToList()
                         | "OnePerPair" >> beam.Map(unique))
                members = (rows_again()
                           | "CandidateBlocks" >> beam.BatchElements(min_batch_size=ROW_BLOCK,
                                                                     max_batch_size=ROW_BLOCK)
                           | "Candidates" >> beam.FlatMap(candidates, beam.pvalue.AsSingleton(pairs)))
                # the blocks as an iterable side input, not gathered into one list first
                # (ToList): the local runner held that list encoded and decoded several times
                return pairs | "Resolve" >> beam.Map(lambda p, m: resolve(p[0], m, step.threshold, step.keep),
                                                     beam.pvalue.AsIter(members))

        return Decide()

    def route(self, row: dict, drop: dict) -> tuple[str | None, dict]:
        hit = drop.get((row["id"], row["origin"]))
        if hit is None:
            return None, {}
        (kept_id, kept_origin), sim = hit
        measure = "Jaccard" if self.verify == "exact" else "estimated Jaccard"
        return f"near-duplicate of {kept_id} ({kept_origin}), {measure} {sim:.3f}", {}

    def expand(self, pcoll):
        return pcoll | ApplyDecisions(self)
