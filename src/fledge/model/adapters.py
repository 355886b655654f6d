"""Which weights train (full, LoRA, QLoRA), and how adapters are saved, loaded and merged.

    base, recipe = load_base(recipe, device)                  # qlora: the base comes quantized
    new = set_pad_token(tok) + add_template_tokens(tok, template)
    model = apply_method(base.model, recipe.finetune, new_tokens=new, tokenizer=base.tokenizer)
    trained, total = trainable_report(model)
    save_adapter(model, folder)            # adapter_model.safetensors + adapter_config.json (peft's format)
    model = load_adapter(fresh_base_model, folder)
    merged = merge_adapter(model)          # GPT for fledge bases; TransformersLM over the plain HF class

LoRA comes from peft and QLoRA's quantization from bitsandbytes (through transformers, see
fledge.model.bases); this module only chooses what trains. Without `finetune.lora_targets`
the targets are every matmul module (nn.Linear, or transformers' Conv1D in gpt2) inside the
model's stack of blocks (its largest nn.ModuleList), named by their path within a block
(`self_attn.q_proj`, `mlp.c_fc`): found by type and position, never by the model's name, so
the embedding and the output head are never adapted. peft is applied to fledge's GPT itself,
and to the transformers model inside a TransformersLM, so adapter files use the names
transformers and llama.cpp's converters know (GPT's names are LlamaForCausalLM's).

New tokens (a pad or template tokens added to the tokenizer) get embedding rows, and output
rows, set to the mean of the existing rows. With full fine-tuning they train like everything
else; with LoRA they train through peft's `trainable_token_indices` (only those rows, saved
in the adapter file as a few rows instead of whole matrices). peft ties the rows of a tied
head to the embedding's for transformers models; for fledge's GPT, whose head shares the
embedding's storage, `_tie_head_rows` does the same, so merged and unmerged models agree.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from fledge.errors import CheckpointError, DependencyError, RecipeError
from fledge.model.bases import Origin, TransformersLM, _first_line, _numel

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


# --- finding the parts: by type and position ---------------------------------------------------

def _matmul_types() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D
    return nn.Linear, Conv1D


def block_list(model: nn.Module) -> nn.ModuleList:
    """The model's stack of blocks: its nn.ModuleList holding the most parameters."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise RecipeError(f"{type(model).__name__} has no list of blocks (nn.ModuleList), so fledge cannot find its "
                          f"attention and MLP projections. Set finetune.lora_targets to module names.")
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


def default_targets(model: nn.Module) -> list[str]:
    """Paths, within a block, of every matmul module of the blocks: ["mlp.down_proj", "self_attn.q_proj", ...]."""
    types = _matmul_types()
    names = {name for block in block_list(model) for name, m in block.named_modules()
             if name and isinstance(m, types) and not _inside_adapter(name)}
    return sorted(names)


def _inside_adapter(name: str) -> bool:
    return any(part.startswith("lora_") or part == "base_layer" for part in name.split("."))


def input_embedding(model: nn.Module) -> nn.Embedding:
    """The token embedding: transformers' get_input_embeddings, else the nn.Embedding with the most rows."""
    get = getattr(model, "get_input_embeddings", None)
    found = get() if callable(get) else None
    if found is None:
        embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
        if not embeddings:
            raise RecipeError(f"{type(model).__name__} has no nn.Embedding, so new tokens cannot get rows.")
        found = max(embeddings, key=lambda m: m.num_embeddings)
    return found


def output_head(model: nn.Module, embedding: nn.Module) -> nn.Module | None:
    """The output head: transformers' get_output_embeddings, else the last nn.Linear with one output per
    embedding row."""
    get = getattr(model, "get_output_embeddings", None)
    if callable(get) and get() is not None:
        return get()
    rows = embedding.weight.shape[0]
    heads = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == rows]
    return heads[-1] if heads else None


def _path_of(root: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in root.named_modules(remove_duplicate=False) if m is module)


def _shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape


def _peft_target(model: nn.Module) -> nn.Module:
    """What peft wraps: the transformers model inside a TransformersLM, else the model itself."""
    return model.hf if isinstance(model, TransformersLM) else model


