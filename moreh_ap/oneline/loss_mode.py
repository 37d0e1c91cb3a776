# Where a training call's loss comes from: the model's own output (HF labels, nanoGPT targets, any scalar) or outside.
"""Decided once, at engagement, from the engaging call.

- A Hugging Face causal LM called with ``labels=``: the runtime's token-weighted loss (``num_items_in_batch``
  of the caller honoured); the call returns the model's output type with ``.loss`` only.
- A model whose adapter computes its loss from a target argument (nanoGPT's ``model(X, Y)``): the adapter's
  pipeline split is checked against the model's own forward on one micro-batch.
- Any other model: one forward of one micro-batch (no grad; the global RNG state and the buffers, e.g.
  BatchNorm statistics, restored afterwards) shows whether the output holds a scalar loss (own loss) or
  not (the loss is computed outside the model: the script gets the whole batch's outputs).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map_only

from moreh_ap.models import ModelAdapter, is_hf_model
from moreh_ap.runtime.dist import device_for_rank, rank, world_size
from moreh_ap.runtime.outputs import LossLocation, find_loss
from moreh_ap.precision_hooks import autocast_dtype, autocast_like

__all__ = ["LossMode", "decide_loss_mode", "check_same_inputs", "AdapterMismatchError"]


class AdapterMismatchError(ValueError):
    """The model matched a known family, but the family's pipeline split computes another loss than its forward."""


@dataclass(kw_only=True, slots=True)
class LossMode:
    """How an engaged model's training calls get their loss."""

    kind: str
    """"hf" (HF causal LM with labels), "own" (the loss is in the model's output) or "outside"."""
    location: LossLocation | None = None
    """Where the loss is in the model's output (and the structure a training call returns)."""
    pipeline: bool = True
    """Whether the model may be pipelined (its adapter computes the same loss on the last stage)."""
    why: str = ""
    """One line for the log: why the planner is restricted (empty: it is not)."""

    @property
    def outside(self) -> bool:
        """The loss is computed by the script from the model's outputs."""
        return self.kind == "outside"

    @property
    def output_loss(self) -> Callable | None:
        """What the runtime reads the loss with (models whose output holds it)."""
        return self.location.take if self.kind == "own" else None


def decide_loss_mode(root: nn.Module, args: tuple, kwargs: dict, *, adapter: ModelAdapter,
                     check_adapter: bool = True) -> LossMode:
    """The loss mode of ``root`` for calls like this one (see the module docstring).

    Raises:
        AdapterMismatchError: the adapter's split computes another loss than the model's own forward.
    """
    if is_hf_model(root) and kwargs.get("labels") is not None and _hf_causal(root, adapter):
        from transformers.modeling_outputs import CausalLMOutputWithPast

        tuple_out = kwargs.get("return_dict") is False
        location = (LossLocation("index", key=0, container=tuple, keys=(0,)) if tuple_out
                    else LossLocation("attr", container=CausalLMOutputWithPast))
        return LossMode(kind="hf", location=location)
    target = _target_of(adapter, args, kwargs)
    small_args, small_kwargs = _one_micro_batch(args, kwargs, device=_param_device(root))
    with _no_side_effects(root), torch.no_grad():
        rng = torch.get_rng_state()
        out = root(*small_args, **small_kwargs)
        location = find_loss(out)
        if target is not None and location is not None and check_adapter:
            _check_adapter(adapter, small_args, small_kwargs, location.take(out), rng=rng)
    if location is None:
        return LossMode(kind="outside", pipeline=False,
                        why=f"{type(root).__name__}'s output holds no loss (it is computed outside the model): "
                            "planning one micro-batch and no pipeline (the script's backward runs on the "
                            "whole batch's outputs)")
    if target is not None:
        return LossMode(kind="own", location=location)
    return LossMode(kind="own", location=location, pipeline=False,
                    why=f"{type(root).__name__} computes its loss inside its forward and no pipeline split of it "
                        f"({adapter.name}) computes that loss: planning no pipeline")


def _hf_causal(root: nn.Module, adapter: ModelAdapter) -> bool:
    """A Hugging Face causal LM (its ``loss_function`` is the causal-LM loss the runtime weights by tokens)."""
    return adapter.hf_causal_lm or getattr(root, "loss_type", None) == "ForCausalLM"


def _target_of(adapter: ModelAdapter, args: tuple, kwargs: dict) -> Any:
    """The call's target argument when the adapter computes the model's loss from it (else None)."""
    if adapter.target_arg is None or adapter.stage_loss() is None:
        return None
    name, pos = adapter.target_arg
    if kwargs.get(name) is not None:
        return kwargs[name]
    return args[pos] if len(args) > pos else None


