# One TP rank's blocks and head traced: a meta copy of the model with the TP plan's modules narrowed, traced once.
"""What a block of one tensor-parallel rank saves for backward, measured rather than assumed.

Which saved tensors a column / row split divides depends on the block's code: the inputs of the column-split
projections, the norms and the residual stream stay whole; between a column split and the row split after it
everything is ``1 / tp`` wide. How much of each there is differs by family and by precision (under autocast
every column-split projection casts its whole input to bf16 on its own: Llama's q, k, v, gate and up make five
whole bf16 copies of the normed input; GPT-2's GELU saves several ``4h``-wide tensors). So the planner traces
the model a second time with the plan's block modules narrowed as one rank of a ``tp = 2`` group holds them
(:func:`narrowed_copy`: a column split keeps ``1/2`` of its output features, a row split ``1/2`` of its input
features, the plan's ``local_attrs`` (GPT-2 attention's head counts) halved) and fits, per block and
precision, ``bytes(tp) = whole + split / tp`` through the two traces (:mod:`moreh_ap.planner.tp`). A head the plan
splits vocabulary-parallel is narrowed too (one rank's rows of the vocabulary, ``config.vocab_size`` with them):
the runtime's parallel loss keeps its logits sharded, so the head node (norm, head, loss) is fitted the same way.

:class:`LocalTrace` runs that trace lazily (the first time a ``tp > 1`` configuration is evaluated), once,
thread-safely (the planner evaluates candidates in a thread pool).
"""
from __future__ import annotations

import copy
import threading
from typing import Any

import torch
from torch import nn

from moreh_ap.graph.model_graph import NodeInfo
from moreh_ap.log import logger

__all__ = ["LocalTrace", "narrowed_copy", "TRACED_TP"]

TRACED_TP = 2
"""The degree the second trace narrows the blocks to."""


