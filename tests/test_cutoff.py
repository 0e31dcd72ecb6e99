"""Cutoff (curate.selectors.shared.cutoff): the combine's output is the cut-off itself;
checked against the keys sorted by hand, on the local runner."""

import apache_beam as beam
import pytest
from apache_beam.testing.util import assert_that, equal_to

from curate.pipeline.run import LOCAL_RUNNER
from curate.selectors.shared.cutoff import Cutoff, passes

KEYS = [(float(s), f"f.jsonl:{i}", f"id{i}") for i, s in enumerate([5, 1, 9, 3, 7, 2, 8, 6, 4, 0])]


@pytest.mark.parametrize("budget, kept", [
    (3, 3), (0, 0), (10, 10), (25, 10),  # counts: a budget over the pool keeps it all
    (0.25, 3), (0.5, 5), (1.0, 10), (0.01, 0),  # fractions of 10 rows, rounded half up
])
def test_the_cutoff_keeps_the_budget_largest_keys(budget, kept):
    with beam.Pipeline(LOCAL_RUNNER) as p:
        cutoff = p | beam.Create(KEYS) | Cutoff(budget)
        picked = cutoff | beam.Map(lambda c: sorted(k for k in KEYS if passes(k, c)))
        assert_that(picked, equal_to([sorted(KEYS, reverse=True)[:kept][::-1]]))


@pytest.mark.parametrize("budget", [3, 0.5])
def test_an_empty_input_gives_a_cutoff_all(budget):
    with beam.Pipeline(LOCAL_RUNNER) as p:
        assert_that(p | beam.Create([]) | Cutoff(budget), equal_to([{"keep": "all", "key": None}]))
