"""Bases to fine-tune from, and transformers models behind fledge's model contract.

    base, recipe = load_base(recipe, device)          # recipe.model.* now describe the base
    logits, loss = base.model(input_ids, labels, reduction="sum", position_ids=p, document_ids=d)
    base.tokenizer, base.chat_template, base.kind, base.path
    write_transformers_files(folder, hf_config=model_hf_config(model), ...)   # fledge.export.hf

`recipe.model.base` names one of:

- a fledge run folder (its best checkpoint, else its latest) or checkpoint folder: fledge's
  model is built from the checkpoint's own recipe.yaml and loaded with its integrity checked;
  the tokenizer is the checkpoint's, with its chat template if it saved one.
- a transformers model folder (config.json with a `model_type`, no fledge state.json), loaded
  with `AutoModelForCausalLM` / `AutoTokenizer` and wrapped in `TransformersLM`.
- a hub id, fetched by transformers only when the machine is not offline (HF_HUB_OFFLINE).

The base's architecture and tokenizer are inherited: the returned recipe's `model.*` keys are
the base's, and a key the recipe itself set (`recipe.given`) that contradicts the base is a
RecipeError naming both values. `model.dropout` may differ (fine-tuning dropout is free),
`model.base` and `model.trust_remote_code` are the recipe's own. A transformers base sets
`model.arch: transformers` (registered in fledge.model.registry), so a fine-tune's saved recipe
says which kind of model its checkpoint holds; `load_checkpoint_model` loads either kind.

Packing in `TransformersLM` (measured with transformers 5.24 on CPU, llama, qwen2, gemma,
gpt2, gpt_neox, opt, phi; tests/unit/model/test_bases.py pins it): every family gets an
additive float (B, 1, T, T) mask built from `document_ids` (transformers passes a 4D mask
through untouched, on both sdpa and eager attention) plus `position_ids` restarting per row,
which RoPE families and the learned absolute positions of gpt2 and opt both need, and
`use_cache=False`. The traps this avoids: with `use_cache=True` (the config default) or any 2D
attention mask, transformers' packed-sequence detection from position_ids is off and examples
see each other (on tiny random models the later example's logits move by 0.03-0.25); opt never
detects packing from positions; a boolean 4D mask on eager attention masks nothing; flex
attention has no CPU backward.

QLoRA (`finetune.method: qlora`) loads the base quantized by transformers with a
`BitsAndBytesConfig`: nf4 (compute dtype bf16 where the device computes it natively, else
fp32) or int8. A fledge base goes the same way: its checkpoint folder is a transformers llama
folder (config.json + model.safetensors, equal logits), so the quantized model is a
`LlamaForCausalLM`; `merge_adapter` folds the adapters into the unquantized fledge model again.
On CPUs with AVX-512 BF16, bitsandbytes repacks 4-bit weights for inference during any
no-grad eval-mode forward and never undoes it, after which gradients stop flowing through
those layers (LoRA A/B of earlier layers got None); `adapters.keep_trainable` turns that
repacking off (eval passes then run the training kernel; tests pin a LoRA step after an eval).
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from fledge.errors import CheckpointError, RecipeError
from fledge.recipe import ModelConfig, Recipe, TokenizerConfig, load_recipe

TRANSFORMERS_ARCH = "transformers"   # model.arch of a recipe whose base is a transformers model
# model.* keys that may differ from the base's: where the base is, code permission, dropout.
FREE_MODEL_KEYS = {"model.base", "model.trust_remote_code", "model.dropout"}
# transformers config keys that hold a dropout probability (names differ between families).
DROPOUT_KEYS = ("dropout", "attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop",
                "resid_dropout", "embed_dropout")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


@dataclass
class Base:
    """A loaded base: a model meeting the model contract, its tokenizer and where it came from."""

    model: nn.Module                 # GPT, a custom fledge arch, or TransformersLM
    tokenizer: object                # a transformers tokenizer (fledge's wrapped by templates.hf_tokenizer)
    kind: str                        # "fledge" | "transformers"
    path: Path                       # the folder loaded (a fledge checkpoint folder, or the transformers folder)
    chat_template: object | None     # templates.Template the base carries, if any
    hf_config: dict | None           # config.json content for checkpoints (None: a custom fledge arch)


@dataclass(frozen=True)
class Origin:
    """Where a TransformersLM's weights came from, to load them again unquantized (merge_adapter)."""

    kind: str                        # "fledge": a fledge llama checkpoint; "transformers": a transformers folder
    path: str
    trust_remote_code: bool = False


