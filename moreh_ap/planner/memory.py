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

* no distribution, no pipeline: params ``P*w``; under mixed precision autocast's
  bf16 weight copies ``P*c`` live from forward until each one's backward (with
  recomputation only the current block's); DDP (dp > 1) adds its reducer
  buckets ``P_trainable*w`` (``gradient_as_bucket_view=False``);
* distribute_param (FSDP2; one unit per block, one per large untied module
  outside the blocks, the root unit for the rest, as ``runtime.apply.apply_fsdp``
  wraps them): master, gradients and optimizer state sharded ``/d``; ZeRO-2 keeps
  each unit's compute copy from forward until its post-backward; ZeRO-3
  (+ distribute_low_prec_param) gathers the current unit and prefetches the next;
  at each unit's post-backward its unsharded gradients, the reduce-dtype
  reduce-scatter input and the output coexist, and the input is kept until the
  next unit's post-backward (torch 2.13's one buffer in flight); tied parameters
  stay with the root unit, whose gradients are reduced at the end of backward;
* inside a pipeline (num_stages > 1) the rank's forwards and backwards are replayed in
  torch 2.13's order (:func:`schedule_order`: GPipe, 1F1B, Interleaved1F1B); ``PipelineStage``
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
* activations: bytes saved for backward per micro-batch (traced, scaled to
  ``batch_per_device``) times micro-batches in flight (1 without a pipeline,
  ``num_micro_batches`` for GPipe, ``num_stages - rank`` for 1F1B, torch's
  warm-up count + 1 for Interleaved1F1B; the pipeline peak itself follows the replayed order);
  with recomputation only each
  block's input is kept, and one block's working set is re-created during
  its backward; non-last pipeline stages also keep their outputs;
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
(``benchmarks/bench_memory_model.py``, ``tests/test_memory_ties.py``) and, for pipelines, against
the live-storage tracker on real gloo ranks (``benchmarks/bench_memory_model_pipeline.py``,
``tests/test_memory_ties_pipeline.py``).

The memory cap the planner applies is ``device_memory *
MEMORY_USAGE_CORRECTION_RATIO / 100``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache
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
    """"forward" (the loss being computed), "backward" or "optimizer": when the peak happens."""

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


def prev_out(graph: ModelGraph, block: int, prec: str) -> int:
    """Bytes a pipeline cut before block ``block`` sends (the output of the node before it)."""
    node = graph.blocks[block - 1] if block > 0 else graph.pre
    return node.out_bytes.get(prec, 0) if node is not None else 0


def _node_acts(graph: ModelGraph, node: NodeInfo, prev: NodeInfo | None, *, prec: str, scale: float, recompute: bool):
    """(kept activation bytes, transient bytes during its backward) of one node for one micro-batch."""
    saved = node.saved_bytes.get(prec, 0) * scale
    # during its backward: the gradient of the node's largest tensor and of that op's input coexist
    peak = 2 * node.peak_fwd_bytes.get(prec, 0) * scale
    if recompute and node.kind == "block":
        kept = (prev.out_bytes.get(prec, 0) if prev is not None else 0) * scale
        return kept, saved + peak
    return saved, peak


@dataclass(kw_only=True, slots=True)
class _Units:
    """Parameters per node as the runtime's FSDP units hold them (tied parameters counted once)."""

    p: list[int]
    """Parameters of the node's own unit (a block; the large untied modules of the embedding / head)."""
    t: list[int]
    """Trainable ones among them."""
    root_p: int
    """Parameters left with the root unit: tied ones (e.g. GPT-2's wte / lm_head)."""
    root_t: int


def _units(graph: ModelGraph, nodes: list[NodeInfo]) -> _Units:
    """Split each node's parameters into its own unit and the root unit (see ``runtime.apply.apply_fsdp``)."""
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
    return _Units(p=p, t=t, root_p=root_p, root_t=root_t)


@dataclass(kw_only=True, slots=True)
class _Sizes:
    """Bytes per element of one configuration: master ``w``, compute copy ``c``, reduction ``r``; shards ``d``."""

    w: int
    c: int
    r: int
    d: int
    """dp shards of master/grads/optimizer state (1 without distribute_param)."""
    dp: int


