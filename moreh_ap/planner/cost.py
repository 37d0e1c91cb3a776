# Cost model: predicted step time of a (ModelGraph, ParallelConfig) on a Cluster, as a breakdown.
"""Step time = compute + pipeline bubble + stage-to-stage sends + data-parallel collectives + optimizer step.

* compute: the slowest pipeline rank's FLOPs per micro-batch (forward, 2x
  forward for backward, +1 forward for recomputed blocks) over the calibrated
  matmul rate (bf16 under mixed precision, else fp32) at each node's GEMM size
  for that micro-batch (see ``time_model.gemm_size``), blocks at the
  calibrated block efficiency plus the calibrated fixed cost per block and
  micro-batch (``microbench.measure_block``), times micro-batches;
* bubble: the schedule registry's ``bubble(num_stages, num_micro_batches,
  stages_per_rank)`` micro-batch slots of the slowest rank (``(num_stages - 1) /
  stages_per_rank`` for the registered schedules);
* p2p: one activation send and one gradient send per stage boundary per
  micro-batch on the critical path, ``(num_micro_batches * stages_per_rank +
  num_stages - 1) * 2`` sends;
* dp collectives by mode: replicated = one all-reduce of the gradients per
  step; distribute_param = reduce-scatter of gradients + all-gather of the
  compute copy, one collective per fully_shard unit (each block, each part
  outside the blocks that ``fsdp_units.is_own_unit`` accepts, the stage root;
  :func:`moreh_ap.planner.units.fsdp_units`): inside a pipeline all-gathers once per step; without one per
  micro-batch (ZeRO-3-like twice: forward and backward) and a
  reduce-scatter after every micro-batch. Whether a dp group or a pipeline
  hop crosses nodes is ``ParallelLayout.spans_nodes``.
  Collectives are not assumed to overlap compute (an upper bound);
* tp collectives (``tp > 1``; ``graph`` is then one TP rank's view, :func:`moreh_ap.planner.tp.local_graph`):
  :func:`moreh_ap.planner.tp.tp_comm_seconds` per micro-batch slot of the slowest rank, times the
  micro-batches plus the bubble's slots;
* optimizer step: memory-bound, ~(4 + 3k) x 4 bytes touched per local element
  over the memory bandwidth.

With a GEMM table in the calibration DB (a hardware profile, ``--calibration``), a node is costed from
its op census instead (:func:`_census_seconds`): every traced GEMM at the table's time for its own
shape (backward: the two transposed products), attention at the cluster's flash attention rates when it has
them (``Cluster.attention_flops``; the backward 2.5 x the forward's FLOPs), the node's other FLOPs at the
node's GEMM rate, the bytes its memory-bound ops move (x1 forward, x2 backward) over the measured memory bandwidth,
the head + loss as measured when the DB has that shape; on CUDA a block takes at least the
calibrated per-block floor (the host's dispatch time, overlapped with the device's work), on the CPU
the floor adds. The optimizer step is the measured seconds per parameter when the DB has it, and each
micro-batch after the first accumulates gradients (read bf16/fp32 grad, read + write fp32 .grad).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from moreh_ap.config import ParallelConfig
from moreh_ap.graph.model_graph import ModelGraph
from moreh_ap.graph.op_census import attention_flops
from moreh_ap.layout import ParallelLayout
from moreh_ap.planner.cluster import Cluster
from moreh_ap.planner.time_model import (
    attention_seconds,
    block_efficiency,
    block_floor,
    collective_time,
    gemm_seconds,
    gemm_size,
    head_and_loss_seconds,
    matmul_flops,
    measured_node_seconds,
    memory_bandwidth,
    node_matmul_rate,
)
from moreh_ap.planner.tp import sequence_sharded, tp_comm_seconds, vocab_parallel_loss
from moreh_ap.planner.units import fsdp_units, optimizer_profile, rank_stages
from moreh_ap.schedules import get_schedule


@dataclass(kw_only=True, slots=True)
class TimeBreakdown:
    """Predicted seconds per optimizer step, by category (they sum to :attr:`total`)."""

    compute: float = 0.0
    """Forward + backward (+ recompute) FLOPs of the slowest rank over the calibrated rate."""
    bubble: float = 0.0
    """Pipeline fill and drain."""
    p2p: float = 0.0
    """Stage-to-stage activation and gradient sends."""
    dp_comm: float = 0.0
    """Data-parallel collectives (all-reduce / all-gather / reduce-scatter)."""
    tp_comm: float = 0.0
    """Tensor-parallel collectives on the intra-node link (per block 2 all-reduces forward, 2 backward), on the
    critical path of every micro-batch slot, the bubble's included."""
    optimizer: float = 0.0
    """Optimizer step (memory-bound)."""

    @property
    def total(self) -> float:
        """Sum of the categories, seconds."""
        return self.compute + self.bubble + self.p2p + self.dp_comm + self.tp_comm + self.optimizer

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["total"] = self.total
        return d


