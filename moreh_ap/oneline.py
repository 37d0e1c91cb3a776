# The one-line mode: hooks that make the user's own one-device training script train distributed.
"""What ``enable_advanced_parallelization()`` does to the user's objects (DESIGN.md §1).

While AP is enabled and not yet engaged, a few torch entry points are patched:

- ``nn.Module.__call__``: a probe. The first call of a module that is in
  training mode, runs with grad enabled and holds parameters of an optimizer
  created meanwhile (``torch.optim.Optimizer.__init__`` is wrapped to record
  them) is the ROOT. Its enclosing calls are seen first, so the outermost such
  module wins. At that call AP engages: rank 0's inputs are broadcast, a
  ``ParallelConfig`` is chosen (rank 0 plans, every rank gets the same one),
  the model is parallelized with :func:`moreh_ap.parallelize` (rank 0's
  weights win, the optimizer is rebound), the root instance's class is
  swapped for a subclass (same name, ``isinstance`` still true) whose
  ``__call__`` runs the engine, and the probe is removed. (``Module._call_impl``
  binds ``self.forward`` before hooks run, so a forward pre-hook could not
  redirect the current call.)
- ``nn.Module.cuda`` / ``nn.Module.to('cuda')``: deferred for modules with
  trainable parameters until engagement (the runtime then places what this
  rank keeps); on a machine without CUDA, ``.cuda()`` on modules and tensors
  is accepted and leaves them on the CPU, so a GPU script runs as written.
- ``torch.nn.utils.clip_grad_norm_``: on an engaged model's parameters, the
  global norm over stages and shards (the runtime's helper).

Training calls return the model's own output type (HF ``CausalLMOutputWithPast``
with ``.loss``; ``logits`` is None). The step's forward and backward already ran
inside the call with a unit seed; ``.backward()`` on the returned loss (or on
anything computed from it, e.g. ``loss / k``) adds this step's gradients
scaled by the gradient that reaches the loss, exactly as one device would.
"""
from __future__ import annotations

import json
import os
import threading
import weakref
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from moreh_ap.log import logger
from moreh_ap.models import is_hf_model

__all__ = ["install", "uninstall", "is_engaged", "engaged_model", "CONFIG_ENV", "OptimizerAlreadySteppedError"]

CONFIG_ENV = "MOREH_AP_CONFIG"
"""Pin the parallel configuration (JSON of ``ParallelConfig.to_dict()`` or the seed's line): skips the planner."""

DUMP_FILE = "advanced_parallelization_selected_config.dump"
PLANNING_TIMEOUT_S = 3600
"""How long the other ranks wait for rank 0's planner (tracing, calibration, search)."""

_tls = threading.local()


class OptimizerAlreadySteppedError(RuntimeError):
    """The user's optimizer stepped before AP engaged: its state belongs to the unsplit model."""


class _State:
    def __init__(self) -> None:
        self.installed = False
        self.cpu_only = False  # only the CPU `.cuda()` acceptance (AP requested but turned off)
        self.engaged = False
        self.originals: dict[str, Any] = {}
        self.optimizers: "weakref.WeakSet[torch.optim.Optimizer]" = weakref.WeakSet()
        self.deferred: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
        self.engines: "weakref.WeakKeyDictionary[nn.Module, _Engine]" = weakref.WeakKeyDictionary()
        self.warned: set[str] = set()


_state = _State()


def is_engaged() -> bool:
    """True once a root model runs under AP in this process."""
    return _state.engaged


def engaged_model():
    """The engaged root model (None before engagement)."""
    for root in list(_state.engines.keys()):
        return root
    return None


def _internal() -> bool:
    return getattr(_tls, "internal", 0) > 0


class _Internal:
    """While set, patched methods and swapped classes behave as plain torch (the runtime's own calls)."""

    def __enter__(self):
        _tls.internal = getattr(_tls, "internal", 0) + 1

    def __exit__(self, *exc):
        _tls.internal -= 1


def _cuda_available() -> bool:
    try:
        return torch.cuda.is_available()
    except Exception:
        return False


