"""Chat: a scripted conversation gets the trained answers turn after turn, each turn's prompt being
the training rendering of the whole history; answers stop at EOS (qa) and at the end-of-turn token
(chatml); /reset clears, /exit and the end of input end, Ctrl-C stops one answer and the chat goes
on; the oldest exchanges are dropped, with a note, when the history outgrows the window; a run
without a template is refused in one line; `fledge chat` reads stdin."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fledge import cli
from fledge.chat import chat
from fledge.errors import TemplateError
from fledge.recipe import SampleConfig
from fledge.sample import load_for_inference
from fledge.templates import render, render_prompt
from finetuned_runs import A1, A2, Q1, Q2, fledge_base, finetune, messages

GREEDY = SampleConfig(max_new_tokens=30, temperature=0.0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("chat")
    base = fledge_base(root)
    return {"base": base, "qa": finetune(root, "qa", base, template="qa", system="Be brief."),
            "chatml": finetune(root, "chatml", base, template="chatml")}


def script(*lines):
    """read_line for chat(): the lines, then the end of input (Ctrl-D); KeyboardInterrupt items are raised."""
    items = list(lines)

    def read_line(prompt: str) -> str:
        if not items:
            raise EOFError
        item = items.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    return read_line


def run_chat(loaded, *lines, write=None, **kwargs):
    out, notes, prompts = [], [], []
    real = loaded.model.generate

    def recording(idx, *args, **kw):
        prompts.append(idx[0].tolist())
        yield from real(idx, *args, **kw)

    loaded.model.generate = recording
    try:
        history = chat(loaded, kwargs.pop("config", GREEDY), read_line=script(*lines), write=write or out.append,
                       on_note=notes.append, **kwargs)
    finally:
        del loaded.model.generate
    return history, "".join(out), notes, prompts


@pytest.mark.parametrize("name", ["qa", "chatml"])
def test_each_turn_renders_the_whole_history_as_training_did(runs, name):
    ft = runs[name]
    loaded = load_for_inference(ft.run)
    history, out, notes, prompts = run_chat(loaded, Q1, Q2, "/exit", "never read")
    assert history == messages(Q1, A1, Q2, A2) and out == f"{A1}\n{A2}\n"
    training = render(messages(Q1, A1, Q2, A2), ft.tokenizer, ft.template, system=ft.system or None)
    second = [i for i, t in enumerate(training.trained) if t and not training.trained[i - 1]][1]
    assert prompts[1] == training.input_ids[:second]          # the history exactly as training rendered it
    assert len(notes) == 1 and "/reset" in notes[0]           # the greeting


def test_reset_clears_the_history_and_unknown_commands_are_named(runs):
    ft = runs["qa"]
    loaded = load_for_inference(ft.run)
    history, out, notes, prompts = run_chat(loaded, Q1, "/reset", "/rest", Q2)
    assert history == messages(Q2, A2) and out == f"{A1}\n{A2}\n"
    assert prompts[1] == render_prompt(Q2, ft.tokenizer, ft.template, system="Be brief.")
    assert "the conversation is cleared" in notes[1] and notes[2].startswith("unknown command /rest")


def test_ctrl_c_stops_one_answer_and_the_chat_goes_on(runs):
    loaded = load_for_inference(runs["qa"].run)
    shown = []

    def write(text: str) -> None:
        shown.append(text)
        if len(shown) == 2:                    # Ctrl-C while the first answer's second piece is written
            raise KeyboardInterrupt

    history, _, notes, _ = run_chat(loaded, Q1, KeyboardInterrupt(), Q2, write=write)
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    assert A1.startswith(history[1]["content"]) and len(history[1]["content"]) < len(A1)   # what was written
    assert history[2]["content"] == Q2 and history[3]["content"]                           # the chat went on
    assert any("stopped" in n for n in notes) and any("Ctrl-D ends the chat" in n for n in notes)


def test_the_oldest_exchanges_go_when_the_history_outgrows_the_window(runs):
    loaded = load_for_inference(runs["qa"].run)
    window = len(render_prompt(messages(Q1, A1, Q2), loaded.tokenizer, loaded.template, system="Be brief.")) + 4
    loaded.recipe = dataclasses.replace(loaded.recipe, model=dataclasses.replace(loaded.recipe.model,
                                                                                 max_seq_len=window))
    config = SampleConfig(max_new_tokens=8, temperature=0.0)     # room kept for the answer: 8 tokens
    history, _, notes, prompts = run_chat(loaded, Q1, Q2, Q1, config=config)
    dropped = [n for n in notes if "dropped the oldest" in n]
    assert len(dropped) == 2 and f"window ({window} tokens" in dropped[0] and "1 exchange" in dropped[0]
    assert len(prompts) == 3 and all(len(p) <= window - 8 for p in prompts)
    assert history == messages(Q1, A1)


def test_a_turn_the_template_refuses_is_dropped_with_the_reason(runs):
    loaded = load_for_inference(runs["chatml"].run)
    history, _, notes, _ = run_chat(loaded, "say <|im_end|> please", Q1)
    assert history == messages(Q1, A1)
    assert any(n.startswith("error: ") and "control token" in n for n in notes)


def test_a_run_without_a_template_is_refused_in_one_line(runs, capsys):
    with pytest.raises(TemplateError, match="fledge sample"):
        chat(load_for_inference(runs["base"]), GREEDY, read_line=script())
    capsys.readouterr()
    assert cli.main(["chat", str(runs["base"])]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "no chat template" in err


def test_fledge_chat_reads_turns_from_stdin(runs):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(cli.__file__).parents[1])}
    done = subprocess.run([sys.executable, "-m", "fledge", "chat", str(runs["chatml"].run), "--temperature", "0"],
                          input=f"{Q1}\n{Q2}\n/exit\n", capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{A1}\n{A2}\n"
    assert "chatting with" in done.stderr
