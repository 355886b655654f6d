"""The loss of a step is per target token across its micro-batches: with labels masked at random
(answer-only training) accumulation still equals one large batch, gradient for gradient, and the
gradient is exactly that of (sum of target losses) / (targets). Validation loss is weighted by
tokens, not by batches. An own architecture with forward(idx, targets) returning a mean trains
on the same per-token loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fledge.env import pick_precision
from fledge.evaluate.loss import evaluate_loss, summed_loss, takes_reduction
from fledge.model.registry import build_model
from fledge.tokenizer import find_tokenizer_file, load_tokenizer
from fledge.train import train
from fledge.train.batches import IGNORE, Batch
from tiny_runs import CUSTOM_ARCH, capture_gradients, changed, make_recipe, masked_source, weights


def test_accumulation_equals_one_large_batch_with_masked_labels(tmp_path, monkeypatch):
    big = make_recipe(tmp_path, "big", batch_size=8, grad_accum=1, max_steps=1, warmup_steps=1, eval_every=0)
    acc = make_recipe(tmp_path, "acc", batch_size=2, grad_accum=4, max_steps=1, warmup_steps=1, eval_every=0)
    with monkeypatch.context() as patch:
        grads_big = capture_gradients(patch)
        big_run = train(big, progress=False, source=masked_source(big))
    with monkeypatch.context() as patch:
        grads_acc = capture_gradients(patch)
        acc_run = train(acc, progress=False, source=masked_source(acc))

    # The reference: the same initial model (seeded as the loop seeds it), all 8 rows at once.
    batch = masked_source(big).train_batch(0, 0, 0, 1)
    assert 0 < batch.n_targets < 0.8 * batch.labels.numel()          # a good share is masked
    tokenizer = load_tokenizer(find_tokenizer_file(big.prepared_path))
    torch.manual_seed(big.train.seed)
    model = build_model(big.model, tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id)
    loss = model(**batch.model_inputs(), reduction="sum")[1] / batch.n_targets
    loss.backward()
    reference = {str(i): p.grad for i, p in enumerate(model.parameters())}

    assert grads_big.keys() == grads_acc.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(grads_acc[key], reference[key], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(grads_big[key], reference[key], atol=1e-6, rtol=1e-5)
    wa, wb = weights(big_run.last_checkpoint), weights(acc_run.last_checkpoint)
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=1e-6, rtol=0)


def test_micro_batches_hold_different_target_counts(tmp_path):
    """The check above means something: a mean per micro-batch would weight these unequally."""
    recipe = make_recipe(tmp_path, "counts", batch_size=2, grad_accum=4)
    source = masked_source(recipe)
    counts = [source.train_batch(0, micro, 0, 1).n_targets for micro in range(4)]
    assert max(counts) > 1.5 * min(counts), counts


def test_validation_loss_is_weighted_by_target_tokens(tmp_path):
    recipe = make_recipe(tmp_path, "val", batch_size=2, eval_batches=4)
    batches = masked_source(recipe).val_batches(0, 1)
    torch.manual_seed(0)
    model = build_model(recipe.model, 64).eval()
    precision = pick_precision("fp32", torch.device("cpu"))
    val = evaluate_loss(model, batches, torch.device("cpu"), precision)
    with torch.no_grad():
        per_token = torch.cat([F.cross_entropy(model(b.input_ids)[0].flatten(0, 1), b.labels.flatten(),
                                               ignore_index=IGNORE, reduction="none")[b.labels.flatten() != IGNORE]
                               for b in batches])
        per_batch = [model(**b.model_inputs())[1] for b in batches]
    assert val == pytest.approx(float(per_token.mean()), rel=1e-6)
    assert val != pytest.approx(float(torch.stack(per_batch).mean()), rel=1e-4)     # not a mean of means


def test_an_own_forward_that_returns_a_mean_gives_the_summed_loss(tmp_path, monkeypatch):
    (tmp_path / "my_mean_bigram.py").write_text(CUSTOM_ARCH)
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = make_recipe(tmp_path, "mean", model={"arch": "my_mean_bigram:build"})
    model = build_model(recipe.model, 64, allow_code=True)
    assert not takes_reduction(model) and takes_reduction(build_model(changed(recipe, model={"arch": "llama"}).model,
                                                                      64))
    batch = masked_source(recipe).train_batch(0, 0, 0, 1)
    logits = model.table(batch.input_ids)
    expected = F.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(), ignore_index=IGNORE, reduction="sum")
    torch.testing.assert_close(summed_loss(model, batch, keyword=False), expected)
    packed = Batch(batch.input_ids, batch.labels, position_ids=torch.zeros_like(batch.input_ids))
    with pytest.raises(Exception, match="takes no position_ids or document_ids"):
        summed_loss(model, packed, keyword=False)
