"""The one step registry (curate.steps): a new selector or scorer is one module, found by
defining it or through an installed package's `curate.steps` entry point, with no other
file edited; the job's result is checked against a computation by hand."""

import json
import textwrap

import datasets
import pytest

from curate import steps
from curate.config import ConfigError, parse_job
from curate.pipeline.run import run_job
from curate.records import ADAPTERS, adapt

ROWS = [{"question": f"Question {i}?", "answer": " ".join(["word"] * (1 + (i * 7) % 11)) + f" {i}"}
        for i in range(20)]

SELECTOR_MODULE = '''
"""A user's selector: keep the `budget` rows with the shortest responses."""
import pyarrow as pa

from curate.selectors.base import Selector
from curate.selectors.shared.cutoff import KeepTop


def shortest_section(run):
    return f"<p>shortest responses: kept {run.n_kept} of {run.n}</p>"


class ShortestResponses(Selector):
    type = "shortest_responses_test"
    title = "shortest responses (test plugin)"
    report_section = __name__ + ":shortest_section"

    def __init__(self, budget: int):
        super().__init__()
        self.budget = budget

    def output_columns(self):
        return {"response_length": pa.int64()}

    def key(self, record):  # larger is better: the shortest first, ties by (origin, id)
        return (-len(record["response"]), record["origin"], record["id"])

    def explain(self, record, key, cutoff, kept):
        return {**record, "response_length": -key[0]}, None if kept else "a longer response"

    def expand(self, rows):
        return rows | KeepTop(self.key, self.budget, self.explain)
'''

SCORER_PACKAGE = '''
"""A user's scorer, installed as a package: the number of words in the response."""
import dataclasses
from typing import ClassVar

import pyarrow as pa

from curate.scorers.base import ModelScorer


@dataclasses.dataclass
class ResponseWords(ModelScorer):
    type: ClassVar[str] = "response_words_test"

    def output_columns(self):
        return {"response_words": pa.int64()}

    def load(self):
        return None  # no model: the scorer counts

    def score_batch(self, loaded, records):
        return [{**r, "response_words": len(r["response"].split())} for r in records], 0
'''


def write_pool(tmp_path):
    path = tmp_path / "pool.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    recs = [dict(adapt(r, ADAPTERS["qa"], {}, "pool")[0], origin=f"pool.jsonl:{i + 1}") for i, r in enumerate(ROWS)]
    return str(path), recs


def kept_ids(out):
    return sorted(datasets.load_from_disk(str(out))["id"])


def test_a_selector_in_a_new_module_runs_in_a_job(tmp_path, monkeypatch):
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "my_shortest.py").write_text(SELECTOR_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path / "plugins"))
    import my_shortest  # noqa: F401  (defining the class registers it)

    pool, recs = write_pool(tmp_path)
    m = run_job(parse_job({"inputs": [pool], "output": str(tmp_path / "out"),
                           "selectors": [{"type": "shortest_responses_test", "budget": 5}]}), progress=False)
    by_hand = sorted(recs, key=lambda r: (len(r["response"]), r["origin"], r["id"]))[:5]
    assert kept_ids(tmp_path / "out") == sorted(r["id"] for r in by_hand)
    assert m["counts"]["not_selected"] == {"select:shortest_responses_test": 15}
    page = (tmp_path / "out" / "report.html").read_text()  # its section, found through the step
    assert "shortest responses (test plugin)" in page and "shortest responses: kept 5 of 20" in page


def install(site, name, module_text, entry_point_value):
    """A package as pip leaves it in site-packages: the module and its .dist-info, with
    the entry point in the group curate.steps."""
    (site / name).mkdir(parents=True)
    (site / name / "__init__.py").write_text(textwrap.dedent(module_text))
    info = site / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[curate.steps]\n{name} = {entry_point_value}\n")


def test_a_scorer_from_an_installed_package_runs_in_a_job(tmp_path, monkeypatch):
    site = tmp_path / "site-packages"
    install(site, "curate_words_plugin", SCORER_PACKAGE, "curate_words_plugin")
    monkeypatch.syspath_prepend(str(site))
    assert "response_words_test" in steps.known("scorer")  # found through the entry point alone

    pool, recs = write_pool(tmp_path)
    run_job(parse_job({"inputs": [pool], "output": str(tmp_path / "out"),
                       "scorers": [{"type": "response_words_test", "device": "cpu"}],
                       "selectors": [{"type": "top", "column": "response_words", "budget": 4}]}), progress=False)
    by_hand = sorted(recs, key=lambda r: (-len(r["response"].split()), r["origin"], r["id"]))[:4]
    assert kept_ids(tmp_path / "out") == sorted(r["id"] for r in by_hand)
    kept = datasets.load_from_disk(str(tmp_path / "out"))
    assert sorted(kept["response_words"]) == sorted(len(r["response"].split()) for r in by_hand)


def test_a_plugin_that_fails_to_load_is_named(tmp_path, monkeypatch):
    site = tmp_path / "site-packages"
    install(site, "curate_broken_plugin", "raise ImportError('needs torchvision')\n", "curate_broken_plugin")
    monkeypatch.syspath_prepend(str(site))
    with pytest.raises(ConfigError, match=r"curate.steps entry point curate_broken_plugin = 'curate_broken_plugin'"
                                          r" of curate_broken_plugin failed to load: ImportError: needs torchvision"):
        steps.find("selector", "random")


def test_unknown_types_and_clashes_are_clear():
    with pytest.raises(ConfigError, match=r"selectors\[0\]: unknown selector 'randm'; known: .*random"):
        steps.build("selector", {"type": "randm", "budget": 3}, "selectors[0]")
    with pytest.raises(ConfigError, match=r"filters\[1\] \(length\): unknown option\(s\) mni"):
        steps.build("filter", {"type": "length", "mni": 3}, "filters[1]")
    from curate.selectors.base import Selector

    with pytest.raises(TypeError, match="two selectors of type 'random': curate.selectors.random.RandomSelector and"):
        type("OtherRandom", (Selector,), {"type": "random"})
