# The user's switch: enable/disable advanced parallelization and the six search options.
"""``moreh_ap.option`` (also ``torch.moreh.option``).

Three equivalent ways to turn advanced parallelization (AP) on:

1. ``moreh_ap.option.enable_advanced_parallelization()`` in the script;
2. ``MOREH_ENABLE_ADVANCED_PARALLELIZATION=1`` in the environment (no code
   change; ``=0`` turns AP off even when the script calls ``enable``);
3. keyword overrides that restrict the search, e.g.
   ``enable_advanced_parallelization(num_stages=2, activation_recomputation=True)``.
"""
from __future__ import annotations

import sys
import threading
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from moreh_ap import env as _env
from moreh_ap.log import logger

Auto = Literal["auto"]

_BOOL_OR_AUTO = "'auto', True or False"
_INT_OR_AUTO = "'auto' or an integer >= 1"


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name}={value!r} is not valid: expected True or False")


def _check_bool_or_auto(name: str, value: Any) -> None:
    if value == "auto" and isinstance(value, str):
        return
    if isinstance(value, str):
        raise ValueError(f"{name}={value!r} is not valid: expected {_BOOL_OR_AUTO}")
    if not isinstance(value, bool):
        raise TypeError(f"{name}={value!r} is not valid: expected {_BOOL_OR_AUTO}")


def _check_int_or_auto(name: str, value: Any) -> None:
    if isinstance(value, str):
        if value == "auto":
            return
        raise ValueError(f"{name}={value!r} is not valid: expected {_INT_OR_AUTO}")
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}={value!r} is not valid: expected {_INT_OR_AUTO}")
    if value < 1:
        raise ValueError(f"{name}={value!r} is not valid: expected {_INT_OR_AUTO}")


@dataclass(kw_only=True, slots=True, frozen=True)
class APOptions:
    """What the user allows the planner to choose (seed: "AP 기능 고급 설정")."""

    pipeline_parallel: bool = True
    """Allow pipeline parallelism at all (False = one stage)."""
    num_stages: int | Auto = "auto"
    """MAXIMUM number of pipeline stages, or 'auto'."""
    num_micro_batches: int | Auto = "auto"
    """Micro-batches per step, or 'auto'."""
    activation_recomputation: bool | Auto = "auto"
    """Checkpoint activations (True/False), or let the planner decide ('auto')."""
    distribute_parameter: bool | Auto = "auto"
    """Shard params, grads and optimizer state over data-parallel ranks (FSDP2), or 'auto'."""
    mixed_precision: bool = True
    """bf16 compute with fp32 master weights and reductions."""

    def __post_init__(self) -> None:
        _check_bool("pipeline_parallel", self.pipeline_parallel)
        _check_int_or_auto("num_stages", self.num_stages)
        _check_int_or_auto("num_micro_batches", self.num_micro_batches)
        _check_bool_or_auto("activation_recomputation", self.activation_recomputation)
        _check_bool_or_auto("distribute_parameter", self.distribute_parameter)
        _check_bool("mixed_precision", self.mixed_precision)

    @classmethod
    def keywords(cls) -> tuple[str, ...]:
        """The accepted keyword names, in declaration order."""
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_overrides(cls, overrides: dict[str, Any], *, where: str = "enable_advanced_parallelization") -> APOptions:
        """Build from keyword overrides; unknown keywords raise ``TypeError`` naming the accepted ones."""
        unknown = sorted(set(overrides) - set(cls.keywords()))
        if unknown:
            raise TypeError(
                f"{where}() got unknown keyword(s) {', '.join(map(repr, unknown))}; "
                f"accepted keywords: {', '.join(cls.keywords())}"
            )
        return cls(**overrides)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
            ``distribute_parameter`` ('auto' or bool), ``mixed_precision`` (bool).

    Raises:
        TypeError: an unknown keyword, or a value of the wrong type.
        ValueError: a value out of range (e.g. ``num_stages=0``, ``'Auto'``),
            or a MOREH_* environment variable that does not parse.
    """
    options = APOptions.from_overrides(overrides)
    settings = _env.read_env()
    with _lock:
        _state.requested = True
        _state.options = options
    if settings.enable is False:
        logger.info(f"Advanced parallelization stays off: {_env.ENABLE}=0.")
        _install_hooks(cpu_only=True)
        return
    _launch_ranks()
    _install_hooks()


def disable_advanced_parallelization() -> None:
    """Turn advanced parallelization off (the options return to their defaults)."""
    with _lock:
        _state.requested = False
        _state.options = APOptions()
    if "moreh_ap.oneline" in sys.modules:
        from moreh_ap import oneline

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
    """Called when torch is imported (start-up hook) and when moreh_ap is imported."""
    if _env.read_env().enable is True:
        with _lock:
            _state.requested = True
        _launch_ranks()
        _install_hooks()


def _launch_ranks() -> None:
    """Self-launch the extra local ranks of a plain ``python`` run (see :mod:`moreh_ap.launcher`)."""
    from moreh_ap import launcher

    launcher.maybe_launch()


def _install_hooks(*, cpu_only: bool = False) -> None:
    """The one-line mode's hooks (see :mod:`moreh_ap.oneline`); ``cpu_only``: AP off, only CPU ``.cuda()``."""
    from moreh_ap import oneline

    oneline.install(cpu_only=cpu_only)
