"""run_lm_eval: lm-evaluation-harness scores a fledge run on local YAML tasks offline, and its numbers
are fledge's own: every choice's log-likelihood equals the sum fledge's model gives the same tokens,
so acc, acc_norm and bits per byte follow; an adapter run is merged and scores its trained answers;
bad input stops in one line before any model loads. Tiny runs from tests/unit/finetuned_runs.py.
Skipped, with that reason, where lm-eval is not installed (pip install 'fledge[lm-eval]')."""

from __future__ import annotations

import json
import math
import os
import random
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parents[1]))      # tests/unit: finetuned_runs

from finetuned_runs import A1, A2, Q1, Q2, fledge_base, finetune, messages  # noqa: E402
from fledge.errors import DataError, DependencyError, RecipeError
from fledge.evaluate.lmeval import run_lm_eval
from fledge.sample import bos_id, encode_text, load_for_inference
from fledge.templates import render

EXAMPLE = Path(__file__).parents[3] / "examples" / "lm-eval"
QA_YAML = """task: qa
dataset_path: json
dataset_kwargs:
  data_files:
    test: qa.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "Q: {{question}}\\nA:"         # the qa template's text
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
"""


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def loglikelihood(loaded, context: list[int], continuation: list[int]) -> float:
    """Σ log p(continuation | context) under the fledge model, in float64."""
    ids = context + continuation
    with torch.no_grad():
        logp = F.log_softmax(loaded.model(torch.tensor([ids]))[0][0].double(), dim=-1)
    return sum(logp[i - 1, ids[i]].item() for i in range(len(context), len(ids)))


def text_ids(loaded, text: str) -> list[int]:
    return encode_text(loaded.tokenizer, text)


def choice_lls(samples: list[dict], task: str) -> dict[int, list[float]]:
    return {s["doc_id"]: [r[0][0] for r in s["resps"]] for s in samples if s["task"] == task}


@pytest.fixture(scope="module")
def lm_eval():
    return pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'fledge[lm-eval]')")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lm-eval")


@pytest.fixture(scope="module")
def base(root) -> Path:
    return fledge_base(root)


@pytest.fixture(scope="module")
def example_run(lm_eval, base):
    """The shipped example tasks on the untrained base: (metrics, result folder, global state before and after
    (RNG, offline flags, datasets' cache folder), the lines said)."""
    import datasets.config
    from huggingface_hub import constants

    def state():
        return (torch.get_rng_state(), random.getstate(), os.environ.get("HF_HUB_OFFLINE"), constants.HF_HUB_OFFLINE,
                datasets.config.HF_DATASETS_CACHE)

    torch.manual_seed(123)
    random.seed(123)
    before = state()
    lines = []
    metrics = run_lm_eval(base, EXAMPLE, say=lines.append)
    after = state()
    return metrics, base / "eval" / "lm-eval", before, after, lines


def test_example_scores_are_fledges_own_loglikelihoods(example_run, base):
    metrics, folder, *_ = example_run
    loaded = load_for_inference(base)
    bos = bos_id(loaded.tokenizer)
    samples = read_jsonl(folder / "samples.jsonl")
    docs = read_jsonl(EXAMPLE / "cloze.jsonl")
    got = choice_lls(samples, "fledge_cloze")
    assert sorted(got) == list(range(len(docs)))
    right = right_norm = 0
    for i, doc in enumerate(docs):
        context = [bos] + text_ids(loaded, doc["context"])
        mine = [loglikelihood(loaded, context, text_ids(loaded, " " + c)) for c in doc["choices"]]
        assert got[i] == pytest.approx(mine, abs=1e-4), doc
        right += max(range(len(mine)), key=mine.__getitem__) == doc["answer"]
        per_char = [ll / len(c) for ll, c in zip(mine, doc["choices"])]     # lm-eval's acc_norm
        right_norm += max(range(len(mine)), key=per_char.__getitem__) == doc["answer"]
    assert metrics["fledge_cloze"]["acc"] == pytest.approx(right / len(docs))
    assert metrics["fledge_cloze"]["acc_norm"] == pytest.approx(right_norm / len(docs))
    assert metrics["fledge_cloze"]["samples"] == len(docs)

    rows = read_jsonl(EXAMPLE / "text.jsonl")
    total = sum(loglikelihood(loaded, [bos], text_ids(loaded, r["text"])) for r in rows)
    n_bytes = sum(len(r["text"].encode("utf-8")) for r in rows)
    assert metrics["fledge_text"]["bits_per_byte"] == pytest.approx(-total / (n_bytes * math.log(2)), rel=1e-5)
    assert metrics["fledge_text"]["byte_perplexity"] == pytest.approx(math.exp(-total / n_bytes), rel=1e-5)


