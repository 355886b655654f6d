"""User 4's check after `fledge export`: does the q4_k_m file answer held-out questions in llama.cpp
with the same greedy tokens as the f16 file, and does the cypher validator accept its answers?
Prints one JSON line per question and the counts; exits 0 when at least one answer is both.

    fledge train recipes/finetune/cypher-export.yaml
    fledge export runs/cypher-export --format gguf --quant f16 --quant q4_k_m
    python examples/cypher_gguf.py runs/cypher-export [--rows 20]

The questions are the run's validation rows (rebuilt from its recipe exactly as training split
them), prompted through the chat template embedded in each GGUF file, as a Go program calling
llama.cpp would (llama-cpp-python's chat formatter reads `tokenizer.chat_template`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="the run folder; its export/gguf/ holds the files")
    parser.add_argument("--rows", type=int, default=20, help="validation questions asked (default 20)")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args(argv)

    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from fledge.model.bases import checkpoint_tokenizer
    from fledge.sample import checkpoint_template, read_checkpoint, resolve_checkpoint
    from fledge.train.rows import build_row_batches
    from fledge.validators import get_validator

    run = Path(args.run)
    folder = run / "export" / "gguf"
    files = {quant: next(folder.glob(f"*-{quant}.gguf")) for quant in ("f16", "q4_k_m")}
    checkpoint = resolve_checkpoint(run)
    recipe, _ = read_checkpoint(checkpoint)
    tokenizer = checkpoint_tokenizer(checkpoint)
    template = checkpoint_template(checkpoint, tokenizer)
    questions = build_row_batches(recipe, tokenizer, template, say=lambda line: None).val_records[: args.rows]
    cypher = get_validator("cypher")
    models = {q: Llama(model_path=str(f), n_ctx=512, verbose=False, logits_all=False) for q, f in files.items()}
    same = accepted = both = 0
    for record in questions:
        messages = record.messages[:-1]                 # the question, without its reference answer
        answers = {}
        for quant, llm in models.items():
            meta = llm.metadata
            formatter = Jinja2ChatFormatter(meta["tokenizer.chat_template"], eos_token="", bos_token="")
            prompt = formatter(messages=messages).prompt
            ids = llm.tokenize(prompt.encode(), add_bos=True, special=True)
            stops = {int(meta[k]) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if k in meta}
            out = []
            for token in llm.generate(ids, temp=0.0, top_k=1):
                if token in stops or len(out) >= args.max_tokens:
                    break
                out.append(token)
            answers[quant] = (out, llm.detokenize(out).decode("utf-8", "replace"))
        same += answers["f16"][0] == answers["q4_k_m"][0]
        verdict = cypher(answers["q4_k_m"][1])
        accepted += bool(verdict.ok)
        both += bool(verdict.ok) and answers["f16"][0] == answers["q4_k_m"][0]
        print(json.dumps({"question": messages[-1]["content"], "q4_k_m": answers["q4_k_m"][1],
                          "same_tokens_as_f16": answers["f16"][0] == answers["q4_k_m"][0],
                          "cypher_valid": verdict.ok}, ensure_ascii=False))
    print(f"{same}/{len(questions)} answers with the same greedy tokens as f16; "
          f"cypher validator accepted {accepted}/{len(questions)} q4_k_m answers; both: {both}")
    return 0 if both else 1


if __name__ == "__main__":
    sys.exit(main())
