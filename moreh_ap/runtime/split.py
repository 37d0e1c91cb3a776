# Model adapters: find a model's blocks and cut it into pipeline stage modules that keep its own submodules.
"""What a model looks like to the runtime (the "blocks" convention of the project).

An adapter knows one model family: where its repeated blocks are, what runs
before them (embeddings, rotary; first stage) and after them (norm, head;
last stage), and how to run a slice of it. Stage modules hold the user's own
submodule objects (no copies of weights), so a parameter's original name is
found by identity (:func:`param_names`).

Families: Hugging Face Llama-style decoders (``model.model.layers``,
``embed_tokens``, ``rotary_emb``, ``norm``, ``lm_head``), GPT-2
(``transformer.h``, tied ``wte``/``lm_head``), ``nn.Sequential`` (its
children), and torchtitan-style models (a ``layers`` ModuleList/ModuleDict;
children registered before it go with the first stage, after it with the
last; the model's forward skips children that are ``None``).
"""
from __future__ import annotations

import copy
from collections import OrderedDict
import torch
from torch import nn

__all__ = ["ModelAdapter", "find_adapter", "param_names", "stage_ranges"]


class _BlockSlice(nn.Module):
    """Some blocks of a list, registered under their original indices; iterates them in order."""

    def __init__(self, items: list[tuple[str, nn.Module]]) -> None:
        super().__init__()
        for name, block in items:
            self.add_module(name, block)

    def __iter__(self):
        return iter(self._modules.values())

    def __len__(self) -> int:
        return len(self._modules)

    def values(self):
        return self._modules.values()


def _shallow(module: nn.Module) -> nn.Module:
    """A copy of ``module`` sharing its children/params but with its own registries."""
    new = copy.copy(module)
    new._modules = OrderedDict(module._modules)
    new._parameters = OrderedDict(module._parameters)
    new._buffers = OrderedDict(module._buffers)
    return new


class ModelAdapter:
    """Base adapter: the block container, and how to build stage ``lo:hi`` of the model."""

    name = "base"
    hf_causal_lm = False

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def container(self) -> nn.Module:
        """The module holding the blocks (its children are the blocks)."""
        raise NotImplementedError

    def blocks(self) -> list[tuple[str, nn.Module]]:
        """The blocks in order, with their names inside :meth:`container`."""
        return list(self.container().named_children())

    def build_stage(self, lo: int, hi: int, *, first: bool, last: bool) -> tuple[nn.Module, nn.Module]:
        """``(stage module, its block container)`` running blocks ``lo:hi`` (+ pre parts if first, post if last)."""
        raise NotImplementedError


class SequentialAdapter(ModelAdapter):
    name = "nn.Sequential"

    def container(self) -> nn.Module:
        return self.model

    def build_stage(self, lo, hi, *, first, last):
        stage = nn.Sequential(OrderedDict(self.blocks()[lo:hi]))
        return stage, stage


class BlockListAdapter(ModelAdapter):
    """torchtitan-style: ``model.layers`` plus children before (first stage) and after (last stage)."""

    name = "block list (torchtitan-style)"

    def container(self) -> nn.Module:
        return self.model.layers

    def build_stage(self, lo, hi, *, first, last):
        stage = _shallow(self.model)
        seen_layers = False
        for name in list(stage._modules):
            if name == "layers":
                seen_layers = True
                stage._modules[name] = _BlockSlice(self.blocks()[lo:hi])
            elif (not seen_layers and not first) or (seen_layers and not last):
                stage._modules[name] = None
        if stage._parameters and not (first and last):
            raise ValueError(f"{type(self.model).__name__} has parameters on its root module; it cannot be pipelined")
        return stage, stage.layers


class _LlamaStage(nn.Module):
    """Stage of a Hugging Face Llama-family causal LM: [embed] -> layers -> [norm -> lm_head]."""

    def __init__(self, model: nn.Module, blocks: list[tuple[str, nn.Module]], first: bool, last: bool) -> None:
        super().__init__()
        inner = model.model
        self.config = model.config
        self.first, self.last = first, last
        self.embed_tokens = inner.embed_tokens if first else None
        self.layers = _BlockSlice(blocks)
        self.rotary_emb = inner.rotary_emb  # parameter-less; recomputed on every stage
        self.norm = inner.norm if last else None
        self.lm_head = model.lm_head if last else None

    def forward(self, x: torch.Tensor, mask_in: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None):
        # the first stage gets the mask as a keyword; later stages get it passed along positionally
        # (an interleaved schedule also hands the keyword to a rank's later stages: same micro-batch)
        from transformers.masking_utils import create_causal_mask

        attention_mask = mask_in if mask_in is not None else attention_mask

        h = self.embed_tokens(x) if self.first else x
        pos = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
        mask = create_causal_mask(config=self.config, inputs_embeds=h, attention_mask=attention_mask,
                                  past_key_values=None, position_ids=pos)
        pe = self.rotary_emb(h, position_ids=pos)
        for layer in self.layers:
            h = layer(h, attention_mask=mask, position_embeddings=pe, position_ids=pos,
                      past_key_values=None, use_cache=False)
        if self.last:
            return self.lm_head(self.norm(h))
        return h if attention_mask is None else (h, attention_mask)


