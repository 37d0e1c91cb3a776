# How amp patches an optimizer (apex/amp/_process_optimizer.py): grad stashing, unscaling, O2 master weights.
"""Each optimizer passed to ``amp.initialize`` gets an ``_amp_stash`` and two
methods used by ``scale_loss``: ``_prepare_amp_backward`` (stash the grads
already there, already unscaled, and clear them so the coming backward writes
only scaled grads) and ``_post_amp_backward(scaler)`` (unscale the new grads,
note overflow, add the stash back).

With master weights (O2), the fp16 parameters in ``param_groups`` are replaced
by fp32 copies lazily (first ``scale_loss``, ``zero_grad``, ``step`` or
``add_param_group``) so that a ``model.load_state_dict`` between
``initialize`` and training is picked up; after every ``step`` the masters are
copied into the fp16 model parameters and the master grads are cleared.

Each master is marked as standing for its model parameter
(:mod:`moreh_ap.precision_hooks`), and the optimizer gets a release hook that
puts the model parameters back (AP calls it before rebinding the optimizer to
its ranks' parameters; the masters are made again at the next lazy init).
"""
from __future__ import annotations

import types

import torch

from moreh_ap.apex.amp._amp_state import maybe_print
from moreh_ap.apex.amp.scaler import local
from moreh_ap.precision_hooks import mark_master, set_release_hook

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_CLOSURE_ERROR = "Currently, Amp does not support closure use with optimizers."


class AmpStash:
    """Per-optimizer amp bookkeeping (apex's ``optimizer._amp_stash``)."""

    def __init__(self, master_weights: bool) -> None:
        self.master_weights = master_weights
        self.lazy_init_called = False
        self.already_patched = False  # a one-shot skip_step is installed
        self.params_have_scaled_gradients = False  # set by delay_unscale=True
        self.grad_stash: dict[torch.Tensor, torch.Tensor | None] = {}
        # master-weight mode only: model fp16 params, their fp32 masters, fp32 params (own masters)
        self.all_fp16_params: list[torch.Tensor] = []
        self.all_fp32_from_fp16_params: list[torch.Tensor] = []
        self.all_fp32_from_fp32_params: list[torch.Tensor] = []


def _all_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _make_masters(optimizer: torch.optim.Optimizer, group: dict) -> None:
    """Replace the group's fp16/bf16 params by fp32 masters (moving their optimizer state along)."""
    stash = optimizer._amp_stash
    for i, param in enumerate(group["params"]):
        if not param.requires_grad:
            continue
        if param.dtype in _LOW_PRECISION:
            master = param.detach().clone().float()
            master.requires_grad_(True)
            mark_master(master, param)
            group["params"][i] = master
            stash.all_fp16_params.append(param)
            stash.all_fp32_from_fp16_params.append(master)
            if param in optimizer.state:
                optimizer.state[master] = optimizer.state.pop(param)
        elif param.dtype == torch.float32:
            stash.all_fp32_from_fp32_params.append(param)
        else:
            raise TypeError(
                "Optimizer's parameters must be float32, float16 or bfloat16 tensors "
                f"(apex: torch.cuda.FloatTensor or torch.cuda.HalfTensor). Received {param.type()}"
            )


def _lazy_init(optimizer: torch.optim.Optimizer) -> None:
    stash = optimizer._amp_stash
    if stash.lazy_init_called:
        return
    stash.lazy_init_called = True
    if stash.master_weights:
        for group in optimizer.param_groups:
            _make_masters(optimizer, group)
        _recast_state(optimizer)


def _recast_state(optimizer: torch.optim.Optimizer) -> None:
    """Existing state (e.g. momentum loaded before the masters existed) cast to its parameter's dtype and
    device, as apex's ``optimizer.load_state_dict(optimizer.state_dict())`` round trip does with torch's
    policy (``step`` kept as it is), without going through a ``state_dict`` that a wrapper may have replaced
    (under AP that one is the one-device format, a collective)."""
    with torch.no_grad():
        for param, state in optimizer.state.items():
            for key, value in list(state.items()):
                if key == "step" or not isinstance(value, torch.Tensor):
                    continue
                if param.is_floating_point() and value.is_floating_point():
                    state[key] = value.to(dtype=param.dtype, device=param.device)
                else:
                    state[key] = value.to(device=param.device)


