"""Architectures by name, and named model sizes.

`model.arch: llama` builds fledge's own decoder (`fledge.model.gpt.GPT`). Any other value of
the form `package.module:function` is your own architecture: fledge imports it and calls
`function(config: ModelConfig, vocab_size: int) -> nn.Module`. The module must return
`(logits, loss)` from `forward(idx, targets=None)`, like `GPT` does; training, checkpoints
and evaluation then work unchanged (sampling needs a `generate` method too).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch.nn as nn

    from fledge.recipe import ModelConfig

# Sizes are approximate parameter counts without the embedding table.
PRESETS: dict[str, dict] = {
    "1m": dict(n_layers=4, n_heads=4, dim=128, max_seq_len=512),
    "5m": dict(n_layers=6, n_heads=8, dim=256, max_seq_len=512),
    "15m": dict(n_layers=6, n_heads=6, dim=288, max_seq_len=512),   # llama2.c stories15M
    "40m": dict(n_layers=8, n_heads=8, dim=512, max_seq_len=1024),  # llama2.c stories42M
    "85m": dict(n_layers=12, n_heads=12, dim=768, max_seq_len=1024),  # llama2.c stories110M body
    "125m": dict(n_layers=12, n_heads=12, dim=768, max_seq_len=2048, tie_embeddings=False),
}


def build_llama(config: ModelConfig, vocab_size: int, bos_id: int | None = None,
                eos_id: int | None = None) -> nn.Module:
    from fledge.model.gpt import GPT, GPTConfig
    return GPT(GPTConfig(
        vocab_size=vocab_size, n_layers=config.n_layers, n_heads=config.n_heads, n_kv_heads=config.n_kv_heads,
        dim=config.dim, hidden_dim=config.hidden_dim, max_seq_len=config.max_seq_len,
        rope_theta=config.rope_theta, norm_eps=config.norm_eps, tie_embeddings=config.tie_embeddings,
        dropout=config.dropout, init_std=config.init_std, bos_id=bos_id, eos_id=eos_id))


ARCHITECTURES: dict[str, Callable] = {"llama": build_llama}


def is_known_arch(name: str) -> bool:
    return name in ARCHITECTURES or (":" in name and all(name.partition(":")[::2]))


def resolve_arch(name: str) -> Callable:
    """The builder for a registered name or a 'module:function' reference."""
    from fledge.errors import RecipeError
    if name in ARCHITECTURES:
        return ARCHITECTURES[name]
    module_name, _, func_name = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise RecipeError(f"model.arch {name!r}: cannot import {module_name!r} ({e}). Make the module importable "
                          f"(install it, or run from the folder that holds it).") from None
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise RecipeError(f"model.arch {name!r}: {module_name} has no function {func_name!r}.")
    return fn


def build_model(config: ModelConfig, vocab_size: int, bos_id: int | None = None, eos_id: int | None = None):
    builder = resolve_arch(config.arch)
    if builder is build_llama:
        return build_llama(config, vocab_size, bos_id, eos_id)
    return builder(config, vocab_size)
