# Loss semantics: one device's mean over the global batch, split into per-micro-batch pieces that sum to it.
"""Per-micro-batch losses whose sum over micro-batches and dp ranks is the single-device loss.

- Hugging Face causal LMs given ``labels``: the model's own ``loss_function`` with
  ``num_items_in_batch`` = non-ignored (shifted) labels of the WHOLE global batch, so
  micro-batches holding different numbers of tokens are weighted right. With tensor parallelism it runs on
  the vocabulary-sharded logits (:mod:`moreh_ap.runtime.vocab_loss`).
  A caller's ``num_items_in_batch`` replaces that count (the loss is then the one-device
  ``model(..., num_items_in_batch=N).loss``).
- Models that compute their own loss: the loss read from the model's output (a mean over the
  micro-batch), weighted by the micro-batch's share of the global batch's samples, so the step's
  loss is the mean of the micro-batch losses (the one-device loss when every micro-batch counts the
  same number of loss elements).
- Other models: ``loss_fn(output, target)`` (a mean over samples) weighted by the
  micro-batch's share of the global batch's samples.

Data-parallel reductions (DDP, FSDP2, replicate) average gradients over dp, so the
backward loss is multiplied by dp; pipeline schedules run with ``scale_grads=False``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from moreh_ap.runtime.vocab_loss import plain_loss

__all__ = ["LossPlan", "hf_num_items", "extract_logits"]

IGNORE_INDEX = -100


def hf_num_items(labels: torch.Tensor) -> int:
    """Tokens the HF causal-LM loss counts in ``labels``: shifted by one, -100 ignored."""
    return int((labels[..., 1:] != IGNORE_INDEX).sum().item())


def extract_logits(out):
    """The logits/first output of a model call (HF ModelOutput, tuple, or tensor)."""
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def _as_float(t):
    return t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64 else t


@dataclass(slots=True)
class LossPlan:
    """How one global batch's loss is split; built per step (the batch decides the weights)."""

    hf_loss: Callable | None
    """The HF model's ``loss_function`` (None: use ``user_loss``)."""
    vocab_size: int | None
    user_loss: Callable | None
    num_items: int
    """HF: non-ignored tokens in the global batch; other: samples in the global batch."""
    micro_batch_samples: int
    """Samples per micro-batch (other models' weight numerator)."""
    dp: int
    output_loss: Callable | None = None
    """Reads the loss from the model's own output (models that compute their own loss)."""

    def piece(self, output, target) -> torch.Tensor:
        """This micro-batch's share of the global loss, times dp (for backward)."""
        if self.output_loss is not None:
            loss = self.output_loss(output).float() * (self.micro_batch_samples / self.num_items)
            return loss * self.dp
        output = extract_logits(output)
        if self.hf_loss is not None:
            # logits vocabulary-sharded (a DTensor) under vocab_parallel_loss: computed by torch's loss_parallel
            loss = plain_loss(self.hf_loss(_as_float(output), target, vocab_size=self.vocab_size,
                                           num_items_in_batch=max(self.num_items, 1)))
            if self.num_items == 0:  # single device: mean over no tokens is nan
                loss = loss * float("nan")
        else:
            loss = self.user_loss(_as_float(output), target) * (self.micro_batch_samples / self.num_items)
        return loss * self.dp
