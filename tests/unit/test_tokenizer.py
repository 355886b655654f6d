"""Tokenizer invariants for every kind: exact round trips, fixed special ids, one saved file.

    OMP_NUM_THREADS=1 pytest tests/unit/test_tokenizer.py -q
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import sys

import pytest

from fledge.errors import DataError, DependencyError, StorageError, TokenizerError
from fledge.recipe import load_recipe
from fledge.tokenizer import Tokenizer, find_tokenizer_file, load_tokenizer, train_tokenizer

TRICKY = ("    def f(x):\n\treturn x  # indented, a tab\r\nCRLF line\r\n"
          "naïve café Ünïcödé 日本語のテキスト 😀👍🏽 (emoji, skin tone)\n"
          "<|eos|> and <|bos|> typed as text, 12345 67.89\n\u00a0nbsp\u200bzero-width\n\n\n  trailing  \n")
WORDS = ("the of and to a in that it was he for on with as his they be at one have this from by "
         "hot word but what some we can out other were all there when up use your how said an each "
         "she which do their time if will way about many then them write would like so these her").split()

KINDS = {"bpe": 400, "sentencepiece": 500, "char": 200}
SPECIAL_IDS = {"bpe": (0, 1), "sentencepiece": (1, 2), "char": (0, 1)}


def prose(seed: int = 0, lines: int = 400) -> str:
    """Deterministic English-like text with some indentation, digits and blank lines."""
    rng = random.Random(seed)
    out = []
    for i in range(lines):
        indent = "    " * rng.randint(0, 2) if i % 7 == 0 else ""
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
        out.append(f"{indent}{words.capitalize()} {rng.randint(0, 999)}." + ("\n" if i % 5 else "\n\n"))
    return "".join(out)


def config(kind: str, vocab_size: int | None = None):
    size = vocab_size or KINDS[kind]
    return load_recipe(None, base={"tokenizer": {"kind": kind, "vocab_size": size}}).tokenizer


@pytest.fixture(scope="module", params=list(KINDS))
def tok(request) -> Tokenizer:
    # char only knows characters it saw, so TRICKY is part of every training text.
    return train_tokenizer(config(request.param), [prose(), TRICKY])


def test_round_trip_tricky_text(tok):
    ids = tok.encode(TRICKY)
    assert tok.decode(ids) == TRICKY
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id]) == TRICKY


def test_round_trip_unseen_text(tok):
    text = "Ωμέγα ∑ ∫ 🦜 Ünseen — \x00\x07 control \u2028 separators\r\n"
    expected = text
    if tok.kind == "char":  # unseen characters become <unk>, which decodes to nothing
        expected = "".join(c for c in text if c in set(prose() + TRICKY))
    assert tok.decode(tok.encode(text)) == expected


def test_special_ids_fixed_and_never_added(tok):
    assert (tok.bos_id, tok.eos_id) == SPECIAL_IDS[tok.kind]
    ids = tok.encode("<|eos|>")
    assert tok.eos_id not in ids and tok.bos_id not in ids  # typed text stays text
    assert tok.encode("") == []


def test_encode_batch_matches_encode(tok):
    texts = [TRICKY, "", prose(1, 20), "x"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_save_load_is_exact(tok, tmp_path):
    path = tok.save(tmp_path)
    assert path.name == Tokenizer.file_names[tok.kind] == tok.file_name
    assert sorted(p.name for p in tmp_path.iterdir()) == [tok.file_name]  # one file per tokenizer
    assert tok.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    for source in (tmp_path, path):
        loaded = load_tokenizer(source)
        assert (loaded.kind, loaded.vocab_size, loaded.sha256) == (tok.kind, tok.vocab_size, tok.sha256)
        assert loaded.encode(TRICKY) == tok.encode(TRICKY)
    assert find_tokenizer_file(tmp_path) == path


def test_vocab_size_is_the_requested_one(tok):
    if tok.kind == "char":
        assert tok.vocab_size == 3 + len(set(prose() + TRICKY))
    else:
        assert tok.vocab_size == KINDS[tok.kind]


@pytest.mark.parametrize("kind", list(KINDS))
def test_training_is_deterministic(kind):
    a = train_tokenizer(config(kind), [prose(), TRICKY])
    b = train_tokenizer(config(kind), iter([prose(), TRICKY]))
    assert a.sha256 == b.sha256


def test_char_vocab_is_specials_then_sorted_characters():
    tok = train_tokenizer(config("char"), ["abba\n", "cab"])
    assert tok.vocab_size == 3 + 4
    assert [tok.decode([i]) for i in range(3, 7)] == ["\n", "a", "b", "c"]
    assert tok.encode("abc\n") == [4, 5, 6, 3]


def test_char_unknown_characters():
    tok = train_tokenizer(config("char"), ["abc"])
    ids = tok.encode("abz")
    assert ids == [3, 4, 2]  # z -> <unk> (id 2)
    assert tok.decode(ids) == "ab"


def test_char_vocab_size_is_an_upper_bound():
    with pytest.raises(DataError, match=r"has 26 distinct characters.*vocab_size >= 29 \(it is 20\)"):
        train_tokenizer(config("char", 20), ["abcdefghijklmnopqrstuvwxyz"])


@pytest.mark.parametrize("kind", ["bpe", "sentencepiece"])
def test_vocab_larger_than_corpus_supports(kind):
    with pytest.raises(DataError) as err:
        train_tokenizer(config(kind, 5000), [prose(lines=30)])
    message = str(err.value)
    assert "\n" not in message
    assert "tokenizer.vocab_size is 5000 but the training text supports only" in message
    assert "Lower tokenizer.vocab_size to" in message


def test_sentencepiece_vocab_too_small_for_the_characters():
    text = "".join(chr(0x4E00 + i) for i in range(300))  # 300 distinct CJK characters
    with pytest.raises(DataError, match="Raise tokenizer.vocab_size above"):
        train_tokenizer(config("sentencepiece", 300), [text])


def test_empty_training_text():
    with pytest.raises(DataError, match="corpus is empty"):
        train_tokenizer(config("bpe"), ["", ""])


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_tokenizer_json_loads_in_transformers(kind, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok = train_tokenizer(config(kind), [prose(), TRICKY])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tok.save(tmp_path)))
    ids = fast.encode(prose(2, 5), add_special_tokens=False)
    assert ids == tok.encode(prose(2, 5))
    assert fast.decode(ids) == prose(2, 5)


def test_find_tokenizer_file_errors(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(TokenizerError, match=r"no tokenizer.json or tokenizer.model \(found: notes.txt\).*"
                                          r"fledge prepare RECIPE"):
        find_tokenizer_file(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "tokenizer.model").write_bytes(b"")
    with pytest.raises(TokenizerError, match="holds both"):
        find_tokenizer_file(tmp_path)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(TokenizerError, match="no such tokenizer file"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"model": {"type": "Unigram"}}')
    with pytest.raises(TokenizerError, match="a Unigram tokenizer"):
        load_tokenizer(tmp_path / "bad.json")


@pytest.mark.parametrize("name,data,match", [
    ("broken.json", b'{"model": {"type": "BPE"}}', r"not a readable bpe tokenizer file \(.+\)\. Point tokenizer\.path"),
    ("empty.model", b"", r"not a readable sentencepiece tokenizer file \(no pieces\)"),
    ("garbage.model", b"\x00garbage\xff", r"not a readable sentencepiece tokenizer file \(.+\)"),
    ("nested.json", b"[" * 100_000, r"not a tokenizers JSON file"),
])
def test_unreadable_tokenizer_files(tmp_path, name, data, match):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(TokenizerError, match=rf"^{path}: {match}") as err:
        load_tokenizer(path)
    assert "\n" not in str(err.value)


def test_tokenizer_without_bos_and_eos(tmp_path):
    tok = train_tokenizer(config("char"), ["abc"])
    path = tok.save(tmp_path)
    path.write_text(path.read_text().replace("<|bos|>", "<|x|>").replace("<|eos|>", "<|y|>"))
    with pytest.raises(TokenizerError, match="has no begin/end-of-text tokens"):
        load_tokenizer(path)


@pytest.mark.parametrize("module,kind", [("sentencepiece", "sentencepiece"), ("tokenizers", "bpe"),
                                         ("tokenizers", "char")])
def test_missing_package_names_the_pip_command(monkeypatch, tmp_path, module, kind):
    saved = train_tokenizer(config(kind), [prose(lines=50), TRICKY]).save(tmp_path)
    monkeypatch.setitem(sys.modules, module, None)  # import now raises ImportError
    message = (f"tokenizer.kind {kind} needs the {module} package, which is not installed. "
               f"Install it with `pip install {module}`.")
    with pytest.raises(DependencyError) as err:
        train_tokenizer(config(kind), [prose(lines=50)])
    assert str(err.value) == message
    with pytest.raises(DependencyError) as err:
        load_tokenizer(saved)
    assert str(err.value) == message


def test_save_on_a_full_disk_keeps_the_old_file(tmp_path, monkeypatch):
    old = train_tokenizer(config("char"), ["abc"])
    path = old.save(tmp_path)

    def full_disk(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(StorageError, match=rf"^could not write {path}: the disk is full"):
        train_tokenizer(config("char"), ["abcd"]).save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary file left behind
    assert load_tokenizer(path).sha256 == old.sha256
