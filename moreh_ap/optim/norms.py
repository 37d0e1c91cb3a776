# Norms of tensors that may be DTensor shards: local shards, replica counting, whole-tensor and total norms.
"""The one norm implementation of the library (FusedLAMB and the runtime's global norm read it).

- :func:`local_shard` / :func:`counted_here`: a DTensor's local shard, and whether this rank counts
  it (only the rank at coordinate 0 of every ``Replicate`` mesh dim does, so a replicated value is
  counted once);
- :func:`per_tensor_norms`: the 2-norm of each WHOLE tensor (a DTensor shard's norm is reduced over
  its mesh's ``Shard`` dims by DTensor itself);
- :func:`total_norm`: one 2-norm over a list of tensors (the whole tensors for DTensors; plain
  tensors are this rank's own);
- :func:`squared_sum`: this rank's counted share of the sum of squares, before any reduction over
  ranks (the runtime all-reduces it over the world for a norm across pipeline stages).

Imports nothing from ``moreh_ap``.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist

if dist.is_available():
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
else:  # a torch build without torch.distributed: no DTensor can exist
    DTensor = Partial = Replicate = Shard = None

__all__ = ["is_dtensor", "local_shard", "counted_here", "per_tensor_norms", "total_norm", "squared_sum"]

_FLOAT32 = torch.float32


def is_dtensor(t: object) -> bool:
    """Is ``t`` a DTensor (a shard or replica of a tensor spread over a device mesh)?"""
    return DTensor is not None and isinstance(t, DTensor)


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (a view: in-place writes reach the DTensor), else ``t``."""
    return t.to_local() if is_dtensor(t) else t


def counted_here(t: torch.Tensor, *, dp_rank: int | None = None) -> bool:
    """Does this rank count ``t`` in a norm summed over ranks?

    Args:
        t: a tensor of this rank.
        dp_rank: for plain tensors replicated over data parallelism (as under DDP), this rank's
            data-parallel coordinate: they count on dp rank 0 only. None: plain tensors are this
            rank's own and count here. DTensors count at coordinate 0 of every ``Replicate`` mesh dim.
    """
    if is_dtensor(t):
        coord = t.device_mesh.get_coordinate() or []
        return all(c == 0 for c, p in zip(coord, t.placements) if isinstance(p, Replicate))
    return dp_rank is None or dp_rank == 0


def squared_sum(tensors: Iterable[torch.Tensor | None], *, dp_rank: int | None = None
                ) -> tuple[torch.Tensor, torch.device | None]:
    """This rank's counted share of the sum of squares of ``tensors`` (fp64 scalar), and the device of the
    last local shard seen (None when this rank holds no tensor). ``None`` entries are skipped; see
    :func:`counted_here` for ``dp_rank``."""
    total = torch.zeros((), dtype=torch.float64)
    device = None
    for t in tensors:
        if t is None:
            continue
        local = local_shard(t)
        device = local.device
        if counted_here(t, dp_rank=dp_rank) and local.numel():
            total = total.to(local.device) + local.detach().float().pow(2).sum().double()
    return total, device


def per_tensor_norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """2-norm of each tensor in fp32, stacked into one 1-D tensor (no host sync).

    For a DTensor (e.g. an FSDP2 shard) it is the norm of the WHOLE tensor: the squared local norms
    of sharded entries are summed over their mesh's Shard dims by DTensor itself (a
    ``Partial("sum")`` -> ``Replicate`` redistribution), one reduction per (mesh, placements).

    Raises:
        NotImplementedError: a DTensor placed other than by ``Shard`` / ``Replicate``.
    """
    if not tensors:
        return torch.zeros(0, dtype=_FLOAT32)
    if not any(is_dtensor(t) for t in tensors):
        return torch.stack(torch._foreach_norm(tensors, 2, dtype=_FLOAT32))
    squares = torch.stack(torch._foreach_norm([local_shard(t) for t in tensors], 2, dtype=_FLOAT32)) ** 2
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        if is_dtensor(t) and not all(isinstance(pl, Replicate) for pl in t.placements):
            if not all(isinstance(pl, (Shard, Replicate)) for pl in t.placements):
                raise NotImplementedError(f"FusedLAMB: a DTensor with placements {t.placements} (only Shard "
                                          "and Replicate parameters are supported)")
            groups.setdefault((t.device_mesh, tuple(t.placements)), []).append(i)
    for (mesh, placements), idx in groups.items():
        index = torch.tensor(idx, device=squares.device)
        partial = [Replicate() if isinstance(pl, Replicate) else Partial("sum") for pl in placements]
        whole = DTensor.from_local(squares.index_select(0, index), mesh, partial, run_check=False).full_tensor()
        squares = squares.index_copy(0, index, whole.to(squares.device))
    return squares.sqrt()


def total_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One 2-norm over all ``tensors`` (any float dtypes), computed in fp32; 0-dim tensor.

    DTensors count as whole tensors (:func:`per_tensor_norms`); plain tensors are this rank's own
    (no reduction over ranks). Plain tensors on several devices are reduced on the first one's.
    """
    if not tensors:
        return torch.zeros((), dtype=_FLOAT32)
    if any(is_dtensor(t) for t in tensors):
        return per_tensor_norms(tensors).pow(2).sum().sqrt()
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        by_device.setdefault(t.device, []).append(t)
    device = tensors[0].device
    squares = [
        torch.linalg.vector_norm(torch.stack(torch._foreach_norm(group, 2, dtype=_FLOAT32))).to(device) ** 2
        for group in by_device.values()
    ]
    return torch.stack(squares).sum().sqrt()