def _meta_copy(model: nn.Module) -> nn.Module:
    """``model`` deep-copied with every parameter and buffer replaced by a meta tensor of its shape (no weights
    copied; ties kept: one meta tensor per original tensor)."""
    memo: dict[int, Any] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        empty = torch.empty(t.shape, dtype=t.dtype, device="meta")
        memo[id(t)] = nn.Parameter(empty, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else empty
    return copy.deepcopy(model, memo)


def _split_dim(module: nn.Module, name: str, *, column: bool) -> int | None:
    """The dimension of parameter ``name`` that a column (output features) or row (input features) split
    divides; None when it stays whole (a row split's bias). ``nn.Linear`` holds ``(out, in)``,
    ``transformers``' ``Conv1D`` ``(in, out)``."""
    conv = type(module).__name__ == "Conv1D"
    if name == "bias":
        return 0 if column else None
    if column:
        return 1 if conv else 0
    return 0 if conv else 1


def narrowed_copy(model: nn.Module, *, tp: int) -> nn.Module:
    """A meta copy of ``model`` whose blocks are as one rank of a ``tp``-way group holds them.

    Every block module the family's plan splits gets parameters narrowed on the split dimension (column
    styles: output features; row styles: input features); ``Conv1D``'s ``nf`` (its output width) follows a
    column split; the plan's ``local_attrs`` are divided by ``tp`` (as the runtime does). Modules outside
    the blocks stay whole (the embedding's output is all-reduced: its activations are whole on every rank), but
    a vocabulary-parallel head (:class:`~moreh_ap.models.vocab_head.VocabParallelHead`, whose logits the
    runtime's parallel loss keeps sharded) holds one rank's rows of the vocabulary.

    Raises:
        NotImplementedError: the family has no tensor-parallel plan.
        ValueError: a split dimension is not divisible by ``tp``.
    """
    from moreh_ap.models import find_adapter
    from moreh_ap.models.tp_plan import split_kind

    plan = find_adapter(model).tp_plan()
    if plan is None:
        raise NotImplementedError(f"narrowed_copy: {type(model).__name__} has no tensor-parallel plan")
    local = _meta_copy(model)
    for _, block in find_adapter(local).blocks():
        for fqn, style in plan.block.items():
            kind = split_kind(style)
            if kind is None:  # norms (sequence parallelism), gathers: parameters whole
                continue
            module = block.get_submodule(fqn)
            column = kind == "column"
            for name, p in list(module.named_parameters(recurse=False)):
                dim = _split_dim(module, name, column=column)
                if dim is None:
                    continue
                if p.shape[dim] % tp:
                    raise ValueError(f"narrowed_copy: {fqn}.{name} {tuple(p.shape)} dim {dim} is not divisible by {tp}")
                shape = list(p.shape)
                shape[dim] //= tp
                module.register_parameter(name, nn.Parameter(torch.empty(shape, dtype=p.dtype, device="meta"),
                                                             requires_grad=p.requires_grad))
            if column and hasattr(module, "nf"):
                module.nf //= tp
        for fqn, attrs in plan.local_attrs.items():
            sub = block.get_submodule(fqn)
            for a in attrs:
                setattr(sub, a, getattr(sub, a) // tp)
    _narrow_head(local, plan, tp=tp)
    return local


def _narrow_head(local: nn.Module, plan: Any, *, tp: int) -> None:
    """The heads the plan splits with :class:`~moreh_ap.models.vocab_head.VocabParallelHead` keep one rank's rows
    of the vocabulary (the first rank's, ``ceil(V / tp)``; a weight tied to the embedding with them, in both
    modules) and the model's ``config.vocab_size`` follows (the causal-LM loss views its logits with it)."""
    from moreh_ap.models.vocab_head import VocabParallelHead

    for fqn, style in plan.outer.items():
        if not isinstance(style, VocabParallelHead):
            continue
        head = local.get_submodule(fqn)
        vocab = head.weight.shape[0]
        rows = -(-vocab // tp)
        for name, p in list(head.named_parameters(recurse=False)):
            narrow = nn.Parameter(torch.empty((rows, *p.shape[1:]), dtype=p.dtype, device="meta"),
                                  requires_grad=p.requires_grad)
            for m in local.modules():  # every holder of the (possibly tied) parameter
                for n, q in list(m._parameters.items()):
                    if q is p:
                        m._parameters[n] = narrow
        config = getattr(local, "config", None)
        if config is not None and getattr(config, "vocab_size", None) == vocab:
            config.vocab_size = rows


class LocalTrace:
    """The blocks and the head of ``model`` traced on ``(args, kwargs)`` as one rank of a :data:`TRACED_TP`-way
    group, computed on first use; None from :meth:`blocks` / :meth:`head` when the trace cannot be made (logged;
    the planner then falls back to Megatron's activation counts)."""

    def __init__(self, model: nn.Module, args: Any, kwargs: dict | None) -> None:
        from torch.utils._pytree import tree_map_only

        def meta(t: torch.Tensor) -> torch.Tensor:  # shapes only: no batch kept alive on its device
            return torch.empty(t.shape, dtype=t.dtype, device="meta")

        self._model = model
        self._args, self._kwargs = tree_map_only(torch.Tensor, meta, (args, kwargs))
        self._lock = threading.Lock()
        self._done = False
        self._nodes: dict[str, NodeInfo] | None = None

    def _traced(self) -> dict[str, NodeInfo] | None:
        with self._lock:
            if not self._done:
                self._done = True
                self._nodes = self._trace()
                self._model = self._args = self._kwargs = None  # not kept alive by the planner's facts
        return self._nodes

    def blocks(self) -> dict[str, NodeInfo] | None:
        """``{node name: NodeInfo}`` of the narrowed blocks (same names as the whole model's graph)."""
        nodes = self._traced()
        return None if nodes is None else {k: n for k, n in nodes.items() if n.kind == "block"}

    def head(self) -> NodeInfo | None:
        """The narrowed model's head node (everything after the blocks, the loss included)."""
        nodes = self._traced()
        return None if nodes is None else next((n for n in nodes.values() if n.kind == "post"), None)

    def _trace(self) -> dict[str, NodeInfo] | None:
        from moreh_ap.graph.tracing import trace

        try:
            local = narrowed_copy(self._model, tp=TRACED_TP)
            graph = trace(local, self._args, self._kwargs)
        except (ValueError, TypeError, RuntimeError, NotImplementedError, AttributeError) as exc:
            logger.warning(f"tensor parallelism: the tp={TRACED_TP} trace of {type(self._model).__name__}'s blocks "
                           f"failed ({type(exc).__name__}: {exc}); its TP activations are estimated with "
                           "Megatron's counts")
            return None
        return {n.name: n for n in graph.nodes if n.kind in ("block", "post")}
