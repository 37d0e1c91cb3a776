# ParallelStyles torch lacks: column/row splits of Hugging Face's Conv1D, and replicated parameters on a tp mesh.
"""Styles for :func:`torch.distributed.tensor.parallel.parallelize_module`, next to torch's own.

- :class:`Conv1DColwise` / :class:`Conv1DRowwise`: ``transformers``' ``Conv1D`` holds its weight as
  ``(in, out)`` (transposed from ``nn.Linear``): the column split shards weight dim 1 and the bias, the row
  split weight dim 0 (bias replicated); inputs and outputs as torch's Colwise/RowwiseParallel.
- :class:`ReplicateParams`: a module whose parameters every tp rank holds whole (norms, position
  embeddings): they become ``Replicate`` DTensors on the tp mesh, plain inputs are taken as replicated and the
  outputs given back as plain tensors. Then every parameter of a tensor-parallel model is a DTensor, and a
  norm counts the replicated ones once (:mod:`moreh_ap.optim.norms`).
"""
from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel

__all__ = ["Conv1DColwise", "Conv1DRowwise", "ReplicateParams"]


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


def _to_replicate(mod, inputs, mesh):
    return tuple(DTensor.from_local(x, mesh, [Replicate()], run_check=False)
                 if isinstance(x, torch.Tensor) and not isinstance(x, DTensor) else x for x in inputs)


def _to_local(mod, outputs, mesh):
    if isinstance(outputs, DTensor):
        return outputs.to_local()
    if isinstance(outputs, tuple):
        return tuple(o.to_local() if isinstance(o, DTensor) else o for o in outputs)
    return outputs


class ReplicateParams(ParallelStyle):
    """Whole parameters on every tp rank, as ``Replicate`` DTensors; plain tensors in and out (a leaf module)."""

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        return distribute_module(module, device_mesh, None, _to_replicate, _to_local)
