# calibrate_model: time what the cost model needs at a traced model's own shapes, within a budget, cached in the DB.
"""Calibration at the model's own shapes, added to this machine's calibration DB.

What is timed (each only when missing from the DB, so a re-plan of the same model on the same machine
measures nothing):

* GEMMs at the traced nodes' own ``(m, k, n)`` (forward shapes at micro-batch 1 and at the traced batch,
  deduplicated, the ``MAX_GEMMS`` with the most FLOPs per dtype) -> ``CalibrationDB.model_gemm``; a shape
  whose estimated time is over the per-item cap is timed scaled down (every side by the same factor: same
  aspect) and its time extrapolated at that rate;
* when the model exists (parameters not on the meta device, on the cluster's device type): its own block
  (every distinct block of the graph) forward + backward as the model runs it (:mod:`moreh_ap.planner.block_bench`:
  bf16 autocast for mixed precision, the runtime's checkpoint wrapper when recomputed) at micro-batches of
  1, 2, 4, ... up to the traced batch, its head + loss likewise -> ``CalibrationDB.node_times``; the user's
  optimizer class, one ``step()`` over parameters of the model's shapes -> ``CalibrationDB.optimizer_step``
  (seconds per parameter). A model planned from the meta device (or a traced graph alone) gets GEMMs only:
  its blocks and optimizer are costed by formulas.

The budget (``BUDGET_S`` per device type, minus what the base measurement took, at least ``MIN_SHARE`` of
it): items are timed in order of size and one whose estimate does not fit what is left is not timed (the
cost model extrapolates the micro-batch linearly from the measured ones, or uses formulas). With a process group up every rank must call
this: the ranks agree on what to time, time it together, and keep the slowest rank's time of what every rank
timed. The draws run inside :func:`~moreh_ap.planner.private_rng.private_rng`; the user's modules are not
touched (copies are timed).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from moreh_ap.env import read_env
from moreh_ap.log import current_rank, logger
from moreh_ap.planner.calib_items import Item, node_items
from moreh_ap.planner.calibration_db import FILENAME, write_entry
from moreh_ap.planner.gemm_bench import gemm_items
from moreh_ap.planner.private_rng import private_rng

__all__ = ["BUDGET_S", "calibrate_model", "calibrate_for_plan"]

BUDGET_S = {"cpu": 20.0, "cuda": 60.0}
"""Seconds the whole calibration (the base DB and this) may take per device type."""
MIN_SHARE = 0.25
"""The model's part gets at least this share of ``BUDGET_S`` even when the base measurement took more than the rest
(a busy machine): its own block and head are what the cost model needs most."""
ITEM_SHARE = 0.25
"""No single item may take more than this share of the budget (warm-up and repeats included): one whose warm-up
and first timed call are estimated over it is not timed, and its repeats stop there."""


def _device(cluster):
    import torch

    if cluster.device_type == "cuda" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _live(model: Any, device) -> bool:
    """Whether ``model`` is a module with real parameters on ``device``'s type (not meta)."""
    from torch import nn

    if not isinstance(model, nn.Module):
        return False
    p = next(model.parameters(), None)
    return p is not None and p.device.type == device.type


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _agree(values: list[float], *, op: str, device) -> list[float]:
    """Element-wise MAX or MIN of ``values`` over the ranks (as they are without a group)."""
    if _world() <= 1 or not values:
        return values
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.MIN)
    return t.tolist()


def _measure(items: list[Item], *, budget: float, device) -> tuple[list[float], int]:
    """Each item's seconds (-1 when not timed), in order, within ``budget`` seconds; and how many were skipped."""
    t0 = time.perf_counter()
    out, skipped = [], 0
    cap = ITEM_SHARE * budget
    for it in items:
        cost = 2 * it.estimate()  # the warm-up and at least one timed call (more while the item's share allows)
        if (cost > cap and not it.essential) or time.perf_counter() - t0 + cost > budget:
            out.append(-1.0)
            skipped += 1
            continue
        try:
            sec = it.run()
        except Exception as exc:  # a part that cannot run on its own: costed by the formulas
            logger.debug(f"Calibration item {it.key} not timed: {exc}")
            sec = None
        out.append(float(sec) if sec is not None and sec > 0 else -1.0)
    return out, skipped


