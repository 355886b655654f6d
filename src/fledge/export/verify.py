"""Prove a GGUF file behaves like the model it came from: load it in llama.cpp and compare with the
PyTorch model of its transformers folder on held-out text.

    from fledge.export.verify import torch_reference, verify_gguf
    reference = torch_reference(hf_folder, texts)              # PyTorch logits, computed once
    check = verify_gguf(gguf, hf_folder, texts, reference=f16_result, pytorch=reference)
    check.ok, check.problems, check.warnings
    print("\n".join(check.lines()))

What is measured, on each held-out text as training saw a document begin (BOS + its ids, at most
`MAX_TOKENS`), or on held-out token ids with the positions training scored (a fine-tune's
validation rows: the answers), the same ids fed to both models (`llama_cpp.Llama(logits_all=True)`
with a float32 KV cache, and `AutoModelForCausalLM` of the folder in float32):

- first-step logits: the largest absolute difference of the logits after BOS, and over every
  position;
- teacher-forced argmax agreement: the share of positions where both pick the same next token.
  A position where PyTorch rates the file's pick within twice the file's float tolerance of its
  own best is a tie at that precision and not counted as a disagreement (it is reported as a tie);
- per-token log-prob difference: the mean absolute difference of log p(next token) over the
  scored positions, against PyTorch;
- perplexity over the scored positions (all of a text's; a row's answers) of the file, of PyTorch
  and of the f16 file (`reference`), and their ratio: against f16 when a reference is given, else
  against PyTorch. For a fine-tune, PyTorch's is the run's validation perplexity on those rows.

Float files (f32, f16, bf16) must match: first-step and all-position logit differences within
`LOGIT_TOLERANCE[quant]` and 100% argmax agreement, else a problem. Quantized files are measured,
and a warning is given when perplexity is worse than f16 by more than `PERPLEXITY_WARNING[quant]`
(q8_0 1%, q4_k_m 5%, as the issue asks; q5_k_m 3%, between them).

Tokenization: llama.cpp's ids (`Llama.tokenize(special=True)`, no BOS) equal the folder's
tokenizer's on `SAMPLES` (templates.PROBE with leading spaces, digits, whitespace runs, emoji
with joiners and modifiers, many scripts, code) and every held-out text; BOS is added when the
tokenizer has one. A difference is a problem.
For fledge's char tokenizer (a unigram vocabulary in the file) llama.cpp reads a RUN of characters
the tokenizer never saw as one <unk>, where fledge writes one <unk> per character, and no vocabulary
type llama.cpp has does otherwise (SPM aborts without byte tokens, RWKV gives one per byte): its
samples are compared exactly once reduced to the characters it knows, and whole (with the held-out
texts) against fledge's ids with each run of <unk> made one; `notes` says so.

Chat template (when the folder has one): a two-turn chat with a system prompt, rendered by fledge
(`templates.render_prompt`) and by

- llama-cpp-python's `Jinja2ChatFormatter` from the file's `tokenizer.chat_template`, as
  `Llama.create_chat_completion` does (text tokenized with special tokens, no BOS added): what
  Ollama-less runtimes with Jinja (llama-server --jinja, llama-cpp-python) send. A difference is a
  problem;
- llama.cpp's built-in renderer (`llama_chat_apply_template`), which recognises a template by
  the tokens it holds and renders its own version (tokenized with the file's BOS setting): what
  llama.cpp without Jinja and bindings using the C API send. A difference is a warning that names
  it (llama-3's prompt there ends in "\\n\\n", which fledge leaves to the model); a template it
  does not recognise is a note.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fledge.errors import ExportError
from fledge.templates import PROBE

MAX_TOKENS = 256                 # per held-out text: BOS + ids, cut here
FLOAT_QUANTS = ("f32", "f16", "bf16")
# Largest |logit difference| a float file may show against PyTorch float32 (logits of briefly
# trained tiny models are O(10); f16 and bf16 round every weight to 11 and 8 significant bits).
LOGIT_TOLERANCE = {"f32": 5e-3, "f16": 5e-2, "bf16": 3e-1}
# Perplexity ratio against the f16 file above which a quantized file gets a warning.
PERPLEXITY_WARNING = {"q8_0": 1.01, "q5_k_m": 1.03, "q4_k_m": 1.05}
SAMPLES = (
    PROBE,
    "  " + PROBE,
    "Numbers: 0 1 12 123 1234 12345 123456789 3.14159 -42 1e-9 2024-01-31 10:30 $1,000,000.00 ٣٤٥ 五十",
    "Whitespace:\n\n\n  two\t\ttabs    four spaces\r\n   \n end  \n",
    "Emoji: 👩‍👩‍👧‍👦 🏳️‍🌈 👍🏽 ❤️ 🇯🇵 ✨ — “quotes” ‘single’ «guillemets» … ½ ©",
    "Scripts: Ελληνικά русский עברית العربية हिन्दी ไทย 中文 日本語 한국어 ქართული Tiếng Việt",
    "Code: def f(x):\n    return x**2  # square\n{\"key\": [1, 2, 3]} <tag attr='v'/> a->b && c||d",
)
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2? Answer in digits."},
        {"role": "assistant", "content": "4."}, {"role": "user", "content": "And 3+3?"}]


@dataclass
class TorchReference:
    """The PyTorch model of a transformers folder on held-out texts: what GGUF files are compared with."""

    folder: Path
    ids: list[list[int]]             # BOS + ids of each text, at most MAX_TOKENS
    logits: list[np.ndarray]         # (T, vocab) float32, one per text
    scored: list[np.ndarray]         # (T - 1,) bool: whether predicting token t + 1 counts in perplexity
    tokenizer: object                # the folder's transformers tokenizer
    template: object | None          # fledge.templates.Template of its chat_template.jinja, or None


@dataclass
class Verification:
    """What comparing one GGUF file with PyTorch found; `problems` empty means it passed."""

    path: Path
    quant: str
    positions: int = 0
    first_logit_diff: float = 0.0        # max |logit difference| after BOS, over the texts
    max_logit_diff: float = 0.0          # over every position
    tolerance: float | None = None       # for float files
    argmax_agreement: float = 0.0        # share of positions with the same next token
    ties: int = 0                        # disagreements at positions PyTorch ranks as a tie at that precision
    logprob_diff: float = 0.0            # mean |log p(next) difference| against PyTorch, scored positions
    scored: int = 0                      # positions whose next token counts in perplexity and log-prob
    perplexity: float = 0.0
    torch_perplexity: float = 0.0
    f16_perplexity: float | None = None
    tokenization_samples: int = 0
    chat: dict[str, str] = field(default_factory=dict)   # renderer -> "equal" / what differs / a note
    notes: list[str] = field(default_factory=list)       # known, measured differences that are not problems
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def perplexity_ratio(self) -> float:
        """Perplexity against the f16 file's (or PyTorch's when there is none)."""
        base = self.f16_perplexity if self.f16_perplexity else self.torch_perplexity
        return self.perplexity / base if base else float("nan")

    def lines(self) -> list[str]:
        """The numbers, one line each, for the CLI."""
        against = "f16" if self.f16_perplexity else "PyTorch"
        ties = f" ({self.ties} ties at {self.quant} precision)" if self.ties else ""
        out = [f"{self.quant}: logits vs PyTorch: first step max |diff| {self.first_logit_diff:.2e}, all "
               f"{self.positions} positions {self.max_logit_diff:.2e}"
               + (f" (tolerance {self.tolerance:g})" if self.tolerance else ""),
               f"{self.quant}: teacher-forced argmax agreement {self.argmax_agreement:.2%}{ties}; mean |log-prob "
               f"diff| {self.logprob_diff:.4f}",
               f"{self.quant}: perplexity on {self.scored} tokens {self.perplexity:.4g} (PyTorch "
               f"{self.torch_perplexity:.4g}"
               + (f", f16 {self.f16_perplexity:.4g}" if self.f16_perplexity else "")
               + f"), ratio vs {against} {self.perplexity_ratio:.4f}",
               f"{self.quant}: tokenization equal on {self.tokenization_samples} samples" if not any(
                   p.startswith("tokenization") for p in self.problems) else f"{self.quant}: tokenization differs"]
        out += [f"{self.quant}: chat prompt, {name}: {what}" for name, what in self.chat.items()]
        out += [f"note: {n}" for n in self.notes]
        out += [f"warning: {w}" for w in self.warnings] + [f"problem: {p}" for p in self.problems]
        return out

    def to_json(self) -> dict:
        data = {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}
        data["perplexity_ratio"] = self.perplexity_ratio
        return data


# --- the PyTorch side ------------------------------------------------------------------------

def torch_reference(folder: str | Path, texts: list[str], *, samples: list[tuple[list[int], list[bool]]] | None = None,
                    max_tokens: int = MAX_TOKENS) -> TorchReference:
    """Load the transformers folder offline (float32) and compute its logits on `texts` (BOS + their ids,
    every position scored), or on `samples`: (ids, scored) pairs, `scored[t]` saying whether predicting
    ids[t + 1] counts (a fine-tune's validation rows: where labels are not IGNORE)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fledge.sample import checkpoint_template
    folder = Path(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    tokenizer.model_max_length = 2**62            # texts are cut to the window below; no length warning
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    window = min(max_tokens, getattr(model.config, "max_position_embeddings", None) or max_tokens)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    if samples is None:
        samples = [(bos + tokenizer.encode(t, add_special_tokens=False), None) for t in texts]
    ids, scored = [], []
    for seq, mask in samples:
        seq = list(seq)[:window]
        mask = np.ones(len(seq) - 1, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)[:len(seq) - 1]
        if len(seq) >= 2:
            ids.append(seq)
            scored.append(mask)
    if not ids:
        raise ExportError(f"{folder}: the held-out texts give no sequence of two tokens or more to compare on.")
    if not any(m.any() for m in scored):            # nothing scored (every answer cut off): score everything
        scored = [np.ones(len(seq) - 1, dtype=bool) for seq in ids]
    with torch.no_grad():
        logits = [model(input_ids=torch.tensor([i])).logits[0].float().numpy() for i in ids]
    template = checkpoint_template(folder, tokenizer)
    return TorchReference(folder, ids, logits, scored, tokenizer, template)


# --- the llama.cpp side ----------------------------------------------------------------------

@contextlib.contextmanager
def _captured_stderr():
    """Collect what llama.cpp writes to file descriptor 2 (it logs there even with verbose=False) into
    the yielded list of lines, instead of the terminal."""
    lines: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield lines
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            lines += [line for line in sink.read().decode("utf-8", errors="replace").splitlines() if line.strip()]


def _load(path: Path, n_ctx: int):
    from fledge.export.gguf import require_llama_cpp
    llama_cpp = require_llama_cpp("verifying GGUF files in llama.cpp (--no-verify skips it)")
    import torch
    threads = max(1, torch.get_num_threads())
    # float32 KV cache: what is measured is the file, not llama.cpp's default f16 cache (which alone moves
    # logits by ~3e-3 here)
    settings = dict(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                    n_threads=threads, n_threads_batch=threads, type_k=llama_cpp.GGML_TYPE_F32,
                    type_v=llama_cpp.GGML_TYPE_F32)
    with _captured_stderr():
        try:
            return llama_cpp.Llama(**settings, verbose=False)
        except (ValueError, RuntimeError) as e:
            error = e
    with _captured_stderr() as log:        # again, with llama.cpp's log on, to say why
        try:
            llama_cpp.Llama(**settings, verbose=True).close()
        except (ValueError, RuntimeError):
            pass
    words = ("error", "bad ", "invalid", "unknown", "wrong", "missing")
    why = next((line.strip() for line in log if any(w in line.lower() for w in words)), str(error).splitlines()[0])
    raise ExportError(f"{path}: llama.cpp could not load the file ({why}). Its architecture or tensors are not "
                      f"what llama.cpp expects; export with --format hf instead, or report it with the model's "
                      f"config.json.")


def _gguf_logits(llm, ids: list[list[int]]) -> list[np.ndarray]:
    out = []
    for seq in ids:
        llm.reset()
        llm.eval(seq)
        out.append(np.array(llm.scores[:len(seq)], dtype=np.float32, copy=True))
    return out


_perplexities: dict[tuple, float] = {}


def _gguf_perplexity(path: Path, ids: list[list[int]], scored: list[np.ndarray]) -> float:
    """Perplexity of a GGUF file on `ids` at the `scored` positions (cached per file, ids and positions)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size, hash(tuple(map(tuple, ids))),
           hash(tuple(m.tobytes() for m in scored)))
    if key not in _perplexities:
        llm = _load(path, max(len(i) for i in ids))
        try:
            _perplexities[key] = _perplexity(_gguf_logits(llm, ids), ids, scored)
        finally:
            llm.close()
    return _perplexities[key]


# --- measures --------------------------------------------------------------------------------

def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _target_logprobs(logits: np.ndarray, seq: list[int]) -> np.ndarray:
    """log p(seq[t + 1]) at every position t but the last."""
    return _log_softmax(logits[:-1])[np.arange(len(seq) - 1), seq[1:]]


def _perplexity(logits: list[np.ndarray], ids: list[list[int]], scored: list[np.ndarray]) -> float:
    nll = np.concatenate([-_target_logprobs(lg, seq)[m] for lg, seq, m in zip(logits, ids, scored)])
    return float(math.exp(nll.mean()))


def compare_logits(check: Verification, ours: list[np.ndarray], theirs: list[np.ndarray], ids: list[list[int]],
                   scored: list[np.ndarray] | None = None) -> None:
    """Fill the logit, argmax and log-prob numbers of `check` (theirs: PyTorch; `scored`: see TorchReference,
    default every position)."""
    scored = scored or [np.ones(len(seq) - 1, dtype=bool) for seq in ids]
    tie = check.tolerance or 0.0
    agree = positions = ties = 0
    first = biggest = 0.0
    diffs = []
    for a, b, seq, mask in zip(ours, theirs, ids, scored):
        first = max(first, float(np.abs(a[0] - b[0]).max()))
        biggest = max(biggest, float(np.abs(a - b).max()))
        picked, best = a.argmax(-1), b.argmax(-1)
        same = picked == best
        # a tie at this precision: PyTorch rates the file's pick within 2 x tolerance of its own best
        near = ~same & (b.max(-1) - b[np.arange(len(b)), picked] <= 2 * tie)
        agree += int(same.sum())
        ties += int(near.sum())
        positions += len(seq)
        diffs.append(np.abs(_target_logprobs(a, seq) - _target_logprobs(b, seq))[mask])
    check.positions, check.first_logit_diff, check.max_logit_diff = positions, first, biggest
    check.argmax_agreement = agree / positions
    check.ties = ties
    check.logprob_diff = float(np.concatenate(diffs).mean())
    check.scored = int(sum(m.sum() for m in scored))
    check.perplexity = _perplexity(ours, ids, scored)
    check.torch_perplexity = _perplexity(theirs, ids, scored)
    if check.quant in FLOAT_QUANTS:
        if biggest > check.tolerance:
            check.problems.append(f"logits differ from PyTorch by up to {biggest:.3g} (first step {first:.3g}); "
                                  f"a {check.quant} file may differ by {check.tolerance:g}")
        if agree + ties < positions:
            check.problems.append(f"teacher-forced argmax agreement is {agree / positions:.2%} "
                                  f"({positions - agree - ties} of {positions} positions pick another token)")


def _one_unk_per_run(ids: list[int], unk: int | None) -> list[int]:
    """`ids` with every run of consecutive `unk` ids made one (llama.cpp's unigram tokenizer)."""
    return [t for i, t in enumerate(ids) if not (t == unk and i and ids[i - 1] == unk)]


def _check_tokenization(check: Verification, llm, tokenizer, texts: list[str]) -> None:
    fixed = list(SAMPLES)
    expect = list
    if llm.metadata.get("tokenizer.ggml.model") == "t5":
        # fledge's char tokenizer (the only one add_vocab writes as a unigram vocabulary): llama.cpp
        # turns a run of characters the tokenizer never saw into ONE <unk>, where fledge writes one per
        # character, and no GGUF vocabulary type does otherwise. Compared: the samples made only of the
        # characters it knows, exactly; the whole samples and the held-out texts with that difference.
        unk = tokenizer.unk_token_id
        known = {t for t, i in tokenizer.get_vocab().items() if len(t) == 1 and i != unk}
        fixed = [s for s in ("".join(c for c in text if c in known) for text in SAMPLES) if s] + fixed
        expect = lambda ids: _one_unk_per_run(list(ids), unk)  # noqa: E731
        check.notes.append("char tokenizer: llama.cpp reads a run of characters the tokenizer never saw as one "
                           "<unk> (fledge: one <unk> per character); tokenization compared exactly on the samples "
                           "reduced to known characters, and with one <unk> per run on the rest")
    samples = list(dict.fromkeys([*fixed, *texts]))
    check.tokenization_samples = len(samples)
    for n, text in enumerate(samples):
        ours = expect(tokenizer.encode(text, add_special_tokens=False))
        theirs = list(llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))
        if ours != theirs:
            at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            where = f"sample {n + 1} of {len(samples)}" + (" (held-out text)" if n >= len(fixed) else "")
            check.problems.append(f"tokenization differs on {where}: {text[:40]!r}... first at token {at}: "
                                  f"fledge {ours[at:at + 4]}, llama.cpp {theirs[at:at + 4]}")
            return
    bos = tokenizer.bos_token_id
    if bos is not None:
        first = llm.tokenize(b"a", add_bos=True, special=False)[:1]
        if first != [bos]:
            check.problems.append(f"llama.cpp does not begin a prompt with BOS ({bos}) but with {first}; the GGUF's "
                                  f"tokenizer.ggml.add_bos_token or bos_token_id is wrong")


def _token_text(llm, token: int) -> str:
    import llama_cpp
    if token < 0:
        return ""
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    return llama_cpp.llama_vocab_get_text(vocab, token).decode("utf-8", errors="replace")


def _difference(ours: list[int], theirs: list[int], tokenizer) -> str:
    at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    show = lambda ids: repr(tokenizer.decode(ids[at:at + 6], skip_special_tokens=False))  # noqa: E731
    return f"differs from token {at} on: fledge {show(ours)}, llama.cpp {show(theirs)}"


def _check_chat(check: Verification, llm, reference: TorchReference) -> None:
    import llama_cpp
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from fledge.templates import render_prompt
    template, tokenizer = reference.template, reference.tokenizer
    source = llm.metadata.get("tokenizer.chat_template")
    if template is None:
        check.chat["fledge"] = "no chat template (a pretraining run): prompts are text to continue"
        return
    if not source:
        check.problems.append("the GGUF holds no tokenizer.chat_template, though the run has one")
        return
    ours = render_prompt(CHAT, tokenizer, template)
    try:
        formatter = Jinja2ChatFormatter(template=source, eos_token=_token_text(llm, llm.token_eos()),
                                        bos_token=_token_text(llm, llm.token_bos()))
        text = formatter(messages=[dict(m) for m in CHAT]).prompt
    except Exception as e:   # jinja2 raises many kinds; any of them means runtimes cannot render it
        check.problems.append(f"llama-cpp-python cannot render the GGUF's chat template "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})")
    else:
        theirs = list(llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))
        check.chat["Jinja (llama-cpp-python, llama-server --jinja)"] = "equal" if theirs == ours else \
            _difference(ours, theirs, tokenizer)
        if theirs != ours:
            check.problems.append("the chat prompt rendered from the GGUF's template (Jinja) differs from fledge's")
    name = "llama.cpp built-in (llama_chat_apply_template)"
    messages = (llama_cpp.llama_chat_message * len(CHAT))(
        *[llama_cpp.llama_chat_message(role=m["role"].encode(), content=m["content"].encode()) for m in CHAT])
    size = 4096
    buffer = ctypes.create_string_buffer(size)
    n = llama_cpp.llama_chat_apply_template(source.encode("utf-8"), messages, len(CHAT), True, buffer, size)
    if n < 0:
        check.chat[name] = ("not recognised: llama.cpp without --jinja, and bindings using its C API, fall back to "
                            "another format (llama-server: chatml); give those the prompt fledge renders")
        return
    if n > size:
        buffer = ctypes.create_string_buffer(n + 1)
        n = llama_cpp.llama_chat_apply_template(source.encode("utf-8"), messages, len(CHAT), True, buffer, n + 1)
    text = buffer.raw[:n].decode("utf-8", errors="replace")
    add_bos = tokenizer.bos_token_id is not None
    theirs = list(llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True))
    if theirs == ours:
        check.chat[name] = "equal"
    else:
        check.chat[name] = _difference(ours, theirs, tokenizer)
        check.warnings.append(f"llama.cpp's built-in version of the chat template renders another prompt than "
                              f"fledge ({check.chat[name]}); runtimes without Jinja would prompt the model "
                              f"differently from training")


