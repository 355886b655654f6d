"""`fledge export` through the real CLI, on runs the CLI trained: a tiny fledge pretraining run (bpe) and
LoRA fine-tunes (chatml) of briefly trained tiny transformers llama, qwen2 and gpt2 models, merged by
the export. q8_0 and q4_k_m load with their perplexity ratio; a K-quant on misaligned rows names its
fallbacks. The transformers folder loads
offline and gives the run's logits (compared here, independently of export's own check) and the run's
chat prompt; the f32 GGUF verifies in llama.cpp on the run's validation data, with a Modelfile beside
it. Bad input (an unknown quantization or format, a run without a checkpoint, an architecture
llama.cpp cannot load) is one error line and a non-zero exit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO

sys.path.insert(0, str(REPO / "tests" / "unit" / "export"))

from tiny_exports import tokenizer as chatml_tokenizer, transformers_model  # noqa: E402

pytestmark = pytest.mark.slow
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}
ANIMALS = ("fox", "wren", "otter", "heron", "lynx", "moth", "newt")
CHAT = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "How many stones did the fox see?"},
        {"role": "assistant", "content": "The fox saw 3 stones."}, {"role": "user", "content": "And the wren?"}]


def fledge(work: Path, *args, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fledge", *map(str, args)], cwd=work, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in message, message


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A working folder with runs/base (fledge, bpe, 40 steps) and runs/lora (LoRA on hf-llama, 20 steps),
    both trained by `fledge train`."""
    work = tmp_path_factory.mktemp("export")
    lines = [f"The {ANIMALS[i % 7]} saw {i % 13} stones by the river and counted {(i * 7) % 31} ripples.\n"
             for i in range(600)]
    (work / "corpus.txt").write_text("".join(lines))
    (work / "base.yaml").write_text(
        "name: base\ndata:\n  sources: [corpus.txt]\n  val_fraction: 0.1\ntokenizer:\n  kind: bpe\n  vocab_size: 320\n"
        "model:\n  n_layers: 2\n  n_heads: 2\n  dim: 64\n  max_seq_len: 128\n"
        "train:\n  max_steps: 40\n  batch_size: 8\n  block_size: 64\n  lr: 3.0e-3\n  warmup_steps: 5\n"
        "  eval_every: 20\n  eval_batches: 2\n  threads: 1\n  device: cpu\n  precision: fp32\n")
    done = fledge(work, "train", "base.yaml", "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [{"messages": [{"role": "user", "content": f"How many stones did the {ANIMALS[i % 7]} see?"},
                          {"role": "assistant", "content": f"The {ANIMALS[i % 7]} saw {i % 13} stones."}]}
            for i in range(40)]
    (work / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name, family in LORA_RUNS.items():
        torch.manual_seed(0)
        base = transformers_model(work, family)       # 256 wide, bpe with chatml's tokens, trained briefly
        (work / f"{name}.yaml").write_text(
            f"name: {name}\nmodel:\n  base: {base.name}\ndata:\n  rows: [{{path: rows.jsonl, format: chat}}]\n"
            "  val_fraction: 0.2\ntemplate:\n  name: chatml\n  system: Answer briefly.\nfinetune:\n  method: lora\n"
            "train:\n  max_steps: 20\n  batch_size: 4\n  block_size: 128\n  lr: 3.0e-3\n  warmup_steps: 2\n"
            "  eval_every: 10\n  eval_batches: 2\n  threads: 1\n  device: cpu\n  precision: fp32\n"
            "sample:\n  prompts: []\n  temperature: 0.0\n  max_new_tokens: 20\n")
        done = fledge(work, "train", f"{name}.yaml", "--quiet")
        assert done.returncode == 0, done.stderr[-3000:]
    return work


# LoRA fine-tunes of briefly trained tiny transformers models (256 wide), merged by the export.
LORA_RUNS = {"lora": "llama", "lora-qwen2": "qwen2", "lora-gpt2": "gpt2"}


@pytest.mark.parametrize("run", ["base", "lora"])
def test_the_transformers_folder_reloads_with_the_runs_logits_ids_and_prompt(work, run, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fledge.sample import encode_prompt, load_for_inference, prompt_ids
    done = fledge(work, "export", f"runs/{run}", "--format", "hf")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "hf: AutoModelForCausalLM logits vs the checkpoint" in done.stdout
    assert f"wrote runs/{run}/export/hf" in done.stdout
    folder = work / "runs" / run / "export" / "hf"
    monkeypatch.chdir(work)                       # the LoRA run's base is named relative to it
    loaded = load_for_inference(f"runs/{run}")
    theirs = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    text = "The heron saw 9 stones by the river and counted 2 ripples."
    ids = encode_prompt(loaded.tokenizer, text)
    assert [tok.bos_token_id] + tok.encode(text, add_special_tokens=False) == ids
    if loaded.template is not None:
        prompt = prompt_ids(loaded.tokenizer, CHAT, loaded.template)
        assert tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False) == \
            loaded.tokenizer.decode(prompt, skip_special_tokens=False)
        ids = prompt
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=torch.tensor([ids])).logits[0],
                                   loaded.model(torch.tensor([ids]))[0][0].float(), atol=1e-4, rtol=1e-4)
    record = json.loads((folder / "export.json").read_text())
    assert record["hf_check"]["max_logit_diff"] <= record["hf_check"]["tolerance"]
    assert "validation" in record["held_out"]


