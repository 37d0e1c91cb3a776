# A training step's inputs: the user's call checked and normalized, the dp slice, the micro-batches.
"""How ``ParallelModel.train_step(*args, target=..., **kwargs)`` reads its arguments.

- Hugging Face causal LMs called with ``labels=`` (and no ``loss_fn``) use the model's own loss:
  the labels become the target; ``input_ids=`` becomes the positional input; at pp = 1
  ``use_cache`` defaults to False; inside a pipeline only ``input_ids``, ``attention_mask`` and
  ``labels`` are accepted (``use_cache`` and the other outputs-only switches are dropped).
  A ``num_items_in_batch=`` keyword (transformers' Trainer passes it with gradient accumulation) is
  the caller's token count: the loss is the sum over the batch's tokens divided by it.
- Models that compute their own loss (``parallelize(..., output_loss=...)``): at pp = 1 the whole call
  goes to the model and the loss is read from its output; inside a pipeline the adapter's target
  argument (nanoGPT's ``targets``) becomes the target of the adapter's loss on the last stage.
- Other models need ``parallelize(..., loss_fn=...)`` and ``target=``; inside a pipeline they take
  positional tensors only.

Every rank passes the same global batch: :func:`dp_slice` takes this rank's rows,
:func:`micro_batches` cuts them into micro-batches (tensors whose first dim is the batch are cut;
anything else is repeated). Wrong calls raise :class:`moreh_ap.errors.InputError`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map_only, tree_unflatten

from moreh_ap.errors import InputError
from moreh_ap.runtime.loss import IGNORE_INDEX

__all__ = ["StepInputs", "prepare_inputs", "dp_slice", "micro_batches", "shape_key"]

_HF_NO_EFFECT = frozenset({"use_cache", "return_dict", "output_attentions", "output_hidden_states"})
"""HF keyword arguments that do not change the training loss; dropped when the model is pipelined."""


@dataclass(kw_only=True, slots=True)
class StepInputs:
    """One step's normalized call."""

    args: tuple
    """Positional inputs of the model (or of the first stage)."""
    kwargs: dict[str, Any]
    """Keyword inputs of the model (or of the first stage)."""
    target: Any
    """The loss target: HF labels or the user's ``target=``."""
    hf_labels: bool
    """The loss is the Hugging Face model's own, on ``target`` (the labels)."""
    from_output: bool = False
    """The loss is read from the model's own output (the whole call went to the model)."""
    num_items: int | None = None
    """HF: the caller's ``num_items_in_batch`` (None: the runtime counts the global batch's tokens)."""
    batch: int
    """Samples in the global batch (first dim of the first input tensor)."""


