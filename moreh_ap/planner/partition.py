# Partition: split the block list into pipeline stages, balanced by time (or by memory when time-balance does not fit).
from __future__ import annotations

from bisect import bisect_right
from functools import lru_cache

from moreh_ap.config import balanced_boundaries
from moreh_ap.graph.model_graph import ModelGraph


def _fits(weights: list[float], k: int, limit: float) -> list[int] | None:
    """Greedy split into exactly ``k`` non-empty stages with every stage sum <= limit, or None."""
    n, tol = len(weights), limit * (1 + 1e-12)
    bounds: list[int] = []
    acc, left = 0.0, k - 1  # left: stages still to open after the current one
    for i, w in enumerate(weights):
        if i > 0 and left > 0 and (acc + w > limit or n - i == left):
            bounds.append(i)
            acc, left = 0.0, left - 1
        acc += w
        if acc > tol:
            return None
    return bounds if left == 0 else None


@lru_cache(maxsize=64)
def _runs(weights: tuple[float, ...]) -> tuple[tuple[float, ...], ...]:
    """Per start ``s``: the running sums ``_fits`` accumulates from ``s`` on (``0.0, w[s], w[s] + w[s+1], ...``,
    added in the same order, so the same floats)."""
    out = []
    for s in range(len(weights)):
        acc, run = 0.0, [0.0]
        for w in weights[s:]:
            acc += w
            run.append(acc)
        out.append(tuple(run))
    return tuple(out)


def _fits_fast(runs: tuple[tuple[float, ...], ...], k: int, limit: float) -> bool:
    """``_fits(weights, k, limit) is not None`` for non-negative weights and ``limit >= 0``, a stage
    at a time: a stage ends at its first block whose running sum is over ``limit`` (found by bisection: the
    sums do not decrease) or where the blocks left are as many as the stages still to open."""
    n, tol = len(runs), limit * (1 + 1e-12)
    s, left = 0, k - 1  # the current stage's first block; stages still to open after it
    while True:
        run = runs[s]
        if run[1] > tol:
            return False
        if left == 0:
            return run[n - s] <= tol
        s, left = min(n - left, s + max(bisect_right(run, limit), 2) - 1), left - 1


def linear_partition(weights: list[float], k: int, *, iters: int = 60) -> tuple[int, ...]:
    """Boundaries splitting ``weights`` into ``k`` contiguous non-empty parts minimising the largest sum.

    Binary search on the bottleneck with a greedy packer; for stages of 4+ blocks on average the packer's
    yes/no is taken a stage at a time by bisecting running sums (:func:`_fits_fast`, the same answer as
    :func:`_fits`), and the boundaries of the smallest bottleneck that fits are packed once at the end.
    """
    n = len(weights)
    if k < 1 or k > n:
        raise ValueError(f"cannot split {n} blocks into {k} non-empty stages")
    if k == 1:
        return ()
    lo, hi = max(weights), sum(weights)
    if min(weights) < 0 or 4 * k > n:  # running sums that may decrease, or short stages: block by block
        fits = lambda limit: _fits(weights, k, limit) is not None  # noqa: E731
    else:
        runs = _runs(tuple(weights))
        fits = lambda limit: _fits_fast(runs, k, limit)  # noqa: E731
    best = hi if fits(hi) else None  # the smallest limit that fitted
    for _ in range(iters):
        if hi - lo <= 1e-9 * max(hi, 1e-30):
            break
        mid = (lo + hi) / 2
        if fits(mid):
            best, hi = mid, mid
        else:
            lo = mid
    bounds = tuple(_fits(weights, k, best if best is not None else float("inf")))
    even = balanced_boundaries(n, k)  # the same bottleneck with an even split: prefer it
    if _bottleneck(weights, even) <= _bottleneck(weights, bounds) * (1 + 1e-9):
        return even
    return bounds


def _bottleneck(weights: list[float], bounds: tuple[int, ...]) -> float:
    edges = [0, *bounds, len(weights)]
    return max(sum(weights[a:b]) for a, b in zip(edges, edges[1:]))


def block_weights(graph: ModelGraph, *, kind: str, recompute: bool = False, precision: str = "mixed") -> list[float]:
    """Per-block weights with the embedding folded into block 0 and the head into the last block.

    kind "time": forward+backward FLOPs (x4/3 for recomputed blocks);
    kind "memory": parameter bytes of training state (~18 bytes/element) plus saved activations.
    """
    blocks = graph.blocks
    pre, post = graph.pre, graph.post

    def w(node, is_block: bool) -> float:
        if node is None:
            return 0.0
        if kind == "time":
            return node.fwd_flops * (4 if (recompute and is_block) else 3)
        act = node.saved_bytes.get(precision, 0)
        if recompute and is_block:
            act = node.out_bytes.get(precision, 0)
        return node.num_params * 18.0 + act

    weights = [w(b, True) for b in blocks]
    if weights:
        weights[0] += w(pre, False)
        weights[-1] += w(post, False)
    return weights


def partition(graph: ModelGraph, total_stages: int, *, kind: str = "time", recompute: bool = False,
              precision: str = "mixed") -> tuple[int, ...]:
    """``ParallelConfig.boundaries`` for ``total_stages`` (virtual) stages, balanced by ``kind``."""
    return linear_partition(block_weights(graph, kind=kind, recompute=recompute, precision=precision), total_stages)
