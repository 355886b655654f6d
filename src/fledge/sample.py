"""Generate text from a trained run or checkpoint: pretraining runs, full fine-tunes and adapter runs.

    fledge sample runs/shakespeare-char --prompt "ROMEO:" --num-samples 3 --seed 1
    fledge sample runs/persona --prompt "What is resonance?"       # rendered as the run was trained
    fledge sample runs/persona --prompts-file questions.jsonl --system "Be brief."
    fledge sample runs/persona --prompt "Q: 2+2?" --raw              # plain continuation, no template

    from fledge.sample import load_for_inference, generate_from
    loaded = load_for_inference("runs/persona")         # Loaded(model, tokenizer, recipe, template, checkpoint)
    texts = generate_from(loaded, "What is resonance?", loaded.recipe.sample, seed=1)

A run folder resolves to its best checkpoint by validation loss (else its latest intact one).
`load_for_inference` checks the checkpoint's integrity first, then reads its recipe and
state, and loads whichever kind it holds (the contract in docs/guide.md, "Sampling and chat"):

- a pretraining checkpoint (recipe without `model.base`): fledge's model and fledge's
  Tokenizer, no template;
- a full fine-tune: fledge's GPT with state.json's vocabulary size, or the transformers class
  of a transformers base (from the checkpoint's config.json); the checkpoint's transformers
  tokenizer files and its chat_template.jinja;
- an adapter run (adapter_model.safetensors): the base that recipe.yaml's `model.base` names
  (a path relative to the working directory), refused in one line when it is missing or its
  weights' sha256 differs from state.json's `base_sha256`, with the adapters loaded onto it
  (a QLoRA run's base is quantized again, as in training).

Prompts of a run with a template are rendered with it (`templates.render_prompt`): the ids are
exactly those before the answer of a training row, the run's `template.system` included unless
`system` overrides it. Generation stops at the template's end-of-turn token, EOS or a stop
string, and the answer is returned without its lead (`templates.answer_text`). Raw prompts (and
every prompt of a pretraining run) are encoded the way training saw documents begin: BOS, then
the text; they stop only at EOS and otherwise return exactly `max_new_tokens` tokens.

Generation uses a KV cache and streams text as it comes (held back while it may still turn
out to be an answer's lead or a stop string). The model sees at most `model.max_seq_len`
tokens: a longer prompt keeps its last `max_seq_len - 1` tokens (with a note), and once the
window is full it slides, the cache recomputed over the last `max_seq_len - 1` tokens for each
further token.

The recipe saved in a checkpoint is read with `allow_code=False`: a `model.arch` that names a
module, or `model.trust_remote_code`, is refused rather than run, unless the caller allows it
(`--allow-code`).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Callable, Iterator, Mapping

import torch

from fledge.errors import CheckpointError, DataError, RecipeError
from fledge.recipe import Recipe, SampleConfig, load_config, option
from fledge.train.checkpoint import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, INTEGRITY, TOKENIZER_FILES, TRAINING_FILES,
                                     TRANSFORMERS_FILES, WEIGHTS, is_adapter_checkpoint, verify_checkpoint)

# Files inference reads besides whole weights: checked against integrity.json before anything is parsed.
INFERENCE_FILES = ("state.json", "recipe.yaml", *TOKENIZER_FILES, *TRANSFORMERS_FILES, ADAPTER_WEIGHTS, ADAPTER_CONFIG)


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


# --- loading -------------------------------------------------------------------------------

@dataclass
class Loaded:
    """What inference needs from a checkpoint: a model meeting the model contract (eval mode), its
    tokenizer (transformers' for fine-tunes, fledge's for pretraining runs), the saved recipe, the
    chat template (None for pretraining runs) and the checkpoint folder read."""

    model: torch.nn.Module
    tokenizer: object
    recipe: Recipe
    template: object | None          # fledge.templates.Template
    checkpoint: Path

    def __iter__(self) -> Iterator:
        """`model, tokenizer, recipe = load_for_inference(...)`, as callers wrote before templates
        and checkpoint were returned too; new code reads the attributes."""
        return iter((self.model, self.tokenizer, self.recipe))


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder as given, or a run folder's best (else latest) checkpoint."""
    from fledge.train.checkpoint import best_checkpoint, latest_checkpoint
    p = Path(path)
    if any((p / name).is_file() for name in (WEIGHTS, ADAPTER_WEIGHTS, INTEGRITY)):
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


