"""Adapters, one table of bases (fledge's GPT tied and untied, tiny llama, qwen2 and gpt2) through
shared checks: targets are found by type and position; every adapter of every target trains and
nothing else changes; merged equals unmerged and is the base's own class; new tokens' rows train
and survive save -> load and merging; QLoRA 4- and 8-bit still trains every adapter after an
evaluation pass, and merges into a full-precision model."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn as nn
from transformers import AutoModelForCausalLM

from fledge.errors import DependencyError, RecipeError
from fledge.model.adapters import (apply_method, default_targets, is_quantized, load_adapter, merge_adapter,
                                   qlora_compute_dtype, require_bitsandbytes, save_adapter, trainable_report)
from fledge.model.bases import TransformersLM, load_base
from fledge.model.gpt import GPT, GPTConfig
from fledge.recipe import FinetuneConfig
from fledge.templates import add_template_tokens, get_template
from fledge.train.checkpoint import model_state
from test_bases import V, char_tokenizer, fledge_run, hf_folder, recipe_for, shifted, tiny_config  # noqa: F401

LLAMA_TARGETS = ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj", "self_attn.o_proj",
                 "self_attn.q_proj", "self_attn.v_proj"]
GPT2_TARGETS = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]


def build(case: str, root):
    """(model, tokenizer) of a table case; the same weights every call. Cases: how the head relates to
    the embedding and whether the rows outnumber the tokenizer (llama) or match it (resized for new tokens)."""
    tok = char_tokenizer(root)
    torch.manual_seed(0)
    if case.startswith("fledge"):
        config = GPTConfig(vocab_size=len(tok), n_layers=2, n_heads=4, n_kv_heads=2, dim=32, max_seq_len=64,
                           tie_embeddings=case == "fledge-tied")
        return GPT(config).eval(), tok
    family = case
    rows = V if family == "llama" else len(tok)
    hf = AutoModelForCausalLM.from_config(tiny_config(family, vocab_size=rows))
    return TransformersLM(hf).eval(), tok


CASES = {"fledge-tied": LLAMA_TARGETS, "fledge-untied": LLAMA_TARGETS, "llama": LLAMA_TARGETS,
         "qwen2": LLAMA_TARGETS, "gpt2": GPT2_TARGETS}


def lora(**overrides) -> FinetuneConfig:
    return FinetuneConfig(**{"method": "lora", "lora_r": 4, "lora_alpha": 8.0, **overrides})


def batch(tok, seed: int, extra_ids=()):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, len(tok) - len(extra_ids), (2, 16), generator=g)
    for i, token in enumerate(extra_ids):          # new tokens in inputs and targets
        ids[:, 3 + 4 * i] = token
    return ids


def train_steps(model, tok, steps: int, extra_ids=()) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for step in range(steps):
        ids = batch(tok, step, extra_ids)
        model(ids, shifted(ids))[1].backward()
        optimizer.step()
        optimizer.zero_grad()


def adapter_tensors(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


def logits(model, ids):
    with torch.no_grad():
        return model(ids)[0]


@pytest.mark.parametrize("case", CASES)
def test_targets_are_every_block_projection_found_by_type_and_position(tmp_path, case):
    model, _ = build(case, tmp_path)
    inner = model.hf if isinstance(model, TransformersLM) else model
    assert default_targets(inner) == CASES[case]


@pytest.mark.parametrize("case", CASES)
def test_every_adapter_of_every_target_trains_and_nothing_else_changes(tmp_path, case):
    model, tok = build(case, tmp_path)
    model = apply_method(model, lora())
    adapters = adapter_tensors(model)
    assert {n.split(".lora_")[0] for n in adapters}.__len__() == len(CASES[case]) * 2       # 2 layers
    assert set(adapters) == {n for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_steps(model, tok, 1)
    ids = batch(tok, 9)
    model(ids, shifted(ids))[1].backward()          # after one step B is no longer zero: A gets gradients too
    for name, p in adapters.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    model.zero_grad()
    train_steps(model, tok, 1)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) != ("lora_" in name), name
    trained, total = trainable_report(model)
    assert trained == sum(p.numel() for p in adapters.values()) and total > trained


@pytest.mark.parametrize("case", CASES)
def test_merged_equals_unmerged_and_is_the_base_class(tmp_path, case):
    model, tok = build(case, tmp_path)
    fresh, _ = build(case, tmp_path)
    model = apply_method(model, lora())
    train_steps(model, tok, 2)
    model.eval()
    ids = batch(tok, 5)
    unmerged = logits(model, ids)
    assert not torch.allclose(unmerged, logits(fresh, ids), atol=1e-4)      # the adapters do change the output
    columns = list(model.generate(ids[:, :4], 3, temperature=0.0))          # sampling works through peft
    assert len(columns) == 3 and columns[0].shape == (2, 1)
    assert torch.equal(columns[0][:, 0], unmerged[:, 3].argmax(-1))
    merged = merge_adapter(model)
    torch.testing.assert_close(logits(merged, ids), unmerged, atol=1e-5, rtol=1e-4)
    assert type(merged) is type(fresh)
    if isinstance(fresh, TransformersLM):
        assert type(merged.hf) is type(fresh.hf)
    assert set(model_state(merged)) == set(model_state(fresh))         # loads into the base's own class
    fresh.load_state_dict(merged.state_dict())


@pytest.mark.parametrize("added", [False, True], ids=["same-tokens", "new-tokens"])
@pytest.mark.parametrize("case", CASES)
def test_save_then_load_gives_the_same_logits_and_new_tokens_train(tmp_path, case, added):
    model, tok = build(case, tmp_path)
    rows_before = V if case == "llama" else len(tok)
    new = add_template_tokens(tok, get_template("chatml", tok)) if added else []
    new_ids = tok.convert_tokens_to_ids(new)
    model = apply_method(model, lora(), new_tokens=new, tokenizer=tok)
    assert model.config.vocab_size == max(rows_before, len(tok))
    deltas = {n: p.detach().clone() for n, p in model.named_parameters() if "trainable_tokens" in n}
    assert bool(deltas) == added and all(p.requires_grad for n, p in model.named_parameters() if n in deltas)
    ids = batch(tok, 3, new_ids)
    before = logits(model, ids)
    train_steps(model, tok, 3, new_ids)
    model.eval()
    after = logits(model, ids)
    for name, p in model.named_parameters():
        if name in deltas:
            assert not torch.equal(p, deltas[name]), f"{name} did not train"
    if added:
        assert not torch.allclose(after[..., new_ids], before[..., new_ids], atol=1e-4)   # output rows moved too
    save_adapter(model, tmp_path / "adapter")
    base, tok2 = build(case, tmp_path)
    if added:
        add_template_tokens(tok2, get_template("chatml", tok2))
    reloaded = load_adapter(base, tmp_path / "adapter")
    torch.testing.assert_close(logits(reloaded.eval(), ids), after, atol=1e-6, rtol=1e-6)
    assert not any(p.requires_grad for p in reloaded.parameters())
    merged = merge_adapter(model)
    torch.testing.assert_close(logits(merged, ids), after, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("case", ["fledge-tied", "gpt2"])
def test_full_fine_tuning_trains_every_parameter_and_new_rows(tmp_path, case):
    model, tok = build(case, tmp_path)
    new = add_template_tokens(tok, get_template("chatml", tok))
    model = apply_method(model, FinetuneConfig(method="full"), new_tokens=new, tokenizer=tok)
    assert all(p.requires_grad for p in model.parameters())
    trained, total = trainable_report(model)
    assert trained == total and model.config.vocab_size == len(tok)
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else \
        (model.hf.get_input_embeddings() if isinstance(model, TransformersLM) else model.model.embed_tokens)
    torch.testing.assert_close(embedding.weight[-1], embedding.weight[:-len(new)].mean(0))   # mean init


def test_a_target_that_matches_nothing_is_one_clear_line(tmp_path):
    model, _ = build("gpt2", tmp_path)
    with pytest.raises(RecipeError, match=r"lora_targets \['q_proj'\] match no module.*attn.c_attn") as e:
        apply_method(model, lora(lora_targets=["q_proj"]))
    assert "\n" not in str(e.value)


def test_named_targets_are_used_as_given(tmp_path):
    model, _ = build("gpt2", tmp_path)
    model = apply_method(model, lora(lora_targets=["c_attn", "c_proj"]))      # user 1's recipe
    wrapped = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in adapter_tensors(model)}
    assert wrapped == {"c_attn", "c_proj"}


def test_qlora_needs_a_quantized_base_and_lora_an_unquantized_one(tmp_path):
    model, _ = build("llama", tmp_path)
    with pytest.raises(RecipeError, match="quantized"):
        apply_method(model, lora(method="qlora"))


def test_qlora_without_bitsandbytes_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    with pytest.raises(DependencyError, match="pip install bitsandbytes") as e:
        require_bitsandbytes("cpu")
    assert "\n" not in str(e.value)


# --- QLoRA -------------------------------------------------------------------------------------

def need_bitsandbytes():
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    try:
        require_bitsandbytes("cpu")
    except DependencyError as e:
        pytest.skip(str(e))


def step_after_an_evaluation_pass(model, tok):
    """Evaluate (eval mode, no grad), then one LoRA step: every adapter tensor must change."""
    ids = batch(tok, 0)
    model.eval()
    with torch.no_grad():
        model(ids, shifted(ids))
    model.train()
    before = {n: p.detach().clone() for n, p in adapter_tensors(model).items()}
    train_steps(model, tok, 2)
    stuck = [n for n, p in adapter_tensors(model).items() if torch.equal(p, before[n])]
    assert before and not stuck, f"{len(stuck)} of {len(before)} adapter tensors did not train: {stuck[:3]}"


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_step_after_an_evaluation_pass_updates_every_adapter(tmp_path, bits):
    need_bitsandbytes()
    folder = hf_folder(tmp_path, "llama", hidden_size=64, intermediate_size=128)
    base, recipe = load_base(recipe_for(folder, finetune={"method": "qlora", "quant_bits": bits, "lora_r": 4},
                                        train={"block_size": 32}), "cpu")
    assert is_quantized(base.model)
    model = apply_method(base.model, recipe.finetune)
    assert len({n.split(".lora_")[0] for n in adapter_tensors(model)}) == 7 * 2
    step_after_an_evaluation_pass(model, base.tokenizer)
    merged = merge_adapter(model)
    assert not is_quantized(merged) and type(merged.hf).__name__ == "LlamaForCausalLM"


def test_qlora_on_a_fledge_run_trains_and_merges_into_a_plain_gpt(fledge_run, tmp_path):
    need_bitsandbytes()
    recipe = recipe_for(fledge_run, finetune={"method": "qlora", "lora_r": 4}, train={"block_size": 32})
    base, recipe = load_base(recipe, "cpu")
    assert base.kind == "fledge" and isinstance(base.model, TransformersLM) and is_quantized(base.model)
    assert recipe.model.arch == "llama"
    tok = base.tokenizer
    new = add_template_tokens(tok, get_template("chatml", tok))
    model = apply_method(base.model, recipe.finetune, new_tokens=new, tokenizer=tok)
    step_after_an_evaluation_pass(model, tok)
    save_adapter(model, tmp_path / "adapter")
    merged = merge_adapter(model)
    assert type(merged) is GPT and merged.config.vocab_size == len(tok)
    unquantized, _ = load_base(recipe_for(fledge_run, finetune={"method": "lora"}, train={"block_size": 32}), "cpu")
    reference = load_adapter(unquantized.model, tmp_path / "adapter").eval()
    ids = batch(tok, 4, tok.convert_tokens_to_ids(new))
    torch.testing.assert_close(logits(merged.eval(), ids), logits(reference, ids), atol=1e-5, rtol=1e-4)


def test_qlora_compute_dtype_follows_the_hardware():
    from fledge.env import cpu_supports_bf16
    assert qlora_compute_dtype("cpu") == (torch.bfloat16 if cpu_supports_bf16() else torch.float32)


def test_lora_on_a_fledge_run_merges_into_a_gpt_the_base_class_loads(fledge_run):
    base, recipe = load_base(recipe_for(fledge_run, finetune={"method": "lora", "lora_r": 4},
                                        train={"block_size": 32}), "cpu")
    config = base.model.config
    model = apply_method(base.model, recipe.finetune)
    train_steps(model, base.tokenizer, 2)
    merged = merge_adapter(model)
    assert type(merged) is GPT and all(type(m) is nn.Linear for m in merged.modules() if isinstance(m, nn.Linear))
    fresh = GPT(config)
    fresh.load_state_dict(merged.state_dict())


def test_a_fine_tune_of_a_fledge_run_with_new_tokens_loads_again_as_a_base_and_for_inference(fledge_run, tmp_path):
    """What the checkpoint writer does for a fine-tune: the merged weights, the transformers files, and
    the fine-tune's tokenizer.json (with the template tokens) as the checkpoint's tokenizer file."""
    from fledge.export.hf import write_transformers_files
    from fledge.model.bases import model_hf_config
    from fledge.sample import load_for_inference
    from fledge.train.checkpoint import save_checkpoint
    base, recipe = load_base(recipe_for(fledge_run, finetune={"method": "lora", "lora_r": 4},
                                        train={"block_size": 32}), "cpu")
    tok = base.tokenizer
    template = get_template("chatml", tok)
    new_ids = tok.convert_tokens_to_ids(add_template_tokens(tok, template))
    model = apply_method(base.model, recipe.finetune, new_tokens=tok.convert_ids_to_tokens(new_ids), tokenizer=tok)
    train_steps(model, tok, 2, new_ids)
    merged = merge_adapter(model).eval()
    files = lambda folder: write_transformers_files(folder, hf_config=model_hf_config(merged), tokenizer=tok,
                                                    template=template)
    files(tmp_path / "staging")
    optimizer = torch.optim.AdamW(merged.parameters())
    save_checkpoint(tmp_path / "fine-tune", 2, merged, optimizer, {"step": 2, "vocab_size": len(tok)},
                    recipe.to_yaml(), tmp_path / "staging" / "tokenizer.json", None, 2, extra_files=files)
    again, again_recipe = load_base(recipe_for(tmp_path / "fine-tune", train={"block_size": 32}), "cpu")
    assert isinstance(again.model, GPT) and again.chat_template.name == "chatml"
    assert again.tokenizer.convert_tokens_to_ids("<|im_end|>") == tok.convert_tokens_to_ids("<|im_end|>")
    assert again_recipe.model.dim == recipe.model.dim
    ids = batch(tok, 7, new_ids)
    torch.testing.assert_close(logits(again.model.eval(), ids), logits(merged, ids), atol=0, rtol=0)
    inference, _, _ = load_for_inference(tmp_path / "fine-tune")
    torch.testing.assert_close(logits(inference, ids), logits(merged, ids), atol=0, rtol=0)
