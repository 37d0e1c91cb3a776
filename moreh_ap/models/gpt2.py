# Hugging Face GPT-2: transformer.h between the wte/wpe embeddings and ln_f/lm_head (wte and lm_head tied).
from __future__ import annotations

import torch
from torch import nn

from moreh_ap.models.base import GPTLayoutStage, ModelAdapter, is_hf_model

__all__ = ["GPT2Adapter"]


class _GPT2Stage(GPTLayoutStage):
    """Stage of a Hugging Face GPT-2 LM: [wte + wpe, drop] -> blocks -> [ln_f -> lm_head]."""

    def __init__(self, model: nn.Module, blocks: list[tuple[str, nn.Module]], first: bool, last: bool) -> None:
        super().__init__(model, blocks, first, last)
        self.config = model.config

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None):
        # every stage gets the micro-batch's mask as a keyword (the schedule hands keywords to all stages);
        # stages send only hidden states: torch 2.11's PipelineStage makes every received tensor require
        # grad, which an integer mask cannot
        from transformers.masking_utils import create_causal_mask

        if self.first:
            pos = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
            h = self.drop(self.wte(x) + self.wpe(pos))
        else:
            h = self.sequence_in(x)  # a sequence-sharded DTensor's shape is the whole sequence's
            pos = torch.arange(h.shape[1], device=x.device).unsqueeze(0)
        # the cache (none) goes positionally: transformers 5.17 names it past_key_values, 5.25 cache
        mask = create_causal_mask(self.config, h, attention_mask, None, position_ids=pos)
        for block in self.h:
            h = block(h, None, mask, None, encoder_attention_mask=None, use_cache=False, position_ids=pos)
        if self.last:
            return self.lm_head(self.ln_f(h))
        h = self.sequence_out(h)
        return h


class GPT2Adapter(ModelAdapter):
    """``model.transformer.{wte, wpe, drop, h, ln_f}`` and ``model.lm_head``."""

    name = "Hugging Face GPT-2"
    hf_causal_lm = True
    container_path = "transformer.h"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        tr = getattr(model, "transformer", None)
        return (is_hf_model(model) and hasattr(model, "lm_head")
                and all(hasattr(tr, a) for a in ("h", "wte", "wpe", "ln_f")))

    def build_stage(self, lo, hi, *, first, last):
        stage = _GPT2Stage(self.model, self.blocks()[lo:hi], first, last)
        return stage, stage.h

    def tp_plan(self):
        """``attn.c_attn`` (q, k, v side by side: re-laid per rank first) and ``mlp.c_fc`` column-split,
        ``attn.c_proj`` and ``mlp.c_proj`` row-split (``Conv1D`` weights are ``(in, out)``); the attention's
        ``split_size`` / ``num_heads`` count the local heads. Sequence parallelism between them: the residual
        stream, ``ln_1`` / ``ln_2`` / ``ln_f`` and the dropouts on 1/tp of the sequence (the row splits
        reduce-scatter onto it, attention and MLP all-gather it; ``wpe`` replicated, its output cut to this
        rank's sequence shard). ``wte`` vocabulary-parallel and ``lm_head`` column-split
        (:class:`~moreh_ap.models.vocab_head.VocabParallelHead`: logits vocabulary-sharded for the engine's
        parallel loss, gathered elsewhere): both shard the tied weight's dim 0, so the tie is kept."""
        from torch.distributed.tensor import Replicate, Shard
        from torch.distributed.tensor.parallel import RowwiseParallel, SequenceParallel

        from moreh_ap.models.tp_plan import TPPlan
        from moreh_ap.models.tp_styles import Conv1DColwise, Conv1DRowwise, GatherSequence, ReplicateParams
        from moreh_ap.models.vocab_head import VocabParallelHead

        cfg = self.model.config
        if getattr(cfg, "add_cross_attention", False):  # q_attn, a second fused projection: no plan
            return None
        to_seq = dict(output_layouts=Shard(1), use_local_output=False)
        block = {"ln_1": SequenceParallel(), "ln_2": SequenceParallel(), "attn": GatherSequence(),
                 "mlp": GatherSequence(), "attn.c_attn": Conv1DColwise(), "attn.c_proj": Conv1DRowwise(**to_seq),
                 "mlp.c_fc": Conv1DColwise(), "mlp.c_proj": Conv1DRowwise(**to_seq)}
        outer = {"transformer.wte": RowwiseParallel(input_layouts=Replicate(), **to_seq),
                 "transformer.wpe": ReplicateParams(output_layout=Shard(1)),
                 "transformer.ln_f": SequenceParallel(),
                 "lm_head": VocabParallelHead(input_layouts=Shard(1))}
        return TPPlan(block=block, outer=outer, divisible={"attention heads": cfg.n_head},
                      relay={"attn.c_attn.weight": (1, 3), "attn.c_attn.bias": (0, 3)},
                      local_attrs={"attn": ("split_size", "num_heads")}, sequence_parallel=True)
