"""add_vocab: a GGUF whose tokenizer llama.cpp runs exactly as fledge (and transformers) does.

    OMP_NUM_THREADS=1 pytest tests/unit/export/test_gguf_vocab.py -q

Every tokenizer kind is built in tmp_path as `fledge export --format hf` leaves it (tokenizer.json,
tokenizer_config.json with chatml's tokens added, generation_config.json, chat_template.jinja, a
config.json with more embedding rows than tokens; SentencePiece's tokenizer.model beside), written
into a GGUF holding only a llama header and the vocabulary, and loaded in llama.cpp with
vocab_only=True. On SAMPLE (100+ strings: PROBE, many scripts, emoji, digits, whitespace runs,
special-token text typed as text) llama.cpp's ids must equal the reference's, detokenize must give
the text back, and a rendered chat must parse its special tokens as single tokens with special=True.
Without llama-cpp-python only the metadata checks run (gguf.GGUFReader).
"""

from __future__ import annotations

import json
import shutil
import unicodedata
from pathlib import Path

import gguf
import pytest
from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from fledge.errors import ExportError
from fledge.export.gguf_vocab import VocabInfo, add_vocab
from fledge.export.hf import write_transformers_files
from fledge.recipe import TokenizerConfig
from fledge.templates import PROBE, add_template_tokens, get_template, hf_tokenizer
from fledge.tokenizer import train_tokenizer

_LINES = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "don't won't I'll we've they're she'd IT'S DON'T You'Re",
    "1234567890 3.14159 2024-06-01 1,000,000 0x1F 1e-9 +42 -7 ½ ²",
    "    four leading spaces", "trailing spaces    ", "two  spaces   three    four", "\ttab\t\ttabs",
    "line one\nline two\r\nline three\rfour", "\n\n\nthree blank lines", "   ", "\n", " ", "a", "",
    "naïve café Ünïcödé façade jalapeño Straße ÆØÅ", "Привет, мир! Как дела?", "Ωμέγα λόγος ἀρχή",
    "日本語のテキストです。", "中文文本，标点符号！", "안녕하세요 세계", "مرحبا بالعالم", "नमस्ते दुनिया",
    "שלום עולם", "สวัสดีชาวโลก", "Tiếng Việt có dấu", "😀👍🏽 emoji 🦜🦜 👨‍👩‍👧 🇩🇪 1️⃣",
    "def f(x):\n    return x ** 2  # square\n", "if (a && b || !c) { return a[i] >> 2; }",
    "https://example.com/path?q=1&r=2#frag", "user@example.org", "<html><body>Hi</body></html>",
    "<|eos|> and <|bos|> typed as text", "<|im_start|>user\nhi<|im_end|> typed", "<s></s><unk>[PAD]",
    "\u00a0nbsp\u200bzero-width\u2028separator", "ﬁ ligature ＡＢＣ fullwidth", "e\u0301 combining accent",
    "tab\tand\u3000ideographic space", "!!! ??? ... --- ___ *** ###", "(parens) [brackets] {braces} <angles>",
    "The year 1999, the price $19.99, 50% off, #1!", "MiXeD CaSe WoRdS aNd ACRONYMS like NASA",
    "a b c d e f g h i j k l m n o p", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "....................",
    "0000000000000000", "       ", "\t\t\t\t", "\r\n\r\n", " leading and trailing ",
]
SEEN = [PROBE, "  " + PROBE] + _LINES + [" " + s for s in _LINES if s] + [s + "  \n" for s in _LINES[:20]]
# never in a tokenizer's training text (except char's): byte fallback and unmerged bytes
UNSEEN = ["Ǆ ǅ ǆ ꙮ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ☃ ⚡ 🦩🪿", "Ἀθῆναι ἐν τῷ Ἑλληνικῷ", "Ꭰ Ꭱ Ꭲ Cherokee", "ᚠᚢᚦᚨᚱᚲ runes 𓀀 𓁐",
          "  ꙮꙮꙮ  ", "\u2029para\u0085nel\x0bvt\x0cff\x07bel"]