# ----------------------------------------------------------------------------- patches
def install(*, cpu_only: bool = False) -> None:
    """Install the hooks (idempotent). ``cpu_only``: only accept ``.cuda()`` on a machine without CUDA."""
    if _state.installed and (cpu_only or not _state.cpu_only):
        return
    if _state.installed:
        uninstall()
    o = _state.originals
    o["tensor_cuda"] = torch.Tensor.cuda
    o["module_cuda"] = nn.Module.cuda
    o["module_to"] = nn.Module.to
    torch.Tensor.cuda = _tensor_cuda
    nn.Module.cuda = _module_cuda
    nn.Module.to = _module_to
    if not cpu_only:
        import torch.nn.utils.clip_grad as clip_mod

        o["call"] = nn.Module.__call__
        o["optim_init"] = torch.optim.Optimizer.__init__
        o["clip"] = clip_mod.clip_grad_norm_
        o["clip_utils"] = torch.nn.utils.clip_grad_norm_
        if not _state.engaged:
            nn.Module.__call__ = _probe_call
        torch.optim.Optimizer.__init__ = _make_optimizer_init(o["optim_init"])
        clip_mod.clip_grad_norm_ = _clip_grad_norm_
        torch.nn.utils.clip_grad_norm_ = _clip_grad_norm_
    _state.installed = True
    _state.cpu_only = cpu_only


def uninstall() -> None:
    """Restore every patched torch entry point (engaged models keep their swapped class)."""
    o = _state.originals
    if "tensor_cuda" in o:
        torch.Tensor.cuda = o.pop("tensor_cuda")
        nn.Module.cuda = o.pop("module_cuda")
        nn.Module.to = o.pop("module_to")
    if "call" in o:
        import torch.nn.utils.clip_grad as clip_mod

        _remove_probe()
        o.pop("call", None)
        torch.optim.Optimizer.__init__ = o.pop("optim_init")
        clip_mod.clip_grad_norm_ = o.pop("clip")
        torch.nn.utils.clip_grad_norm_ = o.pop("clip_utils")
    _state.installed = False
    _state.cpu_only = False
    _state.engaged = False
    _state.optimizers = weakref.WeakSet()
    _state.deferred = weakref.WeakSet()


def _remove_probe() -> None:
    if "call" in _state.originals and nn.Module.__call__ is _probe_call:
        nn.Module.__call__ = _state.originals["call"]


def _make_optimizer_init(original):
    def __init__(self, params, defaults, *args, **kwargs):
        original(self, params, defaults, *args, **kwargs)
        _state.optimizers.add(self)

    __init__.__wrapped__ = original
    return __init__


def _tensor_cuda(self, *args, **kwargs):
    if not _cuda_available():
        return self  # CPU ranks: the script's `.cuda()` keeps the tensor on the CPU
    return _state.originals["tensor_cuda"](self, *args, **kwargs)


def _has_trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _module_cuda(self, device=None):
    if _internal():
        return _state.originals["module_cuda"](self, device)
    if not _cuda_available():
        return self
    if not _state.cpu_only and not _state.engaged and _has_trainable(self):
        _state.deferred.add(self)  # placed at engagement: only what this rank keeps
        return self
    return _state.originals["module_cuda"](self, device)


def _module_to(self, *args, **kwargs):
    if _internal():
        return _state.originals["module_to"](self, *args, **kwargs)
    device, dtype, _non_blocking, _fmt = torch._C._nn._parse_to(*args, **kwargs)
    if device is None or device.type != "cuda":
        return _state.originals["module_to"](self, *args, **kwargs)
    defer = not _cuda_available() or (not _state.cpu_only and not _state.engaged and _has_trainable(self))
    if not defer:
        return _state.originals["module_to"](self, *args, **kwargs)
    if _cuda_available():
        _state.deferred.add(self)
    if dtype is not None:
        _state.originals["module_to"](self, dtype)
    return self


def _place_deferred(except_root: nn.Module) -> None:
    """Move the modules whose `.cuda()` was deferred for real, except the root and its submodules
    (the runtime places the root's parameters: only this rank's stages go to its device)."""
    inside = {id(m) for m in except_root.modules()}
    for m in list(_state.deferred):
        if id(m) not in inside and _cuda_available():
            with _Internal():
                m.cuda()
    _state.deferred = weakref.WeakSet()


