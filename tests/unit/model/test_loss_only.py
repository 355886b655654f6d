"""`logits=False`: the output head runs only where there is a target, and the loss and every
gradient are those of the full-logits forward, for fledge's GPT (plain and under LoRA, as the
training step calls it through `summed_loss`) and for transformers models behind TransformersLM."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from fledge.evaluate.loss import summed_loss
from fledge.model.adapters import apply_method
from fledge.model.bases import TransformersLM
from fledge.model.gpt import GPT, GPTConfig
from fledge.recipe import FinetuneConfig
from fledge.train.batches import Batch


def batch() -> Batch:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 300, (2, 24), generator=g)
    labels = ids.roll(-1, 1)
    labels[:, :14] = -100                   # prompts
    labels[1, 19:] = -100                   # padding of a shorter row
    documents = torch.tensor([[0] * 10 + [1] * 14, [0] * 24])
    positions = torch.cat([torch.arange(10), torch.arange(14)]).repeat(2, 1)
    positions[1] = torch.arange(24)
    return Batch(ids, labels, positions, documents)


def grads(model, loss) -> list[torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params)


def check_same(model) -> None:
    b = batch()
    full = model(**b.model_inputs(), reduction="sum")[1]
    logits, only = model(**b.model_inputs(), reduction="sum", logits=False)
    assert logits is None
    torch.testing.assert_close(only, full, rtol=1e-6, atol=1e-5)
    for a, c in zip(grads(model, full), grads(model, only)):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)


def test_gpt_loss_and_gradients_equal_the_full_head():
    torch.manual_seed(0)
    check_same(GPT(GPTConfig(vocab_size=300, n_layers=2, n_heads=2, dim=32, max_seq_len=64)))


def test_mean_and_none_reductions():
    torch.manual_seed(0)
    model, b = GPT(GPTConfig(vocab_size=300, n_layers=1, n_heads=2, dim=32, max_seq_len=64)), batch()
    torch.testing.assert_close(model(b.input_ids, b.labels, logits=False)[1], model(b.input_ids, b.labels)[1])
    logits, per_token = model(b.input_ids, b.labels, reduction="none", logits=False)    # needs every position
    assert logits.shape == (2, 24, 300) and per_token.shape == (2, 24)


def test_summed_loss_under_lora_skips_the_head_and_trains_the_same():
    torch.manual_seed(0)
    model = apply_method(GPT(GPTConfig(vocab_size=300, n_layers=2, n_heads=2, dim=32, max_seq_len=64)),
                         FinetuneConfig(method="lora", lora_r=4))
    b = batch()
    calls = []
    head = model.get_base_model().lm_head
    hook = head.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[:-1].numel()))
    try:
        ours = summed_loss(model, b, keyword=True)
    finally:
        hook.remove()
    assert calls == [b.n_targets]                                   # the head saw the targets' positions only
    full = model(**b.model_inputs(), reduction="sum")[1]
    torch.testing.assert_close(ours, full, rtol=1e-6, atol=1e-5)
    for a, c in zip(grads(model, full), grads(model, ours)):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_transformers_models_keep_only_target_columns(family):
    kw = dict(vocab_size=300, n_embd=32, n_layer=2, n_head=2) if family == "gpt2" else \
        dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=2)
    torch.manual_seed(0)
    model = TransformersLM(AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **kw)).eval())
    assert model._keeps_logits()
    check_same(model)