def _flat_peak(nodes, kept, trans, u: _Units, *, config: ParallelConfig, sz: _Sizes, ddp_buckets: float):
    """Backward peak without a pipeline: (total, params beyond the master, grads, activations, transient).

    Walks the backward node by node (head first). At each node two moments are checked: *during* its
    backward (its saved tensors and working set alive, the gradients of the nodes after it done) and, for
    an FSDP unit, *at its post-backward* (its unsharded gradients copied into the reduce-scatter input).
    FSDP2 facts used (torch 2.13), with the runtime's units (one per block, one per large untied module
    outside the blocks, the root unit for the rest): a unit's reduce-scatter input is kept until the
    next unit's post-backward; ZeRO-2 reshards a unit after its backward, ZeRO-3 keeps the current and
    the prefetched unit gathered; the root unit's gradients stay unsharded until the end of backward;
    the loss is computed outside the model, so a ZeRO-3 head is gathered only after the loss backward.
    Without FSDP, autocast's bf16 weight copies live as long as the saved tensors that hold them.
    """
    fsdp, zero3 = config.distribute_param, config.distribute_low_prec_param
    w, c, r, d = sz.w, sz.c, sz.r, sz.d
    n, p, t = len(nodes), u.p, u.t
    prefix = [0.0] * (n + 1)  # activations kept by nodes < i
    p_upto = [0] * (n + 1)  # unit parameters of nodes < i, and of the non-block ones among them
    p_root_upto = [0] * (n + 1)
    for i in range(n):
        prefix[i + 1] = prefix[i] + kept[i]
        p_upto[i + 1] = p_upto[i] + p[i]
        p_root_upto[i + 1] = p_root_upto[i] + (p[i] if nodes[i].kind != "block" else 0)
    post = n - 1 if nodes and nodes[-1].kind == "post" else None
    best = (0.0, 0.0, 0.0, 0.0, 0.0)
    phase = "backward"
    # gradients held when node i runs its backward: those of the nodes after it; with several
    # micro-batches, from the second one on, all of them (DDP and no wrapper accumulate full gradients,
    # FSDP2 reduce-scatters every micro-batch into the sharded ones)
    accumulate = config.num_micro_batches > 1
    done_grads = (sum(t) + u.root_t) * w / d if accumulate else 0.0
    for i in range(n - 1, -1, -1):
        if fsdp:
            root = c * u.root_p if (not zero3 or i != post) else 0.0
            if zero3:  # this unit and the prefetched one (the root from the head's backward on)
                prefetch = c * p[i - 1] if i > 0 else 0.0
                copy, copy_end = c * p[i] + prefetch + root, prefetch + root
            else:  # ZeRO-2: units after i already resharded by their post-backward
                copy = c * p_upto[i + 1] + root
                copy_end = copy - c * p[i]
            held_rs = r * t[i + 1] if i + 1 < n else 0.0
        else:
            # autocast's bf16 weight copies live as long as the saved tensors holding them (until each
            # node's backward); with recomputation a block keeps none and casts again when recomputed
            alive = p_root_upto[i + 1] + (p[i] if nodes[i].kind == "block" else 0) if config.recomputation \
                else p_upto[i + 1]
            copy = c * (alive + u.root_p) if config.mixed_precision else 0.0
            copy_end, held_rs = copy, 0.0
        moments = [(copy, done_grads, prefix[i + 1], trans[i] + held_rs + ddp_buckets)]
        if fsdp and zero3 and i == post:  # the loss backward runs before the head is gathered again
            moments = [(0.0, done_grads, prefix[i + 1], trans[i] + held_rs),
                       (copy + c * u.root_p, done_grads, prefix[i + 1], trans[i] / 2 + held_rs)]
        if fsdp and i == post:
            done_grads += c * u.root_t  # the root unit's unsharded gradients, reduced at the end
        if fsdp and t[i]:  # post-backward: unsharded grads, reduce-scatter input and output coexist
            moments.append((copy_end, done_grads, prefix[i], _rs_bytes(t[i], sz)))
        for m in moments:
            if sum(m) > best[0]:
                best = (sum(m), *m)
        if not accumulate:
            done_grads += t[i] * w / d if fsdp else (t[i] + (u.root_t if i == post else 0)) * w
    # the end of the forward, the loss being computed: every node's saved tensors, the logits (bf16 and
    # fp32 under mixed precision), the forward's gathered / autocast-cast weights
    if n:
        logits = trans[-1] / 2 if nodes[-1].kind == "post" else 0.0
        logits *= 1.5 if config.mixed_precision else 1.0
        if fsdp:
            fwd_copy = c * (sum(p) + u.root_p) if not zero3 else 0.0
        else:
            fwd_copy = c * (sum(p) + u.root_p) if config.mixed_precision else 0.0
        base = (sum(t) + u.root_t) * w / d if accumulate else 0.0
        fwd = (fwd_copy, base, prefix[n], logits + ddp_buckets)
        if sum(fwd) > best[0]:
            best = (sum(fwd), *fwd)
            phase = "forward"
    if fsdp and u.root_t:  # the root unit's post-backward, after the embedding's backward
        done = (sum(t) + (u.root_t if accumulate else 0)) * w / d
        # a tied parameter's second gradient (the embedding's) is summed into the first one
        rs = _rs_bytes(u.root_t, sz) + c * u.root_t
        copy = c * u.root_p
        if copy + done + rs > best[0]:
            best = (copy + done + rs, copy, done, 0.0, rs)
            phase = "backward"
    return (*best, phase)


