"""IFD, Instruction-Following Difficulty (Li et al., 2023, "From Quantity to Quality",
the Cherry LLM paper): how much the instruction helps the model produce the answer.

    IFD(Q, A) = s(A | Q) / s(A)

s(A | Q) is the mean cross-entropy of the answer tokens given the prompt (the
`likelihood` scorer's -logprob_mean: same template, same encoding); s(A) is the mean
cross-entropy of the answer tokens with no prompt at all: the answer's text tokenized
alone, each token predicted from the answer tokens before it, so its first token is not
scored (as in the authors' code, which takes the loss of the answer text on its own).
IFD near or above 1: the instruction does not help (the paper drops rows with IFD >= 1
as misaligned); high IFD below 1: hard to follow, the rows the paper keeps.

Defaults follow the authors' code: the answer's text without EOS (`include_eos: false`),
the plain template for the conditioned score. With a multi-turn conversation, s(A) is
the last answer alone. Both losses come from one token-budgeted pass over the model
(`score_encoded`), so IFD costs about one likelihood pass plus the answers again.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import pyarrow as pa

from curate.formatting import Encoded
from curate.scorers.likelihood import LikelihoodScorer, LoadedLM


def encode_alone(record: dict, tokenizer, max_length: int, include_eos: bool) -> Encoded:
    """The answer's tokens with nothing before them; the loss covers tokens 2..n."""
    full = tokenizer(record["response"], add_special_tokens=False)["input_ids"]
    if include_eos and tokenizer.eos_token_id is not None:
        full = full + [tokenizer.eos_token_id]
    return Encoded(full[:max_length], 1, len(full) > max_length)


@dataclasses.dataclass
class IfdScorer(LikelihoodScorer):
    """IFD = s(A|Q) / s(A) (see the module docstring). Adds `ifd`, `ifd_loss_conditioned`
    and `ifd_loss_alone` (float64; NaN when the answer has fewer than 2 tokens), each name
    preceded by `prefix`. Options as the likelihood scorer's."""

    type: ClassVar[str] = "ifd"

    include_eos: bool = False

    def column_names(self) -> tuple[str, str, str]:
        p = self.prefix
        return (f"{p}ifd", f"{p}ifd_loss_conditioned", f"{p}ifd_loss_alone")

    def output_columns(self) -> dict[str, pa.DataType]:
        return {name: pa.float64() for name in self.column_names()}

    def score_batch(self, lm: LoadedLM, records: list[dict]) -> tuple[list[dict], int]:
        conditioned = self.encode_all(records, lm.tokenizer, include_eos=self.include_eos)
        alone = [encode_alone(r, lm.tokenizer, self.max_length, self.include_eos) for r in records]
        scores = self.logprobs(lm, conditioned + alone)
        c_ifd, c_cond, c_alone = self.column_names()
        out = []
        for i, record in enumerate(records):
            loss_cond, loss_alone = -scores[i][1], -scores[len(records) + i][1]
            ifd = loss_cond / loss_alone if loss_alone > 0 and not math.isnan(loss_cond) else float("nan")
            out.append({**record, c_ifd: ifd, c_cond: loss_cond, c_alone: loss_alone})
        return out, sum(len(e.input_ids) for e in conditioned + alone)
