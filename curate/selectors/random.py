"""Random selection: the seeded baseline every other method is compared with.

Each record gets a key u = hash(seed, id, origin) in [0, 1); the `budget` records
with the smallest keys are kept. The key depends only on the record and the seed, so
a rerun, a different runner or a different sharding keeps exactly the same rows, and
a smaller budget keeps a subset of a larger one (nested selections).
"""

from __future__ import annotations

import apache_beam as beam
import pyarrow as pa

from curate.config import parse_budget
from curate.selectors.base import Selector
from curate.selectors.shared.cutoff import Cutoff, KeepTop, passes
from curate.selectors.shared.keys import hash_unit


class RandomSelector(Selector):
    type = "random"
    title = "random"
    report_section = "curate.report.sections:random_section"

    def __init__(self, budget: int | float, seed: int = 0):
        super().__init__()
        self.budget = parse_budget(budget, "random selector")
        self.seed = int(seed)

    def output_columns(self):
        return {"random_key": pa.float64()}

    def describe(self):
        return {"type": self.type, "budget": self.budget, "seed": self.seed}

    def key(self, record: dict) -> tuple:
        # smaller random key is better; negate so KeepTop's "largest" keeps it
        return (-hash_unit(self.seed, record), record["origin"], record["id"])

    def explain(self, record: dict, k: tuple, cutoff: dict, kept: bool) -> tuple[dict, str | None]:
        record = {**record, "random_key": -k[0]}
        if kept:
            return record, None
        if cutoff["keep"] == "none":
            return record, "budget is 0"
        return record, f"random key {-k[0]:.6f} above the cut-off {-cutoff['key'][0]:.6f} (seed {self.seed})"

    # streamed (curate.pipeline.streamed): the key needs only (id, origin); the state is the cut-off
    def project(self, record: dict) -> dict:
        return {"id": record["id"], "origin": record["origin"]}

    def decide(self, rows_again) -> beam.PTransform:
        def keys(batch):
            return [self.key({"id": id_, "origin": origin}) for id_, origin in zip(batch["id"], batch["origin"])]

        return "Keys" >> beam.FlatMap(keys) | Cutoff(self.budget)

    def route(self, row: dict, cutoff: dict) -> tuple[str | None, dict]:
        k = self.key(row)
        return self.explain({}, k, cutoff, passes(k, cutoff))[1], {"random_key": -k[0]}

    def expand(self, pcoll):
        return pcoll | KeepTop(self.key, self.budget, self.explain)
