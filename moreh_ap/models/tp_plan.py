# TPPlan: a model family's tensor-parallel plan, and the q/k/v re-lay that fused projections need before a column split.
"""What a family's :meth:`~moreh_ap.models.base.ModelAdapter.tp_plan` returns, read by
:mod:`moreh_ap.runtime.tp`.

A fused projection holding ``n`` projections side by side on one dimension (GPT-2's ``c_attn``: q, k and v,
each of ``heads * head_dim`` columns) cannot be column-split as it is: rank ``r`` would get some of q's heads
and none of k's. :func:`relay_permutation` gives the order in which every tensor-parallel rank's contiguous
chunk holds ``[q_r, k_r, v_r]`` (its own heads of each): the runtime re-lays the parameter into it before the
split (:func:`to_tp_order`) and back for every one-device view (:func:`from_tp_order`: full state dicts,
optimizer state).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["TPPlan", "Relay", "relay_permutation", "split_kind", "to_tp_order", "from_tp_order"]


@dataclass(kw_only=True, slots=True)
class TPPlan:
    """How a family's modules are split over a tensor-parallel group (Megatron-style column / row splits)."""

    block: dict[str, Any]
    """``{FQN inside a block: torch ParallelStyle}`` applied to every block (``parallelize_module``'s plan)."""
    outer: dict[str, Any] = field(default_factory=dict)
    """``{FQN in the model: ParallelStyle}`` for modules outside the blocks (embedding, head), applied where
    this rank's stages hold them. A tied embedding and head must both shard the tied weight the same way."""
    divisible: dict[str, int] = field(default_factory=dict)
    """``{what: count}`` that the tp degree must divide (attention heads, key/value heads)."""
    relay: dict[str, tuple[int, int]] = field(default_factory=dict)
    """``{parameter FQN inside a block: (dim, n)}``: parameters holding ``n`` projections side by side on
    ``dim`` (re-laid per rank before the split, see :func:`relay_permutation`)."""
    sequence_parallel: bool = False
    """The plan keeps the residual stream between the blocks sequence-sharded (``Shard(1)`` DTensors: norms,
    dropout and residual adds on 1/tp of the tokens). A pipeline stage then sends its rank's sequence shard
    and the next stage's forward rebuilds the DTensor (the stage's ``sequence_mesh``)."""
    local_attrs: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """``{module FQN inside a block: (attribute, ...)}``: integer attributes that count a split dimension
    (GPT-2 attention's ``split_size`` and ``num_heads``): divided by the tp degree, so the module's own
    forward works on its local shard."""


def split_kind(style: Any) -> str | None:
    """"column" or "row" for a style that splits its module's parameters (torch's Colwise/RowwiseParallel and
    their subclasses); None for one that only lays inputs / outputs or replicates (sequence parallelism on
    norms, gathers, replicated parameters)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    if isinstance(style, ColwiseParallel):
        return "column"
    if isinstance(style, RowwiseParallel):
        return "row"
    return None


@dataclass(frozen=True, slots=True)
class Relay:
    """A parameter re-laid into tensor-parallel order on ``dim``: ``tp_order = one_device.index_select(dim, perm)``."""

    dim: int
    """The dimension holding the fused projections."""
    perm: torch.Tensor
    """Index of the one-device position of every tensor-parallel position."""


def relay_permutation(size: int, *, n: int, tp: int) -> torch.Tensor:
    """The tensor-parallel order of a dimension of ``size`` holding ``n`` equal parts side by side.

    Part ``i`` (e.g. q, k, v) is cut into ``tp`` chunks; rank ``r``'s contiguous block is then
    ``[part_0 chunk r, part_1 chunk r, ...]``.

    >>> relay_permutation(6, n=3, tp=2).tolist()
    [0, 2, 4, 1, 3, 5]

    Raises:
        ValueError: ``size`` is not divisible by ``n * tp``.
    """
    if size % (n * tp):
        raise ValueError(f"tensor parallelism: a fused dimension of {size} holding {n} parts cannot be split "
                         f"over tp={tp} (not divisible by {n * tp})")
    part, chunk = size // n, size // (n * tp)
    idx = [torch.arange(i * part + r * chunk, i * part + (r + 1) * chunk) for r in range(tp) for i in range(n)]
    return torch.cat(idx)


def to_tp_order(t: torch.Tensor, relay: Relay | None) -> torch.Tensor:
    """A one-device tensor in tensor-parallel order (``t`` itself without a relay or for scalars)."""
    if relay is None or t.dim() <= relay.dim or t.shape[relay.dim] != relay.perm.numel():
        return t
    return t.index_select(relay.dim, relay.perm.to(t.device))


def from_tp_order(t: torch.Tensor, relay: Relay | None) -> torch.Tensor:
    """A whole tensor in tensor-parallel order back in one-device order."""
    if relay is None or t.dim() <= relay.dim or t.shape[relay.dim] != relay.perm.numel():
        return t
    inverse = torch.argsort(relay.perm)
    return t.index_select(relay.dim, inverse.to(t.device))
