"""Chat templates: one owner of how conversations become tokens, for training and for inference.

    tok = hf_tokenizer("runs/x/data")                 # fledge's tokenizer file as a transformers tokenizer
    template = get_template("chatml", tok)            # a built-in, "base", or a Jinja source
    new = add_template_tokens(tok, template)          # e.g. ["<|im_start|>", "<|im_end|>"]: resize embeddings
    r = render(messages, tok, template, system="You are terse.")
    r.input_ids, r.trained, r.labels                  # labels: -100 where not trained
    ids = render_prompt("What is 2+2?", tok, template, system="You are terse.")
    stops = stop_token_ids(tok, template)             # generation ends at any of these ids
    answer = answer_text(generated_text, template)    # strip the answer's lead, cut at stop strings
    save_tokenizer_files(checkpoint_dir, tok, template)  # AutoTokenizer.from_pretrained(dir) then agrees

`messages` are `{"role": "system" | "user" | "assistant", "content": str}` dicts: an optional
system message first, then user and assistant turns alternating, starting with the user. A
training conversation ends with an assistant turn; a prompt ends with a user turn. Every
assistant turn is trained, not only the last.

Built-in templates (`BUILTINS`), each rendering `{{ bos_token }}` first when the tokenizer has one
(fledge pretrains every document as BOS + text, and Llama 3's and Gemma's BOS is where their
templates put it):

- chatml:  `<|im_start|>role\\n...<|im_end|>\\n`; the system prompt is a `system` turn.
- llama-3: `<|start_header_id|>role<|end_header_id|>\\n\\n...<|eot_id|>`; system is a turn.
- gemma:   `<start_of_turn>user\\n...<end_of_turn>\\n<start_of_turn>model\\n...<end_of_turn>\\n`;
  the system prompt is folded into the first user turn followed by a blank line, as Gemma does.
- alpaca:  `### Instruction:\\n...\\n\\n### Response:\\n...` + EOS.
- qa:      `Q: ...\\nA: ...` + EOS (user 5's `Q: {user}\\nA: {assistant}\\n\\n`).
- plain:   `Input: ...\\nOutput: ...` + EOS.
  alpaca, qa and plain have no system role: the system prompt is the first paragraph, followed
  by a blank line, and turns after the first are separated by a blank line too.

Every built-in wraps each answer AND its end-of-turn token (or EOS) in `{% generation %}` blocks,
and its generation prompt ends where every tokenizer must split tokens: after a special token,
or after a single newline or a colon. So llama-3's "\\n\\n" after the header and qa/plain's space
after the colon belong to the answer (`Template.answer_lead`): the model writes them, and
`answer_text` strips them. `"base"` uses the tokenizer's own `chat_template`, which must have
generation blocks; a Jinja source string (from a recipe) is used as given.

Tokenizers: `hf_tokenizer` wraps fledge's bpe, char (tokenizer.json) and SentencePiece
(tokenizer.model) files as a `PreTrainedTokenizerFast` with the same ids, bos and eos. The pad
token is never EOS: an existing pad or unk token if there is one (char and SentencePiece have
`<unk>`), else a new `<|pad|>` token (bpe: it gets id = vocabulary size, so the model's
embeddings must be resized, or pad ids never fed to it). Templates that need tokens the
tokenizer lacks (chatml's `<|im_start|>` on a fledge tokenizer) fail loudly until
`add_template_tokens` adds them as special tokens; the caller then resizes the embeddings and
trains them (with LoRA: make the embeddings trainable or the new rows stay random).

Traps measured with transformers 5.24, which this module checks instead of trusting:

- `apply_chat_template(..., return_assistant_tokens_mask=True)` on a template without
  `{% generation %}` returns an all-zero mask and only logs a warning: we raise TemplateError.
- The mask marks every token that overlaps a generation block, so a token straddling the
  boundary (a prompt ending in "A: " or "\\n\\n" on a GPT-2-style tokenizer) is trained while the
  prompt on its own tokenizes differently: the model would see other tokens at inference. We
  render each turn's prompt and require it to be exactly the prefix of the training ids.
- `sanitize_control_tokens` (control-token text in messages encoded as plain text) refuses to
  work together with the assistant mask. fledge's own `encode` keeps "<|eos|>" typed in text as
  text, but the transformers tokenizer must read it as the token for templates to work, so
  messages containing the tokenizer's control tokens are refused.
- transformers' Jinja environment has trim_blocks and lstrip_blocks on; our sources use
  `{%- -%}` everywhere so their layout never changes the text.
- Without a tokenizer_config.json naming bos/eos, `AutoTokenizer` loads a fledge tokenizer.json
  with no BOS or EOS. transformers 5 writes the template to chat_template.jinja (which wins over
  tokenizer_config.json's `chat_template`) and names its class `TokenizersBackend`, which
  transformers 4 lacks; we write both template places and `PreTrainedTokenizerFast`.
- transformers converts a SentencePiece .model only with protobuf installed; we read the model
  file ourselves and check the ids against SentencePiece on a multilingual sample.
"""

