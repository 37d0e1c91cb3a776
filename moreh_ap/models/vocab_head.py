# The head's column split whose logits stay vocabulary-sharded while the engine computes the loss, full elsewhere.
"""A vocabulary-parallel head and the switch that keeps its logits sharded.

:class:`VocabParallelHead` is torch's ``ColwiseParallel`` on the head (weight ``Shard(0)``: each tensor-parallel
rank holds ``V / tp`` rows of the vocabulary, the same split as a vocabulary-parallel embedding, so a tied pair
stays tied). What its output is depends on who reads it:

- inside :func:`sharded_logits` (the engine, while it computes the model's own causal-LM loss under torch's
  ``loss_parallel``): the logits as a ``DTensor`` placed ``Shard(-1)`` on the tp mesh, never gathered;
- anywhere else (a user ``loss_fn``, a loss the model computes in its own forward, ``forward_global``,
  evaluation, ``generate``): the plain, whole ``(B, S, V)`` tensor, all-gathered as ``ColwiseParallel(
  output_layouts=Replicate())`` gives it.

The switch is a context variable: it follows the thread (and asyncio task) that entered it.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator

from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel

__all__ = ["VocabParallelHead", "sharded_logits", "sharded_logits_on"]

_SHARDED: ContextVar[bool] = ContextVar("moreh_ap_sharded_logits", default=False)


@contextmanager
def sharded_logits(on: bool = True) -> Iterator[None]:
    """Within it, :class:`VocabParallelHead` modules return their logits vocabulary-sharded (``on``)."""
    token = _SHARDED.set(on)
    try:
        yield
    finally:
        _SHARDED.reset(token)


def sharded_logits_on() -> bool:
    """Whether :func:`sharded_logits` is active here."""
    return _SHARDED.get()


class VocabParallelHead(ColwiseParallel):
    """``ColwiseParallel`` for the LM head: logits ``Shard(-1)`` inside :func:`sharded_logits`, else whole.

    Args:
        input_layouts: the layout of the head's input (as ``ColwiseParallel``; default ``Replicate()``).
    """

    def __init__(self, *, input_layouts=None) -> None:
        super().__init__(input_layouts=input_layouts, output_layouts=Shard(-1), use_local_output=False)

    @staticmethod
    def _prepare_output_fn(output_layouts, use_local_output, mod, outputs, device_mesh):
        if sharded_logits_on():
            if outputs.placements != output_layouts:
                outputs = outputs.redistribute(placements=output_layouts)
            return outputs
        return outputs.redistribute(placements=(Replicate(),), async_op=True).to_local()
