# Optimizer state between ranks: rank 0's state laid onto every rank at parallelize, one-device state on rank 0.
"""The two collectives on the user's optimizer state (formats in :mod:`moreh_ap.runtime.optim_state`):

- :func:`carry_rank0_state`: the state the optimizer held when ``parallelize`` rebound it (loaded from a
  checkpoint or from earlier steps), taken from global rank 0 like the weights: rank 0 sends every other
  rank the full tensors of the parameters it holds (``dist.send`` in 64 MiB buckets), then each rank lays
  its shards;
- :func:`gather_one_device_state`: the whole optimizer state in one-device format on rank 0.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from moreh_ap.runtime.dist import rank, recv_tensors, send_tensors, world_size
from moreh_ap.runtime.optim_state import (OptimizerMap, lay_named_state, local_named_state, named_from_one_device,
                                          one_device_from_named, skeleton)

__all__ = ["carry_rank0_state", "gather_one_device_state"]


def _tensor_slots(state: dict[str, dict[str, Any]], names: list[str]) -> list[tuple[str, str]]:
    """(name, key) of every tensor value of ``names``' state, in a fixed order."""
    return [(n, k) for n in names if n in state for k in sorted(state[n], key=str)
            if isinstance(state[n][k], torch.Tensor)]


@torch.no_grad()
def carry_rank0_state(optimizer: torch.optim.Optimizer, before: dict[str, Any] | None, omap: OptimizerMap, *,
                      device: torch.device) -> None:
    """Lay rank 0's pre-``parallelize`` state onto this rank's rebound optimizer (every rank calls it).

    Args:
        optimizer: the rebound optimizer (its state already cleared).
        before: ``optimizer.state_dict()`` taken before rebinding (one-device format; only rank 0's is used).
        omap: the optimizer's map (this rank's parameters by canonical name).
        device: this rank's device (buckets are copied there while sent).
    """
    named = named_from_one_device(before, omap) if before is not None and rank() == 0 else None
    if world_size() == 1:
        if named is not None and named["state"]:
            lay_named_state(optimizer, named, omap)
        return
    box = [skeleton(named) if named is not None and named["state"] else None]
    dist.broadcast_object_list(box, src=0)
    shape = box[0]
    if shape is None:
        return  # rank 0 had no state: nothing to carry
    wanted: list[list[str]] | None = [None] * world_size() if rank() == 0 else None
    dist.gather_object(sorted(omap.local), wanted, dst=0)
    if rank() == 0:
        for r in range(1, world_size()):
            slots = _tensor_slots(named["state"], wanted[r])
            send_tensors([named["state"][n][k] for n, k in slots], dst=r, device=device)
        lay_named_state(optimizer, named, omap)
        return
    mine = {n: dict(shape["state"][n]) for n in sorted(omap.local) if n in shape["state"]}
    slots = _tensor_slots(mine, sorted(omap.local))
    for n, k in slots:
        meta = mine[n][k]
        mine[n][k] = torch.empty(meta.shape, dtype=meta.dtype, device=device)
    recv_tensors([mine[n][k] for n, k in slots], src=0)
    lay_named_state(optimizer, {"state": mine, "param_groups": shape["param_groups"]}, omap)


@torch.no_grad()
def gather_one_device_state(optimizer: torch.optim.Optimizer, omap: OptimizerMap, *,
                            dp_rank: int) -> dict[str, Any] | None:
    """The optimizer's whole state in one-device format on rank 0 (CPU tensors), None on other ranks.

    A collective: every rank calls it. DTensor shards are gathered whole over each data-parallel group;
    the data-parallel-index-0 rank of every pipeline rank sends its part to rank 0; a tied parameter held
    by several pipeline ranks appears once (its copies are equal).
    """
    named = local_named_state(optimizer, omap, full=True)
    cpu = {n: {k: (v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v) for k, v in st.items()}
           for n, st in named["state"].items()}
    if world_size() == 1:
        parts = [cpu]
    else:
        parts = [None] * world_size() if rank() == 0 else None
        dist.gather_object(cpu if dp_rank == 0 else {}, parts, dst=0)
        if rank() != 0:
            return None
    merged: dict[str, Any] = {}
    for part in parts:
        for n, st in part.items():
            merged.setdefault(n, st)
    return one_device_from_named({"state": merged, "param_groups": named["param_groups"]}, omap)