from __future__ import annotations

import difflib
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from fledge.errors import DataError, FledgeError, TokenizerError, TemplateError
from fledge.files import write_atomic

PAD = "<|pad|>"
BASE = "base"  # the tokenizer's own chat_template
# Pad tokens of tokenizers brought from elsewhere (tokenizer.path), found by name like BOS/EOS.
_PAD_NAMES = ("<|pad|>", "<pad>", "[PAD]", "<|padding|>")
# Multilingual text without special tokens: the wrapper must give fledge's ids on it.
PROBE = ("Hello, world! The quick brown fox; 12345 67.89\n\tindented  two  spaces   three\r\n"
         "naïve café Ünïcödé — Привет, мир! Ωμέγα 日本語のテキスト 안녕하세요 مرحبا नमस्ते 😀👍🏽\n\n")
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


@dataclass(frozen=True)
class Template:
    """A chat template: Jinja source plus what training and generation need to know about it."""

    name: str
    source: str
    end_token: str | None = None  # ends every answer; None: the tokenizer's EOS
    stop_strings: tuple[str, ...] = ()  # text that also ends generation (the model forgot the end token)
    special_tokens: tuple[str, ...] = ()  # tokens the tokenizer must have as whole (added) tokens
    answer_lead: str = ""  # text every answer starts with inside its generation block


@dataclass(frozen=True)
class Rendered:
    """Token ids of a conversation and which of them are trained (answers and their end tokens)."""

    input_ids: list[int]
    trained: list[bool]

    @property
    def labels(self) -> list[int]:
        """Ids where trained, -100 elsewhere (the model shifts them by one itself)."""
        return [i if t else -100 for i, t in zip(self.input_ids, self.trained)]


# --- built-in templates -------------------------------------------------------------------
# Jinja sources: every tag and expression strips the whitespace around it, so the line breaks
# here are layout only; text comes from string literals ('\n' is a newline inside Jinja).

_BOS = "{{- bos_token if bos_token else '' -}}\n"
# For templates without a system role: the system prompt and the turns after it.
_SPLIT_SYSTEM = ("{%- set has_system = messages and messages[0]['role'] == 'system' -%}\n"
                 "{%- set system = messages[0]['content'] if has_system else '' -%}\n"
                 "{%- set turns = messages[1:] if has_system else messages -%}\n")


def _answer(prefix: str, lead: str, end: str) -> str:
    """Jinja for an assistant turn: `prefix` stays prompt, the rest is one generation block."""
    return ("{%- if message['role'] == 'assistant' -%}\n"
            f"  {{{{- {prefix!r} -}}}}\n"
            f"  {{%- generation -%}}{{{{- {lead!r} + message['content'] + {end} -}}}}{{%- endgeneration -%}}\n")


def _ending(prompt: str) -> str:
    return f"{{%- if add_generation_prompt -%}}{{{{- {prompt!r} -}}}}{{%- endif -%}}\n"


def _paragraph_template(user: str, answer: str, lead: str) -> str:
    """alpaca, qa, plain: system as the first paragraph, turns separated by blank lines, EOS ends."""
    return (_BOS + _SPLIT_SYSTEM + "{%- if system -%}{{- system + '\\n\\n' -}}{%- endif -%}\n"
            "{%- for message in turns -%}\n" + _answer(answer, lead, "eos_token")
            + "{%- else -%}\n"
            f"  {{{{- ('' if loop.first else '\\n\\n') + {user[0]!r} + message['content'] + {user[1]!r} -}}}}\n"
            "{%- endif -%}\n{%- endfor -%}\n" + _ending(answer))