@dataclass(frozen=True)
class LMShape:
    """What the loop and the sampler read from `model.config`, as from GPTConfig."""

    vocab_size: int
    max_seq_len: int
    dim: int
    n_layers: int


# --- transformers models behind the model contract -------------------------------------------

class TransformersLM(nn.Module):
    """A transformers causal LM with fledge's forward contract (labels already shifted), packing
    by `document_ids`, `generate` yielding (B, 1) columns, `num_parameters`, `flops_per_token`.

    `state_dict()` and `load_state_dict()` use the transformers model's own names (no `hf.`
    prefix), so a checkpoint's model.safetensors loads with `AutoModelForCausalLM.from_pretrained`.
    peft adapters go on `self.hf` (see fledge.model.adapters), which keeps adapter files in
    transformers' naming.
    """

    def __init__(self, hf_model: nn.Module, origin: Origin | None = None):
        super().__init__()
        self.hf = hf_model
        self.origin = origin

    @property
    def config(self) -> LMShape:
        c = self.hf.config
        positions = getattr(c, "max_position_embeddings", None) or 2 ** 31
        return LMShape(c.vocab_size, positions, c.hidden_size, c.num_hidden_layers)

    def state_dict(self, *args, **kwargs):
        return self.hf.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.hf.load_state_dict(state_dict, strict=strict, assign=assign)

    def forward(self, input_ids, labels=None, cache=None, *, reduction: str = "mean", position_ids=None,
                document_ids=None, logits: bool = True):
        """As GPT.forward: input_ids (B, T); labels (B, T) already shifted, -100 ignored; position_ids
        and document_ids (B, T) for packed rows (a token attends to earlier tokens of its own
        document only). Returns (logits (B, T, vocab), loss or None). `cache` is not supported:
        use `generate`. `logits=False`: (None, loss), the head run only at sequence positions where
        some row has a target (transformers' `logits_to_keep`), when the model takes it."""
        if cache is not None:
            raise ValueError("TransformersLM keeps its KV cache inside generate(); call forward without cache")
        B, T = input_ids.shape
        mask = None
        if document_ids is not None or position_ids is not None:
            if document_ids is None:
                document_ids = torch.zeros_like(input_ids)
            if position_ids is None:
                position_ids = positions_from_documents(document_ids)
            mask = additive_document_mask(document_ids, self._compute_dtype(input_ids))
        keep = {}
        if not logits and labels is not None and reduction != "none" and self._keeps_logits():
            columns = (labels != -100).any(0).nonzero().squeeze(1)          # positions where some row has a target
            keep, labels = {"logits_to_keep": columns}, labels[:, columns]
        out = self.hf(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False, **keep)
        if labels is None:
            return out.logits, None
        loss = F.cross_entropy(out.logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                               reduction=reduction)
        if keep:
            return None, loss
        return out.logits, loss.view(B, T) if reduction == "none" else loss

    def _keeps_logits(self) -> bool:
        return "logits_to_keep" in inspect.signature(_unwrap(self.hf).forward).parameters

    def _compute_dtype(self, input_ids) -> torch.dtype:
        device = input_ids.device.type
        if torch.is_autocast_enabled(device):
            return torch.get_autocast_dtype(device)
        # the first floating weight (the embedding's): asking a peft token wrapper for .weight builds a copy
        return next(p.dtype for p in self.hf.parameters() if p.is_floating_point())

    def num_parameters(self, non_embedding: bool = False) -> int:
        n = sum(_numel(p) for p in self.parameters())
        if non_embedding:
            n -= _numel(self.hf.get_input_embeddings().weight)
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """6 per weight of every matmul (the output head included, tied or not) plus
        6 * n_layers * attention width * seq_len for causal attention, as GPT.flops_per_token."""
        c = self.hf.config
        heads, head_dim = getattr(c, "num_attention_heads", None), getattr(c, "head_dim", None)
        width = heads * head_dim if heads and head_dim else c.hidden_size
        return 6 * matmul_weights(self) + 6 * c.num_hidden_layers * width * seq_len

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 eos_id: int | None = None, generator: torch.Generator | None = None):
        """Yields one (B, 1) tensor of new tokens at a time, reusing transformers' KV cache; stops at
        eos_id (rows already done repeat it) or when the model's max positions are reached."""
        from fledge.model.gpt import sample_next
        was_training = self.training
        self.eval()
        limit = self.config.max_seq_len
        if idx.shape[1] >= limit:
            idx = idx[:, -(limit - 1):]
        steps = min(max_new_tokens, limit - idx.shape[1])
        done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        # transformers 5.24 renamed past_key_values to cache (the old name warns, and goes in 5.40)
        forward = _unwrap(self.hf).forward
        cache = "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"
        try:
            out = self.hf(input_ids=idx, use_cache=True)
            for step in range(steps):
                nxt = sample_next(out.logits[:, -1, :].float(), temperature, top_k, top_p, generator)   # (B, 1)
                if eos_id is not None:
                    nxt = torch.where(done[:, None], torch.full_like(nxt, eos_id), nxt)
                    done |= nxt[:, 0] == eos_id
                yield nxt
                if bool(done.all()) or step == steps - 1:
                    return
                out = self.hf(input_ids=nxt, use_cache=True, **{cache: getattr(out, cache)})
        finally:
            self.train(was_training)


