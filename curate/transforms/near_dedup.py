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
   band's values land in one bucket (a GroupByKey per band), and each pair in a bucket is
   a candidate.
4. Verification: a candidate pair is a duplicate when its estimated Jaccard (the share of
   equal signature positions) is >= `threshold`.
5. Components: the verified pairs are gathered on one worker and joined by union-find
   (only pairs and the members' signatures travel there, never the rows: about 600 bytes
   per member at num_perm 128; a pool where millions of rows have near-duplicates needs
   more memory than one worker has: then raise the threshold or shard by source first).
   Each component keeps one row: the longest response (`keep: longest`, ties by id) or the
   smallest id (`keep: first`); every other member is rejected with the reason naming
   the kept row and their estimated Jaccard.
A row with fewer words than `shingle` is one shingle (its whole text). Rows with no text
left after normalisation are never duplicates.
"""

from __future__ import annotations

import hashlib

import apache_beam as beam
import numpy as np

from curate.config import ConfigError
from curate.transforms.decontaminate import words
from curate.transforms.base import REJECTED

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


def components(edges, members: dict) -> dict:
    """Union-find over verified pairs: {member id: component root id} (roots arbitrary)."""
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


class NearDedup(beam.PTransform):
    """A whole-pool filter step (see the module docstring): {"kept", "rejected", "pairs"},
    pairs being the verified (id, id, estimated Jaccard) edges, for diagnostics."""

    type = "near_dedup"
    per_example = False

    def __init__(self, threshold: float = 0.8, shingle: int = 5, unit: str = "word", num_perm: int = 128,
                 bands: int = 16, keep: str = "longest", seed: int = 0):
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
        self.threshold, self.shingle, self.unit = float(threshold), shingle, unit
        self.num_perm, self.bands, self.keep, self.seed = num_perm, bands, keep, int(seed)

    def expand(self, pcoll):
        a, b = permutations(self.num_perm, self.seed)
        n, unit, rows_per_band, threshold, keep = self.shingle, self.unit, self.num_perm // self.bands, \
            self.threshold, self.keep

        def sign(record):
            sig = signature(shingle_values(shingles(record_text(record), n, unit)), a, b)
            key = (record["id"], record["origin"])  # (id, origin) is unique; exact copies share an id
            rank = (-len(record["response"]), key) if keep == "longest" else (key,)
            return key, sig, rank

        def bucket(item):
            rid, sig, rank = item
            bands = 0 if (sig == PRIME).all() else len(sig) // rows_per_band  # no text: never a duplicate
            raw = sig.tobytes()  # bytes travel through the shuffle far cheaper than an array
            width = rows_per_band * sig.itemsize
            for j in range(bands):
                yield (j, raw[j * width:(j + 1) * width]), (rid, raw, rank)

        def verify(group):
            _, members = group
            if len(members) < 2:
                return []
            members = [(rid, np.frombuffer(raw, dtype=np.uint32), rank)
                       for rid, raw, rank in sorted(members, key=lambda m: m[0])]
            return [((m1[0], m2[0]), (sim, m1, m2))
                    for i, m1 in enumerate(members) for m2 in members[i + 1:]
                    if (sim := estimated_jaccard(m1[1], m2[1])) >= threshold]

        def resolve(edges):
            """All verified pairs on one worker -> {rejected id: (kept id, estimated Jaccard)}."""
            members = {}
            for (_, (_, m1, m2)) in edges:
                members[m1[0]], members[m2[0]] = m1, m2
            root = components([e[0] for e in edges], members)
            groups: dict = {}
            for m, r in root.items():
                groups.setdefault(r, []).append(members[m])
            drop = {}
            for group in groups.values():
                winner = min(group, key=lambda m: m[2])
                for m in group:
                    if m[0] != winner[0]:
                        drop[m[0]] = (winner[0], estimated_jaccard(m[1], winner[1]))
            return drop

        signed = pcoll | "Sign" >> beam.Map(sign)
        pairs = (signed
                 | "Bands" >> beam.FlatMap(bucket)
                 | "Buckets" >> beam.GroupByKey()
                 | "Verify" >> beam.FlatMap(verify)
                 | "OnePerPair" >> beam.CombinePerKey(lambda vs: max(vs, key=lambda v: v[0])))
        drop = pairs | "AllPairs" >> beam.combiners.ToList() | "Components" >> beam.Map(resolve)

        def split(record, drop):
            hit = drop.get((record["id"], record["origin"]))
            if hit is None:
                yield record
            else:
                (kept_id, kept_origin), sim = hit
                yield beam.pvalue.TaggedOutput(REJECTED, {
                    **record, "reject_stage": "filter:near_dedup",
                    "reject_reason": f"near-duplicate of {kept_id} ({kept_origin}), estimated Jaccard {sim:.3f}"})

        out = pcoll | "Split" >> beam.FlatMap(split, beam.pvalue.AsSingleton(drop)).with_outputs(
            REJECTED, main="kept")
        return {"kept": out.kept, REJECTED: out[REJECTED],
                "pairs": pairs | "PairSims" >> beam.Map(lambda kv: (kv[0][0], kv[0][1], kv[1][0]))}
