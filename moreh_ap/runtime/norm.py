# Global gradient norm across pipeline stages and parameter shards, and clip_grad_norm_ on it.
"""``global_norm(tensors)``: the 2-norm of one set of tensors spread over ranks.

Each rank passes its share: DTensors count their local shard, once per replica
group (only the rank at coordinate 0 of every Replicate mesh dim counts it);
plain tensors count once per data-parallel group of the active ParallelModel
(they are replicated over dp, as under DDP), or once per rank when no
ParallelModel is active. One all-reduce over the world sums the squares, so
every rank must call it (same as torch's collectives).
"""
from __future__ import annotations

import weakref
from typing import Iterable

import torch
import torch.distributed as dist

__all__ = ["global_norm", "clip_grad_norm_", "set_active_layout", "layout_active", "params_grad_norm"]

_ACTIVE: dict = {"dp_rank": None, "model": None}


def set_active_layout(*, dp_rank: int | None, model=None) -> None:
    """Record this rank's dp coordinate and its ParallelModel (called by ``parallelize``); None clears it."""
    _ACTIVE["dp_rank"] = dp_rank
    _ACTIVE["model"] = weakref.ref(model) if model is not None else None


def layout_active() -> bool:
    """Is a multi-rank ParallelModel's layout active on this rank (norms must then span all ranks)?"""
    return _ACTIVE["dp_rank"] is not None


def params_grad_norm(params: list[torch.Tensor]) -> torch.Tensor | None:
    """Global 2-norm of the gradients of ``params`` (this rank's share), over all stages and shards.

    For an optimizer rebound by the active ParallelModel. Tied parameters held by several pipeline
    stages count once: a local copy that the model does not count (see its ``_norm_params``) is
    left out. A collective, like :func:`global_norm`. Returns None (no collective) when no
    multi-rank ParallelModel is active or none of ``params`` belongs to it.
    """
    ref = _ACTIVE["model"]
    model = ref() if ref is not None else None
    if model is None or _ACTIVE["dp_rank"] is None:
        return None
    counted, everything = model._norm_params()
    held = {id(p) for p in everything}
    if not any(id(p) in held for p in params):
        return None
    skip = held - {id(p) for p in counted}
    return global_norm([p.grad for p in params if p.grad is not None and id(p) not in skip])


def _counts(t: torch.Tensor) -> tuple[torch.Tensor, bool]:
    from torch.distributed.tensor import DTensor, Replicate

    if isinstance(t, DTensor):
        coord = t.device_mesh.get_coordinate() or []
        counted = all(c == 0 for c, p in zip(coord, t.placements) if isinstance(p, Replicate))
        return t.to_local(), counted
    dp_rank = _ACTIVE["dp_rank"]
    return t, dp_rank is None or dp_rank == 0


def global_norm(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """2-norm of all ``tensors`` together, correct across pipeline stages and shards (fp32 scalar).

    Args:
        tensors: this rank's tensors (e.g. gradients of its stage's parameters; DTensors allowed).

    Returns:
        The same fp32 scalar on every rank.
    """
    total = torch.zeros((), dtype=torch.float64)
    device = None
    for t in tensors:
        if t is None:
            continue
        local, counted = _counts(t)
        device = local.device
        if counted and local.numel():
            total = total.to(local.device) + local.detach().float().pow(2).sum().double()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if device is None:
            from moreh_ap.runtime.dist import device_for_rank

            device = device_for_rank()
        total = total.to(device)
        dist.all_reduce(total)
    return total.sqrt().float()


@torch.no_grad()
def clip_grad_norm_(target, max_norm: float, *, eps: float = 1e-6) -> torch.Tensor:
    """Scale gradients so that their global norm is at most ``max_norm`` (torch's formula).

    Args:
        target: a :class:`~moreh_ap.runtime.ParallelModel` (tied copies counted once) or an
            iterable of parameters.
        max_norm: the largest allowed norm (> 0).

    Returns:
        The global norm before clipping (same on every rank).
    """
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or max_norm <= 0:
        raise ValueError(f"max_norm={max_norm!r} is not valid: expected a number > 0")
    if hasattr(target, "_norm_params"):
        counted, all_params = target._norm_params()
    else:
        all_params = [p for p in target if p.grad is not None]
        counted = all_params
    norm = global_norm([p.grad for p in counted if p.grad is not None])
    coef = float(torch.clamp(max_norm / (norm + eps), max=1.0))
    for p in all_params:
        if p.grad is not None:
            p.grad.mul_(coef)
    return norm
