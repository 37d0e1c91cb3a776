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

* no distribution, no pipeline: params ``P*w``; mixed precision is bf16 autocast
  over the fp32 weights there, so the activations are the graph's autocast trace
  for the device type (:func:`activation_precision`: CUDA runs ``pow``, ``exp``,
  ``softmax``, ``sum``, ``layer_norm`` ... in fp32, the CPU in bf16); in it
  autocast's bf16 weight copies (the cast cache's, one per parameter) are saved
  tensors of the nodes whose matmuls use them (``saved_cast_bytes``: not scaled
  with the batch, reported under params), alive from the forward until that
  node's backward; a recomputed block casts its weights again in its backward,
  and the cast cache holds every copy until the autocast region (forward and
  loss) ends; a graph traced without autocast falls back to the bf16 trace plus
  copies ``P*c``; DDP (dp > 1) adds its reducer buckets ``P_trainable*w``
  (``gradient_as_bucket_view=False``);
* distribute_param (FSDP2; one unit per block, one per part outside the blocks
  that ``moreh_ap.fsdp_units.is_own_unit`` accepts, the root unit for the rest,
  as the runtime wraps them: :func:`moreh_ap.planner.units.fsdp_units`): master, gradients and optimizer state sharded ``/d``; ZeRO-2 keeps
  each unit's compute copy from forward until its post-backward; ZeRO-3
  (+ distribute_low_prec_param) gathers the current unit and prefetches the next;
  at each unit's post-backward its unsharded gradients, the reduce-dtype
  reduce-scatter input and the output coexist, and the input is kept until the
  next unit's post-backward (torch 2.13's one buffer in flight); tied parameters
  stay with the root unit, whose gradients are reduced at the end of backward;
* inside a pipeline (num_stages > 1) the rank's forwards and backwards are replayed in
  torch 2.13's order (the schedule registry's ``order``: GPipe, 1F1B, Interleaved1F1B); ``PipelineStage``
  runs every backward without gradient sync and without resharding, so gradients accumulate
  unsharded in the reduce dtype (from each local stage's first backward on, whatever the dp
  mode) and are reduced once after the last backward (the largest unit's reduction, with every
  accumulated gradient still alive, is one more moment); the runtime wraps every stage with FSDP2
  or FSDP-based replicate, so a compute copy ``P*c`` exists even in fp32 (ZeRO-3: gathered
  unit by unit in a backward that follows a forward); from the second backward on each fresh
  weight gradient is a temporary; torch's receive buffers (every micro-batch's stage input and
  output gradient) persist; every stage keeps its output (the last one its logits) until that
  micro-batch's backward;
* several micro-batches without a pipeline: the runtime reduce-scatters after
  every micro-batch under FSDP2 and lets DDP accumulate, so full (sharded or
  replicated) gradients are held from the second micro-batch on;
* activations: bytes saved for backward per micro-batch (traced in the precision
  the rank runs: "full", "mixed" for FSDP2's and the pipeline wrappers'
  ``MixedPrecisionPolicy`` (bf16 parameters, no autocast), "autocast_<device>"
  otherwise; scaled to ``batch_per_device``) times micro-batches in flight (1 without a pipeline,
  ``num_micro_batches`` for GPipe, ``num_stages - rank`` for 1F1B, torch's
  warm-up count + 1 for Interleaved1F1B; the pipeline peak itself follows the replayed order);
  with recomputation only each
  block's input is kept, and one block's working set is re-created during
  its backward; non-last pipeline stages also keep their outputs;
