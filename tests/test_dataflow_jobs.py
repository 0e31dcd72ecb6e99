"""Job files and remote paths: every job under jobs/ and jobs/dataflow/ parses and builds
its Beam graph (without running it or loading a model), the Dataflow jobs carry what
Dataflow needs, and a run whose inputs and output are on an object store goes through
Beam's FileSystems only (an in-memory GCS-like store stands in for gs://, which Beam
cannot fake offline)."""

import gzip
import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
from types import SimpleNamespace

import apache_beam as beam
import pyarrow as pa
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from curate.config import ConfigError, load_job, parse_job
from curate.pipeline.run import LOCAL_RUNNER, pipeline_options, run_job
from curate.pipeline.graph import build
from curate.pipeline.streamed import Streamed
from curate.pipeline.plan import Plan
from curate.inputs.files import plan_inputs
from memfs import OBJECTS as _OBJECTS, listing as _listing, store  # noqa: F401 (store: a fixture)

ROOT = pathlib.Path(__file__).resolve().parents[1]
LOCAL_JOBS = sorted(ROOT.glob("jobs/*.yaml"))
DATAFLOW_JOBS = sorted(ROOT.glob("jobs/dataflow/*.yaml"))
METHODS = {"random", "grape", "s2l", "donod", "diversity", "paser"}
GPU = "worker_accelerator=type:nvidia-l4;count:1;install-nvidia-driver"
PLACEHOLDER_VARS = ("GCP_PROJECT", "GCP_REGION", "CURATE_BUCKET", "CURATE_IMAGE", "CURATE_CPU_IMAGE")
VALID_SETTINGS = {"GCP_PROJECT": "curate-test-project", "GCP_REGION": "us-central1",
                  "CURATE_BUCKET": "gs://curate-test-bucket",
                  "CURATE_IMAGE": "us-central1-docker.pkg.dev/curate-test-project/curate/worker:0.1"}


@pytest.fixture(autouse=True)
def placeholders(monkeypatch):
    """The Dataflow jobs as shipped: every ${VAR:-YOUR_...} falls back to its placeholder."""
    for var in PLACEHOLDER_VARS:
        monkeypatch.delenv(var, raising=False)


def _ids(paths):
    return [str(p.relative_to(ROOT)) for p in paths]


# ---------------------------------------------------------------- tiny stand-in inputs

def _tiny_rows(name: str) -> list[dict]:
    """A few rows in the shape of the shared data file called `name`."""
    if name.startswith("eval-"):  # decontaminate's evaluation sets: 13 words or more, numeric answers
        return [{"question": f"Evaluation question {i}: what is the sum of {i} and {i}, worked out step by step?",
                 "answer": 2 * i} for i in range(8)]
    if name.startswith("gsm8k"):
        return [{"question": f"What is {i} plus {i}?", "answer": f"{i} + {i} = {2 * i}. #### {2 * i}"}
                for i in range(8)]
    if name.startswith("alpaca_eval_pool"):
        return [{"instruction": f"Describe topic {i}", "output": f"Model {g} on topic {i}.", "generator": f"m{g}"}
                for i in range(4) for g in range(3)]
    return [{"instruction": f"Task {i} from {name}", "input": "", "output": f"Done {i}."} for i in range(8)]


def _write_tiny_input(path: pathlib.Path) -> str:
    text = "".join(json.dumps(r) + "\n" for r in _tiny_rows(path.name)).encode()
    path.write_bytes(gzip.compress(text) if path.name.endswith(".gz") else text)
    return str(path)


def _fake_proxy_run(root: pathlib.Path) -> str:
    """Two LoRA checkpoints in the HF layout: enough to plan, never loaded here."""
    for step in (1, 2):
        (root / f"checkpoint-{step}").mkdir(parents=True)
        (root / f"checkpoint-{step}" / "adapter_config.json").write_text("{}")
    return str(root)


def localise(job, tmp_path):
    """The job with its inputs, outputs and driver-side model paths made local and tiny.

    What stays as written: every scorer's and selector's options, the filters, the
    beam_args. Models are only named here; workers load them at run time.
    """
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    for spec in job.inputs:
        spec.path = _write_tiny_input(data / spec.path.rsplit("/", 1)[-1])
    for f in job.filters:  # a filter's own inputs (decontaminate's evaluation sets)
        for spec in f.get("eval", []):
            spec["path"] = _write_tiny_input(data / ("eval-" + spec["path"].rsplit("/", 1)[-1]))
    job.output = str(tmp_path / "out")
    job.scores = job.scores and str(tmp_path / "scores")
    for scorer in job.scorers:
        if scorer["type"] == "trajectory":  # the driver lists the proxy's checkpoints
            scorer["checkpoints"] = _fake_proxy_run(tmp_path / "proxy")
            scorer.pop("proxy", None)  # training it is a driver step before the graph
    for selector in job.selectors:
        if selector.get("work_dir"):
            selector["work_dir"] = str(tmp_path / "work")
    return job


