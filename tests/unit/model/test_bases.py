"""load_base and TransformersLM: every supported transformers family loads, trains and computes
transformers' own loss with fledge's shifted labels; a packed row computes what it computes alone
(logits and gradients) in every family; generation matches a greedy full forward; a fledge run
is inherited with its architecture and tokenizer and contradicting keys are named; a fine-tune
checkpoint of a transformers base loads again; bad bases fail with one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

from fledge.errors import CheckpointError, RecipeError
from fledge.model.bases import TransformersLM, load_base, model_hf_config, positions_from_documents
from fledge.model.gpt import GPT, GPTConfig, to_hf_config
from fledge.prepare import prepare
from fledge.recipe import TokenizerConfig, load_recipe
from fledge.sample import load_for_inference
from fledge.templates import hf_tokenizer
from fledge.tokenizer import train_tokenizer
from fledge.train import train
from fledge.train.checkpoint import model_state
from test_gpt import packed_and_alone_logits_and_grads

V = 96             # embedding rows of the tiny transformers models (more than the tokenizer has, like Qwen's)
CORPUS = "".join(f"{i} little pigs went to market; the {i % 7} wolves stayed home.\n" for i in range(200))
FAMILIES = {
    "llama": dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2),
    "qwen2": dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2),
    "gemma": dict(model_type="gemma", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=1, head_dim=8),
    "gpt2": dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=4),
    "gpt_neox": dict(model_type="gpt_neox", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4),
    "opt": dict(model_type="opt", hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                word_embed_proj_dim=32),
    "phi": dict(model_type="phi", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
}


def tiny_config(family: str, **overrides):
    settings = dict(FAMILIES[family])
    model_type = settings.pop("model_type")
    defaults = dict(vocab_size=V, max_position_embeddings=128, bos_token_id=0, eos_token_id=1, pad_token_id=None)
    return AutoConfig.for_model(model_type, **{**defaults, **settings, **overrides})


def char_tokenizer(root: Path):
    """fledge's char tokenizer of CORPUS as a transformers tokenizer (<|bos|> 0, <|eos|> 1, <unk> 2 = pad)."""
    folder = root / "fledge-tokenizer"
    if not folder.is_dir():
        train_tokenizer(TokenizerConfig(kind="char", vocab_size=64), [CORPUS]).save(folder)
    return hf_tokenizer(folder)


def hf_folder(root: Path, family: str, seed: int = 0, **overrides) -> Path:
    """A tiny random transformers model of `family` with a tokenizer, saved as a model folder."""
    folder = root / f"hf-{family}-{seed}"
    if not folder.is_dir():
        torch.manual_seed(seed)
        AutoModelForCausalLM.from_config(tiny_config(family, **overrides)).save_pretrained(folder)
        char_tokenizer(root).save_pretrained(folder)
    return folder


def recipe_for(base, **sections):
    return load_recipe(None, base={"model": {"base": str(base)}, **sections}, check_machine=False)


def run_tiny(root: Path, name: str = "tiny", model: dict | None = None) -> Path:
    """A 3-step fledge run on a char corpus; returns the run folder."""
    corpus = root / "corpus.txt"
    corpus.write_text(CORPUS)
    recipe = load_recipe(None, base={
        "name": name, "run_dir": str(root / "runs" / name),
        "data": {"sources": [str(corpus)], "prepared_dir": str(root / f"prepared-{name}")},
        "tokenizer": {"kind": "char", "vocab_size": 64},
        "model": {"n_layers": 2, "n_heads": 2, "dim": 32, "max_seq_len": 64, **(model or {})},
        "train": dict(max_steps=3, batch_size=2, block_size=32, lr=1e-2, warmup_steps=1, eval_every=3,
                      eval_batches=1, checkpoint_every=0, threads=1, seed=3),
        "sample": {"prompts": []}})
    prepare(recipe, progress=False)
    train(recipe, progress=False)
    return recipe.run_path


@pytest.fixture(scope="module")
def fledge_run(tmp_path_factory) -> Path:
    return run_tiny(tmp_path_factory.mktemp("fledge-run"))