_CHATML = (_BOS + "{%- for message in messages -%}\n" + _answer("<|im_start|>assistant\n", "", "'<|im_end|>'")
           + "  {{- '\\n' -}}\n{%- else -%}\n"
           "  {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}\n"
           "{%- endif -%}\n{%- endfor -%}\n" + _ending("<|im_start|>assistant\n"))

_LLAMA3 = (_BOS + "{%- for message in messages -%}\n"
           + _answer("<|start_header_id|>assistant<|end_header_id|>", "\n\n", "'<|eot_id|>'")
           + "{%- else -%}\n"
           "  {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content']"
           " + '<|eot_id|>' -}}\n"
           "{%- endif -%}\n{%- endfor -%}\n" + _ending("<|start_header_id|>assistant<|end_header_id|>"))

_GEMMA = (_BOS + _SPLIT_SYSTEM + "{%- for message in turns -%}\n"
          + _answer("<start_of_turn>model\n", "", "'<end_of_turn>'") + "  {{- '\\n' -}}\n{%- else -%}\n"
          "  {{- '<start_of_turn>user\\n' + (system + '\\n\\n' if system and loop.first else '')"
          " + message['content'] + '<end_of_turn>\\n' -}}\n"
          "{%- endif -%}\n{%- endfor -%}\n" + _ending("<start_of_turn>model\n"))

BUILTINS: dict[str, Template] = {t.name: t for t in (
    Template("chatml", _CHATML, "<|im_end|>", ("<|im_end|>",), ("<|im_start|>", "<|im_end|>")),
    Template("llama-3", _LLAMA3, "<|eot_id|>", ("<|eot_id|>",),
             ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), answer_lead="\n\n"),
    Template("gemma", _GEMMA, "<end_of_turn>", ("<end_of_turn>",), ("<start_of_turn>", "<end_of_turn>")),
    Template("alpaca", _paragraph_template(("### Instruction:\n", "\n\n"), "### Response:\n", ""),
             None, ("### Instruction:",)),
    Template("qa", _paragraph_template(("Q: ", "\n"), "A:", " "), None, ("\nQ:",), answer_lead=" "),
    Template("plain", _paragraph_template(("Input: ", "\n"), "Output:", " "), None, ("\nInput:",),
             answer_lead=" "),
)}


def _choices() -> str:
    return f"{', '.join(BUILTINS)}, '{BASE}' (the base tokenizer's own template)"


