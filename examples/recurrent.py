"""A constant-state recurrent language model, trained by fledge as your own architecture.

    # recipe: model.arch: examples.recurrent:build; from the repository root, where it imports:
    python -m fledge train recipes/compare/gutenberg-recurrent.yaml

No attention and no positions: each layer carries one vector per sequence, so what the model
remembers of the text so far is `n_layers * dim` numbers whatever the length. The recipe's size
(2 layers, dim 288) carries 576 numbers, 2,304 bytes in fp32, per sequence (`state_size()`),
after 10 tokens or 10,000; a transformer's KV cache grows by 2 * n_layers * dim numbers per
token instead.

Each layer is a minGRU (Feng et al. 2024, "Were RNNs All We Needed?") followed by a SwiGLU MLP,
both pre-norm residual, like a Llama block with the attention swapped out:

    z_t = sigmoid(W_z x_t)                    how much of the state to replace at token t
    h_t = (1 - z_t) * h_{t-1} + z_t * W_h x_t  the state, (B, dim)
    y_t = W_o h_t

The gates depend on x_t only, never on h_{t-1}, so the projections of a whole block run as
one matmul and only the elementwise update above runs token by token (`scan`). A plain loop
keeps training, evaluation and generation on one code path, so `generate` equals recomputing
from scratch; on a GPU with long blocks a log-space parallel scan (Heinsen 2023) is the
drop-in replacement. Packed rows (`document_ids`) restart the state where a document starts,
exactly as if each row ran alone; `position_ids` are accepted and ignored (order is position).

The forward contract is fledge's (fledge.model.gpt): labels already shifted, -100 ignored,
`reduction` "mean", "sum" or "none". Builder: `build(config: ModelConfig, vocab_size)` reads
n_layers, dim, hidden_dim (0: 8/3 dim rounded up to 32), norm_eps, tie_embeddings, dropout
and init_std; the attention keys (n_heads, rope_theta, ...) mean nothing here.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from fledge.model.gpt import RMSNorm, sample_next


class MinGRU(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, dim, bias=False)     # W_z
        self.hidden_proj = nn.Linear(dim, dim, bias=False)   # W_h
        self.out_proj = nn.Linear(dim, dim, bias=False)      # W_o

    def forward(self, x, h, starts=None):
        """x: (B, T, dim); h: (B, dim), the state before x; starts: (B, T) bool, True where a document
        starts (the state before it is dropped). Returns y (B, T, dim) and the state after x (B, dim)."""
        z = torch.sigmoid(self.gate_proj(x))                 # (B, T, dim)
        keep, write = 1 - z, z * self.hidden_proj(x)         # (B, T, dim) each: h_t = keep_t * h + write_t
        if starts is not None:
            keep = keep.masked_fill(starts[:, :, None], 0.0)
        states = []
        for t in range(x.shape[1]):
            h = keep[:, t] * h + write[:, t]                 # (B, dim)
            states.append(h)
        return self.out_proj(torch.stack(states, dim=1)), h


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))    # (B, T, dim)


class Block(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, eps: float, dropout: float):
        super().__init__()
        self.mix_norm, self.mix = RMSNorm(dim, eps), MinGRU(dim)
        self.mlp_norm, self.mlp = RMSNorm(dim, eps), SwiGLU(dim, hidden_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, h, starts=None):
        y, h = self.mix(self.mix_norm(x), h, starts)
        x = x + self.dropout(y)
        return x + self.dropout(self.mlp(self.mlp_norm(x))), h


class RecurrentLM(nn.Module):
    def __init__(self, vocab_size: int, n_layers: int = 2, dim: int = 288, hidden_dim: int = 0,
                 norm_eps: float = 1e-5, tie_embeddings: bool = True, dropout: float = 0.0, init_std: float = 0.02):
        super().__init__()
        hidden_dim = hidden_dim or 32 * math.ceil(8 * dim / 3 / 32)
        self.n_layers, self.dim = n_layers, dim
        self.embed = nn.Embedding(vocab_size, dim)
        self.layers = nn.ModuleList(Block(dim, hidden_dim, norm_eps, dropout) for _ in range(n_layers))
        self.norm = RMSNorm(dim, norm_eps)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        if tie_embeddings:
            self.head.weight = self.embed.weight
        for name, p in self.named_parameters():
            if p.dim() == 2:         # residual outputs scaled down (GPT-2), so the stream's variance stays flat
                deep = name.endswith(("out_proj.weight", "down_proj.weight"))
                nn.init.normal_(p, mean=0.0, std=init_std / math.sqrt(2 * n_layers) if deep else init_std)

    def initial_state(self, batch: int, device=None) -> torch.Tensor:
        return torch.zeros(self.n_layers, batch, self.dim, device=device, dtype=self.embed.weight.dtype)

    def advance(self, input_ids, state=None, document_ids=None):
        """Reads input_ids (B, T) after `state` (n_layers, B, dim; None: the start of a text).
        Returns logits (B, T, vocab) and the state after the last token (n_layers, B, dim)."""
        B, _ = input_ids.shape
        state = self.initial_state(B, input_ids.device) if state is None else state
        starts = None
        if document_ids is not None:                         # a new document id: the state restarts
            starts = torch.zeros_like(document_ids, dtype=torch.bool)
            starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
        x = self.embed(input_ids)                            # (B, T, dim)
        after = []
        for layer, block in enumerate(self.layers):
            x, h = block(x, state[layer], starts)
            after.append(h)
        return self.head(self.norm(x)), torch.stack(after)   # (B, T, vocab), (n_layers, B, dim)

    def forward(self, input_ids, labels=None, *, reduction: str = "mean", position_ids=None, document_ids=None):
        """fledge's contract: input_ids (B, T); labels (B, T) the next token at each position, -100
        where none. Returns logits (B, T, vocab) and the cross-entropy of the targets: their mean,
        their sum ("sum") or each one ("none": (B, T), 0 where ignored). position_ids are ignored."""
        logits, _ = self.advance(input_ids, None, document_ids)
        if labels is None:
            return logits, None
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction=reduction)
        return logits, loss.view(labels.shape) if reduction == "none" else loss

    def state_size(self) -> tuple[int, int]:
        """(numbers, bytes) the model carries per sequence between tokens, whatever the length."""
        numbers = self.n_layers * self.dim
        return numbers, numbers * self.embed.weight.element_size()

    def num_parameters(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())       # a tied head's weight counts once
        return n - self.embed.weight.numel() if non_embedding else n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 per matmul weight, the head included (tied or not). The
        recurrence is elementwise, O(dim) per token, and left out; seq_len does not matter."""
        return 6 * sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 eos_id: int | None = None, generator: torch.Generator | None = None):
        """Yields one (B, 1) tensor of new tokens at a time, carrying the state (n_layers, B, dim)
        from token to token: memory stays flat however long the text grows."""
        was_training = self.training
        self.eval()
        logits, state = self.advance(idx)                    # the prompt: (B, T, vocab), (n_layers, B, dim)
        done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        try:
            for _ in range(max_new_tokens):
                nxt = sample_next(logits[:, -1, :].float(), temperature, top_k, top_p, generator)   # (B, 1)
                if eos_id is not None:
                    nxt = torch.where(done[:, None], torch.full_like(nxt, eos_id), nxt)
                    done |= nxt[:, 0] == eos_id
                yield nxt
                if bool(done.all()):
                    return
                logits, state = self.advance(nxt, state)     # (B, 1, vocab), the same-size state
        finally:
            self.train(was_training)


def build(config, vocab_size: int) -> RecurrentLM:
    """`model.arch: examples.recurrent:build`: the model from a fledge ModelConfig."""
    return RecurrentLM(vocab_size, n_layers=config.n_layers, dim=config.dim, hidden_dim=config.hidden_dim,
                       norm_eps=config.norm_eps, tie_embeddings=config.tie_embeddings, dropout=config.dropout,
                       init_std=config.init_std)