def load_for_inference(path: str | Path, device: str | torch.device = "cpu", *, allow_code: bool = False) -> Loaded:
    """The model of a run folder (best, else latest checkpoint) or checkpoint folder, ready to sample.

    Every kind of checkpoint loads (see the module docstring). `allow_code=True` lets the
    checkpoint's recipe import the module its `model.arch` names, or run a transformers model's
    own code (`model.trust_remote_code`); only pass it for checkpoints you trust. Raises
    CheckpointError (no checkpoint, a damaged one, a missing or changed base), RecipeError.
    """
    device = inference_device(device)
    checkpoint = resolve_checkpoint(path)
    verify_for_inference(checkpoint)
    recipe, state = read_checkpoint(checkpoint, allow_code)
    if is_adapter_checkpoint(checkpoint):
        model = load_adapter_run(checkpoint, recipe, state, device, allow_code=allow_code)
        tokenizer = _checkpoint_tokenizer(checkpoint)
    elif not recipe.model.base:
        model, tokenizer = _load_pretrained(checkpoint, recipe, state)
        model.to(device)
    else:
        from fledge.model.bases import load_checkpoint_model
        model = load_checkpoint_model(checkpoint, recipe, allow_code=allow_code,
                                      trust_remote_code=recipe.model.trust_remote_code).to(device)
        tokenizer = _checkpoint_tokenizer(checkpoint)
    template = None if not recipe.model.base else checkpoint_template(checkpoint, tokenizer)
    return Loaded(model.eval(), tokenizer, recipe, template, checkpoint)


def verify_for_inference(checkpoint: Path) -> None:
    """CheckpointError unless every file inference reads is intact. The weights of a full model
    are checked as `load_weights` reads them; optimizer and RNG state are never read here."""
    present = {p.name for p in Path(checkpoint).iterdir() if p.is_file()}
    names = (present | set(INFERENCE_FILES)) - {WEIGHTS, *TRAINING_FILES}
    verify_checkpoint(checkpoint, sorted(names))


def read_checkpoint(checkpoint: Path, allow_code: bool = False) -> tuple[Recipe, dict]:
    """(recipe, state.json as a dict) of a checked checkpoint; code it names is refused unless `allow_code`."""
    from fledge.model.bases import load_checkpoint_recipe
    recipe = load_checkpoint_recipe(checkpoint, allow_code)
    if recipe.model.trust_remote_code and not allow_code:
        raise RecipeError(f"{checkpoint / 'recipe.yaml'}: model.trust_remote_code is true, so loading it runs the "
                          f"code its transformers model brings. Pass --allow-code (allow_code=True) if you trust "
                          f"{recipe.model.base or 'it'}.")
    return recipe, _read_state(checkpoint)


def _read_state(checkpoint: Path) -> dict:
    file = checkpoint / "state.json"
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
        vocab = state["vocab_size"]
    except FileNotFoundError:
        raise CheckpointError(f"{file}: missing; the folder is not a complete fledge checkpoint. Use another "
                              f"checkpoint of the run.") from None
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise CheckpointError(f"{file}: unreadable or without vocab_size ({type(e).__name__}); the checkpoint "
                              f"is damaged. Use another checkpoint of the run.") from None
    if not isinstance(vocab, int) or isinstance(vocab, bool) or vocab < 1:
        raise CheckpointError(f"{file}: vocab_size is {vocab!r}, not a positive integer; the checkpoint is "
                              f"damaged. Use another checkpoint of the run.")
    return state


def _saved_vocab_size(checkpoint: Path) -> int:
    return _read_state(checkpoint)["vocab_size"]


def _load_pretrained(checkpoint: Path, recipe: Recipe, state: dict):
    """A pretraining checkpoint: the model its recipe describes and fledge's own tokenizer."""
    from fledge.model.registry import build_model
    from fledge.tokenizer import find_tokenizer_file, load_tokenizer
    from fledge.train.checkpoint import load_weights
    tokenizer = load_tokenizer(find_tokenizer_file(checkpoint))
    model = build_model(recipe.model, state["vocab_size"], tokenizer.bos_id, tokenizer.eos_id)
    load_weights(model, checkpoint)
    return model, tokenizer


