# Per-rank memory of a pipelined training step: the planner's estimate_rank vs the live-storage tracker.
"""Runner for ``tests.helpers.dist_harness.launch``: ``case = {"id", "runner": "tests.helpers.pipeline_memory_cases:memory_run",
"kind", "cfg" (ParallelConfig.to_dict()), "seq"}``.

Every rank builds the same tiny HF Llama, wraps it with ``moreh_ap.parallelize(model, config,
optimizer=AdamW)``, runs one untracked training step, then tracks one step with
``tracked_step_peak(..., tracker="live")`` and predicts its own pipeline rank with
``estimate_rank(trace(meta model), config, pp_rank, world_size=..., optimizer="adamw", device_type="cpu")``.
Rank 0 returns every rank's ``(global rank, pp rank, dp rank, predicted breakdown, measured peak)``.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

VOCAB = 8192
"""Vocabulary of the "llama" kind (logits dominate the last stage); "llama-v256" has 256."""


RUNNER = "tests.helpers.pipeline_memory_cases:memory_run"


def make_case(label: str, world: int, *, kind: str = "llama", seq: int = 256, **kw) -> dict:
    """A case for :func:`memory_run`: pp 2, batch 2 per micro-batch, fp32 unless ``mixed_precision``."""
    from moreh_ap.config import ParallelConfig

    kw.setdefault("mixed_precision", False)
    kw.setdefault("batch_per_device", 2)
    cfg = ParallelConfig(num_stages=2, **kw)
    cfg.validate(world, num_blocks=4)
    return dict(id=label, runner=RUNNER, kind=kind, seq=seq, cfg=cfg.to_dict(), world=world)


def rows(case: dict, result: dict) -> list[dict]:
    """One row per pipeline rank (dp index 0) of a launch result: predicted vs measured."""
    out = []
    for r in result["ranks"]:
        if r["dp_rank"] != 0:
            continue
        pred, meas = r["predicted"]["total"], r["measured"]
        out.append(dict(case=case["id"], world=case["world"], pp_rank=r["pp_rank"], predicted=pred, measured=meas,
                        error=(pred - meas) / meas, predicted_breakdown=r["predicted"],
                        measured_categories=r["categories"], wrapper=r["wrapper"]))
    return out


def build(kind: str, *, seq: int):
    """Tiny HF Llama (4 blocks, hidden 256, SDPA attention), random weights, seed 0; "gpt2": GPT-2 of the
    same size with its tied wte / lm_head (on the first and the last pipeline stage)."""
    torch.manual_seed(0)
    if kind == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        # attn_pdrop=0: with attention dropout CPU's SDPA falls back to the math kernel (B*H*T^2 saved)
        cfg = GPT2Config(vocab_size=VOCAB, n_embd=256, n_layer=4, n_head=8, n_positions=seq, attn_pdrop=0.0)
        cfg._attn_implementation = "sdpa"
        return GPT2LMHeadModel(cfg)
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256 if kind == "llama-v256" else VOCAB, hidden_size=256, intermediate_size=688,
                      num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
                      max_position_embeddings=seq, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg)


def parallel_train_peak(model, config, ids: torch.Tensor, *, tracker: str = "torch"):
    """``model`` wrapped by ``moreh_ap.parallelize(model, config, optimizer=AdamW)`` and the tracked peak of one
    training step on ``ids`` (labels = ids; ``tracked_step_peak`` runs an untracked step first).

    Returns:
        ``(ParallelModel, TrackedPeak)``.
    """
    import moreh_ap
    from moreh_ap.runtime.memtrack import tracked_step_peak

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    pm = moreh_ap.parallelize(model, config, optimizer=opt)
    del model  # the stages hold what this rank keeps

    def step():
        pm.train_step(ids, labels=ids)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return pm, tracked_step_peak(pm, opt, step, tracker=tracker)


def memory_run(case: dict, world: int, rank: int) -> dict:
    """Predicted and tracked peak of this rank for ``case``; rank 0 gets every rank's numbers."""
    import moreh_ap
    from moreh_ap.config import ParallelConfig
    from moreh_ap.planner.memory import estimate_rank

    cfg = ParallelConfig.from_dict(case["cfg"])
    seq = case["seq"]
    batch = cfg.global_batch(world)
    vocab = 256 if case["kind"] == "llama-v256" else VOCAB
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    pm, measured = parallel_train_peak(build(case["kind"], seq=seq), cfg, ids, tracker="live")
    with torch.device("meta"):
        meta_model = build(case["kind"], seq=seq)
    meta = ids[: cfg.batch_per_device].to("meta")
    graph = moreh_ap.trace(meta_model, (meta,), {"labels": meta})
    predicted = estimate_rank(graph, cfg, pm.pp_rank, world_size=world, optimizer="adamw", device_type="cpu")
    mine = dict(rank=rank, pp_rank=pm.pp_rank, dp_rank=pm.dp_rank, predicted=predicted.to_dict(),
                measured=measured.total, categories=measured.categories, wrapper=measured.wrapper)
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    return {"ranks": everyone}
