import math
import random

import apache_beam as beam
from apache_beam.testing.util import assert_that, equal_to

from curate.pipeline.run import pipeline_options
from curate.records import make_record
from curate.selectors.grape import GrapeSelector


def pool(seed=0, n_prompts=12, max_candidates=6):
    rng = random.Random(seed)
    rows = []
    for p in range(n_prompts):
        for c in range(rng.randint(1, max_candidates)):
            r = make_record([{"role": "user", "content": f"instruction {p}"},
                             {"role": "assistant", "content": f"response {p}.{c}"}], "pool", f"gen{c}")
            r["origin"] = f"pool:{len(rows) + 1}"
            r["logprob_mean"] = round(rng.uniform(-3, 0), 1)  # coarse: ties happen
            rows.append(r)
    if len(rows) > 3:
        rows[3]["logprob_mean"] = float("nan")
    return rows


def brute_force(rows, k, reverse):
    """An independent loop: per instruction, sort by score, NaN last, ties by id."""
    kept = []
    for prompt in sorted({r["prompt"] for r in rows}):
        cands = [r for r in rows if r["prompt"] == prompt]
        scored = [r for r in cands if not math.isnan(r["logprob_mean"])]
        nan = sorted([r for r in cands if math.isnan(r["logprob_mean"])], key=lambda r: r["id"])
        scored.sort(key=lambda r: r["id"])
        scored.sort(key=lambda r: r["logprob_mean"], reverse=not reverse)  # stable: ties keep id order
        kept += [r["id"] for r in (scored + nan)[:k]]
    return kept



def check(rows, k, reverse):
    expected = brute_force(rows, k, reverse)
    with beam.Pipeline(options=pipeline_options([])) as p:
        out = p | beam.Create(rows) | GrapeSelector(k=k, reverse=reverse)
        assert_that(out["kept"] | "kid" >> beam.Map(lambda r: r["id"]), equal_to(expected), label="kept")
        assert_that(out["rejected"] | "rid" >> beam.Map(lambda r: r["id"]),
                    equal_to([r["id"] for r in rows if r["id"] not in set(expected)]), label="rejected")
        assert_that(out["kept"] | "rank" >> beam.Map(lambda r: r["grape_rank"] <= k and r["score_grape"] is not None),
                    equal_to([True] * len(expected)), label="ranks")


def test_grape_matches_brute_force_top1():
    check(pool(0), k=1, reverse=False)


def test_grape_top3_and_reverse():
    check(pool(1), k=3, reverse=False)
    check(pool(2), k=1, reverse=True)


def test_rejected_rows_say_why():
    rows = pool(3, n_prompts=1, max_candidates=1)
    rows = [dict(rows[0], id="a", logprob_mean=-1.0), dict(rows[0], id="b", logprob_mean=-0.5)]
    with beam.Pipeline(options=pipeline_options([])) as p:
        out = p | beam.Create(rows) | GrapeSelector()
        assert_that(out["rejected"] | beam.Map(lambda r: (r["id"], r["grape_rank"], r["reject_reason"])),
                    equal_to([("a", 2, "rank 2 of 2 candidates by logprob_mean (-1.0; kept the highest 1, down to -0.5)")]))
