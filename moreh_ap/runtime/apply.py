# The "how" of a ParallelConfig: pipeline split, recompute, FSDP2 / replicate / DDP, schedules.
"""Each ``apply_*`` takes modules, the config and the mesh, and changes the modules with PyTorch's parts.

- :func:`apply_pipeline`: this pp rank's stage modules (virtual stage ``s`` on pp rank ``s % pp``).
- :func:`apply_recompute`: ``checkpoint_wrapper`` around every block.
- :func:`apply_fsdp`: ``fully_shard`` per block, per large module outside the blocks (embedding, head)
  and on the stage root, bf16 params / fp32 reduction under mixed precision,
  ``reshard_after_forward = distribute_low_prec_param``.
- :func:`apply_replicate`: FSDP-based ``replicate`` per block and root (replication that works inside
  pipelines, unlike DDP).
- :func:`apply_ddp`: ``DistributedDataParallel`` (pp = 1 only).
- :func:`build_schedule`: PipelineStage objects and a GPipe / 1F1B / Interleaved1F1B schedule.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from moreh_ap.config import ParallelConfig
from moreh_ap.layout import stage_ranges
from moreh_ap.models import ModelAdapter

__all__ = ["Stage", "apply_pipeline", "apply_recompute", "apply_fsdp", "apply_replicate", "apply_ddp",
           "build_schedule"]


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
    is_last: bool
    names: dict[str, list[str]] = field(default_factory=dict)
    """Stage parameter/buffer name -> original model names (filled before wrapping)."""


def apply_pipeline(adapter: ModelAdapter, config: ParallelConfig, *, pp_rank: int) -> list[Stage]:
    """Cut the model into ``num_stages * stages_per_rank`` stages and return the ones of ``pp_rank``.

    With pp = 1 the whole model is the only stage (its own forward runs).
    """
    model = adapter.model
    if config.num_stages == 1:
        return [Stage(0, model, adapter.container(), True, True)]
    total = config.total_stages
    ranges = stage_ranges(len(adapter.blocks()), total, config.boundaries)
    stages = []
    for s in range(pp_rank, total, config.num_stages):
        lo, hi = ranges[s]
        module, container = adapter.build_stage(lo, hi, first=s == 0, last=s == total - 1)
        stages.append(Stage(s, module, container, s == 0, s == total - 1))
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
    """Modules outside the blocks that own big parameters no other module shares (embeddings, heads).

    "Big": at least 1/8 of an average block's parameters. Wrapped as their own FSDP units (as torchtitan
    does), they are gathered only around their own forward/backward and their gradients are
    reduce-scattered right after their backward, instead of staying with the root unit for the step.
    Tied parameters (GPT-2's wte / lm_head) stay with the root unit.
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
        if m is stage.module or not own or any(id(p) in in_blocks or owners[id(p)] > 1 for p in own):
            continue
        if sum(p.numel() for p in own) * 8 >= avg:
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


def build_schedule(stages: list[Stage], config: ParallelConfig, *, n_microbatches: int, pp_group,
                   device: torch.device, loss_fn: Callable):
    """Fresh PipelineStage objects around ``stages`` and the config's schedule (grads not rescaled)."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

    total = config.total_stages
    pstages = [PipelineStage(s.module, s.index, total, device, group=pp_group) for s in stages]
    if config.schedule == "Interleaved1F1B":
        return ScheduleInterleaved1F1B(pstages, n_microbatches, loss_fn=loss_fn, scale_grads=False)
    cls = ScheduleGPipe if config.schedule == "GPipe" else Schedule1F1B
    return cls(pstages[0], n_microbatches, loss_fn=loss_fn, scale_grads=False)
