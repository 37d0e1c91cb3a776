# Fallback family: blocks found by known paths or the largest identical ModuleList; no pipeline split.
"""Any model no other family knows (OPT, GPT-NeoX, custom models, ...).

Its blocks are looked for at a few known attribute paths of decoder models,
then as the ``nn.ModuleList`` of identical modules that holds the most
parameters. The planner costs these blocks, and at pp = 1 the runtime
checkpoints and FSDP-wraps them one by one, but no stage split is known
(the model's own forward decides what runs between the blocks), so
:attr:`GenericAdapter.supports_pipeline` is False: the planner plans no
pipeline for it and the runtime runs it with one stage.
"""
from __future__ import annotations

from torch import nn

from moreh_ap.models.base import ModelAdapter, block_signature

__all__ = ["GenericAdapter", "KNOWN_BLOCK_PATHS"]

KNOWN_BLOCK_PATHS = (
    "model.layers",
    "transformer.h",
    "model.decoder.layers",
    "gpt_neox.layers",
    "transformer.layers",
    "layers",
    "blocks",
    "h",
)
"""Attribute paths of decoder layer lists, tried in order before the identical-ModuleList search."""


def _at(model: nn.Module, path: str) -> nn.Module | None:
    obj = model
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj if isinstance(obj, nn.Module) else None


def _identical_list(mod: nn.Module) -> bool:
    children = list(mod.children())
    if len(children) < 2:
        return False
    first = block_signature(children[0])
    return all(block_signature(c) == first for c in children[1:])


def find_container_path(model: nn.Module) -> str | None:
    """FQN of ``model``'s block list: a known path, else the largest identical ModuleList; None when none."""
    for path in KNOWN_BLOCK_PATHS:
        mod = _at(model, path)
        if isinstance(mod, (nn.ModuleList, nn.Sequential)) and len(mod) >= 1:
            return path
    best, best_params = None, -1
    for fqn, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and _identical_list(mod):
            n = sum(p.numel() for p in mod.parameters())
            if n > best_params:
                best, best_params = fqn, n
    return best


class GenericAdapter(ModelAdapter):
    """Blocks for the planner and for per-block wrapping at pp = 1; the model runs as one stage."""

    name = "generic (no pipeline split)"
    supports_pipeline = False

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.container_path = find_container_path(model)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return True
