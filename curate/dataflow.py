"""Dataflow: the versions the worker images are built with, and the launcher's side.

The one place for the versions: the Dockerfiles under jobs/dataflow/ take them as build
arguments (`make image-gpu` / `make image-cpu` pass `python -m curate.dataflow
build-args`), the `dataflow` extra pins the same Beam, and `check_launcher` refuses to
launch from other versions than the images': Dataflow requires the launcher's Python
minor version and Beam version to equal the workers', and what the launcher pickles
into the job (numpy arrays, torch objects, faiss results) must load there. The module
imports only the standard library at its top, so the image targets run it with a plain
python3, no venv and no torch (Beam is imported where a function needs it).

Both images carry the same torch, numpy and faiss versions, in different builds: one
`curate run` may use both (diversity, s2l and semdedup score on the GPU image and select
from the stored scores on the CPU image), so either image can launch any job. The GPU
image has PyPI's CUDA 12 build of torch, the family faiss-gpu-cu12 is built for (an
unpinned torch resolves to a CUDA 13 build); the CPU image has the CPU build of torch, a
tenth of the size, and faiss-cpu.
"""

from __future__ import annotations

import logging
import re
import secrets
import sys
import time
from importlib import metadata

from curate.errors import ConfigError

log = logging.getLogger(__name__)

PYTHON_VERSION = "3.11"
BEAM_VERSION = "2.77.0"
CUDA_IMAGE = "nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04"
# on both images; torch's PyPI Linux wheel of this version is CUDA 12.8 (nvidia-*-cu12)
TORCH_VERSION = "2.8.0"
NUMPY_VERSION = "2.4.6"  # apache-beam 2.77 needs < 2.5, faiss-gpu-cu12 1.13 >= 2
FAISS_VERSION = "1.13.2"  # the newest version published as both faiss-cpu and faiss-gpu-cu12

GPU_SERVICE_OPTION = "worker_accelerator="
_LAUNCHER_NAME = re.compile(r"curate(-[a-z0-9]+)*-\d{8}-\d{6}-[0-9a-f]{6}")  # name_job's


def build_args() -> list[str]:
    """`docker build` arguments for the Dockerfiles under jobs/dataflow/."""
    return [f"--build-arg={k}={v}" for k, v in (
        ("PYTHON_VERSION", PYTHON_VERSION), ("BEAM_VERSION", BEAM_VERSION), ("CUDA_IMAGE", CUDA_IMAGE),
        ("TORCH_VERSION", TORCH_VERSION), ("NUMPY_VERSION", NUMPY_VERSION), ("FAISS_VERSION", FAISS_VERSION))]


def launcher_install() -> str:
    """How to make a launcher outside the images (Python 3.11, from the repository root)."""
    return (f"pip install torch=={TORCH_VERSION} --index-url https://download.pytorch.org/whl/cpu && "
            f"pip install -e '.[dataflow,cpu]' numpy=={NUMPY_VERSION} faiss-cpu=={FAISS_VERSION}")


def _installed(*names: str) -> str | None:
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return None


def launcher_versions() -> dict[str, str | None]:
    """This Python's and its packages' versions as `check_launcher` compares them (from
    the installed metadata: nothing is imported): torch without its build tag (2.8.0+cpu
    is 2.8.0), faiss of whichever build is installed (faiss-cpu wins where both are)."""
    torch = _installed("torch")
    return {"python": f"{sys.version_info[0]}.{sys.version_info[1]}", "apache-beam": _installed("apache-beam"),
            "torch": torch and torch.split("+")[0], "numpy": _installed("numpy"),
            "faiss": _installed("faiss-cpu", "faiss-gpu-cu12")}


def check_launcher(options: dict, have: dict | None = None) -> None:
    """A ConfigError unless this Python and these packages are the worker images' (the
    workers would otherwise fail to start, or fail later on pickled objects). `options`:
    the job's, whose worker image the message names; `have`: launcher_versions()."""
    have = launcher_versions() if have is None else have
    want = {"python": PYTHON_VERSION, "apache-beam": BEAM_VERSION, "torch": TORCH_VERSION,
            "numpy": NUMPY_VERSION, "faiss": FAISS_VERSION}
    wrong = [f"{name} {have.get(name) or 'not installed'} here, {version} on the workers"
             for name, version in want.items() if have.get(name) != version]
    if wrong:
        image = options.get("sdk_container_image") or "IMAGE"
        raise ConfigError(
            f"the launcher must have the worker images' versions (curate/dataflow.py): {'; '.join(wrong)}. "
            f"Launch from the worker image (jobs/dataflow/README.md): docker run ... --entrypoint curate {image} "
            f"run JOB; or from Python {PYTHON_VERSION} after `{launcher_install()}`")


def is_dataflow(options: dict) -> bool:
    return str(options.get("runner") or "").lower() in ("dataflowrunner", "dataflow")


def check_worker_resources(steps, options: dict) -> None:
    """A ConfigError when a step's declared device (`resources()`) cannot exist on the
    job's workers: `device: cuda` needs GPU workers (`worker_accelerator` in
    --dataflow_service_options). Without one every worker would fail at model load, after
    the job had started and was billed; with one and no GPU step, the GPUs would be paid
    for and idle (a warning)."""
    service = options.get("dataflow_service_options") or []
    service = [service] if isinstance(service, str) else list(service)
    has_gpu = any(GPU_SERVICE_OPTION in str(o) for o in service)
    gpu_steps = [s.type for s in steps if s.resources()["device"] == "cuda"]
    if gpu_steps and not has_gpu:
        raise ConfigError(
            f"step(s) {', '.join(gpu_steps)} declare device: cuda, but the Dataflow workers have no GPU: "
            f"add --dataflow_service_options={GPU_SERVICE_OPTION}type:nvidia-l4;count:1;install-nvidia-driver "
            f"(and a GPU machine type, e.g. --machine_type=g2-standard-8), or set the step's device to cpu")
    if has_gpu and not gpu_steps:
        log.warning("the Dataflow workers have GPUs (%s) but no step declares device: cuda: they would idle; "
                    "a selection from stored scores runs on CPU workers (select_beam_args)", GPU_SERVICE_OPTION)


