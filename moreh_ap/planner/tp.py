# Tensor parallelism in the planner: the family's TP facts, the degrees to search, one TP rank's view of the graph.
"""What the planner knows about tensor parallelism (TP), read from the family's
:meth:`~moreh_ap.models.base.ModelAdapter.tp_plan` (the plan the runtime applies):

* :func:`tp_facts`: which parameters of each graph node the plan splits, and the counts a degree must
  divide (attention heads, key/value heads); None for a family without a TP plan (never planned with TP);
* :func:`tp_degrees`: the degrees searched, ``{1, 2, 4, 8}`` dividing those counts, the devices per node
  (a TP group stays inside a node) and the world, at most the ``tensor_parallel`` option;
* :func:`local_graph`: the graph as one TP rank holds and runs it, so the memory and cost models apply
  unchanged: a split module's parameters (and so gradients, optimizer state, FSDP units) ``/ tp``, norms
  and position embeddings whole; a block's FLOPs and GEMM widths ``/ tp``; its saved activations, largest
  temporary and moved bytes, per precision, ``whole + split / tp``, both parts fitted through the whole
  model's trace and a trace of one rank of a ``tp = 2`` group (:mod:`moreh_ap.planner.tp_trace`: the tensors
  a split does not narrow, e.g. the norms, the column-split projections' inputs and autocast's per-GEMM bf16
  casts of them, against those it does); without that trace (no example batch) as Megatron counts them
  without sequence parallelism (``10 + 24 / tp`` of ``34`` per token and hidden unit); autocast's weight
  copies as the parameters; the head (norm, head, loss) of a plan whose head is vocabulary-parallel
  (:class:`~moreh_ap.models.vocab_head.VocabParallelHead`: the runtime's causal-LM loss keeps the logits
  sharded, :mod:`moreh_ap.runtime.vocab_loss`) fitted the same way through the traced rank, whose head holds
  ``V / 2`` of the vocabulary (the logits, their fp32 copy, log-softmax and gradient ``/ tp``; the norm and the
  head's input whole); without that trace the fp32 logits among its saved tensors, its largest temporary and
  its output ``/ tp``; any other head's logits whole (gathered for the loss);
* :func:`vocab_grad`: the vocabulary-parallel embedding of a local graph, for the memory model's moment of its
  backward (DTensor makes its weight gradient whole before laying it like the weight);
* :func:`tp_comm_seconds`: the collectives per micro-batch on the intra-node link: per block 2 all-reduces
  of its output in the forward and 2 in the backward (Megatron's count; 2 more when the block is
  recomputed), the vocabulary-parallel embedding's all-reduce, the head's input gradient's all-reduce and
  either the parallel loss's three all-reduces of one fp32 per token (max, sum of exponentials, target logit;
  :func:`vocab_parallel_loss`) or, for a head that is not vocabulary-parallel, its logits' all-gather.
"""
from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass, field
from typing import Any

from moreh_ap.graph.model_graph import ModelGraph, NodeInfo
from moreh_ap.models.tp_plan import split_kind
from moreh_ap.planner.tp_trace import TRACED_TP, LocalTrace

__all__ = ["TP_DEGREES", "TPFacts", "VocabGrad", "local_graph", "sequence_sharded", "tp_comm_seconds", "tp_degrees",
           "tp_facts", "vocab_grad", "vocab_parallel_loss"]

TP_DEGREES = (1, 2, 4, 8)
"""The tensor-parallel degrees the planner searches."""

_KEPT_FULL, _KEPT_SPLIT = 10.0, 24.0  # Megatron's saved activations per token x hidden unit of a block (no SP)


