# Items a live model's calibration times: its distinct blocks and head + loss per micro-batch, its optimizer step.
"""Items for :func:`moreh_ap.planner.shape_calibration.calibrate_model` (what to time, how long it should take,
where the result goes in the DB), built from the traced graph and the live model.

Micro-batches 1, 2, 4, ... up to the traced batch (and the traced batch itself) are timed per distinct block
(:func:`~moreh_ap.planner.time_model.node_time_key`), dtype and recomputation setting, and for the head +
loss per dtype; the items are ordered by micro-batch so that a budget cut leaves the largest out (the cost
model extrapolates them from the smaller ones). The block's inputs are captured once, at the largest
micro-batch, and cut for the smaller ones.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from moreh_ap.planner.block_bench import (
    block_fn,
    capture_block_inputs,
    head_fn,
    median_seconds,
    optimizer_fn,
    slice_batch,
)
from moreh_ap.planner.time_model import formula_seconds, node_time_key

__all__ = ["Item", "REPEATS", "node_items", "micro_batches", "optimizer_key"]

REPEATS = 3
"""Timed calls per item (after one warm-up); the median is kept."""
OPTIMIZER_ELEMENTS = {"cpu": 8_000_000, "cuda": 256_000_000}
"""At most this many parameter elements in the timed optimizer step (every k-th parameter shape beyond)."""


@dataclass(kw_only=True, slots=True)
class Item:
    """One thing to time."""

    key: str
    """Unique name (the same on every rank)."""
    estimate: Callable[[], float]
    """Seconds one call is expected to take (from the formulas, or from a smaller measured one)."""
    run: Callable[[], float | None]
    """Times it; returns the seconds to store, or None when it cannot be timed."""
    store: Callable[[float], None]
    """Writes the (agreed) seconds into the DB."""
    essential: bool = False
    """Timed whenever the budget's rest allows, even over the per-item share (a block's or the head's smallest
    micro-batch: what the larger ones are extrapolated from)."""


def micro_batches(batch: int) -> list[int]:
    """1, 2, 4, ... below ``batch``, and ``batch``."""
    out, b = [], 1
    while b < batch:
        out.append(b)
        b *= 2
    return out + [batch]


def optimizer_key(optimizer: Any, device_type: str) -> str:
    """The name the cost model looks the measured step up by (Adam and AdamW share "adamw")."""
    from moreh_ap.planner.units import optimizer_profile

    name = optimizer_profile(optimizer, device_type=device_type)[0]
    return "adamw" if name in ("adamw", "adam") else name


class _Inputs:
    """The first block's inputs, captured once at the largest micro-batch, cut per micro-batch."""

    def __init__(self, model, block, args, kwargs, *, batch: int, samples: int) -> None:
        self.model, self.block, self.batch, self.samples = model, block, batch, samples
        self.args = slice_batch(args if isinstance(args, tuple) else (args,), batch=batch, samples=samples)
        self.kwargs = slice_batch(kwargs, batch=batch, samples=samples)
        self.captured: tuple | None = None

    def at(self, samples: int) -> tuple[tuple, dict]:
        if self.captured is None:
            self.captured = capture_block_inputs(self.model, self.block, self.args, self.kwargs)
        a, k = self.captured
        return slice_batch(a, batch=self.samples, samples=samples), slice_batch(k, batch=self.samples, samples=samples)


def _point_store(db, key: str, scale: float) -> Callable[[float], None]:
    def store(sec: float) -> None:
        pts = [p for p in db.node_times.get(key, []) if abs(p[0] - scale) > 1e-12]
        db.node_times[key] = sorted(pts + [[scale, sec]])

    return store


