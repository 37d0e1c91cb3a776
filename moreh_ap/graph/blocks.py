# Block detection: find a model's repeated layers (the units a pipeline split cuts between).
"""The "blocks" of a model, shared convention between planner and runtime.

Blocks are the model's repeated layers in order: Hugging Face Llama-family
``model.layers``, GPT-2 ``transformer.h``, the children of an
``nn.Sequential``, or any ``nn.ModuleList`` of identical modules (the one
holding the most parameters wins). Everything before the first block goes
with the first stage, everything after the last block with the last stage.
"""
from __future__ import annotations

from torch import nn

# Known decoder layouts, tried first (attribute path of the ModuleList).
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


def block_signature(module: nn.Module) -> tuple:
    """What makes two blocks "identical": class, parameter and buffer shapes/dtypes, frozen flags."""
    params = tuple(
        (name, tuple(p.shape), p.dtype, p.requires_grad) for name, p in module.named_parameters(remove_duplicate=False)
    )
    buffers = tuple((name, tuple(b.shape), b.dtype) for name, b in module.named_buffers())
    return (type(module), params, buffers)


def _get(model: nn.Module, path: str) -> nn.Module | None:
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


def _num_params(mod: nn.Module) -> int:
    return sum(p.numel() for p in mod.parameters())


def find_blocks(model: nn.Module) -> tuple[str | None, list[str]]:
    """Locate the repeated layers.

    Args:
        model: any ``nn.Module``.

    Returns:
        ``(container_fqn, block_fqns)``: the FQN of the container ("" for the
        model itself when it is an ``nn.Sequential``) and the FQNs of its
        children in order. ``(None, [])`` when no blocks are found.
    """
    if isinstance(model, nn.Sequential) and len(model) >= 1:
        return "", [name for name, _ in model.named_children()]
    for path in KNOWN_BLOCK_PATHS:
        mod = _get(model, path)
        if isinstance(mod, (nn.ModuleList, nn.Sequential)) and len(mod) >= 1:
            return path, [f"{path}.{name}" for name, _ in mod.named_children()]
    best, best_params = None, -1
    for fqn, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and _identical_list(mod):
            n = _num_params(mod)
            if n > best_params:
                best, best_params = fqn, n
    if best is None:
        return None, []
    mod = _get(model, best) if best else model
    return best, [f"{best}.{name}" if best else name for name, _ in mod.named_children()]