def _rs_bytes(numel: int, sz: _Sizes) -> float:
    """Bytes of one FSDP2 reduce-scatter: unsharded grads + reduce-dtype input + sharded output."""
    return numel * (sz.c + sz.r + sz.r / sz.d)


def schedule_order(config: ParallelConfig, rank: int) -> list[tuple[str, int, int]]:
    """The forwards and backwards a pipeline rank runs, in order: ``("F" | "B", local stage, micro-batch)``.

    As torch 2.13 orders them: GPipe every forward, then every backward; 1F1B ``min(n, pp - rank)``
    warm-up forwards, then backward / forward pairs, then the remaining backwards; Interleaved1F1B
    (``_get_warmup_ops`` / ``_get_1f1b_rank_ops``) ``(spr - 1) * mb_per_round + 2 * (pp - 1 - rank)``
    warm-up forwards (capped), local stages taken ``mb_per_round`` micro-batches at a time (forwards in
    increasing, backwards in decreasing stage order), then forward / backward pairs, then backwards.
    """
    n, pp, spr = config.num_micro_batches, config.num_stages, config.stages_per_rank
    if config.schedule == "GPipe":
        return [("F", 0, i) for i in range(n)] + [("B", 0, i) for i in range(n)]
    if config.schedule == "1F1B":
        w = min(n, pp - rank)
        order = [("F", 0, i) for i in range(w)]
        for i in range(n):
            order.append(("B", 0, i))
            if w + i < n:
                order.append(("F", 0, w + i))
        return order
    per_round = n // max(1, n // pp)
    total = spr * n
    warmup = min((spr - 1) * per_round + 2 * (pp - 1 - rank), total)
    fwd_next, bwd_next = [0] * spr, [0] * spr
    order = []

    def fwd(step):
        local = (step // per_round) % spr
        order.append(("F", local, fwd_next[local]))
        fwd_next[local] += 1

    def bwd(step):
        local = spr - 1 - ((step - warmup) // per_round) % spr
        order.append(("B", local, bwd_next[local]))
        bwd_next[local] += 1

    for step in range(warmup):
        fwd(step)
    for step in range(warmup, total):
        fwd(step)
        bwd(step)
    for step in range(total, total + warmup):
        bwd(step)
    return order


@lru_cache(maxsize=4096)
def backward_moments(schedule: str, n: int, pp: int, spr: int, rank: int):
    """The distinct backwards of a pipeline rank in :func:`schedule_order`, independent of sizes.

    Each: (local stage, micro-batches of every local stage forwarded and not yet backwarded besides
    this one, local stages that ran a backward before, whether a forward ran since the previous backward).
    """
    cfg = ParallelConfig(num_stages=pp, num_micro_batches=n, stages_per_rank=spr, schedule=schedule,
                         batch_per_device=1)
    counts = [0] * spr
    done: set[int] = set()
    fwd_between, out = True, []
    seen: dict[tuple, set[tuple[int, ...]]] = {}
    for kind, local, _ in schedule_order(cfg, rank):
        if kind == "F":
            counts[local] += 1
            fwd_between = True
            continue
        counts[local] -= 1
        key = (local, frozenset(done), fwd_between)
        done.add(local)
        fwd_between = False
        seen.setdefault(key, set()).add(tuple(counts))
    for (local, done_before, between), vectors in seen.items():
        # only micro-batch counts that no other one of the same kind of backward dominates can be the worst
        kept: list[tuple[int, ...]] = []
        for v in sorted(vectors, key=sum, reverse=True):  # a dominating vector has a larger sum: seen first
            if not any(all(x >= y for x, y in zip(w, v)) for w in kept):
                kept.append(v)
                out.append((local, v, done_before, between))
    return tuple(out)


def _piped_peak(nodes, kept, trans, chunks, u: _Units, *, config: ParallelConfig, rank: int, sz: _Sizes):
    """Peak of a pipeline rank: (total, compute copy, grads, activations, transient, phase).

    torch 2.13's ``PipelineStage`` runs every backward without gradient sync and without resharding
    (``set_requires_gradient_sync(False)``, ``set_reshard_after_backward(False)``) and reduces all
    gradients once after the last backward (``perform_reduce_grad``). The runtime wraps every stage
    with FSDP2 or FSDP-based replicate, so a compute copy of the parameters exists even in fp32. The
    rank's forwards and backwards are replayed in :func:`schedule_order`; moments checked:

    * each node's backward of each (local stage, micro-batch): the activations of every other
      forwarded-not-yet-backwarded pair plus this one's up to the node, its working set; gradients
      (reduce dtype, unsharded, accumulated): of the local stages that ran a backward already, and of
      this stage's nodes after the node at its first backward; compute copy: ZeRO-2 / replicate the
      whole rank's from the first forward on; ZeRO-3 the stage's units backwarded so far plus the
      prefetched one when a forward (which reshards) ran since the previous backward, else all; the
      last stage's loss backward runs before its head is gathered again;
    * the gradient reduction after the last backward: every unit's unsharded gradients, the copy, one
      unit's reduce-scatter buffers.
    """
    zero3 = config.distribute_low_prec_param and config.distribute_param
    c, r = sz.c, sz.r if (config.distribute_param or config.mixed_precision) else sz.w
    n, p, t = len(nodes), u.p, u.t
    full_copy = c * (sum(p) + u.root_p)
    acts = [sum(kept[a:b]) for a, b in chunks]
    grads = [r * sum(t[a:b]) for a, b in chunks]
    grads[-1] += r * u.root_t
    post = n - 1 if nodes and nodes[-1].kind == "post" else None
    best = (0.0, 0.0, 0.0, 0.0, 0.0, "backward")
    inner: dict[tuple[int, bool, bool], tuple[float, ...]] = {}  # a stage's own worst node per kind of backward

    def stage_worst(local: int, first: bool, progressive: bool) -> tuple[float, ...]:
        """(sum, copy, this stage's grads, this micro-batch's activations, transient) at the stage's worst node."""
        a, b = chunks[local]
        prefix = acts[local]
        after = suffix = 0.0  # gradients / unit parameters of the nodes after i in this stage
        worst = (-1.0, 0.0, 0.0, 0.0, 0.0)
        for i in range(b - 1, a - 1, -1):
            if not zero3:
                copy = full_copy
            elif i == post:  # the loss backward runs before the head unit is gathered again
                copy = c * u.root_p if progressive else full_copy - c * p[i]
            elif progressive:  # gathered progressively: units after i, i, the prefetched one
                copy = c * (suffix + p[i] + (p[i - 1] if i > a else 0) + u.root_p)
            else:
                copy = full_copy
            g = after if first else grads[local]
            # from the second backward on, each fresh weight gradient (compute dtype) is added into the
            # accumulated one: the node's largest parameter's gradient is a temporary, next to the gradient
            # of that op's output (half the node's working set)
            fresh = 0.0 if first or not nodes[i].trainable_params else c * nodes[i].largest_param
            tr = max(trans[i], trans[i] / 2 + fresh)
            total = copy + g + prefix + tr
            if total > worst[0]:
                worst = (total, copy, g, prefix, tr)
            prefix -= kept[i]
            after += r * t[i]
            suffix += p[i]
        return worst

    for local, counts, done, fwd_between in backward_moments(config.schedule, config.num_micro_batches,
                                                             config.num_stages, config.stages_per_rank, rank):
        if chunks[local][0] == chunks[local][1]:
            continue
        others = sum(k * a for k, a in zip(counts, acts))
        g_done = sum(grads[l] for l in done if l != local)
        first = local not in done
        key = (local, first, zero3 and (first or fwd_between))
        if key not in inner:
            inner[key] = stage_worst(*key)
        s_total, copy, g, prefix, tr = inner[key]
        total = s_total + others + g_done
        if total > best[0]:
            best = (total, copy, g + g_done, others + prefix, tr, "backward")
    # the reduction after the last backward (``perform_reduce_grad``), at the largest unit: it is resharded
    # first; every unit's accumulated gradients are still alive; its reduce-scatter input and output, and
    # when the reduce-scatter spans several ranks one more input-sized buffer (measured with gloo)
    k = max(range(n), key=lambda i: t[i], default=None)
    if k is not None and t[k]:
        rs = t[k] * (sz.r + sz.r / sz.d + (sz.r if sz.d > 1 else 0))
        copy = full_copy - c * p[k]
        total = copy + sum(grads) + rs
        if total > best[0]:
            best = (total, copy, sum(grads), 0.0, rs, "backward")
    return best


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
    dist, piped = config.distribute_param, config.num_stages > 1
    sz = _Sizes(w=w, c=2 if mp else w, r=4 if mp else w, d=dp if dist else 1, dp=dp)
    master, opt = p_all * w / sz.d, p_tr * k * w / sz.d
    scale = config.batch_per_device / max(1, graph.batch_size)
    prec = "mixed" if mp else "full"
    kept, trans = [], []
    prev = None
    recv = 0.0  # torch's receive buffers: every micro-batch's stage input and output gradient, kept
    ranges = stage_ranges(graph.num_blocks, config) if piped else [(0, graph.num_blocks)]
    chunks = []
    for v, chunk in zip(range(rank, len(ranges), max(1, config.num_stages)), virt):
        chunks.append((len(kept), len(kept) + len(chunk)))
        for j, n in enumerate(chunk):
            a, t = _node_acts(graph, n, prev, prec=prec, scale=scale, recompute=config.recomputation)
            if piped and j == 0 and v > 0:  # the stage input is a receive buffer (counted in recv)
                a = 0.0 if config.recomputation else max(0.0, a - prev_out(graph, ranges[v][0], prec) * scale)
            if piped and j == len(chunk) - 1:  # the stage output (logits on the last) kept for its backward
                a += n.out_bytes.get(prec, 0) * scale
            kept.append(a)
            trans.append(t)
            prev = n
        if piped:
            nmb = config.num_micro_batches
            recv += nmb * prev_out(graph, ranges[v][0], prec) * scale if v > 0 else 0.0
            recv += nmb * prev_out(graph, ranges[v][1], prec) * scale if v < len(ranges) - 1 else 0.0
    ddp = not piped and not dist and dp > 1
    if piped:
        total, copy, grads, acts, tr, phase = _piped_peak(nodes, kept, trans, chunks, _units(graph, nodes),
                                                           config=config, rank=rank, sz=sz)
        bwd = (master + opt + recv + total, copy, grads, acts + recv, tr)  # receive buffers with activations
    else:
        buckets = p_tr * w if ddp else 0.0  # DDP's reducer buckets (gradient_as_bucket_view=False)
        total, copy, grads, acts, tr, phase = _flat_peak(nodes, kept, trans, _units(graph, nodes), config=config,
                                                         sz=sz, ddp_buckets=buckets)
        bwd = (master + opt + total, copy, grads, acts, tr)
    if dist or piped:  # FSDP2-managed parameters are DTensors: torch steps them with the per-tensor loop
        temps = 0.0
    largest = max((n.largest_param for n in nodes if n.trainable_params), default=0)
    g_final = p_tr * w / sz.d
    step_trans = temps * p_tr * w / sz.d + 2 * largest * w / sz.d + (p_tr * w if ddp else 0.0)
    if master + opt + g_final + step_trans > bwd[0]:
        return MemoryBreakdown(
            params=int(master), grads=int(g_final), optimizer=int(opt), activations=0,
            transient=int(step_trans), stage=rank, phase="optimizer",
        )
    _, copy, grads, acts, tr = bwd
    return MemoryBreakdown(
        params=int(master + copy), grads=int(grads), optimizer=int(opt), activations=int(acts),
        transient=int(tr), stage=rank, phase=phase,
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
