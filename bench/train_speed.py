"""Training-step speed: fledge's model against a minimal reference GPT, timed in the same run.

    python bench/train_speed.py                      # both sizes, every fledge variant
    python bench/train_speed.py --sizes small --steps 60

The reference is nanoGPT's model reduced to its essentials (LayerNorm without bias, fused
qkv, PyTorch's SDPA, GELU MLP of 4x width, learned positions, tied head), trained in fp32
eager mode as nanoGPT does on CPU. fledge's model is timed as `fledge train` runs it: the
same optimizer (fused AdamW, decoupled weight decay groups), clipping and loss. Variants
alternate with the reference in rounds, and ratios use the medians, so a noisy neighbour
hurts both sides alike. Results go in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from fledge.model.gpt import GPT, GPTConfig
from fledge.recipe import load_recipe
from fledge.train.loop import make_optimizer

SIZES = {  # name: (layers, heads, width, block, batch)
    "small": (4, 4, 128, 64, 12),     # nanoGPT's shakespeare-char CPU settings
    "medium": (6, 6, 384, 256, 8),
}
VOCAB = 65


class RefBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(dim, bias=False)
        self.c_attn = nn.Linear(dim, 3 * dim, bias=False)
        self.c_proj = nn.Linear(dim, dim, bias=False)
        self.ln_2 = nn.LayerNorm(dim, bias=False)
        self.c_fc = nn.Linear(dim, 4 * dim, bias=False)
        self.mlp_proj = nn.Linear(4 * dim, dim, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.c_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class RefGPT(nn.Module):
    def __init__(self, layers: int, heads: int, dim: int, block: int):
        super().__init__()
        self.wte = nn.Embedding(VOCAB, dim)
        self.wpe = nn.Embedding(block, dim)
        self.blocks = nn.ModuleList(RefBlock(dim, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim, bias=False)
        self.head = nn.Linear(dim, VOCAB, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        return logits, F.cross_entropy(logits.view(-1, VOCAB), targets.view(-1))


class TransformersLlama(nn.Module):
    """transformers' LlamaForCausalLM at the same shape, as the alternative to fledge's module."""

    def __init__(self, like: GPT):
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM
        from fledge.model.gpt import to_hf_config
        self.llama = LlamaForCausalLM(LlamaConfig(**to_hf_config(like.config), attn_implementation="sdpa"))

    def forward(self, idx, targets):
        out = self.llama(input_ids=idx, labels=None)
        logits = out.logits
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1))


def make_step(model, optimizer, batch, block, bf16: bool):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, VOCAB, (batch, block), generator=g)
    y = torch.randint(0, VOCAB, (batch, block), generator=g)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def build(variant: str, size: str):
    layers, heads, dim, block, batch = SIZES[size]
    torch.manual_seed(0)
    t = load_recipe(None, base={"train": {"lr": 1e-3}}).train
    if variant == "reference":
        model = RefGPT(layers, heads, dim, block)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
        return make_step(model, optimizer, batch, block, False)
    model = GPT(GPTConfig(vocab_size=VOCAB, n_layers=layers, n_heads=heads, dim=dim, max_seq_len=block))
    if variant.startswith("transformers"):
        model = TransformersLlama(model)
    optimizer = make_optimizer(model, t, torch.device("cpu"))
    if "compile" in variant:
        model = torch.compile(model)
    return make_step(model, optimizer, batch, block, "bf16" in variant)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="small,medium")
    parser.add_argument("--variants", default="fp32,bf16,bf16-compile,transformers-fp32,transformers-bf16",
                        help="fledge variants (fp32, bf16, bf16-compile) and transformers-fp32/-bf16")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {torch.backends.cpu.get_cpu_capability()}")
    for size in args.sizes.split(","):
        layers, heads, dim, block, batch = SIZES[size]
        names = ["reference"] + [v if v.startswith("transformers") else f"fledge-{v}"
                                 for v in args.variants.split(",")]
        steps = {name: build(name, size) for name in names}
        for name, step in steps.items():      # warm-up, compilation included
            start = time.perf_counter()
            for _ in range(5):
                step()
            print(f"  warm-up {name}: {time.perf_counter() - start:.1f}s")
        times: dict[str, list[float]] = {name: [] for name in names}
        for _ in range(args.rounds):
            for name, step in steps.items():
                start = time.perf_counter()
                for _ in range(args.steps):
                    step()
                times[name].append((time.perf_counter() - start) / args.steps)
        tokens = batch * block
        ref = statistics.median(times["reference"])
        print(f"\n{size}: {layers} layers x {dim} wide, {heads} heads, block {block}, batch {batch}")
        print(f"  {'model':22s} {'ms/step':>8s} {'tokens/s':>9s} {'vs reference':>12s}")
        for name in names:
            med = statistics.median(times[name])
            print(f"  {name:22s} {1000 * med:8.1f} {tokens / med:9.0f} {ref / med:11.2f}x")


if __name__ == "__main__":
    main()