SAMPLE = SEEN + UNSEEN
_WORDS = ("the of and to a in that it was he for on with as his they be at one have this from by hot word but "
          "what some we can out other were all there when up use your how said an each she which do their time "
          "if will way about many then them write would like so these her pigs wolves market home "
          "Wolf Schweine gingen zum Markt Привет мир волк свиньи 子豚 市場 狼 家").split()
CORPUS = "".join(f"{' '.join(_WORDS[(i * 7 + j * j) % len(_WORDS)] for j in range(3 + i % 9)).capitalize()}"
                 f" {i * 37 % 1000}{'.' if i % 3 else ','}{chr(10) if i % 4 else '  '}" for i in range(1500))
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "3 pigs?"},
            {"role": "assistant", "content": "went to market"}, {"role": "user", "content": "and 5 wolves?"}]
EXTRA_ROWS = 5          # embedding rows beyond the tokenizer's (a resized or padded model)
QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
         r"|\s+(?!\S)|\s+")
LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def test_sample_is_large_and_varied():
    assert len(SAMPLE) >= 100
    text = "".join(SAMPLE)
    assert any(unicodedata.category(c) == "So" for c in text) and "   " in text and "\t" in text
    assert any(c.isdigit() for c in text)


# --- folders as `fledge export --format hf` writes them ------------------------------------------

def fledge_folder(root: Path, kind: str) -> tuple[Path, object]:
    """fledge's `kind` tokenizer with chatml's tokens added, in a transformers folder; and the fledge
    Tokenizer (the reference: the ids the model was trained on)."""
    size = {"bpe": 1500, "sentencepiece": 1500, "char": 800}[kind]
    source = root / f"{kind}-source"
    # merges that cross every boundary a wrong pre-tokenizer would draw: the sample is training text;
    # char knows only characters it saw (unknown ones have their own test)
    texts = [CORPUS] + (SAMPLE if kind == "char" else SEEN)
    fledge_tok = train_tokenizer(TokenizerConfig(kind=kind, vocab_size=size), texts)
    fledge_tok.save(source)
    tok = hf_tokenizer(source)
    add_template_tokens(tok, get_template("chatml", tok))
    folder = root / kind
    write_transformers_files(folder, hf_config={"model_type": "llama", "vocab_size": len(tok) + EXTRA_ROWS},
                             tokenizer=tok, template="chatml")
    if kind == "sentencepiece":
        shutil.copy(source / "tokenizer.model", folder / "tokenizer.model")
    return folder, fledge_tok


def byte_level_folder(root: Path, name: str, regex: str | None, *, ignore_merges: bool = False,
                      normalizer=None) -> tuple[Path, HFTokenizer]:
    """A byte-level BPE trained offline the way Qwen2 (Split regex, NFC) or Llama 3 (ignore_merges)
    tokenizers are built, with their special tokens; folder files as transformers saves them."""
    tok = HFTokenizer(models.BPE(ignore_merges=ignore_merges))
    if regex is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=1500, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS] + SEEN, trainer)
    folder = root / name
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
         "pad_token": "<|endoftext|>"}))
    (folder / "chat_template.jinja").write_text(get_template("chatml").source)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [tok.token_to_id("<|im_end|>"),
                                                                                 tok.token_to_id("<|endoftext|>")]}))
    # transformers builds every qwen2 tokenizer with Qwen2's own pattern: only the Qwen2 one says qwen2
    model_type = "qwen2" if regex == QWEN2 else "llama"
    (folder / "config.json").write_text(json.dumps({"model_type": model_type, "vocab_size": tok.get_vocab_size()}))
    tok.encode_special_tokens = True        # the reference: special-token text typed in text stays text
    return folder, tok


def spm_json_folder(sentencepiece_folder: Path) -> Path:
    """The SentencePiece folder without tokenizer.model: tokenizer.json alone, as transformers saves
    Gemma and Llama 2 bases."""
    folder = sentencepiece_folder.with_name(sentencepiece_folder.name + "-json")
    shutil.copytree(sentencepiece_folder, folder)
    (folder / "tokenizer.model").unlink()
    return folder


