# Time formulas the cost model uses: matmul rate / GEMM seconds at a shape, block efficiency and floor, memory bandwidth, collective seconds.
"""Seconds and rates from a Cluster and its calibration DB (measured numbers when there are, else analytic).

Collectives without a measured table (no process group was up when the DB was
measured; the planner never spawns processes) use the analytic model on the
Cluster's bandwidths::

    all_reduce      min(ring: 2 (n-1)/n * S / bw + 2 (n-1) * latency,
                        recursive doubling: ceil(log2 n) * (S / bw + latency))
    all_gather      (n-1)/n * S / bw + min(n-1, ceil(log2 n)) * latency   (S = gathered bytes)
    reduce_scatter  (n-1)/n * S / bw + min(n-1, ceil(log2 n)) * latency   (S = input bytes)
    send_recv       S / bw + latency

(the classic alpha-beta costs of Thakur, Rabenseifner & Gropp 2005: ring for large
messages, recursive doubling / halving -- what NCCL's tree / LL and gloo use for
small ones -- for small; a pure ring model charges 2 (n-1) latencies to a
small all-reduce and makes pipelines look cheaper than data parallelism on
small models)

with ``bw`` the intra-node bandwidth when the group lies within one node,
else the inter-node one, times ``Cluster.comm_efficiency``.
"""
from __future__ import annotations

import bisect
import math

from moreh_ap.planner.calibration_db import COLLECTIVES


def _interp(points: list[list[float]], x: float) -> float:
    """Piecewise-linear time(bytes) through the points, extrapolated with the last slope.

    The points are first made non-decreasing from the right (a time larger than one measured for
    more bytes is noise from a busy machine: moving more bytes is never faster).
    """
    pts = [list(p) for p in sorted(points)]
    for i in range(len(pts) - 2, -1, -1):
        pts[i][1] = min(pts[i][1], pts[i + 1][1])
    xs = [p[0] for p in pts]
    if len(pts) == 1:
        return pts[0][1] * x / pts[0][0]
    i = min(max(bisect.bisect_left(xs, x), 1), len(pts) - 1)
    (x0, y0), (x1, y1) = pts[i - 1], pts[i]
    slope = (y1 - y0) / (x1 - x0) if x1 != x0 else 0.0
    if x < x0:
        return max(y0 * x / x0, 0.0) if i == 1 else y0
    return max(y0 + slope * (x - x0), 0.0)


def _ring_factor(kind: str, n: int) -> float:
    if kind == "send_recv":
        return 1.0
    f = (n - 1) / n
    return 2 * f if kind == "all_reduce" else f


def collective_time(cluster, kind: str, nbytes: float, *, group: int, inter_node: bool) -> float:
    """Seconds for one collective of ``nbytes`` over ``group`` ranks.

    Args:
        cluster: the :class:`Cluster` (its calibration DB is used when it has a collective table).
        kind: "all_reduce", "all_gather", "reduce_scatter" or "send_recv".
        nbytes: the full buffer (all-reduce input, gathered output, reduce-scatter input, bytes sent).
        group: ranks in the group (1 = no communication, 0 s).
        inter_node: the group spans nodes (the slower link).
    """
    if kind not in COLLECTIVES:
        raise ValueError(f"collective_time(kind={kind!r}) is not valid: expected one of {COLLECTIVES}")
    if nbytes <= 0 or (group <= 1 and kind != "send_recv"):
        return 0.0
    db = cluster.calibration
    if db is not None and db.collectives and kind in db.collectives:
        measured = _interp(db.collectives[kind], nbytes)
        w = max(2, db.collective_world)
        if kind == "send_recv":
            return measured
        return measured * _ring_factor(kind, max(group, 2)) / _ring_factor(kind, w)
    bw = (cluster.inter_node_bandwidth if inter_node else cluster.intra_node_bandwidth) * cluster.comm_efficiency
    lat = cluster.link_latency
    if kind == "send_recv":
        return nbytes / bw + lat
    n = max(group, 2)
    steps = math.ceil(math.log2(n))
    ring = _ring_factor(kind, n) * nbytes / bw + (2 if kind == "all_reduce" else 1) * (n - 1) * lat
    if kind == "all_reduce":  # recursive doubling: log2(n) exchanges of the whole buffer
        return min(ring, steps * (nbytes / bw + lat))
    return min(ring, _ring_factor(kind, n) * nbytes / bw + steps * lat)  # recursive doubling / halving (Bruck)


