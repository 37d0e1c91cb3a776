# Construction steps of a ParallelModel: rank 0's weights into this rank's stages, wrapping, optimizer rebinding.
"""The parts of ``parallelize`` that change the user's objects, in the order it runs them:

1. :func:`copy_rank0_weights`: global rank 0's values into this rank's stage tensors;
2. :func:`wrap_stages`: recompute wrappers, then FSDP2 / replicate / DDP over the dp mesh;
3. :func:`rebind_optimizer`: the user's optimizer over this rank's (possibly sharded) parameters, with
   the state it held (rank 0's) laid onto them.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
import torch.distributed as dist

from moreh_ap.config import ParallelConfig
from moreh_ap.layout import ParallelLayout
import moreh_ap.runtime.apply as A
from moreh_ap.runtime.dist import (BUCKET_BYTES, device_for_rank, module_tensors, rank, recv_tensors, send_tensors,
                                   world_size)
from moreh_ap.precision_hooks import release_masters, set_overflow_sync
from moreh_ap.runtime.grad_scaler import install as install_grad_scaler_hooks
from moreh_ap.runtime.optim_state import OptimizerMap, plain_class, register_map
from moreh_ap.runtime.optim_transfer import carry_rank0_state
from moreh_ap.models import ModelAdapter

__all__ = ["copy_rank0_weights", "wrap_stages", "rebind_optimizer"]


@torch.no_grad()
def copy_rank0_weights(adapter: ModelAdapter, stages: list[A.Stage], *, layout: ParallelLayout,
                       ranges: list[tuple[int, int]], mesh: Any, dp_rank: int, device: torch.device,
                       tp_rank: int = 0) -> None:
    """Global rank 0's values into this rank's stage tensors (already on this rank's device).

    Rank 0 holds the whole model (its own stages on its device, the rest where the user left
    them): it sends pp rank p's stage tensors to the (dp, tp)-index-0 rank of pp rank p, one bucket
    at a time copied to its device (NCCL sends device memory; gloo takes either); then every pp
    rank's dp group broadcasts from its dp-index-0 rank, as DDP does at construction, and every
    tensor-parallel group from its tp-index-0 rank (before tensor parallelism splits anything).
    """
    if mesh is None:
        return
    mine = [t.detach() for t in module_tensors([st.module for st in stages])]  # same storage, no autograd
    if layout.pp > 1:
        if rank() == 0:
            for p in range(1, layout.pp):
                theirs = A.apply_pipeline(adapter, layout, pp_rank=p, ranges=ranges)
                send_tensors(module_tensors([st.module for st in theirs]), dst=layout.rank(pp=p, dp=0),
                             device=device)
        elif dp_rank == 0 and tp_rank == 0:
            recv_tensors(mine, src=0)
    if layout.dp > 1:
        dist._broadcast_coalesced(mesh.get_group("dp"), mine, BUCKET_BYTES, 0)
    if layout.tp > 1:
        dist._broadcast_coalesced(mesh.get_group("tp"), mine, BUCKET_BYTES, 0)


def wrap_stages(stages: list[A.Stage], config: ParallelConfig, *, layout: ParallelLayout, mesh: Any) -> A.Wrapper:
    """Recompute wrappers (``config.recomputation``), then the data-parallel wrapper; returns which one.

    FSDP2 with ``distribute_param``; else FSDP-based replicate inside a pipeline or with tensor parallelism
    (DDP cannot broadcast DTensor parameters), DDP otherwise (dp > 1); nothing without a process group.
    """
    if config.recomputation:
        for st in stages:
            A.apply_recompute(st)
    wrapper = A.Wrapper.NONE
    if mesh is None:
        return wrapper
    dp_mesh = mesh["dp"]
    for st in stages:
        if config.distribute_param:
            A.apply_fsdp(st, config, dp_mesh)
            wrapper = A.Wrapper.FSDP
        elif layout.pp > 1 or (layout.tp > 1 and layout.dp > 1):
            A.apply_replicate(st, config, dp_mesh)
            wrapper = A.Wrapper.REPLICATE
        elif layout.dp > 1:
            A.apply_ddp(st, dp_mesh)
            wrapper = A.Wrapper.DDP
    return wrapper


def rebind_optimizer(optimizer: torch.optim.Optimizer, ids: dict[int, list[str]], *, stages: list[A.Stage],
                     wrapper: A.Wrapper, relays: dict | None = None) -> OptimizerMap:
    """Point ``optimizer``'s param groups at this rank's parameters (same groups and hyper-parameters).

    A parameter held by no stage of this rank leaves its group; a tied one appears once. State the
    optimizer already holds (loaded from a checkpoint, or from earlier steps) is taken from global rank 0
    and laid onto this rank's parameters (:func:`moreh_ap.runtime.optim_transfer.carry_rank0_state`, a
    collective). The returned map (also kept for the optimizer, :func:`moreh_ap.runtime.optim_state.map_of`)
    relates the rebound parameters to the user's one-device indices; ``relays`` (original name -> re-lay of a
    parameter held in tensor-parallel order) lets it lay and gather their state in one-device order.

    Raises:
        ValueError: the optimizer holds a parameter that is not in the model.
    """
    release_masters(optimizer)  # fp32 masters of a mixed-precision optimizer (apex O2): its model params back
    by_name = {}
    for names, p in A.named_local_params(stages, wrapper):
        for n in names:
            by_name[n] = p
    for group in optimizer.param_groups:
        if any(ids.get(id(p)) is None for p in group["params"]):
            raise ValueError("parallelize: the optimizer holds a parameter that is not in the model")
    before = plain_class(optimizer).state_dict(optimizer) if len(optimizer.state) > 0 else None
    omap = OptimizerMap(group_names=[[ids[id(p)][0] for p in g["params"]] for g in optimizer.param_groups],
                        relays=dict(relays or {}))
    used = set()
    for group in optimizer.param_groups:
        new = []
        for p in group["params"]:
            names = ids[id(p)]
            q = next((by_name[n] for n in names if n in by_name), None)
            if q is not None and id(q) not in used:
                used.add(id(q))
                new.append(q)
                omap.local[names[0]] = q
        group["params"] = new
    optimizer.state = defaultdict(dict)
    register_map(optimizer, omap)
    carry_rank0_state(optimizer, before, omap, device=device_for_rank())
    install_grad_scaler_hooks()  # torch.amp.GradScaler: its scale seeds own-loss backwards; ranks agree (below)
    if world_size() > 1:  # a loss scaler sees this rank's gradients only: the ranks agree on an overflow
        set_overflow_sync(optimizer, _any_rank)
    return omap


def _any_rank(found: bool) -> bool:
    """Whether ``found`` is True on any rank (an all-reduce over the world: every rank calls it)."""
    flag = torch.tensor([1.0 if found else 0.0], device=device_for_rank())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())
