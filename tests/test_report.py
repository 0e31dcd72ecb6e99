"""report.html per selector: every job under jobs/ (not jobs/dataflow/) selects from a
small scored pool built without a model, and its report carries the selector's own
section and plots; then headless Chromium renders each report to a screenshot.

The pool: ~200 real rows read from the job's inputs (CURATE_DATA), plus the columns the
job's scorers declare (`output_columns()`), filled with seeded random values of the
declared Arrow type. List columns (embeddings, trajectories) get one fixed length, drawn
around a centre per source so that the clusters the selectors find are not pure noise.
The report checked is the one the run wrote itself (a failure there is only a logged
warning, so the test looks for that warning too).
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import pathlib
import subprocess
import tempfile

import numpy as np
import pyarrow as pa
import pytest

from curate.config import load_job
from curate.pipeline.run import select_from_scores
from curate.pipeline.plan import Plan
from curate.inputs.files import plan_inputs, task_records
from curate.records import BASE_SCHEMA
from curate.report.sections import selector_sections

ROOT = pathlib.Path(__file__).resolve().parents[1]
# every job that selects (a filtering job such as decontaminate.yaml has no selector section)
JOBS = sorted(p for p in glob.glob(str(ROOT / "jobs" / "*.yaml")) if "selectors:" in pathlib.Path(p).read_text())
POOL_ROWS = 200
VECTOR_DIM = 16
CHROMIUM = "/usr/bin/chromium"

# the selector's section id and the alt texts of the plots it must draw
EXPECTED = {
    "grape": ["GRAPE generator mix", "GRAPE margin to the runner-up"],
    "donod": ["DONOD DON/NOD scatter", "DONOD closeness"],
    "diversity": ["kMQ clusters"],
    "s2l": ["S2L clusters", "S2L trajectories"],
    "paser": ["PASER budget and CDS per cluster"],
    "random": [],
    "top": ["Top ifd histogram"],
    "semdedup": ["SemDeDup similarity histogram"],
}


def gap_by_source(rows, round_index, seed, work_dir=None):
    """Stands in for the iterative diversity selector's train/generate/score step (its
    real SmolLM2 fine-tuning and generation take minutes on 2 cores): a fixed gap per
    source, so the rounds reweight the clusters without a model."""
    gap = {"gsm8k": 2.0, "codealpaca": 1.0, "gpteacher_roleplay": 0.5, "gpteacher_toolformer": -1.0}
    return [gap.get(r["source"], 1.0) for r in rows], {"stand_in": True, "round": round_index}


def small_job(path: str, tmp: pathlib.Path):
    """The job with ~POOL_ROWS input rows, outputs under tmp, and budgets that leave
    something to reject in so small a pool."""
    job = load_job(path)
    per_input = max(1, POOL_ROWS // len(job.inputs))
    inputs = [dataclasses.replace(spec, limit=min(spec.limit or per_input, per_input)) for spec in job.inputs]
    if any(s["type"] == "grape" for s in job.selectors):  # read by prompt: see read_rows
        inputs = [dataclasses.replace(spec, limit=None) for spec in job.inputs]
    selectors = []
    for s in job.selectors:
        s = dict(s)
        if isinstance(s.get("budget"), int) and s["budget"] >= POOL_ROWS // 2:
            s["budget"] = POOL_ROWS // 4
        if s["type"] == "diversity" and s.get("rounds", 1) > 1:
            s["gap_fn"] = gap_by_source
            s["work_dir"] = str(tmp / "work")
        selectors.append(s)
    return dataclasses.replace(job, inputs=inputs, selectors=selectors, output=str(tmp / "out"),
                               scores=str(tmp / "scores"))


def read_rows(job) -> list[dict]:
    """The job's input rows; for GRAPE every candidate of the first prompts (the pool
    file is sorted by generator, so its first rows all answer different prompts)."""
    rows = []
    for task in plan_inputs(job.inputs, job.validate.max_chars):
        rows += [r for r, bad in task_records(task) if bad is None]
    if any(s["type"] == "grape" for s in job.selectors):
        first = list(dict.fromkeys(r["prompt_id"] for r in rows))[:POOL_ROWS // 10]
        rows = [r for r in rows if r["prompt_id"] in set(first)]
    return rows


def random_column(name: str, dtype: pa.DataType, sources: list[str], rng) -> pa.Array:
    n = len(sources)
    if pa.types.is_boolean(dtype):
        return pa.array(rng.random(n) < 0.1, dtype)
    if pa.types.is_integer(dtype):
        return pa.array(rng.integers(8, 400, n), dtype)
    if pa.types.is_floating(dtype):
        values = rng.gamma(2.0, 0.5, n)
        return pa.array(-values if "logprob" in name else values, dtype)
    if pa.types.is_list(dtype) or pa.types.is_fixed_size_list(dtype) or pa.types.is_large_list(dtype):
        dim = dtype.list_size if pa.types.is_fixed_size_list(dtype) else VECTOR_DIM
        centres = {s: rng.normal(0, 3, dim) for s in sorted(set(sources))}
        values = np.abs(np.stack([centres[s] + rng.normal(0, 1, dim) for s in sources]))
        return pa.array(list(values.astype(dtype.value_type.to_pandas_dtype())), dtype)
    raise AssertionError(f"no random filler for {name}: {dtype}")


def scored_pool(job, path: pathlib.Path, seed: int = 0) -> int:
    """Write the job's inputs plus its scorers' columns (random) as a curate output."""
    import datasets

    table = pa.Table.from_pylist(read_rows(job), schema=BASE_SCHEMA)
    rng = np.random.default_rng(seed)
    sources = table.column("source").to_pylist()
    for scorer in Plan(job).scorers:
        for name, dtype in scorer.output_columns().items():
            table = table.append_column(pa.field(name, dtype), random_column(name, dtype, sources, rng))
    datasets.Dataset(datasets.table.InMemoryTable(table)).save_to_disk(str(path))
    return len(table)


@pytest.fixture(scope="module")
def report_of(tmp_path_factory, shared_data):
    """job file -> (manifest, report.html path), each job selected once for the module."""
    done = {}

    def build(job_path: str):
        if job_path not in done:
            tmp = tmp_path_factory.mktemp(pathlib.Path(job_path).stem)
            job = small_job(job_path, tmp)
            assert scored_pool(job, tmp / "scores") >= 40
            manifest = select_from_scores(job, str(tmp / "scores"))
            done[job_path] = manifest, tmp / "out" / "report.html"
        return done[job_path]

    return build


@pytest.mark.parametrize("job_path", JOBS, ids=[pathlib.Path(p).stem for p in JOBS])
def test_report_has_the_selector_section(job_path, report_of, caplog):
    with caplog.at_level(logging.WARNING, logger="curate.pipeline.run"):
        manifest, report = report_of(job_path)
    assert not [r for r in caplog.records if "report.html not written" in r.getMessage()]
    page = report.read_text()
    assert manifest["plan"]["selectors"]
    for spec in manifest["plan"]["selectors"]:
        kind = spec["type"]
        section = page.split(f"<section id='selector-{kind}'>", 1)[1].split("</section>", 1)[0]
        assert "lacks the columns" not in section  # the method's own view, not the generic line
        for alt in EXPECTED[kind]:
            assert f"<img alt='{alt}' src='data:image/png;base64," in section, alt
    assert "<img alt='counts funnel'" in page and "<h2>Examples</h2>" in page


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} not installed")
@pytest.mark.parametrize("job_path", JOBS, ids=[pathlib.Path(p).stem for p in JOBS])
def test_report_renders_in_chromium(job_path, report_of, tmp_path):
    _, report = report_of(job_path)
    shot = tmp_path / "report.png"
    profile = tempfile.mkdtemp(dir=tmp_path)
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={profile}", f"--screenshot={shot}", "--window-size=1200,3000",
                    f"file://{report}"], check=True, timeout=120, capture_output=True)
    assert shot.is_file() and shot.stat().st_size > 20_000
    import matplotlib.image

    pixels = matplotlib.image.imread(str(shot))
    assert pixels.shape[:2] == (3000, 1200) and pixels.std() > 0.05  # drawn, not a blank page


def test_sections_without_their_columns_stay_generic():
    """An older output (or an unknown selector) gets the counts line, not a failure."""
    kept = pa.table({"id": ["a", "b"], "source": ["s", "s"]})
    rejected = pa.table({"id": ["c", "d", "e"], "source": ["s"] * 3,
                         "reject_stage": ["select0:grape", "select1:mystery", "filter:dedup"],
                         "reject_reason": ["rank 2 of 2", "no", "duplicate"]})
    manifest = {"plan": {"selectors": [{"type": "grape", "k": 1}, {"type": "mystery", "budget": 2}]},
                "counts": {"not_selected": {"select0:grape": 1, "select1:mystery": 1}}}
    page, clusters_drawn = selector_sections(kept, rejected, manifest)
    assert not clusters_drawn
    grape, mystery = page.split("<section id='selector1-mystery'>")
    assert "id='selector0-grape'" in grape and "kept 3 of the 4 rows that reached it" in grape
    assert "mystery (budget=2): kept 2 of the 3 rows that reached it" in mystery
    assert page.count("lacks the columns") == 2 and "<img" not in page
    assert selector_sections(kept, None, {"counts": {}}) == ("", False)  # no plan: no sections
