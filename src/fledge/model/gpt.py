"""A lean Llama-style decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU MLP.

Parameter names and the RoPE convention match transformers' `LlamaForCausalLM`, so a
state dict saved from `GPT` loads there unchanged (`to_hf_config` gives the config). We
keep our own module instead of using transformers' class because it trains faster at
the sizes fledge targets on CPU (docs/benchmarks.md has the numbers) and keeps
generation with a KV cache in one short file.

The forward contract (`GPT.forward`): `input_ids` and, optionally, `labels` already shifted
to the next token (-100 marks positions without a target); it returns `(logits, loss)`, the
loss a mean over targets or, with `reduction="sum"`, their sum. Packed sequences pass
`position_ids` (RoPE positions restarting per example) and `document_ids` (attention stays
within an example). Every projection is called as a module, so peft's LoRA layers, which
replace them, take part in forward and backward (tests/unit/model/test_lora.py).

Reads top to bottom: config, norm, rotary embedding, attention, MLP, block, model, generate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    vocab_size: int
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 0          # 0: same as n_heads (plain multi-head attention)
    dim: int = 128
    hidden_dim: int = 0          # 0: 8/3 * dim rounded up to a multiple of 32
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    dropout: float = 0.0
    init_std: float = 0.02
    bos_id: int | None = None
    eos_id: int | None = None

    def __post_init__(self):
        self.n_kv_heads = self.n_kv_heads or self.n_heads
        if not self.hidden_dim:
            self.hidden_dim = 32 * math.ceil(8 * self.dim / 3 / 32)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    """cos/sin tables in transformers' half-rotation layout: (T, head_dim) = [freqs, freqs]."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        t = torch.arange(max_seq_len, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)                       # (T, head_dim/2)
        emb = torch.cat([freqs, freqs], dim=-1)                # (T, head_dim)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, start: int, length: int, dtype: torch.dtype, position_ids=None):
        """cos, sin to broadcast over (B, T, heads, head_dim): (length, 1, head_dim) for positions
        start..start+length-1, or (B, T, 1, head_dim) for explicit position_ids (B, T)."""
        if position_ids is None:
            cos, sin = self.cos[start:start + length, None], self.sin[start:start + length, None]
        else:
            cos, sin = self.cos[position_ids][:, :, None], self.sin[position_ids][:, :, None]
        return cos.to(dtype), sin.to(dtype)


def apply_rotary(x, cos, sin):
    # x: (B, T, heads, head_dim); cos, sin: (T, 1, head_dim) or (B, T, 1, head_dim), already in x's dtype
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def document_mask(document_ids, dtype: torch.dtype):
    """Additive attention bias for packed sequences: 0 where a token may attend (itself and earlier
    tokens with the same document id), -inf elsewhere. document_ids: (B, T) -> (B, 1, T, T)."""
    T = document_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=document_ids.device).tril()
    allowed = causal & (document_ids[:, :, None] == document_ids[:, None, :])          # (B, T, T)
    bias = torch.zeros(allowed.shape, dtype=dtype, device=document_ids.device).masked_fill(~allowed, float("-inf"))
    return bias[:, None]


def causal_attention_math(q, k, v, dropout: float, bias=None):
    """Plain causal attention: scores, fp32 softmax, weighted sum. On CPU in bf16, PyTorch's
    flash kernel runs its backward several times slower than this at short lengths
    (docs/benchmarks.md). q, k, v: (B, n_heads, T, head_dim); bias: additive (B, 1, T, T) mask
    from `document_mask`, or None for plain causal."""
    T = q.shape[2]
    if bias is None:
        bias = torch.full((T, T), float("-inf"), dtype=q.dtype, device=q.device).triu(1)   # (T, T): 0 or -inf
    scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5 + bias                      # (B, n_heads, T, T)
    probs = torch.softmax(scores, -1, dtype=torch.float32).to(v.dtype)
    if dropout:
        probs = F.dropout(probs, dropout)
    return probs @ v                                                                    # (B, n_heads, T, head_dim)


