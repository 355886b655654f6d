"""Tiny briefly-trained models as transformers folders, the input of every export test: fledge's GPT
and transformers llama, qwen2, gemma and gpt2, all 256 wide with FFN widths a multiple of 256 (so
K-quants apply to every matrix), on fledge's own tokenizers with chatml's tokens added.

    folder = fledge_gpt(root)                         # root/fledge-bpe: config.json, model.safetensors, tokenizer
    folder = transformers_model(root, "qwen2")        # root/hf-qwen2
    folder = fledge_gpt(root, hidden_dim=704, name="fledge-704")   # rows K-quants cannot take
    ids = held_out_ids(folder)                        # BOS + a sentence not in the corpus
    logits = reference_logits(folder, ids)            # AutoModelForCausalLM's (len(ids), vocab), float32

Trained, not random, because a random model's attention is nearly uniform: a wrong rotary layout in
a converted file changes its logits by almost nothing (test_gguf measures this). A builder returns
the folder at once when it already exists, so tests share one through a session fixture.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

from fledge.export.hf import write_transformers_files
from fledge.model.adapters import resize_vocab
from fledge.model.bases import model_hf_config
from fledge.model.gpt import GPT, GPTConfig
from fledge.recipe import TokenizerConfig
from fledge.templates import add_template_tokens, get_template, hf_tokenizer
from fledge.tokenizer import find_tokenizer_file, train_tokenizer
from fledge.train.checkpoint import model_state

WIDTH = 256
FFN = 768                  # a multiple of 256; fledge's default for dim 256 is 704, which is not
TEMPLATE = "chatml"
VOCAB = {"bpe": 384, "sentencepiece": 320, "char": 96}
_ANIMALS = ("fox", "wren", "otter", "heron", "lynx", "moth", "newt")
CORPUS = "".join(f"The {_ANIMALS[i % 7]} saw {i % 13} stones by the river; it counted {(i * 7) % 31} ripples "
                 f"and went home at {i % 24}:00. Der Fuchs sah {i % 5} Steine. 狐は川で{i % 9}個の石を見た。\n"
                 for i in range(400))
HELD_OUT = ("The lynx saw 12 stones by the river; it counted 3 ripples and went home. Der Fuchs sah 3 Steine. "
            "狐は川で4個の石を見た。 The heron saw 5 stones by the river; it counted 8 ripples and went home at 7:00.")


def tokenizer(root: Path, kind: str = "bpe"):
    """fledge's `kind` tokenizer trained on CORPUS, as a transformers tokenizer with chatml's tokens."""
    folder = root / f"tokenizer-{kind}"
    if not folder.is_dir():
        train_tokenizer(TokenizerConfig(kind=kind, vocab_size=VOCAB[kind]), [CORPUS]).save(folder)
    tok = hf_tokenizer(folder)
    add_template_tokens(tok, get_template(TEMPLATE, tok))
    return tok, folder


def fledge_gpt(root: Path, *, kind: str = "bpe", hidden_dim: int = FFN, tie: bool = True, steps: int = 40,
               name: str | None = None) -> Path:
    """A fledge GPT (2 layers, 256 wide, 4 heads over 2 KV heads) trained `steps` steps on CORPUS,
    exported the way `fledge export --format hf` does: model.safetensors in LlamaForCausalLM names,
    config.json, tokenizer files and chat template (and a SentencePiece tokenizer's tokenizer.model)."""
    folder = root / (name or f"fledge-{kind}")
    if folder.is_dir():
        return folder
    tok, tokenizer_folder = tokenizer(root, kind)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=len(tok), n_layers=2, n_heads=4, n_kv_heads=2, dim=WIDTH, hidden_dim=hidden_dim,
                          max_seq_len=256, tie_embeddings=tie, bos_id=tok.bos_token_id, eos_id=tok.eos_token_id))
    resize_vocab(model, len(tok))
    _train(lambda ids: model(ids[:, :-1], ids[:, 1:])[1], model, tok, steps)
    folder.mkdir(parents=True)
    save_file(model_state(model), str(folder / "model.safetensors"), metadata={"format": "pt"})
    write_transformers_files(folder, hf_config=model_hf_config(model), tokenizer=tok, template=TEMPLATE)
    if kind == "sentencepiece":
        shutil.copy(find_tokenizer_file(tokenizer_folder), folder / "tokenizer.model")
    return folder


def transformers_model(root: Path, family: str, *, steps: int = 40) -> Path:
    """A transformers `family` model (llama, qwen2, gemma, gpt2; 2 layers, 256 wide, FFN 768 or gpt2's
    4 x 256) on fledge's bpe tokenizer, trained `steps` steps on CORPUS and saved with save_pretrained."""
    folder = root / f"hf-{family}"
    if folder.is_dir():
        return folder
    tok, _ = tokenizer(root, "bpe")
    # no pad_token_id: fledge's tokenizer pads with BOS, and transformers would make BOS the embedding's
    # padding_idx (a zero row that never trains): every first-step logit 0, proving nothing
    special = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                   pad_token_id=None)
    if family == "gpt2":
        config = AutoConfig.for_model("gpt2", n_embd=WIDTH, n_layer=2, n_head=4, n_positions=256, **special)
    else:
        extra = {"head_dim": WIDTH // 4} if family == "gemma" else {}
        config = AutoConfig.for_model(family, hidden_size=WIDTH, intermediate_size=FFN, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      **extra, **special)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    _train(lambda ids: model(input_ids=ids, labels=ids).loss, model, tok, steps)
    model.save_pretrained(folder)
    write_transformers_files(folder, hf_config=None, tokenizer=tok, template=TEMPLATE)
    return folder


def _train(loss_of, model: torch.nn.Module, tok, steps: int, block: int = 64, batch: int = 8) -> None:
    """AdamW on random windows of CORPUS: enough for attention to matter, seconds on one core."""
    ids = torch.tensor(tok.encode(CORPUS, add_special_tokens=False))
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - block - 1, (batch,), generator=generator)
        rows = torch.stack([ids[s:s + block + 1] for s in starts.tolist()])
        rows[:, 0] = tok.bos_token_id
        loss_of(rows).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def held_out_ids(folder: Path, text: str = HELD_OUT) -> list[int]:
    """BOS + `text` in the folder's tokenizer."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return [tok.bos_token_id] + tok.encode(text, add_special_tokens=False)


@torch.no_grad()
def reference_logits(folder: Path, ids: list[int]) -> torch.Tensor:
    """The logits transformers gives for `ids` from the folder: (len(ids), vocab), float32."""
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    return model(input_ids=torch.tensor([ids])).logits[0]
