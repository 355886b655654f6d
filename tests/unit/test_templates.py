"""Chat templates: trained tokens are exactly the answers, prompts are training prefixes, files round-trip.

    OMP_NUM_THREADS=1 pytest tests/unit/test_templates.py -q

One table of tokenizer kinds (fledge's bpe, sentencepiece and char, plus a GPT-2-like
transformers tokenizer whose bos = eos = unk) crossed with every built-in template, each on a
single-turn and a three-turn chat, with and without a system prompt.
"""

from __future__ import annotations

import pytest

from fledge.errors import DataError, FledgeError, TemplateError, TokenizerError
from fledge.recipe import load_recipe
from fledge.templates import (BUILTINS, PAD, PROBE, add_template_tokens, answer_text, get_template, hf_tokenizer,
                              missing_template_tokens, render, render_prompt, render_text, save_tokenizer_files,
                              set_pad_token, stop_token_ids, Template, tokenizer_config)
from fledge.tokenizer import train_tokenizer

transformers = pytest.importorskip("transformers")

CHATS = {
    "single": [{"role": "user", "content": "What is the capital of France?"},
               {"role": "assistant", "content": "Paris."}],
    "three": [{"role": "user", "content": "Hi there"},
              {"role": "assistant", "content": "Hello! How can I help?"},
              {"role": "user", "content": "Name a big river in Spain."},
              {"role": "assistant", "content": "The Ebro, or the Tagus\nif you count Portugal."},
              {"role": "user", "content": "Thanks"},
              {"role": "assistant", "content": "You are welcome."}],
}
SYSTEMS = (None, "You answer in one short line.")
WORDS = ("the of and to a in that it was he for on with as his they be at one have this from by hot word but "
         "what some we can out other were all there when up use your how said an each she which do their time").split()
# Rendered text of every template, so the formats users rely on are pinned: e.g. user 5's
# "Q: {user}\nA: {assistant}\n\n", with EOS after each answer and the system prompt first.
CHAT2 = [{"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"},
         {"role": "user", "content": "u2"}, {"role": "assistant", "content": "a2"}]
TEXTS = {
    "chatml": ("<|bos|><|im_start|>system\nS<|im_end|>\n<|im_start|>user\nu1<|im_end|>\n<|im_start|>assistant\n"
               "a1<|im_end|>\n<|im_start|>user\nu2<|im_end|>\n<|im_start|>assistant\na2<|im_end|>\n"),
    "llama-3": ("<|bos|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|><|start_header_id|>user"
                "<|end_header_id|>\n\nu1<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\na1<|eot_id|>"
                "<|start_header_id|>user<|end_header_id|>\n\nu2<|eot_id|><|start_header_id|>assistant"
                "<|end_header_id|>\n\na2<|eot_id|>"),
    "gemma": ("<|bos|><start_of_turn>user\nS\n\nu1<end_of_turn>\n<start_of_turn>model\na1<end_of_turn>\n"
              "<start_of_turn>user\nu2<end_of_turn>\n<start_of_turn>model\na2<end_of_turn>\n"),
    "alpaca": ("<|bos|>S\n\n### Instruction:\nu1\n\n### Response:\na1<|eos|>\n\n### Instruction:\nu2\n\n"
               "### Response:\na2<|eos|>"),
    "qa": "<|bos|>S\n\nQ: u1\nA: a1<|eos|>\n\nQ: u2\nA: a2<|eos|>",
    "plain": "<|bos|>S\n\nInput: u1\nOutput: a1<|eos|>\n\nInput: u2\nOutput: a2<|eos|>",
}
PROMPTS = {"chatml": "<|im_start|>assistant\n", "llama-3": "<|start_header_id|>assistant<|end_header_id|>",
           "gemma": "<start_of_turn>model\n", "alpaca": "### Response:\n", "qa": "A:", "plain": "Output:"}
KINDS = ("bpe", "sentencepiece", "char", "gpt2-like")


