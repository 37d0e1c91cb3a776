# Closed loop: measure a run's steps 2-3 (time, peak memory), log them against the plan, store them for re-planning.
"""What the engine measures of the real run, once.

Step 1 is not measured (the optimizer creates its state, DDP rebuilds its buckets, pipeline schedules
are built). From inside :class:`~moreh_ap.runtime.engine.ParallelModel` the engine sees ``train_step``
and, when ``parallelize`` was given the optimizer, that optimizer's ``step()`` (through its step
hooks); the user's own code between them (data loading, ``zero_grad``, clipping) is not measured.

- time: the wall time of ``train_step`` and of ``optimizer.step()`` (device synchronized around each);
  on CUDA the mean of steps 2 and 3, on CPU step 2 only (step 3 runs under the memory tracker, whose
  dispatch mode slows it down);
- memory: on CUDA ``torch.cuda.max_memory_allocated()`` reset before step 2 and read after step 3's
  optimizer step; on CPU the live tracker (:class:`~moreh_ap.runtime.memtrack.LivePeak`) over step 3's
  ``train_step`` and over its optimizer step (the larger peak); the static bytes (parameters,
  gradients, optimizer state of this rank) are counted after step 3's ``train_step``;
- several ranks: each number is the max over ranks (one all-reduce, at the end).

Then rank 0 logs one line (measured vs predicted) and, with a plan, stores the measurement
(:mod:`moreh_ap.planner.measurements`) and says when the pick is within 5 % of the memory cap or when
another candidate is predicted >= 10 % faster after the correction, with the ``MOREH_AP_CONFIG`` value
that pins it. After that nothing is measured: the engine drops the probe and its hooks.
"""
from __future__ import annotations

import copy
import json
import time
from typing import Any

import torch
import torch.distributed as dist

from moreh_ap.log import logger
from moreh_ap.planner.measurements import (Corrections, Measurement, device_fingerprint, model_signature,
                                           save_measurement)
from moreh_ap.runtime.dist import rank

__all__ = ["StepProbe", "static_bytes"]

MIB = 1024**2


def static_bytes(modules: list[torch.nn.Module], optimizer: torch.optim.Optimizer | None) -> int:
    """Bytes of this rank's parameters, gradients and optimizer state (each storage once; sharded
    parameters count their local shard)."""
    seen: set[int] = set()
    total = 0

    def add(t: Any) -> None:
        nonlocal total
        if not isinstance(t, torch.Tensor):
            return
        t = t.to_local() if hasattr(t, "to_local") else t
        st = t.untyped_storage()
        if st.nbytes() and st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total += st.nbytes()

    for m in modules:
        for p in m.parameters():
            add(p)
            add(p.grad)
    if optimizer is not None:
        for state in optimizer.state.values():
            for v in state.values():
                add(v)
    return total


