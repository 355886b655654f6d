"""write_gguf and its key maps: the GGUF files hold the model's weights in llama.cpp's layout and
names, with the hyperparameters llama.cpp reads; llama.cpp (when llama-cpp-python is installed)
gives transformers' logits for fledge's GPT and transformers llama, qwen2, gemma and gpt2 models
that were briefly trained; quantized files load, and a K-quant llama.cpp could not apply to every
matrix is reported, never silently mislabelled. Bad input is one ExportError line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from fledge.errors import DependencyError, ExportError
from fledge.export.gguf import write_gguf
from fledge.export.names import gguf_arch, rotary_to_pairs, tensor_plan

sys.path.insert(0, str(Path(__file__).parent))          # tiny_exports, shared by the export tests

from tiny_exports import fledge_gpt, held_out_ids, reference_logits, transformers_model  # noqa: E402


FAMILIES = ("fledge", "llama", "qwen2", "gemma", "gpt2")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Builds each tiny model on first use and keeps it for the module."""
    root = tmp_path_factory.mktemp("tiny")
    built = {}

    def get(name: str):
        if name not in built:
            built[name] = fledge_gpt(root) if name == "fledge" else \
                fledge_gpt(root, hidden_dim=704, name="fledge-704") if name == "fledge-704" else \
                transformers_model(root, name)
        return built[name]

    return get


def read(path):
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith(("tokenizer.", "GGUF."))}
    tensors = {t.name: (t.tensor_type.name, gguf.quants.dequantize(t.data, t.tensor_type).reshape(
        tuple(int(n) for n in reversed(t.shape)))) for t in reader.tensors}
    return fields, tensors


# --- the rotary layout, in torch alone ---------------------------------------------------------------