def corpus() -> list[str]:
    """Text every tokenizer trains on: prose, the chats, the templates' words and the probe."""
    import random
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))).capitalize() + "." for _ in range(300)]
    chats = [m["content"] for chat in [*CHATS.values(), CHAT2] for m in chat]
    return ["\n".join(lines) + "\n\n", *chats, *SYSTEMS[1:], *TEXTS.values(), PROBE]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A saved tokenizer of each kind: fledge's three, and a GPT-2-like transformers folder."""
    folder = tmp_path_factory.mktemp("tokenizers")
    paths = {}
    for kind, size in {"bpe": 400, "sentencepiece": 500, "char": 400}.items():
        config = load_recipe(None, base={"tokenizer": {"kind": kind, "vocab_size": size}}).tokenizer
        paths[kind] = train_tokenizer(config, corpus()).save(folder / kind)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    gpt2 = Tokenizer(models.BPE())
    gpt2.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    gpt2.decoder = decoders.ByteLevel()
    gpt2.train_from_iterator(corpus(), trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=gpt2, bos_token="<|endoftext|>",
                                              eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    hf.save_pretrained(folder / "gpt2-like")
    paths["gpt2-like"] = folder / "gpt2-like"
    return paths


def load(kind: str, files):
    """A fresh transformers tokenizer of `kind` (tests add tokens to it)."""
    if kind == "gpt2-like":
        return transformers.AutoTokenizer.from_pretrained(files[kind])
    return hf_tokenizer(files[kind])


def runs(trained: list[bool]) -> list[tuple[int, int]]:
    out, start = [], None
    for i, t in enumerate([*trained, False]):
        if t and start is None:
            start = i
        elif not t and start is not None:
            out.append((start, i))
            start = None
    return out


# --- the main invariants, for every template x tokenizer kind x chat -----------------------------

@pytest.mark.parametrize("name", list(BUILTINS))
@pytest.mark.parametrize("kind", KINDS)
def test_trained_tokens_are_the_answers_and_prompts_are_prefixes(kind, name, files):
    tok = load(kind, files)
    add_template_tokens(tok, name)
    template = BUILTINS[name]
    end = template.end_token or tok.eos_token
    for chat in CHATS.values():
        answers = [n for n, m in enumerate(chat) if m["role"] == "assistant"]
        for system in SYSTEMS:
            r = render(chat, tok, name, system=system)
            spans = runs(r.trained)
            # every answer, and only answers, each with its lead and end token
            assert [tok.decode(r.input_ids[a:b], skip_special_tokens=False) for a, b in spans] == \
                   [template.answer_lead + chat[n]["content"] + end for n in answers]
            assert r.labels == [i if t else -100 for i, t in zip(r.input_ids, r.trained)]
            # what inference feeds the model before each answer is what training had there
            for n, (start, _) in zip(answers, spans):
                assert render_prompt(chat[:n], tok, name, system=system) == r.input_ids[:start]
            if system:
                assert system in render_text(chat, tok, name, system=system)


@pytest.mark.parametrize("name", list(BUILTINS))
def test_rendered_text_is_the_documented_format(name, files):
    tok = load("bpe", files)
    add_template_tokens(tok, name)
    assert render_text(CHAT2, tok, name, system="S") == TEXTS[name]
    prompt = render_text(CHAT2[:1], tok, name, system="S", add_generation_prompt=True)
    assert prompt.endswith(PROMPTS[name]) and TEXTS[name].startswith(prompt)
    assert render_text(CHAT2, tok, name).startswith("<|bos|>" + ("<|im_start|>user" if name == "chatml" else ""))


def test_prompt_from_a_plain_string(files):
    tok = load("sentencepiece", files)
    one = [{"role": "user", "content": "Hi there"}]
    assert render_prompt("Hi there", tok, "qa", system="S") == render_prompt(one, tok, "qa", system="S")
    assert tok.decode(render_prompt("Hi there", tok, "qa"), skip_special_tokens=False) == "<|bos|>Q: Hi there\nA:"


# --- loud failures ---------------------------------------------------------------------------------

NO_BLOCKS = ("{{ bos_token }}{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}"
             "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}")


def test_transformers_masks_nothing_without_generation_blocks(files):
    # Pins the library behaviour this module guards against: an all-zero mask, a log line, no error.
    out = load("bpe", files).apply_chat_template(CHATS["single"], chat_template=NO_BLOCKS, tokenize=True,
                                                 return_dict=True, return_assistant_tokens_mask=True)
    assert set(out["assistant_masks"]) == {0}


def test_template_without_generation_blocks_fails_loudly(files):
    tok = load("gpt2-like", files)
    with pytest.raises(TemplateError, match=r"no \{% generation %\} blocks.*chatml, llama-3"):
        render(CHATS["single"], tok, NO_BLOCKS)
    tok.chat_template = NO_BLOCKS  # a base model's own template, as most are
    with pytest.raises(TemplateError, match="base tokenizer's chat template has no"):
        get_template("base", tok)
    tok.chat_template = None
    with pytest.raises(TemplateError, match="has no chat template. Pick a built-in"):
        get_template("base", tok)


def test_base_template_with_generation_blocks_is_used(files):
    tok = load("gpt2-like", files)  # has <|im_start|> and <|im_end|>, like Qwen's
    tok.chat_template = BUILTINS["chatml"].source
    base = get_template("base", tok)
    assert (base.end_token, base.stop_strings) == ("<|im_end|>", ("<|im_end|>",))
    assert render(CHATS["three"], tok, base) == render(CHATS["three"], tok, "chatml")


def test_answer_end_outside_generation_block_fails(files):
    source = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ 'Q: ' + m['content'] + '\\n' }}{% else %}"
              "{{ 'A:' }}{% generation %}{{ ' ' + m['content'] }}{% endgeneration %}{{ eos_token }}{% endif %}"
              "{% endfor %}{% if add_generation_prompt %}{{ 'A:' }}{% endif %}")
    with pytest.raises(TemplateError, match="never learn to stop"):
        get_template(source, load("bpe", files))
    wrong_end = Template("qa-im", BUILTINS["qa"].source, end_token="<|im_end|>")
    with pytest.raises(TemplateError, match="answer 1 does not end with a trained '<\\|im_end\\|>'"):
        render(CHATS["single"], load("gpt2-like", files), wrong_end)


