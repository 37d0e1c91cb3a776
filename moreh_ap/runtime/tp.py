# Tensor parallelism on this rank's stages: the family's TP plan with parallelize_module, ties kept, the rest replicated.
"""``apply_tp``: the family's :class:`~moreh_ap.models.tp_plan.TPPlan` applied to the modules this rank's stages
hold, on the unwrapped modules (before recompute and FSDP2 / replicate), after rank 0's weights were copied in.

1. fused parameters re-laid into tensor-parallel order (GPT-2's q/k/v), and attributes counting a split dimension
   divided by tp;
2. ``parallelize_module`` on every block with the plan's block styles, then the modules outside the blocks;
3. ties restored: a weight shared by two modules (GPT-2's ``wte`` / ``lm_head``) is one DTensor parameter again
   (both styles shard it alike), so its gradient is summed once by autograd;
4. every other module that holds plain parameters (norms, position embeddings) gets
   :class:`~moreh_ap.models.tp_styles.ReplicateParams`: all parameters are then DTensors on the tp mesh, and
   norms count a replicated one once;
5. with a sequence-parallel plan, this rank's pipeline stages get the tp mesh as their ``sequence_mesh``
   (:class:`~moreh_ap.models.base.SequenceStage`: they send and receive sequence shards).

Returns the re-lays by original parameter name, for the one-device views (state dicts, optimizer state).
"""
from __future__ import annotations

import torch
from torch import nn

from moreh_ap.models import ModelAdapter
from moreh_ap.models.base import SequenceStage
from moreh_ap.models.tp_plan import Relay, TPPlan, relay_permutation, to_tp_order
from moreh_ap.optim.norms import is_dtensor

__all__ = ["align_grads", "apply_tp", "check_tp"]


def check_tp(adapter: ModelAdapter, tp: int) -> TPPlan:
    """The family's plan for ``tp`` ranks.

    Raises:
        NotImplementedError: the family has no tensor-parallel plan.
        ValueError: ``tp`` does not divide the counts the plan needs divided (attention heads, KV heads).
    """
    plan = adapter.tp_plan()
    if plan is None:
        raise NotImplementedError(f"ParallelConfig.tp={tp}: {type(adapter.model).__name__} ({adapter.name}) has no "
                                  "tensor-parallel plan (there is one for Hugging Face Llama-family models with "
                                  "separate q/k/v and gate/up/down projections, and for GPT-2); use tp=1")
    for what, count in plan.divisible.items():
        if count % tp:
            raise ValueError(f"ParallelConfig.tp={tp} does not divide the model's {what} ({count}); use a tp that "
                             f"divides {count}")
    return plan


def _held_modules(stages) -> dict[int, nn.Module]:
    return {id(m): m for st in stages for m in st.module.modules()}


def _tie_owners(held: dict[int, nn.Module], ids: dict[int, list[str]]) -> dict[int, list[tuple[nn.Module, str]]]:
    """``id(tied parameter) -> [(module, attribute)]`` over this rank's modules."""
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for m in held.values():
        for name, p in m._parameters.items():
            if p is not None and len(ids.get(id(p), [])) > 1:
                owners.setdefault(id(p), []).append((m, name))
    return {k: v for k, v in owners.items() if len(v) > 1}


def _retie(owners: dict[int, list[tuple[nn.Module, str]]]) -> None:
    for pairs in owners.values():
        first = pairs[0][0]._parameters[pairs[0][1]]
        for m, name in pairs[1:]:
            other = m._parameters[name]
            if other is first:
                continue
            if is_dtensor(first) != is_dtensor(other) or (
                    is_dtensor(first) and tuple(first.placements) != tuple(other.placements)):
                raise NotImplementedError(f"tensor parallelism: a tied weight is split differently by the plan's "
                                          f"styles ({type(pairs[0][0]).__name__} and {type(m).__name__})")
            m._parameters[name] = first


@torch.no_grad()
def _relay_block(block: nn.Module, plan: TPPlan, *, tp: int, ids: dict[int, list[str]]) -> dict[str, Relay]:
    relays: dict[str, Relay] = {}
    for pname, (dim, n) in plan.relay.items():
        p = block.get_parameter(pname)
        relay = Relay(dim=dim, perm=relay_permutation(p.shape[dim], n=n, tp=tp))
        p.copy_(to_tp_order(p.detach().clone(), relay))
        for orig in ids.get(id(p), []):
            relays[orig] = relay
    for fqn, attrs in plan.local_attrs.items():
        m = block.get_submodule(fqn)
        for a in attrs:
            setattr(m, a, getattr(m, a) // tp)
    return relays


def apply_tp(adapter: ModelAdapter, stages, *, tp_mesh, ids: dict[int, list[str]]) -> dict[str, Relay]:
    """Split this rank's stages over ``tp_mesh`` by the family's plan (see the module docstring).

    Args:
        adapter: the model's adapter (its plan and blocks).
        stages: this rank's stages (unwrapped, on this rank's device, rank 0's weights in).
        tp_mesh: the 1-D tensor-parallel device mesh.
        ids: ``id(tensor) -> [original names]`` of the model before any change.

    Returns:
        ``{original parameter name: Relay}`` of the re-laid parameters this rank holds.

    Raises:
        NotImplementedError: no plan, a tie the plan splits two ways, or a non-leaf module holding parameters
            the plan does not split.
    """
    from torch.distributed.tensor.parallel import parallelize_module

    from moreh_ap.compat import contiguous_uneven_gathers
    from moreh_ap.models.tp_styles import ReplicateParams

    tp = tp_mesh.size()
    plan = check_tp(adapter, tp)
    contiguous_uneven_gathers()  # torch 2.11: uneven sequence shards gather as 2.13 does (see moreh_ap.compat)
    held = _held_modules(stages)
    owners = _tie_owners(held, ids)
    relays: dict[str, Relay] = {}
    for _, block in adapter.blocks():
        if id(block) in held:
            relays.update(_relay_block(block, plan, tp=tp, ids=ids))
            parallelize_module(block, tp_mesh, plan.block)
    for fqn, style in plan.outer.items():
        module = adapter.model.get_submodule(fqn)
        if id(module) in held:
            parallelize_module(module, tp_mesh, style)
    _retie(owners)
    for m in list(held.values()):
        plain = [n for n, p in m._parameters.items() if p is not None and not is_dtensor(p)]
        if not plain:
            continue
        if any(True for _ in m.children()):
            raise NotImplementedError(f"tensor parallelism: {type(m).__name__} holds parameters {plain} and has "
                                      "submodules; the family's plan must split or replicate it")
        parallelize_module(m, tp_mesh, ReplicateParams())
    _retie(owners)
    if plan.sequence_parallel:  # pipeline stages send their sequence shard (pp = 1: the model's own forward)
        for st in stages:
            if isinstance(st.module, SequenceStage):
                st.module.sequence_mesh = tp_mesh
    return relays


@torch.no_grad()
def align_grads(params) -> None:
    """Gradients laid like their parameters: a DTensor gradient placed otherwise (a vocabulary-parallel
    embedding's comes back ``Replicate`` for a ``Shard(0)`` weight) is redistributed to the parameter's
    placements, so that optimizers and norms working on local shards see matching shapes."""
    for p in params:
        g = p.grad
        if is_dtensor(g) and is_dtensor(p) and tuple(g.placements) != tuple(p.placements):
            p.grad = g.redistribute(p.device_mesh, p.placements)
