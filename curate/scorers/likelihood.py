"""Response log-likelihood under a causal LM: the score behind GRAPE (and IFD/perplexity).

For an example encoded by `curate.formatting.encode` (prompt tokens, then response
tokens), the score is sum_t log p(y_t | x, y_<t) over response tokens only, with its mean
(GRAPE's length-normalised score) and the token count. The computation is
`curate.models.logprobs` (shared with IFD and the S2L trajectories).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import ClassVar

import pyarrow as pa

from curate.models.batching import pad_id
from curate.models.lm_head import DEFAULT_MAX_LOGIT_ELEMENTS
from curate.models.logprobs import score_encoded
from curate.scorers.base import CausalLMScorer

log = logging.getLogger(__name__)


@dataclasses.dataclass
class LoadedLM:
    """A causal LM on the worker with what scoring it needs."""

    model: object
    tokenizer: object
    max_tokens: int
    pad_token_id: int


@dataclasses.dataclass
class LikelihoodScorer(CausalLMScorer):
    """Log-probability of the response given the prompt under a causal LM.

    Adds `logprob_sum` (float64), `logprob_mean` (float64: GRAPE's score),
    `n_response_tokens` (int64) and `truncated` (bool), each name preceded by `prefix`.
    include_eos (default true): the end of the response (EOS for the plain template, the
    chat template's end-of-turn tokens) counts as response tokens, in the sum, the mean
    and the count: "the probability of this response, and of stopping after it". False
    scores the response's text alone, as implementations that do not append EOS do.
    Resources: one model copy per SDK process (or `model_copies` shared ones), plus
    activations for `max_tokens_per_batch` tokens. By default one example per forward on
    CPU: a padded batch needs an attention mask, which takes SDPA off its fused causal
    kernel, and cost 30-50% more CPU per token than unpadded single rows with SmolLM2 in
    bf16 (benchmarks/RESULTS_scorer.md); 65536 tokens on CUDA, where batching fills the device.
    """

    type: ClassVar[str] = "likelihood"

    max_length: int = 2048
    include_eos: bool = True
    prefix: str = ""
    max_logit_elements: int = DEFAULT_MAX_LOGIT_ELEMENTS

    def column_names(self) -> tuple[str, str, str, str]:
        p = self.prefix
        return (f"{p}logprob_sum", f"{p}logprob_mean", f"{p}n_response_tokens", f"{p}truncated")

    def output_columns(self) -> dict[str, pa.DataType]:
        return dict(zip(self.column_names(), (pa.float64(), pa.float64(), pa.int64(), pa.bool_())))

    def load(self) -> LoadedLM:
        model, tokenizer = self.load_lm(self.model)
        device_type = model.get_output_embeddings().weight.device.type
        return LoadedLM(model, tokenizer, self.token_budget(device_type), pad_id(tokenizer))

    def logprobs(self, lm: LoadedLM, encoded: list) -> list[tuple[float, float, int]]:
        return score_encoded(lm.model, encoded, max_tokens_per_batch=lm.max_tokens,
                             pad_token_id=lm.pad_token_id, max_logit_elements=self.max_logit_elements)

    def score_batch(self, lm: LoadedLM, records: list[dict]) -> tuple[list[dict], int]:
        encoded = self.encode_all(records, lm.tokenizer, include_eos=self.include_eos)
        c_sum, c_mean, c_n, c_trunc = self.column_names()
        out = [{**record, c_sum: total, c_mean: mean, c_n: n, c_trunc: e.truncated}
               for record, e, (total, mean, n) in zip(records, encoded, self.logprobs(lm, encoded))]
        return out, sum(len(e.input_ids) for e in encoded)
