"""benchmarks/gpu_check.py, the check prepared for a lent GPU, run end to end on tiny models
on the CPU: every stage runs, every row is scored, and the parameters and MFU it reports
match counts made here."""

from __future__ import annotations

import importlib.util
import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_gpu_check_on_tiny_models(tiny_lm_dir, tiny_bert_dir, shared_data, tmp_path, torch_one_thread):
    from transformers import AutoModel, AutoModelForCausalLM

    gpu_check = _gpu_check()
    out = tmp_path / "gpu_check.json"
    result = gpu_check.main(["--model", str(tiny_lm_dir), "--embedder", str(tiny_bert_dir), "--device", "cpu",
                             "--rows", "12", "--batch", "4", "--seconds", "60", "--train-steps", "2",
                             "--matmul-n", "128", "--matmul-seconds", "0.1", "--kmeans-rows", "600",
                             "--kmeans-k", "8", "--work-dir", str(tmp_path / "work"), "--out", str(out)])
    assert json.loads(out.read_text())["stages"] == json.loads(json.dumps(result["stages"]))

    stages = {s["stage"]: s for s in result["stages"]}
    assert set(stages) == {"trainer (LoRA)", *gpu_check.SCORERS}
    assert stages["trainer (LoRA)"]["checkpoints"] == [1, 2]
    for name in gpu_check.SCORERS:
        assert stages[name]["rows"] == 12, name          # every row, none dropped
        assert stages[name]["tokens"] > 12, name

    lm = _params(AutoModelForCausalLM.from_pretrained(tiny_lm_dir))
    for name in ("likelihood", "ifd", "weight_delta"):
        assert stages[name]["params"] == lm
    assert stages["degradation"]["params"] == 2 * lm     # the model and its pruned copy, both run
    assert stages["trajectory"]["params"] > lm            # the base and one LoRA adapter per checkpoint
    assert stages["embedding"]["params"] == _params(AutoModel.from_pretrained(tiny_bert_dir))
    # IFD runs each row twice (with and without its prompt); S2L once per checkpoint
    assert stages["ifd"]["tokens"] > stages["likelihood"]["tokens"]

    rate = result["matmul"]["flops"]
    for s in stages.values():
        per_token = 4 * s["params"] if s["stage"].startswith("trainer") else 2 * s["params"]
        assert abs(s["mfu"] - s["tokens"] / s["seconds"] * per_token / rate) < 1e-9 * max(s["mfu"], 1)

    km = result["kmeans"]
    assert km["rows"] == 600 and 1 < km["clusters_used"] <= 8
