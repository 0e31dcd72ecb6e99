"""Text normalisation the filters share: the words that near dedup shingles and
decontamination cuts into n-grams."""

from __future__ import annotations

import re

_NOT_WORD = re.compile(r"[^0-9a-z]+")


def words(text: str) -> list[str]:
    """Normalised words: lower case, anything but letters and digits is a separator."""
    return [w for w in _NOT_WORD.split(text.lower()) if w] if text else []
