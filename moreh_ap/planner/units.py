# What a pipeline rank holds: its stages' nodes, its FSDP units, and the optimizer's state per element.
"""The facts the memory model and the cost model share, read from the layout and the graph.

* :func:`rank_stages`: the virtual stages of a pipeline rank (placement and block ranges from
  :class:`moreh_ap.layout.ParallelLayout`) with the graph nodes each one holds;
* :func:`fsdp_units`: the parameters of each node as the runtime's ``fully_shard`` units hold them:
  every block is a unit, every part outside the blocks that :func:`moreh_ap.fsdp_units.is_own_unit`
  accepts is a unit, the stage root keeps the rest (and every tied parameter);
* :func:`optimizer_profile`: states per element and step temporaries of an optimizer spec.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

from moreh_ap.config import ParallelConfig
from moreh_ap.fsdp_units import is_own_unit
from moreh_ap.graph.model_graph import ModelGraph, NodeInfo
from moreh_ap.layout import ParallelLayout

__all__ = ["StageNodes", "Units", "block_nodes", "fsdp_units", "optimizer_profile", "prev_out", "rank_nodes", "rank_stages"]

_OPT_STATES = {"adamw": 2, "adam": 2, "lamb": 2, "sgd": 1}
_OPT_TEMPS = {"adamw": 1, "adam": 1, "lamb": 2, "sgd": 0}


@dataclass(kw_only=True, slots=True, frozen=True)
class StageNodes:
    """One virtual stage of a pipeline rank."""

    stage: int
    """Virtual stage index, in pipeline order."""
    lo: int
    """First block of the stage."""
    hi: int
    """One past its last block."""
    is_last: bool
    """Whether it is the pipeline's last stage (the head's)."""
    nodes: list[NodeInfo]
    """Its graph nodes in execution order (the embedding on the first stage, the head on the last)."""


_STAGES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # graph -> {layout key: stages}; planning speed


def rank_stages(graph: ModelGraph, config: ParallelConfig, pp_rank: int, *, world_size: int) -> list[StageNodes]:
    """The virtual stages pipeline rank ``pp_rank`` holds, in increasing order, with their nodes.

    Without a pipeline (``num_stages == 1``) the one stage holds every node. Remembered per graph and
    pipeline shape (the planner asks for the same ranks of thousands of candidates).
    """
    piped = config.num_stages > 1
    key = (config.num_stages, config.stages_per_rank if piped else 1, config.schedule if piped else "",
           config.boundaries, pp_rank)
    per_graph = _STAGES.setdefault(graph, {})
    if key not in per_graph or world_size % (config.num_stages * config.tp):  # the layout says why not
        layout = ParallelLayout.from_config(config, world_size)
        ranges = layout.stage_ranges(graph.num_blocks, config.boundaries)
        last = layout.total_stages - 1
        per_graph[key] = tuple(
            StageNodes(stage=s, lo=ranges[s][0], hi=ranges[s][1], is_last=s == last,
                       nodes=graph.stage_nodes(ranges[s][0], ranges[s][1], first=layout.is_first_stage(s),
                                               last=s == last))
            for s in layout.stages_of(pp_rank))
    return list(per_graph[key])


def rank_nodes(graph: ModelGraph, config: ParallelConfig, pp_rank: int, *, world_size: int) -> list[NodeInfo]:
    """Every node pipeline rank ``pp_rank`` holds, its stages one after the other."""
    return [n for st in rank_stages(graph, config, pp_rank, world_size=world_size) for n in st.nodes]


def prev_out(graph: ModelGraph, block: int, prec: str) -> int:
    """Bytes a pipeline cut before block ``block`` sends (the output of the node before it)."""
    node = block_nodes(graph)[block - 1] if block > 0 else graph.pre
    return node.out_bytes.get(prec, 0) if node is not None else 0


_BLOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # graph -> its block nodes; planning speed


def block_nodes(graph: ModelGraph) -> tuple[NodeInfo, ...]:
    """``graph.blocks``, remembered per graph (the planner asks for them for every candidate)."""
    if graph not in _BLOCKS:
        _BLOCKS[graph] = tuple(graph.blocks)
    return _BLOCKS[graph]


@dataclass(kw_only=True, slots=True)
class Units:
    """Parameters per node as the runtime's FSDP units hold them (tied parameters counted once, in the root)."""

    p: list[int]
    """Parameters of the node's own unit: a block's; the untied ones of a part outside the blocks that is
    its own unit; 0 for a part whose parameters stay with the root."""
    t: list[int]
    """Trainable ones among them."""
    root_p: int
    """Parameters left with the root unit(s): tied ones (e.g. GPT-2's wte / lm_head) and the parts outside
    the blocks too small to be a unit of their own."""
    root_t: int
    """Trainable ones among them."""

    def sizes(self) -> list[int]:
        """Parameter elements of every unit, the root last (omitted when empty)."""
        return [x for x in self.p if x] + ([self.root_p] if self.root_p else [])


_UNITS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # graph -> {key: (stages, units)}; planning speed