* tensor parallelism (``tp > 1``): ``graph`` is one TP rank's (:func:`moreh_ap.planner.tp.local_graph`);
  without FSDP2 or a pipeline, one more moment: DTensor computes the vocabulary-parallel embedding's
  weight gradient whole (``Replicate``, ``V*h*w``) and lays it like the weight with a chunk copy
  (``V*h*w/tp``), after every other gradient is made; a head tied to it adds the sum with its sharded
  gradient (``V*h*w/tp``) (:func:`moreh_ap.planner.tp.vocab_grad`); dp > 1 without distribute_param is
  FSDP-based replicate (DDP cannot hold DTensor parameters): modelled as FSDP2 (ZeRO-2 units) over one shard,
  with its ``MixedPrecisionPolicy`` ("mixed" activations, each unit's compute copy, its reduction buffers);
  a vocabulary-parallel loss (:func:`moreh_ap.planner.tp.vocab_parallel_loss`: the head's logits ``/ tp``)
  holds three fp32 tensors of the rank's logits in its backward (torch's fused nll / log-softmax backward);
* the peak is the largest of: the end of the forward (loss being computed:
  every saved tensor plus the logits), each node's backward (its saved tensors,
  the gradient of its largest tensor and of that op's input, e.g. the logits'
  twice, the gradients of the nodes after it) and post-backward, and the
  optimizer step (foreach AdamW allocates one state-sized temporary for plain
  parameters on CUDA; FSDP2's DTensor parameters take the per-tensor loop: two
  parameter-sized ones).

The runtime computes the loss outside the model's forward (HF ``labels`` are
popped), so a ZeRO-3 head is gathered again only after the loss backward.
Checked against torch's own trackers on the runtime's wrapped models
(``benchmarks/bench_memory_model.py``, ``tests/unit/test_memory_ties.py``), for pipelines against
the live-storage tracker on real gloo ranks (``benchmarks/bench_memory_model_pipeline.py``,
``tests/distributed/test_memory_ties_pipeline.py``), and against ``torch.cuda.max_memory_allocated()``
of ten training runs on one H200 (``tests/unit/test_gpu_truth_memory.py``; the planner never reads them).

The memory cap the planner applies is ``device_memory *
MEMORY_USAGE_CORRECTION_RATIO / 100``.
"""
from __future__ import annotations

import weakref
from dataclasses import asdict, dataclass
from typing import Any

from moreh_ap.config import ParallelConfig
from moreh_ap.graph.model_graph import ModelGraph, NodeInfo
from moreh_ap.layout import ParallelLayout
from moreh_ap.planner.peaks import Peak, Sizes, flat_peak, piped_peak
from moreh_ap.planner.tp import vocab_grad, vocab_parallel_loss
from moreh_ap.planner.units import StageNodes, block_nodes, fsdp_units, optimizer_profile, prev_out, rank_stages

__all__ = ["MemoryBreakdown", "activation_precision", "estimate", "estimate_peak", "estimate_rank", "estimate_stages"]


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
    """"forward" (the loss being computed), "backward" or "optimizer": when the peak happens."""

    @property
    def total(self) -> int:
        """Sum of the categories, bytes."""
        return self.params + self.grads + self.optimizer + self.activations + self.transient

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["total"] = self.total
        return d

def activation_precision(graph: ModelGraph, config: ParallelConfig, *, device_type: str,
                         replicated: bool = False) -> str:
    """The traced precision whose saved tensors a rank of ``config`` keeps.

    "full" without mixed precision; "mixed" (bf16 parameters, no autocast) when FSDP2's
    ``MixedPrecisionPolicy`` casts the parameters (distribute_param, a pipeline: every stage is
    wrapped, or ``replicated``: FSDP-based replicate, dp x tp without distribute_param); else the
    runtime runs bf16 autocast over the fp32 parameters: "autocast_<device_type>"
    (autocast's op policy is the device's), or "mixed" for a graph traced without it.
    """
    if not config.mixed_precision:
        return "full"
    if config.distribute_param or config.num_stages > 1 or replicated:
        return "mixed"
    prec = f"autocast_{device_type}"
    return prec if any(prec in n.saved_bytes for n in graph.nodes) else "mixed"


def _node_acts(graph: ModelGraph, node: NodeInfo, prev: NodeInfo | None, *, prec: str, scale: float, recompute: bool):
    """(kept bytes, transient bytes during its backward, the weight copies among them) of one node, one micro-batch.

    Autocast's bf16 weight copies (saved by the matmuls, :attr:`NodeInfo.saved_cast_bytes`) are one
    per parameter whatever the batch: not scaled. A recomputed block keeps its input only and holds
    its saved tensors (copies included, cast again) during its backward.
    """
    casts = node.saved_cast_bytes.get(prec, 0)
    saved = (node.saved_bytes.get(prec, 0) - casts) * scale + casts
    # during its backward: the gradient of the node's largest tensor and of that op's input coexist
    peak = 2 * node.peak_fwd_bytes.get(prec, 0) * scale
    if node.kind == "post" and vocab_parallel_loss(graph):
        # torch's loss_parallel backward (nll_loss and log-softmax fused) holds three fp32 tensors of this rank's
        # logits at once: the zero-filled gradient, exp(log-probabilities) and their sum (then the product)
        logits32 = node.out_bytes.get("full", 0) * 4 / graph.param_dtype_bytes
        peak = max(peak, 3 * logits32 * scale)
    if recompute and node.kind == "block":
        kept = (prev.out_bytes.get(prec, 0) if prev is not None else 0) * scale
        return kept, saved + peak, 0.0, casts
    return saved, peak, casts, 0.0


@dataclass(kw_only=True, slots=True)
class _RankActivations:
    """Per node of a pipeline rank (its stages one after the other): activation bytes of one micro-batch."""

    kept: list[float]
    """Bytes kept for the node's backward (the stage output included on a stage's last node)."""
    trans: list[float]
    """Transient bytes during the node's backward."""
    chunks: list[tuple[int, int]]
    """``[start, end)`` of each local stage's nodes."""
    recv: float
    """torch's receive buffers: every micro-batch's stage input and output gradient, kept all step."""
    casts: list[tuple[float, float]]
    """Autocast's weight copies among ``kept`` and among ``trans`` (0 unless traced under autocast)."""