def positions_from_documents(document_ids):
    """Positions restarting at 0 wherever the document id changes: (B, T) -> (B, T)."""
    T = document_ids.shape[1]
    index = torch.arange(T, device=document_ids.device).expand_as(document_ids)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    start_index = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - start_index


def additive_document_mask(document_ids, dtype: torch.dtype):
    """(B, 1, T, T) float mask: 0 where a token may attend (itself and earlier tokens of its document),
    the dtype's minimum elsewhere. Additive, because eager attention ignores a boolean mask's meaning."""
    T = document_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=document_ids.device).tril()
    allowed = causal & (document_ids[:, :, None] == document_ids[:, None, :])          # (B, T, T)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=document_ids.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def _numel(p: torch.Tensor) -> int:
    """Parameters a tensor stands for: a packed 4-bit tensor holds two per byte (its quant_state knows)."""
    state = getattr(p, "quant_state", None)
    return math.prod(state.shape) if state is not None else p.numel()


def matmul_weights(model: nn.Module) -> int:
    """Weights of every matmul module (nn.Linear and its quantized subclasses, transformers' Conv1D)."""
    from transformers.pytorch_utils import Conv1D
    total = 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            total += m.in_features * m.out_features
        elif isinstance(m, Conv1D):
            total += m.weight.numel()
    return total


def model_hf_config(model: nn.Module) -> dict | None:
    """config.json for `model` as it is now (vocabulary resized, adapters merged or not): GPT's
    LlamaConfig, a transformers model's own config without its quantization; None for a custom arch."""
    from fledge.model.gpt import GPT, to_hf_config
    inner = _unwrap(model)
    if isinstance(inner, GPT):
        return to_hf_config(inner.config)
    if isinstance(inner, TransformersLM):
        config = inner.hf.config.to_dict()
        config.pop("quantization_config", None)
        return config
    return None


