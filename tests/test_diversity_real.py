"""Diversity clustering on the real mixed pool (gsm8k, codealpaca, gpteacher roleplay and
toolformer) with the embedded all-MiniLM-L6-v2: clusters separate the sources far better
than chance."""

import gzip
import json
import random
from collections import Counter

import apache_beam as beam
import pytest
from apache_beam.testing.util import assert_that

from curate.pipeline.run import pipeline_options
from curate.selectors import diversity as dv
from curate.selectors.shared import kmeans as km

SOURCES = ("gsm8k_train", "codealpaca", "gpteacher_roleplay", "gpteacher_toolformer")


def read_pool(shared_data, per_source):
    from curate.records import adapt, detect_adapter

    rows = []
    for name in SOURCES:
        with gzip.open(shared_data / f"{name}.jsonl.gz", "rt") as fh:
            for line_no, line in enumerate(fh, 1):
                if line_no > per_source:
                    break
                raw = json.loads(line)
                for rec in adapt(raw, detect_adapter(raw, {}), {}, name):
                    rec["origin"] = f"{name}:{line_no}"
                    rows.append(rec)
    return rows


def purity(clusters, sources):
    """Share of rows whose cluster's majority source is their own."""
    by = {}
    for c, s in zip(clusters, sources):
        by.setdefault(c, Counter())[s] += 1
    return sum(cnt.most_common(1)[0][1] for cnt in by.values()) / len(clusters)


@pytest.mark.integration
def test_clusters_separate_sources_on_the_real_pool(shared_data, capsys):
    from curate.models import load_embedder
    from curate.scorers.embedding import embed_texts, record_text

    rows = read_pool(shared_data, per_source=100)
    model, tok = load_embedder("minilm", device="cpu")
    vectors = embed_texts(model, tok, [record_text(r, "prompt_response") for r in rows], max_length=64)
    for r, v in zip(rows, vectors):
        r["embedding"] = v.tolist()
    with beam.Pipeline(options=pipeline_options([])) as p:
        out = p | beam.Create(rows) | dv.DiversitySelector(budget=80, k=8)
        both = (out["kept"], out["rejected"]) | beam.Flatten()
        pairs = both | beam.Map(lambda r: (r["cluster"], r["source"])) | beam.combiners.ToList()
        kept = out["kept"] | "src" >> beam.Map(lambda r: r["source"]) | "kl" >> beam.combiners.ToList()
        assert_that(pairs, _check_purity, label="purity")
        assert_that(kept, _check_mix, label="mix")
    # the local runner runs the checks in this process
    with capsys.disabled():
        print(f"\n[diversity] {len(rows)} rows from 4 sources, K=8: purity {MEASURED['purity']:.3f} "
              f"(same cluster sizes, shuffled labels: {MEASURED['chance']:.3f}); "
              f"kept {MEASURED['kept']}")
    assert MEASURED["n"] == len(rows)


MEASURED = {}


def _check_purity(got):
    pairs = sorted(got[0])
    clusters, sources = [c for c, _ in pairs], [s for _, s in pairs]
    p = purity(clusters, sources)
    shuffled = clusters[:]
    random.Random(0).shuffle(shuffled)
    chance = purity(shuffled, sources)  # the same cluster sizes, labels at random
    MEASURED.update(n=len(pairs), purity=p, chance=chance)
    assert p > 0.9 and chance < 0.4, (p, chance)


def _check_mix(got):
    # proportional allocation over source-pure clusters keeps every source, ~20 each
    kept_sources = got[0]
    counts = Counter(kept_sources)
    MEASURED["kept"] = dict(counts)
    assert len(kept_sources) == 80 and set(counts) == set(SOURCES), counts
    assert min(counts.values()) >= 12, counts