def _rank_activations(graph: ModelGraph, stages: list[StageNodes], config: ParallelConfig, *, prec: str,
                      scale: float) -> _RankActivations:
    piped = config.num_stages > 1
    out = _RankActivations(kept=[], trans=[], chunks=[], recv=0.0, casts=[])
    prev = None
    for st in stages:
        out.chunks.append((len(out.kept), len(out.kept) + len(st.nodes)))
        for j, n in enumerate(st.nodes):
            a, t, ca, ct = _node_acts(graph, n, prev, prec=prec, scale=scale, recompute=config.recomputation)
            if piped and j == 0 and st.stage > 0:  # the stage input is a receive buffer (counted in recv)
                a = 0.0 if config.recomputation else max(0.0, a - prev_out(graph, st.lo, prec) * scale)
            if piped and j == len(st.nodes) - 1:  # the stage output (logits on the last) kept for its backward
                a += n.out_bytes.get(prec, 0) * scale
            out.kept.append(a)
            out.trans.append(t)
            out.casts.append((ca, ct))
            prev = n
        if piped:
            nmb = config.num_micro_batches
            out.recv += nmb * prev_out(graph, st.lo, prec) * scale if st.stage > 0 else 0.0
            out.recv += nmb * prev_out(graph, st.hi, prec) * scale if not st.is_last else 0.0
    return out


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
    stages = rank_stages(graph, config, rank, world_size=world_size)
    nodes = [n for st in stages for n in st.nodes]
    names = [n.name for n in nodes]
    p_all = graph.params_of(names)
    p_tr = graph.params_of(names, trainable_only=True)
    mp, dp = config.mixed_precision, max(1, config.dp(world_size))
    w = graph.param_dtype_bytes
    dist, piped = config.distribute_param, config.num_stages > 1
    # dp x tp without distribute_param: FSDP-based replicate, modelled as FSDP2 units sharded over 1 rank
    replicated = not piped and not dist and dp > 1 and config.tp > 1
    sz = Sizes(w=w, c=2 if mp else w, r=4 if mp else w, d=dp if dist else 1, dp=dp)
    master, opt = p_all * w / sz.d, p_tr * k * w / sz.d
    scale = config.batch_per_device / max(1, graph.batch_size)
    prec = activation_precision(graph, config, device_type=device_type, replicated=replicated)
    acts = _rank_activations(graph, stages, config, prec=prec, scale=scale)
    units = fsdp_units(graph, [st.nodes for st in stages], fsdp=dist or replicated)
    ddp = not piped and not dist and dp > 1 and not replicated
    if replicated:
        config = config.replace(distribute_param=True, distribute_low_prec_param=False)
    if piped:
        peak = piped_peak(nodes, acts.kept, acts.trans, acts.chunks, units, config=config, rank=rank, sz=sz)
        bwd_total, bwd_acts = master + opt + acts.recv + peak.total, peak.acts + acts.recv  # recv with activations
    else:
        buckets = p_tr * w if ddp else 0.0  # DDP's reducer buckets (gradient_as_bucket_view=False)
        peak = flat_peak(nodes, acts.kept, acts.trans, units, config=config, sz=sz, ddp_buckets=buckets,
                         casts=acts.casts if prec.startswith("autocast") else None)
        bwd_total, bwd_acts = master + opt + peak.total, peak.acts
    if dist or piped or replicated:  # FSDP2-managed parameters are DTensors: stepped by the per-tensor loop
        temps = 0.0
    largest = max((n.largest_param for n in nodes if n.trainable_params), default=0)
    g_final = p_tr * w / sz.d
    vocab = vocab_grad(graph) if not dist and not piped and not replicated else None
    if vocab is not None:  # TP: the embedding's whole gradient (+ its chunk copy and, tied, the sum), grads all made
        extra = vocab.numel * w * (1 + (2 / vocab.tp if vocab.tied else 0))
        if master + opt + g_final + extra > bwd_total:
            peak = Peak(total=g_final + extra, grads=g_final, transient=extra, phase="backward")
            bwd_total, bwd_acts = master + opt + peak.total, 0.0
    step_trans = temps * p_tr * w / sz.d + 2 * largest * w / sz.d + (p_tr * w if ddp else 0.0)
    if master + opt + g_final + step_trans > bwd_total:
        return MemoryBreakdown(
            params=int(master), grads=int(g_final), optimizer=int(opt), activations=0,
            transient=int(step_trans), stage=rank, phase="optimizer",
        )
    return MemoryBreakdown(
        params=int(master + peak.copy), grads=int(peak.grads), optimizer=int(opt), activations=int(bwd_acts),
        transient=int(peak.transient), stage=rank, phase=peak.phase,
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


_SAME: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # graph -> whether its blocks are identical


def _same_blocks(graph: ModelGraph) -> bool:
    if graph not in _SAME:
        blocks = block_nodes(graph)
        first = blocks[0] if blocks else None
        _SAME[graph] = all(
            (b.num_params, b.trainable_params, b.saved_bytes, b.saved_cast_bytes, b.peak_fwd_bytes, b.out_bytes)
            == (first.num_params, first.trainable_params, first.saved_bytes, first.saved_cast_bytes,
                first.peak_fwd_bytes, first.out_bytes) for b in blocks)
    return _SAME[graph]


def estimate_peak(
    graph: ModelGraph, config: ParallelConfig, *, world_size: int, optimizer: Any = "adamw", device_type: str = "cuda"
) -> MemoryBreakdown:
    """:func:`estimate` for the planner, without the pipeline ranks that cannot be the busiest.

    With identical blocks, a middle rank (neither the first nor the last) of GPipe, 1F1B or Interleaved1F1B
    holds no more micro-batches in flight than an earlier middle rank (GPipe: all of them; 1F1B:
    ``num_stages - rank``; Interleaved1F1B: torch's warm-up count, falling with the rank), so one whose
    stages hold no more blocks each than an earlier middle rank's cannot peak higher: only the first rank,
    the last and the middle ranks not so dominated are evaluated (checked against :func:`estimate` in the
    tests). Anything else: :func:`estimate`.
    """
    kw = dict(world_size=world_size, optimizer=optimizer, device_type=device_type)
    pp = config.num_stages
    if pp <= 3 or config.schedule not in ("GPipe", "1F1B", "Interleaved1F1B") or not _same_blocks(graph):
        return estimate(graph, config, **kw)
    layout = ParallelLayout.from_config(config, world_size)
    ranges = layout.stage_ranges(graph.num_blocks, config.boundaries)
    held: list[list[int]] = [[] for _ in range(pp)]  # blocks of each rank's stages, in stage order
    for stage, (lo, hi) in enumerate(ranges):
        held[layout.stage_rank(stage)].append(hi - lo)
    ranks, seen = [0, pp - 1], []
    for r in range(1, pp - 1):
        sizes = tuple(held[r])
        if not any(len(s) == len(sizes) and all(a <= b for a, b in zip(sizes, s)) for s in seen):
            ranks.append(r)
            seen.append(sizes)
    return max((estimate_rank(graph, config, r, **kw) for r in ranks), key=lambda m: m.total)
