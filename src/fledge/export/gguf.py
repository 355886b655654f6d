"""GGUF files (llama.cpp, Ollama) from a transformers folder: config.json, model.safetensors and
the tokenizer files `fledge.export.hf.write_transformers_files` writes.

    from fledge.export.gguf import write_gguf
    result = write_gguf(folder, "model-q4_k_m.gguf", "q4_k_m")
    result.tensor_types      # {"blk.0.ffn_down.weight": "Q6_K", ...} as stored in the file
    result.fallbacks         # matrices llama.cpp did not quantize as asked, with the reason

f32, f16, bf16 and q8_0 are written here with gguf-py (`gguf.GGUFWriter`, `gguf.quants`): no
llama.cpp needed, and q8_0 comes out byte-identical to llama.cpp's. q5_k_m and q4_k_m need
llama.cpp's own quantizer (`pip install 'fledge[gguf]'`): an f32 file is written first and
quantized by `llama_cpp.llama_model_quantize`. llama.cpp quantizes a matrix to a K-quant only
when its rows (ne0, the input width) are a multiple of 256; otherwise it falls back to another
type per tensor, with a log line, and still labels the file Q4_K_M. So every file is read back
(`gguf.GGUFReader`) and each matrix not stored as asked is listed in `fallbacks` and said.

Tensor names and layout conversions live in `fledge.export.names`; the tokenizer and chat
template in `fledge.export.gguf_vocab`. Files are written beside `out` and renamed into place.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from fledge.errors import DependencyError, ExportError
from fledge.export.names import TensorSpec, attention_heads, gguf_arch, head_dim, n_layers, tensor_plan
from fledge.files import fsync_dir, refuse_special, storage_error, temp_path

QUANTS = ("f32", "f16", "bf16", "q8_0", "q5_k_m", "q4_k_m")
K_QUANTS = {"q5_k_m": "Q5_K_M", "q4_k_m": "Q4_K_M"}     # quant -> llama.cpp's LLAMA_FTYPE_MOSTLY_<name>
K_BLOCK = 256                                           # QK_K: row length unit of every K-quant
# llama.cpp's per-tensor fallback when rows are not a multiple of 256 (llama-quant.cpp), inverted
# to say which K-quant a matrix was meant to get.
_MEANT = {"Q5_0": "Q4_K", "Q5_1": "Q5_K", "Q8_0": "Q6_K", "IQ4_NL": "Q3_K"}


@dataclass
class GGUFResult:
    path: Path
    quant: str
    arch: str
    tensor_types: dict[str, str] = field(default_factory=dict)   # gguf name -> ggml type as stored ("Q4_K", "F32")
    fallbacks: list[str] = field(default_factory=list)           # "blk.0.ffn_down.weight: Q5_0 instead of Q4_K (...)"


def require_llama_cpp(why: str):
    """The llama_cpp module, or DependencyError saying what it is needed for and how to get it."""
    try:
        import llama_cpp
    except ImportError:
        raise DependencyError(f"{why} needs llama.cpp's Python binding (llama-cpp-python), which is not installed. "
                              f"Install it with pip install 'fledge[gguf]' (it compiles llama.cpp: 12-23 minutes on "
                              f"2 cores). f32, f16, bf16 and q8_0 files need no llama.cpp.") from None
    except OSError as e:       # installed, but its shared library does not load
        raise DependencyError(f"{why} needs llama-cpp-python, which is installed but does not load ({e}). "
                              f"Reinstall it: pip install --force-reinstall 'fledge[gguf]'.") from None
    return llama_cpp


def write_gguf(folder: Path, out: Path, quant: str = "f16", *, say: Callable[[str], object] = print) -> GGUFResult:
    """Write the model in the transformers folder `folder` to the GGUF file `out` as `quant` (one of
    QUANTS). Returns what the file holds, read back from it. Raises ExportError for an unknown
    quant, an architecture llama.cpp cannot load or a folder that is not a complete model;
    DependencyError when a K-quant needs llama-cpp-python; StorageError when writing fails."""
    import gguf
    folder, quant = Path(folder), str(quant).lower()
    if quant not in QUANTS:
        raise ExportError(f"unknown GGUF quantization {quant!r}; choose one of {', '.join(QUANTS)}.")
    config = _read_config(folder)
    arch = gguf_arch(config)
    out = refuse_special(out, "GGUF output")
    llama_cpp = require_llama_cpp(f"quantizing to {quant}") if quant in K_QUANTS else None
    weights = _Weights(folder)
    plan = tensor_plan(config, weights.names)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise storage_error(e, out.parent, "create") from None
    written = temp_path(out)
    source = temp_path(out) if llama_cpp else written
    try:
        fallbacks = _write(folder, source, config, arch, plan, weights, "f32" if llama_cpp else quant, say)
        if llama_cpp:
            _quantize(llama_cpp, source, written, quant)
        tensor_types, k_fallbacks, matrices = _read_back(written, quant)
        os.replace(written, out)
    except OSError as e:
        raise storage_error(e, out) from None
    finally:
        for path in {source, written}:
            if path.exists():
                path.unlink()
    fsync_dir(out.parent)
    fallbacks += k_fallbacks
    if fallbacks:
        label = K_QUANTS.get(quant, quant.upper())
        who = "llama.cpp's quantizer fell back to other types" if quant in K_QUANTS else "they are stored as F16"
        say(f"{out.name}: {len(fallbacks)} of {matrices} weight matrices are not {label} although the file is "
            f"labelled {label}; {who}:")
        for line in fallbacks:
            say(f"  {line}")
        block = K_BLOCK if quant in K_QUANTS else gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]
        say(f"Make the model's widths (hidden size, FFN size, heads x head_dim) multiples of {block} for a true "
            f"{label} file, or choose another quantization.")
    return GGUFResult(out, quant, arch, tensor_types, fallbacks)


# --- reading the folder --------------------------------------------------------------------------

def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        found = ", ".join(sorted(p.name for p in folder.iterdir())) if folder.is_dir() else "no such folder"
        raise ExportError(f"{folder} has no config.json (found: {found or 'nothing'}); GGUF export reads a "
                          f"transformers folder. Make one with fledge export RUN --format hf.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ExportError(f"{path} cannot be read as JSON ({e}); save the model again.") from None


class _Weights:
    """The tensors of model.safetensors, or of the shards model.safetensors.index.json names."""

    def __init__(self, folder: Path):
        from safetensors import safe_open
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            files = sorted({folder / f for f in json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()})
        elif (folder / "model.safetensors").is_file():
            files = [folder / "model.safetensors"]
        else:
            found = ", ".join(sorted(p.name for p in folder.iterdir()))
            raise ExportError(f"{folder} has no model.safetensors (found: {found}); GGUF export reads safetensors "
                              f"weights. Save the model with save_pretrained(..., safe_serialization=True).")
        self._handles = {}
        self.names: list[str] = []
        aliased: set[str] = set()
        for file in files:
            if not file.is_file():
                raise ExportError(f"{file.name} is listed in {index.name} but missing from {folder}; copy the "
                                  f"whole model folder again.")
            handle = safe_open(str(file), framework="pt")
            aliases = json.loads((handle.metadata() or {}).get("fledge.aliases", "{}"))
            aliased.update(aliases)                   # fledge checkpoints: names that share a stored tensor
            for name in handle.keys():
                self._handles[name] = handle
                self.names.append(name)
        self.names = [n for n in self.names if n not in aliased]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[name].get_slice(name).get_shape())

    def get(self, name: str):
        tensor = self._handles[name].get_tensor(name)
        if not tensor.is_floating_point():
            raise ExportError(f"{name} is stored as {tensor.dtype}, not as floating point (a quantized model?); "
                              f"GGUF export needs the merged full-precision weights (fledge export --format hf).")
        return tensor.float()


# --- writing ------------------------------------------------------------------------------------

def _write(folder: Path, path: Path, config: dict, arch: str, plan: list[TensorSpec], weights: _Weights,
           quant: str, say: Callable[[str], object]) -> list[str]:
    """Write the GGUF file at `path` (streaming one tensor at a time); returns its fallbacks (q8_0
    matrices whose rows are not a multiple of 32 stay F16)."""
    import gguf
    import numpy as np
    import torch

    from fledge.export.gguf_vocab import add_vocab
    writer = gguf.GGUFWriter(path=None, arch=arch)
    _add_hparams(writer, arch, config, say)
    writer.add_file_type(_FILE_TYPES[quant]())
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    vocab = add_vocab(writer, folder, arch)
    plan = sorted(plan, key=_file_order)
    embedding = next((s for s in plan if s.gguf_name == "token_embd.weight"), None)
    if embedding is None:
        raise ExportError(f"model.safetensors in {folder} holds no token embedding; it is not a whole model. "
                          f"Export the run again (fledge export RUN --format hf).")
    rows = weights.shape(embedding.hf_name)[0]
    if vocab.size != rows:
        raise ExportError(f"the tokenizer in {folder} has {vocab.size} tokens but the model's embedding has {rows} "
                          f"rows; llama.cpp needs one token per row. Resize the embedding to the tokenizer "
                          f"(fledge.model.adapters.resize_vocab) and export again.")
    kinds, fallbacks = [], []
    for spec in plan:
        shape = weights.shape(spec.hf_name)
        if spec.transform is not None:          # the stored shape: transforms run on a shape-only tensor
            shape = tuple(spec.transform(torch.empty(shape, device="meta")).shape)
        kind, why = _storage_type(spec.gguf_name, shape, quant)
        if why:
            fallbacks.append(f"{spec.gguf_name}: {kind.name} instead of {_TYPES[quant]().name} ({why})")
        kinds.append(kind)
        nbytes = _nbytes(shape, kind)
        if kind.name in ("F32", "F16"):
            writer.add_tensor_info(spec.gguf_name, shape, np.dtype(kind.name.replace("F", "float")), nbytes)
        else:                                   # raw bytes: gguf-py takes the byte shape and the type
            writer.add_tensor_info(spec.gguf_name, gguf.quant_shape_to_byte_shape(shape, kind), np.dtype(np.uint8),
                                   nbytes, raw_dtype=kind)
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for spec, kind in zip(plan, kinds):
        tensor = weights.get(spec.hf_name)
        if spec.transform is not None:
            tensor = spec.transform(tensor)
        writer.write_tensor_data(gguf.quants.quantize(tensor.float().contiguous().numpy(), kind))
    writer.close()
    return fallbacks


def _file_order(spec: TensorSpec) -> tuple:
    """token_embd and other model-wide tensors first, then block by block, the output head last."""
    block = re.match(r"blk\.(\d+)\.", spec.gguf_name)
    if block:
        return (1, int(block.group(1)), spec.gguf_name)
    return (2 if spec.gguf_name.startswith("output") else 0, 0, spec.gguf_name)


def _storage_type(gguf_name: str, shape: tuple[int, ...], quant: str):
    """(ggml type, why it is a fallback or ""): vectors, biases and position embeddings stay F32,
    as llama.cpp's converter keeps them; matrices get `quant`."""
    import gguf
    Q = gguf.GGMLQuantizationType
    if len(shape) < 2 or not gguf_name.endswith(".weight") or gguf_name.startswith("position_embd."):
        return Q.F32, ""
    kind = _TYPES[quant]()
    block = gguf.GGML_QUANT_SIZES[kind][0]
    if shape[-1] % block:
        return Q.F16, f"rows of {shape[-1]} are not a multiple of {block}"
    return kind, ""