@pytest.fixture
def no_model_loading(monkeypatch):
    """Building a graph must not load a model: that happens in the workers."""
    import transformers

    import curate.models
    import curate.scorers.base
    import curate.train  # noqa: F401  imported first, so it binds the real loaders, not `refuse`

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded while building the pipeline graph")

    for module in (curate.models, curate.scorers.base):  # the scorers load through their base's names
        for name in ("load_causal_lm", "load_embedder"):
            monkeypatch.setattr(module, name, refuse)
    for cls in (transformers.PreTrainedModel, transformers.AutoModel, transformers.AutoModelForCausalLM,
                transformers.AutoTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", refuse)


# ---------------------------------------------------------------- every job builds

@pytest.mark.parametrize("path", LOCAL_JOBS + DATAFLOW_JOBS, ids=_ids(LOCAL_JOBS + DATAFLOW_JOBS))
def test_job_builds_its_pipeline_graph(path, tmp_path, no_model_loading, monkeypatch):
    dataflow = path in DATAFLOW_JOBS
    if dataflow:  # what a user sets; Beam rejects the YOUR_* placeholders (as it should)
        for var, value in VALID_SETTINGS.items():
            monkeypatch.setenv(var, value)
    job = localise(load_job(str(path)), tmp_path)
    plan = Plan(job)
    # a Dataflow job builds under its own options: DataflowRunner constructed and the
    # options validated, never run (dry_run: no GCS check from the validator)
    options = pipeline_options(job.beam_args + ["--dry_run=True"]) if dataflow else PipelineOptions()
    p = beam.Pipeline(options=options)
    if dataflow:
        assert type(p.runner).__name__ == "DataflowRunner"
    build(p, plan, str(tmp_path / "staging"))

    proto = p.to_runner_api()  # what a runner is sent: every step pickles
    names = {t.unique_name for t in proto.components.transforms.values()}
    for i, scorer in enumerate(job.scorers):
        assert f"Score{i}:{scorer['type']}" in names and f"ScoreFailures{i}" in names
    for i, selector in enumerate(job.selectors):
        assert f"Select{i}:{selector['type']}" in names
    # a job whose steps all stream writes what its keys pass spilled; the others read again
    reads = {"KeysRead", "ApplyFates"} if not Streamed(plan).rest else {"ReadInputs"}
    assert reads | {"WriteKept", "WriteRejected", "WriteDeadLetter", "WriteCounts"} <= names
    assert not (tmp_path / "staging").exists() and not (tmp_path / "out").exists()


# ---------------------------------------------------------------- the Dataflow jobs

# Dataflow variants of the curation steps that are not selection methods
STEPS = {"decontaminate": "filters", "near_dedup": "filters", "semdedup": "selectors"}


def test_one_dataflow_job_per_method_and_step():
    assert {p.stem for p in DATAFLOW_JOBS} == METHODS | set(STEPS)
    for path in DATAFLOW_JOBS:
        job = load_job(str(path))
        if path.stem in STEPS:
            assert path.stem in [s["type"] for s in getattr(job, STEPS[path.stem])]
        else:
            assert [s["type"] for s in job.selectors] == [path.stem]


@pytest.mark.parametrize("path", DATAFLOW_JOBS, ids=_ids(DATAFLOW_JOBS))
def test_dataflow_job_settings(path):
    job = load_job(str(path))
    remote = [spec.path for spec in job.inputs] + [job.output] + ([job.scores] if job.scores else [])
    assert all(p.startswith("gs://YOUR_BUCKET/") for p in remote)
    assert all(spec.limit is None for spec in job.inputs)  # full size

    options = pipeline_options(job.beam_args).get_all_options()
    for arg in job.beam_args:  # Beam drops an unknown flag with a log line only
        assert arg[2:].split("=", 1)[0] in options, f"{arg}: not a Beam pipeline option"
    assert options["runner"] == "DataflowRunner"
    assert options["project"] == "YOUR_PROJECT" and options["region"] == "YOUR_REGION"
    assert options["temp_location"].startswith("gs://YOUR_BUCKET/")
    assert "use_runner_v2" in options["experiments"]
    gpu = GPU in (options["dataflow_service_options"] or [])
    assert gpu == bool(job.scorers)  # GPU exactly where a model scorer runs
    # the CUDA image only where a GPU is; CPU work gets the CPU image and a disk for it
    assert options["sdk_container_image"].endswith("/curate/worker:0.2" if gpu else "/curate/worker-cpu:0.2")
    assert options["disk_size_gb"] == (100 if gpu else 30)
    if gpu:  # the SDK harness sized: bundles in flight per process while the model runs one batch
        assert options["number_of_worker_harness_threads"] == 4
    if job.scores:  # the selection from stored scores loads no model: CPU workers
        select = pipeline_options(job.select_beam_args).get_all_options()
        assert not select["dataflow_service_options"] and select["machine_type"].startswith("n2-")
        assert select["sdk_container_image"].endswith("/curate/worker-cpu:0.2")
        assert all(a[2:].split("=", 1)[0] in select for a in job.select_beam_args)
    for scorer in job.scorers:
        assert scorer.get("device") == "cuda"  # fail on a worker without a GPU, never a quiet CPU run
        assert scorer.get("model_copies") == 1  # one model per GPU, not per SDK process
        for key in ("model", "pruned_model", "checkpoints"):
            name = scorer.get(key)
            assert name is None or name in ("default", "minilm") or name.startswith("/opt/curate/models/")


@pytest.mark.parametrize("path", DATAFLOW_JOBS, ids=_ids(DATAFLOW_JOBS))
def test_the_header_names_the_variables_the_job_uses(path):
    """The comment at the top says which settings to export: exactly the variables the
    job's lines expand (a CPU job's image is CURATE_CPU_IMAGE, not CURATE_IMAGE)."""
    text = path.read_text()
    header = "".join(line for line in text.splitlines(keepends=True) if line.startswith("#"))
    body = "".join(line.split("#", 1)[0] for line in text.splitlines(keepends=True) if not line.startswith("#"))
    setting = re.search(r"Set (.*?), or replace", header.replace("\n#", ""), re.S)
    assert setting, f"{path.name}: no 'Set ..., or replace' line in the header"
    named = set(re.findall(r"\b[A-Z]+_[A-Z_]+\b", setting.group(1)))
    assert named == set(re.findall(r"\$\{([A-Z_]+)", body)) and named <= set(PLACEHOLDER_VARS)


def test_placeholders_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("CURATE_BUCKET", "gs://my-bucket")
    monkeypatch.setenv("GCP_PROJECT", "my-project")
    job = load_job(str(ROOT / "jobs/dataflow/grape.yaml"))
    assert job.inputs[0].path == "gs://my-bucket/data/alpaca_eval_pool.jsonl.gz"
    assert job.output == "gs://my-bucket/runs/grape"
    assert "--project=my-project" in job.beam_args and "--temp_location=gs://my-bucket/tmp" in job.beam_args


def dockerfile_instructions(path: pathlib.Path) -> list[tuple[str, str]]:
    """(instruction, arguments) of a Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def dockerfile_env(path: pathlib.Path) -> dict[str, str]:
    env = {}
    for word, rest in dockerfile_instructions(path):
        if word == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(rest))
    return env


DOCKERFILES = {"gpu": ROOT / "jobs/dataflow/Dockerfile", "cpu": ROOT / "jobs/dataflow/Dockerfile.cpu"}


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_images_take_their_versions_from_one_place(kind):
    """Python and Beam (and torch) come from curate/dataflow.py as build arguments: no
    Dockerfile carries a version of its own, and every argument it uses is passed."""
    from curate import dataflow

    instructions = dockerfile_instructions(DOCKERFILES[kind])
    args = [rest for word, rest in instructions if word == "ARG"]
    assert args and all("=" not in a for a in args)  # no defaults to drift from curate/dataflow.py
    passed = {a.split("=", 2)[1] for a in dataflow.build_args()}
    assert set(args) <= passed
    assert ("FROM", "apache/beam_python${PYTHON_VERSION}_sdk:${BEAM_VERSION}" + (" AS beam" if kind == "gpu" else "")
            ) in instructions
    run = " ".join(rest for word, rest in instructions if word == "RUN")
    assert '"apache-beam[gcp]==${BEAM_VERSION}"' in run and "b.__version__ == '${BEAM_VERSION}'" in run
    assert instructions[-1] == ("ENTRYPOINT", '["/opt/apache/beam/boot"]')
    make = (ROOT / "Makefile").read_text()
    assert f"$(PYTHON) -m curate.dataflow build-args) -f {DOCKERFILES[kind].relative_to(ROOT)}" in make
    # the launcher's extra pins the image's Beam
    assert f'dataflow = ["apache-beam[gcp]=={dataflow.BEAM_VERSION}"]' in (ROOT / "pyproject.toml").read_text()


def test_the_image_targets_need_no_venv():
    """`make image-gpu` / `make image-cpu` print the build arguments with a plain python3:
    curate.dataflow imports no third-party package (no Beam, torch or yaml; -S hides
    site-packages), and the targets do not depend on `setup`, which installs torch."""
    from curate import dataflow

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-S", "-m", "curate.dataflow", "build-args"], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == dataflow.build_args()
    make = (ROOT / "Makefile").read_text()
    for target in ("image-gpu", "image-cpu"):
        assert re.search(rf"^{target}:[ \t]*$", make, re.M), f"{target} must have no prerequisites"


def test_the_gpu_image_imports_the_gpu_builds():
    """faiss: the gpu extra alone (faiss-cpu shares its package folder and would win), and
    the image build fails unless `faiss.StandardGpuResources` exists; torch: a pinned
    CUDA 12 build. Building the image needs Docker and a CUDA base, so these are checked
    on the definition here and asserted by the build itself."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(d.startswith("faiss") for d in project["dependencies"])
    extras = project["optional-dependencies"]
    assert extras["gpu"] == ["faiss-gpu-cu12>=1.8"] and extras["cpu"] == ["faiss-cpu>=1.8"]
    run = " ".join(rest for word, rest in dockerfile_instructions(DOCKERFILES["gpu"]) if word == "RUN")
    assert '".[dataflow,gpu]"' in run and "cpu]" not in run
    assert "hasattr(faiss, 'StandardGpuResources')" in run
    assert '"torch==${TORCH_VERSION}"' in run and "torch.version.cuda.startswith('12.')" in run
    cpu_run = " ".join(rest for word, rest in dockerfile_instructions(DOCKERFILES["cpu"]) if word == "RUN")
    assert '".[dataflow,cpu]"' in cpu_run and "download.pytorch.org/whl/cpu" in cpu_run


def _boot_python(env: dict, workdir: pathlib.Path) -> str:
    """The interpreter Beam's container boot (sdks/python/container/boot.go) runs the SDK
    with: unless RUN_PYTHON_SDK_IN_DEFAULT_ENVIRONMENT is set, a fresh
    `python -m venv --system-site-packages` made from the `python` on PATH."""
    python = shutil.which("python3", path=env["PATH"])
    if env.get("RUN_PYTHON_SDK_IN_DEFAULT_ENVIRONMENT", "") == "":
        venv = workdir / "beam-venv-worker-1"
        subprocess.run([python, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
        return str(venv / "bin" / "python3")
    return python


def test_the_worker_image_boots_into_an_sdk_that_imports_beam_and_curate(tmp_path):
    """Beam's boot sequence with the GPU image's environment. The image installs into the
    venv /opt/venv; this test's own venv (which holds curate and Beam the same way) stands
    in for it. Without the image's RUN_PYTHON_SDK_IN_DEFAULT_ENVIRONMENT the boot's fresh
    venv sees only the base interpreter's packages, which is the failure it prevents."""
    env = dockerfile_env(DOCKERFILES["gpu"])
    assert env["PATH"] == "/opt/venv/bin:$PATH" and env["RUN_PYTHON_SDK_IN_DEFAULT_ENVIRONMENT"] == "1"
    image_env = {**env, "PATH": f"{pathlib.Path(sys.executable).parent}:/usr/bin:/bin"}
    check = "import apache_beam, curate; print(apache_beam.__version__)"
    python = _boot_python(image_env, tmp_path)
    out = subprocess.run([python, "-c", check], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    without = _boot_python({**image_env, "RUN_PYTHON_SDK_IN_DEFAULT_ENVIRONMENT": ""}, tmp_path)
    failed = subprocess.run([without, "-c", check], capture_output=True, text=True)
    assert failed.returncode != 0 and "No module named" in failed.stderr


def test_the_launcher_must_match_the_images():
    """Python and Beam (Dataflow's rule), and torch, numpy and faiss (what the launcher
    pickles into the job) must be the worker images' versions; a mismatch names the
    package, both versions and the image to launch from."""
    from curate import dataflow

    image = "us-central1-docker.pkg.dev/p/curate/worker-cpu:0.2"
    same = {"python": dataflow.PYTHON_VERSION, "apache-beam": dataflow.BEAM_VERSION, "torch": dataflow.TORCH_VERSION,
            "numpy": dataflow.NUMPY_VERSION, "faiss": dataflow.FAISS_VERSION}
    dataflow.check_launcher({"sdk_container_image": image}, same)
    for name, have in (("python", "3.12"), ("apache-beam", "2.60.0"), ("torch", "2.13.0"), ("numpy", "2.3.5"),
                       ("faiss", None)):
        with pytest.raises(ConfigError) as refused:
            dataflow.check_launcher({"sdk_container_image": image}, {**same, name: have})
        message = str(refused.value)
        assert f"{name} {have or 'not installed'} here, {same[name]} on the workers" in message
        assert f"--entrypoint curate {image} run" in message and dataflow.launcher_install() in message
    assert dataflow.launcher_install() in (ROOT / "jobs/dataflow/README.md").read_text()


def test_the_launcher_versions_come_from_the_installed_metadata():
    """torch's build tag is not a version (2.8.0+cpu launches CUDA workers of 2.8.0)."""
    from importlib import metadata

    from curate import dataflow

    have = dataflow.launcher_versions()
    assert have["python"] == f"{sys.version_info[0]}.{sys.version_info[1]}"
    assert have["torch"] == metadata.version("torch").split("+")[0] and "+" not in have["torch"]
    assert have["numpy"] == metadata.version("numpy") and have["faiss"] == metadata.version("faiss-cpu")
    assert have["apache-beam"] == metadata.version("apache-beam")


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_both_images_carry_the_versions_the_launcher_checks(kind):
    """One `curate run` may run pipelines on both images (diversity, s2l and semdedup
    score on the GPU image and select on the CPU one), so both images install the same
    torch, numpy and faiss versions (their CUDA or CPU builds), from one build argument
    each, and an image's build fails unless it could launch every job (check_launcher)."""
    from curate import dataflow

    run = " ".join(rest for word, rest in dockerfile_instructions(DOCKERFILES[kind]) if word == "RUN")
    faiss = {"gpu": "faiss-gpu-cu12", "cpu": "faiss-cpu"}[kind]
    for pin in ('"torch==${TORCH_VERSION}"', '"numpy==${NUMPY_VERSION}"', f'"{faiss}==${{FAISS_VERSION}}"'):
        assert pin in run
    assert "check_launcher({})" in run
    names = [a.split("=", 2)[1] for a in dataflow.build_args()]
    assert {"TORCH_VERSION", "NUMPY_VERSION", "FAISS_VERSION"} <= set(names) and len(names) == len(set(names))


@pytest.mark.parametrize("path", DATAFLOW_JOBS, ids=_ids(DATAFLOW_JOBS))
def test_gpu_scorers_get_gpu_workers(path, monkeypatch, caplog):
    """The scorers' declared device is checked against the workers the job asks for: every
    Dataflow job passes; without its worker_accelerator a GPU job fails before launching."""
    from curate import dataflow

    for var, value in VALID_SETTINGS.items():
        monkeypatch.setenv(var, value)
    from curate.scorers import make_scorer

    job = load_job(str(path))
    scorers = [make_scorer(dict(s)) for s in job.scorers]  # the inputs on gs:// are not planned here
    options = pipeline_options(job.beam_args).get_all_options()
    dataflow.check_worker_resources(scorers, options)
    gpu = [s.type for s in scorers if s.resources()["device"] == "cuda"]
    no_gpu = {**options, "dataflow_service_options": [o for o in options.get("dataflow_service_options") or []
                                                      if "worker_accelerator" not in o]}
    if gpu:
        with pytest.raises(ConfigError, match=f"{gpu[0]}.*device: cuda.*no GPU"):
            dataflow.check_worker_resources(scorers, no_gpu)
    else:  # a CPU job asking for GPUs would pay for idle ones: said, not refused
        with caplog.at_level("WARNING", logger="curate.dataflow"):
            dataflow.check_worker_resources(scorers, {**options, "dataflow_service_options": [
                "worker_accelerator=type:nvidia-l4;count:1"]})
        assert "idle" in caplog.text


# ---------------------------------------------------------------- beam_args

def test_beam_args_are_checked():
    base = {"inputs": ["x.jsonl"], "output": "out"}
    assert parse_job({**base, "beam_args": ["--runner=DataflowRunner", "--save_main_session"]}).beam_args == [
        "--runner=DataflowRunner", "--save_main_session"]
    assert parse_job(base).beam_args == []
    for bad in ("--runner=DataflowRunner", ["runner=DataflowRunner"], ["--project my-project"], [3]):
        with pytest.raises(ConfigError, match="beam_args"):
            parse_job({**base, "beam_args": bad})


def test_command_line_options_win_over_the_job():
    job_args = ["--runner=DataflowRunner", "--max_num_workers=4", "--experiments=use_runner_v2"]
    options = pipeline_options(job_args + ["--runner=DirectRunner", "--max_num_workers=2"]).get_all_options()
    assert options["runner"] == LOCAL_RUNNER  # the local engine, not Prism
    assert options["max_num_workers"] == 2 and options["experiments"] == ["use_runner_v2"]


# ---------------------------------------------------------------- remote paths

def _upload(path, rows, lines=()):
    text = "".join(json.dumps(r) + "\n" for r in rows) + "".join(line + "\n" for line in lines)
    _OBJECTS[path] = gzip.compress(text.encode())


def test_plan_inputs_globs_and_reads_through_filesystems(store):
    _upload("memgs://bucket/data/gsm8k_train.jsonl.gz", _tiny_rows("gsm8k_train"))
    _upload("memgs://bucket/data/codealpaca.jsonl.gz", _tiny_rows("codealpaca"))
    _upload("memgs://bucket/other/ignored.jsonl.gz", _tiny_rows("codealpaca"))
    tasks = plan_inputs(parse_job({"inputs": ["memgs://bucket/data/*.jsonl.gz"], "output": "o"}).inputs, 32_000)
    assert [(t.path, t.source, t.format, t.adapter) for t in tasks] == [
        ("memgs://bucket/data/codealpaca.jsonl.gz", "codealpaca", "jsonl", "alpaca"),
        ("memgs://bucket/data/gsm8k_train.jsonl.gz", "gsm8k_train", "jsonl", "qa")]
    with pytest.raises(ConfigError, match="no file matches"):
        plan_inputs(parse_job({"inputs": ["memgs://bucket/none/*.jsonl"], "output": "o"}).inputs, 32_000)


def _kept_rows(out):
    state = json.loads(_OBJECTS[f"{out}/state.json"])
    rows = []
    for f in state["_data_files"]:
        rows += pa.ipc.open_stream(_OBJECTS[f"{out}/{f['filename']}"]).read_all().to_pylist()
    return rows


def test_run_with_inputs_and_output_on_an_object_store(store, tiny_lm_dir):
    """Read (glob, gzip, a broken line), score, keep the scores, select, publish, then
    re-select from the stored scores into the same output: all on memgs://."""
    _upload("memgs://bucket/data/gsm8k_train.jsonl.gz", _tiny_rows("gsm8k_train"), lines=['{"broken'])
    _upload("memgs://bucket/data/codealpaca.jsonl.gz", _tiny_rows("codealpaca"))
    spec = {"inputs": ["memgs://bucket/data/*.jsonl.gz"], "output": "memgs://bucket/runs/random",
            "scores": "memgs://bucket/runs/scores",
            "scorers": [{"type": "likelihood", "model": str(tiny_lm_dir), "dtype": "float32"}],
            "selectors": [{"type": "random", "budget": 5, "seed": 0}]}
    first = run_job(parse_job(spec))
    scored = first["scoring_counts"]
    assert (scored["read"], scored["invalid"], scored["examples"], scored["kept"]) == (17, 1, 16, 16)
    assert json.loads(_OBJECTS["memgs://bucket/runs/scores/dead_letter.jsonl"])["origin"] == \
        "gsm8k_train.jsonl.gz:9"
    out = "memgs://bucket/runs/random/"
    assert _listing(out) == ["data-00000-of-00001.arrow", "dataset_info.json", "dead_letter.jsonl",
                             "manifest.json", "rejected/data-00000-of-00001.arrow",
                             "rejected/dataset_info.json", "rejected/state.json", "state.json"]
    assert first["counts"]["kept"] == 5
    assert json.loads(_OBJECTS[out + "manifest.json"])["counts"] == first["counts"]
    kept = _kept_rows(out.rstrip("/"))
    assert len(kept) == 5 and all(r["logprob_mean"] is not None for r in kept)
    assert not [p for p in _OBJECTS if ".tmp-" in p]  # no staging left behind

    # the second run re-uses the stored scores (read back as Arrow through FileSystems)
    # and replaces the first output
    second = run_job(parse_job({**spec, "selectors": [{"type": "random", "budget": 7, "seed": 0}]}))
    assert second["scores_key"] == first["scores_key"] and second["counts"]["kept"] == 7
    assert len(_kept_rows(out.rstrip("/"))) == 7
    assert json.loads(_OBJECTS[out + "manifest.json"])["counts"]["kept"] == 7
    assert not [p for p in _OBJECTS if ".tmp-" in p]


def test_a_failed_remote_run_leaves_no_staging(store, monkeypatch):
    """A run that fails after its pipeline wrote everything (here: the counts check)
    publishes nothing and removes its staging objects."""
    _upload("memgs://bucket/data/gsm8k_train.jsonl.gz", _tiny_rows("gsm8k_train"))

    def counts_do_not_add_up(counts):
        assert _listing("memgs://bucket/runs/") != []  # the staging directory is full
        raise RuntimeError("counts do not add up")

    monkeypatch.setattr("curate.pipeline.run.check_counts", counts_do_not_add_up)
    job = parse_job({"inputs": ["memgs://bucket/data/gsm8k_train.jsonl.gz"], "output": "memgs://bucket/runs/x",
                     "selectors": [{"type": "random", "budget": 3}]})
    with pytest.raises(RuntimeError, match="counts do not add up"):
        run_job(job)
    assert sorted(_OBJECTS) == ["memgs://bucket/data/gsm8k_train.jsonl.gz"]


# ---------------------------------------------------------------- launcher

class _FakeDataflowResult:
    """What DataflowRunner.run returns, as far as the launcher uses it."""

    def __init__(self, interrupt=None):
        self.interrupt, self.cancelled = interrupt, False

    def job_id(self):
        return "2026-12-02_01_02_03-123"

    def wait_until_finish(self):
        raise self.interrupt

    def cancel(self):
        self.cancelled = True


def _tiny_dataflow_job(tmp_path, *beam_args):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"question": f"Q{i}", "answer": "A"}) + "\n" for i in range(5)))
    return parse_job({"name": "Tiny Dataflow", "inputs": [{"path": str(src)}], "output": str(tmp_path / "out"),
                      "beam_args": ["--runner=DataflowRunner", "--project=curate-test-project",
                                    "--region=europe-west4", "--temp_location=gs://curate-test-bucket/tmp",
                                    *beam_args]})


