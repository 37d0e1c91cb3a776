# Step execution: one global batch through this rank's stages (micro-batch loop or pipeline schedule), and eval.
"""How one training step (or evaluation forward) runs on a rank.

:meth:`StepRunner.step`: normalize the call (:mod:`moreh_ap.runtime.inputs`), take this dp rank's rows,
choose the micro-batch count, then

- pp = 1: a loop over micro-batches, each forward + backward, gradient sync on the last one (DDP,
  replicate) or on every one (FSDP2: only sharded gradients accumulate);
- pp > 1: the config's pipeline schedule (built once per micro-batch count and input shapes), with the
  loss computed on the last stage;
- a Hugging Face causal LM's own loss with tp > 1: forward, loss and backward under
  :func:`~moreh_ap.runtime.vocab_loss.vocab_parallel_loss` (the logits stay vocabulary-sharded);
- evaluation with pp > 1: a forward-only schedule; the last stage scores its whole local batch.

After a training step the tied gradients are summed across pipeline ranks; the loss (the mean over the
global batch) is all-reduced so that every rank returns the same fp32 scalar (tensor-parallel ranks share one
loss: it counts once).
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
import torch.distributed as dist

from moreh_ap.config import ParallelConfig
from moreh_ap.errors import InputError
from moreh_ap.layout import ParallelLayout
from moreh_ap.log import logger
from moreh_ap.runtime.apply import Stage, Wrapper, build_schedule
from moreh_ap.runtime.inputs import StepInputs, dp_slice, micro_batches, prepare_inputs, shape_key
from moreh_ap.runtime.loss import LossPlan, extract_logits, hf_num_items
from moreh_ap.runtime.vocab_loss import vocab_parallel_loss

__all__ = ["LossSource", "StepRunner", "to_device"]


def to_device(obj: Any, device: torch.device) -> Any:
    """``obj`` with every tensor in it (through tuples, lists and dicts) on ``device``; the rest as is."""
    if isinstance(obj, torch.Tensor):
        return obj if obj.device == device else obj.to(device, non_blocking=True)
    if isinstance(obj, tuple):
        return tuple(to_device(x, device) for x in obj)
    if isinstance(obj, list):
        return [to_device(x, device) for x in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


@dataclass(kw_only=True, slots=True)
class LossSource:
    """Where a step's loss comes from."""

    hf_model: bool
    """The model is a Hugging Face model (``labels=`` selects its own loss)."""
    hf_loss: Callable | None
    """The HF model's ``loss_function`` (None for other models)."""
    vocab_size: int | None
    """The model config's vocabulary size (the HF loss needs it)."""
    loss_fn: Callable | None
    """The user's ``loss_fn(output, target)`` given to ``parallelize``."""
    output_loss: Callable | None = None
    """Reads the loss from the model's own output (``parallelize(..., output_loss=...)``)."""
    adapter_loss: Callable | None = None
    """The adapter's ``loss(logits, target)`` on the last pipeline stage (nanoGPT), for ``output_loss`` models."""
    target_arg: tuple[str, int] | None = None
    """``(keyword, position)`` of the model's target argument that ``adapter_loss`` takes."""
    arg_names: tuple[str, ...] = ()
    """The model's ``forward`` parameters that can be given positionally, in order (binds a pipelined Hugging
    Face call's positional inputs to their names)."""


