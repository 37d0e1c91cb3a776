# The engine's causal-LM loss computed vocabulary-parallel: the head's sharded logits under torch's loss_parallel.
"""Where it pays: whenever the engine itself computes a Hugging Face causal LM's loss (``labels=`` given, no
``loss_fn`` / ``output_loss``) with ``tp > 1`` and the family's plan splits the head
(:class:`~moreh_ap.models.vocab_head.VocabParallelHead`). The head then hands the loss its logits as a
``Shard(-1)`` DTensor and the model's own ``loss_function`` (HF's ``ForCausalLMLoss``: fp32 logits, labels
shifted, ``cross_entropy(ignore_index=-100, reduction="sum") / num_items_in_batch``) runs under torch's
``loss_parallel()``: each tp rank holds ``V / tp`` of the logits, their fp32 copy and their gradient, and
exchanges three all-reduces of one float per token (the max, the sum of exponentials, the target's logit)
instead of all-gathering the ``(B, S, V)`` logits. Forward and backward both run inside the context, as
torch requires.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from moreh_ap.models.vocab_head import sharded_logits

__all__ = ["plain_loss", "vocab_parallel_loss"]


@contextmanager
def vocab_parallel_loss(on: bool) -> Iterator[None]:
    """Within it (``on``), split heads return sharded logits and cross-entropy on them is vocabulary-parallel.

    Wrap the forward, the loss and the backward of a step in it. ``on=False``: nothing changes.
    """
    if not on:
        yield
        return
    from torch.distributed.tensor.parallel import loss_parallel

    ctx = loss_parallel()
    with sharded_logits():
        ctx.__enter__()
        try:
            yield
        finally:  # torch's context does not restore its op handlers when its body raises: exit it as if it did not
            ctx.__exit__(None, None, None)


def plain_loss(loss: torch.Tensor) -> torch.Tensor:
    """A loss computed vocabulary-parallel (a replicated scalar DTensor) as the plain tensor (no communication,
    differentiable); a plain tensor as it is."""
    from torch.distributed.tensor import DTensor

    return loss.full_tensor() if isinstance(loss, DTensor) else loss