def gemma_style_folder(json_folder: Path):
    """tokenizer.json as transformers converts Gemma's: spaces replaced by "▁" in the normalizer, then
    a Split at " " (which finds none). Returns the folder and its encode function (tokenizers')."""
    folder = json_folder.with_name("sentencepiece-gemma")
    shutil.copytree(json_folder, folder)
    data = json.loads((folder / "tokenizer.json").read_text())
    data["pre_tokenizer"] = {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious",
                             "invert": False}
    (folder / "tokenizer.json").write_text(json.dumps(data))
    tok = HFTokenizer.from_file(str(folder / "tokenizer.json"))
    tok.encode_special_tokens = True
    return folder, lambda text: tok.encode(text, add_special_tokens=False).ids


def llama2_style_folder(root: Path):
    """A SentencePiece BPE model as Llama 2's is made (dummy prefix, <s> </s>, byte fallback, digits
    split), trained by sentencepiece itself; its folder as fledge writes one for a transformers base.
    Returns the folder and the SentencePiece processor (the reference)."""
    import io

    import sentencepiece as spm
    model = io.BytesIO()
    lines = [line for text in [CORPUS] + SEEN for line in text.splitlines() if line]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=1500,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        split_digits=True, byte_fallback=True, allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, minloglevel=2)
    source = root / "llama2-source"
    source.mkdir()
    (source / "tokenizer.model").write_bytes(model.getvalue())
    tok = hf_tokenizer(source / "tokenizer.model")
    add_template_tokens(tok, get_template("chatml", tok))
    folder = root / "sentencepiece-prefix"
    write_transformers_files(folder, hf_config={"model_type": "llama", "vocab_size": len(tok) + EXTRA_ROWS},
                             tokenizer=tok, template="chatml")
    shutil.copy(source / "tokenizer.model", folder / "tokenizer.model")
    return folder, spm.SentencePieceProcessor(model_proto=model.getvalue())


def vocab_gguf(folder: Path, out: Path) -> VocabInfo:
    """A GGUF with a minimal llama header and the vocabulary: enough for Llama(vocab_only=True)."""
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(32)
    writer.add_block_count(1)
    writer.add_feed_forward_length(64)
    writer.add_head_count(4)
    writer.add_layer_norm_rms_eps(1e-5)
    info = add_vocab(writer, folder, "llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return info


# kind -> (llama.cpp tokenizer model, pre-tokenizer name)
EXPECTED = {"bpe": ("gpt2", "gpt-2"), "sentencepiece": ("llama", None), "sentencepiece-json": ("llama", None),
            "sentencepiece-gemma": ("llama", None), "char": ("t5", None), "sentencepiece-prefix": ("llama", None),
            "sentencepiece-prefix-json": ("llama", None), "qwen2": ("gpt2", "qwen2"), "llama3": ("gpt2", "llama-bpe"),
            "llama3-merging": ("gpt2", "smaug-bpe")}
PADDED = tuple(k for k in EXPECTED if k.startswith(("bpe", "sentencepiece", "char")))   # fledge-written folders


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, tuple[Path, Path, VocabInfo, object]]:
    """kind -> (folder, gguf file, VocabInfo, reference encode function) for every kind in EXPECTED."""
    root = tmp_path_factory.mktemp("vocab")
    refs = {}
    for kind in ("bpe", "sentencepiece", "char"):
        folder, fledge_tok = fledge_folder(root, kind)
        refs[kind] = (folder, fledge_tok.encode)
    refs["sentencepiece-json"] = (spm_json_folder(refs["sentencepiece"][0]), refs["sentencepiece"][1])
    refs["sentencepiece-gemma"] = gemma_style_folder(refs["sentencepiece-json"][0])
    folder, processor = llama2_style_folder(root)
    refs["sentencepiece-prefix"] = (folder, processor.encode)
    refs["sentencepiece-prefix-json"] = (spm_json_folder(folder), processor.encode)
    for kind, regex, ignore, norm in (("qwen2", QWEN2, False, normalizers.NFC()), ("llama3", LLAMA3, True, None),
                                      ("llama3-merging", LLAMA3, False, None)):
        folder, tok = byte_level_folder(root, kind, regex, ignore_merges=ignore, normalizer=norm)
        refs[kind] = (folder, lambda text, tok=tok: tok.encode(text, add_special_tokens=False).ids)
    out = {}
    for kind, (folder, encode) in refs.items():
        path = root / f"{kind}.gguf"
        out[kind] = (folder, path, vocab_gguf(folder, path), encode)
    return out