def get_template(spec: str | Template, tokenizer=None) -> Template:
    """A Template from a built-in name, "base" (the tokenizer's chat_template) or a Jinja source.

    "base" and Jinja sources need `tokenizer`: their end-of-turn token is found by rendering a
    probe conversation (the last token of its answer, which must be a special token).
    """
    if isinstance(spec, Template):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise TemplateError(f"chat template {spec!r} is not a name or a Jinja template; use one of {_choices()}.")
    if spec in BUILTINS:
        return BUILTINS[spec]
    if spec == BASE:
        if tokenizer is None:
            raise TemplateError(f"chat template '{BASE}' is the tokenizer's own; pass the tokenizer to get_template.")
        source = getattr(tokenizer, "chat_template", None)
        if isinstance(source, dict):
            source = source.get("default")
        if not source:
            raise TemplateError(f"chat template '{BASE}': the base tokenizer has no chat template. Pick a built-in "
                                f"({', '.join(BUILTINS)}) or give a Jinja template with {{% generation %}} blocks.")
        return _custom(BASE, source, tokenizer, "the base tokenizer's chat template")
    if "{{" in spec or "{%" in spec:
        return _custom("custom", spec, tokenizer, "the Jinja chat template")
    close = difflib.get_close_matches(spec, [*BUILTINS, BASE], n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise TemplateError(f"unknown chat template '{spec}'; {hint}choose one of {_choices()}, "
                        f"or give a Jinja template with {{% generation %}} blocks.")


def _custom(name: str, source: str, tokenizer, what: str) -> Template:
    """A template from elsewhere; its end token is the last trained token of a probe answer."""
    if tokenizer is None:
        raise TemplateError(f"{what} needs the tokenizer to find its end-of-turn token (internal: pass it).")
    template = Template(name, source)
    _require_generation_blocks(template, what)
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    ids, mask = _apply(tokenizer, template, probe, add_generation_prompt=False)
    runs = _runs(mask)
    if not runs:
        raise TemplateError(f"{what} trains no token of an answer: its {{% generation %}} blocks are empty or "
                            f"not around the assistant's content. Wrap each answer and its end token in them.")
    last = ids[runs[-1][1] - 1]
    if last not in _control_ids(tokenizer):
        token = tokenizer.convert_ids_to_tokens(last)
        raise TemplateError(f"{what}: the last trained token of an answer is {token!r}, not an end-of-turn or EOS "
                            f"token, so the model would never learn to stop. Put the end-of-turn token (or "
                            f"{{{{ eos_token }}}}) inside {{% generation %}}...{{% endgeneration %}}.")
    end = tokenizer.convert_ids_to_tokens(last)
    return Template(name, source, end_token=end, stop_strings=(end,))


def _require_generation_blocks(template: Template, what: str | None = None) -> None:
    if not _GENERATION_TAG.search(template.source):
        what = what or f"chat template '{template.name}'"
        raise TemplateError(f"{what} has no {{% generation %}} blocks, so fledge cannot tell answers from prompts "
                            f"and would train nothing (transformers only logs a warning). Pick a built-in "
                            f"({', '.join(BUILTINS)}) or give a Jinja template that wraps each answer and its end "
                            f"token in {{% generation %}}...{{% endgeneration %}}.")


# --- tokens a template needs ----------------------------------------------------------------

def missing_template_tokens(tokenizer, template: str | Template) -> list[str]:
    """Tokens `template` writes that the tokenizer lacks as whole (added) tokens."""
    template = get_template(template, tokenizer)
    have = {*tokenizer.get_added_vocab(), *tokenizer.all_special_tokens}
    needed = list(template.special_tokens)
    if template.end_token and template.end_token not in needed:
        needed.append(template.end_token)
    return [t for t in needed if t not in have]


def add_template_tokens(tokenizer, template: str | Template) -> list[str]:
    """Add the special tokens `template` needs to `tokenizer`; return those added (often none).

    The caller must then resize the model's token embeddings to `len(tokenizer)` and train the
    new rows (full fine-tuning does; LoRA needs the embeddings and output head trainable).
    """
    from tokenizers import AddedToken
    missing = missing_template_tokens(tokenizer, template)
    if missing:
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
    return missing


def _check_tokens(tokenizer, template: Template) -> list[int]:
    """Fail unless the tokenizer can render `template` exactly; return the ids that end an answer."""
    missing = missing_template_tokens(tokenizer, template)
    if missing:
        raise TemplateError(f"chat template '{template.name}' needs the tokens {', '.join(missing)}, which this "
                            f"tokenizer lacks: they would be cut into pieces. Call add_template_tokens(tokenizer, "
                            f"template) and resize the model's embeddings (fine-tuning then trains them), or pick a "
                            f"template that needs no new tokens (alpaca, qa, plain).")
    if template.end_token:
        return [tokenizer.convert_tokens_to_ids(template.end_token)]
    if tokenizer.eos_token_id is None:
        raise TemplateError(f"chat template '{template.name}' ends answers with EOS, but the tokenizer has none. "
                            f"Set tokenizer.eos_token, or pick a template with its own end token (chatml).")
    return [tokenizer.eos_token_id]


def _control_ids(tokenizer) -> set[int]:
    """Ids of special tokens: EOS and every added token marked special."""
    ids = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return ids | set(tokenizer.all_special_ids)


def _control_texts(tokenizer, template: Template) -> list[str]:
    texts = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special and t.content.strip()}
    texts.update(t for t in tokenizer.all_special_tokens if t and t.strip())
    texts.update(template.special_tokens)
    if template.end_token:
        texts.add(template.end_token)
    return sorted(texts)


# --- rendering ------------------------------------------------------------------------------