class StepProbe:
    """Measures steps 2-3 of one :class:`ParallelModel` (see the module docstring); ``done`` once finished."""

    def __init__(self, pm, *, optimizer: torch.optim.Optimizer | None, prediction: Any = None) -> None:
        """
        Args:
            pm: the ParallelModel.
            optimizer: the optimizer given to ``parallelize`` (its step is timed), or None.
            prediction: the planner's :class:`~moreh_ap.planner.planning.Plan` for this run, or None (then
                the measurement is only logged).
        """
        self.pm, self.optimizer, self.prediction = pm, optimizer, prediction
        self.cuda = pm.device.type == "cuda"
        self.calls = 0
        self.done = False
        self.train_times: list[float] = []
        self.opt_times: list[float] = []
        self.static = 0
        self.peaks: list[int] = []
        self._t0 = 0.0
        self._live = None  # a memtrack.LivePeak while step 3 is tracked on CPU
        self._handles = []
        if optimizer is not None:
            self._handles = [optimizer.register_step_pre_hook(self._opt_pre),
                             optimizer.register_step_post_hook(self._opt_post)]
        self.measurement: Measurement | None = None
        """The finished measurement (rank 0 with a plan stores it)."""

    # ----------------------------------------------------------------------- hooks around the steps
    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.pm.device)

    def _measuring(self) -> bool:
        return self.calls in (2, 3) and not self.done

    def _timed(self) -> bool:
        return self.calls == 2 or (self.calls == 3 and self.cuda)

    def abort(self) -> None:
        """Stop measuring without a result (a step raised): the tracker and the optimizer hooks are removed."""
        if self._live is not None:
            self._live.__exit__(None, None, None)
            self._live = None
        self.done = True
        for h in self._handles:
            h.remove()
        self._handles = []

    def before_step(self) -> None:
        """Called at the start of ``train_step``."""
        if self._live is not None:  # an optimizer step raised inside the tracked region
            self.abort()
            return
        if self.calls == 3 and not self.done:  # the optimizer did not step after step 3: finish now
            self.finish()
            return
        self.calls += 1
        if not self._measuring():
            return
        self._sync()
        if self.calls == 2 and self.cuda:
            torch.cuda.reset_peak_memory_stats(self.pm.device)
        if self.calls == 3 and not self.cuda:
            self._live = _live_peak(self.pm, self.optimizer)
        self._t0 = time.perf_counter()

    def after_step(self) -> None:
        """Called at the end of ``train_step``."""
        if not self._measuring():
            return
        self._sync()
        if self._timed():
            self.train_times.append(time.perf_counter() - self._t0)
        if self._live is not None:
            self._live.__exit__(None, None, None)
            self.peaks.append(self._live.peak)
            self._live = None
        if self.calls == 3:
            self.static = static_bytes(list(self.pm.stage_modules), self.optimizer)
            if self.optimizer is None:
                self.finish()

    def _opt_pre(self, *_) -> None:
        if not self._measuring():
            return
        self._sync()
        if self.calls == 3 and not self.cuda:
            self._live = _live_peak(self.pm, self.optimizer)
        self._t0 = time.perf_counter()

    def _opt_post(self, *_) -> None:
        if not self._measuring():
            return
        self._sync()
        if self._timed():
            self.opt_times.append(time.perf_counter() - self._t0)
        if self._live is not None:
            self._live.__exit__(None, None, None)
            self.peaks.append(self._live.peak)
            self._live = None
        if self.calls == 3:
            self.finish()

    # ------------------------------------------------------------------------------- the result
    def finish(self) -> None:
        """Gather the numbers (max over ranks), log the line, store and advise (rank 0 with a plan)."""
        self.done = True
        for h in self._handles:
            h.remove()
        self._handles = []
        peak = torch.cuda.max_memory_allocated(self.pm.device) if self.cuda else max(self.peaks, default=0)
        ts = sum(self.train_times) / max(len(self.train_times), 1)
        opt = sum(self.opt_times) / len(self.opt_times) if self.opt_times else -1.0
        nums = torch.tensor([ts, opt, float(peak), float(self.static)], dtype=torch.float64, device=self.pm.device)
        if self.pm.world > 1:
            dist.all_reduce(nums, op=dist.ReduceOp.MAX)
        ts, opt, peak, static = nums.tolist()
        pm = self.pm
        world = pm.world
        model = model_signature(self.prediction.graph) if self.prediction is not None else {}
        self.measurement = Measurement(
            device=device_fingerprint(pm.device.type, world), model=model, config=pm.config.to_dict(),
            train_step_time=ts, optimizer_time=opt if opt >= 0 else None, peak_bytes=int(peak),
            static_bytes=int(static),
            memory_source="torch.cuda.max_memory_allocated" if self.cuda else "live tracker")
        cand = self._predicted_candidate()
        if cand is not None:
            self.measurement.predicted = cand.to_dict()
        logger.info(self.line(cand))
        if self.prediction is None or cand is None or rank() != 0:
            return
        try:
            path = save_measurement(self.measurement)
            logger.info(f"Measurement saved to {path} for re-planning.")
        except OSError as exc:
            logger.warning(f"Could not save the measurement: {exc}")
        self.advise(cand)

    def _predicted_candidate(self):
        if self.prediction is None:
            return None
        for c in self.prediction.candidates:
            if c.config == self.pm.config:
                return c
        return None

    def line(self, cand) -> str:
        """The one log line: measured steps 2-3 vs the prediction."""
        m = self.measurement
        opt_pred = cand.time_breakdown.get("optimizer", 0.0) if cand is not None else 0.0
        step = m.step_time(opt_pred)
        opt = f"{m.optimizer_time:.4g} s" if m.optimizer_time is not None else "not measured"
        text = (f"Measured steps 2-3: step {step:.4g} s (train_step {m.train_step_time:.4g} s, optimizer {opt}), "
                f"peak {m.peak_bytes / MIB:.1f} MiB (static {m.static_bytes / MIB:.1f} MiB, {m.memory_source})")
        if cand is None:
            why = "no plan given to parallelize" if self.prediction is None else "the plan has no such configuration"
            return text + f"; no prediction ({why})"
        pt, pmem = cand.step_time, cand.memory.total
        return (text + f"; predicted step {pt:.4g} s ({(pt - step) / step * 100:+.1f} %), "
                f"peak {pmem / MIB:.1f} MiB ({(pmem - m.peak_bytes) / max(m.peak_bytes, 1) * 100:+.1f} %)")

    def advise(self, cand) -> None:
        """Warn when the pick is within 5 % of the cap, or another candidate is >= 10 % faster once corrected
        by this measurement; print the ``MOREH_AP_CONFIG`` value that pins the better one."""
        plan, m = self.prediction, self.measurement
        step = m.step_time(cand.time_breakdown.get("optimizer", 0.0))
        cands = [_copy_candidate(c) for c in plan.candidates]
        fix = Corrections([m]).learn(cands)
        for c in cands:
            fix.correct_memory(c, plan.memory_cap)
            fix.correct_time(c)
        others = [c for c in cands if c.feasible and c.step_time is not None and c.config != self.pm.config]
        faster = min(others, key=lambda c: c.step_time, default=None)
        if faster is not None and faster.step_time <= 0.9 * step:
            logger.warning(f"Another configuration is predicted {(1 - faster.step_time / step) * 100:.0f} % faster "
                           f"({faster.step_time:.4g} s vs {step:.4g} s measured) after this measurement's "
                           f"correction: {faster.config.to_moreh_line()}; pin it with {_pin(faster.config)}")
        if m.peak_bytes >= 0.95 * plan.memory_cap:
            roomy = [c for c in others if c.memory.total <= 0.95 * plan.memory_cap]
            safer = min(roomy, key=lambda c: c.step_time, default=None)
            tail = (f"; the fastest with 5 % headroom: {safer.config.to_moreh_line()}, pin it with {_pin(safer.config)}"
                    if safer is not None else "; no other candidate has 5 % headroom")
            logger.warning(f"The measured peak {m.peak_bytes / MIB:.1f} MiB is within 5 % of the memory cap "
                           f"{plan.memory_cap / MIB:.1f} MiB" + tail)


def _copy_candidate(c):
    out = copy.copy(c)
    out.memory = copy.copy(c.memory)
    out.time_breakdown = dict(c.time_breakdown)
    return out


def _pin(config) -> str:
    return "MOREH_AP_CONFIG='" + json.dumps(config.to_dict(), separators=(",", ":")) + "'"


def _live_peak(pm, optimizer):
    """A started :class:`~moreh_ap.runtime.memtrack.LivePeak`. Imported here, when a CPU step is measured:
    torch's memory tracker pulls in torch's compiler modules (~0.8 s at every ``import moreh_ap``)."""
    from moreh_ap.runtime.memtrack import LivePeak

    return LivePeak(pm, optimizer).__enter__()