def test_permuted_q_and_k_under_llama_cpp_rotary_pairs_give_transformers_attention_scores():
    torch.manual_seed(0)
    heads, kv_heads, dim, width, T = 4, 2, 16, 32, 9
    wq, wk, x = torch.randn(heads * dim, width), torch.randn(kv_heads * dim, width), torch.randn(T, width)
    freq = 10000.0 ** (-torch.arange(0, dim, 2) / dim)                       # (dim/2,)
    angle = torch.arange(T)[:, None] * freq                                  # (T, dim/2)

    def rotate_half(v):                     # transformers: dimension i turns with i + dim/2
        cos, sin = torch.cat([angle.cos()] * 2, -1)[:, None], torch.cat([angle.sin()] * 2, -1)[:, None]
        return v * cos + torch.cat([-v[..., dim // 2:], v[..., :dim // 2]], -1) * sin

    def rotate_pairs(v):                    # llama.cpp's llama: dimensions 2i and 2i+1 turn together
        a, b = v[..., 0::2], v[..., 1::2]
        cos, sin = angle.cos()[:, None], angle.sin()[:, None]
        return torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2)

    def scores(q_weight, k_weight, rotate):
        q = rotate((x @ q_weight.T).view(T, heads, dim))
        k = rotate((x @ k_weight.T).view(T, kv_heads, dim)).repeat_interleave(heads // kv_heads, 1)
        return torch.einsum("thd,shd->hts", q, k)

    expected = scores(wq, wk, rotate_half)
    converted = scores(rotary_to_pairs(heads)(wq), rotary_to_pairs(kv_heads)(wk), rotate_pairs)
    torch.testing.assert_close(converted, expected, atol=1e-4, rtol=1e-4)
    assert (scores(wq, wk, rotate_pairs) - expected).abs().max() > 1.0       # unpermuted: other scores
    bias = torch.randn(heads * dim)
    torch.testing.assert_close(rotary_to_pairs(heads)(bias), rotary_to_pairs(heads)(bias[:, None])[:, 0])


def test_the_plan_permutes_only_the_llama_arch_and_leaves_a_tied_head_out(folders):
    for family, permuted in (("llama", True), ("qwen2", False), ("gemma", False)):
        folder = folders(family)
        config = json.loads((folder / "config.json").read_text())
        plan = {s.gguf_name: s for s in tensor_plan(config, list(load_file(folder / "model.safetensors")))}
        assert (plan["blk.0.attn_q.weight"].transform is not None) == permuted
        assert (plan["blk.1.attn_k.weight"].transform is not None) == permuted
        assert plan["blk.0.attn_v.weight"].transform is None
        assert ("output.weight" in plan) == (not config["tie_word_embeddings"]), family
    assert gguf_arch({"model_type": "mistral"}) == "llama"


# --- the files, read back -------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_an_f32_file_holds_every_weight_in_llama_cpp_layout_and_the_hyperparameters(folders, family, tmp_path):
    folder = folders(family)
    config = json.loads((folder / "config.json").read_text())
    result = write_gguf(folder, tmp_path / "m.gguf", "f32", say=lambda line: None)
    fields, tensors = read(result.path)
    arch = result.arch
    assert arch == {"fledge": "llama"}.get(family, family) and fields["general.architecture"] == arch
    assert fields["general.file_type"] == gguf.LlamaFileType.ALL_F32
    stored = load_file(folder / "model.safetensors")
    plan = tensor_plan(config, list(stored))
    assert sorted(tensors) == sorted(s.gguf_name for s in plan) == sorted(result.tensor_types)
    for spec in plan:
        expected = stored[spec.hf_name].float()
        expected = spec.transform(expected) if spec.transform else expected
        np.testing.assert_array_equal(tensors[spec.gguf_name][1], expected.numpy(), err_msg=spec.gguf_name)
    width = config.get("hidden_size") or config.get("n_embd")
    assert fields[f"{arch}.embedding_length"] == width == 256
    assert fields[f"{arch}.block_count"] == 2
    assert fields[f"{arch}.attention.head_count"] == 4
    assert fields[f"{arch}.context_length"] == 256
    if family == "gpt2":
        assert fields["gpt2.feed_forward_length"] == 1024 and "position_embd.weight" in tensors
        assert fields["gpt2.attention.layer_norm_epsilon"] == pytest.approx(config["layer_norm_epsilon"])
        w = stored["transformer.h.0.attn.c_attn.weight"]                    # Conv1D: (in, out)
        assert tensors["blk.0.attn_qkv.weight"][1].shape == (w.shape[1], w.shape[0])
    else:
        assert fields[f"{arch}.feed_forward_length"] == config["intermediate_size"] == 768
        assert fields[f"{arch}.attention.head_count_kv"] == 2
        assert fields[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(config["rms_norm_eps"])
        assert fields[f"{arch}.rope.freq_base"] == pytest.approx(config["rope_parameters"]["rope_theta"])
        assert fields[f"{arch}.rope.dimension_count"] == fields[f"{arch}.attention.key_length"] == 64
    if family == "gemma":                   # RMSNorm scales by 1 + weight there, by weight in llama.cpp
        np.testing.assert_array_equal(tensors["output_norm.weight"][1], stored["model.norm.weight"].numpy() + 1)
    if family == "qwen2":
        assert "blk.0.attn_q.bias" in tensors and np.abs(tensors["blk.0.attn_q.bias"][1]).max() > 0


@pytest.mark.parametrize("quant", ["f16", "bf16", "q8_0"])
def test_f16_bf16_and_q8_0_files_quantize_matrices_and_keep_vectors_f32(folders, quant, tmp_path):
    folder = folders("qwen2")
    exact = read(write_gguf(folder, tmp_path / "f32.gguf", "f32", say=lambda line: None).path)[1]
    result = write_gguf(folder, tmp_path / f"{quant}.gguf", quant, say=lambda line: None)
    fields, tensors = read(result.path)
    assert fields["general.file_type"] == {"f16": 1, "bf16": 32, "q8_0": 7}[quant] and result.fallbacks == []
    for name, (kind, values) in tensors.items():
        assert result.tensor_types[name] == kind
        assert kind == ("F32" if values.ndim == 1 else quant.upper()), name
        error = np.abs(values - exact[name][1]).max() / np.abs(exact[name][1]).max()
        assert error <= {"F32": 0, "F16": 1e-3, "BF16": 8e-3, "Q8_0": 1e-2}[kind], (name, error)


def test_q8_0_rows_that_are_no_multiple_of_32_stay_f16_and_are_reported(tmp_path, folders):
    folder = tmp_path / "odd"
    folder.mkdir()
    source = folders("llama")
    for f in source.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    tensors = load_file(folder / "model.safetensors")
    for layer in range(2):                  # FFN 768 -> 720: down_proj rows (its input) are 720 long
        prefix = f"model.layers.{layer}.mlp."
        for name in ("gate_proj", "up_proj"):
            tensors[prefix + name + ".weight"] = tensors[prefix + name + ".weight"][:720].contiguous()
        tensors[prefix + "down_proj.weight"] = tensors[prefix + "down_proj.weight"][:, :720].contiguous()
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 720}))
    said = []
    result = write_gguf(folder, tmp_path / "odd.gguf", "q8_0", say=said.append)
    assert result.tensor_types["blk.0.ffn_down.weight"] == "F16"
    assert result.tensor_types["blk.0.ffn_up.weight"] == "Q8_0"
    assert result.fallbacks == [f"blk.{i}.ffn_down.weight: F16 instead of Q8_0 (rows of 720 are not a multiple of 32)"
                                for i in range(2)]
    assert any("2 of 16 weight matrices are not Q8_0" in line for line in said), said


# --- bad input ------------------------------------------------------------------------------------------

def test_an_unknown_quant_an_unsupported_architecture_and_an_unknown_tensor_are_one_line_errors(folders, tmp_path):
    folder = folders("llama")
    with pytest.raises(ExportError, match=r"unknown GGUF quantization 'q3_k'; choose one of f32, f16") as e:
        write_gguf(folder, tmp_path / "x.gguf", "q3_k")
    messages = [str(e.value)]
    for model_type in ("gpt_neox", "opt"):
        with pytest.raises(ExportError, match=rf"model_type '{model_type}'; it supports llama, mistral, qwen2, "
                                              rf"gemma, gpt2\. Export with --format hf") as e:
            gguf_arch({"model_type": model_type})
        messages.append(str(e.value))
    odd = tmp_path / "neox"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    with pytest.raises(ExportError, match="gpt_neox"):
        write_gguf(odd, tmp_path / "x.gguf", "f16")
    config = json.loads((folder / "config.json").read_text())
    names = list(load_file(folder / "model.safetensors")) + ["model.layers.0.self_attn.q_norm.weight", "score.weight"]
    with pytest.raises(ExportError, match=r"llama.cpp's llama architecture has no tensor for "
                                          r"model.layers.0.self_attn.q_norm.weight, score.weight;") as e:
        tensor_plan(config, names)
    messages.append(str(e.value))
    with pytest.raises(ExportError, match="has no config.json") as e:
        write_gguf(tmp_path / "empty", tmp_path / "x.gguf")
    messages.append(str(e.value))
    assert all("\n" not in m for m in messages)
    assert not (tmp_path / "x.gguf").exists()


def test_a_k_quant_without_llama_cpp_says_what_to_install_and_writes_nothing(folders, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)          # import llama_cpp raises ImportError
    with pytest.raises(DependencyError, match=r"quantizing to q4_k_m needs llama.cpp's Python binding .* "
                                              r"pip install 'fledge\[gguf\]'"):
        write_gguf(folders("llama"), tmp_path / "m.gguf", "q4_k_m")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_leaves_the_earlier_file_and_no_temporary_file(folders, tmp_path, monkeypatch):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"earlier")

    def broken(*args, **kwargs):
        raise ExportError("the vocabulary broke")

    monkeypatch.setattr("fledge.export.gguf_vocab.add_vocab", broken)
    with pytest.raises(ExportError, match="the vocabulary broke"):
        write_gguf(folders("llama"), out, "f16")
    assert out.read_bytes() == b"earlier" and [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


# --- in llama.cpp ---------------------------------------------------------------------------------------

def llama_cpp_logits(path, ids: list[int], *, f32_cache: bool = False) -> np.ndarray:
    """llama.cpp's logits for `ids`, loaded as the contract loads files; `f32_cache` keeps keys and
    values in float32 instead of llama.cpp's default f16 (which alone moves logits by ~2e-3 here)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    cache = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if f32_cache else {}
    model = llama_cpp.Llama(model_path=str(path), logits_all=True, verbose=False, n_ctx=256, n_threads=1, **cache)
    try:
        model.eval(ids)
        return np.array(model.scores[:len(ids)], dtype=np.float32)
    finally:
        model.close()


@pytest.mark.parametrize("family", FAMILIES)
def test_llama_cpp_gives_transformers_logits_for_an_f32_file(folders, family, tmp_path):
    pytest.importorskip("llama_cpp")
    folder = folders(family)
    ids = held_out_ids(folder)
    result = write_gguf(folder, tmp_path / "m.gguf", "f32", say=lambda line: None)
    ours = reference_logits(folder, ids).numpy()
    theirs = llama_cpp_logits(result.path, ids)
    assert ours[0].std() > 0.1 and ours[0].argmax() != ours[0].argmin()     # the first step says something
    # llama.cpp's default f16 KV cache alone: gemma (embeddings scaled by sqrt(256) = 16, so larger
    # keys and values) measured 1.1e-2 once BOS had a trained embedding, the others under 5e-3
    assert len(ids) >= 48 and np.abs(theirs - ours).max() < (2e-2 if family == "gemma" else 5e-3)
    assert (theirs.argmax(-1) == ours.argmax(-1)).all()
    # With a float32 cache only llama.cpp's arithmetic differs: measured at most 8e-6 with SiLU, and
    # 5.8e-4 (gemma) and 3.6e-4 (gpt2) with GELU, which ggml computes from an f16 table on CPU.
    exact = llama_cpp_logits(result.path, ids, f32_cache=True)
    assert np.abs(exact - ours).max() < (1.5e-3 if family in ("gemma", "gpt2") else 1e-4)


def test_without_the_rotary_permutation_llama_cpp_gives_other_logits(folders, tmp_path, monkeypatch):
    """The fixtures are trained enough for the trap to show (measured: 8.2 apart, 78% of argmaxes
    agree), where an untrained model passes without it (0.06 apart, all argmaxes agree)."""
    pytest.importorskip("llama_cpp")
    folder = folders("fledge")
    ids = held_out_ids(folder)
    monkeypatch.setattr("fledge.export.names.rotary_to_pairs", lambda heads: None)
    result = write_gguf(folder, tmp_path / "m.gguf", "f32", say=lambda line: None)
    assert np.abs(llama_cpp_logits(result.path, ids) - reference_logits(folder, ids).numpy()).max() > 1.0


def test_q8_0_is_byte_for_byte_what_llama_cpp_quantizes(folders, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    import ctypes
    import os
    folder = folders("gpt2")
    f32 = write_gguf(folder, tmp_path / "f32.gguf", "f32", say=lambda line: None).path
    ours = write_gguf(folder, tmp_path / "ours.gguf", "q8_0", say=lambda line: None).path
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    theirs = tmp_path / "theirs.gguf"
    assert llama_cpp.llama_model_quantize(os.fsencode(f32), os.fsencode(theirs), ctypes.byref(params)) == 0
    tensors = [{t.name: (t.tensor_type.name, bytes(t.data)) for t in gguf.GGUFReader(path).tensors}
               for path in (ours, theirs)]
    assert tensors[0] == tensors[1]
    assert {kind for kind, _ in tensors[0].values()} == {"Q8_0", "F32"}


def test_quantized_files_load_in_llama_cpp_with_every_matrix_quantized(folders, tmp_path):
    pytest.importorskip("llama_cpp")
    folder = folders("fledge")
    ids = held_out_ids(folder)
    ours = reference_logits(folder, ids).numpy()
    for quant, kinds in (("q8_0", {"Q8_0"}), ("q5_k_m", {"Q5_K", "Q6_K"}), ("q4_k_m", {"Q4_K", "Q6_K"})):
        said = []
        result = write_gguf(folder, tmp_path / f"{quant}.gguf", quant, say=said.append)
        assert result.fallbacks == [] and said == []
        matrices = {n: k for n, k in result.tensor_types.items() if not n.endswith("norm.weight")}
        assert set(matrices.values()) <= kinds and sorted(kinds)[0] in matrices.values(), quant
        theirs = llama_cpp_logits(result.path, ids)
        assert theirs.shape == ours.shape and np.isfinite(theirs).all()
        assert (theirs.argmax(-1) == ours.argmax(-1)).mean() >= 0.9, quant      # measured: 1.0 for all three


@pytest.mark.parametrize("quant,meant,fallback", [("q4_k_m", "Q4_K", "Q5_0"), ("q5_k_m", "Q5_K", "Q5_1")])
def test_a_k_quant_of_rows_not_a_multiple_of_256_reports_every_fallback(folders, tmp_path, quant, meant, fallback):
    pytest.importorskip("llama_cpp")
    folder = folders("fledge-704")
    said = []
    result = write_gguf(folder, tmp_path / "m.gguf", quant, say=said.append)
    fields, _ = read(result.path)
    assert fields["general.file_type"] == getattr(gguf.LlamaFileType, f"MOSTLY_{quant.upper()}")  # label stays
    why = "(rows of 704 are not a multiple of 256)"
    # llama.cpp gives layer 1's ffn_down Q6_K (more bits for the last layers), whose fallback is Q8_0
    assert result.fallbacks == [f"blk.0.ffn_down.weight: {fallback} instead of {meant} {why}",
                                f"blk.1.ffn_down.weight: Q8_0 instead of Q6_K {why}"]
    assert said[0] == (f"m.gguf: 2 of 15 weight matrices are not {quant.upper()} although the file is labelled "
                       f"{quant.upper()}; llama.cpp's quantizer fell back to other types:")
    assert said[1:3] == [f"  {line}" for line in result.fallbacks] and "multiples of 256" in said[3]
    assert all(kind.endswith("_K") for name, kind in result.tensor_types.items()
               if not name.endswith("norm.weight") and "ffn_down" not in name)
    assert np.isfinite(llama_cpp_logits(result.path, held_out_ids(folder))).all()