# Packed sequences at least this long attend document by document (`document_runs`) instead of
# through one (T, T) mask: the mask computes every cross-document score only to discard it, most of
# a step's work for long rows (user 3's DOT rows packed into 2,048 tokens: docs/benchmarks.md).
RUNS_FROM_LENGTH = 512


def document_runs(document_ids) -> list[list[tuple[int, int]]] | None:
    """Each batch row's runs of equal document ids as (start, end) pairs, when every document is one
    contiguous run (as packing lays rows out); None when some document id recurs after another's."""
    B, T = document_ids.shape
    change = (document_ids[:, 1:] != document_ids[:, :-1]).nonzero().tolist()     # [(row, t)]: t+1 starts a run
    starts: list[list[int]] = [[0] for _ in range(B)]
    for row, t in change:
        starts[row].append(t + 1)
    runs = [list(zip(row, row[1:] + [T])) for row in starts]
    distinct = [len(set(ids)) for ids in document_ids.tolist()]
    if any(len(r) != n for r, n in zip(runs, distinct)):
        return None
    return runs


def packed_attention_bias(document_ids, dtype: torch.dtype):
    """What `attend` takes for packed sequences: their document runs when long and laid out as
    packing does, else the additive mask of `document_mask`."""
    if document_ids.shape[1] >= RUNS_FROM_LENGTH:
        runs = document_runs(document_ids)
        if runs is not None:
            return runs
    return document_mask(document_ids, dtype)


def _causal(q, k, v, dropout: float, gqa: bool):
    """Plain causal self-attention (no cache, no mask) with the fastest kernel for the case."""
    if q.device.type == "cpu" and q.dtype != torch.float32 and q.shape[2] <= 512 and not gqa:
        return causal_attention_math(q, k, v, dropout)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa, dropout_p=dropout)


def attend(q, k, v, bias, dropout: float):
    """Causal attention with the fastest kernel for the case. q: (B, n_heads, T, head_dim); k, v:
    (B, n_kv_heads, S, head_dim), S > T when a KV cache holds earlier tokens; bias: None (causal),
    an additive (B, 1, T, T) mask from `document_mask`, or each row's document runs from
    `document_runs` (each run attends causally within itself); never a mask with a cache."""
    T, S = q.shape[2], k.shape[2]
    gqa = k.shape[1] != q.shape[1]
    if S != T and T == 1:                              # decoding: attend to everything cached
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    if S != T:                                         # prefill after cached tokens: offset causal mask
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    if isinstance(bias, list):                         # packed documents, one causal attention each
        return torch.cat([torch.cat([_causal(q[b:b + 1, :, s:e], k[b:b + 1, :, s:e], v[b:b + 1, :, s:e], dropout, gqa)
                                     for s, e in runs], dim=2) for b, runs in enumerate(bias)], dim=0)
    if bias is None:
        return _causal(q, k, v, dropout, gqa)
    if q.device.type == "cpu" and q.dtype != torch.float32 and T <= 512 and not gqa:
        return causal_attention_math(q, k, v, dropout, bias)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=gqa, dropout_p=dropout)


