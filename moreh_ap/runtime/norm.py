# Global gradient norm across pipeline stages and parameter shards, and clip_grad_norm_ on it.
"""``global_norm(tensors)``: the 2-norm of one set of tensors spread over ranks.

Each rank passes its share: DTensors count their local shard, once per replica group (only the
rank at coordinate 0 of every Replicate mesh dim counts it); plain tensors count once per
data-parallel group when the caller gives this rank's ``dp_rank`` (they are replicated over dp, as
under DDP), else once per rank. One all-reduce over the world sums the squares, so every rank must
call it (same as torch's collectives). The per-tensor arithmetic is :mod:`moreh_ap.optim.norms`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Protocol, runtime_checkable

import torch
import torch.distributed as dist

from moreh_ap.optim.norms import squared_sum
from moreh_ap.runtime.dist import device_for_rank, world_size

__all__ = ["NormParams", "HasNormParams", "global_norm", "clip_grad_norm_", "clip_params_"]


@dataclass(kw_only=True, slots=True)
class NormParams:
    """The parameters of one rank that a global gradient norm reads, and those clipping scales."""

    counted: list[torch.Tensor]
    """Parameters whose gradients count in the norm (a tied parameter held by several stages: one copy)."""
    everything: list[torch.Tensor]
    """Every trainable parameter of this rank (clipping scales all of them)."""
    dp_rank: int | None = None
    """This rank's data-parallel coordinate when plain (non-DTensor) gradients are replicated over dp."""


@runtime_checkable
class HasNormParams(Protocol):
    """A model that knows which of its parameters a global norm counts (e.g. a ParallelModel)."""

    def norm_params(self) -> NormParams:
        """This rank's :class:`NormParams`."""


def global_norm(tensors: Iterable[torch.Tensor | None], *, dp_rank: int | None = None) -> torch.Tensor:
    """2-norm of all ``tensors`` together, correct across pipeline stages and shards (fp32 scalar).

    Args:
        tensors: this rank's tensors (e.g. gradients of its stage's parameters; DTensors allowed;
            None entries skipped).
        dp_rank: this rank's data-parallel coordinate when plain tensors are replicated over dp
            (they count on dp rank 0 only); None: plain tensors count on every rank.

    Returns:
        The same fp32 scalar on every rank.
    """
    total, device = squared_sum(tensors, dp_rank=dp_rank)
    if world_size() > 1:
        total = total.to(device if device is not None else device_for_rank())
        dist.all_reduce(total)
    return total.sqrt().float()


@torch.no_grad()
def clip_params_(params: NormParams, max_norm: float, *, eps: float = 1e-6) -> torch.Tensor:
    """Scale the gradients of ``params.everything`` so that the global norm of the counted ones is at
    most ``max_norm`` (torch's formula); returns the norm before clipping (same on every rank)."""
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or max_norm <= 0:
        raise ValueError(f"max_norm={max_norm!r} is not valid: expected a number > 0")
    norm = global_norm([p.grad for p in params.counted if p.grad is not None], dp_rank=params.dp_rank)
    coef = float(torch.clamp(max_norm / (norm + eps), max=1.0))
    for p in params.everything:
        if p.grad is not None:
            p.grad.mul_(coef)
    return norm


def clip_grad_norm_(target: HasNormParams | Iterable[torch.Tensor], max_norm: float, *,
                    eps: float = 1e-6) -> torch.Tensor:
    """Scale gradients so that their global norm is at most ``max_norm`` (torch's formula).

    Args:
        target: a :class:`~moreh_ap.runtime.ParallelModel` (tied copies counted once) or an
            iterable of parameters (this rank's own: counted on every rank).
        max_norm: the largest allowed norm (> 0).

    Returns:
        The global norm before clipping (same on every rank).
    """
    if isinstance(target, HasNormParams):
        params = target.norm_params()
    else:
        with_grad = [p for p in target if p.grad is not None]
        params = NormParams(counted=with_grad, everything=with_grad)
    return clip_params_(params, max_norm, eps=eps)
