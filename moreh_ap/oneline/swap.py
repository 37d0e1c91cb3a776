# The class swap: the engaged root's class becomes a same-named subclass whose methods go through the engine.
"""After engagement ``model(...)``, ``state_dict()``, ``load_state_dict()``, ``save_pretrained()``, ``.to()``/``.cuda()``/``.cpu()``
and ``generate()`` of the root model act on the parallelized model; ``isinstance`` still holds."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moreh_ap.faults import check_usable
from moreh_ap.oneline.state import STATE, Internal, internal
from moreh_ap.oneline.state_dicts import load_model_state_dict
from moreh_ap.runtime.dist import rank, world_size

__all__ = ["swap_class"]


def swap_class(root: nn.Module, user_class: type) -> None:
    """``root``'s class becomes a subclass of its current one that runs the engine, named as the user's."""
    base = type(root)
    ns = {
        "__call__": _swapped_call,
        "state_dict": _swapped_state_dict,
        "load_state_dict": _swapped_load_state_dict,
        "to": _swapped_to,
        "cuda": _swapped_cuda,
        "cpu": _swapped_cpu,
        "__module__": user_class.__module__,
        "__qualname__": user_class.__qualname__,
    }
    if hasattr(base, "save_pretrained"):
        ns["save_pretrained"] = _swapped_save_pretrained
    if hasattr(base, "generate"):
        ns["generate"] = _swapped_generate
    root.__class__ = type(user_class.__name__, (base,), ns)


def _swapped_call(self, *args, **kwargs):
    if internal():
        return super(type(self), self).__call__(*args, **kwargs)
    return STATE.engines[self].call(self, args, kwargs)


def _swapped_state_dict(self, *args, **kwargs):
    if internal() or args or kwargs.get("destination") is not None or kwargs.get("prefix"):
        return super(type(self), self).state_dict(*args, **kwargs)
    return _full_state_dict(self)


def _full_state_dict(root: nn.Module) -> dict:
    """The engine's full state dict, passed through ``root``'s own state-dict hooks when no stage ran them (the
    pipeline stages are new modules around the model's parts; e.g. apex O2's hook returns fp32 tensors)."""
    engine = STATE.engines[root]
    state = engine.full_state_dict()
    if any(m is root for m in engine.pm.stage_modules.modules()):
        return state  # the root is (inside) a stage: its state_dict() ran its hooks
    metadata = {"version": getattr(root, "_version", None)}
    for hook in list(root._state_dict_hooks.values()):
        result = hook(root, state, "", metadata)
        if result is not None:
            state = result
    return state


def _swapped_load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
    """The full one-device ``state_dict`` (every rank passes it whole): each rank copies its stages and shards."""
    if internal():
        return super(type(self), self).load_state_dict(state_dict, strict=strict, assign=assign)
    if assign:
        raise NotImplementedError("advanced parallelization: model.load_state_dict(..., assign=True) after AP "
                                  "engaged is not supported (the plan placed the weights); use assign=False")
    return load_model_state_dict(STATE.engines[self].pm, state_dict, strict=strict)


def _swapped_to(self, *args, **kwargs):
    if internal():
        return super(type(self), self).to(*args, **kwargs)
    _device, dtype, _nb, _fmt = torch._C._nn._parse_to(*args, **kwargs)
    if dtype is not None:
        raise NotImplementedError(f"advanced parallelization: model.to({dtype}) after AP engaged is not supported; "
                                  "convert the state_dict() (full weights on the CPU) instead")
    return self  # the plan placed the weights; state_dict()/save_pretrained() give full CPU copies


def _swapped_cuda(self, device=None):
    return super(type(self), self).cuda(device) if internal() else self


def _swapped_cpu(self):
    return super(type(self), self).cpu() if internal() else self


def _swapped_save_pretrained(self, save_directory, *args, **kwargs):
    """Full trained weights, written once by rank 0 (a collective: every rank calls it)."""
    if internal():
        return super(type(self), self).save_pretrained(save_directory, *args, **kwargs)
    check_usable("save_pretrained()")  # a collective: not after this rank's own failure
    state = kwargs.pop("state_dict", None)
    if state is None:
        state = _full_state_dict(self)
    result = None
    if rank() == 0:
        with Internal():
            result = super(type(self), self).save_pretrained(save_directory, *args, state_dict=state, **kwargs)
    if world_size() > 1:
        dist.barrier()  # the other ranks may read the files right after
    return result


def _swapped_generate(self, *args, **kwargs):
    pp = STATE.engines[self].pm.pp
    if pp > 1:
        raise NotImplementedError("advanced parallelization: generate() is not supported on a pipelined model "
                                  f"(num_stages={pp}); save_pretrained() and generate from "
                                  "the reloaded model, or pin num_stages=1")
    return super(type(self), self).generate(*args, **kwargs)
