# Standing aside: a script that distributes itself (its own process group, DDP or FSDP) runs as written, AP off.
"""At the root's first training forward the probe asks :func:`distributes_itself`. A script that set up
its own distribution (it initialized torch.distributed itself, or its model is wrapped in
``DistributedDataParallel``, FSDP1's ``FullyShardedDataParallel`` or FSDP2's ``fully_shard``) already
decides what each rank does (e.g. a ``DistributedSampler`` gives each rank other data): taking it over
would change its training. AP then stands aside (:func:`stand_aside`): one warning on rank 0, every hook
removed, and the script runs as written.
"""
from __future__ import annotations

from collections.abc import Callable

import torch.distributed as dist
from torch import nn

from moreh_ap.log import logger
from moreh_ap.oneline.state import STATE
from moreh_ap.runtime.dist import created_by_ap

__all__ = ["distributes_itself", "stand_aside", "register_uninstall"]

_uninstall: list[Callable[[], None]] = []
"""How every hook is removed (:func:`moreh_ap.oneline.patches.uninstall`, registered by that module, which
imports the probe and so cannot be imported by it)."""


def register_uninstall(fn: Callable[[], None]) -> None:
    """Give the function that removes every one-line hook (called when AP stands aside)."""
    _uninstall[:] = [fn]


def _wrapper(module: nn.Module) -> str | None:
    """The name of the distributed wrapper ``module`` is (DDP, FSDP1, FSDP2), or None."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    from torch.nn.parallel import DistributedDataParallel

    kinds = ((DistributedDataParallel, "DistributedDataParallel"), (FullyShardedDataParallel,
             "FullyShardedDataParallel (FSDP)"), (FSDPModule, "fully_shard (FSDP2)"))
    for kind, name in kinds:
        if isinstance(module, kind):
            return name
    return None


def distributes_itself(module: nn.Module) -> str | None:
    """Why the script that calls ``module`` distributes itself, or None when it does not.

    Args:
        module: the root model at its first training forward.
    """
    wrapper = _wrapper(module)
    if wrapper is not None:
        return f"its model {type(module).__name__} is wrapped in {wrapper}"
    if dist.is_available() and dist.is_initialized() and not created_by_ap():
        return (f"it initialized torch.distributed itself (a {dist.get_backend()} process group of "
                f"{dist.get_world_size()} ranks that advanced parallelization did not create)")
    return None


def stand_aside(module: nn.Module) -> bool:
    """If the script distributes itself, warn once (rank 0), remove every hook and return True.

    Args:
        module: the root model at its first training forward.
    """
    reason = distributes_itself(module)
    if reason is None:
        return False
    if "stand-aside" not in STATE.warned:
        STATE.warned.add("stand-aside")
        logger.warning(f"The script distributes itself: {reason}. Advanced parallelization is off for this run "
                       "and the script runs as written (to let advanced parallelization distribute it, remove "
                       "its own init_process_group / DDP / FSDP and run it as a single-device script).")
    for fn in _uninstall:
        fn()
    return True
