# Timed callables for a live model's own parts on copies: one block's forward + backward, head + loss, optimizer step.
"""What :mod:`moreh_ap.planner.shape_calibration` times on a model that exists (not on the meta device).

Every callable runs on copies (``copy.deepcopy``: parameters copied, never the user's modules); the
block's inputs are captured by running the model's parts before its first block (embeddings, rotary
tables, masks) on a micro-batch of the user's inputs under ``torch.no_grad`` and stopping at the block
(nothing after it runs; the model's parameters, buffers and gradients are not touched). Callers draw
inside :func:`~moreh_ap.planner.private_rng.private_rng`.

The block runs as the runtime runs it: the model's own forward (its attention implementation), bf16
autocast for mixed precision (as the runtime runs it without FSDP), the runtime's ``checkpoint_wrapper``
when recomputed; its backward gets a gradient of the output's shape, and its input requires grad.
"""
from __future__ import annotations

import copy
import statistics
import time
from contextlib import nullcontext
from typing import Any, Callable

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

__all__ = ["slice_batch", "capture_block_inputs", "block_fn", "head_fn", "optimizer_fn", "median_seconds"]


class _Captured(Exception):
    """Raised by the capture hook to stop the model's forward at its first block."""


def median_seconds(fn: Callable[[], Any], device: torch.device, *, repeats: int,
                   max_s: float = float("inf")) -> float:
    """Median seconds of ``fn`` over ``repeats`` calls after one warm-up (device synchronized); fewer (at least
    one) when the next call would take the item past ``max_s`` seconds in all (a long call varies little)."""

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    start = time.perf_counter()
    fn()
    sync()
    times: list[float] = []
    while len(times) < max(1, repeats):
        if times and time.perf_counter() - start + times[-1] > max_s:
            break
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def slice_batch(obj: Any, *, batch: int, samples: int) -> Any:
    """``obj`` with every tensor whose dim 0 is ``batch`` cut to its first ``samples`` rows."""
    return tree_map(lambda t: t[:samples] if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == batch
                    else t, obj)


def _clean_kwargs(kwargs: dict) -> dict:
    """The block's keyword inputs, reusable call after call: no key/value cache (it would grow), no caching."""
    out = {}
    for k, v in kwargs.items():
        if type(v).__name__.endswith("Cache"):
            v = None
        out[k] = False if k == "use_cache" else v
    return out


def capture_block_inputs(model: nn.Module, block: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The positional and keyword inputs ``block`` gets when ``model`` runs on ``args`` / ``kwargs`` (detached copies).

    Raises:
        RuntimeError: the forward finished (or failed) without calling ``block``.
    """
    box: list = []

    def hook(mod, a, k):
        box.append(tree_map(lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t, (a, k)))
        raise _Captured

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    except _Captured:
        pass
    finally:
        handle.remove()
    if not box:
        raise RuntimeError("the model's forward did not reach its first block")
    a, k = box[0]
    return tuple(a), _clean_kwargs(dict(k))


def _with_grad_input(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The first floating tensor (the hidden states) made a leaf that requires grad, as inside a model."""
    done = [False]

    def mark(t):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not done[0]:
            done[0] = True
            return t.detach().requires_grad_(True)
        return t

    return tree_map(mark, args), tree_map(mark, kwargs)


def _first_float(out: Any) -> torch.Tensor:
    for t in tree_flatten(out)[0]:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad:
            return t
    raise RuntimeError("the module's output has no floating tensor that requires grad")


def _autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def block_fn(block: nn.Module, args: tuple, kwargs: dict, *, device: torch.device, bf16: bool,
             recompute: bool) -> Callable[[], None]:
    """One forward + backward of a copy of ``block`` on the captured inputs (recomputed: the runtime's wrapper)."""
    mod = copy.deepcopy(block)
    mod.train()
    if recompute:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        mod = checkpoint_wrapper(mod)
    a, k = _with_grad_input(args, kwargs)
    grad: list = []

    def step():
        with _autocast(device, bf16):
            out = _first_float(mod(*a, **k))
        if not grad:
            grad.append(torch.randn_like(out))
        out.backward(grad[0])
        mod.zero_grad(set_to_none=True)

    return step


def head_fn(stage: nn.Module, hidden: torch.Tensor, *, device: torch.device, bf16: bool,
            vocab: int | None) -> Callable[[], None]:
    """Forward + backward of a copy of the last stage's head (``stage``: no blocks, the parts after them) and a
    float32 cross-entropy over its logits (next-token targets drawn at random)."""
    import torch.nn.functional as F

    mod = copy.deepcopy(stage)
    mod.train()
    h = hidden.detach().clone().requires_grad_(True)
    targets: list = []

    def step():
        with _autocast(device, bf16):
            out = _first_float(mod(h))
        logits = out.float().reshape(-1, out.shape[-1])
        if not targets:
            targets.append(torch.randint(0, vocab or out.shape[-1], (logits.shape[0],), device=logits.device))
        F.cross_entropy(logits, targets[0]).backward()
        mod.zero_grad(set_to_none=True)

    return step


_BY_NAME = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}


def optimizer_fn(optimizer: Any, shapes: list[tuple[int, ...]], *, device: torch.device,
                 dtype: torch.dtype) -> tuple[Callable[[], None], int] | None:
    """One ``step()`` of the user's optimizer class (its defaults) over fresh parameters of ``shapes`` with
    gradients, and their element count; None for an optimizer this cannot build (a name other than
    adamw / adam / sgd, or a class whose constructor needs more than params and its defaults)."""
    if isinstance(optimizer, str):
        cls, defaults = _BY_NAME.get(optimizer.lower()), {"lr": 1e-3}
    else:
        cls = optimizer if isinstance(optimizer, type) else type(optimizer)
        defaults = {} if isinstance(optimizer, type) else dict(getattr(optimizer, "defaults", {}) or {})
    if cls is None or not shapes:
        return None
    params = [torch.zeros(s, device=device, dtype=dtype, requires_grad=True) for s in shapes]
    for p in params:
        p.grad = torch.full_like(p, 1e-3)
    try:
        opt = cls(params, **defaults)
    except Exception:  # a constructor that needs more than its defaults
        try:
            opt = cls(params)
        except Exception:
            return None
    return opt.step, sum(p.numel() for p in params)
