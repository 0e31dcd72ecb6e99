"""The length filter: examples whose length lies in [min, max], in chars, words or tokens."""

from __future__ import annotations

from curate.config import ConfigError
from curate.filters.base import Filter
from curate.models import load_tokenizer


class LengthFilter(Filter):
    """Keep examples whose length (prompt + response) lies in [min, max].

    unit: chars, words, or tokens (with `tokenizer`, a model name or path; default the
    embedded LM's tokenizer). `field`: "all" (default), "prompt" or "response".
    """

    type = "length"

    def __init__(self, min: int = 1, max: int | None = None, unit: str = "chars",
                 field: str = "all", tokenizer: str = "default"):
        if unit not in ("chars", "words", "tokens"):
            raise ConfigError(f"length filter: unit must be chars, words or tokens, not {unit!r}")
        if field not in ("all", "prompt", "response"):
            raise ConfigError(f"length filter: field must be all, prompt or response, not {field!r}")
        self.min, self.max, self.unit, self.field, self.tokenizer_name = min, max, unit, field, tokenizer
        self._tokenizer = None

    def setup(self):
        if self.unit == "tokens" and self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_name)

    def _text(self, record: dict) -> str:
        if self.field == "prompt":
            return record["prompt"]
        if self.field == "response":
            return record["response"]
        return "\n".join(m["content"] for m in record["messages"])

    def measure(self, record: dict) -> int:
        text = self._text(record)
        if self.unit == "chars":
            return len(text)
        if self.unit == "words":
            return len(text.split())
        return len(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    def reason_to_drop(self, record: dict) -> str | None:
        n = self.measure(record)
        if n < self.min:
            return f"too short: {n} {self.unit} < min {self.min}"
        if self.max is not None and n > self.max:
            return f"too long: {n} {self.unit} > max {self.max}"
        return None
