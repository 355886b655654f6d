"""verify_gguf: a GGUF file of a briefly trained fledge GPT passes in llama.cpp (f32 logits within 5e-3
of transformers', 100% teacher-forced agreement, tokenization and the two-turn chat prompt equal to
fledge's), quantized files report their perplexity against f16, and a file that is not the model
(other weights, another chat template, a file llama.cpp cannot read) fails with the reason. The
measures themselves are checked on made-up logits."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from fledge.errors import ExportError
from fledge.export.verify import (LOGIT_TOLERANCE, Verification, compare_logits, judge_perplexity,
                                  torch_reference, verify_gguf)

sys.path.insert(0, str(Path(__file__).parent))          # tiny_exports, shared by the export tests

from tiny_exports import CORPUS, HELD_OUT, fledge_gpt  # noqa: E402

TEXTS = [HELD_OUT, CORPUS[-300:]]


# --- the measures, on made-up logits ---------------------------------------------------------------

def test_logits_within_tolerance_and_same_argmax_pass_and_a_flipped_token_fails():
    rng = np.random.default_rng(0)
    ids = [[0, 3, 1, 2, 4]]
    torch_logits = [rng.normal(size=(5, 6)).astype(np.float32) * 3]
    close = [torch_logits[0] + 1e-3]
    check = Verification(Path("m-f32.gguf"), "f32", tolerance=LOGIT_TOLERANCE["f32"])
    compare_logits(check, close, torch_logits, ids)
    assert check.ok and check.argmax_agreement == 1.0 and check.max_logit_diff == pytest.approx(1e-3, rel=1e-3)
    assert check.perplexity == pytest.approx(check.torch_perplexity, rel=1e-6)

    flipped = [torch_logits[0].copy()]
    row = flipped[0][2]
    row[np.argsort(row)[-2]] = row.max() + 1.0          # another token wins at position 2, by a lot
    check = Verification(Path("m-f32.gguf"), "f32", tolerance=LOGIT_TOLERANCE["f32"])
    compare_logits(check, flipped, torch_logits, ids)
    assert check.argmax_agreement == pytest.approx(4 / 5)
    assert any("argmax agreement is 80.00%" in p for p in check.problems)
    assert any("logits differ from PyTorch" in p for p in check.problems)


def test_a_near_tie_at_the_files_precision_is_not_a_disagreement():
    logits = np.zeros((3, 4), dtype=np.float32)
    logits[:, 1] = 5.0
    logits[1, 2] = 5.0 - 0.01                           # PyTorch: token 1 by 0.01
    ours = logits.copy()
    ours[1, 2] = 5.0 + 0.01                             # f16: token 2 by 0.01, within the f16 tolerance
    check = Verification(Path("m-f16.gguf"), "f16", tolerance=LOGIT_TOLERANCE["f16"])
    compare_logits(check, [ours], [logits], [[0, 1, 1]])
    assert check.ok and check.ties == 1 and check.argmax_agreement == pytest.approx(2 / 3)


def test_perplexity_and_log_probs_count_only_scored_positions():
    rng = np.random.default_rng(1)
    ids = [[0, 3, 1, 2, 4, 5]]
    theirs = [rng.normal(size=(6, 6)).astype(np.float32)]
    ours = [theirs[0].copy()]
    ours[0][1, (int(theirs[0][1].argmax()) + 1) % 6] += 30  # position 1 predicts another token
    scored = [np.array([True, False, True, True, True])]  # ... and is not scored (a prompt token)
    check = Verification(Path("m-q8_0.gguf"), "q8_0")
    compare_logits(check, ours, theirs, ids, scored)
    assert check.scored == 4 and check.logprob_diff == pytest.approx(0.0, abs=1e-6)
    assert check.perplexity == pytest.approx(check.torch_perplexity, rel=1e-6)
    assert check.max_logit_diff == pytest.approx(30.0) and check.argmax_agreement < 1.0   # compared everywhere
    check = Verification(Path("m-q8_0.gguf"), "q8_0")
    compare_logits(check, ours, theirs, ids)
    assert check.scored == 5 and check.logprob_diff > 0.1


@pytest.mark.parametrize("quant,ratio,warned", [("q8_0", 1.009, False), ("q8_0", 1.011, True),
                                                ("q4_k_m", 1.049, False), ("q4_k_m", 1.051, True),
                                                ("f16", 1.2, False)])
def test_perplexity_warnings_follow_the_issues_thresholds(quant, ratio, warned):
    check = Verification(Path(f"m-{quant}.gguf"), quant, perplexity=10.0 * ratio, torch_perplexity=9.0,
                         f16_perplexity=10.0)
    judge_perplexity(check)
    assert bool(check.warnings) == warned and check.ok
    if warned:
        assert f"{quant} perplexity is {ratio - 1:.1%} above f16's" in check.warnings[0]


# --- real files in llama.cpp -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(folder, PyTorch reference on TEXTS, gguf module's write_gguf) for a trained fledge GPT."""
    pytest.importorskip("llama_cpp")
    from fledge.export.gguf import write_gguf
    root = tmp_path_factory.mktemp("verify")
    folder = fledge_gpt(root)
    return folder, torch_reference(folder, TEXTS), write_gguf