def fields(path: Path) -> dict:
    reader = gguf.GGUFReader(str(path))
    return {name: field.contents() for name, field in reader.fields.items() if name.startswith("tokenizer.")}


# --- metadata (no llama.cpp needed) ---------------------------------------------------------------

@pytest.mark.parametrize("kind", list(EXPECTED))
def test_metadata_names_the_tokenizer_its_special_ids_and_one_token_per_row(built, kind):
    folder, path, info, _ = built[kind]
    meta = fields(path)
    model, pre = EXPECTED[kind]
    assert (info.model, info.pre) == (model, pre)
    assert meta["tokenizer.ggml.model"] == model and meta.get("tokenizer.ggml.pre") == pre
    config = json.loads((folder / "config.json").read_text())
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == info.size == config["vocab_size"]
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    ids = {t: i for i, t in enumerate(tokens)}
    for name in ("<|im_start|>", "<|im_end|>", settings["eos_token"]):
        assert types[ids[name]] == gguf.TokenType.CONTROL, name
    assert meta["tokenizer.ggml.eos_token_id"] == info.eos == ids[settings["eos_token"]]
    generation = json.loads((folder / "generation_config.json").read_text())
    assert info.stops == generation["eos_token_id"] and ids["<|im_end|>"] in info.stops
    if info.eos != ids["<|im_end|>"]:
        assert meta["tokenizer.ggml.eot_token_id"] == ids["<|im_end|>"]
    if settings.get("bos_token"):
        assert meta["tokenizer.ggml.bos_token_id"] == info.bos == ids[settings["bos_token"]]
        assert meta["tokenizer.ggml.add_bos_token"] is True     # fledge prompts with BOS first
    else:
        assert info.bos is None and meta["tokenizer.ggml.add_bos_token"] is False
    assert meta["tokenizer.ggml.add_eos_token"] is False
    assert meta["tokenizer.ggml.add_space_prefix"] is ("prefix" in kind)       # fledge's models: no dummy prefix
    padding = [i for i, t in enumerate(types) if t == gguf.TokenType.UNUSED]   # rows past the tokenizer
    assert padding == list(range(info.size - (EXTRA_ROWS if kind in PADDED else 0), info.size))
    if model == "gpt2":
        assert meta["tokenizer.ggml.merges"] and "tokenizer.ggml.scores" not in meta
    else:
        assert meta["tokenizer.ggml.unknown_token_id"] == ids["<unk>"] and types[ids["<unk>"]] == gguf.TokenType.UNKNOWN
    if kind.startswith("sentencepiece"):
        assert sum(t == gguf.TokenType.BYTE for t in types) == 256 and types[ids["<0x0A>"]] == gguf.TokenType.BYTE
    if kind == "char":
        assert "\u2581" in ids and " " not in ids


