"""The tokenizer of a transformers folder as GGUF metadata (`tokenizer.ggml.*`) that llama.cpp reads.

    writer = gguf.GGUFWriter(path, arch)
    info = add_vocab(writer, hf_folder, arch)     # tokens, types, scores/merges, special ids, chat template
    info.model, info.pre, info.size, info.bos, info.eos, info.stops

Which llama.cpp tokenizer each kind of folder becomes:

- byte-level BPE `tokenizer.json` (fledge's bpe, GPT-2, Qwen2, Llama 3): model "gpt2" with the
  merges. llama.cpp cannot run a tokenizer's own regex; it picks a pattern it knows by the name in
  `tokenizer.ggml.pre`, and without the right name it splits text differently and SILENTLY
  (measured: 125 of 128 strings for fledge's bpe with the key left out or "default"; "gpt2" does
  not load). llama.cpp's converter names the pattern by hashing the tokenization of a fixed
  text, so it refuses every tokenizer trained by someone else. We read the pattern from the
  pre-tokenizer instead: ByteLevel with its own (GPT-2) regex -> "gpt-2"; Split with Qwen2's
  regex -> "qwen2"; Split with Llama 3's regex -> "llama-bpe" (merges ignored for whole-word
  tokens, as tokenizer.json's `ignore_merges` says) or "smaug-bpe" (same regex, merges applied).
  Any other pre-tokenizer, normalizer or model option is refused with ExportError. The pattern is
  the one transformers actually uses for the folder (`AutoTokenizer.from_pretrained`), which for
  some model types is not tokenizer.json's: transformers 5 builds every qwen2 tokenizer with
  Qwen2's pattern and NFC whatever tokenizer.json says (measured: fledge's bpe in a qwen2 model
  splits "123" into 1, 2, 3 there; with "gpt-2" llama.cpp kept " 1" 2 3 together).
- SentencePiece `tokenizer.model` (fledge's sentencepiece, Llama 2 style): model "llama" with
  the pieces, scores and types (byte pieces <0xXX> are BYTE), `add_space_prefix` from the
  model's dummy prefix (fledge's has none). llama.cpp's SentencePiece tokenizer neither
  normalizes text nor removes extra spaces, and without byte fallback it aborts on unknown
  characters, so such models are refused. Tokens a fine-tune added (tokenizer.json's
  added_tokens beyond the pieces) follow the pieces.
- SentencePiece-style BPE `tokenizer.json` without a tokenizer.model (Gemma and Llama 2 bases
  saved by transformers: byte fallback, spaces as "▁" by a normalizer or Metaspace): model
  "llama" with scores made from the merge ranks (llama.cpp merges the pair whose result scores
  highest; the first merge scores highest). llama.cpp adds a dummy prefix after every special
  token, as the legacy normalizer does; Metaspace's prepend_scheme "first" does not.
- fledge's char `tokenizer.json` (WordLevel, one token per character): llama.cpp has no such
  tokenizer. We write a unigram ("t5") vocabulary of single characters, " " stored as "▁", no
  space prefix: llama.cpp finds each character's token, and an unknown character becomes <unk>
  (a run of unknown characters one <unk>, where fledge writes one per character). Not an SPM
  ("llama") vocabulary: llama.cpp's SPM tokenizer looks for byte tokens <0xXX> for a character
  it lacks and, finding none, aborts the process (measured, llama-cpp-python 0.3.36).

Token types: special added tokens (chatml's `<|im_start|>`, BOS/EOS) are CONTROL, so llama.cpp
reads them in a prompt only with `special=True` (as fledge's own `encode` keeps typed "<|eos|>"
as text); non-special added tokens are USER_DEFINED (always whole, as in transformers).
The vocabulary is padded with UNUSED "[PAD<id>]" tokens up to config.json's `vocab_size`
(llama.cpp needs one token per embedding row).

Special ids come from tokenizer_config.json (bos/eos/unk/pad token names), generation_config.json
(`eos_token_id`: every stop id) and config.json. `add_bos` is tokenizer_config's `add_bos_token`
when it says, else True whenever there is a BOS: fledge prompts a model as its documents were
trained, BOS first (`fledge.sample.encode_prompt`). Stops other than EOS become `eot_token_id`
(and a second one `eom_token_id`): llama.cpp ends generation at eos, eot and eom.

The chat template (chat_template.jinja, else tokenizer_config.json's) is embedded with
transformers' own `{% generation %}` blocks turned into `{% if true %}` (plain jinja2 refuses the
tag; llama-cpp-python 0.3.36 skips it; the rendered text is the same). A tokenizer without BOS
still needs a bos_token_id in the file (llama.cpp has no "none" and defaults to 11 or 1): its
template starts by setting bos_token to "", as transformers renders it.

Known differences, all measured: llama.cpp does not NFC-normalize (Qwen2's tokenizer does: text
that is not NFC tokenizes differently, 2 of 127 sample strings); llama_detokenize for "gpt-2" and
"llama-bpe" drops spaces before ?!., (token pieces, as generation streams them, are exact).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fledge.errors import ExportError
from fledge.files import storage_error

# tokenizers' pre-tokenizer regexes (as tokenizer.json stores them) -> llama.cpp's name for the
# pattern it implements natively (src/llama-vocab.cpp, llm_tokenizer_bpe).
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# regex -> (llama.cpp pre name when tokenizer.json ignores merges for whole-word tokens, when it doesn't)
_SPLIT_PRES = {_GPT2_REGEX: (None, "gpt-2"), _QWEN2_REGEX: (None, "qwen2"),
               _LLAMA3_REGEX: ("llama-bpe", "smaug-bpe")}
_KNOWN = "GPT-2's (ByteLevel), Qwen2's or Llama 3's pattern"
_SPACE = "\u2581"  # "▁": SentencePiece's (and llama.cpp's SPM) stand-in for " "
_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")
# gguf.TokenType values (also SentencePiece's ModelProto.SentencePiece.Type numbers)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_GENERATION_TAG = re.compile(r"\{%(-?)\s*(end)?generation\s*(-?)%\}")


@dataclass
class VocabInfo:
    """What add_vocab wrote: llama.cpp tokenizer model and pre-tokenizer, token count, special ids."""

    model: str                 # "gpt2" (byte-level BPE), "llama" (SentencePiece-style), "t5" (fledge's char)
    pre: str | None            # tokenizer.ggml.pre for "gpt2" ("gpt-2", "qwen2", "llama-bpe", ...), else None
    size: int                  # tokens written, padding included: the model's embedding rows
    bos: int | None
    eos: int | None
    stops: list[int] = field(default_factory=list)   # every id that ends generation (EOS included)


@dataclass
class _Vocab:
    """A tokenizer as llama.cpp sees it, before the special ids."""

    model: str
    pre: str | None
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] | None = None
    add_space_prefix: bool = False
    unk: int | None = None
    bos: int | None = None      # the tokenizer file's own ids, when tokenizer_config.json names none
    eos: int | None = None


def add_vocab(writer, folder: Path, arch: str) -> VocabInfo:
    """Write every tokenizer.ggml.* key llama.cpp needs for the tokenizer in `folder` (a transformers
    folder: tokenizer.json and/or tokenizer.model, tokenizer_config.json, generation_config.json,
    config.json, chat_template.jinja) into `writer` (a gguf.GGUFWriter for `arch`).

    Raises ExportError for a tokenizer llama.cpp would split differently (an unknown pre-tokenizer or
    normalizer), a folder without a tokenizer, and a tokenizer with more tokens than the model has rows.
    """
    folder = Path(folder)
    tokenizer_json = _read_json(folder / "tokenizer.json")
    settings = _read_json(folder / "tokenizer_config.json") or {}
    generation = _read_json(folder / "generation_config.json") or {}
    config = _read_json(folder / "config.json") or {}
    vocab = _vocabulary(folder, tokenizer_json, arch)
    _pad(vocab, config, folder)
    ids = {token: i for i, token in enumerate(vocab.tokens)}
    if len(ids) != len(vocab.tokens):
        twice = next(t for i, t in enumerate(vocab.tokens) if ids[t] != i)
        raise ExportError(f"{folder}: the token {twice!r} appears twice in the vocabulary, which llama.cpp "
                          f"refuses to load. Fix the tokenizer's added tokens.")
    bos = _tokenizer_bos(settings, ids, generation, config, vocab.bos)
    eos = _special_id(settings, "eos_token", ids, generation, config)
    eos = eos if eos is not None else vocab.eos
    pad = _special_id(settings, "pad_token", ids, generation, config)
    unk = _special_id(settings, "unk_token", ids, {}, {})
    unk = unk if unk is not None else vocab.unk
    stops = _stop_ids(generation, config, eos, len(vocab.tokens), folder)

    writer.add_tokenizer_model(vocab.model)
    if vocab.pre is not None:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges is not None:
        writer.add_token_merges(vocab.merges)
    writer.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.model == "t5":           # only llama.cpp's unigram tokenizer reads it
        writer.add_remove_extra_whitespaces(False)
    # llama.cpp fills in missing ids (SPM: unk 0, bos 1, eos 2; BPE: bos = eos = 11) and has no "none":
    # a tokenizer without BOS (Qwen2) gets config.json's bos_token_id as llama.cpp's converter writes
    # it, else EOS (GPT-2's convention); add_bos is then false and the template sees no BOS
    key_bos = bos if bos is not None else _special_id({}, "bos_token", ids, generation, config)
    for key, value in (("bos", key_bos if key_bos is not None else eos), ("eos", eos), ("unk", unk), ("pad", pad)):
        if value is not None:
            getattr(writer, f"add_{key}_token_id")(value)
    extra = [s for s in stops if s != eos]
    if extra:
        writer.add_eot_token_id(extra[0])
    if len(extra) > 1:
        writer.add_eom_token_id(extra[1])
    add_bos = settings.get("add_bos_token")
    writer.add_add_bos_token(bos is not None and (add_bos if isinstance(add_bos, bool) else True))
    writer.add_add_eos_token(settings.get("add_eos_token") is True and eos is not None)
    template = _chat_template(folder, settings, has_bos=bos is not None)
    if template is not None:
        writer.add_chat_template(template)
    return VocabInfo(model=vocab.model, pre=vocab.pre, size=len(vocab.tokens), bos=bos, eos=eos, stops=stops)


# --- reading the folder ---------------------------------------------------------------------------

def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(_read(path, str))
    except ValueError as e:
        raise ExportError(f"{path}: not readable JSON ({e}). Export the model again with "
                          f"`fledge export RUN --format hf`.") from None
    if not isinstance(data, dict):
        raise ExportError(f"{path}: expected a JSON object. Export the model again with "
                          f"`fledge export RUN --format hf`.")
    return data


def _read(path: Path, kind: type):
    try:
        return path.read_bytes() if kind is bytes else path.read_text(encoding="utf-8")
    except OSError as e:
        raise storage_error(e, path, "read") from None
    except UnicodeDecodeError as e:
        raise ExportError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}). Export the model again with "
                          f"`fledge export RUN --format hf`.") from None


def _vocabulary(folder: Path, tokenizer_json: dict | None, arch: str) -> _Vocab:
    """The right reader for the folder's tokenizer: tokenizer.json kinds first, tokenizer.model next."""
    model = (tokenizer_json or {}).get("model") or {}
    kind = model.get("type")
    if tokenizer_json is not None and kind == "WordLevel":
        return _char_vocab(tokenizer_json, folder)
    if tokenizer_json is not None and kind == "BPE" and not model.get("byte_fallback"):
        return _byte_level_vocab(tokenizer_json, folder)
    if (folder / "tokenizer.model").is_file():
        return _sentencepiece_vocab(folder / "tokenizer.model", tokenizer_json)
    if tokenizer_json is not None and kind == "BPE":
        return _spm_json_vocab(tokenizer_json, folder)
    if tokenizer_json is not None:
        raise ExportError(f"{folder / 'tokenizer.json'}: a {kind} tokenizer; a GGUF for llama.cpp ({arch}) can "
                          f"hold byte-level BPE, SentencePiece and fledge's char tokenizers. Use --format hf.")
    have = sorted(p.name for p in folder.iterdir())[:12] if folder.is_dir() else []
    raise ExportError(f"{folder}: no tokenizer.json or tokenizer.model (found: {', '.join(have) or 'nothing'}). "
                      f"Export the transformers folder first with `fledge export RUN --format hf`.")