# --- one file --------------------------------------------------------------------------------

def verify_gguf(gguf_path: str | Path, hf_folder: str | Path, texts: list[str], *, reference=None,
                quant: str | None = None, pytorch: TorchReference | None = None) -> Verification:
    """Compare the GGUF file with the PyTorch model of `hf_folder` on `texts` (see the module docstring).

    `reference`: the f16 file's GGUFResult (or path), whose perplexity quantized files are compared
    with; `quant`: the file's quantization (default: `reference`-less guess from the file name);
    `pytorch`: a `torch_reference` of the folder on `texts`, to compute once for several files.
    Raises DependencyError without llama-cpp-python, ExportError when llama.cpp cannot load the file.
    """
    gguf_path = Path(gguf_path)
    pytorch = pytorch or torch_reference(hf_folder, texts)
    quant = quant or _quant_of(gguf_path)
    check = Verification(gguf_path, quant, tolerance=LOGIT_TOLERANCE.get(quant))
    llm = _load(gguf_path, max(len(i) for i in pytorch.ids))
    try:
        if llm.n_vocab() != pytorch.logits[0].shape[-1]:
            check.problems.append(f"llama.cpp has {llm.n_vocab()} tokens, the model {pytorch.logits[0].shape[-1]} "
                                  f"output rows")
            return check
        compare_logits(check, _gguf_logits(llm, pytorch.ids), pytorch.logits, pytorch.ids, pytorch.scored)
        _check_tokenization(check, llm, pytorch.tokenizer, texts)
        _check_chat(check, llm, pytorch)
    finally:
        llm.close()
    ref_path = getattr(reference, "path", reference)
    if ref_path is not None and Path(ref_path).resolve() != gguf_path.resolve():
        check.f16_perplexity = _gguf_perplexity(Path(ref_path), pytorch.ids, pytorch.scored)
    elif quant == "f16":
        check.f16_perplexity = check.perplexity
    judge_perplexity(check)
    return check


def judge_perplexity(check: Verification) -> None:
    """Add a warning when the file's perplexity ratio is above PERPLEXITY_WARNING for its quant."""
    limit = PERPLEXITY_WARNING.get(check.quant)
    if limit and check.perplexity_ratio > limit:
        check.warnings.append(f"{check.quant} perplexity is {check.perplexity_ratio - 1:.1%} above "
                              f"{'f16' if check.f16_perplexity else 'PyTorch'}'s (warning above {limit - 1:.0%}); "
                              f"prefer a larger quantization for this model")


def _quant_of(path: Path) -> str:
    from fledge.export.gguf import QUANTS
    stem = path.name.lower().removesuffix(".gguf")
    return next((q for q in sorted(QUANTS, key=len, reverse=True) if stem.endswith(q)), "unknown")