def test_prompt_tokenized_differently_before_the_answer_fails(files):
    # "A: " + "the": GPT-2-style BPE makes one token "Ġthe" across the boundary, which the mask
    # counts as trained, while the prompt alone ends in "Ġ". Measured; so every turn is checked.
    tok = load("bpe", files)
    assert tok.convert_ids_to_tokens(tok.encode(" the")) == ["Ġthe"]
    source = BUILTINS["qa"].source.replace("'A:'", "'A: '").replace("' ' + message", "'' + message")
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the end"}]
    with pytest.raises(TemplateError, match=r"ends in \['Ġ'\], but the conversation has \['Ġthe'"):
        render(chat, tok, source)


def test_llama3_blank_line_belongs_to_the_answer():
    # Meta's split (prompt ends "<|end_header_id|>\n\n") on a GPT-2-style BPE that merges "\n\n":
    # the prompt alone ends in "ĊĊ", before an answer the regex splits it into "Ċ", "Ċ".
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(["para one\n\npara two\n\nthe end\n\n"] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")
    add_template_tokens(tok, "llama-3")
    assert tok.convert_ids_to_tokens(tok.encode("\n\n")) == ["ĊĊ"]
    chat = [{"role": "user", "content": "para"}, {"role": "assistant", "content": "the end"}]
    header = "'<|start_header_id|>assistant<|end_header_id|>'"
    meta = Template("llama-3-meta", BUILTINS["llama-3"].source.replace(header, header[:-1] + "\\n\\n'")
                    .replace("'\\n\\n' + message['content'] + '<|eot_id|>' -}}{%- endgeneration",
                             "message['content'] + '<|eot_id|>' -}}{%- endgeneration"), end_token="<|eot_id|>")
    assert render_text(chat, tok, meta) == render_text(chat, tok, "llama-3")  # same text, other split
    with pytest.raises(TemplateError, match=r"ends in \['ĊĊ'\], but the conversation has \['Ċ', 'Ċ'"):
        render(chat, tok, meta)
    assert render(chat, tok, "llama-3").trained.count(True) == len(tok.encode("\n\nthe end<|eot_id|>"))


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_foreign_sentencepiece_with_dummy_prefix_converts_exactly(model_type, tmp_path):
    import io

    import sentencepiece
    from fledge.tokenizer import load_tokenizer
    model = io.BytesIO()  # SentencePiece's defaults (Llama 2's style): dummy prefix, extra spaces removed
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter("\n".join(corpus()).splitlines()), model_writer=model, model_type=model_type,
        vocab_size=700, byte_fallback=True, hard_vocab_limit=False, minloglevel=2)
    (tmp_path / "tokenizer.model").write_bytes(model.getvalue())
    tok, ours = hf_tokenizer(tmp_path), load_tokenizer(tmp_path)
    for text in (PROBE, "  two leading spaces", "x  y  ", "a\n b"):
        assert tok.encode(text, add_special_tokens=False) == ours.encode(text)
        assert tok.decode(ours.encode(text)) == ours.decode(ours.encode(text))


