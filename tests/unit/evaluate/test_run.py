"""fledge eval RUN: loss, perplexity and bits per byte equal the same sums by hand (answer tokens
only), generation is deterministic and the same in batches as one at a time, every row is written,
a fine-tune beats its base with a p-value, targets, and bad input in one line each. Tiny runs from
tests/unit/finetuned_runs.py: a char-tokenized GPT base and full fine-tunes of it in the qa template."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parents[1]))      # tests/unit: finetuned_runs

import finetuned_runs  # noqa: E402
from finetuned_runs import A1, A2, Q1, Q2, fledge_base, finetune, messages
from fledge.cli import main
from fledge.evaluate.run import Decoding, Subject, encode_rows, evaluate_run, generate_answers, same_tokens
from fledge.evaluate.score import read_data
from fledge.recipe import SampleConfig
from fledge.sample import generate_from, load_for_inference
from fledge.templates import render

PROMPTS = [Q1, Q2, "Be brief.", "Who are you? Answer:", "a ring", "What is it?"]   # five lengths


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("eval-run")


@pytest.fixture(scope="module")
def base(root) -> Path:
    return fledge_base(root)


@pytest.fixture(scope="module")
def tuned(root, base):
    """A full fine-tune of `base` that answers Q1 with A1 and Q2 with A2 (qa template)."""
    return finetune(root, "tuned", base)


@pytest.fixture(scope="module")
def json_tuned(root, base):
    """A fine-tune of the same base whose answers are JSON ("true", "null"): the json validator's case."""
    saved = finetuned_runs.CONVERSATIONS
    finetuned_runs.CONVERSATIONS = [[Q1, "true"], [Q2, "null"], [Q1, "true", Q2, "null"]]
    try:
        return finetune(root, "json-tuned", base)
    finally:
        finetuned_runs.CONVERSATIONS = saved


@pytest.fixture(scope="module")
def data(root) -> Path:
    """Pairs, a two-turn chat (two answers scored) and a text row (loss only, no prompt)."""
    return write_jsonl(root / "val.jsonl", [
        {"input": Q1, "output": A1}, {"input": Q2, "output": A2},
        {"messages": messages(Q1, A1, Q2, A2)}, {"text": "Be brief. Answer: xyz"}])


def by_hand(model, tokenizer, template, record_messages) -> tuple[float, int, int]:
    """(summed loss, tokens, all-token count) of one rendered row, counting the tokens `render` trains."""
    r = render(record_messages, tokenizer, template)
    ids = torch.tensor([r.input_ids])
    with torch.no_grad():
        logp = F.log_softmax(model(ids)[0][0].double(), dim=-1)
    total, count = 0.0, 0
    for t in range(len(r.input_ids) - 1):
        if r.trained[t + 1]:
            total -= float(logp[t, r.input_ids[t + 1]])
            count += 1
    return total, count, len(r.input_ids) - 1


# --- loss, perplexity, bits per byte ---------------------------------------------------------------

def test_perplexity_is_exp_of_the_mean_answer_token_loss_by_hand(tuned, data, tmp_path):
    result = evaluate_run(tuned.run, data, generate=False, progress=False, out_dir=tmp_path / "o")
    loaded = load_for_inference(tuned.run)
    rows = [messages(Q1, A1), messages(Q2, A2), messages(Q1, A1, Q2, A2)]
    sums = [by_hand(loaded.model, loaded.tokenizer, loaded.template, m) for m in rows]
    total, count = sum(s[0] for s in sums), sum(s[1] for s in sums)
    # answer tokens only: each answer's lead (" "), its characters and EOS; never the prompt.
    assert [s[1] for s in sums] == [len(A1) + 2, len(A2) + 2, len(A1) + len(A2) + 4]
    assert all(s[1] < s[2] for s in sums)
    text = "Be brief. Answer: xyz"           # a text row: every token after BOS, EOS included
    with torch.no_grad():
        ids = [loaded.tokenizer.bos_token_id, *loaded.tokenizer.encode(text, add_special_tokens=False),
               loaded.tokenizer.eos_token_id]
        logp = F.log_softmax(loaded.model(torch.tensor([ids]))[0][0].double(), dim=-1)
    total += -sum(float(logp[t, ids[t + 1]]) for t in range(len(ids) - 1))
    count += len(text) + 1
    loss = result.metrics["loss"]
    assert loss["tokens"] == count and loss["n"] == 4
    assert loss["value"] == pytest.approx(total / count, rel=1e-6)
    assert result.metrics["ppl"]["value"] == pytest.approx(math.exp(total / count), rel=1e-6)
    assert loss["lo"] <= loss["value"] <= loss["hi"]
    assert "loss: answer tokens only" in result.format()