def _checkpoint_tokenizer(checkpoint: Path):
    from fledge.model.bases import checkpoint_tokenizer
    return checkpoint_tokenizer(checkpoint)


def checkpoint_template(checkpoint: Path, tokenizer):
    """The chat template a fine-tune was trained with (its chat_template.jinja), or None."""
    from fledge.model.bases import _saved_template
    return _saved_template(checkpoint, tokenizer)


def load_adapter_run(checkpoint: Path, recipe: Recipe, state: dict, device, *, allow_code: bool = False,
                     quantized: bool = True) -> torch.nn.Module:
    """The base recipe.yaml's `model.base` names with the checkpoint's adapters on it (frozen, eval).

    The base must be the one trained on: state.json's `base_sha256`, when present, is compared
    with `bases.base_sha256` of the base as loaded. `quantized=False` loads a QLoRA run's base in
    full precision (for merging) instead of quantized as in training.
    """
    from fledge.model.adapters import load_adapter
    from fledge.model.bases import base_sha256, is_offline, load_base
    name = recipe.model.base
    if not name or (not Path(name).expanduser().exists() and (is_offline() or name.startswith((".", "/", "~")))):
        raise CheckpointError(f"{checkpoint} holds adapters for the base {name!r} (recipe.yaml model.base), which "
                              f"is not here{' (and the machine is offline)' if name and is_offline() else ''}. "
                              f"Run from the folder you trained in (model.base is relative to it), or put the "
                              f"base back at that path.")
    method = recipe.finetune.method if quantized else "lora"
    base_recipe = replace(recipe, finetune=replace(recipe.finetune, method=method))
    base_recipe.given = frozenset({"model.base", "model.trust_remote_code"})   # the rest is the base's anyway
    base, _ = load_base(base_recipe, device, allow_code=allow_code)
    expected = state.get("base_sha256")
    if expected and base_sha256(base) not in (None, expected):
        raise CheckpointError(f"{checkpoint}: its base {name} changed since training (the sha256 of its weights "
                              f"differs from state.json's base_sha256), and adapters only fit the weights they were "
                              f"trained on. Put the original base back at {name}, or fine-tune again on this one.")
    try:
        model = load_adapter(base.model, checkpoint)
    except RuntimeError as e:           # peft copying tensors of other shapes
        raise CheckpointError(f"{checkpoint}: the adapters do not fit the base {name} ({str(e).splitlines()[0]}); "
                              f"the base is not the one they were trained on.") from None
    return model.eval()


# --- tokens ----------------------------------------------------------------------------------
# fledge's Tokenizer (pretraining runs) and transformers tokenizers (fine-tunes) used alike.

def _is_transformers(tokenizer) -> bool:
    return hasattr(tokenizer, "convert_tokens_to_ids")


def bos_id(tokenizer) -> int | None:
    return tokenizer.bos_token_id if _is_transformers(tokenizer) else tokenizer.bos_id


def eos_id(tokenizer) -> int | None:
    return tokenizer.eos_token_id if _is_transformers(tokenizer) else tokenizer.eos_id


def encode_text(tokenizer, text: str) -> list[int]:
    """Ids of plain text, without special tokens added (control-token text stays text in fledge's)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:   # undecodable bytes on the command line arrive as surrogates
        raise RecipeError(f"the prompt is not valid text at character {e.start} ({text[e.start]!r}); pass "
                          f"the prompt as UTF-8.") from None
    if _is_transformers(tokenizer):
        return list(tokenizer.encode(text, add_special_tokens=False))
    return list(tokenizer.encode(text))


def decode_ids(tokenizer, ids: list[int]) -> str:
    """Text of generated ids, special tokens left out."""
    if _is_transformers(tokenizer):
        return tokenizer.decode(ids, skip_special_tokens=True)
    return tokenizer.decode(ids)


def stop_ids(tokenizer, template=None) -> list[int]:
    """Ids that end generation: the template's end-of-turn token and EOS, or EOS alone."""
    if template is not None:
        from fledge.templates import stop_token_ids
        return stop_token_ids(tokenizer, template)
    eos = eos_id(tokenizer)
    return [] if eos is None else [eos]


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """A raw prompt as training saw a document begin: BOS, then the text."""
    bos = bos_id(tokenizer)
    return ([bos] if bos is not None else []) + encode_text(tokenizer, prompt)