@pytest.mark.parametrize("kind", ["bpe", "sentencepiece", "char"])
def test_missing_template_tokens_fail_until_added(kind, files):
    tok = load(kind, files)
    size = len(tok)
    with pytest.raises(TemplateError, match=r"needs the tokens <\|im_start\|>, <\|im_end\|>.*add_template_tokens"):
        render(CHATS["single"], tok, "chatml")
    assert add_template_tokens(tok, "chatml") == ["<|im_start|>", "<|im_end|>"]
    assert add_template_tokens(tok, "chatml") == [] and missing_template_tokens(tok, "chatml") == []
    assert len(tok) == size + 2
    assert [len(tok.encode(t, add_special_tokens=False)) for t in ("<|im_start|>", "<|im_end|>")] == [1, 1]
    assert add_template_tokens(load("gpt2-like", files), "chatml") == []  # already there
    assert add_template_tokens(tok, "qa") == []  # EOS templates need nothing


@pytest.mark.parametrize("messages, match", [
    ([{"role": "assistant", "content": "x"}], "role 'assistant' where 'user' belongs"),
    ([{"role": "user", "content": "x"}], "ends with an assistant turn; this one ends with user"),
    ([{"role": "user", "content": "x"}, {"role": "user", "content": "y"}], "message 2: role 'user'"),
    ([{"role": "user", "content": 3}], "message 1: needs a \"role\" and a string \"content\""),
    ([], "this one is empty"),
    ({"role": "user", "content": "x"}, "a conversation is a list"),
    ([{"role": "user", "content": "say <|eos|> now"}, {"role": "assistant", "content": "no"}],
     "message 1 \\(user\\) contains '<\\|eos\\|>', a control token"),
])
def test_malformed_conversations_are_data_errors(messages, match, files):
    with pytest.raises(DataError, match=match):
        render(messages, load("bpe", files), "qa")


def test_two_system_prompts_are_refused(files):
    chat = [{"role": "system", "content": "A"}, *CHATS["single"]]
    with pytest.raises(DataError, match="its own system message and a system prompt"):
        render(chat, load("bpe", files), "qa", system="B")
    assert render(chat, load("bpe", files), "qa") == render(CHATS["single"], load("bpe", files), "qa", system="A")
    with pytest.raises(DataError, match="message 2: role 'user'"):  # numbered as in the data, not after "B"
        render([CHATS["single"][0]] * 2, load("bpe", files), "qa", system="B")


