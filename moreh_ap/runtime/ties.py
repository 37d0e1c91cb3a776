# Tied parameters across pipeline ranks (their gradient sums) and which parameters a global norm counts.
"""A parameter shared by stages on different pipeline ranks (GPT-2's ``wte`` / ``lm_head``) has one copy
per holding rank. Their gradients are summed over the holders (one group per data-parallel index)
before the optimizer steps, and the copy of every holder but the first is left out of the global
gradient norm, so that the norm and the update equal one device's.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch import nn

from moreh_ap.layout import ParallelLayout
from moreh_ap.optim.norms import local_shard
from moreh_ap.runtime.dist import subgroup
from moreh_ap.runtime.norm import NormParams
from moreh_ap.models import ModelAdapter

__all__ = ["TiedParams", "find_tied_params", "sum_tied_grads", "norm_params"]


@dataclass(kw_only=True, slots=True)
class TiedParams:
    """This rank's share of the parameters tied across pipeline ranks."""

    groups: list[tuple[str, Any]] = field(default_factory=list)
    """(original name, process group of its holders at this rank's (dp, tp) index) for every tie this rank holds."""
    dupes: set[str] = field(default_factory=set)
    """Original names whose local copy is not the counted one (another pipeline rank holds that one)."""


def find_tied_params(model: nn.Module, adapter: ModelAdapter, ids: dict[int, list[str]], *, layout: ParallelLayout,
                     ranges: list[tuple[int, int]], pp_rank: int, dp_rank: int, tp_rank: int = 0) -> TiedParams:
    """The ties of ``model`` that span pipeline ranks, and this rank's groups for them.

    Creates one process group per tie and (dp, tp) index (a collective: every rank calls it with the same
    model). Under tensor parallelism the holders' copies are split alike: the group sums local shards.

    Args:
        model: the user's model (before any wrapping).
        adapter: its adapter (builds every virtual stage to see which holds a tied parameter).
        ids: ``id(tensor) -> [original names]`` of the model.
        layout: the run's layout.
        ranges: block range of every virtual stage.
        pp_rank, dp_rank, tp_rank: this rank's coordinates.
    """
    ties = TiedParams()
    if layout.pp == 1:
        return ties
    params = dict(model.named_parameters())
    tied = [names for names in ids.values() if len(names) > 1 and names[0] in params]
    if not tied:
        return ties
    by_name = dict(model.named_parameters(remove_duplicate=False))
    stage_params = []
    for s, (lo, hi) in enumerate(ranges):
        module, _ = adapter.build_stage(lo, hi, first=layout.is_first_stage(s), last=layout.is_last_stage(s))
        stage_params.append({id(p) for p in module.parameters()})
    for names in tied:
        target = id(by_name[names[0]])
        holders = sorted({layout.stage_rank(s) for s, held in enumerate(stage_params) if target in held})
        if len(holders) < 2:
            continue
        for d in range(layout.dp):
            for t in range(layout.tp):
                grp = subgroup(layout.tie_group_ranks(holders, dp=d, tp=t))
                if d == dp_rank and t == tp_rank and pp_rank in holders:
                    ties.groups.append((names[0], grp))
                    if pp_rank != holders[0]:
                        ties.dupes.add(names[0])
    return ties


def sum_tied_grads(ties: TiedParams, params: dict[str, torch.Tensor]) -> None:
    """Sum the gradients of every tied parameter over its holders (``params``: first original name -> param)."""
    for name, grp in ties.groups:
        dist.all_reduce(local_shard(params[name].grad), group=grp)


def norm_params(named: Iterable[tuple[list[str], torch.Tensor]], ties: TiedParams, *,
                dp_rank: int | None) -> NormParams:
    """The :class:`NormParams` of this rank's trainable parameters ``(original names, parameter)``."""
    counted, everything = [], []
    for names, p in named:
        if not p.requires_grad:
            continue
        everything.append(p)
        if names[0] not in ties.dupes:
            counted.append(p)
    return NormParams(counted=counted, everything=everything, dp_rank=dp_rank)
