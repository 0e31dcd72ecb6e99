"""Seeded row hashing: the one hash every method draws its pseudo-random order from.

A row's key is blake2b-64 of "[salt NUL] seed NUL id NUL origin": it depends only on the
row and the seed, so reruns, runners and shardings agree, and a salt keeps two draws of
one method (e.g. the k-means sample and the in-cluster order) independent.
"""

from __future__ import annotations

import hashlib


def hash_bits(seed: int, record: dict, salt: str | None = None) -> int:
    """The row's 64-bit key."""
    text = f"{seed}\x00{record['id']}\x00{record.get('origin', '')}"
    if salt is not None:
        text = f"{salt}\x00{text}"
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def hash_unit(seed: int, record: dict, salt: str | None = None) -> float:
    """The key as u in [0, 1)."""
    return hash_bits(seed, record, salt) / 2**64
