# The configuration choice at engagement: pinned by MOREH_AP_CONFIG or planned, rank 0's choice given to all.
"""Every rank runs the planner on the same inputs (its calibration is collective); rank 0's config wins."""
from __future__ import annotations

import json
import os
from dataclasses import replace
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from moreh_ap.ap_options import APOptions
from moreh_ap.config import ParallelConfig
from moreh_ap.files import write_text
from moreh_ap.log import logger
from moreh_ap.planner import plan
from moreh_ap.planner.planning import SELECTED_DUMP
from moreh_ap.runtime.dist import rank, world_size

__all__ = ["CONFIG_ENV", "DUMP_FILE", "PLANNING_TIMEOUT_S", "choose_config", "choose_plan", "pinned_config",
           "check_pinned_batch", "check_pinned_restrictions", "check_micro_batches"]

CONFIG_ENV = "MOREH_AP_CONFIG"
"""Pin the parallel configuration (JSON of ``ParallelConfig.to_dict()`` or the seed's line): skips the planner."""

DUMP_FILE = SELECTED_DUMP
"""Where rank 0 writes the chosen configuration's line (in the working directory)."""

PLANNING_TIMEOUT_S = 3600
"""How long the other ranks wait for rank 0's planner (tracing, calibration, search)."""


def choose_config(root: nn.Module, args, kwargs, *, optimizer, options: APOptions,
                  recompute_fixed: bool) -> ParallelConfig:
    """The configuration every rank runs: rank 0's choice, given to all (see :func:`choose_plan`)."""
    return choose_plan(root, args, kwargs, optimizer=optimizer, options=options, recompute_fixed=recompute_fixed)[0]


def choose_plan(root: nn.Module, args, kwargs, *, optimizer, options: APOptions, recompute_fixed: bool,
                restricted: str = "", one_micro_batch: bool = False) -> tuple[ParallelConfig, Any]:
    """The configuration every rank runs (rank 0's choice, given to all) and this rank's plan when it
    chose that configuration (None when pinned or when this rank's plan differs): the engine's prediction.

    Every rank plans (the planner's calibration is collective); an error on rank 0 is raised on
    every rank, so nobody waits for a config that never comes.

    Args:
        root: the model (not modified).
        args: positional inputs of the global batch.
        kwargs: keyword inputs of the global batch.
        optimizer: the user's optimizer (its kind sets the planner's optimizer-state memory).
        options: the user's search options.
        recompute_fixed: recomputation is on regardless of the options (HF gradient checkpointing).
        restricted: why the model may not be pipelined (logged once; empty: it may be).
        one_micro_batch: plan one micro-batch (a loss computed outside the model: one forward per call).

    Raises:
        ValueError: a pinned configuration the model cannot run (pipelined, or several micro-batches,
            where ``restricted`` / ``one_micro_batch`` forbid it); the planner's errors.
    """
    if restricted:
        options = replace(options, pipeline_parallel=False)
        logger.info(restricted)
    if one_micro_batch:
        options = replace(options, num_micro_batches=1)
    plans: list = []
    try:
        mine = ("ok", _plan_here(root, args, kwargs, optimizer=optimizer, options=options,
                                 recompute_fixed=recompute_fixed, plans=plans, restricted=restricted,
                                 one_micro_batch=one_micro_batch))
    except Exception as exc:  # rank 0's error is every rank's error: nobody waits for a config that never comes
        mine = ("error", exc)
    box = [mine]
    if world_size() > 1:
        box = [mine if rank() == 0 else None]
        dist.broadcast_object_list(box, src=0, group=_planning_group())
    kind, value = box[0]
    if kind == "error":
        raise value
    if mine[0] == "error":
        raise mine[1]
    config = ParallelConfig.from_dict(value)
    return config, next((p for p in plans if p.config == config), None)


def _plan_here(root, args, kwargs, *, optimizer, options: APOptions, recompute_fixed: bool, plans: list,
               restricted: str = "", one_micro_batch: bool = False) -> dict:
    """This rank's choice as a dict: the pinned config or the planner's (a collective: it calibrates with
    every rank). Only rank 0 logs and writes the dump file."""
    if recompute_fixed and options.activation_recomputation == "auto":
        options = replace(options, activation_recomputation=True)
    config = pinned_config(options)
    if config is None:
        check_micro_batches(options, _batch_size(args, kwargs), world_size())
        plans.append(plan(root, args, kwargs, options=options, optimizer=optimizer, dump=rank() == 0))
        return plans[-1].config.to_dict()
    check_pinned_restrictions(config, restricted=restricted, one_micro_batch=one_micro_batch)
    check_pinned_batch(config, _batch_size(args, kwargs), world_size())
    logger.info(f"Configuration for parallelism is pinned by {CONFIG_ENV}.")
    if recompute_fixed:
        config = config.replace(recomputation=True)
    logger.info("Configuration for parallelism is selected.")
    logger.info(config.to_moreh_line())
    logger.info("train: true")
    if rank() == 0:
        write_text(DUMP_FILE, config.to_moreh_line() + "\n")
    return config.to_dict()


