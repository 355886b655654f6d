"""LoRA through peft on fledge's decoder: every adapter of every targeted projection trains, only
adapter weights change, and merging the adapters into the weights gives the same logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

peft = pytest.importorskip("peft")

from fledge.model.gpt import GPT, GPTConfig  # noqa: E402
from fledge.train.checkpoint import model_state  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = {
    "tied": dict(),
    "untied-gqa": dict(tie_embeddings=False, n_kv_heads=2),
}


def tiny_lora(**overrides):
    torch.manual_seed(0)
    config = dict(vocab_size=64, n_layers=2, n_heads=4, dim=32, max_seq_len=64) | overrides
    model = GPT(GPTConfig(**config))
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0)
    return peft.get_peft_model(model, config)


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 64, (2, 16), generator=g), torch.randint(0, 64, (2, 16), generator=g)


def lora_tensors(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


def train_steps(model, steps: int) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        x, y = batch(step)
        _, loss = model(input_ids=x, labels=y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_adapter_of_every_target_gets_a_gradient(variant):
    model = tiny_lora(**VARIANTS[variant])
    adapters = lora_tensors(model)
    wrapped = {n.split(".lora_")[0] for n in adapters}
    assert len(wrapped) == len(TARGETS) * model.config.n_layers
    assert set(adapters) == {n for n, p in model.named_parameters() if p.requires_grad}
    x, y = batch()
    model(input_ids=x, labels=y)[1].backward()
    # B starts at zero, so A has no gradient yet; every B has one.
    for name, p in adapters.items():
        if "lora_B" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    model.zero_grad()
    train_steps(model, 1)
    model(input_ids=x, labels=y)[1].backward()
    for name, p in adapters.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("variant", VARIANTS)
def test_only_adapter_weights_change(variant):
    model = tiny_lora(**VARIANTS[variant])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_steps(model, 2)
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert not torch.equal(p, before[name]), f"{name} did not train"
        else:
            assert torch.equal(p, before[name]), f"{name} changed"


@pytest.mark.parametrize("variant", VARIANTS)
def test_merged_equals_unmerged(variant):
    model = tiny_lora(**VARIANTS[variant])
    train_steps(model, 2)
    model.eval()
    x, _ = batch(5)
    with torch.no_grad():
        unmerged, _ = model(x)
        with model.disable_adapter():
            base, _ = model(x)
        merged_model = model.merge_and_unload()
        merged, _ = merged_model(x)
    assert not torch.allclose(unmerged, base, atol=1e-4)      # the adapters do change the output
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-4)
    assert isinstance(merged_model, GPT)
    assert all(type(m) is nn.Linear for m in merged_model.modules() if isinstance(m, nn.Linear))
    fresh = GPT(merged_model.config)
    assert set(model_state(merged_model)) == set(model_state(fresh))   # transformers-compatible names again