def _find_peft(model: nn.Module):
    """The PeftModel in `model` (itself, or a TransformersLM's inner model), or None."""
    from peft import PeftModel
    inner = _peft_target(model)
    return inner if isinstance(inner, PeftModel) else None


# --- new tokens --------------------------------------------------------------------------------

def grow_vocab(model: nn.Module, new_tokens: Sequence[str] = (), tokenizer=None) -> list[int]:
    """Give every token of `tokenizer` (or, without one, `new_tokens` appended) an embedding row.

    Returns the ids whose rows must train: those of `new_tokens` and any rows added. New rows
    start at the mean of the existing ones (no random draw: resuming rebuilds them exactly).
    """
    inner = _peft_target(model)
    rows = input_embedding(inner).weight.shape[0]
    if tokenizer is not None:
        ids = [tokenizer.convert_tokens_to_ids(t) for t in new_tokens]
        unknown = [t for t, i in zip(new_tokens, ids) if i is None or i == tokenizer.unk_token_id]
        if unknown:
            raise RecipeError(f"new tokens {unknown} are not in the tokenizer; add them to it first "
                              f"(templates.add_template_tokens).")
        wanted = max(rows, len(tokenizer))
    else:
        ids = list(range(rows, rows + len(new_tokens)))
        wanted = rows + len(new_tokens)
    if wanted > rows:
        resize_vocab(model, wanted)
    return sorted(set(ids) | set(range(rows, wanted)))


def resize_vocab(model: nn.Module, rows: int) -> None:
    """Resize the embedding and the output head (kept tied if tied) to `rows`; new rows are the mean row."""
    inner = _peft_target(model)
    embedding = input_embedding(inner)
    old = embedding.weight.shape[0]
    head = output_head(inner, embedding)
    tied = head is not None and _shares_storage(head.weight, embedding.weight)
    if callable(getattr(inner, "resize_token_embeddings", None)):        # transformers
        inner.resize_token_embeddings(rows, mean_resizing=False)
        embedding = inner.get_input_embeddings()
        head = inner.get_output_embeddings()
        with torch.no_grad():
            _fill_mean(embedding.weight, old)
            if head is not None and not _shares_storage(head.weight, embedding.weight):
                _fill_mean(head.weight, old)
        return
    new_embedding = nn.Embedding(rows, embedding.embedding_dim, device=embedding.weight.device,
                                 dtype=embedding.weight.dtype)
    with torch.no_grad():
        new_embedding.weight[:old] = embedding.weight
        _fill_mean(new_embedding.weight, old)
    _replace(inner, _path_of(inner, embedding), new_embedding)
    if head is not None:
        new_head = nn.Linear(head.in_features, rows, bias=head.bias is not None, device=head.weight.device,
                             dtype=head.weight.dtype)
        if tied:
            new_head.weight = new_embedding.weight
        else:
            with torch.no_grad():
                new_head.weight[:old] = head.weight
                _fill_mean(new_head.weight, old)
        if head.bias is not None:
            with torch.no_grad():
                new_head.bias[:old] = head.bias
                new_head.bias[old:] = head.bias.mean()
        _replace(inner, _path_of(inner, head), new_head)
    config = getattr(inner, "config", None)
    if isinstance(getattr(config, "vocab_size", None), int):
        config.vocab_size = rows


def _fill_mean(weight: torch.Tensor, old: int) -> None:
    if weight.shape[0] > old:
        weight[old:] = weight[:old].float().mean(0).to(weight.dtype)


