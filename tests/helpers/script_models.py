# Models in the shape of real training scripts: a nanoGPT-style GPT (own loss), a dict-loss MLP, a small CNN.
"""Written after nanoGPT's ``model.py`` (``GPT.forward(idx, targets=None) -> (logits, loss)``, the
``transformer`` ModuleDict of wte/wpe/drop/h/ln_f, ``lm_head`` tied to ``wte``), not copied from it."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class GPTConfig:
    block_size: int = 16
    vocab_size: int = 64
    n_layer: int = 4
    n_head: int = 2
    n_embd: int = 32
    dropout: float = 0.0
    bias: bool = True


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, 4 * cfg.n_embd), nn.GELU(),
                                 nn.Linear(4 * cfg.n_embd, cfg.n_embd), nn.Dropout(cfg.dropout))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """nanoGPT's shape: ``model(X, Y)`` returns ``(logits, loss)``; ``model(X)`` the last position's logits."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd), wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
            drop=nn.Dropout(cfg.dropout), h=nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)]),
            ln_f=nn.LayerNorm(cfg.n_embd)))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def forward(self, idx, targets=None):
        pos = torch.arange(0, idx.shape[1], dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        else:
            logits, loss = self.lm_head(x[:, [-1], :]), None
        return logits, loss


class ScaledGPT(GPT):
    """A GPT whose forward scales the embeddings: looks like nanoGPT, but its pipeline split would differ."""

    def forward(self, idx, targets=None):
        pos = torch.arange(0, idx.shape[1], dtype=torch.long, device=idx.device)
        x = self.transformer.drop(2.0 * self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)


class DictLossMLP(nn.Module):
    """``model(x, y)`` returns ``{"logits": ..., "loss": ...}`` (mean squared error)."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(dim, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))

    def forward(self, x, y):
        pred = self.layers(x)
        return {"logits": pred, "loss": F.mse_loss(pred, y)}


class SkewedMLP(nn.Module):
    """``model(x, y)`` returns ``{"logits", "loss"}`` (mean squared error) through Linear(8, 16), ReLU, Linear(16, 1),
    with gradients 1e4 times larger on hidden units 8-15: their first-layer rows and biases are made 1e4
    smaller and their second-layer weights 1e4 larger (same outputs' scale). Under FSDP2 over 2 ranks those
    rows are rank 1's shard, so a loss scale can overflow rank 1's gradients while rank 0's stay finite."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
        with torch.no_grad():
            self.layers[0].weight[8:] *= 1e-4
            self.layers[0].bias[8:] *= 1e-4
            self.layers[2].weight[:, 8:] *= 1e4

    def forward(self, x, y):
        pred = self.layers(x)
        return {"logits": pred, "loss": F.mse_loss(pred, y)}


class SmallCNN(nn.Module):
    """Image classifier returning logits only (the script computes the loss); ``batch_norm`` adds BatchNorm2d."""

    def __init__(self, classes: int = 5, *, batch_norm: bool = False) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8) if batch_norm else nn.Identity(), nn.ReLU(),
            nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2))
        self.head = nn.Linear(32, classes)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def gpt_batch(gen: torch.Generator, *, n: int, cfg: GPTConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """nanoGPT's get_batch on random data: X and Y = X shifted by one token."""
    data = torch.randint(0, cfg.vocab_size, (n, cfg.block_size + 1), generator=gen)
    return data[:, :-1].contiguous(), data[:, 1:].contiguous()


def image_batch(gen: torch.Generator, *, n: int, classes: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, 3, 8, 8, generator=gen), torch.randint(0, classes, (n,), generator=gen)
