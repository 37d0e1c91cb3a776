# plan(): trace -> candidates -> partition + memory ("compile") -> cost of survivors -> selected config, with the seed's log.
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from moreh_ap.ap_options import APOptions
from moreh_ap.config import ParallelConfig
from moreh_ap.env import read_env
from moreh_ap.errors import NoFeasibleConfigError
from moreh_ap.graph.model_graph import ModelGraph
from moreh_ap.graph.tracing import trace
from moreh_ap.planner.shape_calibration import calibrate_for_plan
from moreh_ap.files import write_text
from moreh_ap.log import logger
from moreh_ap.planner.candidates import enumerate_candidates
from moreh_ap.planner.cluster import Cluster
from moreh_ap.planner.evaluator import EARLY_REJECTION, Candidate, Evaluator
from moreh_ap.planner.measurements import (Corrections, device_fingerprint, learn_and_correct, load_measurements,
                                           model_signature)
from moreh_ap.planner.report import candidate_table, no_fit_message
from moreh_ap.planner.tp import TPFacts, tp_degrees, tp_facts
from moreh_ap.planner.units import optimizer_profile

SELECTED_DUMP = "advanced_parallelization_selected_config.dump"
DETAILED_DUMP = "autoconfig_log.dump"


@dataclass(kw_only=True, slots=True)
class Plan:
    """The planner's answer: the selected config and every candidate with its numbers."""

    config: ParallelConfig
    """The selected configuration."""
    selected: Candidate
    """The selected candidate (memory and time breakdowns)."""
    candidates: list[Candidate]
    """Every enumerated candidate, feasible or not."""
    planning_ms: float
    """Wall time of trace + plan, milliseconds."""
    memory_cap: int
    """Bytes per device the planner planned for (device memory x correction ratio)."""
    cluster: Cluster
    """The cluster planned for."""
    graph: ModelGraph = field(repr=False)
    """The traced model."""
    global_batch: int = 0
    """Samples per step."""
    corrections: Corrections | None = field(default=None, repr=False)
    """What this machine's measurements of this model corrected (None: no measurement was found)."""

    def summary(self) -> str:
        """A few lines: the selected config, its memory and time breakdown, and the counts."""
        sel = self.selected
        feasible = sum(c.feasible for c in self.candidates)
        mem = sel.memory
        gib = 1024**3
        lines = [
            f"moreh_ap plan for {self.graph.model_name} ({self.graph.total_params:,} params, {self.graph.num_blocks} blocks), "
            f"global batch {self.global_batch}, {self.cluster.nodes} node(s) x {self.cluster.devices_per_node} "
            f"{self.cluster.name} ({self.cluster.world_size} ranks)",
            f"selected: {self.config.to_moreh_line()}, schedule {self.config.schedule}"
            + (f" x{self.config.stages_per_rank}" if self.config.stages_per_rank > 1 else "")
            + (f", boundaries {list(self.config.boundaries)}" if self.config.boundaries else ""),
            f"memory per device: {mem.total / gib:.2f} GiB of {self.memory_cap / gib:.2f} GiB "
            f"(params {mem.params / gib:.2f}, grads {mem.grads / gib:.2f}, optimizer {mem.optimizer / gib:.2f}, "
            f"activations {mem.activations / gib:.2f}, transient {mem.transient / gib:.2f})",
            "step time: {:.4g} s (".format(sel.step_time)
            + ", ".join(f"{k} {v:.3g}" for k, v in sel.time_breakdown.items() if k != "total")
            + ")",
            f"candidates: {len(self.candidates)}, feasible: {feasible}, planning {self.planning_ms:.0f} ms",
        ]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """The CLI's ``--json`` object."""
        return {
            "selected": {
                "config": self.config.to_dict(),
                "line": self.config.to_moreh_line(),
                "step_time": self.selected.step_time,
                "memory": self.selected.memory.to_dict(),
                "time_breakdown": dict(self.selected.time_breakdown),
            },
            "candidates": [c.to_dict() for c in self.candidates],
            "planning_ms": self.planning_ms,
            "memory_cap": self.memory_cap,
            "cluster": self.cluster.to_dict(),
            "model": {"name": self.graph.model_name, "params": self.graph.total_params, "blocks": self.graph.num_blocks},
        }


