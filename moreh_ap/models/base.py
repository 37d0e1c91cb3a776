# ModelAdapter: what one model family tells the planner (its blocks) and the runtime (stage split, inputs, loss).
"""The base of every model family and the helpers the families share.

The "blocks" convention of the project: a model's repeated layers, in order,
are the children of one container module. Everything that runs before the
first block (embeddings, rotary tables) goes with the first pipeline stage,
everything after the last block (final norm, head) with the last stage. The
planner costs the model block by block and cuts pipelines between blocks; the
runtime builds stage modules that hold the user's own submodule objects (no
copies of weights), so a parameter's original name is found by identity
(:func:`param_names`).
"""
from __future__ import annotations

import copy
import inspect
from collections import OrderedDict
from typing import TYPE_CHECKING, Callable

from torch import nn

if TYPE_CHECKING:
    from moreh_ap.models.tp_plan import TPPlan

__all__ = ["ModelAdapter", "SequenceStage", "block_signature", "clean_name", "is_hf_model", "map_stage_names", "param_names"]


def is_hf_model(model: nn.Module) -> bool:
    """Whether ``model`` is a Hugging Face ``PreTrainedModel`` (checked by class name: transformers not imported)."""
    return any(c.__name__ == "PreTrainedModel" for c in type(model).__mro__)


def block_signature(module: nn.Module) -> tuple:
    """What makes two blocks "identical": class, parameter and buffer shapes/dtypes, frozen flags."""
    params = tuple(
        (name, tuple(p.shape), p.dtype, p.requires_grad) for name, p in module.named_parameters(remove_duplicate=False)
    )
    buffers = tuple((name, tuple(b.shape), b.dtype) for name, b in module.named_buffers())
    return (type(module), params, buffers)


class BlockSlice(nn.Module):
    """Some blocks of a list, registered under their original indices; iterates them in order."""

    def __init__(self, items: list[tuple[str, nn.Module]]) -> None:
        super().__init__()
        for name, block in items:
            self.add_module(name, block)

    def __iter__(self):
        return iter(self._modules.values())

    def __len__(self) -> int:
        return len(self._modules)

    def values(self):
        return self._modules.values()


class SequenceStage(nn.Module):
    """A pipeline stage module whose edges carry a sequence-parallel residual stream.

    With a tensor-parallel plan that keeps the residual stream sequence-sharded (``TPPlan.sequence_parallel``),
    the runtime sets :attr:`sequence_mesh`: a stage then sends its rank's sequence shard (a plain tensor, as
    pipeline stages send: 1/tp of the activations) and the next stage rebuilds the ``Shard(1)`` DTensor.
    """

    sequence_mesh = None
    """The tp mesh of the sequence-sharded stream (None: the stage's edges carry plain whole tensors)."""

    def sequence_in(self, x):
        """A received activation as the sequence-sharded DTensor the blocks expect (``x`` without a mesh)."""
        from torch.distributed.tensor import DTensor, Shard

        if self.sequence_mesh is None or isinstance(x, DTensor):
            return x
        return DTensor.from_local(x, self.sequence_mesh, [Shard(1)], run_check=False)

    @staticmethod
    def sequence_out(h):
        """This rank's sequence shard of an activation to send (``h`` when it is a plain tensor)."""
        from torch.distributed.tensor import DTensor

        return h.to_local() if isinstance(h, DTensor) else h


class GPTLayoutStage(SequenceStage):
    """A pipeline stage of a GPT laid out as ``transformer.{wte, wpe, drop, h, ln_f}`` + ``lm_head`` (Hugging
    Face GPT-2, nanoGPT): the embeddings on the first stage, the head on the last; families add ``forward``."""

    def __init__(self, model: nn.Module, blocks: list[tuple[str, nn.Module]], first: bool, last: bool) -> None:
        super().__init__()
        tr = model.transformer
        self.first, self.last = first, last
        self.wte = tr.wte if first else None
        self.wpe = tr.wpe if first else None
        self.drop = tr.drop if first else None
        self.h = BlockSlice(blocks)
        self.ln_f = tr.ln_f if last else None
        self.lm_head = model.lm_head if last else None


