# ParallelLayout: the one source of truth for degrees, rank coordinates, stage placement and groups.
"""Where every rank sits and what it holds, computed once from a config and a world size.

Ranks are laid out on a ``(pp, dp, tp)`` grid, ``tp`` innermost (a tensor-parallel group is
``tp`` consecutive ranks, kept inside a node), then ``dp``, then ``pp``::

    rank = (pp_rank * dp + dp_rank) * tp + tp_rank

Virtual pipeline stages are placed on pipeline ranks by the schedule's placement rule
(:mod:`moreh_ap.schedules`). The planner (memory and cost models) and the runtime read the same
object, so no module computes a rank, a stage range or a group by hand. Pure Python: only
:meth:`ParallelLayout.build_mesh` touches ``torch.distributed``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moreh_ap.config import ParallelConfig, balanced_boundaries
from moreh_ap.schedules import get_schedule, rank_stages, stage_rank

__all__ = ["ParallelLayout", "RankCoords", "stage_ranges"]


@dataclass(kw_only=True, slots=True, frozen=True)
class RankCoords:
    """One rank's coordinates on the (pp, dp, tp) grid."""

    pp: int
    """Pipeline rank."""
    dp: int
    """Data-parallel rank."""
    tp: int
    """Tensor-parallel rank."""


