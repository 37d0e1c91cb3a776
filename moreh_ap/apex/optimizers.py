# moreh_ap.apex.optimizers: apex.optimizers' spelling of the optimizers moreh_ap provides.
"""``from moreh_ap.apex.optimizers import FusedLAMB`` (= ``apex.optimizers.FusedLAMB``)."""
from moreh_ap.optim.fused_lamb import FusedLAMB

__all__ = ["FusedLAMB"]
