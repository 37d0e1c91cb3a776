# What a block saves on its residual stream: the tensors sequence parallelism keeps on 1/tp of the sequence.
"""Counted while a block's forward is traced (:mod:`moreh_ap.graph.tracing`), per node, out of its saved bytes:

- everything a norm module saves (a class named ``...Norm``: LayerNorm, the HF RMSNorms): its input and
  statistics;
- what a dropout module saves when its output is the size of the block's input (the residual stream: GPT-2's
  ``resid_dropout`` and MLP dropout), not a dropout of attention probabilities (split by heads, not by sequence).

The tensor-parallel planner divides these by tp when the plan is sequence-parallel
(:attr:`moreh_ap.graph.model_graph.NodeInfo.norm_saved_bytes`).
"""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

__all__ = ["SequenceSaved"]


def _numel(x: Any) -> int:
    return x.numel() if hasattr(x, "numel") else 0


class SequenceSaved:
    """Hooks on a block's norm and dropout modules that add their saved bytes to ``saved_of(node)``."""

    def __init__(self, saved: Callable[[], tuple[dict[str, int], str]]) -> None:
        """``saved()`` gives the recorder's ``{node: saved bytes}`` and the node being traced."""
        self._saved = saved
        self.counted: dict[str, int] = {}
        """``{node: saved bytes on the residual stream}``."""
        self.block_numel = 0
        """Elements of the block being traced's hidden input (set by the tracer's block pre-hook)."""
        self._marks: list[int] = []

    def install(self, block: nn.Module) -> list:
        """Hooks on ``block``'s norm and dropout modules; returns their handles."""
        handles = []
        for sub in block.modules():
            name = type(sub).__name__
            if name.endswith("Norm") or isinstance(sub, nn.Dropout):
                handles.append(sub.register_forward_pre_hook(self._enter))
                handles.append(sub.register_forward_hook(self._exit))
        return handles

    def _so_far(self) -> int:
        saved, node = self._saved()
        return saved.get(node, 0)

    def _enter(self, mod, args) -> None:
        self._marks.append(self._so_far())

    def _exit(self, mod, args, out) -> None:
        delta = self._so_far() - self._marks.pop()
        if not isinstance(mod, nn.Dropout) or _numel(out) == self.block_numel:
            node = self._saved()[1]
            self.counted[node] = self.counted.get(node, 0) + delta
