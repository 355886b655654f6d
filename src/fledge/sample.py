"""Generate text from a trained run or checkpoint.

    fledge sample runs/shakespeare-char --prompt "ROMEO:" --num-samples 3 --seed 1

    from fledge.sample import load_for_inference, generate_text
    model, tokenizer, recipe = load_for_inference("runs/shakespeare-char")
    texts = generate_text(model, tokenizer, "ROMEO:", recipe.sample, seed=1)

A run folder resolves to its best checkpoint by validation loss (else its latest). The
prompt is encoded the way training saw documents begin: the BOS token, then the text.
Generation uses a KV cache, streams tokens as they come, and stops at EOS.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from fledge.errors import CheckpointError
from fledge.recipe import Recipe, SampleConfig, load_recipe


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder as given, or a run folder's best (else latest) checkpoint."""
    from fledge.train.checkpoint import best_checkpoint, latest_checkpoint
    p = Path(path)
    if (p / "model.safetensors").is_file():
        return p
    if not p.exists():
        raise CheckpointError(f"{p}: no such run or checkpoint folder. Runs live under runs/<name>; "
                              f"train one with `fledge train RECIPE`.")
    found = best_checkpoint(p) or latest_checkpoint(p)
    if found is None:
        listed = ", ".join(sorted(x.name for x in p.iterdir())[:8]) or "nothing"
        raise CheckpointError(f"{p}: no checkpoint found (it holds: {listed}). "
                              f"Train with `fledge train RECIPE` first.")
    return found


def load_for_inference(path: str | Path, device: str | torch.device = "cpu"):
    """(model, tokenizer, recipe) from a run folder or a checkpoint folder, weights loaded, eval mode."""
    from fledge.model.registry import build_model
    from fledge.tokenizer import find_tokenizer_file, load_tokenizer
    from fledge.train.checkpoint import load_weights
    checkpoint = resolve_checkpoint(path)
    recipe = load_recipe(checkpoint / "recipe.yaml")
    tokenizer = load_tokenizer(find_tokenizer_file(checkpoint))
    vocab = json.loads((checkpoint / "state.json").read_text())["vocab_size"]
    model = build_model(recipe.model, vocab, tokenizer.bos_id, tokenizer.eos_id)
    load_weights(model, checkpoint)
    model.to(torch.device(device)).eval()
    return model, tokenizer, recipe


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    ids = tokenizer.encode(prompt)
    return ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + ids


def generate_text(model, tokenizer, prompt: str, config: SampleConfig, *, num_samples: int = 1, seed: int = 0,
                  device=None, precision=None, on_text: Callable[[int, str], None] | None = None) -> list[str]:
    """Complete `prompt` `num_samples` times; `on_text(i, piece)` receives text as it is generated."""
    device = device or next(model.parameters()).device
    ids = encode_prompt(tokenizer, prompt)
    idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    new: list[list[int]] = [[] for _ in range(num_samples)]
    shown = [""] * num_samples
    finished = [False] * num_samples
    autocast = precision.autocast(device) if precision else torch.autocast(device.type, enabled=False)
    with autocast:
        for column in model.generate(idx, config.max_new_tokens, config.temperature, config.top_k, config.top_p,
                                     tokenizer.eos_id, generator):
            for i, token in enumerate(column[:, 0].tolist()):
                if finished[i]:
                    continue
                if token == tokenizer.eos_id:
                    finished[i] = True
                    continue
                new[i].append(token)
                if on_text:
                    text = tokenizer.decode(new[i])
                    if not text.endswith("\ufffd"):      # wait for the rest of a multi-byte character
                        on_text(i, text[len(shown[i]):])
                        shown[i] = text
    texts = [tokenizer.decode(t) for t in new]
    if on_text:
        for i, text in enumerate(texts):
            if len(text) > len(shown[i]):
                on_text(i, text[len(shown[i]):])
    return texts


def sample(path: str | Path, prompt: str = "", *, max_new_tokens: int | None = None,
           temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
           num_samples: int = 1, seed: int = 0, device: str = "cpu",
           on_text: Callable[[int, str], None] | None = None) -> list[str]:
    """Load a run or checkpoint and sample; unset options take the recipe's `sample` section."""
    model, tokenizer, recipe = load_for_inference(path, device)
    config = _override(recipe, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
    return generate_text(model, tokenizer, prompt, config, num_samples=num_samples, seed=seed, on_text=on_text)


def _override(recipe: Recipe, **values) -> SampleConfig:
    return replace(recipe.sample, **{k: v for k, v in values.items() if v is not None})
