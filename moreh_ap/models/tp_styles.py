# ParallelStyles torch lacks: Conv1D column/row splits, replicated parameters on a tp mesh, sequence-parallel edges.
"""Styles for :func:`torch.distributed.tensor.parallel.parallelize_module`, next to torch's own.

- :class:`Conv1DColwise` / :class:`Conv1DRowwise`: ``transformers``' ``Conv1D`` holds its weight as
  ``(in, out)`` (transposed from ``nn.Linear``): the column split shards weight dim 1 and the bias, the row
  split weight dim 0 (bias replicated); inputs and outputs as torch's Colwise/RowwiseParallel.
- :class:`ReplicateParams`: a module whose parameters every tp rank holds whole (norms, position
  embeddings): they become ``Replicate`` DTensors on the tp mesh, plain inputs are taken as replicated (DTensor
  inputs are all-gathered) and the outputs given back as plain tensors (or, with ``output_layout=Shard(1)``, as this rank's sequence shard of
  a DTensor: a replicated embedding feeding a sequence-parallel residual stream). Then every parameter of a
  tensor-parallel model is a DTensor, and a norm counts the replicated ones once (:mod:`moreh_ap.optim.norms`).
- :class:`GatherSequence`: a module (attention, MLP) whose inputs arrive sequence-sharded (``Shard(1)``
  DTensors of the sequence-parallel residual stream) and that runs on the whole sequence: every DTensor
  argument, positional or keyword, is all-gathered to a plain tensor (torch's ``PrepareModuleInput`` needs
  the argument's position or keyword; Hugging Face families pass the hidden states either way).
"""
from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel

__all__ = ["Conv1DColwise", "Conv1DRowwise", "GatherSequence", "ReplicateParams"]


def _shard_params(module: nn.Module, mesh, placements: dict[str, list], src: int | None) -> None:
    for name, param in list(module.named_parameters(recurse=False)):
        dist = distribute_tensor(param, mesh, placements[name], src_data_rank=src)
        module.register_parameter(name, nn.Parameter(dist, requires_grad=param.requires_grad))


def _check_conv1d(module: nn.Module, style: str) -> None:
    if type(module).__name__ != "Conv1D" or not hasattr(module, "nf"):
        raise NotImplementedError(f"{style} splits transformers' Conv1D, got {type(module).__name__}")


class Conv1DColwise(ColwiseParallel):
    """Column split of a ``transformers`` ``Conv1D`` (weight ``(in, out)``: shard dim 1; bias shard dim 0)."""

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        _check_conv1d(module, "Conv1DColwise")

        def partition(name, mod, mesh):
            if mod is module:
                _shard_params(mod, mesh, {"weight": [Shard(1)], "bias": [Shard(0)]}, self.src_data_rank)

        return distribute_module(module, device_mesh, partition,
                                 partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
                                 partial(self._prepare_output_fn, self.output_layouts, self.use_local_output))


class Conv1DRowwise(RowwiseParallel):
    """Row split of a ``transformers`` ``Conv1D`` (weight ``(in, out)``: shard dim 0; bias replicated)."""

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        _check_conv1d(module, "Conv1DRowwise")
        self.desired_input_layouts = (Shard(-1),)

        def partition(name, mod, mesh):
            if mod is module:
                _shard_params(mod, mesh, {"weight": [Shard(0)], "bias": [Replicate()]}, self.src_data_rank)

        return distribute_module(module, device_mesh, partition,
                                 partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
                                 partial(self._prepare_output_fn, self.output_layouts, self.use_local_output))


def _replicated(x, mesh):
    if isinstance(x, DTensor):  # e.g. the sequence-sharded residual stream into a replicated head
        return x.redistribute(mesh, [Replicate()])
    return DTensor.from_local(x, mesh, [Replicate()], run_check=False) if isinstance(x, torch.Tensor) else x


def _to_replicate(mod, inputs, mesh):
    return tuple(_replicated(x, mesh) for x in inputs)


def _to_local(mod, outputs, mesh):
    if isinstance(outputs, DTensor):
        return outputs.to_local()
    if isinstance(outputs, tuple):
        return tuple(o.to_local() if isinstance(o, DTensor) else o for o in outputs)
    return outputs


def _to_layout(layout, mod, outputs, mesh):
    if isinstance(outputs, DTensor):
        return outputs.redistribute(mesh, [layout])
    return outputs


class ReplicateParams(ParallelStyle):
    """Whole parameters on every tp rank, as ``Replicate`` DTensors (a leaf module); plain tensors in, plain
    tensors out, or a DTensor laid as ``output_layout`` (``Shard(1)``: this rank's sequence shard, no
    communication)."""

    def __init__(self, *, output_layout=None) -> None:
        super().__init__()
        self.output_layout = output_layout

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        output_fn = _to_local if self.output_layout is None else partial(_to_layout, self.output_layout)
        return distribute_module(module, device_mesh, None, _to_replicate, output_fn)


def _gathered(x):
    return x.redistribute(x.device_mesh, [Replicate()]).to_local() if isinstance(x, DTensor) else x


class GatherSequence(ParallelStyle):
    """Every DTensor input (positional or keyword) all-gathered to a whole plain tensor before the module runs."""

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        def gather(mod, args, kwargs):
            return tuple(_gathered(a) for a in args), {k: _gathered(v) for k, v in kwargs.items()}

        module.register_forward_pre_hook(gather, with_kwargs=True)
        return module