def test_masked_prompt_tokens_do_not_count(tuned, root, tmp_path):
    """The same answers after prompts of very different lengths: the same token count, and each
    row's loss is the sum over its answer positions only."""
    short = write_jsonl(root / "short.jsonl", [{"input": "Q", "output": A1}])
    long = write_jsonl(root / "long.jsonl", [{"input": "Who are you? " * 6 + Q1, "output": A1}])
    a = evaluate_run(tuned.run, short, generate=False, progress=False, out_dir=tmp_path / "a")
    b = evaluate_run(tuned.run, long, generate=False, progress=False, out_dir=tmp_path / "b")
    assert a.metrics["loss"]["tokens"] == b.metrics["loss"]["tokens"] == len(A1) + 2
    loaded = load_for_inference(tuned.run)
    total, count, _ = by_hand(loaded.model, loaded.tokenizer, loaded.template, messages("Who are you? " * 6 + Q1, A1))
    assert b.rows[0]["loss"] == {"loss": pytest.approx(total / count, rel=1e-6), "tokens": count,
                                 "bytes": len(A1)}


def test_bits_per_byte_is_loss_times_tokens_over_bytes_ln2(tuned, base, data, tmp_path):
    text = len("Be brief. Answer: xyz")
    # The fine-tune scores both answers of the chat row, the pretraining run its last (plain text).
    for run, answers in ((tuned.run, 2 * len(A1) + 2 * len(A2) + text), (base, len(A1) + 2 * len(A2) + text)):
        result = evaluate_run(run, data, generate=False, progress=False, out_dir=tmp_path / run.name)
        loss, bpb = result.metrics["loss"], result.metrics["bpb"]
        assert bpb["bytes"] == answers
        assert bpb["value"] == pytest.approx(loss["value"] * loss["tokens"] / (bpb["bytes"] * math.log(2)),
                                             rel=1e-9)


def test_a_pretraining_run_scores_answers_after_plain_prompts_and_whole_texts(base, data, tmp_path):
    result = evaluate_run(base, data, generate=False, progress=False, out_dir=tmp_path / "o")
    rows = result.rows
    # Q1 + A1 as plain text: A1's characters and EOS are scored (no lead, no template).
    assert [r["loss"]["tokens"] for r in rows] == [len(A1) + 1, len(A2) + 1, len(A2) + 1,
                                                   len("Be brief. Answer: xyz") + 1]
    assert result.settings["template"] is None and "no template" in result.about[0]


# --- generation ------------------------------------------------------------------------------------

def test_greedy_batches_equal_one_prompt_at_a_time_and_sampling_is_seeded(tuned, root):
    """Equal-length prompts share batches and the answers do not change; they are `fledge sample`'s."""
    subject = Subject.of(load_for_inference(tuned.run), "tuned")
    records = read_data(write_jsonl(root / "prompts.jsonl", [{"input": p, "output": "x"} for p in PROMPTS * 3]))
    prompts = [e.prompt for e in encode_rows(subject, records)]
    assert len({len(p) for p in prompts}) < len(prompts)          # some batches hold several prompts
    one = generate_answers(subject, prompts, Decoding(20, 0.0, 0, 1))
    batched = generate_answers(subject, prompts, Decoding(20, 0.0, 0, 16))
    assert batched == one and one[:2] == [A1, A2] and len(set(one)) > 2
    assert [generate_from(subject.loaded, p, SampleConfig(max_new_tokens=20, temperature=0.0))[0]
            for p in PROMPTS] == one[:len(PROMPTS)]
    sampled = [generate_answers(subject, prompts, Decoding(20, 2.0, seed, 4)) for seed in (3, 3, 4)]
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2]


