"""A curate output's `messages` column trains as is with TRL's SFTTrainer.

The tokenizer is the embedded SmolLM2's (a real chat template); the model is a tiny
random Llama of its vocabulary, so two steps take seconds on a CPU.
"""

import json
import math

import datasets
import pytest

from curate.config import parse_job
from curate.pipeline.run import run_job

trl = pytest.importorskip("trl")


def _conversations():
    rows = []
    for i in range(12):
        messages = [{"role": "user", "content": f"What is {i} times 3?"},
                    {"role": "assistant", "content": f"{i} times 3 is {3 * i}. Done ✓"}]
        if i % 3 == 0:
            messages.insert(0, {"role": "system", "content": "Answer with one sentence."})
        if i % 4 == 1:
            messages += [{"role": "user", "content": "And plus one?"},
                         {"role": "assistant", "content": f"{3 * i + 1}."}]
        rows.append({"messages": messages})
    return rows


def _ids(encoded):
    """apply_chat_template(tokenize=True) gives a BatchEncoding or a plain list by version."""
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


@pytest.mark.integration
@pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")
def test_sft_trainer_trains_on_the_messages_column(tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    from curate.models import load_tokenizer

    src = tmp_path / "chats.jsonl"
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in _conversations()), encoding="utf-8")
    run_job(parse_job({"inputs": [str(src)], "output": str(tmp_path / "out"),
                       "selectors": [{"type": "random", "budget": 8, "seed": 0}]}))
    ds = datasets.load_from_disk(str(tmp_path / "out")).select_columns(["messages"])
    assert len(ds) == 8

    tokenizer = load_tokenizer("default")  # SmolLM2: ChatML template, pad = eos = <|im_end|>
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    args = SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=2, per_device_train_batch_size=4,
                     learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                     bf16=False, dataloader_num_workers=0, disable_tqdm=True, max_length=512, seed=0)
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer)

    # what the trainer tokenised is each row's chat-template rendering, assistant turns included
    rendered = [tokenizer.apply_chat_template(m, tokenize=False) for m in ds["messages"]]
    prepared = trainer.train_dataset
    assert len(prepared) == len(ds)
    for i, messages in enumerate(ds["messages"]):
        ids = list(prepared[i]["input_ids"])
        assert ids == _ids(tokenizer.apply_chat_template(messages, tokenize=True))
        assert tokenizer.decode(ids) == rendered[i]
        for m in messages:
            assert f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>" in rendered[i]

    # one collated batch: every row decodes to a rendering, and the loss covers all of it
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 4
    for row in range(4):
        mask = batch["attention_mask"][row].bool()
        ids, labels = batch["input_ids"][row][mask], batch["labels"][row][mask]
        text = tokenizer.decode(ids)
        assert text in rendered
        assert torch.equal(labels, ids) and (batch["labels"][row][~mask] == -100).all()
        messages = ds["messages"][rendered.index(text)]
        trained = tokenizer.decode(labels[labels != -100])
        assert all(m["content"] in trained for m in messages if m["role"] == "assistant")

    result = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert trainer.state.global_step == 2 and len(losses) == 2
    assert math.isfinite(result.training_loss) and all(math.isfinite(x) and x > 0 for x in losses)