def matmul_flops(cluster, dtype: str, size: float | None = None) -> float:
    """Sustained matmul FLOP/s: calibrated (at square side ``size`` when given) when the DB has the
    dtype, else peak x compute_efficiency."""
    db = cluster.calibration
    if db is not None:
        measured = db.matmul_flops(dtype, size)
        if measured:
            return measured
    return cluster.flops(dtype) * cluster.compute_efficiency


def block_efficiency(cluster, dtype: str) -> float:
    """The calibrated share of the matmul rate a transformer block sustains (1.0 without a DB)."""
    db = cluster.calibration
    if db is None:
        return 1.0
    return float(db.block_efficiency.get(dtype, 1.0))


def block_floor(cluster, dtype: str) -> float:
    """The calibrated fixed seconds of one block's forward + backward per micro-batch (0 without a DB)."""
    db = cluster.calibration
    if db is None:
        return 0.0
    return float(db.block_floor.get(dtype, 0.0))


def gemm_size(flops: float, params: int, largest_param: int) -> float | None:
    """Square-matmul side with the FLOPs of a node's typical GEMM: ``(rows * largest_param) ** (1/3)``.

    ``rows = flops / (2 * params)`` is how many rows each weight multiplies in a forward (exact for
    linear layers: ``2 * rows * K * N`` FLOPs per ``K x N`` weight). None for nodes without parameters
    or FLOPs (the rate at the largest measured side is used then).
    """
    if params <= 0 or largest_param <= 0 or flops <= 0:
        return None
    return (flops / (2.0 * params) * largest_param) ** (1.0 / 3.0)




def gemm_seconds(cluster, dtype: str, m: float, k: float, n: float) -> float:
    """Seconds of one ``(m x k) @ (k x n)`` product.

    With a GEMM table in the DB (a hardware profile's, else the one timed at the model's own shapes): the FLOPs at the rate of the measured shape nearest in
    log space (dimensions compared sorted, so the backward's transposed products find the forward's shape;
    an exact match is that measurement; shapes beyond the largest take the largest's rate). Without one:
    the square-matmul rate at the equivalent side ``(m k n) ** (1/3)``.
    """
    flops = 2.0 * m * k * n
    if flops <= 0:
        return 0.0
    db = cluster.calibration
    rows = ((db.gemm.get(dtype) or db.model_gemm.get(dtype)) if db is not None else None) or []
    if not rows:
        return flops / matmul_flops(cluster, dtype, (m * k * n) ** (1.0 / 3.0))
    want = sorted(math.log(max(x, 1.0)) for x in (m, k, n))
    best = min(rows, key=lambda r: sum((a - b) ** 2 for a, b in zip(sorted(math.log(x) for x in r[:3]), want)))
    return flops * best[3] / (2.0 * best[0] * best[1] * best[2])


def memory_bandwidth(cluster) -> float:
    """Device memory bytes/s: measured (the DB's) when known, else the Cluster's."""
    db = cluster.calibration
    if db is not None and db.mem_bandwidth:
        return float(db.mem_bandwidth)
    return float(cluster.mem_bandwidth)


FLASH_BACKWARD_FLOPS = 2.5
"""A flash attention backward's FLOPs over its forward's: five products (the scores again, dV, dP, dQ, dK) to the
forward's two (Dao 2023, FlashAttention-2, section 4)."""


def attention_seconds(cluster, dtype: str, calls, *, scale: float) -> tuple[float, float] | None:
    """Forward and backward seconds of a node's attention calls (``NodeInfo.attention``) at micro-batch ``scale`` x
    the traced batch, at the cluster's flash attention rates: the kernel's FLOPs (a causal call half the square,
    :func:`moreh_ap.graph.op_census.attention_flops`) over the forward rate, :data:`FLASH_BACKWARD_FLOPS` x them
    over the backward rate. None when the cluster has no rate for ``dtype`` (or there are no calls)."""
    from moreh_ap.graph.op_census import attention_flops

    rates = cluster.attention_flops.get(dtype)
    if not rates or not calls:
        return None
    flops = attention_flops(calls, as_run=True) * scale
    return flops / rates[0], FLASH_BACKWARD_FLOPS * flops / rates[1]


def head_and_loss_seconds(cluster, *, tokens: float, hidden: int, vocab: int) -> float | None:
    """Measured lm_head + float32 cross-entropy forward + backward seconds for ``tokens`` rows, scaled
    linearly from the DB's measurement at that (hidden, vocab); None without one."""
    db = cluster.calibration
    for b, s, h, v, sec in (db.head_and_loss if db is not None else []):
        if int(h) == hidden and int(v) == vocab:
            return sec * tokens / (b * s)
    return None


