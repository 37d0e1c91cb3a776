# The torch entry points the one-line mode patches: .cuda()/.to(), CUDA calls, Optimizer.__init__, clip_grad_norm_.
"""Installing and removing the hooks; the patched ``nn.Module.__call__`` itself is :mod:`moreh_ap.oneline.probe`."""
from __future__ import annotations

import gc

import torch
import torch.distributed as dist
import torch.nn.utils.clip_grad as clip_mod
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from moreh_ap.ap_options import APOptions
from moreh_ap.log import logger
from moreh_ap.oneline.aside import register_uninstall
from moreh_ap.oneline.cuda_calls import cpu_instead_of_cuda, patch_cuda_calls, restore_cuda_calls
from moreh_ap.oneline.engage import APNotEngagedError
from moreh_ap.oneline.probe import probe_call, remove_probe
from moreh_ap.oneline.state import STATE, Internal, cuda_available, has_trainable, internal
from moreh_ap.oneline.writes import patch_library_writes, patch_writes, restore_writes
from moreh_ap.precision_hooks import is_master, model_param
from moreh_ap.ranks import identity
from moreh_ap.runtime.dist import created_by_ap

__all__ = ["install", "install_failed", "uninstall"]


def install(*, options: APOptions | None = None, cpu_only: bool = False) -> None:
    """Install the hooks (idempotent) and keep the options the planner will honour.

    Args:
        options: the user's search options (None: the defaults); the latest call's options win.
        cpu_only: only accept ``.cuda()`` on a machine without CUDA (AP requested but turned off).
    """
    if not STATE.installed or (STATE.cpu_only and not cpu_only):
        if STATE.installed:
            uninstall()
        _patch(cpu_only=cpu_only)
    STATE.options = APOptions() if options is None else options


def install_failed(error: Exception) -> None:
    """AP was requested by the environment but cannot start (a bad MOREH_* value): the script's first
    ``.cuda()`` (module or tensor), ``.to('cuda')`` or optimizer creation raises ``error``, so the run
    stops at its start instead of training on one device or failing later for an unrelated reason.
    ``enable_advanced_parallelization()`` raises the same error; ``disable_advanced_parallelization()``
    removes the hooks."""
    if STATE.installed:
        uninstall()
    o = STATE.originals
    o["tensor_cuda"], o["module_cuda"], o["module_to"] = torch.Tensor.cuda, nn.Module.cuda, nn.Module.to
    o["failed_optim_init"] = torch.optim.Optimizer.__init__

    def fail(*_args, **_kwargs):
        raise ValueError(str(error))

    def to(self, *args, **kwargs):
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        if device is not None and device.type == "cuda":
            fail()
        return o["module_to"](self, *args, **kwargs)

    torch.Tensor.cuda = nn.Module.cuda = fail
    nn.Module.to = to
    torch.optim.Optimizer.__init__ = fail
    STATE.installed = True


def _patch(*, cpu_only: bool) -> None:
    o = STATE.originals
    o["tensor_cuda"] = torch.Tensor.cuda
    o["module_cuda"] = nn.Module.cuda
    o["module_to"] = nn.Module.to
    torch.Tensor.cuda = _tensor_cuda
    nn.Module.cuda = _module_cuda
    nn.Module.to = _module_to
    patch_cuda_calls()
    if not cpu_only:
        o["call"] = nn.Module.__call__
        o["optim_init"] = torch.optim.Optimizer.__init__
        o["clip"] = clip_mod.clip_grad_norm_
        o["clip_utils"] = torch.nn.utils.clip_grad_norm_
        if not STATE.engaged:
            nn.Module.__call__ = probe_call
        torch.optim.Optimizer.__init__ = _make_optimizer_init(o["optim_init"])
        _adopt_existing_optimizers()
        o["step_hook"] = register_optimizer_step_pre_hook(_step_before_engagement)
        patch_writes()
        o["writes_hook"] = register_optimizer_step_pre_hook(_writes_after_engagement)
        clip_mod.clip_grad_norm_ = _clip_grad_norm_
        torch.nn.utils.clip_grad_norm_ = _clip_grad_norm_
    STATE.installed = True
    STATE.cpu_only = cpu_only


def uninstall() -> None:
    """Restore every patched torch entry point (engaged models keep their swapped class)."""
    o = STATE.originals
    if "tensor_cuda" in o:
        torch.Tensor.cuda = o.pop("tensor_cuda")
        nn.Module.cuda = o.pop("module_cuda")
        nn.Module.to = o.pop("module_to")
    restore_cuda_calls()
    if "failed_optim_init" in o:
        torch.optim.Optimizer.__init__ = o.pop("failed_optim_init")
    if "call" in o:
        remove_probe()
        o.pop("call", None)
        torch.optim.Optimizer.__init__ = o.pop("optim_init")
        o.pop("step_hook").remove()
        o.pop("writes_hook").remove()
        restore_writes()
        clip_mod.clip_grad_norm_ = o.pop("clip")
        torch.nn.utils.clip_grad_norm_ = o.pop("clip_utils")
    STATE.installed = False
    STATE.cpu_only = False
    STATE.engaged = False
    STATE.options = APOptions()
    STATE.optimizers.clear()
    STATE.deferred.clear()


register_uninstall(uninstall)  # the probe removes every hook through it when AP stands aside


def _adopt_existing_optimizers() -> None:
    """Optimizers created before the hooks (before ``enable_advanced_parallelization()``) are found too: the
    root probe looks for their parameters like for those created after (one scan of the GC's objects)."""
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.optim.Optimizer):  # type(): no proxy's __class__ is asked
            STATE.optimizers.add(obj)