def node_items(db, graph, model, args, kwargs: dict, *, device, dtypes, recomputes, optimizer,
               item_s: float = float("inf")) -> list[Item]:
    """The live model's items not in ``db`` yet (blocks, head + loss, optimizer step), ordered by micro-batch;
    ``item_s``: seconds one item may take (fewer repeats of a long call)."""
    from moreh_ap.models import find_adapter

    adapter = find_adapter(model)
    blocks = [b for _, b in adapter.blocks()]
    if not blocks or graph.num_blocks != len(blocks):
        return []
    batch = graph.batch_size
    sizes = micro_batches(batch)
    inputs = _Inputs(model, blocks[0], args, kwargs, batch=batch, samples=sizes[-1])
    last: dict[str, tuple[int, float]] = {}  # key -> (micro-batch, seconds) of its largest timed point so far
    items: list[tuple[int, Item]] = []

    def add(key: str, b: int, node, passes: int, dtype: str, make: Callable[[tuple, dict], Callable[[], None]]):
        scale = b / batch
        if any(abs(p[0] - scale) < 1e-12 for p in db.node_times.get(key, [])):
            return

        def estimate() -> float:
            if key in last:
                return last[key][1] * b / last[key][0]
            return formula_seconds(db, node, dtype=dtype, scale=scale, passes=passes)

        def run() -> float:
            a, k = inputs.at(b)
            sec = median_seconds(make(a, k), device, repeats=REPEATS, max_s=item_s)
            last[key] = (b, sec)
            return sec

        essential = b == sizes[0] and passes == 3  # the smallest micro-batch, not recomputed (x 4/3 serves)
        items.append((b, Item(key=f"{key}@{b}", estimate=estimate, run=run, store=_point_store(db, key, scale),
                              essential=essential)))

    seen: set[str] = set()
    for node in graph.blocks:
        for dtype in dtypes:
            for rec in recomputes:
                key = node_time_key(node, dtype=dtype, recompute=rec)
                if key in seen:
                    continue
                seen.add(key)
                for b in sizes:
                    add(key, b, node, 4 if rec else 3, dtype,
                        lambda a, k, blk=blocks[node.index], dt=dtype, r=rec: block_fn(
                            blk, a, k, device=device, bf16=dt == "bf16", recompute=r))
    post = graph.post
    stage = _head_stage(adapter, len(blocks)) if post is not None else None
    if stage is not None:
        for dtype in dtypes:
            key = node_time_key(post, dtype=dtype, recompute=False)
            for b in sizes:
                add(key, b, post, 3, dtype, lambda a, k, dt=dtype: head_fn(
                    stage, _hidden(a, k), device=device, bf16=dt == "bf16", vocab=adapter.vocab_size()))
    out = [it for _, it in sorted(items, key=lambda x: x[0])]
    opt = _optimizer_item(db, model, optimizer, device=device, item_s=item_s)
    return ([opt] if opt is not None else []) + out


def _head_stage(adapter, n: int):
    """The family's last stage without blocks (final norm, head), or None when the family cannot cut the model."""
    if not adapter.supports_pipeline:
        return None
    try:
        return adapter.build_stage(n, n, first=False, last=True)[0]
    except (NotImplementedError, ValueError):  # e.g. parameters on the root module
        return None


def _hidden(args: tuple, kwargs: dict):
    from torch.utils._pytree import tree_flatten

    for t in tree_flatten((args, kwargs))[0]:
        if hasattr(t, "is_floating_point") and t.is_floating_point():
            return t
    raise RuntimeError("the first block gets no floating tensor")


def _optimizer_item(db, model, optimizer, *, device, item_s: float) -> Item | None:
    """One step of the user's optimizer class over parameters of the model's shapes (seconds per element)."""
    try:
        key = optimizer_key(optimizer, device.type)
    except (TypeError, ValueError):  # not an optimizer the planner knows: the formula
        return None
    if key in db.optimizer_step:
        return None
    params = list({id(p): p for p in model.parameters() if p.requires_grad}.values())
    if not params:
        return None
    total = sum(p.numel() for p in params)
    cap = OPTIMIZER_ELEMENTS.get(device.type, OPTIMIZER_ELEMENTS["cuda"])
    every = max(1, -(-total // cap))
    shapes = [tuple(p.shape) for p in params[::every]]
    elems = sum(math.prod(s) for s in shapes)

    def run() -> float | None:
        made = optimizer_fn(optimizer, shapes, device=device, dtype=params[0].dtype)
        if made is None:
            return None
        return median_seconds(made[0], device, repeats=REPEATS, max_s=item_s) / made[1]

    def store(sec_per_element: float) -> None:
        db.optimizer_step[key] = sec_per_element

    return Item(key=f"optimizer:{key}", estimate=lambda: elems * 28 / 2e9, run=run, store=store, essential=True)
