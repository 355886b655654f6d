"""Fine-tuning through the one training loop, one table of methods (full, LoRA, QLoRA) through
shared checks: each learns from rows on a tiny fledge base and saves the contract's checkpoint
layout (whole weights or only adapters, the transformers files with the added tokens, the resolved
recipe) without touching the base; a run killed mid-step resumes onto the uninterrupted one bit for
bit (weights or adapters, optimizer, RNG, losses, samples) with LoRA dropout on; adapters refuse a
base that changed; rows without validation train without evaluating; samples answer in the
template; a fine-tune's template travels to the next fine-tune."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fledge.env import matmul_peak
from fledge.errors import CheckpointError
from fledge.recipe import load_recipe
from fledge.templates import BUILTINS
from fledge.tokenizer import find_tokenizer_file
from fledge.train import checkpoint as ckpt
from fledge.train import train
from fledge.train.report import read_metrics
from tiny_runs import assert_same_tensors, changed, losses, make_recipe, rows_file

METHODS = {"full": {}, "lora": {"lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.1}, "qlora": {"lora_r": 4}}
ADAPTER_FILES = {"adapter_model.safetensors", "adapter_config.json"}
EVERY_CHECKPOINT = {"recipe.yaml", "state.json", "optimizer.pt", "rng.pt", "integrity.json", "config.json",
                    "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"}


class Killed(BaseException):
    """What SIGKILL does to a run: it stops where it is, nothing is saved and nothing is caught."""


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """A 2-layer, 32-wide char model trained for 20 steps: the base every fine-tune here starts from."""
    root = tmp_path_factory.mktemp("base")
    recipe = make_recipe(root, "base", max_steps=20, eval_every=10, checkpoint_every=10, log_every=10)
    train(recipe, progress=False)
    return recipe.run_path


def ft_recipe(root: Path, base: Path, name: str, method: str = "lora", template: str = "chatml", *,
              data: dict | None = None, sample: dict | None = None, **train_keys):
    t = dict(max_steps=12, batch_size=4, block_size=64, lr=3e-3, min_lr=3e-4, warmup_steps=2, log_every=1,
             eval_every=4, eval_batches=2, checkpoint_every=4, keep_last=10, threads=1, seed=11)
    t.update(train_keys)
    return load_recipe(None, base={
        "name": name, "run_dir": str(root / "runs" / name), "model": {"base": str(base)},
        "data": {"rows": [str(rows_file(root))], "val_fraction": 0.2, **(data or {})},
        "template": {"name": template}, "finetune": {"method": method, **METHODS[method]},
        "train": t, "sample": sample or {"prompts": ["3 little pigs"], "max_new_tokens": 6}})


def kill_at_optimizer_step(monkeypatch, at_call: int) -> None:
    real = torch.optim.AdamW.step
    calls = []

    def step(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == at_call:
            raise Killed
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step)


def base_files(base: Path) -> dict[str, str]:
    return {str(p.relative_to(base)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(base.rglob("*")) if p.is_file() and p.name != "metrics.jsonl"}


def weights_of(checkpoint: Path) -> dict[str, torch.Tensor]:
    name = "model.safetensors" if (checkpoint / "model.safetensors").is_file() else "adapter_model.safetensors"
    return load_file(str(checkpoint / name))


# --- each method ----------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_each_method_learns_and_saves_the_contract_layout(base_run, tmp_path, method, capsys):
    before = base_files(base_run)
    result = train(ft_recipe(tmp_path, base_run, method, method), progress=False)
    out = capsys.readouterr().out
    assert result.final_val_loss < result.first_val_loss - 0.05
    assert f"{method} fine-tune of {base_run} (fledge)" in out and "template chatml" in out
    assert "added <|im_start|>, <|im_end|> to the tokenizer" in out and "tokens per training row" in out
    assert "summary:" in out and "val loss" in out
    share = float(out.split("summary:")[1].split("parameters (")[1].split("%")[0])
    assert (share == 100.0) == (method == "full")                  # adapters (and new rows) train, nothing else
    folder = result.last_checkpoint
    names = {p.name for p in folder.iterdir()}
    assert EVERY_CHECKPOINT <= names
    if method == "full":
        assert "model.safetensors" in names and not names & ADAPTER_FILES
    else:
        assert ADAPTER_FILES <= names and "model.safetensors" not in names
    ckpt.verify_checkpoint(folder)
    state = json.loads((folder / "state.json").read_text())
    base_checkpoint = ckpt.best_checkpoint(base_run)
    base_vocab = json.loads((base_checkpoint / "state.json").read_text())["vocab_size"]
    assert state["vocab_size"] == base_vocab + 2                   # <|im_start|> and <|im_end|> got rows
    assert state["base_sha256"] == hashlib.sha256(
        f"integrity.json\0{hashlib.sha256((base_checkpoint / 'integrity.json').read_bytes()).hexdigest()}\n"
        .encode()).hexdigest()
    saved = load_recipe(folder / "recipe.yaml", allow_code=False)
    assert (saved.model.base, saved.model.arch, saved.model.dim, saved.model.n_layers, saved.tokenizer.kind) == \
        (str(base_run), "llama", 32, 2, "char")
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(folder)     # the fine-tune's tokenizer.json, not the base's copy
    assert len(tok) == base_vocab + 2 and tok.convert_tokens_to_ids("<|im_end|>") == base_vocab + 1
    assert (folder / "chat_template.jinja").read_text() == BUILTINS["chatml"].source
    assert base_files(base_run) == before                          # the base is never written to


def test_a_full_fine_tune_loads_with_transformers_as_it_trained(base_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from fledge.model.bases import load_checkpoint_model, load_checkpoint_recipe
    result = train(ft_recipe(tmp_path, base_run, "full-hf", "full", max_steps=4), progress=False)
    folder = result.last_checkpoint
    fledge_model = load_checkpoint_model(folder, load_checkpoint_recipe(folder)).eval()
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.randint(0, fledge_model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, fledge_model(ids)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_a_killed_fine_tune_resumes_onto_the_uninterrupted_run(base_run, tmp_path, method, monkeypatch):
    whole = train(ft_recipe(tmp_path, base_run, "whole", method), progress=False)
    recipe = ft_recipe(tmp_path, base_run, "cut", method)
    kill_at_optimizer_step(monkeypatch, 6)          # steps 5 and 6 are lost; step-000004 is the last checkpoint
    with pytest.raises(Killed):
        train(recipe, progress=False)
    assert [p.name for p in ckpt.list_checkpoints(recipe.run_path)] == ["step-000004"]
    monkeypatch.undo()
    matmul_peak.cache_clear()                       # a fresh process measures again
    resumed = train(recipe, resume=True, progress=False)
    assert resumed.step == whole.step == 12
    assert losses(resumed.run_dir) == losses(whole.run_dir)
    evaluations = lambda run: [(r["step"], r.get("val_loss"), r.get("samples")) for r in read_metrics(run)
                               if "val_loss" in r or "samples" in r]
    assert evaluations(resumed.run_dir) == evaluations(whole.run_dir)
    for step in (8, 12):
        a, b = (run / "checkpoints" / f"step-{step:06d}" for run in (resumed.run_dir, whole.run_dir))
        for name, tensor in weights_of(b).items():
            assert torch.equal(weights_of(a)[name], tensor), (step, name)
        assert_same_tensors(torch.load(a / "optimizer.pt", weights_only=True),
                            torch.load(b / "optimizer.pt", weights_only=True))
        assert torch.equal(torch.load(a / "rng.pt", weights_only=True)["cpu"],
                           torch.load(b / "rng.pt", weights_only=True)["cpu"])


def test_adapters_refuse_a_base_that_changed_since(tmp_path, monkeypatch):
    base = make_recipe(tmp_path, "moving-base", max_steps=4, eval_every=4, checkpoint_every=4)
    train(base, progress=False)
    recipe = ft_recipe(tmp_path, base.run_path, "on-moving", "lora", max_steps=8)
    kill_at_optimizer_step(monkeypatch, 6)
    with pytest.raises(Killed):
        train(recipe, progress=False)
    monkeypatch.undo()
    train(changed(base, train={"max_steps": 8, "lr": 1e-2}), resume=True, progress=False)   # a newer best
    with pytest.raises(CheckpointError, match="adapters trained on another version of base") as e:
        train(recipe, resume=True, progress=False)
    assert "\n" not in str(e.value)


def test_a_changed_method_does_not_resume(base_run, tmp_path, monkeypatch):
    recipe = ft_recipe(tmp_path, base_run, "switch", "lora", max_steps=8)
    kill_at_optimizer_step(monkeypatch, 6)
    with pytest.raises(Killed):
        train(recipe, progress=False)
    monkeypatch.undo()
    other = ft_recipe(tmp_path, base_run, "switch", "full", max_steps=8)
    with pytest.raises(CheckpointError, match="finetune.method: checkpoint 'lora', recipe 'full'"):
        train(other, resume=True, progress=False)


# --- validation, sampling, templates ---------------------------------------------------------------

def test_rows_without_validation_train_and_keep_the_last_checkpoint(base_run, tmp_path, capsys):
    recipe = ft_recipe(tmp_path, base_run, "no-val", "lora", data={"val_fraction": 0.0}, early_stop_patience=2,
                       max_steps=8)
    result = train(recipe, progress=False)
    out = capsys.readouterr().out
    assert "no validation batches" in out and "early stopping is off" in out
    assert result.step == 8 and result.first_val_loss is None and result.final_val_loss is None
    assert result.best_checkpoint is None and result.last_checkpoint.name == "step-000008"
    rows = read_metrics(result.run_dir)
    assert not [r for r in rows if "val_loss" in r] and [r["step"] for r in rows if "samples" in r] == [4, 8]
    assert "summary:" in out


def test_samples_answer_each_prompt_as_a_user_turn_of_the_template(base_run, tmp_path, monkeypatch):
    import fledge.templates as templates
    rendered = []
    real = templates.render_prompt

    def render_prompt(messages, tokenizer, template, **kwargs):
        rendered.append((messages, templates.get_template(template).name))
        return real(messages, tokenizer, template, **kwargs)

    monkeypatch.setattr(templates, "render_prompt", render_prompt)
    recipe = ft_recipe(tmp_path, base_run, "samples", "lora", "qa", max_steps=4,
                       sample={"prompts": ["3 little pigs", "5 little pigs"], "max_new_tokens": 12})
    result = train(recipe, progress=False)
    assert ("3 little pigs", "qa") in rendered and ("5 little pigs", "qa") in rendered
    samples = [r["samples"] for r in read_metrics(result.run_dir) if "samples" in r]
    assert samples and all(s["text"] == s["text"].lstrip(" ") and "\nQ:" not in s["text"] for s in samples[-1])


def test_a_fine_tune_carries_its_template_to_the_next_fine_tune(base_run, tmp_path, capsys):
    first = train(ft_recipe(tmp_path, base_run, "first", "full", "qa", max_steps=4), progress=False)
    second = train(ft_recipe(tmp_path, first.run_dir, "second", "lora", "", max_steps=4), progress=False)
    out = capsys.readouterr().out
    assert "template.name is empty: using the chat template base" in out and "(qa)" in out
    folder = second.last_checkpoint
    assert (folder / "chat_template.jinja").read_text() == BUILTINS["qa"].source
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(folder)
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("Q: Hi\nA:")


def test_a_checkpoint_with_a_transformers_tokenizer_beside_fledge_s_reads_fledge_s(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"sp")
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(Exception, match="holds both"):
        find_tokenizer_file(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{}")       # a fine-tune's checkpoint: tokenizer.json is a copy
    assert find_tokenizer_file(tmp_path) == tmp_path / "tokenizer.model"


# --- transformers bases -----------------------------------------------------------------------------

def hf_base(root: Path, family: str) -> Path:
    """A tiny random transformers model with fledge's char tokenizer of the corpus, saved as a model folder."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from fledge.recipe import TokenizerConfig
    from fledge.templates import hf_tokenizer
    from fledge.tokenizer import train_tokenizer
    from tiny_runs import CORPUS
    folder = root / f"hf-{family}"
    train_tokenizer(TokenizerConfig(kind="char", vocab_size=64), [CORPUS]).save(root / "tok")
    tok = hf_tokenizer(root / "tok")
    sizes = {"llama": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2),
             "gpt2": dict(n_embd=32, n_layer=2, n_head=4)}[family]
    config = AutoConfig.for_model(family, vocab_size=len(tok), max_position_embeddings=128, n_positions=128,
                                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **sizes)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family, method", [("llama", "full"), ("llama", "lora"), ("gpt2", "lora")])
def test_a_transformers_base_fine_tunes_and_saves_in_its_own_names(tmp_path, family, method):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    base = hf_base(tmp_path, family)
    result = train(ft_recipe(tmp_path, base, f"{family}-{method}", method, max_steps=8), progress=False)
    assert result.final_val_loss < result.first_val_loss
    folder = result.last_checkpoint
    saved = load_recipe(folder / "recipe.yaml", allow_code=False)
    assert saved.model.arch == "transformers" and saved.model.base == str(base)
    tok = AutoTokenizer.from_pretrained(folder)
    assert "<|im_end|>" in tok.get_vocab()
    if method == "full":
        hf = AutoModelForCausalLM.from_pretrained(folder).eval()        # transformers' own names
        assert hf.config.vocab_size == len(tok)
        assert set(load_file(str(folder / "model.safetensors"))) <= set(hf.state_dict())
    else:
        adapter = json.loads((folder / "adapter_config.json").read_text())
        assert adapter["peft_type"] == "LORA" and "model.safetensors" not in {p.name for p in folder.iterdir()}
