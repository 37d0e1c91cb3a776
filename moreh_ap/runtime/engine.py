# parallelize() and ParallelModel: apply a ParallelConfig and run training steps with one-device semantics.
"""The engine: glue between the user's objects and the applied parallelism.

``parallelize`` does, in order: validate -> layout and mesh -> pipeline split -> this rank's stages
to its device (nothing else moves) -> rank 0's weights into them -> recompute -> FSDP2 / replicate /
DDP -> optimizer rebinding. The engine never looks at planner internals: it only reads the
``ParallelConfig`` (through its :class:`~moreh_ap.layout.ParallelLayout`). The steps themselves run in
:mod:`moreh_ap.runtime.steps`; the construction steps are :mod:`moreh_ap.runtime.build`.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Callable

import torch
from torch import nn

from moreh_ap.config import ParallelConfig
from moreh_ap.layout import ParallelLayout
from moreh_ap.log import logger
import moreh_ap.runtime.apply as A
from moreh_ap.runtime.closed_loop import StepProbe
from moreh_ap.runtime.build import copy_rank0_weights, rebind_optimizer, wrap_stages
from moreh_ap.runtime.dist import device_for_rank, rank, world_size
from moreh_ap.runtime.failure import block_list_hint, failure_policy
from moreh_ap.signals import step_boundary
from moreh_ap.runtime.gather import after_backward, gather_batch_outputs
from moreh_ap.runtime.norm import NormParams, clip_params_, global_norm
from moreh_ap.models import ModelAdapter, find_adapter, map_stage_names, param_names
from moreh_ap.precision_hooks import model_param
from moreh_ap.runtime.state_dict import full_state_dict
from moreh_ap.runtime.steps import LossSource, StepRunner, to_device
from moreh_ap.runtime.ties import find_tied_params, norm_params, sum_tied_grads
from moreh_ap.runtime.tp import align_grads, apply_tp, check_tp

__all__ = ["parallelize", "ParallelModel", "StepOutput"]


class StepOutput:
    """What ``pm(...)`` returns in training: ``.loss`` (``.backward()`` on it is a no-op: the step already ran)."""

    def __init__(self, loss: torch.Tensor, logits=None) -> None:
        self.loss = loss.detach().clone().requires_grad_(torch.is_grad_enabled())
        self.logits = logits

    def __getitem__(self, i: int):
        return (self.loss,)[i]


def parallelize(model: nn.Module, config: ParallelConfig, *, optimizer: torch.optim.Optimizer | None = None,
                loss_fn: Callable | None = None, output_loss: Callable | None = None, prediction=None,
                measure: bool = True) -> "ParallelModel":
    """Apply ``config`` to ``model`` on this rank (call on every rank after the process group is up).

    Args:
        model: the full model (same class and shapes on every rank; rank 0's weights win).
        config: the parallel configuration (``tp > 1`` needs a family with a tensor-parallel plan:
            Hugging Face Llama-family and GPT-2, with attention heads and KV heads divisible by ``tp``).
        optimizer: the user's optimizer over ``model.parameters()``; it is rebound to this rank's (possibly
            sharded) parameters, keeping param groups and hyper-parameters, and state it already holds
            (loaded, or from earlier steps) is taken from rank 0 and laid onto this rank's part. An
            optimizer with a ``set_grad_norm_fn`` method (FusedLAMB) is given the model's global
            gradient norm on several ranks.
        loss_fn: ``loss_fn(output, target)`` (a mean over samples) for models that do not compute their
            own loss; HF causal LMs given ``labels`` use their own loss.
        output_loss: ``output_loss(model output) -> scalar loss`` for models that compute their own loss
            in their forward (a dict's ``"loss"``, nanoGPT's ``(logits, loss)``, ...): at pp = 1 every
            micro-batch's loss is read from the output and weighted by its share of the global batch's
            samples. At pp > 1 only a family whose adapter computes the same loss on the last stage
            (``adapter.stage_loss()``, nanoGPT) can be pipelined. Also the mode of
            :meth:`ParallelModel.forward_global` (no loss at all: the script computes it).
        prediction: the planner's :class:`~moreh_ap.planner.planning.Plan` that chose ``config``: steps 2-3
            are logged against its prediction and stored in ``MOREH_AP_CACHE_DIR`` so that a later plan of
            this model on this machine is corrected (:mod:`moreh_ap.runtime.closed_loop`). None: the
            measurement is only logged.
        measure: measure steps 2-3 at all (False: nothing is measured or logged).

    Returns:
        The :class:`ParallelModel` to train with.

    Raises:
        ValueError / TypeError / NotImplementedError: bad config for this world size or model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"parallelize: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(config, ParallelConfig):
        raise TypeError(f"parallelize: config must be a ParallelConfig, got {type(config).__name__}")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"parallelize: loss_fn must be callable, got {type(loss_fn).__name__}")
    if output_loss is not None and not callable(output_loss):
        raise TypeError(f"parallelize: output_loss must be callable, got {type(output_loss).__name__}")
    if output_loss is not None and loss_fn is not None:
        raise ValueError("parallelize: give loss_fn (the loss of the model's output and a target) or output_loss "
                         "(the model computes its own loss), not both")
    if prediction is not None and not (hasattr(prediction, "candidates") and hasattr(prediction, "graph")):
        raise TypeError(f"parallelize: prediction must be a moreh_ap.planner.Plan or None, "
                        f"got {type(prediction).__name__}")
    world = world_size()
    adapter = find_adapter(model)
    if config.num_stages > 1 and not adapter.supports_pipeline:
        warnings.warn(f"moreh_ap: no pipeline split is known for {type(model).__name__}; "
                      f"training it with num_stages=1 (data parallel only) instead of {config.num_stages}")
        config = config.replace(num_stages=1, schedule="1F1B", stages_per_rank=1, boundaries=None,
                                distribute_param=config.distribute_param and world > 1,
                                distribute_low_prec_param=config.distribute_low_prec_param and world > 1)
    if config.num_stages > 1 and output_loss is not None and adapter.stage_loss() is None:
        raise NotImplementedError(f"parallelize: {type(model).__name__} computes its loss inside its forward and no "
                                  f"pipeline split of it ({adapter.name}) computes that loss on the last stage; "
                                  f"use num_stages=1 (got {config.num_stages})")
    config.validate(world, num_blocks=len(adapter.blocks()) if config.num_stages > 1 else None)
    if config.tp > 1:
        check_tp(adapter, config.tp)
    with failure_policy("parallelize", user_errors=(ValueError, TypeError, NotImplementedError)):
        pm = ParallelModel(model, config, adapter, optimizer=optimizer, loss_fn=loss_fn, output_loss=output_loss)
    pm._probe = StepProbe(pm, optimizer=optimizer, prediction=prediction) if measure else None
    return pm


