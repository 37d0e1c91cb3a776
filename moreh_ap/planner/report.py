# The planner's text reports: the per-candidate table and the out-of-memory message with its ways out.
from __future__ import annotations

from typing import Any

from moreh_ap.ap_options import APOptions
from moreh_ap.config import ParallelConfig
from moreh_ap.planner.cluster import Cluster

__all__ = ["candidate_table", "no_fit_message"]


def _table(cands: list[Any]) -> list[str]:
    gib = 1024**3
    head = (
        f"{'#':>4} {'pp':>3} {'tp':>2} {'nmb':>4} {'bpd':>4} {'rec':>3} {'dist':>4} {'low':>3} {'schedule':>17} "
        f"{'params':>8} {'grads':>8} {'optim':>8} {'acts':>8} {'trans':>8} {'total GiB':>9} {'step s':>10}  verdict"
    )
    rows = [head]
    for i, c in enumerate(cands):
        cfg, m = c.config, c.memory
        sched = cfg.schedule + (f"x{cfg.stages_per_rank}" if cfg.stages_per_rank > 1 else "") if cfg.num_stages > 1 else "-"
        verdict = "ok" if c.feasible else "OOM"
        rows.append(
            f"{i:>4} {cfg.num_stages:>3} {cfg.tp:>2} {cfg.num_micro_batches:>4} {cfg.batch_per_device:>4} "
            f"{int(cfg.recomputation):>3} {int(cfg.distribute_param):>4} {int(cfg.distribute_low_prec_param):>3} "
            f"{sched:>17} {m.params / gib:>8.2f} {m.grads / gib:>8.2f} {m.optimizer / gib:>8.2f} "
            f"{m.activations / gib:>8.2f} {m.transient / gib:>8.2f} {m.total / gib:>9.2f} "
            f"{(f'{c.step_time:.4g}' if c.step_time is not None else '-'):>10}  {verdict}"
        )
    return rows


def candidate_table(cands: list[Any], selected: ParallelConfig | None = None) -> str:
    """The per-candidate table (memory breakdown in GiB per device, step time, verdict)."""
    rows = _table(cands)
    if selected is not None:
        for i, c in enumerate(cands):
            if c.config == selected:
                rows[i + 1] = rows[i + 1].replace("  ok", "  selected")
    return "\n".join(rows)


def no_fit_message(best: Any, *, cap: int, cluster: Cluster, options: APOptions, ratio: int,
                    global_batch: int) -> str:
    m = best.memory
    ways = [
        f"more devices (now {cluster.nodes} node(s) x {cluster.devices_per_node})",
        f"a smaller global batch (now {global_batch})",
    ]
    if options.activation_recomputation is False:
        ways.append("allow activation_recomputation ('auto' or True)")
    if options.distribute_parameter is False:
        ways.append("allow distribute_parameter ('auto' or True)")
    if not options.pipeline_parallel:
        ways.append("allow pipeline_parallel")
    elif isinstance(options.num_stages, int):
        ways.append(f"allow more pipeline stages (num_stages <= {options.num_stages} now)")
    if options.tensor_parallel == 1:
        ways.append("allow tensor_parallel ('auto' or a degree > 1; families with a tensor-parallel plan)")
    if options.mixed_precision is False:
        ways.append("mixed_precision=True")
    if ratio < 100:
        ways.append(f"a higher MOREH_ADVANCED_PARALLELIZATION_MEMORY_USAGE_CORRECTION_RATIO (now {ratio})")
    ways.append("an optimizer with less state (e.g. SGD) or fused kernels (AdamW(fused=True))")
    return (
        "OUT_OF_MEMORY: no parallel configuration fits in device memory. "
        f"Best candidate ({best.config.to_moreh_line()}) requests {m.total:,} bytes per device "
        f"but {cap:,} bytes are available ({cluster.device_memory:,} x {ratio}%). "
        f"Breakdown: params {m.params:,}, grads {m.grads:,}, optimizer {m.optimizer:,}, "
        f"activations {m.activations:,}, transient {m.transient:,}. "
        "Ways out: " + "; ".join(ways) + "."
    )
