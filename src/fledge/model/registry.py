"""Architectures by name, and named model sizes.

`model.arch: llama` builds fledge's own decoder (`fledge.model.gpt.GPT`). `model.arch:
transformers` is what a recipe fine-tuning a transformers model says (`fledge.model.bases.load_base`
sets it): the architecture of the model `model.base` names, wrapped in `TransformersLM` so the
loop, checkpoints and sampling treat it like `GPT`. Any other value of
the form `package.module:function` is your own architecture: fledge imports it and calls
`function(config: ModelConfig, vocab_size: int) -> nn.Module`. Prefer the keyword forward of
the model contract, as `GPT` has it: `forward(input_ids, labels=None, *, reduction="mean",
position_ids=None, document_ids=None) -> (logits, loss)` with `reduction="sum"` summing the
targets' losses; the loop detects the `reduction` parameter and calls it that way. A plain
`forward(idx, targets=None)` returning `(logits, mean loss)` works too: it is called
positionally and the mean multiplied by the number of targets, but it cannot take packed
rows. Training, checkpoints and evaluation then work unchanged (sampling needs a `generate`
method too).

Importing a module runs its code, so `build_model` imports one only for a `ModelConfig` that
`load_recipe(..., allow_code=True)` produced (the recipe the user runs), or when the caller
passes `allow_code=True`; a recipe read from a checkpoint needs the user's permission
(`fledge sample --allow-code`).
"""

from __future__ import annotations

import importlib
import re
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch.nn as nn

    from fledge.recipe import ModelConfig

# Named sizes, true to their names: parameters without the embedding table (non-embedding) are
# 1m 0.92M, 5m 5.1M, 15m 15.1M, 40m 40.9M, 85m 85.0M, 125m 127.4M (tests/unit/test_recipe.py).
# Every width (dim, hidden_dim) is a multiple of 256 and every head 64 wide, so llama.cpp's
# K-quants (q4_k_m, q5_k_m: rows in blocks of 256) apply to every matrix of an exported model.
PRESETS: dict[str, dict] = {
    "1m": dict(n_layers=2, n_heads=4, dim=256, hidden_dim=256, max_seq_len=512),
    "5m": dict(n_layers=6, n_heads=4, dim=256, hidden_dim=768, max_seq_len=512),
    "15m": dict(n_layers=5, n_heads=8, dim=512, hidden_dim=1280, max_seq_len=1024),
    "40m": dict(n_layers=12, n_heads=8, dim=512, hidden_dim=1536, max_seq_len=1024),
    "85m": dict(n_layers=12, n_heads=12, dim=768, hidden_dim=2048, max_seq_len=1024),
    "125m": dict(n_layers=18, n_heads=12, dim=768, hidden_dim=2048, max_seq_len=2048),
}


def build_llama(config: ModelConfig, vocab_size: int, bos_id: int | None = None,
                eos_id: int | None = None) -> nn.Module:
    from fledge.model.gpt import GPT, GPTConfig
    return GPT(GPTConfig(
        vocab_size=vocab_size, n_layers=config.n_layers, n_heads=config.n_heads, n_kv_heads=config.n_kv_heads,
        dim=config.dim, hidden_dim=config.hidden_dim, max_seq_len=config.max_seq_len,
        rope_theta=config.rope_theta, norm_eps=config.norm_eps, tie_embeddings=config.tie_embeddings,
        dropout=config.dropout, init_std=config.init_std, bos_id=bos_id, eos_id=eos_id))


def build_transformers(config: ModelConfig, vocab_size: int) -> nn.Module:
    """`model.arch: transformers`: see fledge.model.bases.build_transformers."""
    from fledge.model.bases import build_transformers as build
    return build(config, vocab_size)


ARCHITECTURES: dict[str, Callable] = {"llama": build_llama, "transformers": build_transformers}


# package.module:function, absolute (a relative `.module` has no package to be relative to).
CODE_REFERENCE = re.compile(r"[^\W\d]\w*(\.[^\W\d]\w*)*:[^\W\d]\w*")


def arch_syntax_problem(name: str) -> str | None:
    """Why `name` is neither a registered architecture nor a module:function reference, or None."""
    if name in ARCHITECTURES or CODE_REFERENCE.fullmatch(name):
        return None
    hint = ""
    if name.startswith(".") or ":." in name:
        hint = " Relative imports are not allowed: write the full dotted module path."
    return (f"model.arch {name!r} is neither a registered architecture ({', '.join(ARCHITECTURES)}) nor a "
            f"'package.module:function' reference.{hint}")


def is_known_arch(name: str) -> bool:
    return arch_syntax_problem(name) is None


def resolve_arch(name: str) -> Callable:
    """The builder for a registered name or a 'module:function' reference (imports the module)."""
    from fledge.errors import RecipeError
    if name in ARCHITECTURES:
        return ARCHITECTURES[name]
    problem = arch_syntax_problem(name)
    if problem:
        raise RecipeError(problem)
    module_name, _, func_name = name.partition(":")
    try:
        module = _import_from_here(module_name)
    except ImportError as e:
        raise RecipeError(f"model.arch {name!r}: cannot import {module_name!r} ({e}). Make the module importable "
                          f"(install it, or run from the folder that holds it).") from None
    except Exception as e:       # the module's own code failed; --debug shows its traceback
        raise RecipeError(f"model.arch {name!r}: importing {module_name} failed: {type(e).__name__}: {e}. "
                          f"Fix the module.") from e
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise RecipeError(f"model.arch {name!r}: {module_name} has no function {func_name!r}.")
    return fn


def _import_from_here(module_name: str):
    """Import `module_name`, also from the working folder: `python -m fledge` finds modules there, and
    the `fledge` console script should too (its sys.path starts at its own bin folder instead)."""
    import os
    import sys
    here = os.getcwd()
    if here not in sys.path and "" not in sys.path:
        sys.path.append(here)
    return importlib.import_module(module_name)


def build_model(config: ModelConfig, vocab_size: int, bos_id: int | None = None, eos_id: int | None = None,
                *, allow_code: bool | None = None):
    """The model `config.arch` names. A module:function arch is imported only when `allow_code` is
    true, or (None) when `config` came from `load_recipe(..., allow_code=True)`."""
    from fledge.errors import RecipeError
    if config.arch not in ARCHITECTURES:
        allowed = getattr(config, "code_allowed", False) if allow_code is None else allow_code
        if not allowed:
            raise RecipeError(f"model.arch {config.arch!r} names code to import and run, and this model config "
                              f"was loaded without permission to run code. Load the recipe with "
                              f"load_recipe(..., allow_code=True) (fledge sample --allow-code), or pass "
                              f"allow_code=True to build_model, if you trust it.")
    builder = resolve_arch(config.arch)
    if builder is build_llama:
        return build_llama(config, vocab_size, bos_id, eos_id)
    try:
        return builder(config, vocab_size)
    except Exception as e:       # the user's builder failed; --debug shows its traceback
        raise RecipeError(f"model.arch {config.arch!r}: the function raised {type(e).__name__}: {e}. "
                          f"Fix the function.") from e