def _conversation(messages, system: str | None, *, prompt: bool) -> list[dict[str, str]]:
    """Checked messages (role and content only), with `system` as a first system message."""
    if isinstance(messages, dict) or not isinstance(messages, (list, tuple)):
        raise DataError(f"a conversation is a list of {{\"role\", \"content\"}} messages, got "
                        f"{type(messages).__name__}.")
    chat = []
    for n, m in enumerate(messages, 1):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"message {n}: needs a \"role\" and a string \"content\" (got {str(m)[:80]}).")
        chat.append({"role": m["role"], "content": m["content"]})
    has_system = bool(chat) and chat[0]["role"] == "system"
    turns = chat[1:] if has_system else chat
    for n, m in enumerate(turns):  # numbered as in the caller's list
        expected = ("user", "assistant")[n % 2]
        if m["role"] != expected:
            raise DataError(f"message {n + has_system + 1}: role {m['role']!r} where {expected!r} belongs; after an "
                            f"optional system message, user and assistant turns alternate, starting with user.")
    want = "user" if prompt else "assistant"
    if not turns or turns[-1]["role"] != want:
        what = "a prompt ends with a user turn" if prompt else "a training conversation ends with an assistant turn"
        raise DataError(f"{what}; this one {'is empty' if not turns else 'ends with ' + turns[-1]['role']}.")
    if system:
        if has_system:
            raise DataError("the conversation has its own system message and a system prompt was given too; "
                            "keep one (drop the recipe's system prompt or the message).")
        chat.insert(0, {"role": "system", "content": system})
    return chat


