"""Sampling: the caller gets the tokens it asked for (the window slides past max_seq_len), a long
prompt is cut from the left with a note, options are validated like recipe keys, and a
checkpoint's recipe never imports code without permission. Every kind of checkpoint loads for
inference (pretraining, full fine-tunes and adapter runs of fledge and transformers bases) with
exact weights, its own tokenizer and template; a fine-tune's prompt is its training rendering up
to the answer, the answer stops at the end of the turn, --raw and --system change what is
rendered; prompts come from files; a missing or changed base is one line."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml

from fledge import cli
from fledge.errors import CheckpointError, DataError, RecipeError
from fledge.model.bases import TransformersLM
from fledge.model.gpt import GPT
from fledge.model.registry import build_llama, build_model
from fledge.recipe import ModelConfig, SampleConfig, load_recipe
from fledge.sample import (generate_from, generate_text, load_for_inference, prompt_ids, read_prompts, sample,
                           sample_options)
from fledge.templates import get_template, render, render_prompt
from fledge.tokenizer import Tokenizer, train_tokenizer
from fledge.train.checkpoint import latest_checkpoint, save_checkpoint
from finetuned_runs import A1, A2, CONVERSATIONS, Q1, Q2, fledge_base, finetune, hf_base, messages

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


# --- every kind of checkpoint -------------------------------------------------------------------

KINDS = {   # run name: (base, method, template, system)
    "full-fledge": ("fledge", "full", "qa", "Be brief."),
    "lora-fledge": ("fledge", "lora", "chatml", ""),
    "full-hf": ("hf", "full", "llama-3", ""),
    "lora-hf": ("hf", "lora", "qa", "Be brief."),
}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("kinds")


@pytest.fixture(scope="module")
def tuned(root) -> dict:
    bases = {"fledge": fledge_base(root), "hf": hf_base(root)}
    return {name: finetune(root, name, bases[base], method=method, template=template, system=system)
            for name, (base, method, template, system) in KINDS.items()}


def first_generate_input(loaded, monkeypatch) -> list:
    """Calls to loaded.model.generate record their prompt ids here."""
    seen = []
    real = loaded.model.generate

    def recording(idx, *args, **kwargs):
        seen.append(idx[0].tolist())
        yield from real(idx, *args, **kwargs)

    monkeypatch.setattr(loaded.model, "generate", recording, raising=False)
    return seen


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_loads_with_exact_weights_its_tokenizer_and_template(tuned, kind):
    ft = tuned[kind]
    loaded = load_for_inference(ft.run)
    assert loaded.checkpoint == latest_checkpoint(ft.run) and not loaded.model.training
    assert loaded.template.name == KINDS[kind][2] and loaded.template.source == ft.template.source
    core = loaded.model.hf if isinstance(loaded.model, TransformersLM) else loaded.model
    assert ("lora" in kind) == (type(core).__name__ == "PeftModel")
    assert isinstance(loaded.model, TransformersLM) == kind.endswith("hf")
    if kind == "full-fledge":
        assert isinstance(loaded.model, GPT)
    training = render(messages(*CONVERSATIONS[2]), ft.tokenizer, ft.template, system=ft.system or None).input_ids
    again = render(messages(*CONVERSATIONS[2]), loaded.tokenizer, loaded.template, system=ft.system or None)
    assert again.input_ids == training            # the checkpoint's tokenizer files give the training ids
    ids = torch.tensor([training])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids)[0], ft.model(ids)[0], atol=0, rtol=0)
    model, tokenizer, recipe = loaded            # callers that unpack three still work
    assert recipe.model.base and model is loaded.model


@pytest.mark.parametrize("kind", KINDS)
def test_a_fine_tune_answers_in_its_template_and_stops_at_the_end_of_its_turn(tuned, kind):
    """40 tokens allowed, greedy: the trained answer and nothing after it (no stop: more text follows)."""
    pieces = []
    assert sample(tuned[kind].run, Q1, max_new_tokens=40, temperature=0.0,
                  on_text=lambda i, p: pieces.append(p)) == [A1]
    assert "".join(pieces) == A1
    assert sample(tuned[kind].run, Q2, max_new_tokens=40, temperature=0.0) == [A2]


@pytest.mark.parametrize("kind", ["full-fledge", "lora-hf", "lora-fledge"])
def test_the_prompt_is_the_training_rendering_up_to_each_answer(tuned, kind, monkeypatch):
    """What training saw before every answer of every conversation (system prompt included) is what
    sampling feeds the model: rendered from the checkpoint's own template and tokenizer files."""
    ft = tuned[kind]
    loaded = load_for_inference(ft.run)
    seen = first_generate_input(loaded, monkeypatch)
    one = SampleConfig(max_new_tokens=1, temperature=0.0)
    for turns in CONVERSATIONS:
        r = render(messages(*turns), ft.tokenizer, ft.template, system=ft.system or None)
        starts = [i for i, t in enumerate(r.trained) if t and (i == 0 or not r.trained[i - 1])]
        for k, start in enumerate(starts):
            prompt = turns[0] if k == 0 else messages(*turns[:2 * k + 1])
            generate_from(loaded, prompt, one)
            assert seen[-1] == r.input_ids[:start], (turns, k)


