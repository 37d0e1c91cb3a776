# Root detection: the patched nn.Module.__call__ that finds the model to parallelize and engages there.
"""The probe is ``nn.Module.__call__`` while AP is enabled and not engaged.

The first call of a module that is in training mode, runs with grad enabled and holds parameters of
an optimizer created meanwhile is the ROOT. Its enclosing calls are seen first, so the outermost
such module wins. At that call AP engages (:func:`moreh_ap.oneline.engage.engage`) and the probe is
removed, unless the script distributes itself (its own process group, DDP or FSDP): then AP stands aside
(:mod:`moreh_ap.oneline.aside`) and the script runs as written. (``Module._call_impl`` binds ``self.forward`` before hooks run, so a forward pre-hook could
not redirect the current call.)
"""
from __future__ import annotations

import torch
from torch import nn

from moreh_ap.log import logger
from moreh_ap.oneline.aside import stand_aside
from moreh_ap.oneline.engage import engage
from moreh_ap.oneline.state import STATE, Internal, cuda_available, has_trainable, internal
from moreh_ap.precision_hooks import model_param

__all__ = ["probe_call", "remove_probe", "is_root"]


def _optimizer_param_ids() -> set[int]:
    # an fp32 master (apex O2, made before the first forward by a zero_grad) counts as its model parameter
    return {id(model_param(p)) for o in list(STATE.optimizers) for g in o.param_groups for p in g["params"]}


def is_root(module: nn.Module) -> bool:
    """Whether this call of ``module`` is the root's first training forward (warns once if no optimizer exists)."""
    if not module.training or not torch.is_grad_enabled():
        return False
    ids = _optimizer_param_ids()
    if not ids:
        if has_trainable(module) and "no-optimizer" not in STATE.warned:
            STATE.warned.add("no-optimizer")
            logger.warning("Advanced parallelization waits for an optimizer over the model's parameters: "
                           "create it before the first training forward (this forward runs on one device).")
        return False
    return any(id(p) in ids for p in module.parameters() if p.requires_grad)


def probe_call(self, *args, **kwargs):
    """``nn.Module.__call__`` until engagement: plain torch, except at the root's first training forward."""
    original = STATE.originals.get("call") or nn.Module._wrapped_call_impl
    if STATE.engaged or internal() or not is_root(self):
        if self in STATE.deferred and cuda_available():
            STATE.deferred.discard(self)  # a deferred module used on its own: place it now
            with Internal():
                self.cuda()
        return original(self, *args, **kwargs)
    if stand_aside(self):  # the script distributes itself: every hook is gone, it runs as written
        return original(self, *args, **kwargs)
    remove_probe()
    STATE.engaged = True
    engine = engage(self, args, kwargs)
    return engine.call(self, args, kwargs, broadcast=False)


def remove_probe() -> None:
    """Give ``nn.Module.__call__`` back to torch (when the probe is the one in place)."""
    if "call" in STATE.originals and nn.Module.__call__ is probe_call:
        nn.Module.__call__ = STATE.originals["call"]