# ----------------------------------------------------------------------------- root detection
def _optimizer_param_ids() -> set[int]:
    return {id(p) for o in list(_state.optimizers) for g in o.param_groups for p in g["params"]}


def _is_root(module: nn.Module) -> bool:
    if not module.training or not torch.is_grad_enabled():
        return False
    ids = _optimizer_param_ids()
    if not ids:
        if _has_trainable(module) and "no-optimizer" not in _state.warned:
            _state.warned.add("no-optimizer")
            logger.warning("Advanced parallelization waits for an optimizer over the model's parameters: "
                           "create it before the first training forward (this forward runs on one device).")
        return False
    return any(id(p) in ids for p in module.parameters() if p.requires_grad)


def _probe_call(self, *args, **kwargs):
    original = _state.originals.get("call") or nn.Module._wrapped_call_impl
    if _state.engaged or _internal() or not _is_root(self):
        if self in _state.deferred and _cuda_available():
            _state.deferred.discard(self)  # a deferred module used on its own: place it now
            with _Internal():
                self.cuda()
        return original(self, *args, **kwargs)
    _remove_probe()
    _state.engaged = True
    engine = _engage(self, args, kwargs)
    return engine.call(self, args, kwargs, broadcast=False)


# ----------------------------------------------------------------------------- engagement
def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _broadcast_inputs(args, kwargs):
    """Rank 0's inputs on every rank (the script's batch is the global batch), on this rank's device."""
    from moreh_ap.runtime.dist import device_for_rank

    if _world() > 1:
        to_cpu = lambda t: t.detach().cpu() if isinstance(t, torch.Tensor) else t  # noqa: E731
        box = [_map(args, to_cpu), _map(kwargs, to_cpu)] if dist.get_rank() == 0 else [None, None]
        dist.broadcast_object_list(box, src=0)
        args, kwargs = box
    device = device_for_rank()
    to_dev = lambda t: t.to(device) if isinstance(t, torch.Tensor) and t.device != device else t  # noqa: E731
    return _map(args, to_dev), _map(kwargs, to_dev)


def _map(obj, fn):
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: _map(v, fn) for k, v in obj.items()}
    return obj


def _user_optimizer(root: nn.Module) -> torch.optim.Optimizer:
    mine = {id(p) for p in root.parameters()}
    found = [o for o in list(_state.optimizers) if any(id(p) in mine for g in o.param_groups for p in g["params"])]
    if len(found) > 1:
        raise NotImplementedError(f"advanced parallelization: {len(found)} optimizers hold parameters of "
                                  f"{type(root).__name__}; use one optimizer (param groups are fine)")
    opt = found[0]
    if len(opt.state) > 0:
        raise OptimizerAlreadySteppedError(
            f"advanced parallelization engages at the first training forward of {type(root).__name__}, but its "
            f"optimizer ({type(opt).__name__}) has already stepped: its state belongs to the unsplit model. "
            "Call enable_advanced_parallelization() before training starts (before the first optim.step()).")
    return opt


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


def _engage(root: nn.Module, args, kwargs) -> "_Engine":
    from moreh_ap.runtime import init_distributed, parallelize

    with _Internal():
        init_distributed()
        optimizer = _user_optimizer(root)
        _check_trainable_call(root, kwargs)
        args, kwargs = _broadcast_inputs(args, kwargs)
        recompute_fixed = _hf_checkpointing(root)
        config = choose_config(root, args, kwargs, optimizer=optimizer, recompute_fixed=recompute_fixed)
        if recompute_fixed and hasattr(root, "gradient_checkpointing_disable"):
            root.gradient_checkpointing_disable()  # the runtime's checkpoint wrappers recompute instead
        _place_deferred(except_root=root)
        user_class = type(root)
        pm = parallelize(root, config, optimizer=optimizer)  # fully_shard may swap the class (FSDP<Name>)
        engine = _Engine(root, pm, optimizer)
        _swap_class(root, user_class)
        _state.engines[root] = engine
    engine.pending_inputs = (args, kwargs)
    return engine