def test_raw_continues_bos_and_text_and_system_replaces_the_runs(tuned, monkeypatch):
    ft = tuned["full-fledge"]
    loaded = load_for_inference(ft.run)
    tok, template = loaded.tokenizer, loaded.template
    seen = first_generate_input(loaded, monkeypatch)
    one = SampleConfig(max_new_tokens=1, temperature=0.0)
    generate_from(loaded, "Q: hi", one, raw=True)
    assert seen[-1] == [tok.bos_token_id] + tok.encode("Q: hi", add_special_tokens=False)
    generate_from(loaded, Q1, one)
    assert seen[-1] == render_prompt(Q1, tok, template, system="Be brief.")
    generate_from(loaded, Q1, one, system="Answer: xyz")
    assert seen[-1] == render_prompt(Q1, tok, template, system="Answer: xyz")
    generate_from(loaded, Q1, one, system="")
    assert seen[-1] == render_prompt(Q1, tok, template)
    own = [{"role": "system", "content": "QA"}, *messages(Q1)]      # a conversation's own system message stays
    generate_from(loaded, own, one)
    assert seen[-1] == render_prompt(own, tok, template)
    with pytest.raises(DataError, match="system prompt was given too"):
        generate_from(loaded, own, one, system="Be brief.")
    with pytest.raises(RecipeError, match="--raw leaves it out"):
        generate_from(loaded, Q1, one, raw=True, system="Be brief.")


def test_a_pretraining_run_has_no_template_and_continues_text(run):
    loaded = load_for_inference(run)
    assert loaded.template is None and isinstance(loaded.tokenizer, Tokenizer)
    with pytest.raises(RecipeError, match="this run has none"):
        generate_from(loaded, "the", greedy(2), system="Be brief.")
    with pytest.raises(DataError, match="needs the run's chat template"):
        generate_from(loaded, messages("the"), greedy(2))
    assert prompt_ids(loaded.tokenizer, "the") == [loaded.tokenizer.bos_id] + loaded.tokenizer.encode("the")


class Scripted(torch.nn.Module):
    """A model whose generate yields fixed tokens, whatever the prompt."""

    def __init__(self, ids: list[int]):
        super().__init__()
        self.ids = ids
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def generate(self, idx, max_new_tokens, *args):
        for token in self.ids[:max_new_tokens]:
            yield torch.tensor([[token]])


@pytest.mark.parametrize("template, generated, answer", [
    ("qa", " a ring.\nQ: What is", "a ring."),           # the lead is left out, the stop string ends it
    ("qa", " a ring.\n", "a ring.\n"),                    # held back while it may become a stop string
    ("llama-3", "\n\na ring.", "a ring."),
])
def test_streamed_answers_hold_back_leads_and_stop_strings(tuned, template, generated, answer):
    tok = tuned["full-hf" if template == "llama-3" else "lora-hf"].tokenizer       # trained with `template`
    chat_template = get_template(template, tok)
    ids = tok.encode(generated, add_special_tokens=False)
    pieces = []
    texts = generate_text(Scripted(ids), tok, Q1, SampleConfig(max_new_tokens=len(ids)), template=chat_template,
                          on_text=lambda i, p: pieces.append(p), max_seq_len=1000)
    assert texts == [answer] and "".join(pieces) == answer
    assert all(p and not p.startswith("\n\n") for p in pieces)


# --- prompts from a file ------------------------------------------------------------------------