def test_sentencepiece_json_scores_follow_merge_order(built):
    """Without tokenizer.model the scores come from the merge ranks: the first merge's result scores
    highest, tokens no merge makes score below every merged one."""
    folder, path, _, _ = built["sentencepiece-json"]
    merges = json.loads((folder / "tokenizer.json").read_text())["model"]["merges"]
    meta = fields(path)
    scores = dict(zip(meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"]))
    made = ["".join(m) if isinstance(m, list) else m.replace(" ", "") for m in merges]
    assert len(made) > 50
    firsts = list(dict.fromkeys(made))
    assert [scores[t] for t in firsts] == sorted((scores[t] for t in firsts), reverse=True)
    assert scores["<0x41>"] < min(scores[t] for t in firsts)


@pytest.mark.parametrize("kind", ["bpe", "sentencepiece", "char", "qwen2"])
def test_chat_template_is_embedded_without_generation_blocks_and_renders_the_same(built, kind):
    """Rendered as llama-cpp-python renders a GGUF's template (plain jinja2, bos_token and eos_token the
    texts of the ids in the file), the prompt is transformers' (qwen2: no BOS, though the file must
    name a bos id)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    folder, path, _, _ = built[kind]
    meta = fields(path)
    embedded = meta["tokenizer.chat_template"]
    source = (folder / "chat_template.jinja").read_text()
    assert "{%- generation -%}" in source and "{%- endgeneration -%}" in source
    assert "generation -%}" not in embedded and embedded.count("{%- if true -%}") == source.count("{%- generation -%}")
    tokens = meta["tokenizer.ggml.tokens"]
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    got = env.from_string(embedded).render(messages=MESSAGES, add_generation_prompt=True,
                                           bos_token=tokens[meta["tokenizer.ggml.bos_token_id"]],
                                           eos_token=tokens[meta["tokenizer.ggml.eos_token_id"]])
    want = hf_tokenizer_for(folder).apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert got == want and "<|im_start|>system\nBe brief.<|im_end|>\n" in got


def hf_tokenizer_for(folder: Path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


# --- refusals: one line each, naming the file and what to do -----------------------------------------

def _refusal(folder: Path, tmp_path: Path) -> str:
    with pytest.raises(ExportError) as caught:
        vocab_gguf(folder, tmp_path / "refused.gguf")
    message = str(caught.value)
    assert "\n" not in message and str(folder) in message
    return message


def _edit_tokenizer_json(built, kind: str, tmp_path: Path, edit) -> Path:
    folder = tmp_path / f"{kind}-edited"
    shutil.copytree(built[kind][0], folder)
    data = json.loads((folder / "tokenizer.json").read_text())
    edit(data)
    (folder / "tokenizer.json").write_text(json.dumps(data))
    return folder


@pytest.mark.parametrize("kind,edit,words", [
    ("bpe", lambda d: d.update(pre_tokenizer={"type": "Whitespace"}), "pre-tokenizer is Whitespace"),
    ("bpe", lambda d: d["pre_tokenizer"].update(add_prefix_space=True), "adds a space"),
    ("bpe", lambda d: d["pre_tokenizer"].update(use_regex=False), "does not split words"),
    ("bpe", lambda d: d.update(normalizer={"type": "Lowercase"}), "normalizes text first (Lowercase)"),
    # (not the qwen2 folder: transformers builds a qwen2 tokenizer with Qwen2's pattern whatever the file says)
    ("llama3-merging", lambda d: d["pre_tokenizer"]["pretokenizers"][0]["pattern"].update(Regex=r"\w+|\s+"),
     "split pattern"),
    ("bpe", lambda d: d["model"].update(ignore_merges=True), "ignore_merges"),
    ("sentencepiece-json", lambda d: d.update(normalizer={"type": "NFKC"}), "normalizes text (NFKC)"),
    ("char", lambda d: d.update(pre_tokenizer={"type": "Whitespace"}), "not fledge's char tokenizer"),
], ids=["whitespace", "prefix-space", "no-regex", "lowercase", "other-regex", "ignore-merges", "nfkc", "words"])
def test_a_tokenizer_llama_cpp_would_split_differently_is_refused(built, tmp_path, kind, edit, words):
    message = _refusal(_edit_tokenizer_json(built, kind, tmp_path, edit), tmp_path)
    assert words in message and "llama.cpp would tokenize text differently" in message


def test_a_normalizing_sentencepiece_model_is_refused(tmp_path):
    import io

    import sentencepiece as spm
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS.splitlines()), model_writer=model, vocab_size=400,
                                   model_type="bpe", normalization_rule_name="nmt_nfkc", byte_fallback=True,
                                   minloglevel=2)
    folder = tmp_path / "nfkc"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    message = _refusal(folder, tmp_path)
    assert "precompiled charsmap" in message and "removes extra whitespace" in message


def test_a_token_written_twice_is_refused(built, tmp_path):
    size = built["qwen2"][2].size

    def add_twice(data):
        data["added_tokens"].append({"id": size, "content": "a", "special": False})  # also byte-level "a"
    folder = _edit_tokenizer_json(built, "qwen2", tmp_path, add_twice)
    (folder / "config.json").write_text(json.dumps({"vocab_size": size + 1}))
    assert "'a' appears twice" in _refusal(folder, tmp_path)


def test_more_stop_ids_than_llama_cpp_can_hold_are_refused(built, tmp_path):
    folder = tmp_path / "stops"
    shutil.copytree(built["bpe"][0], folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 3, 4, 5]}))
    assert "4 stop ids" in _refusal(folder, tmp_path)


def test_more_tokens_than_embedding_rows_is_refused(built, tmp_path):
    folder = tmp_path / "small"
    shutil.copytree(built["bpe"][0], folder)
    (folder / "config.json").write_text(json.dumps({"vocab_size": 300}))
    assert "vocab_size is 300" in _refusal(folder, tmp_path)


def test_a_folder_without_a_tokenizer_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    assert "no tokenizer.json or tokenizer.model" in _refusal(tmp_path / "empty", tmp_path)


def test_a_char_vocabulary_holding_the_space_mark_is_refused(tmp_path):
    source = tmp_path / "source"
    train_tokenizer(TokenizerConfig(kind="char", vocab_size=64), ["a b c \u2581"]).save(source)
    folder = tmp_path / "char"
    write_transformers_files(folder, hf_config=None, tokenizer=hf_tokenizer(source), template=None)
    assert "'▁'" in _refusal(folder, tmp_path)


# --- llama.cpp ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama(built):
    llama_cpp = pytest.importorskip("llama_cpp")
    return {kind: llama_cpp.Llama(str(path), vocab_only=True, verbose=False) for kind, (_, path, _, _) in built.items()}


def _mismatches(llm, encode, texts) -> list[tuple[str, list[int], list[int]]]:
    out = []
    for text in texts:
        want, got = encode(text), llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        if want != got:
            out.append((text, want, got))
    return out


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_llama_cpp_tokenizes_the_sample_like_the_reference(built, llama, kind):
    _, _, _, encode = built[kind]
    texts = SAMPLE
    if kind == "qwen2":     # NFC normalization: llama.cpp does not normalize (as its own converter accepts)
        texts = [t for t in SAMPLE if unicodedata.normalize("NFC", t) == t]
        assert len(texts) >= len(SAMPLE) - 6
    bad = _mismatches(llama[kind], encode, texts)
    assert not bad, f"{len(bad)} of {len(texts)} strings differ, first: {bad[0]}"


def pieces(llm, ids: list[int], lstrip: int = 0) -> str:
    """The text of `ids` as llama.cpp streams generated tokens: each token's piece, joined; `lstrip`
    leading spaces dropped from the first (llama.cpp's way to remove a dummy prefix).

    Not Llama.detokenize: llama-cpp-python 0.3.36 gives it a 32-byte buffer and silently drops longer
    pieces (a 36-byte Thai token came back empty). Not llama_detokenize either: for "gpt-2" and
    "llama-bpe" it also drops spaces before ?!., as transformers' clean_up_tokenization_spaces does
    (5 of the sample's strings), the same for every GPT-2 or Llama 3 GGUF."""
    import ctypes

    import llama_cpp
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    buffer = ctypes.create_string_buffer(1024)
    out = b""
    for i, token in enumerate(ids):
        n = llama_cpp.llama_token_to_piece(vocab, token, buffer, len(buffer), lstrip if i == 0 else 0, False)
        assert 0 <= n <= len(buffer)
        out += buffer.raw[:n]
    return out.decode("utf-8")


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_llama_cpp_detokenizes_back_to_the_text(built, llama, kind):
    llm = llama[kind]
    prefix = int(fields(built[kind][1])["tokenizer.ggml.add_space_prefix"])
    lost = [t for t in SAMPLE if pieces(llm, llm.tokenize(t.encode(), add_bos=False, special=False), prefix) != t]
    assert not lost, f"{len(lost)} of {len(SAMPLE)} strings do not come back, first: {lost[0]!r}"


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_special_tokens_in_a_rendered_chat_parse_as_single_tokens(built, llama, kind):
    folder, _, info, encode = built[kind]
    tok = hf_tokenizer_for(folder)
    text = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    want = tok.encode(text, add_special_tokens=False)
    got = llama[kind].tokenize(text.encode(), add_bos=False, special=True)
    assert got == want
    start, end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    assert got.count(start) == 5 and got.count(end) == 4 and (info.bos is None or got[0] == info.bos)
    # typed without special=True the same text stays text, as fledge's encode keeps it
    assert start not in llama[kind].tokenize(text.encode(), add_bos=False, special=False)
    assert llama[kind].token_eos() == info.eos
    assert llama[kind].token_bos() == (info.bos if info.bos is not None else info.eos)   # no BOS: EOS's id


def test_llama_cpp_reads_unknown_characters_of_a_char_model_as_unk(built, llama):
    """One <unk> per run of unknown characters (llama.cpp's unigram tokenizer joins a run); fledge
    writes one per character. Known characters keep their ids, and nothing aborts."""
    _, path, _, encode = built["char"]
    unk = fields(path)["tokenizer.ggml.unknown_token_id"]
    unseen = "₪Ⱥⱥ🐙ꟿ"
    assert not set(unseen) & set(CORPUS + "".join(SAMPLE))
    for text in ("₪ unseen ⱥⱥ🐙 glyphs ꟿ", "🐙", "known Ⱥ", "₪₪₪"):
        want = encode(text)
        joined = [t for i, t in enumerate(want) if not (t == unk and i and want[i - 1] == unk)]
        assert unk in want and llama["char"].tokenize(text.encode(), add_bos=False, special=False) == joined


@pytest.mark.parametrize("kind", ["bpe", "sentencepiece-prefix", "qwen2"])
def test_llama_cpp_python_renders_the_embedded_template_like_transformers(built, llama, kind):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    folder, path, info, _ = built[kind]
    llm, tokens = llama[kind], fields(path)["tokenizer.ggml.tokens"]
    formatter = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], eos_token=tokens[llm.token_eos()],
                                    bos_token=tokens[llm.token_bos()])
    want = hf_tokenizer_for(folder).apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert formatter(messages=MESSAGES).prompt == want


def test_add_bos_puts_bos_first_when_llama_cpp_adds_special_tokens(built, llama):
    for kind in ("bpe", "sentencepiece", "char"):
        _, _, info, encode = built[kind]
        assert llama[kind].tokenize(b"3 pigs", add_bos=True) == [info.bos] + encode("3 pigs")
    assert llama["qwen2"].tokenize(b"3 pigs", add_bos=True) == built["qwen2"][3]("3 pigs")


def test_a_qwen2_model_with_fledges_bpe_tokenizes_as_transformers_loads_it(built, tmp_path):
    """transformers 5 builds a qwen2 folder's tokenizer with Qwen2's pattern (digits one by one) and
    NFC whatever tokenizer.json says; fledge encodes with that tokenizer, so the GGUF must too: pre
    "qwen2", not the "gpt-2" of the file (which gave [355, 20, ...] for [222, 18, 19, 20] before)."""
    from transformers import AutoTokenizer
    folder = tmp_path / "bpe-in-qwen2"
    shutil.copytree(built["bpe"][0], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "qwen2"}))
    info = vocab_gguf(folder, tmp_path / "bpe-in-qwen2.gguf")
    assert (info.model, info.pre) == ("gpt2", "qwen2")
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    assert tok.encode("123", add_special_tokens=False) == [tok.convert_tokens_to_ids(c) for c in "123"]
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(str(tmp_path / "bpe-in-qwen2.gguf"), vocab_only=True, verbose=False)
    texts = [t for t in SAMPLE if unicodedata.normalize("NFC", t) == t]
    bad = _mismatches(llm, lambda text: tok.encode(text, add_special_tokens=False, split_special_tokens=True), texts)
    assert not bad, f"{len(bad)} of {len(texts)} strings differ, first: {bad[0]}"