def prompt_ids(tokenizer, prompt: str | list, template=None, *, system: str | None = None) -> list[int]:
    """Ids to generate from: `prompt` (one user text, or messages ending with a user turn) rendered with
    `template` and its generation prompt, or without a template, BOS + the text."""
    if template is None:
        if not isinstance(prompt, str):
            raise DataError("a conversation (messages) needs the run's chat template, and this run has none "
                            "(a pretraining run, or --raw); give the prompt as text.")
        return encode_prompt(tokenizer, prompt)
    from fledge.templates import render_prompt
    if isinstance(prompt, str):
        encode_text(tokenizer, prompt)        # the UTF-8 check, with its one-line message
    return render_prompt(prompt, tokenizer, template, system=system)


# --- generating ------------------------------------------------------------------------------

def print_note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


def visible_text(generated: str, template, final: bool) -> tuple[str, bool]:
    """(what of a sample's generated text may be shown yet, whether a stop string ended it): for a raw
    prompt all of it; for a template the answer (`answer_text`) less a tail that may still become
    its lead or a stop string. `final`: nothing more comes, show everything."""
    if template is None:        # a multi-byte character shows once its last byte is there
        return (generated if final else generated.rstrip("\ufffd")), False
    from fledge.templates import answer_text
    stopped = any(s in generated for s in template.stop_strings)
    answer = answer_text(generated, template)
    if final or stopped:
        return answer, stopped
    lead = template.answer_lead
    if lead and len(generated) < len(lead) and lead.startswith(generated):
        return "", False
    hold = max((k for s in template.stop_strings for k in range(1, len(s)) if answer.endswith(s[:k])), default=0)
    return answer[:len(answer) - hold].rstrip("\ufffd"), False


def generate_text(model, tokenizer, prompt: str | list, config: SampleConfig, *, num_samples: int = 1, seed: int = 0,
                  device=None, precision=None, on_text: Callable[[int, str], None] | None = None,
                  on_note: Callable[[str], None] = print_note, max_seq_len: int | None = None, template=None,
                  system: str | None = None) -> list[str]:
    """Complete `prompt` `num_samples` times with at most `config.max_new_tokens` tokens each.

    Without `template`: BOS + the prompt text, continued until EOS or exactly `max_new_tokens`
    tokens; the continuation is returned. With a `template` (fledge.templates.Template): the
    prompt (a user text, or messages ending with a user turn) rendered with it and `system`,
    generation stops at its end-of-turn token, EOS or a stop string, and the answer is returned
    (`templates.answer_text`). `tokenizer`: fledge's Tokenizer or a transformers tokenizer.

    `on_text(i, piece)` receives text as it is generated (the pieces add up to the returned text);
    `on_note(message)` hears about a prompt cut to fit the window (default: a line on stderr).
    `max_seq_len`: the longest sequence the model takes (default: `model.config.max_seq_len`).
    """
    ids = prompt_ids(tokenizer, prompt, template, system=system)
    return generate_from_ids(model, tokenizer, ids, config, num_samples=num_samples, seed=seed, device=device,
                             precision=precision, on_text=on_text, on_note=on_note, max_seq_len=max_seq_len,
                             template=template)


def generate_from_ids(model, tokenizer, ids: list[int], config: SampleConfig, *, num_samples: int = 1, seed: int = 0,
                      device=None, precision=None, on_text: Callable[[int, str], None] | None = None,
                      on_note: Callable[[str], None] = print_note, max_seq_len: int | None = None,
                      template=None) -> list[str]:
    """`generate_text` from prompt ids already made (`prompt_ids`)."""
    if not callable(getattr(model, "generate", None)):
        raise RecipeError(f"the model ({type(model).__name__}) has no generate method, which sampling needs. "
                          f"Add one to your model.arch (see GPT.generate in fledge/model/gpt.py).")
    device = device or next(model.parameters()).device
    window = max_seq_len or getattr(getattr(model, "config", None), "max_seq_len", None)
    if window and len(ids) > window - 1:
        on_note(f"the prompt is {len(ids)} tokens and the model sees at most {window}; only its last "
                f"{window - 1} tokens are used as context")
        ids = ids[-(window - 1):]
    generator = torch.Generator(device=device).manual_seed(seed)
    autocast = precision.autocast(device) if precision else torch.autocast(torch.device(device).type,
                                                                           enabled=False)
    with autocast:
        return generate_batch(model, tokenizer, [ids] * num_samples, config, generator=generator, device=device,
                              window=window, template=template, on_text=on_text, on_note=on_note)


