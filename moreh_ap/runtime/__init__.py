# The runtime: apply a ParallelConfig with torch.distributed and train with one-device semantics.
"""``parallelize(model, config, *, optimizer=None, loss_fn=None) -> ParallelModel`` and its helpers."""
from __future__ import annotations

from moreh_ap.runtime.dist import init_distributed
from moreh_ap.runtime.engine import ParallelModel, StepOutput, parallelize
from moreh_ap.runtime.norm import clip_grad_norm_, global_norm

__all__ = ["parallelize", "ParallelModel", "StepOutput", "init_distributed", "global_norm", "clip_grad_norm_"]
