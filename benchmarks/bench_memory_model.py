# Benchmark: the planner's predicted per-rank peak vs torch.distributed._tools MemTracker / FSDPMemTracker.
"""Run from the repository root: ``python benchmarks/bench_memory_model.py``.

Each (model, config) pair is run for real under FakeTensorMode (no real
memory): world-size-1 configs with ``MemTracker`` on the plain model, dp
configs with ``fully_shard`` on a single-process fake process group of 4 ranks
and ``FSDPMemTracker``. One untracked step first (optimizer state creation),
then one tracked step; the tracked peak is compared with
``moreh_ap.planner.memory.estimate``. Target: within +-5%. Pipelines cannot be
tracked in one process and are not covered here.
Writes benchmarks/results/bench_memory_model.json.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

from moreh_ap.config import ParallelConfig  # noqa: E402
from moreh_ap.graph import trace  # noqa: E402
from moreh_ap.planner import memory  # noqa: E402

WORLD = 4


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(a)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab=8192, d=512, layers=6, heads=8, seq=512) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx, labels):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        return F.cross_entropy(self.head(self.ln_f(x)).flatten(0, 1).float(), labels.flatten())


# (label, world, batch per rank, seq, recompute, distribute_param, distribute_low_prec_param, mixed precision)
CASES = [
    ("plain fp32", 1, 8, 512, False, False, False, False),
    ("plain fp32 + recompute", 1, 8, 512, True, False, False, False),
    ("zero2 fp32", WORLD, 4, 512, False, True, False, False),
    ("zero3 fp32", WORLD, 4, 512, False, True, True, False),
    ("zero2 bf16", WORLD, 4, 512, False, True, False, True),
    ("zero3 bf16 + recompute", WORLD, 4, 512, True, True, True, True),
    ("zero3 bf16", WORLD, 8, 256, False, True, True, True),
    ("replicated (shard group 1) bf16", WORLD, 4, 512, False, False, False, True),
]


def measure(world, batch, seq, rec, dist_p, zero3, mp, mesh):
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    with FakeTensorMode():
        torch.manual_seed(0)
        model = GPT()
        if rec:
            for i, blk in enumerate(model.blocks):
                model.blocks[i] = checkpoint_wrapper(blk)
        fsdp = world > 1
        if fsdp:
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mp else (
                MixedPrecisionPolicy())
            for blk in model.blocks:
                fully_shard(blk, mesh=mesh, reshard_after_forward=zero3, mp_policy=policy)
            fully_shard(model, mesh=mesh, reshard_after_forward=None if zero3 else False, mp_policy=policy)
        optim = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
        idx = torch.randint(0, 8192, (batch, seq))

        def step():
            model(idx, idx).backward()
            optim.step()
            optim.zero_grad(set_to_none=True)

        step()
        tracker = FSDPMemTracker(model, optim) if fsdp else MemTracker()
        if not fsdp:
            tracker.track_external(model, optim)
        with tracker:
            step()
        snap = tracker.get_tracker_snapshot("peak")
    return max(v["Total"] for v in snap.values())


def predict(world, batch, seq, rec, dist_p, zero3, mp):
    with torch.device("meta"):
        model = GPT()
    idx = torch.empty(batch, seq, dtype=torch.long, device="meta")
    graph = trace(model, (idx,), {"labels": idx})
    cfg = ParallelConfig(num_stages=1, num_micro_batches=1, batch_per_device=batch, recomputation=rec,
                         distribute_param=dist_p, distribute_low_prec_param=zero3, mixed_precision=mp)
    cfg.validate(world)
    return memory.estimate(graph, cfg, world_size=world, optimizer="adamw", device_type="cpu")


def main() -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=WORLD)
    mesh2 = init_device_mesh("cpu", (WORLD, 1), mesh_dim_names=("replicate_like", "shard"))
    mesh = init_device_mesh("cpu", (WORLD,))
    rows = []
    for label, world, batch, seq, rec, dist_p, zero3, mp in CASES:
        t0 = time.perf_counter()
        try:
            if dist_p or world == 1:
                measured = measure(world, batch, seq, rec, dist_p, zero3, mp, mesh)
            else:  # replicated: FSDP2 with a shard group of 1 (HSDP on a (dp, 1) mesh)
                measured = measure_hsdp(batch, seq, mp, mesh2)
            err_msg = None
        except Exception as exc:  # report, do not hide
            measured, err_msg = None, f"{type(exc).__name__}: {exc}"[:200]
        pred = predict(world, batch, seq, rec, dist_p, zero3, mp)
        error = None if measured is None else (pred.total - measured) / measured
        rows.append(dict(case=label, world=world, batch=batch, seq=seq, measured=measured, predicted=pred.total,
                         error=error, breakdown=pred.to_dict(), failure=err_msg, seconds=time.perf_counter() - t0))
    mib = 2**20
    print(f"{'case':34} {'world':>5} {'measured MiB':>13} {'predicted MiB':>14} {'error':>8}  within 5%")
    for r in rows:
        meas = f"{r['measured'] / mib:13.1f}" if r["measured"] else f"{'failed':>13}"
        err = f"{r['error'] * 100:+7.1f}%" if r["error"] is not None else f"{'-':>8}"
        ok = "-" if r["error"] is None else ("yes" if abs(r["error"]) <= 0.05 else "NO")
        print(f"{r['case']:34} {r['world']:>5} {meas} {r['predicted'] / mib:14.1f} {err}  {ok}"
              + (f"  ({r['failure']})" if r["failure"] else ""))
    out = ROOT / "benchmarks" / "results" / "bench_memory_model.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=1))
    print(f"wrote {out}")
    dist.destroy_process_group()


def measure_hsdp(batch, seq, mp, mesh2):
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    with FakeTensorMode():
        torch.manual_seed(0)
        model = GPT()
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mp else (
            MixedPrecisionPolicy())
        for blk in model.blocks:
            fully_shard(blk, mesh=mesh2, reshard_after_forward=False, mp_policy=policy)
        fully_shard(model, mesh=mesh2, reshard_after_forward=False, mp_policy=policy)
        optim = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
        idx = torch.randint(0, 8192, (batch, seq))

        def step():
            model(idx, idx).backward()
            optim.step()
            optim.zero_grad(set_to_none=True)

        step()
        tracker = FSDPMemTracker(model, optim)
        with tracker:
            step()
        snap = tracker.get_tracker_snapshot("peak")
    return max(v["Total"] for v in snap.values())


if __name__ == "__main__":
    main()