def shallow_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` sharing its children/params but with its own registries."""
    new = copy.copy(module)
    new._modules = OrderedDict(module._modules)
    new._parameters = OrderedDict(module._parameters)
    new._buffers = OrderedDict(module._buffers)
    return new


class ModelAdapter:
    """One model family: where its blocks are and how to run a slice of it.

    A family is a subclass that sets :attr:`name` and :attr:`container_path`
    (or overrides :meth:`container`), says which models it knows
    (:meth:`matches`) and builds stage modules (:meth:`build_stage`). The
    planner reads :meth:`block_fqns` (through the tracer), the runtime reads
    :meth:`blocks` and :meth:`build_stage`: both see the same module objects
    in the same order, which is what lets the planner's costs hold at run time.

    Attributes:
        name: the family's name, shown in the runtime's log line and the planner's graph.
        supports_pipeline: whether :meth:`build_stage` can cut the model (False: pp = 1 only; the
            planner then plans no pipeline, and the runtime still wraps the blocks one by one).
        hf_causal_lm: the stages are a Hugging Face causal LM's (``input_ids`` in, logits out,
            the model's own ``loss_function`` on the last stage).
        container_path: FQN of the module whose children are the blocks ("" = the model itself,
            None = no blocks known).
    """

    name = "base"
    supports_pipeline = True
    hf_causal_lm = False
    container_path: str | None = None
    target_arg: tuple[str, int] | None = None
    """``(keyword, position)`` of the forward's target argument when the model computes its own loss from it
    and :meth:`stage_loss` computes the same loss on the last pipeline stage (nanoGPT: ``("targets", 1)``)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        """Whether this family knows ``model`` (the registry tries families in order)."""
        raise NotImplementedError

    # ----------------------------------------------------------------- blocks
    def container(self) -> nn.Module | None:
        """The module holding the blocks (its children are the blocks), or None when none is known."""
        if self.container_path is None:
            return None
        return self.model.get_submodule(self.container_path)

    def blocks(self) -> list[tuple[str, nn.Module]]:
        """The blocks in order, with their names inside :meth:`container`."""
        container = self.container()
        return [] if container is None else list(container.named_children())

    def block_fqns(self) -> list[str]:
        """The blocks' FQNs in the model, in order (what the planner's graph nodes record)."""
        prefix = f"{self.container_path}." if self.container_path else ""
        return [prefix + name for name, _ in self.blocks()]

    # ---------------------------------------------------------------- runtime
    def build_stage(self, lo: int, hi: int, *, first: bool, last: bool) -> tuple[nn.Module, nn.Module]:
        """``(stage module, its block container)`` running blocks ``lo:hi`` (+ pre parts if first, post if last).

        Raises:
            NotImplementedError: the family cannot be pipelined (:attr:`supports_pipeline` is False).
        """
        raise NotImplementedError(f"{self.name}: {type(self.model).__name__} cannot be cut into pipeline stages")

    @property
    def hf_model(self) -> bool:
        """Whether the model is a Hugging Face model (``labels=`` / ``input_ids=`` handled the HF way)."""
        return is_hf_model(self.model)

    def forward_arg_names(self) -> tuple[str, ...]:
        """The names of the model's ``forward`` parameters that can be given positionally, in order (to bind a
        call's positional inputs to names, e.g. a Hugging Face ``model(ids, mask)`` cut into stages)."""
        kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        try:
            params = inspect.signature(self.model.forward).parameters.values()
        except (TypeError, ValueError):
            return ()
        return tuple(p.name for p in params if p.kind in kinds)

    def loss_function(self) -> Callable | None:
        """The Hugging Face model's own ``loss_function`` (None for other models: the user's loss_fn is used)."""
        return getattr(self.model, "loss_function", None) if self.hf_model else None

    def stage_loss(self) -> Callable | None:
        """``loss(last stage output, target)``: the loss the model's own forward computes from its
        :attr:`target_arg`, for pipelines (None: the family computes no loss of its own)."""
        return None

    def vocab_size(self) -> int | None:
        """``model.config.vocab_size`` when the model has one (the HF loss needs it)."""
        return getattr(getattr(self.model, "config", None), "vocab_size", None)

    def tp_plan(self) -> "TPPlan | None":
        """The family's tensor-parallel plan (:class:`~moreh_ap.models.tp_plan.TPPlan`), or None: no tensor
        parallelism for this family (the planner plans ``tp = 1`` and the runtime refuses ``tp > 1``).

        Families with one: Hugging Face Llama-family and GPT-2 (Megatron-style column-split q/k/v and MLP
        input, row-split attention output and MLP output, vocabulary-parallel embedding and head).
        """
        return None


def param_names(model: nn.Module) -> dict[int, list[str]]:
    """``id(tensor) -> [original names]`` for every parameter and buffer (tied ones have several names)."""
    names: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
    for n, b in model.named_buffers(remove_duplicate=False):
        names.setdefault(id(b), []).append(n)
    return names


def clean_name(name: str) -> str:
    """A stage-module name without the checkpoint wrapper's prefix."""
    return name.replace("_checkpoint_wrapped_module.", "")


def map_stage_names(stage: nn.Module, ids: dict[int, list[str]]) -> dict[str, list[str]]:
    """``stage name -> [original names]`` for the parameters and buffers of ``stage``."""
    out: dict[str, list[str]] = {}
    for n, t in list(stage.named_parameters(remove_duplicate=False)) + list(stage.named_buffers(remove_duplicate=False)):
        if id(t) in ids:
            out[n] = ids[id(t)]
    return out