def _replace(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


# --- quantization (bitsandbytes, through transformers: see fledge.model.bases) ---------------------

def require_bitsandbytes(device) -> None:
    """Raise DependencyError unless bitsandbytes is installed and quantizes on `device`."""
    try:
        import bitsandbytes.functional as bnbf
    except ImportError:
        raise DependencyError("finetune.method qlora needs the bitsandbytes package, which is not installed. "
                              "Install it with pip install bitsandbytes, or use finetune.method lora.") from None
    except Exception as e:          # a broken install fails at import with its own errors
        raise DependencyError(f"finetune.method qlora: bitsandbytes does not load here ({_first_line(e)}). "
                              f"Reinstall it, or use finetune.method lora.") from None
    try:
        bnbf.quantize_4bit(torch.zeros(64, 64, device=device), quant_type="nf4")
    except Exception as e:          # no kernel for this device (mps, an old GPU): any failure means it cannot run
        raise DependencyError(f"finetune.method qlora: bitsandbytes cannot quantize on {torch.device(device)} "
                              f"({_first_line(e)}). Use finetune.method lora, or another device.") from None


def qlora_compute_dtype(device) -> torch.dtype:
    """bf16 where the device computes it natively (CUDA with bf16, CPUs with AVX-512 BF16 or AMX), else
    fp32: emulated bf16 is about 10x slower than fp32 on a CPU without it."""
    from fledge.env import cpu_supports_bf16
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if device.type == "cpu" and cpu_supports_bf16() else torch.float32


def keep_trainable(model: nn.Module) -> nn.Module:
    """Turn off bitsandbytes' one-way CPU repacking of 4-bit weights for inference (AVX-512 BF16 CPUs):
    after it, gradients no longer flow through the layer. Eval passes then use the training kernel."""
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    return model


def is_quantized(model: nn.Module) -> bool:
    """Whether bitsandbytes layers hold (part of) the weights."""
    return any(type(m).__module__.startswith("bitsandbytes") for m in model.modules())


# --- applying a method -------------------------------------------------------------------------

def apply_method(model: nn.Module, finetune, *, new_tokens: Sequence[str] = (), tokenizer=None) -> nn.Module:
    """`model` ready to train with `finetune.method` (a FinetuneConfig).

    full: every parameter trains. lora / qlora: peft LoRA adapters on the targets (see the module
    docstring) and the rows of new tokens train, nothing else. qlora needs the base quantized by
    `load_base` (finetune.method qlora); lora refuses a quantized one. `tokenizer` (recommended
    whenever `new_tokens` is given) says the new tokens' ids and the vocabulary size; without it
    they are taken as appended after the model's rows. Returns GPT or a peft model wrapping it
    for fledge bases, the TransformersLM (its `.hf` peft-wrapped) for transformers ones.
    """
    method = finetune.method
    quantized = is_quantized(model)
    if method == "qlora" and not quantized:
        raise RecipeError("finetune.method qlora needs a base loaded quantized: load it with load_base(recipe) "
                          "where recipe.finetune.method is qlora.")
    if method != "qlora" and quantized:
        raise RecipeError(f"finetune.method {method} cannot train a base quantized to 4 or 8 bits; use "
                          f"finetune.method qlora, or load the base with finetune.method {method}.")
    if _find_peft(model) is not None:
        raise RecipeError("the model already carries adapters; merge them (merge_adapter) or start from the base.")
    new_ids = grow_vocab(model, new_tokens, tokenizer)
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    target = _peft_target(model)
    if method == "qlora":
        from peft import prepare_model_for_kbit_training
        prepare_model_for_kbit_training(target, use_gradient_checkpointing=False)
        keep_trainable(target)
    peft_model = _attach(target, lora_config(target, finetune, new_ids))
    if isinstance(model, TransformersLM):
        model.hf = peft_model
        return model
    return peft_model


def lora_config(model: nn.Module, finetune, new_ids: Sequence[int] = ()):
    """peft's LoraConfig for `model` (GPT or a transformers model) from a FinetuneConfig."""
    from peft import LoraConfig
    from transformers.pytorch_utils import Conv1D
    targets = list(finetune.lora_targets) or default_targets(model)
    token_layers = None
    if new_ids:
        embedding = input_embedding(model)
        head = output_head(model, embedding)
        token_layers = {_path_of(model, embedding): list(new_ids)}
        if head is not None and not _shares_storage(head.weight, embedding.weight):
            token_layers[_path_of(model, head)] = list(new_ids)
    conv = any(isinstance(m, Conv1D) for m in block_list(model).modules())
    return LoraConfig(r=finetune.lora_r, lora_alpha=finetune.lora_alpha, lora_dropout=finetune.lora_dropout,
                      target_modules=targets, fan_in_fan_out=conv, trainable_token_indices=token_layers)


def _attach(target: nn.Module, config, state: dict | None = None):
    """get_peft_model(target, config), tied head rows, then `state` (adapter tensors) if given."""
    from peft import get_peft_model, set_peft_model_state_dict
    embedding = input_embedding(target)
    head = output_head(target, embedding)
    tied = head is not None and _shares_storage(head.weight, embedding.weight)
    paths = (_path_of(target, embedding), _path_of(target, head)) if tied else None
    try:
        peft_model = get_peft_model(target, config)
    except ValueError as e:
        if "not found" not in str(e) and "do not match" not in str(e):
            raise
        raise RecipeError(f"finetune.lora_targets {sorted(config.target_modules)} match no module of the model; "
                          f"its attention and MLP projections are {', '.join(default_targets(target))}. Use some "
                          f"of these, or leave lora_targets empty for all of them.") from None
    if config.trainable_token_indices and paths:
        _tie_head_rows(peft_model, *paths)
    if state is not None:
        result = set_peft_model_state_dict(peft_model, state)
        unexpected = list(getattr(result, "unexpected_keys", []))
        if unexpected:
            raise CheckpointError(f"the adapter holds tensors this model has no place for ({unexpected[:3]}); it "
                                  f"was trained on another base.")
    return peft_model


def _tie_head_rows(peft_model, embedding_path: str, head_path: str) -> None:
    """Make a head that shares the embedding's storage use the embedding's trainable token rows too
    (peft does this itself for transformers models that declare tied weights; fledge's GPT does not)."""
    from peft.utils.other import TrainableTokensWrapper
    base = peft_model.get_base_model()
    head, embedding = base.get_submodule(head_path), base.get_submodule(embedding_path)
    if isinstance(head, TrainableTokensWrapper) or not isinstance(embedding, TrainableTokensWrapper):
        return
    adapter = embedding.token_adapter
    name = peft_model.active_adapter
    wrapper = TrainableTokensWrapper(head, name, token_indices=adapter.token_indices[name], tied_adapter=adapter)
    _replace(base, head_path, wrapper)


def trainable_report(model: nn.Module) -> tuple[int, int]:
    """(parameters that train, all parameters); 4-bit weights counted as the numbers they stand for."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = _numel(p)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


# --- saving, loading, merging -------------------------------------------------------------------

def save_adapter(model: nn.Module, folder: str | Path) -> list[Path]:
    """Write the adapters of `model` into `folder` as peft does: adapter_model.safetensors (LoRA A/B and
    new tokens' rows) and adapter_config.json. Returns the paths written."""
    import safetensors.torch
    from peft import get_peft_model_state_dict

    from fledge.files import storage_error, write_atomic
    peft_model = _find_peft(model)
    if peft_model is None:
        raise RecipeError("the model has no adapters to save (finetune.method full saves the whole model).")
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise storage_error(e, folder, "create") from None
    state = get_peft_model_state_dict(peft_model, save_embedding_layers=False)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    config = peft_model.peft_config[peft_model.active_adapter].to_dict()
    config = json.loads(json.dumps(config, default=lambda v: sorted(v) if isinstance(v, (set, frozenset)) else str(v)))
    config["inference_mode"] = True
    weights = write_atomic(folder / ADAPTER_WEIGHTS, safetensors.torch.save(tensors, metadata={"format": "pt"}))
    return [weights, write_atomic(folder / ADAPTER_CONFIG, json.dumps(config, indent=2, sort_keys=True))]


def load_adapter(base_model: nn.Module, folder: str | Path, *, trainable: bool = False) -> nn.Module:
    """`base_model` (as load_base returns it) with the adapters saved in `folder`, as `apply_method`
    returns it; the adapters train only if `trainable`. The vocabulary grows to the rows the adapter's
    new tokens need."""
    import safetensors.torch
    from peft import PeftConfig
    folder = Path(folder)
    missing = [n for n in (ADAPTER_WEIGHTS, ADAPTER_CONFIG) if not (folder / n).is_file()]
    if missing:
        found = ", ".join(sorted(p.name for p in folder.iterdir())) if folder.is_dir() else "no such folder"
        raise CheckpointError(f"{folder}: no {' or '.join(missing)} (found: {found or 'nothing'}). Save adapters "
                              f"with save_adapter, or fine-tune with finetune.method lora.")
    if _find_peft(base_model) is not None:
        raise RecipeError("the model already carries adapters; load adapters onto a fresh base.")
    try:
        config = PeftConfig.from_pretrained(str(folder))
        state = safetensors.torch.load_file(str(folder / ADAPTER_WEIGHTS))
    except Exception as e:          # any failure to decode these files means they are damaged
        raise CheckpointError(f"{folder}: the adapter files do not load ({type(e).__name__}: {e}).") from None
    config.inference_mode = not trainable
    if not getattr(_peft_target(base_model), "name_or_path", None):
        config.base_model_name_or_path = None       # fledge's GPT has no name: peft would warn of a rename
    indices = config.trainable_token_indices or {}
    needed = max((max(ids) + 1 for ids in (indices.values() if isinstance(indices, dict) else [indices]) if ids),
                 default=0)
    rows = input_embedding(_peft_target(base_model)).weight.shape[0]
    if needed > rows:
        resize_vocab(base_model, needed)
    if trainable and is_quantized(base_model):      # as apply_method prepares a QLoRA base, so a resume is exact
        from peft import prepare_model_for_kbit_training
        prepare_model_for_kbit_training(_peft_target(base_model), use_gradient_checkpointing=False)
        keep_trainable(_peft_target(base_model))
    peft_model = _attach(_peft_target(base_model), config, state)
    if isinstance(base_model, TransformersLM):
        base_model.hf = peft_model
        return base_model
    return peft_model


def merge_adapter(model: nn.Module) -> nn.Module:
    """Fold the adapters into full-precision weights: a plain GPT for fledge bases (its state dict loads
    into the base's class), a TransformersLM over the plain transformers class for transformers bases.
    A quantized base is loaded again unquantized from where it came from, and the adapters merged there.
    A model without adapters is returned as it is."""
    peft_model = _find_peft(model)
    if peft_model is None:
        return model
    if isinstance(model, TransformersLM) and is_quantized(model.hf):
        return _merge_unquantized(model, peft_model)
    merged = peft_model.merge_and_unload()
    if isinstance(model, TransformersLM):
        model.hf = merged
        return model
    return merged


def _merge_unquantized(model: TransformersLM, peft_model) -> nn.Module:
    from peft import get_peft_model_state_dict
    origin: Origin | None = model.origin
    if origin is None:
        raise RecipeError("cannot merge adapters into a quantized model whose origin is unknown; load the base "
                          "with load_base.")
    fresh = _load_unquantized(origin)
    rows = model.config.vocab_size
    if input_embedding(_peft_target(fresh)).weight.shape[0] < rows:
        resize_vocab(fresh, rows)
    config = copy.deepcopy(peft_model.peft_config[peft_model.active_adapter])
    config.base_model_name_or_path = None          # the same base, loaded from elsewhere: no rename warning
    state = get_peft_model_state_dict(peft_model, save_embedding_layers=False)
    attached = _attach(_peft_target(fresh), config, {k: v.detach().float() for k, v in state.items()})
    merged = attached.merge_and_unload()
    if isinstance(fresh, TransformersLM):
        fresh.hf = merged
        return fresh
    return merged


def _load_unquantized(origin: Origin) -> nn.Module:
    """The base at `origin` in full precision, on CPU."""
    from fledge.model.bases import _from_pretrained, load_checkpoint_model, load_checkpoint_recipe
    path = Path(origin.path)
    if origin.kind == "fledge":
        return load_checkpoint_model(path, load_checkpoint_recipe(path))
    if (path / "integrity.json").is_file():             # a fledge checkpoint of a transformers fine-tune
        return load_checkpoint_model(path, load_checkpoint_recipe(path), trust_remote_code=origin.trust_remote_code)
    return TransformersLM(_from_pretrained(origin.path, origin.trust_remote_code), origin)
