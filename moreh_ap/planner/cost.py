# Cost model: predicted step time of a (ModelGraph, ParallelConfig) on a Cluster, as a breakdown.
"""Step time = compute + pipeline bubble + stage-to-stage sends + data-parallel collectives + optimizer step.

* compute: the slowest pipeline rank's FLOPs per micro-batch (forward, 2x
  forward for backward, +1 forward for recomputed blocks) over the calibrated
  matmul rate (bf16 under mixed precision, else fp32), times micro-batches;
* bubble: ``(num_stages - 1) / stages_per_rank`` micro-batch slots of the
  slowest rank;
* p2p: one activation send and one gradient send per stage boundary per
  micro-batch on the critical path, ``(num_micro_batches * stages_per_rank +
  num_stages - 1) * 2`` sends;
* dp collectives by mode: replicated = one all-reduce of the gradients per
  step; distribute_param = reduce-scatter of gradients + all-gather of the
  compute copy (once per step inside a pipeline, per micro-batch without
  one; ZeRO-3-like adds a second all-gather for backward). Mesh ('pp', 'dp')
  with dp innermost: a dp group is intra-node when dp <= devices_per_node,
  pipeline hops cross nodes when num_stages * dp > devices_per_node.
  Collectives are not assumed to overlap compute (an upper bound);
* optimizer step: memory-bound, ~(4 + 3k) x 4 bytes touched per local element
  over the memory bandwidth.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from moreh_ap.config import ParallelConfig
from moreh_ap.graph.model_graph import ModelGraph
from moreh_ap.planner.calibration import collective_time, matmul_flops
from moreh_ap.planner.cluster import Cluster
from moreh_ap.planner.memory import optimizer_profile, rank_nodes


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
    optimizer: float = 0.0
    """Optimizer step (memory-bound)."""

    @property
    def total(self) -> float:
        """Sum of the categories, seconds."""
        return self.compute + self.bubble + self.p2p + self.dp_comm + self.optimizer

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["total"] = self.total
        return d


def _placement(config: ParallelConfig, world_size: int, devices_per_node: int) -> tuple[bool, bool]:
    """(dp group spans nodes, pipeline hops cross nodes) for mesh ('pp', 'dp'), dp innermost."""
    dp = config.dp(world_size)
    dp_inter = dp > devices_per_node
    pp_inter = config.num_stages > 1 and config.num_stages * dp > devices_per_node
    return dp_inter, pp_inter


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
    _, k, _ = optimizer_profile(optimizer, device_type=cluster.device_type)
    mp = config.mixed_precision
    rate = matmul_flops(cluster, "bf16" if mp else "fp32")
    scale = config.batch_per_device / max(1, graph.batch_size)
    pp, nmb, spr = config.num_stages, config.num_micro_batches, config.stages_per_rank
    per_mb, params_rank, trainable_rank = [], [], []
    for r in range(pp):
        chunks = rank_nodes(graph, config, r)
        nodes = [n for ch in chunks for n in ch]
        flops = sum(n.fwd_flops * (4 if (config.recomputation and n.kind == "block") else 3) for n in nodes)
        per_mb.append(flops * scale / rate)
        names = [n.name for n in nodes]
        params_rank.append(graph.params_of(names))
        trainable_rank.append(graph.params_of(names, trainable_only=True))
    slot = max(per_mb)
    t = TimeBreakdown(compute=slot * nmb)
    dp_inter, pp_inter = _placement(config, world, cluster.devices_per_node)
    prec = "mixed" if mp else "full"
    if pp > 1:
        t.bubble = (pp - 1) / spr * slot
        boundary = max((b.out_bytes.get(prec, 0) for b in graph.blocks), default=0) * scale
        send = collective_time(cluster, "send_recv", boundary, group=2, inter_node=pp_inter)
        t.p2p = (nmb * spr + pp - 1) * 2 * send
    dp = config.dp(world)
    c = 2 if mp else graph.param_dtype_bytes
    reduce_b = 4 if mp else graph.param_dtype_bytes
    p_all, p_tr = max(params_rank), max(trainable_rank)
    if dp > 1:
        if not config.distribute_param:
            t.dp_comm = collective_time(cluster, "all_reduce", p_tr * reduce_b, group=dp, inter_node=dp_inter)
        else:
            ag = collective_time(cluster, "all_gather", p_all * c, group=dp, inter_node=dp_inter)
            rs = collective_time(cluster, "reduce_scatter", p_tr * reduce_b, group=dp, inter_node=dp_inter)
            if pp > 1:
                n_ag = (min(nmb, pp) + 1) if config.distribute_low_prec_param else 1
                t.dp_comm = n_ag * ag + rs
            else:
                n_ag = 2 if config.distribute_low_prec_param else 1
                t.dp_comm = nmb * (n_ag * ag + rs)
    shard = dp if config.distribute_param else 1
    t.optimizer = p_tr / shard * (4 + 3 * k) * graph.param_dtype_bytes / cluster.mem_bandwidth
    return t
