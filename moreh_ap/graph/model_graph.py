# ModelGraph: the traced model as a chain of nodes (embedding, blocks, head) with their costs.
"""What the tracer hands the planner: per node parameter counts, FLOPs and activation bytes.

Numbers that depend on the batch (FLOPs, saved bytes, boundary bytes) are for
the traced batch (``ModelGraph.batch_size`` samples); the planner scales them
linearly to a micro-batch. Activation numbers come in four precisions: key
``"mixed"`` (parameters and float inputs cast to bf16, as FSDP2's
``MixedPrecisionPolicy`` runs them), ``"full"`` (the model's own dtypes), and
``"autocast_cpu"`` / ``"autocast_cuda"`` (bf16 autocast over the model's own
parameters, as the runtime runs mixed precision without FSDP, with the op
policy of that device type: on CUDA ``pow``, ``exp``, ``softmax``, ``sum``,
``layer_norm`` ... run in float32).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import networkx as nx

PRECISIONS = ("mixed", "full", "autocast_cpu", "autocast_cuda")


@dataclass(kw_only=True, slots=True)
class NodeInfo:
    """One node of the graph: the part before the blocks, one block, or the part after."""

    name: str
    """"embedding" (everything before the first block), "block.<i>", or "head" (everything after)."""
    kind: str
    """"pre", "block" or "post"."""
    index: int | None = None
    """Position in the block list for kind "block", else None."""
    fqns: tuple[str, ...] = ()
    """FQNs of the modules this node holds."""
    num_params: int = 0
    """Parameter elements (tied parameters counted in every node that uses them)."""
    trainable_params: int = 0
    """Elements of parameters with ``requires_grad``."""
    param_bytes: int = 0
    """Parameter bytes in the model's own dtypes."""
    largest_param: int = 0
    """Elements of the largest single parameter (sizes communication buffers)."""
    fwd_flops: int = 0
    """Forward FLOPs for the traced batch (attention costed as the flash kernel)."""
    saved_bytes: dict[str, int] = field(default_factory=dict)
    """Bytes saved for backward for the traced batch, per precision (see :data:`PRECISIONS`)."""
    saved_cast_bytes: dict[str, int] = field(default_factory=dict)
    """Of :attr:`saved_bytes`, the casts of parameters (autocast's bf16 weight copies, saved by the
    matmuls): one per parameter whatever the batch, so they are not scaled with it."""
    norm_saved_bytes: dict[str, int] = field(default_factory=dict)
    """Of :attr:`saved_bytes`, what a block saves on its residual stream (its norm modules, its dropouts of the
    residual's size: :mod:`moreh_ap.graph.sequence_saved`): sequence parallelism keeps it on ``1 / tp`` of the
    sequence."""
    peak_fwd_bytes: dict[str, int] = field(default_factory=dict)
    """Largest temporary allocated inside the node's forward that is not saved, per precision."""
    out_bytes: dict[str, int] = field(default_factory=dict)
    """Bytes of the node's floating outputs (what a pipeline cut after it sends), per precision."""
    gemms: dict[str, tuple[tuple[int, int, int, int, int], ...]] = field(default_factory=dict)
    """Per precision, the forward's GEMMs for the traced batch as ``(m, k, n, batch, count)`` (the time model
    looks each up at its own shape); "mixed" as bf16 autocast runs them."""
    moved_bytes: dict[str, int] = field(default_factory=dict)
    """Per precision, bytes read + written by the forward's memory-bound ops (not GEMMs, not views) for the
    traced batch; "mixed" as bf16 autocast runs them (casts, float32 norms and residuals included)."""
    attention: dict[str, tuple[tuple[int, int, int, int, int, int, int], ...]] = field(default_factory=dict)
    """Per precision, the forward's attention calls for the traced batch as ``(batch x heads, q length, kv length,
    head dim, value head dim, mode, count)`` (:mod:`moreh_ap.graph.op_census`; their FLOPs are in
    :attr:`fwd_flops`)."""
    traced: bool = True
    """False when the numbers were copied from an identical block traced earlier."""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["fqns"] = list(self.fqns)
        return d


@dataclass(kw_only=True, slots=True)
class TiedParam:
    """A parameter reachable under several names (e.g. GPT-2's ``wte`` and ``lm_head`` weights)."""

    fqns: tuple[str, ...]
    """All names of the parameter."""
    numel: int
    """Its elements."""
    nodes: tuple[str, ...]
    """The graph nodes that use it (it is counted in each)."""
    trainable: bool = True
    """Whether it requires grad."""

    def to_dict(self) -> dict[str, Any]:
        return {"fqns": list(self.fqns), "numel": self.numel, "nodes": list(self.nodes), "trainable": self.trainable}


