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

__all__ = ["EngineTable", "OnelineState", "STATE", "Internal", "internal", "cuda_available", "has_trainable", "is_engaged",
           "engaged_model"]


_NO_DEFAULT = object()


class _Held:
    """The engine as its root holds it; a copy or pickle of the root (``copy.deepcopy``, ``torch.save(model)``)
    gets an empty holder, not the engine and its process groups."""

    __slots__ = ("engine",)

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def __deepcopy__(self, memo) -> _Held:
        return _Held(None)

    def __reduce__(self):
        return (_Held, (None,))


class EngineTable:
    """Engaged root model -> its engine (:class:`moreh_ap.oneline.step.Engine`), kept in the root's own
    ``__dict__``: a root and its engine refer to each other and are freed together once the script drops them
    (a ``WeakKeyDictionary`` would keep every engaged model alive through its value). Roots are weakly listed."""

    _ATTR = "_moreh_ap_engine"

    def __init__(self) -> None:
        self._roots: weakref.WeakSet[nn.Module] = weakref.WeakSet()

    def __setitem__(self, root: nn.Module, engine: Any) -> None:
        root.__dict__[self._ATTR] = _Held(engine)
        self._roots.add(root)

    def __getitem__(self, root: nn.Module) -> Any:
        if root not in self._roots:
            raise KeyError(type(root).__name__)
        return root.__dict__[self._ATTR].engine

    def __contains__(self, root: object) -> bool:
        return root in self._roots

    def get(self, root: nn.Module, default: Any = None) -> Any:
        return self[root] if root in self._roots else default

    def pop(self, root: nn.Module, default: Any = _NO_DEFAULT) -> Any:
        if root not in self._roots:
            if default is _NO_DEFAULT:
                raise KeyError(type(root).__name__)
            return default
        self._roots.discard(root)
        return root.__dict__.pop(self._ATTR).engine

    def clear(self) -> None:
        for root in list(self._roots):
            self.pop(root)

    def keys(self) -> list[nn.Module]:
        return list(self._roots)

    def values(self) -> list[Any]:
        return [root.__dict__[self._ATTR].engine for root in list(self._roots)]


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
    engines: EngineTable = field(default_factory=EngineTable)
    """The engine of each engaged root model."""
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
