# moreh_ap: automatic parallelization for PyTorch training scripts (also reachable as torch.moreh).
"""One line turns a single-device PyTorch training script into a distributed one.

>>> import torch, moreh_ap
>>> torch.moreh.option.enable_advanced_parallelization()   # = moreh_ap.option...
"""
from __future__ import annotations

import sys as _sys

import torch

from moreh_ap._version import __version__
from moreh_ap import apex, env, optim, option
from moreh_ap.config import ParallelConfig
from moreh_ap.errors import NoFeasibleConfigError
from moreh_ap.graph import ModelGraph, trace
from moreh_ap.log import logger
from moreh_ap.optim import FusedLAMB
from moreh_ap.ap_options import APOptions
from moreh_ap.planner import Cluster, Plan, plan
from moreh_ap.ranks import launch_rank
from moreh_ap.signals import Terminated
from moreh_ap import checkpoint, runtime
from moreh_ap.runtime import ParallelModel, clip_grad_norm_, parallelize

__all__ = [
    "__version__",
    "APOptions",
    "Cluster",
    "FusedLAMB",
    "ModelGraph",
    "NoFeasibleConfigError",
    "ParallelConfig",
    "ParallelModel",
    "Plan",
    "apex",
    "checkpoint",
    "clip_grad_norm_",
    "env",
    "launch_rank",
    "Terminated",
    "logger",
    "optim",
    "option",
    "parallelize",
    "plan",
    "runtime",
    "trace",
]

# Validate the MOREH_* variables now: a bad value fails at import, naming the variable (with
# MOREH_ENABLE_ADVANCED_PARALLELIZATION=1 the script's first .cuda() or optimizer raises it too).
option._enable_from_environment()
_settings = env.read_env()

# `torch.moreh` is this package (the start-up hook installs a lazy stand-in before), also as a module name
# (`import torch.moreh`): naming this module from inside it, and adding a module name, both go through sys.modules.
_package = _sys.modules[__name__]
torch.moreh = _package
_sys.modules.setdefault("torch.moreh", _package)
# apex's optimizer under the MoAI guide's spelling: torch.ops.moreh.FusedLAMB (an attribute of torch.ops'
# "moreh" namespace object, which torch creates on first access and caches).
torch.ops.moreh.FusedLAMB = FusedLAMB
