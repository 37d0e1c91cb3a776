# The "how" of a ParallelConfig: pipeline split, recompute, FSDP2 / replicate / DDP, schedules.
"""Each ``apply_*`` takes modules, the config and the mesh, and changes the modules with PyTorch's parts.

- :func:`apply_pipeline`: this pp rank's stage modules (the layout's placement of virtual stages).
- :func:`apply_recompute`: ``checkpoint_wrapper`` around every block.
- :func:`apply_fsdp`: ``fully_shard`` per block, per large module outside the blocks (embedding, head)
  and on the stage root, bf16 params / fp32 reduction under mixed precision,
  ``reshard_after_forward = distribute_low_prec_param``.
- :func:`apply_replicate`: FSDP-based ``replicate`` per block and root (replication that works inside
  pipelines, unlike DDP).
- :func:`apply_ddp`: ``DistributedDataParallel`` (pp = 1 only).
- :func:`build_schedule`: PipelineStage objects and the config's schedule class (from the schedule registry).

:class:`Wrapper` names the data-parallel wrapper a stage got; :func:`named_local_params` reads a
stage's parameters under their original names through it.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from moreh_ap.config import ParallelConfig
from moreh_ap.fsdp_units import is_own_unit
from moreh_ap.layout import ParallelLayout
from moreh_ap.models import ModelAdapter, clean_name
from moreh_ap.precision_hooks import autocast_dtype, autocast_like
from moreh_ap.schedules import get_schedule

__all__ = ["Stage", "Wrapper", "apply_pipeline", "apply_recompute", "apply_fsdp", "apply_replicate", "apply_ddp",
           "build_schedule", "local_module", "named_local_params"]


class Wrapper(enum.Enum):
    """The data-parallel wrapper the runtime put around this rank's stages."""

    NONE = "none"
    """No process group (one process): the stages run as they are."""
    DDP = "ddp"
    """``DistributedDataParallel`` (pp = 1, no parameter distribution)."""
    REPLICATE = "replicate"
    """FSDP-based ``replicate`` (pipelines without parameter distribution)."""
    FSDP = "fsdp"
    """``fully_shard`` (parameter distribution: ZeRO-2 / ZeRO-3)."""


@dataclass(slots=True)
class Stage:
    """One pipeline stage held by this rank."""

    index: int
    """Stage index in the whole pipeline (virtual stages counted)."""
    module: nn.Module
    """The module the schedule runs (after wrapping: FSDP/replicate/DDP module)."""
    container: nn.Module | None
    """The module whose children are this stage's blocks (None: no blocks known)."""
    is_first: bool
    """The stage runs the model's input side (embeddings)."""
    is_last: bool
    """The stage runs the model's output side (norm, head); the loss is taken on its output."""
    names: dict[str, list[str]] = field(default_factory=dict)
    """Stage parameter/buffer name -> original model names (filled before wrapping)."""


def apply_pipeline(adapter: ModelAdapter, layout: ParallelLayout, *, pp_rank: int,
                   ranges: list[tuple[int, int]]) -> list[Stage]:
    """The stage modules of pipeline rank ``pp_rank`` (``layout.stages_of(pp_rank)``).

    Args:
        adapter: the model's adapter (it builds a stage from a block range).
        layout: the run's layout (pipeline degree, virtual stages and their placement).
        pp_rank: the pipeline rank whose stages to build.
        ranges: block range ``[lo, hi)`` of every virtual stage (``layout.stage_ranges``).

    With pp = 1 the whole model is the only stage (its own forward runs).
    """
    model = adapter.model
    if layout.pp == 1:
        return [Stage(0, model, adapter.container(), True, True)]
    stages = []
    autocast = autocast_dtype(model)  # the model's forward runs under autocast (apex O1): so do its stages
    for s in layout.stages_of(pp_rank):
        first, last = layout.is_first_stage(s), layout.is_last_stage(s)
        module, container = adapter.build_stage(*ranges[s], first=first, last=last)
        if autocast is not None:
            autocast_like(module, autocast)
        stages.append(Stage(s, module, container, first, last))
    return stages


