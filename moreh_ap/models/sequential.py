# nn.Sequential family: its children are the blocks; a stage is a Sequential of some of them.
from __future__ import annotations

from collections import OrderedDict

from torch import nn

from moreh_ap.models.base import ModelAdapter

__all__ = ["SequentialAdapter"]


class SequentialAdapter(ModelAdapter):
    """An ``nn.Sequential``: every child is a block, nothing runs before or after them."""

    name = "nn.Sequential"
    container_path = ""

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, nn.Sequential)

    def build_stage(self, lo, hi, *, first, last):
        stage = nn.Sequential(OrderedDict(self.blocks()[lo:hi]))
        return stage, stage