@dataclass(kw_only=True, slots=True, frozen=True)
class ParallelLayout:
    """Degrees of a run and everything derived from them (torchtitan's ``ParallelDims`` role)."""

    world_size: int
    """Ranks in the run."""
    pp: int = 1
    """Pipeline-parallel degree (pipeline ranks)."""
    dp: int = 1
    """Data-parallel degree."""
    tp: int = 1
    """Tensor-parallel degree (innermost)."""
    stages_per_rank: int = 1
    """Virtual pipeline stages per pipeline rank (1 unless the schedule interleaves)."""
    placement: str = "loop"
    """Virtual stage to pipeline rank rule of the schedule (``"loop"`` or ``"v"``)."""

    def __post_init__(self) -> None:
        for name in ("world_size", "pp", "dp", "tp", "stages_per_rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ParallelLayout.{name}={value!r} is not valid: expected an integer >= 1")
        if self.pp * self.dp * self.tp != self.world_size:
            raise ValueError(f"num_stages({self.pp}) * dp({self.dp}) * tp({self.tp}) != world_size({self.world_size})")
        if self.placement not in ("loop", "v"):
            raise ValueError(f"ParallelLayout.placement={self.placement!r} is not valid: expected 'loop' or 'v'")

    @classmethod
    def from_config(cls, config: ParallelConfig, world_size: int) -> ParallelLayout:
        """The layout of ``config`` on ``world_size`` ranks (``dp = world_size / (num_stages * tp)``).

        Raises:
            ValueError: ``world_size`` is not a multiple of ``num_stages * tp`` (the arithmetic is shown).
        """
        pp, tp = config.num_stages, config.tp
        if world_size % (pp * tp):
            raise ValueError(
                f"num_stages({pp}) * dp * tp({tp}) != world_size({world_size}) for any integer dp: "
                f"world_size({world_size}) is not a multiple of num_stages({pp}) * tp({tp}) = {pp * tp}"
            )
        spr = config.stages_per_rank if pp > 1 else 1
        placement = get_schedule(config.schedule).placement if pp > 1 else "loop"
        return cls(world_size=world_size, pp=pp, dp=world_size // (pp * tp), tp=tp, stages_per_rank=spr,
                   placement=placement)

    # ------------------------------------------------------------------ ranks
    def rank(self, *, pp: int = 0, dp: int = 0, tp: int = 0) -> int:
        """Global rank at grid coordinates ``(pp, dp, tp)``."""
        return (pp * self.dp + dp) * self.tp + tp

    def coords(self, rank: int) -> RankCoords:
        """Grid coordinates of global rank ``rank``."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank={rank!r} is not valid: expected 0 <= rank < world_size({self.world_size})")
        rest, tp = divmod(rank, self.tp)
        pp, dp = divmod(rest, self.dp)
        return RankCoords(pp=pp, dp=dp, tp=tp)

    # ----------------------------------------------------------------- stages
    @property
    def total_stages(self) -> int:
        """Pipeline stages counting virtual ones (1 without a pipeline)."""
        return self.pp * self.stages_per_rank if self.pp > 1 else 1

    def stage_rank(self, stage: int) -> int:
        """Pipeline rank holding virtual stage ``stage``."""
        return stage_rank(stage, self.pp, self.placement)

    def stages_of(self, pp_rank: int) -> list[int]:
        """Virtual stages held by pipeline rank ``pp_rank``, in increasing order."""
        return rank_stages(pp_rank, self.pp, self.total_stages, self.placement)

    def is_first_stage(self, stage: int) -> bool:
        """Does ``stage`` run the model's input side (embeddings)?"""
        return stage == 0

    def is_last_stage(self, stage: int) -> bool:
        """Does ``stage`` run the model's output side (norm, head, loss)?"""
        return stage == self.total_stages - 1

    def stage_ranges(self, num_blocks: int, boundaries: tuple[int, ...] | None = None) -> list[tuple[int, int]]:
        """Block ranges ``[lo, hi)`` of every virtual stage, in pipeline order (None = balanced)."""
        return stage_ranges(num_blocks, self.total_stages, boundaries)

    # ----------------------------------------------------------------- groups
    def dp_group_ranks(self, *, pp: int, tp: int = 0) -> list[int]:
        """Global ranks of the data-parallel group at pipeline rank ``pp`` and tensor rank ``tp``."""
        return [self.rank(pp=pp, dp=d, tp=tp) for d in range(self.dp)]

    def pp_group_ranks(self, *, dp: int, tp: int = 0) -> list[int]:
        """Global ranks of the pipeline group at data rank ``dp`` and tensor rank ``tp``."""
        return [self.rank(pp=p, dp=dp, tp=tp) for p in range(self.pp)]

    def tp_group_ranks(self, *, pp: int, dp: int) -> list[int]:
        """Global ranks of the tensor-parallel group at ``(pp, dp)``."""
        return [self.rank(pp=pp, dp=dp, tp=t) for t in range(self.tp)]

    def tie_group_ranks(self, pp_ranks: list[int], *, dp: int, tp: int = 0) -> list[int]:
        """Global ranks of a tie group: the given pipeline ranks at one ``(dp, tp)`` coordinate."""
        return [self.rank(pp=p, dp=dp, tp=tp) for p in sorted(set(pp_ranks))]

    def spans_nodes(self, devices_per_node: int) -> tuple[bool, bool, bool]:
        """``(dp group crosses nodes, pipeline hops cross nodes, tp group crosses nodes)``.

        Ranks fill nodes in order, so a group spans ``stride * size`` consecutive ranks.
        """
        dp_inter = self.dp > 1 and self.tp * self.dp > devices_per_node
        pp_inter = self.pp > 1 and self.tp * self.dp * self.pp > devices_per_node
        tp_inter = self.tp > devices_per_node
        return dp_inter, pp_inter, tp_inter

    # ------------------------------------------------------------------- mesh
    @property
    def mesh_dim_names(self) -> tuple[str, ...]:
        """Names of the device mesh's dimensions, outermost first (``tp`` only when ``tp > 1``)."""
        return ("pp", "dp", "tp") if self.tp > 1 else ("pp", "dp")

    @property
    def mesh_shape(self) -> tuple[int, ...]:
        """Sizes of the device mesh's dimensions, matching :attr:`mesh_dim_names`."""
        return (self.pp, self.dp, self.tp) if self.tp > 1 else (self.pp, self.dp)

    def build_mesh(self, device_type: str) -> Any:
        """``init_device_mesh`` over :attr:`mesh_shape` (built once per process group and shape), or None.

        None when ``torch.distributed`` is not initialized (one process). Every mesh owns process
        groups (and their threads), so parallelizing again in one process reuses them.
        """
        import torch.distributed as dist

        if not dist.is_initialized():
            return None
        if dist.get_world_size() != self.world_size:
            raise ValueError(f"ParallelLayout.world_size({self.world_size}) != the process group's "
                             f"world size({dist.get_world_size()})")
        from torch.distributed.device_mesh import init_device_mesh

        key = (id(dist.group.WORLD), device_type, self.mesh_shape)
        if key not in _MESHES:
            _MESHES[key] = init_device_mesh(device_type, self.mesh_shape, mesh_dim_names=self.mesh_dim_names)
        return _MESHES[key]


_MESHES: dict[tuple, Any] = {}
"""Meshes built in this process, by (default group, device type, shape): see ``build_mesh``."""


def stage_ranges(num_blocks: int, total_stages: int, boundaries: tuple[int, ...] | None) -> list[tuple[int, int]]:
    """Block ranges ``[lo, hi)`` of ``total_stages`` stages from ``boundaries`` (None = balanced).

    >>> stage_ranges(10, 4, None)
    [(0, 3), (3, 6), (6, 8), (8, 10)]
    """
    if total_stages == 1:
        return [(0, num_blocks)]
    if boundaries is None:
        boundaries = balanced_boundaries(num_blocks, total_stages)
    edges = [0, *boundaries, num_blocks]
    return list(zip(edges[:-1], edges[1:]))