def prepare_inputs(args: tuple, target: Any, kwargs: dict[str, Any], *, hf_model: bool, pipelined: bool,
                   has_loss_fn: bool, output_loss: bool = False,
                   target_arg: tuple[str, int] | None = None, arg_names: tuple[str, ...] = ()) -> StepInputs:
    """Check and normalize one call of ``train_step`` / an evaluation forward.

    Args:
        args, target, kwargs: the user's call.
        hf_model: the model is a Hugging Face model.
        pipelined: the model runs as a pipeline (num_stages > 1).
        has_loss_fn: ``parallelize`` was given a ``loss_fn``.
        output_loss: the model computes its own loss (read from its output at pp = 1).
        target_arg: ``(keyword, position)`` of the model's target argument when its adapter computes the
            same loss on the last pipeline stage (nanoGPT: ``("targets", 1)``).
        arg_names: the model's positional ``forward`` parameters in order: a pipelined Hugging Face call's
            positional inputs after the first are bound to these names (``model(ids, mask)`` ->
            ``attention_mask=mask``), since every stage reads them as keywords.

    Raises:
        InputError: no loss can be computed, a missing target, keywords a pipeline cannot take,
            no input tensor.
    """
    kwargs = dict(kwargs)
    if hf_model and pipelined and len(args) > 1 and len(arg_names) >= len(args):
        args, kwargs = _bind_positionals(args, kwargs, arg_names)
    hf_labels = hf_model and target is None and "labels" in kwargs and not has_loss_fn and not output_loss
    from_output = output_loss and target is None and not has_loss_fn and not pipelined
    num_items = None
    if hf_labels:
        target = kwargs.pop("labels")
        num_items = _caller_count(kwargs.pop("num_items_in_batch", None))
    elif output_loss and target is None and pipelined and target_arg is not None:
        args, kwargs, target = _take_target(args, kwargs, target_arg)
        has_loss_fn = True
    elif from_output:
        pass
    elif output_loss and pipelined:
        raise InputError("ParallelModel.train_step: with num_stages > 1 the model's own loss cannot be read from "
                         "its output (it is computed inside its forward): no pipeline split computes it; use "
                         "num_stages=1")
    elif not has_loss_fn:
        raise InputError("ParallelModel.train_step: no loss: pass labels= to a Hugging Face causal LM, or give "
                         "parallelize(..., loss_fn=...) and train_step(..., target=...)")
    elif target is None:
        raise InputError("ParallelModel.train_step: loss_fn is set but target= is missing")
    if hf_model and "input_ids" in kwargs and not args:
        args = (kwargs.pop("input_ids"),)
    if hf_model and not pipelined and not from_output:
        kwargs.setdefault("use_cache", False)
    if hf_model and pipelined:
        kwargs = {k: v for k, v in kwargs.items() if v is not None and k not in _HF_NO_EFFECT}
        extra = sorted(set(kwargs) - {"attention_mask"})
        if extra:
            raise InputError(f"ParallelModel.train_step: with num_stages > 1 a Hugging Face model takes "
                             f"input_ids, attention_mask and labels only; got {extra}")
        if len(args) > 1:  # every stage reads the mask from its keyword; only the first gets positionals
            raise InputError(f"ParallelModel.train_step: with num_stages > 1 a Hugging Face model takes "
                             f"input_ids as its only positional argument (got {len(args)}); pass "
                             f"attention_mask=... (and labels=...) as keywords")
    elif pipelined and kwargs:
        raise InputError(f"ParallelModel.train_step: with num_stages > 1 the model takes positional tensors "
                         f"only; got keyword arguments {sorted(kwargs)}")
    tensors = [t for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor)]
    if not tensors:
        raise InputError("ParallelModel.train_step: no input tensor given")
    return StepInputs(args=tuple(args), kwargs=kwargs, target=target, hf_labels=hf_labels,
                      batch=tensors[0].shape[0], from_output=from_output, num_items=num_items)


def _bind_positionals(args: tuple, kwargs: dict[str, Any], names: tuple[str, ...]) -> tuple[tuple, dict]:
    """``args[1:]`` moved into ``kwargs`` under the model's parameter names (the first input stays positional)."""
    for name, value in zip(names[1:], args[1:]):
        if name in kwargs:
            raise InputError(f"ParallelModel.train_step: the model got {name!r} twice (positionally and as a "
                             f"keyword)")
        kwargs[name] = value
    return args[:1], kwargs


def _caller_count(value: Any) -> int | None:
    """The caller's ``num_items_in_batch`` (an int or a tensor) as an int; None when not given."""
    if value is None:
        return None
    return int(value.item() if isinstance(value, torch.Tensor) else value)


def _take_target(args: tuple, kwargs: dict[str, Any], target_arg: tuple[str, int]) -> tuple[tuple, dict, Any]:
    """The model's target argument taken out of the call (keyword or position).

    Raises:
        InputError: the call has no target (the model would compute no loss).
    """
    name, pos = target_arg
    if kwargs.get(name) is not None:
        target = kwargs.pop(name)
    elif len(args) > pos and args[pos] is not None:
        target, args = args[pos], tuple(args[:pos]) + tuple(args[pos + 1:])
    else:
        raise InputError(f"ParallelModel.train_step: no loss: the model computes its loss from its {name!r} "
                         f"argument, which this call does not pass")
    kwargs.pop(name, None)
    return tuple(args), kwargs, target


