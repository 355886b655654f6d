"""Train, save and load tokenizers: byte-level BPE, SentencePiece, or one token per character.

    tok = train_tokenizer(recipe.tokenizer, texts)     # texts: any iterable of strings
    tok.save("runs/x/data")                            # -> runs/x/data/tokenizer.json
    tok = load_tokenizer("runs/x/data")                # a folder or the file itself
    ids = [tok.bos_id] + tok.encode("Hello") + [tok.eos_id]
    assert tok.decode(ids) == "Hello"

Every kind saves ONE file that other tools load as it is:

- bpe: `tokenizer.json` for the HF `tokenizers` library (and transformers'
  PreTrainedTokenizerFast): GPT-2 byte-level pre-tokenizer (llama.cpp's `gpt-2` pattern),
  ByteLevel decoder, all 256 bytes in the alphabet, so any text round-trips exactly.
- sentencepiece: `tokenizer.model`, BPE model with identity normalization, no dummy
  prefix, whitespace kept, digits split and byte fallback, so any text round-trips exactly.
- char: `tokenizer.json`, a WordLevel model over the characters seen in training (sorted)
  with a pre-tokenizer that isolates every character; unseen characters become `<unk>`.

Special tokens have fixed ids: bpe and char put `<|bos|>` at 0, `<|eos|>` at 1 (char adds
`<unk>` at 2); sentencepiece uses unk 0, bos 1, eos 2 and no pad. `encode` never adds special
tokens, and text that merely contains "<|eos|>" is encoded as plain text.

Errors: a missing, unreadable or foreign tokenizer file raises TokenizerError; text that
cannot support the requested vocabulary raises DataError; a missing `tokenizers` or
`sentencepiece` package raises DependencyError with the pip command.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import os
import re
from pathlib import Path
from typing import Iterable, Iterator

from fledge.errors import DataError, DependencyError, TokenizerError
from fledge.files import storage_error, write_atomic

BOS, EOS, UNK = "<|bos|>", "<|eos|>", "<unk>"
# Names that mark begin/end of text in tokenizers brought from elsewhere (tokenizer.path).
_BOS_NAMES = (BOS, "<s>", "<|begin_of_text|>", "<|endoftext|>", "[CLS]")
_EOS_NAMES = (EOS, "</s>", "<|end_of_text|>", "<|endoftext|>", "[SEP]")
# SentencePiece skips training sentences longer than max_sentence_length bytes; we cut
# lines into slices of this many characters (at most 4 bytes each) so none is skipped.
_SP_SLICE_CHARS = 4096


class Tokenizer:
    """A tokenizer of one kind together with the bytes of its saved file."""

    file_names = {"bpe": "tokenizer.json", "char": "tokenizer.json", "sentencepiece": "tokenizer.model"}

    def __init__(self, kind: str, data: bytes, origin: str = "trained"):
        self.kind = kind
        self._data = data
        self._sha256 = hashlib.sha256(data).hexdigest()
        unreadable = (f"{origin}: not a readable {kind} tokenizer file ({{}}). Point tokenizer.path at a "
                      f"tokenizer.json or tokenizer.model, or rerun `fledge prepare RECIPE` to train one.")
        if kind == "sentencepiece":
            spm = _require("sentencepiece", kind)
            self._hf = None
            try:
                self._sp = spm.SentencePieceProcessor(model_proto=data)
            except RuntimeError as e:
                raise TokenizerError(unreadable.format(_first_line(e))) from None
            if self._sp.get_piece_size() == 0:
                raise TokenizerError(unreadable.format("no pieces"))
            self.bos_id, self.eos_id = self._sp.bos_id(), self._sp.eos_id()
        else:
            tokenizers = _require("tokenizers", kind)
            self._sp = None
            try:
                self._hf = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
            except Exception as e:  # tokenizers raises a bare Exception for a bad file
                raise TokenizerError(unreadable.format(_first_line(e))) from None
            # Not saved in the JSON: text that contains "<|eos|>" must stay plain text.
            self._hf.encode_special_tokens = True
            self.bos_id = _first_id(self._hf, _BOS_NAMES)
            self.eos_id = _first_id(self._hf, _EOS_NAMES)
        if self.bos_id is None or self.bos_id < 0 or self.eos_id is None or self.eos_id < 0:
            raise TokenizerError(f"{origin}: the tokenizer has no begin/end-of-text tokens (looked for "
                                 f"{', '.join(_BOS_NAMES)}). Train one with fledge (leave tokenizer.path empty).")

    @property
    def file_name(self) -> str:
        return self.file_names[self.kind]

    @property
    def bos_token(self) -> str:
        """The text of the begin-of-text token (another tokenizer's may be e.g. <s>)."""
        return self._sp.id_to_piece(self.bos_id) if self._sp is not None else self._hf.id_to_token(self.bos_id)

    @property
    def eos_token(self) -> str:
        return self._sp.id_to_piece(self.eos_id) if self._sp is not None else self._hf.id_to_token(self.eos_id)

    @property
    def vocab_size(self) -> int:
        if self._sp is not None:
            return self._sp.get_piece_size()
        return self._hf.get_vocab_size(with_added_tokens=True)

    @property
    def sha256(self) -> str:
        """Hash of the saved file's bytes."""
        return self._sha256

    def encode(self, text: str) -> list[int]:
        if self._sp is not None:
            return self._sp.encode(text)
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts at once on all cores; same ids as `encode` on each."""
        if self._sp is not None:
            return self._sp.encode(texts, num_threads=os.cpu_count() or 1)
        batch = getattr(self._hf, "encode_batch_fast", self._hf.encode_batch)  # fast: no offsets
        return [e.ids for e in batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, leaving out special tokens (bos, eos, unk)."""
        ids = [int(i) for i in ids]
        if self._sp is not None:
            return self._sp.decode(ids)
        return self._hf.decode(ids, skip_special_tokens=True)

    def save(self, directory: str | Path) -> Path:
        """Write the one tokenizer file into `directory` (atomically) and return its path."""
        return write_atomic(Path(directory) / self.file_name, self._data)


def _require(module: str, kind: str):
    """Import the package a tokenizer kind needs, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DependencyError(f"tokenizer.kind {kind} needs the {module} package, which is not installed. "
                              f"Install it with `pip install {module}`.") from None


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0][:200] if lines else type(error).__name__


def _first_id(hf, names: tuple[str, ...]) -> int | None:
    for name in names:
        token_id = hf.token_to_id(name)
        if token_id is not None:
            return token_id
    return None


# --- loading ------------------------------------------------------------------------------

def find_tokenizer_file(directory: str | Path) -> Path:
    """The fledge tokenizer file in a folder (tokenizer.json or tokenizer.model).

    A checkpoint of a fine-tune keeps fledge's tokenizer.model beside the tokenizer.json and
    tokenizer_config.json written for transformers (a conversion of it, with added tokens): with a
    tokenizer_config.json present, tokenizer.model is the fledge file. Without one, a folder
    holding both is ambiguous and refused.
    """
    directory = Path(directory)
    names = sorted(set(Tokenizer.file_names.values()))
    found = [directory / n for n in names if (directory / n).is_file()]
    if len(found) == 1:
        return found[0]
    if found and (directory / "tokenizer_config.json").is_file():
        return directory / "tokenizer.model"
    if found:
        raise TokenizerError(f"{directory}: holds both {' and '.join(names)}; delete the one you do not use.")
    have = sorted(p.name for p in directory.iterdir())[:12] if directory.is_dir() else []
    raise TokenizerError(f"{directory}: no {' or '.join(names)} (found: {', '.join(have) or 'nothing'}). "
                         f"Create it with `fledge prepare RECIPE`.")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer from its file, or from the folder that holds it."""
    path = Path(path)
    if path.is_dir():
        path = find_tokenizer_file(path)
    if not path.is_file():
        what = "not a regular file" if path.exists() else "no such tokenizer file"
        raise TokenizerError(f"{path}: {what}. Set tokenizer.path to a tokenizer.json or "
                             f"tokenizer.model, or run `fledge prepare RECIPE` to train one.")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise storage_error(e, path, "read") from None
    if path.suffix == ".model":
        return Tokenizer("sentencepiece", data, origin=str(path))
    try:
        model_type = json.loads(data)["model"]["type"]
    except (ValueError, KeyError, TypeError, RecursionError):
        raise TokenizerError(f"{path}: not a tokenizers JSON file (no model.type). Point tokenizer.path at a "
                             f"tokenizer.json or tokenizer.model.") from None
    kinds = {"BPE": "bpe", "WordLevel": "char"}
    if model_type not in kinds:
        raise TokenizerError(f"{path}: a {model_type} tokenizer; fledge reads BPE and WordLevel (char) "
                             f"tokenizer.json files and SentencePiece tokenizer.model files.")
    return Tokenizer(kinds[model_type], data, origin=str(path))


# --- training -----------------------------------------------------------------------------

def train_tokenizer(config, texts: Iterable[str]) -> Tokenizer:
    """Train a tokenizer of `config.kind` (a TokenizerConfig) on `texts`.

    Raises DataError when the text cannot support `config.vocab_size` tokens.
    """
    trainers = {"bpe": _train_bpe, "sentencepiece": _train_sentencepiece, "char": _train_char}
    tok = trainers[config.kind](config.vocab_size, iter(texts))
    if config.kind != "char" and tok.vocab_size < config.vocab_size:
        raise _too_small(config, tok.vocab_size)
    return tok


def _too_small(config, supported: int) -> DataError:
    return DataError(f"tokenizer.vocab_size is {config.vocab_size} but the training text supports only "
                     f"{supported} {config.kind} tokens. Lower tokenizer.vocab_size to {supported} or less, "
                     f"or add text.")


def _nonempty(texts: Iterator[str]) -> Iterator[str]:
    """Pass texts through; raise if there were none with any characters."""
    seen = False
    for text in texts:
        if text:
            seen = True
            yield text
    if not seen:
        raise DataError("no text to train the tokenizer on; the corpus is empty. Check data.sources.")


def _train_bpe(vocab_size: int, texts: Iterator[str]) -> Tokenizer:
    _require("tokenizers", "bpe")
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(_nonempty(texts), trainer)
    return Tokenizer("bpe", hf.to_str(pretty=True).encode("utf-8"))


def _train_char(vocab_size: int, texts: Iterator[str]) -> Tokenizer:
    _require("tokenizers", "char")
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers
    chars: set[str] = set()
    for text in _nonempty(texts):
        chars.update(text)
    specials = [BOS, EOS, UNK]
    if len(chars) + len(specials) > vocab_size:
        raise DataError(f"the corpus has {len(chars)} distinct characters; with {len(specials)} special tokens "
                        f"a char tokenizer needs tokenizer.vocab_size >= {len(chars) + len(specials)} (it is "
                        f"{vocab_size}). Raise tokenizer.vocab_size or use tokenizer.kind: bpe.")
    vocab = {tok: i for i, tok in enumerate(specials + sorted(chars))}
    hf = HFTokenizer(models.WordLevel(vocab, unk_token=UNK))
    hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character
    hf.decoder = decoders.Fuse()
    hf.add_special_tokens(specials)
    return Tokenizer("char", hf.to_str(pretty=True).encode("utf-8"))


def _sentences(texts: Iterator[str]) -> Iterator[str]:
    """Lines without their newline, sliced short enough that SentencePiece keeps them all.

    Newlines never reach the trainer, so "\\n" is always its own byte token <0x0A>, as in
    Llama's tokenizer; a chunk boundary after a newline is then also a token boundary.
    """
    for text in _nonempty(texts):
        for line in text.splitlines():
            for start in range(0, len(line), _SP_SLICE_CHARS):
                yield line[start:start + _SP_SLICE_CHARS]


def _train_sentencepiece(vocab_size: int, texts: Iterator[str]) -> Tokenizer:
    spm = _require("sentencepiece", "sentencepiece")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_sentences(texts), model_writer=model, model_type="bpe", vocab_size=vocab_size,
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            allow_whitespace_only_pieces=True, split_digits=True, byte_fallback=True,
            max_sentence_length=4 * _SP_SLICE_CHARS, hard_vocab_limit=False, shuffle_input_sentence=False,
            pad_id=-1, unk_id=0, bos_id=1, eos_id=2, bos_piece=BOS, eos_piece=EOS,
            num_threads=os.cpu_count() or 1, minloglevel=2)
    except RuntimeError as e:
        # e.g. "... Vocabulary size is smaller than required_chars. 300 vs 467. Increase ..."
        need = re.search(r"required_chars\. \d+ vs (\d+)", str(e))
        if need:
            raise DataError(f"tokenizer.vocab_size is {vocab_size} but sentencepiece needs more than "
                            f"{need.group(1)} pieces for the bytes, special tokens and characters of this "
                            f"text. Raise tokenizer.vocab_size above {need.group(1)}.") from None
        message = str(e).split("]")[-1].strip().rstrip(".")
        raise DataError(f"sentencepiece could not train with tokenizer.vocab_size {vocab_size}: {message}. "
                        f"Change tokenizer.vocab_size or add text.") from None
    return Tokenizer("sentencepiece", model.getvalue())