def test_results_written_and_state_restored(example_run, base):
    metrics, folder, before, after, lines = example_run
    results = json.loads((folder / "results.json").read_text())
    assert results["fledge"]["tasks"] == ["fledge_cloze", "fledge_text"]
    assert Path(results["fledge"]["checkpoint"]).parent.name == "checkpoints"
    assert results["results"]["fledge_cloze"]["acc,none"] == metrics["fledge_cloze"]["acc"]
    assert "samples" not in results
    assert [s["task"] for s in read_jsonl(folder / "samples.jsonl")].count("fledge_text") == 4
    # lm-eval seeds the RNGs; offline and datasets' cache folder for the call only
    assert torch.equal(before[0], after[0]) and before[1:] == after[1:]
    assert lines[-3].startswith("fledge_cloze: acc ") and lines[-2].startswith("fledge_text: word_perplexity ")
    assert lines[-1] == f"wrote {folder / 'results.json'} and {folder / 'samples.jsonl'}"


def test_limit_and_out(lm_eval, base, tmp_path):
    metrics = run_lm_eval(base, EXAMPLE, ["fledge_cloze"], out=tmp_path / "o", limit=2, say=None)
    assert list(metrics) == ["fledge_cloze"] and metrics["fledge_cloze"]["samples"] == 2
    assert [s["doc_id"] for s in read_jsonl(tmp_path / "o" / "samples.jsonl")] == [0, 1]


@pytest.fixture(scope="module")
def tuned(lm_eval, root, base) -> dict:
    """Fine-tunes of the base on the two questions (finetuned_runs): full weights, and adapters to merge."""
    return {method: finetune(root, method, base, method=method) for method in ("full", "lora")}