# ----------------------------------------------------------------------------- config choice
def _pinned_config(options):
    from moreh_ap.config import ParallelConfig

    raw = os.environ.get(CONFIG_ENV, "").strip()
    if not raw:
        return None
    if raw.startswith("{"):
        try:
            return ParallelConfig.from_dict(json.loads(raw))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{CONFIG_ENV}={raw!r} is not valid JSON: {exc}") from None
    if os.path.isfile(raw):
        raw = open(raw).read().strip().splitlines()[0]
    return ParallelConfig.from_moreh_line(raw).replace(mixed_precision=options.mixed_precision)


def _global_batch(args, kwargs) -> int:
    for t in list(args) + list(kwargs.values()):
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            return t.shape[0]
    raise ValueError("advanced parallelization: the model call has no batched tensor input")


def fallback_config(root: nn.Module, *, batch: int, world: int, options, recompute_fixed: bool):
    """A valid config without the planner: the options' stages (default 1), data parallel over the rest.

    Used while ``moreh_ap.plan`` is not available. ``num_stages`` is the largest divisor of the world
    size not above the option (and the model's block count); micro-batches default to the stage count.
    """
    from moreh_ap.config import ParallelConfig
    from moreh_ap.models import find_adapter

    adapter = find_adapter(root)
    blocks = len(adapter.blocks()) if adapter.supports_pipeline else 1
    cap = options.num_stages if options.pipeline_parallel and isinstance(options.num_stages, int) else 1
    pp = max(d for d in range(1, world + 1) if world % d == 0 and d <= min(cap, blocks))
    dp = world // pp
    if batch % dp:
        raise ValueError(f"advanced parallelization: the global batch ({batch}) is not divisible by the "
                         f"data-parallel degree ({dp} = {world} ranks / {pp} stages)")
    local = batch // dp
    want = options.num_micro_batches if isinstance(options.num_micro_batches, int) else pp
    nmb = max(n for n in range(1, min(want, local) + 1) if local % n == 0)
    recompute = options.activation_recomputation if isinstance(options.activation_recomputation, bool) else False
    distribute = options.distribute_parameter if isinstance(options.distribute_parameter, bool) else False
    config = ParallelConfig(num_stages=pp, num_micro_batches=nmb, batch_per_device=local // nmb,
                            recomputation=recompute or recompute_fixed, distribute_param=distribute and dp > 1,
                            mixed_precision=options.mixed_precision, schedule="1F1B" if nmb >= pp else "GPipe")
    return config.validate(world, global_batch=batch)


def _plan_here(root, args, kwargs, *, optimizer, recompute_fixed, world, rank):
    """This rank's choice as a dict: the pinned config, the planner's (a collective: it calibrates with
    every rank), or the fallback. Only rank 0 logs and writes the dump file."""
    import moreh_ap
    from moreh_ap.option import current_options

    options = current_options()
    if recompute_fixed and options.activation_recomputation == "auto":
        options = type(options)(**{**options.to_dict(), "activation_recomputation": True})
    config = _pinned_config(options)
    if config is not None:
        logger.info(f"Configuration for parallelism is pinned by {CONFIG_ENV}.")
        if recompute_fixed:
            config = config.replace(recomputation=True)
    elif hasattr(moreh_ap, "plan"):
        config = moreh_ap.plan(root, args, kwargs, options=options, optimizer=optimizer, dump=rank == 0).config
        return config.to_dict()
    else:
        logger.warning("moreh_ap.plan is not available in this build: using the fallback configuration "
                       "(options' num_stages, data parallel over the remaining ranks).")
        config = fallback_config(root, batch=_global_batch(args, kwargs), world=world, options=options,
                                 recompute_fixed=recompute_fixed)
    logger.info("Configuration for parallelism is selected.")
    logger.info(config.to_moreh_line())
    logger.info("train: true")
    if rank == 0:
        with open(DUMP_FILE, "w") as f:
            f.write(config.to_moreh_line() + "\n")
    return config.to_dict()


def _planning_group():
    """A gloo group whose timeout covers planning (the default group's is short, so a dead peer shows fast)."""
    from datetime import timedelta

    return dist.new_group(backend="gloo", timeout=timedelta(seconds=PLANNING_TIMEOUT_S))


