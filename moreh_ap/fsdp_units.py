# The FSDP2 unit rule: which modules outside the blocks get a fully_shard unit of their own.
"""One rule, read by the runtime (which wraps modules) and the planner (which models the wrapping).

The runtime calls ``fully_shard`` on every block, on every module outside the blocks that
:func:`is_own_unit` accepts (embeddings, heads: as torchtitan does), then on the stage root, which
keeps everything else (norms, tied parameters). A module of its own is gathered only around its own
forward and backward, and its gradients are reduce-scattered right after its backward.
"""
from __future__ import annotations

__all__ = ["OWN_UNIT_MIN_FRACTION", "is_own_unit"]

OWN_UNIT_MIN_FRACTION = 1 / 8
"""A module outside the blocks is its own unit when it owns at least this fraction of an average block's parameters."""


def is_own_unit(numel: int, *, avg_block_numel: float, shared: bool) -> bool:
    """Does a module outside the blocks with ``numel`` own parameter elements get its own FSDP unit?

    Args:
        numel: parameter elements the module owns directly (not through children).
        avg_block_numel: the average block's parameter elements on that stage.
        shared: some of its parameters are also owned by another module (tied) or by a block.
    """
    return numel > 0 and not shared and numel >= OWN_UNIT_MIN_FRACTION * avg_block_numel
