"""Generate text from a trained run or checkpoint.

    fledge sample runs/shakespeare-char --prompt "ROMEO:" --num-samples 3 --seed 1

    from fledge.sample import load_for_inference, generate_text
    model, tokenizer, recipe = load_for_inference("runs/shakespeare-char")
    texts = generate_text(model, tokenizer, "ROMEO:", recipe.sample, seed=1)

A run folder resolves to its best checkpoint by validation loss (else its latest). The
prompt is encoded the way training saw documents begin: the BOS token, then the text.
Generation uses a KV cache, streams tokens as they come, and stops at EOS; otherwise it
returns exactly `max_new_tokens` tokens. The model sees at most `model.max_seq_len` tokens:
a longer prompt keeps its last `max_seq_len - 1` tokens (with a note), and once the window
is full it slides, the cache recomputed over the last `max_seq_len - 1` tokens for each
further token.

The recipe saved in a checkpoint is read with `allow_code=False`: a `model.arch` that names
a module is refused rather than imported, unless the caller allows it (`--allow-code`).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Callable, Mapping

import torch

from fledge.errors import CheckpointError, RecipeError
from fledge.recipe import SampleConfig, load_config, load_recipe, option


@dataclass
class SampleOptions(SampleConfig):
    """What one sampling call may set: the recipe's sample keys plus the ones only a call chooses."""
    num_samples: int = option(1, "independent samples", min=1)
    seed: int = option(0, "sampling seed: same seed, same text", min=0, max=2**63 - 1)
    device: str = option("cpu", "where to sample: cpu, cuda, cuda:N, mps, or auto (cuda > mps > cpu)")


# The recipe's sample keys a call may override (prompts come from the caller instead).
OVERRIDABLE = tuple(f.name for f in fields(SampleConfig) if f.name != "prompts")
DEVICE_TYPES = ("cpu", "cuda", "mps")


def sample_options(values: Mapping, names: Mapping[str, str] | None = None, source: str = "sample") -> SampleOptions:
    """`values` (None: unset) validated like recipe keys; every problem in one RecipeError.

    `names` maps keys to how the user wrote them (`{"top_p": "--top-p"}`) for the messages.
    """
    given = {k: v for k, v in values.items() if v is not None}

    def check_device(options: SampleOptions, problems: list[str]) -> None:
        if "device" in given and isinstance(given["device"], str):
            problem = device_problem(options.device, (names or {}).get("device", "device"))
            if problem:
                problems.append(problem)

    return load_config(SampleOptions, given, source, finish=check_device, names=names)


def device_problem(name: str, label: str = "device") -> str | None:
    """Why `name` is not a device this machine can sample on, or None."""
    if name == "auto":
        return None
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in DEVICE_TYPES:
        return f"{label} is {name!r}; choose cpu, cuda, cuda:N, mps or auto"
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            return f"{label} is {name!r} but no CUDA device is visible; use cpu (or auto)"
        if device.index is not None and device.index >= count:
            return f"{label} is {name!r} but this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        return f"{label} is {name!r} but Apple MPS is not available; use cpu (or auto)"
    return None


def inference_device(device: str | torch.device) -> torch.device:
    """A torch device from a name (auto: cuda > mps > cpu), or a RecipeError saying what to use."""
    if isinstance(device, torch.device):
        return device
    problem = device_problem(device) if isinstance(device, str) else f"device must be a string, got {device!r}"
    if problem:
        raise RecipeError(problem)
    if device == "auto":
        from fledge.env import pick_device
        return pick_device("auto")
    return torch.device(device)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder as given, or a run folder's best (else latest) checkpoint."""
    from fledge.train.checkpoint import best_checkpoint, latest_checkpoint
    p = Path(path)
    if (p / "model.safetensors").is_file():
        return p
    if not p.exists():
        raise CheckpointError(f"{p}: no such run or checkpoint folder. Runs live under runs/<name>; "
                              f"train one with `fledge train RECIPE`.")
    if not p.is_dir():
        raise CheckpointError(f"{p}: not a folder. Name a run folder (runs/<name>) or a checkpoint folder "
                              f"(runs/<name>/checkpoints/step-NNNNNN).")
    found = best_checkpoint(p) or latest_checkpoint(p)
    if found is None:
        listed = ", ".join(sorted(x.name for x in p.iterdir())[:8]) or "nothing"
        raise CheckpointError(f"{p}: no checkpoint found (it holds: {listed}). "
                              f"Train with `fledge train RECIPE` first.")
    return found


def load_for_inference(path: str | Path, device: str | torch.device = "cpu", *, allow_code: bool = False):
    """(model, tokenizer, recipe) from a run folder or a checkpoint folder, weights loaded, eval mode.

    `allow_code=True` lets the checkpoint's recipe import the module its `model.arch` names;
    only pass it for checkpoints you trust, as importing runs the module's code.
    """
    from fledge.model.registry import build_model
    from fledge.tokenizer import find_tokenizer_file, load_tokenizer
    from fledge.train.checkpoint import load_weights
    device = inference_device(device)
    checkpoint = resolve_checkpoint(path)
    if not (checkpoint / "recipe.yaml").is_file():
        raise CheckpointError(f"{checkpoint}: no recipe.yaml, so the model's shape is unknown; the folder is "
                              f"not a complete fledge checkpoint. Use another checkpoint of the run.")
    recipe = load_recipe(checkpoint / "recipe.yaml", allow_code=allow_code, check_machine=False)
    tokenizer = load_tokenizer(find_tokenizer_file(checkpoint))
    model = build_model(recipe.model, _saved_vocab_size(checkpoint), tokenizer.bos_id, tokenizer.eos_id)
    load_weights(model, checkpoint)
    model.to(device).eval()
    return model, tokenizer, recipe