def _nbytes(shape: tuple[int, ...], kind) -> int:
    import gguf
    block, size = gguf.GGML_QUANT_SIZES[kind]
    return math.prod(shape) // block * size


def _add_hparams(writer, arch: str, config: dict, say: Callable[[str], object]) -> None:
    """The {arch}.* keys llama.cpp reads for this architecture. Refuses settings it cannot honour."""
    heads, kv_heads = attention_heads(config)
    width = int(config.get("hidden_size") or config["n_embd"])
    context = int(config.get("max_position_embeddings") or config.get("n_positions") or config["n_ctx"])
    writer.add_block_count(n_layers(config))
    writer.add_embedding_length(width)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    if arch == "gpt2":
        _refuse(config, "activation_function", ("gelu_new", "gelu_pytorch_tanh"), "gpt2")
        for key, wanted in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False)):
            if config.get(key, wanted) != wanted:
                raise ExportError(f"config.json sets {key}: {config[key]}; llama.cpp's gpt2 cannot do that. "
                                  f"Export with --format hf instead.")
        writer.add_context_length(context)                 # also the rows of position_embd
        writer.add_feed_forward_length(int(config.get("n_inner") or 4 * width))
        writer.add_layer_norm_eps(float(config.get("layer_norm_epsilon", 1e-5)))
        return
    activation = "hidden_activation" if config.get("hidden_activation") else "hidden_act"
    _refuse(config, activation, ("gelu_pytorch_tanh",) if arch == "gemma" else ("silu",), arch)
    window = config.get("sliding_window") if config.get("use_sliding_window", True) else None
    if window and int(window) < context:
        # llama.cpp's llama and qwen2 attend to the whole context; within the window both agree
        say(f"the model attends to a sliding window of {window} tokens; the GGUF's context length is set to "
            f"{window} (was {context}) because llama.cpp's {arch} has no sliding window.")
        context = int(window)
    writer.add_context_length(context)
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    writer.add_rope_freq_base(float(theta))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "linear":
        import gguf
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope_type != "default":
        raise ExportError(f"config.json uses {rope_type!r} RoPE scaling, which fledge does not convert to GGUF "
                          f"(it converts default and linear). Export with --format hf instead.")
    dim = head_dim(config)
    writer.add_rope_dimension_count(dim)
    writer.add_key_length(dim)
    writer.add_value_length(dim)