def _unwrap(model: nn.Module) -> nn.Module:
    """The model under a peft wrapper (PeftModel.get_base_model), or the model itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


# --- load_base -------------------------------------------------------------------------------

def load_base(recipe: Recipe, device="cpu", *, allow_code: bool = False) -> tuple[Base, Recipe]:
    """The base `recipe.model.base` names, on `device`, and the recipe with its model.* keys.

    The recipe is checked against the base before any weights load. `allow_code` lets a fledge
    base's saved recipe import the module its model.arch names. With `finetune.method: qlora`
    the base is loaded quantized (see the module docstring). The tokenizer's pad token and any
    template tokens are the caller's: `templates.set_pad_token` and `add_template_tokens`, then
    `adapters.apply_method(..., new_tokens=..., tokenizer=...)`. Raises RecipeError (contradicting
    keys, a base that is no decoder-only model), CheckpointError (a damaged checkpoint),
    DependencyError (qlora without bitsandbytes).
    """
    name = recipe.model.base
    if not name:
        raise RecipeError("model.base is empty; name a fledge run or checkpoint folder, a transformers model "
                          "folder, or a hub id")
    device = torch.device(device)
    quant_bits = recipe.finetune.quant_bits if recipe.finetune.method == "qlora" else None
    if quant_bits:
        from fledge.model.adapters import require_bitsandbytes
        require_bitsandbytes(device)
    where, saved, hf_config = _locate(name, recipe.model.trust_remote_code, allow_code)
    if saved is not None:
        model_config, tokenizer_config = saved.model, saved.tokenizer
    else:
        model_config = _model_config_of(hf_config)
        tokenizer_config = TokenizerConfig()
    problems = _contradictions(recipe, model_config, tokenizer_config, where if saved is not None else None)
    if len(problems) == 1:
        raise RecipeError(f"model.base {name}: the recipe contradicts the base, whose architecture and tokenizer "
                          f"a fine-tune inherits ({problems[0]}). Remove that key from the recipe.")
    if problems:
        raise RecipeError(f"model.base {name}: the recipe contradicts the base, whose architecture and tokenizer "
                          f"a fine-tune inherits. Remove these keys from the recipe:\n"
                          + "\n".join(f"  - {p}" for p in problems))
    dropout = recipe.model.dropout if "model.dropout" in recipe.given else None
    if saved is not None:
        base = _load_fledge(where, saved, recipe, device, allow_code, quant_bits, dropout)
    else:
        base = _load_transformers(where, hf_config, recipe, device, quant_bits, dropout)
    model_config = dataclasses.replace(model_config, base=name, trust_remote_code=recipe.model.trust_remote_code,
                                       dropout=model_config.dropout if dropout is None else dropout)
    model_config.code_allowed = allow_code
    resolved = dataclasses.replace(recipe, model=model_config, tokenizer=tokenizer_config)
    resolved.given = recipe.given
    return base, resolved


def resolve_base_tokenizer(recipe: Recipe, *, allow_code: bool = False) -> Recipe:
    """Continued pretraining (data.sources with model.base): the recipe with tokenizer.path (and kind)
    set to the base's tokenizer file, so `fledge prepare` tokenizes the corpus as the base reads
    text. Any other recipe, or one that sets tokenizer.path itself (load_base checks it against the
    base), comes back as it is. RecipeError when fledge cannot read the base's tokenizer."""
    if not recipe.model.base or not recipe.data.sources or "tokenizer.path" in recipe.given:
        return recipe
    where, saved, _ = _locate(recipe.model.base, recipe.model.trust_remote_code, allow_code)
    file, why = _readable_tokenizer(Path(where), fledge=saved is not None)
    if file is None:
        raise RecipeError(f"model.base {recipe.model.base!r} with data.sources: continued pretraining tokenizes the "
                          f"corpus with the base's tokenizer, and {why}. Fine-tune on rows (data.rows) instead, or "
                          f"name a base whose tokenizer.json is a BPE or WordLevel file with BOS and EOS tokens.")
    from fledge.tokenizer import load_tokenizer
    kind = load_tokenizer(file).kind
    resolved = dataclasses.replace(recipe, tokenizer=dataclasses.replace(recipe.tokenizer, path=str(file), kind=kind))
    resolved.given = recipe.given
    return resolved


def base_tokenizer_file(base: Base) -> Path | None:
    """The base's tokenizer as a file fledge's own tokenizer reads (for corpus shards), or None."""
    return _readable_tokenizer(base.path, fledge=base.kind == "fledge")[0]


def _readable_tokenizer(folder: Path, *, fledge: bool) -> tuple[Path | None, str]:
    """(fledge tokenizer file of a base folder, "") or (None, why there is none)."""
    from fledge.errors import FledgeError
    from fledge.tokenizer import find_tokenizer_file, load_tokenizer
    if not folder.is_dir():
        return None, "the base is not a local folder"
    try:
        file = find_tokenizer_file(folder) if fledge else folder / "tokenizer.json"
        if not file.is_file():
            return None, f"{folder} has no tokenizer.json"
        load_tokenizer(file)
    except FledgeError as e:
        return None, f"fledge cannot read its tokenizer ({_first_line(e)})"
    return file, ""


def base_sha256(base: Base) -> str | None:
    """A hash of the base's weights, to refuse adapters on a base that changed: of a fledge
    checkpoint's integrity.json (which holds its files' hashes) or model.safetensors, of a
    transformers folder's weight files; None for a hub id (not a folder here)."""
    from fledge.train.checkpoint import INTEGRITY, WEIGHTS, _sha256_file
    folder = Path(base.path)
    if not folder.is_dir():
        return None
    if base.kind == "fledge":
        files = [folder / INTEGRITY] if (folder / INTEGRITY).is_file() else [folder / WEIGHTS]
    else:
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin", ".pt"))
    sha = hashlib.sha256()
    for file in files:
        sha.update(f"{file.name}\0{_sha256_file(file)}\n".encode())
    return sha.hexdigest()