class Attention(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        self.q_proj = nn.Linear(c.dim, c.n_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.dim, c.n_kv_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.dim, c.n_kv_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.n_heads * c.head_dim, c.dim, bias=False)
        self.dropout = c.dropout

    def forward(self, x, cos, sin, cache: KVCache | None = None, layer: int = 0, bias=None):
        B, T, _ = x.shape
        H, KV, D = self.n_heads, self.n_kv_heads, self.head_dim
        # Each projection is called, never fused by concatenating weights: peft's LoRA layers (or a
        # quantized linear) replace these modules, and a fused matmul would skip them. On CPU a
        # training step is as fast as with one fused q/k/v matmul (within 2%, fp32 and bf16).
        q = self.q_proj(x).view(B, T, H, D)
        k = self.k_proj(x).view(B, T, KV, D)
        v = self.v_proj(x).view(B, T, KV, D).transpose(1, 2)                 # (B, n_kv_heads, T, head_dim)
        qk = apply_rotary(torch.cat([q, k], dim=2), cos, sin)                # q and k rotated in one pass
        q = qk[:, :, :H].transpose(1, 2)                                     # (B, n_heads, T, head_dim)
        k = qk[:, :, H:].transpose(1, 2)                                     # (B, n_kv_heads, T, head_dim)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        y = attend(q, k, v, bias, self.dropout if self.training else 0.0)    # (B, n_heads, T, head_dim)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * D))          # (B, T, dim)


class MLP(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.dim, c.hidden_dim, bias=False)
        self.up_proj = nn.Linear(c.dim, c.hidden_dim, bias=False)
        self.down_proj = nn.Linear(c.hidden_dim, c.dim, bias=False)

    def forward(self, x):
        # Called one by one, like the attention projections: a wrapper around any of them must run.
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))   # (B, T, dim)


class Block(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.dim, c.norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.dim, c.norm_eps)
        self.mlp = MLP(c)
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, x, cos, sin, cache=None, layer=0, bias=None):
        x = x + self.dropout(self.self_attn(self.input_layernorm(x), cos, sin, cache, layer, bias))
        return x + self.dropout(self.mlp(self.post_attention_layernorm(x)))


