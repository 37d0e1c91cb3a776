# Partition: split the block list into pipeline stages, balanced by time (or by memory when time-balance does not fit).
from __future__ import annotations

from moreh_ap.config import balanced_boundaries
from moreh_ap.graph.model_graph import ModelGraph


def _fits(weights: list[float], k: int, limit: float) -> list[int] | None:
    """Greedy split into exactly ``k`` non-empty stages with every stage sum <= limit, or None."""
    n = len(weights)
    bounds: list[int] = []
    acc = 0.0
    for i, w in enumerate(weights):
        stages_left = k - len(bounds) - 1  # stages still to open after the current one
        if i > 0 and stages_left > 0 and (acc + w > limit or n - i == stages_left):
            bounds.append(i)
            acc = 0.0
        acc += w
        if acc > limit * (1 + 1e-12):
            return None
    return bounds if len(bounds) == k - 1 else None


def linear_partition(weights: list[float], k: int, *, iters: int = 60) -> tuple[int, ...]:
    """Boundaries splitting ``weights`` into ``k`` contiguous non-empty parts minimising the largest sum.

    Binary search on the bottleneck with a greedy packer (O(n log) per call).
    """
    n = len(weights)
    if k < 1 or k > n:
        raise ValueError(f"cannot split {n} blocks into {k} non-empty stages")
    if k == 1:
        return ()
    lo, hi = max(weights), sum(weights)
    best = _fits(weights, k, hi)
    for _ in range(iters):
        if hi - lo <= 1e-9 * max(hi, 1e-30):
            break
        mid = (lo + hi) / 2
        cand = _fits(weights, k, mid)
        if cand is not None:
            best, hi = cand, mid
        else:
            lo = mid
    bounds = tuple(best if best is not None else _fits(weights, k, float("inf")))
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
