"""The decoder: transformers' LlamaForCausalLM loads its weights unchanged and computes the same
logits; the KV cache gives the same logits as a full forward; GQA and untied heads work."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaForCausalLM

from fledge.model.gpt import GPT, GPTConfig, KVCache, sample_next, to_hf_config
from fledge.train.checkpoint import model_state

VARIANTS = {
    "tied": dict(),
    "untied": dict(tie_embeddings=False),
    "gqa": dict(n_heads=4, n_kv_heads=2),
    "mqa-wide-mlp": dict(n_heads=4, n_kv_heads=1, hidden_dim=96),
}


def tiny(**overrides) -> GPT:
    torch.manual_seed(0)
    config = dict(vocab_size=64, n_layers=2, n_heads=4, dim=32, max_seq_len=64) | overrides
    return GPT(GPTConfig(**config)).eval()


@pytest.mark.parametrize("variant", VARIANTS)
def test_transformers_llama_loads_our_folder_and_matches_logits(tmp_path, variant):
    model = tiny(**VARIANTS[variant])
    save_file(model_state(model), str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(to_hf_config(model.config)))
    hf = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 64, (2, 17))
    with torch.no_grad():
        ours, _ = model(idx)
        theirs = hf(input_ids=idx).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_kv_cache_matches_full_forward(variant):
    model = tiny(**VARIANTS[variant])
    idx = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        full, _ = model(idx)
        cache = KVCache(model, 2, 12, idx.device)
        first, _ = model(idx[:, :5], cache=cache)
        steps = [model(idx[:, i:i + 1], cache=cache)[0] for i in range(5, 9)]
        rest, _ = model(idx[:, 9:], cache=cache)      # a multi-token chunk after cached tokens
    torch.testing.assert_close(torch.cat([first, *steps, rest], dim=1), full, atol=1e-5, rtol=1e-4)


def test_bf16_autocast_close_to_fp32():
    model = tiny()
    idx = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        _, fp32 = model(idx, idx)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, bf16 = model(idx, idx)
    assert abs(float(fp32) - float(bf16)) < 0.05


def test_generate_stops_at_eos_and_is_seeded():
    model = tiny()
    idx = torch.zeros(3, 4, dtype=torch.long)
    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return torch.cat(list(model.generate(idx, 20, temperature=1.0, top_k=10, generator=g)), dim=1)
    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))
    greedy = torch.cat(list(model.generate(idx, 30, temperature=0.0)), dim=1)
    tokens = greedy[0].tolist()
    eos = tokens[-1]
    first = tokens.index(eos)
    stopped = torch.cat(list(model.generate(idx, 30, temperature=0.0, eos_id=eos)), dim=1)
    assert stopped.shape[1] == first + 1 and stopped[0, -1] == eos


def test_sample_next_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.05, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, 1.0, 0, 0.8, g)) for _ in range(200)}
    assert draws == {0, 1}
    assert {int(sample_next(logits, 1.0, 1, 1.0, g)) for _ in range(50)} == {0}


def test_sequence_longer_than_max_seq_len_is_refused():
    with pytest.raises(ValueError, match="max_seq_len"):
        tiny()(torch.zeros(1, 65, dtype=torch.long))