def _exact_in(dtype: torch.dtype, value: torch.Tensor) -> bool:
    """Whether the fp32 ``value`` survives a round trip through ``dtype`` unchanged."""
    return bool(torch.equal(value.to(dtype).to(value.dtype), value))


def _casts_state(optimizer: torch.optim.Optimizer) -> bool:
    """Whether loading state casts it to the parameters' dtype (torch's ``load_state_dict``, which AP's
    rebinding uses); FusedLAMB's own keeps the moments of fp16 parameters in fp32."""
    return type(optimizer).load_state_dict is torch.optim.Optimizer.load_state_dict


def _lossless(optimizer: torch.optim.Optimizer, master: torch.Tensor, param: torch.Tensor) -> bool:
    """Whether ``param`` can stand in for ``master`` without rounding: the same values, and state that the
    rebinding's load keeps exactly."""
    if not torch.equal(param.detach().float(), master.detach().float()):
        return False
    if not _casts_state(optimizer):
        return True
    state = optimizer.state.get(master, {})
    return all(_exact_in(param.dtype, v.float()) for k, v in state.items()
               if k != "step" and isinstance(v, torch.Tensor) and v.is_floating_point())


def release_masters(optimizer: torch.optim.Optimizer) -> None:
    """Put the model parameters back in the groups in place of their masters (AP rebinds the optimizer to
    its ranks' parameters; the next lazy init makes their masters). The masters' state moves to the model
    parameters unchanged (the rebinding loads it with the optimizer's own policy).

    Raises:
        NotImplementedError: the masters hold what their low-precision parameters cannot (steps were taken
            before AP engaged): releasing them would round the fp32 weights or state.
    """
    stash = optimizer._amp_stash
    if not stash.lazy_init_called or not stash.master_weights:
        return
    pairs = dict(zip(map(id, stash.all_fp32_from_fp16_params), stash.all_fp16_params))
    for group in optimizer.param_groups:
        for master in group["params"]:
            param = pairs.get(id(master))
            if param is not None and not _lossless(optimizer, master, param):
                raise NotImplementedError(
                    "amp O2 (master_weights=True) under advanced parallelization: AP engaged after optimizer "
                    "steps had updated the fp32 master weights, which the fp16 model cannot hold; enable AP "
                    "(enable_advanced_parallelization() / MOREH_ENABLE_ADVANCED_PARALLELIZATION=1) before the first "
                    "training step, or use opt_level O1/O3 (no masters)")
    for group in optimizer.param_groups:
        for i, master in enumerate(group["params"]):
            param = pairs.get(id(master))
            if param is None:
                continue
            group["params"][i] = param
            if master in optimizer.state:
                optimizer.state[param] = optimizer.state.pop(master)
    stash.all_fp16_params, stash.all_fp32_from_fp16_params, stash.all_fp32_from_fp32_params = [], [], []
    stash.grad_stash.clear()
    stash.lazy_init_called = False


def _master_params_to_model_params(stash: AmpStash) -> None:
    if stash.all_fp16_params:
        with torch.no_grad():
            torch._foreach_copy_([local(p) for p in stash.all_fp16_params],
                                 [local(m) for m in stash.all_fp32_from_fp16_params])


def _unscale_models_are_masters(scaler, params: list[torch.Tensor], stash: dict) -> None:
    """New grads (scaled) -> unscaled in place; stashed grads (unscaled) added back."""
    fresh, with_stash, stashed = [], [], []
    for p in params:
        old = stash.pop(p, None)
        if p.grad is None:
            if old is not None:
                p.grad = old
            continue
        fresh.append(p.grad)
        if old is not None:
            with_stash.append(p.grad)
            stashed.append(old)
    scaler.unscale_(fresh)
    if with_stash:
        torch._foreach_add_([local(g) for g in with_stash], [local(g) for g in stashed])


def prepare_backward(optimizer: torch.optim.Optimizer) -> None:
    """Before a scaled backward: stash the (unscaled) grads already there and clear them."""
    stash = optimizer._amp_stash
    _lazy_init(optimizer)
    if stash.master_weights:
        for p in stash.all_fp16_params:  # the fp32 master grads are the stash
            p.grad = None
        params = stash.all_fp32_from_fp32_params
    else:
        params = _all_params(optimizer)
    for p in params:
        stash.grad_stash[p] = p.grad
        p.grad = None


