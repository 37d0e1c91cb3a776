# torch.amp.GradScaler over an optimizer whose gradients AP spread over ranks: every rank sees the same inf/NaN verdict.
"""A ``GradScaler`` looks for inf/NaN gradients in what ``unscale_`` sees: this rank's shards (FSDP2) or stages
(pipelines) only. Ranks that disagree go apart silently: one skips the step and halves its scale, another steps
(clipping by the global norm then zeroes its gradients, momentum and weight decay still move it). torch's
``ShardedGradScaler`` (FSDP1) all-reduces the verdict; here ``GradScaler.unscale_`` itself does, for optimizers
AP rebound over several ranks (:func:`moreh_ap.precision_hooks.set_overflow_sync`), so a script's own scaler
(nanoGPT's fp16 path, accelerate's and the HF Trainer's ``fp16=True``) keeps one device's behaviour. One all-reduce
(MAX) of a one-element tensor on the gradients' device per ``unscale_``; no host synchronization is added.
Other optimizers and a disabled scaler are untouched. The wrapper also tells the optimizer where the scaler's
current scale comes from (:func:`moreh_ap.precision_hooks.set_loss_scale_source`): the one-line mode seeds a
model's own backward with it.
"""
from __future__ import annotations

import functools
import weakref
from typing import Callable

import torch
import torch.distributed as dist

from moreh_ap.precision_hooks import overflow_synced, set_loss_scale_source

__all__ = ["install"]

_MARK = "_moreh_ap_wrapped"


def install() -> None:
    """Wrap ``torch.amp.GradScaler.unscale_`` once per process (idempotent); subclasses that override it (e.g.
    ``ShardedGradScaler``) keep their own."""
    scaler = torch.amp.GradScaler
    if getattr(scaler.unscale_, _MARK, False):
        return
    original = scaler.unscale_

    @functools.wraps(original)
    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        original(self, optimizer)
        if not self._enabled:
            return
        set_loss_scale_source(optimizer, _current_scale(self))
        if overflow_synced(optimizer) and dist.is_initialized():
            _agree(self._per_optimizer_states[id(optimizer)]["found_inf_per_device"], self._scale.device)

    setattr(unscale_, _MARK, True)
    scaler.unscale_ = unscale_


def _current_scale(scaler) -> Callable[[], float]:
    """The scale ``scaler.scale(loss)`` applies next (1.0 once the scaler is gone): what the one-line mode seeds a
    model's own backward with (:func:`moreh_ap.precision_hooks.loss_scale_of`)."""
    ref = weakref.ref(scaler)

    def current() -> float:
        alive = ref()
        return alive.get_scale() if alive is not None else 1.0

    return current


def _agree(found_per_device: dict, device: torch.device) -> None:
    """Make every rank's ``found_inf`` tensors 1 when any rank found an inf/NaN (each rank calls this once)."""
    flag = torch.zeros(1, device=device)
    for found in found_per_device.values():
        flag = torch.maximum(flag, found.to(device).reshape(1))
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    for found in found_per_device.values():
        found.copy_(torch.maximum(found, flag.to(found.device).reshape(found.shape)))
