# Candidate evaluation: partition + memory ("compile") with sound early rejections, and the cost of survivors.
"""How the planner evaluates one configuration (:class:`Evaluator`), and what it keeps (:class:`Candidate`).

``compile`` partitions the blocks (balanced by time; by memory when the time-balanced split does not fit)
and predicts the busiest rank's peak (:func:`moreh_ap.planner.memory.estimate_peak`). Most configurations
of a large model on a large cluster do not fit, so two sound lower bounds reject them early (planning
speed; never a configuration that fits):

* the floor: the average pipeline rank's parameters, final gradients and optimizer state (every rank's
  peak includes its own, and the busiest rank holds at least the average);
* the probe of a pipeline: the exact peak of its first rank, then of its last one
  (:func:`moreh_ap.planner.memory.estimate_rank`); the configuration's peak is the largest of its ranks',
  so one rank over the cap rejects it, for the time-balanced split and then for the memory-balanced one.

A configuration rejected early reports that lower bound (``reason`` starts with "out of memory: needs at
least"); one that fits, or that was evaluated in full, reports exactly what a full evaluation gives.
``exact=True`` evaluates in full (the planner's out-of-memory message names the smallest exact peak).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from moreh_ap.config import ParallelConfig
from moreh_ap.graph.model_graph import ModelGraph
from moreh_ap.planner import cost as cost_model
from moreh_ap.planner import memory as memory_model
from moreh_ap.planner.cluster import Cluster
from moreh_ap.planner.memory import MemoryBreakdown
from moreh_ap.planner.partition import partition
from moreh_ap.planner.tp import TPFacts, local_graph
from moreh_ap.planner.units import optimizer_profile

__all__ = ["EARLY_REJECTION", "Candidate", "Evaluator", "with_boundaries"]

EARLY_REJECTION = "out of memory: needs at least"
"""How the ``reason`` of a configuration rejected by a lower bound starts."""

_FIELDS = tuple(f.name for f in fields(ParallelConfig))


def with_boundaries(cfg: ParallelConfig, bounds: tuple[int, ...]) -> ParallelConfig:
    """``cfg.replace(boundaries=bounds)`` without validating every field again (planning speed: ``cfg`` is
    valid and ``bounds`` is :func:`moreh_ap.planner.partition.partition`'s tuple of ints)."""
    new = object.__new__(ParallelConfig)
    for name in _FIELDS:
        object.__setattr__(new, name, getattr(cfg, name))
    object.__setattr__(new, "boundaries", bounds)
    return new


@dataclass(kw_only=True, slots=True)
class Candidate:
    """One evaluated configuration."""

    config: ParallelConfig
    """The configuration (with the partition's ``boundaries`` when it has 2+ stages)."""
    feasible: bool = False
    """Whether its predicted peak fits under the memory cap."""
    memory: MemoryBreakdown | None = None
    """Predicted per-rank peak, by category (a lower bound of it when rejected early)."""
    step_time: float | None = None
    """Predicted seconds per step, or None when rejected before costing."""
    time_breakdown: dict[str, float] = field(default_factory=dict)
    """Seconds by category (compute, bubble, p2p, dp_comm, optimizer, total)."""
    reason: str | None = None
    """Why it was rejected (None when feasible)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "line": self.config.to_moreh_line(),
            "feasible": self.feasible,
            "memory": self.memory.to_dict() if self.memory is not None else None,
            "step_time": self.step_time,
            "time_breakdown": dict(self.time_breakdown),
            "reason": self.reason,
        }


class Evaluator:
    """Partition + memory ("compile") and cost of candidates; partitions cached per stage count.

    ``early``: reject with the lower bounds of the module docstring (False: every candidate in full, e.g.
    when measurements will rescale the predicted memory and re-check it against the cap).
    """

    def __init__(self, graph: ModelGraph, cluster: Cluster, *, world: int, optimizer: Any, cap: int,
                 tp: TPFacts | None = None, early: bool = True) -> None:
        self.graph, self.cluster, self.world, self.optimizer, self.cap = graph, cluster, world, optimizer, cap
        self.tp, self.early = tp, early
        self._parts: dict[tuple, Any] = {}
        self._graphs: dict[int, ModelGraph] = {1: graph}

    def graph_for(self, cfg: ParallelConfig) -> ModelGraph:
        """The graph one rank of ``cfg``'s tensor-parallel group holds (the traced one for ``tp == 1``)."""
        if cfg.tp not in self._graphs:
            if self.tp is None:
                raise ValueError(f"tp={cfg.tp} cannot be planned for {self.graph.model_name}: its family "
                                 f"({self.graph.adapter_name}) has no tensor-parallel plan")
            self._graphs[cfg.tp] = local_graph(self.graph, self.tp, cfg.tp)
        return self._graphs[cfg.tp]

    def _part(self, total: int, kind: str, cfg: ParallelConfig) -> tuple[int, ...]:
        key = (total, kind, cfg.recomputation, cfg.mixed_precision, cfg.tp)
        if key not in self._parts:
            prec = "mixed" if cfg.mixed_precision else "full"
            self._parts[key] = partition(self.graph_for(cfg), total, kind=kind, recompute=cfg.recomputation,
                                         precision=prec)
        return self._parts[key]

    def _mem(self, cfg: ParallelConfig) -> MemoryBreakdown:
        return memory_model.estimate_peak(
            self.graph_for(cfg), cfg, world_size=self.world, optimizer=self.optimizer,
            device_type=self.cluster.device_type,
        )

    def _floor(self, cfg: ParallelConfig) -> MemoryBreakdown:
        """A floor under ``cfg``'s peak: the average pipeline rank's parameters, final gradients and optimizer
        state (the busiest rank holds at least the average; every rank's peak includes its own)."""
        g = self.graph_for(cfg)
        key = ("floor", cfg.tp)
        if key not in self._parts:
            names = [n.name for n in g.nodes]
            self._parts[key] = (g.params_of(names), g.params_of(names, trainable_only=True))
        p_all, p_tr = self._parts[key]
        _, k, _ = optimizer_profile(self.optimizer, device_type=self.cluster.device_type)
        w, d = g.param_dtype_bytes, (cfg.dp(self.world) if cfg.distribute_param else 1) * cfg.num_stages
        return MemoryBreakdown(params=p_all * w // d, grads=p_tr * w // d, optimizer=p_tr * k * w // d,
                               phase="optimizer")

    def _probe(self, cfg: ParallelConfig) -> MemoryBreakdown | None:
        """The peak of the pipeline's first rank, else of its last, when over the cap (a lower bound of the
        configuration's peak, the largest of its ranks'); None when both fit."""
        for rank in (0, cfg.num_stages - 1):
            mem = memory_model.estimate_rank(self.graph_for(cfg), cfg, rank, world_size=self.world,
                                             optimizer=self.optimizer, device_type=self.cluster.device_type)
            if mem.total > self.cap:
                return mem
        return None

    def _rejected(self, cfg: ParallelConfig, bound: MemoryBreakdown, what: str) -> Candidate:
        return Candidate(config=cfg, memory=bound, feasible=False, reason=(
            f"{EARLY_REJECTION} {bound.total:,} bytes per device ({what}) > {self.cap:,} available"))

    def compile(self, cfg: ParallelConfig, *, exact: bool = False) -> Candidate:
        """Partition the blocks (by time; by memory when the time-balanced split does not fit) and predict memory.

        Unless ``exact``, a configuration over the cap may be rejected by a lower bound (module docstring)."""
        early = self.early and not exact
        if early:
            floor = self._floor(cfg)
            if floor.total > self.cap:
                return self._rejected(cfg, floor, "parameters, gradients and optimizer state alone")
        if cfg.num_stages == 1:
            return self._checked(cfg, self._mem(cfg))
        time_cfg = with_boundaries(cfg, self._part(cfg.total_stages, "time", cfg))
        bound = self._probe(time_cfg) if early else None
        mem = self._mem(time_cfg) if bound is None else None
        if mem is not None and mem.total <= self.cap:
            return self._checked(time_cfg, mem)
        bounds = self._part(cfg.total_stages, "memory", cfg)
        if bounds == time_cfg.boundaries:  # the same split: the same peak
            return self._checked(time_cfg, mem) if mem is not None else self._rejected(
                time_cfg, bound, f"pipeline rank {bound.stage} alone, {bound.phase}")
        alt = with_boundaries(cfg, bounds)
        alt_bound = self._probe(alt) if early else None
        alt_mem = self._mem(alt) if alt_bound is None else None
        if mem is not None and alt_mem is not None:  # both in full: the smaller one, as it always was
            return self._checked(alt, alt_mem) if alt_mem.total < mem.total else self._checked(time_cfg, mem)
        if alt_mem is not None and alt_mem.total <= self.cap:
            return self._checked(alt, alt_mem)
        # over the cap both ways, one of them known by a lower bound only: report the smaller of what is known
        low_t, low_a = mem or bound, alt_mem or alt_bound
        low_cfg, low = (alt, low_a) if low_a.total < low_t.total else (time_cfg, low_t)
        return self._rejected(low_cfg, low, f"pipeline rank {low.stage} alone, {low.phase}")

    def _checked(self, cfg: ParallelConfig, mem: MemoryBreakdown) -> Candidate:
        cand = Candidate(config=cfg, memory=mem, feasible=mem.total <= self.cap)
        if not cand.feasible:
            cand.reason = (
                f"out of memory: needs {mem.total:,} bytes per device (pipeline rank {mem.stage}, {mem.phase}) "
                f"> {self.cap:,} available"
            )
        return cand

    def cost(self, cand: Candidate) -> Candidate:
        """Fill ``cand``'s predicted step time and its breakdown."""
        t = cost_model.estimate(self.graph_for(cand.config), cand.config, self.cluster, world_size=self.world,
                                optimizer=self.optimizer)
        cand.step_time = t.total
        cand.time_breakdown = t.to_dict()
        return cand
