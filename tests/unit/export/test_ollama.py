"""The Ollama Modelfile: its TEMPLATE, run through Go's own text/template the way Ollama executes chat
templates (.Messages with system messages in them, .System joined), renders exactly what fledge renders
for each built-in template, with and without a system prompt, less the BOS Ollama adds itself; values
are quoted so Ollama's Modelfile parser reads them back as written; a custom template gets no TEMPLATE
and a comment saying why."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from fledge.export.ollama import go_template, modelfile_text, write_modelfile
from fledge.recipe import SampleConfig, TokenizerConfig
from fledge.templates import BUILTINS, add_template_tokens, get_template, hf_tokenizer, render_text
from fledge.tokenizer import train_tokenizer

GO_RENDER = r"""
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type Input struct {
	Template string    `json:"template"`
	Messages []Message `json:"messages"`
	Prompt   string    `json:"prompt"`
}

// As ollama/template/template.go executes a template that uses .Messages: System is every system
// message joined by a blank line, Messages still holds them; missing keys are zero; json is a func.
func main() {
	var in Input
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	funcs := template.FuncMap{"json": func(v any) string { b, _ := json.Marshal(v); return string(b) }}
	t := template.Must(template.New("").Option("missingkey=zero").Funcs(funcs).Parse(in.Template))
	var system []string
	for _, m := range in.Messages {
		if m.Role == "system" {
			system = append(system, m.Content)
		}
	}
	data := map[string]any{"System": strings.Join(system, "\n\n"), "Messages": in.Messages, "Prompt": in.Prompt,
		"Response": ""}
	if err := t.Execute(os.Stdout, data); err != nil {
		panic(err)
	}
}
"""

CORPUS = "Hello, world! What is 2+2? Answer: 4. Be brief; naïve café.\n" * 3
CHATS = {
    "with system": [{"role": "system", "content": "Be brief.\nUse digits."},
                    {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4, naïve café."},
                    {"role": "user", "content": "And\n\n3+3?  "}],
    "without system": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                       {"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "A bird."},
                       {"role": "user", "content": "Q: tricky"}],
}


@pytest.fixture(scope="module")
def go_renderer(tmp_path_factory):
    """A built Go program rendering a template with Go's text/template; skipped without Go."""
    go = shutil.which("go")
    if go is None:
        pytest.skip("Go is not installed (apt-get install golang-go); the Modelfile template test runs Go's "
                    "text/template itself")
    folder = tmp_path_factory.mktemp("go")
    (folder / "render.go").write_text(GO_RENDER)
    env = {**os.environ, "GOCACHE": str(folder / "cache"), "GOPATH": str(folder / "gopath"), "GO111MODULE": "off",
           "GOFLAGS": "", "CGO_ENABLED": "0"}
    built = subprocess.run([go, "build", "-o", str(folder / "render"), str(folder / "render.go")], cwd=folder,
                           env=env, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr

    def render(template: str, messages: list[dict], prompt: str = "") -> str:
        done = subprocess.run([str(folder / "render")], input=json.dumps(
            {"template": template, "messages": messages, "prompt": prompt}), capture_output=True, text=True,
            timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    return render


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    train_tokenizer(TokenizerConfig(kind="char", vocab_size=64), [CORPUS]).save(folder)
    tok = hf_tokenizer(folder)
    for template in BUILTINS.values():
        add_template_tokens(tok, template)
    return tok


def modelfile_template(text: str) -> str:
    """The TEMPLATE value as Ollama's parser reads it: between the triple quotes, taken as written."""
    start = text.index('TEMPLATE """') + len('TEMPLATE """')
    return text[start:text.index('"""', start)]


@pytest.mark.parametrize("chat", CHATS)
@pytest.mark.parametrize("name", BUILTINS)
def test_the_template_renders_in_go_exactly_what_fledge_renders(go_renderer, tokenizer, name, chat):
    template = get_template(name, tokenizer)
    text = modelfile_text("m-q4_k_m.gguf", template, tokenizer)
    ours = render_text(CHATS[chat], tokenizer, template, add_generation_prompt=True)
    assert ours.startswith(tokenizer.bos_token)
    assert go_renderer(modelfile_template(text), CHATS[chat]) == ours[len(tokenizer.bos_token):]


def test_a_pretraining_run_gets_the_prompt_as_it_is(go_renderer, tokenizer):
    text = modelfile_text("m-f16.gguf", None, tokenizer)
    assert go_renderer(modelfile_template(text), [], prompt="ROMEO:\n") == "ROMEO:\n"
    assert "PARAMETER stop" not in text


def test_the_modelfile_names_the_file_stops_and_the_runs_sampling(tmp_path, tokenizer):
    gguf = tmp_path / "persona-q4_k_m.gguf"
    gguf.write_bytes(b"GGUF")
    path = write_modelfile(gguf, get_template("qa", tokenizer), tokenizer, system='Say "hi".\nBe brief.',
                           sample=SampleConfig(max_new_tokens=77, temperature=0.0, top_k=5, top_p=0.9),
                           context_length=512)
    assert path == tmp_path / "persona-q4_k_m.Modelfile"
    lines = path.read_text().split("\n")
    assert lines[2] == "FROM ./persona-q4_k_m.gguf"
    text = path.read_text()
    # qa's stop string starts with a newline: quoted, the newline kept inside the quotes
    assert 'PARAMETER stop "\nQ:"' in text
    assert 'SYSTEM """Say "hi".\nBe brief."""' in text
    for line in ("PARAMETER temperature 0", "PARAMETER top_k 5", "PARAMETER top_p 0.9", "PARAMETER num_predict 77",
                 "PARAMETER num_ctx 512", "PARAMETER repeat_penalty 1"):
        assert line in lines


def test_a_custom_template_gets_no_template_line_and_says_why(tokenizer):
    source = BUILTINS["chatml"].source.replace("<|im_start|>assistant\\n", "<|im_start|>bot\\n")
    custom = get_template(source, tokenizer)
    template, why = go_template(custom, tokenizer)
    assert template is None and "custom Jinja" in why
    text = modelfile_text("m-f16.gguf", custom, tokenizer)
    assert "TEMPLATE" not in text.replace("# No TEMPLATE", "").replace("# Write a TEMPLATE", "")
    assert f"# No TEMPLATE: {why}." in text
    example = json.loads(next(line for line in text.split("\n") if line.startswith('# "'))[2:])
    assert example.endswith("<|im_start|>bot\n") and not example.startswith(tokenizer.bos_token)
    assert "PARAMETER stop <|im_end|>" in text


def test_a_system_prompt_the_parser_would_change_is_left_out_with_a_comment(tokenizer):
    text = modelfile_text("m.gguf", get_template("chatml", tokenizer), tokenizer, system='a """ b')
    assert "SYSTEM" not in text.replace("# No SYSTEM", "")
    assert '# No SYSTEM: the run\'s system prompt holds """' in text
