# One-device-format state dicts of an engaged model and its optimizer: full on rank 0, loaded on every rank.
"""After engagement ``model.state_dict()`` / ``optimizer.state_dict()`` give what one device would (original
names; the optimizer's indices in the user's group order; full CPU tensors) on rank 0, and the same
structure on the other ranks with meta tensors (shape and dtype, no data) in place of the tensors: both
are collectives. ``load_state_dict`` of either takes the whole one-device dict on every rank; each rank
lays its own stages and shards. The user's optimizer object keeps its class's name and ``isinstance``; its
class becomes a same-named view (:func:`swap_optimizer`) whose two state-dict methods go through here.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
import torch.distributed as dist

from moreh_ap.faults import check_usable
from moreh_ap.oneline.state import Internal, internal
from moreh_ap.runtime.dist import rank, world_size
from moreh_ap.runtime.optim_state import skeleton

__all__ = ["model_state_dict", "load_model_state_dict", "optimizer_state_dict", "load_optimizer_state_dict",
           "swap_optimizer"]


def _rank0_with_placeholders(value: Any) -> Any:
    """Rank 0's ``value``; on the other ranks its :func:`~moreh_ap.runtime.optim_state.skeleton` (meta tensors)."""
    if world_size() == 1:
        return value
    box = [skeleton(value) if rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return value if rank() == 0 else box[0]


def model_state_dict(pm) -> OrderedDict[str, torch.Tensor]:
    """Full weights (CPU, original names, tied ones under each name as one device gives them) on rank 0;
    meta placeholders of the same keys elsewhere. An ``OrderedDict``, as ``nn.Module.state_dict()`` returns
    (accelerate's ``save_state`` drops tied duplicates before safetensors only from one). A collective."""
    check_usable("model.state_dict()")  # a collective: not after this rank's own failure
    with Internal():
        return _rank0_with_placeholders(OrderedDict(pm.full_state_dict()))


def load_model_state_dict(pm, state_dict: dict[str, torch.Tensor], strict: bool = True):
    """Every rank copies its stages' and shards' part of the full one-device ``state_dict`` (no communication)."""
    with Internal():
        return pm.load_full_state_dict(state_dict, strict=strict)


def optimizer_state_dict(pm) -> dict[str, Any]:
    """The optimizer's one-device state dict on rank 0 (meta placeholders elsewhere). A collective."""
    check_usable("optimizer.state_dict()")  # a collective: not after this rank's own failure
    with Internal():
        return _rank0_with_placeholders(pm.optimizer_state_dict())


def load_optimizer_state_dict(pm, state_dict: dict[str, Any]) -> None:
    """Every rank lays its parameters' part of the one-device optimizer ``state_dict`` (no communication)."""
    with Internal():
        pm.load_optimizer_state_dict(state_dict)


def swap_optimizer(optimizer: torch.optim.Optimizer, pm) -> None:
    """``optimizer``'s class becomes a same-named subclass whose ``state_dict`` / ``load_state_dict`` use the
    one-device format of ``pm``'s model (the library's own calls, under ``Internal``, see the rebound one)."""
    base = type(optimizer)

    def state_dict(self):
        if internal():
            return base.state_dict(self)
        return optimizer_state_dict(pm)

    def load_state_dict(self, state_dict):
        if internal():
            return base.load_state_dict(self, state_dict)
        return load_optimizer_state_dict(pm, state_dict)

    ns = {"state_dict": state_dict, "load_state_dict": load_state_dict, "_moreh_ap_view": True,
          "__module__": base.__module__, "__qualname__": base.__qualname__}
    optimizer.__class__ = type(base.__name__, (base,), ns)
