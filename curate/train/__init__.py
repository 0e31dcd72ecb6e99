"""The SFT/PEFT trainer stage: `train` (library), `run_train` (what `curate train` calls).

S2L and the diversity method's refinement reuse it: `train(..., cfg=TrainConfig(
num_checkpoints=T))` then `list_checkpoints(output_dir)` and `load_checkpoint_model`.
"""

from curate.train.checkpoints import (check_run_dir, evenly_spaced_steps, list_checkpoints,
                                      load_checkpoint_model)
from curate.train.data import load_records, read_jsonl_records, tokenize
from curate.train.loss import evaluate_loss, generate_samples, response_nll
from curate.train.loading import load_model
from curate.train.trainer import TrainConfig, run_train, train

__all__ = [
    "TrainConfig", "train", "run_train", "check_run_dir", "evaluate_loss", "generate_samples", "response_nll",
    "list_checkpoints", "load_checkpoint_model", "evenly_spaced_steps", "load_records",
    "read_jsonl_records", "tokenize", "load_model",
]