class LlamaAdapter(ModelAdapter):
    name = "Hugging Face Llama-family"
    hf_causal_lm = True

    def container(self):
        return self.model.model.layers

    def build_stage(self, lo, hi, *, first, last):
        stage = _LlamaStage(self.model, self.blocks()[lo:hi], first, last)
        return stage, stage.layers


class _GPT2Stage(nn.Module):
    """Stage of a Hugging Face GPT-2 LM: [wte + wpe, drop] -> blocks -> [ln_f -> lm_head]."""

    def __init__(self, model: nn.Module, blocks: list[tuple[str, nn.Module]], first: bool, last: bool) -> None:
        super().__init__()
        tr = model.transformer
        self.config = model.config
        self.first, self.last = first, last
        self.wte = tr.wte if first else None
        self.wpe = tr.wpe if first else None
        self.drop = tr.drop if first else None
        self.h = _BlockSlice(blocks)
        self.ln_f = tr.ln_f if last else None
        self.lm_head = model.lm_head if last else None

    def forward(self, x: torch.Tensor, mask_in: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None):
        # the first stage gets the mask as a keyword; later stages get it passed along positionally
        # (an interleaved schedule also hands the keyword to a rank's later stages: same micro-batch)
        from transformers.masking_utils import create_causal_mask

        attention_mask = mask_in if mask_in is not None else attention_mask

        pos = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
        h = self.drop(self.wte(x) + self.wpe(pos)) if self.first else x
        mask = create_causal_mask(config=self.config, inputs_embeds=h, attention_mask=attention_mask,
                                  past_key_values=None, position_ids=pos)
        for block in self.h:
            h = block(h, None, mask, None, encoder_attention_mask=None, use_cache=False, position_ids=pos)
        if self.last:
            return self.lm_head(self.ln_f(h))
        return h if attention_mask is None else (h, attention_mask)


class GPT2Adapter(ModelAdapter):
    name = "Hugging Face GPT-2"
    hf_causal_lm = True

    def container(self):
        return self.model.transformer.h

    def build_stage(self, lo, hi, *, first, last):
        stage = _GPT2Stage(self.model, self.blocks()[lo:hi], first, last)
        return stage, stage.h


class _WholeModel(ModelAdapter):
    """A model no adapter knows: one stage (pp = 1), no blocks."""

    name = "unsplittable"

    def container(self):
        return None

    def blocks(self):
        return []


def _is_hf(model: nn.Module) -> bool:
    return any(c.__name__ == "PreTrainedModel" for c in type(model).__mro__)


def find_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for ``model``'s family (an unsplittable one when none fits)."""
    if isinstance(model, nn.Sequential):
        return SequentialAdapter(model)
    if _is_hf(model):
        inner = getattr(model, "model", None)
        if all(hasattr(inner, a) for a in ("layers", "embed_tokens", "norm", "rotary_emb")) and hasattr(model, "lm_head"):
            return LlamaAdapter(model)
        tr = getattr(model, "transformer", None)
        if all(hasattr(tr, a) for a in ("h", "wte", "wpe", "ln_f")) and hasattr(model, "lm_head"):
            return GPT2Adapter(model)
        return _WholeModel(model)
    layers = getattr(model, "layers", None)
    if isinstance(layers, (nn.ModuleList, nn.ModuleDict)) and len(layers) > 0:
        return BlockListAdapter(model)
    return _WholeModel(model)


def stage_ranges(num_blocks: int, total_stages: int, boundaries: tuple[int, ...] | None) -> list[tuple[int, int]]:
    """``[(lo, hi), ...]`` block ranges of every stage, from boundaries (None = balanced)."""
    from moreh_ap.config import balanced_boundaries

    b = list(boundaries) if boundaries is not None else list(balanced_boundaries(num_blocks, total_stages))
    edges = [0, *b, num_blocks]
    return list(zip(edges[:-1], edges[1:]))


def param_names(model: nn.Module) -> dict[int, list[str]]:
    """``id(tensor) -> [original names]`` for every parameter and buffer (tied ones have several names)."""
    names: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
    for n, b in model.named_buffers(remove_duplicate=False):
        names.setdefault(id(b), []).append(n)
    return names


def clean_name(name: str) -> str:
    """A stage-module name without the checkpoint wrapper's prefix."""
    return name.replace("_checkpoint_wrapped_module.", "")


def map_stage_names(stage: nn.Module, ids: dict[int, list[str]]) -> dict[str, list[str]]:
    """``stage name -> [original names]`` for the parameters and buffers of ``stage``."""
    out: dict[str, list[str]] = {}
    for n, t in list(stage.named_parameters(remove_duplicate=False)) + list(stage.named_buffers(remove_duplicate=False)):
        if id(t) in ids:
            out[n] = ids[id(t)]
    return out
