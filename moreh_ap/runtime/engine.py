# parallelize() and ParallelModel: apply a ParallelConfig and run training steps with one-device semantics.
"""The engine: glue between the user's objects and the applied parallelism.

``parallelize`` does, in order: validate -> mesh (pp, dp) -> pipeline split -> this rank's stages
to its device (nothing else moves) -> rank 0's weights into them -> recompute -> FSDP2 / replicate /
DDP -> optimizer rebinding. The engine never looks at planner internals: it only reads the
``ParallelConfig``.
"""
from __future__ import annotations

import os
import sys
import traceback
import warnings
from collections import defaultdict
from contextlib import nullcontext
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from moreh_ap.config import ParallelConfig
from moreh_ap.log import logger
from moreh_ap.runtime import apply as A
from moreh_ap.runtime.dist import (BUCKET_BYTES, build_mesh, device_for_rank, module_tensors, recv_tensors,
                                   send_tensors, subgroup, world_size)
from moreh_ap.runtime.loss import LossPlan, extract_logits, hf_num_items
from moreh_ap.runtime.norm import clip_grad_norm_ as _clip, set_active_layout
from moreh_ap.models import clean_name, find_adapter, map_stage_names, param_names

__all__ = ["parallelize", "ParallelModel", "StepOutput"]

_HF_NO_EFFECT = frozenset({"use_cache", "return_dict", "output_attentions", "output_hidden_states"})
"""HF keyword arguments that do not change the training loss; dropped when the model is pipelined."""


class StepOutput:
    """What ``pm(...)`` returns in training: ``.loss`` (``.backward()`` on it is a no-op: the step already ran)."""

    def __init__(self, loss: torch.Tensor, logits=None) -> None:
        self.loss = loss.detach().clone().requires_grad_(torch.is_grad_enabled())
        self.logits = logits

    def __getitem__(self, i: int):
        return (self.loss,)[i]


def _fail(exc: BaseException, where: str, hint: str = "") -> None:
    """Show this rank's traceback, then leave at once so peers see a closed connection instead of hanging."""
    if world_size() > 1 and os.environ.get("MOREH_AP_EXIT_ON_ERROR", "1") != "0":
        r = dist.get_rank()
        sys.stderr.write(f"[rank {r}] moreh_ap: {where} failed:\n{''.join(traceback.format_exception(exc))}{hint}")
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(1)


def _map_tensors(obj, fn):
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