def test_f32_and_f16_files_behave_like_the_model(model, tmp_path):
    folder, reference, write_gguf = model
    for quant in ("f32", "f16"):
        path = write_gguf(folder, tmp_path / f"m-{quant}.gguf", quant, say=lambda _: None).path
        check = verify_gguf(path, folder, TEXTS, quant=quant, pytorch=reference)
        assert check.ok, check.problems
        assert check.first_logit_diff < 5e-3 and check.max_logit_diff < LOGIT_TOLERANCE[quant]
        assert check.argmax_agreement == 1.0 and check.positions == sum(map(len, reference.ids))
        assert check.perplexity_ratio == pytest.approx(1.0, abs=1e-3)
        assert check.tokenization_samples >= 7 + len(TEXTS)
        assert check.chat["Jinja (llama-cpp-python, llama-server --jinja)"] == "equal"
        assert check.chat["llama.cpp built-in (llama_chat_apply_template)"] == "equal"     # chatml is known to it
    assert check.f16_perplexity == check.perplexity


def test_quantized_files_report_their_perplexity_against_f16(model, tmp_path):
    folder, reference, write_gguf = model
    quiet = dict(say=lambda _: None)
    f16 = write_gguf(folder, tmp_path / "m-f16.gguf", "f16", **quiet)
    for quant in ("q8_0", "q4_k_m"):
        path = write_gguf(folder, tmp_path / f"m-{quant}.gguf", quant, **quiet).path
        check = verify_gguf(path, folder, TEXTS, quant=quant, reference=f16, pytorch=reference)
        assert check.ok and check.tolerance is None
        assert check.f16_perplexity and check.f16_perplexity != check.perplexity
        assert 0.9 < check.perplexity_ratio < 1.1 and check.argmax_agreement > 0.9
        assert check.logprob_diff > 0
        line = next(line for line in check.lines() if "ratio vs f16" in line)
        assert line.startswith(f"{quant}: perplexity")


def test_a_file_with_other_weights_fails_on_its_logits(model, tmp_path):
    folder, reference, write_gguf = model
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    weights = load_file(other / "model.safetensors")
    name = next(n for n in weights if n.endswith("layers.1.mlp.down_proj.weight"))
    weights[name] = weights[name] * 1.5
    save_file(weights, str(other / "model.safetensors"), metadata={"format": "pt"})
    path = write_gguf(other, tmp_path / "m-f32.gguf", "f32", say=lambda _: None).path
    check = verify_gguf(path, folder, TEXTS, quant="f32", pytorch=reference)
    assert not check.ok and check.problems[0].startswith("logits differ from PyTorch by up to")


def test_a_file_with_another_chat_template_fails_on_the_prompt(model, tmp_path):
    folder, reference, write_gguf = model
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    for name in ("chat_template.jinja", "tokenizer_config.json"):
        text = (other / name).read_text()
        (other / name).write_text(text.replace("'<|im_start|>assistant\\n'", "'<|im_start|>assistant\\n\\n'"))
    path = write_gguf(other, tmp_path / "m-f32.gguf", "f32", say=lambda _: None).path
    check = verify_gguf(path, folder, TEXTS, quant="f32", pytorch=reference)
    assert "the chat prompt rendered from the GGUF's template (Jinja) differs from fledge's" in check.problems
    assert check.chat["Jinja (llama-cpp-python, llama-server --jinja)"].startswith("differs from token")


def test_a_file_llama_cpp_cannot_load_is_one_export_error(model, tmp_path):
    folder, reference, _ = model
    broken = tmp_path / "m-f32.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(ExportError, match="llama.cpp could not load the file") as e:
        verify_gguf(broken, folder, TEXTS, quant="f32", pytorch=reference)
    assert "\n" not in str(e.value)


def test_a_char_model_passes_with_one_unk_per_run_of_unseen_characters(model, tmp_path_factory, tmp_path):
    """fledge's char tokenizer as a unigram GGUF: llama.cpp makes a run of unseen characters one <unk>
    ("— Привет": fledge [2, 2, 2, 2], llama.cpp [4, 2, 4, 2] from "—" on). Verification compares the
    samples reduced to known characters exactly, the rest with one <unk> per run, and says so."""
    from fledge.export.verify import SAMPLES
    _, _, write_gguf = model
    folder = fledge_gpt(tmp_path_factory.mktemp("verify-char"), kind="char")
    path = write_gguf(folder, tmp_path / "m-f32.gguf", "f32", say=lambda _: None).path
    check = verify_gguf(path, folder, TEXTS, quant="f32")
    assert check.ok, check.problems
    assert check.tokenization_samples > len(SAMPLES) + len(TEXTS)       # the reduced samples come first
    assert check.first_logit_diff < 5e-3 and check.argmax_agreement == 1.0
    assert any("one <unk> per character" in n for n in check.notes) and any(line.startswith("note: char tokenizer")
                                                                           for line in check.lines())
    from fledge.export.verify import _one_unk_per_run
    assert _one_unk_per_run([5, 2, 2, 2, 4, 2, 2, 7, 2], 2) == [5, 2, 4, 2, 7, 2]
