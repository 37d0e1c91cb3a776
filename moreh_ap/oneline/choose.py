# The configuration choice at engagement: pinned by MOREH_AP_CONFIG or planned, rank 0's choice given to all.
"""Every rank runs the planner on the same inputs (its calibration is collective); rank 0's config wins."""
from __future__ import annotations

import json
import os
from dataclasses import replace
from datetime import timedelta
from typing import Any

import torch.distributed as dist
from torch import nn

from moreh_ap.ap_options import APOptions
from moreh_ap.config import ParallelConfig
from moreh_ap.log import logger
from moreh_ap.planner import plan
from moreh_ap.planner.planning import SELECTED_DUMP
from moreh_ap.runtime.dist import rank, world_size

__all__ = ["CONFIG_ENV", "DUMP_FILE", "PLANNING_TIMEOUT_S", "choose_config", "choose_plan", "pinned_config"]

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


def choose_plan(root: nn.Module, args, kwargs, *, optimizer, options: APOptions,
                recompute_fixed: bool) -> tuple[ParallelConfig, Any]:
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
    """
    plans: list = []
    try:
        mine = ("ok", _plan_here(root, args, kwargs, optimizer=optimizer, options=options,
                                 recompute_fixed=recompute_fixed, plans=plans))
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


def _plan_here(root, args, kwargs, *, optimizer, options: APOptions, recompute_fixed: bool, plans: list) -> dict:
    """This rank's choice as a dict: the pinned config or the planner's (a collective: it calibrates with
    every rank). Only rank 0 logs and writes the dump file."""

    if recompute_fixed and options.activation_recomputation == "auto":
        options = replace(options, activation_recomputation=True)
    config = pinned_config(options)
    if config is None:
        plans.append(plan(root, args, kwargs, options=options, optimizer=optimizer, dump=rank() == 0))
        return plans[-1].config.to_dict()
    logger.info(f"Configuration for parallelism is pinned by {CONFIG_ENV}.")
    if recompute_fixed:
        config = config.replace(recomputation=True)
    logger.info("Configuration for parallelism is selected.")
    logger.info(config.to_moreh_line())
    logger.info("train: true")
    if rank() == 0:
        with open(DUMP_FILE, "w") as f:
            f.write(config.to_moreh_line() + "\n")
    return config.to_dict()


def pinned_config(options: APOptions) -> ParallelConfig | None:
    """The configuration ``MOREH_AP_CONFIG`` pins (None when unset).

    The variable holds the JSON of ``ParallelConfig.to_dict()``, the seed's line, or the path of a
    file whose first line is the seed's line (then ``mixed_precision`` comes from ``options``).

    Raises:
        ValueError: the variable starts like JSON but is not valid JSON.
    """
    raw = os.environ.get(CONFIG_ENV, "").strip()
    if not raw:
        return None
    if raw.startswith("{"):
        try:
            return ParallelConfig.from_dict(json.loads(raw))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{CONFIG_ENV}={raw!r} is not valid JSON: {exc}") from None
    if os.path.isfile(raw):
        raw = open(raw).read().strip().splitlines()[0]
    return ParallelConfig.from_moreh_line(raw).replace(mixed_precision=options.mixed_precision)


def _planning_group():
    """A gloo group whose timeout covers planning (the default group's is short, so a dead peer shows fast)."""
    return dist.new_group(backend="gloo", timeout=timedelta(seconds=PLANNING_TIMEOUT_S))