def _refuse(config: dict, key: str, allowed: tuple[str, ...], arch: str) -> None:
    value = config.get(key)
    if value is not None and value not in allowed:
        raise ExportError(f"config.json sets {key}: {value}; llama.cpp's {arch} computes "
                          f"{' or '.join(allowed)} there, so the GGUF would not behave like the model. Export with "
                          f"--format hf instead.")


def _gguf_attr(namespace: str, name: str):
    def get():
        import gguf
        return getattr(getattr(gguf, namespace), name)
    return get


_FILE_TYPES = {"f32": _gguf_attr("LlamaFileType", "ALL_F32"), "f16": _gguf_attr("LlamaFileType", "MOSTLY_F16"),
               "bf16": _gguf_attr("LlamaFileType", "MOSTLY_BF16"), "q8_0": _gguf_attr("LlamaFileType", "MOSTLY_Q8_0")}
_TYPES = {q: _gguf_attr("GGMLQuantizationType", q.upper()) for q in ("f32", "f16", "bf16", "q8_0")}


# --- K-quants through llama.cpp ------------------------------------------------------------------

def _quantize(llama_cpp, source: Path, target: Path, quant: str) -> None:
    """llama.cpp's quantizer, its log (a line per tensor, printed by llama-cpp-python's log callback on
    sys.stderr) kept back: the file is read back afterwards, and a failure shows the log's last line."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{K_QUANTS[quant]}")
    log = io.StringIO()
    with contextlib.redirect_stderr(log):
        code = llama_cpp.llama_model_quantize(os.fsencode(source), os.fsencode(target), ctypes.byref(params))
    if code != 0 or not target.is_file():
        last = next((line.strip() for line in reversed(log.getvalue().splitlines()) if line.strip()), "no log")
        raise ExportError(f"llama.cpp could not quantize the model to {quant} (code {code}: {last}); export f16 or "
                          f"q8_0 instead, which need no llama.cpp, or report it with the model's config.json.")


def _read_back(path: Path, quant: str) -> tuple[dict[str, str], list[str], int]:
    """Tensor types as stored, for a K-quant every matrix llama.cpp did not K-quantize, and the
    number of matrices a quantization applies to."""
    import gguf
    reader = gguf.GGUFReader(path)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    rows = {t.name: int(t.shape[0]) for t in reader.tensors}           # shape is in ggml order: ne0 first
    dims = {t.name: len(t.shape) for t in reader.tensors}
    del reader                                                          # closes the memory map
    matrices = [n for n in types if dims[n] >= 2 and n.endswith(".weight") and not n.startswith("position_embd.")]
    fallbacks = []
    if quant in K_QUANTS:
        asked = K_QUANTS[quant][:2] + "_K"
        for name in matrices:
            kind = types[name]
            if kind.endswith("_K"):
                continue
            why = f"rows of {rows[name]} are not a multiple of {K_BLOCK}" if rows[name] % K_BLOCK else \
                "llama.cpp chose it"
            fallbacks.append(f"{name}: {kind} instead of {_MEANT.get(kind, asked)} ({why})")
    return types, fallbacks, len(matrices)
