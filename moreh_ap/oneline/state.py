# The one-line mode's process state: what is patched, what was seen before engagement, the engaged models.
"""One :class:`OnelineState` per process (``STATE``), read and written by the other one-line modules."""
from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from moreh_ap.ap_options import APOptions

__all__ = ["OnelineState", "STATE", "Internal", "internal", "cuda_available", "has_trainable", "is_engaged",
           "engaged_model"]


@dataclass(kw_only=True, slots=True)
class OnelineState:
    """What the hooks share: the saved torch entry points, the user's objects seen so far, the engines."""

    installed: bool = False
    """The hooks are in place."""
    cpu_only: bool = False
    """Only the CPU ``.cuda()`` acceptance is installed (AP requested but turned off)."""
    engaged: bool = False
    """A root model runs under AP (the probe is gone)."""
    options: APOptions = field(default_factory=APOptions)
    """The user's search options, given by :func:`moreh_ap.oneline.install`; the planner honours them."""
    originals: dict[str, Any] = field(default_factory=dict)
    """The torch functions the hooks replaced, by short name, restored by ``uninstall``."""
    optimizers: weakref.WeakSet[torch.optim.Optimizer] = field(default_factory=weakref.WeakSet)
    """Every optimizer created while the hooks are in place (the root probe looks for their parameters)."""
    deferred: weakref.WeakSet[nn.Module] = field(default_factory=weakref.WeakSet)
    """Modules whose ``.cuda()`` waits for engagement."""
    engines: weakref.WeakKeyDictionary[nn.Module, Any] = field(default_factory=weakref.WeakKeyDictionary)
    """The engine (:class:`moreh_ap.oneline.step.Engine`) of each engaged root model."""
    warned: set[str] = field(default_factory=set)
    """Warnings already given once."""


STATE = OnelineState()
_tls = threading.local()


def is_engaged() -> bool:
    """True once a root model runs under AP in this process."""
    return STATE.engaged


def engaged_model() -> nn.Module | None:
    """The engaged root model (None before engagement)."""
    for root in list(STATE.engines.keys()):
        return root
    return None


def internal() -> bool:
    """True inside :class:`Internal`: the library's own torch calls, which the hooks let through."""
    return getattr(_tls, "internal", 0) > 0


class Internal:
    """While set, patched methods and swapped classes behave as plain torch (the runtime's own calls)."""

    def __enter__(self) -> None:
        _tls.internal = getattr(_tls, "internal", 0) + 1

    def __exit__(self, *exc) -> None:
        _tls.internal -= 1


def cuda_available() -> bool:
    """``torch.cuda.is_available()``, False when asking fails."""
    try:
        return torch.cuda.is_available()
    except Exception:
        return False


def has_trainable(module: nn.Module) -> bool:
    """Whether ``module`` holds a parameter with ``requires_grad``."""
    return any(p.requires_grad for p in module.parameters())
