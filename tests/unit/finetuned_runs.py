"""Tiny runs of every kind inference loads, written the way training writes them (the fine-tune
checkpoint layout of notes/finetune-contract.md): a fledge pretraining run and a transformers
llama folder as bases, and full and LoRA fine-tunes of both that learned a few conversations
in a template, so greedy answers are known.

    base = fledge_base(root)                                   # root/runs/base (char tokenizer, 2x32 GPT)
    ft = finetune(root, "lora-fledge", base, method="lora")    # FineTune(run, model, tokenizer, template)
    ft.model(ids)[0]                                           # the logits the checkpoint must give again
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM

from fledge.export.hf import write_transformers_files
from fledge.model.adapters import apply_method, save_adapter
from fledge.model.bases import base_sha256, base_tokenizer_file, load_base, model_hf_config
from fledge.model.registry import build_llama
from fledge.recipe import TokenizerConfig, load_recipe
from fledge.templates import add_template_tokens, get_template, hf_tokenizer, render, set_pad_token
from fledge.tokenizer import train_tokenizer
from fledge.train.checkpoint import save_checkpoint

Q1, A1 = "What is resonance?", "a ring."
Q2, A2 = "Who are you?", "a small bird."
CONVERSATIONS = [[Q1, A1], [Q2, A2], [Q1, A1, Q2, A2]]
CORPUS = "".join(f"{q} {a}\n" for q, a in ((Q1, A1), (Q2, A2))) + "Be brief. Answer: xyz QA\n" * 3


def messages(*turns: str) -> list[dict]:
    return [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]


def fledge_base(root: Path, name: str = "base", max_seq_len: int = 160) -> Path:
    """A pretraining run with one checkpoint of an untrained 2-layer, 32-wide GPT on a char tokenizer."""
    run = root / "runs" / name
    if run.is_dir():
        return run
    recipe = load_recipe(None, base={
        "name": name, "run_dir": str(run), "tokenizer": {"kind": "char", "vocab_size": 64},
        "model": {"n_layers": 2, "n_heads": 2, "dim": 32, "max_seq_len": max_seq_len},
        "train": {"block_size": 32, "max_steps": 1, "warmup_steps": 0}, "sample": {"max_new_tokens": 12}})
    tokenizer = train_tokenizer(recipe.tokenizer, [CORPUS])
    tokenizer_file = tokenizer.save(root / f"{name}-data")
    torch.manual_seed(0)
    model = build_llama(recipe.model, tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id)
    state = {"step": 1, "vocab_size": tokenizer.vocab_size}
    save_checkpoint(run, 1, model, torch.optim.AdamW(model.parameters()), state, recipe.to_yaml(), tokenizer_file,
                    model_hf_config(model), 1)
    return run


def hf_base(root: Path, family: str = "llama") -> Path:
    """A tiny random transformers model folder (96 embedding rows) with fledge's char tokenizer."""
    folder = root / f"hf-{family}"
    if folder.is_dir():
        return folder
    chars = root / "hf-tokenizer"
    train_tokenizer(TokenizerConfig(kind="char", vocab_size=64), [CORPUS]).save(chars)
    config = AutoConfig.for_model(family, vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                  bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    hf_tokenizer(chars).save_pretrained(folder)
    return folder


@dataclass
class FineTune:
    run: Path
    model: torch.nn.Module       # as trained (adapters unmerged), eval mode
    tokenizer: object
    template: object
    system: str


def finetune(root: Path, name: str, base: Path, *, method: str = "full", template: str = "qa", system: str = "",
             steps: int | None = None, lr: float = 1e-2, trust_remote_code: bool = False) -> FineTune:
    """A run that fine-tuned `base` on CONVERSATIONS with `template`, saved as the training loop saves
    (full: 60 steps; adapters: 150, enough for greedy answers to be the trained ones)."""
    steps = steps or (60 if method == "full" else 150)
    run = root / "runs" / name
    recipe = load_recipe(None, base={
        "name": name, "run_dir": str(run), "model": {"base": str(base), "trust_remote_code": trust_remote_code},
        "finetune": {"method": method, "lora_r": 8, "lora_alpha": 16.0},
        "template": {"name": template, "system": system}, "train": {"block_size": 64},
        "sample": {"max_new_tokens": 24, "temperature": 0.0}}, check_machine=False)
    loaded, resolved = load_base(recipe, "cpu")
    tok = loaded.tokenizer
    chat_template = get_template(template, tok)
    new = set_pad_token(tok) + add_template_tokens(tok, chat_template)
    torch.manual_seed(0)
    model = apply_method(loaded.model, resolved.finetune, new_tokens=new, tokenizer=tok)
    _train(model, tok, chat_template, system, steps, lr)
    model.eval()

    def files(folder: Path) -> None:
        write_transformers_files(folder, hf_config=model_hf_config(model), tokenizer=tok, template=chat_template)
        if method != "full":
            save_adapter(model, folder)

    state = {"step": steps, "vocab_size": model_hf_config(model)["vocab_size"]}
    if method != "full":
        state["base_sha256"] = base_sha256(loaded)
    trainable = [p for p in model.parameters() if p.requires_grad]
    fledge_tokenizer = base_tokenizer_file(loaded) if loaded.kind == "fledge" else None    # copied, as training does
    save_checkpoint(run, steps, model if method == "full" else None, torch.optim.AdamW(trainable), state,
                    resolved.to_yaml(), fledge_tokenizer, None, 2, extra_files=files)
    return FineTune(run, model, tok, chat_template, system)


def _train(model, tok, template, system: str, steps: int, lr: float) -> None:
    torch.manual_seed(0)
    rows = []
    for turns in CONVERSATIONS:
        r = render(messages(*turns), tok, template, system=system or None)
        labels = r.labels[1:] + [-100]          # fledge's labels are shifted: label[t] = token t + 1
        rows.append((torch.tensor([r.input_ids]), torch.tensor([labels])))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        for ids, labels in rows:
            model(ids, labels)[1].backward()
        optimizer.step()
        optimizer.zero_grad()


def saved_recipe(run_or_checkpoint: Path) -> dict:
    from fledge.sample import resolve_checkpoint
    return yaml.safe_load((resolve_checkpoint(run_or_checkpoint) / "recipe.yaml").read_text())
