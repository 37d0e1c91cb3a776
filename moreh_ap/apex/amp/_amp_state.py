# amp's process-wide state (apex/amp/_amp_state.py): properties, loss scalers, verbosity, and printing rules.
from __future__ import annotations

import torch


class AmpState:
    """What ``amp.initialize`` sets up and ``amp.scale_loss`` reads (one per process, as in apex).

    ``opt_properties`` is absent until the first ``initialize``;
    ``allow_incoming_model_not_fp32`` lets tests pass models with fp16
    parameters (apex's escape hatch); ``hard_override`` turns override
    errors into printed warnings (apex's, False by default).
    """

    def __init__(self) -> None:
        self.hard_override = False
        self.allow_incoming_model_not_fp32 = False
        self.verbosity = 1
        self.loss_scalers: list = []
        self.min_loss_scale: float | None = None
        self.max_loss_scale: float = 2.0**24


_amp_state = AmpState()


def _distributed_rank() -> int | None:
    """This process's rank when torch.distributed runs with more than one rank, else None."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank()
    return None


def maybe_print(msg: str, rank0: bool = False) -> None:
    """Print if verbosity > 0; with ``rank0``, only on rank 0 of a multi-rank run."""
    if _amp_state.verbosity <= 0:
        return
    if rank0:
        rank = _distributed_rank()
        if rank is not None and rank != 0:
            return
    print(msg)


def warn_or_err(msg: str) -> None:
    """apex's rule: an error, unless ``_amp_state.hard_override`` (then a printed warning)."""
    if _amp_state.hard_override:
        print("Warning: " + msg)
    else:
        raise RuntimeError(msg)


def master_params(optimizer: torch.optim.Optimizer):
    """Yield the parameters the optimizer steps: with O2, the fp32 master copies (once created).

    Args:
        optimizer: an optimizer returned by ``amp.initialize``.
    """
    for group in optimizer.param_groups:
        yield from group["params"]
