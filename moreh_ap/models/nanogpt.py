# nanoGPT-style GPT: transformer.{wte, wpe, drop, h, ln_f} + lm_head (tied to wte), forward(idx, targets) -> (logits, loss).
"""Models shaped like nanoGPT's ``GPT`` (plain torch): a ``transformer`` container holding the token and
position embeddings ``wte`` / ``wpe``, ``drop``, the block list ``h`` and ``ln_f``, and an ``lm_head``
(its weight tied to ``wte``'s). The model computes its own loss, ``F.cross_entropy(logits, targets,
ignore_index=-1)``, when called as ``model(idx, targets)``; a pipeline computes the same loss on the
last stage from the ``targets`` argument. The one-line mode checks that claim at engagement on one
micro-batch (the split's loss against the model's own forward) and stops with an error on a mismatch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moreh_ap.models.base import GPTLayoutStage, ModelAdapter, is_hf_model

__all__ = ["NanoGPTAdapter", "nanogpt_loss"]

IGNORE_INDEX = -1
"""nanoGPT's ``ignore_index``."""


def nanogpt_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """nanoGPT's loss: the mean cross entropy over the targets that are not -1 (in fp32)."""
    logits = logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)


class _NanoGPTStage(GPTLayoutStage):
    """Stage of a nanoGPT-style GPT: [wte + wpe -> drop] -> blocks -> [ln_f -> lm_head] (logits of every position)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.first:
            pos = torch.arange(x.shape[1], dtype=torch.long, device=x.device)
            x = self.drop(self.wte(x) + self.wpe(pos))
        for block in self.h:
            x = block(x)
        if self.last:
            x = self.lm_head(self.ln_f(x))
        return x


class NanoGPTAdapter(ModelAdapter):
    """``model.transformer.{wte, wpe, drop, h, ln_f}`` and ``model.lm_head``; the loss from ``targets``."""

    name = "nanoGPT-style GPT"
    container_path = "transformer.h"
    target_arg = ("targets", 1)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        tr = getattr(model, "transformer", None)
        return (not is_hf_model(model) and isinstance(tr, nn.Module)
                and isinstance(getattr(model, "lm_head", None), nn.Linear)
                and all(isinstance(getattr(tr, a, None), nn.Module) for a in ("wte", "wpe", "drop", "ln_f"))
                and isinstance(getattr(tr, "h", None), nn.ModuleList) and len(tr.h) > 0)

    def build_stage(self, lo, hi, *, first, last):
        stage = _NanoGPTStage(self.model, self.blocks()[lo:hi], first, last)
        return stage, stage.h

    def stage_loss(self):
        return nanogpt_loss

    def vocab_size(self) -> int | None:
        return self.model.lm_head.out_features