class StepRunner:
    """Runs training steps and evaluation forwards over this rank's (wrapped) stages."""

    def __init__(self, stages: list[Stage], *, config: ParallelConfig, layout: ParallelLayout, dp_rank: int,
                 device: torch.device, wrapper: Wrapper, pp_group: Any, loss: LossSource,
                 after_backward: Callable[[], None], tp_rank: int = 0) -> None:
        """
        Args:
            stages: this rank's stages, wrapped.
            config: the applied config (micro-batches, schedule, mixed precision).
            layout: the run's layout.
            dp_rank: this rank's data-parallel coordinate.
            device: this rank's device.
            wrapper: the data-parallel wrapper around the stages.
            pp_group: the pipeline process group (None without a pipeline).
            loss: where the loss comes from.
            after_backward: called after the backward of a training step (sums tied gradients).
            tp_rank: this rank's tensor-parallel coordinate (every tp rank computes the same loss: only
                tp rank 0's counts in the loss all-reduce).
        """
        self.stages = stages
        self.config = config
        self.layout = layout
        self.dp_rank = dp_rank
        self.device = device
        self.wrapper = wrapper
        self.pp_group = pp_group
        self.loss = loss
        self.after_backward = after_backward
        self.tp_rank = tp_rank
        self.autocast = config.mixed_precision and wrapper in (Wrapper.NONE, Wrapper.DDP)
        self.schedules: dict[Any, Any] = {}
        """Pipeline schedules built so far, by (kind, micro-batches, input shapes)."""
        self._plan: LossPlan | None = None
        self.grad_seed = 1.0
        """What a training step's backward is seeded with (a loss scale: the gradients left are the loss's times
        it; the returned loss is not scaled). Set by ``ParallelModel.backward_seed``."""

    # ----------------------------------------------------------------------------- one step
    def step(self, args: tuple, target: Any, kwargs: dict[str, Any], *, train: bool) -> torch.Tensor:
        """One global batch: forward + backward (``train``) or forward only; the mean loss on every rank."""
        layout = self.layout
        src = self.loss
        inputs = prepare_inputs(args, target, kwargs, hf_model=src.hf_model, pipelined=layout.pp > 1,
                                has_loss_fn=src.loss_fn is not None, output_loss=src.output_loss is not None,
                                target_arg=src.target_arg if src.adapter_loss is not None else None,
                                arg_names=src.arg_names)
        if layout.pp > 1:
            self._check_sequence_split(inputs.args)
        mine, local = dp_slice(inputs, dp=layout.dp, dp_rank=self.dp_rank, pipelined=layout.pp > 1)
        mine = replace(mine, args=to_device(mine.args, self.device), kwargs=to_device(mine.kwargs, self.device),
                       target=to_device(mine.target, self.device))  # users feed CPU tensors (a DataLoader)
        # an uneven split (short last batch, loss_fn model): one micro-batch, weighted by this rank's samples
        nmb = self.micro_batch_count(local) if mine.batch % layout.dp == 0 else 1
        plan = self._loss_plan(inputs, local=local, nmb=nmb)
        if not train:
            value = self._eval_pipeline(mine, nmb, plan, local)
        elif layout.pp == 1:
            value = self._run_local(mine, nmb, plan, local)
        else:
            value = self._run_pipeline(mine, nmb, plan)
        if train:
            self.after_backward()
        loss = torch.as_tensor(value, dtype=torch.float32).reshape(()).to(self.device)
        if self.tp_rank != 0:  # the tp group computed one loss: it counts once (the mean is over dp)
            loss = torch.zeros_like(loss)
        if layout.world_size > 1:
            dist.all_reduce(loss)
        return loss

    def forward_rows(self, args: tuple, kwargs: dict[str, Any]) -> tuple[Any, int, list[int]]:
        """This dp rank's rows of the global batch through the model (pp = 1), with grad, as ONE forward;
        the backward is the caller's (a loss computed outside the model).

        Returns:
            ``(output, this rank's rows, every dp rank's rows)``.

        Raises:
            InputError: no input tensor, or fewer samples than dp ranks.
        """
        tensors = [t for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor) and t.dim() > 0]
        if not tensors:
            raise InputError("the model's forward got no batched input tensor")
        whole = StepInputs(args=tuple(args), kwargs=dict(kwargs), target=None, hf_labels=False,
                           batch=tensors[0].shape[0])
        dp = self.layout.dp
        mine, local = dp_slice(whole, dp=dp, dp_rank=self.dp_rank)
        sizes = [whole.batch // dp + (1 if r < whole.batch % dp else 0) for r in range(dp)]
        a, k = to_device(mine.args, self.device), to_device(mine.kwargs, self.device)
        self._set_sync(True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16) if self.autocast else nullcontext():
            out = self.stages[0].module(*a, **k)
        return out, local, sizes

    def _loss_plan(self, inputs: StepInputs, *, local: int, nmb: int) -> LossPlan:
        """How this global batch's loss is split (see :mod:`moreh_ap.runtime.loss`)."""
        src = self.loss
        if inputs.hf_labels:
            count = hf_num_items(inputs.target) if inputs.num_items is None else inputs.num_items
            return LossPlan(hf_loss=src.hf_loss, vocab_size=src.vocab_size, user_loss=None, num_items=count,
                            micro_batch_samples=local // nmb, dp=self.layout.dp)
        return LossPlan(hf_loss=None, vocab_size=src.vocab_size, user_loss=src.loss_fn or src.adapter_loss,
                        num_items=inputs.batch, micro_batch_samples=local // nmb, dp=self.layout.dp,
                        output_loss=src.output_loss if inputs.from_output else None)

    def micro_batch_count(self, local: int) -> int:
        """The config's micro-batch count, or the largest valid smaller one that divides a short batch.

        Raises:
            InputError: no micro-batch count is valid for ``local`` samples per dp rank.
        """
        cfg, dp = self.config, self.layout.dp
        for n in range(min(cfg.num_micro_batches, local), 0, -1):
            if local % n:
                continue
            try:
                cfg.replace(num_micro_batches=n, batch_per_device=local // n).validate(self.layout.world_size)
            except ValueError:
                continue
            if n != cfg.num_micro_batches:
                logger.warning(f"batch of {local * dp} samples: using {n} micro-batches instead of "
                               f"{cfg.num_micro_batches}")
            return n
        raise InputError(f"a global batch of {local * dp} samples cannot be split into dp({dp}) x micro-batches "
                         f"valid for schedule {cfg.schedule!r} with num_stages({self.layout.pp})")

    # ----------------------------------------------------------------------------- pp = 1
    def _run_local(self, inputs: StepInputs, nmb: int, plan: LossPlan, local: int) -> torch.Tensor:
        module = self.stages[0].module
        mbs = list(zip(micro_batches(inputs.args, nmb, local), micro_batches(inputs.kwargs, nmb, local),
                       micro_batches(inputs.target, nmb, local)))
        total = torch.zeros((), device=self.device)
        vocab = self._vocab_parallel(plan)
        for i in range(nmb):
            self._set_sync(i == nmb - 1)
            with vocab_parallel_loss(vocab):  # forward, loss and backward (torch's loss_parallel needs all three)
                with torch.autocast(self.device.type, dtype=torch.bfloat16) if self.autocast else nullcontext():
                    a, k, t = mbs[i]
                    out = module(*a, **k)
                    loss = plan.piece(out if plan.output_loss is not None else extract_logits(out), t)
                del out  # the logits are not saved for backward: let them go before it (one logits-sized tensor)
                (loss if self.grad_seed == 1.0 else loss * self.grad_seed).backward()
            total += loss.detach().float() / self.layout.dp
        self._set_sync(True)
        return total

    def _vocab_parallel(self, plan: LossPlan) -> bool:
        """The engine computes the model's own causal-LM loss over a tensor-parallel group: on the head's
        vocabulary-sharded logits (:mod:`moreh_ap.runtime.vocab_loss`; every other reader gets whole logits)."""
        return self.layout.tp > 1 and plan.hf_loss is not None and plan.output_loss is None

    def _set_sync(self, on: bool) -> None:
        """Gradient sync for the next backward: DDP accumulates locally until the last micro-batch; FSDP2
        (distribute_param) reduce-scatters after every micro-batch so that only sharded gradients accumulate."""
        module = self.stages[0].module
        if self.wrapper is Wrapper.DDP:
            module.require_backward_grad_sync = on
        elif self.wrapper is Wrapper.REPLICATE:
            module.set_requires_gradient_sync(on)

    # ----------------------------------------------------------------------------- pp > 1
    def _schedule(self, key: tuple, nmb: int, loss_fn: Callable | None):
        if key not in self.schedules:
            self.schedules[key] = build_schedule(self.stages, schedule=self.config.schedule,
                                                 total_stages=self.layout.total_stages, n_microbatches=nmb,
                                                 pp_group=self.pp_group, device=self.device, loss_fn=loss_fn)
        return self.schedules[key]

    def _holds_last(self) -> bool:
        return any(s.is_last for s in self.stages)

    def _stage_args(self, args: tuple) -> tuple:
        """The positional inputs this rank gives the schedule: the model's on the rank holding the first stage,
        none elsewhere (later stages get activations; torch 2.11's PipelineStage refuses positional inputs on
        them, 2.13's ignores them). Keyword inputs go to every stage."""
        return args if any(s.is_first for s in self.stages) else ()

    def _check_sequence_split(self, args: tuple) -> None:
        """Sequence-parallel stages send equal sequence shards: the sequence length must divide by tp.

        Raises:
            InputError: it does not (checked on every rank before the schedule runs).
        """
        tp = self.layout.tp
        if tp == 1 or not any(getattr(s.module, "sequence_mesh", None) is not None for s in self.stages):
            return
        seq = next((a.shape[1] for a in args if isinstance(a, torch.Tensor) and a.dim() >= 2), None)
        if seq is not None and seq % tp:
            raise InputError(f"a sequence of {seq} positions cannot be split over tp={tp} between pipeline stages "
                             f"(sequence parallelism sends 1/tp of it): pad the batch to a multiple of {tp}, or "
                             "use num_stages=1 (uneven sequences work without a pipeline)")

    def _run_pipeline(self, inputs: StepInputs, nmb: int, plan: LossPlan) -> torch.Tensor:
        vocab = self._vocab_parallel(plan)  # the last stage's logits sharded: a schedule of their own
        schedule = self._schedule((nmb, vocab, *shape_key(inputs.args, inputs.kwargs)), nmb, self._pipeline_loss)
        self._plan = plan
        losses: list[torch.Tensor] = []
        holds_last = self._holds_last()
        # return_outputs=False: the last stage would otherwise keep every micro-batch's output (the logits)
        # until the end of the step, to merge them; training uses the losses only. The schedule runs the loss
        # and its backward inside step(): the whole step under the vocabulary-parallel loss
        with vocab_parallel_loss(vocab):
            schedule.step(*self._stage_args(inputs.args), target=inputs.target if holds_last else None,
                          losses=losses, return_outputs=False, **inputs.kwargs)
        if not holds_last:
            return torch.zeros((), device=self.device)
        return torch.stack([l.detach().float() for l in losses]).sum() / (self.layout.dp * self.grad_seed)

    def _eval_pipeline(self, inputs: StepInputs, nmb: int, plan: LossPlan, local: int) -> torch.Tensor:
        """Forward-only schedule (no loss_fn); the last stage scores its whole local batch at once."""
        schedule = self._schedule(("eval", nmb, *shape_key(inputs.args, inputs.kwargs)), nmb, None)
        out = schedule.step(*self._stage_args(inputs.args), **inputs.kwargs)
        if not self._holds_last():
            return torch.zeros((), device=self.device)
        plan.micro_batch_samples = local
        return plan.piece(out, inputs.target).detach().float() / self.layout.dp

    def _pipeline_loss(self, output, target):
        piece = self._plan.piece(output, target)
        return piece if self.grad_seed == 1.0 else piece * self.grad_seed  # the schedule's backward seed