def apply_recompute(stage: Stage) -> None:
    """Wrap every block of ``stage`` in a (non-reentrant) ``checkpoint_wrapper``."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    if stage.container is None:
        stage.module = checkpoint_wrapper(stage.module)
        return
    for name, child in list(stage.container.named_children()):
        stage.container._modules[name] = checkpoint_wrapper(child)


def _mp_policy(config: ParallelConfig):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if config.mixed_precision:
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def _large_non_block_modules(stage: Stage) -> list[nn.Module]:
    """Modules outside the blocks that get their own FSDP unit (:func:`moreh_ap.fsdp_units.is_own_unit`).

    Embeddings and heads, as torchtitan does: gathered only around their own forward/backward, their
    gradients reduce-scattered right after their backward, instead of staying with the root unit for
    the step. Tied parameters (GPT-2's wte / lm_head) stay with the root unit.
    """
    blocks = list(stage.container.children()) if stage.container is not None else []
    if not blocks:
        return []
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    owners: dict[int, int] = {}
    for m in stage.module.modules():
        for p in m.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    avg = sum(p.numel() for b in blocks for p in b.parameters()) / len(blocks)
    out = []
    for m in stage.module.modules():
        own = list(m.parameters(recurse=False))
        if m is stage.module:
            continue
        shared = any(id(p) in in_blocks or owners[id(p)] > 1 for p in own)
        if is_own_unit(sum(p.numel() for p in own), avg_block_numel=avg, shared=shared):
            out.append(m)
    return out


def apply_fsdp(stage: Stage, config: ParallelConfig, dp_mesh) -> None:
    """``fully_shard`` every block, the large modules outside them, then the stage root.

    ZeRO-3 (``reshard_after_forward=True``) when distribute_low_prec_param, else ZeRO-2.
    """
    from torch.distributed.fsdp import fully_shard

    kw = dict(mesh=dp_mesh, mp_policy=_mp_policy(config), reshard_after_forward=config.distribute_low_prec_param)
    if stage.container is not None:
        for child in stage.container.children():
            fully_shard(child, **kw)
    for module in _large_non_block_modules(stage):
        fully_shard(module, **kw)
    fully_shard(stage.module, **kw)


def apply_replicate(stage: Stage, config: ParallelConfig, dp_mesh) -> None:
    """FSDP-based ``replicate`` on every block and the stage root: whole params on every dp rank."""
    from torch.distributed._composable.replicate_with_fsdp import replicate

    kw = dict(mesh=dp_mesh, mp_policy=_mp_policy(config))
    if stage.container is not None:
        for child in stage.container.children():
            replicate(child, **kw)
    replicate(stage.module, **kw)


def apply_ddp(stage: Stage, dp_mesh) -> None:
    """``DistributedDataParallel`` over the dp group (only valid without a pipeline)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    if stage.index != 0 or not (stage.is_first and stage.is_last):
        raise ValueError("DDP cannot wrap pipeline stages (torch gives wrong gradients); use replicate")
    stage.module = DDP(stage.module, process_group=dp_mesh.get_group())


def build_schedule(stages: list[Stage], *, schedule: str, total_stages: int, n_microbatches: int, pp_group,
                   device: torch.device, loss_fn: Callable | None):
    """Fresh PipelineStage objects around ``stages`` and the registered schedule ``schedule`` (grads not rescaled).

    The schedule's torch class and whether it takes all of a rank's stages or one come from the
    schedule registry (:func:`moreh_ap.schedules.get_schedule`).
    """
    from torch.distributed.pipelining import PipelineStage

    spec = get_schedule(schedule)
    pstages = [PipelineStage(s.module, s.index, total_stages, device, group=pp_group) for s in stages]
    return spec.torch_schedule_class()(pstages if spec.multi_stage else pstages[0], n_microbatches,
                                       loss_fn=loss_fn, scale_grads=False)


def local_module(stage: Stage, wrapper: Wrapper) -> nn.Module:
    """The module whose parameter names are the stage's own (inside DDP's ``.module``)."""
    return stage.module.module if wrapper is Wrapper.DDP else stage.module


def named_local_params(stages: list[Stage], wrapper: Wrapper) -> Iterator[tuple[list[str], nn.Parameter]]:
    """(original names, parameter) for every parameter of ``stages`` (a parameter shared by modules of one
    rank once)."""
    seen: set[int] = set()
    for st in stages:
        for n, p in local_module(st, wrapper).named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            yield st.names.get(clean_name(n), [clean_name(n)]), p