@pytest.fixture(scope="module")
def qa_tasks(root) -> Path:
    """Both questions of the fine-tunes, their two answers as the choices."""
    folder = root / "qa-task"
    if not folder.is_dir():
        folder.mkdir()
        (folder / "qa.yaml").write_text(QA_YAML)
        (folder / "qa_chat.yaml").write_text(QA_YAML.replace("task: qa", "task: qa_chat")
                                             .replace('"Q: {{question}}\\nA:"', '"{{question}}"'))
        rows = [{"question": Q1, "choices": [A1, A2], "answer": 0}, {"question": Q2, "choices": [A1, A2], "answer": 1}]
        (folder / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.mark.parametrize("method", ["full", "lora"])
def test_finetune_scores_are_its_own(tuned, method, qa_tasks, tmp_path):
    """Every choice scores what the run as trained (adapters unmerged) gives it; the trained answer
    is the greedy one; the full fine-tune, confident, picks both answers (the adapters' answers are
    greedy but less likely than the shorter wrong one: acc follows the sums either way)."""
    run = tuned[method].run
    metrics = run_lm_eval(run, qa_tasks, ["qa"], out=tmp_path, say=None)
    loaded = load_for_inference(run)
    bos = bos_id(loaded.tokenizer)
    samples = {s["doc_id"]: s for s in read_jsonl(tmp_path / "samples.jsonl")}
    right = 0
    for i, q in enumerate((Q1, Q2)):
        context = [bos] + text_ids(loaded, f"Q: {q}\nA:")
        mine = [loglikelihood(loaded, context, text_ids(loaded, " " + a)) for a in (A1, A2)]
        assert [r[0][0] for r in samples[i]["resps"]] == pytest.approx(mine, abs=1e-4)
        assert [r[0][1] for r in samples[i]["resps"]] == [k == i for k in range(2)]      # is_greedy
        right += max(range(2), key=mine.__getitem__) == i
    assert metrics["qa"]["acc"] == right / 2
    if method == "full":
        assert metrics["qa"]["acc"] == 1.0


def test_chat_renders_the_template_once(tuned, qa_tasks, tmp_path):
    """chat=True: the question becomes a user turn in the run's template, BOS not doubled, and the
    choice follows the generation prompt with no delimiter (lm-eval's way)."""
    run = tuned["full"].run
    run_lm_eval(run, qa_tasks, ["qa_chat"], out=tmp_path, chat=True, say=None)
    loaded = load_for_inference(run)
    first = read_jsonl(tmp_path / "samples.jsonl")[0]
    context = render(messages(Q1), loaded.tokenizer, loaded.template, add_generation_prompt=True)
    assert first["arguments"][0] == [loaded.tokenizer.decode(context.input_ids), A1]
    mine = loglikelihood(loaded, context.input_ids, text_ids(loaded, A1))
    assert first["resps"][0][0][0] == pytest.approx(mine, abs=1e-4)


# --- errors ----------------------------------------------------------------------------------

def test_missing_lm_eval_names_the_extra(monkeypatch, base):
    monkeypatch.setitem(sys.modules, "lm_eval", None)          # import lm_eval raises ImportError
    with pytest.raises(DependencyError, match=r"pip install 'fledge\[lm-eval\]'"):
        run_lm_eval(base, EXAMPLE)


def test_task_folder_problems_before_any_model(lm_eval, tmp_path):
    run = tmp_path / "no-run"                  # never reached: each error comes first
    with pytest.raises(RecipeError, match="no such folder of lm-eval tasks"):
        run_lm_eval(run, tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RecipeError, match="no lm-eval task found; it holds no .yaml file"):
        run_lm_eval(run, tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.yaml").write_text("dataset_path: json\n")
    with pytest.raises(RecipeError, match=r"its YAML files \(x.yaml\) define none"):
        run_lm_eval(run, tmp_path / "bad")
    with pytest.raises(RecipeError, match="no lm-eval task named 'clozee'; it has fledge_cloze, fledge_text"):
        run_lm_eval(run, EXAMPLE, ["clozee"])
    with pytest.raises(RecipeError, match="limit must be"):
        run_lm_eval(run, EXAMPLE, limit=0)


HUB_YAML = QA_YAML.replace("dataset_path: json", "dataset_path: EleutherAI/wikitext_document_level")


@pytest.mark.parametrize("yaml, expected", [
    (QA_YAML, r"FileNotFoundError: .*qa\.jsonl"),                                 # the data file is missing
    (HUB_YAML, r"ConnectionError: Couldn't reach 'EleutherAI/wikitext_document_level' .*Offline"),  # no download
])
def test_lm_eval_failure_is_one_line(lm_eval, base, tmp_path, yaml, expected):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "qa.yaml").write_text(yaml)
    with pytest.raises(DataError, match=r"lm-eval stopped on task qa: " + expected) as e:
        run_lm_eval(base, tmp_path / "t", out=tmp_path / "o", say=None)
    assert "\n" not in str(e.value)


def test_cli_runs_a_task_and_refuses_mixed_flags(lm_eval, base, tmp_path, capsys):
    """`fledge eval RUN --lm-eval DIR --task T --limit N --json` prints run_lm_eval's numbers; flags of the
    other modes are refused in one line, and lm-eval's flags without --lm-eval too."""
    from fledge.cli import main
    out = tmp_path / "cli"
    code = main(["eval", str(base), "--lm-eval", str(EXAMPLE), "--task", "fledge_cloze", "--limit", "2",
                 "-o", str(out), "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert code == 0 and printed["fledge_cloze"]["samples"] == 2
    assert printed == run_lm_eval(base, EXAMPLE, ["fledge_cloze"], out=tmp_path / "api", limit=2, say=None)
    assert main(["eval", str(base), "--lm-eval", str(EXAMPLE), "--data", "x.jsonl"]) == 2
    assert "--data does not apply with --lm-eval" in capsys.readouterr().err
    assert main(["eval", str(base), "--task", "fledge_cloze"]) == 2
    assert "--task only applies with --lm-eval" in capsys.readouterr().err