def dp_slice(inputs: StepInputs, *, dp: int, dp_rank: int, pipelined: bool = False) -> tuple[StepInputs, int]:
    """This dp rank's rows of the global batch, and their count.

    A batch that ``dp`` does not divide (the short last batch of an epoch) still trains as one device
    would: a Hugging Face model called with ``labels=`` gets extra rows (copies of the first row)
    whose labels are all -100, which add nothing to the loss or the gradients, so the returned
    ``batch`` is the padded size; a ``loss_fn`` model at pp = 1 gets an uneven split (the first
    ``batch % dp`` ranks one row more; the loss weights rows by samples), ``batch`` stays the real
    size and the caller runs one micro-batch.

    Raises:
        InputError: an uneven batch for a ``loss_fn`` model in a pipeline, or fewer samples than ``dp``.
    """
    batch = inputs.batch
    if batch % dp and inputs.hf_labels:
        inputs = _pad_hf(inputs, dp)
    elif batch % dp:
        if pipelined:
            raise InputError(f"a global batch of {batch} samples cannot be split over dp({dp}) data-parallel ranks "
                             f"in a pipeline with loss_fn: drop the short last batch (DataLoader(..., "
                             f"drop_last=True)) or pass a multiple of {dp} samples")
        if batch < dp:
            raise InputError(f"a global batch of {batch} samples has fewer samples than dp({dp}) data-parallel "
                             f"ranks: drop the short last batch (DataLoader(..., drop_last=True))")
    rows = inputs.batch
    sizes = [rows // dp + (1 if r < rows % dp else 0) for r in range(dp)]
    lo, local = sum(sizes[:dp_rank]), sizes[dp_rank]

    def cut(t: torch.Tensor) -> torch.Tensor:
        return t[lo:lo + local] if t.dim() > 0 and t.shape[0] == rows else t

    sliced = StepInputs(args=tree_map_only(torch.Tensor, cut, inputs.args),
                        kwargs=tree_map_only(torch.Tensor, cut, inputs.kwargs),
                        target=tree_map_only(torch.Tensor, cut, inputs.target),
                        hf_labels=inputs.hf_labels, batch=rows, from_output=inputs.from_output,
                        num_items=inputs.num_items)
    return sliced, local


def _pad_hf(inputs: StepInputs, dp: int) -> StepInputs:
    """The batch padded to a multiple of ``dp`` with copies of row 0 whose labels are all -100."""
    rows = inputs.batch
    extra = -rows % dp

    def pad(t: torch.Tensor, fill: int | None = None) -> torch.Tensor:
        if t.dim() == 0 or t.shape[0] != rows:
            return t
        more = t[:1].expand(extra, *t.shape[1:]) if fill is None else t.new_full((extra, *t.shape[1:]), fill)
        return torch.cat([t, more])

    return StepInputs(args=tree_map_only(torch.Tensor, pad, inputs.args),
                      kwargs=tree_map_only(torch.Tensor, pad, inputs.kwargs),
                      target=tree_map_only(torch.Tensor, lambda t: pad(t, IGNORE_INDEX), inputs.target),
                      hf_labels=True, batch=rows + extra, num_items=inputs.num_items)


def micro_batches(obj: Any, n: int, rows: int) -> list:
    """``obj`` cut into ``n`` micro-batches along dim 0 (tensors with ``rows`` rows; anything else repeated)."""
    leaves, spec = tree_flatten(obj)
    parts = [list(t.chunk(n)) if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == rows else [t] * n
             for t in leaves]
    return [tree_unflatten([p[i] for p in parts], spec) for i in range(n)]


def shape_key(args: tuple, kwargs: dict[str, Any]) -> tuple:
    """What a pipeline schedule is built for: the positional tensors' shapes and dtypes, the keyword
    tensors' names and shapes."""
    return (tuple((tuple(t.shape), t.dtype) for t in args if isinstance(t, torch.Tensor)),
            tuple(sorted((k, tuple(v.shape)) for k, v in kwargs.items() if isinstance(v, torch.Tensor))))
