# Tracked peak memory of one training step of a ParallelModel, with torch's own memory trackers.
"""Measure what the planner predicts: the per-rank peak bytes of a real training step.

``tracked_step_peak(pm, optimizer, step)`` runs ``step()`` once untracked (the
optimizer creates its state; DDP rebuilds its buckets) and once under torch's
``FSDPMemTracker`` (FSDP2-wrapped models) or ``MemTracker`` (anything else), and
returns the peak of the tracked step, in total and by category. Used by
``benchmarks/bench_memory_model.py`` and ``tests/test_memory_ties.py`` with a
fake process group (``torch.testing._internal.distributed.fake_pg``): every
tensor the runtime allocates is real and allocated as on rank 0 of a real job,
while collectives move no data.

With the fake process group, DDP's reducer rejects the value-less futures of
the fake collectives; :func:`tracked_step_peak` then registers torch's own
``noop_hook`` as DDP's comm hook (it returns the bucket it is given, as gloo's
in-place all-reduce does, so memory is unchanged).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

__all__ = ["TrackedPeak", "tracked_step_peak"]


@dataclass(kw_only=True, slots=True)
class TrackedPeak:
    """Peak bytes of one tracked training step."""

    total: int
    """Peak bytes (the tracker's "Total" at the peak)."""
    categories: dict[str, int] = field(default_factory=dict)
    """Bytes by the tracker's categories at the peak (parameters, gradients, activations, ...)."""
    wrapper: str = "none"
    """The runtime's data-parallel wrapper: "none", "ddp", "fsdp" or "replicate"."""

    def to_dict(self) -> dict:
        return {"total": self.total, "categories": dict(self.categories), "wrapper": self.wrapper}


def tracked_step_peak(pm, optimizer: torch.optim.Optimizer, step: Callable[[], None]) -> TrackedPeak:
    """Peak memory of ``step()`` (a train step plus ``optimizer.step()``/``zero_grad``) on this rank.

    Args:
        pm: a :class:`moreh_ap.runtime.engine.ParallelModel` with one stage on this rank.
        optimizer: the optimizer ``step`` steps (tracked as optimizer state).
        step: runs one whole training step.

    Returns:
        A :class:`TrackedPeak` of the second (tracked) call of ``step``.
    """
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker

    if len(pm._stages) != 1:
        raise ValueError("tracked_step_peak: one stage per rank only (pipelines need one process per rank)")
    root = pm._stages[0].module
    if pm._wrapper == "ddp" and _fake_backend():
        from torch.distributed.algorithms.ddp_comm_hooks.debugging_hooks import noop_hook

        root.register_comm_hook(None, noop_hook)
    step()  # untracked: optimizer state, DDP's rebuilt buckets
    if pm._wrapper == "fsdp":
        tracker = FSDPMemTracker(root, optimizer)
    else:
        tracker = MemTracker()
        tracker.track_external(root, optimizer)
    with tracker:
        step()
        tracker.reset_mod_stats()
    snap = tracker.get_tracker_snapshot("peak")
    dev = max(snap, key=lambda k: snap[k]["Total"])
    cats = {getattr(k, "value", str(k)): int(v) for k, v in snap[dev].items() if k != "Total" and v}
    return TrackedPeak(total=int(snap[dev]["Total"]), categories=cats, wrapper=pm._wrapper)


def _fake_backend() -> bool:
    import torch.distributed as dist

    return dist.is_initialized() and dist.get_backend() == "fake"