def _param_device(root: nn.Module) -> torch.device:
    return next((p.device for p in root.parameters()), torch.device("cpu"))


def _one_micro_batch(args: tuple, kwargs: dict, *, device: torch.device) -> tuple[tuple, dict]:
    """The first ``batch // world`` samples (at least one) of the call, on the model's device."""
    leaves = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor) and t.dim() > 0]
    batch = leaves[0].shape[0] if leaves else 0
    rows = max(1, batch // max(world_size(), 1))

    def cut(t: torch.Tensor) -> torch.Tensor:
        t = t[:rows] if t.dim() > 0 and t.shape[0] == batch else t
        return t.to(device)

    return tree_map_only(torch.Tensor, cut, args), tree_map_only(torch.Tensor, cut, kwargs)


@contextmanager
def _no_side_effects(root: nn.Module):
    """The global RNG state (CPU and the current CUDA device) and every buffer restored on exit."""
    saved = [(b, b.detach().clone()) for b in root.buffers()]
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            with torch.no_grad():
                for b, value in saved:
                    b.copy_(value)


def _check_adapter(adapter: ModelAdapter, args: tuple, kwargs: dict, expected: torch.Tensor, *,
                   rng: torch.Tensor) -> None:
    """The adapter's whole-model stage + its loss must give the model's own loss on this micro-batch."""
    name, pos = adapter.target_arg
    target = kwargs[name] if kwargs.get(name) is not None else args[pos]
    inputs = [a for i, a in enumerate(args) if i != pos]
    n = len(adapter.blocks())
    with torch.random.fork_rng(devices=[]):  # the same dropout masks as the model's forward had
        torch.set_rng_state(rng)
        stage, _ = adapter.build_stage(0, n, first=True, last=True)
        autocast = autocast_dtype(adapter.model)  # the model's forward runs under autocast (apex O1): the stages do
        if autocast is not None:
            autocast_like(stage, autocast)
        got = adapter.stage_loss()(stage(*inputs), target)
    if not torch.allclose(got.float(), expected.float(), rtol=1e-4, atol=1e-5):
        raise AdapterMismatchError(
            f"advanced parallelization: {type(adapter.model).__name__} matched the {adapter.name} pipeline split, "
            f"but on one micro-batch that split computes the loss {got.item():.6g} and the model's own forward "
            f"{expected.item():.6g}: its forward does something the split does not. Pin a configuration "
            "without pipelining (MOREH_AP_CONFIG with num_stages 1), or register an adapter for this model "
            "(moreh_ap.models.register_adapter)")


def check_same_inputs(args: tuple, kwargs: dict) -> None:
    """Every rank must pass the same batch (a loss computed outside the model: the targets never reach AP).

    A collective (one all-gather of 4 numbers per rank): a float64 checksum of every input tensor
    (count, elements, sum, position-weighted sum), compared with rank 0's.

    Raises:
        ValueError: on every rank, when some rank's inputs differ from rank 0's; names those ranks.
    """
    if world_size() <= 1:
        return
    mine = _checksum(args, kwargs, device=device_for_rank())
    every = [torch.empty_like(mine) for _ in range(world_size())]
    dist.all_gather(every, mine)
    differ = [r for r, c in enumerate(every) if not torch.equal(c, every[0])]
    if differ:
        raise ValueError(
            f"advanced parallelization: the ranks see different batches (rank(s) {differ} differ from rank 0; this "
            f"is rank {rank()}). {_why_same()}")


def _why_same() -> str:
    return ("The model's output holds no loss, so the loss is computed in the script from the outputs and "
            "targets that AP never sees: every rank must pass the same global batch (the same data order, e.g. "
            "the same seed for shuffling; no DistributedSampler). Or compute the loss inside the model (return "
            "it from forward): then AP takes rank 0's batch.")


def _checksum(args: tuple, kwargs: dict, *, device: torch.device) -> torch.Tensor:
    tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
    out = torch.zeros(4, dtype=torch.float64, device=device)
    with torch.no_grad():
        for i, t in enumerate(tensors):
            x = torch.nan_to_num(t.detach().reshape(-1).to(device=device, dtype=torch.float64))
            w = torch.arange(x.numel(), device=device, dtype=torch.float64).remainder_(997).add_(1)
            out += torch.stack([torch.tensor(i + 1.0, dtype=torch.float64, device=device),
                                torch.tensor(float(x.numel()) * (i + 1), dtype=torch.float64, device=device),
                                x.sum() * (i + 1), (x * w).sum()])
    return out
