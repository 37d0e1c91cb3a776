# Engagement: at the root's first training forward, check the call, choose a config, parallelize, swap the class.
"""What happens once, at the first training forward of the root model.

Rank 0's inputs are broadcast, a ``ParallelConfig`` is chosen (every rank plans, rank 0's choice
wins), the model is parallelized with :func:`moreh_ap.runtime.parallelize` (rank 0's weights win,
the optimizer is rebound), and the root instance's class is swapped for a subclass (same name,
``isinstance`` still true) whose ``__call__`` runs the engine.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from moreh_ap.log import logger
from moreh_ap.models import find_adapter
from moreh_ap.oneline.choose import choose_plan, pinned_config
from moreh_ap.oneline.loss_mode import LossMode, check_same_inputs, decide_loss_mode
from moreh_ap.oneline.state import STATE, Internal, cuda_available
from moreh_ap.oneline.state_dicts import swap_optimizer
from moreh_ap.oneline.step import Engine, broadcast_inputs, inputs_on_device
from moreh_ap.oneline.swap import swap_class
from moreh_ap.precision_hooks import model_param, precision_owner
from moreh_ap.runtime import init_distributed, parallelize

__all__ = ["engage", "OptimizerAlreadySteppedError", "APNotEngagedError"]


class OptimizerAlreadySteppedError(RuntimeError):
    """Kept importable for scripts that catch it; no longer raised: state an optimizer holds when AP engages
    (loaded from a checkpoint, or from earlier steps) is carried from rank 0 onto this rank's parameters."""


class APNotEngagedError(RuntimeError):
    """On several ranks an optimizer stepped while AP had not engaged: this rank (not rank 0) stops rather
    than train a copy of the model of its own."""


def engage(root: nn.Module, args, kwargs) -> Engine:
    """Parallelize ``root`` at its first training forward; the returned engine runs that call next.

    Raises:
        NotImplementedError: several optimizers hold the root's parameters.
        ValueError: the model's output holds no loss and the ranks pass different batches, or a pinned
            configuration pipelines a model that cannot be pipelined with its loss.
    """
    compiled, root = _unwrap_compiled(root)
    with Internal():
        init_distributed()
        optimizer = _user_optimizer(root)
        mode = _loss_mode(root, args, kwargs)
        if mode.outside:  # the targets never reach AP: every rank must already hold the same batch
            check_same_inputs(args, kwargs)
            args, kwargs = inputs_on_device(args, kwargs)
        else:
            args, kwargs = broadcast_inputs(args, kwargs)
        recompute_fixed = _hf_checkpointing(root)
        options = _amp_options(root, STATE.options)
        config, prediction = choose_plan(root, args, kwargs, optimizer=optimizer, options=options,
                                         recompute_fixed=recompute_fixed, restricted=mode.why,
                                         one_micro_batch=mode.outside)
        config = _precision_of(root, config)
        if recompute_fixed and hasattr(root, "gradient_checkpointing_disable"):
            root.gradient_checkpointing_disable()  # the runtime's checkpoint wrappers recompute instead
        _place_deferred(except_root=root)
        user_class = type(root)
        # fully_shard may swap the class (FSDP<Name>); the plan is what steps 2-3 are measured against
        pm = parallelize(root, config, optimizer=optimizer, prediction=prediction, output_loss=mode.output_loss)
        swap_optimizer(optimizer, pm)  # its state_dict()/load_state_dict() in one-device format
        engine = Engine(root, pm, mode=mode)
        swap_class(root, user_class)
        STATE.engines[root] = engine
        if compiled is not None:  # the script's object: its calls go to the engine as well
            swap_class(compiled, type(compiled))
            STATE.engines[compiled] = engine
    engine.pending_inputs = (args, kwargs)
    return engine


def _user_optimizer(root: nn.Module) -> torch.optim.Optimizer:
    mine = {id(p) for p in root.parameters()}
    found = [o for o in list(STATE.optimizers)
             if any(id(model_param(p)) in mine for g in o.param_groups for p in g["params"])]  # masters: apex O2
    if len(found) > 1:
        raise NotImplementedError(f"advanced parallelization: {len(found)} optimizers hold parameters of "
                                  f"{type(root).__name__}; use one optimizer (param groups are fine)")
    return found[0]  # state it holds (loaded, or from earlier steps) is carried by parallelize from rank 0


def _amp_options(root: nn.Module, options):
    """The search options without AP's bf16 ``mixed_precision`` for a model whose precision a mixed-precision
    library (apex's amp) set: the planner plans (and prices) what will run."""
    if precision_owner(root) is None or not options.mixed_precision:
        return options
    return dataclasses.replace(options, mixed_precision=False)


def _precision_of(root: nn.Module, config):
    """The config without AP's bf16 ``mixed_precision`` when a mixed-precision library (apex's amp) already set
    the model's and optimizer's precision: amp's numerics stay those of one device (one log line says so)."""
    owner = precision_owner(root)
    if owner is None or not config.mixed_precision:
        return config
    logger.info(f"advanced parallelization: {owner} sets the precision; AP's mixed_precision (bf16) is off")
    return config.replace(mixed_precision=False)


def _unwrap_compiled(root: nn.Module) -> tuple[nn.Module | None, nn.Module]:
    """``(the torch.compile wrapper, its original module)`` for a compiled root, else ``(None, root)``.

    The runtime parallelizes the original module and runs it eagerly (a compiled graph would be traced
    around the unsplit model); one warning says so.
    """
    inner = root._modules.get("_orig_mod") if type(root).__name__ == "OptimizedModule" else None
    if inner is None:
        return None, root
    logger.warning(f"advanced parallelization: the model is torch.compile'd; AP parallelizes the original "
                   f"{type(inner).__name__} and runs it without torch.compile")
    return root, inner


def _loss_mode(root: nn.Module, args, kwargs) -> LossMode:
    """Where this model's loss comes from (:mod:`moreh_ap.oneline.loss_mode`); a configuration pinned to one
    stage skips the check of the adapter's pipeline split."""
    pinned = pinned_config(STATE.options)
    return decide_loss_mode(root, args, kwargs, adapter=find_adapter(root),
                            check_adapter=pinned is None or pinned.num_stages > 1)


def _hf_checkpointing(root: nn.Module) -> bool:
    """True when HF ``gradient_checkpointing_enable()`` was called on the model (recomputation fixed on)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if name in dir(type(root)):
            return bool(getattr(root, name))
    return False


def _place_deferred(*, except_root: nn.Module) -> None:
    """Move the modules whose `.cuda()` was deferred for real, except the root and its submodules
    (the runtime places the root's parameters: only this rank's stages go to its device)."""
    inside = {id(m) for m in except_root.modules()}
    for m in list(STATE.deferred):
        if id(m) not in inside and cuda_available():
            with Internal():
                m.cuda()
    STATE.deferred.clear()
