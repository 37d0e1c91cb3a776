# The user's switch: enable/disable advanced parallelization and the seven search options.
"""``moreh_ap.option`` (also ``torch.moreh.option``).

Three equivalent ways to turn advanced parallelization (AP) on:

1. ``moreh_ap.option.enable_advanced_parallelization()`` in the script;
2. ``MOREH_ENABLE_ADVANCED_PARALLELIZATION=1`` in the environment (no code
   change; ``=0`` turns AP off even when the script calls ``enable``);
3. keyword overrides that restrict the search, e.g.
   ``enable_advanced_parallelization(num_stages=2, activation_recomputation=True)``.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any

from moreh_ap import env as _env
from moreh_ap import launcher, oneline
from moreh_ap.ap_options import APOptions
from moreh_ap.log import logger
from moreh_ap.oneline.choose import pinned_config

__all__ = ["APOptions", "enable_advanced_parallelization", "disable_advanced_parallelization",
           "is_advanced_parallelization_enabled", "current_options"]

@dataclass(slots=True)
class _State:
    requested: bool = False  # enable() was called (or the env var said 1)
    options: APOptions = APOptions()


_lock = threading.Lock()
_state = _State()


def enable_advanced_parallelization(**overrides: Any) -> None:
    """Turn advanced parallelization on for this process.

    Keyword overrides restrict the planner's search; they are validated here,
    at the call. ``MOREH_ENABLE_ADVANCED_PARALLELIZATION=0`` keeps AP off even
    when this is called.

    Args:
        **overrides: any of ``pipeline_parallel`` (bool), ``num_stages``
            ('auto' or int >= 1, the maximum), ``num_micro_batches`` ('auto'
            or int >= 1), ``activation_recomputation`` ('auto' or bool),
            ``distribute_parameter`` ('auto' or bool), ``mixed_precision`` (bool),
            ``tensor_parallel`` ('auto' or a power of two >= 1, the maximum degree; 1 = no tensor
            parallelism).

    Raises:
        TypeError: an unknown keyword, or a value of the wrong type (``tensor_parallel=True/False``: use 1).
        ValueError: a value out of range (e.g. ``num_stages=0``, ``'Auto'``),
            or a MOREH_* environment variable that does not parse (``MOREH_AP_CONFIG`` included);
            the message names the variable.
    """
    options = APOptions.from_overrides(overrides)
    settings = _env.read_env()
    if settings.enable is not False:
        pinned_config(options)  # a bad MOREH_AP_CONFIG fails here, not at the first forward
    with _lock:
        _state.requested = True
        _state.options = options
    if settings.enable is False:
        logger.info(f"Advanced parallelization stays off: {_env.ENABLE}=0.")
        oneline.install(options=options, cpu_only=True)
        return
    launcher.maybe_launch()  # a plain `python` run becomes several local ranks (see moreh_ap.launcher)
    oneline.install(options=options)


def disable_advanced_parallelization() -> None:
    """Turn advanced parallelization off (the options return to their defaults)."""
    with _lock:
        _state.requested = False
        _state.options = APOptions()
    oneline.uninstall()


def is_advanced_parallelization_enabled() -> bool:
    """True when AP was enabled (by the call or the env var) and the env var is not 0."""
    with _lock:
        requested = _state.requested
    return requested and _env.read_env().enable is not False


def current_options() -> APOptions:
    """The options the planner will honour (defaults when none were given)."""
    with _lock:
        return _state.options


def _enable_from_environment() -> None:
    """Called when torch is imported (start-up hook) and when moreh_ap is imported.

    A MOREH_* variable with a bad value cannot be raised here (the start-up hook never raises): the
    error is kept, and the script's first ``.cuda()``, optimizer, or call of
    :func:`enable_advanced_parallelization` raises it (:func:`moreh_ap.oneline.install_failed`), so a
    run that asked for AP never trains without it.

    Raises:
        ValueError: the same error, for the caller to report (the hook prints it in one line).
    """
    raw = os.environ.get(_env.ENABLE, "").strip()
    if raw != "1":
        return
    with _lock:
        _state.requested = True
        options = _state.options
    try:
        _env.read_env()
        pinned_config(options)
    except ValueError as exc:
        oneline.install_failed(ValueError(f"advanced parallelization was requested by {_env.ENABLE}=1 but "
                                          f"cannot start: {exc}"))
        raise
    launcher.maybe_launch()  # a plain `python` run becomes several local ranks (see moreh_ap.launcher)
    oneline.install(options=options)
