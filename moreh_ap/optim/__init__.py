# moreh_ap.optim: optimizers with apex's semantics (FusedLAMB), also under torch.moreh / torch.ops.moreh.
"""Optimizers: :class:`FusedLAMB` (apex.optimizers.FusedLAMB's math on ``torch._foreach_*``)."""
from moreh_ap.optim.fused_lamb import FusedLAMB

__all__ = ["FusedLAMB"]
