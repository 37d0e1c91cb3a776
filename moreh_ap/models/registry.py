# The model registry: find_adapter(model) tries the registered families in order, the generic one last.
from __future__ import annotations

from torch import nn

from moreh_ap.models.base import ModelAdapter
from moreh_ap.models.block_list import BlockListAdapter
from moreh_ap.models.generic import GenericAdapter
from moreh_ap.models.gpt2 import GPT2Adapter
from moreh_ap.models.hf_llama import LlamaAdapter
from moreh_ap.models.nanogpt import NanoGPTAdapter
from moreh_ap.models.sequential import SequentialAdapter

__all__ = ["find_adapter", "find_blocks", "register_adapter", "registered_adapters"]

_ADAPTERS: list[type[ModelAdapter]] = [SequentialAdapter, LlamaAdapter, GPT2Adapter, NanoGPTAdapter, BlockListAdapter]
"""The families tried by :func:`find_adapter`, in order; :class:`GenericAdapter` comes after all of them."""


def register_adapter(cls: type[ModelAdapter], *, before: type[ModelAdapter] | None = None) -> type[ModelAdapter]:
    """Add a model family to the registry (usable as a class decorator).

    Args:
        cls: a :class:`ModelAdapter` subclass with its own :meth:`~ModelAdapter.matches`.
        before: the registered family it must be tried before (default: before all of them, so a
            family for a variant of a built-in one wins). Registering a family again moves it.

    Returns:
        ``cls``.

    Raises:
        TypeError: ``cls`` is not a ModelAdapter subclass.
        ValueError: ``before`` is not registered.
    """
    if not (isinstance(cls, type) and issubclass(cls, ModelAdapter)) or cls is GenericAdapter:
        raise TypeError(f"register_adapter({cls!r}): expected a ModelAdapter subclass other than GenericAdapter")
    if before is not None and before not in _ADAPTERS:
        raise ValueError(f"register_adapter(before={before!r}): not a registered family")
    if cls in _ADAPTERS:
        _ADAPTERS.remove(cls)
    _ADAPTERS.insert(0 if before is None else _ADAPTERS.index(before), cls)
    return cls


def registered_adapters() -> tuple[type[ModelAdapter], ...]:
    """The registered families in the order :func:`find_adapter` tries them (the generic one not included)."""
    return tuple(_ADAPTERS)


def find_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter of the first registered family that knows ``model``; the generic one when none does."""
    for cls in _ADAPTERS:
        if cls.matches(model):
            return cls(model)
    return GenericAdapter(model)


def find_blocks(model: nn.Module) -> tuple[str | None, list[str]]:
    """The planner's view of ``model``'s blocks (what the tracer uses).

    Returns:
        ``(container_fqn, block_fqns)``: the FQN of the block container ("" for a model that is its own
        container, e.g. an ``nn.Sequential``) and the FQNs of the blocks in order; ``(None, [])`` when
        the model has no blocks.
    """
    adapter = find_adapter(model)
    fqns = adapter.block_fqns()
    return (adapter.container_path, fqns) if fqns else (None, [])
