# A GPU script's CUDA calls on a machine without CUDA: accepted as no-ops that leave everything on the CPU.
"""While AP is requested on a machine where ``torch.cuda.is_available()`` is False, the calls a GPU training
script makes to place things and manage the device are accepted instead of failing:

- ``tensor.to("cuda")``, ``tensor.to(torch.device("cuda", i))``, ``tensor.to(i)`` (and with a dtype, which
  is applied): the tensor stays on the CPU (``module.to(...)`` and ``.cuda()`` are handled by
  :mod:`moreh_ap.oneline.patches`, which uses :func:`cpu_instead_of_cuda` for modules too);
- ``torch.cuda.set_device(...)`` and ``torch.cuda.synchronize(...)``: nothing happens.

``torch.cuda.empty_cache()``, ``torch.cuda.manual_seed(s)`` and ``torch.cuda.manual_seed_all(s)`` need no
patch: torch itself does nothing (or queues the seed for a CUDA that never starts) when CUDA is not there.
Creating a tensor with ``device="cuda"`` and ``pin_memory()`` still fail (torch's own error).
Nothing is patched on a machine with CUDA.
"""
from __future__ import annotations

from typing import Any

import torch

from moreh_ap.oneline.state import STATE, cuda_available, internal

__all__ = ["patch_cuda_calls", "restore_cuda_calls", "cpu_instead_of_cuda"]

_NAMES = ("set_device", "synchronize")


def patch_cuda_calls() -> None:
    """Replace ``Tensor.to``, ``torch.cuda.set_device`` and ``torch.cuda.synchronize`` when CUDA is not
    available (the replaced functions are kept in ``STATE.originals`` for :func:`restore_cuda_calls`)."""
    originals = STATE.originals
    if cuda_available() or "tensor_to" in originals:
        return
    originals["tensor_to"] = torch.Tensor.to
    torch.Tensor.to = _tensor_to
    for name in _NAMES:
        originals[f"cuda_{name}"] = getattr(torch.cuda, name)
        setattr(torch.cuda, name, _no_op_named(name))


def restore_cuda_calls() -> None:
    """Put back what :func:`patch_cuda_calls` replaced (nothing when it replaced nothing)."""
    originals = STATE.originals
    if "tensor_to" not in originals:
        return
    torch.Tensor.to = originals.pop("tensor_to")
    for name in _NAMES:
        setattr(torch.cuda, name, originals.pop(f"cuda_{name}"))


def _no_op_named(name: str):
    """A no-op standing in for ``torch.cuda.<name>`` on a machine without CUDA: one function object per name
    (torch.compile's tracing rules map torch functions by object; one object under two names is an error)."""

    def no_op(*_args, **_kwargs) -> None:
        return None

    no_op.__name__ = no_op.__qualname__ = name
    return no_op


def _names_cuda(value: Any) -> bool:
    """Whether ``value``, given as a device argument, names a CUDA device ("cuda", "cuda:1", a CUDA
    ``torch.device``, or an int, which torch reads as an accelerator index)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    if isinstance(value, torch.device):
        return value.type == "cuda"
    if isinstance(value, str):
        try:
            return torch.device(value).type == "cuda"
        except RuntimeError:
            return False
    return False


def cpu_instead_of_cuda(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The arguments of a ``.to(...)`` call with a CUDA device replaced by ``"cpu"`` (dtype and flags kept).

    The device can only be the first positional argument or the ``device=`` keyword.
    """
    if args and _names_cuda(args[0]):
        args = ("cpu", *args[1:])
    if _names_cuda(kwargs.get("device")):
        kwargs = {**kwargs, "device": "cpu"}
    return args, kwargs


def _tensor_to(self, *args, **kwargs):
    if not internal():
        args, kwargs = cpu_instead_of_cuda(args, kwargs)
    return STATE.originals["tensor_to"](self, *args, **kwargs)
