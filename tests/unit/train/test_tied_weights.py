"""Tied weights are tensors that share memory, whatever they are called: an own architecture that
ties its head to its embedding under other names trains, checkpoints, resumes exactly and loads
for inference tied; fledge's llama checkpoints still load in transformers."""

from __future__ import annotations

import json

import safetensors.torch
import torch
import torch.nn as nn
from safetensors import safe_open

from fledge.sample import load_for_inference
from fledge.train import checkpoint as ckpt
from fledge.train import train
from tiny_runs import assert_same_checkpoint, interrupt_optimizer_step, losses, make_recipe, weights

TIED_ARCH = '''
import torch
import torch.nn as nn
import torch.nn.functional as F


class TiedBigram(nn.Module):
    """Embedding, dropout, a mixing layer, and a head that is the embedding's weight."""

    def __init__(self, vocab_size, dim=16):
        super().__init__()
        self.emb = nn.Embedding(vocab_size, dim)
        self.drop = nn.Dropout(0.1)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx, targets=None):
        logits = self.head(torch.tanh(self.mix(self.drop(self.emb(idx)))))
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss


def build(config, vocab_size):
    return TiedBigram(vocab_size)
'''


def test_own_tied_architecture_saves_resumes_exactly_and_loads_tied(tmp_path, monkeypatch):
    (tmp_path / "my_tied.py").write_text(TIED_ARCH)
    monkeypatch.syspath_prepend(str(tmp_path))
    model = {"arch": "my_tied:build"}
    whole = train(make_recipe(tmp_path, "whole", model, lr=0.05), progress=False)
    stored = weights(whole.last_checkpoint)
    assert "emb.weight" in stored and "head.weight" not in stored
    with safe_open(str(whole.last_checkpoint / "model.safetensors"), "pt") as f:
        assert json.loads(f.metadata()[ckpt.ALIASES_KEY]) == {"head.weight": "emb.weight"}

    recipe = make_recipe(tmp_path, "cut", model, lr=0.05)
    with monkeypatch.context() as patch:
        interrupt_optimizer_step(patch, at_call=6)
        assert train(recipe, progress=False).step == 6
    resumed = train(recipe, resume=True, progress=False)
    assert losses(resumed.run_dir) == losses(whole.run_dir)
    assert_same_checkpoint(resumed.last_checkpoint, whole.last_checkpoint)

    loaded, _, _ = load_for_inference(resumed.run_dir, allow_code=True)
    assert loaded.head.weight is loaded.emb.weight
    assert torch.equal(loaded.emb.weight, stored["emb.weight"])


def test_overlapping_views_that_are_not_aliases_are_stored_as_copies():
    class Views(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 4))
            self.register_buffer("row", self.weight.data[1])      # same memory, another shape

    tensors, aliases = ckpt.weights_to_save(Views())
    assert aliases == {} and torch.equal(tensors["row"], tensors["weight"][1])
    safetensors.torch.save(tensors)                                 # no "Some tensors share memory"


def test_transformers_loads_a_fledge_llama_checkpoint(tmp_path):
    from transformers import LlamaForCausalLM
    result = train(make_recipe(tmp_path, "hf", max_steps=4), progress=False)
    assert "lm_head.weight" not in weights(result.last_checkpoint)          # the tied head, omitted
    theirs = LlamaForCausalLM.from_pretrained(result.last_checkpoint).eval()
    ours, _, _ = load_for_inference(result.last_checkpoint)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    idx = torch.randint(0, ours.config.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], theirs(input_ids=idx).logits, atol=1e-5, rtol=1e-4)
