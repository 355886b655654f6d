"""The decoder: transformers' LlamaForCausalLM loads the checkpoint folders `fledge train` writes
and computes the same logits; the KV cache gives the same logits as a full forward; GQA and
untied heads work; a packed example computes what it computes alone; the forward contract
(keywords, summed losses) and the FLOP count hold."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import LlamaForCausalLM

from fledge.model.gpt import GPT, GPTConfig, KVCache, causal_attention_math, document_mask, sample_next, to_hf_config
from fledge.prepare import prepare
from fledge.recipe import load_recipe
from fledge.sample import load_for_inference
from fledge.train import train
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
    restarting = torch.cat([torch.arange(9), torch.arange(8)]).expand(2, 17)   # RoPE positions of a packed row
    with torch.no_grad():
        ours, _ = model(idx)
        theirs = hf(input_ids=idx).logits
        ours_packed, _ = model(idx, position_ids=restarting)
        theirs_packed = hf(input_ids=idx, position_ids=restarting).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours_packed, theirs_packed, atol=1e-5, rtol=1e-4)
    assert (ours_packed - ours).abs().max() > 1e-4        # well above the tolerance: positions mattered


CORPUS = "".join(f"{i} little pigs went to market; the {i % 7} wolves stayed home.\n" for i in range(200))


@pytest.mark.parametrize("model", [dict(), dict(tie_embeddings=False, n_kv_heads=1)], ids=["tied", "untied-mqa"])
def test_transformers_llama_loads_a_checkpoint_written_by_fledge_train(tmp_path, model):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS)
    recipe = load_recipe(None, base={
        "name": "tiny", "run_dir": str(tmp_path / "runs" / "tiny"),
        "data": {"sources": [str(corpus)], "prepared_dir": str(tmp_path / "prepared")},
        "tokenizer": {"kind": "char", "vocab_size": 64},
        "model": {"n_layers": 2, "n_heads": 2, "dim": 32, "max_seq_len": 64} | model,
        "train": dict(max_steps=3, batch_size=2, block_size=32, lr=1e-2, warmup_steps=1, eval_every=0,
                      eval_batches=1, checkpoint_every=0, threads=1, seed=3),
        "sample": {"prompts": []}})
    prepare(recipe, progress=False)
    folder = train(recipe, progress=False).last_checkpoint
    ours, _, _ = load_for_inference(folder)
    theirs = LlamaForCausalLM.from_pretrained(folder).eval()
    assert theirs.dtype == torch.float32
    idx = torch.randint(0, ours.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, _ = ours(idx)
        torch.testing.assert_close(logits, theirs(input_ids=idx).logits, atol=1e-5, rtol=1e-4)


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


def test_forward_contract_keywords_and_summed_loss():
    model = tiny()
    idx = torch.randint(0, 64, (2, 16))
    labels = torch.randint(0, 64, (2, 16))
    labels[0, :5] = -100                                  # e.g. a prompt without targets
    with torch.no_grad():
        logits, mean = model(idx, labels)
        logits_kw, mean_kw = model(input_ids=idx, labels=labels)
        _, total = model(idx, labels, reduction="sum")
        _, each = model(idx, labels, reduction="none")
        plain, nothing = model(idx)
    count = (labels != -100).sum()
    assert torch.equal(logits, logits_kw) and torch.equal(logits, plain) and nothing is None
    assert torch.equal(mean, mean_kw)
    torch.testing.assert_close(total / count, mean)
    reference = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    torch.testing.assert_close(total, reference)
    assert each.shape == (2, 16) and torch.all(each[0, :5] == 0)
    torch.testing.assert_close(each.sum(), total)


def test_default_position_ids_are_the_positions():
    model = tiny()
    idx = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        given, _ = model(idx, position_ids=torch.arange(10).expand(2, 10))
        default, _ = model(idx)
    torch.testing.assert_close(given, default, atol=0, rtol=0)


def packed_and_alone_logits_and_grads(model, a, b):
    """Row 0 packs a then b, row 1 b then a, with positions restarting and document ids. Returns the
    logits of each piece packed and alone, and the parameter gradients of the summed losses."""
    rows = [torch.cat([a, b]), torch.cat([b, a])]
    ids = torch.stack(rows)
    positions = torch.stack([torch.cat([torch.arange(len(x)), torch.arange(len(y))]) for x, y in ((a, b), (b, a))])
    docs = torch.stack([torch.cat([torch.zeros(len(x)), torch.ones(len(y))]).long() for x, y in ((a, b), (b, a))])
    labels = ids.roll(-1, 1)       # any targets will do; the same ones packed and alone
    packed, loss = model(ids, labels, reduction="sum", position_ids=positions, document_ids=docs)
    loss.backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    pieces = [(a, labels[0, :len(a)], packed[0, :len(a)]), (b, labels[0, len(a):], packed[0, len(a):]),
              (b, labels[1, :len(b)], packed[1, :len(b)]), (a, labels[1, len(b):], packed[1, len(b):])]
    for x, y, packed_logits in pieces:
        alone, loss = model(x[None], y[None], reduction="sum")
        loss.backward()
        torch.testing.assert_close(packed_logits, alone[0], atol=1e-5, rtol=1e-5)
    return packed_grads, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("variant", VARIANTS)
def test_packed_example_matches_it_alone_logits_and_gradients(variant):
    model = tiny(**VARIANTS[variant])
    g = torch.Generator().manual_seed(1)
    a, b = torch.randint(0, 64, (7,), generator=g), torch.randint(0, 64, (12,), generator=g)
    packed, alone = packed_and_alone_logits_and_grads(model, a, b)
    for name in packed:
        torch.testing.assert_close(packed[name], alone[name], atol=1e-5, rtol=1e-4, msg=name)


def test_document_mask_in_the_cpu_math_kernel_matches_sdpa():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 9, 8, generator=g) for _ in range(3))
    docs = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2], [5, 5, 5, 5, 5, 5, 7, 7, 7]])
    bias = document_mask(docs, torch.float32)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    torch.testing.assert_close(causal_attention_math(q, k, v, 0.0, bias), expected, atol=1e-6, rtol=1e-5)
    same_doc = torch.zeros_like(docs)
    torch.testing.assert_close(causal_attention_math(q, k, v, 0.0, document_mask(same_doc, torch.float32)),
                               F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-6, rtol=1e-5)


def test_packing_under_bf16_autocast_stays_close_to_alone():
    model = tiny()
    a, b = torch.randint(0, 64, (7,)), torch.randint(0, 64, (9,))
    ids = torch.cat([a, b])[None]
    positions = torch.cat([torch.arange(7), torch.arange(9)])[None]
    docs = torch.cat([torch.zeros(7), torch.ones(9)]).long()[None]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        packed, _ = model(ids, position_ids=positions, document_ids=docs)
        alone, _ = model(b[None])
    torch.testing.assert_close(packed[0, 7:].float(), alone[0].float(), atol=0.05, rtol=0.05)


def test_every_projection_module_is_called():
    """A wrapper that replaces a projection (peft's LoRA layers) only works if forward calls it."""
    model = tiny(n_kv_heads=2)
    called = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            module.register_forward_hook(lambda m, args, out, name=name: called.add(name))
    model(torch.randint(0, 64, (1, 8)), torch.randint(0, 64, (1, 8)))[1].backward()
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert called == linears and len(linears) == 2 * 7 + 1


@pytest.mark.parametrize("tie", [True, False])
def test_flops_per_token_counts_the_output_head_tied_or_not(tie):
    model = tiny(tie_embeddings=tie, n_kv_heads=2, hidden_dim=96)
    c = model.config
    per_layer = c.dim * c.dim * 2 + 2 * c.dim * c.n_kv_heads * c.head_dim + 3 * c.dim * c.hidden_dim
    matmul_weights = c.n_layers * per_layer + c.vocab_size * c.dim
    assert model.flops_per_token(16) == 6 * matmul_weights + 6 * c.n_layers * c.dim * 16
    assert model.num_parameters(non_embedding=True) == c.n_layers * (per_layer + 2 * c.dim) + c.dim \
        + (0 if tie else c.vocab_size * c.dim)


def test_packed_sequences_refuse_a_cache_and_positions_past_max_seq_len():
    model = tiny()
    idx = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="KV cache"):
        model(idx, cache=KVCache(model, 1, 8, idx.device), document_ids=torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(idx, position_ids=torch.tensor([[0, 1, 2, 64]]))


def test_long_packed_sequences_attend_document_by_document_with_the_masks_results(monkeypatch):
    """At RUNS_FROM_LENGTH and beyond, packed rows attend run by run (no (T, T) mask): the same logits and
    gradients as the mask, fp32 and bf16; padding after the rows is a run of its own; documents that are
    not contiguous runs fall back to the mask."""
    import fledge.model.gpt as gpt
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=97, n_layers=2, n_heads=4, n_kv_heads=2, dim=32, max_seq_len=128))
    lengths = [[50, 30, 20, 28], [70, 58]]
    docs = torch.tensor([[d for d, n in enumerate(row) for _ in range(n)] for row in lengths])
    positions = torch.tensor([[p for n in row for p in range(n)] for row in lengths])
    ids = torch.randint(0, 97, (2, 128))
    labels = ids.roll(-1, 1)
    assert gpt.document_runs(docs) == [[(0, 50), (50, 80), (80, 100), (100, 128)], [(0, 70), (70, 128)]]
    assert gpt.document_runs(torch.tensor([[0, 0, 1, 0]])) is None            # document 0 split in two
    results = {}
    for threshold in (10 ** 6, 128):
        monkeypatch.setattr(gpt, "RUNS_FROM_LENGTH", threshold)
        assert isinstance(gpt.packed_attention_bias(docs, torch.float32), list) == (threshold == 128)
        logits, loss = model(ids, labels, reduction="sum", position_ids=positions, document_ids=docs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low, _ = model(ids, position_ids=positions, document_ids=docs)
        results[threshold] = logits, torch.autograd.grad(loss, list(model.parameters())), low.float()
    (mask, mask_grads, mask_bf16), (runs, runs_grads, runs_bf16) = results[10 ** 6], results[128]
    torch.testing.assert_close(runs, mask, atol=1e-5, rtol=1e-5)
    for a, b in zip(runs_grads, mask_grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(runs_bf16, mask_bf16, atol=0.1, rtol=0.05)
    scattered = torch.tensor([[0, 1] * 64, [0] * 128])                        # not runs: the mask, still right
    monkeypatch.setattr(gpt, "RUNS_FROM_LENGTH", 128)
    assert not isinstance(gpt.packed_attention_bias(scattered, torch.float32), list)