def _staging_left(tmp_path) -> bool:
    return bool([p.name for p in tmp_path.iterdir() if ".tmp-" in p.name])


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt(), SystemExit(143)])
def test_ctrl_c_cancels_the_dataflow_job_and_leaves_its_staging(tmp_path, monkeypatch, capsys, interrupt):
    from curate import dataflow

    result = _FakeDataflowResult(interrupt)
    monkeypatch.setattr(dataflow, "check_launcher", lambda options: None)
    monkeypatch.setattr(beam.Pipeline, "run", lambda self: result)
    with pytest.raises(type(interrupt)):
        run_job(_tiny_dataflow_job(tmp_path))
    err = capsys.readouterr().err
    assert "Dataflow job 2026-12-02_01_02_03-123" in err
    assert "console.cloud.google.com/dataflow/jobs/europe-west4/2026-12-02_01_02_03-123?project=curate-test-project" in err
    assert result.cancelled and "asked Dataflow to cancel job 2026-12-02_01_02_03-123" in err
    assert _staging_left(tmp_path)  # staging left while workers stop
    assert not (tmp_path / "out").exists()


class _FakeJobsClient:
    """Dataflow's jobs API client (google.cloud.dataflow JobsV1Beta3Client) as far as the
    launcher uses it: list_jobs and update_job, with requests as dicts."""

    def __init__(self, jobs):
        self.jobs, self.listed, self.updated = jobs, [], []

    def list_jobs(self, request, timeout=None):
        self.listed.append(request)
        if isinstance(self.jobs, Exception):
            raise self.jobs
        return iter(self.jobs)

    def update_job(self, request, timeout=None):
        self.updated.append(request)


