"""An Ollama Modelfile beside a GGUF file, so `ollama create NAME -f FILE.Modelfile` works without edits.

    from fledge.export.ollama import write_modelfile
    write_modelfile(Path("out/persona-q4_k_m.gguf"), template, tokenizer, sample=recipe.sample,
                    system=recipe.template.system, context_length=1024)
    # -> out/persona-q4_k_m.Modelfile

The Modelfile holds:

- `FROM ./<file>.gguf`: relative to the Modelfile's folder (Ollama resolves it there);
- `TEMPLATE`: fledge's chat template in Go text/template syntax, over Ollama's `.Messages`
  (role and content of every message, system messages included) and `.System` (the system
  messages joined). Each built-in template (`templates.BUILTINS`) has a translation that renders
  exactly the text fledge renders for a conversation ending in a user turn, less the leading BOS:
  Ollama tokenizes the prompt with the GGUF's `tokenizer.ggml.add_bos_token` and adds BOS itself,
  as fledge's templates render it whenever the tokenizer has one. Answers then end at the
  template's end token or EOS (end-of-generation tokens in the GGUF). A custom Jinja template is
  not translated: the Modelfile has no TEMPLATE line and says why, and shows fledge's rendering of
  a two-turn chat to write one from. A pretraining run (no template) gets `{{ .Prompt }}`: text
  to continue, as `fledge sample --raw`;
- `SYSTEM`: the run's `template.system`, which Ollama puts first when a request has none, as
  fledge does;
- `PARAMETER stop` for each of the template's stop strings, and the run's sampling defaults
  (`sample.temperature`, `top_k`, `top_p`, `max_new_tokens` as `num_predict`), `num_ctx` = the
  model's context length, and `repeat_penalty 1` (fledge applies none; Ollama's default is 1.1).

Modelfile syntax (Ollama's parser/parser.go): a value is one word, or quoted with `"` or `\"\"\"`
and then taken as written, newlines included; runes that are not printable other than spaces,
tabs and newlines are dropped, and `#` starts a comment only at the beginning of a line. Values
that cannot be written that way (a stop string or system prompt holding `\"\"\"`, or control
characters) are left out with a comment saying so.
"""

from __future__ import annotations

import json
from pathlib import Path

from fledge.files import storage_error, write_atomic

# Go template actions are written without trim markers: every character outside {{ }} is output.
# Role names are compared with Go raw strings (`user`), so templates never hold a double quote.
_GENERATION = "{{ end }}{{ end }}"


def _role_turns(prefix: str, middle: str, end: str, prompt: str) -> str:
    """chatml, llama-3: every message (system included) as prefix + role + middle + content + end."""
    return f"{{{{ range .Messages }}}}{prefix}{{{{ .Role }}}}{middle}{{{{ .Content }}}}{end}{{{{ end }}}}{prompt}"


def _gemma(end: str) -> str:
    """gemma: no system role; the system prompt opens the first user turn, followed by a blank line."""
    return ("{{ $first := true }}{{ range .Messages }}{{ if eq .Role `user` }}<start_of_turn>user\n"
            "{{ if and $first $.System }}{{ $.System }}\n\n{{ end }}{{ .Content }}" + end + "\n{{ $first = false }}"
            "{{ else if eq .Role `assistant` }}<start_of_turn>model\n{{ .Content }}" + end + "\n"
            + _GENERATION + "<start_of_turn>model\n")


def _paragraphs(user: tuple[str, str], answer: str, lead: str, eos: str) -> str:
    """alpaca, qa, plain: the system prompt as the first paragraph, turns separated by a blank line,
    each answer ending with EOS."""
    return ("{{ if .System }}{{ .System }}\n\n{{ end }}{{ $first := true }}{{ range .Messages }}"
            "{{ if eq .Role `user` }}{{ if not $first }}\n\n{{ end }}" + user[0] + "{{ .Content }}" + user[1]
            + "{{ $first = false }}{{ else if eq .Role `assistant` }}" + answer + lead + "{{ .Content }}" + eos
            + _GENERATION + answer)