def test_every_row_is_written_with_its_generation_verdicts_and_loss(tuned, data):
    result = evaluate_run(tuned.run, data, validators=["json"], progress=False)
    folder = tuned.run / "eval" / "val"
    assert result.rows_file == str(folder / "rows.jsonl")
    rows = read_rows(folder / "rows.jsonl")
    assert [r["row"] for r in rows] == [1, 2, 3, 4]
    assert [r["generation"] for r in rows] == [A1, A2, A2, None]           # greedy: the trained answers
    assert rows[0]["exact_match"] is True and rows[0]["validators"]["json"]["ok"] is False
    assert "validators" not in rows[3] and rows[3]["loss"]["tokens"] > 0  # a text row: loss only
    assert all(r["loss"]["loss"] > 0 for r in rows)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["metrics"]["exact_match"]["k"] == 3 and summary["metrics"]["exact_match"]["n"] == 3
    assert {n: m["title"] for n, m in summary["metrics"].items()} == {
        "loss": "loss (nats/token)", "ppl": "perplexity", "bpb": "bits per byte", "exact_match": "exact match",
        "normalized_match": "normalized match", "json": "json validity"}
    assert summary["settings"]["temperature"] == 0.0 and summary["settings"]["template"] == "qa"


# --- against a baseline ----------------------------------------------------------------------------

def test_a_fine_tune_beats_its_base_on_json_validity_with_a_p_value(json_tuned, base, root, capsys):
    data = write_jsonl(root / "json-val.jsonl", [{"input": q, "output": a} for q, a in [(Q1, "true"),
                                                                                     (Q2, "null")] * 6])
    code = main(["eval", str(json_tuned.run), "--data", str(data), "--baseline", str(base), "--validate", "json",
                 "--resamples", "2000"])
    out = capsys.readouterr().out
    assert code == 0
    summary = json.loads((json_tuned.run / "eval" / "json-val" / "summary.json").read_text())
    assert summary["names"] == ["json-tuned", "base"]
    assert (summary["metrics"]["json"]["k"], summary["baseline_metrics"]["json"]["k"]) == (12, 0)
    by_metric = {c["metric"]: c for c in summary["comparisons"]}
    assert set(by_metric) == {"loss", "ppl", "bpb", "exact_match", "normalized_match", "json"}
    assert by_metric["json"]["p_value"] == pytest.approx(2 / 2 ** 12)
    assert by_metric["json"]["sentence"] == "json-tuned is better on json validity: 12/12 vs 0/12, p < 0.001"
    loss = by_metric["loss"]
    assert loss["diff"] == pytest.approx(loss["tuned"] - loss["baseline"]) and loss["lo"] <= loss["diff"] <= loss["hi"]
    assert loss["diff"] < 0 and loss["sentence"].startswith("json-tuned is better on loss")
    assert "it is prompted with json-tuned's template 'qa', so both see the same prompts" in out
    assert "json-tuned is better on json validity: 12/12 vs 0/12, p < 0.001" in out