def _submit_interrupted(monkeypatch, interrupt, jobs):
    """p.run() raises `interrupt` while submitting; the jobs API then lists `jobs(name)`
    for the name the launcher gave the job. Returns (names given, clients made)."""
    from apache_beam.options.pipeline_options import GoogleCloudOptions

    from curate import dataflow

    names, clients = [], []

    def submit(self):
        names.append(self._options.view_as(GoogleCloudOptions).job_name)
        raise interrupt

    def jobs_client(options):
        clients.append(_FakeJobsClient(jobs(options.view_as(GoogleCloudOptions).job_name)))
        return clients[-1]

    monkeypatch.setattr(dataflow, "check_launcher", lambda options: None)
    monkeypatch.setattr(dataflow, "_jobs_client", jobs_client)
    monkeypatch.setattr(beam.Pipeline, "run", submit)
    return names, clients


WHERE = {"project_id": "curate-test-project", "location": "europe-west4"}


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt(), SystemExit(143)])
def test_an_interrupt_while_submitting_cancels_the_job_found_by_its_name(tmp_path, monkeypatch, capsys, interrupt):
    """Ctrl-C inside p.run(): Dataflow may have created the job though its id never came
    back. The launcher named it, finds it among the active jobs by that name, cancels it
    and keeps the staging directory its workers write to."""
    job_id = "2026-12-02_01_02_03-456"
    names, clients = _submit_interrupted(monkeypatch, interrupt, lambda name: [
        SimpleNamespace(id="2026-12-01_00_00_00-1", name="someone-elses-job"), SimpleNamespace(id=job_id, name=name)])
    with pytest.raises(type(interrupt)):
        run_job(_tiny_dataflow_job(tmp_path))
    [name] = names
    assert re.fullmatch(r"curate-tiny-dataflow-\d{8}-\d{6}-[0-9a-f]{6}", name)
    [client] = clients
    assert client.listed == [{**WHERE, "filter": "ACTIVE"}]
    assert client.updated == [{**WHERE, "job_id": job_id, "job": {"requested_state": "JOB_STATE_CANCELLED"}}]
    err = capsys.readouterr().err
    assert f"asked Dataflow to cancel job {job_id} ({name})" in err
    assert _staging_left(tmp_path) and not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["not created", "api error", "own name"])