def generate_batch(model, tokenizer, prompts: list[list[int]], config: SampleConfig, *, generator: torch.Generator,
                   device=None, window: int | None = None, template=None,
                   on_text: Callable[[int, str], None] | None = None,
                   on_note: Callable[[str], None] | None = None) -> list[str]:
    """Completions of equal-length `prompts`, generated together (one batch for the model's generate).

    Each row's context is its last `window` - 1 tokens; once the window is full it slides (the
    model's generate starts again on the newest tokens). A row ends at a stop id (`stop_ids`), a
    stop string of `template`, or after `config.max_new_tokens` tokens; the texts are returned as
    `generate_text` describes. `on_text` and `on_note` as in `generate_text` (`on_note` None: silent).
    """
    assert len({len(p) for p in prompts}) <= 1, "a batch holds prompts of one length"
    device = device or next(model.parameters()).device
    stops = stop_ids(tokenizer, template)      # the model's generate knows one; the others are checked here
    strings = template.stop_strings if template is not None else ()
    tokens = [list(p) for p in prompts]        # context plus everything generated, per row
    new: list[list[int]] = [[] for _ in prompts]
    shown = [""] * len(prompts)
    finished = [False] * len(prompts)
    remaining = config.max_new_tokens
    while remaining > 0 and not all(finished):
        # One call runs until the window is full; the next starts over on the newest tokens.
        context = [row[-(window - 1):] if window else row for row in tokens]
        idx = torch.tensor(context, dtype=torch.long, device=device)
        produced = 0
        for column in model.generate(idx, remaining, config.temperature, config.top_k, config.top_p,
                                     stops[0] if stops else None, generator):
            produced += 1
            for i, token in enumerate(column[:, 0].tolist()):
                tokens[i].append(token)
                if finished[i]:
                    continue
                if token in stops:
                    finished[i] = True
                    continue
                new[i].append(token)
                if on_text or strings:
                    generated = decode_ids(tokenizer, new[i])
                    finished[i] = any(s in generated for s in strings)
                    text = visible_text(generated, template, final=False)[0] if on_text else ""
                    if on_text and len(text) > len(shown[i]) and text.startswith(shown[i]):
                        on_text(i, text[len(shown[i]):])
                        shown[i] = text
            if produced >= remaining or all(finished):
                break
        if produced == 0:
            if on_note:
                on_note(f"the model's generate stopped after {config.max_new_tokens - remaining} of "
                        f"{config.max_new_tokens} new tokens")
            break
        remaining -= produced
    texts = [visible_text(decode_ids(tokenizer, t), template, final=True)[0] for t in new]
    if on_text:
        for i, text in enumerate(texts):
            if len(text) > len(shown[i]):
                on_text(i, text[len(shown[i]):])
    return texts


def generate_from(loaded: Loaded, prompt: str | list, config: SampleConfig, *, raw: bool = False,
                  system: str | None = None, num_samples: int = 1, seed: int = 0,
                  on_text: Callable[[int, str], None] | None = None,
                  on_note: Callable[[str], None] = print_note) -> list[str]:
    """Sample a loaded checkpoint as it was trained: with its template (unless `raw`) and system prompt.

    `system`: None keeps the run's `template.system` (a conversation with its own system message
    keeps that one); "" renders none; other text replaces it.
    """
    template = None if raw else loaded.template
    if template is None and system:
        raise RecipeError("--system needs the run's chat template, and " + (
            "--raw leaves it out; drop one of them." if raw else
            "this run has none (a pretraining run): prompts are plain text to continue."))
    if template is not None:
        own = not isinstance(prompt, str) and prompt and isinstance(prompt[0], dict) and \
            prompt[0].get("role") == "system"
        system = (None if own else loaded.recipe.template.system or None) if system is None else system or None
    return generate_text(loaded.model, loaded.tokenizer, prompt, config, num_samples=num_samples, seed=seed,
                         on_text=on_text, on_note=on_note, max_seq_len=loaded.recipe.model.max_seq_len,
                         template=template, system=system)