def shifted(ids):
    """fledge's labels for `ids`: the next token, -100 at the end."""
    return torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)


# --- transformers families -------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_loads_trains_and_agrees_with_transformers_loss(tmp_path, family):
    folder = hf_folder(tmp_path, family)
    base, recipe = load_base(recipe_for(folder, finetune={"method": "full"}), "cpu")
    model = base.model
    assert base.kind == "transformers" and isinstance(model, TransformersLM) and base.path == folder
    assert (recipe.model.arch, recipe.model.dim, recipe.model.n_layers, recipe.model.max_seq_len) == \
        ("transformers", 32, 2, 128)
    assert base.hf_config["model_type"] == FAMILIES[family]["model_type"]
    assert set(model.state_dict()) == set(model.hf.state_dict())      # transformers' names, no prefix
    model.eval()
    ids = torch.randint(0, len(base.tokenizer), (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, loss = model(ids, shifted(ids))
        reference = model.hf(input_ids=ids, labels=ids).loss        # transformers shifts its labels itself
        positioned, _ = model(ids, position_ids=torch.arange(16).expand(2, 16))
    torch.testing.assert_close(loss, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(positioned, logits, atol=1e-5, rtol=1e-5)   # explicit plain positions: same
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        _, step_loss = model(ids, shifted(ids))
        step_loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        assert float(model(ids, shifted(ids))[1]) < float(loss)


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_rows_match_each_row_alone_logits_and_gradients(tmp_path, family):
    """The pinned trap: with transformers' defaults (use_cache on, or a 2D mask, or opt's positions)
    packed examples see each other; TransformersLM's 4D mask and restarting positions must not."""
    torch.manual_seed(0)
    model = TransformersLM(AutoModelForCausalLM.from_config(tiny_config(family))).eval()   # eval: no dropout
    g = torch.Generator().manual_seed(1)
    a, b = torch.randint(0, V, (7,), generator=g), torch.randint(0, V, (12,), generator=g)
    packed, alone = packed_and_alone_logits_and_grads(model, a, b)
    for name in packed:
        torch.testing.assert_close(packed[name], alone[name], atol=1e-5, rtol=1e-4, msg=name)


def test_positions_restart_at_each_document():
    docs = torch.tensor([[0, 0, 0, 1, 1, 2], [4, 4, 4, 4, 4, 4]])
    assert positions_from_documents(docs).tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]


def test_packing_under_bf16_autocast_stays_close_to_alone():
    torch.manual_seed(0)
    model = TransformersLM(AutoModelForCausalLM.from_config(tiny_config("llama"))).eval()
    a, b = torch.randint(0, V, (7,)), torch.randint(0, V, (9,))
    docs = torch.cat([torch.zeros(7), torch.ones(9)]).long()[None]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        packed, _ = model(torch.cat([a, b])[None], document_ids=docs)
        alone, _ = model(b[None])
    torch.testing.assert_close(packed[0, 7:].float(), alone[0].float(), atol=0.05, rtol=0.05)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "gpt_neox"])
def test_generate_matches_a_greedy_full_forward_and_stops_at_eos(family):
    torch.manual_seed(0)
    model = TransformersLM(AutoModelForCausalLM.from_config(tiny_config(family))).eval()
    idx = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(0))
    generated = torch.cat(list(model.generate(idx, 6, temperature=0.0)), dim=1)
    expected = idx
    with torch.no_grad():
        for _ in range(6):
            nxt = model(expected)[0][:, -1].argmax(-1, keepdim=True)
            expected = torch.cat([expected, nxt], dim=1)
    assert torch.equal(generated, expected[:, 5:])
    eos = int(generated[0, 2])
    stopped = torch.cat(list(model.generate(idx, 6, temperature=0.0, eos_id=eos)), dim=1)
    first = generated[0].tolist().index(eos)
    assert stopped[0, first] == eos and (stopped.shape[1] == 6 or bool((stopped[:, -1] == eos).all()))
    assert model.training is False


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_wrapped_llama_counts_flops_and_parameters_like_gpt(tmp_path, tie):
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=64, n_layers=2, n_heads=4, n_kv_heads=2, dim=32, max_seq_len=64,
                        tie_embeddings=tie)).eval()
    save_file(model_state(gpt), str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(to_hf_config(gpt.config)))
    wrapped = TransformersLM(LlamaForCausalLM.from_pretrained(tmp_path)).eval()
    assert wrapped.flops_per_token(16) == gpt.flops_per_token(16)
    assert wrapped.num_parameters() == gpt.num_parameters()
    assert wrapped.config.max_seq_len == 64 and wrapped.config.vocab_size == 64
    idx = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(wrapped(idx)[0], gpt(idx)[0], atol=1e-5, rtol=1e-4)