def _normalize_options(options: Any) -> APOptions:
    if options is None:
        return APOptions()
    if isinstance(options, APOptions):
        return options
    if isinstance(options, dict):
        return APOptions.from_overrides(options, where="plan(options=...)")
    raise TypeError(f"plan(options={options!r}) is not valid: expected an APOptions, a dict of its keywords, or None")


def _pool_map(fn, items: list, workers: int) -> list:
    """``[fn(x) for x in items]`` on up to ``workers`` threads, each given one contiguous share of the items
    (one task per thread, not per item: under the GIL a task per item costs more than it overlaps)."""
    if workers <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    n = min(workers, len(items))
    shares = [items[i * len(items) // n:(i + 1) * len(items) // n] for i in range(n)]
    with ThreadPoolExecutor(max_workers=n) as pool:
        return [y for part in pool.map(lambda share: [fn(x) for x in share], shares) for y in part]


def plan_graph(
    graph: ModelGraph,
    *,
    cluster: Cluster,
    options: Any = None,
    optimizer: Any = "adamw",
    dump: bool = False,
    global_batch: int | None = None,
    started: float | None = None,
    use_measurements: bool = True,
    tp: TPFacts | None = None,
) -> Plan:
    """Plan for an already traced model (what :func:`plan` does after tracing).

    Args:
        graph: the traced model.
        cluster: the devices to plan for.
        options: what the user allows the planner to choose: an ``APOptions``, a dict of its keywords,
            or None (= ``APOptions()``, everything 'auto'). The planner reads no global state: the one-line
            mode passes the options it was enabled with.
        optimizer: "adamw", "adam", "sgd", "lamb", an optimizer instance or class.
        dump: write ``advanced_parallelization_selected_config.dump`` in the working directory.
        global_batch: samples per step (default: the traced batch).
        started: ``time.perf_counter()`` when planning started (for ``planning_ms``).
        use_measurements: correct the predictions with what the engine measured on this machine for this
            model (:mod:`moreh_ap.planner.measurements`); False plans from the models alone.

    Raises:
        NoFeasibleConfigError: nothing fits; the message has the bytes and the ways out.
        ValueError: no configuration is valid at all for this batch and world size.
    """
    t_start = started if started is not None else time.perf_counter()
    opts = _normalize_options(options)
    optimizer_profile(optimizer, device_type=cluster.device_type)  # validates the spec
    env = read_env()
    world = cluster.world_size
    batch = global_batch or graph.batch_size
    cap = int(cluster.device_memory * env.memory_usage_correction_ratio / 100)
    degrees = tp_degrees(tp, devices_per_node=cluster.devices_per_node, world_size=world,
                         option=opts.tensor_parallel)
    configs = enumerate_candidates(world_size=world, global_batch=batch, num_blocks=graph.num_blocks, options=opts,
                                   supports_pipeline=graph.supports_pipeline, tp_degrees=degrees)
    if not configs:
        raise ValueError(
            f"no parallel configuration is valid for global batch {batch} on world size {world} with options "
            f"{opts.to_dict()}: the batch must be a multiple of the data-parallel degree "
            f"(world_size / num_stages for some allowed num_stages)"
        )
    device, signature = device_fingerprint(cluster.device_type, world), model_signature(graph)
    # measurements rescale every candidate's predicted memory and re-check it against the cap: no lower bounds then
    early = not (use_measurements and load_measurements(device, signature))
    ev = Evaluator(graph, cluster, world=world, optimizer=optimizer, cap=cap, tp=tp, early=early)
    logger.info(f"The number of candidates is {len(configs)}.")
    logger.info("Parallel Graph Compile start...")
    t0 = time.perf_counter()
    cands = _pool_map(ev.compile, configs, env.max_parallel_compile_threads)
    logger.info(f"Elapsed Time to compile all candidates = {(time.perf_counter() - t0) * 1e3:.0f} [ms]")
    logger.info("Parallel Graph Compile finished.")
    corrections = learn_and_correct(cands, device=device, model=signature, cost=ev.cost,
                                    cap=cap) if use_measurements else None
    survivors = [c for c in cands if c.feasible]
    logger.info(f"The number of possible candidates is {len(survivors)}.")
    logger.info("SelectBestGraphFromCandidates start...")
    t1 = time.perf_counter()
    _pool_map(ev.cost, [c for c in survivors if c.step_time is None], env.max_parallel_compile_threads)
    if corrections is not None:
        for c in cands:
            corrections.correct_time(c)
    logger.info(f"Elapsed Time to compute cost for survived candidates = {(time.perf_counter() - t1) * 1e3:.0f} [ms]")
    logger.info("SelectBestGraphFromCandidates finished.")
    if not survivors:  # the message names the smallest exact peak: the lower bounds are evaluated in full
        cands = [c if c.step_time is not None or not (c.reason or "").startswith(EARLY_REJECTION)
                 else ev.compile(c.config, exact=True) for c in cands]
        best = min(cands, key=lambda c: c.memory.total)
        _detailed_log(env.detailed_log, cands, None)
        raise NoFeasibleConfigError(
            no_fit_message(best, cap=cap, cluster=cluster, options=opts, ratio=env.memory_usage_correction_ratio,
                            global_batch=batch)
        )
    chosen = min(survivors, key=lambda c: (c.step_time, c.memory.total, c.config.num_stages, c.config.num_micro_batches))
    logger.info("Configuration for parallelism is selected.")
    logger.info(chosen.config.to_moreh_line())
    logger.info("train: true")
    _detailed_log(env.detailed_log, cands, chosen.config)
    if dump:
        write_text(SELECTED_DUMP, chosen.config.to_moreh_line() + "\n")
    return Plan(
        config=chosen.config,
        selected=chosen,
        candidates=cands,
        planning_ms=(time.perf_counter() - t_start) * 1e3,
        memory_cap=cap,
        cluster=cluster,
        graph=graph,
        global_batch=batch,
        corrections=corrections,
    )


def _detailed_log(level: int, cands: list[Candidate], selected: ParallelConfig | None) -> None:
    if level == 0:
        return
    table = candidate_table(cands, selected)
    if level == 1:
        for line in table.splitlines():
            logger.info(line)
    else:
        write_text(DETAILED_DUMP, table + "\n")


def plan(
    model: Any,
    args: Any = (),
    kwargs: dict[str, Any] | None = None,
    *,
    cluster: Cluster | None = None,
    options: Any = None,
    optimizer: Any = "adamw",
    dump: bool = False,
) -> Plan:
    """Pick the fastest parallel configuration that fits, for ``model`` on one global batch.

    Args:
        model: the ``nn.Module`` (on meta, CPU or CUDA; not modified), or a
            :class:`ModelGraph` already traced.
        args: positional inputs of one GLOBAL batch (real, fake or meta tensors).
        kwargs: keyword inputs (e.g. ``labels=``).
        cluster: devices to plan for; None = ``Cluster.detect(calibrate=True)``.
        options: what the user allows the planner to choose: an ``APOptions``, a dict of its keywords,
            or None (= ``APOptions()``, everything 'auto'). The planner reads no global state: the one-line
            mode passes the options it was enabled with.
        optimizer: "adamw", "adam", "sgd", "lamb", an optimizer instance or class.
        dump: write the selected line to ``advanced_parallelization_selected_config.dump``.

    Returns:
        A :class:`Plan` (``.config``, ``.candidates``, ``.summary()``, ``.planning_ms``).

    Raises:
        NoFeasibleConfigError: nothing fits (bytes requested vs available, and the ways out).
        TypeError / ValueError: a bad argument, naming it and the accepted values.
    """
    started = time.perf_counter()
    opts = _normalize_options(options)
    if cluster is not None and not isinstance(cluster, Cluster):
        raise TypeError(f"plan(cluster={cluster!r}) is not valid: expected a moreh_ap.Cluster or None")
    cluster = cluster if cluster is not None else Cluster.detect(calibrate=True)
    graph = model if isinstance(model, ModelGraph) else trace(model, args, kwargs)
    calibrate_for_plan(cluster, graph, model=model, args=args, kwargs=kwargs, optimizer=optimizer, options=opts)
    return plan_graph(graph, cluster=cluster, options=opts, optimizer=optimizer, dump=dump, started=started,
                      tp=tp_facts(model, args, kwargs))


def evaluate_config(graph: ModelGraph, config: ParallelConfig, *, cluster: Cluster, optimizer: Any = "adamw",
                    tp: TPFacts | None = None) -> Candidate:
    """One configuration's predicted memory and step time, as :func:`plan_graph` computes a candidate's
    (``tp``: the family's tensor-parallel facts, needed when ``config.tp > 1``)."""
    cap = int(cluster.device_memory * read_env().memory_usage_correction_ratio / 100)
    ev = Evaluator(graph, cluster, world=cluster.world_size, optimizer=optimizer, cap=cap, tp=tp)
    return ev.cost(ev.compile(config, exact=True))