def _locate(name: str, trust: bool, allow_code: bool):
    """(checkpoint, its recipe, None) for a fledge base; (folder or hub id, None, transformers config) else."""
    path = Path(name).expanduser()
    if path.is_dir() and _is_fledge_folder(path):
        from fledge.sample import resolve_checkpoint
        checkpoint = resolve_checkpoint(path)
        return checkpoint, load_checkpoint_recipe(checkpoint, allow_code), None
    if path.is_dir() and (path / "config.json").is_file():
        return str(path), None, _read_hf_config(str(path), trust)
    if path.exists():
        raise RecipeError(f"model.base {name!r} is neither a fledge run or checkpoint (no checkpoints/, state.json "
                          f"or model.safetensors) nor a transformers model folder (no config.json); it holds: "
                          f"{_listing(path)}. Name a run (runs/<name>), a checkpoint, or a transformers folder.")
    if not HUB_ID.fullmatch(name) or name.startswith((".", "~")):
        raise RecipeError(f"model.base {name!r}: no such folder. Name a fledge run (runs/<name>), a checkpoint "
                          f"folder, or a transformers model folder.")
    if is_offline():
        raise RecipeError(f"model.base {name!r}: no such folder, and the machine is offline (HF_HUB_OFFLINE), so "
                          f"it cannot be fetched from the hub. Download the model into a folder and name that "
                          f"folder, or unset HF_HUB_OFFLINE.")
    import sys
    print(f"note: model.base {name!r} is no folder here; fetching it from the Hugging Face hub (set "
          f"HF_HUB_OFFLINE=1 to forbid downloads)", file=sys.stderr, flush=True)
    return name, None, _read_hf_config(name, trust)


def _is_fledge_folder(path: Path) -> bool:
    return (path / "state.json").is_file() or (path / "checkpoints").is_dir() or \
        ((path / "model.safetensors").is_file() and (path / "recipe.yaml").is_file())


def _listing(path: Path) -> str:
    if not path.is_dir():
        return "a file, not a folder"
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    return ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "") if names else "nothing"


def is_offline() -> bool:
    """HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE set now or when huggingface_hub was imported."""
    from huggingface_hub import constants
    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return constants.HF_HUB_OFFLINE or any(f and f.strip().upper() in ("1", "ON", "YES", "TRUE") for f in flags)


def _contradictions(recipe: Recipe, model_config: ModelConfig, tokenizer_config: TokenizerConfig,
                    checkpoint: Path | None) -> list[str]:
    """'key: recipe X, base P has Y' for every key the recipe set that the base decides otherwise
    (`checkpoint`: the fledge base's checkpoint folder, None for a transformers base)."""
    out = []
    where = f"base {recipe.model.base}"
    for key in sorted(recipe.given):
        section, _, field = key.partition(".")
        if section not in ("model", "tokenizer") or not field or "." in field or key in FREE_MODEL_KEYS:
            continue
        mine = getattr(getattr(recipe, section), field, None)
        theirs = getattr(model_config if section == "model" else tokenizer_config, field, None)
        if key == "tokenizer.path" and mine:
            problem = _other_tokenizer(Path(mine), checkpoint)
            if problem:
                out.append(f"tokenizer.path: recipe {mine}, {where} {problem}")
        elif mine != theirs:
            out.append(f"{key}: recipe {mine!r}, {where} has {theirs!r}")
    limit = model_config.max_seq_len
    for key, value in (("train.block_size", recipe.train.block_size),
                       ("finetune.max_length", recipe.finetune.max_length)):
        if value > limit:
            out.append(f"{key}: recipe {value}, {where} takes at most {limit} tokens (model.max_seq_len)")
    return out


def _other_tokenizer(file: Path, checkpoint: Path | None) -> str | None:
    """Why the tokenizer file a recipe names is not the base's, or None when it is the same file."""
    if not file.is_file():
        return "names no file, and the tokenizer comes from the base"
    if checkpoint is None:
        return "is a transformers model that brings its own tokenizer"
    from fledge.tokenizer import find_tokenizer_file
    theirs = find_tokenizer_file(checkpoint)
    if hashlib.sha256(file.read_bytes()).digest() != hashlib.sha256(theirs.read_bytes()).digest():
        return f"was trained with another tokenizer ({theirs})"
    return None


# --- fledge bases ----------------------------------------------------------------------------