def _added_tokens(tokenizer_json: dict | None) -> dict[int, dict]:
    return {a["id"]: a for a in (tokenizer_json or {}).get("added_tokens") or []}


def _ordered(by_id: dict[int, str], where: Path) -> list[str]:
    """Token texts in id order; refuses holes (llama.cpp ids are list positions)."""
    tokens = [by_id.get(i) for i in range(max(by_id, default=-1) + 1)]
    if None in tokens:
        raise ExportError(f"{where}: no token has id {tokens.index(None)}, but llama.cpp numbers tokens by their "
                          f"position. Fix the tokenizer's added tokens.")
    return tokens


def _added_type(added: dict) -> int:
    """llama.cpp parses CONTROL tokens in text only with special=True, USER_DEFINED ones always (as
    transformers matches non-special added tokens)."""
    return CONTROL if added.get("special", False) else USER_DEFINED


def _refuse(folder: Path, what: str, fix: str = "") -> ExportError:
    return ExportError(f"{folder / 'tokenizer.json'}: {what}; llama.cpp would tokenize text differently from "
                       f"this tokenizer. {fix or 'Train the tokenizer with fledge, or export with --format hf.'}")


# --- byte-level BPE -------------------------------------------------------------------------------

def _byte_level_pre(tokenizer_json: dict, folder: Path) -> str:
    """llama.cpp's name for the pre-tokenizer's split pattern, from the pre-tokenizer itself."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    ignore_merges = bool(tokenizer_json["model"].get("ignore_merges", False))
    if pre.get("type") == "ByteLevel":
        if not pre.get("use_regex", True):
            raise _refuse(folder, "the ByteLevel pre-tokenizer does not split words (use_regex false)")
        regex = _GPT2_REGEX
        byte_level = pre
    elif pre.get("type") == "Sequence" and len(pre.get("pretokenizers") or []) == 2:
        split, byte_level = pre["pretokenizers"]
        regex = (split.get("pattern") or {}).get("Regex")
        if (split.get("type") != "Split" or split.get("behavior") != "Isolated" or split.get("invert")
                or byte_level.get("type") != "ByteLevel" or byte_level.get("use_regex", True)):
            raise _refuse(folder, f"its pre-tokenizer is not a Split then ByteLevel with {_KNOWN}")
    else:
        raise _refuse(folder, f"its pre-tokenizer is {pre.get('type') or 'missing'}, not one with {_KNOWN}")
    if byte_level.get("add_prefix_space"):
        raise _refuse(folder, "its ByteLevel pre-tokenizer adds a space before the text, which llama.cpp "
                              "never does")
    if regex not in _SPLIT_PRES:
        raise _refuse(folder, f"its split pattern {str(regex)[:60]!r}... is not {_KNOWN}, the ones fledge maps to "
                              f"llama.cpp's built-in patterns")
    name = _SPLIT_PRES[regex][0 if ignore_merges else 1]
    if name is None:
        raise _refuse(folder, "it matches whole words before merging (ignore_merges) with a pattern whose "
                              "llama.cpp version always merges")
    return name


def _as_transformers_loads(tokenizer_json: dict, folder: Path) -> dict:
    """tokenizer.json with the normalizer, pre-tokenizer and ignore_merges of the tokenizer that
    `AutoTokenizer.from_pretrained(folder)` builds: what fledge and transformers encode with. For some
    model types transformers 5 ignores the file's pipeline (Qwen2Tokenizer always splits with Qwen2's
    pattern and NFC-normalizes), so a qwen2 model with a GPT-2-style tokenizer.json tokenizes digits
    one by one there; the GGUF must do the same. Without a config.json or transformers, or when
    transformers cannot load the folder: the file."""
    if not (folder / "config.json").is_file():
        return tokenizer_json
    try:
        from transformers import AutoTokenizer
    except ImportError:
        return tokenizer_json
    try:
        backend = AutoTokenizer.from_pretrained(folder, local_files_only=True).backend_tokenizer
        loaded = json.loads(backend.to_str())
    except Exception:   # transformers raises many kinds: the file's own checks below say what is wrong
        return tokenizer_json
    model = {**tokenizer_json["model"], "ignore_merges": (loaded.get("model") or {}).get(
        "ignore_merges", tokenizer_json["model"].get("ignore_merges", False))}
    return {**tokenizer_json, "normalizer": loaded.get("normalizer"), "pre_tokenizer": loaded.get("pre_tokenizer"),
            "model": model}


def _byte_level_vocab(tokenizer_json: dict, folder: Path) -> _Vocab:
    tokenizer_json = _as_transformers_loads(tokenizer_json, folder)
    model = tokenizer_json["model"]
    normalizer = tokenizer_json.get("normalizer")
    # NFC (Qwen2) is left out as llama.cpp's converter leaves it: it only changes text that is not NFC
    if normalizer is not None and normalizer.get("type") != "NFC":
        raise _refuse(folder, f"it normalizes text first ({normalizer.get('type')})")
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise _refuse(folder, "its BPE marks subwords (continuing_subword_prefix or end_of_word_suffix)")
    if (tokenizer_json.get("decoder") or {}).get("type") != "ByteLevel":
        raise _refuse(folder, "its decoder is not ByteLevel")
    pre = _byte_level_pre(tokenizer_json, folder)
    added = _added_tokens(tokenizer_json)
    by_id = {i: t for t, i in model["vocab"].items()}
    by_id.update({i: a["content"] for i, a in added.items()})
    tokens = _ordered(by_id, folder / "tokenizer.json")
    types = [_added_type(added[i]) if i in added else NORMAL for i in range(len(tokens))]
    # merges: "a b" strings (tokenizers < 0.20) or ["a", "b"] pairs; byte-level tokens never hold " "
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return _Vocab(model="gpt2", pre=pre, tokens=tokens, types=types, merges=merges)


# --- SentencePiece --------------------------------------------------------------------------------

def _sentencepiece_model(data: bytes, path: Path) -> tuple[list[tuple[str, float, int]], dict, dict]:
    """(piece, score, type) of every piece, the trainer spec and the normalizer spec of a .model file
    (`templates.read_sentencepiece_model`)."""
    from fledge.templates import read_sentencepiece_model
    try:
        return read_sentencepiece_model(data)
    except ValueError as e:
        raise ExportError(f"{path}: not a readable SentencePiece model ({e}). Export the model again.") from None


def _sentencepiece_vocab(path: Path, tokenizer_json: dict | None) -> _Vocab:
    pieces, trainer, norm = _sentencepiece_model(_read(path, bytes), path)
    model_type, byte_fallback = trainer.get(3, 1), bool(trainer.get(35, 0))
    problems = []
    if model_type != 2:
        problems.append("it is not a BPE model (llama.cpp's SentencePiece tokenizer merges like BPE)")
    if norm.get(2):
        problems.append("it normalizes text (a precompiled charsmap), which llama.cpp does not")
    if norm.get(4, 1):
        problems.append("it removes extra whitespace, which llama.cpp does not")
    if not norm.get(5, 1):
        problems.append("it keeps spaces as spaces, while llama.cpp writes them as '▁'")
    if not byte_fallback:
        problems.append("it has no byte fallback, so llama.cpp stops on any character it lacks")
    if problems:
        raise ExportError(f"{path}: {'; '.join(problems)}. Train the tokenizer with fledge "
                          f"(tokenizer.kind: sentencepiece), or export with --format hf.")
    tokens = [p for p, _, _ in pieces]
    scores = [s for _, s, _ in pieces]
    types = [t if t in (NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE) else NORMAL for _, _, t in pieces]
    for i, added in sorted(_added_tokens(tokenizer_json).items()):
        if i < len(tokens):
            if tokens[i] != added["content"]:
                raise ExportError(f"{path}: piece {i} is {tokens[i]!r} but tokenizer.json beside it says "
                                  f"{added['content']!r}; they are not the same tokenizer. Export the model again.")
        elif i == len(tokens):          # added by a fine-tune (chatml's tokens)
            tokens.append(added["content"])
            scores.append(0.0)
            types.append(_added_type(added))
        else:
            raise ExportError(f"{path}: tokenizer.json adds token {i} after {len(tokens)} pieces; llama.cpp numbers "
                              f"tokens by position. Fix the tokenizer's added tokens.")
    unk = next((i for i, t in enumerate(types) if t == UNKNOWN), None)
    bos, eos = trainer.get(41, 1), trainer.get(42, 2)     # proto2 defaults; -1 (stored as 2**64 - 1): none
    return _Vocab(model="llama", pre=None, tokens=tokens, types=types, scores=scores,
                  add_space_prefix=bool(norm.get(3, 1)), unk=unk,
                  bos=bos if bos < len(tokens) else None, eos=eos if eos < len(tokens) else None)


def _spm_json_vocab(tokenizer_json: dict, folder: Path) -> _Vocab:
    """A SentencePiece-style BPE tokenizer.json (byte fallback, "▁" for spaces) as an SPM vocabulary."""
    model = tokenizer_json["model"]
    steps = _normalizer_steps(tokenizer_json.get("normalizer"))
    pre = tokenizer_json.get("pre_tokenizer")
    prefix = False
    escaped = False
    for step in steps:
        if step.get("type") == "Replace" and step.get("pattern") == {"String": " "} and step.get("content") == _SPACE:
            escaped = True
        elif step.get("type") == "Prepend" and step.get("prepend") == _SPACE:
            prefix = True
        else:
            raise _refuse(folder, f"it normalizes text ({step.get('type')}) in a way llama.cpp does not")
    if pre is not None and pre.get("type") == "Metaspace" and pre.get("replacement", _SPACE) == _SPACE:
        escaped = True
        # llama.cpp puts the prefix before all text after a special token, as scheme "always" does
        prefix = prefix or pre.get("prepend_scheme", "always") != "never" and pre.get("add_prefix_space", True)
    elif pre is not None and not (escaped and pre.get("type") == "Split" and pre.get("pattern") == {"String": " "}):
        # (Gemma splits at " " after its normalizer replaced every " ": nothing left to split)
        raise _refuse(folder, f"its pre-tokenizer is {pre.get('type')}, which llama.cpp's SentencePiece "
                              f"tokenizer does not have")
    if not escaped:
        raise _refuse(folder, "it keeps spaces as spaces, while llama.cpp's SentencePiece tokenizer writes them "
                              "as '▁'")
    added = _added_tokens(tokenizer_json)
    by_id = {i: t for t, i in model["vocab"].items()}
    by_id.update({i: a["content"] for i, a in added.items()})
    tokens = _ordered(by_id, folder / "tokenizer.json")
    unk = model["vocab"].get(model.get("unk_token")) if model.get("unk_token") else None
    types = []
    for i, token in enumerate(tokens):
        if i in added:
            types.append(UNKNOWN if i == unk else _added_type(added[i]))
        else:
            types.append(UNKNOWN if i == unk else BYTE if _BYTE_PIECE.fullmatch(token) else NORMAL)
    # llama.cpp merges the adjacent pair whose result has the highest score; tokenizers merges the
    # pair of lowest rank: the token a merge makes scores minus its rank, the rest lower than all
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    rank = {}
    for r, merge in enumerate(merges):
        left, _, right = merge.partition(" ")
        rank.setdefault(left + right, r)
    floor = -float(len(merges) + 1)
    scores = [-float(rank[t]) if t in rank else floor for t in tokens]
    return _Vocab(model="llama", pre=None, tokens=tokens, types=types, scores=scores, add_space_prefix=prefix,
                  unk=unk)


def _normalizer_steps(normalizer: dict | None) -> list[dict]:
    if normalizer is None:
        return []
    if normalizer.get("type") == "Sequence":
        return [s for n in normalizer.get("normalizers") or [] for s in _normalizer_steps(n)]
    return [normalizer]


# --- fledge's char tokenizer ------------------------------------------------------------------------

def _char_vocab(tokenizer_json: dict, folder: Path) -> _Vocab:
    """One token per character as a unigram vocabulary: every character scores the same, so
    llama.cpp's Viterbi search takes one token per character (unknown ones: <unk>, scored lower)."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if not (pre.get("type") == "Split" and (pre.get("pattern") or {}).get("Regex") == r"[\s\S]"
            and pre.get("behavior") == "Isolated" and tokenizer_json.get("normalizer") is None):
        raise _refuse(folder, "a WordLevel tokenizer that is not fledge's char tokenizer (one token per character)")
    model = tokenizer_json["model"]
    added = _added_tokens(tokenizer_json)
    by_id = {i: t for t, i in model["vocab"].items()}
    by_id.update({i: a["content"] for i, a in added.items()})
    tokens = _ordered(by_id, folder / "tokenizer.json")
    if _SPACE in tokens:
        raise _refuse(folder, f"its characters include {_SPACE!r}, which llama.cpp reads as a space",
                      "Train the char tokenizer on text without it, or export with --format hf.")
    unk = model["vocab"].get(model.get("unk_token")) if model.get("unk_token") else None
    types = [UNKNOWN if i == unk else _added_type(added[i]) if i in added else NORMAL for i in range(len(tokens))]
    tokens = [_SPACE if t == " " and types[i] == NORMAL else t for i, t in enumerate(tokens)]
    return _Vocab(model="t5", pre=None, tokens=tokens, types=types, scores=[-1.0] * len(tokens), unk=unk)


