# ParallelConfig: one parallel configuration, its validation, and the seed's one-line form.
"""The plain dataclass the planner emits and the runtime applies.

Degrees: ``world_size = num_stages * dp * tp`` and
``global_batch = dp * num_micro_batches * batch_per_device``; ``dp`` is
derived from them. :meth:`ParallelConfig.validate` checks all of it (and
the pipeline schedules' own rules) with messages that show the arithmetic.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields
from typing import Any

from moreh_ap.schedules import get_schedule, schedule_names

SCHEDULES = schedule_names()
"""Names of the registered pipeline schedules (:mod:`moreh_ap.schedules`)."""

_INT_FIELDS = ("num_stages", "num_micro_batches", "batch_per_device", "tp", "stages_per_rank")
_BOOL_FIELDS = ("recomputation", "distribute_param", "distribute_low_prec_param", "mixed_precision")


@dataclass(kw_only=True, slots=True, frozen=True)
class ParallelConfig:
    """One parallel configuration. Field names are part of the public contract (code outside the repo uses them)."""

    num_stages: int
    """Pipeline stages (pp): ranks along the pipeline."""
    num_micro_batches: int
    """Micro-batches per optimizer step (per data-parallel rank)."""
    batch_per_device: int
    """Samples per micro-batch per data-parallel rank."""
    tp: int = 1
    """Tensor-parallel degree (1 prints "No TP")."""
    recomputation: bool = False
    """Checkpoint every block's activations (recompute them in backward)."""
    distribute_param: bool = False
    """Shard fp32 params, grads and optimizer state over dp (FSDP2; ZeRO-2 like)."""
    distribute_low_prec_param: bool = False
    """Also re-shard the compute copy after forward (with distribute_param: ZeRO-3 like)."""
    mixed_precision: bool = True
    """bf16 compute, fp32 master weights and reductions."""
    schedule: str = "1F1B"
    """Pipeline schedule: "GPipe", "1F1B" or "Interleaved1F1B" (ignored when num_stages is 1)."""
    stages_per_rank: int = 1
    """Virtual stages per pipeline rank (Interleaved1F1B only)."""
    boundaries: tuple[int, ...] | None = None
    """Index of the first block of each stage after the first; None = balanced split."""

    def __post_init__(self) -> None:
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"ParallelConfig.{name}={value!r} is not valid: expected an integer >= 1")
            if value < 1:
                raise ValueError(f"ParallelConfig.{name}={value!r} is not valid: expected an integer >= 1")
        for name in _BOOL_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise TypeError(f"ParallelConfig.{name}={value!r} is not valid: expected True or False")
        if self.schedule not in SCHEDULES:
            raise ValueError(
                f"ParallelConfig.schedule={self.schedule!r} is not valid: expected one of {', '.join(SCHEDULES)}"
            )
        if self.boundaries is not None:
            b = self.boundaries
            if isinstance(b, list):
                object.__setattr__(self, "boundaries", tuple(b))
                b = self.boundaries
            if not isinstance(b, tuple) or any(isinstance(i, bool) or not isinstance(i, int) for i in b):
                raise TypeError(f"ParallelConfig.boundaries={b!r} is not valid: expected a tuple of integers or None")

    # ------------------------------------------------------------------ degrees
    @property
    def total_stages(self) -> int:
        """Pipeline stages counting virtual ones: ``num_stages * stages_per_rank``."""
        return self.num_stages * self.stages_per_rank

    def dp(self, world_size: int) -> int:
        """Data-parallel degree for ``world_size`` ranks: ``world_size // (num_stages * tp)``."""
        return world_size // (self.num_stages * self.tp)

    def global_batch(self, world_size: int) -> int:
        """Samples per optimizer step: ``dp * num_micro_batches * batch_per_device``."""
        return self.dp(world_size) * self.num_micro_batches * self.batch_per_device

    def validate(self, world_size: int, global_batch: int | None = None, num_blocks: int | None = None) -> ParallelConfig:
        """Check this config against a world size, and optionally a batch and a block count.

        Args:
            world_size: number of ranks.
            global_batch: samples per optimizer step over all ranks, if known.
            num_blocks: number of pipeline-splittable blocks of the model, if known.

        Returns:
            ``self``, so calls can be chained.

        Raises:
            ValueError: with the arithmetic that fails, e.g.
                ``num_stages(2) * dp(3) * tp(1) != world_size(4)``.
        """
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size={world_size!r} is not valid: expected an integer >= 1")
        pp, tp, nmb, bpd = self.num_stages, self.tp, self.num_micro_batches, self.batch_per_device
        if global_batch is not None:
            per_dp = nmb * bpd
            if global_batch % per_dp:
                raise ValueError(
                    f"global_batch({global_batch}) is not a multiple of "
                    f"num_micro_batches({nmb}) * batch_per_device({bpd}) = {per_dp}"
                )
            dp = global_batch // per_dp
            if pp * dp * tp != world_size:
                raise ValueError(
                    f"num_stages({pp}) * dp({dp}) * tp({tp}) != world_size({world_size}) "
                    f"(dp = global_batch({global_batch}) / (num_micro_batches({nmb}) * batch_per_device({bpd})))"
                )
        else:
            if world_size % (pp * tp):
                raise ValueError(
                    f"num_stages({pp}) * dp * tp({tp}) != world_size({world_size}) for any integer dp: "
                    f"world_size({world_size}) is not a multiple of num_stages({pp}) * tp({tp}) = {pp * tp}"
                )
            dp = world_size // (pp * tp)
        self._validate_modes(dp)
        self._validate_schedule()
        self._validate_boundaries(num_blocks)
        return self

    def _validate_modes(self, dp: int) -> None:
        if self.distribute_low_prec_param and not self.distribute_param:
            raise ValueError(
                "distribute_low_prec_param=True needs distribute_param=True "
                "(the compute copy can only be re-sharded when parameters are sharded)"
            )
        if self.distribute_param and dp == 1:
            raise ValueError("distribute_param=True needs dp > 1: there is nothing to shard over with dp(1)")

    def _validate_schedule(self) -> None:
        pp, nmb, spr = self.num_stages, self.num_micro_batches, self.stages_per_rank
        spec = get_schedule(self.schedule)
        if spr > 1 and not spec.multi_stage:
            raise ValueError(
                f"stages_per_rank({spr}) > 1 needs schedule='Interleaved1F1B', not {self.schedule!r}"
            )
        if pp == 1:
            return
        spec.check(pp, nmb, spr)

    def _validate_boundaries(self, num_blocks: int | None) -> None:
        stages = self.total_stages if self.num_stages > 1 else 1
        if num_blocks is not None and stages > num_blocks:
            raise ValueError(
                f"num_stages({self.num_stages}) * stages_per_rank({self.stages_per_rank}) = {stages} "
                f"pipeline stages > num_blocks({num_blocks}): every stage needs at least one block"
            )
        b = self.boundaries
        if b is None:
            return
        if len(b) != stages - 1:
            raise ValueError(
                f"boundaries={b!r} has {len(b)} entries; {stages} stages need {stages - 1} "
                "(the first block of each stage after the first)"
            )
        if any(x >= y for x, y in zip(b, b[1:])) or (b and b[0] < 1):
            raise ValueError(f"boundaries={b!r} must be strictly increasing and >= 1")
        if num_blocks is not None and b and b[-1] >= num_blocks:
            raise ValueError(f"boundaries={b!r}: the last stage starts at block {b[-1]} >= num_blocks({num_blocks})")

    # --------------------------------------------------------------- printing
    def to_moreh_line(self) -> str:
        """The seed's line, e.g. ``num_stages : 2, num_micro_batches : 4, batch_per_device : 1, No TP, ...``."""
        tp = "No TP" if self.tp == 1 else f"TP : {self.tp}"
        return (
            f"num_stages : {self.num_stages}, num_micro_batches : {self.num_micro_batches}, "
            f"batch_per_device : {self.batch_per_device}, {tp}, "
            f"recomputation : {int(self.recomputation)}, "
            f"distribute_param : {str(self.distribute_param).lower()}, "
            f"distribute_low_prec_param : {str(self.distribute_low_prec_param).lower()}"
        )

    __str__ = to_moreh_line

    @classmethod
    def from_moreh_line(cls, line: str) -> ParallelConfig:
        """Parse the seed's line back (fields it does not carry take their defaults).

        Raises:
            ValueError: the line is malformed; the message says which part.
        """
        if not isinstance(line, str):
            raise TypeError(f"from_moreh_line expects a str, got {type(line).__name__}")
        text = line.strip()
        text = re.sub(r"^(\[[^\]]*\]\s*)+", "", text)  # tolerate a "[time] [info] " prefix
        if not text:
            raise ValueError("from_moreh_line: empty line")
        values: dict[str, Any] = {}
        for part in (p.strip() for p in text.split(",")):
            if part == "No TP":
                values["tp"] = 1
                continue
            key, sep, raw = (s.strip() for s in part.partition(":"))
            if not sep or not key or not raw:
                raise ValueError(f"from_moreh_line: malformed item {part!r} in {line!r} (expected 'name : value')")
            name = "tp" if key == "TP" else key
            if name in values:
                raise ValueError(f"from_moreh_line: {key!r} given twice in {line!r}")
            values[name] = _parse_value(name, raw, line)
        for required in ("num_stages", "num_micro_batches", "batch_per_device"):
            if required not in values:
                raise ValueError(f"from_moreh_line: {required!r} missing in {line!r}")
        return cls(**values)

    # ------------------------------------------------------------------- dicts
    def to_dict(self) -> dict[str, Any]:
        """Plain dict with the field names (JSON-ready: booleans, ints, a list or None)."""
        d = asdict(self)
        d["boundaries"] = list(self.boundaries) if self.boundaries is not None else None
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ParallelConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"ParallelConfig.from_dict: unknown field(s) {unknown}; accepted: {sorted(names)}")
        data = dict(data)
        if data.get("boundaries") is not None:
            data["boundaries"] = tuple(data["boundaries"])
        return cls(**data)

    def replace(self, **changes: Any) -> ParallelConfig:
        """A copy with some fields changed (validated like a new config)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d.update(changes)
        return type(self)(**d)


def _parse_value(name: str, raw: str, line: str) -> Any:
    if name in _INT_FIELDS:
        if not re.fullmatch(r"\d+", raw):
            raise ValueError(f"from_moreh_line: {name} : {raw!r} is not an integer in {line!r}")
        return int(raw)
    if name == "recomputation":
        if raw not in ("0", "1", "true", "false"):
            raise ValueError(f"from_moreh_line: recomputation : {raw!r} is not 0 or 1 in {line!r}")
        return raw in ("1", "true")
    if name in _BOOL_FIELDS:
        if raw not in ("true", "false", "0", "1"):
            raise ValueError(f"from_moreh_line: {name} : {raw!r} is not true or false in {line!r}")
        return raw in ("true", "1")
    if name == "schedule":
        return raw
    raise ValueError(f"from_moreh_line: unknown item {name!r} in {line!r}")


def balanced_boundaries(num_blocks: int, num_stages: int) -> tuple[int, ...]:
    """First block of each stage after the first for an even split (earlier stages take the remainder).

    >>> balanced_boundaries(10, 4)
    (3, 6, 8)
    """
    if num_stages < 1 or num_blocks < num_stages:
        raise ValueError(f"cannot split num_blocks({num_blocks}) into num_stages({num_stages}) non-empty stages")
    base, extra = divmod(num_blocks, num_stages)
    bounds, start = [], 0
    for stage in range(num_stages - 1):
        start += base + (1 if stage < extra else 0)
        bounds.append(start)
    return tuple(bounds)