def _load_fledge(checkpoint: Path, saved: Recipe, recipe: Recipe, device, allow_code: bool,
                 quant_bits: int | None, dropout: float | None) -> Base:
    trust = recipe.model.trust_remote_code
    if quant_bits and saved.model.arch == TRANSFORMERS_ARCH:      # a fine-tune of a transformers model
        config = _read_hf_config(str(checkpoint), trust)
        set_dropout(config, dropout, f"base {checkpoint}")
        model = TransformersLM(_quantized_from_folder(checkpoint, quant_bits, trust, device, config=config),
                               Origin("transformers", str(checkpoint), trust))
    elif quant_bits:
        if dropout:
            raise RecipeError(f"model.dropout {dropout} with finetune.method qlora on fledge base {checkpoint}: the "
                              f"quantized model (transformers' LlamaForCausalLM) has no residual dropout. Set "
                              f"model.dropout: 0 and use finetune.lora_dropout instead.")
        if not (checkpoint / "config.json").is_file():
            raise RecipeError(f"finetune.method qlora: base {checkpoint} (model.arch {saved.model.arch}) has no "
                              f"config.json, so transformers cannot quantize it. Use finetune.method lora.")
        model = TransformersLM(_quantized_from_folder(checkpoint, quant_bits, False, device),
                               Origin("fledge", str(checkpoint)))
    else:
        model = load_checkpoint_model(checkpoint, saved, allow_code=allow_code, trust_remote_code=trust,
                                      dropout=dropout).to(device)
    tokenizer = checkpoint_tokenizer(checkpoint)
    return Base(model, tokenizer, "fledge", checkpoint, _saved_template(checkpoint, tokenizer), model_hf_config(model))


def load_checkpoint_recipe(checkpoint: Path, allow_code: bool = False) -> Recipe:
    """A checkpoint's recipe.yaml, read without importing code unless `allow_code`."""
    if not (checkpoint / "recipe.yaml").is_file():
        raise CheckpointError(f"{checkpoint}: no recipe.yaml, so the model's shape is unknown; the folder is not "
                              f"a complete fledge checkpoint. Use another checkpoint of the run.")
    return load_recipe(checkpoint / "recipe.yaml", allow_code=allow_code, check_machine=False)


def load_checkpoint_model(checkpoint: Path, saved: Recipe, *, allow_code: bool = False,
                          trust_remote_code: bool = False, dropout: float | None = None) -> nn.Module:
    """The model of a fledge checkpoint with its weights loaded and checked, on CPU.

    Built from `saved.model` (the checkpoint's recipe, see `load_checkpoint_recipe`), or, for a
    fine-tune of a transformers model (model.arch transformers), from the checkpoint's own
    config.json. `dropout` replaces the saved dropout. Usable by inference as well as load_base.
    """
    from fledge.model.registry import build_model
    from fledge.sample import _saved_vocab_size
    from fledge.train.checkpoint import load_weights, verify_checkpoint
    if saved.model.arch == TRANSFORMERS_ARCH:
        from transformers import AutoConfig, AutoModelForCausalLM
        verify_checkpoint(checkpoint, ["config.json"])
        config = AutoConfig.from_pretrained(checkpoint, trust_remote_code=trust_remote_code, local_files_only=True)
        set_dropout(config, dropout, f"base {checkpoint}")
        model = TransformersLM(AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code),
                               Origin("transformers", str(checkpoint), trust_remote_code))
    else:
        from fledge.tokenizer import find_tokenizer_file, load_tokenizer
        tok = load_tokenizer(find_tokenizer_file(checkpoint))
        config = saved.model if dropout is None else dataclasses.replace(saved.model, dropout=dropout)
        model = build_model(config, _saved_vocab_size(checkpoint), tok.bos_id, tok.eos_id, allow_code=allow_code)
    load_weights(model, checkpoint)
    return model