# --- fledge bases ----------------------------------------------------------------------------

def test_fledge_run_is_inherited_with_its_architecture_and_tokenizer(fledge_run):
    base, recipe = load_base(recipe_for(fledge_run, finetune={"method": "lora"}, train={"block_size": 32}), "cpu")
    reference, fledge_tok, _ = load_for_inference(fledge_run)
    assert base.kind == "fledge" and isinstance(base.model, GPT) and base.path.parent.name == "checkpoints"
    assert (recipe.model.dim, recipe.model.n_layers, recipe.model.max_seq_len, recipe.model.base) == \
        (32, 2, 64, str(fledge_run))
    assert recipe.tokenizer.kind == "char" and recipe.finetune.method == "lora" and recipe.train.block_size == 32
    assert base.chat_template is None and base.hf_config == to_hf_config(base.model.config)
    text = "3 little pigs; 5 wolves\n"
    assert base.tokenizer.encode(text, add_special_tokens=False) == fledge_tok.encode(text)
    assert (base.tokenizer.bos_token_id, base.tokenizer.eos_token_id) == (fledge_tok.bos_id, fledge_tok.eos_id)
    idx = torch.randint(0, fledge_tok.vocab_size, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(base.model.eval()(idx)[0], reference(idx)[0], atol=0, rtol=0)


def test_keys_that_contradict_the_base_are_named_with_both_values(fledge_run):
    recipe = recipe_for(fledge_run, model={"base": str(fledge_run), "dim": 64, "n_layers": 2},
                        train={"block_size": 128}, tokenizer={"kind": "bpe"})
    with pytest.raises(RecipeError) as e:
        load_base(recipe, "cpu")
    message = str(e.value)
    assert f"model.dim: recipe 64, base {fledge_run} has 32" in message
    assert "train.block_size: recipe 128" in message and "at most 64" in message
    assert "tokenizer.kind: recipe 'bpe'" in message and "model.n_layers" not in message   # equal: fine


def test_fine_tune_dropout_may_differ_from_the_base(fledge_run):
    base, recipe = load_base(recipe_for(fledge_run, model={"base": str(fledge_run), "dropout": 0.2},
                                        train={"block_size": 32}), "cpu")
    assert base.model.config.dropout == 0.2 and recipe.model.dropout == 0.2


def test_a_recipe_naming_another_tokenizer_is_refused(fledge_run, tmp_path):
    other = train_tokenizer(TokenizerConfig(kind="char", vocab_size=64), ["completely different text!"])
    other_file = other.save(tmp_path)
    with pytest.raises(RecipeError, match="tokenizer"):
        load_base(recipe_for(fledge_run, tokenizer={"path": str(other_file)}, train={"block_size": 32}), "cpu")
    checkpoint = next((fledge_run / "checkpoints").glob("step-*"))
    base, _ = load_base(recipe_for(fledge_run, tokenizer={"path": str(checkpoint / "tokenizer.json")},
                                   train={"block_size": 32}), "cpu")      # the base's own tokenizer: fine
    assert base.kind == "fledge"


def test_fine_tune_checkpoint_of_a_transformers_base_loads_again(tmp_path):
    from fledge.export.hf import write_transformers_files
    from fledge.train.checkpoint import save_checkpoint
    folder = hf_folder(tmp_path, "qwen2")
    base, recipe = load_base(recipe_for(folder, train={"block_size": 32}), "cpu")
    model, tok = base.model, base.tokenizer
    ids = torch.randint(0, len(tok), (2, 16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(ids, shifted(ids))[1].backward()
    optimizer.step()
    checkpoint = save_checkpoint(
        tmp_path / "run", 1, model, optimizer, {"step": 1, "vocab_size": len(tok)}, recipe.to_yaml(),
        folder / "tokenizer.json", None, 2,
        extra_files=lambda f: write_transformers_files(f, hf_config=model_hf_config(model), tokenizer=tok,
                                                       template="qa"))
    again, again_recipe = load_base(recipe_for(tmp_path / "run", train={"block_size": 32}), "cpu")
    assert again.kind == "fledge" and isinstance(again.model, TransformersLM) and again.path == checkpoint
    assert again_recipe.model.arch == "transformers" and again.chat_template.name == "qa"
    plain = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(again.model.eval()(ids)[0], model(ids)[0], atol=0, rtol=0)
        torch.testing.assert_close(plain(input_ids=ids).logits, model(ids)[0], atol=1e-6, rtol=1e-6)


# --- bases that are not ----------------------------------------------------------------------

def test_a_base_that_does_not_exist_is_one_line(tmp_path):
    with pytest.raises(RecipeError, match="no such folder") as e:
        load_base(recipe_for(tmp_path / "nothing-here"), "cpu")
    assert "\n" not in str(e.value)


def test_a_hub_id_while_offline_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RecipeError, match="no such folder, and the machine is offline") as e:
        load_base(recipe_for("some-org/some-model-that-is-not-here"), "cpu")
    assert "\n" not in str(e.value)


def test_a_folder_that_is_neither_names_what_it_holds(tmp_path):
    folder = tmp_path / "stuff"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    with pytest.raises(RecipeError, match=r"neither a fledge run.*it holds: notes.txt"):
        load_base(recipe_for(folder), "cpu")


def test_an_encoder_only_model_is_refused(tmp_path):
    from transformers import BertConfig, BertForMaskedLM
    torch.manual_seed(0)
    config = BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128)
    BertForMaskedLM(config).save_pretrained(tmp_path / "bert")
    with pytest.raises(RecipeError, match="not a causal language model") as e:
        load_base(recipe_for(tmp_path / "bert"), "cpu")
    assert "\n" not in str(e.value)


def test_an_encoder_decoder_model_is_refused(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration
    config = T5Config(vocab_size=V, d_model=32, d_ff=64, num_layers=1, num_heads=4, d_kv=8)
    T5ForConditionalGeneration(config).save_pretrained(tmp_path / "t5")
    with pytest.raises(RecipeError, match="encoder-decoder"):
        load_base(recipe_for(tmp_path / "t5"), "cpu")


def test_a_damaged_base_checkpoint_is_refused(tmp_path):
    run = run_tiny(tmp_path, "damaged")
    checkpoint = next((run / "checkpoints").glob("step-*"))
    weights = checkpoint / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="damaged"):
        load_base(recipe_for(checkpoint, train={"block_size": 32}), "cpu")


def test_the_registered_transformers_arch_builds_the_base_architecture(tmp_path):
    from fledge.model.registry import build_model
    from fledge.recipe import ModelConfig
    folder = hf_folder(tmp_path, "gpt2")
    model = build_model(ModelConfig(arch="transformers", base=str(folder)), 40)
    assert isinstance(model, TransformersLM) and model.config.vocab_size == 40
    assert type(model.hf).__name__ == "GPT2LMHeadModel"
    with pytest.raises(RecipeError, match="needs model.base"):
        build_model(ModelConfig(arch="transformers"), 40)
    with pytest.raises(RecipeError, match="without permission to run code"):
        build_model(ModelConfig(arch="transformers", base=str(folder), trust_remote_code=True), 40)
