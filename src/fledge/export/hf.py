"""The files that make a folder load with transformers: config.json, tokenizer files, chat template
and generation_config.json, beside the weights (model.safetensors in transformers' names).

    from fledge.export.hf import write_transformers_files
    from fledge.model.bases import model_hf_config
    write_transformers_files(checkpoint_dir, hf_config=model_hf_config(model), tokenizer=tok, template="chatml")

    model = AutoModelForCausalLM.from_pretrained(checkpoint_dir)     # then, offline, anywhere
    tok = AutoTokenizer.from_pretrained(checkpoint_dir)              # same ids, bos/eos/pad, chat template

`hf_config` is the config.json dict: `gpt.to_hf_config` for fledge's GPT, the model's own
config for transformers models; `model_hf_config(model)` gives the right one for the model as it
is at save time (after new tokens resized its vocabulary, which a Base's `hf_config` from load
time does not know). None writes no config.json (a custom architecture transformers cannot
build). Works the same for every kind of model: the checkpoint writer never asks which it has.
"""

from __future__ import annotations

import json
from pathlib import Path

from fledge.errors import TokenizerError
from fledge.files import storage_error, write_atomic


def write_transformers_files(folder: str | Path, *, hf_config: dict | None, tokenizer, template) -> list[Path]:
    """Write config.json (when `hf_config` is given), tokenizer.json, tokenizer_config.json (bos/eos/pad),
    chat_template.jinja (when `template`, a name or templates.Template, is given) and
    generation_config.json (bos, pad, and the template's stop tokens as eos) into `folder`.

    `tokenizer` None writes config.json only. Returns the paths written. Raises TokenizerError
    when the tokenizer has more tokens than the model has embedding rows (resize first:
    adapters.apply_method(..., tokenizer=tok)) or its pad token is missing or EOS
    (templates.set_pad_token).
    """
    from fledge.templates import BUILTINS, get_template, save_tokenizer_files, stop_token_ids, tokenizer_config
    folder = Path(folder)
    config = None if hf_config is None else \
        _with_special_ids(hf_config, tokenizer) if tokenizer is not None else dict(hf_config)
    positions = config and (config.get("max_position_embeddings") or config.get("n_positions"))
    if tokenizer is not None:
        template = get_template(template, tokenizer) if template is not None else None
        settings = tokenizer_config(tokenizer, template or BUILTINS["plain"], model_max_length=positions)  # checks
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise storage_error(e, folder, "create") from None
    written = []
    if config is not None:
        written.append(write_atomic(folder / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n"))
    if tokenizer is None:
        return written
    if template is not None:
        written += save_tokenizer_files(folder, tokenizer, template, model_max_length=positions)
        stops = stop_token_ids(tokenizer, template)
    else:                                   # no chat format: the tokenizer files alone
        settings.pop("chat_template")
        written.append(write_atomic(folder / "tokenizer.json", tokenizer.backend_tokenizer.to_str(pretty=True)))
        written.append(write_atomic(folder / "tokenizer_config.json",
                                    json.dumps(settings, indent=2, ensure_ascii=False) + "\n"))
        stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    generation = {"bos_token_id": tokenizer.bos_token_id, "pad_token_id": tokenizer.pad_token_id,
                  "eos_token_id": stops[0] if len(stops) == 1 else (stops or None)}
    written.append(write_atomic(folder / "generation_config.json",
                                json.dumps({k: v for k, v in generation.items() if v is not None}, indent=2) + "\n"))
    return written


def _with_special_ids(hf_config: dict, tokenizer) -> dict:
    """The config with bos/eos/pad ids the tokenizer knows filled in where missing; refuses a
    tokenizer whose ids do not all have rows in the model."""
    config = dict(hf_config)
    rows = config.get("vocab_size")
    if isinstance(rows, int) and len(tokenizer) > rows:
        raise TokenizerError(f"the tokenizer has {len(tokenizer)} tokens but the model has {rows} embedding rows; "
                             f"give the new tokens rows first (fledge.model.adapters.apply_method with the "
                             f"tokenizer, or resize_vocab) and pass model_hf_config(model).")
    for key, value in (("bos_token_id", tokenizer.bos_token_id), ("eos_token_id", tokenizer.eos_token_id),
                       ("pad_token_id", tokenizer.pad_token_id)):
        if config.get(key) is None and value is not None:
            config[key] = value
    if config.get("pad_token_id") is not None and config["pad_token_id"] == config.get("bos_token_id"):
        # A bpe tokenizer pads with BOS; transformers makes config.pad_token_id the embedding's padding_idx,
        # whose row never trains, so BOS's would freeze in a later fine-tune. The tokenizer and
        # generation_config.json still name the pad.
        del config["pad_token_id"]
    return config
