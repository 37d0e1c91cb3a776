# Memory model: predicted per-rank peak bytes of a (ModelGraph, ParallelConfig), as a breakdown.
"""Per-rank memory of one configuration, modelled on what PyTorch does.

Public entry point for the runtime and benchmarks::

    from moreh_ap.planner.memory import estimate
    mem = estimate(graph, config, world_size=8, optimizer="adamw")
    mem.total, mem.to_dict()   # bytes on the busiest pipeline rank, by category

Model (``P`` = parameters of the rank's stages, ``w`` = master dtype bytes,
``c`` = compute dtype bytes (2 under mixed precision, else ``w``), ``d`` = dp,
``k`` = optimizer states per element: AdamW/Adam/LAMB 2, SGD with momentum 1,
none for frozen parameters):

* no distribution (replicated): params ``P*w`` (+ ``P*c`` compute copy under
  mixed precision), grads ``P_trainable*w``, optimizer ``k*P_trainable*4``;
* distribute_param (ZeRO-2-like, FSDP2 ``reshard_after_forward=False``):
  master/grads/optimizer sharded ``/d``; the unsharded compute copy ``P*c``
  stays from forward to backward;
* + distribute_low_prec_param (ZeRO-3-like): the compute copy is gathered a
  block at a time (current + prefetched block), the root module's parameters
  (embedding, norm, head) stay gathered for the step;
* inside a pipeline (num_stages > 1) torch's ``PipelineStage`` runs every
  backward but the last without gradient sync and without resharding, so the
  compute copy ``P*c`` stays gathered and unsharded gradients accumulate in
  the reduce dtype (fp32) for the whole stage, whatever the dp mode;
* with num_stages == 1 and several micro-batches, gradients are assumed to be
  reduced after every micro-batch (FSDP2's default), so only sharded
  gradients accumulate;
* activations: bytes saved for backward per micro-batch (traced, scaled to
  ``batch_per_device``) times micro-batches in flight (1 without a pipeline,
  ``num_micro_batches`` for GPipe, ``num_stages - rank`` for 1F1B, torch's
  warm-up count + 1 for Interleaved1F1B); with recomputation only each
  block's input is kept, and one block's working set is re-created during
  its backward; non-last pipeline stages also keep their outputs;
* the peak is taken over a backward sweep (activations freed and gradients
  created node by node) and the optimizer step (foreach AdamW allocates one
  state-sized temporary for plain parameters on CUDA; FSDP2's DTensor
  parameters take the per-tensor loop: two parameter-sized ones), plus the largest tensor of the node being
  back-propagated (e.g. the logits' gradient) and communication buffers.

The memory cap the planner applies is ``device_memory *
MEMORY_USAGE_CORRECTION_RATIO / 100``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from moreh_ap.config import ParallelConfig, balanced_boundaries
from moreh_ap.graph.model_graph import ModelGraph, NodeInfo

_OPT_STATES = {"adamw": 2, "adam": 2, "lamb": 2, "sgd": 1}
_OPT_TEMPS = {"adamw": 1, "adam": 1, "lamb": 2, "sgd": 0}


@dataclass(kw_only=True, slots=True)
class MemoryBreakdown:
    """Predicted peak bytes on one rank, by category (they sum to :attr:`total`)."""

    params: int = 0
    """Master parameters (sharded or not) plus the resident compute copy."""
    grads: int = 0
    """Gradients alive at the peak (sharded, replicated or unsharded-accumulated)."""
    optimizer: int = 0
    """Optimizer state."""
    activations: int = 0
    """Tensors saved for backward at the peak (all micro-batches in flight)."""
    transient: int = 0
    """Short-lived buffers at the peak: gathered blocks, gradient buffers, logits' gradient, optimizer temporaries."""
    stage: int = 0
    """Pipeline rank with the peak."""
    phase: str = "backward"
    """"backward" or "optimizer": when the peak happens."""

    @property
    def total(self) -> int:
        """Sum of the categories, bytes."""
        return self.params + self.grads + self.optimizer + self.activations + self.transient

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["total"] = self.total
        return d


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