def go_template(template, tokenizer) -> tuple[str | None, str]:
    """(Go template rendering what `template` renders, or None; why None).

    `template`: a fledge.templates.Template, or None for a pretraining run (`{{ .Prompt }}`).
    `tokenizer`: the transformers tokenizer (its EOS text ends alpaca/qa/plain answers).
    """
    if template is None:
        return "{{ .Prompt }}", ""
    from fledge.templates import BUILTINS
    builtin = BUILTINS.get(template.name)
    if builtin is None or builtin.source != template.source:
        return None, (f"this run's chat template is {'custom Jinja' if template.name == 'custom' else repr(template.name)}"
                      f", which fledge does not translate to Go; only the built-ins ({', '.join(BUILTINS)}) are")
    eos = getattr(tokenizer, "eos_token", None) or ""
    end = template.end_token or eos
    if not end:
        return None, f"the tokenizer has no EOS token, which the {template.name} template ends answers with"
    sources = {
        "chatml": lambda: _role_turns("<|im_start|>", "\n", "<|im_end|>\n", "<|im_start|>assistant\n"),
        "llama-3": lambda: _role_turns("<|start_header_id|>", "<|end_header_id|>\n\n", "<|eot_id|>",
                                       "<|start_header_id|>assistant<|end_header_id|>"),
        "gemma": lambda: _gemma(end),
        "alpaca": lambda: _paragraphs(("### Instruction:\n", "\n\n"), "### Response:\n", "", eos),
        "qa": lambda: _paragraphs(("Q: ", "\n"), "A:", " ", eos),
        "plain": lambda: _paragraphs(("Input: ", "\n"), "Output:", " ", eos),
    }
    if template.name not in sources:
        return None, f"fledge has no Go translation of the built-in template {template.name!r} yet"
    bad = next((t for t in (eos, end) if "{{" in t or "}}" in t or '"' in t), None)
    if bad:
        return None, f"the token {bad!r} cannot be written inside a Go template in a Modelfile"
    return sources[template.name](), ""


def modelfile_text(gguf_name: str, template, tokenizer, *, sample=None, system: str = "",
                   context_length: int | None = None, origin: str = "") -> str:
    """The Modelfile for the GGUF file `gguf_name` (in the same folder); see the module docstring.

    `sample`: a fledge.recipe.SampleConfig (None: no sampling parameters); `origin`: a line
    naming what was exported, for the header comment.
    """
    lines = ["# Ollama Modelfile written by `fledge export`" + (f" for {origin}" if origin else "") + ".",
             f"# ollama create NAME -f {Path(gguf_name).stem}.Modelfile", f"FROM ./{gguf_name}"]
    source, why = go_template(template, tokenizer)
    if source is not None:
        if template is None:
            lines.append("# A pretraining run: prompts are text to continue (as `fledge sample --raw`); BOS comes "
                         "from the GGUF (add_bos_token).")
        lines.append(f'TEMPLATE """{source}"""')
    else:
        lines += [f"# No TEMPLATE: {why}.",
                  "# Without one, Ollama picks a template itself (from the GGUF's chat template, by similarity to "
                  "templates it knows), which may not be this run's.",
                  "# Write a TEMPLATE (Go text/template over .Messages) that renders a two-turn chat as fledge does "
                  "(JSON string; BOS is added by Ollama):",
                  "# " + json.dumps(_example(template, tokenizer), ensure_ascii=False)]
    if system:
        value, why = _quoted(system)
        lines.append(f"SYSTEM {value}" if value else f"# No SYSTEM: the run's system prompt {why}.")
    for stop in (template.stop_strings if template is not None else ()):
        value, why = _quoted(stop)
        lines.append(f"PARAMETER stop {value}" if value else f"# No stop {stop!r}: it {why}.")
    if sample is not None:
        lines += [f"PARAMETER temperature {sample.temperature:g}", f"PARAMETER top_k {sample.top_k}",
                  f"PARAMETER top_p {sample.top_p:g}", f"PARAMETER num_predict {sample.max_new_tokens}"]
    if context_length:
        lines.append(f"PARAMETER num_ctx {context_length}")
    lines.append("PARAMETER repeat_penalty 1")
    return "\n".join(lines) + "\n"


def write_modelfile(gguf_path: str | Path, template, tokenizer, *, sample=None, system: str = "",
                    context_length: int | None = None, origin: str = "") -> Path:
    """Write `<gguf stem>.Modelfile` beside `gguf_path` (see `modelfile_text`); returns its path."""
    gguf_path = Path(gguf_path)
    target = gguf_path.with_suffix(".Modelfile")
    text = modelfile_text(gguf_path.name, template, tokenizer, sample=sample, system=system,
                          context_length=context_length, origin=origin)
    try:
        return write_atomic(target, text)
    except OSError as e:
        raise storage_error(e, target) from None


def _quoted(value: str) -> tuple[str | None, str]:
    """(value as the Modelfile parser reads it back exactly, or None; why not)."""
    if '"""' in value:
        return None, 'holds """, which a Modelfile value cannot'
    if any(not c.isprintable() and c not in "\n\t " for c in value):
        return None, "holds control characters, which Ollama's Modelfile parser drops"
    if value and not any(c in value for c in ' \t\n"#') and value == value.strip():
        return value, ""
    return (f'"""{value}"""' if '"' in value else f'"{value}"'), ""


def _example(template, tokenizer) -> str:
    """fledge's rendering of a two-turn chat with a system prompt, without the leading BOS."""
    from fledge.templates import render_text
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "4."}, {"role": "user", "content": "And 3+3?"}]
    text = render_text(messages, tokenizer, template, add_generation_prompt=True)
    bos = getattr(tokenizer, "bos_token", None)
    return text[len(bos):] if bos and text.startswith(bos) else text
