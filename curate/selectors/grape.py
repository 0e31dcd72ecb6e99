"""GRAPE: "The Best Instruction-Tuning Data are Those That Fit" (Zhang et al., 2025).

For each instruction with several candidate responses, keep the response the *target*
model finds most likely: the highest mean log-probability of the response tokens given
the prompt (length-normalised, i.e. lowest perplexity). Defaults from the paper:
plain template `Question: {instruction}\\nAnswer: {response}` (set on the likelihood
scorer), k = 1 response per instruction.

Options beyond the default: top-k; `reverse` keeps the *least* likely response (the
paper's ablation); multi-round (paper appendix) is a second run whose likelihood
scorer points `model:` at the model fine-tuned on round one.
No official code exists; the method is one forward pass per candidate, done by the
likelihood scorer, so this selector only ranks score columns.

Candidates are grouped by `prompt_id` (rows with the same prompt). A candidate whose
score is missing or NaN ranks after every scored one.
"""

from __future__ import annotations

import math

import apache_beam as beam
import pyarrow as pa

from curate.config import ConfigError
from curate.selectors.base import Selector


def rank_candidates(candidates: list[dict], score_column: str, reverse: bool = False) -> list[dict]:
    """Candidates best first: highest score (lowest with reverse), ties by id."""
    def key(r):
        s = r.get(score_column)
        missing = s is None or (isinstance(s, float) and math.isnan(s))
        return (missing, 0.0 if missing else (s if reverse else -s), r["id"])

    return sorted(candidates, key=key)


class GrapeSelector(Selector):
    type = "grape"
    title = "GRAPE"
    report_section = "curate.report.sections:grape_section"

    def __init__(self, k: int = 1, score_column: str = "logprob_mean", reverse: bool = False):
        super().__init__()
        if not isinstance(k, int) or k < 1:
            raise ConfigError(f"grape: k must be a positive integer, got {k!r}")
        self.k, self.score_column, self.reverse = k, score_column, bool(reverse)
        self.requires = (score_column,)

    def output_columns(self):
        return {"score_grape": pa.float64(), "grape_rank": pa.int64(), "grape_candidates": pa.int64()}

    def describe(self):
        return {"type": self.type, "k": self.k, "score_column": self.score_column, "reverse": self.reverse}

    def expand(self, pcoll):
        k, column, reverse = self.k, self.score_column, self.reverse
        order = "lowest" if reverse else "highest"

        def choose(group):
            _, candidates = group
            ranked = rank_candidates(list(candidates), column, reverse)
            worst_kept = ranked[min(k, len(ranked)) - 1].get(column)
            for rank, r in enumerate(ranked, 1):
                r = {**r, "score_grape": r.get(column), "grape_rank": rank, "grape_candidates": len(ranked)}
                if rank <= k:
                    yield r
                else:
                    yield beam.pvalue.TaggedOutput("rejected", {
                        **r, "reject_reason": f"rank {rank} of {len(ranked)} candidates by {column} "
                                              f"({r[column]!r}; kept the {order} {k}, down to {worst_kept!r})"})

        out = (pcoll
               | "ByPrompt" >> beam.Map(lambda r: (r["prompt_id"], r))
               | "Group" >> beam.GroupByKey()
               | "Choose" >> beam.FlatMap(choose).with_outputs("rejected", main="kept"))
        return {"kept": out.kept, "rejected": out.rejected}
