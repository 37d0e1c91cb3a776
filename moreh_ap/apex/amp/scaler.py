# apex's dynamic / static loss scaler (apex/amp/scaler.py): unscale grads, detect overflow, grow / back off.
from __future__ import annotations

import torch

from moreh_ap.optim.norms import local_shard as local  # FSDP2's sharded grads/masters: foreach takes plain tensors

_GROWTH_INTERVAL = 2000


def _by_device(tensors: list[torch.Tensor]) -> dict[torch.device, list[int]]:
    groups: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.device, []).append(i)
    return groups


class LossScaler:
    """One loss's scale: ``"dynamic"`` (start 2**16, halve on overflow, double after 2000 clean
    ``scale_loss`` exits, within [min_loss_scale, max_loss_scale]) or a fixed float.

    The attribute names are apex's (``_loss_scale``, ``_unskipped``, ``dynamic``,
    ``_has_overflow``): apex's own tests and some user scripts poke them.
    """

    def __init__(
        self,
        loss_scale: str | float,
        init_scale: float = 2.0**16,
        scale_factor: float = 2.0,
        scale_window: int = _GROWTH_INTERVAL,
        min_loss_scale: float | None = None,
        max_loss_scale: float = 2.0**24,
    ) -> None:
        self.dynamic = loss_scale == "dynamic"
        self._loss_scale = float(min(max_loss_scale, init_scale)) if self.dynamic else float(loss_scale)
        self._max_loss_scale = max_loss_scale
        self._min_loss_scale = min_loss_scale
        self._scale_seq_len = scale_window
        self._unskipped = 0
        self._has_overflow = False

    def loss_scale(self) -> float:
        """The current scale (a Python float)."""
        return self._loss_scale

    def clear_overflow_state(self) -> None:
        self._has_overflow = False

    def unscale_(self, grads: list[torch.Tensor]) -> None:
        """``g *= 1/scale`` in place for every grad, noting any inf/NaN among them."""
        if not grads:
            return
        grads = [local(g) for g in grads]
        for indices in _by_device(grads).values():
            device = grads[indices[0]].device
            found_inf = torch.zeros(1, dtype=torch.float32, device=device)
            inv_scale = torch.full((1,), 1.0 / self._loss_scale, dtype=torch.float32, device=device)
            torch._amp_foreach_non_finite_check_and_unscale_([grads[i] for i in indices], found_inf, inv_scale)
            if found_inf.item():
                self._has_overflow = True

    def update_scale(self) -> bool:
        """Called once per ``scale_loss`` exit; True when the step must be skipped (dynamic overflow)."""
        if self._has_overflow and self.dynamic:
            should_skip = True
            halved = self._loss_scale / 2.0
            self._loss_scale = max(self._min_loss_scale, halved) if self._min_loss_scale else halved
            self._unskipped = 0
        else:
            should_skip = False
            self._unskipped += 1
        if self._unskipped == self._scale_seq_len and self.dynamic:
            self._loss_scale = min(self._max_loss_scale, self._loss_scale * 2.0)
            self._unskipped = 0
        return should_skip
