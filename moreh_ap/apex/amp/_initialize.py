# What amp.initialize does to models and optimizers (apex/amp/_initialize.py), on CPU or CUDA.
from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch.nn.modules.batchnorm import _BatchNorm

import moreh_ap.apex.amp.loss_casts as loss_casts
from moreh_ap.apex.amp._amp_state import _amp_state
from moreh_ap.apex.amp._process_optimizer import process_optimizer
from moreh_ap.apex.amp.scaler import LossScaler
from moreh_ap.precision_hooks import claim_precision, mark_autocast, set_loss_scale_source

# O1's autocast dtype, on CUDA and on CPU alike: apex's O1 is fp16, and torch 2.13's CPU autocast
# supports fp16 as well as bf16, so the numerics (and the need for loss scaling) stay apex's.
O1_AUTOCAST_DTYPE = torch.float16


def applier(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to every tensor inside ``value`` (tensors, mappings, lists, tuples, namedtuples)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (str, bytes)):
        return value
    if isinstance(value, Mapping):
        items = {k: applier(v, fn) for k, v in value.items()}
        try:
            return type(value)(items)
        except TypeError:
            return items
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # namedtuple
        return type(value)(*(applier(v, fn) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(applier(v, fn) for v in value)
    return value


def to_type(dtype: torch.dtype, t: torch.Tensor) -> torch.Tensor:
    """Cast floating-point tensors to ``dtype``; leave the others (ids, masks) alone."""
    return t.to(dtype) if t.is_floating_point() else t


def _model_device_type(model: torch.nn.Module, args: tuple, kwargs: dict) -> str:
    for p in model.parameters():
        return p.device.type
    for t in list(args) + list(kwargs.values()):
        if isinstance(t, torch.Tensor):
            return t.device.type
    return "cpu"


def check_models(models: list[torch.nn.Module]) -> None:
    parallel = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
    for model in models:
        if isinstance(model, parallel):
            raise RuntimeError(
                f"Incoming model is an instance of torch.nn.parallel.{type(model).__name__}. "
                "Parallel wrappers should only be applied to the model(s) AFTER \n"
                "the model(s) have been returned from amp.initialize."
            )


def check_params_fp32(models: list[torch.nn.Module]) -> None:
    """Every floating parameter and buffer must be fp32 (on CUDA or, unlike apex, on CPU)."""
    for model in models:
        named = [("param", n, t) for n, t in model.named_parameters()]
        named += [("buffer", n, t) for n, t in model.named_buffers()]
        for kind, name, tensor in named:
            if not tensor.is_floating_point() or tensor.dtype == torch.float32:
                continue
            msg = (
                f"Found {kind} {name} with type {tensor.type()}, expected torch.cuda.FloatTensor "
                "(or torch.FloatTensor: CPU models are accepted)."
            )
            if tensor.dtype == torch.float16:
                msg += (
                    "\nWhen using amp.initialize, you do not need to call .half() on your model\n"
                    "before passing it, no matter what optimization level you choose."
                )
            raise RuntimeError(msg)


def convert_network(network: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast every module's own floating params/buffers to ``dtype``, except affine batch norms."""
    for module in network.modules():
        if isinstance(module, _BatchNorm) and module.affine:
            continue
        for param in module.parameters(recurse=False):
            if param.is_floating_point():
                param.data = param.data.to(dtype)
                if param.grad is not None:
                    param.grad.data = param.grad.data.to(dtype)
        for name, buf in module.named_buffers(recurse=False):
            if buf is not None and buf.is_floating_point():
                setattr(module, name, buf.to(dtype))
    return network


def _half_to_float_state_dict_hook(module, state_dict, prefix, local_metadata):
    for key, value in state_dict.items():
        if key.startswith(prefix) and isinstance(value, torch.Tensor) and value.dtype == torch.float16:
            state_dict[key] = value.float()


def _patch_forward_casts(model: torch.nn.Module, input_caster, output_caster) -> None:
    old_forward = model.forward

    @functools.wraps(old_forward)
    def forward(*args, **kwargs):
        if input_caster is not None:
            args, kwargs = applier(args, input_caster), applier(kwargs, input_caster)
        return applier(old_forward(*args, **kwargs), output_caster)

    model.forward = forward


def _patch_forward_autocast(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """O1: the model's forward runs under ``torch.autocast`` (its cache is freed at each exit)."""
    old_forward = model.forward

    @functools.wraps(old_forward)
    def forward(*args, **kwargs):
        with torch.autocast(device_type=_model_device_type(model, args, kwargs), dtype=dtype):
            return old_forward(*args, **kwargs)

    mark_autocast(forward, dtype)  # AP runs pipeline stages under the same autocast
    model.forward = forward


def _as_lists(models, optimizers) -> tuple[list, bool, list, bool]:
    if isinstance(optimizers, torch.optim.Optimizer):
        opt_list, opts_were_list = [optimizers], False
    elif optimizers is None:
        opt_list, opts_were_list = [], False
    elif isinstance(optimizers, list):
        opt_list, opts_were_list = optimizers, True
        for opt in opt_list:
            if not isinstance(opt, torch.optim.Optimizer):
                raise TypeError("optimizers must be either a single optimizer or a list of optimizers.")
    else:
        raise TypeError("optimizers must be either a single optimizer or a list of optimizers.")
    if isinstance(models, torch.nn.Module):
        model_list, models_were_list = [models], False
    elif isinstance(models, list):
        model_list, models_were_list = models, True
        for model in model_list:
            if not isinstance(model, torch.nn.Module):
                raise TypeError("models must be either a single model or a list of models.")
    else:
        raise TypeError("models must be either a single model or a list of models.")
    return model_list, models_were_list, opt_list, opts_were_list


def _initialize(models, optimizers, properties, num_losses: int = 1, cast_model_outputs=None):
    """Cast / patch the models, patch the optimizers, create the loss scalers; return apex's shapes."""
    model_list, models_were_list, opt_list, opts_were_list = _as_lists(models, optimizers)
    check_models(model_list)
    if not _amp_state.allow_incoming_model_not_fp32:
        check_params_fp32(model_list)

    if properties.cast_model_type:
        for model in model_list:
            if properties.keep_batchnorm_fp32:
                convert_network(model, properties.cast_model_type)
            else:
                model.to(properties.cast_model_type)
            output_type = cast_model_outputs or torch.float32
            _patch_forward_casts(
                model,
                functools.partial(to_type, properties.cast_model_type),
                functools.partial(to_type, output_type),
            )
            model._register_state_dict_hook(_half_to_float_state_dict_hook)
        for optimizer in opt_list:  # recast existing optimizer state to the params' new dtype
            optimizer.load_state_dict(optimizer.state_dict())
    elif cast_model_outputs is not None:
        for model in model_list:
            _patch_forward_casts(model, None, functools.partial(to_type, cast_model_outputs))

    for optimizer in opt_list:
        process_optimizer(optimizer, properties)
    for model in model_list:  # AP adds no bf16 mixed precision on top of amp's
        claim_precision(model, f"apex amp {properties.opt_level}")

    _amp_state.loss_scalers = [
        LossScaler(
            properties.loss_scale,
            min_loss_scale=_amp_state.min_loss_scale,
            max_loss_scale=_amp_state.max_loss_scale,
        )
        for _ in range(num_losses)
    ]
    for optimizer in opt_list:  # AP seeds a model's own backward with it from the first step (scale_loss: per loss_id)
        set_loss_scale_source(optimizer, _amp_state.loss_scalers[0].loss_scale if properties.enabled else None)

    if properties.patch_torch_functions:
        for model in model_list:
            _patch_forward_autocast(model, O1_AUTOCAST_DTYPE)
        loss_casts.install()  # the loss outside the forward runs in fp32, as apex's O1 patched it
    else:
        loss_casts.uninstall()

    if opts_were_list:
        return (model_list if models_were_list else model_list[0]), opt_list
    if not opt_list:
        return model_list if models_were_list else model_list[0]
    return (model_list if models_were_list else model_list[0]), opt_list[0]