def _node_seconds(node, cluster: Cluster, *, dtype: str, scale: float, recompute: bool) -> float:
    """Forward + backward (+ recompute) seconds of one node for one micro-batch.

    FLOPs over the calibrated matmul rate at the node's GEMM size (small micro-batches run smaller,
    slower GEMMs); a block also runs at the calibrated block efficiency (attention, norms,
    activations) and pays the calibrated per-block fixed cost (dispatch, launches) every micro-batch.
    """
    measured = measured_node_seconds(cluster, node, dtype=dtype, scale=scale, recompute=recompute)
    if measured is not None:  # the model's own block / head + loss, timed at its shapes (shape_calibration)
        return measured
    flops = node.fwd_flops * scale
    if flops <= 0:
        return 0.0
    size = gemm_size(flops, node.num_params, node.largest_param)
    rate = node_matmul_rate(cluster, node, dtype=dtype, scale=scale, size=size)
    if node.kind != "block":
        return flops * 3 / rate
    passes = 4 if recompute else 3  # forward, backward = 2 forwards, + a forward when recomputed
    return block_floor(cluster, dtype) * passes / 3 + flops * passes / (rate * block_efficiency(cluster, dtype))


def _census_seconds(node, cluster: Cluster, *, dtype: str, prec: str, scale: float, recompute: bool) -> float:
    """Forward + backward (+ recompute) seconds of one node for one micro-batch, from its op census."""
    measured = measured_node_seconds(cluster, node, dtype=dtype, scale=scale, recompute=recompute)
    if measured is not None:
        return measured
    if node.kind == "post" and dtype == "bf16" and node.gemms.get(prec):
        m, k, n, b, _ = node.gemms[prec][0]  # the largest GEMM of the head: the lm_head (tokens, hidden, vocab)
        measured = head_and_loss_seconds(cluster, tokens=m * b * scale, hidden=k, vocab=n)
        if measured is not None:
            return measured
    fwd = bwd = gemm_flops = 0.0
    for m, k, n, b, count in node.gemms.get(prec, ()):
        rows, batch = (max(1.0, m * scale), b) if b == 1 else (m, max(1.0, b * scale))
        gemm_flops += 2.0 * rows * k * n * batch * count
        fwd += count * batch * gemm_seconds(cluster, dtype, rows, k, n)
        bwd += count * batch * (gemm_seconds(cluster, dtype, rows, n, k) + gemm_seconds(cluster, dtype, k, rows, n))
    rate = gemm_flops / fwd if fwd > 0 else matmul_flops(cluster, dtype)  # the node's GEMM rate
    calls = node.attention.get(prec, ())
    # the node's FLOPs beyond its GEMMs and attention (as the trace counted it), at the GEMM rate
    other = max(0.0, node.fwd_flops * scale - gemm_flops - attention_flops(calls, as_run=False) * scale)
    attn = attention_seconds(cluster, dtype, calls, scale=scale)  # at the flash kernel's rates when known
    if attn is not None:
        fwd, bwd = fwd + attn[0], bwd + attn[1]
    else:  # else the FLOPs the device's kernel computes (causal: half) at the GEMM rate
        other += attention_flops(calls, as_run=True) * scale
    fwd, bwd = fwd + other / rate, bwd + 2 * other / rate
    mem = node.moved_bytes.get(prec, 0) * scale / memory_bandwidth(cluster)
    fwd, bwd = fwd + mem, bwd + 2 * mem
    total = fwd * (2 if recompute and node.kind == "block" else 1) + bwd
    if node.kind != "block":
        return total
    floor = block_floor(cluster, dtype) * (4 if recompute else 3) / 3
    return max(floor, total) if cluster.device_type == "cuda" else floor + total


def _uses_census(graph: ModelGraph, cluster: Cluster, prec: str) -> bool:
    db = cluster.calibration
    return db is not None and bool(db.gemm) and all(prec in n.moved_bytes for n in graph.nodes)


def _optimizer_seconds(cluster: Cluster, graph: ModelGraph, *, elements: float, k: int, name: str) -> float:
    """The measured step seconds per parameter when the DB has them for this optimizer (AdamW's serve Adam),
    else the memory-bound formula over the (measured) bandwidth."""
    db = cluster.calibration
    key = "adamw" if name in ("adamw", "adam") else name
    if db is not None and key in db.optimizer_step:
        return elements * db.optimizer_step[key]
    return elements * (4 + 3 * k) * graph.param_dtype_bytes / memory_bandwidth(cluster)


