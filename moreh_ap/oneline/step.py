# The engine of an engaged model: a training call runs the whole step, and .backward() on its loss adds the grads.
"""Models that compute their own loss: a training call returns the model's output structure (HF
``CausalLMOutputWithPast``, a ``(logits, loss)`` tuple, a dict) holding only the step's loss (the other
entries None). The step's forward and backward already ran inside the call, seeded with the optimizer's loss
scale when a loss scaler is known (apex's from ``amp.initialize``, torch's ``GradScaler`` from the step after
its first ``unscale_``), else 1; ``.backward()`` on the returned loss (or on anything computed from it, e.g. ``loss / k``)
adds this step's gradients scaled by the gradient that reaches the loss over that seed, exactly as one device
would.

Models whose loss the script computes: a training call checks that every rank passes the same batch and
returns the whole global batch's outputs (all-gathered over data-parallel ranks, autograd-aware); the
script's own ``backward()`` gives one device's gradients.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._pytree import tree_map

from moreh_ap.oneline.loss_mode import LossMode, check_same_inputs
from moreh_ap.oneline.state import Internal
from moreh_ap.precision_hooks import loss_scale_of
from moreh_ap.runtime.dist import device_for_rank, rank, world_size
from moreh_ap.signals import step_boundary

__all__ = ["Engine", "broadcast_inputs", "inputs_on_device"]


def broadcast_inputs(args, kwargs):
    """Rank 0's inputs on every rank (the script's batch is the global batch), on this rank's device."""
    if world_size() > 1:
        to_cpu = lambda t: t.detach().cpu() if isinstance(t, torch.Tensor) else t  # noqa: E731
        box = [tree_map(to_cpu, args), tree_map(to_cpu, kwargs)] if rank() == 0 else [None, None]
        dist.broadcast_object_list(box, src=0)
        args, kwargs = box
    return inputs_on_device(args, kwargs)


def inputs_on_device(args, kwargs):
    """The call's tensors on this rank's device."""
    device = device_for_rank()
    to_dev = lambda t: t.to(device) if isinstance(t, torch.Tensor) and t.device != device else t  # noqa: E731
    return tree_map(to_dev, args), tree_map(to_dev, kwargs)


class _StepLoss(torch.autograd.Function):
    """The step's loss; its backward adds this step's gradients scaled by the incoming gradient."""

    @staticmethod
    def forward(ctx, anchor, value, step):
        ctx.step = step
        return value.detach().clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.step.apply_grads(grad)
        return None, None, None


class _PendingStep:
    """Gradients of one step, computed with seed ``seed`` (the optimizer's loss scale, else 1), waiting for
    ``.backward()`` on its loss."""

    def __init__(self, params: list, grads: list, seed: float = 1.0) -> None:
        self.params = params
        self.grads = grads
        self.seed = seed

    @torch.no_grad()
    def apply_grads(self, seed: torch.Tensor) -> None:
        scale = float(seed) / self.seed
        for p, g in zip(self.params, self.grads):
            if g is None:
                continue
            add = g if scale == 1.0 else g * scale
            p.grad = add if p.grad is None else p.grad + add


class Engine:
    """One engaged root model: runs training steps through the ParallelModel, evaluation, full state dicts."""

    def __init__(self, root: nn.Module, pm, *, mode: LossMode) -> None:
        self.pm = pm
        """The runtime's ``ParallelModel``."""
        self.pending_inputs = None
        """The engaging call's inputs, already broadcast: its ``call`` uses them instead of broadcasting again."""
        self.params = list(dict.fromkeys(pm.parameters()))
        self.ids = {id(p) for p in root.parameters()} | {id(p) for p in self.params}
        """Ids of the user's and the runtime's parameters (``clip_grad_norm_`` finds the engine by them)."""
        self.root = root
        """The engaged module (the original one under a ``torch.compile`` wrapper)."""
        self.mode = mode
        """Where the loss comes from (the model's output, or the script: :mod:`moreh_ap.oneline.loss_mode`)."""

    def call(self, root: nn.Module, args, kwargs, *, broadcast: bool = True):
        """A call of the engaged model: a whole training step in training mode with grad, else evaluation.

        A model whose loss the script computes: the training forward of the whole batch (outputs gathered).
        It starts at a step boundary (:func:`moreh_ap.signals.step_boundary`: an earlier failure of this rank
        raised at once; Ctrl-C / SIGTERM agreed by every rank when every rank makes the call: all but an
        evaluation at pp = 1 of a model whose loss the script computes, which may run on one rank).
        """
        together = (root.training and torch.is_grad_enabled()) or not self.mode.outside or self.pm.pp > 1
        with step_boundary("the model's call", agree=together):
            return self._call(root, args, kwargs, broadcast=broadcast)

    def _call(self, root: nn.Module, args, kwargs, *, broadcast: bool):
        training = root.training and torch.is_grad_enabled()
        if self.pending_inputs is not None:
            args, kwargs = self.pending_inputs
            self.pending_inputs = None
        elif self.mode.outside:
            with Internal():
                if training:
                    check_same_inputs(args, kwargs)
                args, kwargs = inputs_on_device(args, kwargs)
        elif broadcast:
            with Internal():
                args, kwargs = broadcast_inputs(args, kwargs)
        if training and self.mode.outside:
            with Internal():
                return self.pm.forward_global(*args, **kwargs)
        if training:
            return self._train(args, kwargs)
        return self._evaluate(self.root, args, kwargs)

    def _train(self, args, kwargs):
        kwargs = dict(kwargs)
        if not kwargs.get("use_cache", True):
            kwargs.pop("use_cache")
        previous = [p.grad for p in self.params]  # gradients of earlier steps (accumulation) wait aside
        for p in self.params:
            p.grad = None
        # a loss scaler's scale (apex, GradScaler) seeds the backward, whose intermediates are then scaled as on
        # one device (fp16); .backward() on the returned loss scales by what reaches it over this seed
        seed = loss_scale_of(self.pm.optimizer)
        try:
            with Internal(), self.pm.backward_seed(seed):
                loss = self.pm.train_step(*args, **kwargs)
            grads = [p.grad for p in self.params]
        finally:
            for p, g in zip(self.params, previous):
                p.grad = g
        anchor = torch.zeros((), device=loss.device, requires_grad=True)
        out = _StepLoss.apply(anchor, loss, _PendingStep(self.params, grads, seed))
        return self._output(out)

    def _output(self, loss):
        """The model's output structure holding only ``loss``."""
        return self.mode.location.rebuild(loss) if self.mode.location is not None else loss

    def _evaluate(self, root, args, kwargs):
        if self.pm.pp > 1:
            return self._evaluate_pipelined(args, kwargs)
        # every rank runs rank 0's whole batch on the same (full or all-gathered) weights: same output everywhere
        with Internal():
            return super(type(root), root).__call__(*args, **kwargs)

    def _evaluate_pipelined(self, args, kwargs):
        """The runtime's forward-only pipeline pass: the global batch's mean loss (no logits)."""
        with Internal(), torch.no_grad():
            out = self.pm(*args, **kwargs)
        return self._output(out.loss)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full weights on the CPU on rank 0, meta placeholders elsewhere (a collective;
        :func:`moreh_ap.oneline.state_dicts.model_state_dict`)."""
        from moreh_ap.oneline.state_dicts import model_state_dict

        return model_state_dict(self.pm)