@dataclass(kw_only=True, slots=True, frozen=True)
class TPFacts:
    """What the family's TP plan splits, per graph node."""

    divisible: dict[str, int] = field(default_factory=dict)
    """``{what: count}`` a degree must divide (attention heads, key/value heads)."""
    split_params: dict[str, int] = field(default_factory=dict)
    """``{node name: parameter elements the plan splits}`` (tied ones counted in every node using them)."""
    split_fqns: frozenset[str] = frozenset()
    """Parameter FQNs the plan splits (a tied parameter is split when any of its names is)."""
    sequence_parallel: bool = False
    """The plan keeps the residual stream sequence-sharded (``TPPlan.sequence_parallel``)."""
    local: Any = field(default=None, compare=False)
    """A :class:`~moreh_ap.planner.tp_trace.LocalTrace` (the blocks and head traced as one rank of a ``tp = 2``
    group, on first use), or None: Megatron's activation counts."""
    vocab_loss: bool = False
    """The plan's head is a :class:`~moreh_ap.models.vocab_head.VocabParallelHead`: the planner plans Hugging
    Face causal-LM training, whose loss the runtime then computes on the vocabulary-sharded logits."""


def _params(module) -> list[tuple[str, int]]:
    return [(name, p.numel()) for name, p in module.named_parameters()]


def _split_modules(model, plan, blocks: list[str]) -> dict[str, Any]:
    out = {}
    for block in blocks:
        for key, style in plan.block.items():
            if split_kind(style) is not None:
                out[f"{block}.{key}" if block else key] = None
    for fqn, style in plan.outer.items():
        if split_kind(style) is not None:  # a replicated embedding / head, a norm: not split
            out[fqn] = None
    for fqn in list(out):
        try:
            out[fqn] = model.get_submodule(fqn)
        except AttributeError:
            del out[fqn]
    return out


def tp_facts(model: Any, args: Any = None, kwargs: dict | None = None) -> TPFacts | None:
    """The TP facts of ``model`` (an ``nn.Module``, any device, meta included), or None when its family's
    adapter has no TP plan (``adapter.tp_plan() is None``) or the model is not a module.

    ``args`` / ``kwargs``: the example batch the model was traced on; given, the blocks are traced again as
    one TP rank holds them when a ``tp > 1`` graph is first needed (:class:`~moreh_ap.planner.tp_trace.LocalTrace`).
    """
    from torch import nn

    from moreh_ap.models import find_adapter

    if not isinstance(model, nn.Module):
        return None
    adapter = find_adapter(model)
    plan = adapter.tp_plan()
    if plan is None:
        return None
    blocks = adapter.block_fqns()
    split: dict[str, int] = {}
    fqns: set[str] = set()
    block_set = set(blocks)
    for mfqn, module in _split_modules(model, plan, blocks).items():
        owner = next((b for b in blocks if mfqn.startswith(b + ".")), None) if block_set else None
        for pname, numel in _params(module):
            fqns.add(f"{mfqn}.{pname}")
            key = owner if owner is not None else mfqn
            split[key] = split.get(key, 0) + numel
    local = None
    if args is not None and all(c % TRACED_TP == 0 for c in plan.divisible.values()):
        local = LocalTrace(model, args, kwargs)
    from moreh_ap.models.vocab_head import VocabParallelHead

    vocab_loss = any(isinstance(style, VocabParallelHead) for style in plan.outer.values())
    return TPFacts(divisible={k: int(v) for k, v in plan.divisible.items()}, split_params=split,
                   split_fqns=frozenset(fqns), sequence_parallel=plan.sequence_parallel, local=local,
                   vocab_loss=vocab_loss)


def _node_split(node: NodeInfo, facts: TPFacts) -> int:
    """Parameter elements of ``node`` the plan splits (its modules' FQNs matched against the plan's)."""
    total = 0
    for key, numel in facts.split_params.items():
        if any(key == f or key.startswith(f + ".") for f in node.fqns):
            total += numel
    return min(total, node.num_params)


