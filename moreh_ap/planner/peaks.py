# Peak arithmetic: the largest moment of one rank's step, without a pipeline and inside one.
"""Bytes alive at each moment of a rank's backward (and at the end of its forward), and the largest.

:func:`flat_peak` walks the backward node by node without a pipeline; :func:`piped_peak` checks
the moments of a pipeline rank's backwards as its schedule orders them
(:func:`moreh_ap.planner.schedule_sim.backward_moments`). Both return a :class:`Peak`; the memory
model (:mod:`moreh_ap.planner.memory`) adds the master parameters, the optimizer state and the
receive buffers.
"""
from __future__ import annotations

from dataclasses import dataclass

from moreh_ap.config import ParallelConfig
from moreh_ap.graph.model_graph import NodeInfo
from moreh_ap.planner.schedule_sim import backward_moments
from moreh_ap.planner.units import Units

__all__ = ["Peak", "Sizes", "flat_peak", "piped_peak"]


@dataclass(kw_only=True, slots=True, frozen=True)
class Peak:
    """The bytes alive at one moment of the step, by category (beyond the master parameters and optimizer state)."""

    total: float = 0.0
    """Sum of the categories, bytes (as the search added them)."""
    copy: float = 0.0
    """Compute copy of the parameters (gathered / cast) beyond the master."""
    grads: float = 0.0
    """Gradients alive."""
    acts: float = 0.0
    """Activations saved for backward."""
    transient: float = 0.0
    """Short-lived buffers (working set, reduce-scatter buffers, logits' gradient)."""
    phase: str = "backward"
    """"forward" (the loss being computed) or "backward"."""


def _peak(parts: tuple[float, float, float, float], phase: str = "backward") -> Peak:
    copy, grads, acts, transient = parts
    return Peak(total=sum(parts), copy=copy, grads=grads, acts=acts, transient=transient, phase=phase)


@dataclass(kw_only=True, slots=True)
class Sizes:
    """Bytes per element of one configuration: master ``w``, compute copy ``c``, reduction ``r``; shards ``d``."""

    w: int
    """Bytes per master parameter element (the model's dtype)."""
    c: int
    """Bytes per compute-copy element (2 under mixed precision, else ``w``)."""
    r: int
    """Bytes per element of gradient reductions (4 under mixed precision, else ``w``)."""
    d: int
    """dp shards of master/grads/optimizer state (1 without distribute_param)."""
    dp: int
    """Data-parallel degree."""


def flat_peak(nodes: list[NodeInfo], kept: list[float], trans: list[float], u: Units, *, config: ParallelConfig,
              sz: Sizes, ddp_buckets: float, casts: list[tuple[float, float]] | None = None) -> Peak:
    """Peak of a step without a pipeline (beyond the master parameters and optimizer state).

    Walks the backward node by node (head first). At each node two moments are checked: *during* its
    backward (its saved tensors and working set alive, the gradients of the nodes after it done) and, for
    an FSDP unit, *at its post-backward* (its unsharded gradients copied into the reduce-scatter input).
    FSDP2 facts used (torch 2.13), with the runtime's units (one per block, one per large untied module
    outside the blocks, the root unit for the rest): a unit's reduce-scatter input is kept until the
    next unit's post-backward; ZeRO-2 reshards a unit after its backward, ZeRO-3 keeps the current and
    the prefetched unit gathered; the root unit's gradients stay unsharded until the end of backward;
    the loss is computed outside the model, so a ZeRO-3 head is gathered only after the loss backward.
    Without FSDP, autocast's bf16 weight copies live as long as the saved tensors that hold them.
    ``casts``: given when the activations come from an autocast trace, where those copies are saved
    tensors of the nodes whose matmuls use them: per node, the copies among its ``kept`` and among its
    ``trans`` bytes. They are then not added again, only reported as the compute copy; autocast's cast
    cache, which keeps every copy until the autocast region ends (after the loss), adds the copies of
    recomputed blocks (their saved tensors dropped) at the end of the forward.
    """
    fsdp, zero3 = config.distribute_param, config.distribute_low_prec_param
    w, c, r, d = sz.w, sz.c, sz.r, sz.d
    traced = casts is not None
    n, p, t = len(nodes), u.p, u.t
    prefix = [0.0] * (n + 1)  # activations kept by nodes < i
    casts = casts or [(0.0, 0.0)] * n
    cast_prefix = [0.0] * (n + 1)  # of which autocast's weight copies (traced ones)
    p_upto = [0] * (n + 1)  # unit parameters of nodes < i, and of the non-block ones among them
    p_root_upto = [0] * (n + 1)
    for i in range(n):
        prefix[i + 1] = prefix[i] + kept[i]
        cast_prefix[i + 1] = cast_prefix[i] + casts[i][0]
        p_upto[i + 1] = p_upto[i] + p[i]
        p_root_upto[i + 1] = p_root_upto[i] + (p[i] if nodes[i].kind != "block" else 0)
    post = n - 1 if nodes and nodes[-1].kind == "post" else None
    best = Peak()
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
            copy = c * (alive + u.root_p) if config.mixed_precision and not traced else 0.0
            copy_end, held_rs = copy, 0.0
        # traced copies: moved from the activations / working set to the copy (the same bytes)
        copy += cast_prefix[i + 1] + casts[i][1]
        acts_i, work_i = prefix[i + 1] - cast_prefix[i + 1], trans[i] - casts[i][1]
        moments = [(copy, done_grads, acts_i, work_i + held_rs + ddp_buckets)]
        if fsdp and zero3 and i == post:  # the loss backward runs before the head is gathered again
            moments = [(0.0, done_grads, prefix[i + 1], trans[i] + held_rs),
                       (copy + c * u.root_p, done_grads, prefix[i + 1], trans[i] / 2 + held_rs)]
        if fsdp and i == post:
            done_grads += c * u.root_t  # the root unit's unsharded gradients, reduced at the end
        if fsdp and t[i]:  # post-backward: unsharded grads, reduce-scatter input and output coexist
            moments.append((copy_end, done_grads, prefix[i], rs_bytes(t[i], sz)))
        for m in moments:
            if sum(m) > best.total:
                best = _peak(m)
        if not accumulate:
            done_grads += t[i] * w / d if fsdp else (t[i] + (u.root_t if i == post else 0)) * w
    # the end of the forward, the loss being computed: every node's saved tensors, the logits (bf16 and
    # fp32 under mixed precision), the forward's gathered / autocast-cast weights
    if n:
        logits = trans[-1] / 2 if nodes[-1].kind == "post" else 0.0
        logits *= 1.5 if config.mixed_precision else 1.0
        if fsdp:
            fwd_copy = c * (sum(p) + u.root_p) if not zero3 else 0.0
        elif traced:  # the cast cache's copies of recomputed blocks (the others are saved tensors)
            fwd_copy = cast_prefix[n] + (sum(ct for _, ct in casts) if config.recomputation else 0.0)
        else:
            fwd_copy = c * (sum(p) + u.root_p) if config.mixed_precision else 0.0
        base = (sum(t) + u.root_t) * w / d if accumulate else 0.0
        fwd = (fwd_copy, base, prefix[n] - cast_prefix[n], logits + ddp_buckets)
        if sum(fwd) > best.total:
            best = _peak(fwd, "forward")
    if fsdp and u.root_t:  # the root unit's post-backward, after the embedding's backward
        done = (sum(t) + (u.root_t if accumulate else 0)) * w / d
        # a tied parameter's second gradient (the embedding's) is summed into the first one
        rs = rs_bytes(u.root_t, sz) + c * u.root_t
        copy = c * u.root_p
        if copy + done + rs > best.total:
            best = Peak(total=copy + done + rs, copy=copy, grads=done, acts=0.0, transient=rs)
    return best