def parallelize(model: nn.Module, config: ParallelConfig, *, optimizer: torch.optim.Optimizer | None = None,
                loss_fn: Callable | None = None) -> "ParallelModel":
    """Apply ``config`` to ``model`` on this rank (call on every rank after the process group is up).

    Args:
        model: the full model (same class and shapes on every rank; rank 0's weights win).
        config: the parallel configuration (``tp`` must be 1).
        optimizer: the user's optimizer over ``model.parameters()``, with empty state; it is rebound to
            this rank's (possibly sharded) parameters, keeping param groups and hyper-parameters.
        loss_fn: ``loss_fn(output, target)`` (a mean over samples) for models that do not compute their
            own loss; HF causal LMs given ``labels`` use their own loss.

    Returns:
        The :class:`ParallelModel` to train with.

    Raises:
        ValueError / TypeError / NotImplementedError: bad config for this world size or model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"parallelize: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(config, ParallelConfig):
        raise TypeError(f"parallelize: config must be a ParallelConfig, got {type(config).__name__}")
    if config.tp != 1:
        raise NotImplementedError(f"ParallelConfig.tp={config.tp}: tensor parallelism is not supported by the "
                                  "runtime yet; use tp=1")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"parallelize: loss_fn must be callable, got {type(loss_fn).__name__}")
    world = world_size()
    adapter = find_adapter(model)
    if config.num_stages > 1 and not adapter.supports_pipeline:
        warnings.warn(f"moreh_ap: no pipeline split is known for {type(model).__name__}; "
                      f"training it with num_stages=1 (data parallel only) instead of {config.num_stages}")
        config = config.replace(num_stages=1, schedule="1F1B", stages_per_rank=1, boundaries=None,
                                distribute_param=config.distribute_param and world > 1,
                                distribute_low_prec_param=config.distribute_low_prec_param and world > 1)
    config.validate(world, num_blocks=len(adapter.blocks()) if config.num_stages > 1 else None)
    try:
        return ParallelModel(model, config, adapter, optimizer=optimizer, loss_fn=loss_fn)
    except (ValueError, TypeError, NotImplementedError):
        raise
    except BaseException as exc:  # a rank failing half-way must not leave its peers waiting
        _fail(exc, "parallelize")
        raise


class ParallelModel(nn.Module):
    """A model with a ParallelConfig applied; ``train_step`` runs one global batch with one-device semantics."""

    def __init__(self, model: nn.Module, config: ParallelConfig, adapter, *, optimizer=None, loss_fn=None) -> None:
        super().__init__()
        self.config = config
        self.loss_fn = loss_fn
        self.device = device_for_rank()
        self.world = world_size()
        self.pp = config.num_stages
        self.dp = config.dp(self.world)
        self._split_name = adapter.name
        self._hf = adapter.hf_model
        self._hf_loss = adapter.loss_function()
        self._vocab = adapter.vocab_size()
        self._orig_keys = list(model.state_dict().keys())
        self.mesh = build_mesh(self.pp, self.dp, self.device)
        self.pp_rank = self.mesh.get_local_rank("pp") if self.mesh is not None else 0
        self.dp_rank = self.mesh.get_local_rank("dp") if self.mesh is not None else 0
        ids = param_names(model)
        stages = A.apply_pipeline(adapter, config, pp_rank=self.pp_rank)
        for st in stages:
            st.names = map_stage_names(st.module, ids)
        for st in stages:  # only this rank's stages go to its device; the others' weights stay where they are
            st.module.to(self.device)
        self._copy_rank0_weights(adapter, stages)
        self._setup_ties(model, adapter, ids)
        self._wrap(stages)
        self._stages = stages
        self.stage_modules = nn.ModuleList([s.module for s in stages])
        self._schedules: dict[Any, Any] = {}
        self._autocast = config.mixed_precision and self._wrapper in ("none", "ddp")
        set_active_layout(dp_rank=self.dp_rank if self.world > 1 else None, model=self if self.world > 1 else None)
        self.optimizer = optimizer
        if optimizer is not None:
            self._rebind(optimizer, ids, model)
        logger.info(f"parallelize: {config.to_moreh_line()}, schedule : {config.schedule if self.pp > 1 else '-'}, "
                    f"model split : {adapter.name}, data parallel : {self._wrapper} over dp {self.dp}")

    # ------------------------------------------------------------------ setup
    def _wrap(self, stages: list[A.Stage]) -> None:
        cfg = self.config
        if cfg.recomputation:
            for st in stages:
                A.apply_recompute(st)
        self._wrapper = "none"
        if self.mesh is None:
            return
        dp_mesh = self.mesh["dp"]
        for st in stages:
            if cfg.distribute_param:
                A.apply_fsdp(st, cfg, dp_mesh)
                self._wrapper = "fsdp"
            elif self.pp > 1:
                A.apply_replicate(st, cfg, dp_mesh)
                self._wrapper = "replicate"
            elif self.dp > 1:
                A.apply_ddp(st, dp_mesh)
                self._wrapper = "ddp"

    @torch.no_grad()
    def _copy_rank0_weights(self, adapter, stages: list[A.Stage]) -> None:
        """Global rank 0's values into this rank's stage tensors (already on this rank's device).

        Rank 0 holds the whole model (its own stages on its device, the rest where the user left
        them): it sends pp rank p's stage tensors to the dp-index-0 rank of pp rank p, one bucket
        at a time copied to its device (NCCL sends device memory; gloo takes either); then every pp
        rank's dp group broadcasts from its dp-index-0 rank, as DDP does at construction.
        """
        if self.mesh is None:
            return
        mine = [t.detach() for t in module_tensors([st.module for st in stages])]  # same storage, no autograd
        if self.pp > 1:
            rank = dist.get_rank()
            if rank == 0:
                for p in range(1, self.pp):
                    theirs = A.apply_pipeline(adapter, self.config, pp_rank=p)
                    send_tensors(module_tensors([st.module for st in theirs]), dst=int(self.mesh.mesh[p, 0]),
                                 device=self.device)
            elif self.dp_rank == 0:
                recv_tensors(mine, src=0)
        if self.dp > 1:
            dist._broadcast_coalesced(self.mesh.get_group("dp"), mine, BUCKET_BYTES, 0)

    def _setup_ties(self, model: nn.Module, adapter, ids: dict[int, list[str]]) -> None:
        """Parameters shared by stages on different pp ranks: a group per dp index to sum their grads."""
        self._tie_groups: list[tuple[str, Any]] = []  # (original name, group) held by this rank
        self._tie_dupes: set[str] = set()  # original names whose local copy is not the counted one
        if self.pp == 1:
            return
        tied = [names for names in ids.values() if len(names) > 1 and names[0] in dict(model.named_parameters())]
        if not tied:
            return
        from moreh_ap.layout import stage_ranges

        total = self.config.total_stages
        ranges = stage_ranges(len(adapter.blocks()), total, self.config.boundaries)
        for names in tied:
            holders = sorted({s % self.pp for s in range(total)
                              if self._stage_holds(adapter, model, ranges[s], s, total, names)})
            if len(holders) < 2:
                continue
            for d in range(self.dp):
                grp = subgroup([h * self.dp + d for h in holders])
                if d == self.dp_rank and self.pp_rank in holders:
                    self._tie_groups.append((names[0], grp))
                    if self.pp_rank != holders[0]:
                        self._tie_dupes.add(names[0])

    @staticmethod
    def _stage_holds(adapter, model, rng, s, total, names) -> bool:
        module, _ = adapter.build_stage(rng[0], rng[1], first=s == 0, last=s == total - 1)
        target = dict(model.named_parameters(remove_duplicate=False))[names[0]]
        return any(p is target for p in module.parameters())

    def _named_local_params(self):
        """(original names, parameter) for every parameter on this rank (tied ones once per stage)."""
        seen = set()
        for st in self._stages:
            inner = st.module.module if self._wrapper == "ddp" else st.module
            for n, p in inner.named_parameters():
                if id(p) in seen:
                    continue
                seen.add(id(p))
                yield st.names.get(clean_name(n), [clean_name(n)]), p

    def _rebind(self, optimizer: torch.optim.Optimizer, ids, model) -> None:
        if len(optimizer.state) > 0:
            raise ValueError("parallelize: the optimizer already has state (it has stepped); create it over "
                             "model.parameters() and pass it before its first step")
        by_name = {}
        for names, p in self._named_local_params():
            for n in names:
                by_name[n] = p
        used = set()
        for group in optimizer.param_groups:
            new = []
            for p in group["params"]:
                names = ids.get(id(p))
                if names is None:
                    raise ValueError("parallelize: the optimizer holds a parameter that is not in the model")
                q = next((by_name[n] for n in names if n in by_name), None)
                if q is not None and id(q) not in used:
                    used.add(id(q))
                    new.append(q)
            group["params"] = new
        optimizer.state = defaultdict(dict)

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
            try:
                with torch.no_grad():
                    return StepOutput(self._step(args, target, kwargs, train=False))
            except (ValueError, TypeError) as exc:
                if not getattr(exc, "_moreh_user_error", False):
                    _fail(exc, "eval forward")
                raise
            except BaseException as exc:
                _fail(exc, "eval forward", self._hint(exc))
                raise
        out = self._stages[0].module(*args, **kwargs)
        if target is not None and self.loss_fn is not None:
            return StepOutput(self.loss_fn(out, target), logits=out)
        return out

    def train_step(self, *args, target=None, **kwargs) -> torch.Tensor:
        """Forward + backward of ONE global batch over the config's micro-batches.

        Every rank passes the same global batch; each dp rank takes its slice. Gradients are left
        in the parameters (the optimizer steps after). Returns the mean loss over the global batch,
        the same fp32 scalar on every rank.
        """
        try:
            return self._step(args, target, kwargs, train=True)
        except (ValueError, TypeError) as exc:
            if getattr(exc, "_moreh_user_error", False):
                raise
            _fail(exc, "train_step")
            raise
        except BaseException as exc:
            _fail(exc, "train_step", self._hint(exc))
            raise

    def _hint(self, exc: BaseException) -> str:
        if self.pp > 1 and self._split_name.startswith("block list") and "NoneType" in str(exc):
            return ("hint: this model was split as a torchtitan-style block list: on a pipeline stage the "
                    "children before/after `layers` that live on other stages are None, and the model's "
                    "forward must skip them (e.g. `h = self.tok_emb(x) if self.tok_emb is not None else x`)\n")
        return ""

    def _user_error(self, exc_cls, msg: str):
        exc = exc_cls(msg)
        exc._moreh_user_error = True
        return exc

    def _prepare(self, args, target, kwargs):
        kwargs = dict(kwargs)
        if self._hf and target is None and "labels" in kwargs and self.loss_fn is None:
            target = kwargs.pop("labels")
            hf = True
        else:
            hf = False
        if not hf and self.loss_fn is None:
            raise self._user_error(ValueError, "ParallelModel.train_step: no loss: pass labels= to a Hugging Face "
                                   "causal LM, or give parallelize(..., loss_fn=...) and train_step(..., target=...)")
        if not hf and target is None:
            raise self._user_error(ValueError, "ParallelModel.train_step: loss_fn is set but target= is missing")
        if self._hf and "input_ids" in kwargs and not args:
            args = (kwargs.pop("input_ids"),)
        if self._hf and self.pp == 1:
            kwargs.setdefault("use_cache", False)
        if self._hf and self.pp > 1:
            kwargs = {k: v for k, v in kwargs.items() if v is not None and k not in _HF_NO_EFFECT}
            extra = sorted(set(kwargs) - {"attention_mask"})
            if extra:
                raise self._user_error(ValueError, f"ParallelModel.train_step: with num_stages > 1 a Hugging Face "
                                       f"model takes input_ids, attention_mask and labels only; got {extra}")
        elif self.pp > 1 and kwargs:
            raise self._user_error(ValueError, f"ParallelModel.train_step: with num_stages > 1 the model takes "
                                   f"positional tensors only; got keyword arguments {sorted(kwargs)}")
        tensors = [t for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor)]
        if not tensors:
            raise self._user_error(ValueError, "ParallelModel.train_step: no input tensor given")
        return args, target, kwargs, hf, tensors[0].shape[0]

    def _micro_batches(self, local: int) -> int:
        """The config's micro-batch count, or the largest valid smaller one that divides a short batch."""
        cfg = self.config
        for n in range(min(cfg.num_micro_batches, local), 0, -1):
            if local % n:
                continue
            try:
                cfg.replace(num_micro_batches=n, batch_per_device=local // n).validate(self.world)
            except ValueError:
                continue
            if n != cfg.num_micro_batches:
                logger.warning(f"batch of {local * self.dp} samples: using {n} micro-batches instead of "
                               f"{cfg.num_micro_batches}")
            return n
        raise self._user_error(ValueError, f"a global batch of {local * self.dp} samples cannot be split into "
                               f"dp({self.dp}) x micro-batches valid for schedule {cfg.schedule!r} with "
                               f"num_stages({self.pp})")

    def _step(self, args, target, kwargs, *, train: bool) -> torch.Tensor:
        args, target, kwargs, hf, batch = self._prepare(args, target, kwargs)
        if batch % self.dp:
            raise self._user_error(ValueError, f"global batch({batch}) is not divisible by dp({self.dp})")
        local = batch // self.dp
        nmb = self._micro_batches(local)
        num_items = hf_num_items(target) if hf else batch
        plan = LossPlan(hf_loss=self._hf_loss if hf else None, vocab_size=self._vocab,
                        user_loss=None if hf else self.loss_fn, num_items=num_items,
                        micro_batch_samples=local // nmb, dp=self.dp)
        lo = self.dp_rank * local
        cut = lambda t: t[lo:lo + local] if t.dim() > 0 and t.shape[0] == batch else t  # noqa: E731
        args, kwargs = _map_tensors(args, cut), _map_tensors(kwargs, cut)
        target = _map_tensors(target, cut)
        self._local = local
        if not train:
            mine = self._eval_pipeline(args, kwargs, target, nmb, plan)
        elif self.pp == 1:
            mine = self._run_local(args, kwargs, target, nmb, plan)
        else:
            mine = self._run_pipeline(args, kwargs, target, nmb, plan, hf)
        if train:
            self._sum_tied_grads()
        loss = torch.as_tensor(mine, dtype=torch.float32).reshape(()).to(self.device)
        if self.world > 1:
            dist.all_reduce(loss)
        return loss

    def _run_local(self, args, kwargs, target, nmb: int, plan: LossPlan) -> torch.Tensor:
        module = self._stages[0].module
        local = self._local
        mbs = list(zip(_split(args, nmb, local), _split(kwargs, nmb, local), _split(target, nmb, local)))
        total = torch.zeros((), device=self.device)
        for i in range(nmb):
            self._set_sync(i == nmb - 1)
            with torch.autocast(self.device.type, dtype=torch.bfloat16) if self._autocast else nullcontext():
                a, k, t = mbs[i]
                out = module(*a, **k)
                loss = plan.piece(extract_logits(out), t)
            del out  # the logits are not saved for backward: let them go before it (one logits-sized tensor)
            loss.backward()
            total += loss.detach().float() / self.dp
        self._set_sync(True)
        return total

    def _set_sync(self, on: bool) -> None:
        """Gradient sync for the next backward: DDP accumulates locally until the last micro-batch; FSDP2
        (distribute_param) reduce-scatters after every micro-batch so that only sharded gradients accumulate."""
        module = self._stages[0].module
        if self._wrapper == "ddp":
            module.require_backward_grad_sync = on
        elif self._wrapper == "replicate":
            module.set_requires_gradient_sync(on)

    def _run_pipeline(self, args, kwargs, target, nmb: int, plan: LossPlan, hf: bool) -> torch.Tensor:
        key = (nmb, tuple((tuple(t.shape), t.dtype) for t in args if isinstance(t, torch.Tensor)),
               tuple(sorted((k, tuple(v.shape)) for k, v in kwargs.items() if isinstance(v, torch.Tensor))))
        if key not in self._schedules:
            self._schedules[key] = A.build_schedule(self._stages, self.config, n_microbatches=nmb,
                                                    pp_group=self.mesh.get_group("pp"), device=self.device,
                                                    loss_fn=self._pipeline_loss)
        self._plan = plan
        losses: list[torch.Tensor] = []
        holds_last = any(s.is_last for s in self._stages)
        # return_outputs=False: the last stage would otherwise keep every micro-batch's output (the logits)
        # until the end of the step, to merge them; training uses the losses only
        self._schedules[key].step(*args, target=target if holds_last else None, losses=losses,
                                  return_outputs=False, **kwargs)
        if not holds_last:
            return torch.zeros((), device=self.device)
        return torch.stack([l.detach().float() for l in losses]).sum() / self.dp

    def _eval_pipeline(self, args, kwargs, target, nmb: int, plan: LossPlan) -> torch.Tensor:
        """Forward-only schedule (no loss_fn); the last stage scores its whole local batch at once."""
        key = ("eval", nmb, tuple((tuple(t.shape), t.dtype) for t in args if isinstance(t, torch.Tensor)),
               tuple(sorted((k, tuple(v.shape)) for k, v in kwargs.items() if isinstance(v, torch.Tensor))))
        if key not in self._schedules:
            self._schedules[key] = A.build_schedule(self._stages, self.config, n_microbatches=nmb,
                                                    pp_group=self.mesh.get_group("pp"), device=self.device,
                                                    loss_fn=None)
        out = self._schedules[key].step(*args, **kwargs)
        if not any(s.is_last for s in self._stages):
            return torch.zeros((), device=self.device)
        plan.micro_batch_samples = self._local
        return plan.piece(out, target).detach().float() / self.dp

    def _pipeline_loss(self, output, target):
        return self._plan.piece(output, target)

    def _sum_tied_grads(self) -> None:
        if not self._tie_groups:
            return
        from torch.distributed.tensor import DTensor

        params = {names[0]: p for names, p in self._named_local_params()}
        for name, grp in self._tie_groups:
            p = params[name]
            g = p.grad
            local = g.to_local() if isinstance(g, DTensor) else g
            dist.all_reduce(local, group=grp)

    # ------------------------------------------------------------ utilities
    def _norm_params(self):
        counted, everything = [], []
        for names, p in self._named_local_params():
            if not p.requires_grad:
                continue
            everything.append(p)
            if names[0] not in self._tie_dupes:
                counted.append(p)
        return counted, everything

    def grad_norm(self) -> torch.Tensor:
        """Global 2-norm of this model's gradients over all stages and shards (a collective)."""
        from moreh_ap.runtime.norm import global_norm

        return global_norm([p.grad for p in self._norm_params()[0] if p.grad is not None])

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip gradients to a global norm of ``max_norm`` (same as one device); returns the norm."""
        return _clip(self, max_norm)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for st in self._stages:
            st.module.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full, unsharded weights with the original names (tied ones under each name) on rank 0; ``{}`` elsewhere.

        A collective: call it on every rank.
        """
        from torch.distributed.tensor import DTensor

        mine: dict[str, torch.Tensor] = {}
        for st in self._stages:
            inner = st.module.module if self._wrapper == "ddp" else st.module
            for n, t in inner.state_dict().items():
                full = t.full_tensor() if isinstance(t, DTensor) else t
                for orig in st.names.get(clean_name(n), []):
                    mine.setdefault(orig, full.detach().cpu().clone())
        if self.world == 1:
            gathered = [mine]
        else:
            gathered = [None] * self.world if dist.get_rank() == 0 else None
            dist.gather_object(mine if self.dp_rank == 0 else {}, gathered, dst=0)
            if dist.get_rank() != 0:
                return {}
        merged: dict[str, torch.Tensor] = {}
        for part in gathered:
            for k, v in part.items():
                merged.setdefault(k, v)
        missing = [k for k in self._orig_keys if k not in merged]
        if missing:
            raise RuntimeError(f"full_state_dict: no rank held {missing[:5]}")
        return {k: merged[k] for k in self._orig_keys}


def _split(obj, n: int, rows: int) -> list:
    """``obj`` cut into ``n`` micro-batches along dim 0 (tensors with ``rows`` rows; the rest repeated)."""
    if isinstance(obj, torch.Tensor):
        return list(obj.chunk(n)) if obj.dim() > 0 and obj.shape[0] == rows else [obj] * n
    if isinstance(obj, (list, tuple)):
        parts = [_split(o, n, rows) for o in obj]
        return [type(obj)(p[i] for p in parts) for i in range(n)]
    if isinstance(obj, dict):
        parts = {k: _split(v, n, rows) for k, v in obj.items()}
        return [{k: v[i] for k, v in parts.items()} for i in range(n)]
    return [obj] * n