@pytest.mark.parametrize("run", ["base", *LORA_RUNS])
def test_the_f32_gguf_verifies_in_llama_cpp_with_a_modelfile_beside(work, run):
    pytest.importorskip("llama_cpp")
    done = fledge(work, "export", f"runs/{run}", "--format", "gguf", "--quant", "f32")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "f32: teacher-forced argmax agreement 100.00%" in done.stdout
    folder = work / "runs" / run / "export" / "gguf"
    assert (folder / f"{run}-f32.gguf").is_file() and not (folder / f"{run}-f32.unverified.gguf").exists()
    modelfile = (folder / f"{run}-f32.Modelfile").read_text()
    assert f"FROM ./{run}-f32.gguf" in modelfile and "TEMPLATE" in modelfile
    record = json.loads((folder / "export.json").read_text())
    (check,) = record["verification"]
    assert check["problems"] == [] and check["first_logit_diff"] < 5e-3 and check["argmax_agreement"] == 1.0
    assert check["tokenization_samples"] >= 8
    assert "validation" in record["held_out"]
    if run in LORA_RUNS:
        assert check["chat"]["Jinja (llama-cpp-python, llama-server --jinja)"] == "equal"
        assert 'SYSTEM "Answer briefly."' in modelfile and "PARAMETER stop <|im_end|>" in modelfile


def test_quantized_files_load_and_report_their_perplexity_ratio_and_fallbacks(work):
    """q8_0 and q4_k_m of the 256-wide LoRA run load in llama.cpp with a perplexity ratio against f16 and
    no fallback; the 64-wide fledge run's q4_k_m is written, but each matrix llama.cpp could not make
    Q4_K is named, never silently labelled Q4_K_M."""
    pytest.importorskip("llama_cpp")
    done = fledge(work, "export", "runs/lora", "--format", "gguf", "--quant", "q8_0", "--quant", "q4_k_m",
                  "-o", "quant-lora")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads((work / "quant-lora" / "export.json").read_text())
    checks = {c["quant"]: c for c in record["verification"]}
    assert set(checks) == {"q8_0", "q4_k_m"}
    for quant, check in checks.items():
        assert check["problems"] == [], (quant, check["problems"])
        assert check["f16_perplexity"] and 0.9 < check["perplexity_ratio"] < 1.1 and check["argmax_agreement"] > 0.8
    assert "fell back" not in done.stdout
    done = fledge(work, "export", "runs/base", "--format", "gguf", "--quant", "q4_k_m", "-o", "quant-base")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "not Q4_K_M although the file is labelled Q4_K_M" in done.stdout
    assert "rows of 64 are not a multiple of 256" in done.stdout
    (result,) = json.loads((work / "quant-base" / "export.json").read_text())["gguf"]
    assert result["fallbacks"] and all("instead of" in line for line in result["fallbacks"])


def test_bad_input_is_one_line(work, tmp_path):
    assert_one_line_error(fledge(work, "export", "runs/base", "--format", "gguf", "--quant", "q4_k_n"),
                          "unknown quantization 'q4_k_n' (did you mean q4_k_m?)", "f32, f16, bf16, q8_0")
    assert_one_line_error(fledge(work, "export", "runs/base", "--format", "onnx"), "unknown export format 'onnx'")
    assert_one_line_error(fledge(work, "export", "runs/base", "--format", "hf", "--quant", "f16"),
                          "--quant applies to --format gguf")
    (work / "runs" / "empty").mkdir(exist_ok=True)
    assert_one_line_error(fledge(work, "export", "runs/empty", "--format", "gguf"), "runs/empty: no checkpoint found")
    (work / "taken").mkdir(exist_ok=True)
    (work / "taken" / "notes.txt").write_text("mine")
    assert_one_line_error(fledge(work, "export", "runs/base", "--format", "hf", "-o", "taken"),
                          "taken exists and fledge did not export into it")


def test_an_architecture_llama_cpp_cannot_load_is_one_line(work):
    from transformers import AutoConfig, AutoModelForCausalLM

    from fledge.export.hf import write_transformers_files
    tok, _ = chatml_tokenizer(work, "bpe")
    folder = work / "hf-neox"
    config = AutoConfig.for_model("gpt_neox", vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=128,
                                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    write_transformers_files(folder, hf_config=None, tokenizer=tok, template="chatml")
    (work / "neox.yaml").write_text(
        "name: neox\nmodel:\n  base: hf-neox\ndata:\n  rows: [{path: rows.jsonl, format: chat}]\n  val_fraction: 0.2\n"
        "template:\n  name: chatml\nfinetune:\n  method: full\ntrain:\n  max_steps: 1\n  batch_size: 2\n"
        "  block_size: 128\n  warmup_steps: 0\n  threads: 1\n  device: cpu\n  precision: fp32\nsample:\n  prompts: []\n")
    done = fledge(work, "train", "neox.yaml", "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_one_line_error(fledge(work, "export", "runs/neox", "--format", "gguf", "--quant", "q8_0"),
                          "GGUF export does not support model_type 'gpt_neox'", "--format hf")
