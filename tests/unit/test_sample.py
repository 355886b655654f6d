"""Sampling: the caller gets the tokens it asked for (the window slides past max_seq_len), a long
prompt is cut from the left with a note, options are validated like recipe keys, and a
checkpoint's recipe never imports code without permission."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml

from fledge import cli
from fledge.errors import CheckpointError, RecipeError
from fledge.model.registry import build_llama, build_model
from fledge.recipe import ModelConfig, SampleConfig, load_recipe
from fledge.sample import generate_text, load_for_inference, sample, sample_options
from fledge.tokenizer import train_tokenizer
from fledge.train.checkpoint import save_checkpoint

TEXT = "the quick brown fox jumps over the lazy dog.\n" * 4


def tiny_recipe(max_seq_len: int = 16, allow_code: bool = True):
    return load_recipe(None, allow_code=allow_code, base={
        "name": "t", "tokenizer": {"kind": "char", "vocab_size": 64},
        "model": {"n_layers": 1, "n_heads": 2, "dim": 16, "max_seq_len": max_seq_len},
        "train": {"block_size": 8, "max_steps": 1, "warmup_steps": 0}})


def make_checkpoint(run: Path, arch: str = "llama", max_seq_len: int = 16, name: str = "t", **train) -> Path:
    """A run folder with one checkpoint of an untrained tiny model, saved the way training saves it;
    the saved recipe names `arch` and `name` and has the `train` values given."""
    recipe = tiny_recipe(max_seq_len)
    tokenizer = train_tokenizer(recipe.tokenizer, [TEXT])
    tokenizer_file = tokenizer.save(run / "data")
    torch.manual_seed(0)
    model = build_llama(recipe.model, tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id)
    saved = recipe.to_dict()
    saved["model"]["arch"] = arch
    saved["name"] = name
    saved["train"].update(train)
    save_checkpoint(run, 1, model, torch.optim.AdamW(model.parameters()),
                    {"step": 1, "vocab_size": tokenizer.vocab_size}, yaml.safe_dump(saved), tokenizer_file, None, 1)
    return run


class CountingTokenizer:
    """One character per token and no EOS, so the text's length counts the generated tokens."""
    bos_id, eos_id = 0, None

    def encode(self, text: str) -> list[int]:
        return [1 + ord(c) % 20 for c in text]

    def decode(self, ids) -> str:
        return "".join(chr(ord("a") + i % 26) for i in ids)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_llama(tiny_recipe(max_seq_len=12).model, 32).eval()


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("sample") / "run")


def greedy(n: int) -> SampleConfig:
    return SampleConfig(max_new_tokens=n, temperature=0.0)


# --- the window ---------------------------------------------------------------------------

def test_the_caller_gets_every_token_asked_for_past_max_seq_len(model):
    notes = []
    texts = generate_text(model, CountingTokenizer(), "abcdefgh", greedy(30), num_samples=2, on_note=notes.append)
    assert [len(t) for t in texts] == [30, 30]          # prompt 9 tokens (with BOS), window 12
    assert notes == []


def test_the_sliding_window_equals_recomputing_on_the_last_tokens(model):
    """Each token is the greedy choice given the last max_seq_len - 1 tokens, as without a cache."""
    tokenizer = CountingTokenizer()
    window = model.config.max_seq_len
    history = [0] + tokenizer.encode("abcdefgh")
    expected = []
    with torch.no_grad():
        for _ in range(20):
            logits, _ = model(torch.tensor([history[-(window - 1):]]))
            expected.append(int(logits[0, -1].argmax()))
            history.append(expected[-1])
    got = []
    real_generate = model.generate

    def recording_generate(idx, *args, **kwargs):
        for column in real_generate(idx, *args, **kwargs):
            got.append(int(column[0, 0]))
            yield column

    model.generate = recording_generate
    try:
        generate_text(model, tokenizer, "abcdefgh", greedy(20))
    finally:
        del model.generate
    assert got == expected


def test_a_prompt_longer_than_the_window_is_cut_from_the_left_with_a_note(model):
    notes = []
    long_prompt = "abcdefghijklmnopqrstuvwxyz"
    texts = generate_text(model, CountingTokenizer(), long_prompt, greedy(5), on_note=notes.append)
    assert len(texts[0]) == 5
    assert len(notes) == 1 and "27 tokens" in notes[0] and "last 11" in notes[0]
    cut = generate_text(model, CountingTokenizer(), long_prompt[-11:], greedy(5), on_note=notes.append)
    assert cut == texts                                  # BOS + 11 characters: cut to the same 11 tokens


def test_sample_from_a_checkpoint_streams_exactly_what_it_returns(run):
    pieces = []
    texts = sample(run, "the ", max_new_tokens=40, temperature=1.0, seed=3, on_text=lambda i, p: pieces.append(p))
    assert "".join(pieces) == texts[0]
    assert texts == sample(run, "the ", max_new_tokens=40, temperature=1.0, seed=3)


# --- options validated like recipe keys ---------------------------------------------------

