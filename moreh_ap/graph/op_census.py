# Op census for the time model: per node its GEMM shapes, attention calls and the bytes its memory-bound ops move.
"""What a traced forward runs, op by op, as the time model needs it.

* GEMMs (``mm``, ``addmm``, ``bmm``, ``baddbmm``): their ``(m, k, n, batch)`` shapes and counts, so
  the time model can look each one up in a GEMM table measured at real shapes;
* attention (``F.scaled_dot_product_attention``, seen by the tracer's stand-in, not as aten ops): each call's
  ``(batch x heads, q length, kv length, head dim, value head dim, mode)`` and count, so the time model can
  cost it at the fused attention kernel's own rate (:func:`attention_flops`);
* every other op that touches memory (not views, not factory/metadata ops): the bytes of its tensor
  inputs plus outputs, i.e. what a memory-bound kernel reads and writes (elementwise ops, norms,
  casts, softmax, dropout). Divided by the memory bandwidth this is their time.

The census runs inside the tracer's dispatch mode (it sees aten ops after autocast has cast them).
"""
from __future__ import annotations

from typing import Any

import torch
from torch.utils._pytree import tree_flatten


GEMM_OPS = ("mm", "addmm", "bmm", "baddbmm")
"""aten ops counted as GEMMs (``linear`` decomposes into them)."""
FREE_OPS = frozenset({
    "view", "_unsafe_view", "t", "transpose", "expand", "permute", "slice", "select", "unsqueeze", "squeeze",
    "as_strided", "detach", "alias", "split", "split_with_sizes", "unbind", "reshape", "_reshape_alias", "empty",
    "new_empty", "empty_strided", "empty_like", "lift_fresh", "device", "sym_size", "sym_stride", "sym_numel",
    "is_same_size", "_local_scalar_dense", "arange", "zeros", "ones", "full", "scalar_tensor",
})
"""aten ops that move no tensor data (views, metadata, allocation, small factories)."""
ATTN_FULL, ATTN_CAUSAL, ATTN_SQUARE_MASK = 0, 1, 2
"""Attention call modes: no mask (or a mask of another shape), ``is_causal=True``, and a mask over every query
and key of a square call. The last is what Hugging Face's causal LMs pass on a fake trace: their check that
the positions are not packed sequences reads tensor values, which a fake tensor has not, so the causal mask
is built; on a device, without padding, they drop it and call the causal flash kernel (``is_causal=True``)."""


def gemm_shape(name: str, args: tuple) -> tuple[int, int, int, int] | None:
    """``(m, k, n, batch)`` of a GEMM op's operands, or None when they are not 2-D / 3-D tensors."""
    a, b = (args[1], args[2]) if name in ("addmm", "baddbmm") else (args[0], args[1])
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return None
    if a.dim() == 2 and b.dim() == 2:
        return int(a.shape[0]), int(a.shape[1]), int(b.shape[1]), 1
    if a.dim() == 3 and b.dim() == 3:
        return int(a.shape[1]), int(a.shape[2]), int(b.shape[2]), int(a.shape[0])
    return None


def attention_flops(calls, *, as_run: bool) -> float:
    """Forward FLOPs of ``calls`` (``(bh, tq, tk, d, dv, mode, count)`` rows): ``2 bh tq tk (d + dv)``, halved for
    a causal call. ``as_run``: what the kernel computes on the device (a square mask counted causal, see
    :data:`ATTN_SQUARE_MASK`); else what the tracer counted into ``fwd_flops`` (a masked call in full)."""
    total = 0.0
    for bh, tq, tk, d, dv, mode, count in calls:
        causal = mode == ATTN_CAUSAL or (as_run and mode == ATTN_SQUARE_MASK)
        total += count * 2.0 * bh * tq * tk * (d + dv) / (2 if causal else 1)
    return total


def moved_bytes(args: tuple, kwargs: dict, out: Any) -> int:
    """Bytes of the tensors an op reads (inputs) and writes (outputs)."""
    leaves, _ = tree_flatten((args, kwargs, out))
    return sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor))


class OpCensus:
    """Per-node GEMM shapes and memory-bound bytes, filled op by op (``node`` is the current node)."""

    def __init__(self) -> None:
        self.gemms: dict[str, dict[tuple[int, int, int, int], int]] = {}
        self.moved: dict[str, int] = {}
        self.attention: dict[str, dict[tuple[int, int, int, int, int, int], int]] = {}

    def note(self, node: str, func, args: tuple, kwargs: dict, out: Any) -> None:
        """Record one dispatched aten op for ``node``."""
        name = func._overloadpacket.__name__
        if name in GEMM_OPS:
            shape = gemm_shape(name, args)
            if shape is not None:
                per_node = self.gemms.setdefault(node, {})
                per_node[shape] = per_node.get(shape, 0) + 1
                return
        if name in FREE_OPS:
            return
        self.moved[node] = self.moved.get(node, 0) + moved_bytes(args, kwargs, out)

    def note_attention(self, node: str, *, bh: int, tq: int, tk: int, d: int, dv: int, mode: int) -> None:
        """Record one attention call of ``node`` (``mode``: :data:`ATTN_FULL`, :data:`ATTN_CAUSAL` or
        :data:`ATTN_SQUARE_MASK`)."""
        per_node = self.attention.setdefault(node, {})
        key = (int(bh), int(tq), int(tk), int(d), int(dv), int(mode))
        per_node[key] = per_node.get(key, 0) + 1

    def node_attention(self, node: str) -> tuple[tuple[int, int, int, int, int, int, int], ...]:
        """``((bh, tq, tk, d, dv, mode, count), ...)`` of ``node``'s attention calls."""
        return tuple(sorted((*k, c) for k, c in self.attention.get(node, {}).items()))

    def node_gemms(self, node: str) -> tuple[tuple[int, int, int, int, int], ...]:
        """``((m, k, n, batch, count), ...)`` of ``node``, largest first."""
        items = self.gemms.get(node, {})
        return tuple(sorted(((*s, c) for s, c in items.items()), key=lambda g: -g[0] * g[1] * g[2] * g[3]))