def console_url(job_id: str, options: dict) -> str:
    return (f"https://console.cloud.google.com/dataflow/jobs/{options.get('region')}/{job_id}"
            f"?project={options.get('project')}")


def _job_id(result) -> str | None:
    return result.job_id() if hasattr(result, "job_id") else None


def announce(result, options: dict) -> None:
    """Print the job id, console URL and how to cancel it (Beam's own log line is muted)."""
    job_id = _job_id(result)
    if not job_id:
        return
    print(f"curate: Dataflow job {job_id}\n"
          f"  console: {console_url(job_id, options)}\n"
          f"  cancel:  gcloud dataflow jobs cancel {job_id} --region={options.get('region')}",
          file=sys.stderr, flush=True)


def name_job(options, job_name: str) -> dict:
    """Name the Dataflow job unless --job_name did: curate-<the job's name>-<UTC time>-<6
    random hex digits>. Beam would choose a name only inside `p.run()`, where an interrupt
    loses it with the job id; this one is how `cancel_on_interrupt` finds the job. Returns
    the options as a dict."""
    from apache_beam.options.pipeline_options import GoogleCloudOptions  # Beam stays lazy (module docstring)

    cloud = options.view_as(GoogleCloudOptions)
    if not cloud.job_name:
        slug = re.sub(r"[^a-z0-9]+", "-", job_name.lower())[:32].strip("-")
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        cloud.job_name = "-".join(part for part in ("curate", slug, stamp, secrets.token_hex(3)) if part)
    return options.get_all_options()


def _jobs_client(options):
    """The Dataflow API's jobs client, with the credentials and endpoint Beam submits with
    (Beam's client keeps it as `_jobs_client`); needs apache-beam[gcp]."""
    from apache_beam.runners.dataflow.internal.apiclient import DataflowApplicationClient

    return DataflowApplicationClient(options)._jobs_client


def _left(staging: str) -> str:
    return (f"Its staging directory {staging} is left in place while workers stop; remove it once the job "
            f"shows Cancelled: gsutil -m rm -r {staging}")


def cancel_on_interrupt(result, options, staging: str) -> bool:
    """After Ctrl-C or SIGTERM: ask Dataflow to cancel the job, so it stops billing. True
    when a cancel request was accepted; otherwise says how to cancel. `result` None: the
    interrupt came inside `p.run()`, while the job was being submitted, so it may exist
    though its id never came back (`_cancel_by_name`). `options`: the run's
    PipelineOptions. The staging directory is left alone either way: workers may write
    to it."""
    if result is None:
        return _cancel_by_name(options, staging)
    job_id = _job_id(result) or "?"
    try:
        result.cancel()
    except Exception as exc:  # the job may have finished, or the API may be unreachable
        print(f"curate: could not cancel Dataflow job {job_id} ({exc}); it may still be running: "
              f"gcloud dataflow jobs cancel {job_id} --region={options.get_all_options().get('region')}",
              file=sys.stderr, flush=True)
        return False
    print(f"curate: asked Dataflow to cancel job {job_id}. {_left(staging)}", file=sys.stderr, flush=True)
    return True


def _cancel_by_name(options, staging: str) -> bool:
    """Cancel the active job that has the name `name_job` gave (Dataflow allows one active
    job per name; the random part keeps it this launch's). A --job_name of the user's is
    not cancelled: an earlier launch may hold it. Whenever no cancel request was accepted,
    one line says how to check and cancel by hand."""
    opts = options.get_all_options()
    name, project, region = opts.get("job_name"), opts.get("project"), opts.get("region")
    where = {"project_id": project, "location": region}
    if not _LAUNCHER_NAME.fullmatch(name or ""):
        outcome = "not looked up, as --job_name named it and an earlier launch's job may have that name"
    else:
        try:
            client = _jobs_client(options)
            found = [job.id for job in client.list_jobs(request={**where, "filter": "ACTIVE"}, timeout=60)
                     if job.name == name]
            for job_id in found:
                client.update_job(request={**where, "job_id": job_id, "job": {"requested_state": "JOB_STATE_CANCELLED"}},
                                  timeout=60)
        except BaseException as exc:  # the API refused or is unreachable, or a second Ctrl-C: by hand then
            outcome = f"could not look it up or cancel it ({type(exc).__name__}: {exc})"
        else:
            if found:
                print(f"curate: interrupted while submitting; asked Dataflow to cancel job {', '.join(found)} "
                      f"({name}). {_left(staging)}", file=sys.stderr, flush=True)
                return True
            outcome = "no active job has that name yet, though Dataflow may still create it"
    flags = f"--project={project} --region={region}"
    print(f"curate: interrupted while submitting Dataflow job {name}: {outcome}. Check: gcloud dataflow jobs list "
          f"{flags} --status=active --filter=name={name} ; cancel what it lists: gcloud dataflow jobs cancel JOB_ID "
          f"{flags}. The staging directory {staging} is kept; remove it once no such job runs: gsutil -m rm -r {staging}",
          file=sys.stderr, flush=True)
    return False


if __name__ == "__main__":  # `python -m curate.dataflow build-args`
    if sys.argv[1:] != ["build-args"]:
        sys.exit("usage: python -m curate.dataflow build-args")
    print(" ".join(build_args()))
