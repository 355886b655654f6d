"""What a run that starts from a base (`model.base`) does differently from pretraining: the base
and its tokenizer, the chat template, added tokens, which weights train, the rows it reads, how
its checkpoints are saved and loaded again, and how it samples. The loop (fledge.train.loop)
stays the same for every mode.

    ft, recipe = load_finetune(recipe, device, allow_code=False, say=print)   # recipe: resolved
    source = row_batches(ft, recipe, say=print)                  # data.rows; or the corpus shards
    model = build_finetune_model(ft, recipe, start_from=None)    # apply_method, or a resume's adapters
    tensors, aliases, extra_files = checkpoint_contents(model, ft)
    texts = sample_answers(model, ft, recipe, prompts, seed=..., device=..., precision=...)

In order: `load_base` gives the base and the recipe with its model.* and tokenizer.* (what the
checkpoints save and what a resume compares). The template is `template.jinja`, else
`template.name`, else the one the base carries (a fledge fine-tune saves chat_template.jinja);
rows without any is one RecipeError. The tokenizer gets a pad token that is not EOS and the
template's tokens (`set_pad_token`, `add_template_tokens`); `apply_method` gives them embedding
rows (mean-initialised) that train, and makes full, LoRA or QLoRA train what it should.

Checkpoints (layout in fledge.train.checkpoint): full -> model.safetensors (fledge's names for
a fledge base, transformers' own for a transformers base); lora/qlora -> adapter_model.safetensors
and adapter_config.json only, with state.json's `base_sha256` naming the base. Every fine-tune
checkpoint gets the transformers files of its tokenizer and template
(`fledge.export.hf.write_transformers_files`). A fledge base's own tokenizer file is copied too
(a SentencePiece base keeps its tokenizer.model beside the tokenizer.json). Resuming a full run
loads the weights into the freshly built (resized) model; an adapter run loads its adapters onto
the base (`load_adapter(..., trainable=True)`), refused in one line if the base changed.

Sampling renders each prompt as a user turn with the run's template (`render_prompt`), generates
with the model's own `generate` and a generator of its own (never the global RNG: resume stays
exact), stops at the template's stop ids and keeps `answer_text`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from fledge.errors import CheckpointError, RecipeError
from fledge.recipe import Recipe


@dataclass
class FineTune:
    """A loaded base with the tokenizer and template the run trains with."""

    base: object                    # fledge.model.bases.Base
    tokenizer: object               # the base's transformers tokenizer, pad and template tokens added
    template: object | None         # templates.Template; None: continued pretraining without one
    added: list[str]                # tokens added to the tokenizer (they get embedding rows that train)
    base_sha256: str | None         # fledge.model.bases.base_sha256
    tokenizer_file: Path | None     # fledge's own tokenizer file of the base, copied into checkpoints
    method: str                     # finetune.method: full | lora | qlora

    @property
    def adapters(self) -> bool:
        """Whether the run trains adapters (lora, qlora) and saves only them."""
        return self.method != "full"


def load_finetune(recipe: Recipe, device, *, allow_code: bool = False,
                  say: Callable[[str], object] = print) -> tuple[FineTune, Recipe]:
    """The base `recipe.model.base` names, its template and tokenizer; and the resolved recipe."""
    from fledge.model.bases import base_sha256, base_tokenizer_file, load_base
    from fledge.templates import add_template_tokens, set_pad_token
    base, resolved = load_base(recipe, device, allow_code=allow_code)
    template = choose_template(resolved, base, say)
    tokenizer = base.tokenizer
    added = set_pad_token(tokenizer)
    if template is not None:
        added += add_template_tokens(tokenizer, template)
    if added:
        say(f"added {', '.join(added)} to the tokenizer of {base.path} (the template needs them"
            f"{'' if added != ['<|pad|>'] else ', or padding does'}); their embedding rows start at the mean row "
            f"and train")
    file = base_tokenizer_file(base) if base.kind == "fledge" else None
    ft = FineTune(base, tokenizer, template, added, base_sha256(base), file, resolved.finetune.method)
    return ft, resolved


def choose_template(recipe: Recipe, base, say: Callable[[str], object] = print):
    """template.jinja, else template.name ("base": the base's own), else the template the base carries;
    None for continued pretraining without one; RecipeError for rows without any."""
    from fledge.templates import BASE, BUILTINS, get_template
    t = recipe.template
    if t.jinja:
        return get_template(t.jinja, base.tokenizer)
    if t.name and t.name != BASE:
        return get_template(t.name, base.tokenizer)
    if base.chat_template is not None:
        if not t.name:
            say(f"template.name is empty: using the chat template base {recipe.model.base} carries "
                f"({base.chat_template.name})")
        return base.chat_template
    if t.name == BASE:
        return get_template(BASE, base.tokenizer)       # TemplateError saying why there is none to use
    if recipe.data.rows:
        raise RecipeError(f"template.name is empty and base {recipe.model.base} carries no chat template fledge "
                          f"can train with, so the rows cannot be rendered. Set template.name to one of "
                          f"{', '.join(BUILTINS)}, or give template.jinja.")
    return None


def row_batches(ft: FineTune, recipe: Recipe, say: Callable[[str], object] = print):
    """The rows of `data.rows` as batches, their statistics said before training starts."""
    from fledge.train.rows import build_row_batches
    source = build_row_batches(recipe, ft.tokenizer, ft.template, say=say)
    say(source.stats.format())
    return source


def check_corpus_tokenizer(ft: FineTune, recipe: Recipe, manifest: dict) -> None:
    """Continued pretraining: the prepared shards must hold the base's token ids."""
    file = ft.tokenizer_file
    if file is None:
        from fledge.model.bases import base_tokenizer_file
        file = base_tokenizer_file(ft.base)
    if file is None:
        raise RecipeError(f"model.base {recipe.model.base} with data.sources: continued pretraining needs the base's "
                          f"tokenizer as a file fledge can read (a BPE or WordLevel tokenizer.json with BOS and EOS, "
                          f"or a fledge tokenizer), and {ft.base.path} has none. Fine-tune on rows (data.rows) "
                          f"instead.")
    prepared = manifest.get("tokenizer", {}).get("sha256")
    if prepared != hashlib.sha256(file.read_bytes()).hexdigest():
        raise RecipeError(f"{recipe.prepared_path} holds a corpus tokenized with another tokenizer than base "
                          f"{recipe.model.base}'s ({file}). Prepare it again with `fledge prepare RECIPE` (which "
                          f"uses the base's tokenizer when model.base is set), or leave tokenizer.path unset.")


def check_prompts(ft: FineTune, recipe: Recipe) -> None:
    """Render the sample prompts once before training, so a bad one fails now and not at an evaluation."""
    from fledge.templates import render_prompt
    if ft.template is None:
        return
    for prompt in recipe.sample.prompts:
        render_prompt(prompt, ft.tokenizer, ft.template, system=recipe.template.system or None)


# --- the model ---------------------------------------------------------------------------------

def build_finetune_model(ft: FineTune, recipe: Recipe, start_from: Path | None) -> torch.nn.Module:
    """The model to train: `apply_method` on the base (full runs resume by loading weights into it),
    or, resuming an adapter run, the base with the checkpoint's adapters, trainable."""
    from fledge.model.adapters import apply_method, load_adapter
    if start_from is not None and ft.adapters:
        from fledge.train.checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS, verify_checkpoint
        start_from = Path(start_from)
        verify_checkpoint(start_from, [ADAPTER_WEIGHTS, ADAPTER_CONFIG, "state.json"])
        saved = _saved_base_sha256(start_from)
        if saved and ft.base_sha256 and saved != ft.base_sha256:
            raise CheckpointError(f"{start_from} holds adapters trained on another version of base "
                                  f"{recipe.model.base} (its weights changed since: sha256 differs). Resume with the "
                                  f"base as it was, or start a new run (--set name=<new name>).")
        return load_adapter(ft.base.model, start_from, trainable=True)
    return apply_method(ft.base.model, recipe.finetune, new_tokens=ft.added, tokenizer=ft.tokenizer)


def _saved_base_sha256(checkpoint: Path) -> str | None:
    try:
        value = json.loads((checkpoint / "state.json").read_text(encoding="utf-8")).get("base_sha256")
    except (OSError, ValueError, AttributeError):
        return None         # load_training_state names the damage
    return value if isinstance(value, str) else None


def embedding_rows(model: torch.nn.Module, tokenizer) -> int:
    """Rows of the model's token embedding (vocab_size of state.json), after any added tokens."""
    from fledge.model.bases import _unwrap
    config = getattr(_unwrap(model), "config", None)
    rows = getattr(config, "vocab_size", None)
    return rows if isinstance(rows, int) else len(tokenizer)


def tokenizer_sha256(tokenizer) -> str:
    """A hash of the tokenizer as trained (base vocabulary, added tokens, pad): a resume must rebuild it."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode("utf-8")).hexdigest()


def checkpoint_contents(model: torch.nn.Module, ft: FineTune):
    """(tensors or None, aliases, extra_files(folder)) for `save_checkpoint`: whole weights for a
    full fine-tune, adapters for LoRA and QLoRA, and the transformers files either way."""
    from fledge.export.hf import write_transformers_files
    from fledge.model.adapters import save_adapter
    from fledge.model.bases import model_hf_config
    from fledge.train.checkpoint import weights_to_save

    def transformers_files(folder: Path) -> None:
        write_transformers_files(folder, hf_config=model_hf_config(model), tokenizer=ft.tokenizer,
                                 template=ft.template)

    if not ft.adapters:
        tensors, aliases = weights_to_save(model)
        return tensors, aliases, transformers_files

    def adapter_files(folder: Path) -> None:
        save_adapter(model, folder)
        transformers_files(folder)

    return None, {}, adapter_files


# --- sampling ----------------------------------------------------------------------------------

def sample_answers(model: torch.nn.Module, ft: FineTune, recipe: Recipe, prompts: list[str], *, seed: int,
                   device, precision) -> list[str]:
    """One answer per prompt (a user turn in the run's template; plain text without one)."""
    from fledge.model.bases import _unwrap
    from fledge.templates import answer_text, render_prompt, stop_token_ids
    tok, template, config = ft.tokenizer, ft.template, recipe.sample
    window = getattr(getattr(_unwrap(model), "config", None), "max_seq_len", None)
    texts = []
    for i, prompt in enumerate(prompts):
        if template is not None:
            ids = render_prompt(prompt, tok, template, system=recipe.template.system or None)
            stops = set(stop_token_ids(tok, template))
        else:
            ids = ([tok.bos_token_id] if tok.bos_token_id is not None else []) + \
                tok.encode(prompt, add_special_tokens=False)
            stops = {tok.eos_token_id} - {None}
        if window:
            ids = ids[-(window - 1):]
        generator = torch.Generator(device=device).manual_seed(seed + i)
        new = []
        with precision.autocast(torch.device(device)):
            idx = torch.tensor([ids], dtype=torch.long, device=device)
            for column in model.generate(idx, config.max_new_tokens, config.temperature, config.top_k, config.top_p,
                                         None, generator):
                token = int(column[0, 0])
                if token in stops:
                    break
                new.append(token)
        text = tok.decode(new, skip_special_tokens=True)
        texts.append(answer_text(text, template) if template is not None else text)
    return texts
