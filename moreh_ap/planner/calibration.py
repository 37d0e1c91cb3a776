# load_or_measure: this machine's calibration DB, read from the cache file or measured (then cached).
"""Measured speeds for the cost model, measured once per machine and cached.

The DB (:mod:`moreh_ap.planner.calibration_db`) is looked up by this machine's
:func:`fingerprint`; a missing entry is measured quietly with the
microbenchmarks (:mod:`moreh_ap.planner.microbench`), a corrupt or foreign
file gives a warning and is measured again (and replaced). Collectives need a
process group: without one the DB has no collective table and the cost model
uses the analytic model (:mod:`moreh_ap.planner.time_model`).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from moreh_ap.env import read_env
from moreh_ap.log import current_rank, logger
from moreh_ap.planner.calibration_db import FILENAME, CalibrationDB, read_cache, write_entry
from moreh_ap.planner.microbench import COLLECTIVE_SIZES, MATMUL_SIZES, measure_collectives, measure_compute

__all__ = ["BASE_BUDGET_S", "CalibrationDB", "fingerprint", "load_or_measure"]

BASE_BUDGET_S = {"cpu": 8.0, "cuda": 20.0}
"""Seconds the matmul + reference-block measurement may take per device type (of the whole calibration's
``shape_calibration.BUDGET_S``; a CPU without fast bf16 takes seconds per 1024-side bf16 product)."""


def _pg_world() -> int:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size()
    except Exception:
        pass
    return 0


def fingerprint(cluster) -> dict[str, Any]:
    """What a cached DB must match to be reused."""
    import platform

    import torch

    if cluster.device_type == "cuda" and torch.cuda.is_available():
        device = torch.cuda.get_device_name(torch.cuda.current_device())
    else:
        device = f"cpu:{platform.machine()}:{os.cpu_count()}"
    fp: dict[str, Any] = {
        "device": device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "world": _pg_world(),
    }
    if fp["world"] > 1:  # collective times depend on the backend and on how many ranks share a node
        import torch.distributed as dist

        fp["backend"] = str(dist.get_backend())
        fp["ranks_per_node"] = int(cluster.devices_per_node)
    return fp


def _device(cluster):
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if cluster.device_type == "cuda" and torch.cuda.is_available() else torch.device("cpu")


def load_or_measure(
    cluster,
    *,
    cache_dir: str | os.PathLike | None = None,
    matmul_sizes=MATMUL_SIZES,
    collective_sizes=COLLECTIVE_SIZES,
    block_shape: tuple[int, int, int, int] | None = None,
) -> CalibrationDB:
    """The cached DB for this machine, or a fresh measurement (then cached).

    With a process group up every rank must call this (they agree on whether
    to measure, and time the collectives together); rank 0 writes the file.
    """
    fp = fingerprint(cluster)
    path = Path(cache_dir if cache_dir is not None else read_env().cache_dir) / FILENAME
    db = read_cache(path, fp)
    world = fp["world"]
    if world > 1:  # every rank must take the same branch
        import torch
        import torch.distributed as dist

        flag = torch.tensor([0.0 if db is not None else 1.0], device=_device(cluster))
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0:
            db = None
    if db is not None:
        logger.info("Got DBs from backend for auto config.")
        return db
    t0 = time.perf_counter()
    device = _device(cluster)
    matmul, eff, floor = measure_compute(device, sizes=matmul_sizes, shape=block_shape,
                                         budget_s=BASE_BUDGET_S.get(device.type, BASE_BUDGET_S["cuda"]))
    db = CalibrationDB(fingerprint=fp, matmul=matmul, block_efficiency=eff, block_floor=floor)
    if world > 1:
        db.collectives = measure_collectives(device, sizes=collective_sizes)
        db.collective_world = world
    else:
        logger.info(
            "Collective calibration needs a process group and none is up: "
            "collective times come from the analytic ring model on the Cluster's bandwidths."
        )
    ms = (time.perf_counter() - t0) * 1e3
    db.measure_s = ms / 1e3

    saved = False
    if current_rank() == 0:
        try:
            saved = write_entry(path, db)
        except OSError as exc:
            logger.warning(f"Could not write the calibration DB to {path}: {exc}")
    where = f"saved to {path}" if saved else "not saved"
    logger.info(f"Calibration DB measured in {ms:.0f} [ms] and {where}.")
    return db