def _apply(tokenizer, template: Template, chat, *, add_generation_prompt: bool) -> tuple[list[int], list[int]]:
    if not getattr(tokenizer, "is_fast", False):
        raise TemplateError(f"{type(tokenizer).__name__} is a slow (Python) tokenizer; the answer mask needs a fast "
                            f"one. Load it with AutoTokenizer.from_pretrained(..., use_fast=True).")
    try:
        out = tokenizer.apply_chat_template(chat, chat_template=template.source, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True,
                                            add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja2 raises TemplateSyntaxError, UndefinedError, TypeError...
        if isinstance(e, FledgeError):
            raise
        raise TemplateError(f"chat template '{template.name}' failed to render: {type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200] if str(e) else ''}. Fix the template.") from None
    return list(out["input_ids"]), list(out["assistant_masks"])


def _runs(mask: list[int]) -> list[tuple[int, int]]:
    """(start, stop) of each run of trained positions."""
    runs, start = [], None
    for i, m in enumerate([*mask, 0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, i))
            start = None
    return runs


def render(messages, tokenizer, template: str | Template, *, system: str | None = None,
           add_generation_prompt: bool = False) -> Rendered:
    """Token ids of a conversation and the mask of trained tokens (every answer and its end token).

    Raises TemplateError when the template has no generation blocks, lacks tokens the tokenizer
    needs, leaves an answer's end token untrained, or tokenizes a turn's prompt differently on
    its own than before its answer; DataError when the messages are malformed. Cost: one
    `apply_chat_template` call for the conversation and one per answer for its prompt.
    """
    template = get_template(template, tokenizer)
    _require_generation_blocks(template)
    end_ids = _check_tokens(tokenizer, template)
    chat = _conversation(messages, system, prompt=add_generation_prompt)
    _refuse_control_text(chat, tokenizer, template)
    ids, mask = _apply(tokenizer, template, chat, add_generation_prompt=add_generation_prompt)
    answers = [n for n, m in enumerate(chat) if m["role"] == "assistant"]
    runs = _runs(mask)
    if len(runs) != len(answers):
        raise TemplateError(f"chat template '{template.name}' trained {len(runs)} spans in a conversation with "
                            f"{len(answers)} answers; wrap each assistant answer, and nothing else, in its own "
                            f"{{% generation %}} block.")
    for k, (n, (start, stop)) in enumerate(zip(answers, runs), 1):
        if ids[stop - 1] not in end_ids:
            end = tokenizer.convert_ids_to_tokens(end_ids[0])
            raise TemplateError(f"chat template '{template.name}': answer {k} does not end with a trained {end!r} "
                                f"(its last trained token is {tokenizer.convert_ids_to_tokens(ids[stop - 1])!r}), "
                                f"so the model would never learn to stop. Put {end!r} inside the generation block.")
        prompt, _ = _apply(tokenizer, template, chat[:n], add_generation_prompt=True)
        if prompt != ids[:start]:
            raise _boundary_error(tokenizer, template, k, prompt, ids, start)
    return Rendered(ids, [bool(m) for m in mask])


def _boundary_error(tokenizer, template: Template, k: int, prompt: list[int], ids: list[int], start: int):
    same = next((i for i, (a, b) in enumerate(zip(prompt, ids)) if a != b), min(len(prompt), len(ids)))
    alone = tokenizer.convert_ids_to_tokens(prompt[same:same + 3])
    there = tokenizer.convert_ids_to_tokens(ids[same:same + 3])
    return TemplateError(f"chat template '{template.name}': the prompt of answer {k} rendered on its own ends in "
                         f"{alone}, but the conversation has {there} there (token {same}): the text before the answer "
                         f"tokenizes differently when the answer follows, so inference would feed the model tokens "
                         f"it never saw in training. End the generation prompt with a special token, a single "
                         f"newline or a colon and move trailing spaces or blank lines into the generation block, or "
                         f"check that the answer does not start with whitespace.")


def _refuse_control_text(chat, tokenizer, template: Template) -> None:
    controls = _control_texts(tokenizer, template)
    for n, m in enumerate(chat, 1):
        found = [t for t in controls if t in m["content"]]
        if found:
            raise DataError(f"message {n} ({m['role']}) contains {found[0]!r}, a control token of this tokenizer and "
                            f"template; it would be read as the token, not as text. Remove it from the data.")


def render_text(messages, tokenizer, template: str | Template, *, system: str | None = None,
                add_generation_prompt: bool = False) -> str:
    """The rendered conversation as text (for previews and comparisons)."""
    template = get_template(template, tokenizer)
    chat = _conversation(messages, system, prompt=add_generation_prompt)
    return tokenizer.apply_chat_template(chat, chat_template=template.source, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def render_prompt(messages: str | list, tokenizer, template: str | Template, *,
                  system: str | None = None) -> list[int]:
    """Ids to generate an answer from: the conversation so far (or one user text) and the generation prompt.

    Equal to the ids before that answer in `render` of the finished conversation.
    """
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    return render(messages, tokenizer, template, system=system, add_generation_prompt=True).input_ids


def stop_token_ids(tokenizer, template: str | Template) -> list[int]:
    """Ids that end generation: the template's end-of-turn token, and EOS."""
    template = get_template(template, tokenizer)
    ids = []
    if template.end_token:
        token_id = tokenizer.convert_tokens_to_ids(template.end_token)
        if token_id is not None and token_id != tokenizer.unk_token_id:
            ids.append(token_id)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def answer_text(generated: str, template: str | Template) -> str:
    """The answer in text generated after `render_prompt` (decoded without special tokens).

    Cut at the first stop string, without the answer's lead (qa/plain: a space, llama-3: "\\n\\n").
    """
    template = get_template(template)
    cut = min([i for i in (generated.find(s) for s in template.stop_strings) if i >= 0] or [len(generated)])
    text = generated[:cut]
    return text[len(template.answer_lead):] if template.answer_lead and text.startswith(template.answer_lead) else text


# --- fledge tokenizers as transformers tokenizers ----------------------------------------------

def set_pad_token(tokenizer) -> list[str]:
    """Give `tokenizer` a pad token that is not EOS; return the tokens added ([] or [PAD]).

    Keeps a pad token that is not EOS, else uses unk, else BOS (when they are not EOS either:
    pad positions are never attended to nor trained, so any id other than EOS serves and the
    model's embeddings keep their size), else adds `<|pad|>` as a special token, which needs a
    row in the model's embeddings.
    """
    from tokenizers import AddedToken
    eos = tokenizer.eos_token
    if tokenizer.pad_token is not None and tokenizer.pad_token != eos:
        return []
    for existing in (tokenizer.unk_token, tokenizer.bos_token):
        if existing is not None and existing != eos:
            tokenizer.pad_token = existing
            return []
    added = PAD not in tokenizer.get_added_vocab()
    if added:
        tokenizer.add_tokens([AddedToken(PAD, special=True, normalized=False)], special_tokens=True)
    tokenizer.pad_token = PAD
    return [PAD] if added else []


def hf_tokenizer(path: str | Path):
    """fledge's tokenizer file (or the folder holding it) as a transformers PreTrainedTokenizerFast.

    Same ids as fledge's `Tokenizer.encode` on text without special tokens, the same bos and eos,
    and a pad token that is never EOS: an existing pad or unk token (char and SentencePiece have
    `<unk>`), else BOS (bpe), else a new `<|pad|>` (id = the old vocabulary size: resize the embeddings).
    Special-token text in the input IS read as the token (templates need that), unlike fledge's
    `encode`. SentencePiece models are converted from the .model file, without protobuf (a model
    with a dummy prefix gets it on every piece of text between special tokens, like transformers'
    legacy Llama tokenizer). Raises TokenizerError when the ids differ from fledge's on `PROBE`.
    """
    from tokenizers import Tokenizer as Backend
    from transformers import PreTrainedTokenizerFast

    from fledge.tokenizer import find_tokenizer_file, load_tokenizer
    path = Path(path)
    file = find_tokenizer_file(path) if path.is_dir() else path
    fledge_tok = load_tokenizer(file)
    data = file.read_bytes()
    if fledge_tok.kind == "sentencepiece":
        backend, unk = _sentencepiece_backend(data, file)
    else:
        backend = Backend.from_str(data.decode("utf-8"))
        unk = json.loads(data)["model"].get("unk_token")
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=backend.id_to_token(fledge_tok.bos_id),
                                 eos_token=backend.id_to_token(fledge_tok.eos_id), unk_token=unk,
                                 clean_up_tokenization_spaces=False)
    vocab = hf.get_added_vocab()
    pad = next((p for p in _PAD_NAMES if p in vocab and p != hf.eos_token), None)
    if pad:
        hf.pad_token = pad
    set_pad_token(hf)
    encoded = ((fledge_tok.encode(t), hf.encode(t, add_special_tokens=False)) for t in (PROBE, "  " + PROBE))
    ours, theirs = next(((a, b) for a, b in encoded if a != b), ([], []))  # leading spaces: dummy prefixes
    if ours != theirs:
        at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        raise TokenizerError(f"{file}: the transformers version of this {fledge_tok.kind} tokenizer encodes a "
                             f"sample differently from fledge (first at token {at}: {ours[at:at + 3]} vs "
                             f"{theirs[at:at + 3]}). Use a tokenizer trained by fledge, or a tokenizer.json from the "
                             f"model's authors.")
    return hf


def _proto_fields(buf: bytes) -> Iterator[tuple[int, Any]]:
    """(field number, value) of a protobuf message: ints, bytes (length-delimited) or raw fixed bytes."""
    i = 0

    def varint() -> int:
        nonlocal i
        value = shift = 0
        while True:
            byte = buf[i]
            i += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value

    while i < len(buf):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            yield number, varint()
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            yield number, buf[i:i + size]
            i += size
        elif wire == 2:
            size = varint()
            yield number, buf[i:i + size]
            i += size
        else:
            raise ValueError(f"protobuf wire type {wire}")


def read_sentencepiece_model(data: bytes) -> tuple[list[tuple[str, float, int]], dict[int, Any], dict[int, Any]]:
    """((piece, score, type) of every piece, trainer_spec, normalizer_spec) of a SentencePiece .model
    file, read by protobuf field number without protobuf (the numbers: `_sentencepiece_backend`).
    The specs map field numbers to values; absent fields are absent. Raises ValueError when `data`
    is not such a file."""
    pieces: list[tuple[str, float, int]] = []
    trainer: dict[int, Any] = {}
    norm: dict[int, Any] = {}
    try:
        for number, value in _proto_fields(data):
            if number == 1:
                p = dict(_proto_fields(value))
                pieces.append((p[1].decode("utf-8"), struct.unpack("<f", p.get(2, b"\0\0\0\0"))[0], p.get(3, 1)))
            elif number == 2:
                trainer = dict(_proto_fields(value))
            elif number == 3:
                norm = dict(_proto_fields(value))
    except (ValueError, KeyError, IndexError, TypeError, UnicodeDecodeError, struct.error) as e:
        raise ValueError(str(e) or type(e).__name__) from None
    return pieces, trainer, norm


def _sentencepiece_backend(data: bytes, origin: Path):
    """A `tokenizers` Tokenizer that encodes like the SentencePiece model in `data`; and its unk piece.

    Reads sentencepiece_model.proto fields by number: ModelProto 1 pieces (1 piece, 2 score,
    3 type), 2 trainer_spec (3 model_type, 35 byte_fallback, 40 unk_id, 45 unk_piece),
    3 normalizer_spec (2 precompiled_charsmap, 3 add_dummy_prefix, 4 remove_extra_whitespaces,
    5 escape_whitespaces); absent fields take the proto2 defaults written below.
    """
    from tokenizers import AddedToken, Regex, Tokenizer as Backend, decoders, models, normalizers
    try:
        pieces, trainer, norm = read_sentencepiece_model(data)
    except ValueError as e:
        raise TokenizerError(f"{origin}: not a readable SentencePiece model ({e}).") from None
    model_type, byte_fallback = trainer.get(3, 1), bool(trainer.get(35, 0))
    unk_id, unk = trainer.get(40, 0), trainer.get(45, b"<unk>").decode("utf-8")
    dummy_prefix, extra_spaces, escape = bool(norm.get(3, 1)), bool(norm.get(4, 1)), bool(norm.get(5, 1))
    if model_type == 2:  # BPE: merges ranked by the merged piece's score, as SentencePiece merges
        vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
        normal = {piece: (score, i) for i, (piece, score, kind) in enumerate(pieces) if kind == 1}
        ranked = sorted((-score, i, piece[:k], piece[k:]) for piece, (score, i) in normal.items()
                        for k in range(1, len(piece)) if piece[:k] in normal and piece[k:] in normal)
        backend = Backend(models.BPE(vocab=vocab, merges=[(a, b) for _, _, a, b in ranked], unk_token=unk,
                                     fuse_unk=True, byte_fallback=byte_fallback))
    elif model_type == 1:
        backend = Backend(models.Unigram([(p, s) for p, s, _ in pieces], unk_id=unk_id, byte_fallback=byte_fallback))
    else:
        kind = {3: "word", 4: "char"}.get(model_type, f"type {model_type}")
        raise TokenizerError(f"{origin}: a SentencePiece {kind} model; fledge converts BPE and unigram models. "
                             f"Use a tokenizer.json instead.")
    steps = []
    if norm.get(2):
        steps.append(normalizers.Precompiled(norm[2]))
    if extra_spaces:
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if escape:
        steps.append(normalizers.Replace(" ", "▁"))
    if dummy_prefix:  # not Metaspace: it skips the prefix when the text starts with a space; SentencePiece doesn't
        steps.append(normalizers.Prepend("▁"))
    backend.normalizer = normalizers.Sequence(steps)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if dummy_prefix:
        steps.append(decoders.Strip(content=" ", left=1))
    backend.decoder = decoders.Sequence(steps)
    # unknown (2) and control (3) pieces are special tokens; user-defined (4) ones are always whole
    backend.add_tokens([AddedToken(p, special=kind in (2, 3), normalized=False)
                        for p, _, kind in pieces if kind in (2, 3, 4)])
    return backend, unk


def tokenizer_config(tokenizer, template: str | Template, *, model_max_length: int | None = None) -> dict:
    """The tokenizer_config.json of a checkpoint: the tokenizer class, bos/eos/pad/unk and the chat template.

    Raises TokenizerError when the pad token is missing or is EOS (see `set_pad_token`).
    """
    template = get_template(template, tokenizer)
    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.eos_token:
        raise TokenizerError(f"the tokenizer's pad token is {tokenizer.pad_token!r} (EOS is "
                             f"{tokenizer.eos_token!r}); a pad that is EOS, or none, ends up masking EOS and the model "
                             f"never learns to stop. Call set_pad_token(tokenizer) first and resize the embeddings "
                             f"if it adds a token.")
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        if getattr(tokenizer, name) is not None:
            config[name] = getattr(tokenizer, name)
    if model_max_length:
        config["model_max_length"] = model_max_length
    config["chat_template"] = template.source  # for readers of transformers 4 and llama.cpp's converter
    return config


def save_tokenizer_files(folder: str | Path, tokenizer, template: str | Template, *,
                         model_max_length: int | None = None) -> list[Path]:
    """Write tokenizer.json (when it differs), tokenizer_config.json and chat_template.jinja into `folder`.

    `AutoTokenizer.from_pretrained(folder)` then gives the same ids, bos/eos/pad and chat template.
    Returns the paths written. A SentencePiece tokenizer gets a tokenizer.json too (transformers
    cannot read the .model without protobuf): keep fledge's tokenizer.model elsewhere, since
    `fledge.tokenizer.find_tokenizer_file` refuses a folder holding both.
    """
    template = get_template(template, tokenizer)
    config = tokenizer_config(tokenizer, template, model_max_length=model_max_length)  # checks before writing
    folder = Path(folder)
    written = []
    backend = tokenizer.backend_tokenizer.to_str(pretty=True)
    target = folder / "tokenizer.json"
    try:
        current = target.read_text(encoding="utf-8") if target.is_file() else None
    except (OSError, UnicodeDecodeError):
        current = None
    if current != backend:
        written.append(write_atomic(target, backend))
    text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
    written.append(write_atomic(folder / "tokenizer_config.json", text))
    written.append(write_atomic(folder / "chat_template.jinja", template.source))
    return written
