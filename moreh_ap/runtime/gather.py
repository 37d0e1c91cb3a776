# A loss-outside model's outputs: the differentiable all-gather of the global batch's, and work queued after their backward.
"""A model whose loss is computed by the script (``loss = criterion(model(x), y)``) runs its forward on
this data-parallel rank's rows; :func:`gather_batch_outputs` all-gathers every output tensor over the dp
group (torch's autograd-aware functional all-gather: its backward is a sum-reduce-scatter), so the script
sees the whole batch's outputs in one device's order.

Gradients: every rank computes the same loss on the same gathered outputs, so the gather's backward
hands rank r ``dp`` times the gradient of its rows; DDP / FSDP2 then average over dp: one device's
gradients, with no extra scaling. Uneven row counts (a short last batch) are padded to the largest
before the gather and cut after it.

The script's own ``loss.backward()`` ends the step's backward, not the engine: :func:`after_backward` queues the
engine's after-backward work (tensor-parallel gradients laid like their parameters, tied gradients summed) to
run when that backward finishes, as ``train_step`` runs it after its own.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.utils._pytree import tree_map_only

from moreh_ap.compat import all_gather_autograd

__all__ = ["after_backward", "gather_batch_outputs"]


def gather_batch_outputs(out: Any, *, rows: int, sizes: list[int], group) -> Any:
    """``out`` with each tensor whose first dim is this rank's ``rows`` replaced by the global batch's.

    Args:
        out: this rank's output (tensors inside tuples, lists, dicts, Hugging Face ``ModelOutput``).
        rows: this rank's samples.
        sizes: every dp rank's samples, in dp order (their sum is the global batch).
        group: the data-parallel process group.

    Raises:
        NotImplementedError: an output tensor has no batch dimension (it cannot be assembled into the
            global batch's).
    """
    most = max(sizes)

    def gather(t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 0 or t.shape[0] != rows:
            raise NotImplementedError(
                f"advanced parallelization: an output of shape {tuple(t.shape)} has no batch dimension of this "
                f"rank's {rows} samples, so the global batch's output cannot be assembled from the data-parallel "
                "ranks; return per-sample outputs (batch first), or compute the loss inside the model")
        if rows < most:  # a short last batch: equal sizes for the collective, cut again below
            t = torch.cat([t, t.new_zeros((most - rows, *t.shape[1:]))])
        parts = all_gather_autograd(t.contiguous(), group).split(most)
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    if hasattr(out, "to_tuple") and isinstance(out, dict):  # HF ModelOutput: keep its type and fields
        fields = {k: tree_map_only(torch.Tensor, gather, v) for k, v in out.items()}
        return type(out)(**fields)
    return tree_map_only(torch.Tensor, gather, out)


def after_backward(out: Any, fn) -> None:
    """Run ``fn()`` once at the end of every backward pass that reaches a tensor of ``out`` (autograd's
    ``queue_callback``, as FSDP and DDP finish their own backward work), whichever outputs the loss used."""
    tensors = [t for t in tree_flatten_tensors(out) if t.requires_grad]
    if not tensors:
        return

    def queue(_grads) -> None:
        torch.autograd.Variable._execution_engine.queue_callback(fn)

    torch.autograd.graph.register_multi_grad_hook(tensors, queue, mode="any")


def tree_flatten_tensors(out: Any) -> list[torch.Tensor]:
    """The tensors inside ``out`` (tuples, lists, dicts, Hugging Face ``ModelOutput``)."""
    found: list[torch.Tensor] = []
    values = out.values() if hasattr(out, "to_tuple") and isinstance(out, dict) else [out]
    for v in values:
        tree_map_only(torch.Tensor, found.append, v)
    return found
