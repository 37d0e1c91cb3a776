# Full, unsharded state dicts of a parallelized model with the original names: gathered on rank 0, loaded on every rank.
from __future__ import annotations

import torch
import torch.distributed as dist

from moreh_ap.models.tp_plan import Relay, from_tp_order, to_tp_order
from moreh_ap.optim.norms import is_dtensor
from moreh_ap.runtime.apply import Stage, Wrapper, local_module
from moreh_ap.runtime.dist import rank, world_size
from moreh_ap.models import clean_name

__all__ = ["copy_full_into", "full_state_dict", "load_full_state_dict", "reshard_fsdp"]


@torch.no_grad()
def full_state_dict(stages: list[Stage], wrapper: Wrapper, *, keys: list[str], dp_rank: int,
                    tied: list[list[str]] = (), relays: dict[str, Relay] | None = None,
                    tp_rank: int = 0) -> dict[str, torch.Tensor]:
    """Full weights of the model on rank 0 (``{}`` elsewhere), in the order of ``keys`` (its original names).

    A collective: every rank calls it. Sharded tensors are gathered whole; tied ones appear under each name as
    ONE tensor object, as on one device (so ``save_pretrained``/safetensors see the tie and store it once);
    the (dp, tp)-index-0 rank of every pipeline rank sends its stages' tensors (on the CPU) to rank 0; tensors
    re-laid for tensor parallelism are put back in one-device order.

    Args:
        stages: this rank's stages (their ``names`` map stage names to original names).
        wrapper: the data-parallel wrapper around them.
        keys: the original model's state-dict keys.
        dp_rank: this rank's data-parallel coordinate.
        tied: groups of original names that share one parameter.
        relays: original names of parameters re-laid for tensor parallelism -> their re-lay.
        tp_rank: this rank's tensor-parallel coordinate.

    Raises:
        RuntimeError: some key is held by no rank.
    """
    mine: dict[str, torch.Tensor] = {}
    for st in stages:
        for n, t in local_module(st, wrapper).state_dict().items():
            full = t.full_tensor() if is_dtensor(t) else t
            for orig in st.names.get(clean_name(n), []):
                mine.setdefault(orig, from_tp_order(full.detach(), (relays or {}).get(orig)).cpu().clone())
    world = world_size()
    if world == 1:
        gathered = [mine]
    else:
        gathered = [None] * world if rank() == 0 else None
        dist.gather_object(mine if dp_rank == 0 and tp_rank == 0 else {}, gathered, dst=0)
        if rank() != 0:
            return {}
    merged: dict[str, torch.Tensor] = {}
    for part in gathered:
        for k, v in part.items():
            merged.setdefault(k, v)
    for names in tied:
        held = next((merged[n] for n in names if n in merged), None)
        for n in names:
            if held is not None and n in merged:
                merged[n] = held
    missing = [k for k in keys if k not in merged]
    if missing:
        raise RuntimeError(f"full_state_dict: no rank held {missing[:5]}")
    return {k: merged[k] for k in keys}


@torch.no_grad()
def load_full_state_dict(stages: list[Stage], wrapper: Wrapper, state_dict: dict[str, torch.Tensor], *,
                         keys: list[str], strict: bool = True, relays: dict[str, Relay] | None = None):
    """Copy a full one-device state dict (original names) into this rank's stages (no communication).

    Every rank passes the whole dict; each copies the tensors its stages hold, a DTensor shard taking its
    own slice (after a re-lay for tensor parallelism, ``relays``); a tied tensor held on several ranks is filled
    on each (from whichever of its names is present).

    Returns:
        torch's ``(missing_keys, unexpected_keys)`` named tuple, as ``nn.Module.load_state_dict``.

    Raises:
        RuntimeError: ``strict`` and keys are missing or unexpected, or a tensor's shape differs.
    """
    from torch.nn.modules.module import _IncompatibleKeys

    known = set(keys)
    missing = [k for k in keys if k not in state_dict]
    unexpected = [k for k in state_dict if k not in known]
    if strict and (missing or unexpected):
        raise RuntimeError(f"Error(s) in loading state_dict: missing keys {missing[:8]}, unexpected keys "
                           f"{unexpected[:8]} (the model's original names are expected, as on one device)")
    for st in stages:
        module = local_module(st, wrapper)
        reshard_fsdp(module)
        for n, t in list(module.named_parameters()) + list(module.named_buffers()):
            orig = next((o for o in st.names.get(clean_name(n), []) if o in state_dict), None)
            if orig is not None:
                copy_full_into(t, to_tp_order(state_dict[orig], (relays or {}).get(orig)), name=clean_name(n))
    return _IncompatibleKeys(missing, unexpected)


def reshard_fsdp(module: torch.nn.Module) -> None:
    """FSDP2 units back to their sharded parameters (those are the ones kept between steps)."""
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def copy_full_into(t: torch.Tensor, full: torch.Tensor, *, name: str) -> None:
    """Copy the whole tensor ``full`` into ``t`` (a DTensor takes its own slice; no communication).

    Raises:
        RuntimeError: the shapes differ (``name`` is the parameter's name in the message).
    """
    if tuple(full.shape) != tuple(t.shape):
        raise RuntimeError(f"load_state_dict: size mismatch for {name}: the checkpoint has {tuple(full.shape)}, "
                           f"the model {tuple(t.shape)}")
    if is_dtensor(t):
        from torch.distributed.tensor import distribute_tensor

        local = t.to_local()
        part = distribute_tensor(full.detach().to(local.device), t.device_mesh, t.placements, src_data_rank=None)
        local.copy_(part.to_local())
    else:
        t.detach().copy_(full)