class ParallelModel(nn.Module):
    """A model with a ParallelConfig applied; ``train_step`` runs one global batch with one-device semantics.

    Attributes:
        config: the applied config.
        layout: degrees, this run's rank grid and stage placement.
        mesh: the device mesh (None for one process).
        pp_rank, dp_rank, tp_rank: this rank's coordinates.
        stage_modules: this rank's (wrapped) stage modules.
        wrapper: the data-parallel wrapper around them.
    """

    def __init__(self, model: nn.Module, config: ParallelConfig, adapter: ModelAdapter, *, optimizer=None,
                 loss_fn=None, output_loss=None) -> None:
        super().__init__()
        self.config = config
        self.loss_fn = loss_fn
        self._probe: StepProbe | None = None
        """Measures steps 2-3 (set by :func:`parallelize`); None once done."""
        self.device = device_for_rank()
        self.layout = ParallelLayout.from_config(config, world_size())
        self.mesh = self.layout.build_mesh(self.device.type)
        coords = self.layout.coords(rank())
        self.pp_rank, self.dp_rank, self.tp_rank = coords.pp, coords.dp, coords.tp
        self._split_name = adapter.name
        self._orig_keys = list(model.state_dict().keys())
        ids = param_names(model)
        self._tied_keys = [names for names in ids.values() if len(names) > 1]
        """Original names that share one parameter (a tie): one tensor under each in the full state dict."""
        ranges = self.layout.stage_ranges(len(adapter.blocks()), config.boundaries) if self.pp > 1 else []
        stages = A.apply_pipeline(adapter, self.layout, pp_rank=self.pp_rank, ranges=ranges)
        for st in stages:
            st.names = map_stage_names(st.module, ids)
        for st in stages:  # only this rank's stages go to its device; the others' weights stay where they are
            st.module.to(self.device)
        copy_rank0_weights(adapter, stages, layout=self.layout, ranges=ranges, mesh=self.mesh,
                           dp_rank=self.dp_rank, device=self.device, tp_rank=self.tp_rank)
        self._ties = find_tied_params(model, adapter, ids, layout=self.layout, ranges=ranges,
                                      pp_rank=self.pp_rank, dp_rank=self.dp_rank, tp_rank=self.tp_rank)
        self._relays = apply_tp(adapter, stages, tp_mesh=self.mesh["tp"], ids=ids) if self.layout.tp > 1 else {}
        """Original names of parameters re-laid for tensor parallelism (GPT-2's q/k/v) -> their re-lay."""
        self.wrapper = wrap_stages(stages, config, layout=self.layout, mesh=self.mesh)
        self._stages = stages
        self.stage_modules = nn.ModuleList([s.module for s in stages])
        loss = LossSource(hf_model=adapter.hf_model, hf_loss=adapter.loss_function(), vocab_size=adapter.vocab_size(),
                          loss_fn=loss_fn, output_loss=output_loss, adapter_loss=adapter.stage_loss(),
                          target_arg=adapter.target_arg, arg_names=adapter.forward_arg_names())
        self._runner = StepRunner(stages, config=config, layout=self.layout, dp_rank=self.dp_rank,
                                  device=self.device, wrapper=self.wrapper,
                                  pp_group=self.mesh.get_group("pp") if self.mesh is not None and self.pp > 1 else None,
                                  loss=loss, after_backward=self._after_backward, tp_rank=self.tp_rank)
        self.optimizer = optimizer
        if optimizer is not None:
            rebind_optimizer(optimizer, ids, stages=stages, wrapper=self.wrapper, relays=self._relays)
            set_norm = getattr(optimizer, "set_grad_norm_fn", None)
            if callable(set_norm) and self.world > 1:
                set_norm(self.optimizer_grad_norm)
        logger.info(f"parallelize: {config.to_moreh_line()}, schedule : {config.schedule if self.pp > 1 else '-'}, "
                    f"model split : {adapter.name}, data parallel : {self.wrapper.value} over dp {self.dp}"
                    + (f", tensor parallel over tp {self.layout.tp}" if self.layout.tp > 1 else "")
                    + (" with sequence parallelism" if self.layout.tp > 1 and adapter.tp_plan().sequence_parallel
                       else ""))

    # ------------------------------------------------------------------ degrees (from the layout)
    @property
    def world(self) -> int:
        """Ranks in the run."""
        return self.layout.world_size

    @property
    def pp(self) -> int:
        """Pipeline-parallel degree."""
        return self.layout.pp

    @property
    def dp(self) -> int:
        """Data-parallel degree."""
        return self.layout.dp

    @property
    def tp(self) -> int:
        """Tensor-parallel degree."""
        return self.layout.tp

    # --------------------------------------------------------------- training
    def forward(self, *args, target=None, **kwargs):
        """Training (grad enabled, ``train()`` mode): one full step, returns a :class:`StepOutput`.

        Otherwise (evaluation): with pp = 1 the wrapped model's own forward (a :class:`StepOutput` with
        ``loss_fn(output, target)`` and ``.logits`` when ``target`` is given); with pp > 1 a forward-only
        pipeline pass returning a :class:`StepOutput` with the global batch's mean loss (no logits).
        """
        if self.training and torch.is_grad_enabled():
            return StepOutput(self.train_step(*args, target=target, **kwargs))
        if self.pp > 1:
            with failure_policy("eval forward", hint=self._hint), torch.no_grad():
                return StepOutput(self._runner.step(args, target, kwargs, train=False))
        args, kwargs, target = to_device((args, kwargs, target), self.device)
        out = self._stages[0].module(*args, **kwargs)
        if target is not None and self.loss_fn is not None:
            return StepOutput(self.loss_fn(out, target), logits=out)
        return out

    @contextlib.contextmanager
    def backward_seed(self, seed: float):
        """Within the block, :meth:`train_step`'s backward is seeded with ``seed`` (a loss scale): the gradients
        left are ``seed`` times the loss's, as after ``(loss * seed).backward()`` on one device, intermediates
        included (fp16 loss scaling); the returned loss is not scaled.

        Raises:
            ValueError: ``seed`` is not a finite number > 0.
        """
        seed = float(seed)
        if not 0 < seed < float("inf"):
            raise ValueError(f"backward_seed(seed={seed!r}) is not valid: expected a finite number > 0")
        before, self._runner.grad_seed = self._runner.grad_seed, seed
        try:
            yield self
        finally:
            self._runner.grad_seed = before

    def train_step(self, *args, target=None, **kwargs) -> torch.Tensor:
        """Forward + backward of ONE global batch over the config's micro-batches.

        Every rank passes the same global batch; each dp rank takes its slice. Gradients are left
        in the parameters (the optimizer steps after). Returns the mean loss over the global batch,
        the same fp32 scalar on every rank.

        Input tensors may be anywhere (e.g. CPU tensors from a DataLoader): this rank's rows are moved to
        its device. Steps 2-3 are measured once (:mod:`moreh_ap.runtime.closed_loop`).

        Raises:
            moreh_ap.errors.InputError: the call cannot be run (no loss, a batch that cannot be split).
            KeyboardInterrupt: Ctrl-C or SIGTERM (``moreh_ap.signals.Terminated``) on any rank, raised on
                every rank at the start of the same step.
        """
        with step_boundary("train_step"):  # a held Ctrl-C / SIGTERM is raised here, on every rank together
            return self._measured_step(args, target, kwargs)

    def _measured_step(self, args, target, kwargs) -> torch.Tensor:
        probe = self._probe
        if probe is None:
            with failure_policy("train_step", hint=self._hint):
                return self._runner.step(args, target, kwargs, train=True)
        probe.before_step()
        try:
            with failure_policy("train_step", hint=self._hint):
                loss = self._runner.step(args, target, kwargs, train=True)
        except BaseException:
            probe.abort()  # no tracker left active in the caller's code
            self._probe = None
            raise
        probe.after_step()
        if probe.done:
            self._probe = None
        return loss

    def forward_global(self, *args, **kwargs):
        """A training forward for a loss computed OUTSIDE the model (pp = 1): this dp rank's rows run through
        the model as one micro-batch and every output tensor is all-gathered (autograd-aware), so the
        caller gets the whole global batch's outputs, as one device would. ``criterion(out, y).backward()``
        on the same global batch on every rank gives one device's gradients (the gather's backward sums
        over ranks, DDP / FSDP2 average: no extra scaling).

        Raises:
            NotImplementedError: the model is pipelined, or an output has no batch dimension.
            moreh_ap.errors.InputError: no batched input, or fewer samples than data-parallel ranks.
        """
        if self.pp > 1:
            raise NotImplementedError("forward_global: a loss computed outside the model needs the whole "
                                      f"model on every rank; this model is pipelined (num_stages={self.pp})")
        with failure_policy("forward", hint=self._hint):
            out, rows, sizes = self._runner.forward_rows(args, kwargs)
        if self.dp > 1:
            out = gather_batch_outputs(out, rows=rows, sizes=sizes, group=self.mesh.get_group("dp"))
        if self.layout.tp > 1 or self._ties.groups:
            after_backward(out, self._after_backward)  # the script's backward ends the step
        return out

    def _hint(self, exc: BaseException) -> str:
        return block_list_hint(exc, pipelined=self.pp > 1, split_name=self._split_name)

    def _after_backward(self) -> None:
        if self.layout.tp > 1:
            align_grads(p for _, p in A.named_local_params(self._stages, self.wrapper))
        if self._ties.groups:
            sum_tied_grads(self._ties, {names[0]: p for names, p in A.named_local_params(self._stages, self.wrapper)})

    # ------------------------------------------------------------------ norms
    def norm_params(self) -> NormParams:
        """This rank's trainable parameters, those a global gradient norm counts (tied copies once) and
        this rank's dp coordinate (plain gradients are replicated over dp)."""
        return norm_params(A.named_local_params(self._stages, self.wrapper), self._ties,
                           dp_rank=self.dp_rank if self.world > 1 else None)

    def grad_norm(self) -> torch.Tensor:
        """Global 2-norm of this model's gradients over all stages and shards (a collective)."""
        params = self.norm_params()
        return global_norm([p.grad for p in params.counted if p.grad is not None], dp_rank=params.dp_rank)

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip gradients to a global norm of ``max_norm`` (same as one device); returns the norm."""
        return clip_params_(self.norm_params(), max_norm)

    def optimizer_grad_norm(self, params: list[torch.Tensor]) -> torch.Tensor | None:
        """The global gradient norm of ``params`` (an optimizer's share of this model), tied copies once;
        None (no collective) when none of ``params`` belongs to this model."""
        mine = self.norm_params()
        held = {id(p) for p in mine.everything}
        if not any(id(model_param(p)) in held for p in params):  # an fp32 master (apex O2): its parameter's
            return None
        skip = held - {id(p) for p in mine.counted}
        return global_norm([p.grad for p in params if p.grad is not None and id(model_param(p)) not in skip],
                           dp_rank=mine.dp_rank)

    # ------------------------------------------------------------ utilities
    def zero_grad(self, set_to_none: bool = True) -> None:
        for st in self._stages:
            st.module.zero_grad(set_to_none=set_to_none)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full, unsharded weights with the original names (tied ones under each name) on rank 0; ``{}`` elsewhere.

        A collective: call it on every rank.
        """
        return full_state_dict(self._stages, self.wrapper, keys=self._orig_keys, dp_rank=self.dp_rank,
                               tied=self._tied_keys, relays=self._relays, tp_rank=self.tp_rank)

    def load_full_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True):
        """Load a one-device state dict (the model's original names, full tensors): every rank passes the whole
        dict and copies what its stages and shards hold (no communication). Returns torch's
        ``(missing_keys, unexpected_keys)``; ``strict`` raises ``RuntimeError`` on either, as torch does."""
        from moreh_ap.runtime.state_dict import load_full_state_dict

        return load_full_state_dict(self._stages, self.wrapper, state_dict, keys=self._orig_keys, strict=strict,
                                    relays=self._relays)

    def optimizer_state_dict(self) -> dict | None:
        """The optimizer's state as ``optimizer.state_dict()`` gives it on one device (indices in the user's
        original group order, full CPU tensors) on rank 0; None elsewhere. A collective: call it on every rank.

        Raises:
            ValueError: ``parallelize`` was given no optimizer.
        """
        from moreh_ap.runtime.optim_state import map_of
        from moreh_ap.runtime.optim_transfer import gather_one_device_state

        return gather_one_device_state(self._own_optimizer(), map_of(self._own_optimizer()), dp_rank=self.dp_rank)

    def load_optimizer_state_dict(self, state_dict: dict) -> None:
        """Load a one-device optimizer state dict (every rank passes the whole dict; each lays its own shards
        and stages; no communication). Hyper-parameters of the groups come from the dict, as in torch."""
        from moreh_ap.runtime.optim_state import lay_named_state, map_of, named_from_one_device

        optimizer = self._own_optimizer()
        omap = map_of(optimizer)
        lay_named_state(optimizer, named_from_one_device(state_dict, omap), omap)

    def _own_optimizer(self) -> torch.optim.Optimizer:
        if self.optimizer is None:
            raise ValueError("ParallelModel: no optimizer was given to parallelize(model, config, optimizer=...)")
        return self.optimizer
