# Benchmark: the planner's predicted per-rank peak vs torch's MemTracker / FSDPMemTracker on the runtime's model.
"""Run from the repository root: ``python benchmarks/bench_memory_model.py [--quick]``.

Each (model, config) pair is wrapped by ``moreh_ap.parallelize`` itself (the
runtime's DDP / FSDP2 units, recompute wrappers and loss path) and runs two real
training steps (AdamW) on rank 0 of a fake process group of 4 ranks
(``torch.testing._internal.distributed.fake_pg``: every tensor is allocated
as on rank 0 of a real job, collectives move no data); world-1 pairs run
before any process group exists. The second step is tracked by torch's
``FSDPMemTracker`` (FSDP2) or ``MemTracker`` (anything else) through
``moreh_ap.runtime.memtrack.tracked_step_peak``; its peak is compared with
``moreh_ap.planner.memory.estimate(trace(meta model), config)`` (tensor-parallel rows, dp 2 x tp 2: of
``local_graph(trace, tp_facts(meta model, batch), tp)``, the graph one TP rank holds; the runtime splits the
model with DTensor before FSDP2 / replicate, and both trackers count the local shards). Target:
within +-5 %. Pipelines need one process per rank: see
``benchmarks/bench_memory_model_pipeline.py``; several micro-batches without a
pipeline are not covered (torch 2.13's trackers reject a module called twice in
one step).

Writes benchmarks/results/bench_memory_model.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MOREH_AP_EXIT_ON_ERROR", "0")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import moreh_ap  # noqa: E402
from moreh_ap.config import ParallelConfig  # noqa: E402
from moreh_ap.planner.memory import estimate  # noqa: E402
from moreh_ap.planner.tp import local_graph, tp_facts  # noqa: E402
from moreh_ap.runtime.memtrack import tracked_step_peak  # noqa: E402

WORLD = 4
MIB = 2**20


def build(kind: str):
    """HF models from configs, random weights: "llama" (vocab 16384), "gpt2" (tied wte / lm_head)."""
    torch.manual_seed(0)
    if kind == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        # attn_pdrop=0: with attention dropout CPU's SDPA uses the math kernel (B*H*T^2 saved); the
        # planner models the flash / memory-efficient kernels, which support dropout on GPUs
        cfg = GPT2Config(vocab_size=16384, n_embd=512, n_layer=6, n_head=8, n_positions=512, attn_pdrop=0.0)
        cfg._attn_implementation = "sdpa"
        return GPT2LMHeadModel(cfg)
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=16384, hidden_size=512, intermediate_size=1376, num_hidden_layers=6,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512,
                      tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg)


Z2, Z3 = dict(distribute_param=True), dict(distribute_param=True, distribute_low_prec_param=True)
# (label, model, world, batch per rank, seq, config keywords)
CASES = [
    ("no distribution fp32", "llama", 1, 2, 512, dict(mixed_precision=False)),
    ("no distribution bf16 + recompute", "llama", 1, 2, 512, dict(recomputation=True)),
    ("DDP fp32", "llama", WORLD, 2, 512, dict(mixed_precision=False)),
    ("DDP bf16", "llama", WORLD, 2, 512, dict()),
    ("ZeRO-2 fp32", "llama", WORLD, 2, 512, dict(Z2, mixed_precision=False)),
    ("ZeRO-2 bf16", "llama", WORLD, 2, 512, dict(Z2)),
    ("ZeRO-3 fp32", "llama", WORLD, 2, 512, dict(Z3, mixed_precision=False)),
    ("ZeRO-3 bf16 + recompute", "llama", WORLD, 2, 512, dict(Z3, recomputation=True)),
    ("ZeRO-3 bf16 + recompute, seq 32", "llama", WORLD, 2, 32, dict(Z3, recomputation=True)),
    ("ZeRO-2 bf16, seq 32", "llama", WORLD, 2, 32, dict(Z2)),
    ("GPT-2 tied, ZeRO-3 bf16", "gpt2", WORLD, 2, 512, dict(Z3)),
    ("GPT-2 tied, ZeRO-2 fp32 + recompute", "gpt2", WORLD, 2, 512, dict(Z2, mixed_precision=False,
                                                                       recomputation=True)),
    ("dp2 x tp2 ZeRO-3 fp32", "llama", WORLD, 2, 512, dict(Z3, tp=2, mixed_precision=False)),
    ("dp2 x tp2 ZeRO-2 bf16 + recompute", "llama", WORLD, 2, 512, dict(Z2, tp=2, recomputation=True)),
    ("dp2 x tp2 replicate bf16", "llama", WORLD, 2, 512, dict(tp=2)),
    ("GPT-2 tied, dp2 x tp2 ZeRO-3 bf16", "gpt2", WORLD, 2, 512, dict(Z3, tp=2)),
]


def run_case(kind: str, world: int, batch: int, seq: int, options: dict) -> dict:
    cfg = ParallelConfig(num_stages=1, num_micro_batches=1, batch_per_device=batch, **options)
    cfg.validate(world)
    ids = torch.randint(0, 16384, (cfg.global_batch(world), seq), generator=torch.Generator().manual_seed(0))
    with torch.device("meta"):
        meta_model = build(kind)
    meta = ids.to("meta")
    graph = local_graph(moreh_ap.trace(meta_model, (meta,), {"labels": meta}),
                        tp_facts(meta_model, (meta,), {"labels": meta}), cfg.tp)
    pred = estimate(graph, cfg, world_size=world, optimizer="adamw", device_type="cpu")
    model = build(kind)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    pm = moreh_ap.parallelize(model, cfg, optimizer=optimizer)

    def step():
        pm.train_step(ids, labels=ids)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    meas = tracked_step_peak(pm, optimizer, step)
    return dict(line=cfg.to_moreh_line(), wrapper=meas.wrapper, measured=meas.total, predicted=pred.total,
                error=(pred.total - meas.total) / meas.total, breakdown=pred.to_dict(), tracked=meas.categories)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the first case of each wrapper (and of TP) only")
    args = ap.parse_args()
    from torch.testing._internal.distributed.fake_pg import FakeStore

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    cases = CASES if not args.quick else [c for i, c in enumerate(CASES) if i in (0, 2, 4, 6, 12)]
    rows = []
    for label, kind, world, batch, seq, options in sorted(cases, key=lambda c: c[2]):  # world 1 first
        if world > 1 and not dist.is_initialized():
            dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=WORLD)
        t0 = time.perf_counter()
        row = dict(case=label, model=kind, world=world, batch=batch, seq=seq)
        row.update(run_case(kind, world, batch, seq, options))
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(f"{label:38} {row['wrapper']:>5} {row['measured'] / MIB:9.1f} {row['predicted'] / MIB:9.1f} "
              f"{row['error'] * 100:+6.1f}%", flush=True)
    print(f"\n{'case':38} {'wrap':>5} {'measured':>9} {'predicted':>9} {'error':>7}  within 5%   (MiB)")
    for r in rows:
        ok = "yes" if abs(r["error"]) <= 0.05 else "NO"
        print(f"{r['case']:38} {r['wrapper']:>5} {r['measured'] / MIB:9.1f} {r['predicted'] / MIB:9.1f} "
              f"{r['error'] * 100:+6.1f}%  {ok}")
    worst = max(abs(r["error"]) for r in rows)
    print(f"worst |error| {worst * 100:.1f}% over {len(rows)} pairs (target 5%)")
    out = ROOT / "benchmarks" / "results" / "bench_memory_model.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"torch": torch.__version__, "world": WORLD, "rows": rows,
                               "worst_abs_error": worst}, indent=1))
    print(f"wrote {out}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
