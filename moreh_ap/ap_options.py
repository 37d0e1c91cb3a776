# APOptions: the seven search options a user may restrict, validated at construction (pure data).
"""What the user allows the planner to choose; read by the planner and set by :mod:`moreh_ap.option`."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

__all__ = ["APOptions", "Auto"]

Auto = Literal["auto"]

_BOOL_OR_AUTO = "'auto', True or False"
_INT_OR_AUTO = "'auto' or an integer >= 1"


_TP_VALUES = "'auto' or a power of two >= 1 (the largest tensor-parallel degree; 1 turns it off)"


def _check_tp(value: Any) -> None:
    if isinstance(value, bool):
        raise TypeError(f"tensor_parallel={value!r} is not valid: expected {_TP_VALUES}; "
                        f"use tensor_parallel=1 to turn tensor parallelism off")
    if isinstance(value, str):
        if value == "auto":
            return
        raise ValueError(f"tensor_parallel={value!r} is not valid: expected {_TP_VALUES}")
    if not isinstance(value, int):
        raise TypeError(f"tensor_parallel={value!r} is not valid: expected {_TP_VALUES}")
    if value < 1 or value & (value - 1):
        raise ValueError(f"tensor_parallel={value!r} is not valid: expected {_TP_VALUES}")


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
    tensor_parallel: int | Auto = "auto"
    """MAXIMUM tensor-parallel degree (a power of two; 1 = no tensor parallelism), or 'auto' (up to 8). Only
    families whose adapter has a TP plan are planned with TP; a degree divides the heads and the devices per node."""

    def __post_init__(self) -> None:
        _check_bool("pipeline_parallel", self.pipeline_parallel)
        _check_int_or_auto("num_stages", self.num_stages)
        _check_int_or_auto("num_micro_batches", self.num_micro_batches)
        _check_bool_or_auto("activation_recomputation", self.activation_recomputation)
        _check_bool_or_auto("distribute_parameter", self.distribute_parameter)
        _check_bool("mixed_precision", self.mixed_precision)
        _check_tp(self.tensor_parallel)

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