def test_an_interrupt_while_submitting_says_how_to_check_when_no_job_is_cancelled(tmp_path, monkeypatch, capsys,
                                                                                  case):
    """No job of that name yet, the API unreachable, or a --job_name of the user's (an
    active job of that name may be an earlier launch's: never cancelled): one line names
    the job and the gcloud commands to check and cancel, and the staging is kept."""
    jobs = RuntimeError("403 Permission denied") if case == "api error" else []
    names, clients = _submit_interrupted(monkeypatch, KeyboardInterrupt(), lambda name: jobs)
    extra = ["--job_name=my-own-name"] if case == "own name" else []
    with pytest.raises(KeyboardInterrupt):
        run_job(_tiny_dataflow_job(tmp_path, *extra))
    [name] = names
    assert name == "my-own-name" if case == "own name" else name.startswith("curate-tiny-dataflow-")
    assert len(clients) == (0 if case == "own name" else 1) and not any(c.updated for c in clients)
    [line] = [line for line in capsys.readouterr().err.splitlines() if "while submitting" in line]
    where = "--project=curate-test-project --region=europe-west4"
    assert f"gcloud dataflow jobs list {where} --status=active --filter=name={name} " in line
    assert f"gcloud dataflow jobs cancel JOB_ID {where}" in line
    assert ("403 Permission denied" in line) == (case == "api error")
    assert _staging_left(tmp_path) and not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["submit", "wait"])