def test_prompts_files_one_per_line_or_jsonl(tmp_path):
    text = tmp_path / "prompts.txt"
    text.write_bytes(f"{Q1}\r\n\n{Q2}\u2028 too\n".encode())
    assert read_prompts(text) == [Q1, f"{Q2}\u2028 too"]          # CRLF ends a line, U+2028 does not
    rows = tmp_path / "prompts.jsonl"
    rows.write_text("\n".join([json_line({"prompt": Q1}), json_line({"messages": messages(Q1, A1, Q2)}),
                                json_line({"messages": messages(Q1, A1)})]) + "\n")
    assert read_prompts(rows) == [Q1, messages(Q1, A1, Q2), messages(Q1)]   # a last answer is left out
    rows.write_text(json_line({"prompt": Q1}) + "\n" + json_line({"input": Q1}) + "\n")
    with pytest.raises(DataError, match=r"prompts.jsonl:2: needs \"prompt\""):
        read_prompts(rows)
    rows.write_text('{"prompt": NaN}\n')
    with pytest.raises(DataError, match=r"prompts.jsonl:1: .*NaN is not a JSON value.*write JSON objects"):
        read_prompts(rows)
    array = tmp_path / "prompts.json"
    array.write_text(json_line([{"prompt": Q1}, {"messages": messages(Q2)}, {"text": "x"}]))
    with pytest.raises(DataError, match=r"prompts.json: item 3: needs"):
        read_prompts(array)
    array.write_text(json_line([{"prompt": Q1}, {"messages": messages(Q2)}]))
    assert read_prompts(array) == [Q1, messages(Q2)]
    with pytest.raises(DataError, match="no such prompts file"):
        read_prompts(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(DataError, match="holds no prompts"):
        read_prompts(tmp_path / "empty.txt")


def json_line(row) -> str:
    import json
    return json.dumps(row)


def test_the_sample_command_prints_answers_and_headers(tuned, tmp_path, capsys):
    run = str(tuned["lora-hf"].run)
    assert cli.main(["sample", run, "--prompt", Q1, "--temperature", "0"]) == 0
    assert capsys.readouterr().out == f"{A1}\n"
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json_line({"prompt": Q1}) + "\n" + json_line({"messages": messages(Q2, A2)}) + "\n")
    assert cli.main(["sample", run, "--prompts-file", str(prompts), "--temperature", "0"]) == 0
    assert capsys.readouterr().out == f"=== {Q1}\n{A1}\n=== {Q2}\n{A2}\n"
    assert cli.main(["sample", run, "--prompt", Q1, "--temperature", "0", "--num-samples", "2"]) == 0
    assert capsys.readouterr().out == f"--- sample 1\n{A1}\n--- sample 2\n{A1}\n"
    assert cli.main(["sample", run, "--prompt", "Q: hi", "--raw", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("Q: hi")
    assert cli.main(["sample", run, "--prompt", Q1, "--prompts-file", str(prompts)]) == 2
    assert "not both" in capsys.readouterr().err


# --- what goes wrong ----------------------------------------------------------------------------

def one_line_error(capsys, argv: list[str], code: int = 1) -> str:
    capsys.readouterr()                         # what building the runs printed
    assert cli.main(argv) == code
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_an_adapter_run_without_its_base_is_one_line(root, tmp_path, capsys, monkeypatch):
    base = fledge_base(tmp_path, "moved-base")
    ft = finetune(tmp_path, "orphan", base, method="lora", steps=1)
    base.rename(tmp_path / "elsewhere")
    err = one_line_error(capsys, ["sample", str(ft.run), "--prompt", Q1])
    assert f"the base '{base}'" in err and "is not here" in err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="offline"):
        load_for_inference(ft.run)


def test_model_base_is_relative_to_the_working_directory(tmp_path, monkeypatch):
    fledge_base(tmp_path, "rel-base")
    monkeypatch.chdir(tmp_path)
    ft = finetune(tmp_path, "relative", Path("runs/rel-base"), method="lora", steps=1)
    assert load_for_inference(ft.run).recipe.model.base == "runs/rel-base"
    monkeypatch.chdir(tmp_path / "runs")
    with pytest.raises(CheckpointError, match="Run from the folder you trained in"):
        load_for_inference(tmp_path / "runs" / "relative")


def test_adapters_on_a_changed_base_are_refused_in_one_line(tmp_path, capsys):
    base = fledge_base(tmp_path, "changing-base")
    ft = finetune(tmp_path, "on-old-base", base, method="lora", steps=1)
    torch.manual_seed(5)                             # the base run trains on: its newest checkpoint differs
    checkpoint = latest_checkpoint(base)
    recipe = load_recipe(checkpoint / "recipe.yaml", check_machine=False)
    model = build_llama(recipe.model, 64)
    save_checkpoint(base, 2, model, torch.optim.AdamW(model.parameters()), {"step": 2, "vocab_size": 64},
                    recipe.to_yaml(), checkpoint / "tokenizer.json", None, 2)
    err = one_line_error(capsys, ["sample", str(ft.run), "--prompt", Q1])
    assert "changed since training" in err and "base_sha256" in err


def test_damaged_adapter_files_are_the_integrity_message(tmp_path):
    base = fledge_base(tmp_path, "intact-base")
    ft = finetune(tmp_path, "damaged", base, method="lora", steps=1)
    adapter = latest_checkpoint(ft.run, verify=False) / "adapter_model.safetensors"
    data = bytearray(adapter.read_bytes())
    data[-1] ^= 1
    adapter.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="adapter_model.safetensors does not match its sha256"):
        load_for_inference(latest_checkpoint(ft.run, verify=False))


def test_remote_code_needs_allow_code(tmp_path, capsys):
    ft = finetune(tmp_path, "trusting", hf_base(tmp_path), method="full", steps=1, trust_remote_code=True)
    err = one_line_error(capsys, ["sample", str(ft.run), "--prompt", Q1], code=2)
    assert "trust_remote_code is true" in err and "--allow-code" in err
    assert cli.main(["sample", str(ft.run), "--prompt", Q1, "--allow-code", "--max-new-tokens", "2"]) == 0


def test_a_run_without_checkpoints_and_system_without_template_are_one_line(run, tmp_path, capsys):
    (tmp_path / "empty-run").mkdir()
    err = one_line_error(capsys, ["sample", str(tmp_path / "empty-run")])
    assert "no checkpoint found" in err and "fledge train RECIPE" in err
    err = one_line_error(capsys, ["sample", str(run), "--system", "Be brief."], code=2)
    assert "needs the run's chat template" in err