def _saved_vocab_size(checkpoint: Path) -> int:
    file = checkpoint / "state.json"
    try:
        vocab = json.loads(file.read_text(encoding="utf-8"))["vocab_size"]
    except FileNotFoundError:
        raise CheckpointError(f"{file}: missing; the folder is not a complete fledge checkpoint. Use another "
                              f"checkpoint of the run.") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{file}: unreadable or without vocab_size ({type(e).__name__}); the checkpoint "
                              f"is damaged. Use another checkpoint of the run.") from None
    if not isinstance(vocab, int) or isinstance(vocab, bool) or vocab < 1:
        raise CheckpointError(f"{file}: vocab_size is {vocab!r}, not a positive integer; the checkpoint is "
                              f"damaged. Use another checkpoint of the run.")
    return vocab


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:   # undecodable bytes on the command line arrive as surrogates
        raise RecipeError(f"the prompt is not valid text at character {e.start} ({prompt[e.start]!r}); pass "
                          f"the prompt as UTF-8.") from None
    ids = tokenizer.encode(prompt)
    return ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + ids


def print_note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


def generate_text(model, tokenizer, prompt: str, config: SampleConfig, *, num_samples: int = 1, seed: int = 0,
                  device=None, precision=None, on_text: Callable[[int, str], None] | None = None,
                  on_note: Callable[[str], None] = print_note, max_seq_len: int | None = None) -> list[str]:
    """Complete `prompt` `num_samples` times with `config.max_new_tokens` tokens each (fewer only at EOS).

    `on_text(i, piece)` receives text as it is generated; `on_note(message)` hears about a prompt
    cut to fit the window (default: a line on stderr). `max_seq_len`: the longest sequence the
    model takes (default: `model.config.max_seq_len`).
    """
    if not callable(getattr(model, "generate", None)):
        raise RecipeError(f"the model ({type(model).__name__}) has no generate method, which sampling needs. "
                          f"Add one to your model.arch (see GPT.generate in fledge/model/gpt.py).")
    device = device or next(model.parameters()).device
    window = max_seq_len or getattr(getattr(model, "config", None), "max_seq_len", None)
    ids = encode_prompt(tokenizer, prompt)
    if window and len(ids) > window - 1:
        on_note(f"the prompt is {len(ids)} tokens and the model sees at most {window}; only its last "
                f"{window - 1} tokens are used as context")
        ids = ids[-(window - 1):]
    generator = torch.Generator(device=device).manual_seed(seed)
    tokens = [list(ids) for _ in range(num_samples)]     # context plus everything generated, per sample
    new: list[list[int]] = [[] for _ in range(num_samples)]
    shown = [""] * num_samples
    finished = [False] * num_samples
    remaining = config.max_new_tokens
    autocast = precision.autocast(device) if precision else torch.autocast(torch.device(device).type,
                                                                           enabled=False)
    with autocast:
        while remaining > 0 and not all(finished):
            # One call runs until the window is full; the next starts over on the newest tokens.
            context = [row[-(window - 1):] if window else row for row in tokens]
            idx = torch.tensor(context, dtype=torch.long, device=device)
            produced = 0
            for column in model.generate(idx, remaining, config.temperature, config.top_k, config.top_p,
                                         tokenizer.eos_id, generator):
                produced += 1
                for i, token in enumerate(column[:, 0].tolist()):
                    tokens[i].append(token)
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
                if produced >= remaining or all(finished):
                    break
            if produced == 0:
                on_note(f"the model's generate stopped after {config.max_new_tokens - remaining} of "
                        f"{config.max_new_tokens} new tokens")
                break
            remaining -= produced
    texts = [tokenizer.decode(t) for t in new]
    if on_text:
        for i, text in enumerate(texts):
            if len(text) > len(shown[i]):
                on_text(i, text[len(shown[i]):])
    return texts


def sample(path: str | Path, prompt: str = "", *, max_new_tokens: int | None = None,
           temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
           num_samples: int = 1, seed: int = 0, device: str = "cpu", allow_code: bool = False,
           on_text: Callable[[int, str], None] | None = None,
           on_note: Callable[[str], None] = print_note) -> list[str]:
    """Load a run or checkpoint and sample; unset options take the recipe's `sample` section.

    Options are validated like recipe keys before anything loads. `allow_code`: see
    `load_for_inference`.
    """
    given = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                 num_samples=num_samples, seed=seed, device=device)
    options = sample_options(given)
    model, tokenizer, recipe = load_for_inference(path, inference_device(options.device), allow_code=allow_code)
    config = replace(recipe.sample, **{k: getattr(options, k) for k in OVERRIDABLE if given[k] is not None})
    return generate_text(model, tokenizer, prompt, config, num_samples=options.num_samples, seed=options.seed,
                         on_text=on_text, on_note=on_note, max_seq_len=recipe.model.max_seq_len)