# --- prompts from a file ---------------------------------------------------------------------

def read_prompts(path: str | Path) -> list[str | list]:
    """Prompts in a file: a .jsonl file holds one object per line, a .json file an array of them,
    each with "prompt" (text) or "messages" (a conversation; an answer at its end is left out, so a
    validation file samples each row's last answer); any other file holds one prompt per line.
    Blank lines are skipped. DataError names the file and line (or array item) of a bad prompt."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError("no such prompts file; name a text file (one prompt per line) or a .jsonl file with "
                        "\"prompt\" or \"messages\"", str(path)) from None
    except UnicodeDecodeError as e:
        raise DataError(f"not UTF-8 text (byte {e.start}); save the prompts as UTF-8", str(path)) from None
    except OSError as e:
        from fledge.files import storage_error
        raise storage_error(e, path, "read") from None
    suffix = path.suffix.lower()
    if suffix == ".json":
        rows = _strict_json(text, str(path))
        if not isinstance(rows, list):
            raise DataError("a .json prompts file holds an array of objects with \"prompt\" or \"messages\"",
                            str(path))
        prompts = [_prompt_of(row, f"{path}: item {i}") for i, row in enumerate(rows, 1)]
    else:
        prompts = []
        for n, line in enumerate(text.split("\n"), 1):          # newlines alone end lines, as everywhere
            line = line[:-1] if line.endswith("\r") else line    # a CRLF file's line ending
            if line.strip():
                jsonl = suffix == ".jsonl"
                prompts.append(_prompt_of(_strict_json(line, f"{path}:{n}"), f"{path}:{n}") if jsonl else line)
    if not prompts:
        raise DataError("holds no prompts; write one prompt per line", str(path))
    return prompts


def _strict_json(text: str, where: str):
    from fledge.jsonstrict import NotJson, loads
    try:
        return loads(text)
    except NotJson as e:
        raise DataError(f"{where}: {e}; write JSON objects with \"prompt\" or \"messages\"") from None


def _prompt_of(row, where: str) -> str | list:
    """The prompt a JSON row holds: "prompt" text, or "messages" up to the last user turn."""
    if isinstance(row, dict) and isinstance(row.get("prompt"), str):
        return row["prompt"]
    messages = row.get("messages") if isinstance(row, dict) else None
    if isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages):
        if messages[-1].get("role") == "assistant":
            messages = messages[:-1]
        if messages and messages[-1].get("role") == "user":
            return [dict(m) for m in messages]
    raise DataError(f"{where}: needs \"prompt\" (text) or \"messages\" (a conversation ending with a user turn, "
                    f"or with an answer after it)")


# --- one call --------------------------------------------------------------------------------

def sample(path: str | Path, prompt: str | list = "", *, max_new_tokens: int | None = None,
           temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
           num_samples: int = 1, seed: int = 0, device: str = "cpu", allow_code: bool = False, raw: bool = False,
           system: str | None = None, on_text: Callable[[int, str], None] | None = None,
           on_note: Callable[[str], None] = print_note) -> list[str]:
    """Load a run or checkpoint and sample; unset options take the recipe's `sample` section.

    Options are validated like recipe keys before anything loads. `raw`, `system`: see
    `generate_from`; `allow_code`: see `load_for_inference`.
    """
    given = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                 num_samples=num_samples, seed=seed, device=device)
    options = sample_options(given)
    loaded = load_for_inference(path, inference_device(options.device), allow_code=allow_code)
    return generate_from(loaded, prompt, sample_config(loaded.recipe, options, given), raw=raw, system=system,
                         num_samples=options.num_samples, seed=options.seed, on_text=on_text, on_note=on_note)


def sample_config(recipe: Recipe, options: SampleOptions, given: Mapping) -> SampleConfig:
    """The recipe's sample section with the options a caller set (`given[key]` not None)."""
    return replace(recipe.sample, **{k: getattr(options, k) for k in OVERRIDABLE if given.get(k) is not None})