def post_backward(optimizer: torch.optim.Optimizer, scaler) -> None:
    """After a scaled backward: unscale the new grads into the optimizer's params, noting overflow."""
    stash = optimizer._amp_stash
    _lazy_init(optimizer)
    if not stash.master_weights:
        _unscale_models_are_masters(scaler, _all_params(optimizer), stash.grad_stash)
        return
    new_masters, new_grads, accumulate, accumulate_into = [], [], [], []
    for model_p, master in zip(stash.all_fp16_params, stash.all_fp32_from_fp16_params):
        if model_p.grad is None:
            continue
        grad32 = model_p.grad.float()  # the fp16 model grad stays scaled, as in apex
        if master.grad is None:
            new_masters.append(master)
            new_grads.append(grad32)
        else:
            accumulate.append(grad32)
            accumulate_into.append(master.grad)
    scaler.unscale_(new_grads + accumulate)
    for master, grad in zip(new_masters, new_grads):
        master.grad = grad
    if accumulate:
        torch._foreach_add_([local(g) for g in accumulate_into], [local(g) for g in accumulate])
    _unscale_models_are_masters(scaler, stash.all_fp32_from_fp32_params, stash.grad_stash)


def _install_step(optimizer: torch.optim.Optimizer, new_step) -> None:
    optimizer.step = types.MethodType(new_step, optimizer)


def _patch_master_weights(optimizer: torch.optim.Optimizer) -> None:
    """O2: step copies masters to the model; zero_grad / add_param_group know about masters."""
    old_step = optimizer.step
    old_add_param_group = optimizer.add_param_group

    def step(self, closure=None):
        if closure is not None:
            raise RuntimeError(_CLOSURE_ERROR)
        _lazy_init(self)
        result = old_step()
        _master_params_to_model_params(self._amp_stash)
        for master in self._amp_stash.all_fp32_from_fp16_params:  # model.zero_grad() would miss them
            master.grad = None
        return result

    def zero_grad(self, set_to_none: bool = True):
        stash = self._amp_stash
        _lazy_init(self)
        for p in stash.all_fp16_params + stash.all_fp32_from_fp32_params:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.detach_()
                p.grad.zero_()
        for master in stash.all_fp32_from_fp16_params:
            master.grad = None

    def add_param_group(self, param_group):
        _lazy_init(self)
        old_add_param_group(param_group)
        _make_masters(self, self.param_groups[-1])

    _install_step(optimizer, step)
    optimizer.zero_grad = types.MethodType(zero_grad, optimizer)
    optimizer.add_param_group = types.MethodType(add_param_group, optimizer)


def process_optimizer(optimizer: torch.optim.Optimizer, properties) -> torch.optim.Optimizer:
    """Attach amp's stash and hooks to ``optimizer`` (once per optimizer)."""
    if hasattr(optimizer, "_amp_stash"):
        raise RuntimeError("A given optimizer should only be passed through amp.initialize once.")
    optimizer._amp_stash = AmpStash(master_weights=bool(properties.master_weights))
    optimizer._prepare_amp_backward = types.MethodType(prepare_backward, optimizer)
    optimizer._post_amp_backward = types.MethodType(post_backward, optimizer)
    optimizer._amp_lazy_init = types.MethodType(_lazy_init, optimizer)
    if properties.master_weights:
        _patch_master_weights(optimizer)
        set_release_hook(optimizer, types.MethodType(release_masters, optimizer))
    return optimizer


def install_skip_step(optimizer: torch.optim.Optimizer, scaler, loss_id: int) -> None:
    """Make the next ``optimizer.step()`` a no-op that reports the overflow (once)."""
    stash = optimizer._amp_stash
    if stash.already_patched:
        return
    had_own_step = "step" in vars(optimizer)
    previous = optimizer.step

    def skip_step(self, closure=None):
        if closure is not None:
            raise RuntimeError(_CLOSURE_ERROR)
        maybe_print(
            "Gradient overflow.  Skipping step, loss scaler {} reducing loss scale to {}".format(
                loss_id, scaler.loss_scale()
            )
        )
        for master in self._amp_stash.all_fp32_from_fp16_params:
            master.grad = None
        if had_own_step:
            self.step = previous
        else:
            del self.step
        self._amp_stash.already_patched = False

    _install_step(optimizer, skip_step)
    stash.already_patched = True
