# How a mixed-precision library (apex's amp) tells AP what it did: fp32 masters, an autocast forward, its level.
"""A small protocol between a mixed-precision wrapper and the parallel runtime, so that neither imports the
other (``moreh_ap.apex`` sets these marks; ``moreh_ap.runtime`` / ``moreh_ap.oneline`` read them):

- **masters**: an optimizer that steps fp32 copies of low-precision model parameters (apex O2) marks each
  copy with :func:`mark_master`; AP's optimizer-state mapping and gradient norm then treat the copy as the
  parameter it stands for (:func:`model_param`). Before AP rebinds such an optimizer to this rank's
  parameters it calls the optimizer's release hook (:func:`set_release_hook`, :func:`release_masters`):
  the optimizer puts its model parameters back in its groups and makes new masters later.
- **autocast forward**: a model whose ``forward`` was wrapped to run under ``torch.autocast`` (apex O1)
  carries the dtype on the wrapper (:func:`mark_autocast`); when AP runs pipeline stages instead of the
  model's own forward, each stage's forward runs under the same autocast (:func:`autocast_dtype`).
- **overflow**: a loss scaler that looks for inf/NaN gradients sees only this rank's share of them; AP gives
  the optimizer a function that makes the ranks agree (:func:`set_overflow_sync`, :func:`agree_overflow`), so
  every rank skips the same steps (torch's own ``GradScaler`` reads :func:`overflow_synced`:
  :mod:`moreh_ap.runtime.grad_scaler`).
- **loss scale**: a scaler says where its current scale comes from (:func:`set_loss_scale_source`); the
  one-line mode seeds a model's own backward, which runs inside its training call, with it
  (:func:`loss_scale_of`), so that the backward's intermediates are scaled as on one device (fp16).
- **owner**: the library that set the precision of a model and its optimizer (e.g. ``"apex amp O2"``,
  :func:`claim_precision`, kept on the model); AP does not add its own bf16 ``mixed_precision`` on top of it
  (:func:`precision_owner`).
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch

__all__ = ["mark_master", "model_param", "is_master", "set_release_hook", "release_masters", "mark_autocast",
           "autocast_dtype", "autocast_like", "set_overflow_sync", "agree_overflow", "overflow_synced",
           "set_loss_scale_source", "loss_scale_of",
           "claim_precision", "precision_owner"]

_MASTER_OF = "_moreh_ap_master_of"
_RELEASE = "_moreh_ap_release_masters"
_AUTOCAST = "__moreh_ap_autocast_dtype__"
_OWNER = "_moreh_ap_precision_owner"
_OVERFLOW = "_moreh_ap_overflow_sync"
_SCALE = "_moreh_ap_loss_scale_source"


def mark_master(master: torch.Tensor, param: torch.Tensor) -> None:
    """Record that the optimizer's ``master`` (an fp32 copy) stands for the model parameter ``param``."""
    setattr(master, _MASTER_OF, param)


def model_param(tensor: torch.Tensor) -> torch.Tensor:
    """The model parameter ``tensor`` stands for: its own self unless it is a marked master."""
    return getattr(tensor, _MASTER_OF, tensor)


def is_master(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a marked master copy of a model parameter."""
    return hasattr(tensor, _MASTER_OF)


def set_release_hook(optimizer: torch.optim.Optimizer, hook: Callable[[], None]) -> None:
    """Give ``optimizer`` the hook AP calls before rebinding it: it must put the model parameters back in
    the groups in place of their masters (moving their state) and make masters again when next needed."""
    setattr(optimizer, _RELEASE, hook)


def release_masters(optimizer: torch.optim.Optimizer) -> None:
    """Call ``optimizer``'s release hook, if it has one (no-op otherwise)."""
    hook = getattr(optimizer, _RELEASE, None)
    if hook is not None:
        hook()


def mark_autocast(forward: Callable[..., Any], dtype: torch.dtype) -> None:
    """Record on a model's wrapped ``forward`` that it runs under ``torch.autocast(dtype=dtype)``."""
    setattr(forward, _AUTOCAST, dtype)


def autocast_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """The autocast dtype of ``model``'s instance-level forward wrapper (:func:`mark_autocast`), else None."""
    forward = vars(model).get("forward")
    return getattr(forward, _AUTOCAST, None) if forward is not None else None


def autocast_like(stage: torch.nn.Module, dtype: torch.dtype) -> None:
    """Make ``stage``'s forward (a pipeline stage built from the model's parts) run under
    ``torch.autocast(<its parameters' device type>, dtype=dtype)``, as the whole model's forward did."""
    old_forward = stage.forward

    @functools.wraps(old_forward)
    def forward(*args: Any, **kwargs: Any) -> Any:
        device = next((p.device.type for p in stage.parameters()), "cpu")
        with torch.autocast(device_type=device, dtype=dtype):
            return old_forward(*args, **kwargs)

    mark_autocast(forward, dtype)
    stage.forward = forward


def set_overflow_sync(optimizer: torch.optim.Optimizer, sync: Callable[[bool], bool] | None) -> None:
    """Give ``optimizer`` the function that makes every rank agree on a gradient overflow (AP sets it when the
    optimizer's gradients are spread over ranks: pipeline stages, shards): ``sync(found_here) -> found_anywhere``."""
    setattr(optimizer, _OVERFLOW, sync)


def agree_overflow(optimizer: torch.optim.Optimizer, found: bool) -> bool:
    """Whether any rank found an inf/NaN gradient of ``optimizer`` (``found`` when it has no sync function)."""
    sync = getattr(optimizer, _OVERFLOW, None)
    return bool(sync(found)) if sync is not None else found


def overflow_synced(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` has a function that makes the ranks agree on an overflow (:func:`set_overflow_sync`):
    its gradients are spread over ranks, so a loss scaler must not decide on this rank's alone."""
    return getattr(optimizer, _OVERFLOW, None) is not None


def set_loss_scale_source(optimizer: torch.optim.Optimizer, source: Callable[[], float] | None) -> None:
    """Say where ``optimizer``'s current loss scale comes from (apex's scaler, torch's ``GradScaler``): the one-line
    mode runs a model's own backward inside its training call, seeded with that scale, as one device's scaled
    backward would be (:func:`loss_scale_of`)."""
    setattr(optimizer, _SCALE, source)


def loss_scale_of(optimizer: torch.optim.Optimizer | None) -> float:
    """The loss scale the next ``scale(loss)`` of ``optimizer``'s scaler will apply (1.0 when none is known)."""
    source = getattr(optimizer, _SCALE, None)
    if source is None:
        return 1.0
    scale = float(source())
    return scale if 0 < scale < float("inf") else 1.0


def claim_precision(model: torch.nn.Module, owner: str) -> None:
    """Say that ``owner`` (e.g. ``"apex amp O2"``) set the precision of ``model`` (and of its optimizer)."""
    object.__setattr__(model, _OWNER, owner)


def precision_owner(model: torch.nn.Module) -> str | None:
    """The library that set ``model``'s precision (:func:`claim_precision`), or None."""
    return vars(model).get(_OWNER)