def fsdp_units(graph: ModelGraph, stages: list[list[NodeInfo]], *, fsdp: bool = True) -> Units:
    """Split the parameters of a rank's nodes into FSDP units as the runtime wraps each stage.

    Remembered per graph for the same node lists (the same list objects, as :func:`rank_stages` gives them
    to every candidate); each call returns its own copy.

    Args:
        graph: the traced model (its tied parameters go to the root).
        stages: the nodes of each of the rank's stages. Each stage is wrapped on its own: a part
            outside the blocks is its own unit when :func:`is_own_unit` accepts its untied parameters
            against the average block of its stage. The graph knows the parts outside the blocks as
            one node before and one after them, so each such node is judged as one module.
        fsdp: False for a rank without FSDP (DDP, replicate or no wrapper), where what matters is how
            long autocast's weight copies live: that follows the nodes, so every node keeps its
            untied parameters and only the tied ones go to the root.
    """
    per_graph = _UNITS.setdefault(graph, {})
    key = (fsdp, *map(id, stages))
    hit = per_graph.get(key)
    if hit is None or len(hit[0]) != len(stages) or any(a is not b for a, b in zip(hit[0], stages)):
        if len(per_graph) > 4096:
            per_graph.clear()
        # the lists are kept with the result, so no other list can take their ids while it is remembered
        hit = per_graph[key] = (list(stages), _split_units(graph, stages, fsdp=fsdp))
    u = hit[1]
    return Units(p=list(u.p), t=list(u.t), root_p=u.root_p, root_t=u.root_t)


def _split_units(graph: ModelGraph, stages: list[list[NodeInfo]], *, fsdp: bool) -> Units:
    """:func:`fsdp_units`, computed."""
    nodes = [n for chunk in stages for n in chunk]
    p = [n.num_params for n in nodes]
    t = [n.trainable_params for n in nodes]
    index = {n.name: i for i, n in enumerate(nodes)}
    root_p = root_t = 0
    for tie in graph.tied:
        holders = sorted(index[name] for name in tie.nodes if name in index)
        for i in holders:
            p[i] -= tie.numel
            t[i] -= tie.numel if tie.trainable else 0
        if holders:
            root_p += tie.numel
            root_t += tie.numel if tie.trainable else 0
    if not fsdp:
        return Units(p=p, t=t, root_p=root_p, root_t=root_t)
    i = 0
    for chunk in stages:
        blocks = [n.num_params for n in chunk if n.kind == "block"]
        avg = sum(blocks) / len(blocks) if blocks else 0.0
        for n in chunk:
            if n.kind != "block" and not (blocks and is_own_unit(p[i], avg_block_numel=avg, shared=False)):
                root_p, root_t = root_p + p[i], root_t + t[i]
                p[i] = t[i] = 0
            i += 1
    return Units(p=p, t=t, root_p=root_p, root_t=root_t)


def optimizer_profile(optimizer: Any, *, device_type: str = "cuda") -> tuple[str, int, float]:
    """``(name, states per element, temporaries in step)`` of an optimizer spec.

    The temporaries follow torch's implementation choice: the ``foreach``
    kernels (torch's default for plain tensors on CUDA) allocate one
    state-sized temporary for Adam/AdamW (``_foreach_sqrt`` of the second
    moment; LAMB two), returned as 1.0 / 2.0 (fractions of the local state
    size); the per-tensor loop (default on CPU and for FSDP2's DTensor
    parameters, or ``foreach=False``) and ``fused=True`` only parameter-sized
    ones, returned as 0.0 (the memory model adds the largest parameter).

    Accepts "adamw", "adam", "sgd", "lamb", an optimizer class or an instance.
    """
    foreach = device_type == "cuda"
    if isinstance(optimizer, str):
        key = optimizer.lower()
        if key not in _OPT_STATES:
            raise ValueError(
                f"optimizer={optimizer!r} is not valid: expected one of adamw, adam, sgd, lamb, or an optimizer"
            )
        return key, _OPT_STATES[key], float(_OPT_TEMPS[key]) if foreach else 0.0
    cls = optimizer if isinstance(optimizer, type) else type(optimizer)
    name = cls.__name__.lower()
    defaults = {} if isinstance(optimizer, type) else dict(getattr(optimizer, "defaults", {}) or {})
    if defaults.get("fused"):
        foreach = False
    elif defaults.get("foreach") is not None:
        foreach = bool(defaults["foreach"])
    if "lamb" in name:
        return "lamb", 2, 2.0 if foreach or "fused" in name else 0.0
    if "adam" in name:
        return (name if name in _OPT_STATES else "adam"), 2, 1.0 if foreach else 0.0
    if name == "sgd":
        momentum = defaults.get("momentum", 0.0) if not isinstance(optimizer, type) else 0.0
        return "sgd", 1 if momentum else 0, 0.0
    if name in ("adagrad", "rmsprop"):
        return name, 1, 1.0 if foreach else 0.0
    if not hasattr(cls, "step"):
        raise TypeError(
            f"optimizer={optimizer!r} is not valid: expected 'adamw', 'adam', 'sgd', 'lamb', or a torch.optim optimizer"
        )
    return name, 2, 1.0 if foreach else 0.0
