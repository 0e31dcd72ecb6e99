"""What every benchmark records about the machine it ran on (results without it cannot
be compared). Scripts add their own fields: matmul rates, faiss threads, ..."""

from __future__ import annotations

import os
import platform


def machine_info() -> dict:
    """CPU model and cores, memory, load average now, Python / torch / transformers
    versions, torch threads, native bf16 on the CPU, and the GPU when there is one."""
    import torch
    import transformers

    from curate.models.loading import cpu_has_native_bf16

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(),
            "mem_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "load_average_start": round(os.getloadavg()[0], 2),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "torch_threads": torch.get_num_threads(),
            "native_bf16": cpu_has_native_bf16()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