def estimate(
    graph: ModelGraph, config: ParallelConfig, cluster: Cluster, *, world_size: int | None = None,
    optimizer: Any = "adamw",
) -> TimeBreakdown:
    """Predicted step time of ``config`` for ``graph`` on ``cluster``.

    Args:
        graph: from :func:`moreh_ap.trace`.
        config: the configuration (``boundaries`` None = balanced split).
        cluster: speeds and topology (its calibration DB when attached).
        world_size: ranks (default ``cluster.world_size``).
        optimizer: "adamw", "adam", "sgd", "lamb", an optimizer class or instance.
    """
    world = world_size or cluster.world_size
    opt_name, k, _ = optimizer_profile(optimizer, device_type=cluster.device_type)
    mp = config.mixed_precision
    dtype = "bf16" if mp else "fp32"
    scale = config.batch_per_device / max(1, graph.batch_size)
    pp, nmb, spr = config.num_stages, config.num_micro_batches, config.stages_per_rank
    per_mb, params_rank, trainable_rank, units_rank, tp_mb = [], [], [], [], []
    prec = "mixed" if mp else "full"
    census = _uses_census(graph, cluster, prec)
    dp_inter, pp_inter, tp_inter = ParallelLayout.from_config(config, world).spans_nodes(cluster.devices_per_node)
    for r in range(pp):
        stages = rank_stages(graph, config, r, world_size=world)
        nodes = [n for st in stages for n in st.nodes]
        if census:
            per_mb.append(sum(_census_seconds(n, cluster, dtype=dtype, prec=prec, scale=scale,
                                              recompute=config.recomputation) for n in nodes))
        else:
            per_mb.append(sum(_node_seconds(n, cluster, dtype=dtype, scale=scale, recompute=config.recomputation)
                              for n in nodes))
        tp_mb.append(tp_comm_seconds(nodes, cluster=cluster, tp=config.tp, prec=prec, scale=scale,
                                     recompute=config.recomputation, inter_node=tp_inter,
                                     sequence_parallel=sequence_sharded(graph),
                                     vocab_loss=vocab_parallel_loss(graph)))
        names = [n.name for n in nodes]
        params_rank.append(graph.params_of(names))
        trainable_rank.append(graph.params_of(names, trainable_only=True))
        units_rank.append(fsdp_units(graph, [st.nodes for st in stages]).sizes())
    slot = max(per_mb)
    t = TimeBreakdown(compute=slot * nmb)
    bubble_slots = get_schedule(config.schedule).bubble(pp, nmb, spr) if pp > 1 else 0.0
    t.tp_comm = max(tp_mb) * (nmb + bubble_slots)
    if pp > 1:
        t.bubble = bubble_slots * slot
        boundary = max((b.out_bytes.get(prec, 0) for b in graph.blocks), default=0) * scale
        send = collective_time(cluster, "send_recv", boundary, group=2, inter_node=pp_inter)
        t.p2p = (nmb * spr + pp - 1) * 2 * send
    dp = config.dp(world)
    c = 2 if mp else graph.param_dtype_bytes
    reduce_b = 4 if mp else graph.param_dtype_bytes
    p_tr = max(trainable_rank)
    if dp > 1:
        if not config.distribute_param:
            t.dp_comm = collective_time(cluster, "all_reduce", p_tr * reduce_b, group=dp, inter_node=dp_inter)
        else:
            # one all-gather / reduce-scatter per fully_shard unit (each block, each module outside the blocks
            # that is its own unit, the stage root)
            frac = p_tr / max(1, max(params_rank))
            units = max(units_rank, key=sum)
            ag = sum(collective_time(cluster, "all_gather", u * c, group=dp, inter_node=dp_inter) for u in units)
            rs = sum(collective_time(cluster, "reduce_scatter", u * frac * reduce_b, group=dp, inter_node=dp_inter)
                     for u in units)
            if pp > 1:
                n_ag = (min(nmb, pp) + 1) if config.distribute_low_prec_param else 1
                t.dp_comm = n_ag * ag + rs
            else:
                # params are resharded after every micro-batch's backward and gathered again (twice per
                # micro-batch when also resharded after forward); gradients are reduce-scattered after
                # every micro-batch too (the runtime keeps FSDP2's gradient sync on: only sharded
                # gradients accumulate, see planner.memory)
                n_ag = 2 if config.distribute_low_prec_param else 1
                t.dp_comm = nmb * (n_ag * ag + rs)
    shard = dp if config.distribute_param else 1
    if census:
        t.optimizer = _optimizer_seconds(cluster, graph, elements=p_tr / shard, k=k, name=opt_name)
        # gradient accumulation: each micro-batch after the first reads its gradient and reads + writes .grad
        t.compute += (nmb - 1) * max(trainable_rank) * (2 + 8 if mp else 12) / memory_bandwidth(cluster)
    elif cluster.calibration is not None and cluster.calibration.optimizer_step:  # measured at the model's sizes
        t.optimizer = _optimizer_seconds(cluster, graph, elements=p_tr / shard, k=k, name=opt_name)
    else:
        t.optimizer = p_tr / shard * (4 + 3 * k) * graph.param_dtype_bytes / cluster.mem_bandwidth
    return t
