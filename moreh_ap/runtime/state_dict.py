# The full, unsharded state dict of a parallelized model, with the original names, gathered on rank 0.
from __future__ import annotations

import torch
import torch.distributed as dist

from moreh_ap.optim.norms import is_dtensor
from moreh_ap.runtime.apply import Stage, Wrapper, local_module
from moreh_ap.runtime.dist import rank, world_size
from moreh_ap.models import clean_name

__all__ = ["full_state_dict"]


@torch.no_grad()
def full_state_dict(stages: list[Stage], wrapper: Wrapper, *, keys: list[str], dp_rank: int) -> dict[str, torch.Tensor]:
    """Full weights of the model on rank 0 (``{}`` elsewhere), in the order of ``keys`` (its original names).

    A collective: every rank calls it. Sharded tensors are gathered whole; tied ones appear under each name;
    the dp-index-0 rank of every pipeline rank sends its stages' tensors (on the CPU) to rank 0.

    Args:
        stages: this rank's stages (their ``names`` map stage names to original names).
        wrapper: the data-parallel wrapper around them.
        keys: the original model's state-dict keys.
        dp_rank: this rank's data-parallel coordinate.

    Raises:
        RuntimeError: some key is held by no rank.
    """
    mine: dict[str, torch.Tensor] = {}
    for st in stages:
        for n, t in local_module(st, wrapper).state_dict().items():
            full = t.full_tensor() if is_dtensor(t) else t
            for orig in st.names.get(clean_name(n), []):
                mine.setdefault(orig, full.detach().cpu().clone())
    world = world_size()
    if world == 1:
        gathered = [mine]
    else:
        gathered = [None] * world if rank() == 0 else None
        dist.gather_object(mine if dp_rank == 0 else {}, gathered, dst=0)
        if rank() != 0:
            return {}
    merged: dict[str, torch.Tensor] = {}
    for part in gathered:
        for k, v in part.items():
            merged.setdefault(k, v)
    missing = [k for k in keys if k not in merged]
    if missing:
        raise RuntimeError(f"full_state_dict: no rank held {missing[:5]}")
    return {k: merged[k] for k in keys}