@pytest.mark.parametrize("args, fragment", [
    (["--max-new-tokens", "0"], "--max-new-tokens is 0; it must be at least 1"),
    (["--max-new-tokens", "-5"], "--max-new-tokens is -5"),
    (["--num-samples", "0"], "--num-samples is 0; it must be at least 1"),
    (["--num-samples", "-2"], "--num-samples is -2"),
    (["--temperature", "-1"], "--temperature is -1.0; it must be at least 0.0"),
    (["--temperature", "nan"], "--temperature is nan; it must be a finite number"),
    (["--top-p", "2"], "--top-p is 2.0; it must be from 0.0 to 1.0"),
    (["--top-k", "-3"], "--top-k is -3; it must be at least 0"),
    (["--seed", str(2**63)], "--seed is 9223372036854775808; it must be from 0 to 9223372036854775807"),
    (["--seed", "-1"], "--seed is -1"),
    (["--device", "banana"], "--device is 'banana'; choose cpu, cuda, cuda:N, mps or auto"),
    (["--device", "cuda:99"], "--device is 'cuda:99'"),
])
def test_bad_sample_options_are_one_line_naming_the_flag(capsys, tmp_path, args, fragment):
    code = cli.main(["sample", str(tmp_path / "no-such-run"), *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: fledge sample: ") and fragment in err and len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_one_line(capsys, tmp_path):
    assert cli.main(["sample", str(tmp_path), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "--device is 'cuda' but no CUDA device is visible" in err and len(err.strip().splitlines()) == 1


def test_library_options_are_checked_before_anything_loads(tmp_path):
    with pytest.raises(RecipeError, match="top_p is 1.5; it must be from 0.0 to 1.0"):
        sample(tmp_path / "missing", top_p=1.5)
    with pytest.raises(RecipeError, match="2 problems"):
        sample_options({"max_new_tokens": 0, "temperature": float("inf")})
    assert sample_options({"top_k": None, "seed": 2**63 - 1}).seed == 2**63 - 1


def test_undecodable_prompt_is_one_line(run, capsys):
    assert cli.main(["sample", str(run), "--prompt", "caf\udce9"]) == 2
    err = capsys.readouterr().err
    assert "prompt is not valid text" in err and "Traceback" not in err


# --- code named by a checkpoint's recipe --------------------------------------------------

MARKER_MODULE = '''
from pathlib import Path
Path({marker!r}).write_text("imported")

def build(config, vocab_size):
    from fledge.model.registry import build_llama
    return build_llama(config, vocab_size)
'''


def test_a_checkpoint_recipe_naming_code_needs_allow_code(tmp_path, monkeypatch):
    marker = tmp_path / "imported.txt"
    (tmp_path / "fledge_marker_unit.py").write_text(MARKER_MODULE.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "fledge_marker_unit", raising=False)
    run = make_checkpoint(tmp_path / "run", arch="fledge_marker_unit:build")
    with pytest.raises(RecipeError, match="allow_code=True"):
        load_for_inference(run)
    with pytest.raises(RecipeError, match="--allow-code"):
        sample(run, "the ", max_new_tokens=3)
    assert not marker.exists()
    model, _, recipe = load_for_inference(run, allow_code=True)
    assert marker.exists() and recipe.model.arch == "fledge_marker_unit:build"
    monkeypatch.delitem(sys.modules, "fledge_marker_unit", raising=False)


def test_build_model_imports_code_only_for_a_recipe_loaded_with_permission(tmp_path, monkeypatch):
    marker = tmp_path / "imported.txt"
    (tmp_path / "fledge_marker_build.py").write_text(MARKER_MODULE.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "fledge_marker_build", raising=False)
    saved = tiny_recipe(allow_code=False)
    saved.model.arch = "fledge_marker_build:build"        # edited after a load without code: still refused
    with pytest.raises(RecipeError, match="without permission to run code"):
        build_model(saved.model, 32)
    with pytest.raises(RecipeError, match="without permission"):
        build_model(ModelConfig(arch="fledge_marker_build:build"), 32)
    assert not marker.exists()
    assert build_model(ModelConfig(arch="fledge_marker_build:build"), 32, allow_code=True) is not None
    assert marker.exists()
    monkeypatch.delitem(sys.modules, "fledge_marker_build", raising=False)


def test_a_checkpoint_is_not_held_to_rules_for_running_here(tmp_path, monkeypatch):
    """Sampling reads a saved recipe as it is: a name older fledge allowed, fp16 from a GPU machine."""
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    run = make_checkpoint(tmp_path / "run", name="my run (old)", precision="fp16", device="cpu", tensorboard=True)
    assert len(sample(run, "the ", max_new_tokens=4, temperature=0.0)) == 1


def test_damaged_checkpoint_is_a_checkpoint_error(tmp_path):
    checkpoint = make_checkpoint(tmp_path / "run") / "checkpoints" / "step-000001"
    (checkpoint / "state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="state.json"):
        load_for_inference(checkpoint)
    (checkpoint / "recipe.yaml").unlink()
    with pytest.raises(CheckpointError, match="recipe.yaml"):
        load_for_inference(checkpoint)