def test_other_tokenizers_compare_bits_per_byte_not_loss_per_token(tuned, root, data, tmp_path):
    saved = finetuned_runs.CORPUS
    finetuned_runs.CORPUS = saved + "0123456789"         # other characters: other ids for most letters
    try:
        other = fledge_base(root, "other-base")
    finally:
        finetuned_runs.CORPUS = saved
    result = evaluate_run(tuned.run, data, baseline=other, progress=False, out_dir=tmp_path / "o", resamples=500)
    by_metric = {c["metric"]: c for c in result.comparisons}
    assert by_metric["loss"]["diff"] is None and by_metric["ppl"]["diff"] is None
    assert "not compared" in by_metric["loss"]["sentence"] and "compare bits per byte" in by_metric["loss"]["sentence"]
    assert by_metric["bpb"]["diff"] is not None
    assert "bits per byte is the comparison" in result.format()
    same = encode_rows(Subject.of(load_for_inference(tuned.run), "t"), read_data(data))
    assert same_tokens(same, same)


def test_a_baseline_file_of_fixed_outputs(tuned, data, root, tmp_path):
    outputs = write_jsonl(root / "fixed.jsonl", [{"generation": g} for g in [A1, "no", "no", "unused"]])
    result = evaluate_run(tuned.run, data, baseline=outputs, progress=False, out_dir=tmp_path / "o", resamples=500)
    assert result.baseline_metrics["exact_match"]["k"] == 1 and "loss" not in result.baseline_metrics
    assert [c["metric"] for c in result.comparisons] == ["exact_match", "normalized_match"]
    assert result.rows[3]["baseline"]["generation"] is None                 # the text row generates nothing


# --- targets ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("factor, code, verdict", [(1.5, 0, "met"), (0.5, 3, "MISSED")])
def test_perplexity_targets_met_or_missed(tuned, data, capsys, factor, code, verdict):
    loaded_ppl = evaluate_run(tuned.run, data, generate=False, progress=False,
                              label="probe").metrics["ppl"]["value"]
    target = round(loaded_ppl * factor, 3)
    assert main(["eval", str(tuned.run), "--data", str(data), "--no-generate", "--target", f"ppl={target}",
                 "--target", "bpb=100", "--label", f"ppl-{verdict}"]) == code
    out = capsys.readouterr().out
    assert f"perplexity         {loaded_ppl:.3f} <= {target:.3f}: {verdict}" in out
    summary = json.loads((tuned.run / "eval" / f"ppl-{verdict}" / "summary.json").read_text())
    assert summary["targets"]["ppl"]["direction"] == "lower" and summary["targets"]["bpb"]["met"] is True


# --- bad input: one line each ---------------------------------------------------------------------

def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_a_run_without_a_checkpoint_is_one_line(tmp_path, data, capsys):
    (tmp_path / "runs" / "empty").mkdir(parents=True)
    assert main(["eval", str(tmp_path / "runs" / "empty"), "--data", str(data)]) == 1
    assert "no checkpoint found" in one_line(capsys)


def test_a_data_file_without_answer_tokens_is_one_line(tuned, root, capsys):
    empty = write_jsonl(root / "empty-answers.jsonl", [{"input": Q1, "output": ""}, {"input": Q2, "output": ""}])
    assert main(["eval", str(tuned.run), "--data", str(empty)]) == 1
    err = one_line(capsys)
    assert f"{empty}: no row has answer tokens to score for tuned (2 with empty answers, of 2)" in err


@pytest.mark.parametrize("flags, code, fragment", [
    (["--validate", "nosuch"], 2, "nosuch"),
    (["--validate", "json", "--no-generate"], 2, "--no-generate makes none"),
    (["--target", "ppl=0"], 2, "perplexity is a positive number"),
    (["--label", "../x"], 2, "a label names a folder"),
    (["--batch-size", "0"], 2, "--batch-size 0: give at least 1"),
])
def test_bad_options_are_one_line_before_anything_loads(tuned, data, capsys, flags, code, fragment):
    assert main(["eval", str(tuned.run), "--data", str(data), "--label", "bad", *flags]) == code
    assert fragment in one_line(capsys)
    assert not (tuned.run / "eval" / "bad").exists()