def test_unknown_template_name_is_one_clear_line():
    with pytest.raises(TemplateError) as error:
        get_template("chatm")
    message = str(error.value)
    assert "\n" not in message and "did you mean 'chatml'?" in message
    assert all(name in message for name in BUILTINS) and "'base'" in message
    assert isinstance(error.value, FledgeError)


# --- generation helpers --------------------------------------------------------------------------

def test_stop_tokens_and_answer_text(files):
    tok = load("gpt2-like", files)
    assert stop_token_ids(tok, "chatml") == [tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id]
    assert stop_token_ids(tok, "qa") == [tok.eos_token_id]
    assert answer_text(" Paris.\nQ: and Spain?", "qa") == "Paris."
    assert answer_text("\n\nMadrid<|eot_id|>junk", "llama-3") == "Madrid"
    assert answer_text("Rome", "chatml") == "Rome"


# --- transformers tokenizers from fledge's, and checkpoint files -------------------------------------

@pytest.mark.parametrize("kind, pad", [("bpe", "<|bos|>"), ("sentencepiece", "<unk>"), ("char", "<unk>"),
                                       ("gpt2-like", PAD)])
def test_pad_is_never_eos(kind, pad, files):
    tok = load(kind, files)
    if kind == "gpt2-like":
        assert tok.pad_token is None and tok.unk_token == tok.eos_token  # unk cannot pad: it is EOS
        assert set_pad_token(tok) == [PAD]
    assert tok.pad_token == pad and tok.pad_token_id != tok.eos_token_id
    assert set_pad_token(tok) == []
    if kind == "bpe":  # BOS pads: no new token, so the model's embeddings keep their size
        assert tok.pad_token_id == tok.bos_token_id and PAD not in tok.get_added_vocab()


@pytest.mark.parametrize("kind", ["bpe", "sentencepiece", "char"])
def test_wrapped_ids_equal_fledge(kind, files):
    from fledge.tokenizer import load_tokenizer
    ours, tok = load_tokenizer(files[kind]), load(kind, files)
    for text in (PROBE, corpus()[0][:2000], "  leading and trailing  ", "a\n\n\nb\tc", ""):
        assert tok.encode(text, add_special_tokens=False) == ours.encode(text)
        assert tok.decode(ours.encode(text)) == ours.decode(ours.encode(text))
    assert (tok.bos_token_id, tok.eos_token_id) == (ours.bos_id, ours.eos_id)


@pytest.mark.parametrize("kind, name", [("bpe", "chatml"), ("sentencepiece", "qa"), ("char", "llama-3"),
                                        ("gpt2-like", "alpaca")])
def test_saved_files_load_with_auto_tokenizer(kind, name, files, tmp_path):
    tok = load(kind, files)
    if kind == "gpt2-like":
        with pytest.raises(TokenizerError, match="pad token is None.*Call set_pad_token"):
            save_tokenizer_files(tmp_path, tok, name)
    set_pad_token(tok)
    add_template_tokens(tok, name)
    save_tokenizer_files(tmp_path, tok, name)
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= {p.name for p in tmp_path.iterdir()}
    back = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for attribute in ("bos_token", "eos_token", "pad_token", "bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(back, attribute) == getattr(tok, attribute), attribute
    assert back.encode(PROBE, add_special_tokens=False) == tok.encode(PROBE, add_special_tokens=False)
    assert back.chat_template == BUILTINS[name].source
    chat = CHATS["three"]
    assert back.apply_chat_template(chat[:3], tokenize=False, add_generation_prompt=True) == \
        render_text(chat[:3], tok, name, add_generation_prompt=True)
    assert render(chat, back, get_template("base", back), system="S") == render(chat, tok, name, system="S")
    config = tokenizer_config(tok, name)
    assert config["chat_template"] == BUILTINS[name].source and config["pad_token"] != config["eos_token"]
    assert save_tokenizer_files(tmp_path, back, name)[0].name == "tokenizer_config.json"  # tokenizer.json unchanged