def pinned_config(options: APOptions) -> ParallelConfig | None:
    """The configuration ``MOREH_AP_CONFIG`` pins (None when unset).

    The variable holds the JSON of ``ParallelConfig.to_dict()``, the seed's line, or the path of a
    file whose first line is the seed's line (then ``mixed_precision`` comes from ``options``).
    :func:`moreh_ap.option.enable_advanced_parallelization` calls it, so a bad value fails there.

    Raises:
        ValueError: the value is not valid JSON, a malformed line, names an unknown field, or a file
            that is missing, a directory, empty or malformed; the message names ``MOREH_AP_CONFIG``.
    """
    raw = os.environ.get(CONFIG_ENV, "").strip()
    if not raw:
        return None
    accepted = ("accepted: the JSON of ParallelConfig.to_dict(), a line such as 'num_stages : 2, "
                "num_micro_batches : 4, batch_per_device : 1, ...', or the path of a file holding that line")
    try:
        if raw.startswith("{"):
            try:
                data = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not valid JSON: {exc}") from None
            if not isinstance(data, dict):
                raise ValueError("the JSON is not an object")
            return ParallelConfig.from_dict(data)
        line = raw if ":" in raw and not os.path.exists(raw) else _first_line(raw)
        return ParallelConfig.from_moreh_line(line).replace(mixed_precision=options.mixed_precision)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{CONFIG_ENV}={raw!r} is not valid: {exc}; {accepted}") from None


def _first_line(path: str) -> str:
    """The first non-blank line of the file ``path`` (ValueError when missing, a directory or empty)."""
    if not os.path.exists(path):
        raise ValueError(f"no such file {path!r}")
    if os.path.isdir(path):
        raise ValueError(f"{path!r} is a directory, not a file")
    try:
        with open(path, errors="replace") as f:
            lines = [l.strip() for l in f.read().splitlines() if l.strip()]
    except OSError as exc:
        raise ValueError(f"cannot read {path!r}: {exc.strerror or exc}") from None
    if not lines:
        raise ValueError(f"the file {path!r} is empty")
    return lines[0]


def _batch_size(args, kwargs) -> int | None:
    """Samples in the global batch: the first dim of the first input tensor (None without one)."""
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return None


def check_micro_batches(options: APOptions, batch: int | None, world: int) -> None:
    """An int ``num_micro_batches`` must divide the per-replica batch for some data-parallel degree.

    Raises:
        ValueError: it divides none; the message names ``num_micro_batches`` and the accepted values.
    """
    nmb = options.num_micro_batches
    if not isinstance(nmb, int) or batch is None:
        return
    per_replica = sorted({batch // (world // pp) for pp in range(1, world + 1)
                          if world % pp == 0 and batch % (world // pp) == 0})
    accepted = sorted({d for b in per_replica for d in range(1, b + 1) if b % d == 0})
    if nmb in accepted:
        return
    raise ValueError(f"enable_advanced_parallelization(num_micro_batches={nmb}): a global batch of {batch} samples on "
                     f"{world} rank(s) cannot be cut into {nmb} micro-batches per data-parallel replica (samples "
                     f"per replica: {', '.join(map(str, per_replica)) or 'none'}); accepted: 'auto' or one of "
                     f"{', '.join(map(str, accepted))}")


def check_pinned_restrictions(config: ParallelConfig, *, restricted: str, one_micro_batch: bool) -> None:
    """A pinned configuration must not pipeline a model that cannot be, nor cut a loss-outside model's batch.

    Raises:
        ValueError: naming ``MOREH_AP_CONFIG``, the cause and the way out.
    """
    if restricted and config.num_stages > 1:
        raise ValueError(f"{CONFIG_ENV} pins num_stages : {config.num_stages}, but this model cannot be pipelined "
                         f"({restricted}); pin num_stages : 1")
    if one_micro_batch and config.num_micro_batches > 1:
        raise ValueError(f"{CONFIG_ENV} pins num_micro_batches : {config.num_micro_batches}, but the model's loss is "
                         "computed outside it (its output holds no loss): each call is one forward of the rank's "
                         "rows, so pin num_micro_batches : 1 (and batch_per_device : the rows per rank)")


def check_pinned_batch(config: ParallelConfig, batch: int | None, world: int) -> None:
    """A pinned configuration must describe the real batch: ``dp * num_micro_batches * batch_per_device``.

    Raises:
        ValueError: the pinned global batch differs from ``batch``; the message gives both numbers.
    """
    if batch is None:
        return
    dp = config.dp(world)
    pinned = dp * config.num_micro_batches * config.batch_per_device
    if pinned == batch:
        return
    per = dp * config.num_micro_batches
    fix = (f"batch_per_device : {batch // per} fits it" if batch % per == 0 else
           f"no batch_per_device fits it with dp({dp}) x num_micro_batches({config.num_micro_batches})")
    raise ValueError(f"{CONFIG_ENV} pins batch_per_device : {config.batch_per_device} (a global batch of dp({dp}) x "
                     f"num_micro_batches({config.num_micro_batches}) x batch_per_device"
                     f"({config.batch_per_device}) = {pinned} samples), but the training batch has {batch} "
                     f"samples; {fix}")


def _planning_group():
    """A gloo group whose timeout covers planning (the default group's is short, so a dead peer shows fast)."""
    return dist.new_group(backend="gloo", timeout=timedelta(seconds=PLANNING_TIMEOUT_S))