def test_run_only_flags_with_outputs_and_a_transformers_baseline_are_one_line(tuned, data, root, capsys):
    outputs = write_jsonl(root / "o.jsonl", [{"generation": "x"}] * 4)
    assert main(["eval", "--data", str(data), "--outputs", str(outputs), "--temperature", "0.7"]) == 2
    assert "--temperature applies when a RUN generates" in one_line(capsys)
    hf = root / "hf-folder"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert main(["eval", str(tuned.run), "--data", str(data), "--baseline", str(hf)]) == 1
    assert "is a transformers model folder" in one_line(capsys)


# --- the loss of rows ------------------------------------------------------------------------------

def test_row_losses_are_the_same_batched_padded_or_through_an_own_forward(tuned):
    """Right padding changes nothing for the real tokens; a model with only forward(idx, targets) -> mean
    gets the same sums one row at a time."""
    from fledge.evaluate.loss import row_losses
    model = load_for_inference(tuned.run).model
    rows = []
    for turns in ([Q1, A1], [Q2, A2], [Q1, A1, Q2, A2]):
        r = render(messages(*turns), tuned.tokenizer, tuned.template)
        rows.append((r.input_ids, [x if t else -100 for x, t in zip(r.input_ids[1:], r.trained[1:])] + [-100]))
    one = row_losses(model, rows, batch_size=1)
    together = row_losses(model, rows, batch_size=3)
    assert [n for _, n in one] == [n for _, n in together] == [len(A1) + 2, len(A2) + 2, len(A1) + len(A2) + 4]
    assert [s for s, _ in together] == pytest.approx([s for s, _ in one], rel=1e-5)

    class OwnForward(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, idx, targets=None):
            logits = self.inner(idx)[0]
            return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)

    assert [s for s, _ in row_losses(OwnForward(model), rows, batch_size=3)] == \
        pytest.approx([s for s, _ in one], rel=1e-5)


def test_rows_longer_than_the_window_are_left_out_with_a_note(root, tmp_path):
    short = fledge_base(root, "short-window", max_seq_len=32)
    data = write_jsonl(root / "lengths.jsonl", [{"text": "a ring."}, {"text": "Who are you? " * 3}])
    result = evaluate_run(short, data, generate=False, progress=False, out_dir=tmp_path / "o")
    assert result.metrics["loss"]["n"] == 1 and result.metrics["loss"]["unjudged"] == 1
    assert result.rows[1]["loss"] is None
    assert "short-window: 1 row left out of loss, perplexity and bits per byte (1 longer than the model's " \
           "32-token window)" in result.format()


def test_a_base_without_the_template_tokens_is_the_base_as_fine_tuning_started(base, root, tmp_path, capsys):
    """A chatml fine-tune of a char base added <|im_start|>/<|im_end|>: the base is prompted with the run's
    tokenizer, the added rows at the mean embedding (as fine-tuning initialises them); its loss is that
    model's by hand, and the output says so."""
    from fledge.model.adapters import resize_vocab
    chat = finetune(root, "chatml-tuned", base, method="lora", template="chatml", steps=20)
    data = write_jsonl(root / "chat-val.jsonl", [{"input": Q1, "output": A1}, {"input": Q2, "output": A2}])
    result = evaluate_run(chat.run, data, baseline=base, generate=False, progress=False, out_dir=tmp_path / "o")
    started = load_for_inference(base).model
    resize_vocab(started, len(chat.tokenizer))
    sums = [by_hand(started, chat.tokenizer, chat.template, messages(q, a)) for q, a in ((Q1, A1), (Q2, A2))]
    expected = sum(s[0] for s in sums) / sum(s[1] for s in sums)
    summary = result.to_dict()
    assert summary["baseline_metrics"]["loss"]["value"] == pytest.approx(expected, rel=1e-5)
    assert any("so it is the base as the fine-tune started" in line for line in result.about)
    assert summary["comparisons"] and result.format().count("as the fine-tune started") == 1