# --- sizes, special ids, template -------------------------------------------------------------------

def _pad(vocab: _Vocab, config: dict, folder: Path) -> None:
    """Pad with UNUSED tokens up to the model's embedding rows (config.json's vocab_size)."""
    rows = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    if not isinstance(rows, int):
        return
    if rows < len(vocab.tokens):
        raise ExportError(f"{folder}: the tokenizer has {len(vocab.tokens)} tokens but config.json's vocab_size is "
                          f"{rows}; the model has no rows for the rest. Resize the model's embeddings "
                          f"(fledge does when a template adds tokens) and export again.")
    for i in range(len(vocab.tokens), rows):
        vocab.tokens.append(f"[PAD{i}]")
        vocab.types.append(UNUSED)
        if vocab.scores is not None:
            vocab.scores.append(-1e9)


def _special_id(settings: dict, name: str, ids: dict[str, int], generation: dict, config: dict) -> int | None:
    """The id of tokenizer_config's `name` token (a string or {"content": ...}), else the configs' id."""
    token = settings.get(name)
    if isinstance(token, dict):
        token = token.get("content")
    if isinstance(token, str) and token in ids:
        return ids[token]
    key = name.replace("_token", "_token_id")
    for source in (generation, config):
        value = source.get(key)
        if isinstance(value, list):
            value = value[0] if value else None
        if isinstance(value, int) and 0 <= value < len(ids):
            return value
    return None