def test_a_local_interrupt_still_removes_the_staging(tmp_path, monkeypatch, where):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"question": "Q", "answer": "A"}) + "\n")
    job = parse_job({"inputs": [{"path": str(src)}], "output": str(tmp_path / "out")})

    def run(self):
        if where == "submit":
            raise KeyboardInterrupt
        return _FakeDataflowResult(KeyboardInterrupt())

    monkeypatch.setattr(beam.Pipeline, "run", run)
    with pytest.raises(KeyboardInterrupt):
        run_job(job)
    assert not _staging_left(tmp_path)


def test_the_selection_from_stored_scores_takes_its_own_options(tmp_path, monkeypatch):
    import curate.pipeline.run as build_module

    seen = []
    real = build_module.run_pipeline

    def spy(job, beam_args=None, **kw):
        seen.append(list(job.beam_args))
        return real(job, beam_args, **kw)

    monkeypatch.setattr(build_module, "run_pipeline", spy)
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"question": f"Q{i}", "answer": "A"}) + "\n" for i in range(5)))
    job = parse_job({"inputs": [{"path": str(src)}], "output": str(tmp_path / "out"),
                     "scores": str(tmp_path / "scores"),
                     "scorers": [{"type": "embedding", "model": "minilm", "max_length": 16}],
                     "selectors": [{"type": "random", "budget": 2}],
                     "beam_args": ["--direct_num_workers=1"],
                     "select_beam_args": ["--direct_running_mode=in_memory"]})
    run_job(job)
    assert seen == [["--direct_num_workers=1"], ["--direct_running_mode=in_memory"]]


def test_gs_paths_without_the_cloud_storage_client_are_one_clear_error(tmp_path, monkeypatch):
    """Without the `dataflow` extra Beam fails at the first gs:// read or write with a
    traceback; curate says what to install before anything runs."""
    from apache_beam.io.gcp import gcsio

    from curate.paths import check_client

    monkeypatch.setattr(gcsio, "storage", None, raising=False)  # as without google-cloud-storage
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"question": "Q", "answer": "A"}) + "\n")
    with pytest.raises(ConfigError, match=r"output gs://b/out: gs:// paths need .*pip install -e '\.\[dataflow\]'"):
        run_job(parse_job({"inputs": [str(src)], "output": "gs://b/out"}))
    with pytest.raises(ConfigError, match=r"input gs://b/data/\*\.jsonl: gs:// paths need"):
        run_job(parse_job({"inputs": ["gs://b/data/*.jsonl"], "output": str(tmp_path / "out")}))
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(gcsio, "storage", object())  # installed: nothing to say
    check_client("gs://b/out", "output")