def tp_degrees(facts: TPFacts | None, *, devices_per_node: int, world_size: int, option: Any = "auto") -> list[int]:
    """The degrees to search: :data:`TP_DEGREES` dividing every count in ``facts.divisible``, the devices
    per node and the world size, at most ``option`` when it is an int (1 = no TP); ``[1]`` without facts."""
    if facts is None:
        return [1]
    limit = option if isinstance(option, int) and not isinstance(option, bool) else max(TP_DEGREES)
    return [t for t in TP_DEGREES if t <= limit and devices_per_node % t == 0 and world_size % t == 0
            and all(c % t == 0 for c in facts.divisible.values())]


def _scale_dict(d: dict, f: float) -> dict:
    return {k: int(v * f) for k, v in d.items()}


def _local_gemms(gemms: dict, tp: int) -> dict:
    out = {}
    for prec, items in gemms.items():
        # column splits narrow n, row splits narrow k: the same FLOPs; batched ones (heads) narrow the batch
        out[prec] = tuple((m, k, max(1, n // tp), b, c) if b == 1 else (m, k, n, max(1, b // tp), c)
                          for m, k, n, b, c in items)
    return out


def _local_attention(attention: dict, tp: int) -> dict:
    """Per precision, one rank's attention calls: the heads are split (``batch x heads / tp``)."""
    return {prec: tuple((max(1, bh // tp), *rest) for bh, *rest in calls) for prec, calls in attention.items()}


def _fit(whole_model: dict, traced: dict, tp: int) -> dict:
    """Per precision, bytes of one rank of a ``tp`` group from the whole model's (``tp = 1``) and the
    :data:`TRACED_TP` trace's: ``whole + split / tp`` through both points, each part at least 0."""
    out = {}
    for k, one in whole_model.items():
        two = traced.get(k, one)
        split = max(0.0, (one - two) * TRACED_TP / (TRACED_TP - 1))
        whole = max(0.0, one - split)
        out[k] = int(whole + split / tp)
    return out


def _block_acts(node: NodeInfo, traced: NodeInfo | None, *, tp: int, ratio: float, seq: bool) -> dict[str, Any]:
    """A block's saved tensors, autocast's weight copies among them, largest temporary and moved bytes on one
    rank of a ``tp`` group: fitted through the traced rank (``traced``; with sequence parallelism (``seq``) the
    norms' and residual dropouts' saved tensors ``/ tp``), else Megatron's counts without sequence parallelism (more, never less)."""
    casts = node.saved_cast_bytes
    if traced is not None:
        saved = _fit(node.saved_bytes, traced.saved_bytes, tp)
        if seq:
            saved = {k: v - int(node.norm_saved_bytes.get(k, 0) * (1 - 1 / tp)) for k, v in saved.items()}
        return dict(saved_bytes=saved,
                    saved_cast_bytes=_fit(casts, traced.saved_cast_bytes, tp),
                    peak_fwd_bytes=_fit(node.peak_fwd_bytes, traced.peak_fwd_bytes, tp),
                    moved_bytes=_fit(node.moved_bytes, traced.moved_bytes, tp))
    acts = (_KEPT_FULL + _KEPT_SPLIT / tp) / (_KEPT_FULL + _KEPT_SPLIT)
    return dict(saved_bytes={k: int((v - casts.get(k, 0)) * acts + casts.get(k, 0) * ratio)
                             for k, v in node.saved_bytes.items()},
                saved_cast_bytes=_scale_dict(casts, ratio),
                peak_fwd_bytes=_scale_dict(node.peak_fwd_bytes, 1 / tp),
                moved_bytes=_scale_dict(node.moved_bytes, acts))


def _sequence_sharded(node: NodeInfo, tp: int) -> NodeInfo:
    """Sequence parallelism: the embedding's and every block's output (the residual stream a pipeline stage
    sends, a recomputed block keeps) hold ``1 / tp`` of the sequence."""
    if node.kind == "post":
        return node
    return dataclasses.replace(node, out_bytes=_scale_dict(node.out_bytes, 1 / tp))


def _local_node(node: NodeInfo, facts: TPFacts, tp: int, traced: dict[str, NodeInfo] | None) -> NodeInfo:
    if facts.sequence_parallel:
        node = _sequence_sharded(node, tp)
    split = _node_split(node, facts)
    if split == 0:
        return node
    gone = split - split // tp
    num = node.num_params - gone
    ratio = num / node.num_params if node.num_params else 1.0
    changes: dict[str, Any] = dict(
        num_params=num, trainable_params=max(0, node.trainable_params - gone),
        param_bytes=int(node.param_bytes * ratio), largest_param=max(1, node.largest_param // tp),
        saved_cast_bytes=_scale_dict(node.saved_cast_bytes, ratio),
    )
    if node.kind == "block":
        changes.update(fwd_flops=node.fwd_flops // tp, gemms=_local_gemms(node.gemms, tp),
                       attention=_local_attention(node.attention, tp),
                       **_block_acts(node, (traced or {}).get(node.name), tp=tp, ratio=ratio,
                                     seq=facts.sequence_parallel))
    elif node.kind == "post":  # the head's GEMM is split; the logits sharded for the parallel loss, else gathered
        changes.update(fwd_flops=node.fwd_flops // tp, gemms=_local_gemms(node.gemms, tp))
        if facts.vocab_loss:
            changes.update(_head_acts(node, (traced or {}).get(node.name), tp=tp))
    return dataclasses.replace(node, **changes)


def _head_acts(node: NodeInfo, traced: NodeInfo | None, *, tp: int) -> dict[str, Any]:
    """The head's saved tensors, largest temporary, moved and output bytes on one rank of a ``tp`` group whose
    loss is vocabulary-parallel: fitted through the traced rank (``traced``), else the fp32 logits (the loss's
    log-softmax output, saved whatever the precision) and the temporaries and output ``/ tp``."""
    if traced is not None:
        return {k: _fit(getattr(node, k), getattr(traced, k), tp)
                for k in ("saved_bytes", "saved_cast_bytes", "peak_fwd_bytes", "moved_bytes", "out_bytes")}
    logits = node.out_bytes.get("full", 0)
    return dict(saved_bytes={k: int(v - (1 - 1 / tp) * min(v, logits)) for k, v in node.saved_bytes.items()},
                peak_fwd_bytes=_scale_dict(node.peak_fwd_bytes, 1 / tp),
                moved_bytes=_scale_dict(node.moved_bytes, 1 / tp), out_bytes=_scale_dict(node.out_bytes, 1 / tp))


@dataclass(kw_only=True, slots=True, frozen=True)
class VocabGrad:
    """The vocabulary-parallel embedding of one TP rank's graph (see :func:`vocab_grad`)."""

    numel: int
    """Elements of the whole embedding weight (vocabulary x hidden)."""
    tied: bool
    """Whether the weight is tied to the head (its sharded gradient exists when the embedding's is added)."""
    tp: int
    """The tensor-parallel degree."""


_VOCAB: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # local graph -> VocabGrad
_LOSS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # local graph -> True: vocabulary-parallel loss


def vocab_grad(graph: ModelGraph) -> VocabGrad | None:
    """The split embedding of a graph made by :func:`local_graph` with ``tp > 1``, else None.

    The memory model's term for its backward: DTensor computes a vocabulary-parallel embedding's weight
    gradient whole (``embedding_dense_backward`` gives a ``Replicate`` gradient of the whole weight) and
    only then lays it like the weight (a ``Shard(0)`` chunk copy: for a tied weight when it is added to
    the head's sharded gradient, a new sum; untied, by the runtime's ``align_grads`` after the backward).
    """
    return _VOCAB.get(graph)


def vocab_parallel_loss(graph: ModelGraph) -> bool:
    """Whether one TP rank of ``graph`` (made by :func:`local_graph`, ``tp > 1``) computes the loss on
    vocabulary-sharded logits (the family's head is a :class:`~moreh_ap.models.vocab_head.VocabParallelHead`)."""
    return _LOSS.get(graph, False)


def _vocab_of(graph: ModelGraph, facts: TPFacts, tp: int) -> VocabGrad | None:
    pre = next((n for n in graph.nodes if n.kind == "pre"), None)
    numel = _node_split(pre, facts) if pre is not None else 0
    if not numel:
        return None
    tied = any(pre.name in t.nodes and any(f in facts.split_fqns for f in t.fqns) for t in graph.tied)
    return VocabGrad(numel=numel, tied=tied, tp=tp)


def local_graph(graph: ModelGraph, facts: TPFacts | None, tp: int) -> ModelGraph:
    """``graph`` as one rank of a ``tp``-way group holds and runs it (``graph`` itself for ``tp == 1``)."""
    if tp == 1 or facts is None:
        return graph
    traced = facts.local.blocks() if facts.local is not None else None
    head = facts.local.head() if traced is not None else None
    if head is not None:
        traced = {**traced, head.name: head}
    nodes = [_local_node(n, facts, tp, traced) for n in graph.nodes]
    tied = [dataclasses.replace(t, numel=t.numel // tp) if any(f in facts.split_fqns for f in t.fqns) else t
            for t in graph.tied]
    local = ModelGraph(nodes, block_container=graph.block_container, batch_size=graph.batch_size, tied=tied,
                       param_dtype_bytes=graph.param_dtype_bytes, trace_ms=graph.trace_ms,
                       model_name=graph.model_name, adapter_name=graph.adapter_name,
                       supports_pipeline=graph.supports_pipeline)
    vocab = _vocab_of(graph, facts, tp)
    if vocab is not None:
        _VOCAB[local] = vocab
    if facts.sequence_parallel:
        _SEQUENCE[local] = tp
    if facts.vocab_loss:
        _LOSS[local] = True
    return local


_SEQUENCE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # local graph -> tp (sequence-sharded)


def sequence_sharded(graph: ModelGraph) -> bool:
    """Whether ``graph`` (from :func:`local_graph`) holds a sequence-sharded residual stream."""
    return graph in _SEQUENCE


def tp_comm_seconds(nodes: list[NodeInfo], *, cluster: Any, tp: int, prec: str, scale: float, recompute: bool,
                    inter_node: bool = False, sequence_parallel: bool = False, vocab_loss: bool = False) -> float:
    """Seconds of one micro-batch's TP collectives over a rank's ``nodes`` (see the module docstring; with
    sequence parallelism each all-reduce is a reduce-scatter + all-gather of the same whole tensor: the same
    bytes on the ring, the nodes' outputs then being ``1 / tp`` of it); ``vocab_loss``: the loss is
    vocabulary-parallel (:func:`vocab_parallel_loss` of the rank's graph)."""
    from moreh_ap.planner.time_model import collective_time

    if tp <= 1:
        return 0.0

    def ar(nbytes: float) -> float:
        return collective_time(cluster, "all_reduce", nbytes, group=tp, inter_node=inter_node)

    total = 0.0
    for n in nodes:
        out = n.out_bytes.get(prec, 0) * scale * (tp if sequence_parallel and n.kind != "post" else 1)
        if n.kind == "block":
            total += (6 if recompute else 4) * ar(out)
        elif n.kind == "pre":
            total += ar(out)
        else:
            hidden = (n.gemms.get(prec) or ((0, 0, 0, 1, 1),))[0]  # the head's GEMM: (tokens, hidden, vocab)
            if vocab_loss:  # max, sum of exponentials, target logit: one fp32 per token each
                total += 3 * ar(hidden[0] * hidden[3] * scale * 4)
            else:
                total += collective_time(cluster, "all_gather", out, group=tp, inter_node=inter_node)
            total += ar(hidden[0] * hidden[1] * hidden[3] * scale * (2 if prec == "mixed" else 4))
    return total