@private_rng()
def calibrate_model(cluster, graph, *, model: Any = None, args: Any = (), kwargs: dict | None = None,
                    optimizer: Any = "adamw", dtypes: tuple[str, ...] = ("bf16", "fp32"),
                    recomputes: tuple[bool, ...] = (False, True), budget_s: float | None = None,
                    cache_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Time what the cost model needs at ``graph``'s shapes (and ``model``'s own parts when it exists) into
    ``cluster.calibration`` and save it in the cache.

    Args:
        cluster: the cluster whose calibration DB (measured on this machine) is extended; nothing is done
            without one or for a DB read from a file.
        graph: the traced model (:func:`moreh_ap.trace`).
        model: the ``nn.Module`` traced, or None / a meta model (GEMMs only).
        args: positional inputs of the traced (global) batch.
        kwargs: keyword inputs of the traced batch.
        optimizer: the optimizer spec or instance the plan is for (its class is timed).
        dtypes: "bf16" (mixed precision) and / or "fp32".
        recomputes: the recomputation settings the candidates use.
        budget_s: seconds for this calibration (default ``BUDGET_S[device type]`` minus the base measurement's,
            at least ``MIN_SHARE`` of it).
        cache_dir: where ``calibration.json`` is (default ``MOREH_AP_CACHE_DIR``).

    Returns:
        A summary: items to time (those not cached yet), timed, skipped for the budget, seconds taken, budget.
    """
    db = cluster.calibration
    if db is None or db.source not in ("measured", "cache"):
        return {"timed": 0, "skipped": 0, "total": 0, "seconds": 0.0, "budget_s": 0.0}
    t0 = time.perf_counter()
    device = _device(cluster)
    base_s = db.measure_s if db.source == "measured" else 0.0  # a cached base DB cost nothing this time
    if budget_s is None:
        total_s = BUDGET_S.get(device.type, BUDGET_S["cuda"])
        budget_s = max(MIN_SHARE * total_s, total_s - base_s)
    items: list[Item] = []
    if _live(model, device):
        try:
            items += node_items(db, graph, model, args, dict(kwargs or {}), device=device, dtypes=dtypes,
                                recomputes=recomputes, optimizer=optimizer, item_s=ITEM_SHARE * budget_s)
        except Exception as exc:  # the calibration never stops a plan: the formulas serve
            logger.debug(f"The model's own parts are not timed: {exc}")
    items += gemm_items(db, graph, device=device, dtypes=dtypes, cap_s=ITEM_SHARE * budget_s / 2)
    total = len(items)
    hi, lo = _agree([float(total)], op="max", device=device)[0], _agree([float(total)], op="min", device=device)[0]
    if hi != lo:  # the ranks' caches differ (another process wrote meanwhile): nothing is timed, formulas serve
        logger.warning(f"Calibration at the model's shapes skipped: the ranks have {lo:.0f} to {hi:.0f} items to time.")
        return {"timed": 0, "skipped": 0, "total": total, "seconds": 0.0, "budget_s": budget_s}
    times, skipped = _measure(items, budget=budget_s, device=device)
    lows = _agree([t if t > 0 else -1.0 for t in times], op="min", device=device)
    times = _agree(times, op="max", device=device)
    timed = 0
    for it, low, sec in zip(items, lows, times):
        if low > 0:  # every rank timed it: the slowest rank's time
            it.store(sec)
            timed += 1
    seconds = time.perf_counter() - t0
    if timed:
        path = Path(cache_dir if cache_dir is not None else read_env().cache_dir) / FILENAME
        if current_rank() == 0:
            try:
                write_entry(path, db)
            except OSError as exc:
                logger.warning(f"Could not write the calibration DB to {path}: {exc}")
    logger.info(f"Calibration at the model's shapes: {timed} of {total} item(s) timed, {total - timed} left to "
                f"the formulas ({skipped} over the budget) in {seconds:.1f} [s] (budget {budget_s:.1f} s; with the "
                f"base measurement {base_s + seconds:.1f} s in all).")
    return {"timed": timed, "skipped": skipped, "total": total, "seconds": seconds, "budget_s": budget_s}


def calibrate_for_plan(cluster, graph, *, model: Any, args: Any, kwargs: dict | None, optimizer: Any,
                       options: Any) -> dict[str, Any]:
    """:func:`calibrate_model` for what ``options`` (an ``APOptions``) lets the planner choose: the dtype of its
    ``mixed_precision``, the recomputation settings of its ``activation_recomputation``. ``model`` may be a
    :class:`~moreh_ap.graph.model_graph.ModelGraph` (GEMMs only)."""
    rec = options.activation_recomputation
    return calibrate_model(cluster, graph, model=model, args=args, kwargs=kwargs, optimizer=optimizer,
                           dtypes=("bf16",) if options.mixed_precision else ("fp32",),
                           recomputes=(False, True) if rec == "auto" else (bool(rec),))