def _tokenizer_bos(settings: dict, ids: dict[str, int], generation: dict, config: dict,
                   own: int | None) -> int | None:
    """The BOS the tokenizer itself has (what fledge puts before a prompt): tokenizer_config's
    bos_token; None when it says null (Qwen2) even if config.json names an id; when tokenizer_config
    does not mention BOS at all, the configs' id, else the tokenizer file's (`own`)."""
    if "bos_token" in settings:
        return _special_id(settings, "bos_token", ids, {}, {})
    found = _special_id(settings, "bos_token", ids, generation, config)
    return found if found is not None else own


def _stop_ids(generation: dict, config: dict, eos: int | None, size: int, folder: Path) -> list[int]:
    """Every id that ends generation: generation_config's eos_token_id (an id or a list), with EOS."""
    value = generation.get("eos_token_id", config.get("eos_token_id"))
    stops = [value] if isinstance(value, int) else [v for v in value or [] if isinstance(v, int)]
    if eos is not None and eos not in stops:
        stops.append(eos)
    stops = list(dict.fromkeys(s for s in stops if 0 <= s < size))
    if len([s for s in stops if s != eos]) > 2:
        raise ExportError(f"{folder / 'generation_config.json'}: {len(stops)} stop ids {stops}; llama.cpp's GGUF "
                          f"keys hold EOS and two more (eot, eom). Keep at most three in eos_token_id.")
    return stops


def _chat_template(folder: Path, settings: dict, *, has_bos: bool) -> str | None:
    """chat_template.jinja (transformers 5 prefers it), else tokenizer_config.json's; generation
    blocks made plain `if true` blocks, keeping their whitespace control. Without a BOS the template
    starts by setting bos_token to "", as transformers renders it: llama.cpp would pass the text of
    the bos_token_id it must be given."""
    path = folder / "chat_template.jinja"
    if path.is_file():
        source: Any = _read(path, str)
    else:
        source = settings.get("chat_template")
        if isinstance(source, list):        # named templates: the default one
            source = next((t.get("template") for t in source if t.get("name") == "default"), None)
    if not isinstance(source, str):
        return None
    source = _GENERATION_TAG.sub(lambda m: f"{{%{m[1]} {'endif' if m[2] else 'if true'} {m[3]}%}}", source)
    if not has_bos and "bos_token" in source:
        source = "{%- set bos_token = '' -%}" + source
    return source
