# Tracked peak memory of one training step of a ParallelModel, with torch's own memory trackers.
"""Measure what the planner predicts: the per-rank peak bytes of a real training step.

``tracked_step_peak(pm, optimizer, step)`` runs ``step()`` once untracked (the
optimizer creates its state; DDP rebuilds its buckets) and once under torch's
``FSDPMemTracker`` (FSDP2-wrapped models) or ``MemTracker`` (anything else), and
returns the peak of the tracked step, in total and by category. Used by
``benchmarks/bench_memory_model.py`` and ``tests/unit/test_memory_ties.py`` with a
fake process group (``torch.testing._internal.distributed.fake_pg``): every
tensor the runtime allocates is real and allocated as on rank 0 of a real job,
while collectives move no data.

With the fake process group, DDP's reducer rejects the value-less futures of
the fake collectives; :func:`tracked_step_peak` then registers torch's own
``noop_hook`` as DDP's comm hook (it returns the bucket it is given, as gloo's
in-place all-reduce does, so memory is unchanged).

DTensor's sharding propagation runs each op once more on fake tensors, under a ``FakeTensorMode`` of its own;
torch 2.13's trackers leave those fake outputs out, torch 2.11's count them as live storage (an AdamW step on
DTensor parameters, replicate or FSDP2, then shows two more copies of the largest parameter than it allocates).
Every tracker here leaves them out on both versions (:class:`_RealStoragesOnly`).

Pipelines (several stages per process, each module called once per micro-batch) are measured
with ``tracker="live"``: torch 2.13's trackers raise ``NotImplementedError`` when a module runs
twice in one tracked step, so :class:`_LiveTracker` keeps ``MemTracker``'s storage accounting
(every op output's untyped storage, weakref finalizers, ``UntypedStorage.resize_``) without its
per-module statistics. It gives ``MemTracker`` / ``FSDPMemTracker``'s peak to the byte on the
non-pipelined cases (``tests/distributed/test_memory_ties_pipeline.py``). Used with real gloo ranks by
``benchmarks/bench_memory_model_pipeline.py``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import wraps
from typing import Callable

import torch
from torch._guards import active_fake_mode
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
from torch.distributed._tools.mem_tracker import (_TOTAL_KEY, MemTracker, _MemRefType, _ModState, _UpdateType,
                                                  _WeakRefInfo)
from torch.utils._python_dispatch import TorchDispatchMode

from moreh_ap.runtime.apply import Wrapper

__all__ = ["TrackedPeak", "tracked_step_peak", "LivePeak"]


@dataclass(kw_only=True, slots=True)
class TrackedPeak:
    """Peak bytes of one tracked training step."""

    total: int
    """Peak bytes (the tracker's "Total" at the peak)."""
    categories: dict[str, int] = field(default_factory=dict)
    """Bytes by the tracker's categories at the peak (parameters, gradients, activations, ...)."""
    wrapper: str = "none"
    """The runtime's data-parallel wrapper, a :class:`~moreh_ap.runtime.apply.Wrapper` value: "none", "ddp",
    "fsdp" or "replicate"."""

    def to_dict(self) -> dict:
        return {"total": self.total, "categories": dict(self.categories), "wrapper": self.wrapper}


def tracked_step_peak(pm, optimizer: torch.optim.Optimizer, step: Callable[[], None], *,
                      tracker: str = "torch") -> TrackedPeak:
    """Peak memory of ``step()`` (a train step plus ``optimizer.step()``/``zero_grad``) on this rank.

    Args:
        pm: a :class:`moreh_ap.runtime.engine.ParallelModel`.
        optimizer: the optimizer ``step`` steps (tracked as optimizer state).
        step: runs one whole training step.
        tracker: "torch": torch's ``FSDPMemTracker`` (FSDP2) or ``MemTracker`` (anything else); one stage
            per rank and one call of each module per step only (torch 2.13 raises otherwise). "live": the
            peak of live storage bytes (:class:`_LiveTracker`: ``MemTracker``'s storage accounting without
            its per-module statistics), for pipelines and several micro-batches; what lives before the
            step (parameters, gradients, buffers, optimizer state, FSDP2 buffers, the pipeline stages'
            receive buffers) is registered first.

    Returns:
        A :class:`TrackedPeak` of the second (tracked) call of ``step``.
    """
    if tracker not in ("torch", "live"):
        raise ValueError(f"tracked_step_peak: tracker={tracker!r} is not valid: expected 'torch' or 'live'")
    if tracker == "torch" and len(pm._stages) != 1:
        raise ValueError("tracked_step_peak: one stage per rank only with tracker='torch' (use tracker='live')")
    root = pm._stages[0].module
    if pm.wrapper is Wrapper.DDP and _fake_backend():
        from torch.distributed.algorithms.ddp_comm_hooks.debugging_hooks import noop_hook

        root.register_comm_hook(None, noop_hook)
    step()  # untracked: optimizer state, DDP's rebuilt buckets, the pipeline's receive buffers
    if tracker == "live":
        mt = _LiveTracker()
        mt.register_existing(pm, optimizer)
    elif pm.wrapper is Wrapper.FSDP:
        mt = _FSDPMemTracker(root, optimizer)
    else:
        mt = _MemTracker()
        mt.track_external(root, optimizer)
    with mt:
        step()
        mt.reset_mod_stats()
    snap = mt.get_tracker_snapshot("peak")
    dev = max(snap, key=lambda k: snap[k]["Total"])
    cats = {getattr(k, "value", str(k)): int(v) for k, v in snap[dev].items() if k != "Total" and v}
    return TrackedPeak(total=int(snap[dev]["Total"]), categories=cats, wrapper=pm.wrapper.value)


class LivePeak:
    """Peak live bytes of this rank over a ``with`` region (the live tracker), what lives before it counted
    (parameters, gradients, buffers, optimizer state, FSDP2 buffers, pipeline receive buffers).

    Used by the engine's closed loop on CPU (one training step, then one optimizer step). ``peak`` is 0
    until the region exits.
    """

    def __init__(self, pm, optimizer: torch.optim.Optimizer | None) -> None:
        self.pm, self.optimizer = pm, optimizer
        self.peak = 0
        self._mt: _LiveTracker | None = None

    def __enter__(self) -> "LivePeak":
        self._mt = _LiveTracker()
        self._mt.modules = False  # totals only: no module hooks in the user's run
        self._mt.register_existing(self.pm, self.optimizer)
        self._mt.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mt.__exit__(*exc)
        snap = self._mt.get_tracker_snapshot("peak")
        self.peak = max((int(v["Total"]) for v in snap.values()), default=0)
        self._mt = None


def _fake_backend() -> bool:
    import torch.distributed as dist

    return dist.is_initialized() and dist.get_backend() == "fake"


class _RealStoragesOnly:
    """Mixin for torch's memory trackers: outputs of ops run under a fake mode other than the one active at entry
    (DTensor's sharding propagation) are not memory.

    torch 2.13's ``MemTracker`` / ``FSDPMemTracker`` make this check in ``__torch_dispatch__``; torch 2.11's track
    every output, fake ones included, so a DTensor op whose sharding is propagated on fake tensors (the ops of an
    optimizer step on replicate or FSDP2 parameters, tensor-parallel layers) was counted twice while the fake
    output lived. Here the
    check is made in ``_track`` (what ``__torch_dispatch__`` calls for each output) on both versions.
    """

    def __enter__(self):
        if self._depth == 0:
            self._fake_mode_on_entry = active_fake_mode()
        return super().__enter__()

    def _track(self, reftype, t: torch.Tensor) -> None:
        if active_fake_mode() is not self._fake_mode_on_entry:
            return
        super()._track(reftype, t)


class _MemTracker(_RealStoragesOnly, MemTracker):
    """torch's ``MemTracker``, fake outputs of DTensor's sharding propagation left out (as torch 2.13 does)."""


class _FSDPMemTracker(_RealStoragesOnly, FSDPMemTracker):
    """torch's ``FSDPMemTracker``, fake outputs of DTensor's sharding propagation left out (as torch 2.13 does)."""


class _LiveTracker(_RealStoragesOnly, MemTracker):
    """torch's ``MemTracker`` counting live storages only: no per-module statistics, so a module may run
    any number of times in the tracked region (pipeline micro-batches).

    What it keeps of ``MemTracker``: the dispatch mode that records every op output's untyped storage
    with a weakref finalizer (bytes subtracted when the storage dies), the optimizer-step flag, the
    forward / backward categories (``ModTracker`` without per-module hooks). What it changes: an
    ``UntypedStorage.resize_`` of a storage it has not seen yet (FSDP2's all-gather buffers and unsharded
    parameters, created in an earlier step, resized to 0 in between) starts tracking that storage.
    """

    modules = True
    """Track forward / backward regions with ``ModTracker`` (module hooks, multi-grad hooks on inputs); False:
    totals only, no hooks at all (the hooks break ``autograd.grad`` as a pipeline stage's first step runs it)."""

    def _track_resize(self) -> None:
        orig = self._orig_resize

        @wraps(orig)
        def resize_(st: torch.UntypedStorage, size: int) -> None:
            orig(st, size)
            winfo, _ = self._WINFO.get(st, (None, None))
            if winfo is None:
                if st.size() > 0:  # first seen growing: track it from now on
                    ref = _MemRefType.TEMP if self._mod_tracker.is_bw else _MemRefType.ACT
                    winfo, w_st = _WeakRefInfo.create_winfo(st, st.device, ref, self._delete_callback)
                    self._WINFO[st] = (winfo, w_st)
                    self._update_snap(_UpdateType.ADD, winfo)
            elif winfo.size != st.size():
                old = winfo.mem_consumed
                winfo.update_mem_consumed(st)
                self._update_snap(_UpdateType.SIZE, winfo, old_mem_consumed=old)
            self._update_peak_stats(_ModState.PEAK_BW if self._mod_tracker.is_bw else _ModState.PEAK_FW)

        torch.UntypedStorage.resize_ = resize_

    def __enter__(self) -> "_LiveTracker":
        if self._depth == 0:
            self._fake_mode_on_entry = active_fake_mode()
            self._register_global_optimizer_hook()
            self._track_resize()
            self._peak_mem_snap = self.get_tracker_snapshot()
            self._peak_mem = {dev: snap[_TOTAL_KEY] for dev, snap in self._peak_mem_snap.items()}
            if self.modules:
                self._mod_tracker.__enter__()
        TorchDispatchMode.__enter__(self)
        self._depth += 1
        return self

    def __exit__(self, *args) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._deregister_param_and_optimizer_hooks()
            self._restore_resize()
            if self.modules:
                self._mod_tracker.__exit__(*args)
        TorchDispatchMode.__exit__(self, *args)

    def register_existing(self, pm, optimizer) -> None:
        """Count what lives before the step: this rank's parameters, gradients, buffers, optimizer state,
        FSDP2's all-gather buffers / unsharded parameters, and the pipeline stages' persistent tensors
        (receive buffers of every micro-batch)."""
        for st in pm._stages:
            self._track_module_params_and_buffers(st.module, install_grad_hooks=False)
            for m in st.module.modules():
                state = m._get_fsdp_state() if hasattr(m, "_get_fsdp_state") else None
                for group in getattr(state, "_fsdp_param_groups", None) or []:
                    for fp in group.fsdp_params:
                        extra = list(getattr(fp, "all_gather_outputs", []) or [])
                        extra += [getattr(fp, "_unsharded_param", None), fp.sharded_param.grad]
                        for t in extra:
                            if isinstance(t, torch.Tensor):
                                self._update_and_maybe_create_winfos(t, _MemRefType.OTH)
        if optimizer is not None:
            self._track_optimizer_states(_MemRefType.OPT, optimizer)
        for sched in pm._runner.schedules.values():
            stages = getattr(sched, "_stages", None) or [getattr(sched, "_stage", None)]
            for stage in stages:
                for t in _tensors_in(vars(stage) if stage is not None else {}, depth=4):
                    self._update_and_maybe_create_winfos(t, _MemRefType.OTH)


def _tensors_in(obj, *, depth: int):
    """Tensors reachable from ``obj`` through dicts, lists, tuples and plain objects' attributes (no modules)."""
    if isinstance(obj, torch.Tensor):
        yield obj
        return
    if depth == 0 or isinstance(obj, (torch.nn.Module, str, bytes, int, float)) or obj is None:
        return
    if isinstance(obj, dict):
        items = list(obj.values())
    elif isinstance(obj, (list, tuple, set)):
        items = list(obj)
    elif hasattr(obj, "__dict__") and type(obj).__module__.startswith("torch.distributed.pipelining"):
        items = list(vars(obj).values())
    else:
        return
    for item in items:
        yield from _tensors_in(item, depth=depth - 1)
