"""examples/recurrent.py, the constant-state recurrent model of user 2's comparison: it meets
fledge's forward contract (mean, sum and per-token losses, -100 ignored, packed rows as if alone,
causal so right padding changes nothing), its generate equals recomputing from scratch, the
state it carries between tokens stays the same size after 10, 100 and 1,000 tokens while a GPT's
KV cache grows, and the recipes' comments tell the truth about sizes."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO

# examples/ is not part of the installed package: fledge imports it from the repository root, as a
# user's own module is imported from their working directory.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from examples.recurrent import RecurrentLM, build  # noqa: E402
from fledge.evaluate.loss import takes_reduction  # noqa: E402
from fledge.model.gpt import GPT, GPTConfig, KVCache  # noqa: E402
from fledge.model.registry import build_model  # noqa: E402
from fledge.recipe import load_recipe  # noqa: E402

VOCAB = 64


def tiny(**overrides) -> RecurrentLM:
    torch.manual_seed(0)
    return RecurrentLM(**(dict(vocab_size=VOCAB, n_layers=2, dim=32) | overrides)).eval()


def test_forward_contract_reductions_and_ignored_labels():
    model = tiny()
    assert takes_reduction(model)                  # the loop and eval call it with reduction="sum"
    idx = torch.randint(0, VOCAB, (3, 11))
    labels = torch.randint(0, VOCAB, (3, 11))
    labels[0, :4] = -100
    labels[2, 7:] = -100
    with torch.no_grad():
        logits, mean = model(idx, labels)
        _, total = model(idx, labels, reduction="sum")
        _, each = model(idx, labels, reduction="none")
        bare, none = model(idx)
    assert logits.shape == (3, 11, VOCAB) and none is None and torch.equal(bare, logits)
    kept = labels != -100
    expected = F.cross_entropy(logits[kept], labels[kept], reduction="sum")
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(mean, expected / kept.sum())
    assert each.shape == (3, 11) and torch.all(each[~kept] == 0) and torch.all(each[kept] > 0)
    torch.testing.assert_close(each.sum(), total)


def test_causal_so_right_padding_changes_no_earlier_logit():
    model = tiny()
    idx = torch.randint(0, VOCAB, (2, 12))
    padded = idx.clone()
    padded[:, 8:] = 0
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0][:, :8], model(padded)[0][:, :8], rtol=0, atol=0)


def test_packed_rows_compute_what_each_computes_alone():
    model = tiny()
    first, second = torch.randint(0, VOCAB, (1, 5)), torch.randint(0, VOCAB, (1, 7))
    packed = torch.cat([first, second], dim=1)
    documents = torch.tensor([[0] * 5 + [1] * 7])
    positions = torch.tensor([list(range(5)) + list(range(7))])
    with torch.no_grad():
        together, _ = model(packed, document_ids=documents, position_ids=positions)
        torch.testing.assert_close(together[:, :5], model(first)[0])
        torch.testing.assert_close(together[:, 5:], model(second)[0])
        assert (model(packed)[0][:, 5:] - together[:, 5:]).abs().max() > 1e-4   # without ids the state carries over


def test_greedy_generate_equals_recomputing_from_scratch():
    model = tiny()
    prompt = torch.randint(0, VOCAB, (2, 5))
    generated = torch.cat(list(model.generate(prompt, 25, temperature=0.0)), dim=1)          # (2, 25)
    assert generated.shape == (2, 25)
    sequence = prompt
    with torch.no_grad():
        for t in range(25):
            logits, _ = model(sequence)                   # the whole text again, no state carried
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            assert torch.equal(nxt, generated[:, t:t + 1]), f"token {t} differs"
            sequence = torch.cat([sequence, nxt], dim=1)


def test_generate_stops_at_eos_and_is_seeded():
    model = tiny()
    idx = torch.randint(0, VOCAB, (2, 4))

    def sampled(seed):
        g = torch.Generator().manual_seed(seed)
        return torch.cat(list(model.generate(idx, 20, temperature=1.0, top_k=10, generator=g)), dim=1)

    assert torch.equal(sampled(1), sampled(1))
    greedy = torch.cat(list(model.generate(idx, 30, temperature=0.0)), dim=1)
    eos = int(greedy[0, 2])
    first = int((greedy[0] == eos).nonzero()[0])
    alone = torch.cat(list(model.generate(idx[:1], 30, temperature=0.0, eos_id=eos)), dim=1)
    assert torch.equal(alone, greedy[:1, :first + 1])        # stops right after eos
    both = torch.cat(list(model.generate(idx, 30, temperature=0.0, eos_id=eos)), dim=1)
    assert torch.all(both[0, first:] == eos)                 # a finished row yields eos while the other goes on
    assert model.training is False


def carried_by_generate(model, owner, method: str, measure, prompt, new_tokens: int, calls: list[int]):
    """What `measure` says of the results of the `calls`-th calls to `owner.method` (0: the first)
    while `model` generates `new_tokens` tokens after `prompt`."""
    seen, original = [], getattr(owner, method)

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        seen.append(measure(out))
        return out

    setattr(owner, method, spy)
    try:
        for _ in model.generate(prompt, new_tokens, temperature=0.0):
            pass
    finally:
        setattr(owner, method, original)
    return [seen[n] for n in calls]


def sizes(tensors) -> tuple[int, int]:
    return sum(t.numel() for t in tensors), sum(t.numel() * t.element_size() for t in tensors)


def test_inference_memory_stays_flat_while_a_kv_cache_grows():
    lengths = [10, 100, 1000]
    prompt = torch.randint(0, VOCAB, (1, 4))
    model = tiny(n_layers=2, dim=32)
    # advance's first call reads the prompt; its n-th after that reads the n-th generated token
    recurrent = carried_by_generate(model, model, "advance", lambda out: sizes([out[1]]), prompt, 1000, lengths)
    numbers, nbytes = model.state_size()
    assert numbers == 2 * 32 and nbytes == 4 * numbers
    assert recurrent == [(numbers, nbytes)] * 3                      # the same state after 10, 100 and 1,000 tokens

    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=VOCAB, n_layers=2, n_heads=4, dim=32, max_seq_len=1024 + 8)).eval()
    # Each layer's update returns the keys and values attention reads: all the cache holds so far.
    # Two layers: calls 2n and 2n + 1 follow the n-th generated token; the last layer's are measured.
    per_layer = carried_by_generate(gpt, KVCache, "update", sizes, prompt, 1000, [2 * n + 1 for n in lengths])
    per_token = 2 * 32                                               # a key and a value, per layer
    assert [numel for numel, _ in per_layer] == [per_token * (len(prompt[0]) + n) for n in lengths]
    assert per_layer[2][1] > 50 * per_layer[0][1]                    # grows with the text; the state does not


def test_state_size_and_parameter_counts_of_the_recipes():
    recurrent_recipe = load_recipe(REPO / "recipes/compare/gutenberg-recurrent.yaml")
    transformer_recipe = load_recipe(REPO / "recipes/compare/gutenberg-transformer.yaml")
    recurrent = build_model(recurrent_recipe.model, 4096)
    transformer = build_model(transformer_recipe.model, 4096)
    assert isinstance(recurrent, RecurrentLM)
    assert recurrent.state_size() == (576, 2304)                     # user 2's state, as the recipe says
    assert recurrent.num_parameters() == transformer.num_parameters() == 3_171_744
    assert recurrent.num_parameters(non_embedding=True) == 3_171_744 - 4096 * 288
    # The transformer's cache per token, as its recipe says: a key and a value per layer, 1,152 numbers.
    assert 2 * transformer.config.n_layers * transformer.config.dim == 1152


def test_flops_per_token_counts_every_matmul_weight_and_the_head():
    model = tiny()
    dim, hidden = 32, 96
    per_layer = 3 * dim * dim + 3 * dim * hidden
    assert model.flops_per_token(128) == 6 * (2 * per_layer + VOCAB * dim)
    assert build(load_recipe(None, ["model.n_layers=1", "model.dim=16"]).model, VOCAB).state_size() == (16, 64)