def rs_bytes(numel: int, sz: Sizes) -> float:
    """Bytes of one FSDP2 reduce-scatter: unsharded grads + reduce-dtype input + sharded output."""
    return numel * (sz.c + sz.r + sz.r / sz.d)


def piped_peak(nodes: list[NodeInfo], kept: list[float], trans: list[float], chunks: list[tuple[int, int]], u: Units,
               *, config: ParallelConfig, rank: int, sz: Sizes) -> Peak:
    """Peak of a pipeline rank (beyond the master parameters, optimizer state and receive buffers).

    ``chunks``: ``[start, end)`` of each local stage's nodes in ``nodes``.

    torch 2.13's ``PipelineStage`` runs every backward without gradient sync and without resharding
    (``set_requires_gradient_sync(False)``, ``set_reshard_after_backward(False)``) and reduces all
    gradients once after the last backward (``perform_reduce_grad``). The runtime wraps every stage
    with FSDP2 or FSDP-based replicate, so a compute copy of the parameters exists even in fp32. The
    rank's forwards and backwards are replayed in the schedule registry's order; moments checked:

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
    best = Peak()
    inner: dict[tuple[int, bool, bool], Peak] = {}  # a stage's own worst node per kind of backward

    def stage_worst(local: int, first: bool, progressive: bool) -> Peak:
        """Copy, this stage's grads, this micro-batch's activations, transient at the stage's worst node."""
        a, b = chunks[local]
        prefix = acts[local]
        after = suffix = 0.0  # gradients / unit parameters of the nodes after i in this stage
        worst = Peak(total=-1.0)
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
            if total > worst.total:
                worst = Peak(total=total, copy=copy, grads=g, acts=prefix, transient=tr)
            prefix -= kept[i]
            after += r * t[i]
            suffix += p[i]
        return worst

    for mom in backward_moments(config.schedule, config.num_micro_batches, config.num_stages,
                                config.stages_per_rank, rank):
        local, counts, done, fwd_between = mom.local, mom.in_flight, mom.done, mom.fwd_between
        if chunks[local][0] == chunks[local][1]:
            continue
        others = sum(k * a for k, a in zip(counts, acts))
        g_done = sum(grads[l] for l in done if l != local)
        first = local not in done
        key = (local, first, zero3 and (first or fwd_between))
        if key not in inner:
            inner[key] = stage_worst(*key)
        sw = inner[key]
        copy, g, prefix, tr = sw.copy, sw.grads, sw.acts, sw.transient
        total = sw.total + others + g_done
        if total > best.total:
            best = Peak(total=total, copy=copy, grads=g + g_done, acts=others + prefix, transient=tr)
    # the reduction after the last backward (``perform_reduce_grad``), at the largest unit: it is resharded
    # first; every unit's accumulated gradients are still alive; its reduce-scatter input and output, and
    # when the reduce-scatter spans several ranks one more input-sized buffer (measured with gloo)
    k = max(range(n), key=lambda i: t[i], default=None)
    if k is not None and t[k]:
        rs = t[k] * (sz.r + sz.r / sz.d + (sz.r if sz.d > 1 else 0))
        copy = full_copy - c * p[k]
        total = copy + sum(grads) + rs
        if total > best.total:
            best = Peak(total=total, copy=copy, grads=sum(grads), acts=0.0, transient=rs)
    return best