def choose_config(root, args, kwargs, *, optimizer, recompute_fixed: bool):
    """Every rank plans (the planner's calibration is collective); rank 0's choice is given to all."""
    from moreh_ap.config import ParallelConfig

    world = _world()
    rank = dist.get_rank() if world > 1 else 0
    try:
        mine = ("ok", _plan_here(root, args, kwargs, optimizer=optimizer, recompute_fixed=recompute_fixed,
                                 world=world, rank=rank))
    except Exception as exc:  # rank 0's error is every rank's error: nobody waits for a config that never comes
        mine = ("error", exc)
    box = [mine]
    if world > 1:
        box = [mine if rank == 0 else None]
        dist.broadcast_object_list(box, src=0, group=_planning_group())
    kind, value = box[0]
    if kind == "error":
        raise value
    if mine[0] == "error":
        raise mine[1]
    return ParallelConfig.from_dict(value)


# ----------------------------------------------------------------------------- the engine
class _StepLoss(torch.autograd.Function):
    """The step's loss; its backward adds this step's gradients scaled by the incoming gradient."""

    @staticmethod
    def forward(ctx, anchor, value, step):
        ctx.step = step
        return value.detach().clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.step.apply_grads(grad)
        return None, None, None


class _PendingStep:
    """Gradients of one step, computed with a unit seed, waiting for ``.backward()`` on its loss."""

    def __init__(self, params: list, grads: list) -> None:
        self.params = params
        self.grads = grads

    @torch.no_grad()
    def apply_grads(self, seed: torch.Tensor) -> None:
        scale = float(seed)
        for p, g in zip(self.params, self.grads):
            if g is None:
                continue
            add = g if scale == 1.0 else g * scale
            p.grad = add if p.grad is None else p.grad + add


