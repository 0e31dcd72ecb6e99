"""Dataflow: the versions the worker images are built with, and the launcher's side.

The one place for the versions: the Dockerfiles under jobs/dataflow/ take them as build
arguments (`make image-gpu` / `make image-cpu` pass `python -m curate.dataflow
build-args`), the `dataflow` extra pins the same Beam, and `check_launcher` refuses to
launch from a Python or Beam that differs from the image's: Dataflow requires the
launcher's Python minor version and Beam version to equal the workers'. The module
imports only the standard library at its top, so the image targets run it with a plain
python3, no venv and no torch (Beam is imported where a function needs it).

torch on the GPU image is PyPI's CUDA 12 build, the family faiss-gpu-cu12 is built for;
an unpinned torch resolves to a CUDA 13 build. The CPU image (CPU-only jobs and the
selection from stored scores) carries the CPU build of torch, a tenth of the size.
"""

from __future__ import annotations

import logging
import sys

from curate.errors import ConfigError

log = logging.getLogger(__name__)

PYTHON_VERSION = "3.11"
BEAM_VERSION = "2.77.0"
TORCH_GPU_VERSION = "2.8.0"  # PyPI's Linux wheel: CUDA 12.8 (nvidia-*-cu12), as faiss-gpu-cu12
CUDA_IMAGE = "nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04"
TORCH_CPU_VERSION = "2.13.0"  # the CPU build, as the Makefile installs here

GPU_SERVICE_OPTION = "worker_accelerator="


def build_args() -> list[str]:
    """`docker build` arguments for the Dockerfiles under jobs/dataflow/."""
    return [f"--build-arg={k}={v}" for k, v in (
        ("PYTHON_VERSION", PYTHON_VERSION), ("BEAM_VERSION", BEAM_VERSION),
        ("TORCH_GPU_VERSION", TORCH_GPU_VERSION), ("TORCH_CPU_VERSION", TORCH_CPU_VERSION),
        ("CUDA_IMAGE", CUDA_IMAGE))]


def is_dataflow(options: dict) -> bool:
    return str(options.get("runner") or "").lower() in ("dataflowrunner", "dataflow")


def check_launcher(python: tuple[int, int] | None = None, beam: str | None = None) -> None:
    """A ConfigError unless this Python and Beam are the worker images' (the workers would
    otherwise fail to start, or fail later on pickled code)."""
    if python is None:
        python = sys.version_info[:2]
    if beam is None:
        import apache_beam

        beam = apache_beam.__version__
    have = f"{python[0]}.{python[1]}"
    if have != PYTHON_VERSION or beam != BEAM_VERSION:
        raise ConfigError(
            f"Dataflow runs workers with Python {PYTHON_VERSION} and apache-beam {BEAM_VERSION} "
            f"(curate/dataflow.py), and the launcher must match them; this is Python {have} with "
            f"apache-beam {beam}. Launch from the worker image (see jobs/dataflow/README.md), or "
            f"from Python {PYTHON_VERSION} with `pip install -e '.[dataflow]'`.")


def check_worker_resources(scorers, options: dict) -> None:
    """A ConfigError when a scorer's declared device cannot exist on the job's workers:
    `device: cuda` needs GPU workers (`worker_accelerator` in --dataflow_service_options).
    Without one every worker would fail at model load, after the job had started and was
    billed; with one and no GPU scorer, the GPUs would be paid for and idle (a warning)."""
    service = options.get("dataflow_service_options") or []
    service = [service] if isinstance(service, str) else list(service)
    has_gpu = any(GPU_SERVICE_OPTION in str(o) for o in service)
    gpu_steps = [s.type for s in scorers if getattr(s, "device", None) == "cuda"]
    if gpu_steps and not has_gpu:
        raise ConfigError(
            f"scorer(s) {', '.join(gpu_steps)} declare device: cuda, but the Dataflow workers have no GPU: "
            f"add --dataflow_service_options={GPU_SERVICE_OPTION}type:nvidia-l4;count:1;install-nvidia-driver "
            f"(and a GPU machine type, e.g. --machine_type=g2-standard-8), or set the scorer's device to cpu")
    if has_gpu and not gpu_steps:
        log.warning("the Dataflow workers have GPUs (%s) but no scorer declares device: cuda: they would idle; "
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


def cancel_on_interrupt(result, options: dict, staging: str) -> bool:
    """After Ctrl-C or SIGTERM while waiting: ask Dataflow to cancel the job, so it stops
    billing. True when the cancel request was accepted; otherwise says how to cancel.
    The staging directory is left alone either way: workers may still write to it."""
    job_id = _job_id(result) or "?"
    try:
        result.cancel()
    except Exception as exc:  # the job may have finished, or the API may be unreachable
        print(f"curate: could not cancel Dataflow job {job_id} ({exc}); it may still be running: "
              f"gcloud dataflow jobs cancel {job_id} --region={options.get('region')}",
              file=sys.stderr, flush=True)
        return False
    print(f"curate: asked Dataflow to cancel job {job_id}. Its staging directory {staging} is left "
          f"in place while workers stop; remove it once the job shows Cancelled: gsutil -m rm -r {staging}",
          file=sys.stderr, flush=True)
    return True


if __name__ == "__main__":  # `python -m curate.dataflow build-args`
    if sys.argv[1:] != ["build-args"]:
        sys.exit("usage: python -m curate.dataflow build-args")
    print(" ".join(build_args()))
