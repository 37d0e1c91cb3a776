# Engagement: at the root's first training forward, check the call, choose a config, parallelize, swap the class.
"""What happens once, at the first training forward of the root model.

Rank 0's inputs are broadcast, a ``ParallelConfig`` is chosen (every rank plans, rank 0's choice
wins), the model is parallelized with :func:`moreh_ap.runtime.parallelize` (rank 0's weights win,
the optimizer is rebound), and the root instance's class is swapped for a subclass (same name,
``isinstance`` still true) whose ``__call__`` runs the engine.
"""
from __future__ import annotations

import torch
from torch import nn

from moreh_ap.models import is_hf_model
from moreh_ap.oneline.choose import choose_plan
from moreh_ap.oneline.state import STATE, Internal, cuda_available
from moreh_ap.oneline.state_dicts import swap_optimizer
from moreh_ap.oneline.step import Engine, broadcast_inputs
from moreh_ap.oneline.swap import swap_class
from moreh_ap.runtime import init_distributed, parallelize

__all__ = ["engage", "OptimizerAlreadySteppedError", "APNotEngagedError"]


class OptimizerAlreadySteppedError(RuntimeError):
    """The user's optimizer stepped before AP engaged: its state belongs to the unsplit model."""


class APNotEngagedError(RuntimeError):
    """On several ranks an optimizer stepped while AP had not engaged: this rank (not rank 0) stops rather
    than train a copy of the model of its own."""


def engage(root: nn.Module, args, kwargs) -> Engine:
    """Parallelize ``root`` at its first training forward; the returned engine runs that call next.

    Raises:
        NotImplementedError: several optimizers hold the root's parameters, or the root does not
            compute its own loss (not a Hugging Face model called with ``labels=``).
        OptimizerAlreadySteppedError: the optimizer stepped before engagement.
    """
    with Internal():
        init_distributed()
        optimizer = _user_optimizer(root)
        _check_trainable_call(root, kwargs)
        args, kwargs = broadcast_inputs(args, kwargs)
        recompute_fixed = _hf_checkpointing(root)
        config, prediction = choose_plan(root, args, kwargs, optimizer=optimizer, options=STATE.options,
                                         recompute_fixed=recompute_fixed)
        if recompute_fixed and hasattr(root, "gradient_checkpointing_disable"):
            root.gradient_checkpointing_disable()  # the runtime's checkpoint wrappers recompute instead
        _place_deferred(except_root=root)
        user_class = type(root)
        # fully_shard may swap the class (FSDP<Name>); the plan is what steps 2-3 are measured against
        pm = parallelize(root, config, optimizer=optimizer, prediction=prediction)
        swap_optimizer(optimizer, pm)  # its state_dict()/load_state_dict() in one-device format
        engine = Engine(root, pm)
        swap_class(root, user_class)
        STATE.engines[root] = engine
    engine.pending_inputs = (args, kwargs)
    return engine


def _user_optimizer(root: nn.Module) -> torch.optim.Optimizer:
    mine = {id(p) for p in root.parameters()}
    found = [o for o in list(STATE.optimizers) if any(id(p) in mine for g in o.param_groups for p in g["params"])]
    if len(found) > 1:
        raise NotImplementedError(f"advanced parallelization: {len(found)} optimizers hold parameters of "
                                  f"{type(root).__name__}; use one optimizer (param groups are fine)")
    return found[0]  # state it holds (loaded, or from earlier steps) is carried by parallelize from rank 0


def _check_trainable_call(root: nn.Module, kwargs: dict) -> None:
    hf = is_hf_model(root)
    if not hf or kwargs.get("labels") is None:
        raise NotImplementedError(
            f"advanced parallelization trains models that compute their own loss: a Hugging Face model called "
            f"with labels=...; {type(root).__name__} was called without labels. For other models use "
            "moreh_ap.parallelize(model, config, optimizer=..., loss_fn=...) and its train_step().")


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
