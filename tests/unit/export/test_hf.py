"""write_transformers_files: a folder written for fledge's GPT (and for a transformers model) loads
offline with AutoModelForCausalLM and AutoTokenizer and gives the same logits, the same ids, the
same bos/eos/pad, and the chat template renders the prompt fledge renders; generation stops at the
template's end token."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from fledge.errors import TokenizerError
from fledge.export.hf import write_transformers_files
from fledge.model.adapters import resize_vocab
from fledge.model.bases import TransformersLM, model_hf_config
from fledge.model.gpt import GPT, GPTConfig
from fledge.recipe import TokenizerConfig
from fledge.templates import add_template_tokens, get_template, hf_tokenizer, render_prompt, stop_token_ids
from fledge.tokenizer import train_tokenizer
from fledge.train.checkpoint import model_state

CORPUS = "".join(f"{i} little pigs went to market; the {i % 7} wolves stayed home.\n" for i in range(300))
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "3 pigs?"},
            {"role": "assistant", "content": "went to market"}, {"role": "user", "content": "and 5 wolves?"}]


def fledge_model(tmp_path, kind: str, tie: bool):
    """GPT and its fledge tokenizer (as a transformers tokenizer) with chatml's tokens added and given rows."""
    vocab = {"char": 64, "bpe": 300}[kind]
    folder = tmp_path / "tokenizer"
    train_tokenizer(TokenizerConfig(kind=kind, vocab_size=vocab), [CORPUS]).save(folder)
    tok = hf_tokenizer(folder)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=len(tok), n_layers=2, n_heads=4, n_kv_heads=2, dim=32, max_seq_len=256,
                          tie_embeddings=tie, bos_id=tok.bos_token_id, eos_id=tok.eos_token_id)).eval()
    add_template_tokens(tok, get_template("chatml", tok))
    resize_vocab(model, len(tok))
    return model, tok


@pytest.mark.parametrize("kind,tie", [("char", True), ("bpe", False)], ids=["char-tied", "bpe-untied"])
def test_a_fledge_folder_loads_in_transformers_with_the_same_logits_ids_and_template(tmp_path, kind, tie):
    model, tok = fledge_model(tmp_path, kind, tie)
    out = tmp_path / "export"
    out.mkdir()
    save_file(model_state(model), str(out / "model.safetensors"), metadata={"format": "pt"})
    written = write_transformers_files(out, hf_config=model_hf_config(model), tokenizer=tok, template="chatml")
    assert {p.name for p in written} >= {"config.json", "tokenizer.json", "tokenizer_config.json",
                                         "chat_template.jinja", "generation_config.json"}
    theirs = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    their_tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    prompt = render_prompt(MESSAGES, tok, "chatml")
    ids = torch.tensor([prompt + prompt[:5]])
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, model(ids)[0], atol=1e-5, rtol=1e-4)
    text = "12 little pigs <|im_start|>user\nwolves?<|im_end|>\n"
    assert their_tok.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
    for name in ("bos_token", "eos_token", "pad_token"):
        assert getattr(their_tok, name) == getattr(tok, name) and getattr(their_tok, name) is not None
    assert their_tok.pad_token != their_tok.eos_token
    rendered = their_tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert their_tok.encode(rendered, add_special_tokens=False) == prompt
    generation = GenerationConfig.from_pretrained(out)
    stops = stop_token_ids(tok, "chatml")
    assert generation.eos_token_id == stops and tok.convert_tokens_to_ids("<|im_end|>") in stops
    assert generation.bos_token_id == tok.bos_token_id and generation.pad_token_id == tok.pad_token_id
    # padding with BOS (bpe) must not make BOS transformers' padding_idx, a row that never trains
    padding_idx = theirs.get_input_embeddings().padding_idx
    assert padding_idx != tok.bos_token_id and (padding_idx is None or padding_idx == tok.pad_token_id)


def test_a_transformers_model_folder_loads_back_with_the_same_logits(tmp_path):
    _, tok = fledge_model(tmp_path, "char", True)
    torch.manual_seed(0)
    config = AutoConfig.for_model("gpt2", vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = TransformersLM(AutoModelForCausalLM.from_config(config)).eval()
    out = tmp_path / "gpt2"
    out.mkdir()
    save_file(model_state(model), str(out / "model.safetensors"), metadata={"format": "pt"})
    write_transformers_files(out, hf_config=model_hf_config(model), tokenizer=tok, template="qa")
    theirs = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    ids = torch.tensor([render_prompt("3 pigs?", tok, "qa")])
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, model(ids)[0], atol=1e-5, rtol=1e-4)
    assert AutoTokenizer.from_pretrained(out, local_files_only=True).model_max_length == 64


def test_a_tokenizer_with_tokens_the_model_has_no_rows_for_is_refused(tmp_path):
    model, tok = fledge_model(tmp_path, "char", True)
    config = model_hf_config(model)
    tok.add_tokens(["<extra>"], special_tokens=True)
    with pytest.raises(TokenizerError, match="embedding rows"):
        write_transformers_files(tmp_path / "out", hf_config=config, tokenizer=tok, template="chatml")


def test_without_a_template_the_tokenizer_files_are_written_alone(tmp_path):
    model, tok = fledge_model(tmp_path, "char", True)
    out = tmp_path / "plain"
    names = {p.name for p in write_transformers_files(out, hf_config=model_hf_config(model), tokenizer=tok,
                                                      template=None)}
    assert "chat_template.jinja" not in names and "tokenizer_config.json" in names
    loaded = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert loaded.eos_token == tok.eos_token and not loaded.chat_template
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == tok.eos_token_id
    assert AutoConfig.from_pretrained(out).vocab_size == len(tok)


def test_a_tokenizer_whose_pad_is_eos_is_refused_before_anything_is_written(tmp_path):
    model, tok = fledge_model(tmp_path, "char", True)
    tok.pad_token = tok.eos_token
    with pytest.raises(TokenizerError, match="pad token"):
        write_transformers_files(tmp_path / "out", hf_config=model_hf_config(model), tokenizer=tok, template="qa")
    assert not (tmp_path / "out").exists()
