"""Pruning: exact sparsity (per layer for magnitude, per output row for Wanda), Wanda's
scores against a direct computation, layer dropping, and reloading from disk."""

import copy
import gzip
import json

import pytest
import torch

from curate.prune import (block_linears, calibration_ids, decoder_layers, linear_sparsity,
                          load_calibration, prune_model, save_pruned)
from tests.conftest import make_tiny_lm

TEXTS = [("What is two plus two?", "Two plus two is four."),
         ("Write a function that adds two numbers.", "def add(a, b): return a + b"),
         ("Describe your ship, captain!", "Arr, she be the fastest ship on the seven seas."),
         ("Natalia sold clips to 48 friends.", "She sold 72 clips in April and May.")]


def calib_records():
    from curate.records import make_record

    return [make_record([{"role": "user", "content": q}, {"role": "assistant", "content": a}], "t")
            for q, a in TEXTS]


def fresh(seed=0):
    return make_tiny_lm(seed=seed, hidden_size=64)


def test_magnitude_hits_sparsity_per_layer_and_zeroes_the_smallest():
    model, _ = fresh()
    before = copy.deepcopy(model)
    report = prune_model(model, "magnitude", 0.5)
    for i, (layer, old) in enumerate(zip(decoder_layers(model), decoder_layers(before))):
        for (name, lin), (_, old_lin) in zip(block_linears(layer), block_linears(old)):
            w, w0 = lin.weight, old_lin.weight
            zero = w == 0
            assert int(zero.sum()) == int(w.numel() * 0.5), f"layer {i} {name}"
            # every pruned weight was at most as large as every kept one
            assert w0.abs()[zero].max() <= w0.abs()[~zero].min()
            assert torch.equal(w[~zero], w0[~zero])
    assert torch.equal(model.model.embed_tokens.weight, before.model.embed_tokens.weight)
    assert torch.equal(model.lm_head.weight, before.lm_head.weight)
    assert report["achieved_sparsity"] == pytest.approx(0.5)


def test_wanda_hits_sparsity_per_row_and_matches_direct_scores():
    model, tok = fresh()
    before = copy.deepcopy(model)
    calib = calibration_ids(calib_records(), tok)
    # reference activation norms of block 0's q_proj input, one example at a time (no padding)
    sq = torch.zeros(model.config.hidden_size, dtype=torch.float64)

    def hook(module, args):
        sq.add_(args[0].reshape(-1, args[0].shape[-1]).double().pow(2).sum(0))

    h = decoder_layers(before)[0].self_attn.q_proj.register_forward_pre_hook(hook)
    with torch.no_grad():
        for ids in calib:
            before(input_ids=torch.tensor([ids]))
    h.remove()

    report = prune_model(model, "wanda", 0.5, calibration=calib, batch_size=3,
                         pad_token_id=tok.pad_token_id)
    assert report["calibration_tokens"] == sum(len(c) for c in calib)
    for layer in decoder_layers(model):
        for name, lin in block_linears(layer):
            per_row = (lin.weight == 0).sum(dim=1)
            assert torch.all(per_row == lin.in_features // 2), name
    # block 0's inputs do not depend on pruning: its mask is exactly the lowest |W| * ||X||
    w0 = decoder_layers(before)[0].self_attn.q_proj.weight
    score = w0.abs().double() * sq.sqrt()[None, :]
    expected = torch.zeros_like(w0, dtype=torch.bool)
    expected.scatter_(1, score.argsort(dim=1)[:, : w0.shape[1] // 2], True)
    assert torch.equal(decoder_layers(model)[0].self_attn.q_proj.weight == 0, expected)
    # Wanda is not magnitude pruning: activation norms change the choice somewhere
    mag = copy.deepcopy(before)
    prune_model(mag, "magnitude", 0.5)
    assert not torch.equal(decoder_layers(mag)[1].mlp.down_proj.weight == 0,
                           decoder_layers(model)[1].mlp.down_proj.weight == 0)


def test_pruned_model_reloads_from_disk_and_runs(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = fresh()
    report = prune_model(model, "wanda", 0.5, calibration=calibration_ids(calib_records(), tok),
                         pad_token_id=tok.pad_token_id)
    out = save_pruned(model, tok, str(tmp_path / "pruned"), report)
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    AutoTokenizer.from_pretrained(out)
    assert linear_sparsity(loaded) == linear_sparsity(model)
    assert all(abs(s - 0.5) < 1e-9 for s in linear_sparsity(loaded).values())
    ids = torch.tensor([calibration_ids(calib_records(), tok)[0]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5)
    assert json.loads((tmp_path / "pruned" / "prune.json").read_text())["method"] == "wanda"


@pytest.mark.parametrize("layers,kept", [(1, [0, 1]), ([0, 2], [1])])
def test_layer_drop_reloads_with_fewer_layers_and_a_working_kv_cache(tmp_path, layers, kept):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    tok = make_tiny_lm()[1]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, bos_token_id=None)).eval()
    originals = list(decoder_layers(model))
    report = prune_model(model, "layer_drop", layers=layers)
    assert report["kept_layers"] == kept
    out = save_pruned(model, tok, str(tmp_path / "dropped"), report)
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert loaded.config.num_hidden_layers == len(kept) == len(decoder_layers(loaded))
    assert [l.self_attn.layer_idx for l in decoder_layers(loaded)] == list(range(len(kept)))
    for new, old_idx in zip(decoder_layers(loaded), kept):
        assert torch.equal(new.self_attn.q_proj.weight, originals[old_idx].self_attn.q_proj.weight)
    ids = torch.tensor([calibration_ids(calib_records(), tok)[0]])
    with torch.no_grad():
        cached = loaded.generate(ids, max_new_tokens=5, do_sample=False, use_cache=True)
        plain = loaded.generate(ids, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain)


def test_bad_arguments_are_refused():
    model, _ = fresh()
    with pytest.raises(ValueError, match="calibration"):
        prune_model(model, "wanda", 0.5)
    with pytest.raises(ValueError, match="sparsity"):
        prune_model(model, "magnitude", 1.0)
    with pytest.raises(ValueError, match="layer_drop"):
        prune_model(model, "layer_drop", layers=2)  # would drop both layers
    with pytest.raises(ValueError, match="unknown"):
        prune_model(model, "movement", 0.5)


def test_calibration_sample_is_seeded_and_spread(tmp_path):
    path = tmp_path / "pool.jsonl.gz"
    with gzip.open(path, "wt") as fh:
        for i in range(200):
            fh.write(json.dumps({"question": f"q{i}", "answer": f"a{i}"}) + "\n")
    a = load_calibration([str(path)], n_rows=20, seed=0)
    assert len(a) == 20 and [r["prompt"] for r in a] == [r["prompt"] for r in load_calibration([str(path)], 20, 0)]
    assert max(int(r["prompt"][1:]) for r in a) > 100  # not just the head of the file


def test_cli_prune_wanda(tmp_path, tiny_lm_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    from curate import cli

    calib = tmp_path / "calib.jsonl"
    calib.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in TEXTS))
    out = tmp_path / "wanda50"
    rc = cli.main(["prune", "--model", str(tiny_lm_dir), "--method", "wanda", "--sparsity", "0.5",
                   "--calibration", str(calib), "--calibration-rows", "4", "--output", str(out),
                   "--dtype", "float32"])
    assert rc == 0
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert all(abs(s - 0.5) < 1e-9 for s in linear_sparsity(loaded).values())
    assert cli.main(["prune", "--model", str(tiny_lm_dir), "--method", "wanda",
                     "--output", str(tmp_path / "x")]) == 2  # no calibration: a clear error
