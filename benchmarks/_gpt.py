# A small plain-torch GPT for the runtime benchmarks (torchtitan-style `layers`, skippable pre/post parts).
"""``make_gpt(vocab=..., seq=..., dim=..., layers=..., heads=...)`` and ``lm_loss``.

The model follows the torchtitan convention the runtime's block-list adapter
splits: ``tok_emb``/``pos_emb`` before ``layers``, ``norm``/``head`` after, and
a forward that skips the parts a pipeline stage sets to ``None``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    """Pre-norm transformer block: causal SDPA attention and a GELU MLP."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Token + position embeddings, ``layers``, final norm and an untied head."""

    def __init__(self, *, vocab: int, seq: int, dim: int, layers: int, heads: int) -> None:
        super().__init__()
        self.tok_emb, self.pos_emb = nn.Embedding(vocab, dim), nn.Embedding(seq, dim)
        self.layers = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab, bias=False)

    def forward(self, idx):
        h = self.tok_emb(idx) + self.pos_emb(torch.arange(idx.shape[1])) if self.tok_emb is not None else idx
        for layer in self.layers:
            h = layer(h)
        h = self.norm(h) if self.norm is not None else h
        return self.head(h) if self.head is not None else h


def make_gpt(*, vocab: int, seq: int, dim: int, layers: int, heads: int, seed: int = 0) -> GPT:
    """A :class:`GPT` with weights drawn from ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return GPT(vocab=vocab, seq=seq, dim=dim, layers=layers, heads=heads)


def lm_loss(logits, target):
    """Mean next-token cross entropy in fp32 over all positions."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1))