class Decoder(nn.Module):
    """The body, named like transformers' `LlamaModel` (`model.` prefix in the state dict)."""

    def __init__(self, c: GPTConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.dim)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        self.norm = RMSNorm(c.dim, c.norm_eps)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = c = config
        self.model = Decoder(c)
        self.lm_head = nn.Linear(c.dim, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = RotaryEmbedding(c.head_dim, c.max_seq_len, c.rope_theta)
        self.apply(self._init_weights)
        # Scaled init of the residual projections (GPT-2): keeps the residual stream's variance flat.
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=c.init_std / math.sqrt(2 * c.n_layers))

    def _init_weights(self, m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=self.config.init_std)

    def forward(self, input_ids, labels=None, cache: KVCache | None = None, *, reduction: str = "mean",
                position_ids=None, document_ids=None, logits: bool = True):
        """input_ids: (B, T) token ids. labels: (B, T) the token that follows each position (already
        shifted, unlike transformers' labels); -100 marks positions without a target.
        position_ids: (B, T) RoPE positions instead of 0..T-1 (after any cached tokens); packed
        sequences restart them per example. document_ids: (B, T) ints; a token attends only to
        earlier tokens with the same id, so packed examples do not see each other.
        Returns logits (B, T, vocab) and, given labels, the cross-entropy of the targets: their mean
        (reduction="mean"), their sum ("sum"; the count is `(labels != -100).sum()`), or each
        one ("none": (B, T), 0 where ignored). `logits=False` (with labels, reduction "mean" or "sum")
        returns (None, loss) and runs the output head only at positions with a target: the same
        loss, without the head's work on prompt and padding tokens (most of a fine-tuning step's
        when answers are short and the vocabulary large)."""
        B, T = input_ids.shape
        start = cache.length if cache is not None else 0
        end = start + T if position_ids is None else int(position_ids.max()) + 1
        if end > self.config.max_seq_len:
            raise ValueError(f"position {end - 1} is past max_seq_len {self.config.max_seq_len}; "
                             f"use shorter sequences or a model with a larger max_seq_len")
        if document_ids is not None and cache is not None:
            raise ValueError("document_ids cannot be combined with a KV cache; run packed sequences without one")
        dtype = torch.get_autocast_dtype(input_ids.device.type) if torch.is_autocast_enabled(input_ids.device.type) \
            else self.model.embed_tokens.weight.dtype
        cos, sin = self.rotary(start, T, dtype, position_ids)
        bias = None if document_ids is None else packed_attention_bias(document_ids, dtype)
        x = self.model.embed_tokens(input_ids)                  # (B, T, dim)
        for i, block in enumerate(self.model.layers):
            x = block(x, cos, sin, cache, i, bias)
        x = self.model.norm(x)
        if cache is not None:
            cache.length += T
        if not logits and labels is not None and reduction != "none":
            return None, targets_loss(self.lm_head, x, labels, reduction)
        out = self.lm_head(x)                                   # (B, T, vocab)
        if labels is None:
            return out, None
        loss = F.cross_entropy(out.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction=reduction)
        return out, loss.view(B, T) if reduction == "none" else loss

    def num_parameters(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.model.embed_tokens.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (PaLM appendix B): 6 per weight of every matmul, the output head
        included whether or not it shares the embedding's weight (the embedding lookup is no matmul),
        plus 6 * n_layers * dim * seq_len for attention scores and values: PaLM's 12, halved
        because causal attention needs only the lower triangle."""
        c = self.config
        matmul_weights = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        return 6 * matmul_weights + 6 * c.n_layers * c.dim * seq_len

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 eos_id: int | None = None, generator: torch.Generator | None = None):
        """Yields one (B, 1) tensor of new tokens at a time, reusing a KV cache."""
        was_training = self.training
        self.eval()
        B, T = idx.shape
        total = min(T + max_new_tokens, self.config.max_seq_len)
        if T >= total:
            idx = idx[:, -(self.config.max_seq_len - 1):]
            T = idx.shape[1]
            total = self.config.max_seq_len
        cache = KVCache(self, B, total, idx.device)
        logits, _ = self(idx, cache=cache)
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        try:
            for _ in range(min(max_new_tokens, total - T)):
                nxt = sample_next(logits[:, -1, :].float(), temperature, top_k, top_p, generator)   # (B, 1)
                if eos_id is not None:
                    nxt = torch.where(done[:, None], torch.full_like(nxt, eos_id), nxt)
                    done |= nxt[:, 0] == eos_id
                yield nxt
                if bool(done.all()) or cache.length >= total:
                    return
                logits, _ = self(nxt, cache=cache)
        finally:
            self.train(was_training)


def targets_loss(head: nn.Module, hidden, labels, reduction: str):
    """Cross-entropy of the targets with the output head applied to their positions only.
    hidden: (B, T, dim), labels: (B, T) with -100 where there is no target."""
    keep = labels != -100
    return F.cross_entropy(head(hidden[keep]).float(), labels[keep], reduction=reduction)


class KVCache:
    """Preallocated keys and values for every layer: (B, n_kv_heads, max_len, head_dim)."""

    def __init__(self, model: GPT, batch: int, max_len: int, device):
        c = model.config
        dtype = next(model.parameters()).dtype
        shape = (c.n_layers, batch, c.n_kv_heads, max_len, c.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    def update(self, layer: int, k, v):
        T = k.shape[2]
        self.k[layer, :, :, self.length:self.length + T] = k
        self.v[layer, :, :, self.length:self.length + T] = v
        return self.k[layer, :, :, :self.length + T], self.v[layer, :, :, :self.length + T]


def sample_next(logits, temperature: float, top_k: int, top_p: float, generator=None):
    """logits: (B, vocab) -> (B, 1) token ids. temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p     # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)


def to_hf_config(c: GPTConfig) -> dict:
    """A transformers `LlamaConfig` dict: `LlamaForCausalLM.from_pretrained` loads our folders as they are."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": c.vocab_size, "hidden_size": c.dim, "intermediate_size": c.hidden_dim,
        "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads,
        "head_dim": c.head_dim, "max_position_embeddings": c.max_seq_len, "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta,  # transformers < 5
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},  # transformers >= 5
        "tie_word_embeddings": c.tie_embeddings, "hidden_act": "silu", "attention_bias": False,
        "mlp_bias": False, "initializer_range": c.init_std, "bos_token_id": c.bos_id, "eos_token_id": c.eos_id,
        "torch_dtype": "float32",
    }
