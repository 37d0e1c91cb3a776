# GEMMs at a traced model's own (m, k, n): the calibration items, deduplicated, capped, big ones scaled down.
"""Items for :func:`moreh_ap.planner.shape_calibration.calibrate_model`: the traced nodes' forward GEMMs.

Per dtype ("bf16": the "mixed" census, as bf16 autocast runs them; "fp32": the "full" one) every 2-D GEMM of
every node at micro-batch 1 and at the traced batch, deduplicated, the ``MAX_GEMMS`` with the most FLOPs
kept, timed cheapest first. A shape whose estimated time is over the per-item cap is timed scaled down (every
side by the same factor, so the same aspect) and its time taken at that rate (an under-estimate of the big
shape's rate, which only grows with size). Results go to ``CalibrationDB.model_gemm``.
"""
from __future__ import annotations

from moreh_ap.planner.block_bench import median_seconds
from moreh_ap.planner.calib_items import REPEATS, Item

__all__ = ["MAX_GEMMS", "gemm_items", "gemm_shapes"]

MAX_GEMMS = 12
"""GEMM shapes timed per dtype at most (the ones with the most FLOPs)."""
_PREC = {"bf16": "mixed", "fp32": "full"}


def gemm_shapes(graph, dtype: str) -> list[tuple[int, int, int]]:
    """The ``MAX_GEMMS`` distinct ``(m, k, n)`` with the most FLOPs among ``graph``'s forward GEMMs at micro-batch
    1 and at the traced batch."""
    weight: dict[tuple[int, int, int], float] = {}
    batch = max(1, graph.batch_size)
    for node in graph.nodes:
        for m, k, n, b, count in node.gemms.get(_PREC[dtype], ()):
            if b != 1:  # batched products (attention scores) are looked up at their nearest 2-D shape
                continue
            for rows in {max(1, round(m / batch)), int(m)}:
                shape = (int(rows), int(k), int(n))
                weight[shape] = weight.get(shape, 0.0) + 2.0 * rows * k * n * count
    return sorted(weight, key=lambda s: -weight[s])[:MAX_GEMMS]


def _flops(shape) -> float:
    m, k, n = shape
    return 2.0 * m * k * n


def _gemm_fn(shape, *, device, dtype: str):
    import torch

    m, k, n = shape
    tdtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    a = torch.randn(m, k, device=device, dtype=tdtype)
    b = torch.randn(k, n, device=device, dtype=tdtype)
    return lambda: a @ b


def gemm_items(db, graph, *, device, dtypes, cap_s: float) -> list[Item]:
    """The GEMM items of ``graph`` not in ``db.model_gemm`` yet, cheapest first (over ``cap_s``: scaled down)."""
    items: list[tuple[float, Item]] = []
    for dtype in dtypes:
        if not db.matmul.get(dtype):
            continue
        rate = min(p[1] for p in db.matmul[dtype])  # the slowest measured square rate: a pessimistic estimate
        have = {tuple(int(x) for x in r[:3]) for r in db.model_gemm.get(dtype, [])}
        for shape in gemm_shapes(graph, dtype):
            if shape in have:
                continue
            est = _flops(shape) / rate
            timed = shape
            if est > cap_s:  # too big for the budget: the same aspect, scaled down
                f = (cap_s / est) ** (1.0 / 3.0)
                timed = tuple(max(8, int(d * f)) for d in shape)

            def run(shape=shape, timed=timed, dtype=dtype) -> float:
                sec = median_seconds(_gemm_fn(timed, device=device, dtype=dtype), device, repeats=REPEATS,
                                     max_s=2 * cap_s)
                return sec * _flops(shape) / _flops(timed)

            def store(sec: float, shape=shape, dtype=dtype) -> None:
                db.model_gemm.setdefault(dtype, []).append([float(x) for x in shape] + [sec])

            items.append((est, Item(key=f"gemm:{dtype}:{shape}", estimate=lambda e=min(est, cap_s): e, run=run,
                                    store=store)))
    return [it for _, it in sorted(items, key=lambda x: x[0])]
