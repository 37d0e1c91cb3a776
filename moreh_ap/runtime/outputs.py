# The loss inside a model's own output: where it is (ModelOutput .loss, dict "loss", tuple entry) and the rebuild.
"""A model that computes its own loss returns it somewhere in its output: a Hugging Face ``ModelOutput``'s
``.loss``, a dict's ``"loss"``, one entry of a tuple (nanoGPT's ``(logits, loss)``), or the bare scalar.
:func:`find_loss` says where (a :class:`LossLocation`), :meth:`LossLocation.take` reads it from another
output of the same model, and :meth:`LossLocation.rebuild` makes an output of the same structure that
holds only a given loss (the other entries None).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from moreh_ap.errors import InputError

__all__ = ["LossLocation", "find_loss", "is_scalar_loss"]


def is_scalar_loss(value: Any) -> bool:
    """A 0-dim floating-point tensor (what a loss is)."""
    return isinstance(value, torch.Tensor) and value.dim() == 0 and value.is_floating_point()


@dataclass(frozen=True, slots=True)
class LossLocation:
    """Where the loss is in a model's output, and that output's structure."""

    kind: str
    """"tensor" (the output is the loss), "attr" (``out.loss``), "key" (``out["loss"]``), "index" (``out[i]``)."""
    key: Any = None
    """The dict key or tuple index ("key" / "index")."""
    container: type | None = None
    """The output's type ("attr", "key", "index")."""
    keys: tuple = ()
    """The dict's keys ("key") or the tuple's length as ``range`` items ("index")."""
    template: Any = None
    """For "attr" outputs that cannot be built from ``loss=`` alone: the first output, copied with None fields."""

    def take(self, out: Any) -> torch.Tensor:
        """The loss in ``out`` (an output of the same model).

        Raises:
            moreh_ap.errors.InputError: ``out`` holds no scalar loss where the first output had it.
        """
        if self.kind == "tensor":
            value = out
        elif self.kind == "attr":
            value = getattr(out, "loss", None)
        elif isinstance(out, (dict, tuple, list)) and (self.kind == "index" and len(out) > self.key
                                                       or self.kind == "key" and self.key in out):
            value = out[self.key]
        else:
            value = None
        if not is_scalar_loss(value):
            where = {"tensor": "the output", "attr": "output.loss", "key": f"output[{self.key!r}]",
                     "index": f"output[{self.key}]"}[self.kind]
            raise InputError(f"the model's output has no scalar loss at {where} (it had one at engagement): "
                             f"got {type(value).__name__}; a model that computes its own loss must return it at "
                             "every training call (pass the targets every time)")
        return value

    def rebuild(self, loss: torch.Tensor) -> Any:
        """An output of the model's structure holding ``loss`` where its loss was, None elsewhere."""
        if self.kind == "tensor":
            return loss
        if self.kind == "attr":
            if self.template is not None:
                out = copy.copy(self.template)
                out.loss = loss
                return out
            return self.container(loss=loss)
        if self.kind == "key":
            return self.container({k: (loss if k == self.key else None) for k in self.keys})
        items = [loss if i == self.key else None for i in range(len(self.keys))]
        if self.container in (tuple, list):
            return self.container(items)
        return self.container(*items)  # a namedtuple


def find_loss(out: Any) -> LossLocation | None:
    """Where the scalar loss is in ``out``; None when it holds none (the loss is computed outside the model).

    Looked for, in order: the output itself a 0-dim float tensor; an attribute ``loss`` (Hugging Face
    ``ModelOutput``, dataclasses); a mapping's ``"loss"`` key; the first 0-dim float tensor among a
    tuple's or list's entries (nanoGPT's ``(logits, loss)``; Hugging Face's ``return_dict=False`` tuple
    starts with the loss).
    """
    if is_scalar_loss(out):
        return LossLocation("tensor")
    if isinstance(out, dict):
        if is_scalar_loss(out.get("loss")):
            if hasattr(out, "to_tuple"):  # a Hugging Face ModelOutput (a dict with attributes)
                return LossLocation("attr", container=type(out))
            return LossLocation("key", key="loss", container=type(out), keys=tuple(out.keys()))
        return None
    if isinstance(out, (tuple, list)):
        for i, item in enumerate(out):
            if is_scalar_loss(item):
                return LossLocation("index", key=i, container=type(out), keys=tuple(range(len(out))))
        return None
    if is_scalar_loss(getattr(out, "loss", None)):
        return LossLocation("attr", container=type(out), template=_blank(out))
    return None


def _blank(out: Any) -> Any:
    """A shallow copy of ``out`` whose tensor attributes are None (the rebuild's template)."""
    blank = copy.copy(out)
    for name, value in list(vars(blank).items()) if hasattr(blank, "__dict__") else []:
        if isinstance(value, torch.Tensor):
            setattr(blank, name, None)
    return blank