class _Engine:
    """One engaged root model: runs training steps through the ParallelModel, and the rest."""

    def __init__(self, root: nn.Module, pm, optimizer) -> None:
        self.root_ref = weakref.ref(root)
        self.pm = pm
        self.optimizer = optimizer
        self.pending_inputs = None
        self.params = list(dict.fromkeys(pm.parameters()))
        self.ids = {id(p) for p in root.parameters()} | {id(p) for p in self.params}
        self.hf = is_hf_model(root)

    def call(self, root: nn.Module, args, kwargs, *, broadcast: bool = True):
        if self.pending_inputs is not None:
            args, kwargs = self.pending_inputs
            self.pending_inputs = None
        elif broadcast:
            with _Internal():
                args, kwargs = _broadcast_inputs(args, kwargs)
        if root.training and torch.is_grad_enabled():
            return self._train(root, args, kwargs)
        return self._evaluate(root, args, kwargs)

    def _train(self, root, args, kwargs):
        kwargs = dict(kwargs)
        if not kwargs.get("use_cache", True):
            kwargs.pop("use_cache")
        previous = [p.grad for p in self.params]  # gradients of earlier steps (accumulation) wait aside
        for p in self.params:
            p.grad = None
        try:
            with _Internal():
                loss = self.pm.train_step(*args, **kwargs)
            grads = [p.grad for p in self.params]
        finally:
            for p, g in zip(self.params, previous):
                p.grad = g
        anchor = torch.zeros((), device=loss.device, requires_grad=True)
        out = _StepLoss.apply(anchor, loss, _PendingStep(self.params, grads))
        return self._output(out)

    def _output(self, loss):
        if self.hf:
            from transformers.modeling_outputs import CausalLMOutputWithPast

            return CausalLMOutputWithPast(loss=loss, logits=None)
        return loss

    def _evaluate(self, root, args, kwargs):
        if self.pm.pp > 1:
            return self._evaluate_pipelined(args, kwargs)
        # every rank runs rank 0's whole batch on the same (full or all-gathered) weights: same output everywhere
        with _Internal():
            return super(type(root), root).__call__(*args, **kwargs)

    def _evaluate_pipelined(self, args, kwargs):
        """The runtime's forward-only pipeline pass: the global batch's mean loss (no logits)."""
        with _Internal(), torch.no_grad():
            out = self.pm(*args, **kwargs)
        return self._output(out.loss)

    # -- state
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full weights on the CPU on every rank (a collective)."""
        with _Internal():
            sd = self.pm.full_state_dict()
            if _world() > 1:
                box = [sd if dist.get_rank() == 0 else None]
                dist.broadcast_object_list(box, src=0)
                sd = box[0]
        return sd


def _swap_class(root: nn.Module, user_class: type) -> None:
    """``root``'s class becomes a subclass of its current one that runs the engine, named as the user's."""
    base = type(root)
    ns = {
        "__call__": _swapped_call,
        "state_dict": _swapped_state_dict,
        "to": _swapped_to,
        "cuda": _swapped_cuda,
        "cpu": _swapped_cpu,
        "__module__": user_class.__module__,
        "__qualname__": user_class.__qualname__,
        "_moreh_ap_engaged": True,
    }
    if hasattr(base, "save_pretrained"):
        ns["save_pretrained"] = _swapped_save_pretrained
    if hasattr(base, "generate"):
        ns["generate"] = _swapped_generate
    root.__class__ = type(user_class.__name__, (base,), ns)


def _engine_of(module) -> _Engine:
    return _state.engines[module]


def _swapped_call(self, *args, **kwargs):
    if _internal():
        return super(type(self), self).__call__(*args, **kwargs)
    return _engine_of(self).call(self, args, kwargs)


def _swapped_state_dict(self, *args, **kwargs):
    if _internal() or args or kwargs.get("destination") is not None or kwargs.get("prefix"):
        return super(type(self), self).state_dict(*args, **kwargs)
    return _engine_of(self).full_state_dict()


def _swapped_to(self, *args, **kwargs):
    if _internal():
        return super(type(self), self).to(*args, **kwargs)
    _device, dtype, _nb, _fmt = torch._C._nn._parse_to(*args, **kwargs)
    if dtype is not None:
        raise NotImplementedError(f"advanced parallelization: model.to({dtype}) after AP engaged is not supported; "
                                  "convert the state_dict() (full weights on the CPU) instead")
    return self  # the plan placed the weights; state_dict()/save_pretrained() give full CPU copies


def _swapped_cuda(self, device=None):
    return super(type(self), self).cuda(device) if _internal() else self


def _swapped_cpu(self):
    return super(type(self), self).cpu() if _internal() else self


def _swapped_save_pretrained(self, save_directory, *args, **kwargs):
    """Full trained weights, written once by rank 0 (a collective: every rank calls it)."""
    if _internal():
        return super(type(self), self).save_pretrained(save_directory, *args, **kwargs)
    state = kwargs.pop("state_dict", None)
    if state is None:
        state = _engine_of(self).full_state_dict()
    result = None
    if _world() == 1 or dist.get_rank() == 0:
        with _Internal():
            result = super(type(self), self).save_pretrained(save_directory, *args, state_dict=state, **kwargs)
    if _world() > 1:
        dist.barrier()  # the other ranks may read the files right after
    return result


def _swapped_generate(self, *args, **kwargs):
    if _engine_of(self).pm.pp > 1:
        raise NotImplementedError("advanced parallelization: generate() is not supported on a pipelined model "
                                  f"(num_stages={_engine_of(self).pm.pp}); save_pretrained() and generate from "
                                  "the reloaded model, or pin num_stages=1")
    return super(type(self), self).generate(*args, **kwargs)


# ----------------------------------------------------------------------------- clip_grad_norm_
def _clip_grad_norm_(parameters, max_norm, norm_type=2.0, error_if_nonfinite=False, foreach=None):
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    engine = next((e for e in list(_state.engines.values())
                   if any(id(p) in e.ids for p in params)), None)
    if engine is None:
        return _state.originals["clip"](params, max_norm, norm_type=norm_type,
                                        error_if_nonfinite=error_if_nonfinite, foreach=foreach)
    if float(norm_type) != 2.0:
        raise NotImplementedError(f"clip_grad_norm_(norm_type={norm_type!r}) under advanced parallelization: "
                                  "only the 2-norm is supported")
    with _Internal():
        norm = engine.pm.clip_grad_norm_(float(max_norm))
    if error_if_nonfinite and not torch.isfinite(norm):
        raise RuntimeError(f"The total norm of order {norm_type} for gradients is non-finite, so it cannot be "
                           "clipped. To disable this error and scale the gradients by the non-finite norm "
                           "anyway, set `error_if_nonfinite=False`")
    return norm