def node_time_key(node, *, dtype: str, recompute: bool) -> str:
    """The key of a node's measured time in ``CalibrationDB.node_times``: its kind, parameters, traced forward
    FLOPs and GEMM shapes (the block's signature and shape at the traced batch), dtype and recomputation."""
    import hashlib
    import json

    prec = "mixed" if dtype == "bf16" else "full"
    shape = json.dumps([node.kind, node.num_params, node.largest_param, node.fwd_flops,
                        [list(g) for g in node.gemms.get(prec, ())]])
    return f"{node.kind}|{hashlib.sha1(shape.encode()).hexdigest()[:16]}|{dtype}|rec{int(bool(recompute))}"


def measured_node_seconds(cluster, node, *, dtype: str, scale: float, recompute: bool) -> float | None:
    """Forward + backward (+ recomputed forward) seconds of ``node`` at micro-batch ``scale`` x the traced batch,
    from the node's own measurement in the DB (piecewise linear in the micro-batch between the measured ones,
    the last slope beyond them); None when it was not measured. A recomputed node measured without
    recomputation only adds one measured forward's share (a third of forward + backward)."""
    db = cluster.calibration
    if db is None or not db.node_times:
        return None
    recompute = recompute and node.kind == "block"  # only blocks are recomputed
    pts = db.node_times.get(node_time_key(node, dtype=dtype, recompute=recompute))
    if pts:
        return _measured_at(db, node, pts, dtype=dtype, scale=scale, passes=4 if recompute else 3)
    if recompute:
        plain = db.node_times.get(node_time_key(node, dtype=dtype, recompute=False))
        if plain:
            return _measured_at(db, node, plain, dtype=dtype, scale=scale, passes=3) * 4.0 / 3.0
    return None


def _measured_at(db, node, pts: list[list[float]], *, dtype: str, scale: float, passes: int) -> float:
    """The measured points at ``scale``: interpolated between them; beyond the largest, its time x the formula's
    ratio between the two micro-batches (:func:`formula_seconds`: the base DB's rate changes with the GEMM size,
    which a linear extrapolation of one small micro-batch would miss)."""
    last = max(pts)
    if scale <= last[0] * (1 + 1e-9):
        return _interp(pts, scale)
    here = formula_seconds(db, node, dtype=dtype, scale=scale, passes=passes)
    there = formula_seconds(db, node, dtype=dtype, scale=last[0], passes=passes)
    return last[1] * here / there if there > 0 else _interp(pts, scale)


def formula_seconds(db, node, *, dtype: str, scale: float, passes: int) -> float:
    """The base DB's seconds for ``passes`` forward-equivalents of ``node`` at micro-batch ``scale`` x the traced
    batch: FLOPs over the square-matmul rate at the node's GEMM size, a block at the block efficiency plus its
    floor (the cost model's formula without a measurement)."""
    flops = node.fwd_flops * scale
    if flops <= 0:
        return 0.0
    rate = db.matmul_flops(dtype, gemm_size(flops, node.num_params, node.largest_param)) or 1e9
    if node.kind != "block":
        return passes * flops / rate
    eff = db.block_efficiency.get(dtype, 1.0)
    return db.block_floor.get(dtype, 0.0) * passes / 3 + passes * flops / (rate * eff)


def node_matmul_rate(cluster, node, *, dtype: str, scale: float, size: float | None) -> float:
    """The matmul FLOP/s of ``node``'s forward GEMMs at micro-batch ``scale``: from the GEMMs timed at the model's
    own shapes when the DB has them (``model_gemm``), else the square-matmul rate at side ``size``."""
    db = cluster.calibration
    prec = "mixed" if dtype == "bf16" else "full"
    gemms = node.gemms.get(prec, ())
    if db is None or not db.model_gemm.get(dtype) or not gemms:
        return matmul_flops(cluster, dtype, size)
    flops = seconds = 0.0
    for m, k, n, b, count in gemms:
        rows, batch = (max(1.0, m * scale), b) if b == 1 else (m, max(1.0, b * scale))
        flops += 2.0 * rows * k * n * batch * count
        seconds += count * batch * gemm_seconds(cluster, dtype, rows, k, n)
    return flops / seconds if seconds > 0 else matmul_flops(cluster, dtype, size)
