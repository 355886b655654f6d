"""Key maps between transformers folders and llama.cpp's GGUF files, written once.

    from fledge.export.names import gguf_arch, tensor_plan
    arch = gguf_arch(config)                        # config.json dict -> "llama" | "qwen2" | "gemma" | "gpt2"
    for spec in tensor_plan(config, names):         # names: the tensors model.safetensors holds
        tensor = spec.transform(t) if spec.transform else t
        writer.add_tensor(spec.gguf_name, ...)

Tensor names come from gguf-py's own tables (`gguf.TensorNameMap`, `gguf.MODEL_TENSORS`), so a
name llama.cpp's architecture has no slot for is refused here rather than failing at load time.
What the tables do not say, and this module adds, is how llama.cpp's kernels expect some weights:

- llama arch (llama, mistral, fledge's GPT): llama.cpp rotates each (even, odd) pair of a head's
  dimensions, transformers rotates dimension i with i + head_dim/2. Q and K rows are permuted
  into llama.cpp's order, K with the KV-head count. Without it a random model still matches
  (attention is nearly uniform) while a trained one silently does not.
- qwen2 and gemma use the half-rotation ("NEOX") order in llama.cpp too: no permutation.
- gemma's RMSNorm multiplies by (1 + weight); llama.cpp's by weight: norms are stored + 1.
- gpt2's Conv1D weights are stored (in, out); llama.cpp wants (out, in) like nn.Linear.
- tied embeddings: llama.cpp reads token_embd as the output head when output.weight is absent.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from fledge.errors import ExportError

# transformers model_type -> llama.cpp architecture. Anything else is refused: llama.cpp may
# know the architecture, but fledge has not proven its conversion (the verify step would have
# nothing correct to compare against).
ARCHITECTURES: dict[str, str] = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gemma": "gemma",
                                 "gpt2": "gpt2"}

# Buffers some checkpoints carry that are no weights: rotary tables and gpt2's causal masks.
_NOT_WEIGHTS = re.compile(r"(\.rotary_emb\.inv_freq|\.attn\.(masked_)?bias)$")
# gpt2's transformers Conv1D modules store weight as (in_features, out_features).
_CONV1D = re.compile(r"\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the GGUF file: which safetensors tensor it is made from and how."""
    hf_name: str
    gguf_name: str
    transform: Callable | None = None      # torch.Tensor -> torch.Tensor, or None to store as it is


def gguf_arch(config: dict) -> str:
    """llama.cpp's architecture name for a transformers config.json dict; ExportError naming the
    model_type and the supported ones otherwise."""
    model_type = config.get("model_type")
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    supported = ", ".join(ARCHITECTURES)
    what = f"model_type {model_type!r}" if model_type else "a config.json without model_type"
    raise ExportError(f"GGUF export does not support {what}; it supports {supported}. "
                      f"Export with --format hf instead (transformers loads it), or fine-tune one of those.")


def n_layers(config: dict) -> int:
    return int(_first(config, "num_hidden_layers", "n_layer"))


def attention_heads(config: dict) -> tuple[int, int]:
    """(query heads, key/value heads)."""
    heads = int(_first(config, "num_attention_heads", "n_head"))
    return heads, int(config.get("num_key_value_heads") or heads)


def head_dim(config: dict) -> int:
    heads, _ = attention_heads(config)
    return int(config.get("head_dim") or _first(config, "hidden_size", "n_embd") // heads)


def is_tied(config: dict, names: list[str]) -> bool:
    """The output head is the embedding: no lm_head.weight stored (transformers and fledge save a
    tied head once) or the config says so; a config saying untied with no head stored is refused."""
    stored = "lm_head.weight" in names
    tied = config.get("tie_word_embeddings")
    if tied is False and not stored:
        raise ExportError("config.json says tie_word_embeddings: false but model.safetensors holds no "
                          "lm_head.weight; transformers would give this model a random output head. Save the "
                          "model again with its head, or set tie_word_embeddings: true if it shares the embedding.")
    return not stored or bool(tied)


def tensor_plan(config: dict, names: list[str]) -> list[TensorSpec]:
    """The GGUF tensors made from the safetensors tensors `names` of a model with `config`.

    Raises ExportError listing every name llama.cpp's architecture has no place for, and for a
    separate output head in an architecture that cannot hold one (gemma)."""
    import gguf
    arch = gguf_arch(config)
    model_arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)
    layers = n_layers(config)
    name_map = gguf.get_tensor_name_map(model_arch, layers)
    allowed = set(gguf.MODEL_TENSORS[model_arch])
    tied = is_tied(config, names)
    plan, unknown, taken = [], [], {}
    for name in names:
        if _NOT_WEIGHTS.search(name) or (tied and name == "lm_head.weight"):
            continue
        found = name_map.get_type_and_name(name, try_suffixes=(".weight", ".bias"))
        if found is None or found[0] not in allowed or _layer_past_end(found[1], layers):
            unknown.append(name)
            continue
        kind, gguf_name = found
        if gguf_name in taken:
            raise ExportError(f"model.safetensors holds both {taken[gguf_name]} and {name}, which are the same "
                              f"llama.cpp tensor {gguf_name}; remove one (a leftover from an earlier save?).")
        taken[gguf_name] = name
        plan.append(TensorSpec(name, gguf_name, _transform(arch, config, kind, name)))
    if not tied and "output.weight" not in taken and arch == "gemma":
        unknown.append("lm_head.weight")
    if unknown:
        shown = ", ".join(unknown[:8]) + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else "")
        raise ExportError(f"llama.cpp's {arch} architecture has no tensor for {shown}; this model is not a plain "
                          f"{config.get('model_type')} (an added module or a separate output head?). Export "
                          f"with --format hf instead.")
    return plan


def _layer_past_end(gguf_name: str, layers: int) -> bool:
    block = re.match(r"blk\.(\d+)\.", gguf_name)
    return block is not None and int(block.group(1)) >= layers


def _transform(arch: str, config: dict, kind, name: str) -> Callable | None:
    import gguf
    T = gguf.MODEL_TENSOR
    if arch == "llama" and kind in (T.ATTN_Q, T.ATTN_K):
        heads, kv_heads = attention_heads(config)
        return rotary_to_pairs(heads if kind == T.ATTN_Q else kv_heads)
    if arch == "gemma" and name.endswith("norm.weight"):
        return _plus_one
    if arch == "gpt2" and _CONV1D.search(name):
        return _transposed
    return None


def rotary_to_pairs(heads: int) -> Callable:
    """Reorders the output rows (weight (heads*head_dim, in) or bias (heads*head_dim,)) of each head
    from transformers' rotate-half order [x0..x(d/2-1), y0..y(d/2-1)] to llama.cpp's rotated pairs
    [x0, y0, x1, y1, ...], so that llama.cpp's RoPE turns the same two numbers together."""

    def permute(w):
        rows = w.shape[0]
        half = rows // heads // 2
        # (heads, 2 halves, half, ...) -> (heads, half, 2, ...): interleaves the two halves
        return w.reshape(heads, 2, half, *w.shape[1:]).transpose(1, 2).reshape(w.shape)

    return permute


def _plus_one(w):
    return w.float() + 1.0


def _transposed(w):
    return w.t().contiguous()


def _first(config: dict, *keys: str):
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    raise ExportError(f"config.json has none of {', '.join(keys)}; it does not describe a complete "
                      f"{config.get('model_type')} model. Save the model again with save_pretrained.")