def checkpoint_tokenizer(checkpoint: Path):
    """A fledge checkpoint's tokenizer as a transformers tokenizer: the files `write_transformers_files`
    wrote (added tokens, pad, template) when present, else fledge's own tokenizer file."""
    from fledge.templates import hf_tokenizer
    if (checkpoint / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
    return hf_tokenizer(checkpoint)


def _saved_template(checkpoint: Path, tokenizer):
    """The chat template a checkpoint carries (chat_template.jinja), as a Template, or None."""
    from fledge.templates import BUILTINS, get_template
    file = checkpoint / "chat_template.jinja"
    if not file.is_file():
        return None
    source = file.read_text(encoding="utf-8")
    same = [t for t in BUILTINS.values() if t.source == source]
    return same[0] if same else get_template(source, tokenizer)


# --- transformers bases ----------------------------------------------------------------------

def _read_hf_config(name: str, trust: bool):
    """A transformers folder's or hub id's config, refusing what is no decoder-only model."""
    from transformers import AutoConfig
    what = f"model.base {name!r}"
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust,
                                            local_files_only=Path(name).is_dir() or is_offline())
    except ValueError as e:                 # unknown model_type, or remote code not trusted
        raise RecipeError(f"{what}: transformers cannot read its config.json ({_first_line(e)}). Name a decoder-"
                          f"only model such as llama, qwen2, gemma, gpt2, gpt_neox, opt or phi"
                          + ("" if trust else ", or set model.trust_remote_code: true if the model brings its "
                             "own code and you trust it") + ".") from None
    except OSError as e:
        raise RecipeError(f"{what}: {_first_line(e)}. Check the folder or hub id.") from None
    if getattr(config, "is_encoder_decoder", False):
        raise RecipeError(f"{what} is an encoder-decoder model ({config.model_type}); fledge fine-tunes decoder-only "
                          f"causal language models (llama, qwen2, gemma, gpt2, gpt_neox, opt, phi, ...).")
    return config


def _load_transformers(name: str, config, recipe: Recipe, device, quant_bits: int | None,
                       dropout: float | None) -> Base:
    from transformers import AutoTokenizer
    trust = recipe.model.trust_remote_code
    what = f"model.base {name!r}"
    set_dropout(config, dropout, what)
    if quant_bits:
        hf = _quantized_from_folder(name, quant_bits, trust, device, config=config)
    else:
        hf = _from_pretrained(name, trust, config=config).to(device)
    _refuse_bidirectional(hf, what, config.model_type)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust,
                                                  local_files_only=Path(name).is_dir() or is_offline())
    except (OSError, ValueError, TypeError) as e:
        raise RecipeError(f"{what}: its tokenizer does not load ({_first_line(e)}). The folder needs the "
                          f"tokenizer files (tokenizer.json, tokenizer_config.json) next to config.json.") from None
    model = TransformersLM(hf, Origin("transformers", name, trust))
    return Base(model, tokenizer, "transformers", Path(name), _own_template(tokenizer), model_hf_config(model))


def set_dropout(config, dropout: float | None, what: str) -> None:
    """Put a model.dropout the recipe set (None: it did not) into every dropout key of a transformers config."""
    if dropout is None:
        return
    keys = [k for k in DROPOUT_KEYS if isinstance(getattr(config, k, None), float)]
    if not keys:
        raise RecipeError(f"model.dropout is set, but {what} ({config.model_type}) has no dropout setting in its "
                          f"config.json. Remove model.dropout, or use finetune.lora_dropout.")
    for key in keys:
        setattr(config, key, dropout)


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _from_pretrained(name, trust: bool, **kwargs):
    from transformers import AutoModelForCausalLM
    local = Path(str(name)).is_dir()
    try:
        return AutoModelForCausalLM.from_pretrained(name, trust_remote_code=trust,
                                                    local_files_only=local or is_offline(), **kwargs)
    except ValueError as e:                 # no causal-LM class for this config
        raise RecipeError(f"model.base {str(name)!r}: transformers has no causal language model for it "
                          f"({_first_line(e)}). fledge fine-tunes decoder-only models (llama, qwen2, gemma, gpt2, "
                          f"gpt_neox, opt, phi, ...).") from None
    except OSError as e:
        raise RecipeError(f"model.base {str(name)!r}: the weights do not load ({_first_line(e)}).") from None


@torch.no_grad()
def _refuse_bidirectional(hf: nn.Module, what: str, model_type: str) -> None:
    """A causal LM's prediction at position 0 does not depend on token 1; an encoder's (bert) does."""
    vocab = hf.config.vocab_size
    device = hf.get_input_embeddings().weight.device
    pairs = torch.tensor([[1 % vocab, 2 % vocab], [1 % vocab, 3 % vocab]], device=device)
    was_training = hf.training
    hf.eval()           # safe for 4-bit layers: adapters.keep_trainable turned their inference repacking off
    try:
        first = hf(input_ids=pairs, use_cache=False).logits[:, 0].float()
    finally:
        hf.train(was_training)
    if not torch.allclose(first[0], first[1], atol=1e-4, rtol=1e-3):
        raise RecipeError(f"{what} ({model_type}) is not a causal language model: its prediction at a position "
                          f"depends on later tokens (an encoder such as bert). fledge fine-tunes decoder-only "
                          f"models (llama, qwen2, gemma, gpt2, gpt_neox, opt, phi, ...).")