def _step_before_engagement(optimizer, _args, _kwargs) -> None:
    """A global optimizer step pre-hook: on several ranks, a step before AP engaged means every rank trains
    its own copy of the model. Every rank but 0 stops with the reason; rank 0 logs it once."""
    if STATE.engaged or internal():
        return
    try:
        found = identity()
    except ValueError:
        return
    if found is None or found.world_size <= 1:
        return
    world, rank = found.world_size, found.rank
    reason = (f"advanced parallelization has not engaged, but {type(optimizer).__name__}.step() runs: each of the "
              f"{world} ranks would train its own copy of the model. AP engages at the first training forward "
              "(model in train mode, grad enabled) of a model whose parameters an optimizer holds; a forward "
              "without a loss, or before the optimizer exists, runs on one device.")
    if rank != 0:
        raise APNotEngagedError(f"rank {rank} stops: {reason}")
    if "not-engaged" not in STATE.warned:
        STATE.warned.add("not-engaged")
        logger.error(f"{reason} Ranks 1-{world - 1} stop.")


def _writes_after_engagement(_optimizer, _args, _kwargs) -> None:
    """A global optimizer step pre-hook: once AP engaged, the libraries' checkpoint writes become rank 0's
    (:func:`moreh_ap.oneline.writes.patch_library_writes`, which does its work once)."""
    if STATE.engaged and "hf_writes" not in STATE.originals:
        patch_library_writes()


def _make_optimizer_init(original):
    def __init__(self, params, defaults, *args, **kwargs):
        original(self, params, defaults, *args, **kwargs)
        STATE.optimizers.add(self)

    __init__.__wrapped__ = original
    return __init__


def _tensor_cuda(self, *args, **kwargs):
    if not cuda_available():
        return self  # CPU ranks: the script's `.cuda()` keeps the tensor on the CPU
    return STATE.originals["tensor_cuda"](self, *args, **kwargs)


def _module_cuda(self, device=None):
    if internal():
        return STATE.originals["module_cuda"](self, device)
    if not cuda_available():
        return self
    if _defer(self):
        STATE.deferred.add(self)  # placed at engagement: only what this rank keeps
        return self
    return STATE.originals["module_cuda"](self, device)


def _defer(module: nn.Module) -> bool:
    """Whether ``module.cuda()`` waits for engagement: a model with trainable parameters, AP not engaged, and
    no process group the script created itself (such a script distributes itself: AP will stand aside at its
    first forward, so its ``.cuda()`` before ``DistributedDataParallel(model)`` must happen now)."""
    if STATE.cpu_only or STATE.engaged or not has_trainable(module):
        return False
    return not (dist.is_available() and dist.is_initialized() and not created_by_ap())


def _module_to(self, *args, **kwargs):
    if internal():
        return STATE.originals["module_to"](self, *args, **kwargs)
    if not cuda_available():  # `model.to("cuda")`, `model.to(local_rank)`: the model stays on the CPU
        args, kwargs = cpu_instead_of_cuda(args, kwargs)
        return STATE.originals["module_to"](self, *args, **kwargs)
    device, dtype, _non_blocking, _fmt = torch._C._nn._parse_to(*args, **kwargs)
    if device is None or device.type != "cuda":
        return STATE.originals["module_to"](self, *args, **kwargs)
    if not _defer(self):
        return STATE.originals["module_to"](self, *args, **kwargs)
    STATE.deferred.add(self)  # placed at engagement: only what this rank keeps
    if dtype is not None:
        STATE.originals["module_to"](self, dtype)
    return self


def _clip_grad_norm_(parameters, max_norm, norm_type=2.0, error_if_nonfinite=False, foreach=None):
    """``torch.nn.utils.clip_grad_norm_``; on an engaged model's parameters, the global norm over stages and shards."""
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    # apex O2 clips amp.master_params(optimizer): fp32 masters that stand for the engaged model's parameters
    engine = next((e for e in list(STATE.engines.values()) if any(id(model_param(p)) in e.ids for p in params)), None)
    if engine is None:
        return STATE.originals["clip"](params, max_norm, norm_type=norm_type,
                                       error_if_nonfinite=error_if_nonfinite, foreach=foreach)
    if float(norm_type) != 2.0:
        raise NotImplementedError(f"clip_grad_norm_(norm_type={norm_type!r}) under advanced parallelization: "
                                  "only the 2-norm is supported")
    with Internal():
        if any(is_master(p) for p in params):
            norm = _clip_masters_(engine.pm, params, float(max_norm))
        else:
            norm = engine.pm.clip_grad_norm_(float(max_norm))
    if error_if_nonfinite and not torch.isfinite(norm):
        raise RuntimeError(f"The total norm of order {norm_type} for gradients is non-finite, so it cannot be "
                           "clipped. To disable this error and scale the gradients by the non-finite norm "
                           "anyway, set `error_if_nonfinite=False`")
    return norm


@torch.no_grad()
def _clip_masters_(pm, masters: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip the gradients of an optimizer's fp32 masters (apex O2) by their global norm over stages and
    shards (torch's formula, as on one device); returns the norm."""
    norm = pm.optimizer_grad_norm(masters)
    coef = float(torch.clamp(max_norm / (norm + 1e-6), max=1.0))
    for p in masters:
        if p.grad is not None:
            p.grad.mul_(coef)
    return norm