def stage_ranges(num_blocks: int, config: ParallelConfig) -> list[tuple[int, int]]:
    """Block ranges ``[start, end)`` of every (virtual) stage, in pipeline order."""
    total = config.total_stages if config.num_stages > 1 else 1
    if total == 1:
        return [(0, num_blocks)]
    bounds = config.boundaries if config.boundaries is not None else balanced_boundaries(num_blocks, total)
    starts = [0, *bounds]
    ends = [*bounds, num_blocks]
    return list(zip(starts, ends))


def rank_nodes(graph: ModelGraph, config: ParallelConfig, rank: int) -> list[list[NodeInfo]]:
    """Nodes of each virtual stage held by pipeline rank ``rank`` (virtual stage v on rank v % num_stages)."""
    ranges = stage_ranges(graph.num_blocks, config)
    total = len(ranges)
    out = []
    for v in range(rank, total, max(1, config.num_stages)):
        a, b = ranges[v]
        out.append(graph.stage_nodes(a, b, first=v == 0, last=v == total - 1))
    return out


def in_flight(config: ParallelConfig, rank: int) -> float:
    """Micro-batches whose activations a pipeline rank holds at once (per virtual stage, averaged)."""
    pp, nmb, spr = config.num_stages, config.num_micro_batches, config.stages_per_rank
    if pp == 1:
        return 1.0
    if config.schedule == "GPipe":
        return float(nmb)
    if config.schedule == "1F1B":
        return float(min(nmb, pp - rank))
    rounds = max(1, nmb // pp)
    per_round = nmb // rounds
    warmup = min(nmb * spr, (spr - 1) * per_round + 2 * (pp - 1 - rank))
    return (warmup + 1) / spr


def _node_acts(graph: ModelGraph, node: NodeInfo, prev: NodeInfo | None, *, prec: str, scale: float, recompute: bool):
    """(kept activation bytes, transient bytes during its backward) of one node for one micro-batch."""
    saved = node.saved_bytes.get(prec, 0) * scale
    peak = node.peak_fwd_bytes.get(prec, 0) * scale
    if recompute and node.kind == "block":
        kept = (prev.out_bytes.get(prec, 0) if prev is not None else 0) * scale
        return kept, saved + peak
    return saved, peak


def estimate_rank(
    graph: ModelGraph,
    config: ParallelConfig,
    rank: int,
    *,
    world_size: int,
    optimizer: Any = "adamw",
    device_type: str = "cuda",
) -> MemoryBreakdown:
    """Predicted peak of pipeline rank ``rank`` (see the module docstring for the model)."""
    _, k, temps = optimizer_profile(optimizer, device_type=device_type)
    virt = rank_nodes(graph, config, rank)
    nodes = [n for chunk in virt for n in chunk]
    names = [n.name for n in nodes]
    p_all = graph.params_of(names)
    p_tr = graph.params_of(names, trainable_only=True)
    mp, dp = config.mixed_precision, max(1, config.dp(world_size))
    w = graph.param_dtype_bytes
    c = 2 if mp else w
    dist, zero3 = config.distribute_param, config.distribute_low_prec_param
    piped = config.num_stages > 1
    shard = dp if dist else 1
    master, opt = p_all * w / shard, p_tr * k * w / shard
    roots = sum(n.num_params for n in nodes if n.kind != "block")
    if not dist:
        copy = p_all * c if mp else 0
    elif piped or not zero3:
        copy = p_all * c
    else:
        copy = roots * c
    reduce_b = 4 if mp else w
    if piped and (dist or mp):
        g_total = p_tr * max(reduce_b, w if not dist else reduce_b)
    else:
        g_total = p_tr * w / shard
    g_final = p_tr * w / shard
    scale = config.batch_per_device / max(1, graph.batch_size)
    prec = "mixed" if mp else "full"
    kept, trans = [], []
    prev = None
    for ci, chunk in enumerate(virt):
        for j, n in enumerate(chunk):
            a, t = _node_acts(graph, n, prev, prec=prec, scale=scale, recompute=config.recomputation)
            if j == len(chunk) - 1 and n.kind != "post":  # a stage output kept for its backward
                a += n.out_bytes.get(prec, 0) * scale
            comm = 0.0
            if dist and not piped:
                comm += n.trainable_params * (c + (4 if mp else 0))
                if zero3 and n.kind == "block":
                    comm += (n.num_params + (prev.num_params if prev is not None and prev.kind == "block" else 0)) * c
            elif mp and dp > 1 and not dist and not piped:
                comm += n.trainable_params * c
            kept.append(a)
            trans.append(t + comm)
            prev = n
    a_mb = sum(kept)
    infl = in_flight(config, rank)
    accumulate = config.num_micro_batches > 1 or piped
    g_nodes = [n.trainable_params for n in nodes]
    g_unit = g_total / p_tr if p_tr else 0.0
    best = None
    prefix = 0.0
    prefix_list = []
    for a in kept:
        prefix += a
        prefix_list.append(prefix)
    suffix = 0.0
    for i in range(len(nodes) - 1, -1, -1):
        suffix += g_nodes[i] * g_unit
        grads = g_total if accumulate else suffix
        acts = (infl - 1) * a_mb + prefix_list[i]
        total = acts + grads + trans[i]
        if best is None or total > best[0]:
            best = (total, grads, acts, trans[i])
    params = int(master + copy)
    bwd_total = best[0] if best else 0.0
    if dist or piped:  # FSDP2-managed parameters are DTensors: torch steps them with the per-tensor loop
        temps = 0.0
    largest = max((n.largest_param for n in nodes if n.trainable_params), default=0)
    step_trans = temps * p_tr * w / shard + 2 * largest * w / shard
    if g_final + step_trans > bwd_total:
        return MemoryBreakdown(
            params=params, grads=int(g_final), optimizer=int(opt), activations=0,
            transient=int(step_trans), stage=rank, phase="optimizer",
        )
    _, grads, acts, tr = best
    return MemoryBreakdown(
        params=params, grads=int(grads), optimizer=int(opt), activations=int(acts),
        transient=int(tr), stage=rank, phase="backward",
    )


def estimate_stages(
    graph: ModelGraph, config: ParallelConfig, *, world_size: int, optimizer: Any = "adamw", device_type: str = "cuda"
) -> list[MemoryBreakdown]:
    """Predicted peak of every pipeline rank."""
    return [
        estimate_rank(graph, config, r, world_size=world_size, optimizer=optimizer, device_type=device_type)
        for r in range(config.num_stages)
    ]


def estimate(
    graph: ModelGraph,
    config: ParallelConfig,
    *,
    world_size: int,
    optimizer: Any = "adamw",
    device_type: str = "cuda",
) -> MemoryBreakdown:
    """Predicted per-rank peak memory of ``config`` for ``graph``: the busiest pipeline rank.

    Args:
        graph: from :func:`moreh_ap.trace` (its batch is scaled to ``config.batch_per_device``).
        config: the configuration (``boundaries`` None = balanced split).
        world_size: ranks in the job.
        optimizer: "adamw", "adam", "sgd", "lamb", an optimizer class or instance.
        device_type: "cuda" or "cpu": picks torch's default optimizer kernels
            (foreach on CUDA: one state-sized temporary in Adam's step).

    Returns:
        A :class:`MemoryBreakdown` (``.total`` bytes, ``.to_dict()``).
    """
    stages = estimate_stages(graph, config, world_size=world_size, optimizer=optimizer, device_type=device_type)
    return max(stages, key=lambda m: m.total)
