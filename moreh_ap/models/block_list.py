# torchtitan-style family: a `layers` ModuleList/ModuleDict; children before it go first, after it go last.
from __future__ import annotations

from torch import nn

from moreh_ap.models.base import BlockSlice, ModelAdapter, is_hf_model, shallow_copy

__all__ = ["BlockListAdapter"]


class BlockListAdapter(ModelAdapter):
    """A plain-torch model with a ``layers`` block list (torchtitan's convention).

    Children registered before ``layers`` go with the first stage, after it with the last. A stage is a
    shallow copy of the model whose other children are ``None``: the model's forward must skip children
    that are ``None`` (``h = self.tok_emb(x) if self.tok_emb is not None else x``).
    """

    name = "block list (torchtitan-style)"
    container_path = "layers"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        layers = getattr(model, "layers", None)
        return not is_hf_model(model) and isinstance(layers, (nn.ModuleList, nn.ModuleDict)) and len(layers) > 0

    def build_stage(self, lo, hi, *, first, last):
        stage = shallow_copy(self.model)
        seen_layers = False
        for name in list(stage._modules):
            if name == "layers":
                seen_layers = True
                stage._modules[name] = BlockSlice(self.blocks()[lo:hi])
            elif (not seen_layers and not first) or (seen_layers and not last):
                stage._modules[name] = None
        if stage._parameters and not (first and last):
            raise ValueError(f"{type(self.model).__name__} has parameters on its root module; it cannot be pipelined")
        return stage, stage.layers
