# What a trace runs in place of the device's kernels: the SDPA stand-in and bf16 autocast with a device's policy.
"""Kernels and contexts :func:`moreh_ap.graph.tracing.trace` runs the fake forward under.

* :func:`patched_sdpa`: ``F.scaled_dot_product_attention`` replaced by a stand-in that costs the
  flash / memory-efficient kernel sdpa picks on a GPU (flash for bf16/fp16, memory-efficient for
  fp32; both save q, k, v, the output and the float32 log-sum-exp, never the B·H·Tq·Tk
  probabilities, with or without dropout: they keep the RNG state, not a mask), adds the kernel's
  FLOPs (and the call's shape to the op census), and casts q, k, v to the autocast dtype when autocast
  is on (sdpa is one of autocast's lower-precision ops on CPU and CUDA alike);
* :func:`autocast_for`: bf16 autocast over (fake) CPU tensors with a device type's op policy (and,
  for CUDA, its fused dropout kernel, which saves a one-byte mask).
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from moreh_ap.graph.autocast_rules import cuda_autocast_rules
from moreh_ap.graph.op_census import ATTN_CAUSAL, ATTN_FULL, ATTN_SQUARE_MASK

__all__ = ["autocast_for", "patched_sdpa"]


class _FlashAttention(torch.autograd.Function):
    """Stand-in for the flash / memory-efficient SDPA kernel: right shapes, right saved tensors."""

    @staticmethod
    def forward(ctx, q, k, v, mask):  # noqa: D401
        if q.dim() == 4:  # the kernels write (B, T, H, D) and return a (B, H, T, D) view of it, so the
            # usual `out.transpose(1, 2).reshape(B, T, H * D)` that follows is a view, not a copy
            b, h, t = q.shape[:3]
            out = q.new_empty((b, t, h, v.shape[-1])).transpose(1, 2)
        else:
            out = q.new_empty(q.shape[:-1] + (v.shape[-1],))
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        if mask is not None:
            ctx.save_for_backward(q, k, v, out, lse, mask)
        else:
            ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: tracing does no backward
        raise RuntimeError("moreh_ap trace stand-in has no backward")


def _make_sdpa(rec: Any):
    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        b = query.shape[:-2].numel() if query.dim() > 2 else 1
        tq, d = query.shape[-2], query.shape[-1]
        tk, dv = key.shape[-2], value.shape[-1]
        flops = 2 * b * tq * tk * d + 2 * b * tq * tk * dv
        rec.add_flops(flops // 2 if is_causal and attn_mask is None else flops)
        mask = attn_mask if isinstance(attn_mask, torch.Tensor) else None
        census = getattr(rec, "census", None)
        if census is not None:  # the time model costs it at the attention kernel's rate (op_census)
            square = mask is not None and tq == tk and tuple(mask.shape[-2:]) == (tq, tk)
            mode = ATTN_CAUSAL if is_causal and mask is None else ATTN_SQUARE_MASK if square else ATTN_FULL
            census.note_attention(rec.current, bh=b, tq=tq, tk=tk, d=d, dv=dv, mode=mode)
        if torch.is_autocast_enabled("cpu"):  # sdpa is a lower-precision op of autocast (CPU and CUDA alike)
            low = torch.get_autocast_dtype("cpu")
            query, key, value = (t.to(low) if t.is_floating_point() else t for t in (query, key, value))
        return _FlashAttention.apply(query, key, value, mask)

    return sdpa


@contextlib.contextmanager
def patched_sdpa(rec: Any) -> Iterator[None]:
    """While active, ``F.scaled_dot_product_attention`` is the stand-in; ``rec.add_flops(n)`` gets its FLOPs."""
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _make_sdpa(rec)
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def _fused_dropout(input, p=0.5, training=True, inplace=False):  # noqa: A002 (F.dropout's signature)
    if not training or p == 0.0 or not input.is_floating_point():
        return input
    return torch.native_dropout(input, p, True)[0]


@contextlib.contextmanager
def autocast_for(device_type: str | None) -> Iterator[None]:
    """bf16 autocast on the (fake) CPU tensors with ``device_type``'s op policy; nothing for None.

    Autocast's cast cache keeps one bf16 copy per fp32 parameter for the whole forward; the matmuls
    save it for backward, so the copies are counted among the saved tensors of the node that uses them.
    For "cuda", ``F.dropout`` also runs as CUDA's fused kernel (``native_dropout``, which saves a
    one-byte mask) where the CPU multiplies by a float noise tensor of the input's dtype and saves that.
    """
    if device_type is None:
        yield
        return
    rules = cuda_autocast_rules() if device_type == "cuda" else contextlib.nullcontext()
    original = F.dropout
    if device_type == "cuda":
        F.dropout = _fused_dropout
    try:
        with rules, torch.autocast("cpu", dtype=torch.bfloat16):
            yield
    finally:
        F.dropout = original