def _own_template(tokenizer):
    """The tokenizer's chat template as a Template when fledge can train with it (generation blocks), else None."""
    from fledge.errors import TemplateError
    from fledge.templates import BASE, get_template
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        return get_template(BASE, tokenizer)
    except TemplateError:
        return None


def _model_config_of(config) -> ModelConfig:
    """model.* keys from a transformers config (its standard attribute names; unknown ones keep defaults)."""
    rope = getattr(config, "rope_parameters", None) or {}
    eps = next((getattr(config, k) for k in ("rms_norm_eps", "layer_norm_epsilon", "layer_norm_eps", "norm_eps")
                if isinstance(getattr(config, k, None), float)), None)
    dropout = next((getattr(config, k) for k in DROPOUT_KEYS if isinstance(getattr(config, k, None), float)), None)
    hidden = next((getattr(config, k) for k in ("intermediate_size", "n_inner", "ffn_dim")
                   if isinstance(getattr(config, k, None), int)), None)
    values = dict(arch=TRANSFORMERS_ARCH, preset="", dim=config.hidden_size, n_layers=config.num_hidden_layers,
                  n_heads=config.num_attention_heads, n_kv_heads=getattr(config, "num_key_value_heads", None),
                  hidden_dim=hidden, max_seq_len=getattr(config, "max_position_embeddings", None),
                  rope_theta=rope.get("rope_theta") if isinstance(rope, dict) else None, norm_eps=eps,
                  tie_embeddings=getattr(config, "tie_word_embeddings", None), dropout=dropout,
                  init_std=getattr(config, "initializer_range", None))
    return ModelConfig(**{k: v for k, v in values.items() if v is not None})


# --- quantized loading -----------------------------------------------------------------------

def _quantized_from_folder(name, bits: int, trust: bool, device, **kwargs):
    """A transformers model quantized by bitsandbytes while loading: nf4 (bits 4) or int8 (bits 8)."""
    from transformers import BitsAndBytesConfig

    from fledge.model.adapters import keep_trainable, qlora_compute_dtype
    device = torch.device(device)
    if bits == 4:
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=qlora_compute_dtype(device))
    else:
        quant = BitsAndBytesConfig(load_in_8bit=True)
    if (Path(name) / "integrity.json").is_file():    # a fledge checkpoint: transformers does not check it
        from fledge.train.checkpoint import verify_checkpoint
        verify_checkpoint(Path(name))
    hf = _from_pretrained(name, trust, quantization_config=quant, device_map={"": device}, **kwargs)
    keep_trainable(hf)
    return hf


# --- the registered architecture -------------------------------------------------------------

def build_transformers(config: ModelConfig, vocab_size: int) -> TransformersLM:
    """`model.arch: transformers`: the architecture of the transformers model `config.base` names, freshly
    initialised with `vocab_size` rows (weights come from a checkpoint). Prefer `load_checkpoint_model`,
    which reads config.json from the checkpoint itself."""
    from transformers import AutoConfig, AutoModelForCausalLM
    if not config.base:
        raise RecipeError("model.arch transformers needs model.base: the transformers model whose "
                          "architecture to build")
    trust = config.trust_remote_code
    if trust and not getattr(config, "code_allowed", False):
        raise RecipeError(f"model.trust_remote_code is true in a recipe loaded without permission to run code; "
                          f"load it with allow_code=True (--allow-code) if you trust {config.base}.")
    source = config.base
    if not Path(source).is_dir() and is_offline():
        raise RecipeError(f"model.base {source!r}: no such folder, and the machine is offline (HF_HUB_OFFLINE). "
                          f"Load the checkpoint with fledge.model.bases.load_checkpoint_model instead.")
    hf_config = AutoConfig.from_pretrained(source, trust_remote_code=trust)
    hf = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=trust)
    if hf.config.vocab_size != vocab_size:
        hf.resize_token_embeddings(vocab_size, mean_resizing=False)
    return TransformersLM(hf, Origin("transformers", source, trust))