class ModelGraph:
    """A traced model: ``networkx.DiGraph`` of nodes in execution order (a chain).

    Attributes:
        graph: the ``networkx.DiGraph``; node attribute ``info`` is a :class:`NodeInfo`.
        nodes: the :class:`NodeInfo` objects in execution order.
        block_container: FQN of the block list ("" for an ``nn.Sequential`` root), or None.
        batch_size: samples in the traced batch (dim 0 of the first tensor input).
        tied: parameters shared between nodes.
        param_dtype_bytes: bytes per element of the model's (floating) parameters.
        trace_ms: how long tracing took.
        model_name: class name of the traced model.
        adapter_name: the model family that gave the blocks (``ModelAdapter.name``).
        supports_pipeline: whether the runtime can cut the model into pipeline stages (False: the
            planner plans one stage only).
    """

    def __init__(
        self,
        nodes: list[NodeInfo],
        *,
        block_container: str | None,
        batch_size: int,
        tied: list[TiedParam] | None = None,
        param_dtype_bytes: int = 4,
        trace_ms: float = 0.0,
        model_name: str = "",
        adapter_name: str = "",
        supports_pipeline: bool = True,
    ) -> None:
        self.nodes = list(nodes)
        self.block_container = block_container
        self.batch_size = int(batch_size)
        self.tied = list(tied or [])
        self.param_dtype_bytes = param_dtype_bytes
        self.trace_ms = trace_ms
        self.model_name = model_name
        self.adapter_name = adapter_name
        self.supports_pipeline = bool(supports_pipeline)
        self.graph = nx.DiGraph()
        for node in self.nodes:
            self.graph.add_node(node.name, info=node)
        for a, b in zip(self.nodes, self.nodes[1:]):
            self.graph.add_edge(a.name, b.name, bytes=dict(a.out_bytes))
        self._by_name = {n.name: n for n in self.nodes}

    # ------------------------------------------------------------- structure
    @property
    def blocks(self) -> list[NodeInfo]:
        """The repeated layers, in order."""
        return [n for n in self.nodes if n.kind == "block"]

    @property
    def num_blocks(self) -> int:
        """Number of pipeline-splittable blocks (0 when none were found)."""
        return sum(1 for n in self.nodes if n.kind == "block")

    @property
    def pre(self) -> NodeInfo | None:
        return self._by_name.get("embedding")

    @property
    def post(self) -> NodeInfo | None:
        return self._by_name.get("head")

    def node(self, name: str) -> NodeInfo:
        return self._by_name[name]

    @property
    def total_params(self) -> int:
        """Unique parameter elements of the whole model (tied ones once)."""
        return self.params_of([n.name for n in self.nodes])

    def params_of(self, names: list[str], *, trainable_only: bool = False) -> int:
        """Unique parameter elements held by a set of nodes (a tied parameter counted once)."""
        names_set = set(names)
        total = sum(
            (self._by_name[n].trainable_params if trainable_only else self._by_name[n].num_params) for n in names_set
        )
        for t in self.tied:
            if trainable_only and not t.trainable:
                continue
            k = sum(1 for n in t.nodes if n in names_set)
            if k > 1:
                total -= (k - 1) * t.numel
        return total

    def stage_nodes(self, first_block: int, end_block: int, *, first: bool, last: bool) -> list[NodeInfo]:
        """Nodes of a stage holding blocks ``[first_block, end_block)``; embedding/head on the first/last."""
        out: list[NodeInfo] = []
        if first and self.pre is not None:
            out.append(self.pre)
        out.extend(self.blocks[first_block:end_block])
        if last and self.post is not None:
            out.append(self.post)
        return out

    @property
    def fwd_flops(self) -> int:
        """Forward FLOPs of the whole model for the traced batch."""
        return sum(n.fwd_flops for n in self.nodes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "block_container": self.block_container,
            "adapter_name": self.adapter_name,
            "supports_pipeline": self.supports_pipeline,
            "batch_size": self.batch_size,
            "num_blocks": self.num_blocks,
            "total_params": self.total_params,
            "trace_ms": self.trace_ms,
            "nodes": [n.to_dict() for n in self.nodes],
            "tied": [t.to_dict() for t in self.tied],
        }

    def __repr__(self) -> str:
        return (
            f"ModelGraph({self.model_name}, blocks={self.num_blocks}, params={self.total_params:,}, "
            f"batch={self.batch_size}, fwd_flops={self.fwd_flops:.3e})"
        )
