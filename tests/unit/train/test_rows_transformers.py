"""Packed row batches through a transformers LlamaForCausalLM: what keeps rows apart, and what silently doesn't.

    OMP_NUM_THREADS=1 pytest tests/unit/train/test_rows_transformers.py -q

Measured with transformers 5.24 on CPU and pinned here, because each trap changes results without
an error (the model here is built from a config: no download):

- transformers finds packed rows from `position_ids` that restart at 0 only when no attention mask
  is passed AND no cache is made. `LlamaConfig.use_cache` defaults to True, so a plain forward
  makes a cache and rows attend to each other: pass `use_cache=False` (or set it in the config).
- Any 2D `attention_mask`, even all ones, turns that detection off.
- A 4D mask is used as given: an additive float mask (0 / finfo.min from `document_ids`) works on
  eager and sdpa; a boolean 4D mask works on sdpa but masks nothing on eager.
- Our labels are already shifted; transformers' `labels=` shifts again. Pass ours as
  `shift_labels=` (with any non-None `labels=`) and its loss is ours.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fledge.train.batches import IGNORE

from test_rows import build, case_sources, make_recipe, many_rows, tokenizer_file, tokenizer_for  # noqa: F401

transformers = pytest.importorskip("transformers")

IMPLEMENTATIONS = ("eager", "sdpa")


def llama(vocab_size: int, implementation: str, **config):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **config)
    return transformers.LlamaForCausalLM._from_config(cfg, attn_implementation=implementation).eval()


@pytest.fixture(scope="module")
def packed(tmp_path_factory, tokenizer_file):  # noqa: F811
    tmp = tmp_path_factory.mktemp("rows")
    tok = tokenizer_for(tokenizer_file, "chatml")
    batches = build(make_recipe(case_sources(tmp) + [str(many_rows(tmp))], train={"block_size": 160}), tok, "chatml")
    batch = batches.train_batch(0, 0, 0, 1)
    assert batch.document_ids.max() > 0
    return len(tok), batch


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE,
                           reduction="none").view(labels.shape)


def leak(model, batch, **kwargs) -> float:
    """Largest difference between a row's per-token losses in the packed batch and alone."""
    with torch.no_grad():
        packed = token_losses(model(input_ids=batch.input_ids, **kwargs).logits, batch.labels)
        worst = 0.0
        for b in range(batch.input_ids.shape[0]):
            docs = batch.document_ids[b]
            for d in docs.unique().tolist():
                if d >= 0:
                    where = docs == d
                    alone = token_losses(model(input_ids=batch.input_ids[b][where][None], use_cache=False).logits,
                                         batch.labels[b][where][None])[0]
                    worst = max(worst, float((packed[b][where] - alone).abs().max()))
    return worst


def additive_mask(document_ids: torch.Tensor) -> torch.Tensor:
    T = document_ids.shape[1]
    allowed = torch.ones(T, T, dtype=torch.bool).tril() & (document_ids[:, :, None] == document_ids[:, None, :])
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_packed_rows_stay_apart_with_position_ids_and_no_cache(packed, implementation):
    vocab, batch = packed
    model = llama(vocab, implementation)
    assert model.config.use_cache is True   # the default that turns packed detection off
    assert leak(model, batch, position_ids=batch.position_ids, use_cache=False) < 1e-4
    assert leak(llama(vocab, implementation, use_cache=False), batch, position_ids=batch.position_ids) < 1e-4
    assert leak(model, batch, attention_mask=additive_mask(batch.document_ids), position_ids=batch.position_ids) < 1e-4


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_the_silent_traps_let_packed_rows_see_each_other(packed, implementation):
    vocab, batch = packed
    model = llama(vocab, implementation)
    assert leak(model, batch, position_ids=batch.position_ids) > 1e-2                    # config.use_cache=True
    ones = torch.ones_like(batch.input_ids)
    assert leak(model, batch, position_ids=batch.position_ids, attention_mask=ones, use_cache=False) > 1e-2
    T = batch.input_ids.shape[1]
    allowed = (torch.ones(T, T, dtype=torch.bool).tril()
               & (batch.document_ids[:, :, None] == batch.document_ids[:, None, :]))[:, None]
    boolean = leak(model, batch, position_ids=batch.position_ids, attention_mask=allowed, use_cache=False)
    assert boolean > 1e-2 if implementation == "eager" else boolean < 1e-4


def test_transformers_loss_matches_ours_through_shift_labels(packed):
    vocab, batch = packed
    model = llama(vocab, "sdpa", use_cache=False)
    with torch.no_grad():
        out = model(input_ids=batch.input_ids, position_ids=batch.position_ids, labels=batch.labels,
                    shift_labels=batch.labels)
        ours = token_losses(out.logits, batch.labels).sum() / batch.n_targets
        shifted_again = model(input_ids=batch.input_ids, position_ids=batch.position_ids, labels=batch.labels).loss
    torch.testing.assert_close(out.loss, ours, atol=1e-5, rtol=1e-5)
    assert abs(float(shifted_again - ours)) > 1e-2   # labels= alone shifts our shifted labels once more
