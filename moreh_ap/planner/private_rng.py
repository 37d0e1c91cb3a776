# Random numbers the library draws (calibration inputs, benchmark layers) come from a forked generator state.
"""AP leaves the script's random-number streams alone.

A script that samples its batches from the global generator (``torch.randint`` in nanoGPT's ``get_batch``)
must see the same batches with AP as without: whatever the planner draws runs inside :func:`private_rng`,
which saves the global CPU generator's state, and the current CUDA device's when CUDA is available, and
puts it back afterwards (``torch.random.fork_rng``).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["private_rng"]


def _cuda_devices() -> list[int]:
    """The CUDA device whose generator the measurements may draw from (none without CUDA)."""
    try:
        return [torch.cuda.current_device()] if torch.cuda.is_available() else []
    except Exception:  # a CUDA that cannot start: nothing there to draw from
        return []


@contextlib.contextmanager
def private_rng() -> Iterator[None]:
    """Run the block with the global generators' states restored at its end (also on error).

    Usable as a decorator. Draws inside the block see the state the script left, so they are
    reproducible; the script's next draw after the block is the one it would have made without it.
    """
    with torch.random.fork_rng(devices=_cuda_devices(), device_type="cuda"):
        yield
