# Hugging Face Llama-family causal LMs (Llama, Mistral, Qwen2, ...): model.model.layers between embed and norm/head.
from __future__ import annotations

import torch
from torch import nn

from moreh_ap.models.base import BlockSlice, ModelAdapter, SequenceStage, is_hf_model

__all__ = ["LlamaAdapter"]


class _LlamaStage(SequenceStage):
    """Stage of a Hugging Face Llama-family causal LM: [embed] -> layers -> [norm -> lm_head]."""

    def __init__(self, model: nn.Module, blocks: list[tuple[str, nn.Module]], first: bool, last: bool) -> None:
        super().__init__()
        inner = model.model
        self.config = model.config
        self.first, self.last = first, last
        self.embed_tokens = inner.embed_tokens if first else None
        self.layers = BlockSlice(blocks)
        self.rotary_emb = inner.rotary_emb  # parameter-less; recomputed on every stage
        self.norm = inner.norm if last else None
        self.lm_head = model.lm_head if last else None

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None):
        # every stage gets the micro-batch's mask as a keyword (the schedule hands keywords to all stages);
        # stages send only hidden states: torch 2.11's PipelineStage makes every received tensor require
        # grad, which an integer mask cannot
        from transformers.masking_utils import create_causal_mask

        h = self.embed_tokens(x) if self.first else self.sequence_in(x)
        pos = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
        # the cache (none) goes positionally: transformers 5.17 names it past_key_values, 5.25 cache
        mask = create_causal_mask(self.config, h, attention_mask, None, position_ids=pos)
        pe = self.rotary_emb(h, position_ids=pos)
        for layer in self.layers:
            h = layer(h, attention_mask=mask, position_embeddings=pe, position_ids=pos,
                      use_cache=False)
        if self.last:
            return self.lm_head(self.norm(h))
        h = self.sequence_out(h)
        return h


def _has(module: nn.Module, fqn: str) -> bool:
    try:
        module.get_submodule(fqn)
    except AttributeError:
        return False
    return True


class LlamaAdapter(ModelAdapter):
    """``model.model.{embed_tokens, layers, rotary_emb, norm}`` and ``model.lm_head``."""

    name = "Hugging Face Llama-family"
    hf_causal_lm = True
    container_path = "model.layers"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        inner = getattr(model, "model", None)
        return (is_hf_model(model) and hasattr(model, "lm_head")
                and all(hasattr(inner, a) for a in ("layers", "embed_tokens", "norm", "rotary_emb")))

    def build_stage(self, lo, hi, *, first, last):
        stage = _LlamaStage(self.model, self.blocks()[lo:hi], first, last)
        return stage, stage.layers

    def tp_plan(self):
        """q/k/v and gate/up column-split, o/down row-split (heads and KV heads divide by tp); sequence
        parallelism between them: the residual stream, the norms and their inputs hold 1/tp of the sequence
        (o/down reduce-scatter onto it, attention and MLP all-gather it). The embedding vocabulary-parallel
        (reduce-scattered onto the sequence) and the head column-split
        (:class:`~moreh_ap.models.vocab_head.VocabParallelHead`: logits vocabulary-sharded for the engine's
        parallel loss, gathered elsewhere; both shard the vocabulary, dim 0 of the weight, so a tied pair stays
        tied). An embedding with a ``padding_idx`` stays replicated (and so does a head tied to it). None (no
        tensor parallelism) for blocks laid out otherwise (Phi-3's fused ``qkv_proj`` / ``gate_up_proj``)."""
        from torch.distributed.tensor import Replicate, Shard
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel

        from moreh_ap.models.tp_plan import TPPlan
        from moreh_ap.models.tp_styles import GatherSequence, ReplicateParams
        from moreh_ap.models.vocab_head import VocabParallelHead

        cfg = self.model.config
        heads = cfg.num_attention_heads
        kv = getattr(cfg, "num_key_value_heads", None) or heads
        to_seq = dict(output_layouts=Shard(1), use_local_output=False)
        block = {"input_layernorm": SequenceParallel(), "post_attention_layernorm": SequenceParallel(),
                 "self_attn": GatherSequence(), "mlp": GatherSequence()}
        block.update({f"self_attn.{n}": ColwiseParallel() for n in ("q_proj", "k_proj", "v_proj")})
        block.update({"self_attn.o_proj": RowwiseParallel(**to_seq), "mlp.gate_proj": ColwiseParallel(),
                      "mlp.up_proj": ColwiseParallel(), "mlp.down_proj": RowwiseParallel(**to_seq)})
        if not all(_has(b, fqn) for _, b in self.blocks()[:1] for fqn in block):
            return None  # another layout in a Llama-like model (Phi-3's fused qkv_proj / gate_up_proj): no plan
        embed = self.model.model.embed_tokens
        tied = self.model.lm_head.weight is embed.weight
        head = VocabParallelHead(input_layouts=Shard(1))
        if embed.padding_idx is None:
            outer = {"model.embed_tokens": RowwiseParallel(input_layouts=Replicate(), **to_seq), "lm_head": head}
        else:
            outer = {"model.embed_tokens": ReplicateParams(output_layout=Shard(1)),
                     "lm_head": ReplicateParams() if tied else head}
        outer["model.norm"] = SequenceParallel()
        return TPPlan(block=block, outer=outer, divisible={"attention heads": heads, "key/value heads": kv},
                      sequence_parallel=True)
