# moreh_ap.apex: apex without apex — amp (O0-O3) and optimizers.FusedLAMB; also torch.moreh.apex.
"""``torch.moreh.apex`` — NVIDIA apex's training APIs, no apex install needed.

* ``torch.moreh.apex.amp``: ``initialize``, ``scale_loss``, ``master_params``,
  ``state_dict``, ``load_state_dict`` (see :mod:`moreh_ap.apex.amp`);
* ``torch.moreh.apex.optimizers.FusedLAMB`` (= ``torch.moreh.FusedLAMB`` =
  ``torch.ops.moreh.FusedLAMB``, see :mod:`moreh_ap.optim.fused_lamb`).

User guide: docs/apex.md.
"""
from moreh_ap.apex import amp, optimizers

__all__ = ["amp", "optimizers"]
