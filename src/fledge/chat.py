"""Talk to a fine-tuned run, turn by turn, in the chat template it was trained with.

    fledge chat runs/persona                       # /reset clears the history, /exit or Ctrl-D ends
    fledge chat runs/persona --system "Be brief." --temperature 0.7

    from fledge.chat import chat
    from fledge.sample import load_for_inference
    loaded = load_for_inference("runs/persona")
    history = chat(loaded, loaded.recipe.sample, read_line=iter(["Hi", "/exit"]).__next__)

Each turn the whole conversation so far is rendered again with the run's template
(`templates.render_prompt`: the system prompt, every earlier turn, the generation prompt), so
the model sees exactly what a training conversation looks like up to the answer it writes.
The answer streams as it is generated and ends at the template's end-of-turn token, EOS or a
stop string; it joins the history without surrounding whitespace. Ctrl-C while an answer is
being written stops that answer (what was written is kept as the answer) and the chat goes
on; at the prompt it only reminds how to leave. When the conversation no longer fits the
model's window (`model.max_seq_len`, keeping room for an answer of `max_new_tokens`, at most
half the window) the oldest exchanges are dropped, with a note. Turn n is sampled with seed
`seed + n`, so a scripted chat repeats itself.

A run without a template (a pretraining run) has no turns to render: chat refuses it and
points to `fledge sample`, which continues text.
"""

from __future__ import annotations

import sys
from typing import Callable

from fledge.errors import FledgeError, TemplateError
from fledge.recipe import SampleConfig
from fledge.sample import Loaded, generate_from_ids, print_note, prompt_ids

COMMANDS = {"/reset": "clear the conversation", "/exit": "end the chat (or Ctrl-D)"}


def write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def chat(loaded: Loaded, config: SampleConfig, *, system: str | None = None, seed: int = 0,
         read_line: Callable[[str], str] = input, write: Callable[[str], None] = write_stdout,
         on_note: Callable[[str], None] = print_note, prompt: str = "> ") -> list[dict]:
    """Chat until /exit or the end of input (`read_line` raising EOFError, or StopIteration as an
    iterator's `__next__` does); returns the history left.

    `read_line(prompt)` gives the user's next line (default: `input`); `write(text)` shows answers
    as they stream; `on_note(message)` hears about commands, dropped turns and stops. `system`:
    None keeps the run's `template.system`, "" renders none, other text replaces it.
    """
    if loaded.template is None:
        raise TemplateError(f"{loaded.checkpoint} has no chat template (a pretraining run), so there are no turns "
                            f"to render. Continue text with `fledge sample RUN --prompt \"...\"` instead.")
    system = (loaded.recipe.template.system or None) if system is None else system or None
    window = loaded.recipe.model.max_seq_len
    reserve = min(config.max_new_tokens, window // 2)
    history: list[dict] = []
    turn = 0
    on_note(f"chatting with {loaded.checkpoint} (template {loaded.template.name}); "
            + ", ".join(f"{c}: {what}" for c, what in COMMANDS.items()))
    while True:
        try:
            line = read_line(prompt)
        except (EOFError, StopIteration):      # Ctrl-D, or the end of a scripted iterator
            break
        except KeyboardInterrupt:
            write("\n")
            on_note("/exit or Ctrl-D ends the chat")
            continue
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command = text.split()[0]
            if command == "/exit":
                break
            if command == "/reset":
                history = []
                on_note("the conversation is cleared")
            else:
                on_note(f"unknown command {command}; " + ", ".join(f"{c}: {w}" for c, w in COMMANDS.items()))
            continue
        history.append({"role": "user", "content": text})
        try:
            ids = _fit(history, loaded, system, window - reserve, on_note)
            answer = _answer(loaded, ids, config, seed + turn, write, on_note)
        except FledgeError as e:       # a turn the template refuses: say why, keep the chat
            history.pop()
            on_note(f"error: {e}")
            continue
        history.append({"role": "assistant", "content": answer.strip()})
        turn += 1
    return history


def _fit(history: list[dict], loaded: Loaded, system: str | None, budget: int,
         on_note: Callable[[str], None]) -> list[int]:
    """Prompt ids of the history, dropping its oldest exchanges (in place) until they fit `budget` tokens."""
    dropped = 0
    while True:
        ids = prompt_ids(loaded.tokenizer, history, loaded.template, system=system)
        if len(ids) <= budget or len(history) <= 1:
            break
        del history[:2]                 # one user turn and its answer
        dropped += 1
    if dropped:
        on_note(f"the conversation outgrew the model's window ({loaded.recipe.model.max_seq_len} tokens with room for "
                f"the answer); dropped the oldest {dropped} exchange(s)")
    return ids


def _answer(loaded: Loaded, ids: list[int], config: SampleConfig, seed: int, write: Callable[[str], None],
            on_note: Callable[[str], None]) -> str:
    """Generate one answer, streaming it; Ctrl-C keeps what was written so far."""
    pieces: list[str] = []

    def show(_: int, piece: str) -> None:
        pieces.append(piece)
        write(piece)

    try:
        answer = generate_from_ids(loaded.model, loaded.tokenizer, ids, config, seed=seed, on_text=show,
                                   on_note=on_note, max_seq_len=loaded.recipe.model.max_seq_len,
                                   template=loaded.template)[0]
    except KeyboardInterrupt:
        write("\n")
        on_note("stopped; the answer so far stays in the conversation")
        return "".join(pieces)
    write("\n")
    return answer
